//! The two heaps of a preloaded process.
//!
//! - The **region heap** serves the program's `malloc` family. It is a
//!   dlmalloc whose memory comes from the disaggregated region: chunks are
//!   placed by the home memory daemon (`Mmap`), or, before the runtime has
//!   connected, bump-allocated from the region's bootstrap area.
//! - The **internal heap** serves the runtime itself (Rust's global
//!   allocator in this library) and any `malloc` made while a thread is
//!   marked as runtime code ([`RuntimeScope`]). It takes memory straight from
//!   the kernel, never from the region, so the pager can never fault on its
//!   own data.
//!
//! Pointers are freed by whichever heap owns their address.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use dlmalloc::{Allocator, Dlmalloc};
use lego_sys::mm;

use crate::region;

thread_local! {
    static IN_RUNTIME: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread as running runtime code while alive: its
/// allocations go to the internal heap and its memory calls pass through.
pub struct RuntimeScope {
    was: bool,
}

impl RuntimeScope {
    pub fn enter() -> Self {
        Self {
            was: IN_RUNTIME.with(|c| c.replace(true)),
        }
    }
}

impl Drop for RuntimeScope {
    fn drop(&mut self) {
        IN_RUNTIME.with(|c| c.set(self.was));
    }
}

/// A call of a program thread into the runtime: runtime code (as
/// [`RuntimeScope`]) with every signal blocked, so no handler of the
/// program runs (or forks) while the thread holds a runtime lock.
pub struct RuntimeCall {
    _scope: RuntimeScope,
    _signals: lego_sys::process::SignalsBlocked,
}

impl RuntimeCall {
    pub fn enter() -> Self {
        Self {
            _signals: lego_sys::process::SignalsBlocked::new(),
            _scope: RuntimeScope::enter(),
        }
    }
}

/// Marks the calling thread as a runtime thread for good (the pager).
pub fn mark_runtime_thread() {
    IN_RUNTIME.with(|c| c.set(true));
}

/// Whether the current thread is running runtime code.
pub fn in_runtime() -> bool {
    IN_RUNTIME.try_with(|c| c.get()).unwrap_or(true)
}

/// The code of the C library and of the dynamic loader, as `[start, end)`
/// ranges, learnt once at start-up ([`learn_system_code`]).
static SYSTEM_CODE: [(AtomicUsize, AtomicUsize); 8] =
    [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; 8];

/// Records where the C library's and the loader's code lie.
pub fn learn_system_code() {
    let ranges = lego_sys::loader::system_code_ranges();
    for (slot, &(start, end)) in SYSTEM_CODE.iter().zip(&ranges) {
        slot.0.store(start, Ordering::Relaxed);
        slot.1.store(end, Ordering::Release);
    }
}

/// Whether a call made from `caller` (a return address) is glibc's own:
/// code of the C library or of the loader.
fn called_by_system(caller: usize) -> bool {
    SYSTEM_CODE.iter().any(|(start, end)| {
        let end = end.load(Ordering::Acquire);
        end != 0 && caller < end && caller >= start.load(Ordering::Relaxed)
    })
}

/// Whether an allocation requested from `caller` comes from the internal
/// heap: made by runtime code, or by glibc for itself.
///
/// Memory glibc allocates for itself is process-wide state that runtime
/// threads read too, and it must never fault: the locale data a new
/// thread's start-up reads (`setlocale` allocated it; seen deadlocking a
/// thread created after fork), the loader's link maps and TLS tables that
/// `pthread_create` walks, name-service and time-zone state. Such a
/// read of a page only the reading thread could bring back is a deadlock,
/// so that state lives in memory that is never evicted. The program's own
/// data (what it, or any other library, allocates) is disaggregated.
pub fn internal_for(caller: usize) -> bool {
    in_runtime() || called_by_system(caller)
}

/// A test-and-set lock that needs no allocation and can be held across
/// `fork` (see [`prepare_fork`]).
pub struct SpinLock<T> {
    locked: AtomicBool,
    /// The holder's [`lego_sys::process::thread_id`] (0: none), so that a
    /// fork from a signal handler that interrupted the holder does not wait
    /// for itself.
    owner: AtomicUsize,
    value: std::cell::UnsafeCell<T>,
}

// SAFETY: access to `value` is serialised by `locked`.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    pub const fn new(value: T) -> Self {
        Self {
            locked: AtomicBool::new(false),
            owner: AtomicUsize::new(0),
            value: std::cell::UnsafeCell::new(value),
        }
    }

    fn acquire(&self) {
        let mut spins = 0u32;
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        self.owner
            .store(lego_sys::process::thread_id(), Ordering::Relaxed);
    }

    fn release(&self) {
        self.owner.store(0, Ordering::Relaxed);
        self.locked.store(false, Ordering::Release);
    }

    /// Whether the calling thread holds the lock.
    fn held_here(&self) -> bool {
        self.locked.load(Ordering::Acquire)
            && self.owner.load(Ordering::Relaxed) == lego_sys::process::thread_id()
    }

    /// Acquires the lock for a fork unless the calling thread holds it
    /// already (the fork is made by a signal handler that interrupted the
    /// holder, which releases it when the handler returns, in the parent
    /// and in the child alike). Returns whether it was acquired here.
    fn acquire_for_fork(&self) -> bool {
        if self.held_here() {
            return false;
        }
        self.acquire();
        true
    }

    /// Runs `f` with the lock held.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        self.acquire();
        // SAFETY: the lock is held, so this is the only reference.
        let r = f(unsafe { &mut *self.value.get() });
        self.release();
        r
    }
}

/// Memory for the internal heap, straight from the kernel.
pub struct KernelPages;

// SAFETY: every method returns memory freshly mapped by the kernel or gives
// back exactly what it was handed, as dlmalloc's contract requires.
unsafe impl Allocator for KernelPages {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        match mm::mmap_raw(
            0,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        ) {
            Ok(a) => {
                // A read of a sparse table (the page states) must not pull
                // in a 2 MiB huge page.
                let _ = mm::madvise_raw(a, size, libc::MADV_NOHUGEPAGE);
                (a as *mut u8, size, 0)
            }
            Err(_) => (std::ptr::null_mut(), 0, 0),
        }
    }
    fn remap(&self, ptr: *mut u8, oldsize: usize, newsize: usize, can_move: bool) -> *mut u8 {
        let flags = if can_move { libc::MREMAP_MAYMOVE } else { 0 };
        mm::mremap_raw(ptr as usize, oldsize, newsize, flags, 0)
            .map(|a| a as *mut u8)
            .unwrap_or(std::ptr::null_mut())
    }
    fn free_part(&self, ptr: *mut u8, oldsize: usize, newsize: usize) -> bool {
        mm::munmap_raw(ptr as usize + newsize, oldsize - newsize).is_ok()
    }
    fn free(&self, ptr: *mut u8, size: usize) -> bool {
        mm::munmap_raw(ptr as usize, size).is_ok()
    }
    fn can_release_part(&self, _flags: u32) -> bool {
        true
    }
    fn allocates_zeros(&self) -> bool {
        true
    }
    fn page_size(&self) -> usize {
        lego_sys::PAGE_SIZE
    }
}

/// The smallest free tail of the region heap given back to the layout (as
/// glibc's largest dynamic trim threshold).
pub const TRIM_MIN_BYTES: usize = 32 << 20;

/// Memory for the region heap: disaggregated ranges.
pub struct RegionPages;

/// Bytes of the region handed out before the runtime connected.
pub static BOOTSTRAP_USED: AtomicUsize = AtomicUsize::new(0);
/// Size of the bootstrap area at the start of the region.
pub const BOOTSTRAP_BYTES: usize = 256 << 20;

fn bootstrap_alloc(size: usize) -> Option<usize> {
    let base = region::get()?.base;
    let size = size.div_ceil(lego_sys::PAGE_SIZE) * lego_sys::PAGE_SIZE;
    let off = BOOTSTRAP_USED.fetch_add(size, Ordering::SeqCst);
    if off + size > BOOTSTRAP_BYTES {
        return None;
    }
    Some(base + off)
}

// SAFETY: ranges come from the region's layout (owned by the home daemon)
// or the bootstrap area, never overlap live allocations, and read as zeros
// when fresh (they were discarded locally and remotely when last freed).
unsafe impl Allocator for RegionPages {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        let addr = match crate::runtime::get() {
            Some(rt) => rt.map(size).map_err(|e| e.errno_or_stop()).ok(),
            None => {
                region::ensure();
                bootstrap_alloc(size)
            }
        };
        match addr {
            Some(a) => (a as *mut u8, size, 0),
            None => (std::ptr::null_mut(), 0, 0),
        }
    }
    fn remap(&self, _ptr: *mut u8, _old: usize, _new: usize, _can_move: bool) -> *mut u8 {
        std::ptr::null_mut()
    }
    fn free_part(&self, ptr: *mut u8, oldsize: usize, newsize: usize) -> bool {
        // Trimming the heap's top: the tail goes back to the layout and its
        // pages are freed at the daemons. Only a large tail: a program that
        // frees and reallocates a few MiB at the top in a loop (numpy's
        // temporaries) would otherwise pay a layout round trip and a fresh
        // zero fill of every page each time. A refusal stops dlmalloc's own
        // trimming until the heap grows; `free` retries after large blocks.
        if oldsize - newsize < TRIM_MIN_BYTES {
            return false;
        }
        match crate::runtime::get() {
            Some(rt) if !region::in_bootstrap(ptr as usize) => rt
                .unmap(ptr as usize + newsize, oldsize - newsize)
                .map_err(|e| e.errno_or_stop())
                .is_ok(),
            _ => false,
        }
    }
    fn free(&self, ptr: *mut u8, size: usize) -> bool {
        match crate::runtime::get() {
            Some(rt) if !region::in_bootstrap(ptr as usize) => rt
                .unmap(ptr as usize, size)
                .map_err(|e| e.errno_or_stop())
                .is_ok(),
            _ => false,
        }
    }
    fn can_release_part(&self, _flags: u32) -> bool {
        crate::runtime::get().is_some()
    }
    fn allocates_zeros(&self) -> bool {
        true
    }
    fn page_size(&self) -> usize {
        lego_sys::PAGE_SIZE
    }
}

pub static INTERNAL: SpinLock<Dlmalloc<KernelPages>> =
    SpinLock::new(Dlmalloc::new_with_allocator(KernelPages));

pub static REGION_HEAP: SpinLock<Dlmalloc<RegionPages>> = SpinLock::new({
    let mut d = Dlmalloc::new_with_allocator(RegionPages);
    // Grow the heap 1 MiB at a time: each growth is a round trip to the
    // home memory daemon.
    assert!(d.set_granularity(1 << 20));
    d
});

/// Usable bytes of a dlmalloc allocation, read from its chunk header
/// (size word before the pointer; mmapped chunks have both in-use bits clear
/// and two words of overhead, others one).
///
/// # Safety
/// `ptr` must be a live allocation of one of the two heaps.
pub unsafe fn usable_size(ptr: *mut u8) -> usize {
    // SAFETY: a live dlmalloc chunk has its head word just before the
    // user pointer.
    let head = unsafe { *(ptr as *const usize).sub(1) };
    let size = head & !7;
    let overhead = if head & 3 == 0 { 16 } else { 8 };
    size - overhead
}

/// Allocations at least this large bypass dlmalloc and come straight from
/// the kernel (already zeroed, returned on free).
const DIRECT_BYTES: usize = 256 << 10;

fn is_direct(l: std::alloc::Layout) -> bool {
    l.size() >= DIRECT_BYTES && l.align() <= lego_sys::PAGE_SIZE
}

/// Rust's allocator for this library: always the internal heap.
pub struct InternalAlloc;

// SAFETY: forwards to dlmalloc under its lock, or to the kernel for large
// blocks, honouring size and alignment; a block is freed the way it was
// allocated (the choice depends only on its layout).
unsafe impl std::alloc::GlobalAlloc for InternalAlloc {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        if is_direct(l) {
            return KernelPages.alloc(l.size()).0;
        }
        // SAFETY: dlmalloc's contract matches GlobalAlloc's.
        INTERNAL.with(|d| unsafe { d.malloc(l.size(), l.align()) })
    }
    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        if is_direct(l) {
            return KernelPages.alloc(l.size()).0;
        }
        // SAFETY: as above.
        INTERNAL.with(|d| unsafe { d.calloc(l.size(), l.align()) })
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        if is_direct(l) {
            KernelPages.free(p, l.size());
            return;
        }
        // SAFETY: p came from this allocator with layout l.
        INTERNAL.with(|d| unsafe { d.free(p, l.size(), l.align()) })
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        let nl = std::alloc::Layout::from_size_align(new, l.align()).expect("valid layout");
        if is_direct(l) && is_direct(nl) {
            return KernelPages.remap(p, l.size(), new, true);
        }
        if is_direct(l) || is_direct(nl) {
            // SAFETY: a fresh block of the new layout, then copy and free.
            unsafe {
                let q = self.alloc(nl);
                if !q.is_null() {
                    std::ptr::copy_nonoverlapping(p, q, l.size().min(new));
                    self.dealloc(p, l);
                }
                return q;
            }
        }
        // SAFETY: p came from this allocator with layout l.
        INTERNAL.with(|d| unsafe { d.realloc(p, l.size(), l.align(), new) })
    }
}

// fork: the child must not inherit a heap locked by a thread that does not
// exist in it. The region heap is taken first (its holders may need the
// runtime's locks), the internal heap last (everyone may need it). A lock
// the forking thread already holds (a fork from a signal handler) is
// neither taken nor released by the fork.

/// Which heaps `prepare_fork_*` acquired (bit 0: region, bit 1: internal).
static FORK_TAKEN: AtomicUsize = AtomicUsize::new(0);

pub fn prepare_fork_region() {
    if REGION_HEAP.acquire_for_fork() {
        FORK_TAKEN.fetch_or(1, Ordering::Relaxed);
    }
}
pub fn prepare_fork_internal() {
    if INTERNAL.acquire_for_fork() {
        FORK_TAKEN.fetch_or(2, Ordering::Relaxed);
    }
}
pub fn finish_fork_internal() {
    if FORK_TAKEN.fetch_and(!2, Ordering::Relaxed) & 2 != 0 {
        INTERNAL.release();
    }
}
pub fn finish_fork_region() {
    if FORK_TAKEN.fetch_and(!1, Ordering::Relaxed) & 1 != 0 {
        REGION_HEAP.release();
    }
}

/// Kernel memory for a [`CountedHeap`], counting what is mapped.
pub struct CountedPages {
    mapped: AtomicUsize,
}

// SAFETY: forwards to KernelPages (whose contract holds) and only counts.
unsafe impl Allocator for CountedPages {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        let r = KernelPages.alloc(size);
        self.mapped.fetch_add(r.1, Ordering::Relaxed);
        r
    }
    fn remap(&self, ptr: *mut u8, oldsize: usize, newsize: usize, can_move: bool) -> *mut u8 {
        let p = KernelPages.remap(ptr, oldsize, newsize, can_move);
        if !p.is_null() {
            self.mapped.fetch_add(newsize, Ordering::Relaxed);
            self.mapped.fetch_sub(oldsize, Ordering::Relaxed);
        }
        p
    }
    fn free_part(&self, ptr: *mut u8, oldsize: usize, newsize: usize) -> bool {
        let ok = KernelPages.free_part(ptr, oldsize, newsize);
        if ok {
            self.mapped.fetch_sub(oldsize - newsize, Ordering::Relaxed);
        }
        ok
    }
    fn free(&self, ptr: *mut u8, size: usize) -> bool {
        let ok = KernelPages.free(ptr, size);
        if ok {
            self.mapped.fetch_sub(size, Ordering::Relaxed);
        }
        ok
    }
    fn can_release_part(&self, flags: u32) -> bool {
        KernelPages.can_release_part(flags)
    }
    fn allocates_zeros(&self) -> bool {
        true
    }
    fn page_size(&self) -> usize {
        lego_sys::PAGE_SIZE
    }
}

/// A block of a [`CountedHeap`]: owned by it, freed only through it.
pub struct Block {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: a Block is plain memory owned by one CountedHeap; whoever owns
// the heap owns its blocks and uses them under the same lock.
unsafe impl Send for Block {}

/// A private heap whose footprint is known exactly: every byte it has
/// from the kernel, free space between blocks included (the compressed
/// tier's, so that what it takes of the ExCache budget is what it holds).
pub struct CountedHeap {
    /// Boxed: dlmalloc's bins point into its own state, which must not
    /// move once used (the heap's owner does move).
    heap: Box<Dlmalloc<CountedPages>>,
    blocks: usize,
}

impl Default for CountedHeap {
    fn default() -> Self {
        Self::new()
    }
}

impl CountedHeap {
    pub fn new() -> Self {
        Self {
            heap: Self::fresh(),
            blocks: 0,
        }
    }

    fn fresh() -> Box<Dlmalloc<CountedPages>> {
        let mut heap = Dlmalloc::new_with_allocator(CountedPages {
            mapped: AtomicUsize::new(0),
        });
        // Grow 16 KiB at a time: the footprint follows what is stored, and
        // each segment's unusable tail (up to a block) stays small.
        assert!(heap.set_granularity(16 << 10));
        Box::new(heap)
    }

    /// Bytes mapped from the kernel.
    pub fn footprint(&self) -> usize {
        self.heap.allocator().mapped.load(Ordering::Relaxed)
    }

    /// A new block holding a copy of `data` (not empty); `None` if the
    /// kernel has no memory.
    pub fn store(&mut self, data: &[u8]) -> Option<Block> {
        assert!(!data.is_empty());
        // SAFETY: a fresh allocation of data.len() bytes, written in full
        // before it is read.
        let ptr = unsafe { self.heap.malloc(data.len(), 8) };
        let ptr = std::ptr::NonNull::new(ptr)?;
        // SAFETY: ptr has room for data.len() bytes and does not overlap it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), data.len()) };
        self.blocks += 1;
        Some(Block {
            ptr,
            len: data.len(),
        })
    }

    /// The contents of `b`, a block of this heap.
    pub fn get(&self, b: &Block) -> &[u8] {
        // SAFETY: b is a live block of this heap (the heap owns its blocks
        // and frees them only through `free`, which takes the Block).
        unsafe { std::slice::from_raw_parts(b.ptr.as_ptr(), b.len) }
    }

    /// Frees `b`, a block of this heap. The last block freed gives all the
    /// heap's memory back to the kernel.
    pub fn free(&mut self, b: Block) {
        // SAFETY: b came from this heap's malloc with this size and align.
        unsafe { self.heap.free(b.ptr.as_ptr(), b.len, 8) };
        self.blocks -= 1;
        if self.blocks == 0 {
            self.reset();
        }
    }

    /// Moves every live block (`blocks`: all of them) into a fresh heap
    /// and gives the old one's memory back: the footprint shrinks to what
    /// is stored, where freeing leaves holes the kernel does not get back.
    /// On failure (the kernel has no memory) nothing changes.
    pub fn repack(&mut self, blocks: &mut [&mut Block]) -> bool {
        assert_eq!(blocks.len(), self.blocks, "every live block, once");
        let mut fresh = CountedHeap::new();
        let mut moved = Vec::with_capacity(blocks.len());
        for b in blocks.iter() {
            match fresh.store(self.get(b)) {
                Some(n) => moved.push(n),
                None => return false,
            }
        }
        for (b, n) in blocks.iter_mut().zip(moved) {
            **b = n;
        }
        // The old heap, holding no block anyone has, is dropped: all its
        // memory goes back.
        std::mem::swap(self, &mut fresh);
        true
    }

    /// Gives every byte back to the kernel.
    ///
    /// # Safety
    /// No block of the heap may be used afterwards.
    unsafe fn release_all(&mut self) {
        let heap = std::mem::replace(&mut self.heap, Self::fresh());
        // SAFETY: by the caller, no block of the old heap is used again.
        unsafe { (*heap).destroy() };
        self.blocks = 0;
    }

    fn reset(&mut self) {
        // SAFETY: no block of the heap is live (blocks == 0).
        unsafe { self.release_all() };
    }
}

impl Drop for CountedHeap {
    fn drop(&mut self) {
        // SAFETY: the heap's owner drops its blocks with it; none is used
        // after this.
        unsafe { self.release_all() };
    }
}
