-- Artifacts: files an attempt uploaded, in chunks, through the result consumer.
--
-- A row is created by the first chunk (or by StepFinished, for an empty file). StepFinished
-- fills in what the agent computed (size, chunk count, sha256); once every chunk is stored,
-- the consumer hashes the stored bytes and sets `state`:
--   Receiving -> Stored (the sha256 matches) | Corrupt (it does not).
-- The attempt becomes final only once none of its artifacts is Receiving. Artifacts whose
-- upload the agent gave up on (StepFinished does not list them) are deleted then.
CREATE TABLE artifacts (
    id            uuid PRIMARY KEY,
    task_id       uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    step_run_id   uuid NOT NULL,
    attempt       integer NOT NULL,
    -- The agent's number for it within the attempt (upload order, from 0).
    idx           integer NOT NULL,
    name          text NOT NULL,
    state         text NOT NULL DEFAULT 'Receiving',
    -- As announced by StepFinished.
    size          bigint,
    chunk_count   bigint,
    sha256        text,
    -- As received.
    chunks_stored bigint NOT NULL DEFAULT 0,
    bytes_stored  bigint NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    stored_at     timestamptz,
    FOREIGN KEY (step_run_id, attempt) REFERENCES attempts (step_run_id, attempt) ON DELETE CASCADE,
    UNIQUE (step_run_id, attempt, idx)
);
CREATE INDEX artifacts_task ON artifacts (task_id, created_at);

-- One chunk per row, keyed by its sequence number: a redelivered chunk changes nothing.
CREATE TABLE artifact_chunks (
    artifact_id uuid NOT NULL REFERENCES artifacts (id) ON DELETE CASCADE,
    seq         bigint NOT NULL,
    data        bytea NOT NULL,
    PRIMARY KEY (artifact_id, seq)
);
-- Artifacts are mostly compressed already: store chunks out of line without trying to
-- compress them again.
ALTER TABLE artifact_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
