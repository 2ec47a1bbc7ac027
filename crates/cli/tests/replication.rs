//! Memory that survives a failed memory daemon: every unit on two (or
//! three) memory daemons, failover to a surviving replica, re-replication
//! daemon to daemon. Each test runs a checksummed program several times the
//! size of its ExCache on a cluster of network-namespace hosts (see
//! `common::hosts`), fails a memory daemon while it runs — kill -9, or its
//! host's link cut — and checks the program's output against a plain run:
//! a single lost or stale page changes it.
//!
//! Needs root (network namespaces) and iproute2, like `cluster.rs`.
//! `LEGO_SOAK_RUNS` sets how many kills the first test makes (20 by
//! default; `scripts/soak` runs 100).

mod common;

use std::process::{Child, Output};
use std::time::{Duration, Instant};

use common::hosts::*;
use common::*;

/// A small random number source, seeded from the clock (the seed is
/// printed, so a failing run can be replayed with `LEGO_TEST_SEED`).
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::env::var("LEGO_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("LEGO_TEST_SEED={seed}");
        Rng(seed | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A program and its arguments, with the output of a plain run.
struct Workload {
    prog: String,
    args: Vec<String>,
    want: String,
}

impl Workload {
    fn new(name: &str, args: &[&str]) -> Self {
        let prog = compile(name, &[]).to_str().unwrap().to_string();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let plain = std::process::Command::new(&prog)
            .args(&args)
            .output()
            .unwrap();
        assert!(plain.status.success(), "{}", text(&plain.stderr));
        Workload {
            prog,
            args,
            want: text(&plain.stdout),
        }
    }

    /// The checksummed stress program: `mib` MiB over 4 threads, `rounds`
    /// rounds (a 16 MiB ExCache).
    fn stress(mib: &str, rounds: &str) -> Self {
        Self::new("checksum_stress", &[mib, "4", rounds])
    }

    fn start(&self, h: &Hosts, manager: &str) -> Child {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        run_on_cluster(h, manager, &self.prog, &args)
    }

    fn check(&self, got: Output, what: &str) {
        assert!(
            got.status.success(),
            "{what}: under lego: {}",
            text(&got.stderr)
        );
        assert_eq!(text(&got.stdout), self.want, "{what}");
    }
}

/// The children index of each memory host's daemon (mem1..mem3 start
/// right after the manager).
struct Mems(Vec<usize>);

impl Mems {
    fn new(n: usize) -> Self {
        Mems((0..=n).collect())
    }

    /// kill -9 of host `mem{k}`'s memory daemon.
    fn kill(&self, h: &mut Hosts, k: usize) {
        let c = &mut h.children[self.0[k]];
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Starts host `mem{k}`'s memory daemon again, empty.
    fn restart(&mut self, h: &mut Hosts, k: usize, manager: &str, capacity: &str) {
        self.0[k] = start_memory(h, k, manager, capacity);
    }
}

/// The manager's status, as JSON.
fn status(h: &Hosts, manager: &str) -> serde_json::Value {
    h.status("mgr", manager)
}

/// Per memory host k (1..=3): the units with a replica there, from the
/// manager's status (the only program's space).
fn units_on(s: &serde_json::Value, h: &Hosts) -> Vec<u64> {
    (1..=3)
        .map(|k| {
            let addr = format!("{}:{PORT}", h.ip(k));
            s["components"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["addr"] == addr.as_str())
                .map_or(0, |c| c["units"].as_u64().unwrap())
        })
        .collect()
}

fn degraded(s: &serde_json::Value) -> u64 {
    s["degraded_units"].as_u64().unwrap()
}

#[test]
fn a_memory_daemon_killed_at_a_random_moment_loses_nothing() {
    let runs: usize = std::env::var("LEGO_SOAK_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let (mut h, manager, _) = replicated_cluster("2s", 3, "256M", "2");
    let mut mems = Mems::new(3);
    // 48 MiB, three times the ExCache; about 3 s under lego.
    let work = Workload::stress("48", "3");
    let mut rng = Rng::new();
    let mut failed = Vec::new();
    for run in 0..runs {
        let victim = 1 + rng.below(3) as usize;
        let at = Duration::from_millis(300 + rng.below(2200));
        let child = work.start(&h, &manager);
        std::thread::sleep(at);
        mems.kill(&mut h, victim);
        let got = child.wait_with_output().unwrap();
        if !got.status.success() || text(&got.stdout) != work.want {
            failed.push(format!(
                "run {run}: mem{victim} killed after {at:?}: {}{}",
                text(&got.stdout),
                text(&got.stderr)
            ));
        }
        // It comes back empty, and takes memory again.
        mems.restart(&mut h, victim, &manager, "256M");
    }
    eprintln!(
        "{runs} runs, each with a memory daemon killed: {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:#?}");
}

#[test]
fn redundancy_is_restored_after_a_failure_and_a_second_failure_loses_nothing() {
    let (mut h, manager, _) = replicated_cluster("2s", 3, "256M", "2");
    let mems = Mems::new(3);
    let work = Workload::stress("64", "12");
    let child = work.start(&h, &manager);
    // Wait until all its memory is placed (it fills the working set first).
    std::thread::sleep(Duration::from_millis(1500));
    let before = units_on(&status(&h, &manager), &h);
    let total: u64 = before.iter().sum();
    assert!(total >= 8, "64 MiB is 4 units, 2 replicas each: {before:?}");
    let killed = Instant::now();
    mems.kill(&mut h, 1);
    // Restored within the heartbeat timeout and a few seconds (README).
    let mut last = serde_json::Value::Null;
    let restored = wait_until(Duration::from_secs(8), || {
        last = status(&h, &manager);
        let on = units_on(&last, &h);
        degraded(&last) == 0
            && on[0] == 0
            && on[1] == on[2]
            && on[1] + on[2] >= total
            && last["recoveries"][0]["took_ms"].is_u64()
    });
    let took = killed.elapsed();
    assert!(restored, "not restored after {took:?}: {last}");
    eprintln!(
        "redundancy restored {took:?} after the kill: {}",
        last["recoveries"]
    );
    // Every unit is on both survivors now: losing one loses nothing.
    mems.kill(&mut h, 2);
    work.check(child.wait_with_output().unwrap(), "after two failures");
}

#[test]
fn a_memory_host_cut_off_mid_run_loses_nothing_and_its_stale_pages_are_never_served() {
    let (mut h, manager, _) = replicated_cluster("2s", 3, "256M", "2");
    let mems = Mems::new(3);
    let work = Workload::stress("64", "16");
    let child = work.start(&h, &manager);
    std::thread::sleep(Duration::from_millis(1500));
    // mem2's link goes down inside its namespace: no close, no reset,
    // just silence.
    let link = format!("{}b2", h.prefix);
    let ns = h.ns("mem2");
    let set = |state: &str| {
        let ok = std::process::Command::new("ip")
            .args(["-n", &ns, "link", "set", &link, state])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    set("down");
    let addr2 = format!("{}:{PORT}", h.ip(2));
    let state_of = |s: &serde_json::Value| {
        s["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["addr"] == addr2.as_str())
            .map(|c| c["state"].as_str().unwrap().to_string())
    };
    // Generous bounds: the tests of this file run side by side on two vCPUs.
    let repaired = wait_until(Duration::from_secs(30), || {
        let s = status(&h, &manager);
        state_of(&s).as_deref() == Some("failed") && degraded(&s) == 0 && units_on(&s, &h)[1] == 0
    });
    set("up");
    assert!(repaired, "{}", status(&h, &manager));
    // Back: it heartbeats again and holds the program's old pages.
    assert!(wait_until(Duration::from_secs(5), || {
        state_of(&status(&h, &manager)).as_deref() == Some("alive")
    }));
    // Now mem3 fails: mem2 is the only daemon left for new replicas. Its
    // stale copies must not be served, or the checksums show it.
    mems.kill(&mut h, 3);
    let refilled = wait_until(Duration::from_secs(30), || {
        let s = status(&h, &manager);
        degraded(&s) == 0 && units_on(&s, &h)[1] > 0
    });
    work.check(child.wait_with_output().unwrap(), "after a cut and a kill");
    assert!(
        refilled,
        "no replica went back to mem2: {}",
        status(&h, &manager)
    );
}

#[test]
fn with_three_replicas_two_daemons_killed_one_after_the_other_lose_nothing() {
    let (mut h, manager, _) = replicated_cluster("2s", 3, "256M", "3");
    let mems = Mems::new(3);
    let work = Workload::stress("48", "8");
    let child = work.start(&h, &manager);
    std::thread::sleep(Duration::from_millis(1000));
    let on = units_on(&status(&h, &manager), &h);
    assert!(on[0] == on[1] && on[1] == on[2] && on[0] >= 3, "{on:?}");
    mems.kill(&mut h, 1);
    std::thread::sleep(Duration::from_millis(1000));
    mems.kill(&mut h, 3);
    work.check(
        child.wait_with_output().unwrap(),
        "two of three replicas killed",
    );
}

#[test]
fn a_failure_during_forks_loses_nothing() {
    let (mut h, manager, _) = replicated_cluster("2s", 3, "256M", "2");
    let mems = Mems::new(3);
    // 48 MiB copied on write by six children in turn.
    let work = Workload::new("fork_checksum", &["48", "6"]);
    let child = work.start(&h, &manager);
    std::thread::sleep(Duration::from_millis(2500));
    mems.kill(&mut h, 2);
    work.check(
        child.wait_with_output().unwrap(),
        "a daemon killed among forks",
    );
}

#[test]
fn a_failure_during_a_drain_loses_nothing_and_the_drain_completes() {
    let (mut h, manager, _) = replicated_cluster("2s", 3, "256M", "2");
    let mems = Mems::new(3);
    let work = Workload::stress("64", "10");
    let child = work.start(&h, &manager);
    std::thread::sleep(Duration::from_millis(1500));
    let s = status(&h, &manager);
    let addr1 = format!("{}:{PORT}", h.ip(1));
    let id1 = s["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["addr"] == addr1.as_str())
        .unwrap()["id"]
        .to_string();
    let drain = h
        .cmd("mgr")
        .arg(lego())
        .env("LEGO_KEY", key())
        .args(["drain", &id1, "--timeout", "60s", "--manager", &manager])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    mems.kill(&mut h, 2);
    work.check(
        child.wait_with_output().unwrap(),
        "a daemon killed during a drain",
    );
    let drained = drain.wait_with_output().unwrap();
    assert!(drained.status.success(), "{}", text(&drained.stderr));
}

#[test]
fn a_failure_right_after_a_hot_add_loses_nothing() {
    // Two daemons hold the program's replicas; a third joins while it
    // runs, then one of the first two fails: its replicas go to the new
    // daemon, which the program had no connection to.
    let (mut h, manager, _) = replicated_cluster("2s", 2, "256M", "2");
    let mems = Mems::new(2);
    let work = Workload::stress("64", "12");
    let child = work.start(&h, &manager);
    std::thread::sleep(Duration::from_millis(1000));
    start_memory(&mut h, 3, &manager, "256M");
    mems.kill(&mut h, 1);
    let moved = wait_until(Duration::from_secs(30), || {
        let s = status(&h, &manager);
        degraded(&s) == 0 && units_on(&s, &h)[2] > 0
    });
    work.check(
        child.wait_with_output().unwrap(),
        "a daemon killed after a hot-add",
    );
    assert!(moved, "the added daemon got no replicas");
}
