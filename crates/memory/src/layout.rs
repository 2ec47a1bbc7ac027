//! The disaggregated layout of one address space: which ranges of the
//! runtime's reserved region are mapped, and the program break.
//!
//! Pure data, no I/O. The region is cut into vRegions of [`VREGION_BYTES`]
//! (as in LegoOS): vRegion 0 holds the runtime's bootstrap heap, vRegion 1 is
//! the `brk` heap, and anonymous mappings are placed first-fit from vRegion 2
//! on. The vRegion index of an address also decides which memory daemon
//! stores its pages (see `lego-runtime`).

use std::collections::BTreeMap;

use lego_protocol::VREGION_BYTES;

const PAGE: u64 = 4096;

/// Why a layout change was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("no free range of {0} bytes left in the region")]
    NoSpace(u64),
    #[error("range {0:#x}+{1:#x} is not inside the region or not page aligned")]
    BadRange(u64, u64),
    #[error("range {0:#x} is not a mapping start")]
    NotMapped(u64),
}

/// `v` rounded up to a page; saturates (sizes come from the wire, and
/// a saturated one fits nowhere).
fn round_up(v: u64) -> u64 {
    v.div_ceil(PAGE).saturating_mul(PAGE)
}

/// A layout as it travels between daemons: the break's start, the break and
/// the mappings (start, end), in address order.
pub type Exported = (u64, u64, Vec<(u64, u64)>);

/// Mappings as `start -> end`, non-overlapping, plus the break.
#[derive(Clone, Debug)]
pub struct Layout {
    base: u64,
    end: u64,
    vmas: BTreeMap<u64, u64>,
    brk_start: u64,
    brk: u64,
}

impl Layout {
    /// A layout for the region `[base, base+len)` whose first
    /// `bootstrap_bytes` are already in use.
    pub fn new(base: u64, len: u64, bootstrap_bytes: u64) -> Result<Self, LayoutError> {
        if !base.is_multiple_of(PAGE)
            || len < 3 * VREGION_BYTES
            || bootstrap_bytes > VREGION_BYTES
            || base.checked_add(len).is_none()
        {
            return Err(LayoutError::BadRange(base, len));
        }
        let mut vmas = BTreeMap::new();
        if bootstrap_bytes > 0 {
            vmas.insert(base, base.saturating_add(round_up(bootstrap_bytes)));
        }
        let brk_start = base + VREGION_BYTES;
        Ok(Self {
            base,
            end: base + len,
            vmas,
            brk_start,
            brk: brk_start,
        })
    }

    fn check(&self, addr: u64, len: u64) -> Result<(), LayoutError> {
        if !addr.is_multiple_of(PAGE)
            || addr < self.base
            || len == 0
            || addr.saturating_add(len) > self.end
        {
            return Err(LayoutError::BadRange(addr, len));
        }
        Ok(())
    }

    fn is_free(&self, start: u64, end: u64) -> bool {
        if let Some((_, &e)) = self.vmas.range(..end).next_back() {
            if e > start {
                return false;
            }
        }
        true
    }

    fn find_gap(&self, len: u64) -> Option<u64> {
        if len > self.end - self.base {
            return None;
        }
        let mut cursor = self.base + 2 * VREGION_BYTES;
        for (&s, &e) in self.vmas.range(cursor..) {
            if s >= cursor.saturating_add(len) {
                break;
            }
            cursor = cursor.max(e);
        }
        // A mapping that fits in one vRegion does not straddle two.
        let in_vregion = cursor % VREGION_BYTES;
        if len <= VREGION_BYTES && in_vregion + len > VREGION_BYTES {
            let next = cursor - in_vregion + VREGION_BYTES;
            if self.is_free(next, next.saturating_add(len)) && next.saturating_add(len) <= self.end
            {
                return Some(next);
            }
        }
        (cursor.saturating_add(len) <= self.end).then_some(cursor)
    }

    /// Places a new mapping of `len` bytes; returns its address.
    pub fn mmap(&mut self, len: u64) -> Result<u64, LayoutError> {
        let len = round_up(len.max(1));
        // The layout must fit one frame (`GetLayout`).
        if self.vmas.len() >= lego_protocol::MAX_MAPPINGS {
            return Err(LayoutError::NoSpace(len));
        }
        let addr = self.find_gap(len).ok_or(LayoutError::NoSpace(len))?;
        self.vmas.insert(addr, addr + len);
        Ok(addr)
    }

    /// Unmaps `[addr, addr+len)`, splitting mappings as needed. Unmapping
    /// unmapped space is not an error (as in Linux).
    pub fn munmap(&mut self, addr: u64, len: u64) -> Result<(), LayoutError> {
        self.check(addr, len)?;
        let end = addr + round_up(len);
        let hit: Vec<(u64, u64)> = self
            .vmas
            .range(..end)
            .rev()
            .take_while(|(_, &e)| e > addr)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in hit {
            if e <= addr {
                continue;
            }
            self.vmas.remove(&s);
            if s < addr {
                self.vmas.insert(s, addr);
            }
            if e > end {
                self.vmas.insert(end, e);
            }
        }
        Ok(())
    }

    /// Resizes the mapping starting at `old`. Returns the (possibly new)
    /// address; the caller moves page contents when it changed.
    pub fn mremap(
        &mut self,
        old: u64,
        old_len: u64,
        new_len: u64,
        may_move: bool,
    ) -> Result<u64, LayoutError> {
        self.check(old, old_len)?;
        let old_len = round_up(old_len);
        if new_len > self.end - self.base {
            return Err(LayoutError::NoSpace(new_len));
        }
        let new_len = round_up(new_len.max(1));
        let e = *self.vmas.get(&old).ok_or(LayoutError::NotMapped(old))?;
        if e < old + old_len {
            return Err(LayoutError::BadRange(old, old_len));
        }
        if new_len <= old_len {
            self.munmap(old + new_len, old_len - new_len)?;
            return Ok(old);
        }
        let grow_end = old + new_len;
        let tail_free = e == old + old_len
            && grow_end <= self.end
            && self.vmas.range(e..grow_end).next().is_none();
        if tail_free {
            self.vmas.insert(old, grow_end);
            return Ok(old);
        }
        if !may_move {
            return Err(LayoutError::NoSpace(new_len));
        }
        let new = self
            .find_gap(new_len)
            .ok_or(LayoutError::NoSpace(new_len))?;
        self.munmap(old, old_len)?;
        self.vmas.insert(new, new + new_len);
        Ok(new)
    }

    /// Moves the break; `0` only queries. Returns the break after the call
    /// and, if it shrank, the range whose pages must be discarded.
    pub fn brk(&mut self, new_brk: u64) -> (u64, Option<(u64, u64)>) {
        if new_brk == 0
            || new_brk < self.brk_start
            || new_brk > self.brk_start.saturating_add(VREGION_BYTES)
        {
            return (self.brk, None);
        }
        let old = self.brk;
        self.brk = new_brk;
        let (old_top, new_top) = (round_up(old), round_up(new_brk));
        let freed = (new_top < old_top).then(|| (new_top, old_top - new_top));
        (self.brk, freed)
    }

    /// The break's start, the break and the mappings, to move the layout to
    /// another daemon.
    pub fn export(&self) -> Exported {
        let mappings = self.vmas.iter().map(|(&s, &e)| (s, e)).collect();
        (self.brk_start, self.brk, mappings)
    }

    /// A layout of the region `[base, end)` from what [`Layout::export`]
    /// gave on another daemon; checked, as it comes from the network.
    pub fn import(
        base: u64,
        end: u64,
        brk_start: u64,
        brk: u64,
        mappings: &[(u64, u64)],
    ) -> Result<Self, LayoutError> {
        if base
            .checked_add(3 * VREGION_BYTES)
            .is_none_or(|min_end| end < min_end)
            || brk_start != base + VREGION_BYTES
            || brk < brk_start
            || brk > brk_start + VREGION_BYTES
        {
            return Err(LayoutError::BadRange(
                brk_start,
                brk.saturating_sub(brk_start),
            ));
        }
        let mut vmas = BTreeMap::new();
        let mut last_end = base;
        for &(s, e) in mappings {
            let ok = s.is_multiple_of(PAGE) && e.is_multiple_of(PAGE) && s >= last_end && e > s;
            if !ok || e > end {
                return Err(LayoutError::BadRange(s, e.saturating_sub(s)));
            }
            vmas.insert(s, e);
            last_end = e;
        }
        Ok(Self {
            base,
            end,
            vmas,
            brk_start,
            brk,
        })
    }

    /// Whether `addr` lies in a mapping or below the break.
    pub fn contains(&self, addr: u64) -> bool {
        if addr >= self.brk_start && addr < round_up(self.brk) {
            return true;
        }
        matches!(self.vmas.range(..=addr).next_back(), Some((_, &e)) if e > addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BASE: u64 = 1 << 40;
    fn layout() -> Layout {
        Layout::new(BASE, 64 * VREGION_BYTES, 1 << 20).unwrap()
    }

    #[test]
    fn sizes_from_the_wire_that_overflow_are_refused() {
        assert!(Layout::new(u64::MAX - 4095, 4 << 30, 0).is_err());
        let mut l = Layout::new(1 << 40, 4 << 30, 0).unwrap();
        let a = l.mmap(8192).unwrap();
        for len in [u64::MAX, u64::MAX - 4095, 1 << 63] {
            assert!(l.mremap(a, 8192, len, true).is_err(), "{len}");
            assert!(l.mremap(a, 8192, len, false).is_err(), "{len}");
            assert!(l.mmap(len).is_err(), "{len}");
            assert!(l.munmap(a, len).is_err(), "{len}");
        }
        assert_eq!(l.brk(u64::MAX).0, l.brk(0).0);
        assert_eq!(l.mremap(a, 8192, 4096, false).unwrap(), a);
    }

    #[test]
    fn bootstrap_and_first_mapping() {
        let mut l = layout();
        assert!(l.contains(BASE));
        let a = l.mmap(10_000).unwrap();
        assert_eq!(a, BASE + 2 * VREGION_BYTES);
        assert!(l.contains(a + 12287));
        assert!(!l.contains(a + 12288));
    }

    #[test]
    fn munmap_splits_and_frees() {
        let mut l = layout();
        let a = l.mmap(4 * PAGE).unwrap();
        l.munmap(a + PAGE, PAGE).unwrap();
        assert!(l.contains(a) && !l.contains(a + PAGE) && l.contains(a + 2 * PAGE));
        // The hole is reused first-fit.
        assert_eq!(l.mmap(PAGE).unwrap(), a + PAGE);
    }

    #[test]
    fn mremap_grows_in_place_or_moves() {
        let mut l = layout();
        let a = l.mmap(PAGE).unwrap();
        assert_eq!(l.mremap(a, PAGE, 2 * PAGE, false).unwrap(), a);
        let b = l.mmap(PAGE).unwrap();
        assert_eq!(b, a + 2 * PAGE);
        assert_eq!(
            l.mremap(a, 2 * PAGE, 4 * PAGE, false),
            Err(LayoutError::NoSpace(4 * PAGE))
        );
        let c = l.mremap(a, 2 * PAGE, 4 * PAGE, true).unwrap();
        assert_ne!(c, a);
        assert!(!l.contains(a) && l.contains(c + 3 * PAGE));
    }

    #[test]
    fn brk_grows_and_shrinks() {
        let mut l = layout();
        let (start, _) = l.brk(0);
        assert_eq!(l.brk(start + 3 * PAGE), (start + 3 * PAGE, None));
        assert!(l.contains(start + 2 * PAGE));
        assert_eq!(
            l.brk(start + PAGE),
            (start + PAGE, Some((start + PAGE, 2 * PAGE)))
        );
        // Out of range requests leave the break alone.
        assert_eq!(l.brk(1).0, start + PAGE);
    }

    #[test]
    fn small_mappings_do_not_straddle_vregions() {
        let mut l = layout();
        l.mmap(VREGION_BYTES - PAGE).unwrap();
        let b = l.mmap(2 * PAGE).unwrap();
        assert_eq!((b - BASE) % VREGION_BYTES, 0);
    }

    #[test]
    fn export_and_import_give_the_same_layout() {
        let mut l = layout();
        let a = l.mmap(3 * PAGE).unwrap();
        let b = l.mmap(PAGE).unwrap();
        l.munmap(a + PAGE, PAGE).unwrap();
        l.brk(BASE + VREGION_BYTES + 5 * PAGE);
        let (brk_start, brk, maps) = l.export();
        let mut m = Layout::import(BASE, BASE + 64 * VREGION_BYTES, brk_start, brk, &maps).unwrap();
        assert_eq!(m.export(), l.export());
        assert!(m.contains(b) && !m.contains(a + PAGE));
        assert_eq!(m.mmap(PAGE).unwrap(), l.mmap(PAGE).unwrap());
        // Overlapping, unaligned or outside mappings are refused.
        let end = BASE + 64 * VREGION_BYTES;
        for bad in [
            vec![(a, a + 2 * PAGE), (a + PAGE, a + 3 * PAGE)],
            vec![(a + 1, a + PAGE)],
            vec![(end, end + PAGE)],
        ] {
            assert!(Layout::import(BASE, end, brk_start, brk, &bad).is_err());
        }
        assert!(Layout::import(BASE, end, brk_start, brk_start - PAGE, &maps).is_err());
    }

    #[test]
    fn region_exhaustion_is_an_error() {
        let mut l = Layout::new(BASE, 3 * VREGION_BYTES, 0).unwrap();
        assert!(l.mmap(VREGION_BYTES).is_ok());
        assert_eq!(l.mmap(PAGE), Err(LayoutError::NoSpace(PAGE)));
    }

    proptest! {
        #[test]
        fn mappings_never_overlap(ops in proptest::collection::vec((0u8..3, 1u64..64), 1..100)) {
            let mut l = layout();
            let mut live: Vec<(u64, u64)> = vec![];
            for (op, pages) in ops {
                match op {
                    0 | 1 => {
                        let a = l.mmap(pages * PAGE).unwrap();
                        live.push((a, pages * PAGE));
                    }
                    _ => if let Some((a, len)) = live.pop() { l.munmap(a, len).unwrap(); }
                }
                let v: Vec<_> = l.vmas.iter().map(|(&s, &e)| (s, e)).collect();
                for w in v.windows(2) { prop_assert!(w[0].1 <= w[1].0); }
                for &(a, len) in &live { prop_assert!(l.contains(a) && l.contains(a + len - 1)); }
            }
        }
    }
}
