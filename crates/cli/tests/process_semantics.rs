//! Linux process semantics under lego: fork, exec, exit and kill, the rest
//! of the memory interface, signals. Real programs through real daemons.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn fork_child_sees_evicted_pages_and_neither_sees_the_others_writes() {
    // 64 MiB with an 8 MiB ExCache: most pages are remote at each fork.
    let prog = compile("fork_isolation", &[]);
    assert_same_as_plain(
        "fork_isolation",
        &["--excache", "8M"],
        &[prog.to_str().unwrap(), "64", "3"],
        None,
    );
}

#[test]
fn python_multiprocessing_with_the_fork_start_method() {
    let script = "import multiprocessing as mp, hashlib\n\
def work(k):\n    return hashlib.sha256(repr(data[k::7]).encode()).hexdigest()\n\
if __name__ == '__main__':\n    mp.set_start_method('fork')\n\
    data = [str(i) * 3 for i in range(1_500_000)]\n\
    with mp.Pool(2) as pool:\n        print(pool.map(work, range(7)))\n";
    let expect = plain(&[PYTHON3, "-c", script], None);
    assert!(expect.status.success());
    let (got, stats) = under_lego(&["--excache", "16M"], &[PYTHON3, "-c", script], None);
    assert!(got.status.success(), "{}", text(&got.stderr));
    assert_eq!(text(&got.stdout), text(&expect.stdout));
    assert!(
        stats["processes"].as_u64().unwrap() >= 3,
        "workers ran under lego: {stats}"
    );
}

#[test]
fn exec_keeps_the_new_image_under_lego_and_frees_the_old() {
    let daemon = Daemon::start("1G");
    let (out, stats) = under_lego(
        &["--excache", "8M", "--memory", &daemon.addr],
        &[
            "sh",
            "-c",
            "exec python3 -c 'import os; os.execv(\"/usr/bin/env\", [\"env\", \"python3\", \"-c\", \"print(sum(list(range(3000000))))\"])'",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "4499998500000\n");
    // sh, python3, env and python3 again each ran with a runtime.
    assert!(stats["processes"].as_u64().unwrap() >= 3, "{stats}");
    assert!(
        stats["evictions"].as_u64().unwrap() > 0,
        "the last image paged: {stats}"
    );
    assert!(wait_until(Duration::from_secs(5), || daemon.status()
        ["used_bytes"]
        == 0));
}

#[test]
fn two_hundred_short_runs_and_kills_leave_the_daemon_as_it_was() {
    let daemon = Daemon::start("1G");
    let before = daemon.status()["used_bytes"].as_u64().unwrap();
    // 200 processes that each touch memory and exit, in one run.
    let (out, stats) = under_lego(
        &["--excache", "4M", "--memory", &daemon.addr],
        &["sh", "-c", "i=0; while [ $i -lt 200 ]; do awk 'BEGIN { for (i = 0; i < 20000; i++) a[i] = i; }'; i=$((i+1)); done"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stats["processes"].as_u64().unwrap() >= 200, "{stats}");
    // Killed and crashed programs free their memory too.
    let prog = compile("touch_pages", &[]);
    for sig in ["KILL", "SEGV"] {
        let mut c = lego_cmd()
            .args(["run", "--excache", "4M", "--memory", &daemon.addr, "--"])
            .arg(&prog)
            .args(["32", "1000000"])
            // Its one-byte pages would all stay in the compressed tier.
            .env("LEGO_TIER_PERCENT", "0")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let lego_pid = c.id();
        assert!(wait_until(Duration::from_secs(5), || daemon.status()
            ["used_bytes"]
            .as_u64()
            .unwrap()
            > before));
        let pid = child_pid_of(lego_pid).unwrap();
        Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .unwrap();
        let st = c.wait().unwrap();
        assert!(st.signal().is_some(), "{st:?}");
    }
    assert!(
        wait_until(Duration::from_secs(5), || daemon.status()["used_bytes"]
            .as_u64()
            == Some(before)),
        "daemon holds {} after the runs, {before} before",
        daemon.status()
    );
}

#[test]
fn memory_interface_behaves_as_on_linux() {
    // mmap/munmap, MADV_DONTNEED zeroing, mremap grow/shrink/move,
    // MAP_FIXED, mprotect guard pages, an 8 GiB sparse mapping, sbrk.
    let prog = compile("memory_semantics", &[]);
    assert_same_as_plain(
        "memory_semantics",
        &["--excache", "8M"],
        &[prog.to_str().unwrap(), "64"],
        None,
    );
}

#[test]
fn sigsegv_on_a_real_bad_access_still_kills_the_program() {
    let prog = compile("memory_semantics", &[]);
    let p = prog.to_str().unwrap();
    let expect = plain(&[p, "16", "segv"], None);
    assert_eq!(expect.status.signal(), Some(11));
    let (got, _) = under_lego(&["--excache", "4M"], &[p, "16", "segv"], None);
    assert_eq!(got.status.signal(), Some(11), "{}", text(&got.stderr));
    assert_eq!(text(&got.stdout), text(&expect.stdout));
}

#[test]
fn signal_handlers_touching_memory_run_while_faults_are_served() {
    let prog = compile("signals_during_faults", &[]);
    // Without the compressed tier, so that faults go to the daemon.
    let (got, stats) = under_lego(
        &["--excache", "4M"],
        &[
            "env",
            "LEGO_TIER_PERCENT=0",
            prog.to_str().unwrap(),
            "32",
            "4",
        ],
        None,
    );
    assert!(got.status.success(), "{}", text(&got.stderr));
    assert_eq!(text(&got.stdout), "sum_ok=1 handler_ran=1\n");
    assert!(stats["remote_misses"].as_u64().unwrap() > 0);
}

#[test]
fn sigint_sent_to_lego_reaches_the_program() {
    signal_reaches_the_program("INT", 2);
}

#[test]
fn vfork_and_posix_spawn_work_with_evicted_memory() {
    // subprocess uses vfork (CLONE_VM): the child runs on the parent's
    // memory and pager until it execs.
    let script = "import os, subprocess\n\
data = [str(i) for i in range(1_000_000)]\n\
print(subprocess.run(['echo', 'via-subprocess'], capture_output=True, text=True).stdout.strip(), flush=True)\n\
pid = os.posix_spawn('/bin/echo', ['echo', 'via-posix-spawn'], os.environ)\n\
print(os.waitpid(pid, 0)[1])\n\
print(len(data), data[-1])\n";
    let (got, stats) = under_lego(&["--excache", "8M"], &[PYTHON3, "-c", script], None);
    assert!(got.status.success(), "{}", text(&got.stderr));
    assert_eq!(
        text(&got.stdout),
        "via-subprocess\nvia-posix-spawn\n0\n1000000 999999\n"
    );
    assert!(stats["evictions"].as_u64().unwrap() > 0, "{stats}");
}
