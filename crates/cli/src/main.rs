//! `lego`: one binary for users and daemons. Parses arguments, calls the
//! component libraries, maps errors to exit codes (125 when lego itself
//! fails, the program's own status otherwise).

#![deny(unsafe_code)]

mod cluster;
mod config;
mod keys;
mod processor;
mod run;
mod size;
mod top;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lego",
    version,
    about = "Run unmodified programs with disaggregated memory (a LegoOS splitkernel in user space)"
)]
struct Cli {
    /// Settings from a TOML file, one table per command ([memory],
    /// [manager], [processor], [run]) keyed by long flag names; flags and
    /// environment variables win over it.
    #[arg(long, global = true, value_name = "FILE", env = "LEGO_CONFIG")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a program with its memory on memory daemons and only an ExCache locally.
    Run(run::RunArgs),
    /// Run a memory daemon (a memory component).
    Memory(MemoryArgs),
    /// Run the global manager (GPM and GMM): membership, memory and process placement.
    Manager(cluster::ManagerArgs),
    /// Run a processor daemon: runs the programs the global manager places on this host.
    Processor(processor::ProcessorArgs),
    /// Run a storage daemon (a storage component): vNodes' files under a
    /// directory, durable on fsync.
    Storage(StorageArgs),
    /// Show the cluster (with --manager) or one memory daemon (with --memory).
    Status(StatusArgs),
    /// A live view of the cluster or of one memory daemon, refreshed each
    /// second (like htop).
    Top(top::TopArgs),
    /// Move everything off a memory daemon while its programs run, then let it leave.
    Drain(cluster::DrainArgs),
    /// Make, list and delete vNodes (programs run in one with
    /// `lego run --vnode`).
    Vnode(cluster::VnodeArgs),
    /// Make a cluster credential (or a user's, derived from it): every
    /// component and client proves itself with one.
    Keygen(keys::KeygenArgs),
    /// What a processor daemon starts to run a program in a vNode (not
    /// for users).
    #[command(hide = true)]
    VnodeHost(VnodeHostArgs),
    /// PID 1 of a vNode's programs (not for users).
    #[command(hide = true)]
    VnodeInit(VnodeInitArgs),
}

#[derive(clap::Args)]
struct VnodeInitArgs {
    #[arg(long, requires = "gid")]
    uid: Option<u32>,
    #[arg(long, requires = "uid")]
    gid: Option<u32>,
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

#[derive(clap::Args)]
struct VnodeHostArgs {
    #[arg(long)]
    name: String,
    #[arg(long)]
    vid: u64,
    #[arg(long)]
    vip: String,
    #[arg(long)]
    storage: String,
    #[arg(long)]
    timeout_ms: u64,
    #[arg(long, requires = "gid")]
    uid: Option<u32>,
    #[arg(long, requires = "uid")]
    gid: Option<u32>,
    #[arg(long)]
    manager: String,
    #[arg(long)]
    job_dir: Option<std::path::PathBuf>,
    #[arg(long)]
    netns: std::path::PathBuf,
    #[arg(long)]
    env_file: std::path::PathBuf,
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

#[derive(clap::Args)]
struct MemoryArgs {
    /// Address to listen on, HOST:PORT (port 0 picks a free one).
    #[arg(long, value_name = "ADDR", env = "LEGO_LISTEN")]
    listen: String,
    /// Most page memory this daemon holds, e.g. 4G.
    #[arg(long, value_name = "SIZE", value_parser = size::parse_size, env = "LEGO_CAPACITY")]
    capacity: u64,
    /// Join the cluster of the global manager at ADDR (HOST:PORT): register,
    /// heartbeat, take placements.
    #[arg(long, value_name = "ADDR", env = "LEGO_MANAGER")]
    manager: Option<String>,
    /// Address other components reach this daemon at, if not the listening
    /// address (e.g. when listening on 0.0.0.0).
    #[arg(long, value_name = "ADDR", env = "LEGO_ADVERTISE")]
    advertise: Option<String>,
    /// The failure domain this daemon is in (a rack, a power feed, a
    /// host): the manager puts the replicas of a unit in different zones
    /// where it can.
    #[arg(long, value_name = "NAME", env = "LEGO_ZONE", requires = "manager")]
    zone: Option<String>,
    #[command(flatten)]
    metrics: MetricsArg,
    #[command(flatten)]
    key: keys::KeyArg,
}

/// `--metrics ADDR`, for every daemon and `lego run`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct MetricsArg {
    /// Serve Prometheus metrics at http://ADDR/metrics (HOST:PORT, or a
    /// PORT on 127.0.0.1). Off unless given.
    #[arg(long, value_name = "ADDR", env = "LEGO_METRICS")]
    pub metrics: Option<String>,
}

impl MetricsArg {
    /// Starts serving `scrape` if asked to, saying where (as `who`).
    pub fn serve(
        &self,
        who: &str,
        scrape: lego_metrics::http::ScrapeFn,
    ) -> Result<Option<lego_metrics::MetricsServer>, String> {
        let Some(addr) = &self.metrics else {
            return Ok(None);
        };
        let server = lego_metrics::serve(addr, scrape)?;
        eprintln!("{who}: metrics at http://{}/metrics", server.addr());
        Ok(Some(server))
    }
}

#[derive(clap::Args)]
struct StorageArgs {
    /// Address to listen on, HOST:PORT (port 0 picks a free one).
    #[arg(long, value_name = "ADDR", env = "LEGO_LISTEN")]
    listen: String,
    /// Directory holding the vNodes' files (one tree per vNode under
    /// DIR/vnodes); made if missing.
    #[arg(long, value_name = "DIR", env = "LEGO_STORAGE_DIR")]
    dir: std::path::PathBuf,
    /// Join the cluster of the global manager at ADDR (HOST:PORT).
    #[arg(long, value_name = "ADDR", env = "LEGO_MANAGER")]
    manager: Option<String>,
    /// Address other components reach this daemon at, if not the listening
    /// address.
    #[arg(long, value_name = "ADDR", env = "LEGO_ADVERTISE")]
    advertise: Option<String>,
    #[command(flatten)]
    metrics: MetricsArg,
    #[command(flatten)]
    key: keys::KeyArg,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["memory", "manager"])))]
struct StatusArgs {
    /// Memory daemon to ask, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    memory: Option<String>,
    /// Global manager to ask, HOST:PORT: the whole cluster.
    #[arg(long, value_name = "ADDR", env = "LEGO_MANAGER")]
    manager: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    key: keys::KeyArg,
}

const LEGO_FAILED: u8 = 125;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let Err(e) = config::apply::<Cli>(&args) {
        eprintln!("lego: {e}");
        return ExitCode::from(LEGO_FAILED);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Memory(args) => {
            init_logging();
            if args.capacity < lego_protocol::PAGE_SIZE as u64 {
                return fail("lego memory", "--capacity must be at least one page, 4K");
            }
            let cred = match args.key.daemon(&args.listen) {
                Ok(c) => c,
                Err(e) => return fail("lego memory", e),
            };
            let mut d = match lego_memory::MemoryDaemon::start(&args.listen, args.capacity, cred) {
                Ok(d) => d,
                Err(e) => return fail("lego memory", e),
            };
            if let Err(e) = stop_on_signals(d.stopper()) {
                return fail("lego memory", e);
            }
            let _metrics = match args
                .metrics
                .serve("lego memory", d.scraper(args.advertise.as_deref()))
            {
                Ok(m) => m,
                Err(e) => return fail("lego memory", e),
            };
            if let Some(m) = &args.manager {
                let zone = args.zone.as_deref().unwrap_or("");
                if let Err(e) = d.join(m, args.advertise.as_deref(), zone) {
                    return fail("lego memory", e);
                }
            }
            eprintln!(
                "lego memory: serving on {} with {} capacity",
                d.addr(),
                size::human(args.capacity)
            );
            match d.wait() {
                lego_memory::Ended::Drained => {
                    eprintln!("lego memory: drained; left the cluster")
                }
                lego_memory::Ended::Stopped if args.manager.is_some() => {
                    eprintln!("lego memory: stopped; left the cluster")
                }
                lego_memory::Ended::Stopped => eprintln!("lego memory: stopped"),
            }
            ExitCode::SUCCESS
        }
        Command::Manager(args) => {
            init_logging();
            cluster::manager(args)
        }
        Command::Processor(args) => {
            init_logging();
            processor::processor(args)
        }
        Command::Storage(args) => {
            init_logging();
            storage(args)
        }
        Command::Status(args) => {
            lego_sys::process::end_quietly_on_closed_pipe();
            let cred = match args.key.client() {
                Ok(c) => c,
                Err(e) => return fail("lego status", e),
            };
            match (&args.memory, &args.manager) {
                (_, Some(m)) => cluster::status(m, args.json, &cred),
                (Some(mem), None) => memory_status(mem, args.json, &cred),
                (None, None) => fail("lego status", "give --manager or --memory"),
            }
        }
        Command::Top(args) => top::top(args),
        Command::Drain(args) => cluster::drain(args),
        Command::Vnode(args) => {
            lego_sys::process::end_quietly_on_closed_pipe();
            cluster::vnode(args)
        }
        Command::Keygen(args) => {
            lego_sys::process::end_quietly_on_closed_pipe();
            keys::keygen(args)
        }
        Command::VnodeHost(args) => {
            // Its log goes to the program's stderr: problems only.
            init_logging_at("warn,fuser=error");
            let spec = lego_processor::vnode::Spec {
                name: args.name,
                vid: args.vid,
                vip: args.vip,
                storage: args.storage,
                user: args.uid.zip(args.gid),
                timeout: std::time::Duration::from_millis(args.timeout_ms),
                netns: args.netns,
            };
            // The program's environment (this process runs with a fixed
            // one).
            let env = match lego_processor::vnode::EnvFile::read(&args.env_file) {
                Ok(e) => e,
                Err(e) => return fail("lego", e),
            };
            let r = lego_processor::vnode::host(
                &spec,
                (&args.manager, args.job_dir.as_deref()),
                &args.command,
                &env,
            );
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail("lego", e),
            }
        }
        Command::VnodeInit(args) => {
            match lego_processor::vnode::init(args.uid.zip(args.gid), &args.command) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail("lego", e),
            }
        }
    }
}

/// `lego storage`: serves vNodes' files until stopped.
fn storage(args: StorageArgs) -> ExitCode {
    let cred = match args.key.daemon(&args.listen) {
        Ok(c) => c,
        Err(e) => return fail("lego storage", e),
    };
    let mut d = match lego_storage::StorageDaemon::start(&args.listen, args.dir.clone(), cred) {
        Ok(d) => d,
        Err(e) => return fail("lego storage", e),
    };
    if let Err(e) = stop_on_signals(d.stopper()) {
        return fail("lego storage", e);
    }
    let _metrics = match args
        .metrics
        .serve("lego storage", d.scraper(args.advertise.as_deref()))
    {
        Ok(m) => m,
        Err(e) => return fail("lego storage", e),
    };
    if let Some(m) = &args.manager {
        if let Err(e) = d.join(m, args.advertise.as_deref()) {
            return fail("lego storage", e);
        }
    }
    eprintln!(
        "lego storage: serving on {} with files in {}",
        d.addr(),
        args.dir.display()
    );
    d.wait();
    eprintln!("lego storage: stopped");
    ExitCode::SUCCESS
}

/// A daemon's way out: SIGINT, SIGTERM, SIGHUP and SIGQUIT set `stop` (the
/// daemon then leaves its cluster and exits 0); SIGUSR1 and SIGUSR2 are
/// ignored.
fn stop_on_signals(stop: Arc<AtomicBool>) -> std::io::Result<()> {
    lego_sys::process::signals_to(move |sig| {
        if lego_sys::process::asks_to_end(sig) {
            stop.store(true, Ordering::SeqCst);
        }
    })
}

/// Prints `lego CMD: MSG` and returns lego's failure status.
fn fail(cmd: &str, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("{cmd}: {msg}");
    ExitCode::from(LEGO_FAILED)
}

fn memory_status(addr: &str, json: bool, cred: &lego_transport::auth::Credential) -> ExitCode {
    match lego_memory::query_stats(addr, cred) {
        Ok(s) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "address": addr,
                        "capacity_bytes": s.capacity_bytes,
                        "used_bytes": s.used_bytes,
                        "spaces": s.spaces,
                        "connections": s.connections,
                    })
                );
            } else {
                println!(
                    "{:<8} {:<22} {:>12} {:>12} {:>7} {:>11}",
                    "KIND", "ADDRESS", "CAPACITY", "USED", "SPACES", "CONNECTIONS"
                );
                println!(
                    "{:<8} {:<22} {:>12} {:>12} {:>7} {:>11}",
                    "memory",
                    addr,
                    size::human(s.capacity_bytes),
                    size::human(s.used_bytes),
                    s.spaces,
                    s.connections
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail("lego status", format!("memory daemon {addr}: {e}")),
    }
}

fn init_logging() {
    init_logging_at("info");
}

/// Logging filtered by `LEGO_LOG`, else at `default`, to stderr: text, or
/// one JSON object a line with `LEGO_LOG_FORMAT=json` (for log shippers).
/// Each line names its thread, which names the component (`lego-memory-conn`,
/// `lego-manager-tick`, ...).
fn init_logging_at(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LEGO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let format = std::env::var("LEGO_LOG_FORMAT").unwrap_or_default();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_thread_names(true)
        .with_writer(std::io::stderr);
    match format.as_str() {
        "json" => builder.json().with_current_span(false).init(),
        "" | "text" => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        other => {
            builder.with_ansi(std::io::stderr().is_terminal()).init();
            eprintln!("lego: LEGO_LOG_FORMAT={other:?} is not json or text: logging as text");
        }
    }
}
