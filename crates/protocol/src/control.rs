//! The control plane: what components, clients and the global manager say
//! to each other, carried as JSON in [`crate::Message::Control`].
//!
//! ```text
//! memory / processor daemon            global manager
//!    | Register{kind, addr, capacity}        |
//!    |-------------------------------------->|  (id kept if it re-registers)
//!    |               Registered{id, period}  |
//!    |<--------------------------------------|
//!    | Heartbeat{id, used, load, spaces}     |  every period; none for the
//!    |-------------------------------------->|  timeout: marked failed
//!    |                      Ok / Error       |  (unknown id: register again)
//!    |<--------------------------------------|
//!
//! runtime of a program                 global manager (GMM)
//!    | PlaceMemory{space, unit, keep, avoid} |  first touch of a unit, or a
//!    |-------------------------------------->|  replica lost or draining
//!    |                 Placed{replicas}      |  most free capacity wins,
//!    |<--------------------------------------|  one replica per daemon/zone
//!    | Restored{space, unit, ids}            |  every replica filled again
//!    |-------------------------------------->|  (the unit is not degraded)
//!
//! runtime of a program                 global manager (drain, failures)
//!    | Draining                              |  a few times a second
//!    |-------------------------------------->|
//!    |           Draining{ids, failed}       |  replicas on those daemons
//!    |<--------------------------------------|  are replaced: placed by
//!                                            |  PlaceMemory, copied daemon
//!                                            |  to daemon (CopyRange)
//!
//! lego run / status                    global manager (GPM)
//!    | PlaceProcess{program, excache}        |
//!    |-------------------------------------->|
//!    |               Processor{id, addr}     |  least loaded with room
//!    |<--------------------------------------|
//! ```

use serde::{Deserialize, Serialize};

/// The unit the global memory manager places: a 16 MiB piece of a vRegion.
/// LegoOS places whole 1 GiB vRegions; a smaller unit lets one process
/// spread over small memory daemons (and keeps a drain's moves short).
pub const PLACEMENT_BYTES: u64 = 16 << 20;
/// Longest component address a manager accepts.
pub const MAX_ADDR_BYTES: usize = 256;
/// Most components a manager keeps (its status must fit one frame).
pub const MAX_COMPONENTS: usize = 1024;
/// Highest component id a manager issues or accepts back.
pub const MAX_COMPONENT_ID: u64 = 1 << 32;
/// Most programs a processor daemon reports, and the longest command line
/// reported for one (longer ones are cut).
pub const MAX_PROCESSES: usize = 1024;
pub const MAX_PROGRAM_BYTES: usize = 256;

/// `program` cut to [`MAX_PROGRAM_BYTES`] (at a character boundary).
pub fn short_program(program: &str) -> String {
    if program.len() <= MAX_PROGRAM_BYTES {
        return program.to_string();
    }
    let mut end = MAX_PROGRAM_BYTES - 3;
    while !program.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &program[..end])
}

/// What a component is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Memory,
    Processor,
    /// A storage daemon (`lego storage`): vNodes' files.
    Storage,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Memory => "memory",
            Kind::Processor => "processor",
            Kind::Storage => "storage",
        })
    }
}

/// A component's state as the manager sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Heartbeating; gets placements.
    Alive,
    /// Its vRegions are moving to others; gets no new placements.
    Draining,
    /// Missed its heartbeats for the timeout; gets no new placements.
    Failed,
    /// Left the cluster.
    Left,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Alive => "alive",
            State::Draining => "draining",
            State::Failed => "failed",
            State::Left => "left",
        })
    }
}

/// A program a processor daemon runs, as it reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub program: String,
    pub excache_bytes: u64,
    /// Its runtime's counters, as of the last second (none: not known
    /// yet).
    #[serde(default)]
    pub counters: Option<ProgramCounters>,
}

/// Most latency buckets and address spaces a program's counters may list
/// (a processor daemon and the manager drop counters with more).
pub const MAX_COUNTER_ENTRIES: usize = 64;

/// A running program's counters, summed over its processes (from the
/// statistics page its runtimes share; `lego_metrics::program`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProgramCounters {
    /// Processes whose runtime attached.
    pub processes: u64,
    /// Misses served with a page from a memory daemon, zero-filled
    /// locally, and from the compressed tier.
    pub remote_misses: u64,
    pub zero_fills: u64,
    pub tier_hits: u64,
    /// Pages fetched, and zero-filled, ahead of a miss.
    pub prefetched: u64,
    pub prefilled: u64,
    pub evictions: u64,
    pub writebacks: u64,
    /// Victims dropped without a writeback (all zeros, or unchanged).
    pub clean_drops: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Largest local memory of any one process (resident pages and its
    /// compressed tier), and the compressed tier now.
    pub peak_resident_bytes: u64,
    pub tier_bytes: u64,
    /// Anonymous memory at each process's peak: in the disaggregated
    /// region, and outside it.
    pub disaggregated_bytes: u64,
    pub local_bytes: u64,
    /// Miss service times: counts per bucket of `lego_metrics`'s latency
    /// bounds (the last: above them), and their sum.
    pub miss_latency: Vec<u64>,
    pub miss_latency_sum_us: u64,
    /// The 99th percentile miss latency, in µs (0: no miss yet).
    pub miss_p99_us: u64,
    /// The address spaces holding its processes' memory (where its
    /// memory lives: `ClusterStatus::spaces`).
    pub spaces: Vec<u64>,
}

impl ProgramCounters {
    /// Whether its lists are within [`MAX_COUNTER_ENTRIES`] (they come from
    /// a file the program's user can write).
    pub fn is_sane(&self) -> bool {
        self.miss_latency.len() <= MAX_COUNTER_ENTRIES && self.spaces.len() <= MAX_COUNTER_ENTRIES
    }
}

/// Requests to the global manager.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// A component joins (or, with the `id` and `key` it was given,
    /// joins again).
    Register {
        kind: Kind,
        addr: String,
        capacity_bytes: u64,
        #[serde(default)]
        id: Option<u64>,
        #[serde(default)]
        key: String,
        /// The failure domain a memory daemon declares (`--zone`): the
        /// replicas of a unit go to different zones where there are.
        #[serde(default)]
        zone: String,
    },
    /// A component is alive; memory daemons list the spaces they hold,
    /// processor daemons the programs they run.
    Heartbeat {
        id: u64,
        /// The component's key (from `Registered`).
        #[serde(default)]
        key: String,
        used_bytes: u64,
        #[serde(default)]
        load: u32,
        #[serde(default)]
        spaces: Vec<u64>,
        #[serde(default)]
        processes: Vec<ProcessInfo>,
    },
    /// A component leaves for good (`key`: its own).
    Leave {
        id: u64,
        #[serde(default)]
        key: String,
    },
    /// Where the replicas of unit `unit` (offset in the region /
    /// [`PLACEMENT_BYTES`]) of address space `space` live; placed now if it
    /// is not yet. `keep` are the replicas the asker still has (empty: as
    /// the manager has it), `avoid` daemons it could not reach. Replicas
    /// on daemons that failed, left or drain are replaced by new ones (the
    /// asker fills them from a surviving replica, then says `Restored`).
    PlaceMemory {
        space: u64,
        unit: u64,
        #[serde(default)]
        keep: Vec<u64>,
        #[serde(default)]
        avoid: Vec<u64>,
    },
    /// Every replica `ids` of unit `unit` of `space` holds the unit's
    /// pages again: the unit is no longer degraded.
    Restored {
        space: u64,
        unit: u64,
        ids: Vec<u64>,
    },
    /// Move every unit off memory daemon `id` (`lego drain`): it gets no
    /// new placements, the programs with units on it move them, and once
    /// it holds nothing it is told to leave.
    Drain { id: u64 },
    /// Stop draining memory daemon `id` (`lego drain --cancel`): it takes
    /// new placements again; what already moved stays where it is.
    Undrain { id: u64 },
    /// Which memory daemons are draining (asked by every program's runtime
    /// a few times a second).
    Draining,
    /// Which processor should run a new program.
    PlaceProcess { program: String, excache_bytes: u64 },
    /// The whole cluster, for `lego status`.
    Status,
    /// Make vNode `name`: a vID, a vIP from the manager's range, and its
    /// storage placed on a storage daemon (GSM) with `storage_quota`
    /// bytes.
    /// `owner`: the user (a user credential's name) who may run programs
    /// in it besides the cluster's operators; empty: operators only.
    CreateVnode {
        name: String,
        storage_quota: u64,
        #[serde(default)]
        owner: String,
    },
    /// Forget vNode `name`; answered with its record (`Vnode`).
    DeleteVnode { name: String },
    /// Let vNodes `a` and `b` reach each other's vIP (`linked`), or no
    /// longer; answered with both records (`Vnodes`).
    LinkVnodes { a: String, b: String, linked: bool },
    /// The vNodes named in `names` or with a vID in `vids`; every vNode
    /// when both are empty.
    Vnodes {
        #[serde(default)]
        names: Vec<String>,
        #[serde(default)]
        vids: Vec<u64>,
    },
    /// To a processor daemon: run `argv` (in `cwd`, with `env`) with an
    /// ExCache of `excache_bytes`. Answered with `Launched`, then the
    /// program's output as `Stdio` frames, then `Exited`; the client sends
    /// the program's input as `Stdio` frames meanwhile. With `summary`,
    /// lego's run summary follows the program's stderr; with `stats`,
    /// `Exited` carries the run's statistics.
    Launch {
        argv: Vec<String>,
        cwd: String,
        env: Vec<(String, String)>,
        excache_bytes: u64,
        #[serde(default)]
        summary: bool,
        #[serde(default)]
        stats: bool,
        /// Run it in this vNode (its namespaces and file system).
        #[serde(default)]
        vnode: Option<String>,
    },
    /// To a processor daemon, during a `Launch`: deliver signal `signum`
    /// to the program.
    Signal { signum: i32 },
}

impl Request {
    /// What the request does, for refusals ("may not drain").
    pub fn verb(&self) -> &'static str {
        match self {
            Request::Register { .. } => "register a component",
            Request::Heartbeat { .. } => "heartbeat as a component",
            Request::Leave { .. } => "make a component leave",
            Request::PlaceMemory { .. } => "place memory",
            Request::Restored { .. } => "report memory restored",
            Request::Drain { .. } => "drain a memory daemon",
            Request::Undrain { .. } => "cancel a drain",
            Request::Draining => "ask which daemons drain",
            Request::PlaceProcess { .. } => "place a program",
            Request::Status => "see the cluster",
            Request::CreateVnode { .. } => "create a vNode",
            Request::DeleteVnode { .. } => "delete a vNode",
            Request::LinkVnodes { .. } => "connect vNodes",
            Request::Vnodes { .. } => "list the vNodes",
            Request::Launch { .. } => "launch a program",
            Request::Signal { .. } => "signal a program",
        }
    }
}

/// Replies of the global manager.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// `key` is the component's own: it must come with every later
    /// heartbeat, leave and registration of this id.
    Registered {
        id: u64,
        heartbeat_ms: u64,
        #[serde(default)]
        key: String,
    },
    Ok,
    /// The replicas of a unit, in the order the asker reads them.
    Placed {
        replicas: Vec<Replica>,
    },
    Processor {
        id: u64,
        addr: String,
    },
    Status(Box<ClusterStatus>),
    Vnode(Box<VnodeInfo>),
    Vnodes {
        vnodes: Vec<VnodeInfo>,
    },
    /// The memory daemons being drained, those failed or left (their
    /// replicas are replaced), and those that came back after a failure
    /// in the last minute, with how many milliseconds ago.
    Draining {
        ids: Vec<u64>,
        #[serde(default)]
        failed: Vec<u64>,
        #[serde(default)]
        back: Vec<(u64, u64)>,
    },
    /// To a heartbeat of a drained memory daemon: it holds nothing any
    /// more and has left the cluster.
    Left,
    Launched {
        pid: u32,
    },
    /// The program ended: its exit code, or the signal that killed it;
    /// the run's statistics (the JSON `lego run --stats` writes) if asked.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stats: Option<String>,
    },
    Error {
        message: String,
    },
    /// The manager could not act now (its store did not answer): nothing
    /// was done, and the same request may be sent again.
    Unavailable {
        message: String,
    },
    /// From a manager that does not lead (it stands by for the one in
    /// `leader`, empty when none leads now): nothing was done; ask the
    /// leader. `message` says why in words (another leads, or the store
    /// is unreachable).
    Standby {
        leader: String,
        message: String,
    },
}

/// A vNode, as the manager keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VnodeInfo {
    pub name: String,
    /// Its virtual id.
    pub vid: u64,
    /// Its virtual IP address (IPv4, from the manager's `--vnode-net`).
    pub vip: String,
    /// The storage daemon holding its files (GSM), and its address.
    pub storage: u64,
    pub storage_addr: String,
    pub storage_quota: u64,
    /// The user who may run programs in it besides the operators (empty:
    /// operators only).
    #[serde(default)]
    pub owner: String,
    /// The vNodes whose programs may reach its vIP, and it theirs
    /// (`lego vnode connect`).
    #[serde(default)]
    pub peers: Vec<String>,
}

/// Where one replica of a unit lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub id: u64,
    pub addr: String,
}

/// One component in `lego status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentInfo {
    pub id: u64,
    pub kind: Kind,
    pub addr: String,
    pub state: State,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub load: u32,
    /// Placement units on it (memory daemons).
    pub units: u64,
    /// Milliseconds since its last heartbeat.
    pub last_seen_ms: u64,
    /// Its failure domain (memory daemons; empty: none declared).
    #[serde(default)]
    pub zone: String,
}

/// Where an address space's memory lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceInfo {
    pub space: u64,
    /// (component id, units with a replica on it).
    pub units: Vec<(u64, u64)>,
    /// Units that lost a replica and are not whole again yet.
    #[serde(default)]
    pub degraded: u64,
}

/// A memory daemon's failure (or departure) and the recovery of the units
/// that had a replica on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryInfo {
    pub component: u64,
    /// Units that lost a replica with it.
    pub units: u64,
    /// Of those, still degraded.
    pub degraded: u64,
    /// Milliseconds since it failed.
    pub ago_ms: u64,
    /// How long until every unit was whole again, once they are.
    pub took_ms: Option<u64>,
}

/// A program running on a processor daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningInfo {
    pub processor: u64,
    #[serde(flatten)]
    pub process: ProcessInfo,
}

/// The cluster as the manager sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub components: Vec<ComponentInfo>,
    pub spaces: Vec<SpaceInfo>,
    pub processes: Vec<RunningInfo>,
    /// Replicas the manager gives each unit (fewer while fewer memory
    /// daemons are alive).
    #[serde(default)]
    pub replicas: u64,
    /// Units that lost a replica and are not whole again yet.
    #[serde(default)]
    pub degraded_units: u64,
    /// The latest failures of memory daemons, newest last.
    #[serde(default)]
    pub recoveries: Vec<RecoveryInfo>,
    /// The manager that answered (the leader: standbys send clients on to
    /// it).
    #[serde(default)]
    pub manager: String,
    /// Where its state is kept, and how that store is.
    #[serde(default)]
    pub store: String,
}

/// Encodes a control message as the JSON a `Control` frame carries.
pub fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("control messages always serialise")
}

/// Decodes a control message; the error says what was wrong with it.
pub fn from_json<'a, T: Deserialize<'a>>(json: &'a str) -> Result<T, String> {
    serde_json::from_str(json).map_err(|e| format!("malformed control message: {e}"))
}

/// Formats bytes for people (`1.5 MiB`), as the messages of the control
/// plane and lego's commands show sizes.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1 << 20) as f64 {
        format!("{:.1} MiB", b / (1 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_roundtrip_and_nonsense_is_an_error() {
        let r = Request::Register {
            kind: Kind::Memory,
            addr: "10.0.0.2:7000".into(),
            capacity_bytes: 1 << 30,
            id: None,
            key: String::new(),
            zone: "rack-1".into(),
        };
        let back: Request = from_json(&to_json(&r)).unwrap();
        assert_eq!(back, r);
        let e = from_json::<Request>(r#"{"op":"launch_missiles"}"#).unwrap_err();
        assert!(e.contains("malformed control message"), "{e}");
        assert!(from_json::<Request>("{").is_err());
    }

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
        assert_eq!(human_bytes(3 << 29), "1.50 GiB");
    }
}
