//! The lego memory daemon (LegoOS's memory monitor): stores the page
//! contents of the address spaces it serves, within a capacity, and owns the
//! layout (mappings, break) of the spaces whose home it is.
//!
//! [`MemoryDaemon::start`] binds and serves on background threads, one per
//! connection. A malformed frame, a wrong protocol version or an unknown
//! request closes that one connection with a logged reason; other
//! connections are unaffected, and nothing a peer sends can panic the
//! daemon. When the last connection of a space closes (the process exited
//! or died), the space and all its pages are freed.

#![deny(unsafe_code)]

#[cfg(test)]
mod fuzz_tests;
pub mod layout;
pub mod store;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use lego_protocol::{DaemonStats, Message, SpaceId, VirtAddr};
use lego_transport::auth::Credential;
use lego_transport::{ConnError, FramedConn, Listener, Stream, Tcp, Transport, TransportError};
use store::{Refusal, Store};

/// How long a new connection may take to say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A running memory daemon.
pub struct MemoryDaemon {
    addr: String,
    store: Arc<Mutex<Store>>,
    counters: Arc<Counters>,
    cred: Arc<Credential>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    membership: Option<lego_transport::Membership>,
}

/// Why [`MemoryDaemon::wait`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Drained by the manager: it held nothing when it left.
    Drained,
    /// Stopped (its stop flag was set, e.g. by a signal); it told its
    /// manager, if any, that it leaves.
    Stopped,
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    // A panic in one connection thread must not take the others down.
    store.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryDaemon {
    /// Binds `listen` (HOST:PORT, port 0 picks one) and starts serving
    /// the peers `cred` (the cluster credential) vouches for.
    pub fn start(
        listen: &str,
        capacity_bytes: u64,
        cred: Credential,
    ) -> Result<Self, TransportError> {
        let listener = Tcp.listen(listen)?;
        let addr = Listener::local_addr(&listener);
        let store = Arc::new(Mutex::new(Store::new(capacity_bytes)));
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let cred = Arc::new(cred);
        let accept = {
            let (store, cred, counters) = (store.clone(), cred.clone(), counters.clone());
            lego_transport::serve_connections(listener, "lego-memory", stop.clone(), move |s| {
                serve_connection(s, store.clone(), &cred, &counters)
            })
        };
        Ok(Self {
            addr,
            store,
            counters,
            cred,
            stop,
            accept: Some(accept),
            membership: None,
        })
    }

    /// The address peers connect to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn stats(&self) -> DaemonStats {
        lock(&self.store).stats()
    }

    /// Its metrics now (`lego memory --metrics`), each sample labelled
    /// with the daemon's address.
    pub fn scrape(&self) -> lego_metrics::Scrape {
        scrape(&self.store, &self.counters, &self.addr)
    }

    /// What builds its metrics at each scrape (for
    /// [`lego_metrics::serve`]), labelled `daemon` with `name` (the
    /// address peers reach it at; default: where it listens).
    pub fn scraper(&self, name: Option<&str>) -> lego_metrics::http::ScrapeFn {
        let (store, counters) = (self.store.clone(), self.counters.clone());
        let addr = name.unwrap_or(&self.addr).to_string();
        Arc::new(move || scrape(&store, &counters, &addr))
    }

    /// Joins the cluster of the global manager at `manager`, as a memory
    /// daemon peers reach at `advertise` (default: the listening address),
    /// and keeps heartbeating: used bytes and the spaces it holds. When the
    /// manager is unreachable or restarted, it registers again (keeping its
    /// id) as soon as it answers; serving never stops meanwhile. `zone` is
    /// its failure domain (empty: none).
    pub fn join(
        &mut self,
        manager: &str,
        advertise: Option<&str>,
        zone: &str,
    ) -> Result<u64, String> {
        let store = self.store.clone();
        let stop = self.stop.clone();
        let addr = advertise.unwrap_or(&self.addr).to_string();
        let capacity_bytes = lock(&store).capacity_bytes();
        let report = move || {
            let s = lock(&store);
            (s.stats().used_bytes, s.space_ids())
        };
        let member = lego_transport::Member::join(
            manager,
            (lego_protocol::control::Kind::Memory, &addr, zone),
            capacity_bytes,
            &self.cred,
        )?;
        let id = member.id();
        let membership = member.keep_alive(stop, move || {
            let (used_bytes, spaces) = report();
            lego_protocol::control::Request::Heartbeat {
                id: 0,
                key: String::new(),
                used_bytes,
                load: 0,
                spaces,
                processes: vec![],
            }
        });
        self.membership = Some(membership);
        Ok(id)
    }

    /// Setting this flag stops the daemon: [`MemoryDaemon::wait`] returns.
    pub fn stopper(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Serves until the daemon has left its cluster (drained) or is
    /// stopped, then shuts down.
    pub fn wait(self) -> Ended {
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let drained = self.membership.as_ref().is_some_and(|m| m.drained());
        self.shutdown();
        if drained {
            Ended::Drained
        } else {
            Ended::Stopped
        }
    }

    /// Stops accepting and leaves the cluster, if in one; existing
    /// connections end when their peers leave (or the process exits).
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(m) = self.membership.take() {
            let s = self.stats();
            if !m.drained() && s.spaces > 0 {
                tracing::warn!(
                    spaces = s.spaces,
                    used_bytes = s.used_bytes,
                    "leaving while holding memory of running programs: they will stop (drain a daemon before stopping it)"
                );
            }
            m.leave();
        }
        // Wake the blocking accept.
        let _ = Tcp.connect(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Requests a memory daemon times, by kind (the `op` label of
/// `lego_memory_request_seconds`).
pub const OPS: [&str; 5] = ["read", "write", "copy", "layout", "space"];

/// What a memory daemon counts for its metrics (relaxed atomics: a few
/// adds per request).
#[derive(Default)]
pub struct Counters {
    pub pages_read: lego_metrics::Counter,
    pub pages_written: lego_metrics::Counter,
    /// Request service time, from the frame read to the answer sent, by
    /// [`OPS`].
    pub requests: [lego_metrics::Histogram; OPS.len()],
    /// Connections accepted, refused at the handshake, and closed for a
    /// malformed, forged or unexpected frame.
    pub connections: lego_metrics::Counter,
    pub refused: lego_metrics::Counter,
    pub bad_frames: lego_metrics::Counter,
}

/// Which of [`OPS`] a request is.
fn op_of(m: &Message<'_>) -> usize {
    match m {
        Message::ReadPages { .. } => 0,
        Message::WritePages { .. } => 1,
        Message::CopyRange { .. } | Message::FillPages { .. } | Message::BeginFill { .. } => 2,
        Message::OpenSpace { .. } | Message::AttachSpace { .. } | Message::ForkSpace { .. } => 4,
        _ => 3,
    }
}

fn scrape(store: &Mutex<Store>, c: &Counters, addr: &str) -> lego_metrics::Scrape {
    use lego_metrics::labels;
    let s = lock(store).stats();
    let mut m = lego_metrics::Scrape::new();
    let me = labels(&[("daemon", addr)]);
    m.gauges(
        &me,
        &[
            (
                "lego_memory_capacity_bytes",
                "Memory this daemon may hold.",
                s.capacity_bytes as f64,
            ),
            (
                "lego_memory_used_bytes",
                "Memory its address spaces' pages take.",
                s.used_bytes as f64,
            ),
            (
                "lego_memory_spaces",
                "Address spaces it holds.",
                s.spaces as f64,
            ),
            (
                "lego_memory_connections",
                "Connections open now.",
                s.connections as f64,
            ),
        ],
    );
    m.counters(
        &me,
        &[
            (
                "lego_memory_connections_accepted",
                "Connections accepted.",
                c.connections.get(),
            ),
            (
                "lego_memory_connections_refused",
                "Connections that failed the handshake (a wrong credential, version or claim).",
                c.refused.get(),
            ),
            (
                "lego_memory_bad_frames",
                "Connections closed for a malformed, forged or unexpected frame.",
                c.bad_frames.get(),
            ),
            (
                "lego_memory_pages_read",
                "Pages read by runtimes (misses and prefetches).",
                c.pages_read.get(),
            ),
            (
                "lego_memory_pages_written",
                "Pages written back by runtimes.",
                c.pages_written.get(),
            ),
        ],
    );
    for (op, h) in OPS.iter().zip(&c.requests) {
        m.histogram(
            "lego_memory_request_seconds",
            "Request service time, from the request read to its answer sent.",
            labels(&[("daemon", addr), ("op", op)]),
            &h.snapshot(),
        );
    }
    m
}

fn serve_connection<S: Stream>(
    stream: S,
    store: Arc<Mutex<Store>>,
    cred: &Credential,
    counters: &Counters,
) {
    let peer = stream.peer();
    lock(&store).connections += 1;
    counters.connections.inc();
    let mut conn = FramedConn::new(stream);
    let mut space: Option<SpaceId> = None;
    let mut handshaken = false;
    // A bug in a handler must not leak the connection's space: caught
    // here, the space is released below like on any other end.
    let ended = lego_transport::run_connection(&peer, || {
        handshake(&mut conn, &store, cred)?;
        handshaken = true;
        request_loop(&mut conn, &store, &mut space, (cred, counters))
    });
    match ended {
        Ok(()) | Err(ConnError::Closed) => {}
        Err(_) if !handshaken => counters.refused.inc(),
        Err(ConnError::Decode(_) | ConnError::Forged | ConnError::Unexpected(_)) => {
            counters.bad_frames.inc()
        }
        Err(_) => {}
    }
    let mut s = lock(&store);
    s.connections -= 1;
    if let Some(id) = space {
        s.release(id);
    }
}

fn handshake<S: Stream>(
    conn: &mut FramedConn<S>,
    store: &Mutex<Store>,
    cred: &Credential,
) -> Result<lego_transport::Peer, ConnError> {
    let capacity_bytes = lock(store).capacity_bytes();
    conn.server_handshake(capacity_bytes, HELLO_TIMEOUT, cred)
}

/// Replies a request can produce (page data goes in the connection's
/// scratch buffer).
enum Reply {
    Done,
    Mapped(VirtAddr),
    BrkIs(VirtAddr),
    Opened(SpaceId),
    Pages,
    Stats(DaemonStats),
    Layout(u64, u64, Vec<(u64, u64)>),
    Copied(u64),
}

/// How long a copy to another daemon may wait for one answer.
const COPY_TIMEOUT: Duration = Duration::from_secs(10);
/// `FillPages` batches a copy keeps in flight.
const COPY_WINDOW: usize = 4;

/// `CopyRange`: sends the pages this daemon holds of `[addr, addr+len)`
/// of the connection's space to the daemon at `to`, which must hold the
/// space already (its runtime attached there first), as `FillPages`.
/// Re-replication goes daemon to daemon: the program's runtime only asks.
fn copy_range(
    store: &Mutex<Store>,
    space: Option<SpaceId>,
    (addr, len): (VirtAddr, u64),
    (to, epoch): (&str, u64),
    cred: &Credential,
) -> Result<Reply, Refusal> {
    use lego_protocol::ErrorCode::{BadState, Invalid};
    let id = space.ok_or_else(|| {
        Refusal(
            BadState,
            "no address space opened on this connection".into(),
        )
    })?;
    if to.len() > lego_protocol::control::MAX_ADDR_BYTES {
        return Err(Refusal(
            Invalid,
            "the copy's target address is too long".into(),
        ));
    }
    let snap = lock(store).snapshot(id, addr, len)?;
    let failed = |e: String| Refusal(Invalid, format!("cannot copy to memory daemon {to}: {e}"));
    let s = Tcp
        .connect(to, Duration::from_secs(5))
        .map_err(|e| failed(e.to_string()))?;
    s.set_read_timeout(Some(COPY_TIMEOUT))
        .map_err(|e| failed(e.to_string()))?;
    let mut c = FramedConn::new(s);
    c.client_handshake(lego_protocol::Role::Runtime, "lego-memory copy", cred)
        .map_err(|e| failed(e.to_string()))?;
    let expect_done = |m: Message<'_>| match m {
        Message::Done => Ok(()),
        Message::Error { message, .. } => Err(failed(message.to_string())),
        other => Err(failed(format!("answered {}", other.describe()))),
    };
    let attach = Message::AttachSpace {
        space: id,
        capability: snap.capability,
        region_base: VirtAddr(snap.region.0),
        region_bytes: snap.region.1,
    };
    let reply = c.call(1, &attach).map_err(|e| failed(e.to_string()))?;
    expect_done(reply.message)?;
    let (mut addrs, mut data) = (Vec::new(), Vec::new());
    let mut in_flight = 0;
    for (k, batch) in snap
        .pages
        .chunks(lego_protocol::MAX_BATCH_PAGES)
        .enumerate()
    {
        addrs.clear();
        data.clear();
        for (a, p) in batch {
            addrs.push(VirtAddr(*a));
            data.extend_from_slice(&p[..]);
        }
        let msg = Message::FillPages {
            epoch,
            addrs: addrs.as_slice().into(),
            data: &data,
        };
        c.send(2 + k as u64, &msg)
            .map_err(|e| failed(e.to_string()))?;
        in_flight += 1;
        if in_flight == COPY_WINDOW {
            let r = c.recv().map_err(|e| failed(e.to_string()))?;
            expect_done(r.message)?;
            in_flight -= 1;
        }
    }
    for _ in 0..in_flight {
        let r = c.recv().map_err(|e| failed(e.to_string()))?;
        expect_done(r.message)?;
    }
    Ok(Reply::Copied(snap.pages.len() as u64))
}

fn request_loop<S: Stream>(
    conn: &mut FramedConn<S>,
    store: &Mutex<Store>,
    space: &mut Option<SpaceId>,
    (cred, counters): (&Credential, &Counters),
) -> Result<(), ConnError> {
    let mut pages = Vec::new();
    loop {
        let f = conn.recv()?;
        let started = std::time::Instant::now();
        let id = f.request_id;
        let op = op_of(&f.message);
        match &f.message {
            Message::ReadPages { addrs } => counters.pages_read.add(addrs.len() as u64),
            Message::WritePages { addrs, .. } => counters.pages_written.add(addrs.len() as u64),
            _ => {}
        }
        let result = match f.message {
            // Network I/O of its own: never under the store's lock.
            Message::CopyRange {
                addr,
                len,
                to,
                epoch,
            } => copy_range(store, *space, (addr, len), (to, epoch), cred),
            msg => {
                let mut st = lock(store);
                handle(&mut st, space, msg, &mut pages)
            }
        };
        match result {
            Ok(Reply::Done) => conn.send(id, &Message::Done)?,
            Ok(Reply::Mapped(addr)) => conn.send(id, &Message::Mapped { addr })?,
            Ok(Reply::BrkIs(brk)) => conn.send(id, &Message::BrkIs { brk })?,
            Ok(Reply::Opened(space)) => conn.send(id, &Message::SpaceOpened { space })?,
            Ok(Reply::Pages) => conn.send(id, &Message::Pages { data: &pages })?,
            Ok(Reply::Stats(s)) => conn.send(id, &Message::Stats(s))?,
            Ok(Reply::Copied(pages)) => conn.send(id, &Message::Copied { pages })?,
            Ok(Reply::Layout(brk_start, brk, mappings)) => conn.send(
                id,
                &Message::Layout {
                    brk_start: VirtAddr(brk_start),
                    brk: VirtAddr(brk),
                    mappings,
                },
            )?,
            Err(Refusal(code, message)) => conn.send(
                id,
                &Message::Error {
                    code,
                    message: &message,
                },
            )?,
        }
        counters.requests[op].observe(started.elapsed());
    }
}

/// A connection serves one address space, set up once.
fn no_space_yet(space: &Option<SpaceId>) -> Result<(), Refusal> {
    match space {
        Some(_) => Err(Refusal(
            lego_protocol::ErrorCode::BadState,
            "connection already has a space".into(),
        )),
        None => Ok(()),
    }
}

fn handle(
    st: &mut Store,
    space: &mut Option<SpaceId>,
    msg: Message<'_>,
    pages: &mut Vec<u8>,
) -> Result<Reply, Refusal> {
    use lego_protocol::ErrorCode::{BadState, Invalid};
    let need = |space: &Option<SpaceId>| {
        space.ok_or_else(|| {
            Refusal(
                BadState,
                "no address space opened on this connection".into(),
            )
        })
    };
    match msg {
        Message::OpenSpace {
            region_base,
            region_bytes,
            bootstrap_bytes,
            capability,
            ..
        } => {
            no_space_yet(space)?;
            let id = st.open(region_base, region_bytes, bootstrap_bytes, capability)?;
            *space = Some(id);
            Ok(Reply::Opened(id))
        }
        Message::AttachSpace {
            space: id,
            capability,
            region_base,
            region_bytes,
        } => {
            no_space_yet(space)?;
            st.attach(id, capability, region_base, region_bytes)?;
            *space = Some(id);
            Ok(Reply::Done)
        }
        Message::ForkSpace {
            parent,
            parent_capability,
            child,
            child_capability,
        } => {
            no_space_yet(space)?;
            let id = st.fork(
                parent,
                parent_capability,
                (child.0 != 0).then_some(child),
                child_capability,
            )?;
            *space = Some(id);
            Ok(Reply::Opened(id))
        }
        Message::Mmap { len } => st.mmap(need(space)?, len).map(Reply::Mapped),
        Message::Munmap { addr, len } => st.munmap(need(space)?, addr, len).map(|_| Reply::Done),
        Message::Mremap {
            old,
            old_len,
            new_len,
            may_move,
        } => st
            .mremap(need(space)?, old, old_len, new_len, may_move)
            .map(Reply::Mapped),
        Message::Brk { new_brk } => st.brk(need(space)?, new_brk).map(Reply::BrkIs),
        Message::Discard { addr, len } => st.discard(need(space)?, addr, len).map(|_| Reply::Done),
        Message::ReadPages { addrs } => st
            .read_pages(need(space)?, &addrs, pages)
            .map(|_| Reply::Pages),
        Message::WritePages { addrs, data } => st
            .write_pages(need(space)?, &addrs, data)
            .map(|_| Reply::Done),
        Message::FillPages { epoch, addrs, data } => st
            .fill_pages(need(space)?, epoch, &addrs, data)
            .map(|_| Reply::Done),
        Message::BeginFill { addr, len, epoch } => st
            .begin_fill(need(space)?, addr, len, epoch)
            .map(|_| Reply::Done),
        Message::GetStats => Ok(Reply::Stats(st.stats())),
        Message::GetLayout => {
            let (brk_start, brk, mappings) = st.get_layout(need(space)?)?;
            Ok(Reply::Layout(brk_start, brk, mappings))
        }
        Message::Layout {
            brk_start,
            brk,
            mappings,
        } => st
            .set_layout(need(space)?, brk_start.0, brk.0, &mappings)
            .map(|_| Reply::Done),
        other => Err(Refusal(
            Invalid,
            format!("{} is not a request a memory daemon serves", other.name()),
        )),
    }
}

/// Asks a daemon for its counters (for `lego` commands and tests).
pub fn query_stats(addr: &str, cred: &Credential) -> Result<DaemonStats, ConnError> {
    let s = Tcp.connect(addr, Duration::from_secs(3)).map_err(|e| {
        ConnError::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            e.to_string(),
        ))
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut c = FramedConn::new(s);
    c.client_handshake(lego_protocol::Role::Client, "lego", cred)?;
    match c.call(1, &Message::GetStats)?.message {
        Message::Stats(s) => Ok(s),
        other => Err(ConnError::Unexpected(format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn daemon() -> (MemoryDaemon, Credential) {
        let cred = Credential::generate().unwrap();
        (
            MemoryDaemon::start("127.0.0.1:0", 1 << 20, cred.clone()).unwrap(),
            cred,
        )
    }

    fn client(addr: &str) -> FramedConn<std::net::TcpStream> {
        let s = Tcp.connect(addr, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        FramedConn::new(s)
    }

    #[test]
    fn garbage_closes_only_that_connection() {
        let (d, cred) = daemon();
        let mut good = client(d.addr());
        good.client_handshake(lego_protocol::Role::Client, "t", &cred)
            .unwrap();
        let mut bad = Tcp.connect(d.addr(), Duration::from_secs(2)).unwrap();
        bad.write_all(&[0xff; 64]).unwrap();
        let mut buf = [0u8; 16];
        bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(
            bad.read(&mut buf).unwrap_or(0),
            0,
            "bad peer is disconnected"
        );
        // The good connection still works.
        assert!(matches!(
            good.call(1, &Message::GetStats).unwrap().message,
            Message::Stats(_)
        ));
        d.shutdown();
    }

    #[test]
    fn wrong_version_is_refused_with_a_reason() {
        let (d, _) = daemon();
        let mut c = client(d.addr());
        let r = c
            .call(
                0,
                &Message::Hello {
                    version: lego_protocol::PROTOCOL_VERSION + 7,
                    role: lego_protocol::Role::Runtime,
                    name: "future",
                },
            )
            .unwrap();
        match r.message {
            Message::Refused { reason } => assert!(reason.contains("version"), "{reason}"),
            other => panic!("expected refusal, got {other:?}"),
        }
        d.shutdown();
    }

    #[test]
    fn space_is_freed_when_its_connection_closes() {
        let (d, cred) = daemon();
        let mut c = client(d.addr());
        c.client_handshake(lego_protocol::Role::Runtime, "t", &cred)
            .unwrap();
        let base = VirtAddr(1 << 40);
        let m = c
            .call(
                1,
                &Message::OpenSpace {
                    pid: 1,
                    program: "t",
                    region_base: base,
                    region_bytes: 4 << 30,
                    bootstrap_bytes: 0,
                    capability: lego_protocol::Capability([9; 16]),
                },
            )
            .unwrap()
            .message
            .clone();
        assert!(matches!(m, Message::SpaceOpened { .. }));
        let addr = match c.call(2, &Message::Mmap { len: 4096 }).unwrap().message {
            Message::Mapped { addr } => addr,
            other => panic!("{other:?}"),
        };
        let page = vec![3u8; 4096];
        let r = c
            .call(
                3,
                &Message::WritePages {
                    addrs: vec![addr].into(),
                    data: &page,
                },
            )
            .unwrap();
        assert_eq!(r.message, Message::Done);
        assert_eq!(d.stats().used_bytes, 4096);
        drop(c);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while d.stats().used_bytes != 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(d.stats().used_bytes, 0);
        assert_eq!(d.stats().spaces, 0);
        d.shutdown();
    }

    #[test]
    fn page_traffic_before_a_space_is_an_error_not_a_disconnect() {
        let (d, cred) = daemon();
        let mut c = client(d.addr());
        c.client_handshake(lego_protocol::Role::Runtime, "t", &cred)
            .unwrap();
        let r = c
            .call(
                1,
                &Message::ReadPages {
                    addrs: vec![VirtAddr(0)].into(),
                },
            )
            .unwrap();
        assert!(matches!(r.message, Message::Error { .. }));
        assert!(matches!(
            c.call(2, &Message::GetStats).unwrap().message,
            Message::Stats(_)
        ));
        d.shutdown();
    }

    fn open(c: &mut FramedConn<std::net::TcpStream>, cap: lego_protocol::Capability) -> SpaceId {
        let m = c
            .call(
                1,
                &Message::OpenSpace {
                    pid: 1,
                    program: "t",
                    region_base: VirtAddr(1 << 40),
                    region_bytes: 4 << 30,
                    bootstrap_bytes: 0,
                    capability: cap,
                },
            )
            .unwrap()
            .message
            .clone();
        match m {
            Message::SpaceOpened { space } => space,
            other => panic!("{other:?}"),
        }
    }

    fn refused_with(m: &Message<'_>, code: lego_protocol::ErrorCode) -> bool {
        matches!(m, Message::Error { code: c, .. } if *c == code)
    }

    #[test]
    fn another_programs_space_cannot_be_attached_forked_read_or_squatted() {
        use lego_protocol::{Capability, ErrorCode};
        let (d, cred) = daemon();
        let connect = || {
            let mut c = client(d.addr());
            c.client_handshake(lego_protocol::Role::Runtime, "t", &cred)
                .unwrap();
            c
        };
        let mut owner = connect();
        let secret = Capability([0x11; 16]);
        let space = open(&mut owner, secret);
        let addr = match owner.call(2, &Message::Mmap { len: 4096 }).unwrap().message {
            Message::Mapped { addr } => addr,
            other => panic!("{other:?}"),
        };
        let page = vec![0x42u8; 4096];
        let w = owner
            .call(
                3,
                &Message::WritePages {
                    addrs: vec![addr].into(),
                    data: &page,
                },
            )
            .unwrap();
        assert_eq!(w.message, Message::Done);
        // Another client of the cluster, guessing the capability.
        let guess = Capability([0x12; 16]);
        let mut thief = connect();
        let r = thief
            .call(
                1,
                &Message::AttachSpace {
                    space,
                    capability: guess,
                    region_base: VirtAddr(1 << 40),
                    region_bytes: 4 << 30,
                },
            )
            .unwrap();
        assert!(refused_with(&r.message, ErrorCode::NoSpace), "{r:?}");
        let r = thief
            .call(
                2,
                &Message::ForkSpace {
                    parent: space,
                    parent_capability: guess,
                    child: SpaceId(0),
                    child_capability: guess,
                },
            )
            .unwrap();
        assert!(refused_with(&r.message, ErrorCode::NoSpace), "{r:?}");
        // Without a space of its own, no page traffic at all.
        let r = thief
            .call(
                3,
                &Message::ReadPages {
                    addrs: vec![addr].into(),
                },
            )
            .unwrap();
        assert!(refused_with(&r.message, ErrorCode::BadState), "{r:?}");
        let r = thief
            .call(
                4,
                &Message::WritePages {
                    addrs: vec![addr].into(),
                    data: &[0u8; 4096],
                },
            )
            .unwrap();
        assert!(refused_with(&r.message, ErrorCode::BadState), "{r:?}");
        // Squatting: attach to the ids around this one first; the next
        // program's space is none of them, and survives the squatter.
        let squats: Vec<_> = (1..=20u64)
            .map(|k| {
                let mut c = connect();
                let r = c
                    .call(
                        1,
                        &Message::AttachSpace {
                            space: SpaceId(space.0.wrapping_add(k)),
                            capability: guess,
                            region_base: VirtAddr(1 << 40),
                            region_bytes: 4 << 30,
                        },
                    )
                    .unwrap();
                assert_eq!(r.message, Message::Done);
                c
            })
            .collect();
        let mut next = connect();
        let next_space = open(&mut next, Capability([0x33; 16]));
        assert!(next_space.0.abs_diff(space.0) > 20, "{next_space:?}");
        drop(squats);
        drop(thief);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while d.stats().spaces != 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(d.stats().spaces, 2, "the owner's and the next program's");
        // The owner's page is untouched.
        match owner
            .call(
                5,
                &Message::ReadPages {
                    addrs: vec![addr].into(),
                },
            )
            .unwrap()
            .message
        {
            Message::Pages { data } => assert_eq!(data, &page[..]),
            other => panic!("{other:?}"),
        }
        d.shutdown();
    }

    fn read(c: &mut FramedConn<std::net::TcpStream>, addrs: &[VirtAddr]) -> Vec<u8> {
        match c
            .call(
                9,
                &Message::ReadPages {
                    addrs: addrs.to_vec().into(),
                },
            )
            .unwrap()
            .message
        {
            Message::Pages { data } => data.to_vec(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_range_is_copied_daemon_to_daemon_without_overwriting_newer_pages_or_taking_stale_fills() {
        use lego_protocol::Capability;
        let cred = Credential::generate().unwrap();
        let a = MemoryDaemon::start("127.0.0.1:0", 1 << 20, cred.clone()).unwrap();
        let b = MemoryDaemon::start("127.0.0.1:0", 1 << 20, cred.clone()).unwrap();
        let connect = |addr: &str| {
            let mut c = client(addr);
            c.client_handshake(lego_protocol::Role::Runtime, "t", &cred)
                .unwrap();
            c
        };
        let cap = Capability([7; 16]);
        let mut at_a = connect(a.addr());
        let space = open(&mut at_a, cap);
        let base = match at_a
            .call(2, &Message::Mmap { len: 16 * 4096 })
            .unwrap()
            .message
        {
            Message::Mapped { addr } => addr.0,
            other => panic!("{other:?}"),
        };
        let addrs: Vec<VirtAddr> = (0..4).map(|k| VirtAddr(base + k * 4096)).collect();
        let data: Vec<u8> = (0..4u8).flat_map(|k| [k + 1; 4096]).collect();
        let w = at_a
            .call(
                3,
                &Message::WritePages {
                    addrs: addrs.clone().into(),
                    data: &data,
                },
            )
            .unwrap();
        assert_eq!(w.message, Message::Done);
        // The runtime attaches at b and writes page 2 there first (a write
        // made after the copy began).
        let mut at_b = connect(b.addr());
        let attach = Message::AttachSpace {
            space,
            capability: cap,
            region_base: VirtAddr(1 << 40),
            region_bytes: 4 << 30,
        };
        assert_eq!(at_b.call(1, &attach).unwrap().message, Message::Done);
        let begin = Message::BeginFill {
            addr: VirtAddr(base),
            len: 16 * 4096,
            epoch: 5,
        };
        assert_eq!(at_b.call(3, &begin).unwrap().message, Message::Done);
        let newer = [0xee; 4096];
        let w = at_b
            .call(
                2,
                &Message::WritePages {
                    addrs: vec![addrs[2]].into(),
                    data: &newer,
                },
            )
            .unwrap();
        assert_eq!(w.message, Message::Done);
        // A copy of an earlier fill (epoch 4) arriving late stores nothing.
        let stale = Message::CopyRange {
            addr: VirtAddr(base),
            len: 16 * 4096,
            to: b.addr(),
            epoch: 4,
        };
        assert_eq!(
            at_a.call(4, &stale).unwrap().message,
            Message::Copied { pages: 4 }
        );
        assert_eq!(b.stats().used_bytes, 4096, "only the program's own write");
        let copy = Message::CopyRange {
            addr: VirtAddr(base),
            len: 16 * 4096,
            to: b.addr(),
            epoch: 5,
        };
        assert_eq!(
            at_a.call(4, &copy).unwrap().message,
            Message::Copied { pages: 4 }
        );
        let got = read(&mut at_b, &addrs);
        assert_eq!(&got[..4096], &data[..4096]);
        assert_eq!(&got[2 * 4096..3 * 4096], &newer[..], "not overwritten");
        assert_eq!(&got[3 * 4096..], &data[3 * 4096..]);
        assert_eq!(b.stats().used_bytes, 4 * 4096);
        // A copy to nowhere, or before a space, is an error; the
        // connection goes on.
        let nowhere = Message::CopyRange {
            addr: VirtAddr(base),
            len: 4096,
            to: "127.0.0.1:1",
            epoch: 5,
        };
        let r = at_a.call(5, &nowhere).unwrap();
        assert!(
            matches!(&r.message, Message::Error { message, .. } if message.contains("cannot copy")),
            "{r:?}"
        );
        let mut fresh = connect(a.addr());
        let r = fresh.call(1, &copy).unwrap();
        assert!(matches!(r.message, Message::Error { .. }), "{r:?}");
        assert_eq!(read(&mut at_a, &addrs[..1]), &data[..4096]);
        a.shutdown();
        b.shutdown();
    }

    #[test]
    fn sizes_that_overflow_get_an_error_and_the_connection_goes_on() {
        let (d, cred) = daemon();
        let mut c = client(d.addr());
        c.client_handshake(lego_protocol::Role::Runtime, "t", &cred)
            .unwrap();
        open(&mut c, lego_protocol::Capability([5; 16]));
        let addr = match c.call(2, &Message::Mmap { len: 8192 }).unwrap().message {
            Message::Mapped { addr } => addr,
            other => panic!("{other:?}"),
        };
        for (k, len) in [u64::MAX, u64::MAX - 4095, 1 << 63].into_iter().enumerate() {
            let r = c
                .call(
                    10 + k as u64,
                    &Message::Mremap {
                        old: addr,
                        old_len: 8192,
                        new_len: len,
                        may_move: true,
                    },
                )
                .unwrap();
            assert!(matches!(r.message, Message::Error { .. }), "{r:?}");
            let r = c.call(20 + k as u64, &Message::Mmap { len }).unwrap();
            assert!(matches!(r.message, Message::Error { .. }), "{r:?}");
        }
        assert!(matches!(
            c.call(30, &Message::GetStats).unwrap().message,
            Message::Stats(s) if s.spaces == 1
        ));
        d.shutdown();
    }
}
