//! lego's trusted base: every `unsafe` operation the processor side needs,
//! behind safe wrappers. Other crates deny `unsafe_code` (the runtime's
//! interposed C entry points are the one other place that needs it).
//!
//! - [`uffd`]: userfaultfd (open, API handshake, register, copy,
//!   write-protect, wake, read events) with raw ioctls;
//! - [`mm`]: memory syscalls issued directly, bypassing the `mmap`/`munmap`
//!   symbols that the runtime interposes;
//! - [`stats`]: the statistics page shared between `lego run` and the
//!   runtime of every process it starts;
//! - [`process`]: the few process-control calls `lego run` needs;
//! - [`loader`]: where the C library's and the dynamic loader's code lie;
//! - [`ns`]: the namespaces and mounts a vNode's programs run in.

pub mod loader;
pub mod mm;
pub mod ns;
pub mod process;
pub mod stats;
pub mod uffd;

/// Bytes in a page.
pub const PAGE_SIZE: usize = 4096;

/// The current `errno` as an [`std::io::Error`].
pub fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}
