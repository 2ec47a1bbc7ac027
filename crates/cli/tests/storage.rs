//! The storage daemon (issue 16, first part): vNodes' files served over
//! the network by `lego storage`, a real daemon on loopback, through the
//! real client. Durable after fsync across kill -9; one vNode's files out
//! of another's reach; users refused.

mod common;

use std::path::PathBuf;

use common::*;
use lego_storage::{Client, Kind};
use lego_transport::auth::{Credential, Identity};

fn cluster_cred() -> Credential {
    Credential::load(key()).unwrap()
}

fn storage_dir(name: &str) -> PathBuf {
    let d = tmp().join(format!("storage-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn start(dir: &std::path::Path) -> Daemon {
    Daemon::start_with(
        &[
            "storage",
            "--listen",
            "127.0.0.1:0",
            "--dir",
            dir.to_str().unwrap(),
        ],
        &[],
    )
}

#[test]
fn files_are_served_over_the_network() {
    let dir = storage_dir("ops");
    let d = start(&dir);
    let mut c = Client::connect(&d.addr, 7, &cluster_cred()).unwrap();
    c.mkdir("db", 0o755).unwrap();
    c.create("db/data.bin", 0o600).unwrap();
    // Larger than one frame: written in pieces.
    let big: Vec<u8> = (0..3_000_000u32).map(|k| (k % 251) as u8).collect();
    c.write("db/data.bin", 0, &big).unwrap();
    let mut back = Vec::new();
    while back.len() < big.len() {
        let part = c.read("db/data.bin", back.len() as u64, 1 << 20).unwrap();
        assert!(!part.is_empty());
        back.extend(part);
    }
    assert_eq!(back, big);
    let a = c.getattr("db/data.bin").unwrap();
    assert_eq!((a.kind, a.size, a.mode), (Kind::File, 3_000_000, 0o600));
    c.rename("db/data.bin", "db/moved.bin").unwrap();
    c.symlink("moved.bin", "db/link").unwrap();
    assert_eq!(c.readlink("db/link").unwrap(), "moved.bin");
    let names: Vec<String> = c
        .readdir("db")
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["link", "moved.bin"]);
    c.truncate("db/moved.bin", 10).unwrap();
    assert_eq!(c.getattr("db/moved.bin").unwrap().size, 10);
    assert!(c.statfs().unwrap().free_bytes > 0);
    // Errors come back as the errno, and the connection goes on.
    let e = c.read("db/none", 0, 10).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(2), "{e}");
    assert!(c.rmdir("db").is_err(), "not empty");
    c.unlink("db/link").unwrap();
    c.unlink("db/moved.bin").unwrap();
    c.rmdir("db").unwrap();
    assert!(c.readdir("").unwrap().is_empty());
    drop(d);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn what_was_fsynced_survives_a_kill_9_twenty_times_out_of_twenty() {
    let dir = storage_dir("durable");
    for run in 0..20u32 {
        let mut d = start(&dir);
        let mut c = Client::connect(&d.addr, 1, &cluster_cred()).unwrap();
        let name = format!("f{run}");
        let data: Vec<u8> = (0..200_000u32).map(|k| (k ^ run) as u8).collect();
        c.create(&name, 0o644).unwrap();
        c.write(&name, 0, &data).unwrap();
        c.fsync(&name).unwrap();
        d.child.kill().unwrap();
        d.child.wait().unwrap();
        let d = start(&dir);
        let mut c = Client::connect(&d.addr, 1, &cluster_cred()).unwrap();
        assert_eq!(c.read(&name, 0, 1 << 20).unwrap(), data, "run {run}");
        // Every earlier run's file too.
        assert_eq!(c.readdir("").unwrap().len(), run as usize + 1);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_vnode_cannot_reach_another_ones_files_and_users_are_refused() {
    let dir = storage_dir("apart");
    let d = start(&dir);
    let mut one = Client::connect(&d.addr, 1, &cluster_cred()).unwrap();
    one.create("secret", 0o600).unwrap();
    one.write("secret", 0, b"vnode one").unwrap();
    let mut two = Client::connect(&d.addr, 2, &cluster_cred()).unwrap();
    assert!(two.readdir("").unwrap().is_empty());
    two.symlink("../1/secret", "s").unwrap();
    two.symlink("/", "root").unwrap();
    for path in ["../1/secret", "s", "root/etc/passwd", "/etc/passwd"] {
        assert!(two.read(path, 0, 100).is_err(), "{path} was read");
        assert!(two.write(path, 0, b"x").is_err(), "{path} was written");
    }
    assert!(two.rename("s", "../1/s").is_err());
    assert_eq!(one.read("secret", 0, 100).unwrap(), b"vnode one");
    // A user's credential gets nothing from a storage daemon.
    let alice = cluster_cred()
        .derive(Identity::User("alice".into()))
        .unwrap();
    let mut user = Client::connect(&d.addr, 1, &alice).unwrap();
    let e = user.read("secret", 0, 100).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(13), "{e}");
    drop(d);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn vnode_cmd(manager: &str, args: &[&str]) -> std::process::Output {
    lego_cmd()
        .arg("vnode")
        .args(args)
        .args(["--manager", manager])
        .output()
        .unwrap()
}

fn vnodes(manager: &str) -> serde_json::Value {
    let out = vnode_cmd(manager, &["list", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn vnodes_and_their_links_are_placed_and_survive_a_manager_restart() {
    let state = storage_dir("mgr-state");
    let dir = storage_dir("gsm");
    let manager_args = |state: &std::path::Path| {
        vec![
            "manager".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--state".into(),
            state.to_str().unwrap().into(),
        ]
    };
    let args = manager_args(&state);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut m = Daemon::start_with(&args, &[]);
    let s = Daemon::start_with(
        &[
            "storage",
            "--listen",
            "127.0.0.1:0",
            "--dir",
            dir.to_str().unwrap(),
            "--manager",
            &m.addr,
        ],
        &[],
    );
    let out = vnode_cmd(&m.addr, &["create", "web", "--storage-quota", "64M"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("10.77.0.1"),
        "{}",
        text(&out.stdout)
    );
    let out = vnode_cmd(&m.addr, &["create", "db"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let again = vnode_cmd(&m.addr, &["create", "web"]);
    assert_eq!(again.status.code(), Some(125));
    assert!(
        text(&again.stderr).contains("exists"),
        "{}",
        text(&again.stderr)
    );
    let out = vnode_cmd(&m.addr, &["connect", "web", "db"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = vnodes(&m.addr);
    assert_eq!(before.as_array().unwrap().len(), 2);
    assert_eq!(before[0]["peers"], serde_json::json!(["web"]));
    assert_eq!(before[1]["vip"], "10.77.0.1");
    assert_eq!(before[1]["storage_addr"], s.addr.as_str());
    // kill -9 of the manager, started again on its state: the same vNodes.
    let addr = m.addr.clone();
    m.child.kill().unwrap();
    m.child.wait().unwrap();
    let args = [
        "manager",
        "--listen",
        &addr,
        "--state",
        state.to_str().unwrap(),
    ];
    let m2 = Daemon::start_with(&args, &[]);
    assert_eq!(vnodes(&m2.addr), before);
    // Deleting db removes its files from the storage daemon, and only
    // its.
    let vid = |k: usize| before[k]["vid"].as_u64().unwrap();
    assert_eq!(before[0]["name"], "db");
    for k in [0, 1] {
        let mut c = Client::connect(&s.addr, vid(k), &cluster_cred()).unwrap();
        c.create("f", 0o644).unwrap();
        c.write("f", 0, b"data").unwrap();
    }
    let tree = |k: usize| dir.join("vnodes").join(vid(k).to_string());
    assert!(tree(0).join("f").is_file());
    let out = vnode_cmd(&m2.addr, &["delete", "db"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("files are removed"),
        "{}",
        text(&out.stderr)
    );
    let after = vnodes(&m2.addr);
    assert_eq!(after.as_array().unwrap().len(), 1);
    assert_eq!(after[0]["peers"], serde_json::json!([]), "no peer deleted");
    assert!(!tree(0).exists(), "db's files are gone");
    assert!(tree(1).join("f").is_file(), "web's stay");
    let mut late = Client::connect(&s.addr, vid(0), &cluster_cred()).unwrap();
    assert_eq!(
        late.getattr("f").unwrap_err().raw_os_error(),
        Some(116),
        "ESTALE"
    );
    assert!(!tree(0).exists(), "not made again");
    drop((m2, s));
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_dir_all(&dir);
}
