//! Operating lego (issue 17): Prometheus metrics, `lego top` and logs. A
//! manager, a memory daemon and a
//! processor daemon serve /metrics; a real HTTP client (Python's urllib)
//! scrapes them while a program runs under lego, and Python's
//! prometheus_client parses what they answer as OpenMetrics text.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// `lego ARGS --metrics 127.0.0.1:0`: the daemon (killed on drop, also
/// on failure), where it serves, and where its metrics are.
fn start(args: &[&str]) -> (Daemon, String, String) {
    let mut child = lego_cmd()
        .args(args)
        .args(["--metrics", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut addr, mut metrics) = (None, None);
    while addr.is_none() || metrics.is_none() {
        let line = lines
            .next()
            .expect("the daemon says where it serves")
            .unwrap();
        if let Some((_, rest)) = line.split_once(": serving on ") {
            addr = Some(rest.split(' ').next().unwrap().to_string());
        }
        if let Some((_, rest)) = line.split_once(": metrics at http://") {
            metrics = Some(rest.trim_end_matches("/metrics").to_string());
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    let addr = addr.unwrap();
    (
        Daemon {
            child,
            addr: addr.clone(),
        },
        addr,
        metrics.unwrap(),
    )
}

/// Fetches http://ADDR/metrics with urllib and parses it with
/// prometheus_client's OpenMetrics parser: every sample as
/// `name{k=v,...}` and its value, a JSON pair per line (a parse error
/// fails the script).
const SCRAPE: &str = r#"
import json, sys, urllib.request
from prometheus_client.openmetrics.parser import text_string_to_metric_families
with urllib.request.urlopen("http://" + sys.argv[1] + "/metrics", timeout=10) as r:
    assert r.status == 200, r.status
    assert r.headers["Content-Type"].startswith("application/openmetrics-text"), r.headers["Content-Type"]
    text = r.read().decode()
for family in text_string_to_metric_families(text):
    for s in family.samples:
        labels = ",".join("%s=%s" % kv for kv in sorted(s.labels.items()))
        print(json.dumps(["%s{%s}" % (s.name, labels), float(s.value)]))
"#;

/// The metric names the Grafana dashboard's queries use, of those
/// `which` picks.
fn dashboard_metrics(which: impl Fn(&str) -> bool) -> Vec<String> {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../packaging/grafana-dashboard.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut names = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("lego_") && which(word) {
                    names.push(word.to_string());
                }
            }
        }
    }
    names
}

/// The samples at `addr`, by `name{labels}`.
fn scrape(addr: &str) -> std::collections::BTreeMap<String, f64> {
    let out = std::process::Command::new("/usr/bin/python3")
        .args(["-c", SCRAPE, addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scraping {addr}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<(String, f64)>(l).unwrap())
        .collect()
}

/// The sum of the samples named `name` whose labels contain `with`.
fn sum(samples: &std::collections::BTreeMap<String, f64>, name: &str, with: &str) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{name}{{")) && k.contains(with))
        .map(|(_, v)| v)
        .sum()
}

/// Touches 64 MiB of random bytes (which the compressed tier cannot keep)
/// page by page, round after round, for about `secs` seconds: with a
/// 16 MiB ExCache, every round fetches them from the memory daemon and
/// writes them back.
const TOUCHER: &str = r#"
import os, sys, time
buf = bytearray(os.urandom(64 << 20))
print("started", flush=True)
end = time.time() + float(sys.argv[1])
k = 0
while time.time() < end:
    for i in range(0, len(buf), 4096):
        buf[i] = (buf[i] + 1) & 255
    k += 1
print("rounds", k, flush=True)
"#;

/// A manager, a memory daemon and a processor daemon on loopback, each
/// serving metrics (killed, and the manager's state removed, on drop).
struct Cluster {
    _daemons: [Daemon; 3],
    state: std::path::PathBuf,
    manager: String,
    /// (address, metrics address) of the manager, the memory daemon and
    /// the processor daemon.
    at: [(String, String); 3],
}

impl Cluster {
    fn start() -> Self {
        let state = tmp().join(format!("operating-mgr-{}-{}", std::process::id(), unique()));
        let _ = std::fs::remove_dir_all(&state);
        let (mgr, manager, mgr_metrics) = start(&[
            "manager",
            "--listen",
            "127.0.0.1:0",
            "--state",
            state.to_str().unwrap(),
            "--replicas",
            "1",
        ]);
        let (mem, mem_addr, mem_metrics) = start(&[
            "memory",
            "--listen",
            "127.0.0.1:0",
            "--capacity",
            "1G",
            "--manager",
            &manager,
        ]);
        let (proc, proc_addr, proc_metrics) = start(&[
            "processor",
            "--listen",
            "127.0.0.1:0",
            "--manager",
            &manager,
            "--excache",
            "256M",
        ]);
        Cluster {
            _daemons: [mgr, mem, proc],
            state,
            at: [
                (manager.clone(), mgr_metrics),
                (mem_addr, mem_metrics),
                (proc_addr, proc_metrics),
            ],
            manager,
        }
    }

    /// `lego run` of the toucher for `secs` on a processor daemon, once it
    /// has started.
    fn run_toucher(&self, secs: &str) -> std::process::Child {
        let mut run = lego_cmd()
            .args([
                "run",
                "-q",
                "--excache",
                "16M",
                "--manager",
                &self.manager,
                "--",
            ])
            .args(["/usr/bin/python3", "-c", TOUCHER, secs])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(run.stdout.take().unwrap()).lines();
        assert_eq!(out.next().unwrap().unwrap(), "started");
        run
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

#[test]
fn daemons_serve_metrics_that_parse_and_rise_while_a_program_runs() {
    let cluster = Cluster::start();
    let manager = &cluster.manager;
    let [(_, mgr_metrics), (_, mem_metrics), (_, proc_metrics)] = &cluster.at;
    let run = cluster.run_toucher("8");
    // Two scrapes of each, a second and a half apart, while it runs.
    std::thread::sleep(Duration::from_millis(1500));
    let first = [scrape(proc_metrics), scrape(mem_metrics)];
    std::thread::sleep(Duration::from_millis(1500));
    let second = [scrape(proc_metrics), scrape(mem_metrics)];
    let m = scrape(mgr_metrics);
    for (name, with) in [
        ("lego_program_misses_total", "kind=remote"),
        ("lego_program_network_bytes_total", "direction=in"),
        ("lego_program_network_bytes_total", "direction=out"),
        ("lego_program_miss_seconds_count", "program="),
    ] {
        let (a, b) = (sum(&first[0], name, with), sum(&second[0], name, with));
        assert!(a > 0.0 && b > a, "{name}{{{with}}}: {a} then {b}");
    }
    for name in [
        "lego_memory_pages_read_total",
        "lego_memory_pages_written_total",
        "lego_memory_request_seconds_count",
    ] {
        let (a, b) = (sum(&first[1], name, ""), sum(&second[1], name, ""));
        assert!(a > 0.0 && b > a, "{name}: {a} then {b}");
    }
    assert!(sum(&second[0], "lego_program_misses_total", "program=python3") > 0.0);
    assert_eq!(sum(&second[0], "lego_processor_programs", ""), 1.0);
    assert_eq!(sum(&second[1], "lego_memory_spaces", ""), 1.0);
    assert_eq!(
        sum(&m, "lego_manager_components", "kind=memory,state=alive"),
        1.0
    );
    assert_eq!(
        sum(&m, "lego_manager_components", "kind=processor,state=alive"),
        1.0
    );
    assert_eq!(sum(&m, "lego_manager_programs", ""), 1.0);
    assert!(sum(&m, "lego_manager_placement_seconds_count", "what=memory") > 0.0);
    assert!(sum(&m, "lego_manager_units", "") > 0.0);
    // Every metric the Grafana dashboard shows of these daemons is one
    // they serve (the storage daemon's: below).
    let served: Vec<&String> = second[0]
        .keys()
        .chain(second[1].keys())
        .chain(m.keys())
        .collect();
    let shown = dashboard_metrics(|name| !name.starts_with("lego_storage_"));
    assert!(shown.len() > 20, "{shown:?}");
    for name in shown {
        assert!(
            served.iter().any(|k| k.starts_with(&format!("{name}{{"))),
            "the dashboard's {name} is not served"
        );
    }
    // The manager has the program's counters too (from the heartbeats):
    // what `lego top` shows.
    let status = lego_cmd()
        .args(["status", "--json", "--manager", manager])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let counters = &status["processes"][0]["counters"];
    assert!(
        counters["remote_misses"].as_u64().unwrap_or(0) > 0,
        "{status}"
    );
    let end = run.wait_with_output().unwrap();
    assert!(end.status.success(), "{}", text(&end.stderr));
}

#[test]
fn lego_run_serves_its_programs_metrics_and_a_busy_port_is_a_clear_error() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let out = lego_cmd()
        .args(["run", "--metrics", &port, "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("cannot serve metrics on 127.0.0.1:"),
        "{}",
        text(&out.stderr)
    );
    let mut run = lego_cmd()
        .args(["run", "-q", "--excache", "32M", "--metrics", "127.0.0.1:0"])
        .args(["--", "/usr/bin/python3", "-c", TOUCHER, "4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(run.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = err.next().unwrap().unwrap();
        if let Some(a) = line.strip_prefix("lego: metrics at http://") {
            break a.trim_end_matches("/metrics").to_string();
        }
    };
    let mut out = BufReader::new(run.stdout.take().unwrap()).lines();
    assert_eq!(out.next().unwrap().unwrap(), "started");
    std::thread::sleep(Duration::from_millis(1000));
    let samples = scrape(&addr);
    assert!(sum(&samples, "lego_program_misses_total", "kind=remote") > 0.0);
    assert!(run.wait().unwrap().success());
}

/// tmux on a socket of the test's own, removed on drop (also on failure).
struct Tmux(String);

impl Tmux {
    fn new() -> Self {
        let t = Tmux(format!("lego-top-{}-{}", std::process::id(), unique()));
        t.run(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "160",
            "-y",
            "40",
            "sh",
        ]);
        t
    }

    fn run(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("tmux")
            .args(["-L", &self.0])
            .args(args)
            .output()
            .expect("tmux (apt-get install tmux)");
        assert!(out.status.success(), "tmux {args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-t", "t", "-p"])
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["-L", &self.0, "kill-server"])
            .output();
    }
}

#[test]
fn lego_top_shows_the_daemons_and_the_running_program_and_q_quits() {
    let cluster = Cluster::start();
    let manager = &cluster.manager;
    let [_, (mem_addr, _), (proc_addr, _)] = &cluster.at;
    let run = cluster.run_toucher("10");
    let tmux = Tmux::new();
    let command = format!(
        "LEGO_KEY={} {} top --manager {manager}; echo EXITED $?",
        key().display(),
        lego().display()
    );
    tmux.run(&["send-keys", "-t", "t", &command, "Enter"]);
    // The live view: both daemons, and the program with a miss rate
    // (after two refreshes).
    let mut screen = String::new();
    let shown = wait_until(Duration::from_secs(15), || {
        screen = tmux.screen();
        let program = screen
            .lines()
            .find(|l| l.contains("/usr/bin/python3"))
            .unwrap_or_default()
            .to_string();
        screen.contains(mem_addr.as_str())
            && screen.contains(proc_addr.as_str())
            && screen.contains("alive")
            && program.contains("16.0 MiB")
            && program.contains(&format!("{mem_addr}×"))
            && program.contains(" µs")
    });
    assert!(shown, "{screen}");
    assert!(screen.contains("programs by miss rate"), "{screen}");
    // s orders by the next key; q quits and gives the terminal back.
    tmux.run(&["send-keys", "-t", "t", "s"]);
    let sorted = wait_until(Duration::from_secs(5), || {
        screen = tmux.screen();
        screen.contains("programs by p99 miss latency")
    });
    assert!(sorted, "{screen}");
    tmux.run(&["send-keys", "-t", "t", "q"]);
    let quit = wait_until(Duration::from_secs(5), || {
        screen = tmux.screen();
        screen.contains("EXITED 0")
    });
    assert!(quit, "{screen}");
    assert!(
        !screen.contains("programs by") && !screen.contains("┌"),
        "the view is gone from the restored screen: {screen}"
    );
    drop(tmux);
    assert!(run.wait_with_output().unwrap().status.success());
}

/// `lego ARGS` logging JSON, once it serves: the daemon (killed on drop),
/// its address, and its log lines from then on.
fn json_logging(
    args: &[&str],
) -> (
    Daemon,
    String,
    std::io::Lines<BufReader<std::process::ChildStderr>>,
) {
    let mut child = lego_cmd()
        .args(args)
        .env("LEGO_LOG_FORMAT", "json")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().unwrap().unwrap();
        if let Some((_, rest)) = line.split_once(": serving on ") {
            break rest.split(' ').next().unwrap().to_string();
        }
    };
    let daemon = Daemon {
        child,
        addr: addr.clone(),
    };
    (daemon, addr, lines)
}

#[test]
fn failures_a_peer_causes_are_one_json_line_with_the_component_peer_and_reason() {
    let (_daemon, addr, mut lines) =
        json_logging(&["memory", "--listen", "127.0.0.1:0", "--capacity", "64M"]);
    // Garbage, then a peer with another cluster's credential.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    std::io::Write::write_all(&mut s, &[0xff; 64]).unwrap();
    drop(s);
    let other = tmp().join(format!("other-key-{}-{}", std::process::id(), unique()));
    let _ = std::fs::remove_file(&other);
    let made = lego_cmd()
        .args(["keygen", "--out"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made.stderr));
    let refused = lego_cmd()
        .args(["status", "--memory", &addr])
        .env("LEGO_KEY", &other)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let mut warned = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        if v["level"] == "WARN" {
            assert_eq!(v["threadName"], "lego-memory-conn", "{line}");
            assert!(
                v["fields"]["peer"]
                    .as_str()
                    .unwrap()
                    .starts_with("127.0.0.1:"),
                "{line}"
            );
            assert!(!v["fields"]["error"].as_str().unwrap().is_empty(), "{line}");
            warned.push(v["fields"]["error"].as_str().unwrap().to_string());
        }
        if warned.len() == 2 {
            break;
        }
    }
    assert!(warned[0].contains("malformed frame"), "{warned:?}");
    assert!(warned[1].contains("authentication"), "{warned:?}");
    let _ = std::fs::remove_file(&other);
}

#[test]
fn a_storage_daemon_serves_metrics_of_its_file_operations() {
    let dir = tmp().join(format!("metrics-store-{}-{}", std::process::id(), unique()));
    let _ = std::fs::remove_dir_all(&dir);
    let (daemon, addr, metrics) = start(&[
        "storage",
        "--listen",
        "127.0.0.1:0",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    let cred = lego_transport::auth::Credential::load(key()).unwrap();
    let mut c = lego_storage::Client::connect(&addr, 5, &cred).unwrap();
    c.create("f", 0o644).unwrap();
    c.write("f", 0, &vec![7u8; 300_000]).unwrap();
    c.fsync("f").unwrap();
    assert_eq!(c.read("f", 0, 1 << 20).unwrap().len(), 300_000);
    assert!(c.getattr("missing").is_err());
    let m = scrape(&metrics);
    assert_eq!(sum(&m, "lego_storage_written_bytes_total", ""), 300_000.0);
    assert_eq!(sum(&m, "lego_storage_read_bytes_total", ""), 300_000.0);
    assert_eq!(sum(&m, "lego_storage_errors_total", ""), 1.0);
    assert!(sum(&m, "lego_storage_request_seconds_count", "op=fsync") >= 1.0);
    assert!(sum(&m, "lego_storage_vnode_used_bytes", "vid=5") >= 300_000.0);
    assert!(sum(&m, "lego_storage_free_bytes", "") > 0.0);
    let shown = dashboard_metrics(|name| name.starts_with("lego_storage_"));
    assert!(shown.len() >= 5, "{shown:?}");
    for name in shown {
        assert!(
            m.keys().any(|k| k.starts_with(&format!("{name}{{"))),
            "the dashboard's {name} is not served"
        );
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_request_the_manager_refuses_is_one_json_line_with_the_peer_and_reason() {
    let state = tmp().join(format!("refusing-mgr-{}-{}", std::process::id(), unique()));
    let _ = std::fs::remove_dir_all(&state);
    let (_daemon, addr, lines) = json_logging(&[
        "manager",
        "--listen",
        "127.0.0.1:0",
        "--state",
        state.to_str().unwrap(),
    ]);
    let alice = tmp().join(format!("alice-key-{}-{}", std::process::id(), unique()));
    let _ = std::fs::remove_file(&alice);
    let made = lego_cmd()
        .args(["keygen", "--user", "alice", "--from"])
        .arg(key())
        .arg("--out")
        .arg(&alice)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made.stderr));
    let out = lego_cmd()
        .args(["vnode", "create", "web", "--manager", &addr])
        .env("LEGO_KEY", &alice)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let line = lines
        .map(|l| l.unwrap())
        .find(|l| l.contains("request refused"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["level"], "WARN", "{line}");
    assert_eq!(v["threadName"], "lego-manager-conn", "{line}");
    assert!(
        v["fields"]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{line}"
    );
    assert!(
        v["fields"]["who"].as_str().unwrap().contains("alice"),
        "{line}"
    );
    assert!(
        v["fields"]["reason"]
            .as_str()
            .unwrap()
            .contains("may not create a vNode"),
        "{line}"
    );
    let _ = std::fs::remove_file(&alice);
    let _ = std::fs::remove_dir_all(&state);
}
