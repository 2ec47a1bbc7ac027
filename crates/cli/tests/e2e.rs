//! End-to-end tests: real, unmodified programs (Debian's python3, sort,
//! sqlite3, and C programs compiled here) run under `lego run` through real
//! memory daemons over TCP on loopback, with an ExCache well below their
//! working set; output is compared with a plain run of the same program.
//!
//! Needs the workspace built (`liblego_runtime.so` next to `lego`), gcc,
//! python3, sqlite3 and coreutils: `scripts/test` and `.ci/run` see to it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn no_lost_or_stale_write_under_concurrent_writers() {
    // 64 MiB working set, 8x the ExCache, four threads writing and checking.
    let prog = compile("checksum_stress", &[]);
    let p = prog.to_str().unwrap();
    assert_same_as_plain(
        "checksum_stress",
        &["--excache", "8M"],
        &[p, "64", "4", "3"],
        None,
    );
}

#[test]
fn kernel_reads_and_writes_non_resident_buffers() {
    let prog = compile("kernel_access", &[]);
    let f1 = tmp().join("kernel_access.plain");
    let f2 = tmp().join("kernel_access.lego");
    let expect = plain(&[prog.to_str().unwrap(), "32", f1.to_str().unwrap()], None);
    let (got, stats) = under_lego(
        &["--excache", "4M"],
        &[prog.to_str().unwrap(), "32", f2.to_str().unwrap()],
        None,
    );
    assert!(got.status.success(), "{}", text(&got.stderr));
    assert_eq!(text(&got.stdout), text(&expect.stdout));
    assert_eq!(std::fs::read(&f1).unwrap(), std::fs::read(&f2).unwrap());
    assert!(stats["remote_misses"].as_u64().unwrap() > 0, "{stats}");
}

#[test]
fn python_builds_and_checksums_a_200mb_structure() {
    let script = programs().join("build_structure.py");
    assert_same_as_plain(
        "python3",
        &["--excache", "96M"],
        &[PYTHON3, script.to_str().unwrap(), "450000"],
        None,
    );
}

#[test]
fn gnu_sort_of_a_300mb_file() {
    let input = tmp().join("sort-input.txt");
    if !input.exists() {
        let gen = Command::new("python3")
            .arg("-c")
            .arg(
                "import random,sys\nr=random.Random(1)\nw=sys.stdout.write\n\
                 for i in range(6000000): w('%016x %s\\n' % (r.getrandbits(64), 'x'*r.randint(10,60)))",
            )
            .stdout(std::fs::File::create(&input).unwrap())
            .status()
            .unwrap();
        assert!(gen.success());
    }
    let i = input.to_str().unwrap();
    assert_same_as_plain(
        "sort",
        &["--excache", "48M"],
        &["sort", "-S", "64M", i],
        None,
    );
}

#[test]
fn sqlite3_in_memory_query_workload() {
    let sql = programs().join("queries.sql");
    assert_same_as_plain(
        "sqlite3",
        &["--excache", "16M"],
        &["sqlite3", ":memory:"],
        Some(&sql),
    );
}

/// Resident bytes of the disaggregated region (the 64 GiB mapping), from
/// outside the process.
fn region_rss(pid: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut in_region = false;
    let mut rss = 0;
    for line in smaps.lines() {
        if let Some(size) = line.strip_prefix("Size:") {
            let kb: u64 = size.trim().trim_end_matches(" kB").parse().ok()?;
            in_region = kb >= 32 << 20;
        } else if let Some(r) = line.strip_prefix("Rss:") {
            if in_region {
                rss += r.trim().trim_end_matches(" kB").parse::<u64>().ok()? * 1024;
            }
        }
    }
    Some(rss)
}

/// The compressed tier's bytes now, read from outside the process: the
/// statistics page `lego run` shares with it (its fd is in the program's
/// `LEGO_STATS_FD`).
fn tier_bytes(pid: u32) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let fd = env
        .split(|&b| b == 0)
        .find_map(|v| v.strip_prefix(b"LEGO_STATS_FD="))?;
    let fd = std::str::from_utf8(fd).ok()?;
    let page = std::fs::File::open(format!("/proc/{pid}/fd/{fd}")).ok()?;
    let mut word = [0u8; 8];
    let at = std::mem::offset_of!(lego_sys::stats::SharedStats, tier_bytes);
    page.read_exact_at(&mut word, at as u64).ok()?;
    Some(u64::from_ne_bytes(word))
}

/// The README's stated slack over the ExCache budget.
const BUDGET_SLACK_BYTES: u64 = 1 << 20;

#[test]
fn resident_memory_stays_within_the_budget_seen_from_outside() {
    let prog = compile("touch_pages", &[]);
    let budget: u64 = 16 << 20;
    let mut lego_run = lego_cmd()
        .args(["run", "--excache", "16M", "--"])
        .arg(&prog)
        .args(["128", "6"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lego_pid = lego_run.id();
    let mut samples = 0;
    let (mut max_rss, mut max_local, mut max_tier) = (0, 0, 0);
    let mut pid = None;
    while lego_run.try_wait().unwrap().is_none() {
        if pid.is_none() {
            pid = child_pid_of(lego_pid);
        }
        // Resident pages plus the compressed tier: both count.
        if let (Some(rss), Some(tier)) = (pid.and_then(region_rss), pid.and_then(tier_bytes)) {
            max_rss = max_rss.max(rss);
            max_tier = max_tier.max(tier);
            max_local = max_local.max(rss + tier);
            samples += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = lego_run.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(samples > 20, "too few samples ({samples}) to judge");
    assert!(
        max_rss > budget / 2,
        "the program never used its ExCache ({max_rss} bytes)"
    );
    assert!(
        max_tier > 0,
        "the compressed tier was never used (its pages compress well)"
    );
    assert!(
        max_local <= budget + BUDGET_SLACK_BYTES,
        "resident pages plus the tier, {max_local} bytes, exceed the budget {budget} + slack"
    );
}

#[test]
fn killed_memory_daemon_stops_the_program_with_a_clear_error() {
    let prog = compile("touch_pages", &[]);
    let mut daemon = Daemon::start("1G");
    let mut run = lego_cmd()
        .args(["run", "--excache", "8M", "--memory", &daemon.addr, "--"])
        .arg(&prog)
        .args(["64", "100000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(run.stdout.take().unwrap()).lines();
    // Wait until the program has gone around its working set twice.
    for _ in 0..2 {
        lines.next().expect("progress").unwrap();
    }
    daemon.child.kill().unwrap();
    let killed = Instant::now();
    let ended = wait_until(Duration::from_secs(10), || {
        run.try_wait().unwrap().is_some()
    });
    assert!(
        ended,
        "program still running 10 s after its memory daemon died"
    );
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?} to stop");
    let out = run.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("memory daemon") && err.contains(&daemon.addr),
        "{err}"
    );
}

#[test]
fn process_memory_is_freed_at_the_daemon_after_exit() {
    let prog = compile("touch_pages", &[]);
    let daemon = Daemon::start("1G");
    for _ in 0..3 {
        let (out, _) = under_lego(
            &["--excache", "4M", "--memory", &daemon.addr],
            &[prog.to_str().unwrap(), "32", "1"],
            None,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    assert!(
        wait_until(Duration::from_secs(5), || daemon.status()["used_bytes"]
            == 0),
        "daemon still holds memory: {}",
        daemon.status()
    );
    assert_eq!(daemon.status()["spaces"], 0);
}

#[test]
fn full_memory_daemon_stops_the_program_and_keeps_serving() {
    let prog = compile("touch_pages", &[]);
    let daemon = Daemon::start("16M");
    // Without the compressed tier: its pages (one byte each) would all
    // stay local, compressed, and never reach the daemon.
    let (out, _) = under_lego(
        &["--excache", "4M", "--memory", &daemon.addr],
        &[
            "env",
            "LEGO_TIER_PERCENT=0",
            prog.to_str().unwrap(),
            "64",
            "1",
        ],
        None,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("out of memory"), "{err}");
    // The daemon is still up and has freed the dead program's pages.
    assert!(wait_until(Duration::from_secs(5), || daemon.status()
        ["used_bytes"]
        == 0));
}

#[test]
fn two_memory_daemons_serve_one_program() {
    let prog = compile("checksum_stress", &[]);
    let (a, b) = (Daemon::start("1G"), Daemon::start("1G"));
    let (out, stats) = under_lego(
        &["--excache", "8M", "--memory", &a.addr, "--memory", &b.addr],
        &[prog.to_str().unwrap(), "32", "2", "2"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("mismatches=0"),
        "{}",
        text(&out.stdout)
    );
    assert!(stats["writebacks"].as_u64().unwrap() > 0);
}

#[test]
fn statically_linked_program_is_refused_before_it_starts() {
    let prog = compile("touch_pages", &["-static"]);
    let out = lego_cmd()
        .args(["run", "--"])
        .arg(&prog)
        .args(["1", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(err.contains("statically linked"), "{err}");
    assert!(out.stdout.is_empty(), "the program must not have run");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn user_without_userfaultfd_access_is_told_why() {
    // nobody cannot open /dev/userfaultfd (root-only) and unprivileged
    // userfaultfd is off by default.
    let unpriv =
        std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    if unpriv.trim() != "0" {
        eprintln!("skipped: unprivileged userfaultfd is enabled on this machine");
        return;
    }
    // A copy nobody can reach (the checkout may be under a private home).
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("lego-nobody-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.join("lego");
    std::fs::copy(lego(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&exe)
        .args(["run", "--", "true"])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("userfaultfd") && err.contains("permission"),
        "{err}"
    );
}

#[test]
fn exit_status_signals_and_stdio_pass_through() {
    let out = lego_cmd()
        .args(["run", "--", "sh", "-c", "exit 7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));

    use std::os::unix::process::ExitStatusExt;
    let out = lego_cmd()
        .args(["run", "--", "sh", "-c", "kill -SEGV $$"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc_sigsegv()),
        "{:?}",
        out.status
    );

    let mut c = lego_cmd()
        .args(["run", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin
        .take()
        .unwrap()
        .write_all(b"through the pipe\n")
        .unwrap();
    let out = c.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout), "through the pipe\n");
    assert!(
        text(&out.stderr).contains("lego: exit 0"),
        "summary on stderr"
    );

    signal_reaches_the_program("TERM", 15);
}

fn libc_sigsegv() -> i32 {
    11
}

#[test]
fn bad_arguments_get_one_line_errors() {
    for (args, needle) in [
        (
            vec!["run", "--excache", "lots", "--", "true"],
            "invalid size",
        ),
        (
            vec!["run", "--memory", "127.0.0.1:1", "--", "true"],
            "127.0.0.1:1",
        ),
        (
            vec!["run", "--memory", "not-an-address", "--", "true"],
            "not-an-address",
        ),
        (vec!["run", "--", "/no/such/program"], "not found"),
        (
            vec!["memory", "--listen", "nonsense", "--capacity", "1G"],
            "nonsense",
        ),
        (
            vec!["memory", "--listen", "127.0.0.1:0", "--capacity=-3"],
            "invalid size",
        ),
        (vec!["status", "--memory", "127.0.0.1:1"], "127.0.0.1:1"),
    ] {
        let out = lego_cmd().args(&args).output().unwrap();
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// Runs `lego run ARGS` with `env` added; returns its output and how long
/// it took, killing it and its program (and failing) if it runs over
/// `limit`.
fn run_bounded(args: &[&str], env: &[(&str, &str)], limit: Duration) -> (Output, Duration) {
    use std::os::unix::process::CommandExt;
    let started = Instant::now();
    let mut run = lego_cmd()
        .arg("run")
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let ended = wait_until(limit, || run.try_wait().unwrap().is_some());
    let took = started.elapsed();
    if !ended {
        Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", run.id())])
            .status()
            .unwrap();
    }
    let out = run.wait_with_output().unwrap();
    assert!(
        ended,
        "lego run {args:?} still running after {limit:?}: {}",
        text(&out.stderr)
    );
    (out, took)
}

#[test]
fn a_program_whose_every_thread_waits_on_an_unserved_fault_is_stopped_with_a_clear_error() {
    // The hung process is a grandchild of lego run, below a shell that
    // would go on (and print "after") if only the hung process ended.
    let prog = compile("unserved_fault", &[]);
    let script = format!("env -u LD_PRELOAD {}; echo after", prog.display());
    let (out, took) = run_bounded(
        &["--quiet", "--", "sh", "-c", &script],
        &[],
        Duration::from_secs(15),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert_eq!(text(&out.stdout), "touching\n", "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("page fault"))
        .unwrap_or_else(|| panic!("no line names the page fault: {err}"));
    assert!(
        line.starts_with("lego: process ")
            && line.contains("(unserved_fault): every thread has waited over 3 s")
            && line.ends_with("stopping the program"),
        "{line}"
    );
    // Not before the wait it reports, and well within the bound.
    assert!(took >= Duration::from_secs(3), "stopped after {took:?}");
}

#[test]
fn a_pager_that_faults_on_its_own_region_does_not_hang_the_program() {
    // The runtime's pager reads a non-resident page of its own region
    // ~300 ms after start: it, and every later miss of the program, blocks
    // in handle_userfault for good.
    let (out, _) = run_bounded(
        &[
            "--excache",
            "8M",
            "--",
            PYTHON3,
            "-c",
            "b = [bytearray(1 << 20) for _ in range(64)]\n\
             for _ in range(1000):\n    for x in b: x[::4096] = b'x' * 256\n\
             print('done')",
        ],
        &[("LEGO_INJECT", "pager-self-fault")],
        Duration::from_secs(15),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(!text(&out.stdout).contains("done"), "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("lego: process ") && l.contains("page fault")),
        "{err}"
    );
}
