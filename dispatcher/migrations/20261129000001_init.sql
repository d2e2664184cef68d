-- Gantry's schema. One task holds one step run per step of its process; each step run has
-- attempts (1, 2, ...) created only by the dispatcher; log lines belong to attempts and get a
-- task-wide position once their attempt's prefix is gapless.

CREATE TABLE pools (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    -- Names the pool's queue; never changes once created (the name may).
    slug        text NOT NULL UNIQUE,
    description text NOT NULL DEFAULT '',
    is_default  boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- Exactly one default pool: at most one by this index, at least one by the code.
CREATE UNIQUE INDEX pools_single_default ON pools (is_default) WHERE is_default;

CREATE TABLE workers (
    id                   uuid PRIMARY KEY,
    name                 text NOT NULL UNIQUE,
    -- sha256 of the worker's credential; the credential itself is shown once.
    token_hash           text NOT NULL UNIQUE,
    max_concurrent_steps integer NOT NULL CHECK (max_concurrent_steps BETWEEN 1 AND 1000),
    enabled              boolean NOT NULL DEFAULT true,
    health               text NOT NULL DEFAULT 'Unavailable',
    health_reason        text,
    last_heartbeat_at    timestamptz,
    agent_version        text,
    created_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE worker_pools (
    worker_id uuid NOT NULL REFERENCES workers (id) ON DELETE CASCADE,
    pool_id   uuid NOT NULL REFERENCES pools (id) ON DELETE RESTRICT,
    PRIMARY KEY (worker_id, pool_id)
);
CREATE INDEX worker_pools_pool ON worker_pools (pool_id);

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    name         text NOT NULL,
    key_hash     text NOT NULL UNIQUE,
    key_prefix   text NOT NULL,
    permissions  text[] NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz
);

CREATE TABLE tasks (
    id            uuid PRIMARY KEY,
    name          text NOT NULL,
    -- Queued, Executing, Waiting, Cancelling, Success, Failed, Cancelled
    state         text NOT NULL,
    -- The submitted process with sensitive values removed.
    process       jsonb NOT NULL,
    -- Non-sensitive variables, name -> value.
    variables     jsonb NOT NULL,
    error         text,
    created_by    uuid REFERENCES api_keys (id) ON DELETE SET NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz
);
CREATE INDEX tasks_created ON tasks (created_at DESC);
CREATE INDEX tasks_active ON tasks (state) WHERE state IN ('Queued', 'Executing', 'Waiting', 'Cancelling');

-- A row here means something happened that the orchestrator must act on for the task. Writers
-- bump it (INSERT ... ON CONFLICT DO UPDATE) without touching the task's row, so they never
-- wait for the orchestrator's lock; the orchestrator deletes it only if the bump it read is
-- still current, so a wake-up that arrives mid-advance is never lost.
CREATE TABLE task_wakeups (
    task_id uuid PRIMARY KEY REFERENCES tasks (id) ON DELETE CASCADE,
    bump    bigint NOT NULL DEFAULT 0
);

-- Sensitive variables, kept apart so no query of tasks can leak them.
CREATE TABLE task_secrets (
    task_id uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    name    text NOT NULL,
    -- XChaCha20-Poly1305: 24-byte nonce then ciphertext, under secrets.key.
    value   bytea NOT NULL,
    PRIMARY KEY (task_id, name)
);

CREATE TABLE step_runs (
    id          uuid PRIMARY KEY,
    task_id     uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    idx         integer NOT NULL,
    name        text NOT NULL,
    spec        jsonb NOT NULL,
    pool_id     uuid REFERENCES pools (id) ON DELETE RESTRICT,
    -- Pending, Waiting, Queued, Running, Success, Failed, Skipped, Cancelled, TimedOut, WorkerLost
    state       text NOT NULL DEFAULT 'Pending',
    -- The current attempt number; 0 before the first.
    attempt     integer NOT NULL DEFAULT 0,
    waiting_for text,
    reason      text,
    -- When the next attempt may be published (retry backoff).
    not_before  timestamptz,
    UNIQUE (task_id, idx),
    UNIQUE (task_id, name)
);

CREATE TABLE attempts (
    step_run_id   uuid NOT NULL REFERENCES step_runs (id) ON DELETE CASCADE,
    attempt       integer NOT NULL,
    -- The current job id; replaced (voiding the old one) when an unclaimed job is re-published.
    job_id        uuid NOT NULL UNIQUE,
    -- Pending (not yet confirmed by the broker), Queued, Running, then a final state.
    state         text NOT NULL,
    worker_id     uuid REFERENCES workers (id) ON DELETE SET NULL,
    worker_name   text,
    claim_id      uuid,
    exit_code     integer,
    error         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz,
    queued_at     timestamptz,
    started_at    timestamptz,
    finished_at   timestamptz,
    -- Lines stored without a gap from seq 0: the readable prefix.
    lines_stored  bigint NOT NULL DEFAULT 0,
    -- Reported by StepFinished; the attempt becomes final once lines_stored reaches it.
    line_count    bigint,
    outcome       text,
    -- Latest progress reported by the script (update_progress).
    progress_percent smallint,
    progress_message text,
    PRIMARY KEY (step_run_id, attempt)
);
CREATE INDEX step_runs_retry_due ON step_runs (not_before) WHERE not_before IS NOT NULL;
CREATE INDEX attempts_unconfirmed ON attempts (created_at) WHERE state = 'Pending';
CREATE INDEX attempts_worker_running ON attempts (worker_id) WHERE state = 'Running';

-- Task-wide log position counter, on its own row so log writers never wait for the
-- orchestrator's lock on the task.
CREATE TABLE task_log_positions (
    task_id  uuid PRIMARY KEY REFERENCES tasks (id) ON DELETE CASCADE,
    last_pos bigint NOT NULL DEFAULT 0
);

-- Visible log lines. pos is gapless per task and assigned under the counter's row lock, so a
-- reader that sees position n has seen every position below n. Lines from agents carry their
-- attempt and seq; lines Gantry writes itself (skips, failures) carry no seq.
CREATE TABLE log_lines (
    task_id     uuid NOT NULL,
    pos         bigint NOT NULL,
    step_run_id uuid,
    attempt     integer,
    seq         bigint,
    ts          timestamptz NOT NULL,
    stream      smallint NOT NULL,
    text        text NOT NULL,
    PRIMARY KEY (task_id, pos)
);
CREATE UNIQUE INDEX log_lines_attempt_seq ON log_lines (step_run_id, attempt, seq);

-- Lines that arrived ahead of a gap in their attempt; moved to log_lines when it closes.
CREATE TABLE log_lines_pending (
    step_run_id uuid NOT NULL,
    attempt     integer NOT NULL,
    seq         bigint NOT NULL,
    ts          timestamptz NOT NULL,
    stream      smallint NOT NULL,
    text        text NOT NULL,
    PRIMARY KEY (step_run_id, attempt, seq)
);

CREATE TABLE output_variables (
    step_run_id uuid NOT NULL REFERENCES step_runs (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    name        text NOT NULL,
    value       text,
    sensitive   boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (step_run_id, attempt, name)
);

-- Events that did not come from an attempt's current claimant (a lost worker's late
-- results, a voided job): kept for the operator, never applied.
CREATE TABLE stale_events (
    id          bigserial PRIMARY KEY,
    step_run_id uuid,
    attempt     integer,
    job_id      uuid,
    worker_id   uuid,
    kind        text NOT NULL,
    reason      text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- Messages that failed validation and were dead-lettered, as the dispatcher saw them.
CREATE TABLE dead_letters (
    id          bigserial PRIMARY KEY,
    queue       text,
    reason      text NOT NULL,
    body        text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
