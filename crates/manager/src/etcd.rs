//! The manager's state in etcd (`lego manager --store
//! etcd://HOST:PORT,...`), through etcd's v3 JSON gateway (plain HTTP: no
//! async runtime in the manager), and the leadership that lets several
//! managers share it.
//!
//! **Leadership.** A manager takes a lease (`LEASE_TTL_S`) and creates the
//! key `<prefix>leader` under it, in a transaction that succeeds only if
//! the key does not exist. One that finds it taken is a standby: it waits,
//! reading the key every [`STANDBY_POLL`], until the leader's lease ends
//! (the leader left, or stopped renewing it), then leads; one that cannot
//! reach etcd (or etcd has no quorum) waits for it. Meanwhile it answers
//! clients with the leader's address ([`crate::standby`]). The leader
//! renews its lease four times a lease; one it cannot renew within the
//! lease, it has lost: it stops acting at once and starts again as a
//! standby (the process executes itself anew), so it leads again, with
//! the state as etcd has it, once etcd answers and no other manager
//! leads.
//!
//! **Fencing.** Every write is a transaction conditioned on the leader key
//! still having the create revision this manager made it with: a manager
//! that lost its lease (frozen, cut off) and comes back finds the
//! condition false and writes nothing, then stands by.
//!
//! **Records.** The same JSON records as the embedded store (`db.rs`),
//! under `<prefix>components/<id>`, `<prefix>vnodes/<name>` and
//! `<prefix>replicas/<space>/<unit>`; one change is one transaction (in
//! pieces of at most [`MAX_TXN_OPS`] operations, etcd's default limit).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

use crate::state::{Changes, Cluster, Component, Vnode};

/// Seconds a leader's lease lasts without renewal: a standby leads this
/// long (at most) after the leader stopped.
pub const LEASE_TTL_S: i64 = 2;

/// Most operations etcd takes in one transaction (its `--max-txn-ops`
/// default).
pub const MAX_TXN_OPS: usize = 128;

/// How often a standby asks who leads.
const STANDBY_POLL: Duration = Duration::from_millis(100);

/// How long one request to an etcd member may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// An etcd cluster's JSON gateway, asked at its members in turn.
pub struct Etcd {
    endpoints: Vec<String>,
    agent: ureq::Agent,
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

fn unb64(v: &Value) -> Result<String, String> {
    let bytes = B64
        .decode(v.as_str().unwrap_or_default())
        .map_err(|e| format!("etcd sent bad base64: {e}"))?;
    String::from_utf8(bytes).map_err(|e| format!("etcd sent a key that is not UTF-8: {e}"))
}

/// An etcd integer (the gateway sends 64-bit ones as strings).
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

impl Etcd {
    /// `etcd://HOST:PORT,HOST:PORT,...`
    pub fn new(spec: &str) -> Result<Self, String> {
        let list = spec
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("--store {spec:?}: give etcd://HOST:PORT[,HOST:PORT...]"))?;
        let endpoints: Vec<String> = list
            .split(',')
            .filter(|e| !e.is_empty())
            .map(|e| format!("http://{e}"))
            .collect();
        if endpoints.is_empty() {
            return Err(format!("--store {spec:?}: no etcd member named"));
        }
        let agent = ureq::AgentBuilder::new().timeout(CALL_TIMEOUT).build();
        Ok(Self { endpoints, agent })
    }

    /// POSTs `body` to `path` (`/v3/kv/range`, ...) at the first member
    /// that answers.
    fn call(&self, path: &str, body: &Value) -> Result<Value, String> {
        let mut errors = Vec::new();
        for e in &self.endpoints {
            match self.agent.post(&format!("{e}{path}")).send_json(body) {
                Ok(r) => {
                    return r
                        .into_json::<Value>()
                        .map_err(|err| format!("etcd at {e}: {err}"))
                }
                // An answer: this member refuses (no quorum, a limit).
                Err(ureq::Error::Status(code, r)) => {
                    let text = r.into_string().unwrap_or_default();
                    return Err(format!("etcd at {e}: {code} {}", text.trim()));
                }
                Err(err) => errors.push(format!("{}: {err}", e.trim_start_matches("http://"))),
            }
        }
        Err(format!("no etcd member answers ({})", errors.join("; ")))
    }

    fn range_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>, String> {
        // The range end of a prefix: its last byte plus one (the
        // prefixes used end in '/').
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last = last.wrapping_add(1);
        }
        let r = self.call(
            "/v3/kv/range",
            &json!({"key": b64(prefix), "range_end": B64.encode(&end)}),
        )?;
        let mut out = Vec::new();
        for kv in r["kvs"].as_array().into_iter().flatten() {
            let value = match kv.get("value") {
                Some(v) => unb64(v)?,
                None => String::new(),
            };
            out.push((unb64(&kv["key"])?, value));
        }
        Ok(out)
    }
}

/// The manager's state in etcd, written only while this manager leads.
pub struct EtcdStore {
    etcd: Arc<Etcd>,
    prefix: String,
    /// The create revision of the leader key this manager made.
    leading: i64,
    /// What it does when it finds it no longer leads ([`deposed`]).
    deposed: fn(&str) -> !,
}

impl EtcdStore {
    /// Leads the managers sharing `prefix` in the etcd cluster `spec`
    /// (waiting as a standby while another leads), as `name` (the address
    /// clients reach it at). While it waits it tells `standing_by` who
    /// leads (empty: none) and why it does not, each time that changes.
    pub fn lead(
        spec: &str,
        prefix: &str,
        name: &str,
        standing_by: &dyn Fn(&str, &str),
    ) -> Result<Self, String> {
        Self::lead_with(spec, prefix, name, standing_by, deposed)
    }

    /// [`EtcdStore::lead`], calling `deposed` when it finds it no longer
    /// leads.
    fn lead_with(
        spec: &str,
        prefix: &str,
        name: &str,
        standing_by: &dyn Fn(&str, &str),
        deposed: fn(&str) -> !,
    ) -> Result<Self, String> {
        let etcd = Arc::new(Etcd::new(spec)?);
        let leader_key = format!("{prefix}leader");
        let mut told = (String::from("?"), String::new());
        let mut tell = |leader: &str, why: String| {
            if told.0 != leader || told.1 != why {
                standing_by(leader, &why);
                told = (leader.to_string(), why);
                true
            } else {
                false
            }
        };
        let mut unreachable_since: Option<Instant> = None;
        let (lease, leading) = loop {
            // Who leads now (a read, cheap enough to ask often: a standby
            // leads within STANDBY_POLL of the leader's lease ending).
            let asked = etcd
                .call("/v3/kv/range", &json!({"key": b64(&leader_key)}))
                .and_then(|r| match r["kvs"][0].get("value") {
                    Some(v) => unb64(v).map(Some),
                    None => Ok(None),
                });
            match asked {
                Err(e) => {
                    // etcd down or without quorum: wait for it (and say
                    // so, now and then), leading once it answers.
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    let fresh = tell("", format!("waiting for etcd: {e}"));
                    if fresh || since.elapsed().as_secs().is_multiple_of(10) {
                        tracing::warn!(error = %e, "waiting for etcd to lead or stand by");
                        eprintln!("lego manager: waiting for etcd: {e}");
                    }
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
                Ok(Some(who)) => {
                    unreachable_since = None;
                    if tell(&who, format!("standby; manager {who} leads")) {
                        tracing::info!(leader = %who, "standby: another manager leads; taking over when its lease ends");
                        eprintln!("lego manager: standby; manager {who} leads");
                    }
                    std::thread::sleep(STANDBY_POLL);
                    continue;
                }
                Ok(None) => unreachable_since = None,
            }
            // None leads: take a lease and the key, unless another was
            // quicker.
            let Ok(grant) = etcd.call("/v3/lease/grant", &json!({"TTL": LEASE_TTL_S})) else {
                std::thread::sleep(STANDBY_POLL);
                continue;
            };
            let lease = int(&grant["ID"]);
            if lease == 0 {
                return Err(format!("etcd granted no lease: {grant}"));
            }
            let txn = json!({
                "compare": [{"target": "CREATE", "key": b64(&leader_key), "create_revision": "0"}],
                "success": [{"request_put": {"key": b64(&leader_key), "value": b64(name), "lease": lease.to_string()}}],
                "failure": [],
            });
            match etcd.call("/v3/kv/txn", &txn) {
                // Our key's create revision: the txn's revision.
                Ok(r) if r["succeeded"].as_bool().unwrap_or(false) => {
                    break (lease, int(&r["header"]["revision"]))
                }
                _ => {
                    let _ = etcd.call("/v3/lease/revoke", &json!({"ID": lease.to_string()}));
                }
            }
        };
        keep_leading(etcd.clone(), lease, deposed);
        Ok(Self {
            etcd,
            prefix: prefix.to_string(),
            leading,
            deposed,
        })
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// Commits `ops` only while the leader key is still ours.
    fn fenced(&self, ops: &[Value]) -> Result<(), String> {
        let leader = self.key("leader");
        for chunk in ops.chunks(MAX_TXN_OPS) {
            let txn = json!({
                "compare": [{"target": "CREATE", "key": b64(&leader), "create_revision": self.leading.to_string()}],
                "success": chunk,
                "failure": [],
            });
            let r = self.etcd.call("/v3/kv/txn", &txn)?;
            if !r["succeeded"].as_bool().unwrap_or(false) {
                (self.deposed)("another manager leads now: nothing of this one's is written");
            }
        }
        Ok(())
    }
}

/// A leader that lost its leadership stops acting at once (whatever it
/// would do next, another manager does) and starts again as a standby:
/// the process executes itself anew, with the same arguments, so nothing
/// of its state survives. If it cannot, it ends (status 3).
fn deposed(why: &str) -> ! {
    tracing::error!(
        reason = why,
        "no longer the leading manager: starting again as a standby"
    );
    eprintln!("lego manager: no longer the leader ({why}); starting again as a standby");
    if let Ok(exe) = std::env::current_exe() {
        use std::os::unix::process::CommandExt;
        let err = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .exec();
        eprintln!("lego manager: cannot start again: {err}");
    }
    std::process::exit(3)
}

/// Renews `lease` four times a lease (the later its last renewal, the
/// later a standby leads once it stops); one not renewed in time is lost.
fn keep_leading(etcd: Arc<Etcd>, lease: i64, deposed: fn(&str) -> !) {
    let period = Duration::from_millis((LEASE_TTL_S * 1000 / 4) as u64);
    let spawned = std::thread::Builder::new()
        .name("lego-manager-lease".into())
        .spawn(move || {
            let mut renewed = Instant::now();
            loop {
                std::thread::sleep(period);
                match etcd.call("/v3/lease/keepalive", &json!({"ID": lease.to_string()})) {
                    Ok(r) if int(&r["result"]["TTL"]) > 0 => renewed = Instant::now(),
                    Ok(_) => deposed("its lease ended"),
                    Err(e) => tracing::warn!(error = %e, "cannot renew the leader's lease"),
                }
                if renewed.elapsed() >= Duration::from_secs(LEASE_TTL_S as u64) {
                    deposed("its lease could not be renewed in time");
                }
            }
        });
    if spawned.is_err() {
        deposed("cannot start the thread that renews its lease");
    }
}

fn put(key: &str, value: &str) -> Value {
    json!({"request_put": {"key": b64(key), "value": b64(value)}})
}

fn delete(key: &str) -> Value {
    json!({"request_delete_range": {"key": b64(key)}})
}

impl crate::store::Store for EtcdStore {
    fn load(&self, timeout_ms: u64, now: u64) -> Result<Cluster, String> {
        let mut components = Vec::new();
        let mut placements = std::collections::BTreeMap::new();
        let mut vnodes = Vec::new();
        for (key, value) in self.etcd.range_prefix(&self.prefix)? {
            let Some(rest) = key.strip_prefix(&self.prefix) else {
                continue;
            };
            if let Some(id) = rest.strip_prefix("components/") {
                let id: u64 = id.parse().map_err(|_| format!("bad key {key}"))?;
                let c: Component =
                    serde_json::from_str(&value).map_err(|e| format!("component {id}: {e}"))?;
                components.push((id, c));
            } else if let Some(name) = rest.strip_prefix("vnodes/") {
                let v: Vnode =
                    serde_json::from_str(&value).map_err(|e| format!("vNode {name}: {e}"))?;
                vnodes.push((name.to_string(), v));
            } else if let Some(unit) = rest.strip_prefix("replicas/") {
                let (space, unit) = unit
                    .split_once('/')
                    .and_then(|(s, u)| Some((s.parse().ok()?, u.parse().ok()?)))
                    .ok_or_else(|| format!("bad key {key}"))?;
                let ids: Vec<u64> =
                    serde_json::from_str(&value).map_err(|e| format!("replicas of {key}: {e}"))?;
                placements.insert((space, unit), ids);
            }
        }
        Ok(Cluster::restore(
            timeout_ms, now, components, placements, vnodes,
        ))
    }

    fn health(&self) -> String {
        let members: Vec<String> = self
            .etcd
            .endpoints
            .iter()
            .map(|e| {
                let at = e.trim_start_matches("http://");
                match self
                    .etcd
                    .agent
                    .post(&format!("{e}/v3/maintenance/status"))
                    .send_json(json!({}))
                {
                    Ok(_) => format!("{at} up"),
                    Err(err) => format!("{at} DOWN ({err})"),
                }
            })
            .collect();
        format!("etcd {}; leading", members.join(", "))
    }

    fn save(&self, cluster: &Cluster, changes: &Changes) -> Result<(), String> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut ops = Vec::new();
        for id in &changes.components {
            let key = self.key(&format!("components/{id}"));
            ops.push(match cluster.components.get(id) {
                Some(c) => put(&key, &serde_json::to_string(c).map_err(|e| e.to_string())?),
                None => delete(&key),
            });
        }
        for name in &changes.vnodes {
            let key = self.key(&format!("vnodes/{name}"));
            ops.push(match crate::db::vnode_record(cluster, name) {
                Some(v) => put(&key, &serde_json::to_string(&v).map_err(|e| e.to_string())?),
                None => delete(&key),
            });
        }
        for (space, unit) in changes.placed.iter().chain(&changes.unplaced) {
            let key = self.key(&format!("replicas/{space}/{unit}"));
            ops.push(match cluster.placements.get(&(*space, *unit)) {
                Some(p) => put(
                    &key,
                    &serde_json::to_string(&p.replicas).map_err(|e| e.to_string())?,
                ),
                None => delete(&key),
            });
        }
        self.fenced(&ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use std::process::{Child, Command, Stdio};

    /// One etcd member (Debian's etcd-server) on free loopback ports.
    struct Member(Child, std::path::PathBuf);

    impl Drop for Member {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }

    fn free() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    fn etcd() -> (Member, String) {
        let dir = std::env::temp_dir().join(format!("lego-etcd-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (client, peer) = (free(), format!("http://{}", free()));
        let child = Command::new("etcd")
            .args(["--name", "e1", "--data-dir"])
            .arg(&dir)
            .args(["--listen-client-urls", &format!("http://{client}")])
            .args(["--advertise-client-urls", &format!("http://{client}")])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("e1={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (apt-get install etcd-server)");
        let member = Member(child, dir);
        let up = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            std::net::TcpStream::connect(&client).is_ok()
        });
        assert!(up, "etcd did not start");
        (member, format!("etcd://{client}"))
    }

    fn panics(why: &str) -> ! {
        panic!("deposed: {why}")
    }

    #[test]
    fn a_manager_whose_key_another_holds_writes_nothing() {
        let (_member, spec) = etcd();
        let quiet = |_: &str, _: &str| {};
        let one = EtcdStore::lead_with(&spec, "/t/", "one", &quiet, panics).unwrap();
        // Its key gone (as when its lease ends while it is frozen), a
        // second manager leads.
        let etcd = Etcd::new(&spec).unwrap();
        etcd.call("/v3/kv/deleterange", &json!({"key": b64("/t/leader")}))
            .unwrap();
        let told = std::sync::Mutex::new(Vec::new());
        let two = EtcdStore::lead_with(
            &spec,
            "/t/",
            "two",
            &|who, why| told.lock().unwrap().push(format!("{who} {why}")),
            panics,
        )
        .unwrap();
        assert!(told.lock().unwrap().is_empty(), "two stood by: {told:?}");
        // The first one's change is refused (it finds itself deposed) and
        // lands nowhere; the second one's does.
        let register = crate::tests::register_memory;
        let mut c = one.load(1000, 0).unwrap();
        let (_, changes) = c.apply(0, register(9));
        assert!(!changes.is_empty());
        let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = one.save(&c, &changes);
        }));
        assert!(refused.is_err(), "a deposed manager wrote");
        assert!(two.load(1000, 0).unwrap().components.is_empty());
        let mut c = two.load(1000, 0).unwrap();
        let (_, changes) = c.apply(0, register(10));
        two.save(&c, &changes).unwrap();
        let stored = two.load(1000, 0).unwrap();
        assert_eq!(stored.components.len(), 1);
        assert!(stored.components.values().all(|c| c.addr == "127.0.0.1:10"));
        // A third finds the key taken and says who leads.
        let (tx, rx) = std::sync::mpsc::channel();
        let spec3 = spec.clone();
        std::thread::spawn(move || {
            let tell = move |who: &str, why: &str| {
                let _ = tx.send(format!("{who}|{why}"));
            };
            let _ = EtcdStore::lead_with(&spec3, "/t/", "three", &tell, panics);
        });
        let first = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(first, "two|standby; manager two leads");
    }
}
