-- Steps the dispatcher runs itself: manual intervention and e-mail.

-- A manual step's request for approval, and the decision.
CREATE TABLE approvals (
    step_run_id    uuid PRIMARY KEY REFERENCES step_runs (id) ON DELETE CASCADE,
    task_id        uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    -- With #{...} substituted (sensitive values masked).
    instructions   text NOT NULL,
    requested_at   timestamptz NOT NULL DEFAULT now(),
    decision       text CHECK (decision IN ('Approved', 'Rejected')),
    decided_by     text,
    decided_by_key uuid,
    decided_at     timestamptz,
    note           text
);
CREATE INDEX approvals_task ON approvals (task_id);

-- An e-mail step's message as sent (sensitive values masked), and how sending went.
CREATE TABLE emails (
    step_run_id uuid NOT NULL,
    attempt     integer NOT NULL,
    to_addrs    text[] NOT NULL,
    subject     text NOT NULL,
    body        text NOT NULL,
    sent_at     timestamptz,
    error       text,
    PRIMARY KEY (step_run_id, attempt),
    FOREIGN KEY (step_run_id, attempt) REFERENCES attempts (step_run_id, attempt) ON DELETE CASCADE
);
