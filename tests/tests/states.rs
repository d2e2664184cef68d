//! The database refuses every state change the transition table does not list, and allows
//! every one it does: each (from, to) pair of each machine is tried against the real schema,
//! and so is creating a record in each state and writing a state that does not exist.

use gantry_tests::Stack;
use gantry_tests::gantry_shared::states::{
    ArtifactState, AttemptState, State, StepState, TaskState, Variants,
};
use sqlx::{Executor, PgConnection, PgPool};
use uuid::Uuid;

/// One task with one step run, one attempt and one artifact, every row `Receiving`/initial.
struct Rows {
    task: Uuid,
    step_run: Uuid,
}

async fn rows(db: &PgPool) -> Rows {
    let (task, step_run) = (Uuid::new_v4(), Uuid::new_v4());
    let mut c = db.acquire().await.unwrap();
    sqlx::query(
        "INSERT INTO tasks (id, name, state, process, variables) VALUES ($1, 't', 'Queued', '{}', '{}')",
    )
    .bind(task)
    .execute(&mut *c)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO step_runs (id, task_id, idx, name, spec) VALUES ($1, $2, 0, 's', '{}')",
    )
    .bind(step_run)
    .bind(task)
    .execute(&mut *c)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO attempts (step_run_id, attempt, job_id, state) VALUES ($1, 1, $2, 'Pending')",
    )
    .bind(step_run)
    .bind(Uuid::new_v4())
    .execute(&mut *c)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO artifacts (id, task_id, step_run_id, attempt, idx, name) VALUES ($1, $2, $3, 1, 0, 'a')",
    )
    .bind(Uuid::new_v4())
    .bind(task)
    .bind(step_run)
    .execute(&mut *c)
    .await
    .unwrap();
    Rows { task, step_run }
}

/// Try `from → to` on `table`'s row(s) selected by `filter`, in a transaction rolled back
/// afterwards: the row is put in `from` with triggers off, then moved with them on.
async fn tried(
    c: &mut PgConnection,
    table: &str,
    filter: &str,
    from: &str,
    to: &str,
) -> Result<(), String> {
    c.execute("BEGIN").await.unwrap();
    c.execute("SET LOCAL session_replication_role = replica")
        .await
        .unwrap();
    c.execute(format!("UPDATE {table} SET state = '{from}' WHERE {filter}").as_str())
        .await
        .unwrap();
    c.execute("SET LOCAL session_replication_role = origin")
        .await
        .unwrap();
    let r = c
        .execute(format!("UPDATE {table} SET state = '{to}' WHERE {filter}").as_str())
        .await;
    c.execute("ROLLBACK").await.unwrap();
    match r {
        Ok(done) => {
            assert_eq!(done.rows_affected(), 1, "{table}: the row exists");
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

async fn every_pair<S: State>(c: &mut PgConnection, table: &str, filter: &str) -> usize {
    let mut allowed = 0;
    for &from in S::ALL {
        for &to in S::ALL {
            let r = tried(c, table, filter, from.as_str(), to.as_str()).await;
            let expected = S::allows(from, to);
            match (&r, expected) {
                (Ok(()), true) => allowed += 1,
                (Err(e), false) => assert!(
                    e.contains("not an allowed transition"),
                    "{table} {from:?} → {to:?}: refused for another reason: {e}"
                ),
                (Ok(()), false) => panic!("{table}: {from:?} → {to:?} was allowed by the database"),
                (Err(e), true) => panic!("{table}: {from:?} → {to:?} was refused: {e}"),
            }
        }
    }
    allowed
}

#[tokio::test]
async fn the_database_allows_exactly_the_table() {
    let stack = Stack::start().await.unwrap();
    let db = stack.db().await;
    let r = rows(&db).await;
    let mut c = db.acquire().await.unwrap();
    let task = format!("id = '{}'", r.task);
    let step = format!("id = '{}'", r.step_run);
    let attempt = format!("step_run_id = '{}' AND attempt = 1", r.step_run);
    let n = every_pair::<TaskState>(&mut c, "tasks", &task).await;
    assert_eq!(n, TaskState::transitions().len() + TaskState::ALL.len());
    let n = every_pair::<StepState>(&mut c, "step_runs", &step).await;
    assert_eq!(n, StepState::transitions().len() + StepState::ALL.len());
    let n = every_pair::<AttemptState>(&mut c, "attempts", &attempt).await;
    assert_eq!(
        n,
        AttemptState::transitions().len() + AttemptState::ALL.len()
    );
    let n = every_pair::<ArtifactState>(&mut c, "artifacts", &attempt).await;
    assert_eq!(
        n,
        ArtifactState::transitions().len() + ArtifactState::ALL.len()
    );
}

#[tokio::test]
async fn records_are_created_only_in_their_initial_states_and_unknown_states_never() {
    let stack = Stack::start().await.unwrap();
    let db = stack.db().await;
    let r = rows(&db).await;
    for &s in AttemptState::ALL {
        let res = sqlx::query(
            "INSERT INTO attempts (step_run_id, attempt, job_id, state) VALUES ($1, 2, $2, $3)",
        )
        .bind(r.step_run)
        .bind(Uuid::new_v4())
        .bind(s.as_str())
        .execute(&db)
        .await;
        assert_eq!(
            res.is_ok(),
            AttemptState::initial().contains(&s),
            "creating an attempt in {s:?}: {res:?}"
        );
        sqlx::query("DELETE FROM attempts WHERE step_run_id = $1 AND attempt = 2")
            .bind(r.step_run)
            .execute(&db)
            .await
            .unwrap();
    }
    for &s in TaskState::ALL {
        let res = sqlx::query(
            "INSERT INTO tasks (id, name, state, process, variables) VALUES ($1, 't', $2, '{}', '{}')",
        )
        .bind(Uuid::new_v4())
        .bind(s.as_str())
        .execute(&db)
        .await;
        assert_eq!(
            res.is_ok(),
            TaskState::initial().contains(&s),
            "task in {s:?}"
        );
    }
    // A state that does not exist is refused by the CHECK, triggers or not.
    let mut c = db.acquire().await.unwrap();
    c.execute("BEGIN").await.unwrap();
    c.execute("SET LOCAL session_replication_role = replica")
        .await
        .unwrap();
    for (table, filter) in [
        ("tasks", format!("id = '{}'", r.task)),
        ("step_runs", format!("id = '{}'", r.step_run)),
        ("attempts", format!("step_run_id = '{}'", r.step_run)),
    ] {
        c.execute("SAVEPOINT s").await.unwrap();
        let e = c
            .execute(format!("UPDATE {table} SET state = 'Bogus' WHERE {filter}").as_str())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("_state_known"), "{table}: {e}");
        c.execute("ROLLBACK TO SAVEPOINT s").await.unwrap();
    }
    // The node's built-in worker is registered at start.
    let e = c
        .execute("UPDATE workers SET health = 'Bogus'")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("workers_health_known"), "{e}");
    c.execute("ROLLBACK").await.unwrap();
}
