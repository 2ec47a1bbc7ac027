//! The local victim tier: pages evicted from the ExCache, kept LZ4-compressed
//! in the runtime's own memory before they go to a memory daemon.
//!
//! A miss on a page in the tier is served locally: a decompression and a
//! `UFFDIO_COPY`, a few µs, instead of a network round trip. A dirty page
//! (the daemon's copy is stale, or there is none) costs no network at all
//! unless it is pushed out of the tier, the oldest first, when the tier
//! outgrows its share of the ExCache budget ([`Tier::over_cap`]).
//!
//! Pure data, like [`crate::excache`]: the pager copies pages in and out
//! and writes demoted dirty pages back. Every byte the tier keeps counts
//! against the ExCache budget ([`Tier::pages`]): the compressed pages live
//! in a private heap whose footprint (free space between pages included)
//! is counted exactly ([`CountedHeap`]), plus the index. When free space
//! grows to more than the pages themselves (pages leave in FIFO order and
//! leave holes everywhere), the pages are copied into a fresh heap and the
//! old one is given back, so the tier's footprint follows what it stores.
//!
//! The tier's share adapts to what it is worth ([`Tier::store`]). Its bytes
//! are taken from resident pages: without it, the ExCache would hold that
//! many more pages, the ones evicted last. So a page taken back from the
//! tier soon after it was stored (fewer pages evicted since than the tier
//! takes pages of the budget) is a *near* hit: it would have stayed
//! resident and cost no miss at all. Only the other, *far* hits save a
//! network round trip. Per window of [`WINDOW`] pages stored, the share
//! halves, down to a sixteenth of its maximum, if the far hits do not
//! outweigh the near ones (more than [`NEAR_SHARE`] of the hits are near;
//! at a small ExCache with poorly compressing pages the tier only
//! multiplies misses), or if few pages were taken back at all before they
//! left (a scan, pages used once) and they are not cheap to keep (they
//! shrink less than [`CHEAP_RATIO`] times). If many were, and mostly far,
//! it grows back. While the share is that small, only one victim in
//! [`SAMPLE_EVERY`] is tried. The budget it gives up goes to resident
//! pages.
//!
//! Pages that do not compress to [`MAX_STORED`] bytes are not kept (they
//! would save too little). After a run of such pages (a program whose data
//! is random or already compressed) only one victim in [`SAMPLE_EVERY`] is
//! tried, so compression costs little where it cannot help.

use std::collections::{HashMap, VecDeque};

use lego_protocol::PAGE_SIZE;

use crate::heap::{Block, CountedHeap};

/// The largest compressed size kept: a page must shrink by a quarter.
pub const MAX_STORED: usize = PAGE_SIZE * 3 / 4;
/// What a stored page costs in the index: its entry in the map (with the
/// map's spare room) and its place in the order.
const INDEX_BYTES: usize = 48;
/// After this many pages in a row that did not compress ...
const FAILS_BEFORE_SAMPLING: u32 = 64;
/// ... only one victim in this many is tried, until one compresses.
const SAMPLE_EVERY: u32 = 16;

/// Pages stored per adaptation window.
pub const WINDOW: u32 = 4096;
/// Below this share of a window's pages taken back, the tier shrinks ...
const SHRINK_BELOW: f64 = 0.08;
/// ... above this one it grows.
const GROW_ABOVE: f64 = 0.20;
/// Free space in the tier's heap beyond its live bytes (and as much
/// again) that makes it copy them into a fresh heap.
const REPACK_SLACK: usize = 64 << 10;
/// Pages that compress this many times cost so little budget that the tier
/// keeps its share even if few come back.
pub const CHEAP_RATIO: usize = 4;
/// A near hit costs a local miss (a fault, a wake-up, a decompression:
/// 35-40 µs of the program's wall time here) where there would have been
/// none; a far hit saves the difference between a remote miss (about
/// 90 µs) and that, about 50 µs. The tier is worth its share while
/// `far * 50 > near * 40`, i.e. while near hits are less than about 55%
/// of its hits; it shrinks when they are more than this share. Measured
/// (docs/benchmarks.md): zstd at a 2.8 MiB ExCache has 55-70% near hits,
/// 70 s with a threshold of 2/3 and 27 s with this one (19 s with the
/// tier off); the dict program at 18 MiB has 25-30% near hits and keeps
/// the tier (12 s, against 22 s with the tier shrunk).
pub const NEAR_SHARE: f64 = 0.5;

/// A stored page.
struct Slot {
    data: Block,
    /// The daemons do not hold these contents (the page was written since
    /// it was last stored there, or never was).
    dirty: bool,
    /// The victim count when it was stored: matches the page's entry in
    /// `order` (older entries are stale), and tells how many pages were
    /// evicted since.
    stamp: u32,
}

/// Why a page was not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// The tier is off (no share of the budget).
    Off,
    /// It did not compress to [`MAX_STORED`] bytes.
    Incompressible,
    /// Not tried: recent pages did not compress (see the module docs).
    Skipped,
}

/// The compressed pages of one region, by page index.
pub struct Tier {
    /// Where the compressed pages are.
    heap: CountedHeap,
    slots: HashMap<u32, Slot>,
    /// Pages in the order they were stored, oldest first, with the stamp
    /// they were stored under.
    order: VecDeque<(u32, u32)>,
    /// Bytes of the pages stored (with the allocator's per-block header):
    /// what demotion keeps under the share. The heap's footprint, which the
    /// budget counts, also has the free space between them.
    live: usize,
    /// The most bytes the tier may account for now ...
    cap: usize,
    /// ... and at most (its share of the budget).
    max_cap: usize,
    /// This window's pages stored and taken back, and how many of those
    /// were near hits (see the module docs).
    window_stores: u32,
    window_hits: u32,
    window_near: u32,
    /// Compression output.
    out: Vec<u8>,
    fails_in_row: u32,
    /// Victims seen, offered ([`Tier::store`]) or not ([`Tier::pass`]).
    victims: u32,
}

impl Tier {
    /// A tier that may account for up to `cap` bytes (0: off).
    pub fn new(cap: usize) -> Self {
        Self {
            heap: CountedHeap::new(),
            slots: HashMap::new(),
            order: VecDeque::new(),
            live: 0,
            cap,
            max_cap: cap,
            window_stores: 0,
            window_hits: 0,
            window_near: 0,
            out: Vec::new(),
            fails_in_row: 0,
            victims: 0,
        }
    }

    pub fn is_on(&self) -> bool {
        self.max_cap > 0
    }

    /// The share the tier may take now, in bytes.
    pub fn cap(&self) -> usize {
        self.cap
    }

    fn min_cap(&self) -> usize {
        self.max_cap / 16
    }

    /// Ends an adaptation window: shrinks or grows the share by how many
    /// of the window's pages were taken back, and how far.
    fn adapt(&mut self) {
        let ratio = f64::from(self.window_hits) / f64::from(self.window_stores.max(1));
        let cheap = self.live * CHEAP_RATIO < self.slots.len() * PAGE_SIZE;
        let near = f64::from(self.window_near) / f64::from(self.window_hits.max(1));
        let losing = near > NEAR_SHARE;
        if losing || (ratio < SHRINK_BELOW && !cheap) {
            self.cap = (self.cap / 2).max(self.min_cap());
        } else if ratio > GROW_ABOVE {
            self.cap = (self.cap + self.cap / 2).clamp(self.min_cap().max(1), self.max_cap);
        }
        self.window_stores = 0;
        self.window_hits = 0;
        self.window_near = 0;
    }

    /// The bytes the tier takes: its heap's footprint and its index.
    pub fn bytes(&self) -> usize {
        if self.slots.is_empty() {
            return 0;
        }
        self.heap.footprint() + self.slots.len() * INDEX_BYTES
    }

    /// Its bytes in whole pages: what the tier takes of the budget.
    pub fn pages(&self) -> usize {
        self.bytes().div_ceil(PAGE_SIZE)
    }

    /// Pages stored.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn contains(&self, i: usize) -> bool {
        self.slots.contains_key(&(i as u32))
    }

    /// Whether the tier holds more than its share and must demote: its
    /// pages' bytes and index, not counting the heap's free space (which
    /// new pages fill; demoting cannot give it back).
    pub fn over_cap(&self) -> bool {
        self.live + self.slots.len() * INDEX_BYTES > self.cap
    }

    /// Whether the next page offered would be skipped unseen (the tier is
    /// off, or sampling and it is not the one in [`SAMPLE_EVERY`]): the
    /// caller need not copy it out.
    pub fn skips_next(&self) -> bool {
        let sampling = self.fails_in_row >= FAILS_BEFORE_SAMPLING || self.cap <= self.min_cap();
        !self.is_on() || (sampling && !self.victims.wrapping_add(1).is_multiple_of(SAMPLE_EVERY))
    }

    /// Counts a victim that was not offered (one [`Tier::skips_next`] said
    /// to skip, or one there is no point keeping): sampling and the near
    /// hits count every page evicted.
    pub fn pass(&mut self) {
        self.victims = self.victims.wrapping_add(1);
    }

    /// Stores page `i` (`page`: its contents), `dirty` if the daemons do
    /// not hold them.
    pub fn store(&mut self, i: usize, page: &[u8], dirty: bool) -> Result<(), Rejected> {
        debug_assert_eq!(page.len(), PAGE_SIZE);
        if !self.is_on() {
            return Err(Rejected::Off);
        }
        let skip = self.skips_next();
        self.victims = self.victims.wrapping_add(1);
        if skip {
            return Err(Rejected::Skipped);
        }
        self.out
            .resize(lz4_flex::block::get_maximum_output_size(PAGE_SIZE), 0);
        let n = match lz4_flex::block::compress_into(page, &mut self.out) {
            Ok(n) if n <= MAX_STORED => n,
            _ => {
                self.fails_in_row = self.fails_in_row.saturating_add(1);
                return Err(Rejected::Incompressible);
            }
        };
        self.fails_in_row = 0;
        self.window_stores += 1;
        if self.window_stores >= WINDOW {
            self.adapt();
        }
        self.remove(i);
        let Some(data) = self.heap.store(&self.out[..n]) else {
            // The kernel has no memory for it: the page goes to a daemon.
            return Err(Rejected::Incompressible);
        };
        self.live += block_bytes(n);
        let slot = Slot {
            data,
            dirty,
            stamp: self.victims,
        };
        self.slots.insert(i as u32, slot);
        self.order.push_back((i as u32, self.victims));
        Ok(())
    }

    /// Takes page `i` out of the tier, its contents into `out` (one page).
    /// Returns whether it was dirty, or `None` if it is not stored.
    pub fn take(&mut self, i: usize, out: &mut [u8]) -> Option<bool> {
        // The pages of budget the tier takes, against the pages evicted
        // since this one: a near hit would have been resident without it.
        let pages = self.pages();
        let slot = self.slots.remove(&(i as u32))?;
        self.window_hits += 1;
        if (self.victims.wrapping_sub(slot.stamp) as usize) < pages {
            self.window_near += 1;
        }
        unpack(self.heap.get(&slot.data), out);
        self.free(slot.data);
        self.compact();
        Some(slot.dirty)
    }

    /// Takes the oldest page out of the tier: its index and whether it was
    /// dirty; a dirty one's contents go into `out` (one page).
    pub fn pop_oldest(&mut self, out: &mut [u8]) -> Option<(usize, bool)> {
        while let Some((i, stamp)) = self.order.pop_front() {
            match self.slots.get(&i) {
                Some(s) if s.stamp == stamp => {}
                _ => continue,
            }
            let slot = self.slots.remove(&i).expect("checked above");
            if slot.dirty {
                unpack(self.heap.get(&slot.data), out);
            }
            self.free(slot.data);
            self.compact();
            return Some((i as usize, slot.dirty));
        }
        None
    }

    /// Forgets page `i` if stored.
    fn remove(&mut self, i: usize) {
        if let Some(slot) = self.slots.remove(&(i as u32)) {
            self.free(slot.data);
        }
    }

    fn free(&mut self, b: Block) {
        self.live -= block_bytes(self.heap.get(&b).len());
        self.heap.free(b);
    }

    /// Forgets the pages of `[first, first+count)`; returns how many were
    /// stored.
    pub fn remove_range(&mut self, first: usize, count: usize) -> usize {
        let before = self.slots.len();
        if count > self.slots.len() {
            let end = first.saturating_add(count);
            let gone: Vec<u32> = self
                .slots
                .keys()
                .copied()
                .filter(|&i| (first..end).contains(&(i as usize)))
                .collect();
            for i in gone {
                self.remove(i as usize);
            }
        } else {
            for i in first..first + count {
                self.remove(i);
            }
        }
        self.compact();
        before - self.slots.len()
    }

    /// Up to `max` dirty pages of `[first, first+count)`, in page order,
    /// their contents in `data`; they count as clean from now on (the
    /// caller stores them at a daemon). Called until it finds none, it
    /// cleans the whole range a bounded batch at a time (decompressed, the
    /// tier's pages can be many times its size).
    pub fn clean_range(
        &mut self,
        first: usize,
        count: usize,
        max: usize,
        pages: &mut Vec<usize>,
        data: &mut Vec<u8>,
    ) {
        pages.clear();
        data.clear();
        let end = first.saturating_add(count);
        if count > self.slots.len() {
            pages.extend(
                self.slots
                    .iter()
                    .filter(|(&i, s)| s.dirty && (first..end).contains(&(i as usize)))
                    .map(|(&i, _)| i as usize),
            );
            pages.sort_unstable();
            pages.truncate(max);
        } else {
            pages.extend(
                (first..end)
                    .filter(|&i| self.slots.get(&(i as u32)).is_some_and(|s| s.dirty))
                    .take(max),
            );
        }
        for &i in pages.iter() {
            let slot = self.slots.get_mut(&(i as u32)).expect("listed above");
            slot.dirty = false;
            let at = data.len();
            data.resize(at + PAGE_SIZE, 0);
            unpack(self.heap.get(&slot.data), &mut data[at..]);
        }
    }

    /// Drops stale order entries once they outnumber the live ones.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.slots.len() + 1024 {
            let slots = &self.slots;
            self.order
                .retain(|(i, stamp)| slots.get(i).is_some_and(|s| s.stamp == *stamp));
        }
        // Pages freed in FIFO order leave holes all over the heap, and its
        // footprint (which the budget counts) stays at its peak: a tier
        // whose share shrank would go on taking the budget of its largest
        // size. Copying what is live into a fresh heap costs at most the
        // bytes freed since the last time.
        if self.heap.footprint() > 2 * self.live + REPACK_SLACK {
            let mut blocks: Vec<&mut Block> =
                self.slots.values_mut().map(|s| &mut s.data).collect();
            self.heap.repack(&mut blocks);
        }
    }
}

impl Clone for Tier {
    /// A copy with its own heap (the pager is cloned in tests of fork).
    fn clone(&self) -> Self {
        let mut heap = CountedHeap::new();
        let slots = self
            .slots
            .iter()
            .map(|(&i, s)| {
                let data = heap
                    .store(self.heap.get(&s.data))
                    .expect("memory for a copy of the tier");
                (i, Slot { data, ..*s })
            })
            .collect();
        Self {
            heap,
            slots,
            order: self.order.clone(),
            live: self.live,
            cap: self.cap,
            max_cap: self.max_cap,
            window_stores: self.window_stores,
            window_hits: self.window_hits,
            window_near: self.window_near,
            out: Vec::new(),
            fails_in_row: self.fails_in_row,
            victims: self.victims,
        }
    }
}

/// The heap bytes a block of `len` takes: rounded up, with its header.
fn block_bytes(len: usize) -> usize {
    len.next_multiple_of(16) + 16
}

/// Decompresses a stored page into `out`.
fn unpack(data: &[u8], out: &mut [u8]) {
    let n = lz4_flex::block::decompress_into(data, &mut out[..PAGE_SIZE])
        .expect("the tier decompresses only what it compressed");
    assert_eq!(n, PAGE_SIZE, "a stored page decompressed to {n} bytes");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u8) -> Vec<u8> {
        // Compressible: a few distinct runs.
        (0..PAGE_SIZE)
            .map(|k| seed.wrapping_add((k / 512) as u8))
            .collect()
    }

    fn random_page(seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn stores_and_gives_back_pages() {
        let mut t = Tier::new(1 << 20);
        t.store(3, &page(1), true).unwrap();
        t.store(9, &page(2), false).unwrap();
        assert!(t.contains(3) && t.contains(9) && !t.contains(4));
        assert!(
            t.bytes() <= 5 * PAGE_SIZE,
            "one heap segment: {}",
            t.bytes()
        );
        let mut out = vec![0; PAGE_SIZE];
        assert_eq!(t.take(3, &mut out), Some(true));
        assert_eq!(out, page(1));
        assert_eq!(t.take(3, &mut out), None);
        assert_eq!(t.take(9, &mut out), Some(false));
        assert_eq!(out, page(2));
        assert_eq!((t.len(), t.bytes()), (0, 0));
    }

    #[test]
    fn random_pages_are_rejected_then_only_sampled() {
        let mut t = Tier::new(1 << 20);
        let mut tried = 0;
        for k in 0..1000 {
            match t.store(k, &random_page(k as u64 + 7), true) {
                Err(Rejected::Incompressible) => tried += 1,
                Err(Rejected::Skipped) => {}
                r => panic!("{r:?}"),
            }
        }
        assert!(t.is_empty());
        assert!(tried < FAILS_BEFORE_SAMPLING as usize + 1000 / SAMPLE_EVERY as usize + 2);
        // A compressible page is stored once tried, and sampling ends.
        let first = (0..SAMPLE_EVERY as usize)
            .find(|&k| t.store(2000 + k, &page(3), false).is_ok())
            .expect("one in SAMPLE_EVERY is tried");
        assert_eq!(t.len(), 1, "stored at the {first}th try");
        assert!(
            t.store(3000, &page(4), false).is_ok(),
            "sampling ends after a success"
        );
    }

    #[test]
    fn demotes_oldest_first_and_skips_taken_pages() {
        let mut t = Tier::new(1 << 20);
        for k in 0..5 {
            t.store(k, &page(k as u8), k % 2 == 0).unwrap();
        }
        let mut out = vec![0; PAGE_SIZE];
        t.take(0, &mut out);
        t.store(0, &page(9), true).unwrap(); // stored again: now the newest
        let mut order = vec![];
        while let Some((i, dirty)) = t.pop_oldest(&mut out) {
            if dirty {
                assert_eq!(out, if i == 0 { page(9) } else { page(i as u8) });
            }
            order.push((i, dirty));
        }
        assert_eq!(
            order,
            [(1, false), (2, true), (3, false), (4, true), (0, true)]
        );
        assert_eq!(t.bytes(), 0);
    }

    #[test]
    fn cap_accounts_every_byte() {
        let mut t = Tier::new(64 * PAGE_SIZE);
        let mut k = 0;
        while !t.over_cap() {
            t.store(
                k,
                &random_page(k as u64)
                    .iter()
                    .map(|b| b & 3)
                    .collect::<Vec<_>>(),
                true,
            )
            .unwrap();
            k += 1;
        }
        assert!(k > 64, "2-bit data compresses: {k} pages fit in 64");
        let mut out = vec![0; PAGE_SIZE];
        while t.over_cap() {
            t.pop_oldest(&mut out).unwrap();
        }
        // What the budget counts is the heap's whole footprint: free space
        // left by demoted pages too, which the next pages fill.
        // (Each 16 KiB segment of the heap ends in a tail too small for a
        // page: here, pages of 2.5 KiB, up to 15%.)
        let footprint = t.pages();
        assert!((64..=80).contains(&footprint), "{footprint} pages");
        for _ in 0..10 {
            t.pop_oldest(&mut out).unwrap();
            t.store(
                k,
                &random_page(k as u64)
                    .iter()
                    .map(|b| b & 3)
                    .collect::<Vec<_>>(),
                true,
            )
            .unwrap();
            k += 1;
        }
        assert!(t.pages() <= footprint + 1, "freed space is reused");
        while t.pop_oldest(&mut out).is_some() {}
        assert_eq!(t.bytes(), 0, "an empty tier gives its heap back");
    }

    #[test]
    fn the_share_shrinks_for_pages_used_once_and_grows_for_reused_ones() {
        let max = 64 * PAGE_SIZE;
        let mut t = Tier::new(max);
        let mut out = vec![0; PAGE_SIZE];
        let mut k = 0;
        // Pages used once that compress only about 2 times.
        let dense = |k: usize| -> Vec<u8> {
            let r = random_page(k as u64);
            (0..PAGE_SIZE)
                .map(|j| if j % 32 < 16 { r[j] } else { 0 })
                .collect()
        };
        for _ in 0..6 * WINDOW {
            let _ = t.store(k, &dense(k), true);
            while t.over_cap() {
                t.pop_oldest(&mut out);
            }
            k += 1;
        }
        assert_eq!(t.cap(), max / 16);
        // Reuse from afar: pages come back after more pages were stored
        // than the tier takes of the budget.
        let back = 128;
        let base = k;
        for _ in 0..40 * WINDOW {
            let _ = t.store(k, &page(k as u8), true);
            if k >= base + back {
                t.take(k - back, &mut out);
            }
            assert!(t.pages() < back, "{} pages", t.pages());
            while t.over_cap() {
                t.pop_oldest(&mut out);
            }
            k += 1;
        }
        assert_eq!(t.cap(), max);
        // Pages used once that compress very well keep the share.
        for _ in 0..6 * WINDOW {
            let _ = t.store(k, &page(k as u8), true);
            while t.over_cap() {
                t.pop_oldest(&mut out);
            }
            k += 1;
        }
        assert_eq!(t.cap(), max);
    }

    #[test]
    fn the_share_shrinks_when_pages_come_back_before_they_would_have_left() {
        // Pages taken back right after they were stored would have stayed
        // resident without the tier: it only adds misses, so it shrinks.
        let max = 64 * PAGE_SIZE;
        let mut t = Tier::new(max);
        let mut out = vec![0; PAGE_SIZE];
        for k in 0..6 * WINDOW as usize {
            if t.store(k, &page(k as u8), true).is_ok() {
                assert!(t.take(k, &mut out).is_some());
            }
        }
        assert_eq!(t.cap(), max / 16);
    }

    #[test]
    fn the_footprint_follows_what_is_stored() {
        // Pages taken back all over the heap leave holes; the tier's bytes
        // (what the budget counts) follow the pages still stored.
        let mut t = Tier::new(64 << 20);
        let dense = |k: usize| -> Vec<u8> {
            let r = random_page(k as u64 + 1);
            (0..PAGE_SIZE)
                .map(|j| if j % 32 < 16 { r[j] } else { 0 })
                .collect()
        };
        for k in 0..4000 {
            t.store(k, &dense(k), true).unwrap();
        }
        let full = t.bytes();
        let mut out = vec![0; PAGE_SIZE];
        for k in (0..4000).filter(|k| k % 16 != 0) {
            t.take(k, &mut out).unwrap();
        }
        assert_eq!(t.len(), 250);
        assert!(t.bytes() < full / 8, "{} of {full} bytes", t.bytes());
        for k in (0..4000).step_by(16) {
            assert_eq!(t.take(k, &mut out), Some(true));
            assert_eq!(out, dense(k));
        }
        assert_eq!(t.bytes(), 0);
    }

    #[test]
    fn ranges_are_removed_and_cleaned() {
        let mut t = Tier::new(1 << 20);
        for k in 0..20 {
            t.store(k, &page(k as u8), true).unwrap();
        }
        assert_eq!(t.remove_range(5, 5), 5);
        assert_eq!(t.remove_range(0, 1 << 30), 15);
        for k in 0..20 {
            t.store(k, &page(k as u8), k % 3 == 0).unwrap();
        }
        let (mut pages, mut data) = (vec![], vec![]);
        t.clean_range(0, 1 << 30, 2, &mut pages, &mut data);
        assert_eq!(pages, [0, 3], "at most 2");
        for k in [0, 3] {
            t.store(k, &page(k as u8), true).unwrap();
        }
        for (first, count) in [(4, 8), (0, 1 << 30)] {
            t.clean_range(first, count, usize::MAX, &mut pages, &mut data);
            if first == 4 {
                assert_eq!(pages, [6, 9]);
                assert_eq!(&data[PAGE_SIZE..], &page(9)[..]);
            } else {
                assert_eq!(pages, [0, 3, 12, 15, 18]);
            }
        }
        t.clean_range(0, 1 << 30, usize::MAX, &mut pages, &mut data);
        assert!(pages.is_empty(), "cleaned pages stay stored, clean");
        assert_eq!(t.len(), 20);
    }
}
