//! `gantry-guard [--uid N --gid N] -- PROGRAM [ARGS...]`: the process between an agent and a
//! step's script (see `gantry_agent::guard`). A binary of its own, small and without an async
//! runtime, because one starts for every step.

use std::process::ExitCode;

fn main() -> ExitCode {
    match gantry_agent::guard::parse_args(std::env::args().skip(1)) {
        Ok((command, user)) => gantry_agent::guard::run(command, user),
        Err(e) => {
            eprintln!("gantry-guard: {e}");
            ExitCode::from(2)
        }
    }
}
