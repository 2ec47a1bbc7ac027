//! The cluster end to end: a global manager, three memory daemons and the
//! host that runs the program, each in its own network namespace with its
//! own address, joined by a bridge in a namespace of its own (the test's
//! host namespace is not touched). Real daemons, real sockets, a real
//! program compiled here.
//!
//! Needs root (network namespaces) and iproute2; `scripts/test` runs as
//! root, as CI does. Every namespace is removed when the test ends, also
//! when it fails.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;

use common::hosts::*;
use common::*;

#[test]
fn a_program_larger_than_any_memory_daemon_runs_across_hosts() {
    let (h, manager, _) = cluster("3s");
    // 96 MiB: twice what any one memory daemon holds.
    let stress = Stress::new(["96", "2", "2"]);
    let mut run = stress.start(&h, &manager);
    // While it runs, its memory spreads over all three daemons.
    let most = most_units_while_running(&h, &manager, &mut run);
    stress.check(run.wait_with_output().unwrap());
    assert_eq!(most.len(), 3);
    assert!(most.values().all(|&u| u >= 1), "units per daemon: {most:?}");
    assert!(
        most.values().sum::<u64>() >= 6,
        "96 MiB is 6 units: {most:?}"
    );
}

#[test]
fn memory_daemons_added_and_drained_while_a_program_runs_lose_nothing() {
    let (mut h, manager, _) = cluster_with("3s", 2);
    // 96 MiB of data written 8 MiB at a time, every byte checked at the
    // end: with the interpreter's own memory, more than the two daemons
    // there at the start hold (96 MiB, in 16 MiB units). Half way, it
    // waits for a line on stdin: the drain happens there.
    let script = concat!(
        "import sys, time, hashlib\n",
        "def chunk(k):\n",
        "    return bytearray(hashlib.sha256(bytes([k])).digest() * 262144)\n",
        "chunks = []\n",
        "for k in range(12):\n",
        "    if k == 6:\n",
        "        print('half', flush=True)\n",
        "        sys.stdin.readline()\n",
        "    chunks.append(chunk(k))\n",
        "    time.sleep(0.15)\n",
        "bad = sum(c != chunk(k) for k, c in enumerate(chunks))\n",
        "print('chunks', len(chunks), 'mismatches', bad)\n",
    );
    let mut run = run_on_cluster(&h, &manager, "/usr/bin/python3", &["-c", script]);
    std::thread::sleep(Duration::from_millis(400));
    // Hot-add. Room to spare: the daemons left after the drain hold the
    // whole program (it touches 9 or 10 units from run to run).
    start_memory(&mut h, 3, &manager, "160M");
    let mut out = BufReader::new(run.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "half\n", "{}", {
        let _ = run.kill();
        text(&run.wait_with_output().unwrap().stderr)
    });
    // mem1 is the program's home (the most free memory when it started,
    // the lowest id of a tie) and holds some of its pages: the daemons
    // report what they hold in their heartbeats, a second apart, so the
    // manager may learn of the first pages written back a moment later.
    let mut s = h.status("mgr", &manager);
    wait_until(Duration::from_secs(5), || {
        s = h.status("mgr", &manager);
        memory_entry(&s, &h, 1).3 > 0
    });
    let (id, state, units, used) = memory_entry(&s, &h, 1);
    assert_eq!(state, "alive");
    assert!(units >= 1 && used > 0, "nothing on mem1 to move: {s}");
    assert!(
        memory_entry(&s, &h, 3).2 >= 1,
        "the added daemon got no units: {s}"
    );
    let drain = |args: &[&str]| {
        h.cmd("mgr")
            .arg(lego())
            .env("LEGO_KEY", key())
            .arg("drain")
            .args(args)
            .args(["--manager", &manager])
            .output()
            .unwrap()
    };
    // A drain of mem2 started and cancelled at once: whatever moved in
    // between stays moved, and mem2 takes memory again.
    let id2 = memory_entry(&s, &h, 2).0.to_string();
    for args in [&[&id2, "--no-wait"][..], &[&id2, "--cancel"]] {
        let out = drain(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    assert_eq!(memory_entry(&h.status("mgr", &manager), &h, 2).1, "alive");
    let drain = drain(&[&id.to_string(), "--timeout", "60s"]);
    let said = text(&drain.stderr);
    assert!(drain.status.success(), "{said}");
    assert!(said.contains("has left the cluster"), "{said}");
    // Drained while the program waits; it goes on, writes the other half
    // and checks every byte, some of which now come from where mem1's
    // pages went.
    run.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let status = run.wait().unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "{rest}");
    assert_eq!(rest, "chunks 12 mismatches 0\n");
    // The drained daemon ends holding no pages, leaves, and exits.
    let (_, state, units, used) = memory_entry(&h.status("mgr", &manager), &h, 1);
    assert_eq!((state.as_str(), units, used), ("left", 0, 0));
    let mem1 = &mut h.children[1];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(st) = mem1.try_wait().unwrap() {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "mem1 did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn a_program_on_a_processor_daemon_gets_stdin_and_gives_back_output_and_status() {
    let (h, manager, _) = cluster("3s");
    let mut c = run_on_cluster(
        &h,
        &manager,
        "/usr/bin/python3",
        &[
            "-c",
            "import sys, os; d = sys.stdin.read(); print(len(d), d.count('x')); \
             print('pid', os.getpid() > 0, file=sys.stderr); sys.exit(7)",
        ],
    );
    let mut stdin = c.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(&vec![b'x'; 300_000]).unwrap();
        stdin
    });
    // While it runs (it waits for the end of its input), the processor
    // lists it.
    let listed = wait_until(Duration::from_secs(5), || {
        h.status("mgr", &manager)["processes"]
            .as_array()
            .is_some_and(|p| {
                p.iter()
                    .any(|p| p["program"].as_str().unwrap_or("").contains("python3"))
            })
    });
    drop(feeder.join().unwrap());
    let out = c.wait_with_output().unwrap();
    assert!(listed, "the running program never showed in lego status");
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "300000 300000\n");
    assert!(
        text(&out.stderr).contains("pid True"),
        "{}",
        text(&out.stderr)
    );
    // Not quiet, with --stats: lego's summary of the run there follows the
    // program's stderr, and its statistics come back to a file here.
    let stats = tmp().join(format!("{}-remote-stats.json", h.prefix));
    let _ = std::fs::remove_file(&stats);
    let out = h
        .cmd("mgr")
        .arg(lego())
        .env("LEGO_KEY", key())
        .args(["run", "--excache", "16M", "--manager", &manager, "--stats"])
        .arg(&stats)
        .args([
            "--",
            "/usr/bin/python3",
            "-c",
            "print(len(bytearray(20 << 20)))",
        ])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(text(&out.stdout), format!("{}\n", 20 << 20));
    assert!(err.contains("lego: exit 0 after"), "{err}");
    let proc_addr = format!("{}:{PORT}", h.ip(4));
    assert!(
        err.contains(&format!("lego: ran on processor daemon {proc_addr}")),
        "{err}"
    );
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    let _ = std::fs::remove_file(&stats);
    assert_eq!(j["exit_code"], 0, "{j}");
    assert!(j["misses"].as_u64().unwrap() > 0, "{j}");
}

#[test]
fn a_signal_sent_to_lego_run_reaches_the_program_on_the_processor_daemon() {
    use std::os::unix::process::ExitStatusExt;
    let (h, manager, _) = cluster("3s");
    let c = run_on_cluster(&h, &manager, "/usr/bin/sleep", &["30"]);
    // Once it runs there, SIGTERM to the local lego run (in the "mgr"
    // host, a child of `ip netns exec`).
    assert!(wait_until(Duration::from_secs(5), || {
        h.status("mgr", &manager)["processes"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    }));
    let lego_run = wait_for_child(c.id());
    let started = std::time::Instant::now();
    sh(&["kill", "-TERM", &lego_run.to_string()]);
    let out = c.wait_with_output().unwrap();
    assert_eq!(out.status.signal(), Some(libc_sigterm()), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // It ended there, not only here.
    assert!(wait_until(Duration::from_secs(4), || {
        h.status("mgr", &manager)["processes"]
            .as_array()
            .is_some_and(|p| p.is_empty())
    }));
}

#[test]
fn stopped_daemons_leave_the_cluster_and_programs_then_run_where_lego_run_is() {
    use std::os::unix::process::ExitStatusExt;
    // A timeout longer than the test waits: leaving must not wait for it
    // (heartbeats, which list the programs, come every 2 s).
    let (mut h, manager, _) = cluster("6s");
    let stop = |h: &mut Hosts, k: usize| {
        sh(&["kill", "-TERM", &h.children[k].id().to_string()]);
        let st = h.children[k].wait().unwrap();
        assert!(st.success(), "daemon {k} ended with {st:?}");
    };
    // An idle memory daemon (index 3) stopped.
    stop(&mut h, 3);
    // The processor daemon (index 4) stopped while it runs a program.
    let sleeper = run_on_cluster(&h, &manager, "/usr/bin/sleep", &["60"]);
    assert!(wait_until(Duration::from_secs(6), || {
        h.status("mgr", &manager)["processes"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    }));
    let stopped = std::time::Instant::now();
    stop(&mut h, 4);
    // The program it ran was ended, and its client says how.
    let out = sleeper.wait_with_output().unwrap();
    assert_eq!(out.status.signal(), Some(libc_sigterm()), "{out:?}");
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopped.elapsed()
    );
    let s = h.status("mgr", &manager);
    let states = component_states(&s);
    let proc_addr = format!("{}:{PORT}", h.ip(4));
    let mem3 = format!("{}:{PORT}", h.ip(3));
    for (addr, state) in &states {
        let want = if *addr == proc_addr || *addr == mem3 {
            "left"
        } else {
            "alive"
        };
        assert_eq!(state, want, "{addr}: {s}");
    }
    assert_eq!(s["processes"].as_array().map(Vec::len), Some(0), "{s}");
    // With no processor daemon left, lego run --manager runs the program
    // where it is typed, its memory on the two memory daemons still there.
    let stress = Stress::new(["64", "2", "1"]);
    stress.check(stress.start(&h, &manager).wait_with_output().unwrap());
}

/// The pid of `ip netns exec`'s child (it execs, so it is `pid` itself
/// once the exec happened).
fn wait_for_child(pid: u32) -> u32 {
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .is_ok_and(|e| e.file_name().is_some_and(|n| n == "lego"))
    }));
    pid
}

fn libc_sigterm() -> i32 {
    15
}

#[test]
fn the_program_survives_a_manager_restart_and_the_cluster_is_the_same_after() {
    let (mut h, manager, state) = cluster("3s");
    let before = component_states(&h.status("mgr", &manager));
    let stress = Stress::new(["96", "2", "6"]);
    let run = stress.start(&h, &manager);
    std::thread::sleep(Duration::from_millis(300));
    // kill -9 the manager mid-run, then start it again on its state.
    let mgr = &mut h.children[0];
    mgr.kill().unwrap();
    mgr.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let again = start_manager(&mut h, &manager, &state, ("3s", "1"));
    h.children.swap(0, again);
    stress.check(run.wait_with_output().unwrap());
    // The memory daemons registered again: the same members, alive.
    assert!(wait_until(Duration::from_secs(5), || component_states(
        &h.status("mgr", &manager)
    ) == before));
    assert!(before.iter().all(|(_, s)| s == "alive"), "{before:?}");
}

#[test]
fn a_silent_memory_daemon_is_failed_within_the_timeout_and_gets_no_placements() {
    let (h, manager, _) = cluster("1s");
    // Stop the first memory daemon (no heartbeats, no answers).
    let silent = h.children[1].id();
    let addr = format!("{}:{PORT}", h.ip(1));
    let stopped = std::time::Instant::now();
    sh(&["kill", "-STOP", &silent.to_string()]);
    let failed = wait_until(Duration::from_secs(4), || {
        component_states(&h.status("mgr", &manager))
            .iter()
            .any(|(a, s)| a == &addr && s == "failed")
    });
    let took = stopped.elapsed();
    if !failed {
        sh(&["kill", "-CONT", &silent.to_string()]);
    }
    assert!(failed, "not marked failed");
    // Timeout 1 s, checked every 100 ms, heartbeats every 333 ms.
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    // A program started now gets its memory only from the other two.
    let stress = Stress::new(["64", "2", "1"]);
    let mut run = stress.start(&h, &manager);
    let most = most_units_while_running(&h, &manager, &mut run);
    sh(&["kill", "-CONT", &silent.to_string()]);
    stress.check(run.wait_with_output().unwrap());
    assert_eq!(most.len(), 3, "{most:?}");
    for (a, &units) in &most {
        if *a == addr {
            assert_eq!(units, 0, "the failed daemon got placements: {most:?}");
        } else {
            assert!(units >= 1, "{most:?}");
        }
    }
    // Heartbeating again, it is alive again. (Only it is asked about: with
    // a 1 s timeout and the other tests running, another daemon may be
    // failed for a moment.)
    let mut states = Vec::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            states = component_states(&h.status("mgr", &manager));
            states.iter().any(|(a, s)| a == &addr && s == "alive")
        }),
        "{states:?}"
    );
}

#[test]
fn cluster_commands_answer_bad_input_with_one_line_errors() {
    let cases: &[&[&str]] = &[
        &["status", "--manager", "127.0.0.1:1"],
        &["status", "--manager", "no-port-here"],
        &[
            "memory",
            "--listen",
            "127.0.0.1:0",
            "--capacity",
            "64M",
            "--manager",
            "127.0.0.1:1",
        ],
        &[
            "memory",
            "--listen",
            "127.0.0.1:0",
            "--capacity",
            "lots",
            "--manager",
            "127.0.0.1:1",
        ],
        &[
            "manager",
            "--listen",
            "nonsense",
            "--state",
            "/tmp/lego-never",
        ],
        &[
            "manager",
            "--listen",
            "127.0.0.1:0",
            "--state",
            "/tmp/x",
            "--heartbeat-timeout",
            "soon",
        ],
        &["run", "--manager", "127.0.0.1:1", "--", "true"],
        &["drain", "2", "--manager", "127.0.0.1:1"],
        &["drain", "2", "--cancel", "--manager", "127.0.0.1:1"],
        &["drain", "two", "--manager", "127.0.0.1:1"],
        &[
            "drain",
            "2",
            "--timeout",
            "soon",
            "--manager",
            "127.0.0.1:1",
        ],
    ];
    for args in cases {
        let out = lego_cmd().args(*args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = text(&out.stderr);
        let first = err.lines().next().unwrap_or("");
        assert!(
            first.contains("127.0.0.1:1")
                || first.contains("invalid value")
                || first.contains("not an address"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// The capacity a memory daemon started with `args` (and `env`) reports.
fn capacity_of(args: &[&str], env: &[(&str, &str)]) -> u64 {
    Daemon::start_with(args, env).status()["capacity_bytes"]
        .as_u64()
        .unwrap()
}

#[test]
fn settings_come_from_flags_then_environment_then_the_config_file() {
    let file = tmp().join(format!("lego-{}-{}.toml", std::process::id(), unique()));
    std::fs::write(
        &file,
        "[memory]\nlisten = \"127.0.0.1:0\"\ncapacity = \"96M\"\n\n[manager]\nstate = \"/tmp/x\"\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    const MIB: u64 = 1 << 20;
    assert_eq!(capacity_of(&["--config", f, "memory"], &[]), 96 * MIB);
    assert_eq!(
        capacity_of(&["--config", f, "memory"], &[("LEGO_CAPACITY", "80M")]),
        80 * MIB
    );
    assert_eq!(
        capacity_of(
            &["--config", f, "memory", "--capacity", "72M"],
            &[("LEGO_CAPACITY", "80M")]
        ),
        72 * MIB
    );
    // The file through LEGO_CONFIG.
    assert_eq!(capacity_of(&["memory"], &[("LEGO_CONFIG", f)]), 96 * MIB);
    // A setting the command does not have, and a file that is not TOML.
    std::fs::write(&file, "[memory]\ncapacity = \"1G\"\nspeed = \"fast\"\n").unwrap();
    let out = lego_cmd()
        .args(["--config", f, "memory", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("[memory] has no setting 'speed'"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(&file, "[memory\n").unwrap();
    let out = lego_cmd().args(["--config", f, "memory"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).starts_with("lego: config file"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_file(&file);
}
