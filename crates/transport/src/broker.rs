//! Connections made for a process that lives in a network namespace of
//! its own (a vNode's program): it cannot reach the cluster from there, so
//! every connection lego makes for it (the runtime's to memory daemons and
//! the manager, the vNode file system's to its storage daemon) is made by
//! a broker thread that stayed in the host's network namespace and handed
//! over as a file descriptor on a Unix socket (`SCM_RIGHTS`).
//!
//! The broker connects only where its `allow` says (the cluster's
//! components): the program's own traffic stays in its namespace.
//!
//! A process uses a broker when [`BROKER_ENV`] names its socket, or after
//! [`use_broker`].

use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The variable naming the broker's socket.
pub const BROKER_ENV: &str = "LEGO_CONNECT_VIA";

/// Longest request line (an address and a timeout).
const MAX_REQUEST: usize = 512;

/// Most requests served at once (each on a thread); more are refused.
const MAX_AT_ONCE: usize = 64;

static BROKER: OnceLock<Option<PathBuf>> = OnceLock::new();

/// This process makes its connections through the broker at `socket`
/// (before its first connection).
pub fn use_broker(socket: &Path) {
    let _ = BROKER.set(Some(socket.to_path_buf()));
}

/// The broker this process uses, if any.
pub fn broker() -> Option<&'static Path> {
    BROKER
        .get_or_init(|| std::env::var_os(BROKER_ENV).map(PathBuf::from))
        .as_deref()
}

/// A TCP connection to `addr`, made by the broker at `socket`.
pub fn connect_via(socket: &Path, addr: &str, timeout: Duration) -> io::Result<TcpStream> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| io::Error::new(e.kind(), format!("the connection broker: {e}")))?;
    s.set_read_timeout(Some(timeout + Duration::from_secs(1)))?;
    writeln!(s, "{addr} {}", timeout.as_millis())?;
    let mut status = [0u8; 256];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        &s,
        &mut [IoSliceMut::new(&mut status)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let fd = control.drain().find_map(|m| match m {
        RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
        _ => None,
    });
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::other("the connection broker sent too much"));
    }
    match (status.first(), fd) {
        (Some(b'+'), Some(fd)) => Ok(TcpStream::from(fd)),
        _ => {
            let why = String::from_utf8_lossy(&status[..msg.bytes.min(status.len())]);
            let why = why.trim_start_matches('-').trim();
            Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                if why.is_empty() {
                    "the connection broker did not answer".to_string()
                } else {
                    why.to_string()
                },
            ))
        }
    }
}

/// Serves connection requests on `listener` until it fails, each on a
/// thread started from the calling thread (whose network namespace they
/// share). `allow` says which addresses may be reached.
pub fn serve(listener: UnixListener, allow: Arc<dyn Fn(&str) -> bool + Send + Sync>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let busy = Arc::new(AtomicUsize::new(0));
    for s in listener.incoming() {
        let s = match s {
            Ok(s) => s,
            Err(_) => {
                // Out of descriptors, say: not a busy loop.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if busy.fetch_add(1, Ordering::SeqCst) >= MAX_AT_ONCE {
            busy.fetch_sub(1, Ordering::SeqCst);
            refuse(&s, "the connection broker is busy; try again");
            continue;
        }
        let (allow, done) = (allow.clone(), busy.clone());
        let spawned = std::thread::Builder::new()
            .name("lego-broker".into())
            .spawn(move || {
                answer(s, &*allow);
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            busy.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(error = %e, "the connection broker cannot start a thread");
        }
    }
}

fn answer(s: UnixStream, allow: &dyn Fn(&str) -> bool) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let mut r = BufReader::new(io::Read::take(&s, MAX_REQUEST as u64));
    if r.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (Some(addr), Some(ms)) = (parts.next(), parts.next()) else {
        return refuse(&s, "a request is: HOST:PORT TIMEOUT_MS");
    };
    let Ok(ms) = ms.parse::<u64>() else {
        return refuse(&s, "a request is: HOST:PORT TIMEOUT_MS");
    };
    if !allow(addr) {
        return refuse(&s, &format!("{addr} is not a component of this cluster"));
    }
    let timeout = Duration::from_millis(ms.clamp(1, 60_000));
    match crate::resolve(addr).map_err(|e| io::Error::other(e.to_string())) {
        Ok(sa) => match TcpStream::connect_timeout(&sa, timeout) {
            Ok(t) => {
                let fds = [t.as_fd()];
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                control.push(SendAncillaryMessage::ScmRights(&fds));
                let _ = rustix::net::sendmsg(
                    &s,
                    &[IoSlice::new(b"+")],
                    &mut control,
                    SendFlags::NOSIGNAL,
                );
            }
            Err(e) => refuse(&s, &format!("cannot connect to {addr}: {e}")),
        },
        Err(e) => refuse(&s, &e.to_string()),
    }
}

fn refuse(mut s: &UnixStream, why: &str) {
    let mut msg = format!("-{why}");
    let mut end = msg.len().min(255);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    msg.truncate(end);
    let _ = s.write_all(msg.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_handed_over_and_others_are_refused() {
        let dir = std::env::temp_dir().join(format!("lego-broker-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("connect.sock");
        let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = target.local_addr().unwrap().to_string();
        let allowed = addr.clone();
        let listener = UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || serve(listener, Arc::new(move |a: &str| a == allowed)));
        let mut c = connect_via(&sock, &addr, Duration::from_secs(2)).unwrap();
        let (mut server, _) = target.accept().unwrap();
        c.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        io::Read::read_exact(&mut server, &mut got).unwrap();
        assert_eq!(&got, b"ping");
        let e = connect_via(&sock, "127.0.0.1:1", Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("not a component"), "{e}");
        // A malformed request gets a refusal, not a hang.
        let mut raw = UnixStream::connect(&sock).unwrap();
        raw.write_all(b"nonsense\n").unwrap();
        let mut answer = String::new();
        io::Read::read_to_string(&mut raw, &mut answer).unwrap();
        assert!(answer.starts_with("-a request is"), "{answer}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
