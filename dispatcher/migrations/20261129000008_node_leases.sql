-- One lease per dispatcher node instead of one per task: a node owns a task while
-- tasks.owner_node is its id and its own heartbeat_at is less than the lease (10 s) old.
-- Renewing a lease is then one row per node, however many tasks it owns, instead of an
-- UPDATE of every owned task on every sweep (which, with a deep backlog, rewrote a thousand
-- rows every two seconds and fought the orchestrator for their row locks).
CREATE OR REPLACE FUNCTION tasks_release_ended() RETURNS trigger AS $$
BEGIN
    IF NEW.state IN ('Success', 'Failed', 'Cancelled') THEN
        NEW.owner_node := NULL;
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

ALTER TABLE tasks DROP COLUMN lease_until;
