//! The disaggregated region: one large virtual range reserved at the first
//! allocation, registered with userfaultfd once the runtime connects. All
//! disaggregated memory of the process lives inside it, so one registration
//! covers everything (thousands of small registrations would fail).

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use lego_sys::mm;

/// Default size of the reservation (virtual; costs nothing until touched).
pub const DEFAULT_REGION_BYTES: usize = 64 << 30;

static STATE: AtomicU8 = AtomicU8::new(0); // 0 none, 1 reserving, 2 ready, 3 failed
static BASE: AtomicUsize = AtomicUsize::new(0);
static LEN: AtomicUsize = AtomicUsize::new(0);

/// The reserved range.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub base: usize,
    pub len: usize,
}

impl Region {
    pub fn contains(&self, addr: usize) -> bool {
        addr >= self.base && addr < self.base + self.len
    }
    /// Whether `[addr, addr+len)` overlaps the region.
    pub fn overlaps(&self, addr: usize, len: usize) -> bool {
        addr < self.base + self.len && addr.saturating_add(len) > self.base
    }
    pub fn covers(&self, addr: usize, len: usize) -> bool {
        addr >= self.base && addr.saturating_add(len) <= self.base + self.len
    }
}

fn configured_len() -> usize {
    // getenv allocates nothing, which matters this early.
    // SAFETY: the name is a NUL-terminated literal; the result is read
    // before any other code could change the environment.
    let p = unsafe { libc::getenv(c"LEGO_REGION_BYTES".as_ptr()) };
    if p.is_null() {
        return DEFAULT_REGION_BYTES;
    }
    // SAFETY: getenv returned a NUL-terminated string.
    let s = unsafe { std::ffi::CStr::from_ptr(p) };
    s.to_str()
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n >= 4 << 30)
        .unwrap_or(DEFAULT_REGION_BYTES)
}

/// Reserves the region if not done yet.
pub fn ensure() {
    if STATE.load(Ordering::Acquire) >= 2 {
        return;
    }
    if STATE
        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        while STATE.load(Ordering::Acquire) == 1 {
            std::hint::spin_loop();
        }
        return;
    }
    let len = configured_len();
    let r = mm::mmap_raw(
        0,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        -1,
        0,
    );
    match r {
        Ok(base) => {
            // Huge pages would defeat 4 KiB ExCache lines.
            let _ = mm::madvise_raw(base, len, libc::MADV_NOHUGEPAGE);
            BASE.store(base, Ordering::Relaxed);
            LEN.store(len, Ordering::Relaxed);
            STATE.store(2, Ordering::Release);
        }
        Err(_) => STATE.store(3, Ordering::Release),
    }
}

/// The region, if reserved.
pub fn get() -> Option<Region> {
    (STATE.load(Ordering::Acquire) == 2).then(|| Region {
        base: BASE.load(Ordering::Relaxed),
        len: LEN.load(Ordering::Relaxed),
    })
}

/// Whether `addr` is in the region.
pub fn contains(addr: usize) -> bool {
    get().is_some_and(|r| r.contains(addr))
}

/// Whether `addr` is in the bootstrap area (allocations made before the
/// runtime connected; never returned).
pub fn in_bootstrap(addr: usize) -> bool {
    get().is_some_and(|r| addr >= r.base && addr < r.base + crate::heap::BOOTSTRAP_BYTES)
}
