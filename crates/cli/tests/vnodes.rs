//! Programs in vNodes (issue 16) on network-namespace hosts: a manager, a
//! memory daemon, a storage daemon and processor daemons, each on its own
//! host; real programs (sqlite3, git, tar) run with `lego run --vnode`
//! and keep their files on the storage daemon.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::hosts::*;
use common::*;

const VHOSTS: [&str; 5] = ["mgr", "mem1", "store", "proc1", "proc2"];

/// The cluster: manager, memory, storage daemons started, processor
/// daemons not yet (see [`start_processor`]).
fn vnode_cluster() -> (Hosts, String, std::path::PathBuf) {
    let mut h = Hosts::new(&VHOSTS);
    let manager = format!("{}:{PORT}", h.ip(0));
    let state = tmp().join(format!("vnode-mgr-{}-{}", std::process::id(), unique()));
    let _ = std::fs::remove_dir_all(&state);
    start_manager(&mut h, &manager, &state, ("2s", "1"));
    start_memory(&mut h, 1, &manager, "256M");
    let dir = tmp().join(format!("vnode-store-{}-{}", std::process::id(), unique()));
    let _ = std::fs::remove_dir_all(&dir);
    let listen = format!("{}:{PORT}", h.ip(2));
    h.daemon(
        "store",
        &[
            "storage",
            "--listen",
            &listen,
            "--dir",
            dir.to_str().unwrap(),
            "--manager",
            &manager,
        ],
        "lego storage: serving",
    );
    (h, manager, dir)
}

/// Starts the processor daemon of host `proc{k}` (host index 2 + k).
fn start_processor(h: &mut Hosts, k: usize, manager: &str) -> usize {
    start_processor_with(h, k, manager, &[])
}

fn start_processor_with(h: &mut Hosts, k: usize, manager: &str, env: &[(&str, &str)]) -> usize {
    let listen = format!("{}:{PORT}", h.ip(2 + k));
    h.daemon_with(
        &format!("proc{k}"),
        &[
            "processor",
            "--listen",
            &listen,
            "--manager",
            manager,
            "--excache",
            "256M",
        ],
        env,
        "lego processor: serving",
    )
}

fn lego_on(h: &Hosts, manager: &str, args: &[&str]) -> Output {
    h.cmd("mgr")
        .arg(lego())
        .env("LEGO_KEY", key())
        .args(args)
        .args(["--manager", manager])
        .output()
        .unwrap()
}

fn create_vnode(h: &Hosts, manager: &str, name: &str) {
    let out = lego_on(h, manager, &["vnode", "create", name]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// `lego run --vnode NAME -- sh -c SCRIPT`, with `input` on its stdin.
fn in_vnode(h: &Hosts, manager: &str, name: &str, script: &str, input: &[u8]) -> Output {
    let mut child = h
        .cmd("mgr")
        .arg(lego())
        .env("LEGO_KEY", key())
        .args([
            "run",
            "--excache",
            "32M",
            "--manager",
            manager,
            "--vnode",
            name,
            "--",
            "sh",
            "-c",
            script,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// `lego run --vnode NAME -- python3 -c PROGRAM` in the background (as the
/// cluster's operator), its input closed, and its output's lines.
fn python_in_vnode(
    h: &Hosts,
    manager: &str,
    name: &str,
    program: &str,
) -> (
    std::process::Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
) {
    let mut child = h
        .cmd("mgr")
        .arg(lego())
        .env("LEGO_KEY", key())
        .args(["run", "-q", "--excache", "32M", "--manager", manager])
        .args(["--vnode", name, "--", "python3", "-c", program])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    (child, lines)
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        text(&out.stderr),
        text(&out.stdout)
    );
    text(&out.stdout)
}

fn ran_on(out: &Output) -> String {
    text(&out.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("lego: ran on processor daemon "))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn sqlite_data_written_on_one_processor_is_read_on_another() {
    let (mut h, manager, dir) = vnode_cluster();
    let p1 = start_processor(&mut h, 1, &manager);
    create_vnode(&h, &manager, "db");
    let out = in_vnode(
        &h,
        &manager,
        "db",
        "pwd; echo \"$LEGO_VNODE_ROOT $LEGO_VNODE\"; \
         sqlite3 shop.db 'create table items(id integer primary key, name text, n integer);' \
         \"insert into items(name, n) select 'item' || value, value * 7 from generate_series(1, 5000);\" \
         'update items set n = n + 1 where id % 3 = 0;' 'delete from items where id % 10 = 0;' \
         'select count(*), sum(n) from items;'",
        b"",
    );
    let first = ok(&out, "sqlite3 writes");
    let on1 = ran_on(&out);
    let lines: Vec<&str> = first.lines().collect();
    assert_eq!(lines[0], "/run/lego/vnode", "starts at the vNode's root");
    assert_eq!(lines[1], "/run/lego/vnode db");
    let result = lines[2];
    // The same through plain sqlite3 here: the vNode changes nothing.
    let plain = Command::new("sqlite3")
        .args([
            ":memory:",
            "create table items(id integer primary key, name text, n integer);",
            "insert into items(name, n) select 'item' || value, value * 7 from generate_series(1, 5000);",
            "update items set n = n + 1 where id % 3 = 0;",
            "delete from items where id % 10 = 0;",
            "select count(*), sum(n) from items;",
        ])
        .output()
        .unwrap();
    assert_eq!(result, text(&plain.stdout).trim());
    // The file is on the storage host, not on the processor's.
    assert!(std::fs::read_dir(dir.join("vnodes"))
        .unwrap()
        .flatten()
        .any(|v| v.path().join("shop.db").is_file()));
    // Another processor daemon; the first one gone.
    start_processor(&mut h, 2, &manager);
    let c = &mut h.children[p1];
    c.kill().unwrap();
    c.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let out = in_vnode(
        &h,
        &manager,
        "db",
        "sqlite3 shop.db 'select count(*), sum(n) from items;' 'pragma integrity_check;'",
        b"",
    );
    let again = ok(&out, "sqlite3 reads");
    assert_ne!(ran_on(&out), on1, "ran on the other processor daemon");
    assert_eq!(again, format!("{result}\nok\n"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn git_commits_and_fscks_and_tar_round_trips_byte_identical() {
    let (mut h, manager, dir) = vnode_cluster();
    start_processor(&mut h, 1, &manager);
    create_vnode(&h, &manager, "dev");
    let out = in_vnode(
        &h,
        &manager,
        "dev",
        "set -e; git init -q repo; cd repo; git config user.email dev@lego; git config user.name dev; \
         for i in 1 2 3; do seq $i 40000 > f$i.txt; mkdir -p d$i; echo $i > d$i/x; git add .; git commit -qm c$i; done; \
         git mv f1.txt moved.txt; git commit -qm move; git gc -q; git fsck --full --strict; \
         git log --oneline | wc -l; git status --porcelain | wc -l",
        b"",
    );
    assert_eq!(
        ok(&out, "git").split_whitespace().collect::<Vec<_>>(),
        ["4", "0"]
    );
    // A tree with modes, a symlink, an empty directory and a large file,
    // in through tar and out again.
    let src = tmp().join(format!("vnode-tar-{}-{}", std::process::id(), unique()));
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(src.join("t/empty")).unwrap();
    std::fs::create_dir_all(src.join("t/sub/deeper")).unwrap();
    let big: Vec<u8> = (0..5_000_000u32)
        .map(|k| (k.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(src.join("t/sub/big.bin"), &big).unwrap();
    std::fs::write(src.join("t/sub/deeper/run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::write(src.join("t/small"), b"x").unwrap();
    std::os::unix::fs::symlink("sub/big.bin", src.join("t/link")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        src.join("t/sub/deeper/run.sh"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    let tar_in = Command::new("tar")
        .args(["cf", "-", "-C", src.to_str().unwrap(), "t"])
        .output()
        .unwrap();
    assert!(tar_in.status.success());
    ok(
        &in_vnode(&h, &manager, "dev", "tar xf - && ls t", &tar_in.stdout),
        "tar in",
    );
    let out = in_vnode(&h, &manager, "dev", "tar cf - t", b"");
    ok(&out, "tar out");
    let back = tmp().join(format!("vnode-back-{}-{}", std::process::id(), unique()));
    let _ = std::fs::remove_dir_all(&back);
    std::fs::create_dir_all(&back).unwrap();
    let mut x = Command::new("tar")
        .args(["xf", "-", "-C", back.to_str().unwrap()])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    x.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    assert!(x.wait().unwrap().success());
    let diff = Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(src.join("t"))
        .arg(back.join("t"))
        .output()
        .unwrap();
    assert!(diff.status.success(), "{}", text(&diff.stdout));
    assert_eq!(std::fs::read(back.join("t/sub/big.bin")).unwrap(), big);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&back.join("t/sub/deeper/run.sh")), 0o750);
    assert_eq!(
        std::fs::read_link(back.join("t/link")).unwrap(),
        std::path::Path::new("sub/big.bin")
    );
    for d in [&src, &back, &dir] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// vNode a's program: a secret file, Unix sockets in its /tmp and in the
/// abstract namespace, a TCP listener on its vIP; it answers each
/// connection with the secret file's descriptor, and ends when its input
/// does.
const HOLDER: &str = r#"
import os, socket, sys, threading
vip = os.environ["LEGO_VNODE_IP"]
with open("secret", "w") as f:
    f.write("top-secret-a\n")
os.mkdir("private")
socks = []
for addr in ["/tmp/a.sock", "\0lego-vnode-a"]:
    s = socket.socket(socket.AF_UNIX)
    s.bind(addr)
    s.listen()
    socks.append(s)
t = socket.socket()
t.bind((vip, 9999))
t.listen()
socket.create_connection((vip, 9999)).close()
def serve(s):
    while True:
        c, _ = s.accept()
        fd = os.open("secret", os.O_RDONLY)
        socket.send_fds(c, [b"x"], [fd])
        c.close()
for s in socks:
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("ready", vip, flush=True)
sys.stdin.read()
"#;

/// vNode b's program: every way it could reach a's files or sockets.
const PROBE: &str = r#"
import os, socket, sys
a_vip = sys.argv[1]
def attempt(name, f):
    try:
        got = f()
        print(name, "REACHED", repr(got)[:60])
    except Exception as e:
        print(name, "refused", type(e).__name__)
root = os.environ["LEGO_VNODE_ROOT"]
# a's marker, never whole in this program's own command line.
marker = "lego-vnode-" + "a"
print("listing", sorted(os.listdir(root)))
attempt("dotdot", lambda: open(root + "/../vnode/secret").read())
attempt("dotdot-deep", lambda: open("../../../run/lego/vnode/secret").read())
os.symlink("/proc/1/root" + root + "/secret", "via-proc")
attempt("symlink", lambda: open("via-proc").read())
attempt("hardlink", lambda: os.link(root + "/../vnode/secret", "mine"))
pids = [p for p in os.listdir("/proc") if p.isdigit()]
def other_procs():
    out = []
    for p in pids:
        try:
            with open("/proc/%s/cmdline" % p, "rb") as f:
                if marker.encode() in f.read():
                    out.append(p)
        except OSError:
            pass
    if out:
        return out
    raise PermissionError("none")
attempt("processes", other_procs)
for addr in ["/tmp/a.sock", "\0" + marker]:
    def fd_of(addr=addr):
        s = socket.socket(socket.AF_UNIX)
        s.connect(addr)
        _, fds, _, _ = socket.recv_fds(s, 1, 1)
        return os.read(fds[0], 100)
    attempt("unix " + repr(addr[:4]), fd_of)
attempt("vip", lambda: socket.create_connection((a_vip, 9999), timeout=2))
print("done")
"#;

/// Lets users use userfaultfd (`vm.unprivileged_userfaultfd=1`) while it
/// lives; the setting before comes back on drop, also on failure.
struct UserFaults(String);

impl UserFaults {
    const KNOB: &'static str = "/proc/sys/vm/unprivileged_userfaultfd";

    fn allow() -> Self {
        let before = std::fs::read_to_string(Self::KNOB).unwrap();
        std::fs::write(Self::KNOB, "1").unwrap();
        UserFaults(before.trim().to_string())
    }
}

impl Drop for UserFaults {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::KNOB, &self.0);
    }
}

#[test]
fn two_vnodes_cannot_reach_each_others_files_sockets_or_vip() {
    let _faults = UserFaults::allow();
    let (mut h, manager, dir) = vnode_cluster();
    start_processor(&mut h, 1, &manager);
    for name in ["a", "b"] {
        let out = lego_on(
            &h,
            &manager,
            &["vnode", "create", name, "--owner", "nobody"],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    create_vnode(&h, &manager, "ops");
    // As a user (nobody, in both vNodes: the same uid).
    let user_key = tmp().join(format!("vnode-nobody-{}-{}", std::process::id(), unique()));
    let _ = std::fs::remove_file(&user_key);
    let out = Command::new(lego())
        .args(["keygen", "--user", "nobody", "--from"])
        .arg(key())
        .arg("--out")
        .arg(&user_key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let as_nobody = |vnode: &str, args: &[&str]| {
        let mut c = h.cmd("mgr");
        c.arg(lego())
            .env("LEGO_KEY", &user_key)
            .args(["run", "-q", "--excache", "32M", "--manager", &manager])
            .args(["--vnode", vnode, "--"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    // Not in a vNode nobody does not own.
    let out = as_nobody("ops", &["true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("is not nobody's"),
        "{}",
        text(&out.stderr)
    );
    let mut holder = as_nobody("a", &["python3", "-c", HOLDER, "lego-vnode-a"])
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(holder.stdout.take().unwrap()));
    let Some(Ok(ready)) = lines.next() else {
        let end = holder.wait_with_output().unwrap();
        panic!("vNode a's program: {}", text(&end.stderr));
    };
    let a_vip = ready.strip_prefix("ready ").expect(&ready).to_string();
    let probe = as_nobody("b", &["python3", "-c", PROBE, &a_vip])
        .output()
        .unwrap();
    let report = ok(&probe, "the probe");
    assert!(report.contains("\ndone"), "{report}");
    assert!(!report.contains("REACHED"), "{report}");
    assert!(report.starts_with("listing []"), "{report}");
    // Not even root on the processor's host, from outside the vNode,
    // reads a's files through its processes' /proc/PID/root: the file
    // system answers only its own mount namespace.
    let pids = Command::new("pgrep")
        .args(["-f", "lego-vnode-a"])
        .output()
        .unwrap();
    let mut tried = 0;
    for pid in text(&pids.stdout).split_whitespace() {
        let p = format!("/proc/{pid}/root/run/lego/vnode/secret");
        if let Err(e) = std::fs::read(&p) {
            if e.raw_os_error() == Some(13) {
                tried += 1;
                continue;
            }
        } else {
            panic!("{p} was read from outside the vNode");
        }
    }
    assert!(tried > 0, "a's program not found: {}", text(&pids.stdout));
    drop(holder.stdin.take());
    let end = holder.wait_with_output().unwrap();
    assert!(end.status.success(), "{}", text(&end.stderr));
    let _ = std::fs::remove_file(&user_key);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes and fsyncs a file every 50 ms; says how long the first failing
/// fsync took, and its error.
const SYNCER: &str = r#"
import os, sys, time
fd = os.open("log", os.O_WRONLY | os.O_CREAT, 0o644)
print("writing", flush=True)
while True:
    os.write(fd, b"x" * 4096)
    t = time.monotonic()
    try:
        os.fsync(fd)
    except OSError as e:
        print("failed after %.1f s: errno %d" % (time.monotonic() - t, e.errno), flush=True)
        sys.exit(0)
    time.sleep(0.05)
"#;

#[test]
fn an_unreachable_storage_daemon_is_eio_after_the_timeout_not_a_hang() {
    let (mut h, manager, dir) = vnode_cluster();
    start_processor_with(&mut h, 1, &manager, &[("LEGO_STORAGE_TIMEOUT_MS", "1500")]);
    create_vnode(&h, &manager, "w");
    let (child, mut lines) = python_in_vnode(&h, &manager, "w", SYNCER);
    assert_eq!(lines.next().unwrap().unwrap(), "writing");
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The storage daemon stops answering (its process stopped).
    let store = h.children[2].id().to_string();
    let pids = Command::new("pgrep").args(["-P", &store]).output().unwrap();
    let daemon = text(&pids.stdout)
        .split_whitespace()
        .next()
        .map(str::to_string);
    let daemon = daemon.unwrap_or(store);
    sh(&["kill", "-STOP", &daemon]);
    let said = lines.next();
    sh(&["kill", "-CONT", &daemon]);
    let said = said.unwrap().unwrap();
    let took: f64 = said
        .strip_prefix("failed after ")
        .and_then(|r| r.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    assert!(said.ends_with("errno 5"), "EIO: {said}");
    assert!((1.0..=6.0).contains(&took), "{said}");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_vnode_past_its_storage_quota_gets_enospc_and_room_comes_back() {
    let (mut h, manager, dir) = vnode_cluster();
    start_processor(&mut h, 1, &manager);
    let out = lego_on(
        &h,
        &manager,
        &["vnode", "create", "small", "--storage-quota", "2M"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = in_vnode(
        &h,
        &manager,
        "small",
        "dd if=/dev/zero of=fits bs=64k count=16 conv=fsync status=none && echo fits; \
         if dd if=/dev/zero of=big bs=64k count=64 conv=fsync status=none; then echo big-written; fi; \
         rm -f big; dd if=/dev/zero of=again bs=64k count=8 conv=fsync status=none && echo again",
        b"",
    );
    let said = text(&out.stdout);
    assert_eq!(said, "fits\nagain\n", "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("No space left on device"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Listens on the vNode's vIP, says so, answers two connections with the
/// caller's address.
const LISTENER: &str = r#"
import os, socket
s = socket.socket()
s.bind((os.environ["LEGO_VNODE_IP"], 7777))
s.listen()
print("listening", flush=True)
for _ in range(2):
    c, (peer, _) = s.accept()
    c.sendall(b"hello " + peer.encode() + b"\n")
    c.close()
"#;

/// Connects to argv[1]:argv[2]: what it was told, or the error number.
const CONNECT: &str = "import socket, sys\n\
try:\n    print(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).recv(100).decode(), end='')\n\
except OSError as e:\n    print('refused', e.errno)";

#[test]
fn vnodes_on_one_host_reach_each_other_only_when_connected() {
    let (mut h, manager, dir) = vnode_cluster();
    start_processor(&mut h, 1, &manager);
    create_vnode(&h, &manager, "svc");
    create_vnode(&h, &manager, "other");
    // Three connections answered: a run of svc, a run of other that began
    // before the two were connected, and one after.
    let listener = LISTENER.replace("range(2)", "range(3)");
    let (server, mut lines) = python_in_vnode(&h, &manager, "svc", &listener);
    assert_eq!(lines.next().unwrap().unwrap(), "listening");
    let vip_of = |name: &str| {
        let out = lego_on(&h, &manager, &["vnode", "list", "--json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .map(|v| v["vip"].as_str().unwrap().to_string())
            .unwrap()
    };
    let (vip, other_vip) = (vip_of("svc"), vip_of("other"));
    let connect = |from: &str, addr: &str, port: &str| {
        let out = in_vnode(
            &h,
            &manager,
            from,
            &format!("python3 -c \"{CONNECT}\" {addr} {port}"),
            b"",
        );
        ok(&out, from)
    };
    // Not connected: unreachable at once (ENETUNREACH), not a timeout.
    assert_eq!(connect("other", &vip, "7777"), "refused 101\n");
    // Another run of the same vNode shares its vIP and reaches it.
    assert_eq!(connect("svc", &vip, "7777"), format!("hello {vip}\n"));
    // Connected at the manager, the other reaches it, from its own vIP:
    // a run already going (within a second or so) and a new one.
    let waiting = format!(
        "import socket, time\n\
         for _ in range(150):\n    \
             try:\n        \
                 print(socket.create_connection(('{vip}', 7777), timeout=1).recv(100).decode(), end='', flush=True)\n        \
                 break\n    \
             except OSError:\n        \
                 time.sleep(0.1)\n"
    );
    let (waiter, mut waited) = python_in_vnode(&h, &manager, "other", &waiting);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = lego_on(&h, &manager, &["vnode", "connect", "svc", "other"]);
    ok(&out, "vnode connect");
    assert_eq!(
        waited.next().unwrap().unwrap(),
        format!("hello {other_vip}")
    );
    assert!(waiter.wait_with_output().unwrap().status.success());
    let listed = lego_on(&h, &manager, &["vnode", "list"]);
    assert!(
        ok(&listed, "vnode list")
            .lines()
            .any(|l| l.starts_with("other") && l.ends_with("svc")),
        "{}",
        text(&listed.stdout)
    );
    assert_eq!(
        connect("other", &vip, "7777"),
        format!("hello {other_vip}\n")
    );
    let end = server.wait_with_output().unwrap();
    assert!(end.status.success(), "{}", text(&end.stderr));
    // Disconnected: unreachable again; and no vNode reaches the processor
    // host's own address (its daemon listens there).
    let out = lego_on(&h, &manager, &["vnode", "disconnect", "other", "svc"]);
    ok(&out, "vnode disconnect");
    let (server, mut lines) = python_in_vnode(&h, &manager, "svc", LISTENER);
    assert_eq!(lines.next().unwrap().unwrap(), "listening");
    assert_eq!(connect("other", &vip, "7777"), "refused 101\n");
    let proc_host = h.ip(3).to_string();
    assert_eq!(
        connect("svc", &proc_host, &PORT.to_string()),
        "refused 101\n"
    );
    for bad in [["svc", "svc"], ["svc", "nope"]] {
        let out = lego_on(&h, &manager, &["vnode", "connect", bad[0], bad[1]]);
        assert!(!out.status.success(), "{bad:?}");
    }
    for _ in 0..2 {
        assert_eq!(connect("svc", &vip, "7777"), format!("hello {vip}\n"));
    }
    let end = server.wait_with_output().unwrap();
    assert!(end.status.success(), "{}", text(&end.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_file_changed_elsewhere_is_read_anew_on_the_next_open() {
    let (mut h, manager, dir) = vnode_cluster();
    start_processor(&mut h, 1, &manager);
    create_vnode(&h, &manager, "c");
    // One run (one mount): it reads the file, waits, reads it again.
    let mut run = h
        .cmd("mgr")
        .arg(lego())
        .env("LEGO_KEY", key())
        .args(["run", "-q", "--excache", "32M", "--manager", &manager])
        .args(["--vnode", "c", "--", "sh", "-c"])
        .arg("echo one > x; cat x; cat x; read go; cat x; read go; cat x")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = run.stdin.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(run.stdout.take().unwrap()));
    let mut next = || lines.next().unwrap().unwrap();
    assert_eq!((next(), next()), ("one".to_string(), "one".to_string()));
    // Unchanged: read again (from this host's cache).
    stdin.write_all(b"\n").unwrap();
    assert_eq!(next(), "one");
    // Another writer (here: on the storage host itself), same size.
    let tree = std::fs::read_dir(dir.join("vnodes"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("x").is_file())
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(tree.join("x"), "two\n").unwrap();
    // The kernel's attributes expire, then the next open reads anew.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    stdin.write_all(b"\n").unwrap();
    assert_eq!(next(), "two");
    drop(stdin);
    assert!(run.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unknown_vnode_or_no_processor_daemon_is_a_clear_error() {
    let (mut h, manager, dir) = vnode_cluster();
    // No processor daemon yet: vNodes run on processor daemons.
    create_vnode(&h, &manager, "here");
    let out = in_vnode(&h, &manager, "here", "true", b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("no processor daemon is alive"),
        "{}",
        text(&out.stderr)
    );
    start_processor(&mut h, 1, &manager);
    let out = in_vnode(&h, &manager, "nowhere", "true", b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("no vNode 'nowhere'"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
