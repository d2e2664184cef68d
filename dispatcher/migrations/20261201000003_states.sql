-- Generated from gantry_shared::states by dispatcher/src/transitions/ddl.rs (its unit
-- test fails if this file differs). Every state column names its states, and a trigger
-- refuses every transition the table does not list.

ALTER TABLE tasks ADD CONSTRAINT tasks_state_known CHECK (state IN ('Queued', 'Executing', 'Waiting', 'Cancelling', 'Success', 'Failed', 'Cancelled'));

CREATE FUNCTION gantry_tasks_state_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.state NOT IN ('Queued') THEN
            RAISE EXCEPTION 'task cannot be created in state %', NEW.state
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.state = OLD.state THEN
        RETURN NEW;
    END IF;
    IF NOT (CASE NEW.state
        WHEN 'Queued' THEN false
        WHEN 'Executing' THEN OLD.state IN ('Queued', 'Waiting')
        WHEN 'Waiting' THEN OLD.state IN ('Queued', 'Executing')
        WHEN 'Cancelling' THEN OLD.state IN ('Queued', 'Executing', 'Waiting')
        WHEN 'Success' THEN OLD.state IN ('Queued', 'Executing', 'Waiting')
        WHEN 'Failed' THEN OLD.state IN ('Queued', 'Executing', 'Waiting')
        WHEN 'Cancelled' THEN OLD.state IN ('Cancelling')
        ELSE false END) THEN
        RAISE EXCEPTION 'task state % → % is not an allowed transition', OLD.state, NEW.state
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER tasks_state_transition BEFORE INSERT OR UPDATE OF state ON tasks
    FOR EACH ROW EXECUTE FUNCTION gantry_tasks_state_transition();

ALTER TABLE step_runs ADD CONSTRAINT step_runs_state_known CHECK (state IN ('Pending', 'Waiting', 'Queued', 'Running', 'Success', 'Failed', 'TimedOut', 'Cancelled', 'WorkerLost', 'Skipped'));

CREATE FUNCTION gantry_step_runs_state_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.state NOT IN ('Pending') THEN
            RAISE EXCEPTION 'step run cannot be created in state %', NEW.state
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.state = OLD.state THEN
        RETURN NEW;
    END IF;
    IF NOT (CASE NEW.state
        WHEN 'Pending' THEN OLD.state IN ('Waiting', 'Queued', 'Running')
        WHEN 'Waiting' THEN OLD.state IN ('Pending', 'Queued', 'Running')
        WHEN 'Queued' THEN OLD.state IN ('Pending')
        WHEN 'Running' THEN OLD.state IN ('Pending', 'Waiting', 'Queued')
        WHEN 'Success' THEN OLD.state IN ('Pending', 'Waiting', 'Queued', 'Running')
        WHEN 'Failed' THEN OLD.state IN ('Pending', 'Waiting', 'Queued', 'Running')
        WHEN 'TimedOut' THEN OLD.state IN ('Pending', 'Waiting', 'Queued', 'Running')
        WHEN 'Cancelled' THEN OLD.state IN ('Pending', 'Waiting', 'Queued', 'Running')
        WHEN 'WorkerLost' THEN OLD.state IN ('Pending', 'Waiting', 'Queued', 'Running')
        WHEN 'Skipped' THEN OLD.state IN ('Pending')
        ELSE false END) THEN
        RAISE EXCEPTION 'step run state % → % is not an allowed transition', OLD.state, NEW.state
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER step_runs_state_transition BEFORE INSERT OR UPDATE OF state ON step_runs
    FOR EACH ROW EXECUTE FUNCTION gantry_step_runs_state_transition();

ALTER TABLE attempts ADD CONSTRAINT attempts_state_known CHECK (state IN ('Waiting', 'Pending', 'Queued', 'Running', 'Success', 'Failed', 'TimedOut', 'Cancelled', 'WorkerLost'));

CREATE FUNCTION gantry_attempts_state_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.state NOT IN ('Waiting', 'Pending', 'Running') THEN
            RAISE EXCEPTION 'attempt cannot be created in state %', NEW.state
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.state = OLD.state THEN
        RETURN NEW;
    END IF;
    IF NOT (CASE NEW.state
        WHEN 'Waiting' THEN OLD.state IN ('Pending', 'Queued')
        WHEN 'Pending' THEN OLD.state IN ('Waiting', 'Queued')
        WHEN 'Queued' THEN OLD.state IN ('Pending')
        WHEN 'Running' THEN OLD.state IN ('Pending', 'Queued')
        WHEN 'Success' THEN OLD.state IN ('Running')
        WHEN 'Failed' THEN OLD.state IN ('Waiting', 'Pending', 'Queued', 'Running')
        WHEN 'TimedOut' THEN OLD.state IN ('Waiting', 'Running')
        WHEN 'Cancelled' THEN OLD.state IN ('Waiting', 'Pending', 'Queued', 'Running')
        WHEN 'WorkerLost' THEN OLD.state IN ('Running')
        ELSE false END) THEN
        RAISE EXCEPTION 'attempt state % → % is not an allowed transition', OLD.state, NEW.state
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER attempts_state_transition BEFORE INSERT OR UPDATE OF state ON attempts
    FOR EACH ROW EXECUTE FUNCTION gantry_attempts_state_transition();

ALTER TABLE artifacts ADD CONSTRAINT artifacts_state_known CHECK (state IN ('Receiving', 'Stored', 'Corrupt'));

CREATE FUNCTION gantry_artifacts_state_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.state NOT IN ('Receiving') THEN
            RAISE EXCEPTION 'artifact cannot be created in state %', NEW.state
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.state = OLD.state THEN
        RETURN NEW;
    END IF;
    IF NOT (CASE NEW.state
        WHEN 'Receiving' THEN false
        WHEN 'Stored' THEN OLD.state IN ('Receiving')
        WHEN 'Corrupt' THEN OLD.state IN ('Receiving')
        ELSE false END) THEN
        RAISE EXCEPTION 'artifact state % → % is not an allowed transition', OLD.state, NEW.state
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER artifacts_state_transition BEFORE INSERT OR UPDATE OF state ON artifacts
    FOR EACH ROW EXECUTE FUNCTION gantry_artifacts_state_transition();

ALTER TABLE workers ADD CONSTRAINT workers_health_known CHECK (health IN ('Healthy', 'HasWarnings', 'Unhealthy', 'Unavailable'));

ALTER TABLE worker_health_events ADD CONSTRAINT worker_health_events_health_known CHECK (health IN ('Healthy', 'HasWarnings', 'Unhealthy', 'Unavailable'));
