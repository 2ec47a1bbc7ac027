//! Memory syscalls issued with `syscall(2)` directly.
//!
//! The runtime exports its own `mmap`, `munmap`, `mremap` and `madvise`; any
//! call to the libc symbols from inside the runtime would come back to those
//! interposers. These wrappers never do.

use std::io;

use crate::last_error;

fn check(ret: libc::c_long) -> io::Result<usize> {
    if ret < 0 && ret > -4096 {
        // syscall(2) returns -1 and sets errno.
        Err(last_error())
    } else {
        Ok(ret as usize)
    }
}

/// `mmap(2)` as the kernel sees it. Returns the mapped address.
pub fn mmap_raw(
    addr: usize,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: i64,
) -> io::Result<usize> {
    // SAFETY: mmap with arbitrary arguments cannot violate Rust's memory
    // safety by itself except with MAP_FIXED over live Rust objects; callers
    // pass MAP_FIXED only over ranges they own (the runtime's reserved region)
    // or on behalf of the program, which owns its address space.
    let ret = unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) };
    check(ret)
}

/// `munmap(2)`.
pub fn munmap_raw(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: as for mmap_raw: the caller unmaps only ranges it owns or that
    // the program asked to unmap.
    check(unsafe { libc::syscall(libc::SYS_munmap, addr, len) }).map(|_| ())
}

/// `mremap(2)`; `new_addr` is used only with `MREMAP_FIXED`.
pub fn mremap_raw(
    old: usize,
    old_len: usize,
    new_len: usize,
    flags: i32,
    new_addr: usize,
) -> io::Result<usize> {
    // SAFETY: forwarded on behalf of the program for ranges outside the
    // runtime's region; the program owns them.
    check(unsafe { libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new_addr) })
}

/// `madvise(2)`.
pub fn madvise_raw(addr: usize, len: usize, advice: i32) -> io::Result<()> {
    // SAFETY: madvise changes contents only for DONTNEED/FREE/REMOVE, which
    // callers issue for ranges whose contents they have saved or discarded.
    check(unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) }).map(|_| ())
}

/// `mprotect(2)`.
pub fn mprotect_raw(addr: usize, len: usize, prot: i32) -> io::Result<()> {
    // SAFETY: changes protection only; forwarded on behalf of the program.
    check(unsafe { libc::syscall(libc::SYS_mprotect, addr, len, prot) }).map(|_| ())
}

/// Drops many page ranges of this process with one `process_madvise(2)`
/// call per 1024 ranges (cheaper than one `madvise` each: one TLB
/// shootdown per call).
pub fn drop_pages(ranges: &[(usize, usize)], pidfd: i32) -> io::Result<()> {
    for chunk in ranges.chunks(1024) {
        let iov: Vec<libc::iovec> = chunk
            .iter()
            .map(|&(a, l)| libc::iovec {
                iov_base: a as *mut libc::c_void,
                iov_len: l,
            })
            .collect();
        let want: usize = chunk.iter().map(|r| r.1).sum();
        // SAFETY: iov points at `chunk.len()` valid iovec structs for the
        // duration of the call; MADV_DONTNEED only discards page contents,
        // which the caller has written back or never needs again.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                pidfd,
                iov.as_ptr(),
                iov.len(),
                libc::MADV_DONTNEED,
                0,
            )
        };
        match check(ret) {
            Ok(n) if n == want => {}
            // A short or refused batch: fall back to one madvise per range.
            _ => {
                for &(a, l) in chunk {
                    madvise_raw(a, l, libc::MADV_DONTNEED)?;
                }
            }
        }
    }
    Ok(())
}

/// A pidfd for this process, for [`drop_pages`]; -1 if unsupported.
pub fn own_pidfd() -> i32 {
    // SAFETY: pidfd_open has no memory arguments.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    ret as i32
}

/// Which of `pages` pages starting at `addr` are resident (`mincore(2)`).
pub fn resident_pages(addr: usize, pages: usize) -> io::Result<Vec<bool>> {
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` has one byte per page of the queried range, as mincore
    // requires; addr is page aligned (checked by the kernel).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mincore,
            addr,
            pages * crate::PAGE_SIZE,
            vec.as_mut_ptr(),
        )
    };
    check(ret)?;
    Ok(vec.into_iter().map(|b| b & 1 == 1).collect())
}

/// Copies one page out of this process's memory.
///
/// # Safety
/// `addr` must be a readable page of this process that no other code frees
/// or unmaps during the copy.
pub unsafe fn copy_page_out(addr: usize, dst: &mut [u8]) {
    debug_assert_eq!(dst.len(), crate::PAGE_SIZE);
    // SAFETY: the caller guarantees `addr` is a readable page; dst is a
    // distinct Rust buffer of PAGE_SIZE bytes.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, dst.as_mut_ptr(), crate::PAGE_SIZE) }
}
