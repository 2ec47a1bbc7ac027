//! A vNode's file system on a processor host: a FUSE file system
//! (`fuser`) whose every operation is an `FsCall` to the storage daemon
//! holding the vNode's tree. It is mounted inside the vNode's own mount
//! namespace (see `lego_processor::vnode`), so nothing outside the vNode
//! sees it.
//!
//! The storage protocol names files by path; FUSE names them by inode
//! number. [`Nodes`] keeps the numbers this mount has handed out and the
//! path each stands for; a rename moves the paths beneath it, and a file
//! unlinked or replaced while open is first renamed to a hidden name and
//! removed when its last handle closes (what POSIX programs such as
//! SQLite expect of an open file).
//!
//! Only processes of the vNode may use it: each request's caller must be
//! in the mount namespace the file system was mounted from. A process of
//! another vNode reaching it through `/proc/PID/root`, or through a file
//! descriptor passed to it, is refused with `EACCES`.
//!
//! Attributes and names are cached by the kernel for [`TTL`]; file data
//! cached by this host stays across opens only while the file's size and
//! modification time are what they were at the last open here, so a
//! program that opens a file after another processor host closed it sees
//! what was written there (close-to-open consistency, as NFS gives).
//! Locks are the kernel's, per processor host.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use lego_protocol::MAX_FS_DATA;
use lego_transport::auth::Credential;

use crate::{Attr, Client, Kind, Time};

/// How long the kernel may keep names and attributes.
pub const TTL: Duration = Duration::from_secs(1);

/// The root's inode number (FUSE's).
const ROOT: u64 = 1;

/// One inode number handed out.
struct Node {
    /// Relative to the tree's root; empty for the root.
    path: String,
    /// Lookups the kernel holds (forgotten at zero, unless open).
    lookups: u64,
    /// Open handles.
    open: u32,
    /// Renamed away by an unlink or a replacing rename while open: removed
    /// at the last close.
    hidden: bool,
    /// Size and modification time at the last open here: what the pages
    /// this host caches were read under.
    cached: Option<(u64, i128)>,
}

/// The inode numbers this mount handed out, and their paths.
struct Nodes {
    by_ino: HashMap<u64, Node>,
    by_path: HashMap<String, u64>,
    next: u64,
    /// For hidden names: this mount's random id, and a count.
    mount_id: u64,
    hidden_seq: u64,
}

impl Nodes {
    fn new() -> Self {
        let mut n = Self {
            by_ino: HashMap::new(),
            by_path: HashMap::new(),
            next: ROOT + 1,
            mount_id: {
                use std::hash::{BuildHasher, Hasher};
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u32(std::process::id());
                h.finish()
            },
            hidden_seq: 0,
        };
        n.by_ino.insert(
            ROOT,
            Node {
                path: String::new(),
                lookups: 1,
                open: 0,
                hidden: false,
                cached: None,
            },
        );
        n.by_path.insert(String::new(), ROOT);
        n
    }

    /// `ino`'s path; `ESTALE` once its file is gone.
    fn path(&self, ino: u64) -> Result<String, Errno> {
        match self.by_ino.get(&ino) {
            Some(n) if n.path.starts_with('\0') => Err(Errno::ESTALE),
            Some(n) => Ok(n.path.clone()),
            None => Err(Errno::ENOENT),
        }
    }

    /// The number for `path`, one more lookup held by the kernel.
    fn looked_up(&mut self, path: &str) -> u64 {
        if let Some(&ino) = self.by_path.get(path) {
            if let Some(n) = self.by_ino.get_mut(&ino) {
                n.lookups += 1;
            }
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.by_ino.insert(
            ino,
            Node {
                path: path.to_string(),
                lookups: 1,
                open: 0,
                hidden: false,
                cached: None,
            },
        );
        self.by_path.insert(path.to_string(), ino);
        ino
    }

    /// Drops `ino` once nothing holds it.
    fn release_if_unused(&mut self, ino: u64) {
        let unused = matches!(self.by_ino.get(&ino), Some(n) if n.lookups == 0 && n.open == 0);
        if unused && ino != ROOT {
            if let Some(n) = self.by_ino.remove(&ino) {
                if self.by_path.get(&n.path) == Some(&ino) {
                    self.by_path.remove(&n.path);
                }
            }
        }
    }

    /// `from` (and everything beneath it) is now called `to`; whatever
    /// was called `to` is gone from the names.
    fn moved(&mut self, from: &str, to: &str) {
        self.gone(to);
        let prefix = format!("{from}/");
        let moving: Vec<(String, u64)> = self
            .by_path
            .iter()
            .filter(|(p, _)| *p == from || p.starts_with(&prefix))
            .map(|(p, &i)| (p.clone(), i))
            .collect();
        for (p, ino) in moving {
            self.by_path.remove(&p);
            let new = format!("{to}{}", &p[from.len()..]);
            if let Some(n) = self.by_ino.get_mut(&ino) {
                n.path = new.clone();
            }
            self.by_path.insert(new, ino);
        }
    }

    /// The file called `path` is gone: its number, if any, names nothing
    /// from now on (`ESTALE`).
    fn gone(&mut self, path: &str) {
        if let Some(ino) = self.by_path.remove(path) {
            if let Some(n) = self.by_ino.get_mut(&ino) {
                n.path = format!("\0gone{ino}");
            }
        }
    }

    /// A name no program uses, next to `path`.
    fn hidden_name(&mut self, path: &str) -> String {
        self.hidden_seq += 1;
        let dir = match path.rfind('/') {
            Some(i) => &path[..=i],
            None => "",
        };
        format!(
            "{dir}.lego-hidden-{:016x}-{}",
            self.mount_id, self.hidden_seq
        )
    }
}

/// The vNode file system (see the module docs).
pub struct VnodeFs {
    storage: String,
    vnode: u64,
    cred: Credential,
    timeout: Duration,
    /// Idle connections to the storage daemon.
    idle: Mutex<Vec<Client>>,
    nodes: Mutex<Nodes>,
    /// Owner shown for every file (the vNode's program's user).
    owner: (u32, u32),
    /// The mount namespace whose processes may use the file system
    /// (`mnt:[N]`), and the procfs (of the PID namespace FUSE names
    /// callers in) to look callers up in; `None`: any.
    namespace: Option<(String, std::fs::File)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An I/O error as the program sees it: the storage daemon's errno, or
/// `EIO` when the daemon could not be reached or did not answer in time.
fn errno_of(e: &io::Error) -> Errno {
    match e.raw_os_error() {
        Some(n) => Errno::from_i32(n),
        None => Errno::EIO,
    }
}

fn join(dir: &str, name: &OsStr) -> Result<String, Errno> {
    let name = name.to_str().ok_or(Errno::EINVAL)?;
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(Errno::EINVAL);
    }
    Ok(if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    })
}

/// Answers a lookup or a making of a file: its attributes, or the error.
fn answer_entry(reply: ReplyEntry, r: Result<FileAttr, Errno>) {
    match r {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Other => FileType::NamedPipe,
    }
}

fn to_time(t: TimeOrNow) -> Time {
    match t {
        TimeOrNow::Now => Time::Now,
        TimeOrNow::SpecificTime(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Time::At(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
            Err(e) => Time::At(-i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX)),
        },
    }
}

impl VnodeFs {
    /// The file system of vNode `vnode`, whose tree is on the storage
    /// daemon at `storage`; requests time out after `timeout` (`EIO`).
    pub fn new(storage: &str, vnode: u64, cred: Credential, timeout: Duration) -> Self {
        Self {
            storage: storage.to_string(),
            vnode,
            cred,
            timeout,
            idle: Mutex::new(Vec::new()),
            nodes: Mutex::new(Nodes::new()),
            owner: (0, 0),
            namespace: None,
        }
    }

    /// Files show as owned by `uid`:`gid`.
    pub fn owned_by(mut self, uid: u32, gid: u32) -> Self {
        self.owner = (uid, gid);
        self
    }

    /// Only processes in the mount namespace `ns` (as `/proc/PID/ns/mnt`
    /// names it) may use the file system; `proc` is the open `/proc` of
    /// this process's PID namespace (where FUSE's caller PIDs are).
    pub fn only_namespace(mut self, ns: String, proc: std::fs::File) -> Self {
        self.namespace = Some((ns, proc));
        self
    }

    /// Checks the storage daemon answers (before mounting).
    pub fn check(&self) -> io::Result<()> {
        self.with(|c| c.getattr("")).map(drop)
    }

    /// Runs `f` on an idle connection (a new one if none); a connection
    /// that failed is dropped.
    fn with<T>(&self, f: impl FnOnce(&mut Client) -> io::Result<T>) -> io::Result<T> {
        let idle = lock(&self.idle).pop();
        let mut c = match idle {
            Some(c) => c,
            None => Client::connect_with(&self.storage, self.vnode, &self.cred, self.timeout)
                .map_err(|e| {
                    tracing::warn!(storage = %self.storage, error = %e, "cannot reach the vNode's storage daemon");
                    io::Error::other(e.to_string())
                })?,
        };
        let r = f(&mut c);
        match &r {
            Err(e) if e.raw_os_error().is_none() => {
                tracing::warn!(storage = %self.storage, error = %e, "the vNode's storage daemon failed a request");
            }
            _ => lock(&self.idle).push(c),
        }
        r
    }

    fn call<T>(&self, f: impl FnOnce(&mut Client) -> io::Result<T>) -> Result<T, Errno> {
        self.with(f).map_err(|e| errno_of(&e))
    }

    /// Whether the request's caller belongs to the vNode.
    fn allowed(&self, req: &Request) -> Result<(), Errno> {
        let Some((ns, proc)) = &self.namespace else {
            return Ok(());
        };
        let pid = req.pid();
        if pid == 0 {
            // The kernel's own (writeback, a release after the caller
            // exited).
            return Ok(());
        }
        match rustix::fs::readlinkat(proc, format!("{pid}/ns/mnt"), Vec::new()) {
            Ok(p) if p.as_bytes() == ns.as_bytes() => Ok(()),
            _ => Err(Errno::EACCES),
        }
    }

    fn file_attr(&self, ino: u64, a: &Attr) -> FileAttr {
        let mtime = if a.mtime_ns >= 0 {
            UNIX_EPOCH + Duration::from_nanos(u64::try_from(a.mtime_ns).unwrap_or(u64::MAX))
        } else {
            UNIX_EPOCH
        };
        FileAttr {
            ino: INodeNo(ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: file_type(a.kind),
            perm: (a.mode & 0o7777) as u16,
            nlink: u32::try_from(a.nlink).unwrap_or(u32::MAX),
            uid: self.owner.0,
            gid: self.owner.1,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        }
    }

    /// Looks `path` up at the storage daemon and hands out its number.
    fn entry(&self, path: &str) -> Result<FileAttr, Errno> {
        let a = self.call(|c| c.getattr(path))?;
        let ino = lock(&self.nodes).looked_up(path);
        Ok(self.file_attr(ino, &a))
    }

    fn path(&self, ino: INodeNo) -> Result<String, Errno> {
        lock(&self.nodes).path(ino.0)
    }

    /// `ino`'s path, for a caller the vNode allows.
    fn path_for(&self, req: &Request, ino: INodeNo) -> Result<String, Errno> {
        self.allowed(req)?;
        self.path(ino)
    }

    /// The path of `name` in directory `parent`, for a caller the vNode
    /// allows.
    fn child(&self, req: &Request, parent: INodeNo, name: &OsStr) -> Result<String, Errno> {
        self.allowed(req)?;
        join(&self.path(parent)?, name)
    }

    /// If `path` names a file open here, renames it to a hidden name so
    /// its handles keep their data; the caller then removes or replaces
    /// the name. Decided and done under the lock a last close takes, so
    /// the close either comes first (nothing to hide) or finds the file
    /// hidden (and removes it). Returns the file's number and its hidden
    /// name.
    fn hide_if_open(&self, path: &str) -> Result<Option<(u64, String)>, Errno> {
        let mut n = lock(&self.nodes);
        let Some(ino) = n.by_path.get(path).copied() else {
            return Ok(None);
        };
        if n.by_ino.get(&ino).is_none_or(|x| x.open == 0) {
            return Ok(None);
        }
        let name = n.hidden_name(path);
        self.call(|c| c.rename(path, &name))?;
        n.moved(path, &name);
        if let Some(x) = n.by_ino.get_mut(&ino) {
            x.hidden = true;
        }
        Ok(Some((ino, name)))
    }

    /// Undoes [`VnodeFs::hide_if_open`] (what it made way for failed).
    fn unhide(&self, (ino, name): (u64, String), path: &str) {
        let mut n = lock(&self.nodes);
        if self.call(|c| c.rename(&name, path)).is_ok() {
            n.moved(&name, path);
            if let Some(x) = n.by_ino.get_mut(&ino) {
                x.hidden = false;
            }
        }
    }

    /// A file's or directory's `fsync`: answered once it is on the
    /// storage daemon's disk.
    fn sync(&self, req: &Request, ino: INodeNo, reply: ReplyEmpty) {
        let r = self
            .path_for(req, ino)
            .and_then(|p| self.call(|c| c.fsync(&p)));
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opened(&self, ino: u64) {
        if let Some(n) = lock(&self.nodes).by_ino.get_mut(&ino) {
            n.open += 1;
        }
    }

    fn do_setattr(
        &self,
        path: &str,
        (mode, uid, gid, size): (Option<u32>, Option<u32>, Option<u32>, Option<u64>),
        (atime, mtime): (Option<TimeOrNow>, Option<TimeOrNow>),
    ) -> Result<Attr, Errno> {
        // Files are the vNode's user's: ownership cannot be given away.
        if uid.is_some_and(|u| u != self.owner.0) || gid.is_some_and(|g| g != self.owner.1) {
            return Err(Errno::EPERM);
        }
        if let Some(size) = size {
            self.call(|c| c.truncate(path, size))?;
        }
        if let Some(mode) = mode {
            self.call(|c| c.chmod(path, mode))?;
        }
        if atime.is_some() || mtime.is_some() {
            let a = atime.map_or(Time::Omit, to_time);
            let m = mtime.map_or(Time::Omit, to_time);
            self.call(|c| c.utimens(path, a, m))?;
        }
        self.call(|c| c.getattr(path))
    }
}

impl Filesystem for VnodeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Large requests: one round trip per MiB.
        let _ = config.set_max_write(MAX_FS_DATA as u32);
        let _ = config.set_max_readahead(MAX_FS_DATA as u32);
        // Small writes gather in this host's page cache and go to the
        // storage daemon in large ones: at fsync, at close (FUSE flushes
        // before it answers close), or when the kernel writes back.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_WRITEBACK_CACHE);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.child(req, parent, name).and_then(|p| self.entry(&p));
        answer_entry(reply, r)
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut n = lock(&self.nodes);
        if let Some(x) = n.by_ino.get_mut(&ino.0) {
            x.lookups = x.lookups.saturating_sub(nlookup);
        }
        n.release_if_unused(ino.0);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = self
            .path_for(req, ino)
            .and_then(|p| self.call(|c| c.getattr(&p)));
        match r {
            Ok(a) => reply.attr(&TTL, &self.file_attr(ino.0, &a)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self
            .path_for(req, ino)
            .and_then(|p| self.do_setattr(&p, (mode, uid, gid, size), (atime, mtime)));
        match r {
            Ok(a) => reply.attr(&TTL, &self.file_attr(ino.0, &a)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self
            .path_for(req, ino)
            .and_then(|p| self.call(|c| c.readlink(&p)));
        match r {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        // Regular files only: devices, FIFOs and sockets stay local.
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        let r = self.child(req, parent, name).and_then(|p| {
            self.call(|c| c.create(&p, mode & !umask & 0o7777))?;
            self.entry(&p)
        });
        answer_entry(reply, r)
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.child(req, parent, name).and_then(|p| {
            self.call(|c| c.mkdir(&p, mode & !umask & 0o7777))?;
            self.entry(&p)
        });
        answer_entry(reply, r)
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.child(req, parent, name).and_then(|p| {
            if self.hide_if_open(&p)?.is_some() {
                return Ok(());
            }
            self.call(|c| c.unlink(&p))?;
            lock(&self.nodes).gone(&p);
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.child(req, parent, name).and_then(|p| {
            self.call(|c| c.rmdir(&p))?;
            lock(&self.nodes).gone(&p);
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let r = self.child(req, parent, link_name).and_then(|p| {
            let target = target.to_str().ok_or(Errno::EINVAL)?;
            self.call(|c| c.symlink(target, &p))?;
            self.entry(&p)
        });
        answer_entry(reply, r)
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !flags.is_empty() {
            // RENAME_NOREPLACE and RENAME_EXCHANGE are not offered.
            return reply.error(Errno::EINVAL);
        }
        let r = self.allowed(req).and_then(|()| {
            let from = join(&self.path(parent)?, name)?;
            let to = join(&self.path(newparent)?, newname)?;
            let hidden = self.hide_if_open(&to)?;
            if let Err(e) = self.call(|c| c.rename(&from, &to)) {
                // The file it was to replace stays.
                if let Some(h) = hidden {
                    self.unhide(h, &to);
                }
                return Err(e);
            }
            lock(&self.nodes).moved(&from, &to);
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = self
            .path_for(req, ino)
            .and_then(|p| self.call(|c| c.getattr(&p)));
        match r {
            Ok(a) => {
                // The pages this host cached stay only if the file is as
                // it was at the last open here (size and modification
                // time); else they are dropped (close-to-open
                // consistency).
                let now = (a.size, a.mtime_ns);
                let keep = {
                    let mut n = lock(&self.nodes);
                    match n.by_ino.get_mut(&ino.0) {
                        Some(x) => {
                            x.open += 1;
                            x.cached.replace(now) == Some(now)
                        }
                        None => false,
                    }
                };
                let flags = if keep {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                reply.opened(FileHandle(0), flags);
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = self.path_for(req, ino).and_then(|p| {
            let want = size as usize;
            let mut data = self.call(|c| c.read(&p, offset, want))?;
            // Larger than one call: the rest in more calls.
            while data.len() < want {
                let more =
                    self.call(|c| c.read(&p, offset + data.len() as u64, want - data.len()))?;
                if more.is_empty() {
                    break;
                }
                data.extend(more);
            }
            Ok(data)
        });
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self
            .path_for(req, ino)
            .and_then(|p| self.call(|c| c.write(&p, offset, data)));
        match r {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Every write is at the storage daemon already.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let remove = {
            let mut n = lock(&self.nodes);
            match n.by_ino.get_mut(&ino.0) {
                Some(x) => {
                    x.open = x.open.saturating_sub(1);
                    (x.open == 0 && x.hidden).then(|| x.path.clone())
                }
                None => None,
            }
        };
        if let Some(p) = remove {
            if let Err(e) = self.call(|c| c.unlink(&p)) {
                tracing::warn!(path = %p, error = ?e, "cannot remove a hidden file");
            }
            let mut n = lock(&self.nodes);
            n.gone(&p);
            if let Some(x) = n.by_ino.get_mut(&ino.0) {
                x.hidden = false;
                if x.path == p {
                    x.path = format!("\0gone{}", ino.0);
                }
            }
        }
        lock(&self.nodes).release_if_unused(ino.0);
        reply.ok();
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(req, ino, reply);
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(req, ino, reply);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        // No hard links (programs such as git fall back to a rename).
        reply.error(Errno::EPERM);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        // No extended attributes: the kernel stops asking.
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.path_for(req, ino) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.path_for(req, ino).and_then(|p| {
            let entries = self.call(|c| c.readdir(&p))?;
            Ok((p, entries))
        });
        let (dir, entries) = match r {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let known = |path: &str| lock(&self.nodes).by_path.get(path).copied();
        let mut all = vec![
            (ino.0, FileType::Directory, ".".to_string()),
            (ino.0, FileType::Directory, "..".to_string()),
        ];
        for e in entries {
            if e.name.starts_with(".lego-hidden-") {
                continue;
            }
            let path = if dir.is_empty() {
                e.name.clone()
            } else {
                format!("{dir}/{}", e.name)
            };
            // A number for the listing only; a lookup gives the real one.
            let n = known(&path).unwrap_or(u64::MAX - all.len() as u64);
            all.push((n, file_type(e.kind), e.name));
        }
        for (i, (n, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(n), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.allowed(req).and_then(|()| self.call(|c| c.statfs())) {
            Ok(s) => {
                let bsize = 4096u64;
                reply.statfs(
                    s.total_bytes / bsize,
                    s.free_bytes / bsize,
                    s.free_bytes / bsize,
                    0,
                    0,
                    bsize as u32,
                    255,
                    bsize as u32,
                )
            }
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.child(req, parent, name).and_then(|p| {
            match self.call(|c| c.create(&p, mode & !umask & 0o7777)) {
                Ok(()) => {}
                // O_CREAT without O_EXCL opens what is there.
                Err(e) if e == Errno::EEXIST && flags & libc::O_EXCL == 0 => {
                    if flags & libc::O_TRUNC != 0 {
                        self.call(|c| c.truncate(&p, 0))?;
                    }
                }
                Err(e) => return Err(e),
            }
            self.entry(&p)
        });
        match r {
            Ok(attr) => {
                self.opened(attr.ino.0);
                reply.created(
                    &TTL,
                    &attr,
                    Generation(0),
                    FileHandle(0),
                    FopenFlags::empty(),
                )
            }
            Err(e) => reply.error(e),
        }
    }
}

/// A mounted vNode file system; dropping it unmounts it.
pub struct Mounted {
    _session: fuser::BackgroundSession,
}

/// Mounts `fs` at `dir` for every user (the kernel checks permissions
/// against the modes; files show as the vNode's user's), served by four
/// threads.
pub fn mount(fs: VnodeFs, dir: &std::path::Path, name: &str) -> io::Result<Mounted> {
    use fuser::{Config, MountOption, SessionACL};
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("lego-vnode:{name}")),
        MountOption::Subtype("lego".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::RW,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(4);
    config.clone_fd = true;
    Ok(Mounted {
        _session: fuser::spawn_mount(fs, dir, &config)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_move_the_paths_beneath_and_forget_the_replaced() {
        let mut n = Nodes::new();
        let d = n.looked_up("d");
        let f = n.looked_up("d/f");
        let g = n.looked_up("d/sub/g");
        let other = n.looked_up("dd/x");
        let old = n.looked_up("e");
        n.moved("d", "e");
        assert_eq!(n.path(d).unwrap(), "e");
        assert_eq!(n.path(f).unwrap(), "e/f");
        assert_eq!(n.path(g).unwrap(), "e/sub/g");
        assert_eq!(n.path(other).unwrap(), "dd/x", "a sibling sharing a prefix");
        assert_eq!(n.path(old), Err(Errno::ESTALE), "replaced");
        assert_eq!(n.by_path.get("e/f"), Some(&f));
        assert_eq!(n.by_path.get("d/f"), None);
    }

    #[test]
    fn numbers_are_kept_while_looked_up_or_open() {
        let mut n = Nodes::new();
        let f = n.looked_up("f");
        assert_eq!(n.looked_up("f"), f, "the same file, the same number");
        n.by_ino.get_mut(&f).unwrap().lookups = 0;
        n.by_ino.get_mut(&f).unwrap().open = 1;
        n.release_if_unused(f);
        assert!(n.path(f).is_ok(), "open");
        n.by_ino.get_mut(&f).unwrap().open = 0;
        n.release_if_unused(f);
        assert!(n.path(f).is_err());
        assert_ne!(n.looked_up("f"), f, "numbers are not reused");
        n.release_if_unused(ROOT);
        assert_eq!(n.path(ROOT).unwrap(), "");
    }

    #[test]
    fn hidden_names_stay_in_their_directory() {
        let mut n = Nodes::new();
        let a = n.hidden_name("db/x.sqlite-journal");
        assert!(a.starts_with("db/.lego-hidden-"), "{a}");
        let b = n.hidden_name("top");
        assert!(b.starts_with(".lego-hidden-"), "{b}");
        assert_ne!(n.hidden_name("top"), b);
    }
}
