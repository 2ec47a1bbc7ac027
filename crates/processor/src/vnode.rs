//! Programs in a vNode. A processor daemon asked to run a program in vNode
//! NAME looks the vNode up at the global manager and starts
//! `lego vnode-host` (this module's [`host`]) as itself; that process
//!
//! 1. joins the vNode's network namespace on this host, which the daemon
//!    holds and links to its other vNodes' ([`crate::vnet`]: the vIP on
//!    `eth0`), and enters a mount namespace of its own (the host's mounts
//!    stay as they are, and nothing mounted here shows on the host);
//! 2. mounts private, empty `/tmp`, `/var/tmp` and `/dev/shm` (so no
//!    socket or file there is shared with another vNode);
//! 3. mounts the vNode's file system (FUSE, [`lego_storage::fuse`]) at
//!    [`VNODE_ROOT`], served from the storage daemon that holds the
//!    vNode's tree, and usable only from this mount namespace;
//! 4. starts the program's `lego run --local` there, as the program's
//!    user, in [`VNODE_ROOT`] with `LEGO_VNODE_ROOT`, `LEGO_VNODE` (its
//!    name) and `LEGO_VNODE_IP` set, in a PID namespace of its own (whose
//!    init, [`init`], mounts its /proc), forwards signals to it, and ends
//!    as it ends (the namespaces and the mount end with it).
//!
//! The cluster credential (to reach the storage daemon) comes in the
//! environment variable [`CRED_ENV`], which the program never sees.

use std::process::Command;
use std::time::Duration;

use lego_protocol::control::{Reply, Request, VnodeInfo};
use lego_transport::auth::Credential;
use lego_transport::ControlClient;

/// Where a vNode's files are, for its programs.
pub const VNODE_ROOT: &str = "/run/lego/vnode";

/// The variable carrying the cluster credential to `lego vnode-host`.
pub const CRED_ENV: &str = "LEGO_VNODE_CRED";

/// The whole environment `lego vnode-host` (root) runs with, besides the
/// credential: nothing of the user's chooses what it runs.
pub const SAFE_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// The program's environment for `lego vnode-host`, in a file in a
/// directory only this daemon's user can reach (removed on drop).
pub struct EnvFile {
    dir: std::path::PathBuf,
}

impl EnvFile {
    pub fn new(env: &[(String, String)], slot: u32) -> Result<Self, String> {
        let this = Self {
            dir: crate::daemon::private_dir("env", slot)?,
        };
        let mut text = Vec::new();
        for (k, v) in env {
            text.extend_from_slice(k.as_bytes());
            text.push(b'=');
            text.extend_from_slice(v.as_bytes());
            text.push(0);
        }
        std::fs::write(this.path(), text)
            .map_err(|e| format!("cannot write {}: {e}", this.path().display()))?;
        Ok(this)
    }

    pub fn path(&self) -> std::path::PathBuf {
        self.dir.join("env")
    }

    /// The environment in the file at `path`.
    pub fn read(path: &std::path::Path) -> Result<Vec<(String, String)>, String> {
        let text =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Ok(text
            .split(|&b| b == 0)
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })
            .collect())
    }
}

impl Drop for EnvFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How long a file operation waits for the storage daemon before the
/// program gets `EIO` (`LEGO_STORAGE_TIMEOUT_MS`).
pub const STORAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The manager's records of the vNodes named `names` (those that exist).
pub fn records(
    manager: &str,
    names: Vec<String>,
    cred: &Credential,
) -> Result<Vec<VnodeInfo>, String> {
    let mut c = ControlClient::connect(manager, "lego-processor", Duration::from_secs(5), cred)
        .map_err(|e| format!("cannot reach the global manager at {manager}: {e}"))?;
    match c.call(&Request::Vnodes {
        names,
        vids: vec![],
    }) {
        Ok(Reply::Vnodes { vnodes }) => Ok(vnodes),
        Ok(Reply::Error { message }) => Err(message),
        Ok(other) => Err(format!("the manager answered {other:?}")),
        Err(e) => Err(format!("the global manager at {manager}: {e}")),
    }
}

/// vNode `name` as the manager at `manager` knows it, and the records of
/// `also` (the vNodes with programs on this host) with it.
pub fn look_up(
    manager: &str,
    name: &str,
    also: Vec<String>,
    cred: &Credential,
) -> Result<(VnodeInfo, Vec<VnodeInfo>), String> {
    let mut names = also;
    names.push(name.to_string());
    let vnodes = records(manager, names, cred)?;
    match vnodes.iter().find(|v| v.name == name) {
        Some(v) => Ok((v.clone(), vnodes)),
        None => Err(format!("no vNode '{name}' (lego vnode create makes one)")),
    }
}

/// What `lego vnode-host` is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    pub vid: u64,
    pub vip: String,
    pub storage: String,
    /// The program's user (none: this process's).
    pub user: Option<(u32, u32)>,
    pub timeout: Duration,
    /// The vNode's network namespace on this host, to join.
    pub netns: std::path::PathBuf,
}

impl Spec {
    pub fn new(v: &VnodeInfo, user: Option<(u32, u32)>, netns: std::path::PathBuf) -> Self {
        let timeout = std::env::var("LEGO_STORAGE_TIMEOUT_MS")
            .ok()
            .and_then(|t| t.parse().ok())
            .map_or(STORAGE_TIMEOUT, Duration::from_millis);
        Self {
            name: v.name.clone(),
            vid: v.vid,
            vip: v.vip.clone(),
            storage: v.storage_addr.clone(),
            user,
            timeout,
            netns,
        }
    }

    /// As `lego vnode-host` arguments (before `--` and the command).
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--name".into(),
            self.name.clone(),
            "--vid".into(),
            self.vid.to_string(),
            "--vip".into(),
            self.vip.clone(),
            "--storage".into(),
            self.storage.clone(),
            "--timeout-ms".into(),
            self.timeout.as_millis().to_string(),
            "--netns".into(),
            self.netns.to_string_lossy().into_owned(),
        ];
        if let Some((uid, gid)) = self.user {
            a.extend([
                "--uid".into(),
                uid.to_string(),
                "--gid".into(),
                gid.to_string(),
            ]);
        }
        a
    }
}

/// Moves this thread into the vNode's network namespace at `path` (held
/// by the processor daemon, [`crate::vnet`]).
fn join_vnode_network(path: &std::path::Path) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| {
        format!(
            "cannot open the vNode's network namespace {}: {e}",
            path.display()
        )
    })?;
    lego_sys::ns::enter_network(&f).map_err(|e| {
        format!(
            "cannot enter the vNode's network namespace (this needs root, or CAP_SYS_ADMIN): {e}"
        )
    })
}

/// Where the connection broker listens, inside the vNode's mount
/// namespace.
pub const BROKER_SOCKET: &str = "/run/lego/connect.sock";

/// Which addresses the broker connects to: the manager's and its
/// components' (asked again, at most once a second, for one it does not
/// know: a daemon added since).
struct Cluster {
    manager: String,
    cred: Credential,
    known: std::sync::Mutex<(Vec<String>, Option<std::time::Instant>)>,
}

impl Cluster {
    fn allows(&self, addr: &str) -> bool {
        if self.manager.split(',').any(|m| m.trim() == addr) {
            return true;
        }
        let mut k = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if k.0.iter().any(|a| a == addr) {
            return true;
        }
        if k.1.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return false;
        }
        k.1 = Some(std::time::Instant::now());
        let status = ControlClient::connect(
            &self.manager,
            "lego-vnode-host",
            Duration::from_secs(5),
            &self.cred,
        )
        .ok()
        .and_then(|mut c| c.call(&Request::Status).ok());
        if let Some(Reply::Status(s)) = status {
            k.0 = s.components.into_iter().map(|c| c.addr).collect();
        }
        k.0.iter().any(|a| a == addr)
    }
}

/// Runs `command` with `env` in the vNode `spec` names (see the module
/// docs), its connections to the cluster of the manager at `manager` made
/// by a broker, and ends this process as the command ends. Errors before
/// the command starts are returned.
///
/// Call it while the process has one thread.
pub fn host(
    spec: &Spec,
    (manager, job_dir): (&str, Option<&std::path::Path>),
    command: &[String],
    env: &[(String, String)],
) -> Result<(), String> {
    let cred = std::env::var(CRED_ENV)
        .map_err(|_| format!("no cluster credential in {CRED_ENV}"))
        .and_then(|t| Credential::from_text(&t))?;
    let Some((program, args)) = command.split_first() else {
        return Err("no command to run".into());
    };
    if !std::path::Path::new("/dev/fuse").exists() {
        return Err("no /dev/fuse on this processor host: vNode file systems need FUSE".into());
    }
    let host_net = std::fs::File::open("/proc/self/ns/net")
        .map_err(|e| format!("cannot open this host's network namespace: {e}"))?;
    std::fs::create_dir_all("/run/lego").map_err(|e| format!("cannot make /run/lego: {e}"))?;
    let needs_root = |e: std::io::Error| {
        format!("cannot make the vNode's namespaces (this needs root, or CAP_SYS_ADMIN): {e}")
    };
    join_vnode_network(&spec.netns)?;
    lego_sys::ns::enter_own_mounts().map_err(needs_root)?;
    // The job's own directory (its credential, its statistics) stays
    // where it is under the private /tmp.
    let job = match job_dir {
        Some(d) => {
            let f =
                std::fs::File::open(d).map_err(|e| format!("cannot open {}: {e}", d.display()))?;
            Some((d.to_path_buf(), f))
        }
        None => None,
    };
    for dir in ["/tmp", "/var/tmp", "/dev/shm", "/run/lego"] {
        if std::path::Path::new(dir).is_dir() {
            lego_sys::ns::mount_tmpfs(dir)
                .map_err(|e| format!("cannot mount a private {dir}: {e}"))?;
        }
    }
    if let Some((dir, f)) = &job {
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        let src = format!("/proc/self/fd/{}", f.as_raw_fd());
        lego_sys::ns::bind_mount(&src, &dir.to_string_lossy())
            .map_err(|e| format!("cannot bring {} into the vNode: {e}", dir.display()))?;
    }
    drop(job);
    std::fs::create_dir_all(VNODE_ROOT).map_err(|e| format!("cannot make {VNODE_ROOT}: {e}"))?;
    let ns = std::fs::read_link("/proc/self/ns/mnt")
        .map_err(|e| format!("cannot name this mount namespace: {e}"))?;
    // Callers are looked up in this /proc, which the vNode's own will
    // cover.
    let proc = std::fs::File::open("/proc").map_err(|e| format!("cannot open /proc: {e}"))?;
    let broker = std::os::unix::net::UnixListener::bind(BROKER_SOCKET)
        .map_err(|e| format!("cannot listen on {BROKER_SOCKET}: {e}"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(BROKER_SOCKET, std::fs::Permissions::from_mode(0o666));
    }
    let (uid, gid) = spec.user.unwrap_or_else(|| {
        let me = lego_sys::process::effective_uid();
        (me, me)
    });
    // The file system's and the broker's threads live in the host's
    // network namespace (and this mount namespace); the program in the
    // vNode's.
    let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let (spec2, manager) = (spec.clone(), manager.to_string());
    let started = std::thread::Builder::new()
        .name("lego-vnode-fs".into())
        .spawn(move || {
            let fail = |e: String| {
                let _ = tx.send(Err(e));
            };
            if let Err(e) = lego_sys::ns::enter_network(&host_net) {
                return fail(format!(
                    "cannot return to the host's network namespace: {e}"
                ));
            }
            let fs = lego_storage::fuse::VnodeFs::new(
                &spec2.storage,
                spec2.vid,
                cred.clone(),
                spec2.timeout,
            )
            .owned_by(uid, gid)
            .only_namespace(ns.to_string_lossy().into_owned(), proc);
            if let Err(e) = fs.check() {
                return fail(format!(
                    "vNode '{}': its storage daemon at {} does not answer: {e}",
                    spec2.name, spec2.storage
                ));
            }
            let path = std::path::Path::new(VNODE_ROOT);
            let _mounted = match lego_storage::fuse::mount(fs, path, &spec2.name) {
                Ok(m) => m,
                Err(e) => {
                    return fail(format!(
                        "cannot mount vNode '{}' at {VNODE_ROOT}: {e}",
                        spec2.name
                    ))
                }
            };
            let _ = tx.send(Ok(()));
            let cluster = Cluster {
                manager,
                cred,
                known: std::sync::Mutex::new((Vec::new(), None)),
            };
            lego_transport::broker::serve(
                broker,
                std::sync::Arc::new(move |a: &str| cluster.allows(a)),
            );
        });
    if let Err(e) = started {
        return Err(format!("cannot start the vNode's file system thread: {e}"));
    }
    rx.recv()
        .map_err(|_| "the vNode's file system thread ended".to_string())??;
    // Its processes see only each other: their own PID namespace, whose
    // init (`lego vnode-init`, [`init`]) mounts its /proc and starts the
    // command as the user.
    lego_sys::ns::children_in_new_pid_namespace()
        .map_err(|e| format!("cannot make the vNode's PID namespace: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find lego itself: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("vnode-init");
    if let Some((uid, gid)) = spec.user {
        cmd.args(["--uid", &uid.to_string(), "--gid", &gid.to_string()]);
    }
    cmd.arg("--")
        .arg(program)
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("LEGO_VNODE_ROOT", VNODE_ROOT)
        .env("LEGO_VNODE", &spec.name)
        .env("LEGO_VNODE_IP", &spec.vip)
        .env(lego_transport::broker::BROKER_ENV, BROKER_SOCKET)
        .current_dir(VNODE_ROOT);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    lego_sys::process::forward_signals_to(child.id() as i32);
    match child.wait() {
        // The namespaces, the mount with them, end with this process.
        Ok(s) => lego_sys::process::exit_like(s),
        Err(e) => Err(format!("waiting for {program} failed: {e}")),
    }
}

/// PID 1 of a vNode's PID namespace: mounts its /proc, runs `command` as
/// `user`, passes signals on, and ends as the command ends (the kernel
/// then ends every other process of the namespace).
pub fn init(user: Option<(u32, u32)>, command: &[String]) -> Result<(), String> {
    let Some((program, args)) = command.split_first() else {
        return Err("no command to run".into());
    };
    lego_sys::ns::die_with_parent()
        .map_err(|e| format!("cannot tie the vNode's init to its host: {e}"))?;
    lego_sys::ns::mount_proc().map_err(|e| format!("cannot mount the vNode's /proc: {e}"))?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some((uid, gid)) = user {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(gid);
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let main = child.id() as i32;
    lego_sys::process::forward_signals_to(main);
    // Every process of the namespace whose parent ended is this one's
    // child: reaped here, until the program itself ends.
    loop {
        match lego_sys::ns::wait_any() {
            Ok((pid, status)) if pid == main => {
                use std::os::unix::process::ExitStatusExt;
                lego_sys::process::exit_like(std::process::ExitStatus::from_raw(status))
            }
            Ok(_) => {}
            Err(e) => return Err(format!("waiting for {program} failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_goes_through_its_arguments() {
        let v = VnodeInfo {
            name: "web".into(),
            vid: 3,
            vip: "10.77.0.3".into(),
            storage: 9,
            storage_addr: "10.0.0.2:7500".into(),
            storage_quota: 1 << 30,
            owner: String::new(),
            peers: vec![],
        };
        let s = Spec::new(&v, Some((1000, 1000)), "/proc/1/fd/3".into());
        let a = s.to_args();
        assert_eq!(a[..4], ["--name", "web", "--vid", "3"]);
        assert!(a.ends_with(&["--uid".into(), "1000".into(), "--gid".into(), "1000".into()]));
        assert!(a.contains(&"10.0.0.2:7500".to_string()));
        assert!(a.windows(2).any(|w| w == ["--netns", "/proc/1/fd/3"]));
    }
}
