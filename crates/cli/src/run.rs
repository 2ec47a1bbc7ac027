//! `lego run`: checks that the program can run under lego, starts an
//! embedded memory daemon unless `--memory` names some, launches the program
//! with the runtime preloaded, passes signals and the exit status through,
//! and reports what the runtime measured.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use lego_sys::stats::{self, SharedStats};
use lego_transport::auth::{Credential, KEY_ENV};
use serde_json::json;

use crate::size::{human, parse_size};

/// Name of the runtime library, found next to the `lego` binary.
pub const RUNTIME_LIB: &str = "liblego_runtime.so";

#[derive(clap::Args)]
#[command(trailing_var_arg = true)]
pub struct RunArgs {
    /// Local memory the program's disaggregated pages may occupy (its ExCache), e.g. 64M.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size, env = "LEGO_RUN_EXCACHE")]
    excache: u64,
    /// Memory daemon to use, HOST:PORT; repeat for several (the first is the
    /// home of the address space). Without it, lego starts one on loopback
    /// for this run.
    #[arg(long = "memory", value_name = "ADDR", conflicts_with = "manager")]
    memory: Vec<String>,
    /// With several --memory daemons: keep each page on this many of them
    /// (a program then survives the failure of all but one). With
    /// --manager, the manager's --replicas decides.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=4), conflicts_with = "manager")]
    replicas: u8,
    /// Global manager of a cluster, HOST:PORT: the program's memory is
    /// placed on the cluster's memory daemons by its GMM (this host runs
    /// the program).
    #[arg(long, value_name = "ADDR", env = "LEGO_MANAGER")]
    manager: Option<String>,
    /// With --manager: run the program on this host, not on the processor
    /// daemon the manager picks (what processor daemons themselves use).
    #[arg(long, requires = "manager")]
    local: bool,
    /// With --manager: run the program in vNode NAME (its own network
    /// namespace with the vNode's vIP, its file system at
    /// /run/lego/vnode, which is also its working directory), on the
    /// processor daemon the manager picks.
    #[arg(
        long,
        value_name = "NAME",
        requires = "manager",
        conflicts_with = "local"
    )]
    vnode: Option<String>,
    /// Capacity of the memory daemon started for this run.
    #[arg(long, value_name = "SIZE", default_value = "16G", value_parser = parse_size)]
    capacity: u64,
    /// Also write the run's statistics as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,
    /// Keep the program's counters in FILE (JSON), rewritten each second
    /// while it runs (what a processor daemon reads for its metrics and
    /// heartbeats).
    #[arg(long, value_name = "FILE", hide = true)]
    live_stats: Option<PathBuf>,
    #[command(flatten)]
    metrics: crate::MetricsArg,
    /// Do not print the summary (errors are still printed).
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    key: crate::keys::KeyArg,
    /// The program and its arguments.
    #[arg(required = true, value_name = "PROGRAM")]
    command: Vec<OsString>,
}

/// The program's counters, written to a file each second while it runs
/// and once more as it ends (on drop): replaced whole each time (a reader
/// never sees half of one).
struct LiveStats {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LiveStats {
    fn start(file: PathBuf, shared: &'static SharedStats) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let write = move || {
            let c = lego_metrics::program::counters(shared);
            let tmp = file.with_extension("tmp");
            let json = serde_json::to_vec(&c).unwrap_or_default();
            if std::fs::write(&tmp, json)
                .and_then(|()| std::fs::rename(&tmp, &file))
                .is_err()
            {
                let _ = std::fs::remove_file(&tmp);
            }
        };
        let thread = std::thread::Builder::new()
            .name("lego-live-stats".into())
            .spawn(move || loop {
                write();
                let t = Instant::now();
                while t.elapsed() < Duration::from_secs(1) {
                    if stopping.load(Relaxed) {
                        write();
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
            .ok();
        Self { stop, thread }
    }
}

impl Drop for LiveStats {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Prints `lego: MSG` and returns lego's failure status.
fn fail(msg: impl std::fmt::Display) -> ExitCode {
    crate::fail("lego", msg)
}

/// Finds `prog` like a shell does.
fn resolve(prog: &OsString) -> Option<PathBuf> {
    let p = Path::new(prog);
    if p.components().count() > 1 || prog.to_string_lossy().contains('/') {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(p))
            .find(|c| c.is_file())
    })
}

/// Whether the ELF file at `path` is statically linked (has no program
/// interpreter). Scripts and unreadable files are not judged here.
fn is_static_elf(path: &Path) -> bool {
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut head = vec![0u8; 64];
    if f.read_exact(&mut head).is_err() || &head[..4] != b"\x7fELF" || head[4] != 2 {
        return false;
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(head[32..40].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(&head, 54), u16_at(&head, 56));
    use std::io::{Seek, SeekFrom};
    let mut phdrs = vec![0u8; phnum * phentsize];
    if phentsize < 4
        || f.seek(SeekFrom::Start(phoff as u64)).is_err()
        || f.read_exact(&mut phdrs).is_err()
    {
        return false;
    }
    const PT_INTERP: u32 = 3;
    !phdrs
        .chunks_exact(phentsize)
        .any(|h| u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) == PT_INTERP)
}

fn runtime_library() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("LEGO_RUNTIME") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("LEGO_RUNTIME={} does not exist", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate the lego binary: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    for c in [
        dir.join(RUNTIME_LIB),
        dir.join("../lib/lego").join(RUNTIME_LIB),
    ] {
        if c.is_file() {
            return Ok(c);
        }
    }
    Err(format!(
        "cannot find {RUNTIME_LIB} next to {} (build the workspace with `cargo build --release`, or set LEGO_RUNTIME)",
        exe.display()
    ))
}

fn check_daemon(addr: &str, cred: &Credential) -> Result<(), String> {
    lego_memory::query_stats(addr, cred)
        .map(|_| ())
        .map_err(|e| format!("memory daemon {addr}: {e}"))
}

/// The alive memory daemons of the cluster at `manager`, most free
/// capacity first (the first is the home of the address space), with their
/// manager ids.
fn cluster_memory(manager: &str, cred: &Credential) -> Result<(Vec<String>, Vec<u64>), String> {
    use lego_protocol::control::{Kind, Reply, Request, State, PLACEMENT_BYTES};
    let status = match lego_transport::ask_manager(manager, &Request::Status, cred)? {
        Reply::Status(s) => s,
        other => {
            return Err(format!(
                "global manager {manager}: unexpected answer {other:?}"
            ))
        }
    };
    let mut mem: Vec<_> = status
        .components
        .into_iter()
        .filter(|c| c.kind == Kind::Memory && c.state == State::Alive)
        .collect();
    if mem.is_empty() {
        return Err(format!(
            "global manager {manager}: no memory daemon is alive in the cluster"
        ));
    }
    if mem.len() > 254 {
        mem.truncate(254);
    }
    mem.sort_by_key(|c| {
        std::cmp::Reverse(c.capacity_bytes.saturating_sub(c.units * PLACEMENT_BYTES))
    });
    Ok((
        mem.iter().map(|c| c.addr.clone()).collect(),
        mem.iter().map(|c| c.id).collect(),
    ))
}

pub fn run(args: RunArgs) -> ExitCode {
    if let (Some(m), false) = (&args.manager, args.local) {
        let cred = match args.key.client() {
            Ok(c) => c,
            Err(e) => return fail(e),
        };
        match lego_processor::remote::processors_alive(m, &cred) {
            Ok(true) => {
                if let Some(addr) = &args.metrics.metrics {
                    eprintln!(
                        "lego: --metrics {addr} is for programs run on this host: this one runs on a processor daemon, whose --metrics serves it"
                    );
                }
                return run_on_processor(m, &args, cred);
            }
            Ok(false) if args.vnode.is_some() => {
                return fail(format!(
                    "no processor daemon is alive in the cluster of {m}: programs run in vNodes on processor daemons"
                ))
            }
            Ok(false) => {} // No processor daemon: this host runs it.
            Err(e) => return fail(e),
        }
    }
    let prog = &args.command[0];
    let Some(path) = resolve(prog) else {
        eprintln!("lego: {}: command not found", prog.to_string_lossy());
        return ExitCode::from(127);
    };
    if is_static_elf(&path) {
        return fail(format!(
            "{} is statically linked: lego's runtime is preloaded into dynamically linked programs and cannot take over a static program's memory",
            path.display()
        ));
    }
    if let Err(e) = lego_sys::uffd::probe() {
        return fail(format!(
            "cannot run programs with disaggregated memory here: {e}"
        ));
    }
    let lib = match runtime_library() {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    if args.excache < 64 * 1024 {
        return fail("--excache must be at least 64K");
    }
    let (stats_fd, shared) = match stats::create() {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot create the statistics page: {e}")),
    };

    let embedded;
    let mut one_run = None;
    let mut managed: Option<(String, Vec<u64>)> = None;
    let client = || args.key.client();
    let daemons = if let Some(m) = &args.manager {
        embedded = None;
        match client().and_then(|cred| cluster_memory(m, &cred)) {
            Ok((addrs, ids)) => {
                managed = Some((m.clone(), ids));
                addrs
            }
            Err(e) => return fail(e),
        }
    } else if args.memory.is_empty() {
        let key = match crate::keys::OneRunKey::new() {
            Ok(k) => k,
            Err(e) => return fail(format!("cannot make the run's credential: {e}")),
        };
        let cred = key.cred.clone();
        one_run = Some(key);
        match lego_memory::MemoryDaemon::start("127.0.0.1:0", args.capacity, cred) {
            Ok(d) => {
                let a = d.addr().to_string();
                embedded = Some(d);
                vec![a]
            }
            Err(e) => return fail(format!("cannot start the embedded memory daemon: {e}")),
        }
    } else {
        embedded = None;
        let cred = match client() {
            Ok(c) => c,
            Err(e) => return fail(e),
        };
        for a in &args.memory {
            if let Err(e) = check_daemon(a, &cred) {
                return fail(e);
            }
        }
        args.memory.clone()
    };

    let preload = match std::env::var_os("LD_PRELOAD") {
        Some(old) if !old.is_empty() => {
            let mut v = lib.clone().into_os_string();
            v.push(":");
            v.push(old);
            v
        }
        _ => lib.into_os_string(),
    };
    let start = Instant::now();
    let mut cmd = Command::new(&path);
    cmd.arg0(prog)
        .args(&args.command[1..])
        .env("LD_PRELOAD", preload)
        .env("LEGO_MEMORY", daemons.join(","))
        .env("LEGO_EXCACHE_BYTES", args.excache.to_string())
        .env("LEGO_REPLICAS", args.replicas.to_string())
        .env("LEGO_STATS_FD", stats_fd.to_string());
    // The runtime proves itself with the run's own credential, or the one
    // this command was given (else it finds the same default file).
    match (&one_run, &args.key.key) {
        (Some(k), _) => {
            cmd.env(KEY_ENV, k.path());
        }
        (None, Some(p)) => {
            cmd.env(KEY_ENV, p);
        }
        (None, None) => {}
    }
    if let Some((m, ids)) = &managed {
        let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
        cmd.env("LEGO_MANAGER", m)
            .env("LEGO_MEMORY_IDS", ids.join(","));
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start {}: {e}", path.display())),
    };
    lego_sys::process::forward_signals_to(child.id() as i32);
    let program_labels = lego_metrics::labels(&[
        ("pid", &child.id().to_string()),
        (
            "program",
            &lego_metrics::program::label_of(&prog.to_string_lossy()),
        ),
    ]);
    let _metrics = match args.metrics.serve(
        "lego",
        std::sync::Arc::new(move || {
            let mut m = lego_metrics::Scrape::new();
            lego_metrics::program::add(
                &mut m,
                &program_labels,
                &lego_metrics::program::counters(shared),
            );
            m
        }),
    ) {
        Ok(m) => m,
        Err(e) => {
            let _ = child.kill();
            return fail(e);
        }
    };
    let live = args.live_stats.clone().map(|f| LiveStats::start(f, shared));
    // A program whose pager cannot serve its faults would wait forever.
    let watchdog = lego_processor::Watchdog::start(child.id())
        .map_err(|e| eprintln!("lego: the program runs without a watchdog against hangs: {e}"))
        .ok();
    let status = loop {
        match child.wait() {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return fail(format!("waiting for the program failed: {e}")),
        }
    };
    let elapsed = start.elapsed();
    drop(live);
    let hung = watchdog.and_then(lego_processor::Watchdog::finish);
    if let Some(h) = &hung {
        eprintln!("lego: {h}");
    }
    let report = Report::collect(shared, &args, &path, status, elapsed);
    if !args.quiet {
        eprint!("{}", report.text());
    }
    if let Some(f) = &args.stats {
        if let Err(e) = std::fs::write(
            f,
            serde_json::to_string_pretty(&report.json()).unwrap_or_default(),
        ) {
            eprintln!("lego: cannot write {}: {e}", f.display());
        }
    }
    if let Some(d) = embedded {
        d.shutdown();
    }
    drop(one_run);
    if hung.is_some() {
        return ExitCode::from(crate::LEGO_FAILED);
    }
    lego_sys::process::exit_like(status)
}

/// Runs the program on the processor daemon the manager at `manager`
/// picks; ends this process the way the program ended.
fn run_on_processor(manager: &str, args: &RunArgs, cred: Credential) -> ExitCode {
    let job = lego_processor::RemoteRun {
        manager: manager.to_string(),
        argv: args
            .command
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        excache_bytes: args.excache,
        summary: !args.quiet,
        stats: args.stats.is_some(),
        cred,
        vnode: args.vnode.clone(),
    };
    let ended = match job.run() {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    if let Some(f) = &args.stats {
        match &ended.stats {
            Some(j) => {
                if let Err(e) = std::fs::write(f, j) {
                    eprintln!("lego: cannot write {}: {e}", f.display());
                }
            }
            None => eprintln!(
                "lego: processor daemon {} sent no statistics for {}",
                ended.processor,
                f.display()
            ),
        }
    }
    if !args.quiet {
        eprintln!("lego: ran on processor daemon {}", ended.processor);
    }
    lego_sys::process::exit_like(ended.status)
}

/// What the runtime measured, read from the shared statistics page.
struct Report {
    program: String,
    status: std::process::ExitStatus,
    elapsed: Duration,
    excache: u64,
    s: &'static SharedStats,
}

impl Report {
    fn collect(
        s: &'static SharedStats,
        args: &RunArgs,
        path: &Path,
        status: std::process::ExitStatus,
        elapsed: Duration,
    ) -> Self {
        Self {
            program: path.display().to_string(),
            status,
            elapsed,
            excache: args.excache,
            s,
        }
    }

    fn coverage(&self) -> (u64, u64, Option<f64>) {
        let (d, l) = self.s.coverage_totals();
        let frac = (d + l > 0).then(|| d as f64 / (d + l) as f64);
        (d, l, frac)
    }

    fn end(&self) -> String {
        use std::os::unix::process::ExitStatusExt;
        match (self.status.code(), self.status.signal()) {
            (Some(c), _) => format!("exit {c}"),
            (_, Some(sig)) => format!("killed by signal {sig}"),
            _ => "ended".into(),
        }
    }

    fn text(&self) -> String {
        let s = self.s;
        let remote = s.remote_misses.load(Relaxed);
        let zero = s.zero_fills.load(Relaxed);
        let lat = |q| {
            s.latency_quantile_us(q)
                .map(|v| format!("{v:.0} µs"))
                .unwrap_or_else(|| "-".into())
        };
        let (d, l, frac) = self.coverage();
        let cov = frac
            .map(|f| {
                format!(
                    "{:.1}% ({} disaggregated, {} local)",
                    f * 100.0,
                    human(d),
                    human(l)
                )
            })
            .unwrap_or_else(|| "not measured".into());
        if s.processes.load(Relaxed) == 0 {
            return format!(
                "lego: {} after {:.2} s; the runtime never attached (no disaggregated memory was used)\n",
                self.end(),
                self.elapsed.as_secs_f64()
            );
        }
        let migrated = s.migrated_pages.load(Relaxed);
        let moved = if migrated > 0 {
            format!(
                "lego: {} copied between memory daemons (replicas made again, drains)\n",
                human(migrated * lego_protocol::PAGE_SIZE as u64)
            )
        } else {
            String::new()
        };
        format!(
            "lego: {} after {:.2} s | ExCache {} | peak resident {}\n\
             lego: misses {} ({} fetched, {} from the compressed tier, {} zero-filled) | miss latency p50 {} p99 {}\n\
             lego: ahead of misses: {} pages prefetched, {} zero-filled\n\
             lego: compressed tier: {} hits | {} pages stored, {} did not compress | peak {}\n\
             lego: evictions {} | writebacks {} ({} zero and {} unchanged pages dropped instead) | network {} out, {} in\n\
             {moved}lego: coverage {}\n",
            self.end(),
            self.elapsed.as_secs_f64(),
            human(self.excache),
            human(s.peak_resident_bytes.load(Relaxed)),
            remote + zero + s.tier_hits.load(Relaxed),
            remote,
            s.tier_hits.load(Relaxed),
            zero,
            lat(0.5),
            lat(0.99),
            s.prefetched.load(Relaxed),
            s.prefilled.load(Relaxed),
            s.tier_hits.load(Relaxed),
            s.tier_stores.load(Relaxed),
            s.tier_incompressible.load(Relaxed),
            human(s.peak_tier_bytes.load(Relaxed)),
            s.evictions.load(Relaxed),
            s.writebacks.load(Relaxed),
            s.zero_drops.load(Relaxed),
            s.unchanged_drops.load(Relaxed),
            human(s.bytes_out.load(Relaxed)),
            human(s.bytes_in.load(Relaxed)),
            cov
        )
    }

    fn json(&self) -> serde_json::Value {
        use std::os::unix::process::ExitStatusExt;
        let s = self.s;
        let (d, l, frac) = self.coverage();
        json!({
            "program": self.program,
            "exit_code": self.status.code(),
            "signal": self.status.signal(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "processes": s.processes.load(Relaxed),
            "excache_bytes": self.excache,
            "peak_resident_bytes": s.peak_resident_bytes.load(Relaxed),
            "misses": s.remote_misses.load(Relaxed) + s.zero_fills.load(Relaxed) + s.tier_hits.load(Relaxed),
            "remote_misses": s.remote_misses.load(Relaxed),
            "zero_fills": s.zero_fills.load(Relaxed),
            "prefetched": s.prefetched.load(Relaxed),
            "prefilled": s.prefilled.load(Relaxed),
            "zero_drops": s.zero_drops.load(Relaxed),
            "unchanged_drops": s.unchanged_drops.load(Relaxed),
            "dirtied": s.dirtied.load(Relaxed),
            "evictions": s.evictions.load(Relaxed),
            "writebacks": s.writebacks.load(Relaxed),
            "migrated_pages": s.migrated_pages.load(Relaxed),
            "tier": {
                "hits": s.tier_hits.load(Relaxed),
                "stores": s.tier_stores.load(Relaxed),
                "incompressible": s.tier_incompressible.load(Relaxed),
                "peak_bytes": s.peak_tier_bytes.load(Relaxed),
            },
            "bytes_out": s.bytes_out.load(Relaxed),
            "bytes_in": s.bytes_in.load(Relaxed),
            "miss_latency_us": {
                "p50": s.latency_quantile_us(0.5),
                "p99": s.latency_quantile_us(0.99),
            },
            "coverage": {
                "fraction": frac,
                "disaggregated_bytes": d,
                "local_bytes": l,
            },
        })
    }
}
