//! The file tree of one vNode, as the storage daemon serves it.
//!
//! A [`Tree`] is a directory that holds one vNode's files. Every operation
//! names a path relative to it and is confined to it by the kernel: each
//! path is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
//! from the tree's root descriptor, so no `..`, absolute path or symlink
//! can lead out of the tree, whatever was created inside it (a symlink
//! is stored and read back as such, never followed here: the file-system
//! client resolves it, in the vNode's own view). There is no hard-link
//! operation, so no file outside the tree can be linked in.
//!
//! Durability: [`Tree::fsync`] returns once the file's data and the
//! directory entry naming it are on disk; a creation, rename or removal
//! is durable once the directory holding it is synced (`fsync` of that
//! directory's path).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use rustix::fs::{self as fs, AtFlags, Mode, OFlags, ResolveFlags};

/// The permission bits a file keeps: the set-user-ID and set-group-ID
/// bits are dropped, so no file a vNode writes runs with the storage
/// daemon's user's rights on its host.
const KEPT_MODE: u32 = 0o1777;

/// Every path is resolved beneath the tree, following no symlink.
const CONFINED: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS);

/// What a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// Anything else (a FIFO or socket made outside lego).
    Other,
}

/// A file's attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub kind: Kind,
    pub size: u64,
    pub mode: u32,
    pub nlink: u64,
    pub ino: u64,
    pub mtime_ns: i128,
}

/// A time to set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Time {
    /// The storage daemon's clock.
    Now,
    /// Left as it is.
    Omit,
    /// Nanoseconds since the epoch.
    At(i64),
}

impl Time {
    /// From its encoding in a `Utimens` call.
    pub fn from_wire(v: u64) -> Self {
        match v {
            lego_protocol::TIME_NOW => Time::Now,
            lego_protocol::TIME_OMIT => Time::Omit,
            ns => Time::At(ns as i64),
        }
    }

    pub fn to_wire(self) -> u64 {
        match self {
            Time::Now => lego_protocol::TIME_NOW,
            Time::Omit => lego_protocol::TIME_OMIT,
            Time::At(ns) => ns as u64,
        }
    }
}

/// Space of the tree's file system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space {
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// One vNode's file tree.
pub struct Tree {
    root: OwnedFd,
    /// Bytes its files and directories take on disk (allocated blocks),
    /// counted at open and kept up to date by every change.
    used: std::sync::atomic::AtomicU64,
    /// Most bytes it may take (`--storage-quota`); 0: no limit.
    quota: std::sync::atomic::AtomicU64,
    /// Held across each change's look before, change and look after, so
    /// two changes at once are not counted twice; a write holds it only
    /// to look before and after (see [`Writes`]).
    changing: std::sync::Mutex<Writes>,
}

/// The writes under way in a tree, which copy their data with the lock
/// released (so several go at once), and what each file they write has
/// counted so far.
#[derive(Default)]
struct Writes {
    /// By inode: bytes on disk counted for it, and writes under way.
    files: HashMap<u64, Writing>,
    /// Room promised to the writes under way.
    reserved: u64,
}

struct Writing {
    counted: u64,
    writers: u32,
    /// Room its writes under way were promised and have not yet been
    /// counted as taking (part of [`Writes::reserved`]).
    reserved: u64,
    /// Removed meanwhile (what it took was counted freed then).
    removed: bool,
}

impl Writes {
    /// Bytes counted for inode `ino`, which takes `now` on disk, when it
    /// is removed or replaced: what a write under way counted, if one is.
    fn forget(&mut self, ino: u64, now: u64) -> u64 {
        match self.files.get_mut(&ino) {
            Some(w) => {
                w.removed = true;
                w.counted
            }
            None => now,
        }
    }
}

/// Bytes `st` takes on disk.
fn on_disk(st: &fs::Stat) -> u64 {
    (st.st_blocks as u64).saturating_mul(512)
}

/// Bytes the tree under `dir` takes on disk (symlinks not followed).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            total = total.saturating_add(m.blocks().saturating_mul(512));
            if m.is_dir() {
                todo.push(e.path());
            }
        }
    }
    total
}

fn errno(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

fn invalid(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why.to_string())
}

/// `path` split into its parent (relative, maybe empty) and its last
/// component, which must be a plain name.
fn split(path: &str) -> io::Result<(&str, &str)> {
    let path = path.trim_end_matches('/');
    let (parent, name) = match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    };
    if name.is_empty() || name == "." || name == ".." || name.as_bytes().contains(&0) {
        return Err(invalid("a file needs a name (not empty, '.' or '..')"));
    }
    Ok((parent, name))
}

fn attr(st: &fs::Stat) -> Attr {
    let kind = match fs::FileType::from_raw_mode(st.st_mode) {
        fs::FileType::RegularFile => Kind::File,
        fs::FileType::Directory => Kind::Dir,
        fs::FileType::Symlink => Kind::Symlink,
        _ => Kind::Other,
    };
    Attr {
        kind,
        size: st.st_size as u64,
        mode: st.st_mode & 0o7777,
        nlink: st.st_nlink,
        ino: st.st_ino,
        mtime_ns: st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128,
    }
}

impl Tree {
    /// The tree in directory `dir`, made if it does not exist.
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let root = fs::open(
            dir,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        Ok(Self {
            root,
            used: std::sync::atomic::AtomicU64::new(disk_usage(dir)),
            quota: std::sync::atomic::AtomicU64::new(0),
            changing: std::sync::Mutex::new(Writes::default()),
        })
    }

    /// At most `bytes` on disk from now on (0: no limit): a write or
    /// truncate that would need more fails with `ENOSPC`.
    pub fn set_quota(&self, bytes: u64) {
        self.quota.store(bytes, Ordering::Relaxed);
    }

    /// Its quota (0: none).
    pub fn quota(&self) -> u64 {
        self.quota.load(Ordering::Relaxed)
    }

    /// Bytes the tree takes on disk.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn changing(&self) -> std::sync::MutexGuard<'_, Writes> {
        self.changing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails with `ENOSPC` if `more` bytes do not fit the quota (with the
    /// room the writes under way, `w`, may take).
    fn room_for(&self, w: &Writes, more: u64) -> io::Result<()> {
        let quota = self.quota.load(Ordering::Relaxed);
        if quota != 0 && self.used().saturating_add(w.reserved).saturating_add(more) > quota {
            return Err(io::Error::from_raw_os_error(libc_enospc()));
        }
        Ok(())
    }

    /// Counts a change from `before` to `after` bytes on disk.
    fn count(&self, before: u64, after: u64) {
        if after >= before {
            self.used.fetch_add(after - before, Ordering::Relaxed);
        } else {
            let less = before - after;
            let _ = self
                .used
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                    Some(u.saturating_sub(less))
                });
        }
    }

    /// Bytes on disk that removing the name `name` in `dir` frees (none
    /// if another hard link keeps the file).
    fn freed_by_removing(w: &mut Writes, dir: &OwnedFd, name: &str) -> u64 {
        match fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st)
                if st.st_nlink <= 1
                    || fs::FileType::from_raw_mode(st.st_mode) == fs::FileType::Directory =>
            {
                w.forget(st.st_ino, on_disk(&st))
            }
            _ => 0,
        }
    }

    /// Opens `path` (relative; empty: the root) beneath the tree.
    fn at(&self, path: &str, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        let path = if path.is_empty() { "." } else { path };
        fs::openat2(
            self.root.as_fd(),
            path,
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            mode,
            CONFINED,
        )
        .map_err(errno)
    }

    /// The directory holding `path`'s last component, and that name.
    fn parent<'p>(&self, path: &'p str) -> io::Result<(OwnedFd, &'p str)> {
        let (parent, name) = split(path)?;
        let dir = self.at(parent, OFlags::DIRECTORY | OFlags::PATH, Mode::empty())?;
        Ok((dir, name))
    }

    /// `path`'s attributes (a symlink's own).
    pub fn getattr(&self, path: &str) -> io::Result<Attr> {
        if path.trim_matches('/').is_empty() {
            return fs::fstat(&self.root).map(|s| attr(&s)).map_err(errno);
        }
        let (dir, name) = self.parent(path)?;
        fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .map(|s| attr(&s))
            .map_err(errno)
    }

    /// The entries of directory `path` (without `.` and `..`), sorted.
    pub fn readdir(&self, path: &str) -> io::Result<Vec<(String, Kind)>> {
        let dir = self.at(path, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())?;
        let mut out = Vec::new();
        for entry in fs::Dir::read_from(&dir).map_err(errno)? {
            let entry = entry.map_err(errno)?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let kind = match entry.file_type() {
                fs::FileType::RegularFile => Kind::File,
                fs::FileType::Directory => Kind::Dir,
                fs::FileType::Symlink => Kind::Symlink,
                _ => Kind::Other,
            };
            out.push((String::from_utf8_lossy(name).into_owned(), kind));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Creates file `path` (an error if it exists) with exactly `mode`'s
    /// permission bits (the client applied its umask; this daemon's does
    /// not count).
    pub fn create(&self, path: &str, mode: u32) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        let fd = self.adding(&dir, name, || {
            fs::openat(
                &dir,
                name,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::from_raw_mode(mode & 0o777),
            )
            .map_err(errno)
        })?;
        fs::fchmod(&fd, Mode::from_raw_mode(mode & KEPT_MODE)).map_err(errno)
    }

    /// Makes `name` in `dir` with `make`, if the quota leaves room for it
    /// and for `dir` to grow by a block, and counts both.
    fn adding<T>(
        &self,
        dir: &OwnedFd,
        name: &str,
        make: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        let changing = self.changing();
        self.room_for(&changing, 2 * 4096)?;
        let before = fs::fstat(dir).map(|st| on_disk(&st)).unwrap_or(0);
        let made = make()?;
        let after = fs::fstat(dir).map(|st| on_disk(&st)).unwrap_or(before);
        let new = fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_or(0, |st| on_disk(&st));
        self.count(before, after.saturating_add(new));
        Ok(made)
    }

    /// Makes directory `path` with exactly `mode`'s permission bits.
    pub fn mkdir(&self, path: &str, mode: u32) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        self.adding(&dir, name, || {
            fs::mkdirat(&dir, name, Mode::from_raw_mode(mode & 0o777)).map_err(errno)
        })?;
        self.chmod(path, mode)
    }

    /// Removes file or symlink `path`.
    pub fn unlink(&self, path: &str) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        let mut changing = self.changing();
        let freed = Self::freed_by_removing(&mut changing, &dir, name);
        fs::unlinkat(&dir, name, AtFlags::empty()).map_err(errno)?;
        self.count(freed, 0);
        Ok(())
    }

    /// Removes empty directory `path`.
    pub fn rmdir(&self, path: &str) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        let mut changing = self.changing();
        let freed = Self::freed_by_removing(&mut changing, &dir, name);
        fs::unlinkat(&dir, name, AtFlags::REMOVEDIR).map_err(errno)?;
        self.count(freed, 0);
        Ok(())
    }

    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (from_dir, from_name) = self.parent(from)?;
        let (to_dir, to_name) = self.parent(to)?;
        // A file replaced by the rename frees its blocks.
        let mut changing = self.changing();
        // The entry may grow its new directory by a block: counted, not
        // refused (a rename must free room at the quota, as an unlink of
        // an open file does through one).
        let dir_before = fs::fstat(&to_dir).map(|st| on_disk(&st)).unwrap_or(0);
        let freed = match fs::statat(&to_dir, to_name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Self::freed_by_removing(&mut changing, &to_dir, to_name),
            Err(_) => 0,
        };
        fs::renameat(&from_dir, from_name, &to_dir, to_name).map_err(errno)?;
        let dir_after = fs::fstat(&to_dir)
            .map(|st| on_disk(&st))
            .unwrap_or(dir_before);
        self.count(freed.saturating_add(dir_before), dir_after);
        Ok(())
    }

    /// Makes symlink `path` pointing at `target` (stored as given; never
    /// followed by the tree).
    pub fn symlink(&self, target: &str, path: &str) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        self.adding(&dir, name, || {
            fs::symlinkat(target, &dir, name).map_err(errno)
        })
    }

    pub fn readlink(&self, path: &str) -> io::Result<String> {
        let (dir, name) = self.parent(path)?;
        let target = fs::readlinkat(&dir, name, Vec::new()).map_err(errno)?;
        Ok(OsStr::from_bytes(target.to_bytes())
            .to_string_lossy()
            .into_owned())
    }

    /// `path` itself (a file or directory; a symlink is refused), opened
    /// to change its attributes.
    fn node(&self, path: &str) -> io::Result<OwnedFd> {
        self.at(path, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())
    }

    /// Sets `path`'s permission bits to `mode` (never set-user-ID or
    /// set-group-ID: see [`KEPT_MODE`]).
    pub fn chmod(&self, path: &str, mode: u32) -> io::Result<()> {
        fs::fchmod(&self.node(path)?, Mode::from_raw_mode(mode & KEPT_MODE)).map_err(errno)
    }

    /// Sets `path`'s access and modification times (nanoseconds since the
    /// epoch; `None`: left as they are; see [`Time`]).
    pub fn utimens(&self, path: &str, atime: Time, mtime: Time) -> io::Result<()> {
        let spec = |t: Time| match t {
            Time::Now => fs::Timespec {
                tv_sec: 0,
                tv_nsec: fs::UTIME_NOW,
            },
            Time::Omit => fs::Timespec {
                tv_sec: 0,
                tv_nsec: fs::UTIME_OMIT,
            },
            Time::At(ns) => fs::Timespec {
                tv_sec: ns.div_euclid(1_000_000_000),
                tv_nsec: ns.rem_euclid(1_000_000_000) as _,
            },
        };
        let times = fs::Timestamps {
            last_access: spec(atime),
            last_modification: spec(mtime),
        };
        if path.trim_matches('/').is_empty() {
            return fs::futimens(&self.root, &times).map_err(errno);
        }
        // A symlink's own times (what `tar` restores): never followed.
        let (dir, name) = self.parent(path)?;
        fs::utimensat(&dir, name, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(errno)
    }

    /// Regular file `path`, opened with `flags`.
    fn file(&self, path: &str, flags: OFlags) -> io::Result<OwnedFd> {
        let fd = self.at(path, flags, Mode::empty())?;
        if fs::fstat(&fd).map_err(errno)?.st_mode & 0o170000 != 0o100000 {
            return Err(io::Error::from_raw_os_error(libc_eisdir()));
        }
        Ok(fd)
    }

    pub fn truncate(&self, path: &str, size: u64) -> io::Result<()> {
        let fd = self.file(path, OFlags::WRONLY)?;
        let mut changing = self.changing();
        let before = fs::fstat(&fd).map_err(errno)?;
        fs::ftruncate(&fd, size).map_err(errno)?;
        let after = on_disk(&fs::fstat(&fd).map_err(errno)?);
        // Against what a write under way counted, if one is. Blocks freed
        // under such a write stay promised to it: an overwrite promised
        // nothing, counting on them, and may take them again.
        match changing.files.get_mut(&before.st_ino) {
            Some(w) => {
                let was = std::mem::replace(&mut w.counted, after);
                self.count(was, after);
                let freed = was.saturating_sub(after);
                w.reserved = w.reserved.saturating_add(freed);
                changing.reserved = changing.reserved.saturating_add(freed);
            }
            None => self.count(on_disk(&before), after),
        }
        Ok(())
    }

    /// Up to `len` bytes of file `path` from `offset` (fewer at its end).
    pub fn read(&self, path: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let fd = self.file(path, OFlags::RDONLY)?;
        offset
            .checked_add(len as u64)
            .ok_or_else(|| invalid("offset and length overflow"))?;
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let n = rustix::io::pread(&fd, &mut buf[got..], offset + got as u64).map_err(errno)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        Ok(buf)
    }

    /// Writes `data` into file `path` at `offset`.
    /// Fails with `ENOSPC`, writing nothing, if the write may take more
    /// room than the tree's quota leaves.
    pub fn write(&self, path: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        let fd = self.file(path, OFlags::WRONLY)?;
        let ino = self.begin_write(&fd, offset, data.len())?;
        // The copy, with the lock released.
        let mut done = 0;
        let written = loop {
            if done == data.len() {
                break Ok(());
            }
            match rustix::io::pwrite(&fd, &data[done..], offset + done as u64) {
                Ok(n) => done += n,
                Err(e) => break Err(errno(e)),
            }
        };
        self.end_write(&fd, ino);
        written
    }

    /// Before a write of `len` bytes at `offset` to `fd`: the room it may
    /// take promised (or `ENOSPC`), the file's count taken as the baseline
    /// if no other write to it is under way. Returns the file's inode.
    fn begin_write(&self, fd: &OwnedFd, offset: u64, len: usize) -> io::Result<u64> {
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| invalid("offset and length overflow"))?;
        let mut changing = self.changing();
        let before = fs::fstat(fd).map_err(errno)?;
        // Overwriting a file with no holes takes no room; anything else
        // may take as much as it writes.
        let size = before.st_size as u64;
        let dense = on_disk(&before) >= size;
        let need = if end <= size && dense {
            0
        } else {
            (len as u64).div_ceil(4096) * 4096
        };
        self.room_for(&changing, need)?;
        changing.reserved = changing.reserved.saturating_add(need);
        let w = changing.files.entry(before.st_ino).or_insert(Writing {
            counted: on_disk(&before),
            writers: 0,
            reserved: 0,
            removed: false,
        });
        w.writers += 1;
        w.reserved = w.reserved.saturating_add(need);
        Ok(before.st_ino)
    }

    /// After a write to `fd` (inode `ino`): what the file takes now
    /// against what was counted for it (by the baseline or the last write
    /// to end); growth counted is no longer promised, and the last write
    /// to the file under way gives back what is left of the promise.
    fn end_write(&self, fd: &OwnedFd, ino: u64) {
        let mut changing = self.changing();
        let now = fs::fstat(fd).map(|st| on_disk(&st));
        let mut released = 0;
        if let Some(w) = changing.files.get_mut(&ino) {
            if let (Ok(now), false) = (now, w.removed) {
                let was = std::mem::replace(&mut w.counted, now);
                self.count(was, now);
                let grown = now.saturating_sub(was).min(w.reserved);
                w.reserved -= grown;
                released = grown;
            }
            w.writers -= 1;
            if w.writers == 0 {
                released += w.reserved;
                changing.files.remove(&ino);
            }
        }
        changing.reserved = changing.reserved.saturating_sub(released);
    }

    /// Makes file (or directory) `path` durable: its data, and the entry
    /// naming it in its directory.
    pub fn fsync(&self, path: &str) -> io::Result<()> {
        let fd = self.at(path, OFlags::RDONLY, Mode::empty())?;
        fs::fsync(&fd).map_err(errno)?;
        let parent = match path.trim_matches('/').rfind('/') {
            Some(i) => &path.trim_matches('/')[..i],
            None => "",
        };
        let dir = self.at(parent, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())?;
        fs::fsync(&dir).map_err(errno)
    }

    /// The file system's size and free space.
    pub fn statfs(&self) -> io::Result<Space> {
        let s = fs::fstatvfs(&self.root).map_err(errno)?;
        Ok(Space {
            total_bytes: s.f_blocks.saturating_mul(s.f_frsize),
            free_bytes: s.f_bavail.saturating_mul(s.f_frsize),
        })
    }
}

/// EISDIR: an operation on a file met something else.
fn libc_enospc() -> i32 {
    rustix::io::Errno::NOSPC.raw_os_error()
}

fn libc_eisdir() -> i32 {
    rustix::io::Errno::ISDIR.raw_os_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("lego-tree-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_quota_refuses_growth_and_counts_what_is_freed() {
        let dir = tmp("quota");
        let t = Tree::open(&dir.join("v1")).unwrap();
        t.create("a", 0o644).unwrap();
        t.write("a", 0, &vec![7u8; 300 << 10]).unwrap();
        let with_a = t.used();
        assert!(with_a >= 300 << 10, "{with_a}");
        t.set_quota(with_a + (200 << 10));
        t.create("b", 0o644).unwrap();
        t.write("b", 0, &vec![1u8; 100 << 10]).unwrap();
        let e = t.write("b", 100 << 10, &vec![1u8; 200 << 10]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc_enospc()));
        assert_eq!(t.getattr("b").unwrap().size, 100 << 10, "nothing written");
        // Overwriting in place needs no room.
        t.write("b", 0, &vec![2u8; 100 << 10]).unwrap();
        // Freeing a makes room; the count follows removes, truncates and
        // replacing renames.
        t.unlink("a").unwrap();
        t.write("b", 100 << 10, &vec![1u8; 200 << 10]).unwrap();
        t.truncate("b", 0).unwrap();
        t.create("c", 0o644).unwrap();
        t.write("c", 0, &vec![3u8; 64 << 10]).unwrap();
        t.rename("c", "b").unwrap();
        let left = t.used();
        assert!((64 << 10..(64 << 10) + 16384).contains(&left), "{left}");
        // A hole made by truncate is no way around the quota.
        t.create("sparse", 0o644).unwrap();
        t.truncate("sparse", 1 << 30).unwrap();
        let e = t.write("sparse", 4096, &vec![5u8; 800 << 10]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc_enospc()));
        t.unlink("sparse").unwrap();
        // Counted again from the disk when opened.
        let again = Tree::open(&dir.join("v1")).unwrap();
        assert_eq!(again.used(), left);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Four writers write `mib` MiB of `file` at once, 1 MiB each, while
    /// `meanwhile` runs; how many writes were refused.
    fn four_writers(t: &Tree, file: &str, mib: u64, meanwhile: impl FnOnce() + Send) -> u32 {
        let refused = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|s| {
            for k in 0..4u64 {
                let refused = &refused;
                s.spawn(move || {
                    for i in (k..mib).step_by(4) {
                        if t.write(file, i << 20, &vec![k as u8 + 1; 1 << 20]).is_err() {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            s.spawn(meanwhile);
        });
        refused.into_inner()
    }

    #[test]
    fn writes_at_once_to_one_file_are_counted_once_and_within_the_quota() {
        let dir = tmp("concurrent");
        let t = Tree::open(&dir.join("v1")).unwrap();
        t.create("f", 0o644).unwrap();
        t.create("g", 0o644).unwrap();
        // One file's 64 MiB, while another file is written, truncated
        // and removed.
        let refused = four_writers(&t, "f", 64, || {
            for i in 0..16u64 {
                t.write("g", i << 20, &vec![9u8; 1 << 20]).unwrap();
                if i == 7 {
                    t.truncate("g", 1 << 20).unwrap();
                }
            }
            t.unlink("g").unwrap();
        });
        assert_eq!(refused, 0);
        let counted = t.used();
        assert!(t.changing().files.is_empty(), "no write left under way");
        assert_eq!(t.changing().reserved, 0);
        // The count is the disk's.
        assert_eq!(counted, Tree::open(&dir.join("v1")).unwrap().used());
        assert!(counted >= 64 << 20, "{counted}");
        // With a quota, writers at once never take it past the quota.
        let u = Tree::open(&dir.join("v2")).unwrap();
        u.set_quota(8 << 20);
        u.create("h", 0o644).unwrap();
        assert!(four_writers(&u, "h", 16, || {}) >= 8);
        assert!(u.used() <= 8 << 20, "{}", u.used());
        // And a file that just fits is written whole by writers at once
        // (one's growth, seen by another, is not promised twice).
        let v = Tree::open(&dir.join("v3")).unwrap();
        v.set_quota((16 << 20) + (64 << 10));
        v.create("i", 0o644).unwrap();
        assert_eq!(four_writers(&v, "i", 16, || {}), 0);
        assert_eq!(v.getattr("i").unwrap().size, 16 << 20);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn blocks_a_truncate_frees_under_an_overwrite_stay_promised_to_it() {
        let dir = tmp("truncrace");
        let t = Tree::open(&dir.join("v1")).unwrap();
        t.create("f", 0o644).unwrap();
        t.create("g", 0o644).unwrap();
        t.write("f", 0, &vec![1u8; 1 << 20]).unwrap();
        t.set_quota(t.used() + (64 << 10));
        let fd = t.file("f", OFlags::WRONLY).unwrap();
        // An overwrite promises nothing; a truncate frees its blocks
        // meanwhile; another file may not take them.
        let w = t.begin_write(&fd, 0, 1 << 20).unwrap();
        t.truncate("f", 0).unwrap();
        let e = t.write("g", 0, &vec![2u8; 1 << 20]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc_enospc()));
        rustix::io::pwrite(&fd, &vec![3u8; 1 << 20], 0).unwrap();
        t.end_write(&fd, w);
        assert!(t.used() <= t.quota.load(Ordering::Relaxed), "{}", t.used());
        assert_eq!(t.changing().reserved, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn symlinks_and_directories_are_counted_both_ways() {
        let dir = tmp("entries");
        let t = Tree::open(&dir.join("v1")).unwrap();
        let long = "x".repeat(3000);
        t.mkdir("d", 0o755).unwrap();
        for round in 0..3 {
            for k in 0..200 {
                t.symlink(&long, &format!("d/l{k}")).unwrap();
            }
            for k in 0..200 {
                t.unlink(&format!("d/l{k}")).unwrap();
            }
            // What is counted is what the disk holds, every round.
            let disk = Tree::open(&dir.join("v1")).unwrap().used();
            assert_eq!(t.used(), disk, "round {round}");
        }
        t.rmdir("d").unwrap();
        assert_eq!(t.used(), Tree::open(&dir.join("v1")).unwrap().used());
        // A long symlink needs room.
        t.set_quota(t.used() + 4096);
        let e = t.symlink(&long, "l").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc_enospc()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn growth_one_write_counts_for_another_is_no_longer_promised() {
        let dir = tmp("interleaved");
        let t = Tree::open(&dir.join("v1")).unwrap();
        t.create("f", 0o644).unwrap();
        t.set_quota(t.used() + (2 << 20));
        let fd = t.file("f", OFlags::WRONLY).unwrap();
        // Two 1 MiB writes begin (2 MiB promised); both copy; the first
        // to end counts both.
        let a = t.begin_write(&fd, 0, 1 << 20).unwrap();
        let b = t.begin_write(&fd, 1 << 20, 1 << 20).unwrap();
        assert_eq!(t.changing().reserved, 2 << 20);
        rustix::io::pwrite(&fd, &vec![1u8; 2 << 20], 0).unwrap();
        t.end_write(&fd, a);
        let counted = t.used();
        // Nothing is promised twice: what b took is counted, not still
        // promised, so the tree is at (not past) its quota.
        assert!(t.changing().reserved < 4096, "{}", t.changing().reserved);
        t.end_write(&fd, b);
        assert_eq!(t.used(), counted);
        assert_eq!(t.changing().reserved, 0);
        assert!(t.changing().files.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn modes_are_exact_and_times_and_modes_can_be_set() {
        let dir = tmp("attrs");
        let t = Tree::open(&dir.join("v1")).unwrap();
        t.mkdir("d", 0o777).unwrap();
        t.create("d/f", 0o666).unwrap();
        assert_eq!(t.getattr("d").unwrap().mode, 0o777, "no umask");
        assert_eq!(t.getattr("d/f").unwrap().mode, 0o666);
        t.chmod("d/f", 0o4750).unwrap();
        assert_eq!(t.getattr("d/f").unwrap().mode, 0o750, "no set-user-ID");
        t.chmod("d/f", 0o1750).unwrap();
        assert_eq!(t.getattr("d/f").unwrap().mode, 0o1750);
        let ns = 1_234_567_890_123_456_789;
        t.utimens("d/f", Time::Omit, Time::At(ns)).unwrap();
        assert_eq!(t.getattr("d/f").unwrap().mtime_ns, i128::from(ns));
        t.utimens("d/f", Time::Now, Time::Now).unwrap();
        assert!(t.getattr("d/f").unwrap().mtime_ns > i128::from(ns));
        t.symlink("/etc/passwd", "l").unwrap();
        assert!(t.chmod("l", 0o777).is_err(), "a symlink is never followed");
        t.utimens("l", Time::At(ns), Time::At(ns)).unwrap();
        assert_eq!(t.getattr("l").unwrap().mtime_ns, i128::from(ns), "its own");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn files_and_directories_are_made_read_renamed_and_removed() {
        let dir = tmp("ops");
        let t = Tree::open(&dir.join("v1")).unwrap();
        t.mkdir("src", 0o755).unwrap();
        t.create("src/a.txt", 0o644).unwrap();
        assert!(t.create("src/a.txt", 0o644).is_err(), "exists");
        t.write("src/a.txt", 0, b"hello world").unwrap();
        t.write("src/a.txt", 6, b"there").unwrap();
        assert_eq!(t.read("src/a.txt", 0, 100).unwrap(), b"hello there");
        assert_eq!(t.read("src/a.txt", 6, 3).unwrap(), b"the");
        t.truncate("src/a.txt", 5).unwrap();
        let a = t.getattr("src/a.txt").unwrap();
        assert_eq!((a.kind, a.size, a.mode), (Kind::File, 5, 0o644));
        t.rename("src/a.txt", "b.txt").unwrap();
        t.symlink("b.txt", "link").unwrap();
        assert_eq!(t.readlink("link").unwrap(), "b.txt");
        assert_eq!(t.getattr("link").unwrap().kind, Kind::Symlink);
        assert_eq!(
            t.readdir("").unwrap(),
            [
                ("b.txt".into(), Kind::File),
                ("link".into(), Kind::Symlink),
                ("src".into(), Kind::Dir)
            ]
        );
        t.fsync("b.txt").unwrap();
        t.fsync("src").unwrap();
        assert!(t.rmdir("src").is_ok());
        t.unlink("link").unwrap();
        t.unlink("b.txt").unwrap();
        assert!(t.readdir("").unwrap().is_empty());
        assert_eq!(t.getattr("").unwrap().kind, Kind::Dir);
        let s = t.statfs().unwrap();
        assert!(s.total_bytes >= s.free_bytes && s.free_bytes > 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nothing_leads_out_of_the_tree() {
        let dir = tmp("confined");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("secret"), b"other vnode").unwrap();
        let t = Tree::open(&dir.join("v1")).unwrap();
        t.mkdir("d", 0o755).unwrap();
        // A symlink may point anywhere; the tree never follows it.
        t.symlink("..", "up").unwrap();
        t.symlink("/", "abs").unwrap();
        t.symlink("../secret", "s").unwrap();
        for path in [
            "../secret",
            "d/../../secret",
            "/etc/passwd",
            "up/secret",
            "abs/etc/passwd",
            "s",
        ] {
            assert!(t.read(path, 0, 16).is_err(), "{path} was read");
            assert!(t.write(path, 0, b"x").is_err(), "{path} was written");
            assert!(t.truncate(path, 0).is_err(), "{path} was truncated");
        }
        for path in ["../x", "up/x", "abs/tmp/x", "d/../../x"] {
            assert!(t.create(path, 0o644).is_err(), "{path} was created");
            assert!(t.mkdir(path, 0o755).is_err(), "{path} was made");
            assert!(t.rename("d", path).is_err(), "renamed to {path}");
        }
        for path in ["..", ".", "", "d/.."] {
            assert!(t.unlink(path).is_err(), "{path} was removed");
        }
        assert!(t.readdir("up").is_err());
        assert!(t.readdir("..").is_err());
        assert_eq!(std::fs::read(dir.join("secret")).unwrap(), b"other vnode");
        assert!(!dir.join("x").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
