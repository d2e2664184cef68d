//! The database's half of the transition table: for each state column, a `CHECK` naming
//! its states and a trigger refusing every change the table in `gantry_shared::states`
//! does not list. Migration `20261201000003_states.sql` is exactly [`migration`]'s text; the
//! unit test below fails if the two drift, and `tests/tests/states.rs` tries every pair
//! against a real database.

use gantry_shared::states::{
    ArtifactState, AttemptState, State, StepState, TaskState, WorkerHealth,
};
use std::fmt::Write;

/// A state column and the machine it follows.
struct Column {
    table: &'static str,
    column: &'static str,
    /// Whether a trigger checks transitions (health may go anywhere: only a `CHECK`).
    checked: bool,
}

fn quoted<S: State>(states: &[S]) -> String {
    states
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn section<S: State>(out: &mut String, c: Column) {
    let Column {
        table,
        column,
        checked,
    } = c;
    let _ = writeln!(
        out,
        "ALTER TABLE {table} ADD CONSTRAINT {table}_{column}_known CHECK ({column} IN ({}));",
        quoted(S::ALL)
    );
    if !checked {
        out.push('\n');
        return;
    }
    let _ = writeln!(
        out,
        "\nCREATE FUNCTION gantry_{table}_{column}_transition() RETURNS trigger LANGUAGE plpgsql AS $$\nBEGIN"
    );
    let _ = writeln!(
        out,
        "    IF TG_OP = 'INSERT' THEN\n        IF NEW.{column} NOT IN ({}) THEN\n            RAISE EXCEPTION '{} cannot be created in state %', NEW.{column}\n                USING ERRCODE = 'check_violation';\n        END IF;\n        RETURN NEW;\n    END IF;",
        quoted(S::initial()),
        S::MACHINE
    );
    let _ = writeln!(
        out,
        "    IF NEW.{column} = OLD.{column} THEN\n        RETURN NEW;\n    END IF;\n    IF NOT (CASE NEW.{column}"
    );
    for &to in S::ALL {
        let sources = S::sources(to);
        let allowed = if sources.is_empty() {
            "false".to_owned()
        } else {
            format!("OLD.{column} IN ({})", quoted(sources))
        };
        let _ = writeln!(out, "        WHEN '{}' THEN {allowed}", to.as_str());
    }
    let _ = writeln!(
        out,
        "        ELSE false END) THEN\n        RAISE EXCEPTION '{} state % → % is not an allowed transition', OLD.{column}, NEW.{column}\n            USING ERRCODE = 'check_violation';\n    END IF;\n    RETURN NEW;\nEND $$;\n",
        S::MACHINE
    );
    let _ = writeln!(
        out,
        "CREATE TRIGGER {table}_{column}_transition BEFORE INSERT OR UPDATE OF {column} ON {table}\n    FOR EACH ROW EXECUTE FUNCTION gantry_{table}_{column}_transition();\n"
    );
}

/// The migration's SQL, generated from the transition tables.
pub fn migration() -> String {
    let mut out = String::from(
        "-- Generated from gantry_shared::states by dispatcher/src/transitions/ddl.rs (its unit\n-- test fails if this file differs). Every state column names its states, and a trigger\n-- refuses every transition the table does not list.\n\n",
    );
    let col = |table, column, checked| Column {
        table,
        column,
        checked,
    };
    section::<TaskState>(&mut out, col("tasks", "state", true));
    section::<StepState>(&mut out, col("step_runs", "state", true));
    section::<AttemptState>(&mut out, col("attempts", "state", true));
    section::<ArtifactState>(&mut out, col("artifacts", "state", true));
    section::<WorkerHealth>(&mut out, col("workers", "health", false));
    section::<WorkerHealth>(&mut out, col("worker_health_events", "health", false));
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    const PATH: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/migrations/20261201000003_states.sql"
    );

    #[test]
    fn the_migration_is_the_table() {
        let generated = super::migration();
        if std::env::var_os("GANTRY_WRITE_STATES_MIGRATION").is_some() {
            std::fs::write(PATH, &generated).unwrap();
        }
        let on_disk = std::fs::read_to_string(PATH).unwrap_or_default();
        assert!(
            on_disk == generated,
            "{PATH} differs from the transition tables: run this test with GANTRY_WRITE_STATES_MIGRATION=1 (only for a new migration: an applied one must not change)"
        );
    }
}
