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
//! it came in on (its vNode, which no program can forge) and the vIP it is
//! for; there is one such rule each way for every two vNodes connected
//! at the manager (`lego vnode connect`) that both have programs here.
//! Everything else finds no route: a program connecting to a vNode it is
//! not connected to fails at once ("Network is unreachable"). The host's
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

/// One vNode's namespace held here.
struct Held {
    ns: File,
    runs: usize,
    name: String,
    vip: String,
    peers: Vec<String>,
}

#[derive(Default)]
struct Inner {
    router: Option<File>,
    held: HashMap<u64, Held>,
    /// The pair rules in force: (from vID, to vIP).
    rules: BTreeSet<(u64, String)>,
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
    use std::io::Write;
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
    let out = child
        .wait_with_output()
        .map_err(|e| format!("ip (iproute2) failed: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip: {} (running: {})",
            String::from_utf8_lossy(&out.stderr).trim(),
            commands.join("; ")
        ))
    }
}

impl Networks {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds vNode `v`'s namespace on this host (made, with its link to
    /// the router, if it has none here yet), and answers the path a run
    /// opens to join it; the hold keeps it open until the run ends.
    pub fn hold(&self, v: &VnodeInfo) -> Result<(NetworkHold, String), String> {
        let mut inner = self.lock();
        if inner.router.is_none() {
            inner.router = Some(make_router()?);
        }
        if let Some(h) = inner.held.get_mut(&v.vid) {
            h.runs += 1;
            h.peers = v.peers.clone();
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
                    peers: v.peers.clone(),
                },
            );
        }
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

    /// Whether any vNode has programs here.
    pub fn any(&self) -> bool {
        !self.lock().held.is_empty()
    }

    /// Takes the manager's vNode records (`vnodes`): which vNodes here
    /// may reach each other now.
    pub fn update(&self, vnodes: &[VnodeInfo]) {
        let mut inner = self.lock();
        let mut changed = false;
        for h in inner.held.values_mut() {
            // One deleted meanwhile reaches no one.
            let peers = vnodes
                .iter()
                .find(|v| v.name == h.name && v.vip == h.vip)
                .map(|v| v.peers.clone())
                .unwrap_or_default();
            if peers != h.peers {
                h.peers = peers;
                changed = true;
            }
        }
        if changed {
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
/// vNode that has programs here.
fn wanted_rules(held: &HashMap<u64, Held>) -> BTreeSet<(u64, String)> {
    let mut want = BTreeSet::new();
    for (&vid, h) in held {
        for peer in &h.peers {
            for other in held.values().filter(|o| &o.name == peer) {
                // Only both ways: a pair one side has not taken yet waits.
                if other.peers.contains(&h.name) {
                    want.insert((vid, other.vip.clone()));
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
    let rule = |op: &str, (vid, vip): &(u64, String)| {
        format!(
            "rule {op} pref {PAIR_PREF} iif {} to {vip}/32 lookup {TABLE}",
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

    fn held(name: &str, vip: &str, peers: &[&str]) -> Held {
        Held {
            ns: File::open("/dev/null").unwrap(),
            runs: 1,
            name: name.into(),
            vip: vip.into(),
            peers: peers.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn rules_go_both_ways_between_connected_vnodes_held_here() {
        let mut h = HashMap::new();
        h.insert(1, held("a", "10.0.0.1", &["b", "c", "gone"]));
        h.insert(2, held("b", "10.0.0.2", &["a"]));
        // c has not been told of a yet (an older record): nothing yet.
        h.insert(3, held("c", "10.0.0.3", &[]));
        h.insert(4, held("d", "10.0.0.4", &[]));
        let want: Vec<_> = wanted_rules(&h).into_iter().collect();
        assert_eq!(
            want,
            [(1, "10.0.0.2".to_string()), (2, "10.0.0.1".to_string())]
        );
        h.get_mut(&3).unwrap().peers = vec!["a".into()];
        assert_eq!(wanted_rules(&h).len(), 4);
        h.remove(&2);
        let want: Vec<_> = wanted_rules(&h).into_iter().collect();
        assert_eq!(
            want,
            [(1, "10.0.0.3".to_string()), (3, "10.0.0.1".to_string())]
        );
    }
}
