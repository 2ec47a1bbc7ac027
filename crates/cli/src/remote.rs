//! `lego run --manager` on a cluster with processor daemons: the global
//! process manager picks the processor, which runs the program; this side
//! streams the terminal's stdin to it and its stdout and stderr back, and
//! ends with the program's exit status.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use lego_protocol::control::{self, Kind, Reply, Request, State};
use lego_protocol::{Message, Role, MAX_STDIO_BYTES};
use lego_transport::{ask_manager, FramedConn, Tcp, Transport};

use crate::run::fail;
use crate::LEGO_FAILED;

/// Whether the cluster at `manager` has an alive processor daemon.
pub fn processors_alive(manager: &str) -> Result<bool, String> {
    match ask_manager(manager, &Request::Status)? {
        Reply::Status(s) => Ok(s
            .components
            .iter()
            .any(|c| c.kind == Kind::Processor && c.state == State::Alive)),
        other => Err(format!(
            "global manager {manager}: unexpected answer {other:?}"
        )),
    }
}

/// The environment the program gets: this one, without what belongs to
/// this host's lego.
fn environment() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| !k.starts_with("LEGO_") && k != "LD_PRELOAD")
        .collect()
}

/// Runs `command` on the processor daemon the manager picks. Unless
/// `quiet`, lego's run summary (printed there) follows the program's
/// stderr; with `stats`, the run's statistics are written to that file
/// here.
pub fn run_remote(
    manager: &str,
    command: &[OsString],
    excache: u64,
    quiet: bool,
    stats: Option<&Path>,
) -> ExitCode {
    let argv: Vec<String> = command
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let place = Request::PlaceProcess {
        program: argv[0].clone(),
        excache_bytes: excache,
    };
    let addr = match ask_manager(manager, &place) {
        Ok(Reply::Processor { addr, .. }) => addr,
        Ok(other) => {
            return fail(format!(
                "global manager {manager}: unexpected answer {other:?}"
            ))
        }
        Err(e) => return fail(e),
    };
    let stream = match Tcp.connect(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return fail(format!("processor daemon {addr}: {e}")),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut conn = FramedConn::new(stream);
    if let Err(e) = conn.client_handshake(Role::Client, "lego run") {
        return fail(format!("processor daemon {addr}: {e}"));
    }
    let launch = Request::Launch {
        argv,
        cwd: std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        env: environment(),
        excache_bytes: excache,
        summary: !quiet,
        stats: stats.is_some(),
    };
    let json = control::to_json(&launch);
    let launched = match conn.call(1, &Message::Control { json: &json }) {
        Ok(f) => match f.message {
            Message::Control { json } => control::from_json::<Reply>(json),
            other => Err(format!("unexpected {}", other.name())),
        },
        Err(e) => Err(e.to_string()),
    };
    match launched {
        Ok(Reply::Launched { .. }) => {}
        Ok(Reply::Error { message }) => return fail(format!("processor daemon {addr}: {message}")),
        Ok(other) => {
            return fail(format!(
                "processor daemon {addr}: unexpected answer {other:?}"
            ))
        }
        Err(e) => return fail(format!("processor daemon {addr}: {e}")),
    }
    let _ = conn.stream().set_read_timeout(None);
    // One writer for the program's input and the signals sent to lego
    // run (Ctrl-C, kill), which go to the program: frames must not
    // interleave.
    let writer = match conn.stream().try_clone() {
        Ok(w) => std::sync::Arc::new(std::sync::Mutex::new(FramedConn::new(w))),
        Err(e) => return fail(format!("processor daemon {addr}: {e}")),
    };
    let send = move |m: &Message<'_>| {
        writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(0, m)
            .is_ok()
    };
    let signal = send.clone();
    if let Err(e) = lego_sys::process::signals_to(move |signum| {
        let json = control::to_json(&Request::Signal { signum });
        signal(&Message::Control { json: &json });
    }) {
        eprintln!("lego: signals will not reach the program: {e}");
    }
    std::thread::spawn(move || {
        let mut buf = vec![0u8; MAX_STDIO_BYTES];
        let mut stdin = std::io::stdin().lock();
        loop {
            let n = stdin.read(&mut buf).unwrap_or(0);
            if !send(&Message::Stdio {
                fd: 0,
                data: &buf[..n],
            }) || n == 0
            {
                return;
            }
        }
    });
    loop {
        let f = match conn.recv() {
            Ok(f) => f,
            Err(e) => {
                return fail(format!(
                    "processor daemon {addr}: {e} before the program ended"
                ))
            }
        };
        match f.message {
            Message::Stdio { fd: 1, data } => {
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(data);
                let _ = o.flush();
            }
            Message::Stdio { fd: 2, data } => {
                let _ = std::io::stderr().write_all(data);
            }
            Message::Control { json } => match control::from_json::<Reply>(json) {
                Ok(Reply::Exited {
                    code,
                    signal,
                    stats: json,
                }) => {
                    use std::os::unix::process::ExitStatusExt;
                    if let Some(f) = stats {
                        match json {
                            Some(j) => {
                                if let Err(e) = std::fs::write(f, j) {
                                    eprintln!("lego: cannot write {}: {e}", f.display());
                                }
                            }
                            None => eprintln!(
                                "lego: processor daemon {addr} sent no statistics for {}",
                                f.display()
                            ),
                        }
                    }
                    if !quiet {
                        eprintln!("lego: ran on processor daemon {addr}");
                    }
                    let raw = match (code, signal) {
                        (Some(c), _) => (c & 0xff) << 8,
                        (None, Some(s)) => s & 0x7f,
                        _ => LEGO_FAILED as i32 * 256,
                    };
                    lego_sys::process::exit_like(std::process::ExitStatus::from_raw(raw));
                }
                Ok(Reply::Error { message }) => {
                    return fail(format!("processor daemon {addr}: {message}"))
                }
                _ => {}
            },
            _ => {}
        }
    }
}
