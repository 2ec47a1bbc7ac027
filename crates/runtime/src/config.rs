//! The runtime's settings, passed by `lego run` in the environment.
//!
//! | variable | meaning |
//! |---|---|
//! | `LEGO_MEMORY` | comma-separated memory daemons; the first is the home (required: without it the runtime stays off) |
//! | `LEGO_EXCACHE_BYTES` | ExCache budget of this process (default 64 MiB) |
//! | `LEGO_STATS_FD` | fd of the shared statistics page |
//! | `LEGO_KEY` | the credential file the runtime proves itself with to daemons and the manager (`lego run` sets it; else `~/.lego/cluster.key`; docs/security.md) |
//! | `LEGO_TIMEOUT_MS` | how long to wait for a daemon's answer before giving up (default 10000) |
//! | `LEGO_FAILOVER_MS` | how long a daemon may leave a request unanswered before it is given up, if every unit it holds has another replica (default 500; 0: wait `LEGO_TIMEOUT_MS`) |
//! | `LEGO_REPLICAS` | without a manager: replicas of each unit, on that many daemons of `LEGO_MEMORY` (default 2 when there are two or more; the manager's `--replicas` decides otherwise) |
//! | `LEGO_REGION_BYTES` | virtual size of the disaggregated region (default 64 GiB) |
//! | `LEGO_POLL_US` | after sending a page read, poll the socket this long before sleeping on it (default 100; 0: sleep at once) |
//! | `LEGO_SPIN_US` | while misses come this close together, the pager polls for the next one instead of sleeping, and an idle-priority thread keeps the other CPUs awake (default 200; 0: always sleep) |
//! | `LEGO_EVICTION` | eviction policy: `refault` (default) or `fifo` |
//! | `LEGO_TIER_PERCENT` | share of the ExCache budget the compressed tier of evicted pages may take (default 50; 0 turns it off) |
//! | `LEGO_PREFETCH_PAGES` | largest prefetch window in pages (default 64; 0 turns prefetching off) |
//! | `LEGO_MANAGER` | global manager that places the program's memory on the daemons of `LEGO_MEMORY` (default: none, vRegion `i` on daemon `i mod n`) |
//! | `LEGO_MEMORY_IDS` | the manager's ids of the daemons of `LEGO_MEMORY`, in the same order (with `LEGO_MANAGER`) |
//! | `LEGO_INJECT` | `pager-self-fault`: the pager faults on its own region after 300 ms (a test of `lego run`'s hang detection) |

use std::time::Duration;

use lego_sys::stats::{self, SharedStats};
use lego_transport::auth::Credential;

use crate::excache::Policy;

pub struct Config {
    pub daemons: Vec<String>,
    /// The global manager and the ids of `daemons` there.
    pub manager: Option<(String, Vec<u64>)>,
    pub excache_bytes: usize,
    pub stats: Option<&'static SharedStats>,
    pub timeout: Duration,
    pub failover: Duration,
    /// Replicas per unit of the fixed placement (no manager).
    pub replicas: usize,
    pub tuning: Tuning,
    pub inject_self_fault: bool,
}

/// How the pager trades memory for speed (kept across fork).
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Largest prefetch window, in pages (0: no prefetching).
    pub prefetch_pages: usize,
    pub eviction: Policy,
    /// How long the pager busy-polls for a page read's reply (µs).
    pub poll_us: u64,
    /// Share of the budget the compressed tier may take, in percent.
    pub tier_percent: usize,
    /// How long after a miss the pager polls for the next (µs).
    pub spin_us: u64,
}

/// How long the pager polls for a page read's reply before sleeping
/// unless `LEGO_POLL_US` says otherwise (docs/benchmarks.md: with sealed
/// frames, sleeping at once made a random miss 60% slower).
pub const DEFAULT_POLL_US: u64 = 100;

/// The compressed tier's share of the budget unless `LEGO_TIER_PERCENT`
/// says otherwise.
pub const DEFAULT_TIER_PERCENT: usize = 50;

/// Prefetch windows are at most this many pages (one `ReadPages`).
pub const MAX_PREFETCH_PAGES: usize = 256;

static CREDENTIAL: std::sync::OnceLock<Credential> = std::sync::OnceLock::new();

/// The credential the runtime proves itself with to daemons and the
/// manager: the file `LEGO_KEY` names (`lego run` sets it), read once at
/// start ([`Config::from_env`]); a fork child keeps it.
pub fn credential() -> &'static Credential {
    CREDENTIAL
        .get()
        .expect("the credential is read before any connection")
}

/// Sets the credential, once (at start, or in tests).
pub(crate) fn set_credential(c: Credential) {
    let _ = CREDENTIAL.set(c);
}

fn var<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

impl Config {
    pub fn from_env() -> Option<Self> {
        let daemons: Vec<String> = std::env::var("LEGO_MEMORY")
            .ok()?
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if daemons.is_empty() {
            return None;
        }
        if CREDENTIAL.get().is_none() {
            match Credential::for_client(None) {
                Ok(c) => set_credential(c),
                Err(e) => lego_sys::process::die(&format!("lego: {e}")),
            }
        }
        let manager = std::env::var("LEGO_MANAGER")
            .ok()
            .filter(|m| !m.trim().is_empty())
            .map(|m| {
                let ids: Vec<u64> = std::env::var("LEGO_MEMORY_IDS")
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|s| s.trim().parse().ok())
                    .collect();
                (m.trim().to_string(), ids)
            });
        Some(Self {
            daemons,
            manager,
            excache_bytes: var("LEGO_EXCACHE_BYTES").unwrap_or(64 << 20),
            stats: var::<i32>("LEGO_STATS_FD").and_then(stats::attach),
            timeout: Duration::from_millis(var("LEGO_TIMEOUT_MS").unwrap_or(10_000)),
            failover: Duration::from_millis(var("LEGO_FAILOVER_MS").unwrap_or(500)),
            replicas: var("LEGO_REPLICAS").unwrap_or(2),
            tuning: Tuning {
                prefetch_pages: var::<usize>("LEGO_PREFETCH_PAGES")
                    .unwrap_or(64)
                    .min(MAX_PREFETCH_PAGES),
                eviction: var("LEGO_EVICTION").unwrap_or(Policy::Refault),
                poll_us: var("LEGO_POLL_US").unwrap_or(DEFAULT_POLL_US),
                tier_percent: var::<usize>("LEGO_TIER_PERCENT")
                    .unwrap_or(DEFAULT_TIER_PERCENT)
                    .min(90),
                spin_us: var("LEGO_SPIN_US").unwrap_or(200),
            },
            inject_self_fault: std::env::var("LEGO_INJECT").as_deref() == Ok("pager-self-fault"),
        })
    }
}
