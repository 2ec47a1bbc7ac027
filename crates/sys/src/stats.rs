//! The statistics page shared by `lego run` and the runtimes it starts.
//!
//! `lego run` creates a memfd, passes its number to the program in
//! `LEGO_STATS_FD`, and every runtime (the program, and programs it execs or
//! forks) maps it and adds to the counters as it works. `lego run` reads the
//! page after the program ended, however it ended: nothing depends on the
//! program exiting cleanly.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::last_error;

const MAGIC: u64 = 0x4c45_474f_5354_4133; // "LEGOSTA3"
/// Histogram buckets: 1 µs wide below 1024 µs, 1024 µs wide above.
pub const HIST_BUCKETS: usize = 2048;
/// Processes whose coverage is recorded separately.
pub const COVERAGE_SLOTS: usize = 64;

/// Coverage of one process at its peak footprint.
#[repr(C)]
pub struct CoverageSlot {
    pub pid: AtomicU64,
    /// Bytes of the process's anonymous memory in the disaggregated region.
    pub disaggregated_bytes: AtomicU64,
    /// Bytes of anonymous memory outside it (stacks, libraries' data, ...).
    pub local_bytes: AtomicU64,
    /// The address space (on the memory daemons) that holds its memory.
    pub space: AtomicU64,
}

/// The shared page. All fields are monotonic counters or maxima.
#[repr(C)]
pub struct SharedStats {
    magic: AtomicU64,
    /// Processes whose runtime attached.
    pub processes: AtomicU64,
    /// Misses served with a page fetched from a memory daemon.
    pub remote_misses: AtomicU64,
    /// Misses on never-written pages, zero-filled locally.
    pub zero_fills: AtomicU64,
    /// Remote pages fetched ahead of a miss (in the same round trip).
    pub prefetched: AtomicU64,
    /// Never-written pages zero-filled ahead of a miss.
    pub prefilled: AtomicU64,
    /// Dirty-marked victims found all zeros and dropped without writeback.
    pub zero_drops: AtomicU64,
    /// Victims installed writable on a dirty prediction and found identical
    /// to their fetched contents: dropped without writeback.
    pub unchanged_drops: AtomicU64,
    /// First writes to clean resident pages.
    pub dirtied: AtomicU64,
    /// Pages dropped from the ExCache.
    pub evictions: AtomicU64,
    /// Dirty pages written back before being dropped.
    pub writebacks: AtomicU64,
    /// Pages moved between memory daemons off a draining one.
    pub migrated_pages: AtomicU64,
    /// Bytes sent to and received from memory daemons.
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Largest local memory of any one process against its ExCache
    /// budget: resident pages plus the compressed tier.
    pub peak_resident_bytes: AtomicU64,
    /// Misses served from the compressed tier (no network trip).
    pub tier_hits: AtomicU64,
    /// Evicted pages kept in the compressed tier.
    pub tier_stores: AtomicU64,
    /// Evicted pages tried for the tier that did not compress enough.
    pub tier_incompressible: AtomicU64,
    /// Largest compressed tier of any one process, in bytes.
    pub peak_tier_bytes: AtomicU64,
    /// The compressed tier's bytes now, as last reported by any process
    /// (with one process: its tier). Not a counter: read it while the
    /// program runs, beside the region's resident memory.
    pub tier_bytes: AtomicU64,
    /// Miss service time (fault read → page installed), all misses.
    pub latency_us: [AtomicU64; HIST_BUCKETS],
    pub coverage: [CoverageSlot; COVERAGE_SLOTS],
}

fn bucket(us: u64) -> usize {
    if us < 1024 {
        us as usize
    } else {
        (1024 + us / 1024).min(HIST_BUCKETS as u64 - 1) as usize
    }
}

fn bucket_mid_us(idx: usize) -> f64 {
    if idx < 1024 {
        idx as f64 + 0.5
    } else {
        ((idx - 1024) as f64 + 0.5) * 1024.0
    }
}

impl SharedStats {
    /// Records one miss's service time.
    pub fn record_latency(&self, us: u64) {
        self.latency_us[bucket(us)].fetch_add(1, Relaxed);
    }

    /// The `q` quantile (0..1) of recorded miss latencies, in µs.
    pub fn latency_quantile_us(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self.latency_us.iter().map(|c| c.load(Relaxed)).collect();
        quantile(&counts, q)
    }

    /// Process `pid`'s slot (claimed if it has none); `None` once every
    /// slot is taken.
    fn slot(&self, pid: u32) -> Option<&CoverageSlot> {
        let pid = pid as u64;
        self.coverage.iter().find(|slot| {
            let cur = slot.pid.load(Relaxed);
            cur == pid || (cur == 0 && slot.pid.compare_exchange(0, pid, Relaxed, Relaxed).is_ok())
        })
    }

    /// Records a process's coverage sample; kept only if its footprint is
    /// the largest seen for that process.
    pub fn record_coverage(&self, pid: u32, disaggregated: u64, local: u64) {
        if let Some(slot) = self.slot(pid) {
            let old = slot.disaggregated_bytes.load(Relaxed) + slot.local_bytes.load(Relaxed);
            if disaggregated + local >= old {
                slot.disaggregated_bytes.store(disaggregated, Relaxed);
                slot.local_bytes.store(local, Relaxed);
            }
        }
    }

    /// Records which address space holds process `pid`'s memory.
    pub fn record_space(&self, pid: u32, space: u64) {
        if let Some(slot) = self.slot(pid) {
            slot.space.store(space, Relaxed);
        }
    }

    /// The address spaces of the program's processes (as recorded).
    pub fn spaces(&self) -> Vec<u64> {
        self.coverage
            .iter()
            .map(|s| s.space.load(Relaxed))
            .filter(|&s| s != 0)
            .collect()
    }

    /// Summed over processes: (disaggregated, local) bytes at each one's peak.
    pub fn coverage_totals(&self) -> (u64, u64) {
        self.coverage.iter().fold((0, 0), |(d, l), s| {
            (
                d + s.disaggregated_bytes.load(Relaxed),
                l + s.local_bytes.load(Relaxed),
            )
        })
    }
}

/// The `q` quantile of a bucketed histogram, in µs.
pub fn quantile(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(bucket_mid_us(i));
        }
    }
    None
}

fn map_fd(fd: i32) -> io::Result<&'static SharedStats> {
    let len = std::mem::size_of::<SharedStats>();
    let addr = crate::mm::mmap_raw(
        0,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
        fd,
        0,
    )?;
    // SAFETY: the mapping is `len` bytes, page aligned, shared and never
    // unmapped (it lives as long as the process), and SharedStats consists
    // only of atomics, for which any bit pattern (zero-filled memfd) is valid
    // and concurrent access from several processes is sound.
    let s = unsafe { &*(addr as *const SharedStats) };
    Ok(s)
}

/// Creates the shared page; returns its fd (inherited by children, not
/// close-on-exec) and the mapping.
pub fn create() -> io::Result<(i32, &'static SharedStats)> {
    // SAFETY: the name is a NUL-terminated literal; flags 0 keep the fd
    // across exec, which is the point.
    let fd = unsafe { libc::memfd_create(c"lego-stats".as_ptr(), 0) };
    if fd < 0 {
        return Err(last_error());
    }
    // SAFETY: fd is the memfd just created.
    if unsafe { libc::ftruncate(fd, std::mem::size_of::<SharedStats>() as i64) } < 0 {
        return Err(last_error());
    }
    let s = map_fd(fd)?;
    s.magic.store(MAGIC, Relaxed);
    Ok((fd, s))
}

/// Maps the shared page passed by `lego run`; `None` if `fd` is not one.
pub fn attach(fd: i32) -> Option<&'static SharedStats> {
    // SAFETY: fstat only writes the stat struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid, writable stat buffer.
    if unsafe { libc::fstat(fd, &mut st) } < 0
        || (st.st_size as usize) < std::mem::size_of::<SharedStats>()
    {
        return None;
    }
    let s = map_fd(fd).ok()?;
    (s.magic.load(Relaxed) == MAGIC).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_known_histogram() {
        let (_fd, s) = create().unwrap();
        for us in 1..=100 {
            s.record_latency(us);
        }
        s.record_latency(5000);
        assert_eq!(s.latency_quantile_us(0.5), Some(51.5));
        assert_eq!(s.latency_quantile_us(0.99), Some(100.5));
        assert!(s.latency_quantile_us(1.0).unwrap() > 4000.0);
    }

    #[test]
    fn coverage_keeps_each_process_peak() {
        let (fd, s) = create().unwrap();
        let other = attach(fd).expect("attaches");
        s.record_coverage(10, 100, 10);
        other.record_coverage(10, 50, 5);
        other.record_coverage(11, 7, 3);
        assert_eq!(s.coverage_totals(), (107, 13));
        other.record_space(11, 42);
        s.record_space(12, 43);
        assert_eq!(s.spaces(), [42, 43]);
    }
}
