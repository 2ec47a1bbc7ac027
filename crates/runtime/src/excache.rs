//! ExCache bookkeeping: the state of every page of the region and the
//! eviction order. Pure data; the pager performs the I/O these decisions
//! call for.
//!
//! A page is *resident* (mapped locally), *dirty* (resident and written
//! since it was last stored remotely; clean resident pages are kept
//! write-protected so their first write is noticed), and *remote* (a memory
//! daemon holds its contents). A page neither resident nor remote has never
//! been written, or was discarded: it reads as zeros and is zero-filled
//! locally, with no network trip.
//!
//! Eviction order ([`Policy`]): FIFO by install time, as in LegoOS; or
//! FIFO with refault detection (the default). Without access bits a user
//! space pager sees only misses, but a miss on a page evicted a short while
//! ago says the page is in use: its *refault distance* (evictions between
//! its eviction and this miss) is below the cache size, so a cache slightly
//! larger, or a better choice of victim, would have kept it (the idea of
//! Linux's workingset detection and of 2Q). Such pages go to a protected
//! queue, which eviction drains only while it holds more than half the
//! budget; all other pages are evicted oldest first.

use std::collections::VecDeque;

const RESIDENT: u8 = 1;
const DIRTY: u8 = 2;
const REMOTE: u8 = 4;
/// The page has an entry in a queue (possibly stale).
const QUEUED: u8 = 8;
/// That entry is in the protected queue.
const PROTECTED: u8 = 16;
/// A write was seen in the page's last residency: the next fetch installs
/// it writable (dirty) rather than paying a write-protect fault.
const WROTE: u8 = 32;
/// Resident and dirty by prediction (zero-filled ahead, or fetched writable
/// because of `WROTE`), not because a write was seen. Eviction compares
/// such a page with what it was installed with (zeros, or the fetched
/// contents' hash) to tell whether it was written.
const PREDICTED: u8 = 64;

/// How victims are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Oldest installed first (LegoOS).
    Fifo,
    /// Oldest first, but pages that come back soon after eviction are
    /// protected (see the module docs).
    Refault,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fifo" => Ok(Policy::Fifo),
            "refault" => Ok(Policy::Refault),
            _ => Err(format!("unknown eviction policy '{s}' (fifo, refault)")),
        }
    }
}

/// A page chosen for eviction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Victim {
    pub index: usize,
    pub dirty: bool,
}

/// Page states of one region.
#[derive(Clone)]
pub struct ExCache {
    state: Vec<u8>,
    fifo: VecDeque<u32>,
    /// Protected queue (refault policy).
    protected: VecDeque<u32>,
    /// Resident pages whose entry is in the protected queue.
    protected_resident: usize,
    /// Per page: the eviction count when it was last evicted (0: never).
    evicted_at: Vec<u32>,
    /// Per page fetched writable on a prediction: the hash of the contents
    /// it was fetched with (untouched entries cost no memory).
    fetched_hash: Vec<u128>,
    evictions: u32,
    policy: Policy,
    resident: usize,
    /// What the pager keeps locally besides resident pages (its compressed
    /// tier), in pages: it counts against the budget too.
    tier_pages: usize,
    /// Pages resident or remote: the disaggregated footprint.
    holding: usize,
    budget: usize,
}

impl ExCache {
    /// A cache for `pages` pages with room for `budget` resident ones.
    pub fn new(pages: usize, budget: usize) -> Self {
        Self::with_policy(pages, budget, Policy::Refault)
    }

    pub fn with_policy(pages: usize, budget: usize, policy: Policy) -> Self {
        Self {
            // Zeroed allocations: untouched parts cost no memory.
            state: vec![0; pages],
            fifo: VecDeque::new(),
            protected: VecDeque::new(),
            protected_resident: 0,
            evicted_at: if policy == Policy::Refault {
                vec![0; pages]
            } else {
                Vec::new()
            },
            fetched_hash: vec![0; pages],
            evictions: 0,
            policy,
            resident: 0,
            tier_pages: 0,
            holding: 0,
            budget: budget.max(1),
        }
    }

    pub fn resident(&self) -> usize {
        self.resident
    }
    pub fn holding(&self) -> usize {
        self.holding
    }
    pub fn budget(&self) -> usize {
        self.budget
    }

    pub fn is_resident(&self, i: usize) -> bool {
        self.state[i] & RESIDENT != 0
    }
    pub fn is_remote(&self, i: usize) -> bool {
        self.state[i] & REMOTE != 0
    }
    pub fn is_dirty(&self, i: usize) -> bool {
        self.state[i] & DIRTY != 0
    }

    fn set(&mut self, i: usize, new: u8) {
        let old = self.state[i];
        let held = |s: u8| s & (RESIDENT | REMOTE) != 0;
        match (old & RESIDENT != 0, new & RESIDENT != 0) {
            (false, true) => self.resident += 1,
            (true, false) => self.resident -= 1,
            _ => {}
        }
        let prot = |s: u8| s & (RESIDENT | PROTECTED) == RESIDENT | PROTECTED;
        match (prot(old), prot(new)) {
            (false, true) => self.protected_resident += 1,
            (true, false) => self.protected_resident -= 1,
            _ => {}
        }
        match (held(old), held(new)) {
            (false, true) => self.holding += 1,
            (true, false) => self.holding -= 1,
            _ => {}
        }
        self.state[i] = new;
    }

    /// Whether `extra` more pages fit without eviction.
    pub fn has_room(&self, extra: usize) -> bool {
        self.resident + self.tier_pages + extra <= self.budget
    }

    /// The pager's compressed tier now takes `pages` of the budget.
    pub fn set_tier_pages(&mut self, pages: usize) {
        self.tier_pages = pages;
    }

    /// Pages of the budget in use: resident ones and the tier's.
    pub fn local_pages(&self) -> usize {
        self.resident + self.tier_pages
    }

    /// A page was installed locally, dirty if the installing access wrote.
    pub fn installed(&mut self, i: usize, dirty: bool) {
        let s = self.state[i];
        let mut new =
            (s & (REMOTE | QUEUED | PROTECTED)) | RESIDENT | if dirty { DIRTY } else { 0 };
        if s & QUEUED == 0 {
            new |= QUEUED;
            if self.refaulted(i) {
                self.protected.push_back(i as u32);
                new |= PROTECTED;
            } else {
                self.fifo.push_back(i as u32);
                new &= !PROTECTED;
            }
        }
        self.set(i, new);
    }

    /// Whether page `i` comes back within a cache's worth of evictions.
    fn refaulted(&self, i: usize) -> bool {
        if self.policy != Policy::Refault || self.evicted_at[i] == 0 {
            return false;
        }
        (self.evictions.wrapping_sub(self.evicted_at[i]) as usize) < self.budget
    }

    /// A clean resident page was written.
    pub fn dirtied(&mut self, i: usize) {
        debug_assert!(self.is_resident(i));
        self.state[i] |= DIRTY;
    }

    /// A page installed writable and counted dirty without a write having
    /// been seen (zero-filled ahead of a miss, or fetched writable because
    /// its last residency was written); `fetched` is the contents a
    /// fetched one came with. Unless eviction finds it changed
    /// ([`ExCache::saw_write`]), it is not marked written.
    pub fn installed_unobserved(&mut self, i: usize, fetched: Option<&[u8]>) {
        self.installed(i, true);
        self.state[i] |= PREDICTED;
        if let Some(page) = fetched {
            self.fetched_hash[i] = page_hash(page);
        }
    }

    /// Whether page `i`, fetched writable on a prediction, still holds
    /// (`page`) what it was fetched with: not written, its daemon's copy is
    /// current. Hashes only such a page.
    pub fn unchanged_since_fetch(&self, i: usize, page: &[u8]) -> bool {
        self.state[i] & (PREDICTED | REMOTE) == PREDICTED | REMOTE
            && self.fetched_hash[i] == page_hash(page)
    }

    /// Page `i`, dirty by prediction, was found written after all (it no
    /// longer holds what it was installed with): it is predicted again.
    pub fn saw_write(&mut self, i: usize) {
        self.state[i] &= !PREDICTED;
    }

    /// Whether page `i` was written in its last residency (and so will
    /// likely be written again).
    pub fn predicts_write(&self, i: usize) -> bool {
        self.state[i] & WROTE != 0
    }

    /// After fork: every resident page counts as dirty (the kernel dropped
    /// the write protection that kept clean pages clean).
    pub fn mark_resident_dirty(&mut self) {
        for &i in self.fifo.iter().chain(&self.protected) {
            if self.state[i as usize] & RESIDENT != 0 {
                self.state[i as usize] |= DIRTY;
            }
        }
    }

    /// Takes up to `max` eviction victims, oldest first (from the
    /// protected queue only while it holds more than half the budget).
    pub fn pick_victims(&mut self, max: usize, out: &mut Vec<Victim>) {
        out.clear();
        while out.len() < max {
            let from_protected = self.protected_resident > self.budget / 2 || self.fifo.is_empty();
            let next = if from_protected {
                self.protected.pop_front()
            } else {
                self.fifo.pop_front()
            };
            let Some(i) = next else {
                break;
            };
            let i = i as usize;
            let s = self.state[i];
            self.set(i, s & !(QUEUED | PROTECTED));
            if self.state[i] & RESIDENT != 0 {
                out.push(Victim {
                    index: i,
                    dirty: self.state[i] & DIRTY != 0,
                });
            }
        }
    }

    /// A victim was dropped locally; a dirty one was stored remotely first.
    pub fn evicted(&mut self, v: Victim) {
        if self.policy == Policy::Refault {
            self.evictions = self.evictions.wrapping_add(1).max(1);
            self.evicted_at[v.index] = self.evictions;
        }
        let s = self.state[v.index];
        let mut new = s & !(RESIDENT | DIRTY | WROTE | PREDICTED);
        if v.dirty {
            new |= REMOTE;
        }
        if s & (DIRTY | PREDICTED) == DIRTY {
            new |= WROTE;
        }
        self.set(v.index, new);
    }

    /// Forgets pages `[first, first+count)` (munmap, MADV_DONTNEED).
    /// Returns how many were resident.
    pub fn discard(&mut self, first: usize, count: usize) -> usize {
        let before = self.resident;
        let end = (first + count).min(self.state.len());
        for i in first..end {
            if self.state[i] & (RESIDENT | REMOTE) != 0 {
                let keep = self.state[i] & QUEUED;
                self.set(i, keep);
            }
        }
        before - self.resident
    }

    /// The contents of `[first, first+count)` are dead (the program freed
    /// them) but its resident pages stay mapped for reuse: forget the
    /// remote copies, so no page of the range is fetched again (a
    /// non-resident one reads as zeros; a resident clean one is dropped
    /// without writeback). Returns whether any page was remote.
    pub fn forget_remote(&mut self, first: usize, count: usize) -> bool {
        let end = (first + count).min(self.state.len());
        let mut any = false;
        for i in first.min(end)..end {
            let s = self.state[i];
            if s & REMOTE != 0 {
                any = true;
                self.set(i, s & !REMOTE);
            }
        }
        any
    }

    /// Whether a daemon holds any page of `[first, first+count)`.
    pub fn any_remote(&self, first: usize, count: usize) -> bool {
        let end = (first + count).min(self.state.len());
        self.state[first.min(end)..end]
            .iter()
            .any(|s| s & REMOTE != 0)
    }

    /// Resident pages in `[first, first+count)`.
    pub fn resident_in(&self, first: usize, count: usize) -> Vec<Victim> {
        let end = (first + count).min(self.state.len());
        (first..end)
            .filter(|&i| self.state[i] & RESIDENT != 0)
            .map(|i| Victim {
                index: i,
                dirty: self.state[i] & DIRTY != 0,
            })
            .collect()
    }

    /// Moves the remote state of `count` pages from `from` to `to` (mremap
    /// after the range was flushed: no page in it is resident).
    pub fn move_remote(&mut self, from: usize, to: usize, count: usize) {
        let moved: Vec<bool> = (from..from + count).map(|i| self.is_remote(i)).collect();
        self.discard(from, count);
        self.discard(to, count);
        for (k, remote) in moved.into_iter().enumerate() {
            if remote {
                let q = self.state[to + k] & QUEUED;
                self.set(to + k, q | REMOTE);
            }
        }
    }
}

/// The hash that tells whether a page fetched writable on a prediction was
/// written: 128-bit XXH3, so a changed page passes for unchanged (and its
/// write is lost) with probability 2^-128.
fn page_hash(page: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fifo_order_and_dirty_flag() {
        let mut c = ExCache::new(16, 2);
        c.installed(3, false);
        c.installed(5, true);
        assert!(!c.has_room(1));
        let mut v = vec![];
        c.pick_victims(1, &mut v);
        assert_eq!(
            v,
            [Victim {
                index: 3,
                dirty: false
            }]
        );
        c.evicted(v[0]);
        assert!(!c.is_remote(3), "a clean never-stored page is not remote");
        c.pick_victims(1, &mut v);
        assert_eq!(
            v,
            [Victim {
                index: 5,
                dirty: true
            }]
        );
        c.evicted(v[0]);
        assert!(c.is_remote(5));
        assert_eq!((c.resident(), c.holding()), (0, 1));
    }

    #[test]
    fn discarded_pages_are_skipped_by_eviction() {
        let mut c = ExCache::new(16, 4);
        c.installed(1, true);
        c.installed(2, true);
        assert_eq!(c.discard(1, 1), 1);
        let mut v = vec![];
        c.pick_victims(4, &mut v);
        assert_eq!(
            v,
            [Victim {
                index: 2,
                dirty: true
            }]
        );
    }

    #[test]
    fn reinstalled_page_is_not_queued_twice() {
        let mut c = ExCache::new(4, 4);
        c.installed(1, false);
        let mut v = vec![];
        c.pick_victims(1, &mut v);
        c.evicted(v[0]);
        c.installed(1, false);
        c.installed(2, false);
        c.pick_victims(4, &mut v);
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn refaulting_pages_are_protected_from_a_scan() {
        // A hot page (0) and a long scan through a 4-page cache.
        for policy in [Policy::Fifo, Policy::Refault] {
            let mut c = ExCache::with_policy(64, 4, policy);
            let mut v = vec![];
            let mut misses = 0;
            let mut touch = |c: &mut ExCache, i: usize, hot: bool| {
                if c.is_resident(i) {
                    return;
                }
                misses += hot as usize;
                while !c.has_room(1) {
                    c.pick_victims(1, &mut v);
                    c.evicted(v[0]);
                }
                c.installed(i, false);
            };
            touch(&mut c, 0, true);
            for k in 1..40 {
                touch(&mut c, k, false);
                if k % 3 == 0 {
                    touch(&mut c, 0, true);
                }
            }
            // FIFO throws the hot page out again and again; with refault
            // detection it comes back once and then stays.
            let ok = match policy {
                Policy::Fifo => misses >= 5,
                Policy::Refault => misses <= 2,
            };
            assert!(ok, "{policy:?}: the hot page missed {misses} times");
        }
    }

    #[test]
    fn dirty_prediction_follows_what_eviction_finds() {
        let mut c = ExCache::new(8, 4);
        // What the pager does: a predicted page found holding what it was
        // installed with is evicted clean, one found changed is written.
        let evict = |c: &mut ExCache, i: usize, changed: bool| {
            if changed {
                c.saw_write(i);
            }
            let dirty = c.is_dirty(i) && changed;
            c.evicted(Victim { index: i, dirty });
        };
        c.installed_unobserved(1, None); // zero-filled ahead
        evict(&mut c, 1, true); // held data: written back
        assert!(c.is_remote(1) && c.predicts_write(1));
        // Fetched writable on the prediction, then only read.
        let (fetched, written) = ([7u8; 4096], [8u8; 4096]);
        c.installed_unobserved(1, Some(&fetched));
        assert!(c.unchanged_since_fetch(1, &fetched) && !c.unchanged_since_fetch(1, &written));
        evict(&mut c, 1, false);
        assert!(c.is_remote(1), "the daemon's copy stays current");
        assert!(
            !c.predicts_write(1),
            "an unwritten page is not predicted again"
        );
        // Fetched clean and written: predicted; written again while
        // predicted: predicted again (an always-written page never pays a
        // write-protect fault after its first).
        c.installed(1, false);
        c.dirtied(1);
        evict(&mut c, 1, true);
        assert!(c.predicts_write(1));
        c.installed_unobserved(1, Some(&fetched));
        assert!(!c.unchanged_since_fetch(1, &written));
        evict(&mut c, 1, true);
        assert!(c.predicts_write(1));
        // A page installed clean and never written: no prediction.
        c.installed(2, false);
        evict(&mut c, 2, false);
        assert!(!c.predicts_write(2));
    }

    #[test]
    fn freed_range_keeps_resident_pages_and_forgets_remote_copies() {
        let mut c = ExCache::new(16, 4);
        c.installed(0, true);
        c.installed(1, true);
        c.pick_victims(1, &mut vec![]);
        c.evicted(Victim {
            index: 0,
            dirty: true,
        });
        c.evicted(Victim {
            index: 1,
            dirty: true,
        });
        c.installed(1, false); // fetched back, clean
        c.installed(2, true);
        assert!(c.forget_remote(0, 3));
        assert!(!c.is_remote(0) && !c.is_remote(1) && !c.is_resident(0));
        assert!(c.is_resident(1) && c.is_resident(2) && c.is_dirty(2));
        assert_eq!((c.resident(), c.holding()), (2, 2));
        assert!(!c.forget_remote(0, 3));
    }

    #[test]
    fn move_remote_carries_state() {
        let mut c = ExCache::new(16, 4);
        c.installed(0, true);
        c.evicted(Victim {
            index: 0,
            dirty: true,
        });
        c.move_remote(0, 8, 2);
        assert!(!c.is_remote(0) && c.is_remote(8) && !c.is_remote(9));
        assert_eq!(c.holding(), 1);
    }

    proptest! {
        /// Against a model: counters match the states, nothing resident is
        /// lost from the eviction order, dirty pages always become remote.
        #[test]
        fn bookkeeping_matches_a_model(ops in proptest::collection::vec((0u8..4, 0usize..32, any::<bool>()), 1..300)) {
            let mut c = ExCache::new(32, 8);
            let mut model = [(false, false, false); 32]; // resident, dirty, remote
            let mut v = vec![];
            for (op, i, w) in ops {
                match op {
                    0 if !model[i].0 => {
                        while !c.has_room(1) {
                            c.pick_victims(3, &mut v);
                            prop_assert!(!v.is_empty(), "full cache must yield victims");
                            for &x in &v {
                                prop_assert_eq!(x.dirty, model[x.index].1);
                                c.evicted(x);
                                let m = &mut model[x.index];
                                m.2 |= m.1; m.0 = false; m.1 = false;
                            }
                        }
                        c.installed(i, w);
                        model[i].0 = true; model[i].1 = w;
                    }
                    1 if model[i].0 => { c.dirtied(i); model[i].1 = true; }
                    2 => { c.discard(i, 2); for m in model.iter_mut().skip(i).take(2) { *m = (false, false, false); } },
                    _ => {}
                }
                let res = model.iter().filter(|m| m.0).count();
                let held = model.iter().filter(|m| m.0 || m.2).count();
                prop_assert_eq!(c.resident(), res);
                prop_assert_eq!(c.holding(), held);
                prop_assert!(c.resident() <= c.budget());
                for (k, m) in model.iter().enumerate() {
                    prop_assert_eq!((c.is_resident(k), c.is_dirty(k), c.is_remote(k)), *m);
                }
            }
        }
    }
}
