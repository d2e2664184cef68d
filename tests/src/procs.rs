//! The machine's live processes, read from `/proc`: what the tests that check "nothing of a
//! step is left" look for.

/// A process that is alive (not a zombie).
#[derive(Clone, Debug)]
pub struct LiveProc {
    pub pid: i32,
    /// Its process group.
    pub pgid: i32,
    /// Its command line, arguments joined by spaces.
    pub cmdline: String,
}

/// Every live process on the machine. A process that exits while it is read is left out.
pub fn live() -> Vec<LiveProc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // After the command's closing parenthesis: state, ppid, pgrp, ...
            let (_, rest) = stat.rsplit_once(") ")?;
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.first() == Some(&"Z") {
                return None;
            }
            let pgid = f.get(2)?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            Some(LiveProc { pid, pgid, cmdline })
        })
        .collect()
}
