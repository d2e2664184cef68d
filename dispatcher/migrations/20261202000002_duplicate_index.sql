-- attempts_running_worker (20261201000005) repeats attempts_worker_running (the first
-- migration): the same column under the same predicate. Every claim wrote both.
DROP INDEX IF EXISTS attempts_running_worker;
