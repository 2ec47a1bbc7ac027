//! The lego processor runtime (LegoOS's processor monitor, in-process
//! half). `lego run` preloads this library into an unmodified, dynamically
//! linked program; it takes the program's anonymous memory into one
//! userfaultfd-registered region whose pages live on memory daemons, with
//! at most the ExCache budget resident locally.
//!
//! - [`pager`]: the pager core: miss, prefetch, eviction and writeback
//!   decisions against two traits (the page table, the memory daemons),
//!   with no syscalls; unit and property tests drive it with fakes;
//! - [`excache`] and [`prefetch`]: its pure parts, page states and eviction
//!   order, and prefetch decisions;
//! - [`pool`]: the daemon pool, connections and typed errors;
//! - [`placement`]: which memory daemon holds each unit of the region;
//! - [`uffd_table`]: the real page table, userfaultfd;
//! - [`runtime`]: the runtime of a process and its pager thread;
//! - [`memory_calls`]: mmap, munmap, mremap, madvise, mprotect, brk, free;
//! - `interpose`: the C functions replaced in the program;
//! - [`migrate`]: moving memory off draining daemons;
//! - [`lifecycle`]: init, fork (exec and exit need nothing);
//! - [`heap`]: the region heap behind `malloc`, and the runtime's own heap;
//! - [`region`]: the reserved virtual range;
//! - [`coverage`]: how much anonymous memory stays outside the region;
//! - [`config`]: settings from the environment.

pub mod config;
pub mod coverage;
pub mod excache;
pub mod heap;
#[cfg(not(test))]
mod interpose;
pub mod lifecycle;
pub mod memory_calls;
pub mod pager;
pub mod placement;
pub mod pool;
pub mod prefetch;
pub mod region;
pub mod repair;
pub mod runtime;
pub mod side;
pub mod spin;
pub mod tier;
pub mod uffd_table;

#[global_allocator]
static GLOBAL: heap::InternalAlloc = heap::InternalAlloc;

#[cfg(not(test))]
extern "C" fn on_load() {
    lifecycle::init();
}

#[cfg(not(test))]
extern "C" fn on_unload() {
    if let Some(rt) = runtime::get() {
        rt.sample_coverage();
    }
}

#[cfg(not(test))]
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = on_load;

#[cfg(not(test))]
#[used]
#[link_section = ".fini_array"]
static FINI: extern "C" fn() = on_unload;
