//! Telling a program hung on page faults from one that is only slow, from
//! what `/proc` shows of its threads (DESIGN §5, invariant 4: a dead pager
//! never hangs a program silently).
//!
//! Every miss of a program under lego passes through the kernel's
//! `handle_userfault`, so a thread seen there is normal. A process is
//! *hung* when every one of its live threads, its pager among them, has sat
//! there for several looks in a row without taking a fault or a tick of CPU
//! time: nothing is left in it that could serve the faults (a runtime thread
//! faulted on its own region, or the pager is gone). A stopped process
//! (Ctrl-Z, SIGSTOP) or one with a thread sleeping anywhere else is not
//! hung. [`HangDetector`] is the pure core: looks in, a verdict out; the
//! looks are taken by [`crate::watchdog`].

use std::collections::HashMap;

/// One thread, as one look at `/proc/PID/task/TID` found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadLook {
    pub tid: u32,
    /// The state letter of its `stat` (`R`, `S`, `D`, `T`, `t`, `Z`, …).
    pub state: char,
    /// Its `wchan` is `handle_userfault`: asleep until its fault is served.
    pub in_userfault: bool,
    /// Faults taken plus CPU ticks used (`minflt + majflt + utime +
    /// stime`): moves whenever the thread gets anything done.
    pub progress: u64,
    /// A runtime helper thread (a keeper, the placer, the repair thread,
    /// named `lego-…`): it never serves a fault (only the pager does), so
    /// it is left out.
    pub helper: bool,
}

impl ThreadLook {
    /// Exited, waiting to be reaped: neither blocked nor running.
    fn dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }

    /// Stopped by a signal or a tracer.
    fn stopped(&self) -> bool {
        matches!(self.state, 'T' | 't')
    }
}

/// One process of the program, as one look found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessLook {
    pub pid: u32,
    /// Its command name (`comm`).
    pub name: String,
    pub threads: Vec<ThreadLook>,
}

impl ProcessLook {
    /// The live threads' ids and progress, in tid order, if every live
    /// thread waits on a fault (and there is at least one).
    fn all_waiting_on_faults(&self) -> Option<Vec<(u32, u64)>> {
        let live: Vec<&ThreadLook> = self
            .threads
            .iter()
            .filter(|t| !t.dead() && !t.helper)
            .collect();
        if live.is_empty() || live.iter().any(|t| t.stopped() || !t.in_userfault) {
            return None;
        }
        let mut ids: Vec<(u32, u64)> = live.iter().map(|t| (t.tid, t.progress)).collect();
        ids.sort_unstable();
        Some(ids)
    }
}

/// A process found hung.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hung {
    pub pid: u32,
    pub name: String,
    /// How long its threads have waited, at least, in seconds.
    pub waited_s: u64,
}

impl std::fmt::Display for Hung {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "process {} ({}): every thread has waited over {} s on a page fault its pager cannot serve (the runtime is stuck); stopping the program",
            self.pid, self.name, self.waited_s
        )
    }
}

/// Decides, look after look, whether a process of the program is hung.
#[derive(Debug)]
pub struct HangDetector {
    /// Looks in a row, after the first, that must find the same state.
    looks_needed: u32,
    /// Seconds between looks, for the message.
    period_s: u64,
    /// Per process whose threads all wait on faults: those threads and
    /// their progress, and how many later looks found exactly that.
    waiting: HashMap<u32, (Vec<(u32, u64)>, u32)>,
}

impl HangDetector {
    /// A process is hung once `looks_needed` looks after the first, taken
    /// `period_s` apart, found every live thread of it waiting on a fault
    /// with no progress, and the same threads.
    pub fn new(looks_needed: u32, period_s: u64) -> Self {
        Self {
            looks_needed: looks_needed.max(1),
            period_s,
            waiting: HashMap::new(),
        }
    }

    /// Takes one look at every process of the program; returns a hung one
    /// (the lowest pid, if several are).
    pub fn look(&mut self, processes: &[ProcessLook]) -> Option<Hung> {
        let mut now = HashMap::new();
        for p in processes {
            let Some(threads) = p.all_waiting_on_faults() else {
                continue;
            };
            let same = match self.waiting.get(&p.pid) {
                Some((before, n)) if *before == threads => n + 1,
                _ => 0,
            };
            now.insert(p.pid, (threads, same));
        }
        self.waiting = now;
        processes
            .iter()
            .filter(|p| {
                self.waiting
                    .get(&p.pid)
                    .is_some_and(|(_, n)| *n >= self.looks_needed)
            })
            .min_by_key(|p| p.pid)
            .map(|p| Hung {
                pid: p.pid,
                name: p.name.clone(),
                waited_s: u64::from(self.looks_needed) * self.period_s,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread(tid: u32, state: char, in_userfault: bool, progress: u64) -> ThreadLook {
        ThreadLook {
            tid,
            state,
            in_userfault,
            progress,
            helper: false,
        }
    }

    fn process(pid: u32, threads: Vec<ThreadLook>) -> ProcessLook {
        ProcessLook {
            pid,
            name: "python3".into(),
            threads,
        }
    }

    /// A program thread and its pager, both asleep on a fault.
    fn both_waiting(pid: u32) -> ProcessLook {
        process(
            pid,
            vec![thread(pid, 'S', true, 500), thread(pid + 1, 'S', true, 20)],
        )
    }

    /// Looks at the same processes `n` times; the verdict of each look.
    fn looks(d: &mut HangDetector, n: usize, ps: &[ProcessLook]) -> Vec<Option<Hung>> {
        (0..n).map(|_| d.look(ps)).collect()
    }

    #[test]
    fn every_thread_waiting_on_a_fault_for_three_more_looks_is_hung() {
        let mut d = HangDetector::new(3, 1);
        let ps = [both_waiting(100)];
        let verdicts = looks(&mut d, 4, &ps);
        assert_eq!(verdicts[..3], [None, None, None]);
        let hung = verdicts[3].clone().expect("hung on the fourth look");
        assert_eq!((hung.pid, hung.waited_s), (100, 3));
        assert_eq!(
            hung.to_string(),
            "process 100 (python3): every thread has waited over 3 s on a page fault its pager cannot serve (the runtime is stuck); stopping the program"
        );
    }

    #[test]
    fn a_helper_thread_does_not_hide_a_hang() {
        let mut d = HangDetector::new(3, 1);
        let mut p = both_waiting(100);
        for tid in [102, 103] {
            let helper = ThreadLook {
                helper: true,
                ..thread(tid, 'S', false, 7)
            };
            p.threads.push(helper);
        }
        assert!(looks(&mut d, 4, &[p])[3].is_some());
    }

    #[test]
    fn a_pager_sleeping_elsewhere_means_not_hung() {
        let mut d = HangDetector::new(3, 1);
        let ps = [process(
            100,
            vec![thread(100, 'S', true, 500), thread(101, 'S', false, 20)],
        )];
        assert!(looks(&mut d, 10, &ps).iter().all(Option::is_none));
    }

    #[test]
    fn a_stopped_process_is_not_hung() {
        let mut d = HangDetector::new(3, 1);
        // SIGSTOP: every thread stopped (the wchan says so too).
        let stopped = [process(
            100,
            vec![thread(100, 'T', false, 500), thread(101, 'T', false, 20)],
        )];
        assert!(looks(&mut d, 10, &stopped).iter().all(Option::is_none));
        // A stop that could not take a thread out of an uninterruptible
        // fault wait: still stopped, still not hung.
        let half = [process(
            100,
            vec![thread(100, 'D', true, 500), thread(101, 'T', false, 20)],
        )];
        assert!(looks(&mut d, 10, &half).iter().all(Option::is_none));
    }

    #[test]
    fn a_thread_that_makes_progress_between_looks_is_paging_not_hung() {
        // A busy pager: each look finds every thread in handle_userfault
        // (misses are frequent), but faults keep being served.
        let mut d = HangDetector::new(3, 1);
        for i in 0..10u64 {
            let ps = [process(
                100,
                vec![
                    thread(100, 'S', true, 500 + i),
                    thread(101, 'S', true, 20 + i),
                ],
            )];
            assert_eq!(d.look(&ps), None, "look {i}");
        }
    }

    #[test]
    fn a_wait_interrupted_by_a_running_look_starts_over() {
        let mut d = HangDetector::new(3, 1);
        let waiting = [both_waiting(100)];
        let running = [process(
            100,
            vec![thread(100, 'R', false, 500), thread(101, 'S', true, 20)],
        )];
        assert!(looks(&mut d, 3, &waiting).iter().all(Option::is_none));
        assert_eq!(d.look(&running), None);
        assert!(looks(&mut d, 3, &waiting).iter().all(Option::is_none));
        assert!(d.look(&waiting).is_some());
    }

    #[test]
    fn a_new_or_gone_thread_starts_the_count_over() {
        let mut d = HangDetector::new(3, 1);
        assert!(looks(&mut d, 3, &[both_waiting(100)])
            .iter()
            .all(Option::is_none));
        let mut three = both_waiting(100);
        three.threads.push(thread(102, 'S', true, 0));
        assert!(looks(&mut d, 3, &[three.clone()])
            .iter()
            .all(Option::is_none));
        assert!(d.look(&[three]).is_some());
    }

    #[test]
    fn exited_threads_do_not_keep_a_process_from_being_hung() {
        // The main thread called pthread_exit; the rest wait on faults.
        let mut d = HangDetector::new(3, 1);
        let ps = [process(
            100,
            vec![
                thread(100, 'Z', false, 7),
                thread(101, 'S', true, 500),
                thread(102, 'D', true, 20),
            ],
        )];
        assert_eq!(looks(&mut d, 4, &ps)[3].as_ref().map(|h| h.pid), Some(100));
        // A process with only a zombie left is not hung.
        let mut d = HangDetector::new(3, 1);
        let zombie = [process(100, vec![thread(100, 'Z', false, 7)])];
        assert!(looks(&mut d, 10, &zombie).iter().all(Option::is_none));
    }

    #[test]
    fn one_hung_process_among_healthy_ones_is_found() {
        let mut d = HangDetector::new(3, 1);
        let healthy = process(
            100,
            vec![thread(100, 'S', false, 1), thread(101, 'S', false, 2)],
        );
        let ps = [healthy, both_waiting(200)];
        let last = looks(&mut d, 4, &ps).pop().flatten();
        assert_eq!(last.map(|h| h.pid), Some(200));
    }

    #[test]
    fn a_process_missing_from_a_look_is_forgotten() {
        let mut d = HangDetector::new(3, 1);
        assert!(looks(&mut d, 3, &[both_waiting(100)])
            .iter()
            .all(Option::is_none));
        assert_eq!(d.look(&[]), None);
        assert!(looks(&mut d, 3, &[both_waiting(100)])
            .iter()
            .all(Option::is_none));
    }
}
