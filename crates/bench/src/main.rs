//! `lego-bench`: the miss path measured against its parts and against plain
//! Linux, all in one run (these machines are noisy: compare ratios).
//!
//! ```text
//! lego-bench [--excache MB] [--ratio N]
//! ```
//!
//! It measures, in this order:
//! 1. the TCP round trip of a one-page read from a memory daemon on loopback;
//! 2. the userfaultfd round trip (fault → handler thread → `UFFDIO_COPY`);
//! 3. a sequential and a random page-touch loop over a working set `N`×
//!    the ExCache, first on plain Linux, then under `lego run`.
//!
//! The loop itself is this binary run with `--loop`; it prints a JSON line.

#![deny(unsafe_code)]

use std::process::Command;
use std::time::{Duration, Instant};

use lego_protocol::{Message, Role, VirtAddr, PAGE_SIZE};
use lego_transport::{FramedConn, Tcp, Transport};

fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The access loop: touch every page once to populate, then time one access
/// per page in sequential or random order.
fn access_loop(mb: usize, random: bool) {
    let pages = mb * 256;
    let mut buf = vec![0u8; pages * PAGE_SIZE];
    for p in 0..pages {
        buf[p * PAGE_SIZE] = p as u8;
    }
    let mut order: Vec<usize> = (0..pages).collect();
    if random {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for i in (1..pages).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
    }
    let mut lat = Vec::with_capacity(pages);
    let start = Instant::now();
    let mut sum = 0u64;
    for &p in &order {
        let t = Instant::now();
        let v = std::hint::black_box(&mut buf)[p * PAGE_SIZE];
        buf[p * PAGE_SIZE] = v.wrapping_add(1);
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        sum += v as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "p50_us": percentile(&mut lat, 0.5),
            "p99_us": percentile(&mut lat, 0.99),
            "mb_per_s": (pages * PAGE_SIZE) as f64 / secs / 1e6,
            "check": sum,
        })
    );
}

fn tcp_round_trip(samples: usize) -> Vec<f64> {
    let cred = lego_transport::auth::Credential::generate().expect("random numbers");
    let d = lego_memory::MemoryDaemon::start("127.0.0.1:0", 1 << 30, cred.clone())
        .expect("daemon starts");
    let s = Tcp
        .connect(d.addr(), Duration::from_secs(2))
        .expect("connects");
    let mut c = FramedConn::new(s);
    c.client_handshake(Role::Runtime, "bench", &cred)
        .expect("handshake");
    let base = VirtAddr(1 << 40);
    c.call(
        1,
        &Message::OpenSpace {
            pid: std::process::id(),
            program: "bench",
            region_base: base,
            region_bytes: 4 << 30,
            bootstrap_bytes: 0,
            capability: lego_protocol::Capability([1; 16]),
        },
    )
    .expect("space");
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples as u64 {
        let t = Instant::now();
        let f = c
            .call(
                i + 2,
                &Message::ReadPages {
                    addrs: vec![VirtAddr(base.0 + i * PAGE_SIZE as u64)].into(),
                },
            )
            .expect("read");
        assert!(matches!(f.message, Message::Pages { .. }));
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(c);
    d.shutdown();
    out
}

fn run_loop(lego: Option<(&std::path::Path, usize)>, mb: usize, random: bool) -> serde_json::Value {
    let me = std::env::current_exe().expect("own path");
    let mode = if random { "random" } else { "sequential" };
    let mut cmd = match lego {
        Some((lego, excache_mb)) => {
            let mut c = Command::new(lego);
            c.args(["run", "--excache", &format!("{excache_mb}M"), "--"])
                .arg(&me);
            c
        }
        None => Command::new(&me),
    };
    let out = cmd
        .args(["--loop", mode, &mb.to_string()])
        .output()
        .expect("loop runs");
    assert!(
        out.status.success(),
        "loop failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("loop prints JSON")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--loop") {
        let random = args[2] == "random";
        access_loop(args[3].parse().expect("MB"), random);
        return;
    }
    let excache_mb = arg(&args, "--excache", 64);
    let ratio = arg(&args, "--ratio", 4);
    let ws_mb = excache_mb * ratio;
    let lego = std::env::current_exe()
        .expect("own path")
        .with_file_name("lego");

    let mut tcp = tcp_round_trip(20_000);
    let tcp_p50 = percentile(&mut tcp, 0.5);
    let mut uffd: Vec<f64> = lego_sys::uffd::measure_round_trip(20_000)
        .expect("userfaultfd works")
        .iter()
        .map(|d| d.as_secs_f64() * 1e6)
        .collect();
    let uffd_p50 = percentile(&mut uffd, 0.5);
    println!("parts of a miss (measured in this run):");
    println!(
        "  TCP round trip, one-page read from a memory daemon: p50 {tcp_p50:6.1} µs  p99 {:6.1} µs",
        percentile(&mut tcp, 0.99)
    );
    println!("  userfaultfd round trip (fault, handler, UFFDIO_COPY): p50 {uffd_p50:6.1} µs  p99 {:6.1} µs", percentile(&mut uffd, 0.99));
    println!(
        "  sum of parts:                                         p50 {:6.1} µs",
        tcp_p50 + uffd_p50
    );
    println!();
    println!("page-touch loop, working set {ws_mb} MiB = {ratio} x ExCache {excache_mb} MiB:");
    println!(
        "  {:<11} {:<6} {:>9} {:>9} {:>11} {:>14}",
        "access", "system", "p50 µs", "p99 µs", "MB/s", "lego/linux"
    );
    for random in [false, true] {
        let linux = run_loop(None, ws_mb, random);
        let lg = run_loop(Some((&lego, excache_mb)), ws_mb, random);
        let name = if random { "random" } else { "sequential" };
        for (sys, r) in [("linux", &linux), ("lego", &lg)] {
            println!(
                "  {:<11} {:<6} {:>9.2} {:>9.2} {:>11.1} {:>14}",
                name,
                sys,
                r["p50_us"].as_f64().unwrap_or(0.0),
                r["p99_us"].as_f64().unwrap_or(0.0),
                r["mb_per_s"].as_f64().unwrap_or(0.0),
                if sys == "lego" {
                    format!(
                        "{:.1}x slower",
                        linux["mb_per_s"].as_f64().unwrap_or(0.0)
                            / r["mb_per_s"].as_f64().unwrap_or(1.0)
                    )
                } else {
                    "1.0x".into()
                }
            );
        }
        if random {
            let p50 = lg["p50_us"].as_f64().unwrap_or(0.0);
            println!();
            println!(
                "random miss p50 / sum of parts = {:.2}",
                p50 / (tcp_p50 + uffd_p50)
            );
        }
    }
}
