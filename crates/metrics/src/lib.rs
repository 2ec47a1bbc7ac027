//! Prometheus metrics for lego's daemons and runs.
//!
//! A daemon given `--metrics ADDR` serves `GET /metrics` ([`serve`]). At
//! each scrape it builds a [`Scrape`] from its own state and counters: the
//! families ([`Scrape::counter`], [`Scrape::gauge`], [`Scrape::histogram`])
//! are encoded by `prometheus-client` in the OpenMetrics text format.
//! Names follow Prometheus conventions: the `lego_` prefix, `_bytes` and
//! `_seconds` units in the name, and `_total` on counters (added by the
//! encoder). Counting costs the daemons' hot paths a relaxed atomic add
//! ([`Histogram::observe`] is one more); everything else happens at scrape
//! time.
//!
//! - [`program`]: one program's counters (the runtime's statistics page),
//!   for a processor daemon's programs and `lego run --metrics`.
//! - [`http`]: the small HTTP server.

#![deny(unsafe_code)]

pub mod http;
pub mod program;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub use http::{serve, MetricsServer};

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Latency bucket bounds, in seconds: 5 µs to 1 s.
pub const LATENCY_BOUNDS: [f64; 16] = [
    5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
    100e-3, 250e-3, 1.0,
];

/// Label pairs of one sample.
pub type Labels = Vec<(String, String)>;

/// One sample's value.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Counter(u64),
    Gauge(f64),
    /// Sum, count, and per-bucket (not cumulative) counts with their upper
    /// bounds, the last one `+Inf`.
    Histogram(f64, u64, Vec<(f64, u64)>),
}

#[derive(Clone, Debug)]
struct Family {
    name: String,
    help: String,
    kind: MetricType,
    samples: Vec<(Labels, Value)>,
}

/// The metrics of one scrape.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    families: Vec<Family>,
}

/// Label pairs from string slices.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Scrape {
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&mut self, name: &str, help: &str, kind: MetricType, labels: Labels, v: Value) {
        let i = match self.families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.families.push(Family {
                    name: name.to_string(),
                    help: help.to_string(),
                    kind,
                    samples: Vec::new(),
                });
                self.families.len() - 1
            }
        };
        self.families[i].samples.push((labels, v));
    }

    /// A counter sample: `name` without `_total` (the encoder adds it).
    pub fn counter(&mut self, name: &str, help: &str, labels: Labels, v: u64) {
        self.add(name, help, MetricType::Counter, labels, Value::Counter(v));
    }

    pub fn gauge(&mut self, name: &str, help: &str, labels: Labels, v: f64) {
        self.add(name, help, MetricType::Gauge, labels, Value::Gauge(v));
    }

    /// Several gauges with the same labels: (name, help, value).
    pub fn gauges(&mut self, labels: &Labels, items: &[(&str, &str, f64)]) {
        for (name, help, v) in items {
            self.gauge(name, help, labels.clone(), *v);
        }
    }

    /// Several counters with the same labels: (name, help, value).
    pub fn counters(&mut self, labels: &Labels, items: &[(&str, &str, u64)]) {
        for (name, help, v) in items {
            self.counter(name, help, labels.clone(), *v);
        }
    }

    /// A histogram sample from `h` (seconds).
    pub fn histogram(&mut self, name: &str, help: &str, labels: Labels, h: &HistogramSnapshot) {
        let v = Value::Histogram(h.sum_seconds, h.count, h.buckets.clone());
        self.add(name, help, MetricType::Histogram, labels, v);
    }

    /// The families in the OpenMetrics text format (what `/metrics`
    /// answers).
    pub fn encode(self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Collected(self)));
        let mut out = String::new();
        // Writing to a String cannot fail; a family the encoder refuses
        // (none of ours) would end the text early.
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            tracing::warn!("a metrics family could not be encoded");
        }
        out
    }
}

/// A [`Scrape`] as a prometheus-client collector.
#[derive(Debug)]
struct Collected(Scrape);

impl prometheus_client::collector::Collector for Collected {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0.families {
            let mut m = encoder.encode_descriptor(&f.name, &f.help, None, f.kind)?;
            for (labels, v) in &f.samples {
                let mut s = m.encode_family(labels)?;
                match v {
                    Value::Counter(c) => s.encode_counter::<NoLabelSet, u64, u64>(c, None)?,
                    Value::Gauge(g) => s.encode_gauge(g)?,
                    Value::Histogram(sum, count, buckets) => {
                        s.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?
                    }
                }
            }
        }
        Ok(())
    }
}

/// A latency histogram over [`LATENCY_BOUNDS`], counted with relaxed
/// atomics (safe to share between connection threads).
#[derive(Debug, Default)]
pub struct Histogram {
    /// One more than the bounds: the last is `+Inf`.
    counts: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_ns: AtomicU64,
}

/// What a histogram has counted, for [`Scrape::histogram`].
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    pub sum_seconds: f64,
    pub count: u64,
    /// Per bucket (not cumulative), with its upper bound in seconds.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.counts.iter().map(|c| c.load(Relaxed)))
            .collect();
        HistogramSnapshot {
            sum_seconds: self.sum_ns.load(Relaxed) as f64 / 1e9,
            count: buckets.iter().map(|b| b.1).sum(),
            buckets,
        }
    }
}

/// A counter shared between threads (relaxed: only ever read at scrape
/// time).
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn families_are_encoded_with_units_totals_and_cumulative_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(3));
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_secs(2));
        let mut s = Scrape::new();
        s.counter(
            "lego_memory_pages_read",
            "Pages read.",
            labels(&[("daemon", "a")]),
            7,
        );
        s.counter(
            "lego_memory_pages_read",
            "Pages read.",
            labels(&[("daemon", "b")]),
            9,
        );
        s.gauge("lego_memory_capacity_bytes", "Capacity.", vec![], 4096.0);
        s.histogram(
            "lego_memory_request_seconds",
            "Requests.",
            labels(&[("op", "read")]),
            &h.snapshot(),
        );
        let text = s.encode();
        for line in [
            "# TYPE lego_memory_pages_read counter",
            "lego_memory_pages_read_total{daemon=\"a\"} 7",
            "lego_memory_pages_read_total{daemon=\"b\"} 9",
            "lego_memory_capacity_bytes 4096.0",
            "# TYPE lego_memory_request_seconds histogram",
            "lego_memory_request_seconds_count{op=\"read\"} 3",
            "lego_memory_request_seconds_bucket{le=\"0.000005\",op=\"read\"} 1",
            "lego_memory_request_seconds_bucket{le=\"0.00005\",op=\"read\"} 2",
            "lego_memory_request_seconds_bucket{le=\"+Inf\",op=\"read\"} 3",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
        // One family per name, however many samples.
        assert_eq!(text.matches("# TYPE lego_memory_pages_read ").count(), 1);
    }

    #[test]
    fn a_histogram_counts_each_observation_once_in_its_bucket() {
        let h = Histogram::default();
        for us in [1, 5, 6, 999, 1_000_000, 5_000_000] {
            h.observe(Duration::from_micros(us));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 6);
        assert_eq!(s.buckets[0], (5e-6, 2), "5 µs is in the 5 µs bucket");
        assert_eq!(s.buckets[1], (10e-6, 1));
        assert_eq!(s.buckets[7], (1e-3, 1));
        assert_eq!(s.buckets[15], (1.0, 1));
        assert_eq!(s.buckets[16].1, 1, "over a second: +Inf");
        assert!((s.sum_seconds - 6.001011).abs() < 1e-9, "{}", s.sum_seconds);
    }
}
