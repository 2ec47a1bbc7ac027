//! The lego processor runtime (LegoOS's processor monitor, in-process
//! half). `lego run` preloads this library into an unmodified, dynamically
//! linked program; it takes the program's anonymous memory into one
//! userfaultfd-registered region whose pages live on memory daemons, with
//! at most the ExCache budget resident locally.
//!
//! - [`heap`]: the region heap behind `malloc`, and the runtime's own heap;
//! - `interpose`: the C functions replaced in the program;
//! - [`region`]: the reserved virtual range;
//! - [`excache`]: page states and eviction order;
//! - [`placement`]: which memory daemon holds each part of the region;
//! - [`runtime`]: connections, pager thread, miss and eviction paths;
//! - [`coverage`]: how much anonymous memory stays outside the region;
//! - [`config`]: settings from the environment.

pub mod config;
pub mod coverage;
pub mod excache;
pub mod heap;
#[cfg(not(test))]
mod interpose;
pub mod placement;
pub mod prefetch;
pub mod region;
pub mod runtime;

#[global_allocator]
static GLOBAL: heap::InternalAlloc = heap::InternalAlloc;

#[cfg(not(test))]
extern "C" fn on_load() {
    runtime::init();
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
