//! `gantry`: the client CLI (see `gantry --help`).

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = gantry_dispatcher::cli::Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(gantry_dispatcher::cli::run(cli))
}
