//! The pager core driven with a fake page table and fake memory daemons:
//! misses, prefetch, write protection, eviction, writeback failures,
//! daemon death, fork and drain, each checked against the invariants of
//! the design brief (§5) after every step; and a property test of random
//! programs against a model of memory contents.

use std::collections::{BTreeMap, HashMap};

use lego_protocol::{VirtAddr, PAGE_SIZE};

use super::*;
use crate::excache::Policy;

mod model;

const BASE: usize = 0x4000_0000;
/// Pages in a placement unit of the fake daemons.
const UNIT_PAGES: usize = 16;

/// A page table in a map: page address → (contents, write-protected).
#[derive(Clone, Default)]
struct FakeTable {
    pages: HashMap<usize, (Vec<u8>, bool)>,
    /// Pages whose range is unmapped (a copy there fails with `Gone`).
    gone: Vec<usize>,
    copies: usize,
}

impl PageTable for FakeTable {
    fn copy_in(&mut self, addr: usize, src: &[u8], wp: bool) -> Result<usize, TableError> {
        self.copies += 1;
        for (k, page) in src.chunks(PAGE_SIZE).enumerate() {
            let at = addr + k * PAGE_SIZE;
            if self.gone.contains(&at) {
                return if k == 0 { Err(TableError::Gone) } else { Ok(k) };
            }
            if self.pages.contains_key(&at) {
                return Ok(k);
            }
            self.pages.insert(at, (page.to_vec(), wp));
        }
        Ok(src.len() / PAGE_SIZE)
    }
    fn write_protect(&mut self, addr: usize, len: usize, on: bool) -> Result<(), TableError> {
        for a in (addr..addr + len).step_by(PAGE_SIZE) {
            if let Some(p) = self.pages.get_mut(&a) {
                p.1 = on;
            }
        }
        Ok(())
    }
    fn wake(&mut self, _addr: usize, _len: usize) {}
    fn copy_out(&mut self, addr: usize, dst: &mut [u8]) {
        let (page, wp) = self.pages.get(&addr).expect("copy_out of a missing page");
        assert!(*wp, "copy_out of a page writers can still change");
        dst.copy_from_slice(page);
    }
    fn drop_pages(&mut self, ranges: &[(usize, usize)]) -> Result<(), TableError> {
        for &(addr, len) in ranges {
            for a in (addr..addr + len).step_by(PAGE_SIZE) {
                self.pages.remove(&a);
            }
        }
        Ok(())
    }
}

/// Memory daemons in maps; units placed round-robin as first written, on
/// `replicas` daemons each. Like the real pool, a dead daemon is passed
/// over while another replica of the unit is alive.
#[derive(Clone)]
struct FakeDaemons {
    stores: Vec<HashMap<usize, Vec<u8>>>,
    dead: Vec<bool>,
    /// Writes fail with "out of memory".
    full: bool,
    replicas: usize,
    placed: BTreeMap<usize, Vec<usize>>,
    pending: Vec<(usize, VirtAddr, Vec<u8>)>,
    read_buf: Vec<u8>,
    reads: usize,
    pages_written: usize,
    /// The next unit placed goes to a daemon that joins then (hot-add).
    join_on_next_place: bool,
    /// Units the pager asked to place ahead of need.
    asked_ahead: Vec<usize>,
}

impl FakeDaemons {
    fn new(n: usize) -> Self {
        Self {
            stores: vec![HashMap::new(); n],
            dead: vec![false; n],
            full: false,
            replicas: 1,
            placed: BTreeMap::new(),
            pending: Vec::new(),
            read_buf: Vec::new(),
            reads: 0,
            pages_written: 0,
            join_on_next_place: false,
            asked_ahead: Vec::new(),
        }
    }
    fn unit(addr: usize) -> usize {
        (addr - BASE) / PAGE_SIZE / UNIT_PAGES
    }
    /// The live replicas of `addr`'s unit; an error if it has none.
    fn alive(&self, addr: usize) -> Result<Vec<usize>, DaemonError> {
        let members = self
            .placed
            .get(&Self::unit(addr))
            .cloned()
            .unwrap_or_default();
        let alive: Vec<usize> = members.iter().copied().filter(|&d| !self.dead[d]).collect();
        match (alive.is_empty(), members.first()) {
            (true, Some(d)) => Err(DaemonError::Closed {
                addr: format!("fake-{d}"),
            }),
            _ => Ok(alive),
        }
    }
}

impl Backing for FakeDaemons {
    fn daemon_of(&self, addr: usize) -> Option<usize> {
        let members = self.placed.get(&Self::unit(addr))?;
        members
            .iter()
            .copied()
            .find(|&d| !self.dead[d])
            .or(members.first().copied())
    }
    fn ensure_placed(&mut self, addr: usize) -> Result<(), DaemonError> {
        let u = Self::unit(addr);
        if self.placed.contains_key(&u) {
            return Ok(());
        }
        if self.join_on_next_place {
            self.join_on_next_place = false;
            self.stores.push(HashMap::new());
            self.dead.push(false);
            self.placed.insert(u, vec![self.stores.len() - 1]);
            return Ok(());
        }
        let n = self.stores.len();
        let members = (0..self.replicas.min(n)).map(|k| (u + k) % n).collect();
        self.placed.insert(u, members);
        Ok(())
    }
    fn place_ahead(&mut self, addr: usize) {
        if !self.placed.contains_key(&Self::unit(addr)) {
            self.asked_ahead.push(Self::unit(addr));
        }
    }
    fn read_pages(&mut self, d: usize, addrs: &[VirtAddr]) -> Result<&[u8], DaemonError> {
        self.reads += 1;
        self.read_buf.clear();
        for a in addrs {
            let from = if self.dead[d] {
                self.alive(a.0 as usize)?[0]
            } else {
                d
            };
            let page = self.stores[from].get(&(a.0 as usize));
            let page = page.expect("a page fetched from a daemon that does not hold it");
            self.read_buf.extend_from_slice(page);
        }
        Ok(&self.read_buf)
    }
    fn write_pages(&mut self, addrs: &[VirtAddr], data: &[u8]) -> Result<(), DaemonError> {
        for (a, page) in addrs.iter().zip(data.chunks(PAGE_SIZE)) {
            assert!(
                self.placed.contains_key(&Self::unit(a.0 as usize)),
                "a write to an unplaced unit"
            );
            for d in self.alive(a.0 as usize)? {
                self.pending.push((d, *a, page.to_vec()));
            }
        }
        Ok(())
    }
    fn await_writes(&mut self) -> Result<(), DaemonError> {
        for (d, a, page) in std::mem::take(&mut self.pending) {
            if self.full {
                return Err(DaemonError::NoMemory {
                    addr: format!("fake-{d}"),
                    message: "full".into(),
                });
            }
            self.alive(a.0 as usize)?;
            if !self.dead[d] {
                self.stores[d].insert(a.0 as usize, page);
                self.pages_written += 1;
            }
        }
        Ok(())
    }
    fn discard_on(&mut self, d: usize, addr: usize, len: usize) -> Result<(), DaemonError> {
        self.stores[d].retain(|&a, _| a < addr || a >= addr + len);
        Ok(())
    }
    fn holders(&self, addr: usize, len: usize) -> Vec<usize> {
        let (first, last) = (Self::unit(addr), Self::unit(addr + len - 1));
        let mut ds: Vec<usize> = self
            .placed
            .range(first..=last)
            .flat_map(|(_, m)| m.iter().copied())
            .collect();
        ds.sort_unstable();
        ds.dedup();
        ds
    }
    fn home(&self) -> usize {
        0
    }
}

/// A process: its pager, page table and daemons, and a model of what every
/// word of its memory must read (absent: zero; `unknown`: freed garbage).
#[derive(Clone)]
struct Machine {
    pager: Pager,
    table: FakeTable,
    daemons: FakeDaemons,
    model: HashMap<usize, u64>,
    unknown: std::collections::HashSet<usize>,
}

impl Machine {
    fn new(pages: usize, budget: usize, prefetch: usize, daemons: usize) -> Self {
        let cache = ExCache::with_policy(pages, budget, Policy::Refault);
        Self {
            pager: Pager::new(BASE, pages * PAGE_SIZE, cache, prefetch),
            table: FakeTable::default(),
            daemons: FakeDaemons::new(daemons),
            model: HashMap::new(),
            unknown: Default::default(),
        }
    }

    /// Gives the pager a compressed tier of `bytes`.
    fn with_tier(mut self, bytes: usize) -> Self {
        self.pager = self.pager.with_tier(bytes);
        self
    }

    /// Evicts every resident page and empties the tier: the daemons then
    /// hold every page written.
    fn evict_all(&mut self) {
        let len = self.pager.len;
        self.pager
            .evict_range(&mut self.table, &mut self.daemons, BASE, len)
            .unwrap();
    }

    fn fault(&mut self, page: usize, write: bool, wp: bool) -> Result<bool, PagerError> {
        let f = Fault { page, write, wp };
        self.pager.fault(&mut self.table, &mut self.daemons, f)
    }

    fn page_of(&self, word: usize) -> usize {
        word & !(PAGE_SIZE - 1)
    }

    /// Reads the word at `addr` as the program would, faulting as needed.
    fn read(&mut self, addr: usize) -> u64 {
        let page = self.page_of(addr);
        if !self.table.pages.contains_key(&page) {
            self.fault(page, false, false).unwrap();
        }
        let (p, _) = &self.table.pages[&page];
        let off = addr - page;
        let got = u64::from_le_bytes(p[off..off + 8].try_into().unwrap());
        if !self.unknown.contains(&addr) {
            let want = self.model.get(&addr).copied().unwrap_or(0);
            assert_eq!(got, want, "word {addr:#x}: lost or stale write");
        }
        got
    }

    fn write(&mut self, addr: usize, v: u64) {
        let page = self.page_of(addr);
        if !self.table.pages.contains_key(&page) {
            self.fault(page, true, false).unwrap();
        }
        if self.table.pages[&page].1 {
            self.fault(page, true, true).unwrap();
        }
        let (p, wp) = self.table.pages.get_mut(&page).unwrap();
        assert!(!*wp, "a write fault left the page protected");
        let off = addr - page;
        p[off..off + 8].copy_from_slice(&v.to_le_bytes());
        self.model.insert(addr, v);
        self.unknown.remove(&addr);
    }

    fn evict(&mut self) {
        if self.pager.cache().resident() > 0 || !self.pager.tier().is_empty() {
            self.pager
                .evict_batch(&mut self.table, &mut self.daemons)
                .unwrap();
        }
    }

    fn words(&self, first_page: usize, count: usize) -> std::ops::Range<usize> {
        BASE + first_page * PAGE_SIZE..BASE + (first_page + count) * PAGE_SIZE
    }

    /// `madvise(MADV_DONTNEED)`: the range reads as zeros.
    fn discard(&mut self, first: usize, count: usize) {
        let r = self.words(first, count);
        self.pager
            .discard(&mut self.table, &mut self.daemons, r.start, r.len(), false)
            .unwrap();
        self.model.retain(|a, _| !r.contains(a));
        self.unknown.retain(|a| !r.contains(a));
    }

    /// `free` of a large block: its contents are garbage until written.
    fn free(&mut self, first: usize, count: usize) {
        let r = self.words(first, count);
        self.pager
            .freed(&mut self.daemons, r.start, r.len())
            .unwrap();
        let dead: Vec<usize> = self
            .model
            .keys()
            .copied()
            .filter(|a| r.contains(a))
            .collect();
        for a in dead {
            self.model.remove(&a);
            self.unknown.insert(a);
        }
        // Never-written words of a resident page may have been anything too
        // (as in a real heap): reads of the range are not checked.
        for page in r.clone().step_by(PAGE_SIZE) {
            for w in (page..page + PAGE_SIZE).step_by(8) {
                self.unknown.insert(w);
            }
        }
    }

    /// fork: the child gets the same contents; the kernel drops the write
    /// protection of the child's pages.
    fn fork(&mut self) -> Machine {
        let mut child = self.clone();
        for p in child.table.pages.values_mut() {
            p.1 = false;
        }
        child.pager.after_fork();
        child
    }

    /// The invariants that must hold between any two steps.
    fn check(&self) {
        let c = self.pager.cache();
        assert_eq!(c.resident(), self.table.pages.len(), "bookkeeping drifted");
        assert!(c.local_pages() <= c.budget(), "the budget does not hold");
        assert!(
            self.pager.local_bytes() <= c.budget() * PAGE_SIZE,
            "the tier overran the budget"
        );
        for (&addr, (_, wp)) in &self.table.pages {
            let i = (addr - BASE) / PAGE_SIZE;
            assert!(c.is_resident(i));
            // A clean page is write-protected: its first write is seen.
            assert!(c.is_dirty(i) || *wp, "clean page {i} writable");
        }
        assert!(
            self.daemons.pending.is_empty(),
            "writes left unacknowledged"
        );
    }
}

fn word(page: usize, k: usize) -> usize {
    BASE + page * PAGE_SIZE + k * 8
}

#[test]
fn a_never_written_page_is_zero_filled_without_a_daemon() {
    let mut m = Machine::new(64, 8, 8, 2);
    assert_eq!(m.read(word(5, 3)), 0);
    m.check();
    assert_eq!(m.daemons.reads, 0);
    assert_eq!(m.pager.counters.zero_fills, 1);
    // A page only read needs no place; one written has its unit asked
    // for ahead of its first writeback.
    assert!(m.daemons.asked_ahead.is_empty());
    m.write(word(UNIT_PAGES * 2, 0), 1);
    assert_eq!(m.daemons.asked_ahead, vec![2]);
}

#[test]
fn a_remote_miss_brings_the_pages_ahead_in_the_same_read() {
    let mut m = Machine::new(256, 32, 16, 1);
    for p in 0..64 {
        m.write(word(p, 0), p as u64 + 1);
    }
    // Everything written is remote now.
    while m.pager.cache().resident() > 0 {
        m.evict();
    }
    m.daemons.reads = 0;
    for p in 0..64 {
        assert_eq!(m.read(word(p, 0)), p as u64 + 1);
        m.check();
    }
    assert!(m.pager.counters.prefetched > 0, "{:?}", m.pager.counters);
    assert!(
        m.daemons.reads < 32,
        "{} reads for 64 pages",
        m.daemons.reads
    );
}

#[test]
fn a_write_to_a_clean_page_is_a_write_protect_fault_that_dirties_it() {
    let mut m = Machine::new(64, 8, 0, 1);
    m.write(word(1, 0), 9);
    m.evict();
    // Written in its last residency: fetched writable (a write is
    // predicted); found unchanged at eviction, the prediction is dropped.
    assert_eq!(m.read(word(1, 0)), 9);
    assert!(m.pager.cache().is_dirty(1) && !m.table.pages[&word(1, 0)].1);
    m.evict();
    assert_eq!(m.pager.counters.unchanged_drops, 1);
    assert_eq!(m.read(word(1, 0)), 9);
    let i = 1;
    assert!(!m.pager.cache().is_dirty(i) && m.table.pages[&word(1, 0)].1);
    m.write(word(1, 1), 10);
    assert!(m.pager.cache().is_dirty(i));
    assert_eq!(m.pager.counters.dirtied, 1);
    m.check();
}

#[test]
fn eviction_writes_back_dirty_pages_only() {
    let mut m = Machine::new(64, 8, 0, 1);
    m.write(word(0, 0), 1); // dirty
    m.read(word(1, 0)); // zero-filled for a read: clean
    m.write(word(2, 0), 2);
    m.evict();
    m.check();
    assert_eq!(m.daemons.pages_written, 2);
    assert_eq!(m.pager.counters.evictions, 3);
    // Fetched back clean, evicted again: no second writeback.
    assert_eq!(m.read(word(0, 0)), 1);
    m.evict();
    assert_eq!(m.daemons.pages_written, 2);
    assert_eq!(m.read(word(2, 0)), 2);
    // Never-written pages zero-filled ahead of a miss are predicted dirty;
    // still all zeros at eviction, they are dropped without a writeback.
    let mut m = Machine::new(64, 8, 4, 1);
    for p in 10..14 {
        m.read(word(p, 0));
    }
    assert!(m.pager.counters.prefilled > 0, "{:?}", m.pager.counters);
    while m.pager.cache().resident() > 0 {
        m.evict();
    }
    assert_eq!(m.daemons.pages_written, 0);
    assert_eq!(m.pager.counters.zero_drops, m.pager.counters.prefilled);
}

#[test]
fn a_failed_writeback_loses_nothing() {
    let mut m = Machine::new(64, 8, 0, 1);
    m.write(word(3, 0), 33);
    m.daemons.full = true;
    let e = m
        .pager
        .evict_batch(&mut m.table, &mut m.daemons)
        .unwrap_err();
    assert!(
        matches!(e, PagerError::Daemon(DaemonError::NoMemory { .. })),
        "{e}"
    );
    // The page was not dropped: its only copy is still here.
    assert!(m.table.pages.contains_key(&word(3, 0)));
    m.daemons.full = false;
    m.daemons.pending.clear();
    assert_eq!(m.read(word(3, 0)), 33);
}

#[test]
fn a_dead_daemon_is_an_error_not_a_hang_or_zeros() {
    let mut m = Machine::new(64, 8, 0, 2);
    m.write(word(0, 0), 7); // unit 0: daemon 0
    m.write(word(UNIT_PAGES, 0), 8); // unit 1: daemon 1
    while m.pager.cache().resident() > 0 {
        m.evict();
    }
    m.daemons.dead[1] = true;
    assert_eq!(m.read(word(0, 0)), 7);
    let e = m.fault(word(UNIT_PAGES, 0), false, false).unwrap_err();
    assert!(
        matches!(e, PagerError::Daemon(DaemonError::Closed { .. })),
        "{e}"
    );
    m.check();
}

#[test]
fn a_fork_child_reads_evicted_pages_and_writes_only_its_own() {
    let mut parent = Machine::new(128, 8, 4, 2);
    for p in 0..40 {
        parent.write(word(p, 1), 100 + p as u64);
    }
    let mut child = parent.fork();
    child.check();
    for p in 0..40 {
        assert_eq!(child.read(word(p, 1)), 100 + p as u64);
        child.write(word(p, 1), 500 + p as u64);
        child.check();
    }
    for p in 0..40 {
        assert_eq!(parent.read(word(p, 1)), 100 + p as u64);
    }
}

#[test]
fn every_replica_gets_each_writeback_and_one_left_serves_every_page() {
    let mut m = Machine::new(64, 8, 0, 3);
    m.daemons.replicas = 2;
    for p in 0..3 * UNIT_PAGES {
        m.write(word(p, 0), p as u64 + 1);
    }
    while m.pager.cache().resident() > 0 {
        m.evict();
    }
    // 3 units over 3 daemons, 2 replicas each: every daemon holds 2 units.
    assert_eq!(m.daemons.pages_written, 2 * 3 * UNIT_PAGES);
    assert!(m.daemons.stores.iter().all(|s| s.len() == 2 * UNIT_PAGES));
    m.daemons.dead[1] = true;
    for p in 0..3 * UNIT_PAGES {
        assert_eq!(m.read(word(p, 0)), p as u64 + 1);
        m.write(word(p, 0), p as u64 + 100);
    }
    m.evict_all();
    m.check();
    for p in 0..3 * UNIT_PAGES {
        assert_eq!(m.read(word(p, 0)), p as u64 + 100);
    }
}

#[test]
fn a_unit_placed_on_a_daemon_that_joined_is_written_there() {
    let mut m = Machine::new(64, 8, 0, 1);
    m.write(word(0, 0), 1);
    m.daemons.join_on_next_place = false;
    m.evict();
    m.daemons.join_on_next_place = true;
    m.write(word(UNIT_PAGES, 0), 2);
    m.evict();
    m.check();
    assert_eq!(m.daemons.stores.len(), 2);
    assert_eq!(m.daemons.stores[1].len(), 1);
    assert_eq!(m.read(word(UNIT_PAGES, 0)), 2);
    assert_eq!(m.read(word(0, 0)), 1);
}

#[test]
fn moved_contents_follow_an_mremap() {
    let mut m = Machine::new(128, 8, 0, 2);
    for p in 0..10 {
        m.write(word(p, 2), 70 + p as u64);
    }
    mremap_ten_pages(m);
}

/// mremap of pages 0..10 (each holding `70 + page` in word 2) to 40..50:
/// the contents follow, the old range reads as zeros.
fn mremap_ten_pages(mut m: Machine) {
    let (from, to, len) = (BASE, BASE + 40 * PAGE_SIZE, 10 * PAGE_SIZE);
    m.pager
        .evict_range(&mut m.table, &mut m.daemons, from, len)
        .unwrap();
    m.pager
        .move_contents(&mut m.daemons, from, to, len)
        .unwrap();
    m.pager
        .discard(&mut m.table, &mut m.daemons, from, len, false)
        .unwrap();
    for p in 0..10 {
        m.model.remove(&word(p, 2));
        m.model.insert(word(40 + p, 2), 70 + p as u64);
    }
    for p in 0..10 {
        assert_eq!(m.read(word(40 + p, 2)), 70 + p as u64);
        assert_eq!(m.read(word(p, 2)), 0);
    }
    m.check();
}

#[test]
fn a_fault_on_an_unmapped_range_is_woken_not_installed() {
    let mut m = Machine::new(64, 8, 0, 1);
    m.table.gone.push(word(2, 0));
    assert!(m.fault(word(2, 0), false, false).unwrap());
    assert!(!m.table.pages.contains_key(&word(2, 0)));
    m.check();
}

#[test]
fn descending_prefetch_runs_take_one_copy() {
    let mut m = Machine::new(256, 64, 32, 1);
    for p in (0..128).rev() {
        m.write(word(p, 0), p as u64);
    }
    while m.pager.cache().resident() > 0 {
        m.evict();
    }
    m.table.copies = 0;
    for p in (0..128).rev() {
        assert_eq!(m.read(word(p, 0)), p as u64);
    }
    m.check();
    assert!(
        m.table.copies < 64,
        "{} copies for 128 pages",
        m.table.copies
    );
}

#[test]
fn thousands_of_faults_and_evictions_keep_every_invariant() {
    let mut m = Machine::new(1024, 32, 16, 3);
    let mut x = 88172645463325252u64;
    for step in 0..5000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = (x % 1024) as usize;
        if x & 1 == 0 {
            m.write(word(page, (x >> 20) as usize % 512), step);
        } else {
            m.read(word(page, (x >> 20) as usize % 512));
        }
        m.check();
    }
}

#[test]
fn a_page_in_the_tier_comes_back_without_the_network() {
    let mut m = Machine::new(64, 8, 0, 1).with_tier(16 * PAGE_SIZE);
    for p in 0..8 {
        m.write(word(p, 3), 40 + p as u64);
    }
    while m.pager.cache().resident() > 0 {
        m.evict();
        m.check();
    }
    assert_eq!(m.pager.tier().len(), 8);
    assert_eq!(m.daemons.pages_written, 0, "dirty pages stay local");
    for p in 0..8 {
        assert_eq!(m.read(word(p, 3)), 40 + p as u64);
        m.check();
    }
    assert_eq!(m.pager.counters.tier_hits, 8);
    assert_eq!((m.daemons.reads, m.daemons.pages_written), (0, 0));
    // Taken from the tier dirty, they are resident dirty: written back
    // when they finally leave.
    m.evict_all();
    assert_eq!(m.daemons.pages_written, 8);
    assert!(m.pager.tier().is_empty());
    for p in 0..8 {
        assert_eq!(m.read(word(p, 3)), 40 + p as u64);
    }
    assert_eq!(m.daemons.reads, 8, "no prefetch: one read each");
}

#[test]
fn a_full_tier_writes_its_oldest_dirty_pages_back() {
    // Pages of 1 KiB of noise: a few fit in a tier of three heap pages.
    let cap = 3 * PAGE_SIZE;
    let mut m = Machine::new(64, 32, 0, 2).with_tier(cap);
    let noise =
        |p: usize, w: usize| (p as u64 * 512 + w as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for p in 0..40 {
        for w in 0..128 {
            m.write(word(p, w), noise(p, w));
        }
        m.check();
    }
    while m.pager.cache().resident() > 0 {
        m.evict();
        m.check();
    }
    // Its heap may hold more than the share (free space between pages),
    // but the budget counts it: `check` saw the budget hold throughout.
    let tier = m.pager.tier();
    assert!(!tier.is_empty() && tier.len() < 20, "{}", tier.len());
    assert_eq!(m.daemons.pages_written, 40 - tier.len());
    for p in (0..40).rev() {
        for w in [0, 77, 127] {
            assert_eq!(m.read(word(p, w)), noise(p, w));
        }
        m.check();
    }
    assert!(m.pager.counters.tier_hits >= 1);
}

#[test]
fn clean_pages_enter_the_tier_and_stay_current_at_their_daemon() {
    let mut m = Machine::new(64, 8, 0, 1).with_tier(16 * PAGE_SIZE);
    m.write(word(1, 0), 5);
    m.evict_all();
    assert_eq!(m.daemons.pages_written, 1);
    assert_eq!(m.read(word(1, 0)), 5); // fetched: clean (but predicted)
    m.evict();
    assert!(m.pager.tier().contains(1));
    assert_eq!(m.pager.counters.unchanged_drops, 1);
    assert_eq!(m.read(word(1, 0)), 5);
    assert_eq!(m.pager.counters.tier_hits, 1);
    // Left clean, it needs no second writeback.
    m.evict_all();
    assert_eq!(m.daemons.pages_written, 1);
    assert_eq!(m.read(word(1, 0)), 5);
    m.check();
}

#[test]
fn moved_contents_follow_an_mremap_out_of_the_tier() {
    let mut m = Machine::new(128, 8, 0, 2).with_tier(32 * PAGE_SIZE);
    for p in 0..10 {
        m.write(word(p, 2), 70 + p as u64);
    }
    m.evict();
    assert!(!m.pager.tier().is_empty());
    mremap_ten_pages(m);
}
