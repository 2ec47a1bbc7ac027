//! The processor daemon (`lego processor`): joins the cluster with the
//! host's ExCache budget, runs the programs the global process manager
//! places on it (`lego run --manager` on any host), each as `lego run
//! --manager --local` here with its share of the budget, streams their
//! stdin, stdout and stderr to and from the client, delivers the client's
//! signals, reports the exit status, and tells the manager what it runs.
//!
//! [`ProcessorDaemon::start`] binds, joins and serves on background
//! threads, one per connection; [`ProcessorDaemon::wait`] returns once it
//! is stopped, after ending its programs and leaving the cluster.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lego_protocol::control::{
    self, human_bytes, Kind, ProcessInfo, ProgramCounters, Reply, Request,
};
use lego_protocol::{Message, MAX_STDIO_BYTES};
use lego_transport::auth::{Credential, Identity};
use lego_transport::{
    ConnError, FramedConn, Listener, Member, Membership, Stream, Tcp, Transport, TransportError,
};

/// How a processor daemon is set up (the flags of `lego processor`).
#[derive(Clone, Debug)]
pub struct ProcessorConfig {
    /// Address to listen on for programs to run, HOST:PORT.
    pub listen: String,
    /// Global manager of the cluster, HOST:PORT.
    pub manager: String,
    /// This host's ExCache budget, shared by the programs it runs.
    pub excache_bytes: u64,
    /// Address clients reach this daemon at, if not the listening address.
    pub advertise: Option<String>,
    /// The `lego` binary: each program runs under its `run --local`.
    pub lego_exe: PathBuf,
    /// The cluster credential: whom to serve, and what this daemon proves
    /// to the manager.
    pub cred: Credential,
}

/// Why a processor daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error(transparent)]
    Listen(#[from] TransportError),
    /// The manager was unreachable or refused the registration; the message
    /// names the manager.
    #[error("{0}")]
    Join(String),
}

/// A running processor daemon.
pub struct ProcessorDaemon {
    addr: String,
    host: Arc<Host>,
    stop: Arc<AtomicBool>,
    membership: Membership,
}

/// What the connection threads share: the budget and the programs running
/// within it.
struct Host {
    manager: String,
    budget: u64,
    lego_exe: PathBuf,
    cred: Credential,
    running: Mutex<Vec<ProcessInfo>>,
    /// Where each running program's counters are (by pid): the file its
    /// `lego run --local` rewrites each second.
    live: Mutex<std::collections::HashMap<u32, PathBuf>>,
    /// The network namespace of each vNode with programs here (crate::vnet).
    vnode_nets: crate::vnet::Networks,
    /// Held from asking the manager who is connected to applying it, so
    /// an older answer never undoes a newer one.
    vnode_links: Mutex<()>,
}

impl Host {
    fn running(&self) -> MutexGuard<'_, Vec<ProcessInfo>> {
        // A panic in one connection thread must not take the others down.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self) -> MutexGuard<'_, std::collections::HashMap<u32, PathBuf>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The programs running, with their counters as their files last
    /// had them.
    fn running_with_counters(&self) -> Vec<ProcessInfo> {
        let files: Vec<(u32, PathBuf)> = self.live().iter().map(|(&p, f)| (p, f.clone())).collect();
        let read: Vec<(u32, ProgramCounters)> = files
            .into_iter()
            .filter_map(|(pid, f)| Some((pid, read_counters(&f)?)))
            .collect();
        let mut running = self.running();
        for (pid, c) in read {
            if let Some(p) = running.iter_mut().find(|p| p.pid == pid) {
                p.counters = Some(c);
            }
        }
        running.clone()
    }
}

/// The most a counters file is read (it is about a kilobyte).
const MAX_COUNTERS_BYTES: u64 = 8 << 10;

/// At most `most` bytes of `path`, a file in a program's own directory,
/// which the program's user can write: never through a symbolic link,
/// nothing but a regular file, opened without blocking (a FIFO put there
/// would hold this daemon up; it may be root).
fn read_users_file(path: &std::path::Path, most: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    f.take(most).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A program's counters file; `None` if missing or not counters (it says
/// only what that user's program did, and nothing in it is trusted
/// beyond that).
fn read_counters(path: &std::path::Path) -> Option<ProgramCounters> {
    let text = read_users_file(path, MAX_COUNTERS_BYTES).ok()?;
    serde_json::from_slice::<ProgramCounters>(&text)
        .ok()
        .filter(ProgramCounters::is_sane)
}

/// The processor daemon's metrics: its budget and programs, and each
/// program's counters (labelled with its pid and name).
fn scrape(host: &Host, addr: &str) -> lego_metrics::Scrape {
    use lego_metrics::labels;
    let running = host.running_with_counters();
    let me = labels(&[("daemon", addr)]);
    let mut m = lego_metrics::Scrape::new();
    m.gauges(
        &me,
        &[
            (
                "lego_processor_programs",
                "Programs this processor daemon runs.",
                running.len() as f64,
            ),
            (
                "lego_processor_excache_budget_bytes",
                "The ExCache budget its programs share.",
                host.budget as f64,
            ),
            (
                "lego_processor_excache_used_bytes",
                "ExCache given to the programs it runs.",
                running.iter().map(|p| p.excache_bytes).sum::<u64>() as f64,
            ),
        ],
    );
    for p in &running {
        if let Some(c) = &p.counters {
            let l = labels(&[
                ("daemon", addr),
                ("pid", &p.pid.to_string()),
                ("program", &lego_metrics::program::label_of(&p.program)),
            ]);
            lego_metrics::program::add(&mut m, &l, c);
        }
    }
    m
}

/// Placeholder ids for programs not started yet, above any pid.
const FIRST_SLOT: u32 = 1 << 30;

fn next_slot() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(FIRST_SLOT);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl ProcessorDaemon {
    /// Binds `config.listen`, registers with the manager and starts
    /// serving and heartbeating.
    pub fn start(config: ProcessorConfig) -> Result<Self, ProcessorError> {
        let listener = Tcp.listen(&config.listen)?;
        let addr = Listener::local_addr(&listener);
        let advertised = config.advertise.clone().unwrap_or_else(|| addr.clone());
        let member = Member::join(
            &config.manager,
            (Kind::Processor, &advertised, ""),
            config.excache_bytes,
            &config.cred,
        )
        .map_err(ProcessorError::Join)?;
        let host = Arc::new(Host {
            manager: config.manager,
            budget: config.excache_bytes,
            lego_exe: config.lego_exe,
            cred: config.cred,
            running: Mutex::new(Vec::new()),
            live: Mutex::new(Default::default()),
            vnode_nets: Default::default(),
            vnode_links: Mutex::new(()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let membership = {
            let host = host.clone();
            member.keep_alive(stop.clone(), move || {
                let running = host.running_with_counters();
                let mut beat = Request::Heartbeat {
                    id: 0,
                    key: String::new(),
                    used_bytes: running.iter().map(|p| p.excache_bytes).sum(),
                    load: running.len() as u32,
                    spaces: vec![],
                    processes: running,
                };
                // Many programs: the heartbeat without their counters
                // rather than none that fits.
                if control::to_json(&beat).len() > lego_protocol::MAX_CONTROL_BYTES / 2 {
                    if let Request::Heartbeat { processes, .. } = &mut beat {
                        processes.iter_mut().for_each(|p| p.counters = None);
                    }
                }
                beat
            })
        };
        watch_vnode_links(host.clone(), stop.clone());
        {
            let host = host.clone();
            // Not joined: the process ends with the programs it runs.
            let _ = lego_transport::serve_connections(
                listener,
                "lego-processor",
                stop.clone(),
                move |s: TcpStream| {
                    let peer = s.peer();
                    if let Err(e) = serve(s, &host) {
                        tracing::warn!(%peer, error = %e, "closing connection");
                    }
                },
            );
        }
        Ok(Self {
            addr,
            host,
            stop,
            membership,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// What builds its metrics at each scrape (`lego processor
    /// --metrics`).
    /// Labelled `daemon` with `name` (the address clients reach it at;
    /// default: where it listens).
    pub fn scraper(&self, name: Option<&str>) -> lego_metrics::http::ScrapeFn {
        let host = self.host.clone();
        let addr = name.unwrap_or(&self.addr).to_string();
        Arc::new(move || scrape(&host, &addr))
    }

    /// Setting this flag stops the daemon (see [`ProcessorDaemon::wait`]).
    pub fn stopper(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Serves until stopped (its stop flag set, or drained by the manager),
    /// then ends the programs it runs and leaves the cluster.
    pub fn wait(self) {
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        end_programs(&self.host);
        self.membership.leave();
    }
}

/// How often a processor daemon with vNode programs asks the manager which
/// vNodes are connected (`lego vnode connect` takes effect this soon).
const VNODE_LINKS_EVERY: Duration = Duration::from_secs(1);

/// Keeps the links between the vNodes with programs here as the manager
/// has them, until `stop`.
fn watch_vnode_links(host: Arc<Host>, stop: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new()
        .name("lego-vnode-links".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(VNODE_LINKS_EVERY);
                let names = host.vnode_nets.names();
                if names.is_empty() {
                    continue;
                }
                let _links = host.vnode_links.lock().unwrap_or_else(|p| p.into_inner());
                match crate::vnode::records(&host.manager, names, &host.cred) {
                    Ok(vnodes) => host.vnode_nets.update(&vnodes),
                    Err(e) => tracing::debug!(error = %e, "cannot ask the manager for the vNodes"),
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot watch the vNodes' links");
    }
}

/// How long the programs of a stopped processor daemon get to end after
/// SIGTERM before they are killed.
const END_GRACE: Duration = Duration::from_secs(5);

/// Ends the programs this daemon runs: SIGTERM, then SIGKILL after
/// [`END_GRACE`]; their clients get their exit status meanwhile.
fn end_programs(host: &Host) {
    let pids = || -> Vec<i32> {
        // Placeholder ids (programs not started yet) are not pids.
        host.running()
            .iter()
            .filter(|p| p.pid < FIRST_SLOT)
            .map(|p| p.pid as i32)
            .collect()
    };
    let first = pids();
    if first.is_empty() {
        return;
    }
    tracing::info!(
        programs = first.len(),
        "stopping the programs this daemon runs"
    );
    for &pid in &first {
        let _ = lego_sys::process::send_signal(pid, lego_sys::process::SIGTERM);
    }
    let deadline = Instant::now() + END_GRACE;
    while Instant::now() < deadline {
        if pids().is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in pids() {
        let _ = lego_sys::process::send_signal(pid, lego_sys::process::SIGKILL);
    }
}

fn send_reply(w: &Mutex<FramedConn<TcpStream>>, id: u64, r: &Reply) -> Result<(), ConnError> {
    let mut json = control::to_json(r);
    if json.len() > lego_protocol::MAX_CONTROL_BYTES {
        json = control::to_json(&Reply::Error {
            message: format!("the answer ({} bytes) exceeds the frame limit", json.len()),
        });
    }
    w.lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(id, &Message::Control { json: &json })
}

/// A program a client asked this daemon to run.
struct Job {
    argv: Vec<String>,
    cwd: String,
    env: Vec<(String, String)>,
    /// Print lego's run summary after the program's stderr.
    summary: bool,
    /// Send the run's statistics back with its exit status.
    stats: bool,
    /// Who asked (the handshake proved it): whom the program runs as.
    identity: Identity,
    /// The vNode to run it in.
    vnode: Option<String>,
}

/// Whether a variable of the client's environment reaches the program:
/// not the dynamic loader's (`LD_PRELOAD` would choose code that runs
/// before the program, and inside lego's own runtime), nor lego's (this
/// daemon sets those).
fn passes(name: &str) -> bool {
    !name.starts_with("LD_") && !name.starts_with("LEGO_")
}

/// The local user a program of `identity` runs as: a user's own (it must
/// exist on this host), or this daemon's for the cluster's operators.
fn run_as(identity: &Identity) -> Result<Option<lego_sys::process::UserIds>, String> {
    match identity {
        Identity::Cluster => Ok(None),
        Identity::User(name) => match lego_sys::process::user_by_name(name) {
            Some(ids) if ids.uid == 0 => Err(format!(
                "{identity} would run as root: only the cluster's credential runs programs as this daemon's user"
            )),
            Some(ids) => Ok(Some(ids)),
            None => Err(format!(
                "{identity} has no local user '{name}' on this processor's host"
            )),
        },
    }
}

/// A directory of the program's own holding its credential (`key`): the
/// user's, derived from the cluster's, or for the cluster's operators the
/// cluster's. Removed when the program ends.
struct JobKey {
    dir: PathBuf,
}

impl JobKey {
    fn new(
        cred: &Credential,
        identity: &Identity,
        user: Option<lego_sys::process::UserIds>,
        slot: u32,
    ) -> Result<Self, String> {
        let key = cred.derive(identity.clone())?;
        let this = Self {
            dir: private_dir("job", slot)?,
        };
        let path = this.path();
        key.save(&path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        if let Some(u) = user {
            // The file first, while the directory is still this daemon's
            // alone: once the user owns the directory they could put a
            // link where the file was.
            for p in [&path, &this.dir] {
                std::os::unix::fs::chown(p, Some(u.uid), Some(u.gid))
                    .map_err(|e| format!("cannot give {} to uid {}: {e}", p.display(), u.uid))?;
            }
        }
        Ok(this)
    }

    fn path(&self) -> PathBuf {
        self.dir.join("key")
    }
}

/// A new directory `lego-KIND-<pid>-<slot>` in the temporary directory,
/// this daemon's user's alone.
pub(crate) fn private_dir(kind: &str, slot: u32) -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!("lego-{kind}-{}-{slot}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    Ok(dir)
}

impl Drop for JobKey {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One client connection: a `Launch` request, then the program's run.
fn serve(stream: TcpStream, host: &Host) -> Result<(), ConnError> {
    let mut conn = FramedConn::new(stream);
    let who = conn.server_handshake(host.budget, Duration::from_secs(10), &host.cred)?;
    // From here this handle only receives; the writer only sends.
    let writer = Mutex::new(conn.try_clone()?);
    let f = conn.recv()?;
    let id = f.request_id;
    let req = match f.message {
        Message::Control { json } => control::from_json::<Request>(json),
        other => Err(format!(
            "{} is not a request a processor daemon serves",
            other.name()
        )),
    };
    let (job, excache_bytes) = match req {
        Ok(Request::Launch {
            argv,
            cwd,
            env,
            excache_bytes,
            summary,
            stats,
            vnode,
        }) if !argv.is_empty() => (
            Job {
                argv,
                cwd,
                env,
                summary,
                stats,
                identity: who.identity.clone(),
                vnode,
            },
            excache_bytes,
        ),
        Ok(other) => {
            let message = format!("a processor daemon serves Launch, not {other:?}");
            return send_reply(&writer, id, &Reply::Error { message });
        }
        Err(message) => return send_reply(&writer, id, &Reply::Error { message }),
    };
    // The ExCache budget is split among the programs: refuse what does not
    // fit.
    let slot = next_slot();
    {
        let mut running = host.running();
        let used = running
            .iter()
            .fold(0u64, |a, p| a.saturating_add(p.excache_bytes));
        if used
            .checked_add(excache_bytes)
            .is_none_or(|n| n > host.budget)
        {
            let message = format!(
                "this processor has {} of ExCache free, the program asks for {}",
                human_bytes(host.budget.saturating_sub(used)),
                human_bytes(excache_bytes)
            );
            drop(running);
            tracing::warn!(peer = ?conn.stream().peer_addr().ok(), who = %job.identity, reason = %message, "launch refused");
            return send_reply(&writer, id, &Reply::Error { message });
        }
        // Listed under a placeholder id until the program's pid is known.
        running.push(ProcessInfo {
            pid: slot,
            program: control::short_program(&job.argv.join(" ")),
            excache_bytes,
            counters: None,
        });
    }
    let mut listed_as = slot;
    // Its share of the budget comes back however the run ends, a bug's
    // panic included (which then goes on to the accept loop's catch).
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_program(
            &mut conn,
            &writer,
            id,
            host,
            &job,
            excache_bytes,
            &mut listed_as,
        )
    }));
    let mut running = host.running();
    if let Some(k) = running.iter().position(|p| p.pid == listed_as) {
        running.remove(k);
    }
    drop(running);
    result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// The most statistics JSON sent back (it is a few KiB).
const MAX_STATS_BYTES: u64 = 256 << 10;

/// Runs `job` under `lego run --local`, relays its input, output and
/// signals, and answers its exit status. `listed_as` is the program's id
/// in the host's list: the placeholder, then its pid.
fn run_program(
    conn: &mut FramedConn<TcpStream>,
    writer: &Mutex<FramedConn<TcpStream>>,
    id: u64,
    host: &Host,
    job: &Job,
    excache_bytes: u64,
    listed_as: &mut u32,
) -> Result<(), ConnError> {
    let Job { argv, cwd, env, .. } = job;
    let peer = conn
        .stream()
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let refuse = |message: String| {
        tracing::warn!(%peer, who = %job.identity, reason = %message, "launch refused");
        send_reply(writer, id, &Reply::Error { message })
    };
    let user = match run_as(&job.identity) {
        Ok(u) => u,
        Err(message) => return refuse(message),
    };
    let key = match JobKey::new(&host.cred, &job.identity, user, *listed_as) {
        Ok(k) => k,
        Err(message) => return refuse(message),
    };
    let mut cmd = Command::new(&host.lego_exe);
    cmd.env_clear();
    let program_env: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| passes(k))
        .cloned()
        .chain([(
            lego_transport::auth::KEY_ENV.to_string(),
            key.path().to_string_lossy().into_owned(),
        )])
        .collect();
    // In a vNode: `lego vnode-host` (root) makes its namespaces and file
    // system and starts the wrapper there as the user (crate::vnode). It
    // runs with a fixed environment; the program's comes in a file only
    // this daemon's user can reach.
    let mut net_hold = None;
    let mut env_file = None;
    if let Some(name) = &job.vnode {
        // Asked and applied under one lock: see `vnode_links`.
        let links = host.vnode_links.lock().unwrap_or_else(|p| p.into_inner());
        let also = host.vnode_nets.names();
        let (v, vnodes) = match crate::vnode::look_up(&host.manager, name, also, &host.cred) {
            Ok(found) => found,
            Err(message) => return refuse(message),
        };
        if let Identity::User(who) = &job.identity {
            if v.owner != *who {
                return refuse(format!(
                    "vNode '{name}' is not {who}'s: only its owner and the cluster's operators run programs in it"
                ));
            }
        }
        // Held from before the run starts, so the namespace it is told
        // to join stays open until it has.
        let (hold, netns) = match host.vnode_nets.hold(&v, &vnodes) {
            Ok(h) => h,
            Err(e) => return refuse(format!("vNode '{name}': {e}")),
        };
        drop(links);
        net_hold = Some(hold);
        let spec = crate::vnode::Spec::new(&v, user.map(|u| (u.uid, u.gid)), netns.into());
        let file = match crate::vnode::EnvFile::new(&program_env, *listed_as) {
            Ok(f) => f,
            Err(message) => return refuse(message),
        };
        cmd.arg("vnode-host")
            .args(spec.to_args())
            .arg("--env-file")
            .arg(file.path());
        env_file = Some(file);
        cmd.args(["--manager", &host.manager, "--job-dir"])
            .arg(&key.dir)
            .arg("--")
            .arg(&host.lego_exe)
            .env("PATH", crate::vnode::SAFE_PATH)
            .env(crate::vnode::CRED_ENV, host.cred.to_text());
    }
    cmd.args(["run", "--manager", &host.manager, "--local"]);
    if !job.summary {
        cmd.arg("--quiet");
    }
    // The wrapper writes the statistics here (the program's own
    // directory); they go back with the exit status.
    let stats_file = job.stats.then(|| key.dir.join("stats.json"));
    if let Some(f) = &stats_file {
        cmd.arg("--stats").arg(f);
    }
    // Its counters while it runs, for heartbeats and metrics.
    let live_file = key.dir.join("live.json");
    cmd.arg("--live-stats").arg(&live_file);
    cmd.arg("--excache")
        .arg(excache_bytes.to_string())
        .arg("--")
        .args(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if job.vnode.is_none() {
        cmd.envs(program_env.iter().map(|(k, v)| (k, v)));
        if !cwd.is_empty() {
            cmd.current_dir(cwd);
        }
    }
    if let (Some(u), None) = (user, &job.vnode) {
        use std::os::unix::process::CommandExt;
        cmd.uid(u.uid).gid(u.gid);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let message = format!("cannot start {}: {e}", argv[0]);
            return send_reply(writer, id, &Reply::Error { message });
        }
    };
    let pid = child.id();
    // The vNode's network namespace, kept while it has programs here.
    let _net = net_hold;
    let _env_file = env_file;
    if let Some(p) = host.running().iter_mut().find(|p| p.pid == *listed_as) {
        p.pid = pid;
        *listed_as = pid;
    }
    host.live().insert(pid, live_file);
    struct Unlisted<'a>(&'a Host, u32);
    impl Drop for Unlisted<'_> {
        fn drop(&mut self) {
            self.0.live().remove(&self.1);
        }
    }
    let _unlisted = Unlisted(host, pid);
    send_reply(writer, id, &Reply::Launched { pid })?;
    let outputs = [
        (
            1u8,
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
        (
            2u8,
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
    ];
    let mut stdin = child.stdin.take();
    let reaped = AtomicBool::new(false);
    let status = std::thread::scope(|sc| {
        let pumps: Vec<_> = outputs
            .into_iter()
            .filter_map(|(fd, r)| r.map(|r| (fd, r)))
            .map(|(fd, mut r)| sc.spawn(move || pump_out(fd, &mut *r, writer)))
            .collect();
        // Input and signals from the client, until it leaves or the
        // program ends (then its read side is shut to end this loop).
        let reader = conn.stream().try_clone();
        let reaped = &reaped;
        sc.spawn(move || pump_in(conn, &mut stdin, pid, reaped));
        let status = child.wait();
        // Its pid may be anyone's from now on: no more signals to it.
        reaped.store(true, Ordering::SeqCst);
        for p in pumps {
            let _ = p.join();
        }
        if let Ok(r) = reader {
            let _ = r.shutdown(std::net::Shutdown::Read);
        }
        status
    });
    let stats = stats_file.and_then(|f| {
        let read = read_users_file(&f, MAX_STATS_BYTES)
            .and_then(|b| String::from_utf8(b).map_err(std::io::Error::other));
        let _ = std::fs::remove_file(&f);
        read.map_err(|e| tracing::warn!(error = %e, "no statistics from the run"))
            .ok()
    });
    let reply = match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            Reply::Exited {
                code: s.code(),
                signal: s.signal(),
                stats,
            }
        }
        Err(e) => Reply::Error {
            message: format!("waiting for the program failed: {e}"),
        },
    };
    send_reply(writer, id, &reply)
}

/// Sends what the program writes on `fd` to the client, then end of file.
fn pump_out(fd: u8, r: &mut dyn Read, writer: &Mutex<FramedConn<TcpStream>>) {
    let mut buf = vec![0u8; MAX_STDIO_BYTES];
    loop {
        let n = match r.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        let sent = writer.lock().unwrap_or_else(|p| p.into_inner()).send(
            0,
            &Message::Stdio {
                fd,
                data: &buf[..n],
            },
        );
        if n == 0 || sent.is_err() {
            return;
        }
    }
}

/// Feeds the client's input to the program and delivers its signals.
fn pump_in(
    conn: &mut FramedConn<TcpStream>,
    stdin: &mut Option<std::process::ChildStdin>,
    pid: u32,
    reaped: &AtomicBool,
) {
    while let Ok(f) = conn.recv() {
        match f.message {
            Message::Stdio { fd: 0, data: [] } => *stdin = None,
            Message::Stdio { fd: 0, data } => {
                if let Some(s) = stdin.as_mut() {
                    if s.write_all(data).is_err() {
                        *stdin = None;
                    }
                }
            }
            Message::Control { json } => {
                if let Ok(Request::Signal { signum }) = control::from_json(json) {
                    // Only those `lego run` passes on: another (SIGSTOP,
                    // say, which would freeze a vNode's file system with
                    // its root `lego vnode-host`) is dropped.
                    let passed = lego_sys::process::PASSED_SIGNALS.contains(&signum);
                    if passed && !reaped.load(Ordering::SeqCst) {
                        let _ = lego_sys::process::send_signal(pid as i32, signum);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_regular_counters_file_is_read() {
        let dir = std::env::temp_dir().join(format!("lego-live-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("live.json");
        std::fs::write(&good, r#"{"remote_misses": 7}"#).unwrap();
        assert_eq!(read_counters(&good).unwrap().remote_misses, 7);
        let link = dir.join("link.json");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        assert!(read_counters(&link).is_none(), "not through a symlink");
        let fifo = dir.join("fifo.json");
        let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        assert!(
            read_counters(&fifo).is_none(),
            "a FIFO neither blocks nor counts"
        );
        std::fs::write(dir.join("junk.json"), b"\xff not json").unwrap();
        assert!(read_counters(&dir.join("junk.json")).is_none());
        let long = format!(r#"{{"spaces": [{}]}}"#, vec!["1"; 65].join(","));
        std::fs::write(dir.join("long.json"), long).unwrap();
        assert!(
            read_counters(&dir.join("long.json")).is_none(),
            "too long a list"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
