-- What the plan needs of each step, as columns computed from the step's spec when it is
-- written: every advance reads these for all of a task's steps, and reading the whole spec
-- for that (turned to text by PostgreSQL, parsed again by the dispatcher) was the dearest
-- statement of a conclusion. The full spec is read only for a step being started.
-- Stored generated columns can never drift from the spec; adding them fills existing rows.
-- The defaults are StepSpec's serde defaults (a spec written by the dispatcher has every
-- one of these fields but `mutex`, which is absent when unset).
ALTER TABLE step_runs
    ADD COLUMN kind text NOT NULL
        GENERATED ALWAYS AS (COALESCE(spec ->> 'kind', 'script')) STORED,
    ADD COLUMN parallel boolean NOT NULL
        GENERATED ALWAYS AS (COALESCE((spec -> 'parallel')::boolean, false)) STORED,
    ADD COLUMN run_condition text NOT NULL
        GENERATED ALWAYS AS (COALESCE(spec ->> 'condition', 'success')) STORED,
    ADD COLUMN mutex text
        GENERATED ALWAYS AS (spec ->> 'mutex') STORED;
