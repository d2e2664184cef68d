-- High availability: several dispatcher nodes share one database; each task is orchestrated
-- by exactly one of them, its owner, which holds a lease on it.
--
-- A node registers here at start with a fresh id (one per process) and its name
-- (`host@bound-address`), and refreshes `heartbeat_at` on every sweep. Rows are kept for the
-- operator; they name the previous owner when a task is taken over.
CREATE TABLE dispatcher_nodes (
    id           uuid PRIMARY KEY,
    name         text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dispatcher_nodes_name ON dispatcher_nodes (name);

-- A node owns a task while owner_node is its id and lease_until is in the future. The owner
-- renews the lease on every sweep; another node may take the task once it has expired. Every
-- decision about a task is made under its row lock after checking the owner, so the lease
-- only decides who makes progress, never whether two nodes decide at once.
ALTER TABLE tasks ADD COLUMN owner_node uuid;
ALTER TABLE tasks ADD COLUMN lease_until timestamptz;
CREATE INDEX tasks_owner ON tasks (owner_node) WHERE owner_node IS NOT NULL;

-- A task that has ended has no owner: it no longer counts against its node's task_cap,
-- whichever code path ended it.
CREATE FUNCTION tasks_release_ended() RETURNS trigger AS $$
BEGIN
    IF NEW.state IN ('Success', 'Failed', 'Cancelled') THEN
        NEW.owner_node := NULL;
        NEW.lease_until := NULL;
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER tasks_release_ended BEFORE UPDATE OF state ON tasks
    FOR EACH ROW EXECUTE FUNCTION tasks_release_ended();
