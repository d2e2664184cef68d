//! `gantry-agent register | deregister | run`.

use clap::{Parser, Subcommand};
use gantry_agent::api::Api;
use gantry_agent::identity::{self, Identity};
use gantry_shared::api::WorkerRegister;
use gantry_shared::config::{EXIT_CONFIG, Settings};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "gantry-agent",
    version,
    about = "Gantry's worker agent: runs deployment steps for a dispatcher"
)]
struct Cli {
    /// Configuration file (default: ./gantry.toml if it exists).
    #[arg(long, global = true, env = "GANTRY_CONFIG")]
    config: Option<PathBuf>,
    /// Where the agent keeps its identity and working directories (config `agent.home`).
    #[arg(long, global = true)]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register this agent as a worker with a dispatcher (needs a ConfigureServer API key).
    Register {
        /// The dispatcher's URL; several nodes of one installation separated by commas
        /// (`http://a:8080,http://b:8080`): the agent fails over between them.
        #[arg(long, env = "GANTRY_SERVER")]
        server: String,
        #[arg(long, env = "GANTRY_API_KEY", hide_env_values = true)]
        api_key: String,
        /// The worker's name, unique per dispatcher.
        #[arg(long)]
        name: String,
        /// A pool to serve (repeatable); none means the default pool.
        #[arg(long = "pool")]
        pools: Vec<String>,
        /// Steps run at once (default 4).
        #[arg(long)]
        max_concurrent_steps: Option<u32>,
        /// Replace a worker registered under the same name.
        #[arg(long)]
        force: bool,
    },
    /// Remove this agent's worker from the dispatcher and forget its identity.
    Deregister {
        /// Default: the server this agent registered with.
        #[arg(long, env = "GANTRY_SERVER")]
        server: Option<String>,
        #[arg(long, env = "GANTRY_API_KEY", hide_env_values = true)]
        api_key: String,
    },
    /// Run: take steps from the worker's pools until SIGTERM (graceful) or a second signal.
    Run,
    /// Internal: `guard -- --supervise` is the agent's supervisor, where the small
    /// `gantry-guard` binary is not installed beside this one (see `guard.rs`).
    #[command(hide = true)]
    Guard {
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Guard { command } = cli.command {
        // No configuration, no logging: the supervisor prints nothing.
        return gantry_agent::guard::run(command, None);
    }
    // No core dumps; its memory and environment are not for its steps to read.
    gantry_agent::hardening::harden_agent("gantry-agent");
    gantry_shared::tls::install_provider();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gantry-agent: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    // With production = true no credential goes to another machine in plain text: not the
    // API key (register, deregister), not the worker's credential, not its broker password.
    let server_flag = match &cli.command {
        Command::Register { server, .. } => Some(server.clone()),
        Command::Deregister { server, .. } => server.clone(),
        _ => None,
    };
    if let Some(server) = server_flag
        && let Err(e) = settings.check_client_production("--server", &server)
    {
        eprintln!("gantry-agent: {e}");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    let ca = settings.ca_pem();
    gantry_shared::telemetry::init(&settings.log.format, &settings.log.level);
    let home = cli.home.clone().unwrap_or_else(|| settings.agent_home());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async move {
        match cli.command {
            Command::Register {
                server,
                api_key,
                name,
                pools,
                max_concurrent_steps,
                force,
            } => {
                let api = Api::new(&server, None, ca.as_deref())?;
                let reg = api
                    .register(
                        &api_key,
                        &WorkerRegister {
                            name,
                            pools,
                            max_concurrent_steps,
                            force,
                        },
                    )
                    .await?;
                identity::save(
                    &home,
                    &Identity {
                        server: gantry_agent::api::server_urls(&server).join(","),
                        worker_id: reg.worker.id,
                        name: reg.worker.name.clone(),
                        token: reg.token,
                        namespace: reg.namespace,
                        broker: reg.broker.clone(),
                    },
                )?;
                println!(
                    "registered worker {} ({}) in pool(s) {}; identity saved in {}",
                    reg.worker.name,
                    reg.worker.id,
                    reg.worker
                        .pools
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    identity::path(&home).display()
                );
                Ok(())
            }
            Command::Deregister { server, api_key } => {
                let id = identity::load(&home)?;
                let server = server.unwrap_or_else(|| id.server.clone());
                Api::new(&server, None, ca.as_deref())?
                    .deregister(&api_key, id.worker_id)
                    .await?;
                identity::remove(&home)?;
                println!("deregistered worker {} ({})", id.name, id.worker_id);
                Ok(())
            }
            Command::Run => match gantry_agent::agent::run(settings, &home).await {
                Err(e)
                    if e.to_string().contains("production = true")
                        || e.downcast_ref::<gantry_shared::config::ConfigError>()
                            .is_some() =>
                {
                    eprintln!("gantry-agent: {e}");
                    std::process::exit(EXIT_CONFIG);
                }
                r => r,
            },
            Command::Guard { .. } => unreachable!("handled before the runtime starts"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gantry-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
