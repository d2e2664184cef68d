//! `gantry-guard --supervise`: an agent's supervisor, which kills its steps' process groups
//! when the agent dies (see `gantry_agent::guard`). A binary of its own, small and without an
//! async runtime, started once by each agent.

use std::process::ExitCode;

fn main() -> ExitCode {
    match gantry_agent::guard::parse_args(std::env::args().skip(1)) {
        Ok(()) => gantry_agent::guard::supervise(),
        Err(e) => {
            eprintln!("gantry-guard: {e}");
            ExitCode::from(2)
        }
    }
}
