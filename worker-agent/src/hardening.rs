//! # What Gantry's programs do to themselves at start
//!
//! Memory holds credentials (the worker credential, the broker password, a step's secrets,
//! the dispatcher's keys), so none of the programs (agent, guard, dispatcher, CLI) writes a
//! core dump: [`disable_core_dumps`] sets `RLIMIT_CORE` to 0, soft and hard, first thing in
//! `main`. Processes started by them inherit it, so a step's scripts dump no core either.
//!
//! The agent also makes itself non-dumpable ([`make_undumpable`], `PR_SET_DUMPABLE` 0): its
//! `/proc/<pid>/` then belongs to root, and a step that runs as the agent's own user cannot
//! read its `environ`, `mem` or `fd/` nor attach to it. The flag is reset by `execve`, so the
//! guard and the scripts it starts are dumpable again, as usual.

/// `RLIMIT_CORE` = 0 for this process and whatever it starts. `Err` is the reason, for a
/// warning: no program refuses to start over it.
pub fn disable_core_dumps() -> Result<(), String> {
    use nix::sys::resource::{Resource, setrlimit};
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| format!("cannot disable core dumps: {e}"))
}

/// `PR_SET_DUMPABLE` 0 for this process.
pub fn make_undumpable() -> Result<(), String> {
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| format!("cannot make the process non-dumpable: {e}"))
}

/// Both, printing a warning to stderr for each that failed (before logging is set up).
pub fn harden_agent(program: &str) {
    for r in [disable_core_dumps(), make_undumpable()] {
        if let Err(e) = r {
            eprintln!("{program}: warning: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn core_dumps_are_off_and_the_process_is_not_dumpable() {
        super::disable_core_dumps().unwrap();
        super::make_undumpable().unwrap();
        let (soft, hard) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_CORE).unwrap();
        assert_eq!((soft, hard), (0, 0));
        assert!(!nix::sys::prctl::get_dumpable().unwrap());
    }
}
