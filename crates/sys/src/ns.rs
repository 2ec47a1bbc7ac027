//! Namespaces and mounts for a vNode's programs: the calls
//! `lego_processor::vnode` makes before it starts the program.

use std::ffi::CString;
use std::io;

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Moves the calling thread into a new network namespace (only loopback,
/// down).
pub fn enter_new_network() -> io::Result<()> {
    // SAFETY: unshare takes no pointers; a network namespace change
    // touches no memory.
    check(unsafe { libc::unshare(libc::CLONE_NEWNET) })
}

/// Moves this process into a mount namespace of its own, and makes every
/// mount in it private (so nothing mounted here shows on the host, nor
/// the other way round).
///
/// Call it while the process has one thread: the new namespace is the
/// calling thread's.
pub fn enter_own_mounts() -> io::Result<()> {
    // SAFETY: unshare takes no pointers; it unshares neither the file
    // descriptor table nor memory, so no other thread's view of either
    // changes.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
    let root = cstr("/")?;
    // SAFETY: valid NUL-terminated path; the other pointers may be null
    // for a propagation change.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })
}

/// Mounts a new tmpfs at `dir` (mode 1777, like `/tmp`).
pub fn mount_tmpfs(dir: &str) -> io::Result<()> {
    let (src, target, fstype, opts) = (
        cstr("tmpfs")?,
        cstr(dir)?,
        cstr("tmpfs")?,
        cstr("mode=1777")?,
    );
    // SAFETY: every pointer is a valid NUL-terminated string that lives
    // through the call.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            opts.as_ptr().cast(),
        )
    })
}

/// Moves the calling thread (only) into the network namespace `ns` (an
/// open `/proc/PID/ns/net`); threads it starts from then on are there
/// too.
pub fn enter_network(ns: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setns takes a file descriptor that `ns` keeps open through
    // the call; a network namespace change touches no memory.
    check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) })
}

/// Bind-mounts `src` (a path, or `/proc/self/fd/N` of an `O_PATH` file
/// descriptor) at `target`.
pub fn bind_mount(src: &str, target: &str) -> io::Result<()> {
    let (src, target) = (cstr(src)?, cstr(target)?);
    // SAFETY: both are valid NUL-terminated paths that live through the
    // call; a bind mount reads no file-system type or data.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    })
}

/// Puts the children this process starts from now on into a new PID
/// namespace (the first one is its init, PID 1).
pub fn children_in_new_pid_namespace() -> io::Result<()> {
    // SAFETY: unshare takes no pointers; CLONE_NEWPID changes only which
    // PID namespace later children are made in.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID) })
}

/// Mounts a new procfs at `/proc`: the calling process's PID namespace's.
pub fn mount_proc() -> io::Result<()> {
    let (src, target, fstype) = (cstr("proc")?, cstr("/proc")?, cstr("proc")?);
    // SAFETY: every pointer is a valid NUL-terminated string that lives
    // through the call; procfs takes no data.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    })
}

/// This process is killed (SIGKILL) when the thread that started it ends
/// (a vNode's init, when its `lego vnode-host` dies: the namespace's
/// processes go with it).
pub fn die_with_parent() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes the signal as a plain integer
    // and touches no memory.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) })
}

/// Waits for any child of this process to end: its pid and wait status
/// (an init reaps every orphan of its namespace this way).
pub fn wait_any() -> io::Result<(i32, i32)> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into the valid local `status`.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid >= 0 {
            return Ok((pid, status));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
