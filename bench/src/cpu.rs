//! CPU time by process, from `/proc/<pid>/stat`: the stack's dispatchers and agents, what
//! they started (the steps: guards and scripts), PostgreSQL, RabbitMQ, Redis, this harness,
//! and the whole machine.

use std::collections::HashMap;

/// `/proc` counts CPU time in clock ticks of `USER_HZ`, 100 on Linux.
const TICKS_PER_SEC: f64 = 100.0;

/// One process's line of `/proc/<pid>/stat`, CPU in seconds.
#[derive(Clone, Debug)]
pub(crate) struct ProcStat {
    pub pid: i32,
    pub ppid: i32,
    pub comm: String,
    /// utime + stime: the process's own CPU, every thread.
    pub own: f64,
    /// cutime + cstime: its children's (and their descendants') CPU, once reaped.
    pub reaped: f64,
}

/// Parse one `/proc/<pid>/stat`; the command name may hold spaces and parentheses.
pub(crate) fn parse_stat(stat: &str) -> Option<ProcStat> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let pid = stat[..open].trim().parse().ok()?;
    let comm = stat[open + 1..close].to_owned();
    // After the name: state (field 3), ppid (4), ... utime (14), stime (15), cutime (16),
    // cstime (17); here indexed from 0 at the state.
    let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let n = |i: usize| -> f64 { f.get(i).and_then(|x| x.parse().ok()).unwrap_or(0.0) };
    Some(ProcStat {
        pid,
        ppid: f.get(1)?.parse().ok()?,
        comm,
        own: (n(11) + n(12)) / TICKS_PER_SEC,
        reaped: (n(13) + n(14)) / TICKS_PER_SEC,
    })
}

/// Every process on the machine, as it is now.
pub(crate) struct ProcTable {
    procs: HashMap<i32, ProcStat>,
    children: HashMap<i32, Vec<i32>>,
}

impl ProcTable {
    pub(crate) fn read() -> Self {
        let mut procs = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let name = e.file_name();
                let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
                    continue;
                };
                // A process may end between the listing and the read: it is then not there.
                if let Some(p) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| parse_stat(&s))
                {
                    procs.insert(pid, p);
                }
            }
        }
        let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
        for p in procs.values() {
            children.entry(p.ppid).or_default().push(p.pid);
        }
        Self { procs, children }
    }

    /// A process's own CPU, 0 if it is gone.
    pub(crate) fn own(&self, pid: i32) -> f64 {
        self.procs.get(&pid).map_or(0.0, |p| p.own)
    }

    /// Everything below a process: its reaped children's CPU and every live descendant's,
    /// own and reaped.
    pub(crate) fn below(&self, pid: i32) -> f64 {
        let mut total = self.procs.get(&pid).map_or(0.0, |p| p.reaped);
        let mut stack: Vec<i32> = self.children.get(&pid).cloned().unwrap_or_default();
        while let Some(c) = stack.pop() {
            if let Some(p) = self.procs.get(&c) {
                total += p.own + p.reaped;
            }
            if let Some(cs) = self.children.get(&c) {
                stack.extend(cs);
            }
        }
        total
    }

    /// The CPU of every process named `comm` and all below it, each counted once: the sum
    /// over the topmost ones (a process named `comm` whose parent is not).
    pub(crate) fn family(&self, comm: &str) -> f64 {
        self.procs
            .values()
            .filter(|p| p.comm == comm)
            .filter(|p| self.procs.get(&p.ppid).is_none_or(|q| q.comm != comm))
            .map(|p| p.own + self.below(p.pid))
            .sum()
    }
}

/// Machine-wide (busy, total) CPU seconds from `/proc/stat`.
pub(crate) fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let total: f64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    ((total - idle) / TICKS_PER_SEC, total / TICKS_PER_SEC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_with_spaces_and_parentheses_in_the_name_parses() {
        let line =
            "4242 (tokio (rt) worker) S 17 4242 4242 0 -1 4194560 1 0 0 0 250 50 7 3 20 0 9 0";
        let p = parse_stat(line).unwrap();
        assert_eq!((p.pid, p.ppid), (4242, 17));
        assert_eq!(p.comm, "tokio (rt) worker");
        assert!((p.own - 3.0).abs() < 1e-9, "{p:?}");
        assert!((p.reaped - 0.1).abs() < 1e-9, "{p:?}");
    }

    #[test]
    fn this_process_is_in_the_table_below_its_parent() {
        let t = ProcTable::read();
        let me = std::process::id() as i32;
        let parent = t.procs[&me].ppid;
        assert!(t.children[&parent].contains(&me));
        assert!(t.below(parent) >= t.own(me));
    }
}
