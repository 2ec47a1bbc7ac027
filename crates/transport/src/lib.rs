//! How lego components reach each other: the [`Transport`] trait, its TCP
//! implementation ([`Tcp`]), and [`FramedConn`], which moves
//! [`lego_protocol`] frames over any transport stream.
//!
//! The trait is the seam where an RDMA transport plugs in later; nothing
//! above this crate names TCP.

#![deny(unsafe_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lego_protocol::{
    check_version, control, decode_body, decode_header, encode, DecodeError, Frame, Message, Role,
    HEADER_BYTES, PROTOCOL_VERSION,
};
use thiserror::Error;

/// A byte stream between two components.
pub trait Stream: Read + Write + Send + 'static {
    /// A second handle on the same stream (for a reader and a writer thread).
    fn try_clone(&self) -> io::Result<Self>
    where
        Self: Sized;
    /// Bounds how long a read waits; `None` waits forever.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Closes both directions; a blocked reader on another handle wakes up.
    fn shutdown(&self);
    /// The peer's address, for messages.
    fn peer(&self) -> String;
    /// The file descriptor, for `poll(2)`, where there is one.
    fn raw_fd(&self) -> Option<i32>;
}

/// Accepts incoming streams.
pub trait Listener: Send + 'static {
    type Stream: Stream;
    fn accept(&self) -> io::Result<Self::Stream>;
    /// The address peers should connect to.
    fn local_addr(&self) -> String;
}

/// A way to connect components.
pub trait Transport: Send + Sync + 'static {
    type Stream: Stream;
    type Listener: Listener<Stream = Self::Stream>;
    fn connect(&self, addr: &str, timeout: Duration) -> Result<Self::Stream, TransportError>;
    fn listen(&self, addr: &str) -> Result<Self::Listener, TransportError>;
}

/// Why a connection could not be made.
#[derive(Debug, Error)]
pub enum TransportError {
    #[error("'{0}' is not an address of the form HOST:PORT")]
    BadAddress(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: io::Error,
    },
}

/// TCP, with Nagle off (every frame is a request someone waits for).
#[derive(Clone, Copy, Debug, Default)]
pub struct Tcp;

fn resolve(addr: &str) -> Result<SocketAddr, TransportError> {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| TransportError::BadAddress(addr.to_string()))
}

impl Transport for Tcp {
    type Stream = TcpStream;
    type Listener = TcpListener;

    fn connect(&self, addr: &str, timeout: Duration) -> Result<TcpStream, TransportError> {
        let sa = resolve(addr)?;
        let s =
            TcpStream::connect_timeout(&sa, timeout).map_err(|source| TransportError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        s.set_nodelay(true)
            .map_err(|source| TransportError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        Ok(s)
    }

    fn listen(&self, addr: &str) -> Result<TcpListener, TransportError> {
        let sa = resolve(addr)?;
        TcpListener::bind(sa).map_err(|source| TransportError::Listen {
            addr: addr.to_string(),
            source,
        })
    }
}

impl Stream for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn shutdown(&self) {
        let _ = TcpStream::shutdown(self, Shutdown::Both);
    }
    fn peer(&self) -> String {
        self.peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "unknown peer".into())
    }
    fn raw_fd(&self) -> Option<i32> {
        use std::os::fd::AsRawFd;
        Some(self.as_raw_fd())
    }
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    fn accept(&self) -> io::Result<TcpStream> {
        let (s, _) = TcpListener::accept(self)?;
        s.set_nodelay(true)?;
        Ok(s)
    }
    fn local_addr(&self) -> String {
        TcpListener::local_addr(self)
            .map(|a| a.to_string())
            .unwrap_or_default()
    }
}

/// Why a framed exchange failed.
#[derive(Debug, Error)]
pub enum ConnError {
    #[error("{0}")]
    Connect(#[from] TransportError),
    #[error("connection closed by peer")]
    Closed,
    #[error("no answer within the timeout")]
    TimedOut,
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("handshake refused: {0}")]
    Refused(String),
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

/// A stream that carries protocol frames, with reusable buffers so the miss
/// path allocates nothing per request.
pub struct FramedConn<S: Stream> {
    stream: S,
    wbuf: Vec<u8>,
    rbuf: Vec<u8>,
    /// Bytes written and read, for statistics.
    pub bytes_out: u64,
    pub bytes_in: u64,
}

impl<S: Stream> FramedConn<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            wbuf: Vec::with_capacity(64 * 1024),
            rbuf: Vec::with_capacity(64 * 1024),
            bytes_out: 0,
            bytes_in: 0,
        }
    }

    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Encodes and sends one frame.
    pub fn send(&mut self, request_id: u64, message: &Message<'_>) -> Result<(), ConnError> {
        self.wbuf.clear();
        encode(request_id, message, &mut self.wbuf);
        self.stream.write_all(&self.wbuf)?;
        self.bytes_out += self.wbuf.len() as u64;
        Ok(())
    }

    /// Receives one frame; its borrowed data lives until the next receive.
    pub fn recv(&mut self) -> Result<Frame<'_>, ConnError> {
        let mut head = [0u8; HEADER_BYTES];
        read_exact_or_closed(&mut self.stream, &mut head)?;
        let header = decode_header(&head)?;
        self.rbuf.resize(header.body_len, 0);
        read_exact_or_closed(&mut self.stream, &mut self.rbuf)?;
        self.bytes_in += (HEADER_BYTES + header.body_len) as u64;
        Ok(decode_body(header, &self.rbuf)?)
    }

    /// Sends a request and waits for its reply.
    pub fn call(&mut self, request_id: u64, message: &Message<'_>) -> Result<Frame<'_>, ConnError> {
        self.send(request_id, message)?;
        self.recv_reply(request_id)
    }

    /// Receives the reply to `request_id` (the next frame must be it).
    pub fn recv_reply(&mut self, request_id: u64) -> Result<Frame<'_>, ConnError> {
        let f = self.recv()?;
        if f.request_id != request_id {
            return Err(ConnError::Unexpected(format!(
                "reply to request {} while waiting for {request_id}",
                f.request_id
            )));
        }
        Ok(f)
    }

    /// Client side of the handshake; returns the daemon's capacity.
    pub fn client_handshake(&mut self, role: Role, name: &str) -> Result<u64, ConnError> {
        let reply = self.call(
            0,
            &Message::Hello {
                version: PROTOCOL_VERSION,
                role,
                name,
            },
        )?;
        match reply.message {
            Message::HelloOk {
                version,
                capacity_bytes,
            } => {
                check_version(version).map_err(ConnError::Refused)?;
                Ok(capacity_bytes)
            }
            Message::Refused { reason } => Err(ConnError::Refused(reason.to_string())),
            other => Err(ConnError::Unexpected(format!("{other:?}"))),
        }
    }
}

impl<S: Stream> FramedConn<S> {
    /// Server side of the handshake: a `Hello` of this protocol version
    /// within `timeout` gets `HelloOk` with `capacity_bytes`; anything else
    /// is refused with the reason, which is also the error.
    pub fn server_handshake(
        &mut self,
        capacity_bytes: u64,
        timeout: Duration,
    ) -> Result<(), ConnError> {
        self.stream.set_read_timeout(Some(timeout))?;
        let f = self.recv()?;
        let id = f.request_id;
        let checked = match f.message {
            Message::Hello { version, .. } => check_version(version),
            other => Err(format!("expected Hello, got {}", other.name())),
        };
        if let Err(reason) = checked {
            self.send(id, &Message::Refused { reason: &reason })?;
            return Err(ConnError::Refused(reason));
        }
        self.send(
            id,
            &Message::HelloOk {
                version: PROTOCOL_VERSION,
                capacity_bytes,
            },
        )?;
        self.stream.set_read_timeout(None)?;
        Ok(())
    }
}

/// A connection to the global manager (or any control-plane peer).
pub struct ControlClient {
    conn: FramedConn<TcpStream>,
    next_id: u64,
    addr: String,
}

impl ControlClient {
    /// Connects and shakes hands; every later answer must come within
    /// `timeout`.
    pub fn connect(addr: &str, name: &str, timeout: Duration) -> Result<Self, ConnError> {
        let s = Tcp.connect(addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut conn = FramedConn::new(s);
        conn.client_handshake(Role::Client, name)?;
        Ok(Self {
            conn,
            next_id: 1,
            addr: addr.to_string(),
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends a request and waits for its reply.
    pub fn call(&mut self, req: &control::Request) -> Result<control::Reply, ConnError> {
        let id = self.next_id;
        self.next_id += 1;
        let json = control::to_json(req);
        match self
            .conn
            .call(id, &Message::Control { json: &json })?
            .message
        {
            Message::Control { json } => control::from_json(json).map_err(ConnError::Unexpected),
            Message::Error { message, .. } => Err(ConnError::Unexpected(message.to_string())),
            other => Err(ConnError::Unexpected(format!(
                "{} in answer to a control request",
                other.name()
            ))),
        }
    }
}

/// One control request on a fresh connection.
pub fn control_call(
    addr: &str,
    req: &control::Request,
    timeout: Duration,
) -> Result<control::Reply, ConnError> {
    ControlClient::connect(addr, "lego", timeout)?.call(req)
}

/// Accepts connections on `listener`, on a thread `{name}-accept`, until
/// `stop` is set; serves each on a thread `{name}-conn` of its own. Accept
/// errors (a full descriptor table) are logged and retried; they never end
/// the loop.
pub fn serve_connections<L: Listener>(
    listener: L,
    name: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    serve: impl Fn(L::Stream) + Clone + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let conn_name = format!("{name}-conn");
    std::thread::Builder::new()
        .name(format!("{name}-accept"))
        .spawn(move || accept_loop(listener, &conn_name, &stop, serve))
        .expect("spawn accept thread")
}

fn accept_loop<L: Listener>(
    listener: L,
    name: &str,
    stop: &std::sync::atomic::AtomicBool,
    serve: impl Fn(L::Stream) + Clone + Send + 'static,
) {
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let serve = serve.clone();
        let spawned = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || serve(stream));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a connection thread");
        }
    }
}

/// One request to the global manager at `addr`; its `Error` replies and
/// connection failures become one message naming the manager.
pub fn ask_manager(addr: &str, req: &control::Request) -> Result<control::Reply, String> {
    match control_call(addr, req, Duration::from_secs(5)) {
        Ok(control::Reply::Error { message }) => Err(format!("global manager {addr}: {message}")),
        Ok(reply) => Ok(reply),
        Err(e) => Err(format!("global manager {addr}: {e}")),
    }
}

/// How long a component waits for the global manager's answer.
const MANAGER_TIMEOUT: Duration = Duration::from_secs(3);

/// A component's membership in the cluster of a global manager.
pub struct Member {
    manager: String,
    kind: control::Kind,
    addr: String,
    capacity_bytes: u64,
    id: u64,
    heartbeat: Duration,
}

impl Member {
    /// Registers with the manager at `manager` as a `kind` component that
    /// peers reach at `addr`. An unreachable manager or a refusal is an
    /// error: a component should not start outside the cluster it was told
    /// to join.
    pub fn join(
        manager: &str,
        kind: control::Kind,
        addr: &str,
        capacity_bytes: u64,
    ) -> Result<Self, String> {
        let mut m = Self {
            manager: manager.to_string(),
            kind,
            addr: addr.to_string(),
            capacity_bytes,
            id: 0,
            heartbeat: Duration::from_secs(1),
        };
        let mut c = ControlClient::connect(manager, "lego", MANAGER_TIMEOUT)
            .map_err(|e| format!("global manager {manager}: {e}"))?;
        m.register(&mut c)
            .map_err(|e| format!("global manager {manager}: {e}"))?;
        Ok(m)
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    fn register(&mut self, c: &mut ControlClient) -> Result<(), String> {
        let req = control::Request::Register {
            kind: self.kind,
            addr: self.addr.clone(),
            capacity_bytes: self.capacity_bytes,
            id: (self.id != 0).then_some(self.id),
        };
        match c.call(&req).map_err(|e| e.to_string())? {
            control::Reply::Registered { id, heartbeat_ms } => {
                self.id = id;
                self.heartbeat = Duration::from_millis(heartbeat_ms.max(10));
                Ok(())
            }
            control::Reply::Error { message } => Err(format!("registration refused: {message}")),
            other => Err(format!("unexpected answer to a registration: {other:?}")),
        }
    }

    /// Heartbeats on a background thread until `stop` is set or
    /// [`Membership::leave`] is called; `beat` builds each heartbeat (its
    /// id is filled in here). After a lost connection or a manager that no
    /// longer knows this component (restarted without its state), it
    /// registers again with the same id. When the manager answers that the
    /// component has left (drained), it sets `stop` and ends.
    pub fn keep_alive(
        mut self,
        stop: Arc<AtomicBool>,
        mut beat: impl FnMut() -> control::Request + Send + 'static,
    ) -> Membership {
        let (wake_tx, wake) = std::sync::mpsc::channel::<()>();
        let drained = Arc::new(AtomicBool::new(false));
        let (thread_stop, thread_drained) = (stop.clone(), drained.clone());
        let spawned = std::thread::Builder::new()
            .name("lego-heartbeat".into())
            .spawn(move || {
                let mut conn: Option<ControlClient> = None;
                let mut lost = false;
                while !thread_stop.load(Ordering::SeqCst) {
                    if conn.is_none() {
                        match ControlClient::connect(&self.manager, "lego", MANAGER_TIMEOUT)
                            .map_err(|e| e.to_string())
                            .and_then(|mut c| self.register(&mut c).map(|()| c))
                        {
                            Ok(c) => {
                                if lost {
                                    tracing::info!(manager = %self.manager, id = self.id, "registered again with the global manager");
                                }
                                lost = false;
                                conn = Some(c);
                            }
                            Err(e) => {
                                if !lost {
                                    tracing::warn!(manager = %self.manager, error = %e, "global manager unreachable; retrying");
                                }
                                lost = true;
                            }
                        }
                    }
                    if let Some(c) = conn.as_mut() {
                        let mut req = beat();
                        if let control::Request::Heartbeat { id, .. } = &mut req {
                            *id = self.id;
                        }
                        match c.call(&req) {
                            Ok(control::Reply::Ok) => {}
                            Ok(control::Reply::Left) => {
                                tracing::info!(id = self.id, "drained: left the cluster");
                                thread_drained.store(true, Ordering::SeqCst);
                                thread_stop.store(true, Ordering::SeqCst);
                                return;
                            }
                            Ok(other) => {
                                tracing::warn!(reply = ?other, "heartbeat refused; registering again");
                                conn = None;
                                continue;
                            }
                            Err(e) => {
                                tracing::warn!(manager = %self.manager, error = %e, "lost the global manager; retrying");
                                lost = true;
                                conn = None;
                            }
                        }
                    }
                    // Sleeps a period, or less if told to leave.
                    let _ = wake.recv_timeout(self.heartbeat);
                }
                // Stopped: say so, from this thread, so no heartbeat or
                // registration can follow the leave.
                let leave = control::Request::Leave { id: self.id };
                // On the heartbeat connection, or a new one if that broke.
                let said = match conn.as_mut().and_then(|c| c.call(&leave).ok()) {
                    Some(reply) => Ok(reply),
                    None => control_call(&self.manager, &leave, MANAGER_TIMEOUT)
                        .map_err(|e| e.to_string()),
                };
                match said {
                    Ok(control::Reply::Ok) => {
                        tracing::info!(id = self.id, "left the cluster")
                    }
                    Ok(other) => {
                        tracing::warn!(reply = ?other, "the global manager refused the leave")
                    }
                    Err(e) => tracing::warn!(manager = %self.manager, error = %e,
                        "cannot tell the global manager this component leaves; it will mark it failed"),
                }
            });
        let thread = match spawned {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the heartbeat thread");
                None
            }
        };
        Membership {
            stop,
            drained,
            wake: wake_tx,
            thread,
        }
    }
}

/// A component heartbeating to its manager ([`Member::keep_alive`]).
pub struct Membership {
    stop: Arc<AtomicBool>,
    drained: Arc<AtomicBool>,
    wake: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Membership {
    /// Whether the manager said this component was drained and has left.
    pub fn drained(&self) -> bool {
        self.drained.load(Ordering::SeqCst)
    }

    /// Stops heartbeating and tells the manager this component leaves
    /// (unless it already left, drained); returns once that is said or
    /// could not be.
    pub fn leave(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_exact_or_closed<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), ConnError> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => return Err(ConnError::Closed),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ConnError::TimedOut)
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(ConnError::Closed),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lego_protocol::VirtAddr;

    #[test]
    fn frames_cross_a_tcp_connection() {
        let l = Tcp.listen("127.0.0.1:0").unwrap();
        let addr = Listener::local_addr(&l);
        let t = std::thread::spawn(move || {
            let s = Listener::accept(&l).unwrap();
            let mut c = FramedConn::new(s);
            let f = c.recv().unwrap();
            assert_eq!(f.request_id, 9);
            assert_eq!(f.message, Message::Mmap { len: 4096 });
            c.send(
                9,
                &Message::Mapped {
                    addr: VirtAddr(1 << 20),
                },
            )
            .unwrap();
        });
        let s = Tcp.connect(&addr, Duration::from_secs(2)).unwrap();
        let mut c = FramedConn::new(s);
        let r = c.call(9, &Message::Mmap { len: 4096 }).unwrap();
        assert_eq!(
            r.message,
            Message::Mapped {
                addr: VirtAddr(1 << 20)
            }
        );
        t.join().unwrap();
    }

    #[test]
    fn bad_address_is_named() {
        let e = Tcp
            .connect("not-an-address", Duration::from_secs(1))
            .unwrap_err();
        assert!(e.to_string().contains("not-an-address"), "{e}");
    }

    #[test]
    fn closed_peer_is_reported_as_closed() {
        let l = Tcp.listen("127.0.0.1:0").unwrap();
        let addr = Listener::local_addr(&l);
        let t = std::thread::spawn(move || drop(Listener::accept(&l).unwrap()));
        let mut c = FramedConn::new(Tcp.connect(&addr, Duration::from_secs(2)).unwrap());
        t.join().unwrap();
        assert!(matches!(c.recv(), Err(ConnError::Closed)));
    }
}
