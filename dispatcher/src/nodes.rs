//! # Dispatcher nodes: who orchestrates which task
//!
//! Several `gantry-dispatcher serve` nodes may share one database, broker and Redis. Each task
//! is orchestrated by exactly one of them, its **owner**: `tasks.owner_node` is the node's id
//! and that node's lease is live. A node gets a fresh id at every start and registers in
//! `dispatcher_nodes`; its one lease covers all its tasks: it is live while the node's
//! `heartbeat_at` is less than [`LEASE`] old.
//!
//! - On every sweep a node renews its lease (one row, however many tasks it owns), then takes
//!   unowned tasks and tasks whose owner's lease expired, oldest first (`FOR UPDATE SKIP
//!   LOCKED`), while it owns fewer than `dispatcher.task_cap`.
//! - `advance` (the orchestrator's one decision step) runs only on the owner. Under the task's
//!   row lock it checks the owner, and takes a free task (or one whose owner's lease expired)
//!   if the node is under its cap, in the same transaction ([`decide_or_take`]): a task
//!   submitted past the cap costs no commit of its own to be taken. A task owned by another
//!   node is left alone, and so is its wake-up row (an advance may wait for the row lock of
//!   another node's task: the transactions that hold one are short).
//! - Room for a take or a creation is reserved under an in-process lock, with the node's
//!   count of owned tasks kept beside it: recounted on every sweep, and at the cap at most
//!   every [`RECOUNT_AT_CAP`] (so a node at its cap under a flood of submissions does not
//!   count its tasks once per submission); a take or creation whose transaction is still
//!   open counts as in flight until it ends, since no count can see it. The cap is exact
//!   without a lock in PostgreSQL that every new task would queue on.
//! - A task that ends has no owner any more (a trigger clears it), so it stops counting
//!   against the cap.
//! - A node that stops gracefully gives its leases up at once; one that dies loses them when
//!   they expire ([`LEASE`]); a new process bound to the same address as a dead one (a
//!   restart) expires the dead one's leases at start, since it holds that address now.
//! - Another node's wake-ups reach the owner through `NOTIFY gantry_wake` (latency only; the
//!   durable `task_wakeups` row and the owner's sweep are what guarantee progress).
//!
//! Ownership decides who makes progress, never correctness: every decision is taken under the
//! task's row lock after checking the owner, and a taker skips locked rows, so two nodes never
//! decide for one task at once, even if a lease expires while its owner is merely slow.

use crate::logs;
use gantry_shared::ids::TaskId;
use sqlx::{PgConnection, PgPool};
use std::time::Duration;
use uuid::Uuid;

/// How long a node's lease (its ownership of all its tasks) lasts without renewal. Renewed
/// every sweep (default 2 s), so another node takes a dead node's tasks within this plus one
/// sweep.
pub const LEASE: Duration = Duration::from_secs(10);

/// The PostgreSQL channel on which wake-ups are announced (payload: the task id).
pub const WAKE_CHANNEL: &str = "gantry_wake";

/// Task states in which a task has (or awaits) an owner.
const ACTIVE: &str = "('Queued', 'Executing', 'Waiting', 'Cancelling')";

/// This node: its id for this process's lifetime and its task cap.
#[derive(Clone, Debug)]
pub struct Node {
    pub id: Uuid,
    pub task_cap: u32,
    /// Held while taking tasks, with how many this node owned at the last count plus what it
    /// took since (tasks that ended since are only noticed at the next count).
    owned: std::sync::Arc<tokio::sync::Mutex<Owned>>,
}

impl Node {
    pub fn new(task_cap: u32) -> Self {
        Self {
            id: Uuid::new_v4(),
            task_cap,
            owned: Default::default(),
        }
    }
}

/// How often a node at its cap counts its tasks again at most (outside the sweep): tasks that
/// ended meanwhile make room only then.
pub const RECOUNT_AT_CAP: Duration = Duration::from_millis(100);

/// A node's count of its tasks.
#[derive(Debug, Default)]
struct Owned {
    count: i64,
    /// When it was last counted in PostgreSQL.
    counted_at: Option<tokio::time::Instant>,
    /// Places [`reserve`]d for tasks whose creating transaction has not ended yet: a count
    /// cannot see them, so they are kept apart and added to it.
    in_flight: i64,
}

impl Owned {
    /// Reserve a place if the count in hand can answer: `Some(true)` reserved, `Some(false)`
    /// at the cap with a count less than [`RECOUNT_AT_CAP`] old; `None` at the cap when a
    /// count is due.
    fn reserve_known(&mut self, node: &Node) -> Option<bool> {
        if self.count + self.in_flight < i64::from(node.task_cap) {
            self.in_flight += 1;
            return Some(true);
        }
        if self
            .counted_at
            .is_some_and(|at| at.elapsed() < RECOUNT_AT_CAP)
        {
            return Some(false);
        }
        None
    }

    /// [`Owned::reserve_known`], counting first when a count is due (on `conn`, which the
    /// caller holds before taking the lock, so no holder of the lock waits for the pool).
    async fn reserve_counting(
        &mut self,
        conn: &mut PgConnection,
        node: &Node,
    ) -> sqlx::Result<bool> {
        if let Some(reserved) = self.reserve_known(node) {
            return Ok(reserved);
        }
        self.recount(conn, node).await?;
        Ok(self.reserve_known(node) == Some(true))
    }

    async fn recount(&mut self, conn: &mut PgConnection, node: &Node) -> sqlx::Result<()> {
        self.count = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE owner_node = $1")
            .bind(node.id)
            .fetch_one(conn)
            .await?;
        self.counted_at = Some(tokio::time::Instant::now());
        Ok(())
    }
}

/// SQL: true when the lease of node `n` (joined on the task's owner) is not live.
fn lease_expired(n: &str) -> String {
    format!(
        "({n}.id IS NULL OR {n}.heartbeat_at < now() - make_interval(secs => {}))",
        LEASE.as_secs()
    )
}

/// Register this node under `name` (`host@address`). A previous process registered under the
/// same name is dead, since this one holds its address now: its leases expire at once, so
/// its tasks are taken over on the next sweep rather than after [`LEASE`].
pub async fn register(db: &PgPool, node: &Node, name: &str) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "INSERT INTO dispatcher_nodes (id, name) VALUES ($1, $2)
         ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, heartbeat_at = now()",
    )
    .bind(node.id)
    .bind(name)
    .execute(&mut *tx)
    .await?;
    let expired = sqlx::query(
        "UPDATE dispatcher_nodes SET heartbeat_at = '-infinity'
         WHERE name = $1 AND id <> $2 AND heartbeat_at > '-infinity'
           AND EXISTS (SELECT 1 FROM tasks WHERE owner_node = dispatcher_nodes.id)",
    )
    .bind(name)
    .bind(node.id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(node = %node.id, name, task_cap = node.task_cap, "dispatcher node registered");
    if expired.rows_affected() > 0 {
        tracing::info!(
            nodes = expired.rows_affected(),
            "a previous process at this address owned tasks; taking them over"
        );
    }
    Ok(())
}

/// The sweep's part: renew this node's lease, then take free tasks while under the cap.
/// Returns the tasks taken.
pub async fn renew_and_take(db: &PgPool, node: &Node) -> sqlx::Result<Vec<TaskId>> {
    let registered = sqlx::query("UPDATE dispatcher_nodes SET heartbeat_at = now() WHERE id = $1")
        .bind(node.id)
        .execute(db)
        .await?;
    if registered.rows_affected() == 0 {
        // Not registered yet (still starting): take nothing.
        return Ok(Vec::new());
    }
    // The connection first: no holder of `node.owned` waits for the pool.
    let mut conn = db.acquire().await?;
    let mut owned = node.owned.lock().await;
    owned.recount(&mut conn, node).await?;
    let room = (i64::from(node.task_cap) - owned.count - owned.in_flight).max(0);
    if room == 0 {
        return Ok(Vec::new());
    }
    let taken = take(&mut conn, node, room).await?;
    owned.count += taken.len() as i64;
    Ok(taken)
}

/// Take free tasks (no owner, or an owner whose lease expired) for this node and commit: up
/// to `limit`, oldest first, skipping rows another transaction holds. A takeover gets a line
/// in the task's log. The caller holds `node.owned` and adds what was taken.
async fn take(conn: &mut PgConnection, node: &Node, limit: i64) -> sqlx::Result<Vec<TaskId>> {
    let sql = format!(
        "UPDATE tasks t SET owner_node = $1
         FROM (SELECT t2.id, t2.owner_node AS previous FROM tasks t2
               LEFT JOIN dispatcher_nodes n ON n.id = t2.owner_node
               WHERE t2.state IN {ACTIVE}
                 AND (t2.owner_node IS NULL OR {})
               ORDER BY t2.created_at LIMIT $2
               FOR UPDATE OF t2 SKIP LOCKED) free
         WHERE t.id = free.id
         RETURNING t.id, free.previous",
        lease_expired("n")
    );
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let taken: Vec<(Uuid, Option<Uuid>)> = sqlx::query_as(&sql)
        .bind(node.id)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
    for (task, previous) in &taken {
        if let Some(previous) = previous
            && *previous != node.id
        {
            log_takeover(&mut tx, node, TaskId(*task), *previous).await?;
        }
    }
    tx.commit().await?;
    Ok(taken.into_iter().map(|(t, _)| TaskId(t)).collect())
}

/// Room for one more task on this node, reserved for a task being created here (which then
/// starts owned by this node, so its first advance can run in its creating transaction).
/// False at the cap. Pass the outcome to [`reserved`] once the creating transaction ended.
pub async fn reserve(db: &PgPool, node: &Node) -> bool {
    if let Some(reserved) = node.owned.lock().await.reserve_known(node) {
        return reserved;
    }
    // At the cap, and a count is due (tasks that ended since the last one no longer count):
    // the connection first, then the count under the lock.
    let Ok(mut conn) = db.acquire().await else {
        return false;
    };
    let mut owned = node.owned.lock().await;
    owned
        .reserve_counting(&mut conn, node)
        .await
        .unwrap_or(false)
}

/// A [`reserve`]d place's task was created (it counts now: a count made since its commit may
/// hold it twice until the next count, never too few) or not (the place is free again).
pub async fn reserved(node: &Node, created: bool) {
    let mut owned = node.owned.lock().await;
    owned.in_flight = (owned.in_flight - 1).max(0);
    if created {
        owned.count += 1;
    }
}

/// The task's owner and lease as `advance` reads them under the task's row lock.
pub struct Ownership {
    pub owner: Option<Uuid>,
    /// The owner's lease is not live (or it has none).
    pub expired: bool,
}

/// SQL columns of [`Ownership`], for `FROM tasks t LEFT JOIN dispatcher_nodes n ON n.id =
/// t.owner_node`.
pub fn ownership_columns() -> String {
    format!("t.owner_node, {} AS lease_expired", lease_expired("n"))
}

/// What `advance` may do with a task whose row it holds locked.
#[derive(Debug, PartialEq, Eq)]
pub enum Decide {
    /// This node owns it (or it has ended and needs no owner).
    Owned,
    /// Free (or its owner's lease expired) and this node had room: taken in the caller's
    /// transaction, its place reserved. Pass the commit's outcome to [`reserved`].
    Taken,
    /// Another node's task, or a free one this node has no room for: its wake-up stays.
    NotOurs,
}

/// May this node decide for the task, read under its row lock in the caller's transaction
/// (`conn`)? A free task, or one whose owner's lease expired, is taken there if the node has
/// room: the take commits with the advance, one commit rather than a check and a take of
/// their own. A takeover gets a line in the task's log.
pub async fn decide_or_take(
    conn: &mut PgConnection,
    node: &Node,
    task: TaskId,
    state: gantry_shared::states::TaskState,
    o: Ownership,
) -> sqlx::Result<Decide> {
    if state.is_terminal() || o.owner == Some(node.id) {
        return Ok(Decide::Owned);
    }
    if o.owner.is_some() && !o.expired {
        return Ok(Decide::NotOurs);
    }
    if !node
        .owned
        .lock()
        .await
        .reserve_counting(&mut *conn, node)
        .await?
    {
        return Ok(Decide::NotOurs);
    }
    let taken = async {
        sqlx::query("UPDATE tasks SET owner_node = $1 WHERE id = $2")
            .bind(node.id)
            .bind(task.0)
            .execute(&mut *conn)
            .await?;
        if let Some(previous) = o.owner {
            log_takeover(&mut *conn, node, task, previous).await?;
        }
        Ok::<_, sqlx::Error>(())
    }
    .await;
    if let Err(e) = taken {
        reserved(node, false).await;
        return Err(e);
    }
    Ok(Decide::Taken)
}

async fn log_takeover(
    conn: &mut PgConnection,
    node: &Node,
    task: TaskId,
    previous: Uuid,
) -> sqlx::Result<()> {
    let names: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, name FROM dispatcher_nodes WHERE id = ANY($1)")
            .bind(vec![node.id, previous])
            .fetch_all(&mut *conn)
            .await?;
    let name = |id: Uuid| {
        names
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, n)| format!("{n} ({id})"))
            .unwrap_or_else(|| id.to_string())
    };
    let line = format!(
        "Dispatcher node {} took over this task: the lease of node {} expired (it stopped or cannot reach PostgreSQL)",
        name(node.id),
        name(previous)
    );
    tracing::warn!(%task, node = %node.id, previous = %previous, "took over a task whose owner's lease expired");
    logs::append_system(conn, task, None, &line).await
}

/// At a graceful stop: give up the lease at once, so other nodes take the tasks on their
/// next sweep.
pub async fn release_all(db: &PgPool, node: &Node) {
    let r: sqlx::Result<i64> = sqlx::query_scalar(
        "WITH expired AS (UPDATE dispatcher_nodes SET heartbeat_at = '-infinity' WHERE id = $1)
         SELECT count(*) FROM tasks WHERE owner_node = $1",
    )
    .bind(node.id)
    .fetch_one(db)
    .await;
    match r {
        Ok(n) if n > 0 => {
            tracing::info!(
                tasks = n,
                "stopping: released this node's tasks to the other nodes"
            )
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "stopping: could not release this node's tasks; they are taken over when their leases expire")
        }
    }
}
