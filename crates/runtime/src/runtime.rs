//! The runtime of one process: the pager and the daemon pool under one
//! lock, the layout connection, and the pager thread that serves
//! userfaultfd faults. This thread and the memory calls of the program's
//! threads ([`crate::memory_calls`]) are the only places that decide a
//! program must stop ([`stop`]).
//!
//! # Locks
//! `state` (pager and pool) is taken before `layout` (the layout
//! connections), never the other way round; fork takes both.
//!
//! # Runtime threads never touch disaggregated memory
//! A runtime thread that faults on the region waits for a page only it
//! could bring back: a deadlock nobody can break. So everything a runtime
//! thread reads lives on the runtime's own heap or stack, or in memory glibc
//! allocated for itself (which the region heap never serves, see
//! [`crate::heap::internal_for`]). That includes the environment (`getenv`
//! reads `environ`, which the program may have reallocated into the
//! region): settings are read once, at start.

use std::fmt::Display;
use std::sync::atomic::{AtomicPtr, Ordering, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lego_protocol::{SpaceId, PAGE_SIZE};
use lego_sys::process::{self, die};
use lego_sys::stats::SharedStats;
use lego_sys::uffd::Uffd;

use crate::config::Tuning;
use crate::coverage;
use crate::heap::RuntimeScope;
use crate::memory_calls::LayoutConn;
use crate::pager::{Fault, Pager, PagerError};
use crate::pool::DaemonPool;
use crate::region::Region;
use crate::spin::Keeper;
use crate::uffd_table::UffdTable;

/// What the pager thread works on, and the program's memory calls too.
pub struct State {
    pub pager: Pager,
    pub pool: DaemonPool,
}

/// The process's runtime, created by [`crate::lifecycle::init`] (and again
/// in a forked child).
pub struct Runtime {
    pub region: Region,
    pub(crate) uffd: Uffd,
    /// This process's pidfd (for dropping pages in one call).
    pub(crate) pidfd: i32,
    pub(crate) state: Mutex<State>,
    pub(crate) layout: Mutex<LayoutConn>,
    pub(crate) space: SpaceId,
    /// What attaching to the space takes (chosen here, at its open).
    pub(crate) capability: lego_protocol::Capability,
    pub(crate) program: String,
    pub(crate) timeout: Duration,
    /// How long a daemon whose units have other replicas may keep a
    /// request waiting before it is given up (`LEGO_FAILOVER_MS`).
    pub(crate) failover: Duration,
    pub(crate) stats: Option<&'static SharedStats>,
    pub(crate) tuning: Tuning,
    /// Make the pager fault on its own region (`LEGO_INJECT`), to test
    /// that `lego run` notices a program nobody can page.
    pub(crate) inject_self_fault: bool,
    pub(crate) pid: u32,
    /// Spinning while misses come close together.
    pub(crate) keeper: Keeper,
}

static RUNTIME: AtomicPtr<Runtime> = AtomicPtr::new(std::ptr::null_mut());

/// The runtime, once connected.
pub fn get() -> Option<&'static Runtime> {
    let p = RUNTIME.load(Ordering::Acquire);
    if p.is_null() {
        return None;
    }
    // SAFETY: RUNTIME only ever holds leaked Boxes, never freed.
    Some(unsafe { &*p })
}

/// Makes `rt` the process's runtime, for good.
pub(crate) fn publish(rt: Box<Runtime>) -> &'static Runtime {
    let rt: &'static Runtime = Box::leak(rt);
    RUNTIME.store(rt as *const Runtime as *mut Runtime, Ordering::Release);
    rt
}

/// Forgets the runtime (a fork child, until its own is up).
pub(crate) fn unpublish() {
    RUNTIME.store(std::ptr::null_mut(), Ordering::Release);
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ends the program: the runtime cannot serve its memory any more. Only the
/// pager thread and the memory calls of the program's threads decide this.
pub(crate) fn stop(e: impl Display) -> ! {
    die(&format!("{e}; stopping the program"))
}

impl Runtime {
    /// A new connection to the daemon at `addr`, attached to the space
    /// (the helper threads' own, off the pager's lock).
    pub(crate) fn attach(
        &self,
        addr: &str,
    ) -> Result<lego_transport::FramedConn<std::net::TcpStream>, crate::pool::DaemonError> {
        crate::pool::attach(
            addr,
            &self.program,
            self.timeout,
            (self.space, self.capability),
            (self.region.base, self.region.len),
        )
    }

    pub(crate) fn table(&self) -> UffdTable<'_> {
        UffdTable {
            uffd: &self.uffd,
            pidfd: self.pidfd,
        }
    }

    /// Runs `f` on the pager and pool with the real page table, under the
    /// state lock, and publishes what the pager counted.
    pub(crate) fn with_pager<R>(
        &self,
        f: impl FnOnce(&mut Pager, &mut DaemonPool, &mut UffdTable<'_>) -> R,
    ) -> R {
        self.with_pager_locked(&mut lock(&self.state), f)
    }

    /// [`Runtime::with_pager`], with the lock already held.
    pub(crate) fn with_pager_locked<R>(
        &self,
        st: &mut State,
        f: impl FnOnce(&mut Pager, &mut DaemonPool, &mut UffdTable<'_>) -> R,
    ) -> R {
        let mut t = self.table();
        let r = f(&mut st.pager, &mut st.pool, &mut t);
        self.publish_counters(st);
        r
    }

    /// Adds what the pager and the pool counted to the shared statistics.
    fn publish_counters(&self, st: &mut State) {
        let c = std::mem::take(&mut st.pager.counters);
        let (bytes_out, bytes_in) = st.pool.take_traffic();
        let Some(s) = self.stats else {
            return;
        };
        s.tier_bytes.store(st.pager.tier().bytes() as u64, Relaxed);
        for (counter, n) in [
            (&s.remote_misses, c.remote_misses),
            (&s.zero_fills, c.zero_fills),
            (&s.prefetched, c.prefetched),
            (&s.prefilled, c.prefilled),
            (&s.dirtied, c.dirtied),
            (&s.evictions, c.evictions),
            (&s.writebacks, c.writebacks),
            (&s.zero_drops, c.zero_drops),
            (&s.unchanged_drops, c.unchanged_drops),
            (&s.tier_hits, c.tier_hits),
            (&s.tier_stores, c.tier_stores),
            (&s.tier_incompressible, c.tier_incompressible),
            (&s.bytes_out, bytes_out),
            (&s.bytes_in, bytes_in),
        ] {
            if n != 0 {
                counter.fetch_add(n, Relaxed);
            }
        }
    }

    pub(crate) fn pager_loop(&'static self) -> ! {
        let _scope = RuntimeScope::enter();
        let mut faults = Vec::with_capacity(16);
        let mut fds: Vec<libc::pollfd> = vec![pollin(self.uffd.as_raw_fd())];
        let mut polled = None;
        let started = Instant::now();
        let mut last_sample = started;
        loop {
            // The daemons this program uses (more join while it runs,
            // drained ones are closed).
            {
                let st = lock(&self.state);
                if polled != Some(st.pool.changed) {
                    fds.truncate(1);
                    st.pool.pollfds(&mut fds);
                    polled = Some(st.pool.changed);
                }
            }
            let _ = self.keeper.poll(&mut fds, 500);
            if fds[1..].iter().any(|f| f.revents != 0) {
                let mut st = lock(&self.state);
                if let Err(e) = st.pool.check_idle(readable) {
                    stop(e);
                }
            }
            if fds[0].revents != 0 {
                match self.uffd.read_faults(&mut faults) {
                    Ok(_) => {
                        for f in &faults {
                            self.serve(*f);
                        }
                    }
                    Err(e) => stop(format!("runtime: reading userfaultfd events failed: {e}")),
                }
            }
            if let Err(e) = self.refill_free_pool() {
                stop(e);
            }
            if last_sample.elapsed() >= Duration::from_millis(500) {
                self.sample_coverage();
                last_sample = Instant::now();
            }
            if self.inject_self_fault && started.elapsed() >= Duration::from_millis(300) {
                self.fault_on_own_region();
            }
        }
    }

    /// Serves one fault event.
    fn serve(&self, f: lego_sys::uffd::Fault) {
        let start = Instant::now();
        let fault = Fault {
            page: f.page,
            write: f.write,
            wp: f.wp,
        };
        let mut st = lock(&self.state);
        let missed = self
            .with_pager_locked(&mut st, |pager, pool, t| pager.fault(t, pool, fault))
            .unwrap_or_else(|e| stop(e));
        if missed {
            self.keeper.missed();
        }
        if let (true, Some(s)) = (missed, self.stats) {
            s.record_latency(start.elapsed().as_micros() as u64);
            s.peak_resident_bytes
                .fetch_max(st.pager.local_bytes() as u64, Relaxed);
            s.peak_tier_bytes
                .fetch_max(st.pager.tier().bytes() as u64, Relaxed);
        }
    }

    /// Evicts while the pager has nothing else to do, until a batch of the
    /// budget is free: the misses that follow find room without waiting
    /// for an eviction. Stops as soon as a fault is waiting.
    fn refill_free_pool(&self) -> Result<(), PagerError> {
        loop {
            let evicted = self.with_pager(|pager, pool, t| {
                if pager.has_free_batch() {
                    return Ok(false);
                }
                pager.evict_batch(t, pool).map(|()| true)
            })?;
            if !evicted || readable(self.uffd.as_raw_fd()) {
                return Ok(());
            }
        }
    }

    /// `LEGO_INJECT=pager-self-fault`: reads the region's last page, which
    /// is never resident, from the pager thread, which then waits forever
    /// for itself. A test of `lego run`'s hang detection, nothing else.
    fn fault_on_own_region(&self) -> ! {
        let last = self.region.base + self.region.len - PAGE_SIZE;
        let mut page = vec![0u8; PAGE_SIZE];
        // SAFETY: the region is mapped for the life of the process; the
        // read faults, and nobody serves it, which is the point.
        unsafe { lego_sys::mm::copy_page_out(last, &mut page) };
        stop("runtime: the pager read its own region and was served")
    }

    /// Records this process's coverage: its disaggregated footprint against
    /// the anonymous memory it has outside the region.
    pub fn sample_coverage(&self) {
        let Some(stats) = self.stats else {
            return;
        };
        let _scope = RuntimeScope::enter();
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
            return;
        };
        let local = coverage::anonymous_outside(
            &smaps,
            self.region.base,
            self.region.base + self.region.len,
        );
        let (holding, tier) = {
            let st = lock(&self.state);
            (st.pager.cache().holding(), st.pager.tier().bytes())
        };
        // The compressed tier lies outside the region but is the ExCache's
        // (its pages count as disaggregated), not memory lego left local.
        let local = local.saturating_sub(tier as u64);
        stats.record_coverage(self.pid, (holding * PAGE_SIZE) as u64, local);
    }
}

fn pollin(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Whether `fd` has data (or a hang-up) now.
fn readable(fd: i32) -> bool {
    process::poll(&mut [pollin(fd)], 0).unwrap_or(0) > 0
}
