//! vNode networks on one processor host. The processor daemon keeps a
//! network namespace per vNode with programs here, and one more of its
//! own, the *router*, which is all that joins them:
//!
//! ```text
//!   vNode a's namespace          router namespace          vNode b's
//!   eth0 10.77.0.1/32 ──veth── lv1 ┐                ┌ lv2 ──veth── eth0 10.77.0.2/32
//!   default via 169.254.0.1        169.254.0.1 on each lv*
//!                                  table 100: vIP/32 → its lv*
//!                                  rules: iif lvA to vIP_B → table 100
//!                                         (one per connected pair)
//! ```
//!
//! The router forwards a packet only by a rule that names the interface
//! it came in on (its vNode, which no program can forge), its source (the
//! vNode's vIP) and the vIP it is for; there is one such rule each way
//! for every two vNodes connected at the manager (`lego vnode connect`)
//! that both have programs here. Everything else finds no route: the
//! router answers "Network is unreachable" (ICMP, which the kernel
//! rate-limits: a burst of retries may wait out its timeout instead). The
//! host's
//! own namespace has no interface in the router's, so no vNode reaches
//! the host or the network beyond it; the cluster's daemons it reaches
//! only through its broker ([`crate::vnode`]).
//!
//! Runs of one vNode share its namespace (its vIP and loopback). Each
//! namespace is the daemon's while a run holds it ([`NetworkHold`]); the
//! last run's end removes its veth pair and rules, and the daemon's end
//! takes the router with it: nothing is left on the host.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

use lego_protocol::control::VnodeInfo;

/// The router's address on every vNode's link, each vNode's gateway.
const GATEWAY: &str = "169.254.0.1";

/// The router's routing table of the vNodes' vIPs.
const TABLE: &str = "100";

/// The preference of the rules that let one vNode reach another.
const PAIR_PREF: &str = "1000";

/// How long one `ip -batch` may take before it is killed.
const IP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One vNode's namespace held here.
struct Held {
    ns: File,
    runs: usize,
    name: String,
    vip: String,
    /// The vIDs of the vNodes it is connected to, by the manager's last
    /// word (none once it is deleted there: its runs here are orphans).
    peers: Vec<u64>,
}

/// One pair rule: from a vNode's link and vIP, to another's vIP.
type Rule = (u64, String, String);

#[derive(Default)]
struct Inner {
    router: Option<File>,
    held: HashMap<u64, Held>,
    /// The pair rules in force.
    rules: BTreeSet<Rule>,
}

/// The network namespaces of the vNodes with programs on this host.
#[derive(Clone, Default)]
pub struct Networks {
    inner: Arc<Mutex<Inner>>,
}

/// A run's hold on its vNode's network namespace (released on drop).
pub struct NetworkHold {
    nets: Networks,
    vid: u64,
}

fn link_of(vid: u64) -> String {
    format!("lv{vid}")
}

/// A path (`/proc/<daemon>/fd/<n>`) that opens `ns` while it is open here.
fn path_of(ns: &File) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), ns.as_raw_fd())
}

/// Runs `commands` (`ip -batch` lines) in namespace `ns` (none: a new
/// one, returned). The daemon's own threads stay where they are: this
/// runs on a thread of its own.
fn ip_in(ns: Option<&File>, commands: &[String]) -> Result<Option<File>, String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let made = match ns {
                Some(ns) => {
                    lego_sys::ns::enter_network(ns)
                        .map_err(|e| format!("cannot enter a vNode network namespace: {e}"))?;
                    None
                }
                None => {
                    lego_sys::ns::enter_new_network().map_err(|e| {
                        format!("cannot make a network namespace (this needs root, or CAP_SYS_ADMIN): {e}")
                    })?;
                    let f = File::open("/proc/thread-self/ns/net")
                        .map_err(|e| format!("cannot open the new network namespace: {e}"))?;
                    Some(f)
                }
            };
            if !commands.is_empty() {
                run_ip(commands)?;
            }
            Ok(made)
        })
        .join()
        .unwrap_or_else(|_| Err("the namespace thread panicked".into()))
    })
}

fn run_ip(commands: &[String]) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .env_clear()
        .env("PATH", crate::vnode::SAFE_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    let mut script = commands.join("\n");
    script.push('\n');
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let started = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if started.elapsed() < IP_TIMEOUT => {
                std::thread::sleep(std::time::Duration::from_millis(2))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "ip did not finish within {IP_TIMEOUT:?} (running: {})",
                    commands.join("; ")
                ));
            }
            Err(e) => return Err(format!("ip (iproute2) failed: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    Err(format!(
        "ip: {} (running: {})",
        err.trim(),
        commands.join("; ")
    ))
}

/// Each held vNode's peers by `vnodes` (the manager's records of it and
/// of the vNodes it may be connected to): by vID, so a vNode deleted and
/// made again under its name is another one.
fn take_peers(held: &mut HashMap<u64, Held>, vnodes: &[VnodeInfo]) -> bool {
    let mut changed = false;
    for (vid, h) in held.iter_mut() {
        let peers: Vec<u64> = match vnodes.iter().find(|v| v.vid == *vid) {
            Some(v) => vnodes
                .iter()
                .filter(|o| v.peers.contains(&o.name))
                .map(|o| o.vid)
                .collect(),
            None => Vec::new(),
        };
        if peers != h.peers {
            h.peers = peers;
            changed = true;
        }
    }
    changed
}

impl Networks {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds vNode `v`'s namespace on this host (made, with its link to
    /// the router, if it has none here yet), and answers the path a run
    /// opens to join it; the hold keeps it open until the run ends.
    /// `vnodes`: the manager's records of `v` and of the vNodes held here
    /// (who is connected to whom now).
    pub fn hold(
        &self,
        v: &VnodeInfo,
        vnodes: &[VnodeInfo],
    ) -> Result<(NetworkHold, String), String> {
        let mut inner = self.lock();
        if let Some((old, _)) = inner
            .held
            .iter()
            .find(|(&vid, h)| vid != v.vid && h.vip == v.vip)
        {
            return Err(format!(
                "its vIP {} is still taken on this host by the programs of a deleted vNode (vID {old}); it can run here once they end",
                v.vip
            ));
        }
        if inner.router.is_none() {
            inner.router = Some(make_router()?);
        }
        if let Some(h) = inner.held.get_mut(&v.vid) {
            h.runs += 1;
        } else {
            let router = inner.router.as_ref().expect("made above");
            let ns = make_vnode_network(v, router)?;
            inner.held.insert(
                v.vid,
                Held {
                    ns,
                    runs: 1,
                    name: v.name.clone(),
                    vip: v.vip.clone(),
                    peers: Vec::new(),
                },
            );
        }
        take_peers(&mut inner.held, vnodes);
        apply_rules(&mut inner);
        let path = path_of(&inner.held[&v.vid].ns);
        Ok((
            NetworkHold {
                nets: self.clone(),
                vid: v.vid,
            },
            path,
        ))
    }

    /// The names of the vNodes with programs here (what to ask the
    /// manager about).
    pub fn names(&self) -> Vec<String> {
        self.lock().held.values().map(|h| h.name.clone()).collect()
    }

    /// Takes the manager's records of the vNodes held here (`vnodes`):
    /// which of them may reach each other now.
    pub fn update(&self, vnodes: &[VnodeInfo]) {
        let mut inner = self.lock();
        if take_peers(&mut inner.held, vnodes) {
            apply_rules(&mut inner);
        }
    }

    fn release(&self, vid: u64) {
        let mut inner = self.lock();
        let Some(h) = inner.held.get_mut(&vid) else {
            return;
        };
        h.runs -= 1;
        if h.runs > 0 {
            return;
        }
        inner.held.remove(&vid);
        apply_rules(&mut inner);
        // The pair goes with its router end (a later run makes a new one).
        if let Some(router) = &inner.router {
            if let Err(e) = ip_in(Some(router), &[format!("link del {}", link_of(vid))]) {
                tracing::warn!(vid, error = %e, "cannot remove a vNode's link");
            }
        }
    }
}

impl Drop for NetworkHold {
    fn drop(&mut self) {
        self.nets.release(self.vid);
    }
}

/// The router namespace: forwarding on, vIP routes in [`TABLE`], which
/// only its own packets (ICMP errors) and the pair rules look in.
fn make_router() -> Result<File, String> {
    let router = ip_in(None, &[])?.expect("a new namespace");
    std::thread::scope(|s| {
        s.spawn(|| -> Result<(), String> {
            lego_sys::ns::enter_network(&router)
                .map_err(|e| format!("cannot enter the vNode router's namespace: {e}"))?;
            // Read in the calling thread's network namespace.
            std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1")
                .map_err(|e| format!("cannot turn forwarding on in the vNode router: {e}"))?;
            run_ip(&[
                "link set lo up".into(),
                format!("rule add pref 100 iif lo lookup {TABLE}"),
            ])
        })
        .join()
        .unwrap_or_else(|_| Err("the namespace thread panicked".into()))
    })?;
    Ok(router)
}

/// A new namespace for vNode `v`: loopback, and `eth0` with its vIP,
/// linked to `router`.
fn make_vnode_network(v: &VnodeInfo, router: &File) -> Result<File, String> {
    if v.vip.parse::<std::net::Ipv4Addr>().is_err() {
        return Err(format!("vNode '{}' has no IPv4 vIP ({:?})", v.name, v.vip));
    }
    let link = link_of(v.vid);
    // A pair left by a run that ended uncleanly goes first.
    let _ = ip_in(Some(router), &[format!("link del {link}")]);
    let ns = ip_in(
        None,
        &[
            "link set lo up".into(),
            format!(
                "link add eth0 type veth peer name {link} netns {}",
                path_of(router)
            ),
            "link set eth0 up".into(),
            format!("addr add {}/32 dev eth0", v.vip),
            format!("route add {GATEWAY} dev eth0 scope link"),
            format!("route add default via {GATEWAY} dev eth0 src {}", v.vip),
        ],
    )?
    .expect("a new namespace");
    ip_in(
        Some(router),
        &[
            format!("addr add {GATEWAY}/32 dev {link}"),
            format!("link set {link} up"),
            format!("route add {}/32 dev {link} table {TABLE}", v.vip),
        ],
    )?;
    Ok(ns)
}

/// The pair rules `held` calls for: one from each vNode to each connected
/// vNode that has programs here, both ways only once both say so.
fn wanted_rules(held: &HashMap<u64, Held>) -> BTreeSet<Rule> {
    let mut want = BTreeSet::new();
    for (&vid, h) in held {
        for peer in &h.peers {
            if let Some(other) = held.get(peer) {
                if other.peers.contains(&vid) {
                    want.insert((vid, h.vip.clone(), other.vip.clone()));
                }
            }
        }
    }
    want
}

/// Brings the router's pair rules to what the held vNodes call for.
fn apply_rules(inner: &mut Inner) {
    let want = wanted_rules(&inner.held);
    let Some(router) = &inner.router else {
        return;
    };
    let rule = |op: &str, (vid, from, to): &Rule| {
        format!(
            "rule {op} pref {PAIR_PREF} iif {} from {from}/32 to {to}/32 lookup {TABLE}",
            link_of(*vid)
        )
    };
    let mut commands: Vec<String> = inner
        .rules
        .difference(&want)
        .map(|r| rule("del", r))
        .collect();
    commands.extend(want.difference(&inner.rules).map(|r| rule("add", r)));
    if commands.is_empty() {
        return;
    }
    match ip_in(Some(router), &commands) {
        Ok(_) => inner.rules = want,
        Err(e) => {
            tracing::warn!(error = %e, "cannot set the vNode router's rules");
            // Known again from scratch next time: flush and add.
            let mut again = vec![format!("rule flush pref {PAIR_PREF}")];
            again.extend(want.iter().map(|r| rule("add", r)));
            match ip_in(Some(router), &again) {
                Ok(_) => inner.rules = want,
                Err(e) => tracing::warn!(error = %e, "cannot set the vNode router's rules"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(name: &str, vip: &str) -> Held {
        Held {
            ns: File::open("/dev/null").unwrap(),
            runs: 1,
            name: name.into(),
            vip: vip.into(),
            peers: vec![],
        }
    }

    fn record(name: &str, vid: u64, peers: &[&str]) -> VnodeInfo {
        VnodeInfo {
            name: name.into(),
            vid,
            vip: format!("10.0.0.{vid}"),
            storage: 1,
            storage_addr: String::new(),
            storage_quota: 0,
            owner: String::new(),
            peers: peers.iter().map(|p| p.to_string()).collect(),
        }
    }

    /// The rules, as "vID:from>to".
    fn rules(h: &HashMap<u64, Held>) -> Vec<String> {
        wanted_rules(h)
            .into_iter()
            .map(|(vid, from, to)| format!("{vid}:{from}>{to}"))
            .collect()
    }

    #[test]
    fn rules_go_both_ways_between_connected_vnodes_held_here() {
        let mut h = HashMap::new();
        for (vid, name) in [(1, "a"), (2, "b"), (3, "c"), (4, "d")] {
            h.insert(vid, held(name, &format!("10.0.0.{vid}")));
        }
        // c has not been told of a yet (an older record): nothing yet.
        let mut list = vec![
            record("a", 1, &["b", "c", "gone"]),
            record("b", 2, &["a"]),
            record("c", 3, &[]),
            record("d", 4, &[]),
        ];
        assert!(take_peers(&mut h, &list));
        assert_eq!(rules(&h), ["1:10.0.0.1>10.0.0.2", "2:10.0.0.2>10.0.0.1"]);
        list[2].peers = vec!["a".into()];
        take_peers(&mut h, &list);
        assert_eq!(rules(&h).len(), 4);
        // b: connected to a only; a to b and c: b does not reach c.
        assert!(!rules(&h)
            .iter()
            .any(|r| r.starts_with("2:") && r.ends_with(">10.0.0.3")));
        // Deleted at the manager (no record), b's runs here are orphans.
        list.remove(1);
        assert!(take_peers(&mut h, &list));
        assert_eq!(rules(&h), ["1:10.0.0.1>10.0.0.3", "3:10.0.0.3>10.0.0.1"]);
        // A new "b" (another vID) connected to a is not the orphan.
        h.insert(5, held("b", "10.0.0.5"));
        list[0].peers.push("b".into());
        list.push(record("b", 5, &["a"]));
        take_peers(&mut h, &list);
        assert!(rules(&h).contains(&"5:10.0.0.5>10.0.0.1".to_string()));
        assert!(!rules(&h).iter().any(|r| r.contains("10.0.0.2")));
    }
}
