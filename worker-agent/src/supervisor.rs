//! # Starting steps under the agent's supervisor
//!
//! An agent starts one supervisor process ([`crate::guard`]) when it starts, holding the
//! write end of a pipe to its stdin, and starts every step's interpreter itself, as the
//! leader of a new process group. The supervisor kills every group it knows when that pipe
//! closes, which the kernel does when the agent dies, however it dies.
//!
//! There is no moment at which a step runs unknown to the supervisor: the step's own process
//! writes `+PGID` on the pipe between `fork` and `exec` (a `pre_exec` hook, with `write(2)`,
//! one line shorter than `PIPE_BUF`, so it never mixes with another), before the script can
//! start anything. If the agent dies before that, the child still writes it (it holds a copy
//! of the pipe until its `exec` closes it, close-on-exec), so the supervisor reads the `+`
//! before the end-of-file. The same hook sets `PR_SET_PDEATHSIG` to SIGKILL, so the step's
//! first process dies with the agent even without the supervisor, and refuses to go on if
//! the agent is already gone. When the step has ended and its group was killed, the agent
//! writes `-PGID`.
//!
//! The parent-death signal fires when the *thread* that forked the child ends, so steps are
//! forked by one thread kept for this, which lives as long as this [`Supervisor`]: never by
//! a runtime thread that may come and go. The same thread writes the `-` lines (in order
//! with the spawns), and starts a new supervisor, announcing the running groups again, if
//! the first one was killed.
//!
//! A spawn that fails after its child announced itself (an `exec` error such as `E2BIG` for
//! a huge environment) is taken back: the hook also writes the child's pid on a pipe of the
//! spawn's own, which the thread reads when the spawn failed, and the thread writes the
//! `-`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use tokio::sync::oneshot;

/// A request to the spawning thread.
enum Request {
    Spawn(
        Box<tokio::process::Command>,
        oneshot::Sender<std::io::Result<tokio::process::Child>>,
    ),
    Ended(i32),
}

/// How the supervisor process is started.
#[derive(Clone, Debug)]
pub struct Program {
    pub path: PathBuf,
    pub args: Vec<String>,
}

impl Program {
    /// `gantry-guard --supervise` beside this process's binary; where that is missing, this
    /// binary's own `guard -- --supervise` (`gantry-agent` and `gantry-dispatcher` both have
    /// it).
    pub fn beside_current_exe() -> std::io::Result<Self> {
        let me = std::env::current_exe()?;
        let small = me.with_file_name(crate::guard::BINARY);
        Ok(if small.is_file() {
            Self {
                path: small,
                args: vec![crate::guard::SUPERVISE.into()],
            }
        } else {
            Self {
                path: me,
                args: vec!["guard".into(), "--".into(), crate::guard::SUPERVISE.into()],
            }
        })
    }
}

/// The agent's side of its supervisor.
pub struct Supervisor {
    requests: std::sync::mpsc::Sender<Request>,
    /// The supervisor process's pid (0 while none runs).
    pid: std::sync::Arc<AtomicU32>,
}

impl Supervisor {
    /// Start the supervisor process (see [`Program::beside_current_exe`]) and the spawning
    /// thread, once the supervisor says it is ready (this blocks for as long). Must be called
    /// inside a Tokio runtime, which the steps' children use.
    pub fn start() -> std::io::Result<Self> {
        Self::start_program(Program::beside_current_exe()?)
    }

    /// As [`Supervisor::start`], with the supervisor started as `program`.
    pub fn start_program(program: Program) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
        let pid = std::sync::Arc::new(AtomicU32::new(0));
        let first = Process::start(&program)?;
        pid.store(first.child.id(), Ordering::SeqCst);
        let (tx, rx) = std::sync::mpsc::channel();
        let thread_pid = pid.clone();
        std::thread::Builder::new()
            .name("gantry-spawner".into())
            .spawn(move || {
                let _runtime = runtime.enter();
                Spawner {
                    program,
                    process: first,
                    live: HashMap::new(),
                    pid: thread_pid,
                }
                .serve(rx)
            })?;
        Ok(Self { requests: tx, pid })
    }

    /// The supervisor process's pid.
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    fn send(&self, r: Request) -> Result<(), Request> {
        self.requests.send(r).map_err(|e| e.0)
    }

    /// Start `cmd`, which must lead a process group of its own (`process_group(0)`), with its
    /// group announced to the supervisor before it runs anything. Call [`Supervisor::ended`]
    /// with its pid once the step has ended and its group was killed.
    pub async fn spawn(
        &self,
        cmd: tokio::process::Command,
    ) -> std::io::Result<tokio::process::Child> {
        let (tx, rx) = oneshot::channel();
        if self.send(Request::Spawn(Box::new(cmd), tx)).is_err() {
            return Err(std::io::Error::other("the agent's spawning thread is gone"));
        }
        rx.await
            .map_err(|_| std::io::Error::other("the agent's spawning thread is gone"))?
    }

    /// The step whose group is `pgid` has ended and its group was killed: forget it.
    pub fn ended(&self, pgid: i32) {
        let _ = self.send(Request::Ended(pgid));
    }
}

/// One running supervisor process.
struct Process {
    child: std::process::Child,
    pipe: std::process::ChildStdin,
}

impl Process {
    fn start(program: &Program) -> std::io::Result<Self> {
        let mut child = std::process::Command::new(&program.path)
            .args(&program.args)
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Out of the agent's group: a Ctrl-C to the agent does not reach it.
            .process_group(0)
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot start the step supervisor {}: {e}",
                        program.path.display()
                    ),
                )
            })?;
        let pipe = child.stdin.take().expect("piped");
        // Wait (blocking) for its one line: its signals are handled, it reads the pipe.
        let mut ready = String::new();
        let read = std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("piped")),
            &mut ready,
        );
        if read.is_err() || ready.trim_end() != crate::guard::READY {
            let _ = child.kill();
            let status = child.wait().ok();
            return Err(std::io::Error::other(format!(
                "the step supervisor {} did not start (is it as new as this agent?): {status:?}",
                program.path.display()
            )));
        }
        Ok(Self { child, pipe })
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn tell(&mut self, start: bool, pgid: i32) -> std::io::Result<()> {
        let line = format!("{}{pgid}\n", if start { '+' } else { '-' });
        self.pipe.write_all(line.as_bytes())
    }
}

/// The spawning thread's state.
struct Spawner {
    program: Program,
    process: Process,
    /// Groups announced and not ended, counted (see [`crate::guard::Groups`]).
    live: HashMap<i32, u32>,
    pid: std::sync::Arc<AtomicU32>,
}

impl Spawner {
    fn serve(mut self, requests: std::sync::mpsc::Receiver<Request>) {
        for r in requests {
            match r {
                Request::Spawn(cmd, reply) => {
                    let _ = reply.send(self.spawn(*cmd));
                }
                Request::Ended(pgid) => {
                    self.forget(pgid);
                    if self.process.tell(false, pgid).is_err() {
                        self.restart();
                    }
                }
            }
        }
        // Every handle is gone (the agent has stopped): the supervisor reads end-of-file,
        // kills whatever is still announced, and exits; reap it.
        let Process { mut child, pipe } = self.process;
        drop(pipe);
        let _ = child.wait();
    }

    fn forget(&mut self, pgid: i32) {
        if let Some(n) = self.live.get_mut(&pgid) {
            *n -= 1;
            if *n == 0 {
                self.live.remove(&pgid);
            }
        }
    }

    /// A supervisor that is gone is replaced, and told every running group again.
    fn restart(&mut self) {
        if self.process.alive() {
            return;
        }
        let status = self.process.child.try_wait().ok().flatten();
        tracing::error!(?status, "the step supervisor is gone; starting another");
        match Process::start(&self.program) {
            Ok(mut p) => {
                for (&pg, &n) in &self.live {
                    for _ in 0..n {
                        let _ = p.tell(true, pg);
                    }
                }
                self.pid.store(p.child.id(), Ordering::SeqCst);
                let old = std::mem::replace(&mut self.process, p);
                drop(old.pipe);
            }
            Err(e) => tracing::error!(error = %e, "cannot start the step supervisor again"),
        }
    }

    fn spawn(
        &mut self,
        mut cmd: tokio::process::Command,
    ) -> std::io::Result<tokio::process::Child> {
        self.restart();
        // The pid of the child, whatever becomes of its `exec`.
        let (pid_rx, pid_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        announce_before_exec(
            &mut cmd,
            self.process.pipe.as_raw_fd(),
            pid_tx.as_raw_fd(),
            std::process::id() as libc::pid_t,
        );
        let spawned = cmd.spawn();
        drop(pid_tx);
        match spawned {
            Ok(child) => {
                if let Some(pid) = child.id() {
                    *self.live.entry(pid as i32).or_default() += 1;
                }
                Ok(child)
            }
            Err(e) => {
                // If it announced itself before its `exec` failed, take that back.
                if let Some(pid) = read_pid(pid_rx) {
                    let _ = self.process.tell(false, pid);
                }
                if e.raw_os_error() == Some(libc::EPIPE) {
                    // Not an exec error: the step never ran, and a new supervisor is started
                    // for the next one.
                    self.restart();
                    return Err(std::io::Error::other(
                        "the step supervisor was gone, so the step was not started",
                    ));
                }
                Err(e)
            }
        }
    }
}

fn read_pid(rx: OwnedFd) -> Option<i32> {
    let mut buf = [0u8; 4];
    let mut f = std::fs::File::from(rx);
    match f.read(&mut buf) {
        Ok(4) => Some(i32::from_ne_bytes(buf)),
        _ => None,
    }
}

/// The line `+PGID\n` in `buf`; its length.
fn start_line(pid: libc::pid_t, buf: &mut [u8; 16]) -> usize {
    let mut digits = [0u8; 12];
    let mut n = 0;
    let mut v = pid.unsigned_abs();
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf[0] = b'+';
    for i in 0..n {
        buf[1 + i] = digits[n - 1 - i];
    }
    buf[1 + n] = b'\n';
    n + 2
}

/// In the child, after `fork` and before `exec` (and after std has set its user and process
/// group): die with the agent, refuse to go on if it is gone already, give the spawning
/// thread its pid on `pid_fd`, and announce its group to the supervisor on `supervisor_fd`.
#[allow(unsafe_code)]
fn announce_before_exec(
    cmd: &mut tokio::process::Command,
    supervisor_fd: RawFd,
    pid_fd: RawFd,
    agent: libc::pid_t,
) {
    let hook = move || -> std::io::Result<()> {
        // SAFETY (the whole hook): between `fork` and `exec` only async-signal-safe calls are
        // allowed. These are prctl, getppid, getpid, signal and write, on descriptors the
        // spawning thread keeps open until the spawn has returned; the line is formatted
        // into a stack buffer, and the errors made from errno, so nothing allocates or
        // takes a lock.
        unsafe {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The agent died before the signal was armed: go no further.
            if libc::getppid() != agent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            let pid = libc::getpid();
            let pid_bytes = pid.to_ne_bytes();
            write_all(pid_fd, &pid_bytes)?;
            let mut line = [0u8; 16];
            let n = start_line(pid, &mut line);
            // A supervisor that is gone is an error (EPIPE), not a SIGPIPE that kills us
            // before std can report it; the default comes back for the script.
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            let r = write_all(supervisor_fd, &line[..n]);
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            r
        }
    };
    // SAFETY: see the hook: it is async-signal-safe.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// One `write(2)` of a short buffer, retried on EINTR. Async-signal-safe.
#[allow(unsafe_code)]
fn write_all(fd: RawFd, bytes: &[u8]) -> std::io::Result<()> {
    loop {
        // SAFETY: `bytes` is a valid buffer of that length; `fd` is open (see the hook).
        let r = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if r == bytes.len() as isize {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if r < 0 && e.kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        // Pipe writes this short are all or nothing; a short count is an error too.
        return Err(if r < 0 {
            e
        } else {
            std::io::Error::from_raw_os_error(libc::EIO)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_line_is_plus_the_decimal_pid() {
        let mut buf = [0u8; 16];
        for (pid, want) in [
            (7, "+7\n"),
            (10, "+10\n"),
            (4_194_304, "+4194304\n"),
            (i32::MAX, "+2147483647\n"),
        ] {
            let n = start_line(pid, &mut buf);
            assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), want);
            assert_eq!(
                crate::guard::parse_line(&buf[..n]),
                (pid > 1).then_some((true, pid))
            );
        }
    }
}
