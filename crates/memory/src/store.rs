//! Page contents and layouts of every address space a daemon serves, within
//! its capacity. Pure: requests in, replies out; the server does the I/O.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use lego_protocol::{Capability, DaemonStats, ErrorCode, SpaceId, VirtAddr, PAGE_SIZE};

use crate::layout::{Exported, Layout, LayoutError};

/// Page contents, shared between a forked space and its parent until one
/// of them writes the page.
pub type Page = Arc<[u8; PAGE_SIZE]>;

/// What a copy of part of a space to another daemon needs: the space's
/// capability and region (to attach there) and the pages, shared.
pub struct Snapshot {
    pub capability: Capability,
    pub region: (u64, u64),
    pub pages: Vec<(u64, Page)>,
}

fn no_space(id: SpaceId) -> Refusal {
    Refusal(ErrorCode::NoSpace, format!("no address space {}", id.0))
}

/// Most ranges of one space being filled at once (a unit of placement
/// each: 64 GiB of region in 16 MiB units).
const MAX_FILLS: usize = 4096;

/// A failed request: a wire error code and a message for the peer.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal(pub ErrorCode, pub String);

impl From<LayoutError> for Refusal {
    fn from(e: LayoutError) -> Self {
        let code = match e {
            LayoutError::NoSpace(_) => ErrorCode::NoMemory,
            _ => ErrorCode::BadAddress,
        };
        Refusal(code, e.to_string())
    }
}

struct Space {
    /// Only the home daemon of a space holds its layout.
    layout: Option<Layout>,
    base: u64,
    end: u64,
    pages: BTreeMap<u64, Page>,
    /// Connections attached to this space; it is freed when none is left.
    refs: u32,
    /// What a connection must present to attach to it or fork it.
    capability: Capability,
    /// Ranges being filled by re-replication: start → (end, epoch). A
    /// `FillPages` stores a page only inside one, with its epoch.
    fills: BTreeMap<u64, (u64, u64)>,
}

/// All spaces of one daemon.
pub struct Store {
    capacity_pages: u64,
    used_pages: u64,
    spaces: HashMap<SpaceId, Space>,
    pub connections: u64,
}

impl Store {
    pub fn new(capacity_bytes: u64) -> Self {
        Self {
            capacity_pages: capacity_bytes / PAGE_SIZE as u64,
            used_pages: 0,
            spaces: HashMap::new(),
            connections: 0,
        }
    }

    /// The spaces this daemon holds, for the global manager.
    pub fn space_ids(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.spaces.keys().map(|s| s.0).collect();
        v.sort_unstable();
        v
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_pages * PAGE_SIZE as u64
    }

    pub fn stats(&self) -> DaemonStats {
        DaemonStats {
            capacity_bytes: self.capacity_bytes(),
            used_bytes: self.used_pages * PAGE_SIZE as u64,
            spaces: self.spaces.len() as u64,
            connections: self.connections,
        }
    }

    fn space(&mut self, id: SpaceId) -> Result<&mut Space, Refusal> {
        self.spaces.get_mut(&id).ok_or_else(|| no_space(id))
    }

    /// A new space id: random, so ids cannot be guessed (and a space's
    /// pages on several daemons do not collide with another's), and not
    /// in use here.
    fn fresh_id(&self) -> SpaceId {
        loop {
            let mut b = [0u8; 8];
            getrandom::getrandom(&mut b).expect("the kernel's random numbers");
            let id = SpaceId(u64::from_le_bytes(b) >> 1);
            if id.0 != 0 && !self.spaces.contains_key(&id) {
                return id;
            }
        }
    }

    /// Creates a space whose layout lives here.
    pub fn open(
        &mut self,
        region_base: VirtAddr,
        region_bytes: u64,
        bootstrap_bytes: u64,
        capability: Capability,
    ) -> Result<SpaceId, Refusal> {
        let layout = Layout::new(region_base.0, region_bytes, bootstrap_bytes)?;
        let id = self.fresh_id();
        self.spaces.insert(
            id,
            Space {
                layout: Some(layout),
                base: region_base.0,
                end: region_base.0.saturating_add(region_bytes),
                pages: BTreeMap::new(),
                refs: 1,
                capability,
                fills: BTreeMap::new(),
            },
        );
        Ok(id)
    }

    /// Attaches a connection to a space: an existing one (a second
    /// connection of the same process) or a new page-only space.
    /// An existing space is attached only with the capability it was made
    /// with; without it the answer is the one for a space that does not
    /// exist (no oracle of which ids are in use).
    pub fn attach(
        &mut self,
        id: SpaceId,
        capability: Capability,
        region_base: VirtAddr,
        region_bytes: u64,
    ) -> Result<(), Refusal> {
        if id.0 == 0 {
            return Err(no_space(id));
        }
        let s = self.spaces.entry(id).or_insert_with(|| Space {
            layout: None,
            base: region_base.0,
            end: region_base.0.saturating_add(region_bytes),
            pages: BTreeMap::new(),
            refs: 0,
            capability,
            fills: BTreeMap::new(),
        });
        if s.capability != capability {
            return Err(no_space(id));
        }
        s.refs += 1;
        Ok(())
    }

    /// Clones `parent` copy-on-write into `child` (a new id if `None`) and
    /// attaches one connection to it. Pages are shared until written; each
    /// space counts them against the capacity.
    pub fn fork(
        &mut self,
        parent: SpaceId,
        parent_capability: Capability,
        child: Option<SpaceId>,
        child_capability: Capability,
    ) -> Result<SpaceId, Refusal> {
        let (capacity, used) = (self.capacity_pages, self.used_pages);
        let fresh = self.fresh_id();
        let p = self.space(parent)?;
        if p.capability != parent_capability {
            return Err(no_space(parent));
        }
        let pages = p.pages.len() as u64;
        if used + pages > capacity {
            return Err(Refusal(
                ErrorCode::NoMemory,
                format!("memory daemon is full: cannot copy {pages} pages for a forked process"),
            ));
        }
        let clone = Space {
            layout: p.layout.clone(),
            base: p.base,
            end: p.end,
            pages: p.pages.clone(),
            refs: 1,
            capability: child_capability,
            fills: p.fills.clone(),
        };
        let id = match child {
            Some(id) if self.spaces.contains_key(&id) => {
                return Err(Refusal(
                    ErrorCode::Invalid,
                    format!("space {} exists", id.0),
                ))
            }
            Some(id) => id,
            None => fresh,
        };
        self.spaces.insert(id, clone);
        self.used_pages += pages;
        Ok(id)
    }

    /// Drops one connection's reference; frees the space with the last.
    pub fn release(&mut self, id: SpaceId) {
        let Some(s) = self.spaces.get_mut(&id) else {
            return;
        };
        s.refs -= 1;
        if s.refs == 0 {
            let s = self.spaces.remove(&id).expect("present");
            self.used_pages -= s.pages.len() as u64;
        }
    }

    fn layout(&mut self, id: SpaceId) -> Result<&mut Layout, Refusal> {
        self.space(id)?.layout.as_mut().ok_or_else(|| {
            Refusal(
                ErrorCode::BadState,
                "this daemon is not the home of the address space".into(),
            )
        })
    }

    /// The layout of a space whose home this daemon is: break start,
    /// break, mappings.
    pub fn get_layout(&mut self, id: SpaceId) -> Result<Exported, Refusal> {
        Ok(self.layout(id)?.export())
    }

    /// Makes this daemon the home of space `id` (attached here), with the
    /// layout its old home had.
    pub fn set_layout(
        &mut self,
        id: SpaceId,
        brk_start: u64,
        brk: u64,
        mappings: &[(u64, u64)],
    ) -> Result<(), Refusal> {
        let s = self.space(id)?;
        s.layout = Some(Layout::import(s.base, s.end, brk_start, brk, mappings)?);
        Ok(())
    }

    pub fn mmap(&mut self, id: SpaceId, len: u64) -> Result<VirtAddr, Refusal> {
        Ok(VirtAddr(self.layout(id)?.mmap(len)?))
    }

    pub fn munmap(&mut self, id: SpaceId, addr: VirtAddr, len: u64) -> Result<(), Refusal> {
        self.layout(id)?.munmap(addr.0, len)?;
        self.discard(id, addr, len)
    }

    pub fn mremap(
        &mut self,
        id: SpaceId,
        old: VirtAddr,
        old_len: u64,
        new_len: u64,
        may_move: bool,
    ) -> Result<VirtAddr, Refusal> {
        let new = self.layout(id)?.mremap(old.0, old_len, new_len, may_move)?;
        if new_len < old_len {
            self.discard(id, VirtAddr(old.0 + new_len), old_len - new_len)?;
        }
        Ok(VirtAddr(new))
    }

    pub fn brk(&mut self, id: SpaceId, new_brk: VirtAddr) -> Result<VirtAddr, Refusal> {
        let (brk, freed) = self.layout(id)?.brk(new_brk.0);
        if let Some((a, l)) = freed {
            self.discard(id, VirtAddr(a), l)?;
        }
        Ok(VirtAddr(brk))
    }

    /// Forgets page contents in a range.
    pub fn discard(&mut self, id: SpaceId, addr: VirtAddr, len: u64) -> Result<(), Refusal> {
        let s = self.space(id)?;
        let end = addr.0.saturating_add(len);
        let keys: Vec<u64> = s.pages.range(addr.0..end).map(|(&k, _)| k).collect();
        for k in &keys {
            s.pages.remove(k);
        }
        self.used_pages -= keys.len() as u64;
        Ok(())
    }

    /// Stores pages; all or nothing when capacity runs out.
    pub fn write_pages(
        &mut self,
        id: SpaceId,
        addrs: &[VirtAddr],
        data: &[u8],
    ) -> Result<(), Refusal> {
        self.store_pages(id, addrs, data, true)
    }

    /// Empties `[addr, addr+len)` and takes fills of it with `epoch` only
    /// (an earlier fill's late pages are not stored).
    pub fn begin_fill(
        &mut self,
        id: SpaceId,
        addr: VirtAddr,
        len: u64,
        epoch: u64,
    ) -> Result<(), Refusal> {
        self.discard(id, addr, len)?;
        let s = self.space(id)?;
        let end = addr.0.saturating_add(len);
        s.fills
            .retain(|&start, &mut (stop, _)| stop <= addr.0 || start >= end);
        if s.fills.len() >= MAX_FILLS {
            return Err(Refusal(
                ErrorCode::Invalid,
                format!("a space is filled in at most {MAX_FILLS} ranges"),
            ));
        }
        s.fills.insert(addr.0, (end, epoch));
        Ok(())
    }

    /// Stores the pages the space does not hold yet that lie in a range
    /// being filled with `epoch` (a copy from another replica: what the
    /// program wrote here since the fill began is newer than the copy);
    /// all or nothing when capacity runs out. Returns how many were
    /// stored.
    pub fn fill_pages(
        &mut self,
        id: SpaceId,
        epoch: u64,
        addrs: &[VirtAddr],
        data: &[u8],
    ) -> Result<u64, Refusal> {
        let s = self.space(id)?;
        let filling = |a: u64| {
            s.fills
                .range(..=a)
                .next_back()
                .is_some_and(|(_, &(end, e))| a < end && e == epoch)
        };
        let mut take_addrs = Vec::with_capacity(addrs.len());
        let mut take_data = Vec::with_capacity(data.len());
        for (a, page) in addrs.iter().zip(data.chunks_exact(PAGE_SIZE)) {
            if filling(a.0) && !s.pages.contains_key(&a.0) {
                take_addrs.push(*a);
                take_data.extend_from_slice(page);
            }
        }
        let n = take_addrs.len() as u64;
        self.store_pages(id, &take_addrs, &take_data, false)?;
        Ok(n)
    }

    /// The pages space `id` holds in `[addr, addr+len)`, shared with it.
    pub fn snapshot(&mut self, id: SpaceId, addr: VirtAddr, len: u64) -> Result<Snapshot, Refusal> {
        let s = self.space(id)?;
        let end = addr.0.saturating_add(len);
        Ok(Snapshot {
            capability: s.capability,
            region: (s.base, s.end - s.base),
            pages: s
                .pages
                .range(addr.0..end)
                .map(|(&k, p)| (k, p.clone()))
                .collect(),
        })
    }

    fn store_pages(
        &mut self,
        id: SpaceId,
        addrs: &[VirtAddr],
        data: &[u8],
        overwrite: bool,
    ) -> Result<(), Refusal> {
        let (capacity, used) = (self.capacity_pages, self.used_pages);
        let s = self.space(id)?;
        let mut new = 0;
        for a in addrs {
            if a.0 % PAGE_SIZE as u64 != 0 || a.0 < s.base || a.0 >= s.end {
                return Err(Refusal(
                    ErrorCode::BadAddress,
                    format!("page {:#x} is outside the address space", a.0),
                ));
            }
            if !s.pages.contains_key(&a.0) {
                new += 1;
            }
        }
        if used + new > capacity {
            return Err(Refusal(
                ErrorCode::NoMemory,
                format!(
                    "memory daemon is full: {} of {} MiB used",
                    (used * PAGE_SIZE as u64) >> 20,
                    (capacity * PAGE_SIZE as u64) >> 20
                ),
            ));
        }
        // Counted as stored, not as asked: a batch may name a page twice
        // (the last copy wins), and `new` above is then an upper bound.
        let mut stored = 0;
        for (a, chunk) in addrs.iter().zip(data.chunks_exact(PAGE_SIZE)) {
            if !overwrite && s.pages.contains_key(&a.0) {
                continue;
            }
            let mut fresh = [0u8; PAGE_SIZE];
            fresh.copy_from_slice(chunk);
            // Replacing the Arc leaves a page shared with a fork untouched.
            if s.pages.insert(a.0, Arc::new(fresh)).is_none() {
                stored += 1;
            }
        }
        self.used_pages += stored;
        Ok(())
    }

    /// Appends the contents of `addrs` to `out`; pages never written read
    /// as zeros.
    pub fn read_pages(
        &mut self,
        id: SpaceId,
        addrs: &[VirtAddr],
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        let s = self.space(id)?;
        out.clear();
        for a in addrs {
            match s.pages.get(&a.0) {
                Some(p) => out.extend_from_slice(&p[..]),
                None => out.resize(out.len() + PAGE_SIZE, 0),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: VirtAddr = VirtAddr(1 << 40);
    const REGION: u64 = 16 << 30;
    const CAP: Capability = Capability([1; 16]);
    const OTHER: Capability = Capability([2; 16]);

    fn page(v: u8) -> Vec<u8> {
        vec![v; PAGE_SIZE]
    }

    #[test]
    fn pages_roundtrip_and_unwritten_pages_are_zero() {
        let mut s = Store::new(1 << 20);
        let id = s.open(BASE, REGION, 0, CAP).unwrap();
        let a = s.mmap(id, 8192).unwrap();
        s.write_pages(id, &[a], &page(5)).unwrap();
        let mut out = vec![];
        s.read_pages(id, &[a, VirtAddr(a.0 + 4096)], &mut out)
            .unwrap();
        assert_eq!(&out[..PAGE_SIZE], &page(5)[..]);
        assert_eq!(&out[PAGE_SIZE..], &page(0)[..]);
    }

    #[test]
    fn full_daemon_refuses_and_keeps_old_pages() {
        let mut s = Store::new(2 * PAGE_SIZE as u64);
        let id = s.open(BASE, REGION, 0, CAP).unwrap();
        let a = s.mmap(id, 4 * 4096).unwrap();
        let addrs: Vec<_> = (0..3).map(|i| VirtAddr(a.0 + i * 4096)).collect();
        s.write_pages(id, &addrs[..2], &[page(1), page(2)].concat())
            .unwrap();
        let e = s.write_pages(id, &addrs[2..], &page(3)).unwrap_err();
        assert_eq!(e.0, ErrorCode::NoMemory);
        // Overwriting existing pages needs no new capacity.
        s.write_pages(id, &addrs[..1], &page(9)).unwrap();
        assert_eq!(s.stats().used_bytes, 2 * PAGE_SIZE as u64);
    }

    #[test]
    fn release_frees_everything() {
        let mut s = Store::new(1 << 20);
        let id = s.open(BASE, REGION, 0, CAP).unwrap();
        s.attach(id, CAP, BASE, REGION).unwrap();
        let a = s.mmap(id, 4096).unwrap();
        s.write_pages(id, &[a], &page(1)).unwrap();
        s.release(id);
        assert_eq!(
            s.stats().used_bytes,
            4096,
            "second connection still holds it"
        );
        s.release(id);
        assert_eq!(
            s.stats(),
            DaemonStats {
                capacity_bytes: 1 << 20,
                ..Default::default()
            }
        );
    }

    #[test]
    fn munmap_and_mremap_free_pages() {
        let mut s = Store::new(1 << 20);
        let id = s.open(BASE, REGION, 0, CAP).unwrap();
        let a = s.mmap(id, 8192).unwrap();
        let _b = s.mmap(id, 4096).unwrap();
        s.write_pages(id, &[a, VirtAddr(a.0 + 4096)], &[page(1), page(2)].concat())
            .unwrap();
        // Shrinking drops the tail's pages; moving changes only the layout
        // (the runtime moves page contents, which may change daemon).
        assert_eq!(s.mremap(id, a, 8192, 4096, true).unwrap(), a);
        assert_eq!(s.stats().used_bytes, 4096);
        let c = s.mremap(id, a, 4096, 16384, true).unwrap();
        assert_ne!(c, a);
        s.munmap(id, a, 4096).unwrap();
        assert_eq!(s.stats().used_bytes, 0);
    }

    #[test]
    fn fork_shares_pages_until_either_side_writes() {
        let mut s = Store::new(1 << 20);
        let parent = s.open(BASE, REGION, 0, CAP).unwrap();
        let a = s.mmap(parent, 8192).unwrap();
        let b = VirtAddr(a.0 + 4096);
        s.write_pages(parent, &[a, b], &[page(1), page(2)].concat())
            .unwrap();
        let child = s.fork(parent, CAP, None, OTHER).unwrap();
        assert_ne!(child, parent);
        s.write_pages(child, &[a], &page(9)).unwrap();
        s.write_pages(parent, &[b], &page(8)).unwrap();
        let mut out = vec![];
        s.read_pages(parent, &[a, b], &mut out).unwrap();
        assert_eq!(out, [page(1), page(8)].concat());
        s.read_pages(child, &[a, b], &mut out).unwrap();
        assert_eq!(out, [page(9), page(2)].concat());
        // The child has the parent's layout.
        assert_eq!(s.mmap(child, 4096).unwrap(), s.mmap(parent, 4096).unwrap());
        s.release(parent);
        s.release(child);
        assert_eq!(s.stats().used_bytes, 0);
    }

    #[test]
    fn fork_with_a_given_id_and_unknown_parent() {
        let mut s = Store::new(1 << 20);
        let parent = s.open(BASE, REGION, 0, CAP).unwrap();
        assert_eq!(
            s.fork(parent, CAP, Some(SpaceId(77)), OTHER).unwrap(),
            SpaceId(77)
        );
        assert_eq!(
            s.fork(parent, CAP, Some(SpaceId(77)), OTHER).unwrap_err().0,
            ErrorCode::Invalid
        );
        assert_eq!(
            s.fork(SpaceId(5), CAP, None, OTHER).unwrap_err().0,
            ErrorCode::NoSpace
        );
    }

    #[test]
    fn a_space_is_attached_or_forked_only_with_its_capability() {
        let mut s = Store::new(1 << 20);
        let id = s.open(BASE, REGION, 0, CAP).unwrap();
        let a = s.mmap(id, 4096).unwrap();
        s.write_pages(id, &[a], &page(7)).unwrap();
        // The wrong capability gets the answer a missing space gets.
        let wrong = s.attach(id, OTHER, BASE, REGION).unwrap_err();
        let missing = s.attach(SpaceId(id.0 ^ 1), CAP, BASE, REGION);
        assert_eq!(wrong.0, ErrorCode::NoSpace);
        assert!(missing.is_ok(), "a new page-only space");
        let e = s.fork(id, OTHER, None, OTHER).unwrap_err();
        assert_eq!(e.0, ErrorCode::NoSpace);
        assert_eq!(
            e.1.replace(&id.0.to_string(), "N"),
            s.fork(SpaceId(3), CAP, None, OTHER)
                .unwrap_err()
                .1
                .replace("3", "N")
        );
        // The owner's capability works; ids are not sequential.
        s.attach(id, CAP, BASE, REGION).unwrap();
        let next = s.open(BASE, REGION, 0, OTHER).unwrap();
        assert!(next.0.abs_diff(id.0) > 1 << 20, "{next:?} after {id:?}");
        // A space that was refused is not created, nor its refs changed.
        s.release(id);
        s.release(id);
        assert_eq!(s.stats().spaces, 2, "the attached page-only one and `next`");
    }

    #[test]
    fn writes_outside_the_region_are_refused() {
        let mut s = Store::new(1 << 20);
        let id = s.open(BASE, REGION, 0, CAP).unwrap();
        let e = s.write_pages(id, &[VirtAddr(4096)], &page(1)).unwrap_err();
        assert_eq!(e.0, ErrorCode::BadAddress);
    }
}
