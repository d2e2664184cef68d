-- The worker-loss monitor asks every second which workers run a step or have jobs waiting in
-- their own queue. Without these indexes that read every attempt ever made, each time: 50 to
-- 100 ms of PostgreSQL's CPU per second once a few thousand attempts exist. Partial, so they
-- hold only live attempts; `state` already sits in an index predicate (attempts_unconfirmed),
-- so they cost no HOT updates that were not already lost.
CREATE INDEX attempts_running_worker ON attempts (worker_id) WHERE state = 'Running';
CREATE INDEX attempts_routed_waiting ON attempts (routed_worker)
    WHERE state IN ('Pending', 'Queued') AND routed_worker IS NOT NULL;
