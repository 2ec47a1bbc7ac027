//! The daemon pool: this process's connections to its memory daemons, and
//! where each unit of the region is placed among them. The request/reply
//! sequence is written once ([`DaemonPool::call`]); every failure is a
//! [`DaemonError`] for the caller to judge. The pager sees the pool as its
//! [`Backing`].

use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lego_protocol::{Capability, ErrorCode, Message, Role, SpaceId, VirtAddr, PAGE_SIZE};
use lego_transport::{ConnError, FramedConn, Stream, Tcp, Transport};

use crate::pager::Backing;
use crate::placement::{Placed, Placement, Placer};

/// Why a memory daemon could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("memory daemon {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: ConnError,
    },
    #[error("memory daemon {addr} refused the handshake: {reason}")]
    Refused { addr: String, reason: String },
    #[error("memory daemon {addr} did not answer in time")]
    TimedOut { addr: String },
    #[error("memory daemon {addr} closed the connection; the program's pages there are lost")]
    Closed { addr: String },
    #[error("memory daemon {addr}: {source}")]
    Conn {
        addr: String,
        #[source]
        source: ConnError,
    },
    #[error("memory daemon {addr} is out of memory ({message})")]
    NoMemory { addr: String, message: String },
    #[error("memory daemon {addr} answered {request} with {reply}")]
    Unexpected {
        addr: String,
        request: &'static str,
        reply: String,
    },
    #[error("memory daemon {addr} refused {request}: {message}")]
    Failed {
        addr: String,
        request: &'static str,
        code: ErrorCode,
        message: String,
    },
    #[error("memory daemon {addr} was drained, yet a page placed on it was asked for")]
    Drained { addr: String },
    #[error("page {addr:#x} is remote but its memory was never placed")]
    Unplaced { addr: usize },
    #[error("{0}")]
    Placement(String),
}

impl DaemonError {
    fn from_conn(addr: &str, e: ConnError) -> Self {
        let addr = addr.to_string();
        match e {
            ConnError::TimedOut => DaemonError::TimedOut { addr },
            ConnError::Closed => DaemonError::Closed { addr },
            source => DaemonError::Conn { addr, source },
        }
    }

    /// The errno a layout call refused this way gives the program, if it
    /// is a refusal and not a failure.
    pub fn errno(&self) -> Option<i32> {
        match self {
            DaemonError::Failed { code, .. } => Some(code.errno()),
            _ => None,
        }
    }
}

/// Connects and says hello to the memory daemon at `addr`.
pub fn connect(
    addr: &str,
    program: &str,
    timeout: Duration,
) -> Result<FramedConn<TcpStream>, DaemonError> {
    let s = Tcp
        .connect(addr, Duration::from_secs(5))
        .map_err(|e| DaemonError::Connect {
            addr: addr.to_string(),
            source: ConnError::Connect(e),
        })?;
    let _ = s.set_read_timeout(Some(timeout));
    let mut c = FramedConn::new(s);
    match c.client_handshake(Role::Runtime, program, crate::config::credential()) {
        Ok(_) => Ok(c),
        Err(ConnError::Refused(reason)) => Err(DaemonError::Refused {
            addr: addr.to_string(),
            reason,
        }),
        Err(source) => Err(DaemonError::Connect {
            addr: addr.to_string(),
            source,
        }),
    }
}

/// One request on `conn` to the daemon at `addr`, with its reply; an
/// `Error` reply is a [`DaemonError::Failed`] (or `NoMemory`).
pub fn call<'c>(
    conn: &'c mut FramedConn<TcpStream>,
    addr: &str,
    id: u64,
    msg: &Message<'_>,
) -> Result<Message<'c>, DaemonError> {
    let reply = conn
        .call(id, msg)
        .map_err(|e| DaemonError::from_conn(addr, e))?
        .message;
    check_reply(addr, msg.name(), reply)
}

fn check_reply<'m>(
    addr: &str,
    request: &'static str,
    reply: Message<'m>,
) -> Result<Message<'m>, DaemonError> {
    match reply {
        Message::Error {
            code: ErrorCode::NoMemory,
            message,
        } => Err(DaemonError::NoMemory {
            addr: addr.to_string(),
            message: message.to_string(),
        }),
        Message::Error { code, message } => Err(DaemonError::Failed {
            addr: addr.to_string(),
            request,
            code,
            message: message.to_string(),
        }),
        ok => Ok(ok),
    }
}

/// A reply other than the one expected.
pub fn unexpected(addr: &str, request: &'static str, reply: &Message<'_>) -> DaemonError {
    DaemonError::Unexpected {
        addr: addr.to_string(),
        request,
        reply: reply.describe(),
    }
}

/// Sends `msg`, which must be answered with `SpaceOpened` (returns the
/// space) or `Done`.
pub fn space_call(
    conn: &mut FramedConn<TcpStream>,
    addr: &str,
    msg: &Message<'_>,
) -> Result<Option<SpaceId>, DaemonError> {
    match call(conn, addr, 1, msg)? {
        Message::SpaceOpened { space } => Ok(Some(space)),
        Message::Done => Ok(None),
        other => Err(unexpected(addr, msg.name(), &other)),
    }
}

/// A memory daemon this program uses. Its index in the pool is what the
/// placement table records, so a drained daemon keeps its place with its
/// connection closed (`None`): no unit is placed on it any more.
pub struct Daemon {
    pub addr: String,
    pub conn: Option<FramedConn<TcpStream>>,
}

impl Daemon {
    /// The open connection, with the daemon's address; a drained daemon
    /// has none.
    fn open(&mut self) -> Result<(&str, &mut FramedConn<TcpStream>), DaemonError> {
        match &mut self.conn {
            Some(conn) => Ok((&self.addr, conn)),
            None => Err(DaemonError::Drained {
                addr: self.addr.clone(),
            }),
        }
    }
}

/// The memory daemons of this process's space.
pub struct DaemonPool {
    pub daemons: Vec<Daemon>,
    pub placement: Placement,
    /// The daemon holding the space's layout.
    pub home: usize,
    /// Bumped whenever a connection opens or closes (the pager loop polls
    /// them all).
    pub changed: u64,
    space: SpaceId,
    capability: Capability,
    region_base: usize,
    region_len: usize,
    program: String,
    timeout: Duration,
    next_id: u64,
    /// Writes sent and not yet acknowledged: (daemon, request id).
    pending: Vec<(usize, u64)>,
    /// Bytes sent and received over connections since closed, and the
    /// totals already reported (see [`DaemonPool::take_traffic`]).
    closed_traffic: (u64, u64),
    reported_traffic: (u64, u64),
    /// Busy-poll this long for a page read's reply (0: sleep at once).
    poll_us: u64,
    /// With a global manager: the placer thread's queue.
    placer: Option<Arc<Placer>>,
    placed: Vec<Placed>,
    /// Units the placer could not place, and why.
    failed: Vec<(usize, String)>,
}

impl DaemonPool {
    // Everything the pool is made of; a struct for them would only be
    // unpacked again here.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        daemons: Vec<Daemon>,
        placement: Placement,
        home: usize,
        (space, capability): (SpaceId, Capability),
        region: (usize, usize),
        program: String,
        timeout: Duration,
        poll_us: u64,
        placer: Option<Arc<Placer>>,
    ) -> Self {
        Self {
            daemons,
            placement,
            home,
            changed: 0,
            space,
            capability,
            region_base: region.0,
            region_len: region.1,
            program,
            timeout,
            next_id: 1,
            pending: Vec::new(),
            closed_traffic: (0, 0),
            reported_traffic: (0, 0),
            poll_us,
            placer,
            placed: Vec::new(),
            failed: Vec::new(),
        }
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// One request to daemon `d`: its address and reply.
    fn exchange(
        &mut self,
        d: usize,
        msg: &Message<'_>,
    ) -> Result<(&str, Message<'_>), DaemonError> {
        let id = self.next_id();
        let poll_us = if matches!(msg, Message::ReadPages { .. }) {
            self.poll_us
        } else {
            0
        };
        let (addr, conn) = self.daemons[d].open()?;
        let reply = if poll_us == 0 {
            conn.call(id, msg)
        } else {
            call_polling(conn, id, msg, poll_us)
        };
        let reply = reply.map_err(|e| DaemonError::from_conn(addr, e))?.message;
        Ok((addr, check_reply(addr, msg.name(), reply)?))
    }

    /// A request to daemon `d` that must be answered `Done`.
    pub fn call_done(&mut self, d: usize, msg: &Message<'_>) -> Result<(), DaemonError> {
        match self.exchange(d, msg)? {
            (_, Message::Done) => Ok(()),
            (addr, other) => Err(unexpected(addr, msg.name(), &other)),
        }
    }

    /// A new connection to the daemon at `addr`, bound to this space.
    pub fn attach(&self, addr: &str) -> Result<FramedConn<TcpStream>, DaemonError> {
        attach(
            addr,
            &self.program,
            self.timeout,
            (self.space, self.capability),
            (self.region_base, self.region_len),
        )
    }

    /// Daemon `d` is no longer used (drained): closing the last
    /// connection to the space there frees it.
    pub fn close(&mut self, d: usize) {
        if let Some(c) = self.daemons[d].conn.take() {
            self.closed_traffic.0 += c.bytes_out;
            self.closed_traffic.1 += c.bytes_in;
        }
        // Should a unit be placed there again (a cancelled drain), the
        // placer connects anew, off the pager's lock.
        if let (Some(placer), Some(&id)) = (&self.placer, self.placement.ids().get(d)) {
            placer.forget(id);
        }
        self.changed += 1;
    }

    /// Bytes sent to and received from the daemons since the last call.
    pub fn take_traffic(&mut self) -> (u64, u64) {
        let (mut out, mut inn) = self.closed_traffic;
        for c in self.daemons.iter().filter_map(|d| d.conn.as_ref()) {
            out += c.bytes_out;
            inn += c.bytes_in;
        }
        let (o, i) = self.reported_traffic;
        self.reported_traffic = (out, inn);
        (out - o, inn - i)
    }

    /// Polls entries for every open connection (data or hang-up).
    pub fn pollfds(&self, out: &mut Vec<libc::pollfd>) {
        out.extend(self.daemons.iter().filter_map(|d| {
            Some(libc::pollfd {
                fd: d.conn.as_ref()?.stream().raw_fd()?,
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            })
        }));
    }

    /// The descriptors of the open connections (a fork child closes them).
    pub fn fds(&self) -> Vec<i32> {
        self.daemons
            .iter()
            .filter_map(|d| d.conn.as_ref()?.stream().raw_fd())
            .collect()
    }

    /// A daemon whose socket became readable while no request was in
    /// flight went away (or broke the protocol): its pages are lost.
    pub fn check_idle(&mut self, readable: impl Fn(i32) -> bool) -> Result<(), DaemonError> {
        for d in &mut self.daemons {
            let Some(conn) = d.conn.as_mut() else {
                continue;
            };
            if !conn.stream().raw_fd().is_some_and(&readable) {
                continue;
            }
            return Err(match conn.recv() {
                Err(e) => DaemonError::from_conn(&d.addr, e),
                Ok(f) => DaemonError::Unexpected {
                    addr: d.addr.clone(),
                    request: "nothing",
                    reply: f.message.describe(),
                },
            });
        }
        Ok(())
    }

    /// The daemon that stores region offset `off`: its unit's, placed by
    /// the placer thread if it is not yet (waiting for it at most the
    /// daemon timeout).
    pub fn place(&mut self, off: usize) -> Result<usize, DaemonError> {
        let deadline = Instant::now() + self.timeout + Duration::from_secs(1);
        let unit = Placement::unit_of(off);
        let mut asked = false;
        loop {
            if let Some(d) = self.placement.placed(off) {
                if self.daemons[d].conn.is_none() {
                    // A daemon this program drained, placed on again (its
                    // drain was cancelled), before the placer's connection
                    // to it came: attached here (rare).
                    let conn = self.attach(&self.daemons[d].addr)?;
                    self.daemons[d].conn = Some(conn);
                    self.changed += 1;
                }
                return Ok(d);
            }
            let Some(placer) = self.placer.clone() else {
                return Err(DaemonError::Placement(format!(
                    "region offset {off:#x} is outside the region"
                )));
            };
            self.collect(&placer)?;
            if self.placement.placed(off).is_some() {
                continue;
            }
            if let Some(k) = self.failed.iter().position(|f| f.0 == unit) {
                return Err(DaemonError::Placement(self.failed.swap_remove(k).1));
            }
            if !asked {
                placer.want(unit);
                asked = true;
            }
            if Instant::now() >= deadline {
                return Err(DaemonError::Placement(
                    "no placement for new memory from the global manager in time".into(),
                ));
            }
            placer.wait(Duration::from_millis(100));
        }
    }

    /// Records what the placer placed since the last look (connecting a
    /// daemon new to the pool) and what it could not place.
    fn collect(&mut self, placer: &Placer) -> Result<(), DaemonError> {
        let mut placed = std::mem::take(&mut self.placed);
        placer.take(&mut placed, &mut self.failed);
        for p in placed.drain(..) {
            if let Some(d) = self.placement.placed_on(p.unit, p.id) {
                if let (Some(conn), None) = (p.conn, &self.daemons[d].conn) {
                    self.daemons[d].conn = Some(conn);
                    self.changed += 1;
                }
                continue;
            }
            let conn = match p.conn {
                Some(c) => c,
                None => self.attach(&p.addr)?,
            };
            let d = self.daemons.len();
            self.placement
                .bind(p.unit * PLACEMENT_UNIT, p.id, d)
                .map_err(DaemonError::Placement)?;
            self.daemons.push(Daemon {
                addr: p.addr,
                conn: Some(conn),
            });
            self.changed += 1;
        }
        self.placed = placed;
        Ok(())
    }
}

const PLACEMENT_UNIT: usize = lego_protocol::control::PLACEMENT_BYTES as usize;

/// A new connection to the daemon at `addr`, bound to `space`.
pub fn attach(
    addr: &str,
    program: &str,
    timeout: Duration,
    (space, capability): (SpaceId, Capability),
    region: (usize, usize),
) -> Result<FramedConn<TcpStream>, DaemonError> {
    let mut conn = connect(addr, program, timeout)?;
    space_call(
        &mut conn,
        addr,
        &Message::AttachSpace {
            space,
            capability,
            region_base: VirtAddr(region.0 as u64),
            region_bytes: region.1 as u64,
        },
    )?;
    Ok(conn)
}

impl Backing for DaemonPool {
    fn daemon_of(&self, addr: usize) -> Option<usize> {
        self.placement.placed(addr - self.region_base)
    }

    fn daemon_for(&mut self, addr: usize) -> Result<usize, DaemonError> {
        self.place(addr - self.region_base)
    }

    fn place_ahead(&mut self, addr: usize) {
        let off = addr - self.region_base;
        if let (Some(placer), None) = (&self.placer, self.placement.placed(off)) {
            placer.want(Placement::unit_of(off));
        }
    }

    fn read_pages(&mut self, d: usize, addrs: &[VirtAddr]) -> Result<&[u8], DaemonError> {
        let msg = Message::ReadPages {
            addrs: addrs.into(),
        };
        match self.exchange(d, &msg)? {
            (_, Message::Pages { data }) if data.len() == addrs.len() * PAGE_SIZE => Ok(data),
            (addr, other) => Err(unexpected(addr, "ReadPages", &other)),
        }
    }

    fn write_pages(
        &mut self,
        d: usize,
        addrs: &[VirtAddr],
        data: &[u8],
    ) -> Result<(), DaemonError> {
        let id = self.next_id();
        let (addr, conn) = self.daemons[d].open()?;
        conn.send(
            id,
            &Message::WritePages {
                addrs: addrs.into(),
                data,
            },
        )
        .map_err(|e| DaemonError::from_conn(addr, e))?;
        self.pending.push((d, id));
        Ok(())
    }

    fn await_writes(&mut self) -> Result<(), DaemonError> {
        let pending = std::mem::take(&mut self.pending);
        for &(d, id) in &pending {
            let (addr, conn) = self.daemons[d].open()?;
            let frame = conn.recv().map_err(|e| DaemonError::from_conn(addr, e))?;
            let (rid, reply) = (frame.request_id, frame.message);
            match check_reply(addr, "WritePages", reply)? {
                Message::Done if rid == id => {}
                other => return Err(unexpected(addr, "WritePages", &other)),
            }
        }
        self.pending = pending;
        self.pending.clear();
        Ok(())
    }

    fn discard_on(&mut self, d: usize, addr: usize, len: usize) -> Result<(), DaemonError> {
        self.call_done(
            d,
            &Message::Discard {
                addr: VirtAddr(addr as u64),
                len: len as u64,
            },
        )
    }

    fn holders(&self, addr: usize, len: usize) -> Vec<usize> {
        let mut seen = vec![false; self.daemons.len()];
        for d in self.placement.placed_in(addr - self.region_base, len) {
            seen[d] = true;
        }
        (0..seen.len()).filter(|&d| seen[d]).collect()
    }

    fn home(&self) -> usize {
        self.home
    }

    fn count(&self) -> usize {
        self.daemons.len()
    }
}

/// `FramedConn::call`, but busy-polls the socket for up to `spin_us` before
/// sleeping on it: one wakeup fewer per miss when the reply comes quickly,
/// a core spent while it does not.
fn call_polling<'c>(
    conn: &'c mut FramedConn<TcpStream>,
    id: u64,
    msg: &Message<'_>,
    spin_us: u64,
) -> Result<lego_protocol::Frame<'c>, ConnError> {
    conn.send(id, msg)?;
    let fd = conn.stream().raw_fd().unwrap_or(-1);
    let start = std::time::Instant::now();
    let limit = Duration::from_micros(spin_us);
    loop {
        let mut p = [libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        if lego_sys::process::poll(&mut p, 0).unwrap_or(1) > 0 || start.elapsed() >= limit {
            break;
        }
        std::hint::spin_loop();
    }
    conn.recv_reply(id)
}
