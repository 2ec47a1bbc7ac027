//! The C functions this library replaces in the program: the `malloc`
//! family (served by the region heap) and the anonymous-memory syscall
//! wrappers (`mmap`, `munmap`, `mremap`, `madvise`, `mprotect`, `brk`,
//! `sbrk`).
//!
//! Each function's safety contract is that of the C function it replaces.
//! Calls made by runtime code ([`in_runtime`]) and calls about memory the
//! runtime does not manage go straight to the kernel.
//!
//! What stays local on purpose: shared and file mappings, `PROT_NONE` or
//! executable reservations, `MAP_FIXED` requests outside the region, and
//! memory glibc maps internally for itself (thread stacks).

#![allow(clippy::missing_safety_doc)]

use lego_sys::{mm, PAGE_SIZE};
use libc::{c_int, c_void, intptr_t, off_t, size_t};

use crate::heap::{self, in_runtime, RuntimeScope, INTERNAL, REGION_HEAP};
use crate::memory_calls::CallError;
use crate::region;
use crate::runtime;

const MALLOC_ALIGN: usize = 16;

fn set_errno(e: i32) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

fn fail(e: i32) -> *mut c_void {
    set_errno(e);
    std::ptr::null_mut()
}

/// Runs an allocation on the heap for a request made from `caller` (see
/// [`heap::internal_for`]).
fn alloc_with(
    caller: usize,
    f: impl FnOnce(&mut dlmalloc::Dlmalloc<heap::RegionPages>) -> *mut u8,
    g: impl FnOnce(&mut dlmalloc::Dlmalloc<heap::KernelPages>) -> *mut u8,
) -> *mut c_void {
    let p = if heap::internal_for(caller) {
        INTERNAL.with(g)
    } else {
        REGION_HEAP.with(f)
    };
    if p.is_null() {
        fail(libc::ENOMEM)
    } else {
        p as *mut c_void
    }
}

/// Defines the exported C allocation function `$name`, which passes its
/// return address (who called it) to `$with_caller` as the argument after
/// its own: at entry, before any prologue, it is the word at the stack
/// pointer. A tail jump keeps the stack as the caller left it, so
/// `$with_caller` returns straight to the caller.
macro_rules! pass_caller {
    ($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty, $reg:literal => $with_caller:ident) => {
        #[unsafe(naked)]
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            core::arch::naked_asm!(
                concat!("mov ", $reg, ", qword ptr [rsp]"),
                "jmp {}",
                sym $with_caller,
            )
        }
    };
}

pass_caller!(malloc(size: size_t) -> *mut c_void, "rsi" => malloc_from);
pass_caller!(calloc(n: size_t, size: size_t) -> *mut c_void, "rdx" => calloc_from);
pass_caller!(realloc(p: *mut c_void, size: size_t) -> *mut c_void, "rdx" => realloc_from);
pass_caller!(reallocarray(p: *mut c_void, n: size_t, size: size_t) -> *mut c_void, "rcx" => reallocarray_from);
pass_caller!(memalign(align: size_t, size: size_t) -> *mut c_void, "rdx" => memalign_from);
pass_caller!(aligned_alloc(align: size_t, size: size_t) -> *mut c_void, "rdx" => memalign_from);
pass_caller!(posix_memalign(out: *mut *mut c_void, align: size_t, size: size_t) -> c_int, "rcx" => posix_memalign_from);
pass_caller!(valloc(size: size_t) -> *mut c_void, "rsi" => valloc_from);
pass_caller!(pvalloc(size: size_t) -> *mut c_void, "rsi" => pvalloc_from);

unsafe extern "C" fn malloc_from(size: size_t, caller: usize) -> *mut c_void {
    // SAFETY: dlmalloc's C-shaped API accepts any size.
    alloc_with(
        caller,
        |d| unsafe { d.c_malloc(size) },
        |d| unsafe { d.c_malloc(size) },
    )
}

unsafe extern "C" fn calloc_from(n: size_t, size: size_t, caller: usize) -> *mut c_void {
    let Some(total) = n.checked_mul(size) else {
        return fail(libc::ENOMEM);
    };
    // SAFETY: as for malloc; calloc returns zeroed memory.
    alloc_with(
        caller,
        |d| unsafe { d.calloc(total, MALLOC_ALIGN) },
        |d| unsafe { d.calloc(total, MALLOC_ALIGN) },
    )
}

#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    // The program passes a pointer from this malloc family; its address
    // says which heap owns it.
    if region::contains(p as usize) {
        // SAFETY: p is a live region-heap allocation.
        let large = unsafe { discard_freed_interior(p as usize) };
        REGION_HEAP.with(|d| {
            // SAFETY: a live region-heap allocation.
            unsafe { d.c_free(p as *mut u8) };
            if large {
                // dlmalloc stops trimming after a refused (small) trim
                // until the heap grows: retry after each large free, so a
                // large free top still goes back (heap::TRIM_MIN_BYTES).
                // SAFETY: trimming only releases free memory at the top.
                unsafe { d.trim(0) };
            }
        });
    } else {
        // SAFETY: a live internal-heap allocation.
        INTERNAL.with(|d| unsafe { d.c_free(p as *mut u8) });
    }
}

/// Freed blocks at least this large have their whole pages discarded.
const DISCARD_FREED_BYTES: usize = 128 << 10;

/// The contents of a large block being freed are dead: its whole pages'
/// remote copies are dropped (see `Runtime::freed`), so when the heap
/// reuses the block no stale page is fetched or written back. The first and
/// last page are left alone: dlmalloc's chunk headers and footers live there.
///
/// Returns whether the block was that large.
///
/// # Safety
/// `p` must be a live allocation of the region heap.
unsafe fn discard_freed_interior(p: usize) -> bool {
    // SAFETY: the caller's contract.
    let size = unsafe { heap::usable_size(p as *mut u8) };
    if size < DISCARD_FREED_BYTES {
        return false;
    }
    let first = (p + 64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let end = (p + size).saturating_sub(64) / PAGE_SIZE * PAGE_SIZE;
    if let Some(rt) = runtime::get() {
        if end > first && !region::in_bootstrap(p) {
            if let Err(e) = rt.freed(first, end - first) {
                e.errno_or_stop();
            }
        }
    }
    true
}

#[no_mangle]
pub unsafe extern "C" fn cfree(p: *mut c_void) {
    // SAFETY: as for free.
    unsafe { free(p) }
}

unsafe extern "C" fn realloc_from(p: *mut c_void, size: size_t, caller: usize) -> *mut c_void {
    if p.is_null() {
        // SAFETY: as for malloc.
        return unsafe { malloc_from(size, caller) };
    }
    if size == 0 {
        // SAFETY: as for free (glibc frees and returns NULL).
        unsafe { free(p) };
        return std::ptr::null_mut();
    }
    // A block stays on the heap that owns it.
    let q = if region::contains(p as usize) {
        // SAFETY: p is a live allocation of the region heap.
        REGION_HEAP.with(|d| unsafe { d.c_realloc(p as *mut u8, size) })
    } else {
        // SAFETY: p is a live allocation of the internal heap.
        INTERNAL.with(|d| unsafe { d.c_realloc(p as *mut u8, size) })
    };
    if q.is_null() {
        fail(libc::ENOMEM)
    } else {
        q as *mut c_void
    }
}

unsafe extern "C" fn reallocarray_from(
    p: *mut c_void,
    n: size_t,
    size: size_t,
    caller: usize,
) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: as for realloc.
        Some(total) => unsafe { realloc_from(p, total, caller) },
        None => fail(libc::ENOMEM),
    }
}

unsafe extern "C" fn memalign_from(align: size_t, size: size_t, caller: usize) -> *mut c_void {
    if !align.is_power_of_two() {
        return fail(libc::EINVAL);
    }
    let align = align.max(MALLOC_ALIGN);
    // SAFETY: align is a power of two.
    alloc_with(
        caller,
        |d| unsafe { d.c_memalign(align, size) },
        |d| unsafe { d.c_memalign(align, size) },
    )
}

unsafe extern "C" fn posix_memalign_from(
    out: *mut *mut c_void,
    align: size_t,
    size: size_t,
    caller: usize,
) -> c_int {
    if !align.is_power_of_two() || !align.is_multiple_of(std::mem::size_of::<usize>()) {
        return libc::EINVAL;
    }
    // SAFETY: as for memalign.
    let p = unsafe { memalign_from(align, size, caller) };
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller passes a valid out pointer.
    unsafe { *out = p };
    0
}

unsafe extern "C" fn valloc_from(size: size_t, caller: usize) -> *mut c_void {
    // SAFETY: as for memalign.
    unsafe { memalign_from(lego_sys::PAGE_SIZE, size, caller) }
}

unsafe extern "C" fn pvalloc_from(size: size_t, caller: usize) -> *mut c_void {
    let size = size.div_ceil(lego_sys::PAGE_SIZE).max(1) * lego_sys::PAGE_SIZE;
    // SAFETY: as for memalign.
    unsafe { memalign_from(lego_sys::PAGE_SIZE, size, caller) }
}

#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> size_t {
    if p.is_null() {
        return 0;
    }
    // SAFETY: p is a live allocation of one of the heaps.
    unsafe { heap::usable_size(p as *mut u8) }
}

#[no_mangle]
pub extern "C" fn mallopt(_param: c_int, _value: c_int) -> c_int {
    // glibc malloc tunables do not apply to dlmalloc; accept and ignore.
    1
}

#[no_mangle]
pub extern "C" fn malloc_trim(_pad: size_t) -> c_int {
    0
}

fn private_anon(flags: c_int) -> bool {
    flags & libc::MAP_ANONYMOUS != 0
        && flags & libc::MAP_SHARED == 0
        && flags & libc::MAP_SHARED_VALIDATE != libc::MAP_SHARED_VALIDATE
}

/// The runtime, if this call should be handled by it.
fn managing() -> Option<&'static runtime::Runtime> {
    if in_runtime() {
        None
    } else {
        runtime::get()
    }
}

fn map_result(r: std::io::Result<usize>) -> *mut c_void {
    match r {
        Ok(a) => a as *mut c_void,
        Err(e) => {
            set_errno(e.raw_os_error().unwrap_or(libc::ENOMEM));
            libc::MAP_FAILED
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    if let Some(rt) = managing() {
        let fixed = flags & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE) != 0;
        let rw = prot == libc::PROT_READ | libc::PROT_WRITE;
        let special = flags & (libc::MAP_HUGETLB | libc::MAP_GROWSDOWN) != 0;
        if len > 0 && private_anon(flags) && rw && !fixed && !special {
            let _s = RuntimeScope::enter();
            return match rt.map(len) {
                Ok(a) => a as *mut c_void,
                Err(e) => {
                    let e = e.errno_or_stop();
                    set_errno(e);
                    libc::MAP_FAILED
                }
            };
        }
        if fixed && rt.region.overlaps(addr as usize, len) {
            // The program replaces part of a mapping the region gave it.
            if !private_anon(flags) || !rt.region.covers(addr as usize, len) {
                set_errno(libc::ENOMEM);
                return libc::MAP_FAILED;
            }
            if let Err(e) = rt.discard(addr as usize, len) {
                set_errno(e.errno_or_stop());
                return libc::MAP_FAILED;
            }
            if prot != libc::PROT_READ | libc::PROT_WRITE {
                if let Err(e) = mm::mprotect_raw(addr as usize, len, prot) {
                    return map_result(Err(e));
                }
            }
            return addr;
        }
    }
    map_result(mm::mmap_raw(addr as usize, len, prot, flags, fd, off))
}

#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    // SAFETY: same contract as mmap (off_t is 64-bit here).
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: size_t) -> c_int {
    if let Some(rt) = managing() {
        if rt.region.overlaps(addr as usize, len) {
            return match rt.unmap(addr as usize, len) {
                Ok(()) => 0,
                Err(e) => {
                    let e = e.errno_or_stop();
                    set_errno(e);
                    -1
                }
            };
        }
    }
    match mm::munmap_raw(addr as usize, len) {
        Ok(()) => 0,
        Err(e) => {
            set_errno(e.raw_os_error().unwrap_or(libc::EINVAL));
            -1
        }
    }
}

/// `mremap` is variadic in C; on x86-64 the optional fifth argument
/// arrives in the same register as a fixed one.
#[no_mangle]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: size_t,
    new_len: size_t,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    if let Some(rt) = managing() {
        if rt.region.overlaps(old as usize, old_len.max(1)) {
            if flags & !libc::MREMAP_MAYMOVE != 0 || old_len == 0 {
                set_errno(libc::EINVAL);
                return libc::MAP_FAILED;
            }
            return match rt.remap(
                old as usize,
                old_len,
                new_len,
                flags & libc::MREMAP_MAYMOVE != 0,
            ) {
                Ok(a) => a as *mut c_void,
                Err(e) => {
                    let e = e.errno_or_stop();
                    set_errno(e);
                    libc::MAP_FAILED
                }
            };
        }
    }
    map_result(mm::mremap_raw(
        old as usize,
        old_len,
        new_len,
        flags,
        new_addr as usize,
    ))
}

#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: size_t, advice: c_int) -> c_int {
    if let Some(rt) = managing() {
        if rt.region.overlaps(addr as usize, len) {
            if matches!(advice, libc::MADV_DONTNEED | libc::MADV_FREE) {
                if let Err(e) = rt.discard(addr as usize, len) {
                    set_errno(e.errno_or_stop());
                    return -1;
                }
            }
            // Other advice (huge pages, readahead, ...) does not apply to
            // disaggregated memory.
            return 0;
        }
    }
    match mm::madvise_raw(addr as usize, len, advice) {
        Ok(()) => 0,
        Err(e) => {
            set_errno(e.raw_os_error().unwrap_or(libc::EINVAL));
            -1
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn mprotect(addr: *mut c_void, len: size_t, prot: c_int) -> c_int {
    let r = match managing() {
        Some(rt) if rt.region.overlaps(addr as usize, len) => rt.protect(addr as usize, len, prot),
        _ => mm::mprotect_raw(addr as usize, len, prot)
            .map_err(|e| CallError::Refused(e.raw_os_error().unwrap_or(libc::EINVAL))),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            let e = e.errno_or_stop();
            set_errno(e);
            -1
        }
    }
}

fn kernel_brk(addr: usize) -> usize {
    // SAFETY: brk takes an address by value and returns the new break.
    unsafe { libc::syscall(libc::SYS_brk, addr) as usize }
}

#[no_mangle]
pub unsafe extern "C" fn brk(addr: *mut c_void) -> c_int {
    let want = addr as usize;
    let got = match managing() {
        Some(rt) => rt.brk(want).unwrap_or_else(|e| {
            e.errno_or_stop();
            0
        }),
        None => kernel_brk(want),
    };
    if got == want {
        0
    } else {
        set_errno(libc::ENOMEM);
        -1
    }
}

#[no_mangle]
pub unsafe extern "C" fn sbrk(incr: intptr_t) -> *mut c_void {
    let rt = managing();
    let cur = match rt {
        Some(rt) => rt.brk(0).unwrap_or_else(|e| {
            e.errno_or_stop();
            0
        }),
        None => kernel_brk(0),
    };
    if incr == 0 {
        return cur as *mut c_void;
    }
    let want = cur.wrapping_add_signed(incr);
    let got = match rt {
        Some(rt) => rt.brk(want).unwrap_or_else(|e| {
            e.errno_or_stop();
            0
        }),
        None => kernel_brk(want),
    };
    if got == want {
        cur as *mut c_void
    } else {
        set_errno(libc::ENOMEM);
        usize::MAX as *mut c_void
    }
}
