-- Secrets at rest: the database remembers which key sealed it. The first dispatcher to start
-- seals a check value here; every later start opens it, so a node whose secrets key differs
-- from the installation's refuses to start instead of failing claims one by one.
-- Values sealed before this version (under the old built-in key, bound to nothing) are not
-- converted: opening one fails with an error saying it must be submitted again.
CREATE TABLE secrets_key_check (
    id         smallint PRIMARY KEY CHECK (id = 1),
    sealed     bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Per-task quotas (limits.task_log_bytes, limits.artifact_bytes): what each task has stored,
-- counted on the task's log-position row, which the result consumer locks for every batch
-- anyway, in the transaction that stores the data.
ALTER TABLE task_log_positions
    ADD COLUMN log_bytes      bigint NOT NULL DEFAULT 0,
    ADD COLUMN artifact_bytes bigint NOT NULL DEFAULT 0;
