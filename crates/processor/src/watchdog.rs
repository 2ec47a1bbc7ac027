//! The watchdog of `lego run`: the last line of defence against a program
//! that hangs silently because its pager cannot serve a fault (DESIGN §5,
//! invariant 4). The runtime reports the failures it sees itself (a dead
//! or full memory daemon); this catches the ones it cannot: a runtime
//! thread faulted on its own region, or a pager that is gone.
//!
//! Once a [`PERIOD`], a thread of `lego run` finds the program's processes
//! (the child it launched and that child's descendants, by the parent
//! links in `/proc/*/stat`), reads each thread's `stat` and `wchan`, and
//! hands the looks to [`HangDetector`]. When a process is hung it stops
//! the whole program (SIGSTOP to every process of it until no new one
//! appears, then SIGKILL to all) and says which process it was. Only the
//! program's processes' threads are read; the rest of `/proc` only for
//! their parent links.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::hang::{HangDetector, Hung, ProcessLook, ThreadLook};

/// Time between two looks at the program.
pub const PERIOD: Duration = Duration::from_secs(1);

/// Looks after the first that must find a process hung the same way:
/// its threads have waited at least `LOOKS × PERIOD`.
pub const LOOKS: u32 = 3;

/// A watchdog thread over one program.
pub struct Watchdog {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<Option<Hung>>,
}

impl Watchdog {
    /// Starts watching the program whose first process is `root`, a child
    /// of this process.
    pub fn start(root: u32) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("lego-watchdog".into())
            .spawn(move || watch(root, &stopped))?;
        Ok(Self { stop, thread })
    }

    /// Stops watching (call it once the program has ended); returns the
    /// hung process if the watchdog stopped the program.
    pub fn finish(self) -> Option<Hung> {
        drop(self.stop);
        self.thread.join().ok().flatten()
    }
}

fn watch(root: u32, stopped: &mpsc::Receiver<()>) -> Option<Hung> {
    let mut detector = HangDetector::new(LOOKS, PERIOD.as_secs());
    loop {
        match stopped.recv_timeout(PERIOD) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return None,
        }
        let looks: Vec<ProcessLook> = program(root)
            .into_iter()
            .filter_map(|(pid, name)| look_at(pid, name))
            .collect();
        if let Some(hung) = detector.look(&looks) {
            kill_program(root);
            return Some(hung);
        }
    }
}

/// What the watchdog reads of one `/proc/…/stat` line.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stat {
    comm: String,
    state: char,
    ppid: u32,
    /// `minflt + majflt + utime + stime`.
    progress: u64,
}

/// Parses a `stat` line: `pid (comm) state ppid … minflt cminflt majflt
/// cmajflt utime stime …` (the name may hold spaces and parentheses, so
/// the fields are counted from the last `)`).
fn parse_stat(line: &str) -> Option<Stat> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let comm = line.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    let num = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some(Stat {
        comm,
        state: fields.first()?.chars().next()?,
        ppid: u32::try_from(num(1)?).ok()?,
        progress: [7, 9, 11, 12]
            .iter()
            .map(|&i| num(i))
            .sum::<Option<u64>>()?,
    })
}

/// The numbered entries of `dir` (processes in `/proc`, threads in
/// `/proc/PID/task`) with their paths and parsed `stat`; entries gone
/// meanwhile are left out.
fn numbered_stats(dir: &str) -> Vec<(u32, std::path::PathBuf, Stat)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let id = entry.file_name().to_str()?.parse().ok()?;
            let path = entry.path();
            let stat = parse_stat(&std::fs::read_to_string(path.join("stat")).ok()?)?;
            Some((id, path, stat))
        })
        .collect()
}

/// The processes of the program: `root` and its descendants, with their
/// names.
fn program(root: u32) -> Vec<(u32, String)> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut names: HashMap<u32, String> = HashMap::new();
    for (pid, _, stat) in numbered_stats("/proc") {
        children.entry(stat.ppid).or_default().push(pid);
        names.insert(pid, stat.comm);
    }
    let mut found = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        let Some(name) = names.remove(&pid) else {
            continue; // Not (or no longer) a process, or seen already.
        };
        found.push((pid, name));
        todo.extend(children.remove(&pid).unwrap_or_default());
    }
    found
}

/// One look at every thread of process `pid`; `None` if it is gone.
fn look_at(pid: u32, name: String) -> Option<ProcessLook> {
    let task = format!("/proc/{pid}/task");
    if !std::path::Path::new(&task).is_dir() {
        return None;
    }
    let mut threads = Vec::new();
    for (tid, path, stat) in numbered_stats(&task) {
        // Unreadable (another user's setuid program): not known to wait.
        let wchan = std::fs::read_to_string(path.join("wchan")).unwrap_or_default();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        threads.push(ThreadLook {
            tid,
            state: stat.state,
            in_userfault: wchan.trim() == "handle_userfault",
            progress: stat.progress,
            helper: lego_sys::process::HELPER_THREAD_NAMES.contains(&comm.trim()),
        });
    }
    Some(ProcessLook { pid, name, threads })
}

/// Ends every process of the program: stops them all first, so that none
/// forks or is orphaned (and lost) while the others die, then kills them.
fn kill_program(root: u32) {
    use lego_sys::process::{send_signal, SIGKILL, SIGSTOP};
    let mut stopped = HashSet::new();
    for _ in 0..16 {
        let fresh: Vec<u32> = program(root)
            .into_iter()
            .map(|(pid, _)| pid)
            .filter(|pid| !stopped.contains(pid))
            .collect();
        if fresh.is_empty() {
            break;
        }
        for pid in fresh {
            let _ = send_signal(pid as i32, SIGSTOP);
            stopped.insert(pid);
        }
    }
    for pid in stopped {
        let _ = send_signal(pid as i32, SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_give_state_parent_and_progress() {
        let line = "316 (hang) S 315 306 20063 0 -1 4194560 105 0 3 0 7 2 0 0 20 0 1 0 127596\n";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                comm: "hang".into(),
                state: 'S',
                ppid: 315,
                progress: 105 + 3 + 7 + 2,
            })
        );
        // A name with spaces and parentheses.
        let line = "9 (a) b (c)) T 1 9 9 0 -1 0 1 0 1 0 1 1 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!((s.comm.as_str(), s.state, s.ppid), ("a) b (c)", 'T', 1));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S"), None);
    }

    #[test]
    fn this_process_is_found_with_its_children_and_not_hung() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = std::process::id();
        let procs = program(me);
        assert!(procs.iter().any(|(p, _)| *p == me));
        assert!(procs.iter().any(|(p, n)| *p == child.id() && n == "sleep"));
        let look = look_at(child.id(), "sleep".into()).unwrap();
        assert_eq!(look.threads.len(), 1);
        assert!(!look.threads[0].in_userfault);
        assert_eq!(program(u32::MAX), vec![]);
        let _ = child.kill();
        let _ = child.wait();
    }
}
