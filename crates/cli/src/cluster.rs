//! `lego manager` and `lego status --manager`: the global manager daemon and
//! the cluster table.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use lego_protocol::control::{Reply, Request, State};
use lego_transport::auth::Credential;

use crate::size::human;
use crate::{fail, LEGO_FAILED};

#[derive(clap::Args)]
pub struct ManagerArgs {
    /// Address to listen on, HOST:PORT.
    #[arg(long, value_name = "ADDR", env = "LEGO_LISTEN")]
    listen: String,
    /// Directory of the manager's state database; a restarted manager finds
    /// the cluster there.
    #[arg(
        long,
        value_name = "DIR",
        env = "LEGO_STATE",
        required_unless_present = "store",
        conflicts_with = "store"
    )]
    state: Option<PathBuf>,
    /// Keep the state in etcd instead, etcd://HOST:PORT[,HOST:PORT...]
    /// (members on TLS: etcds://...?ca=FILE[&cert=FILE&key=FILE]):
    /// several managers may share it, one leads, the others stand by and
    /// take over when its lease ends.
    #[arg(long, value_name = "URL", env = "LEGO_STORE")]
    store: Option<String>,
    /// A component that sends no heartbeat for this long is marked failed
    /// and gets no new placements, e.g. 3s or 500ms.
    #[arg(long, value_name = "TIME", default_value = "3s", value_parser = parse_duration, env = "LEGO_HEARTBEAT_TIMEOUT")]
    heartbeat_timeout: Duration,
    /// Replicas of each unit of memory, on different memory daemons (and
    /// zones, where daemons declare them): a program survives the failure
    /// of all but one. Fewer while fewer memory daemons are alive.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=4), env = "LEGO_REPLICAS")]
    replicas: u8,
    /// The network vNodes' virtual IP addresses come from, ADDRESS/PREFIX.
    #[arg(long, value_name = "NET", default_value = "10.77.0.0/16", value_parser = parse_net, env = "LEGO_VNODE_NET")]
    vnode_net: (u32, u8),
    /// The address clients and components reach this manager at, where
    /// it differs from --listen (0.0.0.0, NAT): it names the leader to
    /// those that ask a standby, and in `lego status`.
    #[arg(long, value_name = "ADDR", env = "LEGO_ADVERTISE")]
    advertise: Option<String>,
    #[command(flatten)]
    metrics: crate::MetricsArg,
    #[command(flatten)]
    key: crate::keys::KeyArg,
}

/// Parses `10.77.0.0/16` (prefix 8 to 30).
fn parse_net(s: &str) -> Result<(u32, u8), String> {
    let bad = || format!("'{s}' is not an IPv4 network like 10.77.0.0/16 (prefix 8 to 30)");
    let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
    let addr: std::net::Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if !(8..=30).contains(&prefix) {
        return Err(bad());
    }
    // Not loopback, link-local (the vNode router's 169.254.0.1),
    // "this network", multicast or reserved: vIPs must route like hosts'.
    let first = u32::from(addr) & (u32::MAX << (32 - u32::from(prefix)));
    let last = first | !(u32::MAX << (32 - u32::from(prefix)));
    for (net, len, what) in [
        (0x0000_0000u32, 8u32, "0.0.0.0/8"),
        (0x7f00_0000, 8, "loopback 127.0.0.0/8"),
        (0xa9fe_0000, 16, "link-local 169.254.0.0/16"),
        (0xe000_0000, 3, "multicast and reserved 224.0.0.0/3"),
    ] {
        let (lo, hi) = (net, net | !(u32::MAX << (32 - len)));
        if first <= hi && lo <= last {
            return Err(format!(
                "'{s}' overlaps {what}: vIPs cannot come from there"
            ));
        }
    }
    Ok((u32::from(addr), prefix))
}

/// Parses `500ms`, `3s`, `2m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (e.g. 500ms, 3s, 2m)"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use ms, s or m)")),
    };
    if !(secs > 0.0 && secs < 1e7) {
        return Err(format!("'{s}' is not a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn manager(args: ManagerArgs) -> ExitCode {
    let cred = match args.key.daemon(&args.listen) {
        Ok(c) => c,
        Err(e) => return fail("lego manager", e),
    };
    let options = (
        args.heartbeat_timeout,
        usize::from(args.replicas),
        args.vnode_net,
    );
    use lego_transport::Transport;
    let listener = match lego_transport::Tcp.listen(&args.listen) {
        Ok(l) => l,
        Err(e) => return fail("lego manager", e),
    };
    let name = match (&args.advertise, listener.local_addr()) {
        (Some(a), _) => a.clone(),
        (None, Ok(a)) => {
            if a.ip().is_unspecified() && args.store.is_some() {
                eprintln!(
                    "lego manager: listening on {a} without --advertise: a standby cannot tell \
                     clients where this manager is (they try the other managers they were given)"
                );
            }
            a.to_string()
        }
        (None, Err(e)) => return fail("lego manager", e),
    };
    // Metrics from the start: a standby's say only that it stands by.
    let serving: Arc<OnceLock<lego_metrics::http::ScrapeFn>> = Arc::default();
    let scraper: lego_metrics::http::ScrapeFn = {
        let serving = serving.clone();
        Arc::new(move || match serving.get() {
            Some(scrape) => scrape(),
            None => lego_manager::standby::scrape(false),
        })
    };
    let _metrics = match args.metrics.serve("lego manager", scraper) {
        Ok(s) => s,
        Err(e) => return fail("lego manager", e),
    };
    let started = match (&args.state, &args.store) {
        (Some(dir), _) => lego_manager::db::Db::open(dir)
            .map_err(|e| e.to_string())
            .and_then(|db| {
                lego_manager::Manager::serve_on(listener, &name, Box::new(db), options, cred)
                    .map_err(|e| e.to_string())
            }),
        (None, Some(url)) => lead_on_etcd(listener, &name, url, options, cred),
        (None, None) => return fail("lego manager", "give --state DIR or --store etcd://..."),
    };
    let where_ = match (&args.state, &args.store) {
        (Some(dir), _) => format!("state in {}", dir.display()),
        (None, Some(url)) => format!("state in {url}, leading"),
        (None, None) => String::new(),
    };
    match started {
        Ok(m) => {
            let _ = serving.set(m.scraper());
            eprintln!(
                "lego manager: serving on {} with {where_}, {} replica(s) per unit",
                m.addr(),
                args.replicas
            );
            m.wait();
            ExitCode::SUCCESS
        }
        Err(e) => fail("lego manager", e),
    }
}

/// Stands by on `listener` (answering with the leader's address) until
/// this manager leads the managers sharing the etcd cluster `url`, then
/// serves on it.
#[cfg(feature = "etcd")]
fn lead_on_etcd(
    listener: std::net::TcpListener,
    name: &str,
    url: &str,
    options: (Duration, usize, (u32, u8)),
    cred: Credential,
) -> Result<lego_manager::Manager, String> {
    let standby = lego_manager::standby::Standby::serve(&listener, cred.clone())
        .map_err(|e| format!("cannot answer as a standby: {e}"))?;
    let store = lego_manager::etcd::EtcdStore::lead(url, "/lego/", name, &|leader, why| {
        standby.set(leader, why)
    })?;
    standby.stop();
    // Leading but unable to start (its state unreadable, say): another
    // manager may do better, and this one tries again as a standby.
    Ok(
        lego_manager::Manager::serve_on(listener, name, Box::new(store), options, cred)
            .unwrap_or_else(|e| {
                lego_manager::etcd::start_again(&format!("cannot start leading: {e}"))
            }),
    )
}

#[cfg(not(feature = "etcd"))]
fn lead_on_etcd(
    _: std::net::TcpListener,
    _: &str,
    _: &str,
    _: (Duration, usize, (u32, u8)),
    _: Credential,
) -> Result<lego_manager::Manager, String> {
    Err(
        "this lego was built without etcd: build it with `cargo build --release \
         --features lego/etcd` (its gRPC client needs protoc: apt install protobuf-compiler)"
            .into(),
    )
}

pub fn status(manager: &str, json: bool, cred: &Credential) -> ExitCode {
    let s = match lego_transport::ask_manager(manager, &Request::Status, cred) {
        Ok(Reply::Status(s)) => s,
        Ok(other) => return fail("lego status", format!("unexpected answer {other:?}")),
        Err(e) => return fail("lego status", e),
    };
    if json {
        match serde_json::to_string_pretty(&s) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("lego status: {e}");
                return ExitCode::from(LEGO_FAILED);
            }
        }
        return ExitCode::SUCCESS;
    }
    println!(
        "{:>3} {:<9} {:<22} {:<8} {:>10} {:>10} {:>5} {:>6}  ZONE",
        "ID", "KIND", "ADDRESS", "STATE", "CAPACITY", "USED", "LOAD", "UNITS"
    );
    for c in &s.components {
        println!(
            "{:>3} {:<9} {:<22} {:<8} {:>10} {:>10} {:>5} {:>6}  {}",
            c.id,
            c.kind.to_string(),
            c.addr,
            c.state.to_string(),
            human(c.capacity_bytes),
            human(c.used_bytes),
            c.load,
            c.units,
            printable(&c.zone, 24)
        );
    }
    println!();
    println!(
        "replicas per unit: {}; degraded units: {}",
        s.replicas, s.degraded_units
    );
    if !s.manager.is_empty() {
        println!("leading manager: {}; state: {}", s.manager, s.store);
    }
    for r in &s.recoveries {
        let ago = r.ago_ms as f64 / 1000.0;
        match r.took_ms {
            Some(took) => println!(
                "memory daemon {} lost {}s ago: its {} unit(s) whole again after {:.1}s",
                r.component,
                ago.round(),
                r.units,
                took as f64 / 1000.0
            ),
            None => println!(
                "memory daemon {} lost {}s ago: {} of its {} unit(s) still degraded",
                r.component,
                ago.round(),
                r.degraded,
                r.units
            ),
        }
    }
    if !s.processes.is_empty() {
        println!();
        println!(
            "{:<10} {:>8} {:>10}  PROGRAM",
            "PROCESSOR", "PID", "EXCACHE"
        );
        for p in &s.processes {
            let program = printable(&p.process.program, 60);
            println!(
                "{:<10} {:>8} {:>10}  {}",
                p.processor,
                p.process.pid,
                human(p.process.excache_bytes),
                program
            );
        }
    }
    if !s.spaces.is_empty() {
        println!();
        println!(
            "{:<18}  PLACEMENT (memory daemon id: 16 MiB unit replicas)",
            "SPACE"
        );
        for sp in &s.spaces {
            let by: Vec<String> = sp
                .units
                .iter()
                .map(|(id, n)| format!("{id}: {n}"))
                .collect();
            let degraded = if sp.degraded > 0 {
                format!("  ({} degraded)", sp.degraded)
            } else {
                String::new()
            };
            println!("{:<18x}  {}{degraded}", sp.space, by.join(", "));
        }
    }
    ExitCode::SUCCESS
}

#[derive(clap::Args)]
pub struct VnodeArgs {
    #[command(subcommand)]
    command: VnodeCommand,
    /// Global manager of the cluster, HOST:PORT.
    #[arg(long, global = true, value_name = "ADDR", env = "LEGO_MANAGER")]
    manager: Option<String>,
    #[command(flatten)]
    key: crate::keys::KeyArg,
}

#[derive(clap::Subcommand)]
enum VnodeCommand {
    /// Make a vNode: a vID, a vIP and its files on a storage daemon.
    Create {
        name: String,
        /// Storage the vNode's files may take, e.g. 10G.
        #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = crate::size::parse_size)]
        storage_quota: u64,
        /// The user (as `lego keygen --user` names them) who may run
        /// programs in it; without it, only the cluster's operators may.
        #[arg(long, value_name = "USER", default_value = "")]
        owner: String,
    },
    /// The vNodes of the cluster.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a vNode, and its files from its storage daemon.
    Delete { name: String },
    /// Let two vNodes' programs reach each other's vIP (on a processor
    /// host that runs both).
    Connect { a: String, b: String },
    /// Undo `connect`: new connections between the two fail.
    Disconnect { a: String, b: String },
}

/// `lego vnode`: make, list and delete vNodes at the manager.
pub fn vnode(args: VnodeArgs) -> ExitCode {
    let Some(manager) = &args.manager else {
        return fail("lego vnode", "give --manager (or LEGO_MANAGER)");
    };
    let cred = match args.key.client() {
        Ok(c) => c,
        Err(e) => return fail("lego vnode", e),
    };
    let req = match &args.command {
        VnodeCommand::Create {
            name,
            storage_quota,
            owner,
        } => Request::CreateVnode {
            name: name.clone(),
            storage_quota: *storage_quota,
            owner: owner.clone(),
        },
        VnodeCommand::List { .. } => Request::Vnodes {
            names: vec![],
            vids: vec![],
        },
        VnodeCommand::Delete { name } => Request::DeleteVnode { name: name.clone() },
        VnodeCommand::Connect { a, b } | VnodeCommand::Disconnect { a, b } => Request::LinkVnodes {
            a: a.clone(),
            b: b.clone(),
            linked: matches!(args.command, VnodeCommand::Connect { .. }),
        },
    };
    let reply = match lego_transport::ask_manager(manager, &req, &cred) {
        Ok(r) => r,
        Err(e) => return fail("lego vnode", e),
    };
    let show = |v: &lego_protocol::control::VnodeInfo| {
        println!(
            "{:<20} {:>6} {:<15} {:>7} {:>10}  {}",
            printable(&v.name, 20),
            v.vid,
            v.vip,
            v.storage,
            human(v.storage_quota),
            printable(&v.peers.join(","), 60)
        )
    };
    let header = || {
        println!(
            "{:<20} {:>6} {:<15} {:>7} {:>10}  PEERS",
            "NAME", "VID", "VIP", "STORAGE", "QUOTA"
        )
    };
    match (reply, &args.command) {
        (Reply::Error { message }, _) => fail("lego vnode", message),
        (Reply::Vnode(v), VnodeCommand::Delete { .. }) => {
            // Gone at the manager; now its files.
            let removed = lego_storage::Client::connect(&v.storage_addr, v.vid, &cred)
                .map_err(|e| e.to_string())
                .and_then(|mut c| c.remove_tree().map_err(|e| e.to_string()));
            match removed {
                Ok(()) => {
                    eprintln!(
                        "lego vnode: deleted {}; its files are removed from storage daemon {}",
                        v.name, v.storage_addr
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(
                    "lego vnode",
                    format!(
                        "deleted {} at the manager, but its files remain on storage daemon {} (vnodes/{} under its --dir): {e}",
                        v.name, v.storage_addr, v.vid
                    ),
                ),
            }
        }
        (Reply::Vnode(v), _) => {
            header();
            show(&v);
            ExitCode::SUCCESS
        }
        (Reply::Vnodes { vnodes }, VnodeCommand::List { json: true }) => {
            match serde_json::to_string_pretty(&vnodes) {
                Ok(j) => {
                    println!("{j}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail("lego vnode", e),
            }
        }
        (Reply::Vnodes { vnodes }, _) => {
            header();
            vnodes.iter().for_each(show);
            ExitCode::SUCCESS
        }
        (Reply::Ok, _) => ExitCode::SUCCESS,
        (other, _) => fail("lego vnode", format!("unexpected answer {other:?}")),
    }
}

/// `text` for a terminal: control characters blanked, at most `most`
/// characters (an ellipsis if cut).
pub(crate) fn printable(text: &str, most: usize) -> String {
    let mut s: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(most)
        .collect();
    if text.chars().count() > most {
        s.push('…');
    }
    s
}

#[derive(clap::Args)]
pub struct DrainArgs {
    /// Id of the memory daemon to empty (the ID column of `lego status`).
    #[arg(value_name = "MEMORY-ID")]
    id: u64,
    /// Global manager of the cluster, HOST:PORT.
    #[arg(long, value_name = "ADDR", env = "LEGO_MANAGER")]
    manager: String,
    /// Stop waiting after this long, e.g. 30s or 5m; the drain itself goes on.
    #[arg(long, value_name = "TIME", default_value = "10m", value_parser = parse_duration)]
    timeout: Duration,
    /// Start the drain and return at once (`lego status` shows its progress).
    #[arg(long)]
    no_wait: bool,
    /// Stop draining: the daemon takes new memory again; what already moved
    /// off it stays where it went.
    #[arg(long, conflicts_with_all = ["no_wait", "timeout"])]
    cancel: bool,
    #[command(flatten)]
    key: crate::keys::KeyArg,
}

/// `lego drain`: marks a memory daemon draining, then waits, printing what
/// is left on it, until the programs using it have moved their memory away
/// and it has left the cluster.
pub fn drain(args: DrainArgs) -> ExitCode {
    let id = args.id;
    let cred = match args.key.client() {
        Ok(c) => c,
        Err(e) => return fail("lego drain", e),
    };
    if args.cancel {
        return match lego_transport::ask_manager(&args.manager, &Request::Undrain { id }, &cred) {
            Ok(Reply::Ok) => {
                eprintln!("lego drain: memory daemon {id} is not draining; it takes new memory");
                ExitCode::SUCCESS
            }
            Ok(other) => fail("lego drain", format!("unexpected answer {other:?}")),
            Err(e) => fail("lego drain", e),
        };
    }
    match lego_transport::ask_manager(&args.manager, &Request::Drain { id }, &cred) {
        Ok(Reply::Ok) => {}
        Ok(other) => return fail("lego drain", format!("unexpected answer {other:?}")),
        Err(e) => return fail("lego drain", e),
    }
    eprintln!("lego drain: memory daemon {id} is draining; no new memory goes to it");
    if args.no_wait {
        return ExitCode::SUCCESS;
    }
    let deadline = std::time::Instant::now() + args.timeout;
    let mut last = None;
    loop {
        let c = match lego_transport::ask_manager(&args.manager, &Request::Status, &cred) {
            Ok(Reply::Status(s)) => s.components.into_iter().find(|c| c.id == id),
            Ok(other) => return fail("lego drain", format!("unexpected answer {other:?}")),
            Err(e) => return fail("lego drain", e),
        };
        let Some(c) = c else {
            return fail(
                "lego drain",
                format!("memory daemon {id} is gone from the cluster"),
            );
        };
        match c.state {
            State::Left => {
                eprintln!("lego drain: memory daemon {id} holds nothing and has left the cluster");
                return ExitCode::SUCCESS;
            }
            State::Failed => {
                return fail(
                    "lego drain",
                    format!("memory daemon {id} failed while draining: what it held is lost"),
                )
            }
            State::Alive | State::Draining => {}
        }
        let left = (c.used_bytes, c.units);
        if last != Some(left) {
            eprintln!(
                "lego drain: {} in {} units left on memory daemon {id}",
                human(c.used_bytes),
                c.units
            );
            last = Some(left);
        }
        if std::time::Instant::now() >= deadline {
            return fail(
                "lego drain",
                format!(
                    "memory daemon {id} still holds {} after {:?}; the drain goes on",
                    human(c.used_bytes),
                    args.timeout
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("0s").is_err());
    }

    #[test]
    fn vnode_nets() {
        assert_eq!(parse_net("10.77.0.0/16").unwrap(), (0x0a4d_0000, 16));
        for bad in [
            "169.254.0.0/16",
            "169.0.0.0/8",
            "127.1.0.0/16",
            "0.1.0.0/16",
            "239.0.0.0/8",
            "10.0.0.0/31",
            "10.0.0.0",
            "x/8",
        ] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
    }
}
