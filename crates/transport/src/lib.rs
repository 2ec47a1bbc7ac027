//! How lego components reach each other: the [`Transport`] trait, its TCP
//! implementation ([`Tcp`]), and [`FramedConn`], which moves
//! [`lego_protocol`] frames over any transport stream.
//!
//! The trait is the seam where an RDMA transport plugs in later; nothing
//! above this crate names TCP.

#![deny(unsafe_code)]

pub mod auth;
pub mod broker;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use auth::{Credential, Identity, Sealer};
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
    /// Closes the sending direction only (the peer reads end of file).
    fn shutdown_write(&self);
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
        let connected = match broker::broker() {
            Some(socket) => broker::connect_via(socket, addr, timeout),
            None => TcpStream::connect_timeout(&resolve(addr)?, timeout),
        };
        let s = connected.map_err(|source| TransportError::Connect {
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
    fn shutdown_write(&self) {
        let _ = TcpStream::shutdown(self, Shutdown::Write);
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
    #[error("a frame failed authentication (altered, replayed or not from the peer)")]
    Forged,
    #[error("unexpected reply: {0}")]
    Unexpected(String),
    /// Every manager asked stands by: why each does.
    #[error("no manager leads now ({0})")]
    NoLeader(String),
    /// The manager could not act within the timeout (its store did not
    /// answer); nothing was done.
    #[error("{0}")]
    Unavailable(String),
}

/// Largest frame body read before the handshake sealed the connection
/// (a `Hello` with its program path, an `Auth`, a `Refused`).
const MAX_CLEAR_BODY: usize = 16 << 10;
/// How long the rest of a frame may take once its first bytes arrived.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes read at a time into a frame's buffer: it grows as bytes arrive,
/// never ahead of them by more than this.
const READ_CHUNK: usize = 64 << 10;

/// A stream that carries protocol frames, with reusable buffers so the miss
/// path allocates nothing per request. After the handshake every frame is
/// sealed ([`auth`]).
pub struct FramedConn<S: Stream> {
    stream: S,
    wbuf: Vec<u8>,
    rbuf: Vec<u8>,
    /// A sealed record on its way out, and one coming in.
    sbuf: Vec<u8>,
    record: Vec<u8>,
    sealer: Option<Sealer>,
    /// Set by [`FramedConn::be_patient`]: a read timeout before a frame's
    /// first byte is retried, for up to this long (`Some(None)`: forever).
    patience: Option<Option<Duration>>,
    /// Set by [`FramedConn::server_handshake`]: the frames in the clear
    /// must have come by then, however slowly their bytes trickle in.
    clear_deadline: Option<std::time::Instant>,
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
            sbuf: Vec::new(),
            record: Vec::new(),
            sealer: None,
            patience: None,
            clear_deadline: None,
            bytes_out: 0,
            bytes_in: 0,
        }
    }

    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// A second handle on the same connection, with its keys: one handle
    /// then only sends and the other only receives.
    pub fn try_clone(&self) -> io::Result<Self> {
        let mut c = Self::new(self.stream.try_clone()?);
        c.sealer = self.sealer.clone();
        c.patience = self.patience;
        Ok(c)
    }

    /// A daemon's side of a connection: once a frame has begun, the rest
    /// must come within [`FRAME_TIMEOUT`]; a frame may take up to `idle`
    /// to begin (`None`: forever, a program may not miss for hours). Costs
    /// nothing per frame: the stream's timeout stays [`FRAME_TIMEOUT`] and
    /// a timeout before a frame's first byte is retried.
    pub fn be_patient(&mut self, idle: Option<Duration>) -> io::Result<()> {
        self.be_patient_within(FRAME_TIMEOUT, idle)
    }

    /// [`FramedConn::be_patient`] with a frame timeout of `frame`.
    fn be_patient_within(&mut self, frame: Duration, idle: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(Some(frame))?;
        self.patience = Some(idle);
        Ok(())
    }

    /// Encodes and sends one frame.
    pub fn send(&mut self, request_id: u64, message: &Message<'_>) -> Result<(), ConnError> {
        self.wbuf.clear();
        encode(request_id, message, &mut self.wbuf);
        let Some(sealer) = self.sealer.as_mut() else {
            self.stream.write_all(&self.wbuf)?;
            self.bytes_out += self.wbuf.len() as u64;
            return Ok(());
        };
        // A record at a time: the sealed copy takes one record's room, not
        // a whole frame's (2 MiB for a batch of pages, per connection, in
        // the program's own memory).
        for chunk in self.wbuf.chunks(auth::RECORD_PLAIN) {
            self.sbuf.clear();
            sealer.seal(chunk, &mut self.sbuf);
            self.stream.write_all(&self.sbuf)?;
            self.bytes_out += self.sbuf.len() as u64;
        }
        Ok(())
    }

    /// Receives one frame; its borrowed data lives until the next receive.
    /// Its buffer grows only as its bytes arrive.
    pub fn recv(&mut self) -> Result<Frame<'_>, ConnError> {
        self.rbuf.clear();
        let header = if self.sealer.is_some() {
            self.recv_sealed()?
        } else {
            self.recv_plain()?
        };
        Ok(decode_body(header, &self.rbuf[HEADER_BYTES..])?)
    }

    /// The frame [`FramedConn::recv`] received last, decoded again from
    /// its buffer (no copy), if there is one.
    pub fn last_frame(&self) -> Option<Frame<'_>> {
        let head: &[u8; HEADER_BYTES] = self.rbuf.get(..HEADER_BYTES)?.try_into().ok()?;
        let header = decode_header(head).ok()?;
        decode_body(header, &self.rbuf[HEADER_BYTES..]).ok()
    }

    /// Reads the first bytes of a frame (all of `buf`), waiting for the
    /// first as [`FramedConn::be_patient`] says; once one has come, a
    /// timeout is an error.
    fn read_start(&mut self, buf: &mut [u8]) -> Result<(), ConnError> {
        let start = std::time::Instant::now();
        loop {
            match self.stream.read(buf).map_err(read_failure) {
                Ok(0) => return Err(ConnError::Closed),
                Ok(n) => return read_exact_or_closed(&mut self.stream, &mut buf[n..]),
                Err(None) => {}
                Err(Some(ConnError::TimedOut))
                    if self
                        .patience
                        .is_some_and(|idle| idle.is_none_or(|d| start.elapsed() < d)) => {}
                Err(Some(e)) => return Err(e),
            }
        }
    }

    /// A frame in the clear into `rbuf` (handshake only).
    fn recv_plain(&mut self) -> Result<lego_protocol::Header, ConnError> {
        self.rbuf.resize(HEADER_BYTES, 0);
        let mut head = [0u8; HEADER_BYTES];
        match self.clear_deadline {
            Some(d) => read_exact_by(&mut self.stream, &mut head, Some(d))?,
            None => self.read_start(&mut head)?,
        }
        self.rbuf.copy_from_slice(&head);
        let header = decode_header(self.rbuf[..].try_into().expect("header"))?;
        // Only the handshake travels in the clear, and its frames are
        // small: nothing large is read from a peer not yet authenticated.
        if header.body_len > MAX_CLEAR_BODY {
            return Err(ConnError::Decode(DecodeError::TooLarge(header.body_len)));
        }
        let total = HEADER_BYTES + header.body_len;
        while self.rbuf.len() < total {
            let at = self.rbuf.len();
            self.rbuf.resize(total.min(at + READ_CHUNK), 0);
            read_exact_by(&mut self.stream, &mut self.rbuf[at..], self.clear_deadline)?;
        }
        self.bytes_in += total as u64;
        Ok(header)
    }

    /// A sealed frame, record by record, into `rbuf`.
    fn recv_sealed(&mut self) -> Result<lego_protocol::Header, ConnError> {
        let mut header = None;
        let mut first = true;
        loop {
            let mut len = [0u8; 2];
            if first {
                self.read_start(&mut len)?;
                first = false;
            } else {
                read_exact_or_closed(&mut self.stream, &mut len)?;
            }
            let len = u16::from_le_bytes(len) as usize;
            self.record.resize(len, 0);
            read_exact_or_closed(&mut self.stream, &mut self.record)?;
            self.bytes_in += 2 + len as u64;
            let sealer = self.sealer.as_mut().expect("sealed");
            sealer
                .open(&self.record, &mut self.rbuf)
                .map_err(|_| ConnError::Forged)?;
            if header.is_none() && self.rbuf.len() >= HEADER_BYTES {
                header = Some(decode_header(
                    self.rbuf[..HEADER_BYTES].try_into().expect("header"),
                )?);
            }
            if let Some(h) = header {
                let total = HEADER_BYTES + h.body_len;
                if self.rbuf.len() == total {
                    return Ok(h);
                }
                if self.rbuf.len() > total {
                    return Err(ConnError::Decode(DecodeError::Trailing(
                        self.rbuf.len() - total,
                    )));
                }
            }
        }
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

    /// Client side of the handshake ([`auth`]): proves `cred` and checks
    /// the daemon holds the cluster's credential; returns the daemon's
    /// capacity.
    pub fn client_handshake(
        &mut self,
        role: Role,
        name: &str,
        cred: &Credential,
    ) -> Result<u64, ConnError> {
        let identity = cred.identity().to_string();
        let mut hs = auth::Initiator::new(cred, PROTOCOL_VERSION, role as u8, name);
        let first = hs.first();
        // Both at once: one round trip.
        self.wbuf.clear();
        encode(
            0,
            &Message::Hello {
                version: PROTOCOL_VERSION,
                role,
                name,
            },
            &mut self.wbuf,
        );
        encode(
            0,
            &Message::Auth {
                identity: &identity,
                noise: &first,
            },
            &mut self.wbuf,
        );
        self.stream.write_all(&self.wbuf)?;
        self.bytes_out += self.wbuf.len() as u64;
        let answer = match self.recv() {
            Ok(f) => match f.message {
                Message::AuthOk { noise } => noise.to_vec(),
                Message::Refused { reason } => return Err(ConnError::Refused(reason.to_string())),
                other => return Err(ConnError::Unexpected(other.describe())),
            },
            Err(ConnError::Closed) => {
                return Err(ConnError::Refused(
                    "the peer closed the connection during the handshake (another lego version, or not a lego daemon)".into(),
                ))
            }
            Err(e) => return Err(e),
        };
        let sealer = hs.finish(&answer).map_err(|_| {
            ConnError::Refused("the daemon did not prove it holds this cluster's credential".into())
        })?;
        self.sealer = Some(sealer);
        match self.recv()?.message {
            Message::HelloOk {
                version,
                capacity_bytes,
            } => {
                check_version(version).map_err(ConnError::Refused)?;
                Ok(capacity_bytes)
            }
            Message::Refused { reason } => Err(ConnError::Refused(reason.to_string())),
            other => Err(ConnError::Unexpected(other.describe())),
        }
    }
}

/// Who is at the other end of a connection, proven by the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub identity: Identity,
    pub role: Role,
    /// What the peer calls itself (a program's name), for messages only.
    pub name: String,
}

impl<S: Stream> FramedConn<S> {
    /// Server side of the handshake ([`auth`]): a `Hello` of this protocol
    /// version and an `Auth` proving an identity `cred` (the cluster
    /// credential) vouches for, within `timeout`, get `HelloOk` with
    /// `capacity_bytes` on the sealed channel; anything else is refused
    /// with the reason, which is also the error. Afterwards the connection
    /// is patient ([`FramedConn::be_patient`], no idle limit).
    pub fn server_handshake(
        &mut self,
        capacity_bytes: u64,
        timeout: Duration,
        cred: &Credential,
    ) -> Result<Peer, ConnError> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.clear_deadline = Some(std::time::Instant::now() + timeout);
        let (version, role, name) = match self.recv()?.message {
            Message::Hello {
                version,
                role,
                name,
            } => (version, role, name.to_string()),
            other => {
                let reason = format!("expected Hello, got {}", other.name());
                return Err(self.refuse(reason));
            }
        };
        if let Err(reason) = check_version(version) {
            return Err(self.refuse(reason));
        }
        let (identity, answer, sealer) = match self.recv()?.message {
            Message::Auth { identity, noise } => {
                let claimed = match Identity::parse(identity) {
                    Ok(i) => i,
                    Err(e) => return Err(self.refuse(format!("authentication failed: {e}"))),
                };
                match auth::respond(cred, version, role as u8, &name, &claimed, noise) {
                    Ok((answer, sealer)) => (claimed, answer, sealer),
                    Err(_) => {
                        let reason = format!(
                            "authentication failed: not a valid credential for {claimed} in this cluster"
                        );
                        return Err(self.refuse(reason));
                    }
                }
            }
            other => {
                let reason = format!(
                    "expected Auth, got {} (this daemon needs a credential: --key FILE or LEGO_KEY)",
                    other.name()
                );
                return Err(self.refuse(reason));
            }
        };
        self.clear_deadline = None;
        self.send(0, &Message::AuthOk { noise: &answer })?;
        self.sealer = Some(sealer);
        self.send(
            0,
            &Message::HelloOk {
                version: PROTOCOL_VERSION,
                capacity_bytes,
            },
        )?;
        self.be_patient(None)?;
        Ok(Peer {
            identity,
            role,
            name,
        })
    }

    /// Refuses the handshake with `reason` (in the clear: nothing is
    /// sealed yet), and reads what the peer already sent, briefly, so the
    /// close does not reset the connection before it reads the reason.
    fn refuse(&mut self, reason: String) -> ConnError {
        if self.send(0, &Message::Refused { reason: &reason }).is_ok() {
            self.stream.shutdown_write();
            let _ = self
                .stream
                .set_read_timeout(Some(Duration::from_millis(200)));
            let mut sink = [0u8; 4096];
            for _ in 0..16 {
                match self.stream.read(&mut sink) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
        }
        ConnError::Refused(reason)
    }
}

/// A connection to the global manager (or any control-plane peer).
pub struct ControlClient {
    conn: FramedConn<TcpStream>,
    next_id: u64,
    addr: String,
    /// Every manager it was given (`A,B,C`), what it connected with, for
    /// following the leader.
    list: Vec<String>,
    name: String,
    timeout: Duration,
    cred: Credential,
}

/// How long a client waits before it asks again a manager that could not
/// act (within its timeout).
const UNAVAILABLE_PAUSE: Duration = Duration::from_millis(200);

/// Most managers a client follows for one request (a standby pointing at
/// another, which points on...).
const MAX_REDIRECTS: usize = 8;

impl ControlClient {
    /// Connects and shakes hands; every later answer must come within
    /// `timeout`. `addr` may list several managers, `A,B,C`: it connects to
    /// the first that answers; if that one is a standby, its answer names
    /// the leader and [`ControlClient::call`] asks the leader instead, so a
    /// client that connects again after its manager failed follows the
    /// leader.
    pub fn connect(
        addr: &str,
        name: &str,
        timeout: Duration,
        cred: &Credential,
    ) -> Result<Self, ConnError> {
        let list: Vec<String> = addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect();
        let mut last = None;
        for one in &list {
            match Self::connect_one(one, name, timeout, cred) {
                Ok(conn) => {
                    return Ok(Self {
                        conn,
                        next_id: 1,
                        addr: one.clone(),
                        list,
                        name: name.to_string(),
                        timeout,
                        cred: cred.clone(),
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ConnError::Unexpected(format!("no address in {addr:?}"))))
    }

    fn connect_one(
        addr: &str,
        name: &str,
        timeout: Duration,
        cred: &Credential,
    ) -> Result<FramedConn<TcpStream>, ConnError> {
        let s = Tcp.connect(addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut conn = FramedConn::new(s);
        conn.client_handshake(Role::Client, name, cred)?;
        Ok(conn)
    }

    /// The address of the manager it talks to now.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends a request and waits for its reply. A standby's answer is
    /// never returned: the request goes to the leader it names, or to the
    /// other managers given; when none leads, the standbys' reasons are
    /// the error. A manager that could not act ([`control::Reply::Unavailable`])
    /// is asked again until the timeout has passed.
    pub fn call(&mut self, req: &control::Request) -> Result<control::Reply, ConnError> {
        let json = control::to_json(req);
        if json.len() > lego_protocol::MAX_CONTROL_BYTES {
            return Err(ConnError::Unexpected(format!(
                "the request ({} bytes) exceeds the frame limit of {} bytes",
                json.len(),
                lego_protocol::MAX_CONTROL_BYTES
            )));
        }
        let mut asked = Vec::new();
        let mut said = Vec::new();
        let started = std::time::Instant::now();
        loop {
            let (leader, message) = match self.call_once(&json)? {
                control::Reply::Standby { leader, message } => (leader, message),
                // Nothing was done: again, a little later, for a while.
                control::Reply::Unavailable { message } => {
                    if started.elapsed() + UNAVAILABLE_PAUSE >= self.timeout {
                        return Err(ConnError::Unavailable(message));
                    }
                    std::thread::sleep(UNAVAILABLE_PAUSE);
                    continue;
                }
                reply => return Ok(reply),
            };
            said.push(format!("{}: {message}", self.addr));
            asked.push(self.addr.clone());
            // The leader it names, else the next manager not yet asked.
            let next: Vec<String> = std::iter::once(leader)
                .filter(|l| !l.is_empty())
                .chain(self.list.iter().cloned())
                .filter(|a| !asked.contains(a))
                .collect();
            let mut moved = false;
            for a in next
                .into_iter()
                .take(MAX_REDIRECTS - asked.len().min(MAX_REDIRECTS))
            {
                match Self::connect_one(&a, &self.name, self.timeout, &self.cred) {
                    Ok(conn) => {
                        self.conn = conn;
                        self.next_id = 1;
                        self.addr = a;
                        moved = true;
                        break;
                    }
                    Err(e) => {
                        said.push(format!("{a}: {e}"));
                        asked.push(a);
                    }
                }
            }
            if !moved {
                return Err(ConnError::NoLeader(said.join("; ")));
            }
        }
    }

    fn call_once(&mut self, json: &str) -> Result<control::Reply, ConnError> {
        let id = self.next_id;
        self.next_id += 1;
        match self.conn.call(id, &Message::Control { json })?.message {
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
    cred: &Credential,
) -> Result<control::Reply, ConnError> {
    ControlClient::connect(addr, "lego", timeout, cred)?.call(req)
}

/// Most connections a daemon serves at once ...
pub const MAX_CONNECTIONS: usize = 4096;
/// ... and from one peer address.
pub const MAX_CONNECTIONS_PER_PEER: usize = 1024;

/// The connections being served, in all and by peer address.
#[derive(Default)]
struct Served {
    total: usize,
    by_peer: std::collections::HashMap<String, usize>,
}

/// One served connection, counted while it lives.
struct ServedGuard {
    served: Arc<std::sync::Mutex<Served>>,
    peer: String,
}

impl Drop for ServedGuard {
    fn drop(&mut self) {
        let mut s = self.served.lock().unwrap_or_else(|p| p.into_inner());
        s.total -= 1;
        if let Some(n) = s.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                s.by_peer.remove(&self.peer);
            }
        }
    }
}

/// The host part of a `HOST:PORT` peer address.
fn peer_host(peer: &str) -> String {
    peer.rsplit_once(':')
        .map_or(peer, |(host, _)| host)
        .to_string()
}

/// Accepts connections on `listener`, on a thread `{name}-accept`, until
/// `stop` is set; serves each on a thread `{name}-conn` of its own, at most
/// [`MAX_CONNECTIONS`] at once and [`MAX_CONNECTIONS_PER_PEER`] from one
/// address (more are closed at once). A handler that panics is logged and
/// its thread ends; the daemon goes on. Accept errors (a full descriptor
/// table) are logged and retried; they never end the loop.
pub fn serve_connections<L: Listener>(
    listener: L,
    name: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    serve: impl Fn(L::Stream) + Clone + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let conn_name = format!("{name}-conn");
    std::thread::Builder::new()
        .name(format!("{name}-accept"))
        .spawn(move || {
            let limits = (MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER);
            accept_loop(listener, &conn_name, &stop, serve, limits)
        })
        .expect("spawn accept thread")
}

fn accept_loop<L: Listener>(
    listener: L,
    name: &str,
    stop: &std::sync::atomic::AtomicBool,
    serve: impl Fn(L::Stream) + Clone + Send + 'static,
    (max_total, max_per_peer): (usize, usize),
) {
    let served = Arc::new(std::sync::Mutex::new(Served::default()));
    let mut last_refusal: Option<std::time::Instant> = None;
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
        let peer = peer_host(&stream.peer());
        let admitted = {
            let mut s = served.lock().unwrap_or_else(|p| p.into_inner());
            let from_peer = s.by_peer.get(&peer).copied().unwrap_or(0);
            let ok = s.total < max_total && from_peer < max_per_peer;
            if ok {
                s.total += 1;
                *s.by_peer.entry(peer.clone()).or_insert(0) += 1;
            }
            ok
        };
        if !admitted {
            if last_refusal.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                tracing::warn!(%peer, "too many connections; closing new ones");
                last_refusal = Some(std::time::Instant::now());
            }
            stream.shutdown();
            continue;
        }
        let guard = ServedGuard {
            served: served.clone(),
            peer,
        };
        let serve = serve.clone();
        let spawned = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _guard = guard;
                let handled =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || serve(stream)));
                if handled.is_err() {
                    tracing::error!(
                        "a connection handler panicked (a bug); its connection is closed"
                    );
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a connection thread");
        }
    }
}

/// Runs one connection's `handler` and logs how it ended (with `peer`).
/// A panic in it (a bug) ends the connection like an error, so the caller
/// goes on to free what the connection held. Returns how it ended.
pub fn run_connection(
    peer: &str,
    handler: impl FnOnce() -> Result<(), ConnError>,
) -> Result<(), ConnError> {
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(handler)).unwrap_or_else(|_| {
            Err(ConnError::Unexpected(
                "a request handler failed (a bug; see the panic above)".into(),
            ))
        });
    match &result {
        Ok(()) | Err(ConnError::Closed) => tracing::debug!(%peer, "connection closed"),
        Err(e) => tracing::warn!(%peer, error = %e, "closing connection"),
    }
    result
}

/// One request to the global manager at `addr`; its `Error` replies and
/// connection failures become one message naming the manager.
pub fn ask_manager(
    addr: &str,
    req: &control::Request,
    cred: &Credential,
) -> Result<control::Reply, String> {
    match control_call(addr, req, Duration::from_secs(5), cred) {
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
    cred: Credential,
    kind: control::Kind,
    addr: String,
    capacity_bytes: u64,
    zone: String,
    id: u64,
    /// This component's own key, from the manager: its heartbeats, its
    /// leave and its registrations again bring it.
    key: String,
    heartbeat: Duration,
}

impl Member {
    /// Registers with the manager at `manager` as a `kind` component that
    /// peers reach at `addr`, in failure domain `zone` (empty: none). An
    /// unreachable manager or a refusal is an error: a component should
    /// not start outside the cluster it was told to join.
    pub fn join(
        manager: &str,
        (kind, addr, zone): (control::Kind, &str, &str),
        capacity_bytes: u64,
        cred: &Credential,
    ) -> Result<Self, String> {
        let mut m = Self {
            manager: manager.to_string(),
            cred: cred.clone(),
            kind,
            addr: addr.to_string(),
            capacity_bytes,
            zone: zone.to_string(),
            id: 0,
            key: String::new(),
            heartbeat: Duration::from_secs(1),
        };
        let mut c = ControlClient::connect(manager, "lego", MANAGER_TIMEOUT, cred)
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
            key: self.key.clone(),
            zone: self.zone.clone(),
        };
        match c.call(&req).map_err(|e| e.to_string())? {
            control::Reply::Registered {
                id,
                heartbeat_ms,
                key,
            } => {
                self.id = id;
                self.key = key;
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
                        match ControlClient::connect(&self.manager, "lego", MANAGER_TIMEOUT, &self.cred)
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
                        if let control::Request::Heartbeat { id, key, .. } = &mut req {
                            *id = self.id;
                            key.clone_from(&self.key);
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
                let leave = control::Request::Leave {
                    id: self.id,
                    key: self.key.clone(),
                };
                // On the heartbeat connection, or a new one if that broke.
                let said = match conn.as_mut().and_then(|c| c.call(&leave).ok()) {
                    Some(reply) => Ok(reply),
                    None => control_call(&self.manager, &leave, MANAGER_TIMEOUT, &self.cred)
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

/// `read_exact_or_closed`, but all of it by `deadline` if there is one.
fn read_exact_by<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    deadline: Option<std::time::Instant>,
) -> Result<(), ConnError> {
    let mut done = 0;
    while done < buf.len() {
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return Err(ConnError::TimedOut);
        }
        match r.read(&mut buf[done..]).map_err(read_failure) {
            Ok(0) => return Err(ConnError::Closed),
            Ok(n) => done += n,
            Err(None) => {}
            Err(Some(e)) => return Err(e),
        }
    }
    Ok(())
}

/// What a failed read means; `None`: interrupted, read again.
fn read_failure(e: io::Error) -> Option<ConnError> {
    match e.kind() {
        io::ErrorKind::Interrupted => None,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Some(ConnError::TimedOut),
        io::ErrorKind::ConnectionReset => Some(ConnError::Closed),
        _ => Some(e.into()),
    }
}

fn read_exact_or_closed<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), ConnError> {
    read_exact_by(r, buf, None)
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

    #[test]
    fn sealed_frames_of_every_size_cross_a_connection() {
        let cred = Credential::generate().unwrap();
        let l = Tcp.listen("127.0.0.1:0").unwrap();
        let addr = Listener::local_addr(&l);
        let server_cred = cred.clone();
        let t = std::thread::spawn(move || {
            let s = Listener::accept(&l).unwrap();
            let mut c = FramedConn::new(s);
            let peer = c
                .server_handshake(77, Duration::from_secs(5), &server_cred)
                .unwrap();
            assert_eq!(peer.identity, Identity::Cluster);
            // Echo each WritePages back as Pages.
            loop {
                let (id, data) = match c.recv() {
                    Ok(f) => match f.message {
                        Message::WritePages { data, .. } => (f.request_id, data.to_vec()),
                        other => panic!("{other:?}"),
                    },
                    Err(ConnError::Closed) => return,
                    Err(e) => panic!("{e}"),
                };
                c.send(id, &Message::Pages { data: &data }).unwrap();
            }
        });
        let s = Tcp.connect(&addr, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = FramedConn::new(s);
        assert_eq!(c.client_handshake(Role::Runtime, "t", &cred).unwrap(), 77);
        for n in [0usize, 1, 15, 16, 17, 512] {
            let data: Vec<u8> = (0..n * 4096).map(|x| (x * 7 + n) as u8).collect();
            let addrs: Vec<VirtAddr> = (0..n as u64).map(|i| VirtAddr(i * 4096)).collect();
            let f = c
                .call(
                    n as u64,
                    &Message::WritePages {
                        addrs: addrs.into(),
                        data: &data,
                    },
                )
                .unwrap();
            assert_eq!(f.message, Message::Pages { data: &data });
        }
        drop(c);
        t.join().unwrap();
    }

    #[test]
    fn connections_beyond_the_caps_are_closed_and_their_room_comes_back() {
        let l = Tcp.listen("127.0.0.1:0").unwrap();
        let addr = Listener::local_addr(&l);
        let stop = Arc::new(AtomicBool::new(false));
        let (served_tx, served) = std::sync::mpsc::channel::<()>();
        let serve = move |s: TcpStream| {
            let _ = served_tx.send(());
            // Held until the peer closes.
            let mut b = [0u8; 1];
            let _ = (&s).read(&mut b);
        };
        let stopper = stop.clone();
        let t = std::thread::spawn(move || accept_loop(l, "t", &stopper, serve, (3, 2)));
        let open = || {
            let s = Tcp.connect(&addr, Duration::from_secs(2)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        };
        let closed_at_once = |s: &TcpStream| {
            let mut b = [0u8; 1];
            match (&*s).read(&mut b) {
                Ok(0) => true,
                Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
                Ok(_) => false,
            }
        };
        // Two from this address are served, the third is closed.
        let a = open();
        let b = open();
        for _ in 0..2 {
            served.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        let c = open();
        assert!(closed_at_once(&c));
        assert!(served.try_recv().is_err(), "the third was served");
        // One leaves: room for another.
        drop(a);
        std::thread::sleep(Duration::from_millis(200));
        let d = open();
        served.recv_timeout(Duration::from_secs(5)).unwrap();
        stop.store(true, Ordering::SeqCst);
        drop((b, d));
        let _ = Tcp.connect(&addr, Duration::from_secs(1));
        t.join().unwrap();
    }

    #[test]
    fn a_patient_reader_waits_for_frames_but_not_for_the_rest_of_one() {
        let l = Tcp.listen("127.0.0.1:0").unwrap();
        let addr = Listener::local_addr(&l);
        let t = std::thread::spawn(move || {
            let mut c = FramedConn::new(Listener::accept(&l).unwrap());
            c.be_patient_within(Duration::from_millis(100), None)
                .unwrap();
            // Idle for several frame timeouts, then a whole frame.
            let f = c.recv().unwrap();
            assert_eq!(f.message, Message::GetStats);
            // A frame begun and not finished.
            let start = std::time::Instant::now();
            let e = c.recv().map(|f| f.message.describe()).unwrap_err();
            (e, start.elapsed())
        });
        let mut s = Tcp.connect(&addr, Duration::from_secs(2)).unwrap();
        let mut frame = Vec::new();
        encode(1, &Message::GetStats, &mut frame);
        std::thread::sleep(Duration::from_millis(400));
        s.write_all(&frame).unwrap();
        s.write_all(&frame[..5]).unwrap();
        let (e, took) = t.join().unwrap();
        assert!(matches!(e, ConnError::TimedOut), "{e}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn a_handshake_trickled_a_byte_at_a_time_runs_out_of_time() {
        let l = Tcp.listen("127.0.0.1:0").unwrap();
        let addr = Listener::local_addr(&l);
        let t = std::thread::spawn(move || {
            let mut c = FramedConn::new(Listener::accept(&l).unwrap());
            let start = std::time::Instant::now();
            let cred = Credential::generate().unwrap();
            let r = c.server_handshake(0, Duration::from_millis(300), &cred);
            (r.map(|_| ()), start.elapsed())
        });
        let mut s = Tcp.connect(&addr, Duration::from_secs(2)).unwrap();
        let mut hello = Vec::new();
        encode(
            0,
            &Message::Hello {
                version: PROTOCOL_VERSION,
                role: Role::Client,
                name: &"x".repeat(200),
            },
            &mut hello,
        );
        // Each byte well within the per-read timeout, the whole far beyond.
        for b in hello {
            if s.write_all(&[b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            if t.is_finished() {
                break;
            }
        }
        let (r, took) = t.join().unwrap();
        assert!(matches!(r, Err(ConnError::TimedOut)), "{r:?}");
        assert!(took < Duration::from_millis(900), "{took:?}");
    }
}
