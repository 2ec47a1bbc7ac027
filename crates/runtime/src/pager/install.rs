//! Putting pages into the page table, in as few calls as possible.

use lego_protocol::PAGE_SIZE;

use super::traits::{table, PageTable, PagerError, TableError};
use crate::excache::ExCache;

/// The longest gap [`spans`] bridges, in pages.
const BRIDGE_PAGES: usize = 64;

/// Installs the faulting page `i` from `src`, write-protected (clean) if
/// `wp`; `predicted`: writable only because its last residency was
/// written. `Ok(false)`: not installed because its range is gone (its
/// thread is woken to fault again) or it was already present.
pub(super) fn install_fault_page<T: PageTable>(
    t: &mut T,
    cache: &mut ExCache,
    base: usize,
    i: usize,
    src: &[u8],
    wp: bool,
    predicted: bool,
) -> Result<bool, PagerError> {
    let at = base + i * PAGE_SIZE;
    match t.copy_in(at, src, wp) {
        Ok(1) if predicted => cache.installed_unobserved(i, Some(src)),
        Ok(1) => cache.installed(i, !wp),
        Ok(_) => return Ok(false),
        Err(TableError::Gone) => {
            t.wake(at, PAGE_SIZE);
            return Ok(false);
        }
        Err(e) => return Err(table("install", at)(e)),
    }
    Ok(true)
}

/// Installs `pages` (page indices of the region at `base`, in any order)
/// from the matching pages of `data`, one copy per run of consecutive
/// pages, ascending or descending, that are installed alike: a page no
/// daemon holds (a zero fill) or whose last residency was written goes in
/// writable and counts dirty (by prediction), any other write-protected
/// and clean. A descending run (a walk down memory) is put in address order
/// in `scratch` first. A page that cannot be installed (its range unmapped,
/// or already present) is skipped: it was only brought ahead, a later
/// access faults it in.
pub(super) fn install_runs<T: PageTable>(
    t: &mut T,
    base: usize,
    cache: &mut ExCache,
    pages: &[usize],
    data: &[u8],
    scratch: &mut Scratch,
) {
    let writable = |c: &ExCache, p: usize| !c.is_remote(p) || c.predicts_write(p);
    let mut k = 0;
    while k < pages.len() {
        let w = writable(cache, pages[k]);
        let step: isize = match pages.get(k + 1) {
            Some(&n) if n == pages[k] + 1 => 1,
            Some(&n) if n + 1 == pages[k] => -1,
            _ => 1,
        };
        let mut len = 1;
        while k + len < pages.len()
            && pages[k + len] as isize == pages[k] as isize + step * len as isize
            && writable(cache, pages[k + len]) == w
        {
            len += 1;
        }
        if step > 0 {
            let src = &data[k * PAGE_SIZE..(k + len) * PAGE_SIZE];
            install_one_run(t, base, cache, &pages[k..k + len], src, w);
        } else {
            scratch.pages.clear();
            scratch.data.clear();
            for n in (k..k + len).rev() {
                scratch.pages.push(pages[n]);
                scratch
                    .data
                    .extend_from_slice(&data[n * PAGE_SIZE..(n + 1) * PAGE_SIZE]);
            }
            install_one_run(t, base, cache, &scratch.pages, &scratch.data, w);
        }
        k += len;
    }
}

/// Room to put a descending run in address order.
#[derive(Clone, Default)]
pub(super) struct Scratch {
    pages: Vec<usize>,
    data: Vec<u8>,
}

/// Installs the ascending run `pages` from `src`, writable if `w`.
fn install_one_run<T: PageTable>(
    t: &mut T,
    base: usize,
    cache: &mut ExCache,
    pages: &[usize],
    src: &[u8],
    w: bool,
) {
    let at = base + pages[0] * PAGE_SIZE;
    let done = match t.copy_in(at, src, !w) {
        Ok(done) => done,
        Err(e) => {
            if matches!(e, TableError::Gone) {
                t.wake(at, pages.len() * PAGE_SIZE);
            }
            0
        }
    };
    for (n, &p) in pages[..done].iter().enumerate() {
        if w {
            // A fetched page is kept track of: eviction compares it.
            let fetched = cache
                .is_remote(p)
                .then(|| &src[n * PAGE_SIZE..(n + 1) * PAGE_SIZE]);
            cache.installed_unobserved(p, fetched);
        } else {
            cache.installed(p, false);
        }
    }
}

/// Address ranges covering `pages` (page indices of the region at `base`,
/// sorted here), merged across gaps of at most [`BRIDGE_PAGES`] pages that
/// `bridge` allows to be covered too. Each call that changes mappings ends
/// in a TLB shootdown: an IPI to every other CPU running the program, which
/// on these VMs costs about as much as a page fetch. Victims come in
/// eviction order, two threads' pages interleaved, so sorting alone often
/// halves the ranges.
pub(super) fn spans(
    base: usize,
    pages: &mut [usize],
    bridge: impl Fn(usize) -> bool,
    out: &mut Vec<(usize, usize)>,
) {
    pages.sort_unstable();
    out.clear();
    let range = |first: usize, end: usize| (base + first * PAGE_SIZE, (end - first) * PAGE_SIZE);
    let mut run: Option<(usize, usize)> = None; // first page, end
    for &p in pages.iter() {
        run = match run {
            Some((first, end)) if p < end => Some((first, end)),
            Some((first, end)) if p - end <= BRIDGE_PAGES && (end..p).all(&bridge) => {
                Some((first, p + 1))
            }
            Some((first, end)) => {
                out.push(range(first, end));
                Some((p, p + 1))
            }
            None => Some((p, p + 1)),
        };
    }
    if let Some((first, end)) = run {
        out.push(range(first, end));
    }
}
