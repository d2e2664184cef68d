//! # Route: where a job goes
//!
//! A pure function of what the database says about the step's pool (see ARCHITECTURE.md,
//! "Choosing a worker"), which [`super::facts::load`] reads with the rest of what a starting
//! step needs:
//!
//! 1. `location = "server"`: the built-in workers' queue, unless they are disabled (or may
//!    not run user code, with `production = true` and no unprivileged user);
//! 2. the default pool with no registered worker at all: the built-in workers' queue;
//! 3. the task's worker for the pool (chosen by its first claim there) while it is enabled
//!    and healthy: that worker's own queue; otherwise that choice is forgotten, and
//! 4. the pool's queue, if any of its workers is enabled and `Healthy` or `HasWarnings`;
//! 5. none: the step waits, saying why (how many workers are in which state).

use gantry_shared::ids::TaskId;
use gantry_shared::states::WorkerHealth;
use gantry_shared::topology::Topology;
use sqlx::PgConnection;
use std::collections::BTreeMap;
use uuid::Uuid;

/// What routing needs to know about a step's pool.
#[derive(Clone, Debug)]
pub struct Facts {
    /// `None`: the step runs on the server (`location = "server"`).
    pub pool: Option<PoolFacts>,
    /// Whether the built-in worker may run user code at all (`production = true` needs an
    /// unprivileged `builtin_worker.user`).
    pub builtin_runs_code: bool,
    /// `settings.builtin_worker_enabled`, read only where the built-in worker could take the
    /// step.
    pub builtin_enabled: Option<bool>,
}

#[derive(Clone, Debug)]
pub struct PoolFacts {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    pub is_default: bool,
    /// The pool's registered (not built-in) workers.
    pub workers: Vec<WorkerFacts>,
    /// The task's worker in this pool, if its first claim there chose one.
    pub sticky: Option<Uuid>,
}

#[derive(Clone, Copy, Debug)]
pub struct WorkerFacts {
    pub id: Uuid,
    pub enabled: bool,
    pub health: WorkerHealth,
}

impl WorkerFacts {
    fn usable(&self) -> bool {
        self.enabled && self.health.is_usable()
    }
}

/// Where an attempt's job goes, or why it cannot go yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Publish with this routing key; `worker` when it goes to one worker's own queue,
    /// `pool_slug` when to a pool's (declared again if it went missing).
    Go {
        routing_key: String,
        pool_slug: Option<String>,
        worker: Option<Uuid>,
    },
    /// No worker may take it now: the step waits, saying why.
    Wait(String),
    /// It can never run as things are configured.
    Fail(String),
}

/// The decision, and whether the task's worker for the pool must be forgotten.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routed {
    pub route: Route,
    pub forget_sticky: bool,
}

fn server() -> Route {
    Route::Go {
        routing_key: Topology::SERVER_ROUTING_KEY.to_owned(),
        pool_slug: None,
        worker: None,
    }
}

/// Whether [`route`] needs `builtin_enabled` for these facts.
pub fn needs_builtin_setting(pool: Option<&PoolFacts>, builtin_runs_code: bool) -> bool {
    builtin_runs_code && pool.is_none_or(|p| p.is_default && p.workers.is_empty())
}

/// Choose where the job goes.
pub fn route(f: &Facts) -> Routed {
    let go = |route| Routed {
        route,
        forget_sticky: false,
    };
    let Some(pool) = &f.pool else {
        return go(if !f.builtin_runs_code {
            Route::Fail(
                "it runs on the server (location = \"server\"), and with production = true the built-in worker runs user code only as an unprivileged builtin_worker.user, which is not set"
                    .into(),
            )
        } else if f.builtin_enabled == Some(true) {
            server()
        } else {
            Route::Fail(
                "it runs on the server (location = \"server\") and the built-in worker is disabled (builtin_worker_enabled = false)"
                    .into(),
            )
        });
    };
    if pool.workers.is_empty() && pool.is_default && f.builtin_runs_code {
        return go(if f.builtin_enabled == Some(true) {
            server()
        } else {
            Route::Fail(format!(
                "the default pool {} has no registered worker and the built-in worker is disabled (builtin_worker_enabled = false)",
                pool.name
            ))
        });
    }
    let mut forget_sticky = false;
    if let Some(w) = pool.sticky {
        if pool.workers.iter().any(|x| x.id == w && x.usable()) {
            return go(Route::Go {
                routing_key: Topology::worker_routing_key(w),
                pool_slug: None,
                worker: Some(w),
            });
        }
        // It left the pool, was disabled or is not healthy: choose again.
        forget_sticky = true;
    }
    let route = if pool.workers.iter().any(WorkerFacts::usable) {
        Route::Go {
            routing_key: Topology::pool_routing_key(&pool.slug),
            pool_slug: Some(pool.slug.clone()),
            worker: None,
        }
    } else if pool.workers.is_empty() {
        Route::Wait(format!("pool {} has no worker", pool.name))
    } else {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for w in &pool.workers {
            let key = if w.enabled {
                w.health.as_str()
            } else {
                "disabled"
            };
            *counts.entry(key).or_default() += 1;
        }
        let summary: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
        Route::Wait(format!(
            "pool {} has no healthy worker: {}",
            pool.name,
            summary.join(", ")
        ))
    };
    Routed {
        route,
        forget_sticky,
    }
}

/// Forget the task's worker for a pool (it left the pool, was disabled or is unhealthy).
pub async fn forget_sticky(conn: &mut PgConnection, task: TaskId, pool: Uuid) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM task_pool_workers WHERE task_id = $1 AND pool_id = $2")
        .bind(task.0)
        .bind(pool)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(enabled: bool, health: WorkerHealth) -> WorkerFacts {
        WorkerFacts {
            id: Uuid::new_v4(),
            enabled,
            health,
        }
    }

    fn pool(workers: Vec<WorkerFacts>) -> PoolFacts {
        PoolFacts {
            id: Uuid::new_v4(),
            slug: "linux".into(),
            name: "Linux".into(),
            is_default: false,
            workers,
            sticky: None,
        }
    }

    fn facts(pool: Option<PoolFacts>) -> Facts {
        Facts {
            builtin_enabled: needs_builtin_setting(pool.as_ref(), true).then_some(true),
            pool,
            builtin_runs_code: true,
        }
    }

    fn to_pool() -> Route {
        Route::Go {
            routing_key: Topology::pool_routing_key("linux"),
            pool_slug: Some("linux".into()),
            worker: None,
        }
    }

    #[test]
    fn a_server_step_goes_to_the_builtin_workers_unless_they_may_not_take_it() {
        assert_eq!(route(&facts(None)).route, server());
        let mut f = facts(None);
        f.builtin_enabled = Some(false);
        assert!(matches!(route(&f).route, Route::Fail(m) if m.contains("is disabled")));
        let f = Facts {
            pool: None,
            builtin_runs_code: false,
            builtin_enabled: None,
        };
        assert!(matches!(route(&f).route, Route::Fail(m) if m.contains("production = true")));
    }

    #[test]
    fn the_default_pool_without_workers_goes_to_the_server() {
        let mut p = pool(vec![]);
        p.is_default = true;
        assert_eq!(route(&facts(Some(p.clone()))).route, server());
        let f = Facts {
            pool: Some(p.clone()),
            builtin_runs_code: true,
            builtin_enabled: Some(false),
        };
        assert!(matches!(route(&f).route, Route::Fail(m) if m.contains("default pool Linux")));
        // Without the built-in worker for user code, it waits for a worker like any pool.
        let f = Facts {
            pool: Some(p),
            builtin_runs_code: false,
            builtin_enabled: None,
        };
        assert_eq!(
            route(&f).route,
            Route::Wait("pool Linux has no worker".into())
        );
    }

    #[test]
    fn a_pool_with_a_usable_worker_gets_it_on_the_pools_queue() {
        for h in [WorkerHealth::Healthy, WorkerHealth::HasWarnings] {
            let p = pool(vec![worker(true, h), worker(false, WorkerHealth::Healthy)]);
            assert_eq!(route(&facts(Some(p))).route, to_pool());
        }
        // A default pool with workers never goes to the server.
        let mut p = pool(vec![worker(true, WorkerHealth::Healthy)]);
        p.is_default = true;
        assert_eq!(route(&facts(Some(p))).route, to_pool());
    }

    #[test]
    fn the_tasks_worker_keeps_its_steps_while_usable() {
        let w = worker(true, WorkerHealth::Healthy);
        let mut p = pool(vec![w, worker(true, WorkerHealth::Healthy)]);
        p.sticky = Some(w.id);
        let r = route(&facts(Some(p)));
        assert_eq!(
            r,
            Routed {
                route: Route::Go {
                    routing_key: Topology::worker_routing_key(w.id),
                    pool_slug: None,
                    worker: Some(w.id),
                },
                forget_sticky: false
            }
        );
    }

    #[test]
    fn an_unusable_tasks_worker_is_forgotten() {
        for w in [
            worker(false, WorkerHealth::Healthy),
            worker(true, WorkerHealth::Unhealthy),
            worker(true, WorkerHealth::Unavailable),
        ] {
            let mut p = pool(vec![w, worker(true, WorkerHealth::Healthy)]);
            p.sticky = Some(w.id);
            let r = route(&facts(Some(p)));
            assert_eq!(r.route, to_pool());
            assert!(r.forget_sticky);
        }
        // One that left the pool too.
        let mut p = pool(vec![worker(true, WorkerHealth::Healthy)]);
        p.sticky = Some(Uuid::new_v4());
        assert!(route(&facts(Some(p))).forget_sticky);
    }

    #[test]
    fn no_usable_worker_waits_saying_who_is_there() {
        let p = pool(vec![]);
        assert_eq!(
            route(&facts(Some(p))).route,
            Route::Wait("pool Linux has no worker".into())
        );
        let p = pool(vec![
            worker(true, WorkerHealth::Unavailable),
            worker(true, WorkerHealth::Unavailable),
            worker(false, WorkerHealth::Healthy),
            worker(true, WorkerHealth::Unhealthy),
        ]);
        assert_eq!(
            route(&facts(Some(p))).route,
            Route::Wait(
                "pool Linux has no healthy worker: 2 Unavailable, 1 Unhealthy, 1 disabled".into()
            )
        );
    }

    #[test]
    fn the_builtin_setting_is_read_only_where_it_matters() {
        assert!(needs_builtin_setting(None, true));
        assert!(!needs_builtin_setting(None, false));
        let mut p = pool(vec![]);
        assert!(!needs_builtin_setting(Some(&p), true));
        p.is_default = true;
        assert!(needs_builtin_setting(Some(&p), true));
        p.workers.push(worker(true, WorkerHealth::Healthy));
        assert!(!needs_builtin_setting(Some(&p), true));
    }
}
