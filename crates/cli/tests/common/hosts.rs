//! Hosts made of network namespaces, and a lego cluster on them: the
//! helpers of the cluster and replication tests.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::*;

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        text(&out.stderr)
    );
}

/// Hosts made of network namespaces on one bridge; removed on drop.
pub struct Hosts {
    pub prefix: String,
    pub subnet: String,
    pub names: Vec<String>,
    pub children: Vec<Child>,
}

impl Hosts {
    /// Namespaces `{prefix}-{name}` at 10.S.0.(k+1)/24 for each name, and
    /// a bridge namespace joining them.
    pub fn new(names: &[&str]) -> Hosts {
        let id = format!("{}{}", std::process::id() % 10_000, unique());
        let prefix = format!("lg{id}");
        let subnet = format!("10.{}.{}", 100 + std::process::id() % 100, unique() % 250);
        let mut h = Hosts {
            prefix: prefix.clone(),
            subnet: subnet.clone(),
            names: Vec::new(),
            children: Vec::new(),
        };
        let br = format!("{prefix}-br");
        sh(&["ip", "netns", "add", &br]);
        h.names.push(br.clone());
        sh(&["ip", "-n", &br, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &br, "link", "set", "br0", "up"]);
        for (k, name) in names.iter().enumerate() {
            let ns = format!("{prefix}-{name}");
            sh(&["ip", "netns", "add", &ns]);
            h.names.push(ns.clone());
            let (a, b) = (format!("{prefix}a{k}"), format!("{prefix}b{k}"));
            // Created inside the bridge namespace, one end moved out.
            sh(&[
                "ip", "-n", &br, "link", "add", &a, "type", "veth", "peer", "name", &b,
            ]);
            sh(&["ip", "-n", &br, "link", "set", &b, "netns", &ns]);
            sh(&["ip", "-n", &br, "link", "set", &a, "master", "br0", "up"]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{subnet}.{}/24", k + 1),
                "dev",
                &b,
            ]);
            sh(&["ip", "-n", &ns, "link", "set", &b, "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        h
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// The address of host number `k` (its position in `new`'s names).
    pub fn ip(&self, k: usize) -> String {
        format!("{}.{}", self.subnet, k + 1)
    }

    /// A command run inside host `name`.
    pub fn cmd(&self, name: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(name)]);
        c
    }

    /// Starts a lego daemon in host `name`; returns once it prints the line
    /// starting with `ready`.
    pub fn daemon(&mut self, name: &str, args: &[&str], ready: &str) -> usize {
        self.daemon_with(name, args, &[], ready)
    }

    /// As [`Hosts::daemon`], with variables `env` set.
    pub fn daemon_with(
        &mut self,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        ready: &str,
    ) -> usize {
        let mut child = self
            .cmd(name)
            .arg(lego())
            .env("LEGO_KEY", key())
            .envs(env.iter().copied())
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.starts_with(ready) => break,
                Some(Ok(_)) => {}
                _ => panic!("{args:?} in {name} ended before it was ready"),
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        self.children.push(child);
        self.children.len() - 1
    }

    pub fn status(&self, name: &str, manager: &str) -> serde_json::Value {
        let out = self
            .cmd(name)
            .arg(lego())
            .env("LEGO_KEY", key())
            .args(["status", "--json", "--manager", manager])
            .output()
            .unwrap();
        assert!(out.status.success(), "status: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Starts the manager on host "mgr"; returns its index in `h.children`.
pub fn start_manager(
    h: &mut Hosts,
    addr: &str,
    state: &std::path::Path,
    (timeout, replicas): (&str, &str),
) -> usize {
    h.daemon(
        "mgr",
        &[
            "manager",
            "--listen",
            addr,
            "--state",
            state.to_str().unwrap(),
            "--heartbeat-timeout",
            timeout,
            "--replicas",
            replicas,
        ],
        "lego manager: serving",
    )
}

pub const HOSTS: [&str; 5] = ["mgr", "mem1", "mem2", "mem3", "proc"];
pub const PORT: u16 = 7400;

/// A manager giving each unit one replica, three memory daemons of 48 MiB
/// each and a processor daemon with a 64 MiB ExCache, every one on its own
/// host; returns the hosts, the manager's address and its state dir.
pub fn cluster(timeout: &str) -> (Hosts, String, PathBuf) {
    cluster_with(timeout, 3)
}

/// Starts the memory daemon of host `mem{k}` with `capacity`.
pub fn start_memory(h: &mut Hosts, k: usize, manager: &str, capacity: &str) -> usize {
    let listen = format!("{}:{PORT}", h.ip(k));
    h.daemon(
        &format!("mem{k}"),
        &[
            "memory",
            "--listen",
            &listen,
            "--capacity",
            capacity,
            "--manager",
            manager,
        ],
        "lego memory: serving",
    )
}

/// As [`cluster`], with only the first `memories` memory daemons started.
pub fn cluster_with(timeout: &str, memories: usize) -> (Hosts, String, PathBuf) {
    replicated_cluster(timeout, memories, "48M", "1")
}

/// As [`cluster_with`], with daemons of `capacity` and `replicas`
/// replicas of each unit.
pub fn replicated_cluster(
    timeout: &str,
    memories: usize,
    capacity: &str,
    replicas: &str,
) -> (Hosts, String, PathBuf) {
    let mut h = Hosts::new(&HOSTS);
    let manager = format!("{}:{PORT}", h.ip(0));
    let state = tmp().join(format!("{}-state", h.prefix));
    let _ = std::fs::remove_dir_all(&state);
    start_manager(&mut h, &manager, &state, (timeout, replicas));
    for k in 1..=memories {
        start_memory(&mut h, k, &manager, capacity);
    }
    let listen = format!("{}:{PORT}", h.ip(4));
    h.daemon(
        "proc",
        &[
            "processor",
            "--listen",
            &listen,
            "--manager",
            &manager,
            "--excache",
            "64M",
        ],
        "lego processor: serving",
    );
    (h, manager, state)
}

pub fn component_states(s: &serde_json::Value) -> Vec<(String, String)> {
    s["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["addr"].as_str().unwrap().to_string(),
                c["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// `prog` with a 16 MiB ExCache, started from the manager's host: the
/// manager places it on the processor daemon's host, and its memory on the
/// memory daemons.
pub fn run_on_cluster(h: &Hosts, manager: &str, prog: &str, args: &[&str]) -> Child {
    h.cmd("mgr")
        .arg(lego())
        .env("LEGO_KEY", key())
        .args([
            "run",
            "--quiet",
            "--excache",
            "16M",
            "--manager",
            manager,
            "--",
            prog,
        ])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The checksummed stress program with its arguments (MiB, threads,
/// rounds), run on the cluster and checked against a plain run.
pub struct Stress {
    pub prog: PathBuf,
    pub args: [&'static str; 3],
}

impl Stress {
    pub fn new(args: [&'static str; 3]) -> Self {
        Stress {
            prog: compile("checksum_stress", &[]),
            args,
        }
    }

    pub fn start(&self, h: &Hosts, manager: &str) -> Child {
        run_on_cluster(h, manager, self.prog.to_str().unwrap(), &self.args)
    }

    pub fn check(&self, got: Output) {
        check_against_plain(got, self.prog.to_str().unwrap(), &self.args)
    }
}

pub fn check_against_plain(got: Output, prog: &str, args: &[&str]) {
    let want = Command::new(prog).args(args).output().unwrap();
    assert!(want.status.success());
    assert!(got.status.success(), "under lego: {}", text(&got.stderr));
    assert_eq!(text(&got.stdout), text(&want.stdout));
}

/// The most units the manager's status showed on each memory daemon (by
/// address) while `run` ran. Sampled during the run: once a program ends,
/// the daemons stop reporting its space and the manager forgets its
/// placements.
pub fn most_units_while_running(
    h: &Hosts,
    manager: &str,
    run: &mut Child,
) -> std::collections::BTreeMap<String, u64> {
    let mut most = std::collections::BTreeMap::<String, u64>::new();
    while run.try_wait().unwrap().is_none() {
        let s = h.status("mgr", manager);
        for c in s["components"].as_array().unwrap() {
            if c["kind"] == "memory" {
                let m = most
                    .entry(c["addr"].as_str().unwrap().to_string())
                    .or_default();
                *m = (*m).max(c["units"].as_u64().unwrap());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    most
}

/// The memory daemon of host `mem{k}` in a status: (id, state, units, used bytes).
pub fn memory_entry(s: &serde_json::Value, h: &Hosts, k: usize) -> (u64, String, u64, u64) {
    let addr = format!("{}:{PORT}", h.ip(k));
    let c = s["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["addr"] == addr.as_str())
        .unwrap_or_else(|| panic!("{addr} not in {s}"));
    (
        c["id"].as_u64().unwrap(),
        c["state"].as_str().unwrap().to_string(),
        c["units"].as_u64().unwrap(),
        c["used_bytes"].as_u64().unwrap(),
    )
}
