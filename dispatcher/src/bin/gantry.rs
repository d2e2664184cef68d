//! `gantry`: the client CLI (see `gantry --help`).

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = gantry_dispatcher::cli::Cli::parse();
    if let Err(e) = gantry_agent::hardening::disable_core_dumps() {
        eprintln!("gantry: warning: {e}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(gantry_dispatcher::cli::run(cli))
}
