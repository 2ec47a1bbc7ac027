//! Who may talk to lego's daemons (docs/security.md): real daemons on
//! loopback, probed the way an outsider, a wrong cluster and a user would.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use lego_protocol::control::{self, Kind, Reply, Request};
use lego_protocol::{
    decode, encode, Capability, Message, Role, SpaceId, VirtAddr, PROTOCOL_VERSION,
};
use lego_transport::auth::{Credential, Identity};
use lego_transport::{ControlClient, FramedConn, Tcp, Transport};

/// `lego ARGS`, a daemon, once it says where it serves.
fn start(args: &[&str]) -> Daemon {
    Daemon::start_with(args, &[])
}

fn threads(d: &Daemon) -> usize {
    let s = std::fs::read_to_string(format!("/proc/{}/status", d.child.id())).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A manager, a memory daemon and a processor daemon on loopback, all with
/// this test binary's credential.
struct Cluster {
    manager: Daemon,
    memory: Daemon,
    processor: Daemon,
    _state: std::path::PathBuf,
}

impl Cluster {
    fn start() -> Cluster {
        let state = tmp().join(format!(
            "security-state-{}-{}",
            std::process::id(),
            unique()
        ));
        let _ = std::fs::remove_dir_all(&state);
        let manager = start(&[
            "manager",
            "--listen",
            "127.0.0.1:0",
            "--state",
            state.to_str().unwrap(),
        ]);
        let memory = start(&[
            "memory",
            "--listen",
            "127.0.0.1:0",
            "--capacity",
            "256M",
            "--manager",
            &manager.addr,
        ]);
        let processor = start(&[
            "processor",
            "--listen",
            "127.0.0.1:0",
            "--excache",
            "256M",
            "--manager",
            &manager.addr,
        ]);
        Cluster {
            manager,
            memory,
            processor,
            _state: state,
        }
    }

    fn cred() -> Credential {
        Credential::load(key()).unwrap()
    }

    fn status(&self) -> control::ClusterStatus {
        match ControlClient::connect(
            &self.manager.addr,
            "t",
            Duration::from_secs(5),
            &Self::cred(),
        )
        .unwrap()
        .call(&Request::Status)
        .unwrap()
        {
            Reply::Status(s) => *s,
            other => panic!("{other:?}"),
        }
    }
}

fn control(req: &Request) -> String {
    control::to_json(req)
}

/// Every request kind a daemon serves, as its frame.
fn requests() -> Vec<(&'static str, Vec<u8>)> {
    let page = vec![0x5a; 4096];
    let launch = control(&Request::Launch {
        argv: vec!["touch".into(), "/tmp/lego-security-pwned".into()],
        cwd: "/".into(),
        env: vec![],
        excache_bytes: 1 << 20,
        summary: false,
        stats: false,
        vnode: None,
    });
    let register = control(&Request::Register {
        kind: Kind::Memory,
        addr: "127.0.0.1:9".into(),
        capacity_bytes: 1 << 50,
        id: None,
        key: String::new(),
        zone: String::new(),
    });
    let drain = control(&Request::Drain { id: 1 });
    let status = control(&Request::Status);
    let messages: Vec<(&str, Message<'_>)> = vec![
        ("launch", Message::Control { json: &launch }),
        (
            "open",
            Message::OpenSpace {
                pid: 1,
                program: "probe",
                region_base: VirtAddr(1 << 40),
                region_bytes: 1 << 30,
                bootstrap_bytes: 0,
                capability: Capability([1; 16]),
            },
        ),
        (
            "attach",
            Message::AttachSpace {
                space: SpaceId(1),
                capability: Capability([1; 16]),
                region_base: VirtAddr(1 << 40),
                region_bytes: 1 << 30,
            },
        ),
        (
            "fork",
            Message::ForkSpace {
                parent: SpaceId(1),
                parent_capability: Capability([1; 16]),
                child: SpaceId(0),
                child_capability: Capability([2; 16]),
            },
        ),
        (
            "read",
            Message::ReadPages {
                addrs: vec![VirtAddr(1 << 40)].into(),
            },
        ),
        (
            "write",
            Message::WritePages {
                addrs: vec![VirtAddr(1 << 40)].into(),
                data: &page,
            },
        ),
        ("register", Message::Control { json: &register }),
        ("drain", Message::Control { json: &drain }),
        ("status", Message::Control { json: &status }),
        ("stats", Message::GetStats),
    ];
    messages
        .into_iter()
        .map(|(what, m)| {
            let mut frame = Vec::new();
            encode(1, &m, &mut frame);
            (what, frame)
        })
        .collect()
}

/// Says `Hello` and sends `frame` in the clear; returns the first frame
/// of the answer, described, or "closed".
fn without_credential(addr: &str, frame: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    encode(
        0,
        &Message::Hello {
            version: PROTOCOL_VERSION,
            role: Role::Client,
            name: "probe",
        },
        &mut out,
    );
    out.extend_from_slice(frame);
    s.write_all(&out).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    match decode(&got) {
        Ok(f) => match f.message {
            Message::Refused { reason } => format!("Refused: {reason}"),
            other => other.describe(),
        },
        Err(_) if got.is_empty() => "closed".into(),
        Err(e) => format!("undecodable answer: {e}"),
    }
}

#[test]
fn no_credential_and_a_wrong_one_are_refused_by_every_daemon_for_every_request() {
    let mut c = Cluster::start();
    let wrong = Credential::generate().unwrap();
    let forged_user = Credential::generate()
        .unwrap()
        .derive(Identity::User("root".into()))
        .unwrap();
    // Once the components' heartbeat connections are up: the same count
    // for a second.
    let count = |c: &Cluster| -> Vec<usize> {
        [&c.manager, &c.memory, &c.processor]
            .iter()
            .map(|p| threads(p))
            .collect()
    };
    let mut threads_before = count(&c);
    let mut same = 0;
    while same < 5 {
        std::thread::sleep(Duration::from_millis(200));
        let now = count(&c);
        same = if now == threads_before { same + 1 } else { 0 };
        threads_before = now;
    }
    let _ = std::fs::remove_file("/tmp/lego-security-pwned");
    for (daemon, addr) in [
        ("manager", c.manager.addr.clone()),
        ("memory", c.memory.addr.clone()),
        ("processor", c.processor.addr.clone()),
    ] {
        for (what, frame) in requests() {
            let answer = without_credential(&addr, &frame);
            assert!(
                answer.starts_with("Refused") && answer.contains("expected Auth"),
                "{daemon}, {what} without a credential: {answer}"
            );
            for cred in [&wrong, &forged_user] {
                let s = Tcp.connect(&addr, Duration::from_secs(5)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut conn = FramedConn::new(s);
                let e = conn
                    .client_handshake(Role::Client, "probe", cred)
                    .expect_err("refused");
                assert!(
                    e.to_string().contains("authentication failed"),
                    "{daemon}, {what} with {cred:?} of another cluster: {e}"
                );
                // The request finds the connection closed.
                let _ = conn.stream().set_read_timeout(Some(Duration::from_secs(2)));
                let mut raw = conn.stream().try_clone().unwrap();
                let _ = raw.write_all(&frame);
                let mut rest = Vec::new();
                let _ = raw.read_to_end(&mut rest);
                assert!(rest.is_empty(), "{daemon}, {what}: answered {rest:?}");
            }
        }
    }
    assert!(!std::path::Path::new("/tmp/lego-security-pwned").exists());
    // Everyone is up, nothing was registered, opened or left running.
    for p in [&mut c.manager, &mut c.memory, &mut c.processor] {
        assert!(p.child.try_wait().unwrap().is_none(), "a daemon died");
    }
    let s = c.status();
    assert_eq!(s.components.len(), 2, "{s:?}");
    assert!(s.spaces.is_empty() && s.processes.is_empty(), "{s:?}");
    let mem = lego_memory::query_stats(&c.memory.addr, &Cluster::cred()).unwrap();
    assert_eq!((mem.spaces, mem.used_bytes), (0, 0));
    let procs = [&c.manager, &c.memory, &c.processor];
    assert!(
        wait_until(Duration::from_secs(10), || procs
            .iter()
            .zip(&threads_before)
            .all(|(p, &before)| threads(p) <= before)),
        "threads before {threads_before:?}, after {:?}",
        procs.iter().map(|p| threads(p)).collect::<Vec<_>>()
    );
}

#[test]
fn a_user_may_run_programs_but_not_reconfigure_the_cluster() {
    let c = Cluster::start();
    let alice = Cluster::cred()
        .derive(Identity::User("alice".into()))
        .unwrap();
    let mut client =
        ControlClient::connect(&c.manager.addr, "t", Duration::from_secs(5), &alice).unwrap();
    for req in [
        Request::Register {
            kind: Kind::Memory,
            addr: "127.0.0.1:9".into(),
            capacity_bytes: 1 << 50,
            id: None,
            key: String::new(),
            zone: String::new(),
        },
        Request::Drain { id: 1 },
        Request::Undrain { id: 1 },
        Request::Leave {
            id: 1,
            key: String::new(),
        },
    ] {
        match client.call(&req).unwrap() {
            Reply::Error { message } => {
                assert!(message.contains("user:alice may not"), "{message}")
            }
            other => panic!("{req:?} answered {other:?}"),
        }
    }
    match client.call(&Request::Status).unwrap() {
        Reply::Status(s) => {
            assert_eq!(s.components.len(), 2);
            assert!(s.spaces.is_empty() && s.processes.is_empty());
        }
        other => panic!("{other:?}"),
    }
    let s = c.status();
    assert_eq!(s.components.len(), 2, "nothing registered: {s:?}");
    assert!(s
        .components
        .iter()
        .all(|c| c.state == control::State::Alive));
}

/// Launches `argv` on the processor daemon with `env`, as `cred`; returns
/// the reply to the launch and what the program printed.
fn launch(addr: &str, cred: &Credential, argv: &[&str], env: &[(&str, &str)]) -> (Reply, String) {
    let s = Tcp.connect(addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut conn = FramedConn::new(s);
    conn.client_handshake(Role::Client, "t", cred).unwrap();
    let req = control(&Request::Launch {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        cwd: "/".into(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        excache_bytes: 16 << 20,
        summary: false,
        stats: false,
        vnode: None,
    });
    conn.send(1, &Message::Control { json: &req }).unwrap();
    conn.send(0, &Message::Stdio { fd: 0, data: &[] }).unwrap();
    let mut out = String::new();
    loop {
        match conn.recv().unwrap().message {
            Message::Stdio { fd: 1, data } => out.push_str(&String::from_utf8_lossy(data)),
            Message::Stdio { .. } => {}
            Message::Control { json } => match control::from_json::<Reply>(json).unwrap() {
                Reply::Launched { .. } => {}
                done => return (done, out),
            },
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_processor_chooses_the_preloaded_library_and_the_user_a_program_runs_as() {
    let c = Cluster::start();
    let cluster = Cluster::cred();
    // The client's LD_PRELOAD and LEGO_* never reach the program.
    let (done, out) = launch(
        &c.processor.addr,
        &cluster,
        &[
            "sh",
            "-c",
            "echo \"[$LD_PRELOAD] [$LEGO_RUNTIME] [$LD_LIBRARY_PATH]\"; id -u",
        ],
        &[
            ("LD_PRELOAD", "/tmp/evil.so"),
            ("LEGO_RUNTIME", "/tmp/evil.so"),
            ("LD_LIBRARY_PATH", "/tmp/evil"),
            ("PATH", "/usr/bin:/bin"),
        ],
    );
    assert!(
        matches!(done, Reply::Exited { code: Some(0), .. }),
        "{done:?} {out}"
    );
    assert!(!out.contains("evil"), "{out}");
    assert!(out.contains("liblego_runtime.so"), "{out}");
    // The cluster's operators run as the daemon's user.
    assert!(out.trim_end().ends_with("\n0"), "{out}");
    // A user with no account on the host is refused.
    let ghost = cluster
        .derive(Identity::User("no-such-user-here".into()))
        .unwrap();
    let (done, _) = launch(&c.processor.addr, &ghost, &["true"], &[]);
    match done {
        Reply::Error { message } => assert!(message.contains("no local user"), "{message}"),
        other => panic!("{other:?}"),
    }
    // A user credential never runs as root.
    let root = cluster.derive(Identity::User("root".into())).unwrap();
    let (done, _) = launch(&c.processor.addr, &root, &["true"], &[]);
    match done {
        Reply::Error { message } => assert!(message.contains("would run as root"), "{message}"),
        other => panic!("{other:?}"),
    }
    // A user runs as their own uid: here nobody, who may not use
    // userfaultfd on this host, so lego's wrapper stops with that reason.
    let nobody = cluster.derive(Identity::User("nobody".into())).unwrap();
    let s = Tcp
        .connect(&c.processor.addr, Duration::from_secs(5))
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut conn = FramedConn::new(s);
    conn.client_handshake(Role::Client, "t", &nobody).unwrap();
    let req = control(&Request::Launch {
        argv: vec!["id".into(), "-u".into()],
        cwd: "/".into(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        excache_bytes: 16 << 20,
        summary: false,
        stats: false,
        vnode: None,
    });
    conn.send(1, &Message::Control { json: &req }).unwrap();
    let (mut out, mut err) = (String::new(), String::new());
    let end = loop {
        match conn.recv().unwrap().message {
            Message::Stdio { fd: 1, data } => out.push_str(&String::from_utf8_lossy(data)),
            Message::Stdio { fd: 2, data } => err.push_str(&String::from_utf8_lossy(data)),
            Message::Stdio { .. } => {}
            Message::Control { json } => match control::from_json::<Reply>(json).unwrap() {
                Reply::Launched { .. } => {}
                Reply::Exited { code, .. } => break Ok(code),
                Reply::Error { message } => break Err(message),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    };
    let uffd_for_all = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .is_ok_and(|v| v.trim() == "1");
    match end {
        Ok(Some(0)) => assert_eq!(out.trim(), "65534", "{err}"),
        Ok(code) => {
            assert!(!uffd_for_all, "{code:?} {err}");
            assert!(err.contains("userfaultfd"), "{code:?} {err}");
        }
        // The checkout may be where nobody can go: lego itself does not
        // start as nobody (as root it would have).
        Err(message) => assert!(message.contains("Permission denied"), "{message}"),
    }
}

#[test]
fn a_daemon_on_a_non_loopback_address_needs_a_credential_given() {
    let out = std::process::Command::new(lego())
        .args(["memory", "--listen", "0.0.0.0:0", "--capacity", "64M"])
        .env_remove("LEGO_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("not a loopback address") && err.contains("lego keygen"),
        "{err}"
    );
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

#[test]
fn frames_that_promise_much_and_send_little_cost_the_daemon_little() {
    let memory = start(&["memory", "--listen", "127.0.0.1:0", "--capacity", "64M"]);
    let before = rss(memory.child.id());
    // 100 connections, each a Hello header promising the largest body,
    // then silence.
    let conns: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut s = TcpStream::connect(&memory.addr).unwrap();
            let mut head = Vec::new();
            head.extend_from_slice(&(lego_protocol::MAX_BODY_BYTES as u32).to_le_bytes());
            head.extend_from_slice(&1u16.to_le_bytes());
            head.extend_from_slice(&0u64.to_le_bytes());
            head.extend_from_slice(b"LEGO");
            s.write_all(&head).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let grown = rss(memory.child.id()).saturating_sub(before);
    // Before: each allocated the promised 2 MiB at once (211 MB for 100).
    assert!(grown < 24 << 20, "grew {grown} bytes");
    drop(conns);
    let stats = lego_memory::query_stats(&memory.addr, &Cluster::cred()).unwrap();
    assert_eq!(stats.spaces, 0);
}

#[test]
fn a_huge_command_line_does_not_break_the_processors_heartbeat() {
    let c = Cluster::start();
    let cluster = Cluster::cred();
    // 600 KB in all (one argument may not exceed 128 KiB).
    let part = "x".repeat(100_000);
    let addr = c.processor.addr.clone();
    let runner = std::thread::spawn(move || {
        let mut argv = vec!["sh", "-c", "sleep 3", "sh"];
        argv.extend(std::iter::repeat_n(part.as_str(), 6));
        launch(&addr, &cluster, &argv, &[("PATH", "/usr/bin:/bin")])
    });
    // While it runs the processor heartbeats it, command line cut.
    assert!(
        wait_until(Duration::from_secs(10), || {
            let s = c.status();
            s.processes
                .iter()
                .any(|p| p.process.program.len() <= 256 && p.process.program.ends_with("..."))
                && s.components
                    .iter()
                    .all(|x| x.state == control::State::Alive)
        }),
        "{:?}",
        c.status()
    );
    let (done, _) = runner.join().unwrap();
    assert!(
        matches!(done, Reply::Exited { code: Some(0), .. }),
        "{done:?}"
    );
    let s = c.status();
    assert!(
        s.components
            .iter()
            .all(|x| x.state == control::State::Alive),
        "{s:?}"
    );
}

#[test]
fn status_into_a_closed_pipe_ends_quietly() {
    let memory = start(&["memory", "--listen", "127.0.0.1:0", "--capacity", "64M"]);
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; {} status --memory {} | true",
            lego().display(),
            memory.addr
        ))
        .env("LEGO_KEY", key())
        .output()
        .unwrap();
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}
