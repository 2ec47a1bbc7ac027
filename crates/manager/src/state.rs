//! The global manager's logic as a pure state machine: membership and
//! failure detection, memory placement (GMM) and process placement (GPM).
//! No I/O and no clock: every call takes the time (milliseconds, any
//! monotonic origin) and returns what changed, for the server to store.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use lego_protocol::control::{
    short_program, ClusterStatus, ComponentInfo, Kind, ProcessInfo, RecoveryInfo, Replica, Reply,
    Request, RunningInfo, SpaceInfo, State, VnodeInfo, MAX_ADDR_BYTES, MAX_COMPONENTS,
    MAX_COMPONENT_ID, MAX_PROCESSES, PLACEMENT_BYTES,
};
use serde::{Deserialize, Serialize};

/// What the manager keeps of a component across restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    pub kind: Kind,
    pub addr: String,
    pub capacity_bytes: u64,
    pub state: State,
    /// The component's own key, issued at its first registration: its
    /// heartbeats, its leave and its registrations again must bring it.
    #[serde(default)]
    pub key: String,
    /// Its failure domain (`--zone`; empty: none declared).
    #[serde(default)]
    pub zone: String,
    /// From its last heartbeat (not stored).
    #[serde(skip)]
    pub used_bytes: u64,
    #[serde(skip)]
    pub load: u32,
    #[serde(skip)]
    pub last_seen_ms: u64,
    /// When it last came back after the manager had seen it fail (not
    /// stored).
    #[serde(skip)]
    pub back_ms: Option<u64>,
    /// Spaces a memory daemon last said it holds (not stored).
    #[serde(skip)]
    pub spaces: BTreeSet<u64>,
    /// Programs a processor daemon last said it runs (not stored).
    #[serde(skip)]
    pub processes: Vec<ProcessInfo>,
}

impl Component {
    /// Registered and not failed or gone: it may hold replicas and be
    /// heard from.
    fn live(&self) -> bool {
        matches!(self.state, State::Alive | State::Draining)
    }
}

/// A unit's placement: the memory daemons holding its replicas, in the
/// order runtimes read them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub replicas: Vec<u64>,
    /// When its replicas last changed (not stored).
    pub at_ms: u64,
    /// Since when it has lost a replica not yet restored (not stored: after
    /// a restart the runtimes restore what they still miss).
    pub degraded_since: Option<u64>,
}

impl Placement {
    fn new(replicas: Vec<u64>, at_ms: u64) -> Self {
        Self {
            replicas,
            at_ms,
            degraded_since: None,
        }
    }
}

/// A memory daemon failed (or left) while holding replicas: the units
/// that lost one, until each is whole again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    pub component: u64,
    pub at_ms: u64,
    pub units: u64,
    /// The units still degraded.
    pub pending: BTreeSet<(u64, u64)>,
    pub done_ms: Option<u64>,
}

/// How long a memory daemon that came back after a failure is reported
/// as such (runtimes that lost it use it again).
pub const BACK_REPORTED_MS: u64 = 60_000;

/// How many failures `lego status` remembers.
const RECOVERIES_KEPT: usize = 8;

/// Keys whose records changed, for the server to write.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub components: BTreeSet<u64>,
    pub placed: BTreeSet<(u64, u64)>,
    pub unplaced: BTreeSet<(u64, u64)>,
    /// vNodes made or deleted (by name).
    pub vnodes: BTreeSet<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.components.is_empty()
            && self.placed.is_empty()
            && self.unplaced.is_empty()
            && self.vnodes.is_empty()
    }
}

/// A vNode (stored): its vID, vIP and where its files live.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vnode {
    pub vid: u64,
    /// IPv4, as a number.
    pub vip: u32,
    pub storage: u64,
    pub storage_quota: u64,
    #[serde(default)]
    pub owner: String,
    /// The vNodes it is connected to (each lists the other).
    #[serde(default)]
    pub peers: BTreeSet<String>,
}

/// The record, among the vNodes, that keeps the highest vID ever given
/// (its `vid`): a deleted vNode's vID is never given again, so nothing
/// left of it (files, a network namespace) is taken for a new one's. No
/// vNode name can start with a NUL.
pub const RETIRED_VIDS: &str = "\0retired";

/// The range vIPs come from unless the manager is told otherwise.
pub const DEFAULT_VNODE_NET: (u32, u8) = (0x0a4d_0000, 16); // 10.77.0.0/16

/// Most vNodes a manager keeps (the list must fit one frame).
pub const MAX_VNODES: usize = 4096;

/// Most vNodes one vNode is connected to.
pub const MAX_PEERS: usize = 32;

/// Most names and vIDs one `Vnodes` request may ask for.
pub const MAX_VNODE_FILTER: usize = 1024;

/// A vNode's name: 1 to 64 of `a-z`, `0-9`, `-` and `_`.
fn valid_vnode_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn ipv4(v: u32) -> String {
    std::net::Ipv4Addr::from(v).to_string()
}

pub struct Cluster {
    pub components: BTreeMap<u64, Component>,
    /// (space, unit) → where its replicas live.
    pub placements: BTreeMap<(u64, u64), Placement>,
    /// A component silent this long is failed.
    pub timeout_ms: u64,
    /// Replicas per unit (fewer while fewer memory daemons can take one).
    pub replicas: usize,
    /// The latest failures of daemons holding replicas, oldest first.
    pub recoveries: VecDeque<Recovery>,
    /// vNodes by name.
    pub vnodes: BTreeMap<String, Vnode>,
    /// The highest vID of a deleted vNode (see [`RETIRED_VIDS`]).
    pub retired_vid: u64,
    /// The vIP given last: the next vNode's is the next free one after it
    /// (so a deleted vNode's vIP, which its programs may still hold on
    /// some host, is the last to be given again). Stored with
    /// [`RETIRED_VIDS`].
    pub last_vip: u32,
    /// The network vIPs come from: (address, prefix length).
    pub vnode_net: (u32, u8),
}

impl Cluster {
    /// A cluster with one replica per unit; see [`Cluster::with_replicas`].
    pub fn new(timeout_ms: u64) -> Self {
        Self {
            components: BTreeMap::new(),
            placements: BTreeMap::new(),
            timeout_ms,
            replicas: 1,
            recoveries: VecDeque::new(),
            vnodes: BTreeMap::new(),
            vnode_net: DEFAULT_VNODE_NET,
            retired_vid: 0,
            last_vip: 0,
        }
    }

    /// Takes vIPs from `net` (address, prefix length 8 to 30).
    pub fn with_vnode_net(mut self, net: (u32, u8)) -> Self {
        self.vnode_net = net;
        self
    }

    /// Gives each unit `n` replicas (at least 1), on different daemons.
    pub fn with_replicas(mut self, n: usize) -> Self {
        self.replicas = n.max(1);
        self
    }

    /// Rebuilds the state from stored records at `now` (a restart): every
    /// live component gets a full timeout to heartbeat again. A replica on
    /// a component that failed, left or is unknown is dropped (the unit is
    /// degraded, or gone with its last replica), as when it was lost: so
    /// a change stored in pieces, replica lists first, and cut short (a
    /// store that takes a bounded number of writes at once, its writer
    /// gone midway) reads back as a consistent state.
    pub fn restore(
        timeout_ms: u64,
        now: u64,
        components: impl IntoIterator<Item = (u64, Component)>,
        placements: impl IntoIterator<Item = ((u64, u64), Vec<u64>)>,
        vnodes: impl IntoIterator<Item = (String, Vnode)>,
    ) -> Self {
        let mut c = Self::new(timeout_ms);
        for (name, v) in vnodes {
            if name == RETIRED_VIDS {
                c.retired_vid = v.vid;
                c.last_vip = v.vip;
            } else {
                c.vnodes.insert(name, v);
            }
        }
        for (id, mut comp) in components {
            comp.last_seen_ms = now;
            c.components.insert(id, comp);
        }
        for (key, mut replicas) in placements {
            let stored = replicas.len();
            replicas.retain(|id| c.components.get(id).is_some_and(Component::live));
            if replicas.is_empty() {
                continue;
            }
            let mut p = Placement::new(replicas, now);
            if p.replicas.len() < stored {
                p.degraded_since = Some(now);
            }
            c.placements.insert(key, p);
        }
        c
    }

    /// How often components should heartbeat: a third of the timeout, so
    /// two lost heartbeats do not fail a component.
    pub fn heartbeat_ms(&self) -> u64 {
        (self.timeout_ms / 3).max(1)
    }

    /// Applies one request at time `now`.
    pub fn apply(&mut self, now: u64, req: Request) -> (Reply, Changes) {
        let mut ch = Changes::default();
        let reply = match req {
            Request::Register {
                kind,
                addr,
                capacity_bytes,
                id,
                key,
                zone,
            } => self.register(now, kind, addr, capacity_bytes, (id, key, zone), &mut ch),
            Request::Heartbeat {
                id,
                key,
                used_bytes,
                load,
                spaces,
                processes,
            } => match self.check_key(id, &key) {
                Err(e) => e,
                Ok(()) => self.heartbeat(now, id, used_bytes, load, spaces, processes, &mut ch),
            },
            Request::Leave { id, key } => match self.check_key(id, &key) {
                Err(e) => e,
                Ok(()) => self.leave(now, id, &mut ch),
            },
            Request::PlaceMemory {
                space,
                unit,
                keep,
                avoid,
            } => self.place_memory(now, (space, unit), &keep, &avoid, &mut ch),
            Request::Restored { space, unit, ids } => self.restored((space, unit), &ids),
            Request::Drain { id } => self.drain(id, &mut ch),
            Request::Undrain { id } => self.undrain(id, &mut ch),
            Request::Draining => {
                let memory_in = |state: &[State]| {
                    self.components
                        .iter()
                        .filter(|(_, c)| c.kind == Kind::Memory && state.contains(&c.state))
                        .map(|(&id, _)| id)
                        .collect()
                };
                let back = self
                    .components
                    .iter()
                    .filter(|(_, c)| c.kind == Kind::Memory && c.state == State::Alive)
                    .filter_map(|(&id, c)| Some((id, now.saturating_sub(c.back_ms?))))
                    .filter(|&(_, ago)| ago < BACK_REPORTED_MS)
                    .collect();
                Reply::Draining {
                    ids: memory_in(&[State::Draining]),
                    failed: memory_in(&[State::Failed, State::Left]),
                    back,
                }
            }
            Request::PlaceProcess {
                program: _,
                excache_bytes,
            } => self.place_process(excache_bytes),
            Request::Status => Reply::Status(Box::new(self.status(now))),
            Request::CreateVnode {
                name,
                storage_quota,
                owner,
            } => self.create_vnode(name, (storage_quota, owner), &mut ch),
            // Answered with the record, so the caller can have its files
            // removed from its storage daemon.
            Request::DeleteVnode { name } => match self.vnodes.remove(&name) {
                Some(v) => {
                    let info = self.vnode_info(&name, &v);
                    self.retired_vid = self.retired_vid.max(v.vid);
                    for peer in &v.peers {
                        if let Some(p) = self.vnodes.get_mut(peer) {
                            p.peers.remove(&name);
                            ch.vnodes.insert(peer.clone());
                        }
                    }
                    ch.vnodes.insert(name);
                    ch.vnodes.insert(RETIRED_VIDS.to_string());
                    Reply::Vnode(Box::new(info))
                }
                None => Reply::Error {
                    message: format!("no vNode {name}"),
                },
            },
            Request::LinkVnodes { a, b, linked } => self.link_vnodes(&a, &b, linked, &mut ch),
            Request::Vnodes { names, vids } if names.len() + vids.len() > MAX_VNODE_FILTER => {
                Reply::Error {
                    message: format!(
                        "ask for at most {MAX_VNODE_FILTER} vNodes at once, or for all"
                    ),
                }
            }
            Request::Vnodes { names, vids } => Reply::Vnodes {
                vnodes: self
                    .vnodes
                    .iter()
                    .filter(|(name, v)| {
                        (names.is_empty() && vids.is_empty())
                            || names.contains(name)
                            || vids.contains(&v.vid)
                    })
                    .map(|(name, v)| self.vnode_info(name, v))
                    .collect(),
            },
            Request::Launch { .. } | Request::Signal { .. } => Reply::Error {
                message: "the global manager runs no programs: send Launch to a processor daemon"
                    .into(),
            },
        };
        self.settle_recoveries(now);
        (reply, ch)
    }

    /// Marks components silent for longer than the timeout as failed; the
    /// replicas on a failed memory daemon are lost.
    pub fn tick(&mut self, now: u64) -> Changes {
        let mut ch = Changes::default();
        let silent: Vec<u64> = self
            .components
            .iter()
            .filter(|(_, c)| c.live() && now.saturating_sub(c.last_seen_ms) > self.timeout_ms)
            .map(|(&id, _)| id)
            .collect();
        for id in silent {
            self.fail(now, id, &mut ch);
        }
        self.settle_recoveries(now);
        ch
    }

    /// Component `id` failed: it gets nothing more, and the replicas on a
    /// failed memory daemon are lost.
    fn fail(&mut self, now: u64, id: u64, ch: &mut Changes) {
        let Some(c) = self.components.get_mut(&id) else {
            return;
        };
        c.state = State::Failed;
        c.processes.clear();
        ch.components.insert(id);
        if c.kind == Kind::Memory {
            self.lose_replicas(now, id, ch);
        }
    }

    fn vnode_info(&self, name: &str, v: &Vnode) -> VnodeInfo {
        VnodeInfo {
            name: name.to_string(),
            vid: v.vid,
            vip: ipv4(v.vip),
            storage: v.storage,
            storage_addr: self
                .components
                .get(&v.storage)
                .map(|c| c.addr.clone())
                .unwrap_or_default(),
            storage_quota: v.storage_quota,
            owner: v.owner.clone(),
            peers: v.peers.iter().cloned().collect(),
        }
    }

    /// Connects vNodes `a` and `b` (`linked`: their programs may reach
    /// each other's vIP) or disconnects them.
    fn link_vnodes(&mut self, a: &str, b: &str, linked: bool, ch: &mut Changes) -> Reply {
        for name in [a, b] {
            if !self.vnodes.contains_key(name) {
                return Reply::Error {
                    message: format!("no vNode {}", short_program(name)),
                };
            }
        }
        if a == b {
            return Reply::Error {
                message: format!("a vNode reaches its own vIP: {a} needs no connecting to itself"),
            };
        }
        if linked {
            for name in [a, b] {
                let v = &self.vnodes[name];
                if v.peers.len() >= MAX_PEERS && !v.peers.contains(if name == a { b } else { a }) {
                    return Reply::Error {
                        message: format!(
                            "vNode {name} is connected to its most vNodes ({MAX_PEERS})"
                        ),
                    };
                }
            }
        }
        for (this, other) in [(a, b), (b, a)] {
            if let Some(v) = self.vnodes.get_mut(this) {
                if linked {
                    v.peers.insert(other.to_string());
                } else {
                    v.peers.remove(other);
                }
            }
            ch.vnodes.insert(this.to_string());
        }
        Reply::Vnodes {
            vnodes: [a, b]
                .iter()
                .filter_map(|n| Some(self.vnode_info(n, self.vnodes.get(*n)?)))
                .collect(),
        }
    }

    /// Makes vNode `name`: the next vID, the first free vIP of the range,
    /// and its files on the alive storage daemon with the most space not
    /// yet promised to vNodes (GSM).
    fn create_vnode(
        &mut self,
        name: String,
        (quota, owner): (u64, String),
        ch: &mut Changes,
    ) -> Reply {
        let error = |message: String| Reply::Error { message };
        if owner.len() > 64 || owner.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return error("an owner is a user name of at most 64 characters".into());
        }
        if !valid_vnode_name(&name) {
            return error(format!(
                "'{}' is not a vNode name (1 to 64 of a-z, 0-9, - and _)",
                short_program(&name)
            ));
        }
        if self.vnodes.contains_key(&name) {
            return error(format!("vNode {name} exists"));
        }
        if self.vnodes.len() >= MAX_VNODES {
            return error(format!("the cluster has its most vNodes ({MAX_VNODES})"));
        }
        let mut promised: BTreeMap<u64, u64> = BTreeMap::new();
        for v in self.vnodes.values() {
            *promised.entry(v.storage).or_insert(0) += v.storage_quota;
        }
        let best = self
            .components
            .iter()
            .filter(|(_, c)| c.kind == Kind::Storage && c.state == State::Alive)
            .map(|(&id, c)| {
                let free = c
                    .capacity_bytes
                    .saturating_sub(promised.get(&id).copied().unwrap_or(0));
                (free, std::cmp::Reverse(id))
            })
            .filter(|&(free, _)| free >= quota)
            .max();
        let Some((_, std::cmp::Reverse(storage))) = best else {
            return error(format!(
                "no alive storage daemon has {} to spare for vNode {name}",
                lego_protocol::control::human_bytes(quota)
            ));
        };
        // vIPs: the range's hosts, .1 up, the first not taken.
        let (net, prefix) = self.vnode_net;
        let hosts = (1u64 << (32 - u32::from(prefix.clamp(8, 30)))) - 2;
        let base = net & (u32::MAX << (32 - u32::from(prefix.clamp(8, 30))));
        let taken: BTreeSet<u32> = self.vnodes.values().map(|v| v.vip).collect();
        // After the one given last, round the range.
        let after = u64::from(self.last_vip.wrapping_sub(base)).min(hosts);
        let Some(vip) = (1..=hosts)
            .map(|k| base + ((after + k - 1) % hosts + 1) as u32)
            .find(|ip| !taken.contains(ip))
        else {
            return error(format!("no vIP left in {}/{prefix}", ipv4(base)));
        };
        let vid = self
            .vnodes
            .values()
            .map(|v| v.vid)
            .max()
            .unwrap_or(0)
            .max(self.retired_vid)
            + 1;
        let v = Vnode {
            vid,
            vip,
            storage,
            storage_quota: quota,
            owner,
            peers: BTreeSet::new(),
        };
        let info = self.vnode_info(&name, &v);
        self.vnodes.insert(name.clone(), v);
        self.last_vip = vip;
        ch.vnodes.insert(name);
        ch.vnodes.insert(RETIRED_VIDS.to_string());
        Reply::Vnode(Box::new(info))
    }

    /// Memory daemon `id` failed or left: every unit with a replica there
    /// lost it and is degraded until its runtime restores it; a unit with
    /// no replica left is gone (its program stopped).
    fn lose_replicas(&mut self, now: u64, id: u64, ch: &mut Changes) {
        let mut hit = Vec::new();
        self.placements.retain(|&k, p| {
            if !p.replicas.contains(&id) {
                return true;
            }
            p.replicas.retain(|&r| r != id);
            if p.replicas.is_empty() {
                ch.unplaced.insert(k);
                return false;
            }
            p.degraded_since.get_or_insert(now);
            ch.placed.insert(k);
            hit.push(k);
            true
        });
        for k in hit {
            self.note_lost(now, id, k);
        }
    }

    /// Unit `key` lost its replica on memory daemon `id` (the manager saw
    /// the daemon fail, or a runtime could not reach it): counted in that
    /// daemon's recovery.
    fn note_lost(&mut self, now: u64, id: u64, key: (u64, u64)) {
        // One failure, however its units' losses trickle in (runtimes
        // repair unit after unit, and learn of it before the manager).
        let window = (5 * self.timeout_ms).max(10_000);
        if let Some(r) = self
            .recoveries
            .iter_mut()
            .rev()
            .find(|r| r.component == id && now.saturating_sub(r.at_ms) <= window)
        {
            if r.pending.insert(key) {
                r.units += 1;
            }
            r.done_ms = None;
            return;
        }
        if self.recoveries.len() == RECOVERIES_KEPT {
            self.recoveries.pop_front();
        }
        self.recoveries.push_back(Recovery {
            component: id,
            at_ms: now,
            units: 1,
            pending: BTreeSet::from([key]),
            done_ms: None,
        });
    }

    /// The units of `space` with a replica on one of `lost` are degraded.
    fn lost_by_space(&mut self, now: u64, space: u64, lost: &[u64]) {
        let hit: Vec<((u64, u64), u64)> = self
            .placements
            .range((space, 0)..=(space, u64::MAX))
            .flat_map(|(&k, p)| {
                p.replicas
                    .iter()
                    .filter(|r| lost.contains(r))
                    .map(move |&r| (k, r))
            })
            .collect();
        for (k, r) in hit {
            if let Some(p) = self.placements.get_mut(&k) {
                p.degraded_since.get_or_insert(now);
            }
            self.note_lost(now, r, k);
        }
    }

    /// A recovery is done once none of its units is degraded any more
    /// (restored, or gone with their program).
    fn settle_recoveries(&mut self, now: u64) {
        let placements = &self.placements;
        for r in self.recoveries.iter_mut().filter(|r| r.done_ms.is_none()) {
            r.pending.retain(|k| {
                placements
                    .get(k)
                    .is_some_and(|p| p.degraded_since.is_some())
            });
            if r.pending.is_empty() {
                r.done_ms = Some(now);
            }
        }
    }

    /// The runtime of `key`'s space filled every replica `ids` of it.
    fn restored(&mut self, key: (u64, u64), ids: &[u64]) -> Reply {
        let Some(p) = self.placements.get_mut(&key) else {
            return Reply::Error {
                message: format!("unit {} of space {} is not placed", key.1, key.0),
            };
        };
        let alive = self
            .components
            .values()
            .filter(|c| c.kind == Kind::Memory && c.state == State::Alive)
            .count();
        // Whole: every replica filled, and as many as it should have.
        if p.replicas.iter().all(|r| ids.contains(r))
            && p.replicas.len() >= self.replicas.min(alive)
        {
            p.degraded_since = None;
        }
        Reply::Ok
    }

    /// Whether `key` is component `id`'s own (an unknown id passes: the
    /// request is answered as for an unknown component).
    fn check_key(&self, id: u64, key: &str) -> Result<(), Reply> {
        match self.components.get(&id) {
            Some(c) if !c.key.is_empty() && c.key != key => Err(Reply::Error {
                message: format!("that is not component {id}'s key"),
            }),
            _ => Ok(()),
        }
    }

    fn register(
        &mut self,
        now: u64,
        kind: Kind,
        addr: String,
        capacity_bytes: u64,
        (id, key, zone): (Option<u64>, String, String),
        ch: &mut Changes,
    ) -> Reply {
        if zone.len() > MAX_ADDR_BYTES {
            return Reply::Error {
                message: format!("a zone name is at most {MAX_ADDR_BYTES} bytes"),
            };
        }
        if addr.is_empty() {
            return Reply::Error {
                message: "a component must register with the address it serves on".into(),
            };
        }
        if addr.len() > MAX_ADDR_BYTES {
            return Reply::Error {
                message: format!(
                    "a component address is at most {MAX_ADDR_BYTES} bytes, not {}",
                    addr.len()
                ),
            };
        }
        if id.is_some_and(|id| id == 0 || id > MAX_COMPONENT_ID) {
            return Reply::Error {
                message: format!("component ids are 1 to {MAX_COMPONENT_ID}"),
            };
        }
        // The same id again, with its key (a lost connection, or a manager
        // restarted without its state), else the id of a failed component
        // at the same address (restarted), else a new one.
        let claimed = id.filter(|id| !matches!(self.components.get(id), Some(c) if c.kind != kind));
        if let Some(id) = claimed {
            if let Err(e) = self.check_key(id, &key) {
                return e;
            }
        }
        // A new process on the address of a live component of its kind:
        // only one listens there, so the one registered before is gone
        // (killed and started again within the heartbeat timeout, or this
        // is a registration asked for again). It fails now rather than a
        // timeout later, so nothing more is placed on it and no unit has
        // two replicas behind one address; its id is taken again below.
        let gone: Vec<u64> = self
            .components
            .iter()
            .filter(|(&k, c)| Some(k) != claimed && c.kind == kind && c.addr == addr && c.live())
            .map(|(&k, _)| k)
            .collect();
        for &k in &gone {
            self.fail(now, k, ch);
        }
        let id = claimed.or(gone.first().copied()).unwrap_or_else(|| {
            self.components
                .iter()
                .find(|(_, c)| c.kind == kind && c.addr == addr && c.state == State::Failed)
                .map(|(&id, _)| id)
                .unwrap_or_else(|| self.components.keys().next_back().map_or(1, |k| k + 1))
        });
        // A component the manager knows keeps its key; one it does not
        // (its state was lost) keeps the key it brings if well formed.
        let key = match self.components.get(&id) {
            Some(c) if claimed == Some(id) && !c.key.is_empty() => c.key.clone(),
            None if claimed == Some(id) && valid_key(&key) => key,
            _ => new_key(),
        };
        if !self.components.contains_key(&id) {
            if self.components.len() >= MAX_COMPONENTS {
                return Reply::Error {
                    message: format!("the cluster has its most components ({MAX_COMPONENTS})"),
                };
            }
            if id > MAX_COMPONENT_ID {
                return Reply::Error {
                    message: format!("no component id left below {MAX_COMPONENT_ID}"),
                };
            }
        }
        let c = self.components.entry(id).or_insert_with(|| Component {
            kind,
            addr: addr.clone(),
            capacity_bytes,
            state: State::Alive,
            key: String::new(),
            zone: String::new(),
            used_bytes: 0,
            load: 0,
            last_seen_ms: now,
            back_ms: None,
            spaces: BTreeSet::new(),
            processes: Vec::new(),
        });
        c.key = key.clone();
        c.zone = zone;
        c.addr = addr;
        c.capacity_bytes = capacity_bytes;
        match c.state {
            State::Draining => {}
            State::Failed => {
                c.state = State::Alive;
                c.back_ms = Some(now);
            }
            _ => c.state = State::Alive,
        }
        c.last_seen_ms = now;
        ch.components.insert(id);
        Reply::Registered {
            id,
            heartbeat_ms: self.heartbeat_ms(),
            key,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn heartbeat(
        &mut self,
        now: u64,
        id: u64,
        used_bytes: u64,
        load: u32,
        spaces: Vec<u64>,
        processes: Vec<ProcessInfo>,
        ch: &mut Changes,
    ) -> Reply {
        let grace = 2 * self.heartbeat_ms();
        let Some(c) = self.components.get_mut(&id) else {
            return unknown(id);
        };
        if c.state == State::Left {
            return unknown(id);
        }
        if c.state == State::Failed {
            // It came back.
            c.state = State::Alive;
            c.back_ms = Some(now);
            ch.components.insert(id);
        }
        c.used_bytes = used_bytes;
        c.load = load;
        c.last_seen_ms = now;
        c.processes = processes
            .into_iter()
            .take(MAX_PROCESSES)
            .map(|p| ProcessInfo {
                program: short_program(&p.program),
                counters: p.counters.filter(|c| c.is_sane()),
                ..p
            })
            .collect();
        c.spaces = spaces.into_iter().collect();
        if c.kind == Kind::Memory {
            // Replicas of spaces this daemon no longer holds (their
            // programs ended) are free again; one placed a moment ago may
            // not be attached yet.
            self.placements.retain(|&(space, unit), p| {
                if !p.replicas.contains(&id)
                    || now.saturating_sub(p.at_ms) <= grace
                    || c.spaces.contains(&space)
                {
                    return true;
                }
                p.replicas.retain(|&r| r != id);
                if p.replicas.is_empty() {
                    ch.unplaced.insert((space, unit));
                    return false;
                }
                ch.placed.insert((space, unit));
                true
            });
            // A drained daemon holds nothing and nothing is placed on it:
            // it leaves.
            if c.state == State::Draining
                && used_bytes == 0
                && c.spaces.is_empty()
                && !self.placements.values().any(|p| p.replicas.contains(&id))
            {
                c.state = State::Left;
                ch.components.insert(id);
                return Reply::Left;
            }
        }
        Reply::Ok
    }

    /// Component `id` leaves (it was stopped): it gets nothing more, and
    /// what was placed on it went with it.
    fn leave(&mut self, now: u64, id: u64, ch: &mut Changes) -> Reply {
        let Some(c) = self.components.get_mut(&id) else {
            return unknown(id);
        };
        c.state = State::Left;
        c.used_bytes = 0;
        c.load = 0;
        c.spaces.clear();
        c.processes.clear();
        let memory = c.kind == Kind::Memory;
        ch.components.insert(id);
        if memory {
            self.lose_replicas(now, id, ch);
        }
        Reply::Ok
    }

    /// Starts draining memory daemon `id`, if the other alive memory
    /// daemons have room for every unit placed on it.
    fn drain(&mut self, id: u64, ch: &mut Changes) -> Reply {
        let error = |message: String| Reply::Error { message };
        let Some(c) = self.components.get(&id) else {
            return error(format!("no component {id} in this cluster"));
        };
        if c.kind != Kind::Memory {
            return error(format!(
                "component {id} is a {} daemon; only memory daemons are drained",
                c.kind
            ));
        }
        match c.state {
            State::Alive => {}
            State::Draining => return Reply::Ok,
            State::Failed => {
                return error(format!(
                    "memory daemon {id} has failed: its memory is gone, there is nothing to move"
                ))
            }
            State::Left => return error(format!("memory daemon {id} has left the cluster")),
        }
        let units = self.units();
        let on_it = units.get(&id).copied().unwrap_or(0);
        let room: u64 = self
            .components
            .iter()
            .filter(|(&o, c)| o != id && c.kind == Kind::Memory && c.state == State::Alive)
            .map(|(o, c)| {
                c.capacity_bytes
                    .saturating_sub(units.get(o).copied().unwrap_or(0) * PLACEMENT_BYTES)
                    / PLACEMENT_BYTES
            })
            .fold(0, u64::saturating_add);
        if room < on_it {
            return error(format!(
                "cannot drain memory daemon {id}: its {on_it} units ({} MiB) do not fit on the other alive memory daemons (room for {room})",
                (on_it * PLACEMENT_BYTES) >> 20
            ));
        }
        self.components.get_mut(&id).expect("looked up above").state = State::Draining;
        ch.components.insert(id);
        Reply::Ok
    }

    /// Cancels the drain of memory daemon `id`: it is alive again.
    fn undrain(&mut self, id: u64, ch: &mut Changes) -> Reply {
        let Some(c) = self.components.get_mut(&id) else {
            return Reply::Error {
                message: format!("no component {id} in this cluster"),
            };
        };
        match (c.kind, c.state) {
            (Kind::Memory, State::Draining) => {
                c.state = State::Alive;
                ch.components.insert(id);
                Reply::Ok
            }
            (Kind::Memory, State::Alive) => Reply::Ok,
            (Kind::Memory, state) => Reply::Error {
                message: format!("memory daemon {id} is {state}, not draining"),
            },
            (kind, _) => Reply::Error {
                message: format!("component {id} is a {kind} daemon, not a memory daemon"),
            },
        }
    }

    /// Replicas placed on each component.
    fn units(&self) -> BTreeMap<u64, u64> {
        let mut n = BTreeMap::new();
        for r in self.placements.values().flat_map(|p| &p.replicas) {
            *n.entry(*r).or_insert(0) += 1;
        }
        n
    }

    /// The replicas of unit `key`: those it has (or `keep`, the asker's)
    /// on alive daemons, plus new ones up to [`Cluster::replicas`]; each
    /// new one on the alive memory daemon with the most capacity not yet
    /// placed, in a zone none of the unit's others is in where there is
    /// one. A replica lost (not in `keep`, or in `avoid`) makes the unit
    /// degraded until it is restored; one on a draining daemon is simply
    /// replaced (the asker copies it before it lets the old one go).
    fn place_memory(
        &mut self,
        now: u64,
        key: (u64, u64),
        keep: &[u64],
        avoid: &[u64],
        ch: &mut Changes,
    ) -> Reply {
        let alive = |c: &Component| c.kind == Kind::Memory && c.state == State::Alive;
        // Lists from the wire: at most one entry per component counts.
        let keep = &keep[..keep.len().min(MAX_COMPONENTS)];
        let avoid: BTreeSet<u64> = avoid.iter().take(MAX_COMPONENTS).copied().collect();
        let had = self.placements.get(&key).map(|p| p.replicas.clone());
        let mut set: Vec<u64> = match &had {
            Some(had) if keep.is_empty() => had.clone(),
            _ => keep.to_vec(),
        };
        let mut seen = BTreeSet::new();
        set.retain(|id| {
            seen.insert(*id) && !avoid.contains(id) && self.components.get(id).is_some_and(alive)
        });
        let lost: Vec<u64> = had
            .iter()
            .flatten()
            .copied()
            .filter(|id| {
                !set.contains(id)
                    && self
                        .components
                        .get(id)
                        .is_none_or(|c| c.state != State::Draining)
            })
            .collect();
        let units = self.units();
        let free = |id: &u64, c: &Component| {
            c.capacity_bytes
                .saturating_sub(units.get(id).copied().unwrap_or(0) * PLACEMENT_BYTES)
        };
        while set.len() < self.replicas {
            let zones: BTreeSet<&str> = set
                .iter()
                .filter_map(|id| self.components.get(id))
                .map(|c| c.zone.as_str())
                .filter(|z| !z.is_empty())
                .collect();
            let best = self
                .components
                .iter()
                .filter(|(id, c)| alive(c) && !set.contains(id) && !avoid.contains(id))
                .map(|(id, c)| (!zones.contains(c.zone.as_str()), free(id, c), *id))
                .filter(|&(_, f, _)| f >= PLACEMENT_BYTES)
                .max_by_key(|&(new_zone, f, id)| (new_zone, f, std::cmp::Reverse(id)));
            match best {
                Some((_, _, id)) => set.push(id),
                None => break,
            }
        }
        if set.is_empty() {
            let (cap, placed, n) = self.components.iter().filter(|(_, c)| alive(c)).fold(
                (0, 0, 0),
                |(cap, placed, n), (id, c)| {
                    let units = units.get(id).copied().unwrap_or(0);
                    (
                        c.capacity_bytes.saturating_add(cap),
                        placed + units * PLACEMENT_BYTES,
                        n + 1,
                    )
                },
            );
            return Reply::Error {
                message: format!(
                    "no memory daemon has room for another {} MiB ({n} alive, {} MiB capacity, {} MiB placed)",
                    PLACEMENT_BYTES >> 20,
                    cap >> 20,
                    placed >> 20
                ),
            };
        }
        if had.as_ref() != Some(&set) {
            let degraded_since = match self.placements.get(&key) {
                Some(p) if !lost.is_empty() || p.degraded_since.is_some() => {
                    Some(p.degraded_since.unwrap_or(now))
                }
                _ => None,
            };
            for &id in &lost {
                self.note_lost(now, id, key);
            }
            // The asker lost those daemons for all of its space: every
            // unit of it there is degraded from now (it repairs them one
            // after the other).
            self.lost_by_space(now, key.0, &lost);
            self.placements.insert(
                key,
                Placement {
                    replicas: set.clone(),
                    at_ms: now,
                    degraded_since,
                },
            );
            ch.placed.insert(key);
        }
        Reply::Placed {
            replicas: set
                .iter()
                .map(|&id| Replica {
                    id,
                    addr: self.components[&id].addr.clone(),
                })
                .collect(),
        }
    }

    fn place_process(&self, excache_bytes: u64) -> Reply {
        // The alive processor with the fewest programs among those with
        // ExCache headroom for this one; the most headroom breaks ties.
        let best = self
            .components
            .iter()
            .filter(|(_, c)| c.kind == Kind::Processor && c.state == State::Alive)
            .filter_map(|(&id, c)| {
                let used = c
                    .processes
                    .iter()
                    .fold(0u64, |a, p| a.saturating_add(p.excache_bytes));
                let room = c.capacity_bytes.saturating_sub(used);
                (room >= excache_bytes).then_some((c.processes.len(), std::cmp::Reverse(room), id))
            })
            .min();
        match best {
            Some((_, _, id)) => Reply::Processor {
                id,
                addr: self.components[&id].addr.clone(),
            },
            None => Reply::Error {
                message: format!(
                    "no alive processor daemon has {} MiB of ExCache free",
                    excache_bytes >> 20
                ),
            },
        }
    }

    pub fn status(&self, now: u64) -> ClusterStatus {
        let units = self.units();
        let components = self
            .components
            .iter()
            .map(|(&id, c)| ComponentInfo {
                id,
                kind: c.kind,
                addr: c.addr.clone(),
                state: c.state,
                capacity_bytes: c.capacity_bytes,
                used_bytes: c.used_bytes,
                load: c.load,
                units: units.get(&id).copied().unwrap_or(0),
                last_seen_ms: now.saturating_sub(c.last_seen_ms),
                zone: c.zone.clone(),
            })
            .collect();
        let mut spaces: BTreeMap<u64, (BTreeMap<u64, u64>, u64)> = BTreeMap::new();
        for (&(space, _), p) in &self.placements {
            let (by, degraded) = spaces.entry(space).or_default();
            for &r in &p.replicas {
                *by.entry(r).or_insert(0) += 1;
            }
            *degraded += u64::from(p.degraded_since.is_some());
        }
        let degraded_units = spaces.values().map(|s| s.1).sum();
        let spaces = spaces
            .into_iter()
            .map(|(space, (by, degraded))| SpaceInfo {
                space,
                units: by.into_iter().collect(),
                degraded,
            })
            .collect();
        let recoveries = self
            .recoveries
            .iter()
            .map(|r| RecoveryInfo {
                component: r.component,
                units: r.units,
                degraded: r.pending.len() as u64,
                ago_ms: now.saturating_sub(r.at_ms),
                took_ms: r.done_ms.map(|d| d.saturating_sub(r.at_ms)),
            })
            .collect();
        let processes = self
            .components
            .iter()
            .flat_map(|(&id, c)| {
                c.processes.iter().map(move |p| RunningInfo {
                    processor: id,
                    process: p.clone(),
                })
            })
            .collect();
        ClusterStatus {
            components,
            spaces,
            processes,
            replicas: self.replicas as u64,
            degraded_units,
            recoveries,
            // The server's to say (crate::lib).
            manager: String::new(),
            store: String::new(),
        }
    }
}

/// A new component key: 128 random bits, in hex.
fn new_key() -> String {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).expect("the kernel's random numbers");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn valid_key(k: &str) -> bool {
    k.len() == 32 && k.bytes().all(|b| b.is_ascii_hexdigit())
}

fn unknown(id: u64) -> Reply {
    Reply::Error {
        message: format!("unknown component {id}: register again"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lego_protocol::control::{ProgramCounters, MAX_COUNTER_ENTRIES};

    const MIB: u64 = 1 << 20;

    /// Component `id`'s key, as it got it when it registered.
    fn key_of(c: &Cluster, id: u64) -> String {
        c.components
            .get(&id)
            .map(|x| x.key.clone())
            .unwrap_or_default()
    }

    fn register(c: &mut Cluster, now: u64, kind: Kind, addr: &str, cap: u64) -> u64 {
        match c
            .apply(
                now,
                Request::Register {
                    kind,
                    addr: addr.into(),
                    capacity_bytes: cap,
                    id: None,
                    key: String::new(),
                    zone: String::new(),
                },
            )
            .0
        {
            Reply::Registered { id, .. } => id,
            other => panic!("{other:?}"),
        }
    }

    fn hb(c: &mut Cluster, now: u64, id: u64, used: u64, spaces: Vec<u64>) -> Reply {
        let req = Request::Heartbeat {
            id,
            key: key_of(c, id),
            used_bytes: used,
            load: 0,
            spaces,
            processes: vec![],
        };
        c.apply(now, req).0
    }

    fn place(c: &mut Cluster, now: u64, space: u64, unit: u64) -> Reply {
        let req = Request::PlaceMemory {
            space,
            unit,
            keep: vec![],
            avoid: vec![],
        };
        c.apply(now, req).0
    }

    /// The first replica's daemon.
    fn placed_on(r: &Reply) -> u64 {
        replicas_of(r)[0]
    }

    fn replicas_of(r: &Reply) -> Vec<u64> {
        match r {
            Reply::Placed { replicas } => replicas.iter().map(|r| r.id).collect(),
            other => panic!("{other:?}"),
        }
    }

    fn on(c: &Cluster, id: u64) -> usize {
        c.placements
            .values()
            .filter(|p| p.replicas.contains(&id))
            .count()
    }

    #[test]
    fn a_space_spreads_over_daemons_by_free_capacity() {
        let mut c = Cluster::new(3000);
        let a = register(&mut c, 0, Kind::Memory, "a:1", 64 * MIB);
        let b = register(&mut c, 0, Kind::Memory, "b:1", 32 * MIB);
        let d = register(&mut c, 0, Kind::Memory, "d:1", 32 * MIB);
        let on: Vec<u64> = (0..8).map(|u| placed_on(&place(&mut c, 1, 7, u))).collect();
        // 128 MiB in 16 MiB units: a (most free) first, then each in turn
        // by what is left; no daemon gets more than it has.
        assert_eq!(on.iter().filter(|&&x| x == a).count(), 4);
        assert_eq!(on.iter().filter(|&&x| x == b).count(), 2);
        assert_eq!(on.iter().filter(|&&x| x == d).count(), 2);
        // Placing again answers the same daemon.
        assert_eq!(placed_on(&place(&mut c, 2, 7, 3)), on[3]);
        // Full: a clear error.
        match place(&mut c, 2, 7, 8) {
            Reply::Error { message } => assert!(message.contains("no memory daemon has room")),
            other => panic!("{other:?}"),
        }
        // A daemon added now takes new units at once.
        let e = register(&mut c, 3, Kind::Memory, "e:1", 64 * MIB);
        assert_eq!(placed_on(&place(&mut c, 3, 7, 8)), e);
    }

    #[test]
    fn silent_components_fail_and_get_no_placements() {
        let mut c = Cluster::new(1000);
        let a = register(&mut c, 0, Kind::Memory, "a:1", 64 * MIB);
        let b = register(&mut c, 0, Kind::Memory, "b:1", 64 * MIB);
        for t in [300, 600, 900] {
            hb(&mut c, t, a, 0, vec![]);
            c.tick(t);
        }
        let ch = c.tick(1001 + 1);
        assert!(ch.components.contains(&b));
        assert_eq!(c.components[&b].state, State::Failed);
        assert_eq!(c.components[&a].state, State::Alive);
        for u in 0..4 {
            assert_eq!(placed_on(&place(&mut c, 1300, 1, u)), a);
        }
        // A failed component that heartbeats again is alive again.
        hb(&mut c, 1400, b, 0, vec![]);
        assert_eq!(c.components[&b].state, State::Alive);
    }

    #[test]
    fn a_daemon_started_again_at_its_address_replaces_the_one_before_at_once() {
        let mut c = Cluster::new(2000).with_replicas(2);
        let a = register(&mut c, 0, Kind::Memory, "a:1", 256 * MIB);
        register(&mut c, 0, Kind::Memory, "b:1", 256 * MIB);
        register(&mut c, 0, Kind::Memory, "d:1", 256 * MIB);
        for u in 0..6 {
            place(&mut c, 0, 7, u);
        }
        let held = on(&c, a);
        assert!(held > 0);
        // a killed and started again (a new process, without an id) well
        // within the heartbeat timeout: the one before failed, its id
        // taken again, what it held lost (those units degraded).
        let again = register(&mut c, 100, Kind::Memory, "a:1", 64 * MIB);
        assert_eq!(again, a);
        assert_eq!(c.components[&a].state, State::Alive);
        assert_eq!(on(&c, a), 0, "units still listed on the empty daemon");
        assert_eq!(c.status(100).degraded_units as usize, held);
        assert_eq!(c.components.len(), 3, "a second component at a:1");
        // No unit placed now has its two replicas behind one address.
        for u in 6..10 {
            let r = replicas_of(&place(&mut c, 100, 7, u));
            assert_eq!(r.len(), 2);
            assert_ne!(c.components[&r[0]].addr, c.components[&r[1]].addr);
        }
    }

    #[test]
    fn replicas_on_failed_left_or_unknown_components_are_dropped_on_restore() {
        let mut c = Cluster::new(1000).with_replicas(2);
        let a = register(&mut c, 0, Kind::Memory, "a:1", 256 * MIB);
        let b = register(&mut c, 0, Kind::Memory, "b:1", 256 * MIB);
        let d = register(&mut c, 0, Kind::Memory, "d:1", 256 * MIB);
        c.components.get_mut(&b).unwrap().state = State::Failed;
        c.components.get_mut(&d).unwrap().state = State::Left;
        // As a change cut short leaves it: b failed and d left are
        // stored, the units' replica lists not yet.
        let records = c.components.clone();
        let placements = vec![
            ((7, 0), vec![a, b]),
            ((7, 1), vec![b, d]),
            ((7, 2), vec![a, 99]),
            ((7, 3), vec![a]),
        ];
        let r = Cluster::restore(1000, 50, records, placements, vec![]).with_replicas(2);
        let on = |u: u64| r.placements.get(&(7, u)).map(|p| p.replicas.clone());
        assert_eq!(on(0), Some(vec![a]));
        assert_eq!(on(1), None, "a unit whose every replica is gone");
        assert_eq!(on(2), Some(vec![a]));
        assert_eq!(on(3), Some(vec![a]));
        // Degraded: the two that lost a replica, not the one stored with
        // one (a daemon short when it was placed).
        assert_eq!(r.status(50).degraded_units, 2);
    }

    #[test]
    fn a_unit_whose_only_replica_fails_is_gone() {
        let mut c = Cluster::new(900);
        let a = register(&mut c, 0, Kind::Memory, "a:1", 64 * MIB);
        let b = register(&mut c, 0, Kind::Memory, "b:1", 64 * MIB);
        for u in 0..4 {
            place(&mut c, 0, 7, u);
        }
        let on_b = on(&c, b);
        assert!(on_b > 0);
        let mut t = 0;
        let mut unplaced = 0;
        while t < 1500 {
            t += 300;
            hb(&mut c, t, a, 4096, vec![7]);
            unplaced += c.tick(t).unplaced.len();
        }
        assert_eq!(c.components[&b].state, State::Failed);
        assert_eq!(unplaced, on_b);
        assert_eq!(on(&c, b), 0);
        assert_eq!(c.placements.len(), 4 - on_b);
        assert_eq!(c.status(t).degraded_units, 0, "nothing left to restore");
    }

    #[test]
    fn a_daemon_back_after_a_failure_is_reported_for_a_minute() {
        let mut c = Cluster::new(900);
        let a = register(&mut c, 0, Kind::Memory, "a:1", 256 * MIB);
        let b = register(&mut c, 0, Kind::Memory, "b:1", 256 * MIB);
        let draining = |c: &mut Cluster, now| match c.apply(now, Request::Draining).0 {
            Reply::Draining { failed, back, .. } => (failed, back),
            r => panic!("{r:?}"),
        };
        let mut t = 0;
        while c.components[&b].state != State::Failed {
            t += 300;
            hb(&mut c, t, a, 0, vec![]);
            c.tick(t);
        }
        assert_eq!(draining(&mut c, t), (vec![b], vec![]));
        // Its heartbeat brings it back; a runtime that lost it may use it
        // again, whether or not it asked while it was failed.
        hb(&mut c, t + 100, b, 0, vec![]);
        assert_eq!(draining(&mut c, t + 400), (vec![], vec![(b, 300)]));
        assert_eq!(
            draining(&mut c, t + 100 + BACK_REPORTED_MS),
            (vec![], vec![])
        );
        // A daemon restarted at the same address registers again: the same.
        while c.components[&a].state != State::Failed {
            t += 300;
            hb(&mut c, t, b, 0, vec![]);
            c.tick(t);
        }
        assert_eq!(register(&mut c, t, Kind::Memory, "a:1", 256 * MIB), a);
        let (failed, back) = draining(&mut c, t + 5);
        assert!(failed.is_empty());
        assert!(back.contains(&(a, 5)), "{back:?}");
    }

    fn restore(c: &mut Cluster, now: u64, space: u64, unit: u64, ids: Vec<u64>) {
        let r = c.apply(now, Request::Restored { space, unit, ids }).0;
        assert_eq!(r, Reply::Ok);
    }

    #[test]
    fn a_failed_daemons_replicas_are_replaced_and_degraded_until_restored() {
        let mut c = Cluster::new(900).with_replicas(2);
        let a = register(&mut c, 0, Kind::Memory, "a:1", 256 * MIB);
        let b = register(&mut c, 0, Kind::Memory, "b:1", 256 * MIB);
        let d = register(&mut c, 0, Kind::Memory, "d:1", 256 * MIB);
        let sets: Vec<Vec<u64>> = (0..6)
            .map(|u| replicas_of(&place(&mut c, 0, 7, u)))
            .collect();
        for s in &sets {
            assert_eq!(s.len(), 2);
            assert_ne!(s[0], s[1]);
        }
        // Placing again answers the same replicas.
        assert_eq!(replicas_of(&place(&mut c, 1, 7, 0)), sets[0]);
        let with_b = sets.iter().filter(|s| s.contains(&b)).count();
        assert!(with_b > 0);
        // b goes silent.
        let mut t = 0;
        while c.components[&b].state != State::Failed {
            t += 300;
            hb(&mut c, t, a, 4096, vec![7]);
            hb(&mut c, t, d, 4096, vec![7]);
            c.tick(t);
        }
        let s = c.status(t);
        assert_eq!(s.degraded_units, with_b as u64);
        assert_eq!(s.recoveries.len(), 1);
        assert_eq!(s.recoveries[0].component, b);
        assert_eq!(s.recoveries[0].degraded, with_b as u64);
        assert_eq!(s.recoveries[0].took_ms, None);
        assert_eq!(
            c.apply(t, Request::Draining).0,
            Reply::Draining {
                ids: vec![],
                failed: vec![b],
                back: vec![],
            }
        );
        // Each runtime asks for the replicas it lost, fills them, says so.
        let mut left = with_b as u64;
        for (u, set) in sets.iter().enumerate() {
            if !set.contains(&b) {
                continue;
            }
            let keep: Vec<u64> = set.iter().copied().filter(|&x| x != b).collect();
            let req = Request::PlaceMemory {
                space: 7,
                unit: u as u64,
                keep: keep.clone(),
                avoid: vec![b],
            };
            let now = replicas_of(&c.apply(t + 10, req).0);
            assert_eq!(now.len(), 2);
            assert_eq!(now[0], keep[0], "the surviving replica is read first");
            assert!(!now.contains(&b));
            assert_eq!(c.status(t + 10).degraded_units, left, "until filled");
            restore(&mut c, t + 20 + u as u64, 7, u as u64, now);
            left -= 1;
        }
        let s = c.status(t + 100);
        assert_eq!(s.degraded_units, 0);
        let took = s.recoveries[0].took_ms.unwrap();
        assert!((20..=30).contains(&took), "{took}");
        // A second failure loses nothing: every unit still has a replica.
        let unplaced: usize = {
            let mut n = 0;
            let mut t = t + 100;
            while c.components[&d].state != State::Failed {
                t += 300;
                hb(&mut c, t, a, 4096, vec![7]);
                n += c.tick(t).unplaced.len();
            }
            n
        };
        assert_eq!(unplaced, 0);
        assert!(c.placements.values().all(|p| p.replicas == [a]));
        // With one memory daemon alive one replica is whole.
        restore(&mut c, t + 5000, 7, 0, vec![a]);
        assert!(c.placements[&(7, 0)].degraded_since.is_none());
    }

    #[test]
    fn replicas_go_to_different_zones_and_unreachable_daemons_are_avoided() {
        let mut c = Cluster::new(900).with_replicas(2);
        let zone = |c: &mut Cluster, addr: &str, zone: &str| match c
            .apply(
                0,
                Request::Register {
                    kind: Kind::Memory,
                    addr: addr.into(),
                    capacity_bytes: 512 * MIB,
                    id: None,
                    key: String::new(),
                    zone: zone.into(),
                },
            )
            .0
        {
            Reply::Registered { id, .. } => id,
            other => panic!("{other:?}"),
        };
        let a = zone(&mut c, "a:1", "rack-1");
        let b = zone(&mut c, "b:1", "rack-1");
        let r2 = zone(&mut c, "c:1", "rack-2");
        for u in 0..8 {
            let set = replicas_of(&place(&mut c, 1, 3, u));
            assert!(set.contains(&r2), "unit {u}: {set:?} is all in rack-1");
        }
        assert_eq!(on(&c, r2), 8);
        assert_eq!(on(&c, a) + on(&c, b), 8);
        assert_eq!(c.status(1).components[2].zone, "rack-2");
        // A runtime that cannot reach r2 gets another replica, not r2.
        let req = Request::PlaceMemory {
            space: 3,
            unit: 0,
            keep: vec![],
            avoid: vec![r2],
        };
        let set = replicas_of(&c.apply(2, req).0);
        assert!(!set.contains(&r2) && set.len() == 2, "{set:?}");
        // It lost r2 for its whole space: all 8 units are degraded, in one
        // recovery, until each is restored.
        let s = c.status(2);
        assert_eq!(s.degraded_units, 8);
        assert_eq!(s.recoveries.len(), 1);
        assert_eq!((s.recoveries[0].component, s.recoveries[0].units), (r2, 8));
    }

    #[test]
    fn re_registering_keeps_the_id_and_unknown_ids_are_told_to_register() {
        let mut c = Cluster::new(1000);
        let a = register(&mut c, 0, Kind::Memory, "a:1", 64 * MIB);
        let key = key_of(&c, a);
        assert_eq!(key.len(), 32);
        let again = |c: &mut Cluster, key: &str| {
            c.apply(
                5,
                Request::Register {
                    kind: Kind::Memory,
                    addr: "a:1".into(),
                    capacity_bytes: 64 * MIB,
                    id: Some(a),
                    key: key.into(),
                    zone: String::new(),
                },
            )
            .0
        };
        // Its id again only with its key.
        assert!(matches!(
            again(&mut c, &"0".repeat(32)),
            Reply::Error { .. }
        ));
        assert!(matches!(again(&mut c, ""), Reply::Error { .. }));
        match again(&mut c, &key) {
            Reply::Registered { id, key: k, .. } => assert_eq!((id, k), (a, key.clone())),
            other => panic!("{other:?}"),
        }
        // A new process at its address, without an id (it was killed and
        // started again before its heartbeats ran out): the one before
        // has failed, and the new one gets its id with a new key; the
        // old key is good for nothing.
        assert_eq!(register(&mut c, 5, Kind::Memory, "a:1", 64 * MIB), a);
        assert_eq!(c.components.len(), 1);
        assert_eq!(c.components[&a].state, State::Alive);
        let key2 = key_of(&c, a);
        assert_ne!(key2, key);
        let hb = c.apply(
            6,
            Request::Heartbeat {
                id: a,
                key: key.clone(),
                used_bytes: 0,
                load: 0,
                spaces: vec![],
                processes: vec![],
            },
        );
        assert!(matches!(hb.0, Reply::Error { message } if message.contains("not component")));
        let leave = c.apply(
            6,
            Request::Leave {
                id: a,
                key: String::new(),
            },
        );
        assert!(matches!(leave.0, Reply::Error { .. }));
        assert_eq!(c.components[&a].state, State::Alive);
        // Failed (silent), and restarted without its id: its id back, and
        // a new key.
        c.tick(5000);
        assert_eq!(c.components[&a].state, State::Failed);
        assert_eq!(register(&mut c, 5001, Kind::Memory, "a:1", 64 * MIB), a);
        assert_ne!(key_of(&c, a), key2);
        let p = register(&mut c, 5, Kind::Processor, "p:1", 256 * MIB);
        assert_ne!(p, a);
        let r = c
            .apply(
                6,
                Request::Heartbeat {
                    id: 99,
                    key: key_of(&c, 99),
                    used_bytes: 0,
                    load: 0,
                    spaces: vec![],
                    processes: vec![],
                },
            )
            .0;
        assert!(matches!(r, Reply::Error { message } if message.contains("register again")));
    }

    #[test]
    fn units_of_ended_spaces_are_freed_after_a_grace() {
        let mut c = Cluster::new(900); // heartbeat 300 ms, grace 600 ms
        let a = register(&mut c, 0, Kind::Memory, "a:1", 64 * MIB);
        place(&mut c, 0, 5, 0);
        place(&mut c, 0, 6, 0);
        let hb = |c: &mut Cluster, t: u64, spaces: Vec<u64>| {
            c.apply(
                t,
                Request::Heartbeat {
                    id: a,
                    key: key_of(c, a),
                    used_bytes: 0,
                    load: 0,
                    spaces,
                    processes: vec![],
                },
            )
        };
        // Too early to tell: kept.
        hb(&mut c, 100, vec![]);
        assert_eq!(c.placements.len(), 2);
        let (_, ch) = hb(&mut c, 700, vec![6]);
        assert_eq!(ch.unplaced.into_iter().collect::<Vec<_>>(), [(5, 0)]);
        assert_eq!(c.placements.len(), 1);
    }

    #[test]
    fn a_programs_counters_are_kept_only_within_their_limits() {
        let mut c = Cluster::new(1000);
        let p = register(&mut c, 0, Kind::Processor, "p:1", 256 * MIB);
        let with = |spaces: usize| ProcessInfo {
            pid: 7,
            program: "x".into(),
            excache_bytes: MIB,
            counters: Some(ProgramCounters {
                remote_misses: 3,
                spaces: vec![1; spaces],
                ..Default::default()
            }),
        };
        for (spaces, kept) in [(4, true), (MAX_COUNTER_ENTRIES + 1, false)] {
            c.apply(
                1,
                Request::Heartbeat {
                    id: p,
                    key: key_of(&c, p),
                    used_bytes: 0,
                    load: 1,
                    spaces: vec![],
                    processes: vec![with(spaces)],
                },
            );
            let stored = &c.components[&p].processes[0];
            assert_eq!(stored.counters.is_some(), kept, "{spaces} spaces");
        }
    }

    #[test]
    fn processes_go_to_the_least_loaded_processor_with_room() {
        let mut c = Cluster::new(1000);
        let p1 = register(&mut c, 0, Kind::Processor, "p1:1", 256 * MIB);
        let p2 = register(&mut c, 0, Kind::Processor, "p2:1", 128 * MIB);
        let running = |mib: u64| ProcessInfo {
            pid: 1,
            program: "x".into(),
            excache_bytes: mib * MIB,
            counters: None,
        };
        c.apply(
            1,
            Request::Heartbeat {
                id: p1,
                key: key_of(&c, p1),
                used_bytes: 0,
                load: 1,
                spaces: vec![],
                processes: vec![running(64)],
            },
        );
        let pick = |c: &mut Cluster, mib: u64| {
            c.apply(
                2,
                Request::PlaceProcess {
                    program: "y".into(),
                    excache_bytes: mib * MIB,
                },
            )
            .0
        };
        assert!(matches!(pick(&mut c, 64), Reply::Processor { id, .. } if id == p2));
        // Only p1 has room for 160 MiB.
        assert!(matches!(pick(&mut c, 160), Reply::Processor { id, .. } if id == p1));
        assert!(matches!(pick(&mut c, 300), Reply::Error { .. }));
    }

    #[test]
    fn restore_gives_every_component_a_full_timeout() {
        let mut c = Cluster::new(1000);
        let a = register(&mut c, 0, Kind::Memory, "a:1", 64 * MIB);
        place(&mut c, 0, 1, 0);
        let comps: Vec<_> = c
            .components
            .iter()
            .map(|(&id, comp)| (id, comp.clone()))
            .collect();
        let places: Vec<_> = c
            .placements
            .iter()
            .map(|(&k, p)| (k, p.replicas.clone()))
            .collect();
        let mut r = Cluster::restore(1000, 50_000, comps, places, []);
        assert!(r.tick(50_900).is_empty());
        assert_eq!(placed_on(&place(&mut r, 50_900, 1, 0)), a);
        assert_eq!(r.tick(51_001).components.len(), 1);
    }

    #[test]
    fn a_drained_daemon_gets_its_units_placed_elsewhere_then_leaves() {
        let mut c = Cluster::new(900);
        let a = register(&mut c, 0, Kind::Memory, "a:1", 64 * MIB);
        let b = register(&mut c, 0, Kind::Memory, "b:1", 32 * MIB);
        let p = register(&mut c, 0, Kind::Processor, "p:1", 64 * MIB);
        for u in 0..4 {
            place(&mut c, 1, 7, u);
        }
        let drain = |c: &mut Cluster, id: u64| c.apply(2, Request::Drain { id }).0;
        // Bad targets are refused with a reason.
        assert!(
            matches!(drain(&mut c, 99), Reply::Error { message } if message.contains("no component 99"))
        );
        assert!(
            matches!(drain(&mut c, p), Reply::Error { message } if message.contains("only memory daemons"))
        );
        // a holds 3 units (48 MiB), b has room for 1: a cannot be drained.
        let on_a = (0..4)
            .filter(|&u| placed_on(&place(&mut c, 1, 7, u)) == a)
            .count();
        assert_eq!(on_a, 3);
        assert!(
            matches!(drain(&mut c, a), Reply::Error { message } if message.contains("do not fit"))
        );
        // b's one unit fits on a.
        assert_eq!(drain(&mut c, b), Reply::Ok);
        assert_eq!(drain(&mut c, b), Reply::Ok, "draining again is no error");
        assert_eq!(
            c.apply(3, Request::Draining).0,
            Reply::Draining {
                ids: vec![b],
                failed: vec![],
                back: vec![],
            }
        );
        // Its unit is placed again on a when asked (not degraded: b keeps
        // it until it is copied); no new unit goes to b.
        let moved = (0..4)
            .find(|&u| c.placements[&(7, u)].replicas == [b])
            .unwrap();
        assert_eq!(placed_on(&place(&mut c, 3, 7, moved)), a);
        assert_eq!(c.status(3).degraded_units, 0);
        assert!(matches!(place(&mut c, 3, 8, 0), Reply::Error { .. }));
        // Still holding pages: stays draining.
        assert_eq!(hb(&mut c, 4, b, 4096, vec![7]), Reply::Ok);
        // Empty: told it has left, and never placed on again.
        assert_eq!(hb(&mut c, 5, b, 0, vec![]), Reply::Left);
        assert_eq!(c.components[&b].state, State::Left);
        assert!(
            matches!(drain(&mut c, b), Reply::Error { message } if message.contains("has left"))
        );
    }

    #[test]
    fn a_cancelled_drain_makes_the_daemon_take_placements_again() {
        let mut c = Cluster::new(900);
        let a = register(&mut c, 0, Kind::Memory, "a:1", 64 * MIB);
        let b = register(&mut c, 0, Kind::Memory, "b:1", 64 * MIB);
        let p = register(&mut c, 0, Kind::Processor, "p:1", 64 * MIB);
        let undrain = |c: &mut Cluster, id: u64| c.apply(2, Request::Undrain { id }).0;
        assert_eq!(c.apply(1, Request::Drain { id: b }).0, Reply::Ok);
        assert_eq!(placed_on(&place(&mut c, 1, 7, 0)), a);
        assert_eq!(undrain(&mut c, b), Reply::Ok);
        assert_eq!(c.components[&b].state, State::Alive);
        assert_eq!(undrain(&mut c, b), Reply::Ok, "not draining: nothing to do");
        // b has the most room now.
        assert_eq!(placed_on(&place(&mut c, 2, 7, 1)), b);
        let refused =
            |r: Reply, why: &str| matches!(r, Reply::Error { message } if message.contains(why));
        assert!(refused(undrain(&mut c, 99), "no component 99"));
        assert!(refused(undrain(&mut c, p), "not a memory daemon"));
        c.apply(
            3,
            Request::Leave {
                id: b,
                key: key_of(&c, b),
            },
        );
        assert!(refused(undrain(&mut c, b), "is left, not draining"));
    }

    fn vnode(c: &mut Cluster, name: &str, quota: u64) -> Reply {
        c.apply(
            1,
            Request::CreateVnode {
                name: name.into(),
                storage_quota: quota,
                owner: String::new(),
            },
        )
        .0
    }

    #[test]
    fn vnodes_get_ids_addresses_and_storage_by_free_space() {
        let mut c = Cluster::new(1000).with_vnode_net((0x0a01_0200, 30)); // 10.1.2.0/30: 2 hosts
        assert!(
            matches!(vnode(&mut c, "web", MIB), Reply::Error { message } if message.contains("no alive storage daemon"))
        );
        let s1 = register(&mut c, 0, Kind::Storage, "s1:1", 100 * MIB);
        let s2 = register(&mut c, 0, Kind::Storage, "s2:1", 60 * MIB);
        let info = |r: Reply| match r {
            Reply::Vnode(v) => v,
            other => panic!("{other:?}"),
        };
        let web = info(vnode(&mut c, "web", 50 * MIB));
        assert_eq!(
            (web.vid, web.vip.as_str(), web.storage),
            (1, "10.1.2.1", s1)
        );
        assert_eq!(web.storage_addr, "s1:1");
        // s2 has more room left now (60 against 50).
        let db = info(vnode(&mut c, "db", 40 * MIB));
        assert_eq!((db.vid, db.vip.as_str(), db.storage), (2, "10.1.2.2", s2));
        assert!(
            matches!(vnode(&mut c, "web", MIB), Reply::Error { message } if message.contains("exists"))
        );
        assert!(
            matches!(vnode(&mut c, "x", MIB), Reply::Error { message } if message.contains("no vIP left"))
        );
        for bad in ["", "Web", "../etc", &"a".repeat(65)] {
            assert!(
                matches!(vnode(&mut c, bad, MIB), Reply::Error { .. }),
                "{bad}"
            );
        }
        // Deleted, its vIP is free again; its vID is not reused.
        assert_eq!(
            info(c.apply(2, Request::DeleteVnode { name: "web".into() }).0).name,
            "web"
        );
        let again = info(vnode(&mut c, "api", 10 * MIB));
        assert_eq!((again.vid, again.vip.as_str()), (3, "10.1.2.1"));
        match c
            .apply(
                3,
                Request::Vnodes {
                    names: vec![],
                    vids: vec![],
                },
            )
            .0
        {
            Reply::Vnodes { vnodes } => {
                let names: Vec<&str> = vnodes.iter().map(|v| v.name.as_str()).collect();
                assert_eq!(names, ["api", "db"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            c.apply(3, Request::DeleteVnode { name: "web".into() }).0,
            Reply::Error { .. }
        ));
    }

    #[test]
    fn connected_vnodes_list_each_other_until_disconnected_or_deleted() {
        let mut c = Cluster::new(1000);
        register(&mut c, 0, Kind::Storage, "s1:1", 100 * MIB);
        for name in ["a", "b", "c"] {
            assert!(matches!(vnode(&mut c, name, MIB), Reply::Vnode(_)));
        }
        let link = |c: &mut Cluster, a: &str, b: &str, linked| {
            c.apply(
                2,
                Request::LinkVnodes {
                    a: a.into(),
                    b: b.into(),
                    linked,
                },
            )
        };
        let peers =
            |c: &Cluster, n: &str| -> Vec<String> { c.vnodes[n].peers.iter().cloned().collect() };
        let (r, ch) = link(&mut c, "a", "b", true);
        assert!(
            matches!(r, Reply::Vnodes { ref vnodes } if vnodes.len() == 2 && vnodes[0].peers == ["b"])
        );
        assert_eq!(ch.vnodes.len(), 2, "both records are stored");
        link(&mut c, "a", "c", true);
        assert_eq!(
            (peers(&c, "a"), peers(&c, "b")),
            (vec!["b".to_string(), "c".into()], vec!["a".into()])
        );
        for (a, b, why) in [("a", "a", "itself"), ("a", "zz", "no vNode zz")] {
            assert!(
                matches!(link(&mut c, a, b, true).0, Reply::Error { message } if message.contains(why)),
                "{a} {b}"
            );
        }
        link(&mut c, "b", "a", false);
        assert_eq!(
            (peers(&c, "a"), peers(&c, "b")),
            (vec!["c".to_string()], vec![])
        );
        // A deleted vNode is no one's peer (a new one of its name is not).
        let (_, ch) = c.apply(3, Request::DeleteVnode { name: "c".into() });
        assert!(ch.vnodes.contains("a"));
        assert!(peers(&c, "a").is_empty());
        // Its vIP is the last given again; the next one goes on.
        let Reply::Vnode(d) = vnode(&mut c, "d", MIB) else {
            panic!()
        };
        assert_eq!(d.vip, "10.77.0.4", "not c's 10.77.0.3");
        // Asked for by name or vID, only those.
        let only = |c: &mut Cluster, names: Vec<String>, vids: Vec<u64>| match c
            .apply(4, Request::Vnodes { names, vids })
            .0
        {
            Reply::Vnodes { vnodes } => vnodes.into_iter().map(|v| v.name).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert_eq!(only(&mut c, vec!["b".into()], vec![d.vid]), ["b", "d"]);
        assert_eq!(only(&mut c, vec![], vec![]).len(), 3);
        // At most MAX_PEERS peers each.
        for k in 0..MAX_PEERS {
            let name = format!("p{k}");
            vnode(&mut c, &name, 0);
            assert!(matches!(
                link(&mut c, "a", &name, true).0,
                Reply::Vnodes { .. }
            ));
        }
        vnode(&mut c, "last", 0);
        assert!(
            matches!(link(&mut c, "last", "a", true).0, Reply::Error { message } if message.contains("most"))
        );
    }

    #[test]
    fn a_component_that_leaves_takes_its_placements_and_gets_no_more() {
        let mut c = Cluster::new(900);
        let a = register(&mut c, 0, Kind::Memory, "a:1", 64 * MIB);
        let b = register(&mut c, 0, Kind::Memory, "b:1", 64 * MIB);
        let p = register(&mut c, 0, Kind::Processor, "p:1", 64 * MIB);
        let on: Vec<u64> = (0..4).map(|u| placed_on(&place(&mut c, 1, 7, u))).collect();
        assert!(on.contains(&a) && on.contains(&b));
        let (reply, ch) = c.apply(
            2,
            Request::Leave {
                id: a,
                key: key_of(&c, a),
            },
        );
        assert_eq!(reply, Reply::Ok);
        assert_eq!(c.components[&a].state, State::Left);
        // Its units went with it (the records are removed from storage).
        assert!(c.placements.values().all(|pl| pl.replicas == [b]));
        assert_eq!(ch.unplaced.len(), on.iter().filter(|&&x| x == a).count());
        // Nothing new goes to it; its old units are placed again elsewhere.
        assert!((0..4).all(|u| placed_on(&place(&mut c, 3, 7, u)) == b));
        assert_eq!(
            c.apply(
                3,
                Request::Leave {
                    id: p,
                    key: key_of(&c, p)
                }
            )
            .0,
            Reply::Ok,
            "a processor leaves too"
        );
        let req = Request::PlaceProcess {
            program: "x".into(),
            excache_bytes: MIB,
        };
        assert!(matches!(c.apply(4, req).0, Reply::Error { .. }));
        // Leaving is not heartbeating: a heartbeat after it is told to
        // register again, and an unknown id is an error.
        assert!(matches!(hb(&mut c, 5, a, 0, vec![]), Reply::Error { .. }));
        assert!(matches!(
            c.apply(
                5,
                Request::Leave {
                    id: 99,
                    key: key_of(&c, 99)
                }
            )
            .0,
            Reply::Error { .. }
        ));
    }
}
