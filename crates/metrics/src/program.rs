//! One program's metrics: its runtime's counters, read from the
//! statistics page its runtimes share ([`lego_sys::stats`]), as
//! [`ProgramCounters`] (what a processor daemon reports and serves) and as
//! families of a [`Scrape`].
//!
//! Prefetches that were used are not told apart from those that were not:
//! a prefetched page is installed before the program touches it, and
//! userfaultfd reports no reads of installed pages.

use std::sync::atomic::Ordering::Relaxed;

use lego_protocol::control::ProgramCounters;
use lego_sys::stats::{SharedStats, HIST_BUCKETS};

use crate::{HistogramSnapshot, Labels, Scrape, LATENCY_BOUNDS};

/// The upper edge, in µs, of the statistics page's histogram bucket
/// `idx` (1 µs wide below 1024 µs, 1024 µs wide above).
fn bucket_upper_us(idx: usize) -> f64 {
    if idx < 1024 {
        (idx + 1) as f64
    } else {
        ((idx - 1024 + 1) * 1024) as f64
    }
}

fn bucket_mid_us(idx: usize) -> f64 {
    if idx < 1024 {
        idx as f64 + 0.5
    } else {
        ((idx - 1024) as f64 + 0.5) * 1024.0
    }
}

/// The page's counters now. Each of the page's histogram buckets is
/// counted under the first bound at or above its upper edge: exact below
/// 1 ms (1 µs buckets), and above it up to one 1024 µs bucket high (a
/// 2.2 ms miss is counted under 5 ms, not 2.5 ms).
pub fn counters(s: &SharedStats) -> ProgramCounters {
    let mut latency = vec![0u64; LATENCY_BOUNDS.len() + 1];
    let mut sum_us = 0.0;
    let mut raw = Vec::with_capacity(HIST_BUCKETS);
    for (idx, c) in s.latency_us.iter().enumerate() {
        let n = c.load(Relaxed);
        raw.push(n);
        if n == 0 {
            continue;
        }
        let upper_s = bucket_upper_us(idx) / 1e6;
        let b = LATENCY_BOUNDS
            .iter()
            .position(|&bound| upper_s <= bound + 1e-12)
            .unwrap_or(LATENCY_BOUNDS.len());
        latency[b] += n;
        sum_us += n as f64 * bucket_mid_us(idx);
    }
    let (disaggregated, local) = s.coverage_totals();
    ProgramCounters {
        processes: s.processes.load(Relaxed),
        remote_misses: s.remote_misses.load(Relaxed),
        zero_fills: s.zero_fills.load(Relaxed),
        tier_hits: s.tier_hits.load(Relaxed),
        prefetched: s.prefetched.load(Relaxed),
        prefilled: s.prefilled.load(Relaxed),
        evictions: s.evictions.load(Relaxed),
        writebacks: s.writebacks.load(Relaxed),
        clean_drops: s.zero_drops.load(Relaxed) + s.unchanged_drops.load(Relaxed),
        bytes_in: s.bytes_in.load(Relaxed),
        bytes_out: s.bytes_out.load(Relaxed),
        peak_resident_bytes: s.peak_resident_bytes.load(Relaxed),
        tier_bytes: s.tier_bytes.load(Relaxed),
        disaggregated_bytes: disaggregated,
        local_bytes: local,
        miss_latency: latency,
        miss_latency_sum_us: sum_us as u64,
        miss_p99_us: lego_sys::stats::quantile(&raw, 0.99).map_or(0, |q| q as u64),
        spaces: s.spaces(),
    }
}

/// The `program` label of a command line: its program's file name only
/// (its arguments may be private, and every run's would be a series).
pub fn label_of(command: &str) -> String {
    let first = command.split_whitespace().next().unwrap_or_default();
    first.rsplit('/').next().unwrap_or(first).to_string()
}

/// Adds program `c`'s families, each sample labelled `labels` (which
/// program: its pid and name, and the processor daemon's id if it has
/// one).
pub fn add(scrape: &mut Scrape, labels: &Labels, c: &ProgramCounters) {
    let with = |extra: &[(&str, &str)]| {
        let mut l = labels.clone();
        l.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        l
    };
    let misses = "Page misses of the program, by how they were served: from a memory daemon (remote), zero-filled locally (zero), from the compressed tier (tier).";
    for (kind, v) in [
        ("remote", c.remote_misses),
        ("zero", c.zero_fills),
        ("tier", c.tier_hits),
    ] {
        scrape.counter("lego_program_misses", misses, with(&[("kind", kind)]), v);
    }
    let ahead = "Pages brought in ahead of a miss: fetched from a memory daemon (remote) or zero-filled (zero).";
    for (kind, v) in [("remote", c.prefetched), ("zero", c.prefilled)] {
        scrape.counter(
            "lego_program_prefetched_pages",
            ahead,
            with(&[("kind", kind)]),
            v,
        );
    }
    scrape.counter(
        "lego_program_evictions",
        "Pages dropped from the program's ExCache.",
        labels.clone(),
        c.evictions,
    );
    scrape.counter(
        "lego_program_writebacks",
        "Dirty pages written back to memory daemons.",
        labels.clone(),
        c.writebacks,
    );
    scrape.counter(
        "lego_program_clean_drops",
        "Evicted pages dropped without a writeback (all zeros, or unchanged since fetched).",
        labels.clone(),
        c.clean_drops,
    );
    let net = "Bytes the program's runtimes sent to (out) and received from (in) memory daemons.";
    for (dir, v) in [("in", c.bytes_in), ("out", c.bytes_out)] {
        scrape.counter(
            "lego_program_network_bytes",
            net,
            with(&[("direction", dir)]),
            v,
        );
    }
    scrape.counter(
        "lego_program_processes_started",
        "Processes of the program whose runtime attached.",
        labels.clone(),
        c.processes,
    );
    scrape.gauge(
        "lego_program_peak_resident_bytes",
        "Largest local memory of any one process of the program: resident pages and its compressed tier.",
        labels.clone(),
        c.peak_resident_bytes as f64,
    );
    scrape.gauge(
        "lego_program_tier_bytes",
        "The compressed tier's bytes now.",
        labels.clone(),
        c.tier_bytes as f64,
    );
    let coverage = "Anonymous memory at each process's peak: in the disaggregated region (disaggregated) or outside it (local).";
    for (place, v) in [
        ("disaggregated", c.disaggregated_bytes),
        ("local", c.local_bytes),
    ] {
        scrape.gauge(
            "lego_program_coverage_bytes",
            coverage,
            with(&[("place", place)]),
            v as f64,
        );
    }
    if c.miss_latency.len() == LATENCY_BOUNDS.len() + 1 {
        let h = HistogramSnapshot {
            sum_seconds: c.miss_latency_sum_us as f64 / 1e6,
            count: c.miss_latency.iter().sum(),
            buckets: LATENCY_BOUNDS
                .iter()
                .copied()
                .chain([f64::INFINITY])
                .zip(c.miss_latency.iter().copied())
                .collect(),
        };
        scrape.histogram(
            "lego_program_miss_seconds",
            "Miss service time, from the fault to the page installed.",
            labels.clone(),
            &h,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_is_labelled_by_its_file_name_only() {
        assert_eq!(label_of("/usr/bin/python3 -c secret"), "python3");
        assert_eq!(label_of("sort"), "sort");
        assert_eq!(label_of(""), "");
    }

    #[test]
    fn the_page_counters_become_families() {
        let (_fd, s) = lego_sys::stats::create().unwrap();
        s.remote_misses.fetch_add(3, Relaxed);
        s.zero_fills.fetch_add(2, Relaxed);
        s.bytes_in.fetch_add(12288, Relaxed);
        for us in [3, 40, 40, 3000] {
            s.record_latency(us);
        }
        let c = counters(s);
        assert_eq!(c.remote_misses, 3);
        // 3 µs: ≤ 5 µs; 40 µs: ≤ 50 µs; 3000 µs (its bucket ends at
        // 3072 µs): ≤ 5 ms.
        assert_eq!(c.miss_latency[0], 1);
        assert_eq!(c.miss_latency[3], 2);
        assert_eq!(c.miss_latency[9], 1);
        assert_eq!(c.miss_latency.iter().sum::<u64>(), 4);
        assert!(c.miss_p99_us > 2000, "{}", c.miss_p99_us);
        let mut scrape = Scrape::new();
        add(
            &mut scrape,
            &crate::labels(&[("pid", "7"), ("program", "sort")]),
            &c,
        );
        let text = scrape.encode();
        for line in [
            "lego_program_misses_total{pid=\"7\",program=\"sort\",kind=\"remote\"} 3",
            "lego_program_misses_total{pid=\"7\",program=\"sort\",kind=\"zero\"} 2",
            "lego_program_network_bytes_total{pid=\"7\",program=\"sort\",direction=\"in\"} 12288",
            "lego_program_miss_seconds_count{pid=\"7\",program=\"sort\"} 4",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
