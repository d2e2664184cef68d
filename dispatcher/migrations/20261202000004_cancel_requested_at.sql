-- When a task's cancel was requested, by the database's clock: the loop that concludes
-- cancelled attempts no agent answered for counts from it on every dispatcher node, so a
-- node that restarts or takes over does not start the count again. Tasks cancelling at the
-- upgrade count from the upgrade.
ALTER TABLE tasks ADD COLUMN cancel_requested_at timestamptz;
UPDATE tasks SET cancel_requested_at = now() WHERE state = 'Cancelling';
