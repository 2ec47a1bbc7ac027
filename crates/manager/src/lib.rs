//! The lego global manager (LegoOS's GPM and GMM in one daemon): knows every
//! component (register, heartbeat, leave, failure after a silent timeout),
//! places the memory of address spaces on memory daemons by free capacity
//! and new programs on processor daemons by load and ExCache headroom.
//!
//! The logic is [`state::Cluster`], a pure state machine; this module wraps
//! it in a TCP server, one thread per connection, and stores every change in
//! its store ([`store::Store`]: the embedded database, [`db`]) before
//! answering, so a manager killed and restarted finds the same cluster. Components re-register on their own
//! when their connection breaks; programs keep running meanwhile (they ask
//! the manager only to place new memory).

#![deny(unsafe_code)]

pub mod db;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(test)]
mod fuzz_tests;
pub mod standby;
pub mod state;
pub mod store;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lego_protocol::control::{self, Reply, Request};
use lego_protocol::Message;
use lego_transport::auth::{Credential, Identity};
use lego_transport::{ConnError, FramedConn, Listener, Stream, Tcp, Transport};

use db::Db;
use state::Cluster;

/// How long a new connection may take to say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may stay silent (components heartbeat every
/// second; clients ask and leave).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error(transparent)]
    Listen(#[from] lego_transport::TransportError),
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("state database: {0}")]
    Load(String),
}

struct Inner {
    cluster: Mutex<Cluster>,
    db: Box<dyn store::Store>,
    /// Changes the store refused, and how many of them the cluster was
    /// rebuilt after: a refused change is in `cluster` all the same, so
    /// while the two differ it is rebuilt from the store before it acts
    /// again.
    refused: std::sync::atomic::AtomicU64,
    reloaded: std::sync::atomic::AtomicU64,
    /// What rebuilding takes: heartbeat timeout, replicas, vNode network.
    options: (u64, usize, (u32, u8)),
    /// Its own address, for `lego status`.
    addr: String,
    epoch: Instant,
    counters: Counters,
}

/// What the manager counts for its metrics.
#[derive(Default)]
struct Counters {
    /// Time to answer a placement (memory, process), its store included.
    place_memory: lego_metrics::Histogram,
    place_process: lego_metrics::Histogram,
    /// Components marked failed (no heartbeat within the timeout).
    failures: lego_metrics::Counter,
    /// Drains begun.
    drains: lego_metrics::Counter,
    /// Requests refused to a peer not allowed to make them.
    refused: lego_metrics::Counter,
}

impl Inner {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn lock(&self) -> MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cluster, rebuilt from the store first if a change was refused
    /// since (and the store's error if it cannot be). The store is read
    /// without the cluster's lock, so other requests wait for the lock,
    /// not for the store.
    fn current(&self) -> Result<MutexGuard<'_, Cluster>, String> {
        let mut refused = self.refused.load(Ordering::SeqCst);
        while refused == self.reloaded.load(Ordering::SeqCst) {
            let c = self.lock();
            // Changes are stored under the lock: none was refused while
            // this one waited for it, or the cluster must be read back.
            let now = self.refused.load(Ordering::SeqCst);
            if now == refused {
                return Ok(c);
            }
            refused = now;
        }
        let (timeout_ms, replicas, vnode_net) = self.options;
        let loaded = self.db.load(timeout_ms, self.now()).map_err(|e| {
            format!("the manager cannot read its state back after a change it could not store: {e}")
        })?;
        let mut c = self.lock();
        // Refused again while it read: what it read may be older than
        // that change's outcome.
        if self.refused.load(Ordering::SeqCst) != refused {
            return Err("the manager's store refused a change while it read its state back".into());
        }
        if self.reloaded.swap(refused, Ordering::SeqCst) != refused {
            *c = loaded.with_replicas(replicas).with_vnode_net(vnode_net);
            tracing::info!("state read back from the store after a refused change");
        }
        Ok(c)
    }

    /// Stores `changes` of `c`; if the store refuses, the cluster in memory
    /// holds a change that is not stored: it is rebuilt before its next
    /// use ([`Inner::current`]).
    fn save(&self, c: &Cluster, changes: &state::Changes) -> Result<(), String> {
        let saved = self.db.save(c, changes);
        if let Err(e) = &saved {
            tracing::error!(error = %e, "cannot store a change: not made");
            self.refused.fetch_add(1, Ordering::SeqCst);
        }
        saved
    }

    /// Applies a request and stores what changed before answering.
    fn apply(&self, req: Request) -> Reply {
        let started = Instant::now();
        let timed = match &req {
            Request::PlaceMemory { .. } => Some(&self.counters.place_memory),
            Request::PlaceProcess { .. } => Some(&self.counters.place_process),
            _ => None,
        };
        let drain = matches!(req, Request::Drain { .. });
        if !self.db.leading() {
            return unsure();
        }
        let mut c = match self.current() {
            Ok(c) => c,
            Err(message) => return Reply::Unavailable { message },
        };
        let (reply, changes) = c.apply(self.now(), req);
        // What changes nothing is not fenced by the store: answered only
        // while the lease is still good (the lock or a read-back may have
        // taken a while).
        if changes.is_empty() && !self.db.leading() {
            return unsure();
        }
        let saved = self.save(&c, &changes);
        drop(c);
        if let Some(h) = timed {
            h.observe(started.elapsed());
        }
        if drain && !matches!(reply, Reply::Error { .. }) {
            self.counters.drains.inc();
        }
        match saved {
            Ok(()) => reply,
            Err(e) => Reply::Unavailable {
                message: format!("the manager cannot store the change, so made none: {e}"),
            },
        }
    }
}

/// The answer of a manager whose lease may have ended.
fn unsure() -> Reply {
    Reply::Unavailable {
        message: "this manager cannot be sure it still leads; ask again".into(),
    }
}

/// A running global manager.
pub struct Manager {
    addr: String,
    inner: Arc<Inner>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Manager {
    /// Opens the state in `state_dir`, binds `listen` and serves the peers
    /// `cred` (the cluster credential) vouches for; a component silent for
    /// `timeout` is marked failed; each unit of memory gets `replicas`
    /// replicas on different memory daemons.
    pub fn start(
        listen: &str,
        state_dir: &Path,
        (timeout, replicas): (Duration, usize),
        cred: Credential,
    ) -> Result<Self, ManagerError> {
        Self::start_with(
            listen,
            state_dir,
            (timeout, replicas, state::DEFAULT_VNODE_NET),
            cred,
        )
    }

    /// [`Manager::start`], with vNodes' vIPs from `vnode_net` (address,
    /// prefix length).
    pub fn start_with(
        listen: &str,
        state_dir: &Path,
        (timeout, replicas, vnode_net): (Duration, usize, (u32, u8)),
        cred: Credential,
    ) -> Result<Self, ManagerError> {
        let db = Db::open(state_dir)?;
        let listener = Tcp.listen(listen)?;
        let addr = Listener::local_addr(&listener);
        Self::serve_on(
            listener,
            &addr,
            Box::new(db),
            (timeout, replicas, vnode_net),
            cred,
        )
    }

    /// Serves on `listener` (bound already: by a standby, see [`standby`]),
    /// its state in `db` (any [`store::Store`]); `addr` is the address it
    /// tells clients it has.
    pub fn serve_on(
        listener: std::net::TcpListener,
        addr: &str,
        db: Box<dyn store::Store>,
        (timeout, replicas, vnode_net): (Duration, usize, (u32, u8)),
        cred: Credential,
    ) -> Result<Self, ManagerError> {
        let timeout_ms = timeout.as_millis().max(1) as u64;
        let cluster = db
            .load(timeout_ms, 0)
            .map_err(ManagerError::Load)?
            .with_replicas(replicas)
            .with_vnode_net(vnode_net);
        let addr = addr.to_string();
        let inner = Arc::new(Inner {
            cluster: Mutex::new(cluster),
            db,
            refused: Default::default(),
            reloaded: Default::default(),
            options: (timeout_ms, replicas, vnode_net),
            addr: addr.clone(),
            epoch: Instant::now(),
            counters: Counters::default(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let inner = inner.clone();
            let cred = Arc::new(cred);
            lego_transport::serve_connections(listener, "lego-manager", stop.clone(), move |s| {
                serve_connection(s, inner.clone(), &cred)
            })
        };
        let ticker = {
            let (inner, stop) = (inner.clone(), stop.clone());
            let period = Duration::from_millis((timeout_ms / 10).clamp(10, 500));
            std::thread::Builder::new()
                .name("lego-manager-tick".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(period);
                        let Ok(mut c) = inner.current() else {
                            continue;
                        };
                        let changes = c.tick(inner.now());
                        for id in &changes.components {
                            tracing::warn!(id, addr = %c.components[id].addr, "component failed: no heartbeat within the timeout");
                            inner.counters.failures.inc();
                        }
                        if !changes.placed.is_empty() {
                            tracing::warn!(units = changes.placed.len(), "units lost a replica: degraded until their programs restore them");
                        }
                        let _ = inner.save(&c, &changes);
                    }
                })
                .expect("spawn ticker thread")
        };
        Ok(Self {
            addr,
            inner,
            stop,
            threads: vec![accept, ticker],
        })
    }

    /// The address components and clients connect to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The cluster now (for tests).
    pub fn status(&self) -> control::ClusterStatus {
        self.inner.lock().status(self.inner.now())
    }

    /// What builds its metrics at each scrape (`lego manager --metrics`).
    pub fn scraper(&self) -> lego_metrics::http::ScrapeFn {
        let inner = self.inner.clone();
        Arc::new(move || scrape(&inner))
    }

    /// Serves until the process ends.
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Stops serving (connections in progress end with their peers).
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = Tcp.connect(&self.addr, Duration::from_secs(1));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn scrape(inner: &Inner) -> lego_metrics::Scrape {
    use lego_metrics::labels;
    use lego_protocol::control::{Kind, State};
    let (status, units, vnodes) = {
        let c = inner.lock();
        (c.status(inner.now()), c.placements.len(), c.vnodes.len())
    };
    let mut m = standby::scrape(inner.db.leading());
    for kind in [Kind::Memory, Kind::Processor, Kind::Storage] {
        for state in [State::Alive, State::Draining, State::Failed, State::Left] {
            let n = status
                .components
                .iter()
                .filter(|c| c.kind == kind && c.state == state)
                .count();
            m.gauge(
                "lego_manager_components",
                "Components known to the manager, by kind and state.",
                labels(&[("kind", &kind.to_string()), ("state", &state.to_string())]),
                n as f64,
            );
        }
    }
    for (kind, what) in [(Kind::Memory, "memory"), (Kind::Processor, "processor")] {
        let (cap, used) = status
            .components
            .iter()
            .filter(|c| c.kind == kind && matches!(c.state, State::Alive | State::Draining))
            .fold((0, 0), |(c, u), x| (c + x.capacity_bytes, u + x.used_bytes));
        m.gauge(
            "lego_manager_capacity_bytes",
            "Capacity of the live components (memory: page memory; processor: ExCache budget).",
            labels(&[("kind", what)]),
            cap as f64,
        );
        m.gauge(
            "lego_manager_used_bytes",
            "What the live components use of it.",
            labels(&[("kind", what)]),
            used as f64,
        );
    }
    m.gauges(
        &vec![],
        &[
            (
                "lego_manager_units",
                "Placed units of memory (16 MiB of an address space, each with its replicas).",
                units as f64,
            ),
            (
                "lego_manager_degraded_units",
                "Units that lost a replica and are not whole again yet.",
                status.degraded_units as f64,
            ),
            (
                "lego_manager_programs",
                "Programs the processor daemons run.",
                status.processes.len() as f64,
            ),
            ("lego_manager_vnodes", "vNodes.", vnodes as f64),
        ],
    );
    let c = &inner.counters;
    for (what, h) in [("memory", &c.place_memory), ("process", &c.place_process)] {
        m.histogram(
            "lego_manager_placement_seconds",
            "Time to answer a placement, its store to disk included.",
            labels(&[("what", what)]),
            &h.snapshot(),
        );
    }
    m.counters(
        &vec![],
        &[
            (
                "lego_manager_failures",
                "Components marked failed (no heartbeat within the timeout).",
                c.failures.get(),
            ),
            ("lego_manager_drains", "Drains begun.", c.drains.get()),
            (
                "lego_manager_refused_requests",
                "Requests refused to a peer not allowed to make them.",
                c.refused.get(),
            ),
        ],
    );
    m
}

fn serve_connection<S: Stream>(stream: S, inner: Arc<Inner>, cred: &Credential) {
    let peer = stream.peer();
    let mut conn = FramedConn::new(stream);
    let result = conn
        .server_handshake(0, HELLO_TIMEOUT, cred)
        .and_then(|who| {
            conn.be_patient(Some(IDLE_TIMEOUT))?;
            request_loop(&mut conn, &inner, (&who.identity, &peer))
        });
    match result {
        Ok(()) | Err(ConnError::Closed) => tracing::debug!(%peer, "connection closed"),
        Err(e) => tracing::warn!(%peer, error = %e, "closing connection"),
    }
}

/// What a peer may ask: the cluster's components and operators anything;
/// a user places its programs and their memory and sees the cluster
/// without the spaces and programs in it (see docs/security.md).
fn authorize(who: &Identity, req: &Request) -> Result<(), String> {
    match (who, req) {
        (Identity::Cluster, _) => Ok(()),
        (
            Identity::User(_),
            Request::PlaceMemory { .. }
            | Request::Restored { .. }
            | Request::PlaceProcess { .. }
            | Request::Draining
            | Request::Status,
        ) => Ok(()),
        (Identity::User(_), other) => Err(format!(
            "{who} may not {}: only the cluster's components and operators may",
            other.verb()
        )),
    }
}

fn request_loop<S: Stream>(
    conn: &mut FramedConn<S>,
    inner: &Inner,
    (who, peer): (&Identity, &str),
) -> Result<(), ConnError> {
    loop {
        let f = conn.recv()?;
        let id = f.request_id;
        let reply = match f.message {
            Message::Control { json } => match control::from_json::<Request>(json) {
                Ok(req) => match authorize(who, &req) {
                    Ok(()) => match (who, inner.apply(req)) {
                        (Identity::User(_), Reply::Status(mut s)) => {
                            s.spaces.clear();
                            s.processes.clear();
                            s.recoveries.clear();
                            Reply::Status(s)
                        }
                        (_, reply) => reply,
                    },
                    Err(message) => {
                        inner.counters.refused.inc();
                        tracing::warn!(%peer, %who, reason = %message, "request refused");
                        Reply::Error { message }
                    }
                },
                Err(message) => {
                    tracing::warn!(%peer, reason = %message, "malformed request");
                    Reply::Error { message }
                }
            },
            other => Reply::Error {
                message: format!(
                    "{} is not a request the global manager serves",
                    other.name()
                ),
            },
        };
        let reply = match reply {
            Reply::Status(mut s) => {
                s.manager = inner.addr.clone();
                // Where the state is: operators' business.
                if *who == Identity::Cluster {
                    s.store = inner.db.health();
                }
                Reply::Status(s)
            }
            other => other,
        };
        let mut json = control::to_json(&reply);
        // A cluster with many programs: its status without their counters.
        if let (true, Reply::Status(mut s)) = (json.len() > lego_protocol::MAX_CONTROL_BYTES, reply)
        {
            s.processes
                .iter_mut()
                .for_each(|p| p.process.counters = None);
            json = control::to_json(&Reply::Status(s));
        }
        if json.len() > lego_protocol::MAX_CONTROL_BYTES {
            json = control::to_json(&Reply::Error {
                message: format!(
                    "the answer ({} bytes) exceeds the frame limit of {} bytes",
                    json.len(),
                    lego_protocol::MAX_CONTROL_BYTES
                ),
            });
        }
        conn.send(id, &Message::Control { json: &json })?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lego_protocol::control::Kind;
    use lego_transport::{control_call, ControlClient};

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("lego-mgr-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn state_survives_a_restart_and_garbage_gets_an_error() {
        let dir = tmp("restart");
        let cred = Credential::generate().unwrap();
        let m = Manager::start(
            "127.0.0.1:0",
            &dir,
            (Duration::from_secs(5), 1),
            cred.clone(),
        )
        .unwrap();
        let t = Duration::from_secs(5);
        let r = control_call(
            m.addr(),
            &Request::Register {
                kind: Kind::Memory,
                addr: "127.0.0.1:9".into(),
                capacity_bytes: 64 << 20,
                id: None,
                key: String::new(),
                zone: String::new(),
            },
            t,
            &cred,
        )
        .unwrap();
        assert!(matches!(r, Reply::Registered { id: 1, .. }), "{r:?}");
        let mut c = ControlClient::connect(m.addr(), "t", t, &cred).unwrap();
        let placed = c
            .call(&Request::PlaceMemory {
                space: 3,
                unit: 0,
                keep: vec![],
                avoid: vec![],
            })
            .unwrap();
        assert!(
            matches!(&placed, Reply::Placed { replicas } if replicas[0].id == 1),
            "{placed:?}"
        );
        drop(c);
        m.shutdown();

        // The old connection threads let go of the database a moment after
        // their peers leave.
        let m = (0..100)
            .find_map(|_| {
                let m = Manager::start(
                    "127.0.0.1:0",
                    &dir,
                    (Duration::from_secs(5), 1),
                    cred.clone(),
                )
                .ok();
                if m.is_none() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                m
            })
            .expect("restarts");
        let s = m.status();
        assert_eq!(s.components.len(), 1);
        assert_eq!(s.spaces[0].units, [(1, 1)]);
        // A frame that is not a control request, and a malformed one.
        let mut c = ControlClient::connect(m.addr(), "t", t, &cred).unwrap();
        let e = c
            .call(&Request::Heartbeat {
                id: 42,
                key: String::new(),
                used_bytes: 0,
                load: 0,
                spaces: vec![],
                processes: vec![],
            })
            .unwrap();
        assert!(matches!(e, Reply::Error { .. }));
        m.shutdown();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A memory daemon of 64 MiB at 127.0.0.1:`port` registering.
    pub(crate) fn register_memory(port: u16) -> Request {
        Request::Register {
            kind: Kind::Memory,
            addr: format!("127.0.0.1:{port}"),
            capacity_bytes: 64 << 20,
            id: None,
            key: String::new(),
            zone: String::new(),
        }
    }

    /// The embedded store, refusing every write while `refuse` is set.
    struct Refusing {
        db: Db,
        refuse: Arc<AtomicBool>,
    }

    impl store::Store for Refusing {
        fn load(&self, timeout_ms: u64, now: u64) -> Result<Cluster, String> {
            if self.refuse.load(Ordering::SeqCst) {
                return Err("the store is away".into());
            }
            self.db.load(timeout_ms, now)
        }
        fn save(&self, c: &Cluster, changes: &state::Changes) -> Result<(), String> {
            if self.refuse.load(Ordering::SeqCst) && !changes.is_empty() {
                return Err("the store is away".into());
            }
            self.db.save(c, changes)
        }
        fn health(&self) -> String {
            "refusing".into()
        }
    }

    #[test]
    fn a_change_the_store_refused_is_not_made() {
        let dir = tmp("refused");
        let cred = Credential::generate().unwrap();
        let refuse = Arc::new(AtomicBool::new(false));
        let store = Refusing {
            db: Db::open(&dir).unwrap(),
            refuse: refuse.clone(),
        };
        let listener = Tcp.listen("127.0.0.1:0").unwrap();
        let addr = Listener::local_addr(&listener);
        let m = Manager::serve_on(
            listener,
            &addr,
            Box::new(store),
            (Duration::from_secs(5), 1, state::DEFAULT_VNODE_NET),
            cred.clone(),
        )
        .unwrap();
        let mut c = ControlClient::connect(&addr, "t", Duration::from_secs(1), &cred).unwrap();
        let register = register_memory;
        assert!(matches!(
            c.call(&register(9)).unwrap(),
            Reply::Registered { .. }
        ));
        // Refused: the answer says so, and while the store stays away
        // nothing is served from the copy that holds the change.
        refuse.store(true, Ordering::SeqCst);
        // (asked again until the timeout: the last answer says it cannot
        // even read the store back)
        let e = c.call(&register(10)).unwrap_err().to_string();
        assert!(e.contains("read its state back"), "{e}");
        let e = c.call(&Request::Status).unwrap_err().to_string();
        assert!(e.contains("read its state back"), "{e}");
        // A client asks again while the manager cannot act.
        let again = {
            let refuse = refuse.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                refuse.store(false, Ordering::SeqCst);
            })
        };
        assert!(matches!(
            c.call(&register(11)).unwrap(),
            Reply::Registered { .. }
        ));
        again.join().unwrap();
        // The store back: the cluster is what it holds, two components
        // (not the refused one).
        refuse.store(false, Ordering::SeqCst);
        match c.call(&Request::Status).unwrap() {
            Reply::Status(s) => {
                let addrs: Vec<&str> = s.components.iter().map(|c| c.addr.as_str()).collect();
                assert_eq!(addrs, ["127.0.0.1:9", "127.0.0.1:11"], "{s:?}");
            }
            other => panic!("{other:?}"),
        }
        m.shutdown();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
