//! userfaultfd with raw ioctls (the `userfaultfd` crate lacks write-protect
//! details we need and wants libclang to build).
//!
//! The processor runtime registers its region in *missing* and
//! *write-protect* mode: a missing fault is an ExCache miss, a write-protect
//! fault is the first write to a clean page (it becomes dirty), and
//! write-protecting a dirty page stops writers while it is written back.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use thiserror::Error;

use crate::last_error;

const UFFDIO: u64 = 0xAA;
const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (UFFDIO << 8) | nr
}
const IOC_RW: u64 = 3;
const IOC_R: u64 = 2;

const UFFDIO_API: u64 = ioc(IOC_RW, 0x3F, 24);
const UFFDIO_REGISTER: u64 = ioc(IOC_RW, 0x00, 32);
const UFFDIO_WAKE: u64 = ioc(IOC_R, 0x02, 16);
const UFFDIO_COPY: u64 = ioc(IOC_RW, 0x03, 40);
const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_RW, 0x06, 24);
const USERFAULTFD_IOC_NEW: u64 = 0xAA00;

const UFFD_API: u64 = 0xAA;
const REGISTER_MODE_MISSING: u64 = 1;
const REGISTER_MODE_WP: u64 = 2;
const COPY_MODE_WP: u64 = 2;
const WRITEPROTECT_MODE_WP: u64 = 1;

const EVENT_PAGEFAULT: u8 = 0x12;
const PAGEFAULT_FLAG_WRITE: u64 = 1;
const PAGEFAULT_FLAG_WP: u64 = 2;

/// `_UFFDIO_WRITEPROTECT` bit in the ioctls a registration supports.
const IOCTL_BIT_WRITEPROTECT: u64 = 1 << 0x06;
const IOCTL_BIT_COPY: u64 = 1 << 0x03;

#[repr(C)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
struct Range {
    start: u64,
    len: u64,
}
#[repr(C)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
#[repr(C)]
struct WriteProtect {
    range: Range,
    mode: u64,
}
#[repr(C)]
#[derive(Clone, Copy)]
struct Msg {
    event: u8,
    _res1: u8,
    _res2: u16,
    _res3: u32,
    flags: u64,
    address: u64,
    _ptid: u64,
}

/// Why userfaultfd cannot be used here, in words a user can act on.
#[derive(Debug, Error)]
pub enum UffdError {
    #[error("no permission to use userfaultfd: give this user read-write access to /dev/userfaultfd, or set sysctl vm.unprivileged_userfaultfd=1 ({0})")]
    Permission(io::Error),
    #[error("this kernel has no userfaultfd (CONFIG_USERFAULTFD): {0}")]
    Missing(io::Error),
    #[error("this kernel's userfaultfd lacks write-protect support for anonymous memory (Linux 5.7 or later is needed)")]
    NoWriteProtect,
    #[error("userfaultfd {0} failed: {1}")]
    Call(&'static str, io::Error),
}

/// One fault event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Page-aligned faulting address.
    pub page: usize,
    /// The access was a write.
    pub write: bool,
    /// A write hit a write-protected page (not a missing page).
    pub wp: bool,
}

/// An open, API-negotiated userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

fn ioctl<T>(fd: RawFd, req: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: every call site passes the request number whose kernel
    // structure layout is `T` (the repr(C) structs above, sizes encoded in
    // the request number), and `arg` is a valid exclusive reference.
    let r = unsafe { libc::ioctl(fd, req as _, arg as *mut T) };
    if r < 0 {
        Err(last_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Opens a userfaultfd (via `/dev/userfaultfd`, falling back to the
    /// syscall) and negotiates the API. `nonblocking` makes `read` return
    /// `WouldBlock` when no event is pending.
    pub fn open(nonblocking: bool) -> Result<Self, UffdError> {
        let flags = libc::O_CLOEXEC | if nonblocking { libc::O_NONBLOCK } else { 0 };
        let fd = match open_dev(flags) {
            Ok(fd) => fd,
            Err(dev_err) => {
                // SAFETY: userfaultfd(2) takes only flags.
                let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
                if r < 0 {
                    let e = last_error();
                    return Err(match e.raw_os_error() {
                        Some(libc::ENOSYS) => UffdError::Missing(e),
                        _ if dev_err.kind() == io::ErrorKind::PermissionDenied => {
                            UffdError::Permission(dev_err)
                        }
                        _ => UffdError::Permission(e),
                    });
                }
                // SAFETY: r is a freshly created fd that nothing else owns.
                unsafe { OwnedFd::from_raw_fd(r as RawFd) }
            }
        };
        let mut api = Api {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api).map_err(|e| UffdError::Call("API", e))?;
        Ok(Self { fd })
    }

    /// Registers `[start, start+len)` for missing and write-protect faults.
    pub fn register(&self, start: usize, len: usize) -> Result<(), UffdError> {
        let mut reg = Register {
            range: Range {
                start: start as u64,
                len: len as u64,
            },
            mode: REGISTER_MODE_MISSING | REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::EINVAL) => UffdError::NoWriteProtect,
                _ => UffdError::Call("REGISTER", e),
            }
        })?;
        if reg.ioctls & IOCTL_BIT_WRITEPROTECT == 0 || reg.ioctls & IOCTL_BIT_COPY == 0 {
            return Err(UffdError::NoWriteProtect);
        }
        Ok(())
    }

    /// Installs the pages copied from `src` (a whole number of pages) at
    /// `dst`, write-protected if `wp`, and wakes the threads waiting on
    /// them. Returns how many pages were installed: fewer than asked if a
    /// page in the range was already present (someone else resolved it);
    /// the range up to and including that page is woken.
    pub fn copy(&self, dst: usize, src: &[u8], wp: bool) -> io::Result<usize> {
        assert!(!src.is_empty() && src.len().is_multiple_of(crate::PAGE_SIZE));
        let mut c = Copy {
            dst: dst as u64,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: if wp { COPY_MODE_WP } else { 0 },
            copy: 0,
        };
        match ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) {
            Ok(()) => Ok(src.len() / crate::PAGE_SIZE),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                let done = c.copy.max(0) as usize / crate::PAGE_SIZE;
                self.wake(dst, (done + 1) * crate::PAGE_SIZE)?;
                Ok(done)
            }
            Err(e) => Err(e),
        }
    }

    /// Sets (`protect`) or clears write protection on a range; clearing
    /// wakes the writers waiting on it.
    pub fn write_protect(&self, start: usize, len: usize, protect: bool) -> io::Result<()> {
        let mut wp = WriteProtect {
            range: Range {
                start: start as u64,
                len: len as u64,
            },
            mode: if protect { WRITEPROTECT_MODE_WP } else { 0 },
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp)
    }

    /// Wakes threads waiting on faults in a range without resolving them
    /// (they retry the access).
    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let mut r = Range {
            start: start as u64,
            len: len as u64,
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut r)
    }

    /// Reads pending fault events into `out`; returns how many. With a
    /// non-blocking fd, returns 0 when none is pending.
    pub fn read_faults(&self, out: &mut Vec<Fault>) -> io::Result<usize> {
        let mut msgs = [Msg {
            event: 0,
            _res1: 0,
            _res2: 0,
            _res3: 0,
            flags: 0,
            address: 0,
            _ptid: 0,
        }; 16];
        // SAFETY: msgs is a writable buffer of 16 uffd_msg-sized structs.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr() as *mut libc::c_void,
                std::mem::size_of_val(&msgs),
            )
        };
        if n < 0 {
            let e = last_error();
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(e);
        }
        let count = n as usize / std::mem::size_of::<Msg>();
        out.clear();
        for m in &msgs[..count] {
            if m.event == EVENT_PAGEFAULT {
                out.push(Fault {
                    page: (m.address as usize) & !(crate::PAGE_SIZE - 1),
                    write: m.flags & PAGEFAULT_FLAG_WRITE != 0,
                    wp: m.flags & PAGEFAULT_FLAG_WP != 0,
                });
            }
        }
        Ok(out.len())
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn open_dev(flags: i32) -> io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags by value.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if r < 0 {
        return Err(last_error());
    }
    // SAFETY: r is a freshly created fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// Checks, without side effects, that this process could run the runtime:
/// userfaultfd opens, and a registration in missing + write-protect mode on
/// anonymous memory works.
pub fn probe() -> Result<(), UffdError> {
    let u = Uffd::open(true)?;
    let len = crate::PAGE_SIZE;
    let addr = crate::mm::mmap_raw(
        0,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    )
    .map_err(|e| UffdError::Call("probe mmap", e))?;
    let r = u.register(addr, len);
    let _ = crate::mm::munmap_raw(addr, len);
    r
}

/// Measures the userfaultfd round trip in this process: a thread touches a
/// missing page of a registered range, a handler thread reads the event and
/// resolves it with `UFFDIO_COPY`, the toucher resumes. Returns one duration
/// per page (`pages` samples).
pub fn measure_round_trip(pages: usize) -> Result<Vec<std::time::Duration>, UffdError> {
    use std::sync::Arc;
    let len = pages * crate::PAGE_SIZE;
    let addr = crate::mm::mmap_raw(
        0,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    )
    .map_err(|e| UffdError::Call("mmap", e))?;
    let u = Arc::new(Uffd::open(false)?);
    u.register(addr, len)?;
    let handler = {
        let u = u.clone();
        std::thread::spawn(move || {
            let src = vec![7u8; crate::PAGE_SIZE];
            let mut faults = Vec::new();
            let mut served = 0;
            while served < pages {
                if u.read_faults(&mut faults).is_err() {
                    return;
                }
                for f in &faults {
                    let _ = u.copy(f.page, &src, false);
                    served += 1;
                }
            }
        })
    };
    let mut out = Vec::with_capacity(pages);
    for i in 0..pages {
        let p = (addr + i * crate::PAGE_SIZE) as *const u8;
        let t = std::time::Instant::now();
        // SAFETY: p is inside the mapping made above, which stays mapped
        // until after the loop; the handler thread resolves the fault.
        let v = unsafe { std::ptr::read_volatile(p) };
        out.push(t.elapsed());
        assert_eq!(v, 7);
    }
    let _ = handler.join();
    let _ = crate::mm::munmap_raw(addr, len);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(UFFDIO_API, 0xc018aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020aa00);
        assert_eq!(UFFDIO_COPY, 0xc028aa03);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018aa06);
        assert_eq!(UFFDIO_WAKE, 0x8010aa02);
        assert_eq!(std::mem::size_of::<Msg>(), 32);
    }

    #[test]
    fn probe_passes_on_this_machine() {
        probe().expect("userfaultfd with write-protect is available");
    }
}
