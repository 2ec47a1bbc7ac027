//! The pager core: what a miss brings in, which pages leave and how they
//! are written back, what happens to the pages of a range the program
//! unmaps, frees or moves. No syscalls and no sockets: the page table and
//! the memory daemons are the two traits below; the runtime passes the
//! real ones (userfaultfd, the daemon pool), the unit tests fakes.
//!
//! # Miss
//! fault on page `i` → resident? (a write to a clean page: mark it dirty,
//! lift the write protection) : plan the miss (the page, and what the
//! prefetcher predicts, split at a change of daemon) → make room (evict
//! batches until it fits) → install the faulting page first (its thread
//! resumes at once), then the pages fetched ahead, then the never-written
//! pages ahead (zero-filled).
//!
//! A miss on a page in the compressed tier ([`crate::tier`]) is served from
//! it, with no network trip.
//!
//! # Eviction
//! take a batch of victims → write-protect the dirty ones (writers now wait
//! in a write-protect fault) → copy them out; one that still holds what it
//! was installed with needs no writeback → each victim the daemons hold,
//! and each written one, goes into the compressed tier if it compresses;
//! a written one that does not is written back → while the tier is over
//! its share, its oldest pages leave it (the written ones are written
//! back) → send one write per daemon → wait for every ack → drop all
//! victims → blocked writers fault again and are served as misses. Clean
//! pages are write-protected from the moment they are installed, so
//! dropping them needs no writeback and cannot lose a write.
//!
//! A page in the tier counts as remote in the ExCache; the tier alone knows
//! whether the daemons' copy is current (its *dirty* flag), so no daemon's
//! copy of a tier page is ever read: a miss takes it from the tier, and
//! whatever moves or reads a range at the daemons first writes the
//! range's dirty tier pages there.

use lego_protocol::{VirtAddr, MAX_BATCH_PAGES, PAGE_SIZE};

mod install;
#[cfg(test)]
mod tests;
mod traits;

use install::{install_fault_page, install_runs, spans, Scratch};
use traits::table;
pub use traits::{Backing, Counters, Fault, PageTable, PagerError, TableError};

use crate::config::MAX_PREFETCH_PAGES;
use crate::excache::{ExCache, Victim};
use crate::pool::DaemonError;
use crate::prefetch::Prefetcher;
use crate::tier::{Rejected, Tier};

/// Zeros to install from: a fault page and a full prefetch window.
static ZEROS: [u8; (MAX_PREFETCH_PAGES + 1) * PAGE_SIZE] =
    [0; (MAX_PREFETCH_PAGES + 1) * PAGE_SIZE];

/// The pager of one address space: the ExCache, the prefetcher and the
/// scratch lists of the miss and eviction paths.
#[derive(Clone)]
pub struct Pager {
    base: usize,
    len: usize,
    cache: ExCache,
    prefetch: Prefetcher,
    /// Pages evicted per batch.
    batch: usize,
    pub counters: Counters,
    // Scratch lists, kept to avoid allocating on the miss path.
    fetch: Vec<usize>,
    fill: Vec<usize>,
    fetch_addrs: Vec<VirtAddr>,
    victims: Vec<Victim>,
    span_pages: Vec<usize>,
    ranges: Vec<(usize, usize)>,
    /// Writebacks of the batch being evicted.
    wb_addrs: Vec<VirtAddr>,
    wb_data: Vec<u8>,
    unchanged: Vec<usize>,
    runs: Scratch,
    /// Evicted pages kept compressed (off unless [`Pager::with_tier`]).
    tier: Tier,
    /// One page: a victim's contents, or a tier page's.
    page: Vec<u8>,
    /// Pages ahead of a miss to take from the tier.
    from_tier: Vec<usize>,
    tier_pages: Vec<usize>,
    tier_data: Vec<u8>,
}

impl Pager {
    /// The pager of the region `[base, base+len)` with `cache` (its budget
    /// and what is resident already), prefetching up to `prefetch_pages`.
    pub fn new(base: usize, len: usize, cache: ExCache, prefetch_pages: usize) -> Self {
        Self {
            base,
            len,
            batch: (cache.budget() / 16).clamp(8, 256),
            cache,
            prefetch: Prefetcher::new(prefetch_pages),
            counters: Counters::default(),
            fetch: Vec::with_capacity(MAX_PREFETCH_PAGES + 1),
            fill: Vec::with_capacity(MAX_PREFETCH_PAGES + 1),
            fetch_addrs: Vec::with_capacity(MAX_PREFETCH_PAGES + 1),
            victims: Vec::new(),
            span_pages: Vec::new(),
            ranges: Vec::new(),
            wb_addrs: Vec::new(),
            wb_data: Vec::new(),
            unchanged: Vec::new(),
            runs: Scratch::default(),
            tier: Tier::new(0),
            page: vec![0; PAGE_SIZE],
            from_tier: Vec::new(),
            tier_pages: Vec::new(),
            tier_data: Vec::new(),
        }
    }

    /// Gives the compressed tier up to `bytes` of the budget (0: none).
    pub fn with_tier(mut self, bytes: usize) -> Self {
        self.tier = Tier::new(bytes);
        self
    }

    pub fn tier(&self) -> &Tier {
        &self.tier
    }

    /// Local memory in use against the budget: resident pages and the
    /// tier's bytes.
    pub fn local_bytes(&self) -> usize {
        self.cache.resident() * PAGE_SIZE + self.tier.bytes()
    }

    /// Tells the ExCache what the tier takes of the budget.
    fn sync_tier(&mut self) {
        self.cache.set_tier_pages(self.tier.pages());
    }

    pub fn cache(&self) -> &ExCache {
        &self.cache
    }

    fn index(&self, addr: usize) -> usize {
        (addr - self.base) / PAGE_SIZE
    }

    fn addr(&self, index: usize) -> usize {
        self.base + index * PAGE_SIZE
    }

    fn contains(&self, addr: usize) -> bool {
        addr >= self.base && addr < self.base + self.len
    }

    /// Serves one fault. Returns whether it was a miss (the caller times
    /// misses).
    pub fn fault<T: PageTable, B: Backing>(
        &mut self,
        t: &mut T,
        b: &mut B,
        f: Fault,
    ) -> Result<bool, PagerError> {
        if !self.contains(f.page) {
            t.wake(f.page, PAGE_SIZE);
            return Ok(false);
        }
        let i = self.index(f.page);
        if self.cache.is_resident(i) {
            if f.wp {
                self.cache.dirtied(i);
                self.counters.dirtied += 1;
                t.write_protect(f.page, PAGE_SIZE, false)
                    .map_err(table("unprotect", f.page))?;
            } else {
                t.wake(f.page, PAGE_SIZE);
            }
            return Ok(false);
        }
        let hit = self.tier.contains(i);
        self.plan_miss(b, i, hit);
        let remote = !hit && self.cache.is_remote(i);
        // Room for every page planned, the faulting one included (it is in
        // `fetch` only when remote). A tier page leaves the tier first.
        let need = self.fetch.len() + self.fill.len() + self.from_tier.len() + usize::from(!remote);
        let mut page = std::mem::take(&mut self.page);
        page.resize(PAGE_SIZE, 0);
        let dirty = hit && self.tier.take(i, &mut page) == Some(true);
        self.sync_tier();
        let r = self.make_room(t, b, need).and_then(|()| {
            // The faulting page first: its thread resumes as soon as it is in.
            if hit {
                self.install_from_tier(t, i, f.write, dirty, &page)
            } else if !remote {
                // A page written now is written back some day: its unit
                // can be placed now (a page only read stays zeros, needs
                // no place).
                if f.write {
                    b.place_ahead(f.page);
                }
                let zero = &ZEROS[..PAGE_SIZE];
                install_fault_page(t, &mut self.cache, self.base, i, zero, !f.write, false)
            } else {
                Ok(true)
            }
        });
        self.page = page;
        if !r? {
            // Unmapped under us (munmap raced the fault): nothing to do.
            return Ok(true);
        }
        if !self.fetch.is_empty() {
            self.fetch_and_install(t, b, remote.then_some(f.write))?;
        }
        let before = self.cache.resident();
        let zeros = &ZEROS[..self.fill.len() * PAGE_SIZE];
        install_runs(
            t,
            self.base,
            &mut self.cache,
            &self.fill,
            zeros,
            &mut self.runs,
        );
        let c = &mut self.counters;
        if hit {
            c.tier_hits += 1;
        } else if remote {
            c.remote_misses += 1;
        } else {
            c.zero_fills += 1;
        }
        c.prefetched += self.fetch.len().saturating_sub(remote as usize) as u64;
        c.prefilled += (self.cache.resident() - before) as u64;
        self.install_tier_ahead(t)?;
        Ok(true)
    }

    /// Evicts until `need` more pages fit.
    fn make_room<T: PageTable, B: Backing>(
        &mut self,
        t: &mut T,
        b: &mut B,
        need: usize,
    ) -> Result<(), PagerError> {
        while !self.cache.has_room(need) {
            self.evict_batch(t, b)?;
        }
        Ok(())
    }

    /// Installs page `i` taken from the tier (`page`): a dirty one goes in
    /// dirty (the daemons do not hold it), a clean one like a fetched page.
    fn install_from_tier<T: PageTable>(
        &mut self,
        t: &mut T,
        i: usize,
        write: bool,
        dirty: bool,
        page: &[u8],
    ) -> Result<bool, PagerError> {
        let predicted = !write && !dirty && self.cache.predicts_write(i);
        let wp = !write && !dirty && !predicted;
        install_fault_page(t, &mut self.cache, self.base, i, page, wp, predicted)
    }

    /// Installs the pages ahead of a miss that the tier holds (one that
    /// left the tier meanwhile, demoted to make room, is skipped: its own
    /// miss fetches it).
    fn install_tier_ahead<T: PageTable>(&mut self, t: &mut T) -> Result<(), PagerError> {
        if self.from_tier.is_empty() {
            return Ok(());
        }
        let mut page = std::mem::take(&mut self.page);
        page.resize(PAGE_SIZE, 0);
        let ahead = std::mem::take(&mut self.from_tier);
        let mut r = Ok(());
        for &j in &ahead {
            let Some(dirty) = self.tier.take(j, &mut page) else {
                continue;
            };
            match self.install_from_tier(t, j, false, dirty, &page) {
                Ok(true) => self.counters.prefetched += 1,
                Ok(false) => {}
                Err(e) => {
                    r = Err(e);
                    break;
                }
            }
        }
        self.sync_tier();
        (self.from_tier, self.page) = (ahead, page);
        r
    }

    /// Decides what a miss on page `i` brings in: `fetch` gets the remote
    /// pages (`i` first if it is remote), `fill` the never-written pages
    /// ahead to zero-fill (`i` itself is installed separately when not
    /// remote). Resident pages ahead are skipped; the pages stop at the
    /// region's end and at a change of daemon, and take at most a quarter
    /// of the budget.
    fn plan_miss<B: Backing>(&mut self, b: &B, i: usize, in_tier: bool) {
        self.fetch.clear();
        self.fill.clear();
        self.from_tier.clear();
        // One read goes to one daemon: the first remote page's.
        let mut daemon: Option<Option<usize>> = None;
        if self.cache.is_remote(i) && !in_tier {
            self.fetch.push(i);
            daemon = Some(b.daemon_of(self.addr(i)));
        }
        let Some(ahead) = self.prefetch.on_miss(i) else {
            return;
        };
        let pages = self.len / PAGE_SIZE;
        let max = ahead
            .count
            .min(self.cache.budget() / 4)
            .min(MAX_PREFETCH_PAGES);
        for k in 1..=max as i64 {
            let j = ahead.from + k * ahead.stride;
            if j < 0 || j as usize >= pages {
                break;
            }
            let j = j as usize;
            if j == i || self.cache.is_resident(j) {
                continue;
            }
            // A page in the tier is not read from its daemon (whose copy
            // may be stale): it comes from the tier.
            if self.tier.contains(j) {
                self.from_tier.push(j);
                continue;
            }
            if self.cache.is_remote(j) {
                let d = b.daemon_of(self.addr(j));
                if *daemon.get_or_insert(d) != d {
                    break;
                }
                self.fetch.push(j);
            } else {
                self.fill.push(j);
            }
        }
    }

    /// Fetches `fetch` in one read and installs the pages; if `fault_write`
    /// is set the first one is the faulting page (installed writable if the
    /// fault was a write or a write is predicted), the others are
    /// prefetched (see [`install_runs`]).
    fn fetch_and_install<T: PageTable, B: Backing>(
        &mut self,
        t: &mut T,
        b: &mut B,
        fault_write: Option<bool>,
    ) -> Result<(), PagerError> {
        let first = self.addr(self.fetch[0]);
        let d = b
            .daemon_of(first)
            .ok_or(DaemonError::Unplaced { addr: first })?;
        self.fetch_addrs.clear();
        for k in 0..self.fetch.len() {
            self.fetch_addrs
                .push(VirtAddr(self.addr(self.fetch[k]) as u64));
        }
        let data = b.read_pages(d, &self.fetch_addrs)?;
        let mut k = 0;
        if let Some(write) = fault_write {
            let i = self.fetch[0];
            let predicted = !write && self.cache.predicts_write(i);
            let wp = !write && !predicted;
            let page = &data[..PAGE_SIZE];
            install_fault_page(t, &mut self.cache, self.base, i, page, wp, predicted)?;
            k = 1;
        }
        // Prefetched pages, one copy per run of neighbours: clean, but
        // writable if their last residency was written.
        install_runs(
            t,
            self.base,
            &mut self.cache,
            &self.fetch[k..],
            &data[k * PAGE_SIZE..],
            &mut self.runs,
        );
        Ok(())
    }

    /// Whether a batch of the budget is free (the pager loop evicts
    /// between faults until it is).
    pub fn has_free_batch(&self) -> bool {
        self.cache.has_room(self.batch)
    }

    /// Evicts the oldest batch of resident pages.
    pub fn evict_batch<T: PageTable, B: Backing>(
        &mut self,
        t: &mut T,
        b: &mut B,
    ) -> Result<(), PagerError> {
        let mut victims = std::mem::take(&mut self.victims);
        self.cache.pick_victims(self.batch, &mut victims);
        if victims.is_empty() {
            self.victims = victims;
            // Nothing resident: the tier holds the budget.
            if self.tier.is_empty() {
                return Err(PagerError::Stuck);
            }
            self.clear_writebacks();
            let mut written = 0;
            for _ in 0..self.batch {
                written += self.demote_oldest(b)?;
            }
            self.sync_tier();
            self.counters.writebacks += written;
            return self.send_writebacks(b).map_err(Into::into);
        }
        let r = self.write_back_and_drop(t, b, &victims);
        self.victims = victims;
        r
    }

    /// Evicts every resident page of `[addr, addr+len)` (before a range
    /// moves or loses read access).
    pub fn evict_range<T: PageTable, B: Backing>(
        &mut self,
        t: &mut T,
        b: &mut B,
        addr: usize,
        len: usize,
    ) -> Result<(), PagerError> {
        let resident = self.cache.resident_in(self.index(addr), len / PAGE_SIZE);
        self.write_back_and_drop(t, b, &resident)?;
        self.flush_tier(b, addr, len)
    }

    /// Writes the dirty tier pages of `[addr, addr+len)` back, then drops
    /// the range's tier pages: the daemons then hold all its contents.
    fn flush_tier<B: Backing>(
        &mut self,
        b: &mut B,
        addr: usize,
        len: usize,
    ) -> Result<(), PagerError> {
        let (first, count) = (self.index(addr), len / PAGE_SIZE);
        let (mut pages, mut data) = (
            std::mem::take(&mut self.tier_pages),
            std::mem::take(&mut self.tier_data),
        );
        // A batch at a time: decompressed, the tier's pages can be many
        // times its size.
        let r = (|| loop {
            self.tier
                .clean_range(first, count, self.batch, &mut pages, &mut data);
            if pages.is_empty() {
                return Ok(());
            }
            self.clear_writebacks();
            for (n, &i) in pages.iter().enumerate() {
                let at = n * PAGE_SIZE;
                self.queue_writeback(b, self.addr(i), &data[at..at + PAGE_SIZE])?;
            }
            self.counters.writebacks += pages.len() as u64;
            self.send_writebacks(b)?;
        })();
        self.tier.remove_range(first, count);
        self.sync_tier();
        (self.tier_pages, self.tier_data) = (pages, data);
        r
    }

    /// Adds page `addr` (contents `page`) to the writeback list, its unit
    /// placed first if it is not yet.
    fn queue_writeback<B: Backing>(
        &mut self,
        b: &mut B,
        addr: usize,
        page: &[u8],
    ) -> Result<(), DaemonError> {
        b.ensure_placed(addr)?;
        self.wb_addrs.push(VirtAddr(addr as u64));
        self.wb_data.extend_from_slice(page);
        Ok(())
    }

    /// Takes the oldest page out of the tier, queueing its writeback if it
    /// is dirty. Returns how many pages were queued.
    fn demote_oldest<B: Backing>(&mut self, b: &mut B) -> Result<u64, DaemonError> {
        let mut page = std::mem::take(&mut self.page);
        page.resize(PAGE_SIZE, 0);
        let r = match self.tier.pop_oldest(&mut page) {
            Some((i, true)) => self.queue_writeback(b, self.addr(i), &page).map(|()| 1),
            _ => Ok(0),
        };
        self.page = page;
        r
    }

    /// Offers an evicted page to the tier; whether it was stored.
    fn offer_to_tier(&mut self, i: usize, page: &[u8], dirty: bool) -> bool {
        match self.tier.store(i, page, dirty) {
            Ok(()) => {
                self.counters.tier_stores += 1;
                true
            }
            Err(Rejected::Incompressible) => {
                self.counters.tier_incompressible += 1;
                false
            }
            Err(Rejected::Off | Rejected::Skipped) => false,
        }
    }

    /// Writes back the dirty pages among `victims`, waits for every ack,
    /// then drops them all locally; a batch at a time, so the buffers stay
    /// small however large the range.
    fn write_back_and_drop<T: PageTable, B: Backing>(
        &mut self,
        t: &mut T,
        b: &mut B,
        victims: &[Victim],
    ) -> Result<(), PagerError> {
        for chunk in victims.chunks(self.batch) {
            self.write_back_and_drop_batch(t, b, chunk)?;
        }
        Ok(())
    }

    fn write_back_and_drop_batch<T: PageTable, B: Backing>(
        &mut self,
        t: &mut T,
        b: &mut B,
        victims: &[Victim],
    ) -> Result<(), PagerError> {
        self.clear_writebacks();
        self.unchanged.clear();
        let mut unchanged_remote = 0u64;
        // Stop writers before copying: a write after the copy would be
        // lost. One call per run of dirty victims, bridging pages that are
        // not mapped or already write-protected (clean).
        self.span_pages.clear();
        self.span_pages
            .extend(victims.iter().filter(|v| v.dirty).map(|v| v.index));
        let cache = &self.cache;
        spans(
            self.base,
            &mut self.span_pages,
            |k| !cache.is_resident(k) || !cache.is_dirty(k),
            &mut self.ranges,
        );
        for &(addr, len) in &self.ranges {
            t.write_protect(addr, len, true)
                .map_err(table("write-protect", addr))?;
        }
        let mut written = 0;
        let mut page = std::mem::take(&mut self.page);
        page.resize(PAGE_SIZE, 0);
        for v in victims {
            let addr = self.addr(v.index);
            let remote = self.cache.is_remote(v.index);
            if !v.dirty {
                // The daemons hold it (or, never written, it reads as
                // zeros): kept in the tier, its next miss stays local.
                if remote && !self.tier.skips_next() {
                    t.copy_out(addr, &mut page);
                    self.offer_to_tier(v.index, &page, false);
                } else {
                    self.tier.pass();
                }
                continue;
            }
            t.copy_out(addr, &mut page);
            // A page dirty only by prediction may hold what it was
            // installed with: zeros no daemon holds (dropped, it reads as
            // zeros again), or its fetched contents (the daemon's copy is
            // current). Either needs no writeback.
            let unchanged = if remote {
                self.cache.unchanged_since_fetch(v.index, &page)
            } else {
                page.iter().all(|&b| b == 0)
            };
            if unchanged {
                self.unchanged.push(v.index);
                unchanged_remote += u64::from(remote);
                if remote {
                    self.offer_to_tier(v.index, &page, false);
                } else {
                    self.tier.pass();
                }
                continue;
            }
            // Written: predicted again at its next fetch.
            self.cache.saw_write(v.index);
            if self.offer_to_tier(v.index, &page, true) {
                continue;
            }
            if let Err(e) = self.queue_writeback(b, addr, &page) {
                self.page = page;
                return Err(e.into());
            }
            written += 1;
        }
        self.page = page;
        // Under its share; and, with the victims gone, within the budget
        // (a heap that grows takes a segment at once).
        let resident_after = self.cache.resident() - victims.len();
        while self.tier.over_cap()
            || (!self.tier.is_empty() && resident_after + self.tier.pages() > self.cache.budget())
        {
            written += self.demote_oldest(b)?;
        }
        self.sync_tier();
        if written > 0 {
            self.send_writebacks(b)?;
        }
        // Bridging only pages that are not mapped.
        self.span_pages.clear();
        self.span_pages.extend(victims.iter().map(|v| v.index));
        let cache = &self.cache;
        spans(
            self.base,
            &mut self.span_pages,
            |k| !cache.is_resident(k),
            &mut self.ranges,
        );
        t.drop_pages(&self.ranges)
            .map_err(table("drop", self.ranges.first().map_or(0, |r| r.0)))?;
        // `unchanged` lists victims in the order of `victims`.
        let mut unchanged = self.unchanged.iter().peekable();
        for v in victims {
            let same = unchanged.next_if_eq(&&v.index).is_some();
            self.cache.evicted(Victim {
                dirty: v.dirty && !same,
                ..*v
            });
        }
        let c = &mut self.counters;
        c.evictions += victims.len() as u64;
        c.writebacks += written;
        c.zero_drops += self.unchanged.len() as u64 - unchanged_remote;
        c.unchanged_drops += unchanged_remote;
        Ok(())
    }

    /// An empty writeback list.
    fn clear_writebacks(&mut self) {
        self.wb_addrs.clear();
        self.wb_data.clear();
    }

    /// Sends the batched writebacks (all writes first, then all acks).
    fn send_writebacks<B: Backing>(&mut self, b: &mut B) -> Result<(), DaemonError> {
        let (addrs, data) = (&self.wb_addrs, &self.wb_data);
        for (k, chunk) in addrs.chunks(MAX_BATCH_PAGES).enumerate() {
            let from = k * MAX_BATCH_PAGES * PAGE_SIZE;
            b.write_pages(chunk, &data[from..from + chunk.len() * PAGE_SIZE])?;
        }
        b.await_writes()
    }

    /// Discards the contents of `[addr, addr+len)`, locally and at the
    /// daemons (but the home if `home_done`: it discarded them as part of
    /// the layout change): the range reads as zeros afterwards (munmap,
    /// `MADV_DONTNEED`). Compare [`Pager::freed`], which keeps resident
    /// pages.
    pub fn discard<T: PageTable, B: Backing>(
        &mut self,
        t: &mut T,
        b: &mut B,
        addr: usize,
        len: usize,
        home_done: bool,
    ) -> Result<(), PagerError> {
        let first = self.index(addr);
        let remote = self.cache.any_remote(first, len / PAGE_SIZE);
        self.cache.discard(first, len / PAGE_SIZE);
        self.tier.remove_range(first, len / PAGE_SIZE);
        self.sync_tier();
        t.drop_pages(&[(addr, len)]).map_err(table("drop", addr))?;
        if remote {
            // Only if a daemon holds a page of the range.
            discard_at_daemons(b, addr, len, home_done)?;
        }
        Ok(())
    }

    /// The program freed `[addr, addr+len)` (inside a block of the region
    /// heap): its contents are dead. Resident pages stay for the heap to
    /// reuse; remote copies are dropped, so reuse neither fetches nor
    /// writes back stale data.
    pub fn freed<B: Backing>(
        &mut self,
        b: &mut B,
        addr: usize,
        len: usize,
    ) -> Result<(), PagerError> {
        self.tier.remove_range(self.index(addr), len / PAGE_SIZE);
        self.sync_tier();
        if self.cache.forget_remote(self.index(addr), len / PAGE_SIZE) {
            discard_at_daemons(b, addr, len, false)?;
        }
        Ok(())
    }

    /// Copies the remote pages of `[from, from+len)` to `to` (an mremap
    /// that moved a mapping; its resident pages were evicted first).
    pub fn move_contents<B: Backing>(
        &mut self,
        b: &mut B,
        from: usize,
        to: usize,
        len: usize,
    ) -> Result<(), PagerError> {
        let (first_from, first_to) = (self.index(from), self.index(to));
        let remote: Vec<usize> = (0..len / PAGE_SIZE)
            .filter(|k| self.cache.is_remote(first_from + k))
            .collect();
        for chunk in remote.chunks(self.batch) {
            self.clear_writebacks();
            for &k in chunk {
                let (src, dst) = (from + k * PAGE_SIZE, to + k * PAGE_SIZE);
                b.ensure_placed(dst)?;
                let d = b
                    .daemon_of(src)
                    .ok_or(DaemonError::Unplaced { addr: src })?;
                let page = b.read_pages(d, &[VirtAddr(src as u64)])?;
                self.wb_addrs.push(VirtAddr(dst as u64));
                self.wb_data.extend_from_slice(page);
            }
            self.send_writebacks(b)?;
        }
        self.cache
            .move_remote(first_from, first_to, len / PAGE_SIZE);
        self.tier.remove_range(first_to, len / PAGE_SIZE);
        self.sync_tier();
        Ok(())
    }

    /// In a forked child: every resident page counts as dirty (the kernel
    /// dropped the write protection that kept clean pages clean).
    pub fn after_fork(&mut self) {
        self.cache.mark_resident_dirty();
    }
}

/// Each daemon holding a unit of `[addr, addr+len)` forgets its part (but
/// the home if `skip_home`).
fn discard_at_daemons<B: Backing>(
    b: &mut B,
    addr: usize,
    len: usize,
    skip_home: bool,
) -> Result<(), DaemonError> {
    let home = b.home();
    for d in b.holders(addr, len) {
        if !(skip_home && d == home) {
            b.discard_on(d, addr, len)?;
        }
    }
    Ok(())
}
