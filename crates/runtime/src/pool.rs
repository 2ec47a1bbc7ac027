//! The daemon pool: this process's connections to its memory daemons, and
//! where the replicas of each unit of the region are placed among them.
//! The request/reply sequence is written once ([`DaemonPool::call`]);
//! every failure is a [`DaemonError`] for the caller to judge. The pager
//! sees the pool as its [`Backing`].
//!
//! # Failover
//! A daemon that closes its connection, breaks the protocol, or does not
//! answer within `LEGO_FAILOVER_MS` while every unit it holds has another
//! whole replica is *lost* ([`DaemonPool::lose`]): its connection closes,
//! its replicas are dropped, and the request is served by the others —
//! a read from the next whole replica of each page's unit, a write counted
//! done once the remaining replicas have it. The program sees a pause,
//! not an error, unless a unit is left with no whole replica (then its
//! pages are gone and the program stops with that reason). The repair
//! thread ([`crate::repair`]) then gives the units their replicas back.

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
    #[error("memory daemon {addr} closed the connection")]
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
    #[error("memory daemon {addr} is no longer used (drained or lost), yet a page placed on it was asked for")]
    Drained { addr: String },
    #[error("{cause}; no other replica holds {units} unit(s) of the program's memory that were there: their pages are lost")]
    Lost {
        cause: Box<DaemonError>,
        units: usize,
    },
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

    /// Whether the daemon is gone or unusable (not just refusing one
    /// request): its replicas are given up, if others hold the units.
    pub fn is_loss(&self) -> bool {
        matches!(
            self,
            DaemonError::Connect { .. }
                | DaemonError::Refused { .. }
                | DaemonError::TimedOut { .. }
                | DaemonError::Closed { .. }
                | DaemonError::Conn { .. }
                | DaemonError::Unexpected { .. }
        )
    }
}

const PLACEMENT_UNIT: usize = lego_protocol::control::PLACEMENT_BYTES as usize;

/// How long a daemon this program lost is avoided if the manager does not
/// see it fail (it was slow, not dead).
pub const LOST_FOR: Duration = Duration::from_secs(30);

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
    // A daemon that stops reading (hung, or its link black-holed) fails a
    // send after the same time, not after TCP's own minutes.
    let _ = s.set_write_timeout(Some(timeout));
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

/// [`call`], but a reply that has not begun within `limit` is a
/// [`DaemonError::TimedOut`] (the daemon is given up; the caller has
/// another copy of what it holds).
pub fn call_within<'c>(
    conn: &'c mut FramedConn<TcpStream>,
    addr: &str,
    (id, limit): (u64, Duration),
    msg: &Message<'_>,
) -> Result<Message<'c>, DaemonError> {
    conn.send(id, msg)
        .map_err(|e| DaemonError::from_conn(addr, e))?;
    if conn
        .stream()
        .raw_fd()
        .is_some_and(|fd| !readable_within(fd, limit))
    {
        return Err(DaemonError::TimedOut {
            addr: addr.to_string(),
        });
    }
    let reply = conn
        .recv_reply(id)
        .map_err(|e| DaemonError::from_conn(addr, e))?
        .message;
    check_reply(addr, msg.name(), reply)
}

/// Whether `fd` has data (or a hang-up) within `limit` (zero: now).
fn readable_within(fd: i32, limit: Duration) -> bool {
    let mut p = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    let ms = limit.as_millis().min(i32::MAX as u128) as i32;
    lego_sys::process::poll(&mut p, ms).unwrap_or(1) > 0
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
/// placement table records, so a drained or lost daemon keeps its place
/// with its connection closed (`None`): no unit is placed on it any more.
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
    /// The daemon holding the space's layout (`usize::MAX`: none of the
    /// pool's).
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
    /// A daemon that does not answer this long is lost, if nothing is
    /// lost with it (zero: wait the whole timeout).
    failover: Duration,
    /// Manager ids of the daemons this program lost, and when: no replica
    /// goes there again until the manager has seen them fail (now, or
    /// since the loss and come back), or for [`LOST_FOR`].
    pub lost_ids: Vec<(u64, Instant)>,
    /// Pages read from several replicas after a loss.
    scratch: Vec<u8>,
    /// Per daemon: the pages of a writeback going there.
    out: Vec<(Vec<VirtAddr>, Vec<u8>)>,
    /// Wakes the repair thread after a loss.
    pub repair: Arc<crate::repair::Wake>,
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
        (poll_us, failover): (u64, Duration),
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
            failover,
            lost_ids: Vec::new(),
            scratch: Vec::new(),
            out: Vec::new(),
            repair: Arc::new(crate::repair::Wake::default()),
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
        {
            let (addr, conn) = self.daemons[d].open()?;
            conn.send(id, msg)
                .map_err(|e| DaemonError::from_conn(addr, e))?;
        }
        self.wait_reply(d, poll_us)?;
        let (addr, conn) = self.daemons[d].open()?;
        let reply = conn
            .recv_reply(id)
            .map_err(|e| DaemonError::from_conn(addr, e))?
            .message;
        Ok((addr, check_reply(addr, msg.name(), reply)?))
    }

    /// Waits until daemon `d`'s reply begins to arrive: busy-polls for
    /// `spin_us` first (one wakeup fewer when it comes quickly), then
    /// sleeps on the socket. After [`DaemonPool::failover`] a daemon
    /// whose units all have another whole replica is given up (timed
    /// out); one that would take pages with it is waited for (the
    /// socket's own timeout applies then).
    fn wait_reply(&mut self, d: usize, spin_us: u64) -> Result<(), DaemonError> {
        let Some(fd) = self.daemons[d]
            .conn
            .as_ref()
            .and_then(|c| c.stream().raw_fd())
        else {
            return Ok(());
        };
        let start = Instant::now();
        let spin = Duration::from_micros(spin_us);
        while start.elapsed() < spin {
            if readable_within(fd, Duration::ZERO) {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        if self.failover.is_zero() {
            return Ok(());
        }
        let left = self
            .failover
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(1));
        if readable_within(fd, left) || !self.placement.expendable(d) {
            return Ok(());
        }
        Err(DaemonError::TimedOut {
            addr: self.daemons[d].addr.clone(),
        })
    }

    /// Gives daemon `d` up after `cause` (see the module docs): closes its
    /// connection and drops its replicas. An error if a unit is left with
    /// no whole replica.
    pub fn lose(&mut self, d: usize, cause: DaemonError) -> Result<(), DaemonError> {
        if self.daemons[d].conn.is_none() {
            return Ok(());
        }
        let lost = self.placement.lose(d);
        self.close(d);
        if let Some(&id) = self.placement.ids().get(d) {
            self.avoid(id);
        }
        if !lost.is_empty() {
            return Err(DaemonError::Lost {
                cause: Box::new(cause),
                units: lost.len(),
            });
        }
        lego_sys::process::warn(&format!(
            "{cause}; its units are served by their other replicas"
        ));
        self.repair.wake();
        Ok(())
    }

    /// Runs `f` against daemon `d`; if `d` is lost on the way, gives it up
    /// (see [`DaemonPool::lose`]) and answers `None`.
    fn or_lose<T>(
        &mut self,
        d: usize,
        f: impl FnOnce(&mut Self) -> Result<T, DaemonError>,
    ) -> Result<Option<T>, DaemonError> {
        match f(self) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_loss() => self.lose(d, e).map(|()| None),
            Err(e) => Err(e),
        }
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
    /// flight went away (or broke the protocol): it is lost.
    pub fn check_idle(&mut self, readable: impl Fn(i32) -> bool) -> Result<(), DaemonError> {
        for d in 0..self.daemons.len() {
            let daemon = &mut self.daemons[d];
            let Some(conn) = daemon.conn.as_mut() else {
                continue;
            };
            if !conn.stream().raw_fd().is_some_and(&readable) {
                continue;
            }
            let cause = match conn.recv() {
                Err(e) => DaemonError::from_conn(&daemon.addr, e),
                Ok(f) => DaemonError::Unexpected {
                    addr: daemon.addr.clone(),
                    request: "nothing",
                    reply: f.message.describe(),
                },
            };
            self.lose(d, cause)?;
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

    /// Records what the placer placed since the last look (the repair
    /// thread looks too: a unit placed ahead of need but not written yet
    /// has replicas to repair as well).
    pub fn collect_placed(&mut self) -> Result<(), DaemonError> {
        match self.placer.clone() {
            Some(placer) => self.collect(&placer),
            None => Ok(()),
        }
    }

    /// Records what the placer placed since the last look (connecting a
    /// daemon new to the pool) and what it could not place.
    fn collect(&mut self, placer: &Placer) -> Result<(), DaemonError> {
        let mut placed = std::mem::take(&mut self.placed);
        placer.take(&mut placed, &mut self.failed);
        for p in placed.drain(..) {
            // Placed already (asked for twice): what the table holds is
            // newer (replicas lost or being filled since).
            if !self.placement.replicas(p.unit * PLACEMENT_UNIT).is_empty() {
                continue;
            }
            let mut members = Vec::with_capacity(p.replicas.len());
            let mut last = None;
            for (rep, conn) in p.replicas {
                let conn = conn.map(crate::side::Side::into_inner);
                match self.daemon_index(rep.id, &rep.addr, conn) {
                    Ok(d) => members.push(d),
                    Err(e) => last = Some(e),
                }
            }
            match (members.is_empty(), last) {
                (true, Some(e)) => self.failed.push((p.unit, e.to_string())),
                _ => {
                    self.placement.place(p.unit, &members, p.named);
                    if members.len() < p.named {
                        self.repair.wake();
                    }
                }
            }
        }
        self.placed = placed;
        Ok(())
    }

    /// The pool's index of the daemon with manager id `id` at `addr`,
    /// connected (over `conn`, or a new connection) if it is not yet.
    pub fn daemon_index(
        &mut self,
        id: u64,
        addr: &str,
        conn: Option<FramedConn<TcpStream>>,
    ) -> Result<usize, DaemonError> {
        let d = match self.placement.index_of(id) {
            Some(d) => d,
            None => {
                let d = self.daemons.len();
                self.placement.bind(id, d).map_err(DaemonError::Placement)?;
                self.daemons.push(Daemon {
                    addr: addr.to_string(),
                    conn: None,
                });
                d
            }
        };
        if self.daemons[d].conn.is_none() {
            // New to this program, or drained or lost before and placed
            // on again.
            let conn = match conn {
                Some(c) => c,
                None => self.attach(addr)?,
            };
            self.daemons[d].addr = addr.to_string();
            self.daemons[d].conn = Some(conn);
            self.lost_ids.retain(|&(x, _)| x != id);
            self.changed += 1;
        }
        Ok(d)
    }

    /// Daemon `d` empties `[addr, addr+len)` and takes copies of it with
    /// `epoch` only (a new replica); a daemon lost on the way is given up.
    pub fn begin_fill(
        &mut self,
        d: usize,
        addr: usize,
        len: usize,
        epoch: u64,
    ) -> Result<(), DaemonError> {
        if self.daemons[d].conn.is_none() {
            return Ok(());
        }
        let msg = Message::BeginFill {
            addr: VirtAddr(addr as u64),
            len: len as u64,
            epoch,
        };
        self.or_lose(d, |p| p.call_done(d, &msg)).map(|_| ())
    }

    /// New replicas avoid daemon `id` for [`LOST_FOR`] (it could not be
    /// reached or filled).
    pub fn avoid(&mut self, id: u64) {
        self.lost_ids.push((id, Instant::now()));
        if let Some(placer) = &self.placer {
            placer.avoid(id);
        }
    }

    /// The daemons this program lost and still avoids, given the ones the
    /// manager reports failed (it avoids them by itself) and those it
    /// reports back after a failure, with how many milliseconds ago. A
    /// daemon the manager saw fail is forgotten: it was down, not cut off
    /// from this program alone, and a replica placed there is filled anew.
    pub fn avoided(&mut self, failed: &[u64], back: &[(u64, u64)]) -> Vec<u64> {
        let seen_failing = |id: u64, at: Instant| {
            failed.contains(&id)
                || back
                    .iter()
                    .any(|&(b, ago)| b == id && u128::from(ago) <= at.elapsed().as_millis())
        };
        let placer = &self.placer;
        self.lost_ids.retain(|&(id, at)| {
            let keep = !seen_failing(id, at) && at.elapsed() < LOST_FOR;
            if !keep {
                if let Some(placer) = placer {
                    placer.unavoid(id);
                }
            }
            keep
        });
        self.lost_ids.iter().map(|&(id, _)| id).collect()
    }
}

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

impl DaemonPool {
    /// Reads `addrs` from daemon `d`; the reply stays in its connection.
    fn read_from(&mut self, d: usize, addrs: &[VirtAddr]) -> Result<(), DaemonError> {
        let msg = Message::ReadPages {
            addrs: addrs.into(),
        };
        match self.exchange(d, &msg)? {
            (_, Message::Pages { data }) if data.len() == addrs.len() * PAGE_SIZE => Ok(()),
            (addr, other) => Err(unexpected(addr, "ReadPages", &other)),
        }
    }

    /// Sends a write of `addrs` to daemon `d` (acknowledged at
    /// `await_writes`); a daemon lost on the way is given up.
    fn send_write(&mut self, d: usize, addrs: &[VirtAddr], data: &[u8]) -> Result<(), DaemonError> {
        let id = self.next_id();
        let sent = self.or_lose(d, |p| {
            let (addr, conn) = p.daemons[d].open()?;
            conn.send(
                id,
                &Message::WritePages {
                    addrs: addrs.into(),
                    data,
                },
            )
            .map_err(|e| DaemonError::from_conn(addr, e))
        })?;
        if sent.is_some() {
            self.pending.push((d, id));
        }
        Ok(())
    }

    /// The page data of daemon `d`'s last reply (after [`Self::read_from`]).
    fn last_pages(&self, d: usize) -> &[u8] {
        match self.daemons[d].conn.as_ref().and_then(|c| c.last_frame()) {
            Some(lego_protocol::Frame {
                message: Message::Pages { data },
                ..
            }) => data,
            _ => &[],
        }
    }

    /// Reads `addrs` page by page from whole replicas, giving up the
    /// daemons lost on the way, into `scratch`.
    fn read_failing_over(&mut self, addrs: &[VirtAddr]) -> Result<(), DaemonError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let mut k = 0;
        let r = loop {
            if k == addrs.len() {
                break Ok(());
            }
            let off = addrs[k].0 as usize - self.region_base;
            let Some(d) = self.placement.placed(off) else {
                break Err(DaemonError::Unplaced {
                    addr: addrs[k].0 as usize,
                });
            };
            // The run of pages whose units read from `d`.
            let mut end = k + 1;
            while end < addrs.len()
                && self
                    .placement
                    .placed(addrs[end].0 as usize - self.region_base)
                    == Some(d)
            {
                end += 1;
            }
            match self.or_lose(d, |p| p.read_from(d, &addrs[k..end])) {
                Ok(Some(())) => {
                    scratch.extend_from_slice(self.last_pages(d));
                    k = end;
                }
                Ok(None) => {}
                Err(e) => break Err(e),
            }
        };
        self.scratch = scratch;
        r
    }
}

impl Backing for DaemonPool {
    fn daemon_of(&self, addr: usize) -> Option<usize> {
        self.placement.placed(addr - self.region_base)
    }

    fn ensure_placed(&mut self, addr: usize) -> Result<(), DaemonError> {
        self.place(addr - self.region_base).map(|_| ())
    }

    fn place_ahead(&mut self, addr: usize) {
        let off = addr - self.region_base;
        if let (Some(placer), None) = (&self.placer, self.placement.placed(off)) {
            placer.want(Placement::unit_of(off));
        }
    }

    fn read_pages(&mut self, d: usize, addrs: &[VirtAddr]) -> Result<&[u8], DaemonError> {
        if self.or_lose(d, |p| p.read_from(d, addrs))?.is_some() {
            return Ok(self.last_pages(d));
        }
        self.read_failing_over(addrs)?;
        Ok(&self.scratch)
    }

    fn write_pages(&mut self, addrs: &[VirtAddr], data: &[u8]) -> Result<(), DaemonError> {
        // Most batches go to one set of replicas: sent as they are.
        let first = match addrs.first() {
            Some(a) => self.placement.replicas(a.0 as usize - self.region_base),
            None => return Ok(()),
        };
        let same = addrs
            .iter()
            .all(|a| self.placement.replicas(a.0 as usize - self.region_base) == first);
        if same && !first.is_empty() {
            for d in first.all() {
                self.send_write(d, addrs, data)?;
            }
            return Ok(());
        }
        if self.out.len() < self.daemons.len() {
            self.out.resize_with(self.daemons.len(), Default::default);
        }
        for (a, page) in addrs.iter().zip(data.chunks_exact(PAGE_SIZE)) {
            let off = a.0 as usize - self.region_base;
            let replicas = self.placement.replicas(off);
            if replicas.is_empty() {
                return Err(DaemonError::Unplaced { addr: a.0 as usize });
            }
            for d in replicas.all() {
                self.out[d].0.push(*a);
                self.out[d].1.extend_from_slice(page);
            }
        }
        for d in 0..self.out.len() {
            if self.out[d].0.is_empty() {
                continue;
            }
            let (addrs, data) = std::mem::take(&mut self.out[d]);
            let sent = self.send_write(d, &addrs, &data);
            let mut kept = (addrs, data);
            kept.0.clear();
            kept.1.clear();
            self.out[d] = kept;
            sent?;
        }
        Ok(())
    }

    fn await_writes(&mut self) -> Result<(), DaemonError> {
        let mut pending = std::mem::take(&mut self.pending);
        let mut r = Ok(());
        for &(d, id) in &pending {
            if self.daemons[d].conn.is_none() {
                // Lost since: the other replicas have the pages.
                continue;
            }
            let acked = self.or_lose(d, |p| {
                p.wait_reply(d, 0)?;
                let (addr, conn) = p.daemons[d].open()?;
                let frame = conn.recv().map_err(|e| DaemonError::from_conn(addr, e))?;
                let (rid, reply) = (frame.request_id, frame.message);
                match check_reply(addr, "WritePages", reply)? {
                    Message::Done if rid == id => Ok(()),
                    other => Err(unexpected(addr, "WritePages", &other)),
                }
            });
            if let Err(e) = acked {
                r = Err(e);
                break;
            }
        }
        pending.clear();
        self.pending = pending;
        r
    }

    fn discard_on(&mut self, d: usize, addr: usize, len: usize) -> Result<(), DaemonError> {
        if self.daemons[d].conn.is_none() {
            return Ok(());
        }
        let msg = Message::Discard {
            addr: VirtAddr(addr as u64),
            len: len as u64,
        };
        self.or_lose(d, |p| p.call_done(d, &msg)).map(|_| ())
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
}
