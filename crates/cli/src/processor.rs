//! `lego processor`: the processor daemon (LegoOS's processor component
//! manager). It joins the cluster with the host's ExCache budget, runs the
//! programs the global process manager places on it (`lego run --manager`
//! on any host), each as `lego run --manager` here with its share of the
//! budget, streams their stdin, stdout and stderr to and from the client,
//! delivers the client's signals, reports the exit status, and tells the
//! manager what it runs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lego_protocol::control::{self, Kind, ProcessInfo, Reply, Request};
use lego_protocol::{Message, MAX_STDIO_BYTES};
use lego_transport::{ConnError, FramedConn, Listener, Member, Stream, Tcp, Transport};

use crate::fail;
use crate::size::{human, parse_size};

#[derive(clap::Args)]
pub struct ProcessorArgs {
    /// Address to listen on for programs to run, HOST:PORT.
    #[arg(long, value_name = "ADDR", env = "LEGO_LISTEN")]
    listen: String,
    /// Global manager of the cluster, HOST:PORT.
    #[arg(long, value_name = "ADDR", env = "LEGO_MANAGER")]
    manager: String,
    /// This host's ExCache budget, shared by the programs it runs, e.g. 1G.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, env = "LEGO_PROCESSOR_EXCACHE")]
    excache: u64,
    /// Address clients reach this daemon at, if not the listening address.
    #[arg(long, value_name = "ADDR", env = "LEGO_ADVERTISE")]
    advertise: Option<String>,
}

/// Placeholder ids for programs not started yet, above any pid.
fn next_slot() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1 << 30);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

struct Host {
    manager: String,
    budget: u64,
    running: Mutex<Vec<ProcessInfo>>,
}

pub fn processor(args: ProcessorArgs) -> ExitCode {
    let listener = match Tcp.listen(&args.listen) {
        Ok(l) => l,
        Err(e) => return fail("lego processor", e),
    };
    let addr = args
        .advertise
        .clone()
        .unwrap_or_else(|| Listener::local_addr(&listener));
    let host = Arc::new(Host {
        manager: args.manager.clone(),
        budget: args.excache,
        running: Mutex::new(Vec::new()),
    });
    let member = match Member::join(&args.manager, Kind::Processor, &addr, args.excache) {
        Ok(m) => m,
        Err(e) => return fail("lego processor", e),
    };
    let stop = Arc::new(AtomicBool::new(false));
    if let Err(e) = crate::stop_on_signals(stop.clone()) {
        return fail("lego processor", e);
    }
    let membership = {
        let host = host.clone();
        member.keep_alive(stop.clone(), move || {
            let running = host
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            Request::Heartbeat {
                id: 0,
                used_bytes: running.iter().map(|p| p.excache_bytes).sum(),
                load: running.len() as u32,
                spaces: vec![],
                processes: running,
            }
        })
    };
    eprintln!(
        "lego processor: serving on {} with {} of ExCache",
        Listener::local_addr(&listener),
        human(args.excache)
    );
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
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    end_programs(&host);
    membership.leave();
    eprintln!("lego processor: stopped; left the cluster");
    ExitCode::SUCCESS
}

/// How long the programs of a stopped processor daemon get to end after
/// SIGTERM before they are killed.
const END_GRACE: Duration = Duration::from_secs(5);

/// Ends the programs this daemon runs: SIGTERM, then SIGKILL after
/// [`END_GRACE`]; their clients get their exit status meanwhile.
fn end_programs(host: &Host) {
    let pids = || -> Vec<i32> {
        let running = host.running.lock().unwrap_or_else(|p| p.into_inner());
        // Placeholder ids (programs not started yet) are not pids.
        running
            .iter()
            .filter(|p| p.pid < 1 << 30)
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
    let deadline = std::time::Instant::now() + END_GRACE;
    while std::time::Instant::now() < deadline {
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
    let json = control::to_json(r);
    w.lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(id, &Message::Control { json: &json })
}

fn serve(stream: TcpStream, host: &Host) -> Result<(), ConnError> {
    let mut conn = FramedConn::new(stream.try_clone()?);
    conn.server_handshake(host.budget, Duration::from_secs(10))?;
    let writer = Mutex::new(FramedConn::new(stream));
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
        }) if !argv.is_empty() => (
            Job {
                argv,
                cwd,
                env,
                summary,
                stats,
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
        let mut running = host.running.lock().unwrap_or_else(|p| p.into_inner());
        let used: u64 = running.iter().map(|p| p.excache_bytes).sum();
        if used + excache_bytes > host.budget {
            let message = format!(
                "this processor has {} of ExCache free, the program asks for {}",
                human(host.budget.saturating_sub(used)),
                human(excache_bytes)
            );
            drop(running);
            return send_reply(&writer, id, &Reply::Error { message });
        }
        // Listed under a placeholder id until the program's pid is known.
        running.push(ProcessInfo {
            pid: slot,
            program: job.argv.join(" "),
            excache_bytes,
        });
    }
    let mut listed_as = slot;
    let result = run_program(&mut conn, &writer, id, host, &job, &mut listed_as);
    let mut running = host.running.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(k) = running.iter().position(|p| p.pid == listed_as) {
        running.remove(k);
    }
    result
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
}

/// The most statistics JSON sent back (it is a few KiB).
const MAX_STATS_BYTES: u64 = 256 << 10;

fn run_program(
    conn: &mut FramedConn<TcpStream>,
    writer: &Mutex<FramedConn<TcpStream>>,
    id: u64,
    host: &Host,
    job: &Job,
    listed_as: &mut u32,
) -> Result<(), ConnError> {
    let Job { argv, cwd, env, .. } = job;
    let excache_bytes = {
        let running = host.running.lock().unwrap_or_else(|p| p.into_inner());
        running
            .iter()
            .find(|p| p.pid == *listed_as)
            .map_or(0, |p| p.excache_bytes)
    };
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["run", "--manager", &host.manager, "--local"]);
    if !job.summary {
        cmd.arg("--quiet");
    }
    // The wrapper writes the statistics here; they go back with the exit
    // status.
    let stats_file = job.stats.then(|| {
        std::env::temp_dir().join(format!(
            "lego-processor-{}-{}.json",
            std::process::id(),
            *listed_as
        ))
    });
    if let Some(f) = &stats_file {
        cmd.arg("--stats").arg(f);
    }
    cmd.arg("--excache")
        .arg(excache_bytes.to_string())
        .arg("--")
        .args(argv)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !cwd.is_empty() {
        cmd.current_dir(cwd);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let message = format!("cannot start {}: {e}", argv[0]);
            return send_reply(writer, id, &Reply::Error { message });
        }
    };
    let pid = child.id();
    {
        let mut running = host.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = running.iter_mut().find(|p| p.pid == *listed_as) {
            p.pid = pid;
            *listed_as = pid;
        }
    }
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
    let status = std::thread::scope(|sc| {
        let pumps: Vec<_> = outputs
            .into_iter()
            .filter_map(|(fd, r)| r.map(|r| (fd, r)))
            .map(|(fd, mut r)| sc.spawn(move || pump_out(fd, &mut *r, writer)))
            .collect();
        // Input and signals from the client, until it leaves or the
        // program ends (then its read side is shut to end this loop).
        let reader = conn.stream().try_clone();
        sc.spawn(|| pump_in(conn, &mut stdin, pid));
        let status = child.wait();
        for p in pumps {
            let _ = p.join();
        }
        if let Ok(r) = reader {
            let _ = r.shutdown(std::net::Shutdown::Read);
        }
        status
    });
    let stats = stats_file.and_then(|f| {
        let read = std::fs::File::open(&f).and_then(|file| {
            let mut text = String::new();
            file.take(MAX_STATS_BYTES).read_to_string(&mut text)?;
            Ok(text)
        });
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
                    let _ = lego_sys::process::send_signal(pid as i32, signum);
                }
            }
            _ => {}
        }
    }
}
