//! The client of a processor daemon (`lego run --manager` on a cluster
//! with processor daemons): the global process manager picks the
//! processor, which runs the program; this side streams the terminal's
//! stdin to it, its stdout and stderr back, passes on the signals sent to
//! this process, and returns the program's exit status.

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lego_protocol::control::{self, Kind, Reply, Request, State};
use lego_protocol::{Message, Role, MAX_STDIO_BYTES};
use lego_transport::auth::Credential;
use lego_transport::{ask_manager, ConnError, FramedConn, Tcp, Transport, TransportError};

/// Why a program could not be run, or followed to its end, on a processor
/// daemon. Each names the manager or daemon at fault.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The manager was unreachable or answered an error (the message names
    /// it).
    #[error("{0}")]
    Manager(String),
    #[error("global manager {manager}: unexpected answer {answer}")]
    ManagerAnswer { manager: String, answer: String },
    #[error("processor daemon {addr}: {source}")]
    Connect {
        addr: String,
        source: TransportError,
    },
    #[error("processor daemon {addr}: {source}")]
    Conn { addr: String, source: ConnError },
    #[error("processor daemon {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    /// The daemon refused the program, could not start or wait for it, or
    /// said something malformed.
    #[error("processor daemon {addr}: {message}")]
    Processor { addr: String, message: String },
    #[error("processor daemon {addr}: unexpected answer {answer}")]
    Answer { addr: String, answer: String },
    /// The connection broke while the program ran.
    #[error("processor daemon {addr}: {source} before the program ended")]
    Lost { addr: String, source: ConnError },
}

/// Whether the cluster at `manager` has an alive processor daemon.
pub fn processors_alive(manager: &str, cred: &Credential) -> Result<bool, RemoteError> {
    match ask_manager(manager, &Request::Status, cred).map_err(RemoteError::Manager)? {
        Reply::Status(s) => Ok(s
            .components
            .iter()
            .any(|c| c.kind == Kind::Processor && c.state == State::Alive)),
        other => Err(RemoteError::ManagerAnswer {
            manager: manager.to_string(),
            answer: format!("{other:?}"),
        }),
    }
}

/// A program to run on the processor daemon the manager picks.
#[derive(Clone, Debug)]
pub struct RemoteRun {
    /// Global manager of the cluster, HOST:PORT.
    pub manager: String,
    /// The program and its arguments (found on the processor's host).
    pub argv: Vec<String>,
    /// Its ExCache there.
    pub excache_bytes: u64,
    /// lego's run summary, made there, follows the program's stderr.
    pub summary: bool,
    /// Bring the run's statistics (JSON) back.
    pub stats: bool,
    /// Who asks: the processor runs the program as the user this
    /// credential names (docs/security.md).
    pub cred: Credential,
    /// Run it in this vNode.
    pub vnode: Option<String>,
}

/// How a program on a processor daemon ended.
#[derive(Debug)]
pub struct RemoteRunEnded {
    /// The daemon it ran on.
    pub processor: String,
    /// Its exit status (lego's failure status, 125, if the daemon sent
    /// neither a code nor a signal).
    pub status: ExitStatus,
    /// The run's statistics, if asked for and sent.
    pub stats: Option<String>,
}

/// The environment the program gets: this one, without what belongs to
/// this host's lego.
fn environment() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| !k.starts_with("LEGO_") && k != "LD_PRELOAD")
        .collect()
}

impl RemoteRun {
    /// Runs the program on the processor daemon the manager picks, with
    /// this process's stdin, stdout and stderr as its own, and the signals
    /// sent to this process delivered to it; returns once it has ended.
    pub fn run(&self) -> Result<RemoteRunEnded, RemoteError> {
        let place = Request::PlaceProcess {
            program: self.argv[0].clone(),
            excache_bytes: self.excache_bytes,
        };
        let addr =
            match ask_manager(&self.manager, &place, &self.cred).map_err(RemoteError::Manager)? {
                Reply::Processor { addr, .. } => addr,
                other => {
                    return Err(RemoteError::ManagerAnswer {
                        manager: self.manager.clone(),
                        answer: format!("{other:?}"),
                    })
                }
            };
        let mut conn = self.launch(&addr)?;
        let _ = conn.stream().set_read_timeout(None);
        let io = |source| RemoteError::Io {
            addr: addr.clone(),
            source,
        };
        // One writer for the program's input and the signals sent to lego
        // run (Ctrl-C, kill), which go to the program: frames must not
        // interleave.
        let writer = Arc::new(Mutex::new(conn.try_clone().map_err(io)?));
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
            // Not fatal: the program runs, only Ctrl-C and kill miss it.
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
        relay_until_exit(&mut conn, &addr)
    }

    /// Connects to the daemon at `addr` and has it start the program.
    fn launch(&self, addr: &str) -> Result<FramedConn<std::net::TcpStream>, RemoteError> {
        let stream = Tcp
            .connect(addr, Duration::from_secs(5))
            .map_err(|source| RemoteError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut conn = FramedConn::new(stream);
        let conn_error = |source| RemoteError::Conn {
            addr: addr.to_string(),
            source,
        };
        conn.client_handshake(Role::Client, "lego run", &self.cred)
            .map_err(conn_error)?;
        let launch = Request::Launch {
            argv: self.argv.clone(),
            cwd: std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            env: environment(),
            excache_bytes: self.excache_bytes,
            summary: self.summary,
            stats: self.stats,
            vnode: self.vnode.clone(),
        };
        let json = control::to_json(&launch);
        if json.len() > lego_protocol::MAX_CONTROL_BYTES {
            return Err(RemoteError::Processor {
                addr: addr.to_string(),
                message: format!(
                    "the program's command line and environment take {} bytes; a launch carries at most {}",
                    json.len(),
                    lego_protocol::MAX_CONTROL_BYTES
                ),
            });
        }
        let f = conn
            .call(1, &Message::Control { json: &json })
            .map_err(conn_error)?;
        let launched = match f.message {
            Message::Control { json } => control::from_json::<Reply>(json),
            other => Err(format!("unexpected {}", other.name())),
        };
        match launched {
            Ok(Reply::Launched { .. }) => Ok(conn),
            Ok(Reply::Error { message }) | Err(message) => Err(RemoteError::Processor {
                addr: addr.to_string(),
                message,
            }),
            Ok(other) => Err(RemoteError::Answer {
                addr: addr.to_string(),
                answer: format!("{other:?}"),
            }),
        }
    }
}

/// Writes the program's output here until the daemon says how it ended.
fn relay_until_exit(
    conn: &mut FramedConn<std::net::TcpStream>,
    addr: &str,
) -> Result<RemoteRunEnded, RemoteError> {
    loop {
        let f = conn.recv().map_err(|source| RemoteError::Lost {
            addr: addr.to_string(),
            source,
        })?;
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
                    stats,
                }) => {
                    return Ok(RemoteRunEnded {
                        processor: addr.to_string(),
                        status: exit_status(code, signal),
                        stats,
                    });
                }
                Ok(Reply::Error { message }) => {
                    return Err(RemoteError::Processor {
                        addr: addr.to_string(),
                        message,
                    })
                }
                _ => {}
            },
            _ => {}
        }
    }
}

/// The exit status an `Exited{code, signal}` stands for: the code, else
/// death by the signal, else lego's failure status.
fn exit_status(code: Option<i32>, signal: Option<i32>) -> ExitStatus {
    let raw = match (code, signal) {
        (Some(c), _) => (c & 0xff) << 8,
        (None, Some(s)) => s & 0x7f,
        _ => lego_sys::process::FATAL_EXIT_CODE << 8,
    };
    ExitStatus::from_raw(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_status_is_the_programs_or_lego_failed() {
        assert_eq!(exit_status(Some(7), None).code(), Some(7));
        assert_eq!(exit_status(Some(0), None).code(), Some(0));
        assert_eq!(exit_status(None, Some(15)).signal(), Some(15));
        assert_eq!(exit_status(None, None).code(), Some(125));
    }
}
