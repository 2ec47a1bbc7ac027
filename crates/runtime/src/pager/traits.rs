//! What the pager core works against: the page table and the memory
//! daemons, as traits; what it reports: errors and counters.

use lego_protocol::VirtAddr;

use crate::pool::DaemonError;

/// The local page table of the region, as the pager uses it.
pub trait PageTable {
    /// Installs `src` (whole pages) at `addr`, write-protected if `wp`, and
    /// wakes the threads waiting on those pages. Returns how many pages
    /// were installed: fewer than given when one was present already.
    fn copy_in(&mut self, addr: usize, src: &[u8], wp: bool) -> Result<usize, TableError>;
    /// Sets or lifts write protection (lifting it wakes waiting writers).
    fn write_protect(&mut self, addr: usize, len: usize, on: bool) -> Result<(), TableError>;
    /// Wakes the threads waiting on a range without resolving their faults.
    fn wake(&mut self, addr: usize, len: usize);
    /// Copies the resident page at `addr` into `dst` (one page).
    fn copy_out(&mut self, addr: usize, dst: &mut [u8]);
    /// Drops the pages of `ranges` (address, length): they read as missing.
    fn drop_pages(&mut self, ranges: &[(usize, usize)]) -> Result<(), TableError>;
}

/// A page-table operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The range is no longer mapped (the program unmapped it while a
    /// fault on it was being served).
    #[error("the range is no longer mapped")]
    Gone,
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The memory daemons of a space, numbered, as the pager uses them. A unit
/// may have several replicas: the backing writes to all of them and reads
/// from one, and gives up a daemon that fails if the others hold its units
/// (the pager does not see it).
pub trait Backing {
    /// The daemon to read `addr` from, if its unit is placed.
    fn daemon_of(&self, addr: usize) -> Option<usize>;
    /// Places `addr`'s unit now if it is not yet (before a writeback).
    fn ensure_placed(&mut self, addr: usize) -> Result<(), DaemonError>;
    /// A page of `addr`'s unit was written: it will be written back some
    /// day, so its unit is placed now if it is not yet, ahead of need (not
    /// waited for).
    fn place_ahead(&mut self, addr: usize);
    /// Reads pages `addrs`, all read from daemon `d` ([`Backing::daemon_of`]):
    /// their contents, in order.
    fn read_pages(&mut self, d: usize, addrs: &[VirtAddr]) -> Result<&[u8], DaemonError>;
    /// Sends a write of pages `addrs` (contents `data`, their units placed)
    /// to every replica of their units; it counts as done only after
    /// [`Backing::await_writes`].
    fn write_pages(&mut self, addrs: &[VirtAddr], data: &[u8]) -> Result<(), DaemonError>;
    /// Waits until every write sent is acknowledged by every replica.
    fn await_writes(&mut self) -> Result<(), DaemonError>;
    /// Daemon `d` forgets `[addr, addr+len)`.
    fn discard_on(&mut self, d: usize, addr: usize, len: usize) -> Result<(), DaemonError>;
    /// The daemons holding a replica of some unit of `[addr, addr+len)`,
    /// each once.
    fn holders(&self, addr: usize, len: usize) -> Vec<usize>;
    /// The daemon that holds the layout (and forgets the contents of a
    /// range it unmaps by itself).
    fn home(&self) -> usize;
}

/// Why the pager could not do what was asked. The pager loop and the
/// interposers decide what it means for the program.
#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    #[error("cannot {what} page {addr:#x}: {source}")]
    Table {
        what: &'static str,
        addr: usize,
        #[source]
        source: TableError,
    },
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("the ExCache is full but nothing can be evicted")]
    Stuck,
}

pub(super) fn table(what: &'static str, addr: usize) -> impl FnOnce(TableError) -> PagerError {
    move |source| PagerError::Table { what, addr, source }
}

/// A fault as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub page: usize,
    /// The access was a write.
    pub write: bool,
    /// A write to a write-protected page (not a miss).
    pub wp: bool,
}

/// What the pager counted; the runtime adds them to the shared statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub remote_misses: u64,
    pub zero_fills: u64,
    pub prefetched: u64,
    pub prefilled: u64,
    pub dirtied: u64,
    pub evictions: u64,
    pub writebacks: u64,
    pub zero_drops: u64,
    pub unchanged_drops: u64,
    /// Misses served from the compressed tier.
    pub tier_hits: u64,
    /// Evicted pages stored in the tier.
    pub tier_stores: u64,
    /// Evicted pages tried that did not compress enough to be kept.
    pub tier_incompressible: u64,
}
