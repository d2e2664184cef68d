//! `gantry-dispatcher serve | migrate`.

use clap::{Parser, Subcommand};
use gantry_shared::config::{EXIT_CONFIG, Settings};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "gantry-dispatcher",
    version,
    about = "Gantry's dispatcher: REST API, orchestrator and result consumer"
)]
struct Cli {
    /// Configuration file (default: ./gantry.toml if it exists).
    #[arg(long, global = true, env = "GANTRY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply migrations, then serve the API and orchestrate tasks until SIGTERM or Ctrl-C.
    Serve,
    /// Create the database if needed and apply migrations, then exit.
    Migrate,
    /// Internal: run one built-in worker step's script so that it dies with this node.
    #[command(hide = true)]
    Guard {
        /// Run the script as this user id (the guard itself keeps its own, so that it can
        /// always be started and always kill the step).
        #[arg(long)]
        uid: Option<u32>,
        #[arg(long)]
        gid: Option<u32>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Guard { uid, gid, command } = cli.command {
        return gantry_agent::guard::run(command, uid.zip(gid));
    }
    // No core dumps, and no reading of this process's memory by the built-in worker's steps.
    gantry_agent::hardening::harden_agent("gantry-dispatcher");
    gantry_shared::tls::install_provider();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gantry-dispatcher: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    if settings.production
        && settings.secrets.key.is_none()
        && !settings.secrets.key_file_path().exists()
    {
        eprintln!(
            "gantry-dispatcher: secrets.key: must be set when production = true (base64 of 32 random bytes: openssl rand -base64 32), or secrets.key_file must name an existing key file ({} does not exist); a production dispatcher never generates its key",
            settings.secrets.key_file_path().display()
        );
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    if let Err(e) = settings
        .check_dispatcher_production()
        .and_then(|()| gantry_dispatcher::builtin::check_production(&settings))
    {
        eprintln!("gantry-dispatcher: {e}");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    gantry_shared::telemetry::init(&settings.log.format, &settings.log.level);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async move {
        match cli.command {
            Command::Migrate => {
                gantry_dispatcher::db::prepare(&settings).await?;
                println!("migrations applied");
                Ok(())
            }
            Command::Serve => serve(settings).await,
            Command::Guard { .. } => unreachable!("handled before loading settings"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gantry-dispatcher: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let run_as = match gantry_dispatcher::builtin::run_as(&settings) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gantry-dispatcher: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    let cancel = CancellationToken::new();
    let dispatcher = gantry_dispatcher::app::Dispatcher::build(settings, cancel.clone()).await?;
    // Tests and scripts read this line to learn the port when http.bind uses port 0.
    println!("gantry-dispatcher listening on http://{}", dispatcher.addr);
    tracing::info!(addr = %dispatcher.addr, "serving");
    let signals = cancel.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        signals.cancel();
    });
    dispatcher.run(run_as).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
