-- The worker fleet: settings with the machine policy, health history, sticky workers, the
-- built-in worker.

-- One row: the server's settings (GET/PUT /api/settings).
CREATE TABLE settings (
    id                             boolean PRIMARY KEY DEFAULT true CHECK (id),
    builtin_worker_enabled         boolean NOT NULL DEFAULT true,
    heartbeat_interval_secs        integer NOT NULL DEFAULT 10
        CHECK (heartbeat_interval_secs BETWEEN 1 AND 3600),
    unavailable_after_secs         integer NOT NULL DEFAULT 30
        CHECK (unavailable_after_secs BETWEEN 2 AND 86400),
    health_check_script            text,
    min_free_disk_mb               bigint NOT NULL DEFAULT 5120 CHECK (min_free_disk_mb >= 0),
    no_healthy_worker_timeout_secs integer NOT NULL DEFAULT 600
        CHECK (no_healthy_worker_timeout_secs >= 1),
    updated_at                     timestamptz
);
INSERT INTO settings DEFAULT VALUES;

-- Every change of a worker's health, with its reason.
CREATE TABLE worker_health_events (
    id        bigserial PRIMARY KEY,
    worker_id uuid NOT NULL REFERENCES workers (id) ON DELETE CASCADE,
    at        timestamptz NOT NULL DEFAULT now(),
    health    text NOT NULL,
    reason    text
);
CREATE INDEX worker_health_events_worker ON worker_health_events (worker_id, id);

-- The built-in worker of a dispatcher node: in no pool, never listed as a pool's member.
ALTER TABLE workers ADD COLUMN builtin boolean NOT NULL DEFAULT false;

-- A task's worker for a pool, chosen at its first step there (sticky, as in Octopus).
CREATE TABLE task_pool_workers (
    task_id   uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    pool_id   uuid NOT NULL REFERENCES pools (id) ON DELETE CASCADE,
    worker_id uuid NOT NULL REFERENCES workers (id) ON DELETE CASCADE,
    PRIMARY KEY (task_id, pool_id)
);
CREATE INDEX task_pool_workers_worker ON task_pool_workers (worker_id);

-- Where an attempt's current job went: a worker's own queue (sticky) or NULL for its pool's
-- (or the server's) queue. Jobs parked in a lost worker's queue are sent out again.
ALTER TABLE attempts ADD COLUMN routed_worker uuid, ADD COLUMN routing_key text;
-- Since when a step has been waiting for its pool to have a healthy worker.
ALTER TABLE attempts ADD COLUMN no_worker_since timestamptz;
