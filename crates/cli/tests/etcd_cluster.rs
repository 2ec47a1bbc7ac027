//! The manager without a single point of failure, on hosts made of network
//! namespaces: three etcd members (Debian's etcd-server), two managers
//! sharing them, two memory daemons and a processor daemon, each on a
//! host of its own. A program runs through a killed leader; placement
//! goes on with one etcd member down; with two down (no quorum) changes
//! are refused and running programs go on; with quorum back, work resumes.
//!
//! Needs root (network namespaces); every namespace and etcd data
//! directory is removed when a test ends, also when it fails.
//!
//! Built with the `etcd` feature (`scripts/test` builds with it).

#![cfg(feature = "etcd")]

mod common;

use std::process::{Child, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::hosts::*;
use common::*;

/// How soon the standby leads after the leader is killed, with the
/// default lease (the README says so).
const TAKEOVER: Duration = Duration::from_secs(3);

/// Hosts: the two managers' (each with an etcd member), a third etcd
/// member's, two memory daemons' and the processor daemon's. The memory
/// daemons are at positions 1 and 2, as [`start_memory`] wants.
const NAMES: [&str; 6] = ["mgr", "mem1", "mem2", "mgr2", "etcd3", "proc"];
/// The hosts with an etcd member, by position.
const ETCD_HOSTS: [usize; 3] = [0, 3, 4];

/// One test at a time: their leases and timings need the two cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Cluster {
    h: Hosts,
    /// The etcd members' data directories, and where each one's process
    /// is in `h.children` (None: killed).
    etcd_dirs: Vec<std::path::PathBuf>,
    etcd: Vec<Option<usize>>,
    /// The managers' addresses, as a list, and each one's stderr lines
    /// and place in `h.children`.
    managers: String,
    manager: Vec<(usize, mpsc::Receiver<String>)>,
    grow: std::path::PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.h.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in &self.etcd_dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Cluster {
    fn start() -> Cluster {
        let h = Hosts::new(&NAMES);
        let etcd_dirs = ETCD_HOSTS
            .iter()
            .map(|k| tmp().join(format!("{}-etcd{k}", h.prefix)))
            .collect();
        let mut c = Cluster {
            h,
            etcd_dirs,
            etcd: vec![None; 3],
            managers: String::new(),
            manager: Vec::new(),
            grow: compile("grow", &[]),
        };
        for d in &c.etcd_dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        for m in 0..3 {
            c.start_etcd(m);
        }
        c.managers = format!("{}:{PORT},{}:{PORT}", c.h.ip(0), c.h.ip(3));
        c.start_manager("mgr", 0);
        // It leads once the members have formed their cluster.
        let (_, a_says) = &c.manager[0];
        assert!(
            said(a_says, "lego manager: serving on", Duration::from_secs(30)),
            "the first manager never led"
        );
        c.start_manager("mgr2", 3);
        let (_, b_says) = &c.manager[1];
        assert!(
            said(
                b_says,
                "lego manager: standby; manager",
                Duration::from_secs(20)
            ),
            "the second manager is no standby"
        );
        let managers = c.managers.clone();
        for k in [1, 2] {
            start_memory(&mut c.h, k, &managers, "256M");
        }
        let listen = format!("{}:{PORT}", c.h.ip(5));
        c.h.daemon(
            "proc",
            &[
                "processor",
                "--listen",
                &listen,
                "--manager",
                &managers,
                "--excache",
                "64M",
            ],
            "lego processor: serving",
        );
        c
    }

    /// Starts etcd member `m` (again, on its data, if it ran before).
    fn start_etcd(&mut self, m: usize) {
        let cluster: Vec<String> = ETCD_HOSTS
            .iter()
            .enumerate()
            .map(|(i, k)| format!("e{i}=http://{}:2380", self.h.ip(*k)))
            .collect();
        let ip = self.h.ip(ETCD_HOSTS[m]);
        let child = self
            .h
            .cmd(NAMES[ETCD_HOSTS[m]])
            .args(["etcd", "--name", &format!("e{m}"), "--data-dir"])
            .arg(&self.etcd_dirs[m])
            .args(["--listen-client-urls", &format!("http://{ip}:2379")])
            .args(["--advertise-client-urls", &format!("http://{ip}:2379")])
            .args(["--listen-peer-urls", &format!("http://{ip}:2380")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://{ip}:2380"),
            ])
            .args(["--initial-cluster", &cluster.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (apt-get install etcd-server)");
        self.h.children.push(child);
        self.etcd[m] = Some(self.h.children.len() - 1);
    }

    /// kill -9 etcd member `m`.
    fn kill_etcd(&mut self, m: usize) {
        let i = self.etcd[m].take().expect("running");
        kill(&mut self.h.children[i]);
    }

    /// `lego manager --store etcd://(all three)` on host `name` (position
    /// `k`); its stderr lines come on a channel.
    fn start_manager(&mut self, name: &str, k: usize) {
        let store: Vec<String> = ETCD_HOSTS
            .iter()
            .map(|e| format!("{}:2379", self.h.ip(*e)))
            .collect();
        let mut child = self
            .h
            .cmd(name)
            .arg(lego())
            .env("LEGO_KEY", key())
            .args(["manager", "--listen", &format!("{}:{PORT}", self.h.ip(k))])
            .args(["--store", &format!("etcd://{}", store.join(","))])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let rx = stderr_lines(&mut child);
        self.h.children.push(child);
        self.manager.push((self.h.children.len() - 1, rx));
    }

    /// `grow MB STEP_MS ROUNDS` started on the cluster.
    fn grow(&self, args: [&str; 3]) -> Child {
        run_on_cluster(&self.h, &self.managers, self.grow.to_str().unwrap(), &args)
    }

    fn check(&self, got: Output, args: [&str; 3]) {
        check_against_plain(got, self.grow.to_str().unwrap(), &args);
    }

    fn status(&self) -> serde_json::Value {
        self.h.status("mgr", &self.managers)
    }

    /// A `lego` command with the cluster's managers, run on host "mgr".
    fn lego(&self, args: &[&str]) -> Output {
        self.h
            .cmd("mgr")
            .arg(lego())
            .env("LEGO_KEY", key())
            .args(args)
            .args(["--manager", &self.managers])
            .output()
            .unwrap()
    }
}

fn kill(c: &mut Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// Units placed on each memory daemon (by id).
fn units(s: &serde_json::Value) -> Vec<(u64, u64)> {
    s["components"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "memory")
        .map(|c| (c["id"].as_u64().unwrap(), c["units"].as_u64().unwrap()))
        .collect()
}

fn total_units(s: &serde_json::Value) -> u64 {
    units(s).iter().map(|(_, n)| n).sum()
}

/// Each address space's replicas of units, in all.
fn spaces(s: &serde_json::Value) -> Vec<(u64, u64)> {
    s["spaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sp| {
            let units = sp["units"].as_array().unwrap();
            let n = units.iter().map(|u| u[1].as_u64().unwrap()).sum();
            (sp["space"].as_u64().unwrap(), n)
        })
        .collect()
}

#[test]
fn a_killed_leader_is_replaced_while_a_program_allocates_and_the_cluster_is_the_same() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = Cluster::start();
    let before = c.status();
    assert_eq!(before["manager"], format!("{}:{PORT}", c.h.ip(0)).as_str());
    // 12 units of 16 MiB, one every 400 ms (two replicas each).
    let args = ["192", "400", "2"];
    let run = c.grow(args);
    assert!(
        wait_until(Duration::from_secs(30), || total_units(&c.status()) >= 4),
        "the program's memory was never placed"
    );
    let placed = c.status();
    // kill -9 the leader while the program asks for more units.
    let (a, _) = c.manager[0];
    kill(&mut c.h.children[a]);
    let killed = Instant::now();
    let (_, b_says) = &c.manager[1];
    assert!(
        said(b_says, "lego manager: serving on", Duration::from_secs(10)),
        "the standby never led"
    );
    let took = killed.elapsed();
    eprintln!("the standby led {took:?} after the kill");
    assert!(took <= TAKEOVER, "the standby led {took:?} after the kill");
    // The new leader has the same components, and every unit placed
    // before (the program places more meanwhile).
    let after = c.status();
    assert_eq!(after["manager"], format!("{}:{PORT}", c.h.ip(3)).as_str());
    assert_eq!(components(&after), components(&placed));
    for ((id, was), (id2, now)) in units(&placed).into_iter().zip(units(&after)) {
        assert_eq!(id, id2);
        assert!(now >= was, "daemon {id} held {was} units, now {now}");
    }
    let out = run.wait_with_output().unwrap();
    c.check(out, args);
    // Its units came through the new leader: all 12, twice, while it ran
    // (gone once it ended).
    let printed = c.lego(&["status"]);
    assert!(printed.status.success(), "{}", text(&printed.stderr));
    let printed = text(&printed.stdout);
    assert!(
        printed.contains(&format!("leading manager: {}:{PORT}", c.h.ip(3)))
            && printed.contains("etcd "),
        "{printed}"
    );
    assert_eq!(components(&c.status()), components(&before));
}

#[test]
fn without_etcd_quorum_changes_are_refused_programs_run_on_and_work_resumes_after() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = Cluster::start();
    let before = components(&c.status());
    // One member down (the third, on a host of its own): placement goes
    // on.
    c.kill_etcd(2);
    let args = ["48", "0", "1"];
    c.check(c.grow(args).wait_with_output().unwrap(), args);
    // A program whose memory is placed (3 units, twice), and which then
    // keeps using it for some seconds.
    let earlier: Vec<u64> = spaces(&c.status()).iter().map(|s| s.0).collect();
    let long = ["48", "100", "60"];
    let run = c.grow(long);
    assert!(
        wait_until(Duration::from_secs(30), || spaces(&c.status())
            .iter()
            .any(|&(space, n)| !earlier.contains(&space) && n >= 6)),
        "the program's memory was never placed"
    );
    // Two down: no quorum. The leader stands down (it cannot renew its
    // lease) ...
    c.kill_etcd(1);
    let (_, a_says) = &c.manager[0];
    assert!(
        said(a_says, "no longer the leader", Duration::from_secs(5)),
        "the leader goes on without quorum"
    );
    assert!(said(a_says, "waiting for etcd", Duration::from_secs(5)));
    // ... and a change is refused, saying why.
    let mem = before.iter().find(|m| m.2 == "memory").unwrap().0;
    let drain = c.lego(&["drain", &mem.to_string(), "--no-wait"]);
    assert!(!drain.status.success());
    let why = text(&drain.stderr);
    eprintln!("the drain was refused: {why}");
    assert!(
        why.contains("no manager leads") && why.contains("waiting for etcd"),
        "{why}"
    );
    // The running program goes on, on the memory it has, and ends well.
    c.check(run.wait_with_output().unwrap(), long);
    // Quorum back: a manager leads again, with the same cluster, nothing
    // drained, and programs run again.
    c.start_etcd(1);
    c.start_etcd(2);
    assert!(
        wait_until(Duration::from_secs(30), || c
            .lego(&["status", "--json"])
            .status
            .success()),
        "no manager leads again"
    );
    assert!(wait_until(Duration::from_secs(10), || components(
        &c.status()
    ) == before));
    c.check(c.grow(args).wait_with_output().unwrap(), args);
}

#[test]
fn a_leader_cut_off_stands_down_before_the_standby_leads_and_rejoins_as_a_standby() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let c = Cluster::start();
    let before = components(&c.status());
    let (a_addr, b_addr) = (
        format!("{}:{PORT}", c.h.ip(0)),
        format!("{}:{PORT}", c.h.ip(3)),
    );
    // The leader's host loses its link: no close, no reset, silence. Its
    // etcd member goes with it (left without quorum), so the leader can
    // renew its lease nowhere.
    let link = |state: &str| {
        let ns = c.h.ns("mgr");
        let link = format!("{}b0", c.h.prefix);
        sh(&["ip", "-n", &ns, "link", "set", &link, state]);
    };
    link("down");
    let cut = Instant::now();
    // Which comes first: the old leader standing down, or the standby
    // leading? Both lines arrive through pipes, not the network.
    let ((_, a_says), (_, b_says)) = (&c.manager[0], &c.manager[1]);
    let (mut stood_down, mut led) = (None, None);
    while (stood_down.is_none() || led.is_none()) && cut.elapsed() < Duration::from_secs(20) {
        while let Ok(l) = a_says.try_recv() {
            if l.contains("no longer the leader") {
                stood_down.get_or_insert_with(Instant::now);
            }
        }
        while let Ok(l) = b_says.try_recv() {
            if l.contains("lego manager: serving on") {
                led.get_or_insert_with(Instant::now);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (Some(stood_down), Some(led)) = (stood_down, led) else {
        link("up");
        panic!("after the cut: old leader stood down {stood_down:?}, standby led {led:?}");
    };
    eprintln!(
        "the cut-off leader stood down {:?} after the cut, the standby led {:?} after",
        stood_down - cut,
        led - cut
    );
    assert!(
        stood_down < led,
        "the standby led {:?} before the cut-off leader stood down",
        stood_down - led
    );
    // The cluster follows the new leader, the same as before (asked from
    // a host that is not cut off; the first manager named does not
    // answer, so the question may take a while).
    let mut last = String::new();
    let followed = wait_until(Duration::from_secs(20), || {
        let out =
            c.h.cmd("proc")
                .arg(lego())
                .env("LEGO_KEY", key())
                .args(["status", "--json", "--manager", &c.managers])
                .output()
                .unwrap();
        last = format!("{}{}", text(&out.stdout), text(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .is_ok_and(|s| s["manager"] == b_addr.as_str() && components(&s) == before)
    });
    assert!(followed, "{last}");
    // Its link back, the old leader (the same service) stands by and
    // sends clients to the new one.
    link("up");
    let (_, a_says) = &c.manager[0];
    assert!(
        said(a_says, "standby; manager", Duration::from_secs(20)),
        "the old leader is no standby"
    );
    let asked = c.h.status("mgr", &a_addr);
    assert_eq!(asked["manager"], b_addr.as_str(), "{asked}");
    let args = ["48", "0", "1"];
    c.check(c.grow(args).wait_with_output().unwrap(), args);
}
