//! The lego storage component (LegoOS's storage monitor): vNodes' file
//! trees ([`tree`]) under one directory, served over the framed protocol
//! (`FsCall`/`FsReply`) by the storage daemon ([`StorageDaemon`],
//! `lego storage`), which registers with the global manager like the
//! other daemons. The client side is [`Client`]; [`fuse`] is the vNode
//! file system a processor host mounts over it. Still to come: the file
//! cache on memory daemons.
//!
//! Only the cluster credential may use a storage daemon: users reach their
//! vNode's files through the processor daemon that runs their programs.

#![deny(unsafe_code)]

pub mod fuse;
pub mod tree;
mod wire;

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use lego_protocol::{FsOp, Message, Role, MAX_FS_DATA};
use lego_transport::auth::{Credential, Identity};
use lego_transport::{ConnError, FramedConn, Listener, Stream, Tcp, Transport, TransportError};

pub use tree::{Attr, Kind, Space, Time, Tree};
pub use wire::DirEntry;

/// How long a new connection may take to say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A running storage daemon: the trees of the vNodes under `dir/vnodes`.
pub struct StorageDaemon {
    addr: String,
    dir: PathBuf,
    cred: Arc<Credential>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    membership: Option<lego_transport::Membership>,
    trees: Arc<Trees>,
}

/// The trees opened so far, by vNode id, and where their quotas come
/// from: the manager this daemon joined (its vNodes' `--storage-quota`).
#[derive(Default)]
struct Trees {
    open: Mutex<HashMap<u64, Arc<Tree>>>,
    manager: Mutex<Option<(String, Credential)>>,
    /// vNodes whose trees were removed (deleted vNodes).
    removed: Mutex<std::collections::HashSet<u64>>,
    /// Open trees whose quota the manager did not give yet, and when it
    /// was last asked (asked again every few seconds).
    unknown_quota: Mutex<HashMap<u64, std::time::Instant>>,
    counters: Counters,
}

/// File operations a storage daemon times, by kind (the `op` label).
const OPS: [&str; 4] = ["read", "write", "fsync", "meta"];

fn op_of(op: FsOp) -> usize {
    match op {
        FsOp::Read => 0,
        FsOp::Write => 1,
        FsOp::Fsync => 2,
        _ => 3,
    }
}

/// What a storage daemon counts for its metrics.
#[derive(Default)]
struct Counters {
    requests: [lego_metrics::Histogram; OPS.len()],
    bytes_read: lego_metrics::Counter,
    bytes_written: lego_metrics::Counter,
    /// Requests answered with an errno (ENOENT, ENOSPC, EACCES, ...).
    errors: lego_metrics::Counter,
}

impl Trees {
    /// vNode `vnode`'s quota, as its manager says (none without one).
    fn quota_of(&self, vnode: u64) -> Option<u64> {
        use lego_protocol::control::{Reply, Request};
        let (m, cred) = self
            .manager
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let mut c = lego_transport::ControlClient::connect(
            &m,
            "lego-storage",
            Duration::from_secs(5),
            &cred,
        )
        .ok()?;
        match c.call(&Request::Vnodes {
            names: vec![],
            vids: vec![vnode],
        }) {
            Ok(Reply::Vnodes { vnodes }) => vnodes
                .into_iter()
                .find(|v| v.vid == vnode)
                .map(|v| v.storage_quota),
            _ => None,
        }
    }
}

impl StorageDaemon {
    /// Binds `listen` and serves the trees under `dir` to the peers `cred`
    /// (the cluster credential) vouches for.
    pub fn start(listen: &str, dir: PathBuf, cred: Credential) -> Result<Self, String> {
        // The vNodes' files are theirs: no one else on this host reads them.
        let vnodes = dir.join("vnodes");
        std::fs::create_dir_all(&vnodes)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&vnodes, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|e| format!("cannot make {}: {e}", vnodes.display()))?;
        let listener = Tcp
            .listen(listen)
            .map_err(|e: TransportError| e.to_string())?;
        let addr = Listener::local_addr(&listener);
        let stop = Arc::new(AtomicBool::new(false));
        let cred = Arc::new(cred);
        let trees: Arc<Trees> = Arc::new(Trees::default());
        let accept = {
            let (cred, root, trees) = (cred.clone(), dir.join("vnodes"), trees.clone());
            lego_transport::serve_connections(listener, "lego-storage", stop.clone(), move |s| {
                serve_connection(s, &root, &trees, &cred)
            })
        };
        Ok(Self {
            addr,
            dir,
            cred,
            stop,
            accept: Some(accept),
            membership: None,
            trees,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// What builds its metrics at each scrape (`lego storage --metrics`).
    /// Labelled `daemon` with `name` (the address peers reach it at;
    /// default: where it listens).
    pub fn scraper(&self, name: Option<&str>) -> lego_metrics::http::ScrapeFn {
        let (trees, dir) = (self.trees.clone(), self.dir.clone());
        let addr = name.unwrap_or(&self.addr).to_string();
        Arc::new(move || scrape(&trees, &addr, &dir))
    }

    /// Free space of the storage directory's file system (one statvfs:
    /// nothing under it is walked).
    fn free_bytes(dir: &std::path::Path) -> u64 {
        rustix::fs::statvfs(dir).map_or(0, |s| s.f_bavail.saturating_mul(s.f_frsize))
    }

    /// Joins the cluster of the manager at `manager` as a storage daemon
    /// peers reach at `advertise` (default: the listening address), its
    /// capacity the free space of its directory; heartbeats until stopped.
    pub fn join(&mut self, manager: &str, advertise: Option<&str>) -> Result<u64, String> {
        let addr = advertise.unwrap_or(&self.addr).to_string();
        let vnodes = self.dir.join("vnodes");
        let member = lego_transport::Member::join(
            manager,
            (lego_protocol::control::Kind::Storage, &addr, ""),
            Self::free_bytes(&vnodes),
            &self.cred,
        )?;
        let id = member.id();
        *self.trees.manager.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((manager.to_string(), (*self.cred).clone()));
        self.membership = Some(member.keep_alive(self.stop.clone(), move || {
            lego_protocol::control::Request::Heartbeat {
                id: 0,
                key: String::new(),
                used_bytes: 0,
                load: 0,
                spaces: vec![],
                processes: vec![],
            }
        }));
        Ok(id)
    }

    /// Setting this flag stops the daemon: [`StorageDaemon::wait`] returns.
    pub fn stopper(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Serves until stopped, then leaves its cluster, if in one.
    pub fn wait(mut self) {
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(m) = self.membership.take() {
            m.leave();
        }
        let _ = Tcp.connect(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn serve_connection<S: Stream>(
    stream: S,
    root: &std::path::Path,
    trees: &Trees,
    cred: &Credential,
) {
    let peer = stream.peer();
    let mut conn = FramedConn::new(stream);
    // Logged there; nothing else to do with how it ended.
    let _ = lego_transport::run_connection(&peer, || {
        let who = conn.server_handshake(0, HELLO_TIMEOUT, cred)?;
        conn.be_patient(None)?;
        request_loop(&mut conn, root, trees, &who.identity)
    });
}

fn scrape(trees: &Trees, addr: &str, dir: &std::path::Path) -> lego_metrics::Scrape {
    use lego_metrics::labels;
    let mut m = lego_metrics::Scrape::new();
    let me = labels(&[("daemon", addr)]);
    m.gauge(
        "lego_storage_free_bytes",
        "Free space of the storage directory's file system.",
        me.clone(),
        StorageDaemon::free_bytes(dir) as f64,
    );
    let open: Vec<(u64, Arc<Tree>)> = lock(&trees.open)
        .iter()
        .map(|(&v, t)| (v, t.clone()))
        .collect();
    for (vid, t) in open {
        let l = labels(&[("daemon", addr), ("vid", &vid.to_string())]);
        m.gauge(
            "lego_storage_vnode_used_bytes",
            "Bytes a vNode's files take on disk.",
            l.clone(),
            t.used() as f64,
        );
        m.gauge(
            "lego_storage_vnode_quota_bytes",
            "A vNode's storage quota (0: none known).",
            l,
            t.quota() as f64,
        );
    }
    let c = &trees.counters;
    for (op, h) in OPS.iter().zip(&c.requests) {
        m.histogram(
            "lego_storage_request_seconds",
            "File operation service time, from the request read to its answer sent.",
            labels(&[("daemon", addr), ("op", op)]),
            &h.snapshot(),
        );
    }
    m.counters(
        &me,
        &[
            (
                "lego_storage_read_bytes",
                "File bytes read.",
                c.bytes_read.get(),
            ),
            (
                "lego_storage_written_bytes",
                "File bytes written.",
                c.bytes_written.get(),
            ),
            (
                "lego_storage_errors",
                "File operations answered with an error (ENOENT, ENOSPC, EACCES, ...).",
                c.errors.get(),
            ),
        ],
    );
    m
}

fn request_loop<S: Stream>(
    conn: &mut FramedConn<S>,
    root: &std::path::Path,
    trees: &Trees,
    who: &Identity,
) -> Result<(), ConnError> {
    let mut out = Vec::new();
    let mut refused = false;
    loop {
        let f = conn.recv()?;
        let started = std::time::Instant::now();
        let id = f.request_id;
        let timed = match &f.message {
            Message::FsCall { op, data, .. } => Some((op_of(*op), data.len() as u64)),
            _ => None,
        };
        let errno = match f.message {
            Message::FsCall { .. } if *who != Identity::Cluster => {
                // Once a connection: a user's every call is refused alike.
                if !std::mem::replace(&mut refused, true) {
                    tracing::warn!(peer = %conn.stream().peer(), %who, "file operations refused: only the cluster's components may make them");
                }
                libc_errno(rustix::io::Errno::ACCESS)
            }
            Message::FsCall {
                vnode,
                op,
                path,
                to,
                offset,
                len,
                mode,
                data,
            } => {
                out.clear();
                let r = match op {
                    // The daemon's (it needs the trees, not one tree).
                    FsOp::RemoveTree => remove_tree(root, trees, vnode),
                    _ => tree_of(root, trees, vnode).and_then(|t| {
                        wire::apply(&t, op, (path, to), (offset, len, mode), data, &mut out)
                    }),
                };
                match r {
                    Ok(()) => 0,
                    Err(e) => {
                        out.clear();
                        e.raw_os_error()
                            .unwrap_or(libc_errno(rustix::io::Errno::IO))
                    }
                }
            }
            other => {
                let message = format!("{} is not a request a storage daemon serves", other.name());
                conn.send(
                    id,
                    &Message::Error {
                        code: lego_protocol::ErrorCode::Invalid,
                        message: &message,
                    },
                )?;
                continue;
            }
        };
        conn.send(
            id,
            &Message::FsReply {
                errno: errno as u32,
                data: &out,
            },
        )?;
        if let Some((op, sent)) = timed {
            let c = &trees.counters;
            c.requests[op].observe(started.elapsed());
            match (errno, op) {
                (0, 0) => c.bytes_read.add(out.len() as u64),
                (0, 1) => c.bytes_written.add(sent),
                (0, _) => {}
                _ => c.errors.inc(),
            }
        }
    }
}

fn libc_errno(e: rustix::io::Errno) -> i32 {
    e.raw_os_error()
}

/// Removes vNode `vnode`'s tree, files and all; later calls for it fail
/// with `ESTALE`.
fn remove_tree(root: &std::path::Path, trees: &Trees, vnode: u64) -> std::io::Result<()> {
    lock(&trees.removed).insert(vnode);
    lock(&trees.open).remove(&vnode);
    match std::fs::remove_dir_all(root.join(vnode.to_string())) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// vNode `vnode`'s tree, opened (made) on first use, with its quota from
/// the manager.
fn tree_of(root: &std::path::Path, trees: &Trees, vnode: u64) -> std::io::Result<Arc<Tree>> {
    if lock(&trees.removed).contains(&vnode) {
        return Err(std::io::Error::from_raw_os_error(libc_errno(
            rustix::io::Errno::STALE,
        )));
    }
    let open = |t: &Trees| {
        t.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&vnode)
            .cloned()
    };
    let set_quota = |tree: &Tree| match trees.quota_of(vnode) {
        Some(q) => {
            tree.set_quota(q);
            lock(&trees.unknown_quota).remove(&vnode);
        }
        None if lock(&trees.manager).is_some() => {
            lock(&trees.unknown_quota).insert(vnode, std::time::Instant::now());
        }
        None => {}
    };
    if let Some(tree) = open(trees) {
        let ask = lock(&trees.unknown_quota)
            .get(&vnode)
            .is_some_and(|at| at.elapsed() > Duration::from_secs(5));
        if ask {
            set_quota(&tree);
        }
        return Ok(tree);
    }
    let tree = Arc::new(Tree::open(&root.join(vnode.to_string()))?);
    set_quota(&tree);
    let mut t = trees.open.lock().unwrap_or_else(|p| p.into_inner());
    Ok(t.entry(vnode).or_insert(tree).clone())
}

/// A connection to a storage daemon, for one vNode's tree.
pub struct Client {
    conn: FramedConn<TcpStream>,
    addr: String,
    vnode: u64,
    next_id: u64,
}

impl Client {
    pub fn connect(addr: &str, vnode: u64, cred: &Credential) -> Result<Self, ConnError> {
        Self::connect_with(addr, vnode, cred, Duration::from_secs(30))
    }

    /// A connection whose every call fails once the daemon leaves it
    /// unanswered for `timeout`.
    pub fn connect_with(
        addr: &str,
        vnode: u64,
        cred: &Credential,
        timeout: Duration,
    ) -> Result<Self, ConnError> {
        let s = Tcp
            .connect(addr, timeout.min(Duration::from_secs(5)))
            .map_err(ConnError::Connect)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let mut conn = FramedConn::new(s);
        conn.client_handshake(Role::Client, "lego-storage-client", cred)?;
        Ok(Self {
            conn,
            addr: addr.to_string(),
            vnode,
            next_id: 0,
        })
    }

    fn call(
        &mut self,
        op: FsOp,
        (path, to): (&str, &str),
        (offset, len, mode): (u64, u64, u32),
        data: &[u8],
    ) -> std::io::Result<Vec<u8>> {
        self.next_id += 1;
        let msg = Message::FsCall {
            vnode: self.vnode,
            op,
            path,
            to,
            offset,
            len,
            mode,
            data,
        };
        let io = |e: ConnError| std::io::Error::other(format!("storage daemon {}: {e}", self.addr));
        let f = self.conn.call(self.next_id, &msg).map_err(io)?;
        match f.message {
            Message::FsReply { errno: 0, data } => Ok(data.to_vec()),
            Message::FsReply { errno, .. } => Err(std::io::Error::from_raw_os_error(errno as i32)),
            other => Err(std::io::Error::other(format!(
                "storage daemon {} answered {}",
                self.addr,
                other.describe()
            ))),
        }
    }

    pub fn getattr(&mut self, path: &str) -> std::io::Result<Attr> {
        let d = self.call(FsOp::Getattr, (path, ""), (0, 0, 0), &[])?;
        wire::decode_attr(&d)
    }

    pub fn readdir(&mut self, path: &str) -> std::io::Result<Vec<DirEntry>> {
        let mut all = Vec::new();
        loop {
            let d = self.call(FsOp::Readdir, (path, ""), (all.len() as u64, 0, 0), &[])?;
            let (entries, more) = wire::decode_dir(&d)?;
            all.extend(entries);
            if !more {
                return Ok(all);
            }
        }
    }

    pub fn create(&mut self, path: &str, mode: u32) -> std::io::Result<()> {
        self.call(FsOp::Create, (path, ""), (0, 0, mode), &[])
            .map(drop)
    }

    pub fn mkdir(&mut self, path: &str, mode: u32) -> std::io::Result<()> {
        self.call(FsOp::Mkdir, (path, ""), (0, 0, mode), &[])
            .map(drop)
    }

    pub fn unlink(&mut self, path: &str) -> std::io::Result<()> {
        self.call(FsOp::Unlink, (path, ""), (0, 0, 0), &[])
            .map(drop)
    }

    pub fn rmdir(&mut self, path: &str) -> std::io::Result<()> {
        self.call(FsOp::Rmdir, (path, ""), (0, 0, 0), &[]).map(drop)
    }

    pub fn rename(&mut self, from: &str, to: &str) -> std::io::Result<()> {
        self.call(FsOp::Rename, (from, to), (0, 0, 0), &[])
            .map(drop)
    }

    pub fn symlink(&mut self, target: &str, path: &str) -> std::io::Result<()> {
        self.call(FsOp::Symlink, (path, target), (0, 0, 0), &[])
            .map(drop)
    }

    pub fn readlink(&mut self, path: &str) -> std::io::Result<String> {
        let d = self.call(FsOp::Readlink, (path, ""), (0, 0, 0), &[])?;
        Ok(String::from_utf8_lossy(&d).into_owned())
    }

    pub fn truncate(&mut self, path: &str, size: u64) -> std::io::Result<()> {
        self.call(FsOp::Truncate, (path, ""), (0, size, 0), &[])
            .map(drop)
    }

    /// Up to `len` bytes (at most [`MAX_FS_DATA`]) from `offset`.
    pub fn read(&mut self, path: &str, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let len = len.min(MAX_FS_DATA) as u64;
        self.call(FsOp::Read, (path, ""), (offset, len, 0), &[])
    }

    pub fn write(&mut self, path: &str, offset: u64, data: &[u8]) -> std::io::Result<()> {
        for (k, chunk) in data.chunks(MAX_FS_DATA).enumerate() {
            let at = offset
                .checked_add((k * MAX_FS_DATA) as u64)
                .ok_or_else(|| std::io::Error::from_raw_os_error(22))?;
            self.call(FsOp::Write, (path, ""), (at, 0, 0), chunk)?;
        }
        Ok(())
    }

    /// Returns once `path`'s data and its directory entry are on disk.
    pub fn fsync(&mut self, path: &str) -> std::io::Result<()> {
        self.call(FsOp::Fsync, (path, ""), (0, 0, 0), &[]).map(drop)
    }

    pub fn chmod(&mut self, path: &str, mode: u32) -> std::io::Result<()> {
        self.call(FsOp::Chmod, (path, ""), (0, 0, mode), &[])
            .map(drop)
    }

    pub fn utimens(&mut self, path: &str, atime: Time, mtime: Time) -> std::io::Result<()> {
        let (a, m) = (atime.to_wire(), mtime.to_wire());
        self.call(FsOp::Utimens, (path, ""), (a, m, 0), &[])
            .map(drop)
    }

    /// Removes the vNode's whole tree (it was deleted).
    pub fn remove_tree(&mut self) -> std::io::Result<()> {
        self.call(FsOp::RemoveTree, ("", ""), (0, 0, 0), &[])
            .map(drop)
    }

    pub fn statfs(&mut self) -> std::io::Result<Space> {
        let d = self.call(FsOp::Statfs, ("", ""), (0, 0, 0), &[])?;
        wire::decode_space(&d)
    }
}
