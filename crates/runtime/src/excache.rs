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
//! Eviction order is FIFO by install time (as in LegoOS).

use std::collections::VecDeque;

const RESIDENT: u8 = 1;
const DIRTY: u8 = 2;
const REMOTE: u8 = 4;
/// The page has an entry in the FIFO (possibly stale).
const QUEUED: u8 = 8;

/// A page chosen for eviction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Victim {
    pub index: usize,
    pub dirty: bool,
}

/// Page states of one region.
pub struct ExCache {
    state: Vec<u8>,
    fifo: VecDeque<u32>,
    resident: usize,
    /// Pages resident or remote: the disaggregated footprint.
    holding: usize,
    budget: usize,
}

impl ExCache {
    /// A cache for `pages` pages with room for `budget` resident ones.
    pub fn new(pages: usize, budget: usize) -> Self {
        Self {
            // Zeroed allocation: untouched parts cost no memory.
            state: vec![0; pages],
            fifo: VecDeque::new(),
            resident: 0,
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
        match (held(old), held(new)) {
            (false, true) => self.holding += 1,
            (true, false) => self.holding -= 1,
            _ => {}
        }
        self.state[i] = new;
    }

    /// Whether `extra` more pages fit without eviction.
    pub fn has_room(&self, extra: usize) -> bool {
        self.resident + extra <= self.budget
    }

    /// A page was installed locally, dirty if the installing access wrote.
    pub fn installed(&mut self, i: usize, dirty: bool) {
        let s = self.state[i];
        let mut new = (s & (REMOTE | QUEUED)) | RESIDENT | if dirty { DIRTY } else { 0 };
        if s & QUEUED == 0 {
            self.fifo.push_back(i as u32);
            new |= QUEUED;
        }
        self.set(i, new);
    }

    /// A clean resident page was written.
    pub fn dirtied(&mut self, i: usize) {
        debug_assert!(self.is_resident(i));
        self.state[i] |= DIRTY;
    }

    /// After fork: every resident page counts as dirty (the kernel dropped
    /// the write protection that kept clean pages clean).
    pub fn mark_resident_dirty(&mut self) {
        for &i in &self.fifo {
            if self.state[i as usize] & RESIDENT != 0 {
                self.state[i as usize] |= DIRTY;
            }
        }
    }

    /// Takes up to `max` eviction victims, oldest first.
    pub fn pick_victims(&mut self, max: usize, out: &mut Vec<Victim>) {
        out.clear();
        while out.len() < max {
            let Some(i) = self.fifo.pop_front() else {
                break;
            };
            let i = i as usize;
            self.state[i] &= !QUEUED;
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
        let s = self.state[v.index];
        let mut new = s & !(RESIDENT | DIRTY);
        if v.dirty {
            new |= REMOTE;
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
