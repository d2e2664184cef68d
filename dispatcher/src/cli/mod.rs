//! # The `gantry` command-line client
//!
//! Talks to a dispatcher's REST API. The server and the key come from `--server` and
//! `--api-key`, or `GANTRY_SERVER` and `GANTRY_API_KEY`. Exit codes: 0 success; 1 the task
//! ended without `Success`; 2 a request failed (bad input, refused, unreachable); 3 a
//! downloaded artifact did not match its sha256 (nothing is written then).

mod client;
mod render;
mod transfer;
use transfer::{download, exit_for, follow_log, write_line};

use clap::{Parser, Subcommand};
use client::{CliError, Client};
use gantry_shared::api::{
    ARTIFACT_SHA256_HEADER, ApiKeyCreate, ApiKeyCreated, Artifact, LogEnd, LogEntry, Permission,
    Pool, PoolCreate, Task, TaskCreated, TaskSummary, Worker,
};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "gantry",
    version,
    about = "Gantry's client: deploy processes, follow their logs, inspect workers and pools"
)]
pub struct Cli {
    /// Dispatcher URL.
    #[arg(
        long,
        global = true,
        env = "GANTRY_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// API key (`X-Gantry-ApiKey`).
    #[arg(long, global = true, env = "GANTRY_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Configuration file, for `tls.ca_file` and `production` (default: ./gantry.toml if it
    /// exists; `GANTRY__TLS__CA_FILE` and `GANTRY__PRODUCTION` work too).
    #[arg(long, global = true, env = "GANTRY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit a process file (TOML) as a new task.
    Deploy {
        /// The process file, e.g. examples/hello.toml.
        file: PathBuf,
        /// Stream the log live and exit 0 only if the task succeeds.
        #[arg(long, short)]
        follow: bool,
        /// Set or override a variable: --var Environment=production (repeatable).
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
    },
    /// List recent tasks.
    Tasks {
        /// Only tasks in this state (Queued, Executing, Success, Failed, ...).
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show one task: its steps, attempts, workers, exit codes and durations.
    Task { id: String },
    /// Print a task's log; --follow streams it until the task ends.
    Log {
        id: String,
        #[arg(long, short)]
        follow: bool,
    },
    /// Cancel a task: steps not started never start, running scripts are stopped.
    Cancel {
        id: String,
        /// Wait until the task has ended, then print its final state.
        #[arg(long)]
        wait: bool,
    },
    /// Approve a manual step that waits for a decision; the task goes on.
    Approve {
        /// The task's id.
        id: String,
        /// The manual step's name.
        step: String,
        /// Why (recorded with who decided and when).
        #[arg(long)]
        note: Option<String>,
    },
    /// Reject a manual step that waits for a decision; the step fails.
    Reject {
        id: String,
        step: String,
        #[arg(long)]
        note: Option<String>,
    },
    /// List a task's artifacts (id, step, attempt, name, size, state, sha256).
    Artifacts { id: String },
    /// Download an artifact.
    Artifact {
        #[command(subcommand)]
        action: ArtifactAction,
    },
    /// List workers with their health and running steps.
    Workers,
    /// List worker pools, or create and delete them.
    Pools {
        #[command(subcommand)]
        action: Option<PoolAction>,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        action: KeyAction,
    },
}

#[derive(Subcommand)]
enum PoolAction {
    /// Create a pool.
    Create {
        name: String,
        #[arg(long)]
        description: Option<String>,
        /// Make it the default pool.
        #[arg(long)]
        default: bool,
    },
    /// Delete a pool (by id, name or slug).
    Delete { pool: String },
}

#[derive(Subcommand)]
enum ArtifactAction {
    /// Download an artifact by id into FILE, checking its sha256; FILE is written only if
    /// the bytes match (exit 3 otherwise).
    Get {
        id: String,
        #[arg(long, short, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeyAction {
    /// Create a key; it is printed once.
    Create {
        name: String,
        /// ConfigureServer, TaskCreate or TaskView (repeatable).
        #[arg(long = "permission", required = true)]
        permissions: Vec<String>,
    },
}

/// Run the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    gantry_shared::tls::install_provider();
    let settings = match gantry_shared::config::Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gantry: {e}");
            return ExitCode::from(gantry_shared::config::EXIT_CONFIG as u8);
        }
    };
    // With production = true the API key never crosses the network in plain text.
    if let Err(e) = settings.check_client_production("--server", &cli.server) {
        eprintln!("gantry: {e}");
        return ExitCode::from(gantry_shared::config::EXIT_CONFIG as u8);
    }
    let client = match Client::new(&cli.server, cli.api_key.clone(), settings.ca_pem()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gantry: {e}");
            return ExitCode::from(gantry_shared::config::EXIT_CONFIG as u8);
        }
    };
    match dispatch(&client, &cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gantry: {e}");
            ExitCode::from(2)
        }
    }
}

async fn dispatch(client: &Client, cli: &Cli) -> Result<ExitCode, CliError> {
    let json = cli.json;
    match &cli.command {
        Command::Deploy { file, follow, vars } => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| CliError::Local(format!("cannot read {}: {e}", file.display())))?;
            let mut body = process_json(&text)
                .map_err(|e| CliError::Local(format!("{}: {e}", file.display())))?;
            apply_vars(&mut body, vars)?;
            let created: TaskCreated = client.post("/api/tasks", &body).await?;
            if json && !follow {
                print_json(&created);
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!("task {} ({}) submitted", created.id, created.name);
            if !follow {
                println!("{}", created.id);
                return Ok(ExitCode::SUCCESS);
            }
            let end = follow_log(client, &created.id.to_string(), json).await?;
            Ok(exit_for(end.state))
        }
        Command::Tasks { state, limit } => {
            let mut path = format!("/api/tasks?limit={limit}");
            if let Some(s) = state {
                path.push_str(&format!("&state={}", urlencode(s)));
            }
            let tasks: Vec<TaskSummary> = client.get(&path).await?;
            if json {
                print_json(&tasks);
            } else {
                print!("{}", render::tasks(&tasks));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Task { id } => {
            let task: Task = client.get(&format!("/api/tasks/{}", urlencode(id))).await?;
            if json {
                print_json(&task);
            } else {
                print!("{}", render::task(&task));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Log { id, follow } => {
            if *follow {
                let end = follow_log(client, id, json).await?;
                return Ok(exit_for(end.state));
            }
            let mut after = String::new();
            let mut out = std::io::stdout().lock();
            loop {
                let page: gantry_shared::api::LogPage = client
                    .get(&format!(
                        "/api/tasks/{}/log?after={}",
                        urlencode(id),
                        urlencode(&after)
                    ))
                    .await?;
                for line in &page.lines {
                    write_line(&mut out, line, json);
                }
                if page.lines.is_empty() {
                    break;
                }
                after = page.next;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { id, wait } => {
            let r: TaskCreated = client
                .post(
                    &format!("/api/tasks/{}/cancel", urlencode(id)),
                    &serde_json::json!({}),
                )
                .await?;
            if json && !wait {
                print_json(&r);
                return Ok(ExitCode::SUCCESS);
            }
            println!("task {} ({}): {}", r.id, r.name, r.state);
            if *wait {
                loop {
                    let t: Task = client.get(&format!("/api/tasks/{}", r.id)).await?;
                    if t.summary.state.is_terminal() {
                        println!("task {}: {}", r.id, t.summary.state);
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Approve { id, step, note } | Command::Reject { id, step, note } => {
            let verb = if matches!(&cli.command, Command::Approve { .. }) {
                "approve"
            } else {
                "reject"
            };
            let r: gantry_shared::api::Approval = client
                .post(
                    &format!(
                        "/api/tasks/{}/steps/{}/{verb}",
                        urlencode(id),
                        urlencode(step)
                    ),
                    &serde_json::json!({ "note": note }),
                )
                .await?;
            if json {
                print_json(&r);
            } else {
                println!(
                    "step {step} of task {id}: {} by {}{}",
                    r.decision.as_deref().unwrap_or("?").to_lowercase(),
                    r.decided_by.as_deref().unwrap_or("?"),
                    r.note.map(|n| format!(" ({n})")).unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Artifacts { id } => {
            let list: Vec<Artifact> = client
                .get(&format!("/api/tasks/{}/artifacts", urlencode(id)))
                .await?;
            if json {
                print_json(&list);
            } else {
                print!("{}", render::artifacts(&list));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Artifact {
            action: ArtifactAction::Get { id, out },
        } => download(client, id, out, json).await,
        Command::Workers => {
            let workers: Vec<Worker> = client.get("/api/workers").await?;
            if json {
                print_json(&workers);
            } else {
                print!("{}", render::workers(&workers));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pools { action } => match action {
            None => {
                let pools: Vec<Pool> = client.get("/api/pools").await?;
                if json {
                    print_json(&pools);
                } else {
                    print!("{}", render::pools(&pools));
                }
                Ok(ExitCode::SUCCESS)
            }
            Some(PoolAction::Create {
                name,
                description,
                default,
            }) => {
                let pool: Pool = client
                    .post(
                        "/api/pools",
                        &PoolCreate {
                            name: name.clone(),
                            description: description.clone(),
                            is_default: *default,
                        },
                    )
                    .await?;
                if json {
                    print_json(&pool);
                } else {
                    println!(
                        "created pool {} (slug {}, id {})",
                        pool.name, pool.slug, pool.id
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            Some(PoolAction::Delete { pool }) => {
                let pools: Vec<Pool> = client.get("/api/pools").await?;
                let found = pools
                    .iter()
                    .find(|p| p.id.to_string() == *pool || p.name == *pool || p.slug == *pool)
                    .ok_or_else(|| CliError::Local(format!("no pool {pool:?}")))?;
                client.delete(&format!("/api/pools/{}", found.id)).await?;
                println!("deleted pool {}", found.name);
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::Keys {
            action: KeyAction::Create { name, permissions },
        } => {
            let perms = permissions
                .iter()
                .map(|p| {
                    Permission::parse(p).ok_or_else(|| {
                        CliError::Local(format!(
                            "unknown permission {p:?}: ConfigureServer, TaskCreate or TaskView"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let key: ApiKeyCreated = client
                .post(
                    "/api/keys",
                    &ApiKeyCreate {
                        name: name.clone(),
                        permissions: perms,
                    },
                )
                .await?;
            if json {
                print_json(&key);
            } else {
                println!("{}", key.key);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("API types serialize")
    );
}

/// A TOML process file as the JSON the API takes.
pub fn process_json(text: &str) -> Result<serde_json::Value, String> {
    let value: toml::Value = toml::from_str(text).map_err(|e| e.to_string())?;
    serde_json::to_value(value).map_err(|e| e.to_string())
}

fn apply_vars(body: &mut serde_json::Value, vars: &[String]) -> Result<(), CliError> {
    if vars.is_empty() {
        return Ok(());
    }
    let obj = body
        .as_object_mut()
        .ok_or_else(|| CliError::Local("the process file is not a table".into()))?;
    let table = obj
        .entry("variables")
        .or_insert_with(|| serde_json::json!({}));
    let table = table
        .as_object_mut()
        .ok_or_else(|| CliError::Local("`variables` is not a table".into()))?;
    for v in vars {
        let (name, value) = v
            .split_once('=')
            .ok_or_else(|| CliError::Local(format!("--var {v:?}: expected NAME=VALUE")))?;
        let sensitive = table
            .get(name)
            .and_then(|old| old.get("sensitive"))
            .and_then(|s| s.as_bool())
            .unwrap_or(false);
        let new = if sensitive {
            serde_json::json!({ "value": value, "sensitive": true })
        } else {
            serde_json::Value::String(value.to_owned())
        };
        table.insert(name.to_owned(), new);
    }
    Ok(())
}

pub fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_process_becomes_json_and_vars_override() {
        let mut v = process_json(
            "name = \"x\"\n[variables]\nA = \"1\"\nS = { value = \"abcd\", sensitive = true }\n[[steps]]\nname = \"a\"\nscript = \"true\"\n",
        )
        .unwrap();
        apply_vars(&mut v, &["A=2".into(), "S=efgh".into(), "B=3".into()]).unwrap();
        assert_eq!(v["variables"]["A"], "2");
        assert_eq!(v["variables"]["S"]["value"], "efgh");
        assert_eq!(v["variables"]["S"]["sensitive"], true);
        assert_eq!(v["variables"]["B"], "3");
        assert!(apply_vars(&mut v, &["nope".into()]).is_err());
    }
}
