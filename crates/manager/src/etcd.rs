//! The manager's state in etcd (`lego manager --store
//! etcd://HOST:PORT,...`), through the `etcd-client` crate (etcd's v3 gRPC
//! API; its async calls run on a small runtime of this module's own, so
//! the rest of the manager stays plain threads), and the leadership that
//! lets several managers share it.
//!
//! **Leadership.** A manager takes a lease (`LEASE_TTL_S`) and creates the
//! key `<prefix>leader` under it, in a transaction that succeeds only if
//! the key does not exist. One that finds it taken is a standby: it
//! watches the key until the leader's lease ends (the leader left, or
//! stopped renewing it) and etcd deletes it, then leads; one that cannot
//! reach etcd (or etcd has no quorum) waits for it. Meanwhile it answers
//! clients with the leader's address ([`crate::standby`]). The leader
//! renews its lease four times a lease, counting nine tenths of it from
//! before it asked (so its count ends well before etcd's); once that
//! count runs out it refuses every request
//! ([`crate::store::Store::leading`]), and once it knows the lease is lost
//! it starts again as a standby (the process executes itself anew), so it
//! leads again, with the state as etcd has it, once etcd answers and no
//! other manager leads.
//!
//! **Fencing.** Every write is a transaction conditioned on the leader key
//! still having the create revision this manager made it with: a manager
//! that lost its lease (frozen, cut off) and comes back finds the
//! condition false and writes nothing, then stands by.
//!
//! **Records.** The same JSON records as the embedded store (`db.rs`),
//! under `<prefix>components/<id>`, `<prefix>vnodes/<name>` and
//! `<prefix>replicas/<space>/<unit>`; one change is one transaction (in
//! pieces of at most [`MAX_TXN_OPS`] operations, etcd's default limit,
//! replica lists first: one cut short reads back consistent, see
//! [`Cluster::restore`]).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, TxnOp, WatchOptions,
};

use crate::state::{Changes, Cluster, Component, Vnode};

/// Seconds a leader's lease lasts without renewal: a standby leads this
/// long (at most) after the leader stopped.
pub const LEASE_TTL_S: i64 = 2;

/// Most operations etcd takes in one transaction (its `--max-txn-ops`
/// default).
pub const MAX_TXN_OPS: usize = 128;

/// How much of a lease (of `ttl` seconds, counted from before it was asked
/// for) a leader trusts: nine tenths, so that it stops acting a good while
/// before etcd lets the lease go, whatever its clock's drift or its
/// threads' lateness.
fn trusted(ttl: i64) -> Duration {
    Duration::from_secs(ttl.max(0) as u64).mul_f64(0.9)
}

/// How long a standby watches the leader key before it reads it again (a
/// watch that broke or missed the deletion costs at most this).
const STANDBY_RECHECK: Duration = Duration::from_secs(1);

/// How often a manager waiting for etcd says so (besides when the reason
/// changes).
const SAY_AGAIN: Duration = Duration::from_secs(10);

/// How long one request to etcd may take, all members tried ...
const CALL_TIMEOUT: Duration = Duration::from_millis(2500);
/// ... and one member.
const MEMBER_TIMEOUT: Duration = Duration::from_secs(1);

/// What went wrong with a call, in words: gRPC's message and, if there is
/// one, the cause under it (a refused connection, ...).
fn describe(e: &etcd_client::Error) -> String {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return e.to_string();
    };
    let mut cause: &dyn std::error::Error = status;
    while let Some(under) = cause.source() {
        cause = under;
    }
    let root = cause.to_string();
    if std::ptr::addr_eq(cause, status as &dyn std::error::Error) || root == status.message() {
        status.message().to_string()
    } else {
        format!("{}: {root}", status.message())
    }
}

/// TLS to etcd's members from a store's query: `ca=FILE` (PEM, the
/// authority that signed the members' certificates) and, for members that
/// ask clients for one (`--client-cert-auth`), `cert=FILE&key=FILE` (PEM).
/// Also whether it shows a certificate of its own.
fn tls(query: &str) -> Result<(etcd_client::TlsOptions, bool), String> {
    let (mut ca, mut cert, mut key) = (None, None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?}: give NAME=FILE"))?;
        // Read, and checked to hold what it should in PEM (else tonic
        // would take no certificate, or fail later without saying which).
        let read = |holds: &str| {
            let pem =
                std::fs::read(value).map_err(|e| format!("{name}={value}: cannot read it: {e}"))?;
            let text = String::from_utf8_lossy(&pem);
            if !text
                .lines()
                .any(|l| l.starts_with("-----BEGIN ") && l.ends_with(&format!("{holds}-----")))
            {
                return Err(format!(
                    "{name}={value}: holds no {holds} in PEM (-----BEGIN ...{holds}-----)"
                ));
            }
            Ok(pem)
        };
        match name {
            "ca" => ca = Some(read("CERTIFICATE")?),
            "cert" => cert = Some(read("CERTIFICATE")?),
            "key" => key = Some(read("PRIVATE KEY")?),
            _ => return Err(format!("{name}: not a setting of etcds:// (ca, cert, key)")),
        }
    }
    let ca =
        ca.ok_or("etcds:// needs ca=FILE, the authority that signed the members' certificates")?;
    let options =
        etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca));
    match (cert, key) {
        (Some(cert), Some(key)) => Ok((
            options.identity(etcd_client::Identity::from_pem(cert, key)),
            true,
        )),
        (None, None) => Ok((options, false)),
        _ => Err("cert=FILE and key=FILE go together".into()),
    }
}

/// An etcd cluster: a client for each member, asked in turn from the one
/// that answered last (a member down, cut off or without quorum costs a
/// refusal or [`MEMBER_TIMEOUT`], not the call).
pub struct Etcd {
    members: Vec<(String, Client)>,
    /// The member that answered last.
    preferred: std::sync::atomic::AtomicUsize,
    /// Where the clients' calls run (one worker thread).
    rt: tokio::runtime::Runtime,
    /// On TLS without a client certificate: a member that wants one closes
    /// the connection (a broken pipe, or an alert, whichever comes first);
    /// say so.
    no_certificate: bool,
}

impl Etcd {
    /// `etcd://HOST:PORT,HOST:PORT,...`, or over TLS
    /// `etcds://HOST:PORT,...?ca=FILE[&cert=FILE&key=FILE]` ([`tls`]).
    pub fn new(spec: &str) -> Result<Self, String> {
        let usage = "give etcd://HOST:PORT[,HOST:PORT...] or \
                     etcds://HOST:PORT[,...]?ca=FILE[&cert=FILE&key=FILE]";
        let (list, tls): (&str, Option<(etcd_client::TlsOptions, bool)>) =
            if let Some(rest) = spec.strip_prefix("etcds://") {
                let (list, query) = rest.split_once('?').unwrap_or((rest, ""));
                let tls = tls(query).map_err(|e| format!("--store {spec:?}: {e}"))?;
                (list, Some(tls))
            } else if let Some(list) = spec.strip_prefix("etcd://") {
                if list.contains('?') {
                    return Err(format!(
                        "--store {spec:?}: certificates are for etcds:// (TLS); {usage}"
                    ));
                }
                (list, None)
            } else {
                return Err(format!("--store {spec:?}: {usage}"));
            };
        let endpoints: Vec<&str> = list.split(',').filter(|e| !e.is_empty()).collect();
        if endpoints.is_empty() {
            return Err(format!("--store {spec:?}: no etcd member named"));
        }
        if let Some(e) = endpoints.iter().find(|e| e.contains("://")) {
            return Err(format!(
                "--store {spec:?}: {e}: a member is HOST:PORT; {usage}"
            ));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lego-etcd")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start etcd's client runtime: {e}"))?;
        // Connecting is lazy: a member down now is tried when asked.
        let members = endpoints
            .iter()
            .map(|e| {
                let options = ConnectOptions::new()
                    .with_connect_timeout(MEMBER_TIMEOUT)
                    .with_timeout(MEMBER_TIMEOUT)
                    // A member without quorum refuses at once.
                    .with_require_leader(true)
                    .with_keep_alive(Duration::from_secs(1), MEMBER_TIMEOUT);
                let (options, url) = match &tls {
                    Some((tls, _)) => (options.with_tls(tls.clone()), format!("https://{e}")),
                    None => (options, format!("http://{e}")),
                };
                rt.block_on(Client::connect([url], Some(options)))
                    .map(|c| (e.to_string(), c))
                    .map_err(|err| format!("--store {spec:?}: {e}: {}", describe(&err)))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            members,
            preferred: std::sync::atomic::AtomicUsize::new(0),
            rt,
            no_certificate: tls.is_some_and(|(_, certificate)| !certificate),
        })
    }

    /// Runs `fut` within `limit`.
    fn run<T>(
        &self,
        limit: Duration,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, String> {
        self.rt
            .block_on(async { tokio::time::timeout(limit, fut).await })
            .map_err(|_| format!("no answer within {limit:?}"))?
            .map_err(|e| {
                let said = describe(&e);
                let lower = said.to_lowercase();
                let closed = [
                    "broken pipe",
                    "connection reset",
                    "alert: badcertificate",
                    "alert: certificaterequired",
                ]
                .iter()
                .any(|c| lower.contains(c));
                if self.no_certificate && closed {
                    format!("{said} (does it want a client certificate? give cert=FILE&key=FILE)")
                } else {
                    said
                }
            })
    }

    /// Runs one call (given a member's client) at the members in turn,
    /// within [`CALL_TIMEOUT`] in all; the errors of all if none answers.
    fn call<T, F>(&self, f: impl Fn(Client) -> F) -> Result<T, String>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_within(CALL_TIMEOUT, f)
    }

    /// [`Etcd::call`] within `limit` in all.
    fn call_within<T, F>(&self, limit: Duration, f: impl Fn(Client) -> F) -> Result<T, String>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        use std::sync::atomic::Ordering;
        let deadline = Instant::now() + limit;
        let first = self.preferred.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for k in 0..self.members.len() {
            let i = (first + k) % self.members.len();
            let (at, client) = &self.members[i];
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                errors.push(format!("{at}: not asked (out of time)"));
                continue;
            }
            match self.run(left.min(MEMBER_TIMEOUT), f(client.clone())) {
                Ok(v) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) => errors.push(format!("{at}: {e}")),
            }
        }
        Err(format!("no etcd member answers ({})", errors.join("; ")))
    }

    /// The keys under `prefix` and their values.
    fn range_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>, String> {
        let r = self.call(|mut c| async move {
            c.get(prefix, Some(GetOptions::new().with_prefix())).await
        })?;
        r.kvs()
            .iter()
            .map(|kv| {
                let key = kv
                    .key_str()
                    .map_err(|e| format!("etcd sent a bad key: {e}"))?;
                let value = kv
                    .value_str()
                    .map_err(|e| format!("etcd sent a bad value under {key}: {e}"))?;
                Ok((key.to_string(), value.to_string()))
            })
            .collect()
    }

    /// The value of `key` (None: absent) and the store's revision.
    fn get(&self, key: &str) -> Result<(Option<String>, i64), String> {
        let r = self.call(|mut c| async move { c.get(key, None).await })?;
        let revision = r.header().map_or(0, |h| h.revision());
        let value = match r.kvs().first() {
            Some(kv) => Some(kv.value_str().map_err(|e| e.to_string())?.to_string()),
            None => None,
        };
        Ok((value, revision))
    }

    /// Waits up to `limit` for `key` to be deleted after `revision`;
    /// whether it was.
    fn deleted_since(&self, key: &str, revision: i64, limit: Duration) -> bool {
        let preferred = self.preferred.load(std::sync::atomic::Ordering::Relaxed);
        let mut client = self.members[preferred].1.clone();
        let key = key.to_string();
        self.rt.block_on(async move {
            let watch = async {
                let options = WatchOptions::new().with_start_revision(revision + 1);
                let mut stream = client.watch(key, Some(options)).await?;
                while let Some(r) = stream.message().await? {
                    if r.events()
                        .iter()
                        .any(|e| e.event_type() == EventType::Delete)
                    {
                        return Ok(true);
                    }
                    if r.canceled() {
                        return Ok(false);
                    }
                }
                Ok::<bool, etcd_client::Error>(false)
            };
            matches!(tokio::time::timeout(limit, watch).await, Ok(Ok(true)))
        })
    }

    /// Each member up or down, all asked at once (within
    /// [`MEMBER_TIMEOUT`] in all).
    fn members(&self) -> Vec<String> {
        let asked: Vec<_> = self
            .members
            .iter()
            .map(|(at, client)| {
                let (at, mut c) = (at.clone(), client.clone());
                self.rt.spawn(async move {
                    match tokio::time::timeout(MEMBER_TIMEOUT, c.status()).await {
                        Ok(Ok(_)) => format!("{at} up"),
                        Ok(Err(e)) => format!("{at} DOWN ({})", describe(&e)),
                        Err(_) => format!("{at} DOWN (no answer within {MEMBER_TIMEOUT:?})"),
                    }
                })
            })
            .collect();
        self.rt.block_on(async {
            let mut said = Vec::new();
            for a in asked {
                said.push(a.await.unwrap_or_else(|e| format!("not asked: {e}")));
            }
            said
        })
    }
}

/// The manager's state in etcd, written only while this manager leads.
pub struct EtcdStore {
    etcd: Arc<Etcd>,
    prefix: String,
    /// The create revision of the leader key this manager made.
    leading: i64,
    /// When its lease ends unless renewed (by this manager's clock, which
    /// starts each renewal before etcd's does).
    valid_until: Arc<std::sync::Mutex<Instant>>,
    /// What it does when it finds it no longer leads ([`start_again`]).
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
        Self::lead_with(spec, prefix, name, standing_by, start_again)
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
        // When it last said it waits for etcd.
        let mut said_at: Option<Instant> = None;
        let (lease, leading, until) = loop {
            match etcd.get(&leader_key) {
                Err(e) => {
                    // etcd down or without quorum: wait for it (and say
                    // so, now and then), leading once it answers.
                    let fresh = tell("", format!("waiting for etcd: {e}"));
                    if fresh || said_at.is_none_or(|t| t.elapsed() >= SAY_AGAIN) {
                        said_at = Some(Instant::now());
                        tracing::warn!(error = %e, "waiting for etcd to lead or stand by");
                        eprintln!("lego manager: waiting for etcd: {e}");
                    }
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
                Ok((Some(who), revision)) => {
                    if tell(&who, format!("standby; manager {who} leads")) {
                        tracing::info!(leader = %who, "standby: another manager leads; taking over when its lease ends");
                        eprintln!("lego manager: standby; manager {who} leads");
                    }
                    // Until etcd deletes the key (the lease ended), or a
                    // while: then read it again.
                    if !etcd.deleted_since(&leader_key, revision, STANDBY_RECHECK) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    continue;
                }
                Ok((None, _)) => {}
            }
            // None leads: take a lease and the key, unless another was
            // quicker.
            // The lease counts from before it was asked for: etcd's
            // clock started later, so it ends later than this manager
            // believes.
            let asked_at = Instant::now();
            let Ok(grant) =
                etcd.call(|mut c| async move { c.lease_grant(LEASE_TTL_S, None).await })
            else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            let lease = grant.id();
            if grant.ttl() != LEASE_TTL_S {
                // etcd raises a lease to its minimum (1.5 election
                // timeouts): a takeover then takes longer.
                tracing::warn!(
                    asked = LEASE_TTL_S,
                    granted = grant.ttl(),
                    "etcd granted a lease of another length"
                );
            }
            let txn = etcd_client::Txn::new()
                .when([Compare::create_revision(
                    leader_key.as_str(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::put(
                    leader_key.as_str(),
                    name,
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                )]);
            let won = etcd.call(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            });
            // Our key's create revision: the txn's revision (a reply
            // without one cannot fence anything).
            let revision = won
                .ok()
                .filter(|r| r.succeeded())
                .and_then(|r| r.header().map(|h| h.revision()))
                .filter(|&r| r > 0);
            match revision {
                Some(revision) => {
                    let until = asked_at + trusted(grant.ttl());
                    break (lease, revision, until);
                }
                None => {
                    let _ = etcd.call(|mut c| async move { c.lease_revoke(lease).await });
                }
            }
        };
        let valid_until = Arc::new(std::sync::Mutex::new(until));
        keep_leading(etcd.clone(), lease, valid_until.clone(), deposed);
        Ok(Self {
            etcd,
            prefix: prefix.to_string(),
            leading,
            valid_until,
            deposed,
        })
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// Commits `ops` only while the leader key is still ours.
    fn fenced(&self, ops: Vec<TxnOp>) -> Result<(), String> {
        let leader = self.key("leader");
        for chunk in ops.chunks(MAX_TXN_OPS) {
            let txn = etcd_client::Txn::new()
                .when([Compare::create_revision(
                    leader.as_str(),
                    CompareOp::Equal,
                    self.leading,
                )])
                .and_then(chunk.to_vec());
            let r = self.etcd.call(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })?;
            if !r.succeeded() {
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
pub fn start_again(why: &str) -> ! {
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
/// later a standby leads once it stops), moving `valid_until` on; once
/// that has passed without a renewal, or etcd says the lease is gone, the
/// manager is deposed. Every step is bounded by the time left, so that
/// happens by `valid_until`, before etcd lets the lease go.
fn keep_leading(
    etcd: Arc<Etcd>,
    lease: i64,
    valid_until: Arc<std::sync::Mutex<Instant>>,
    deposed: fn(&str) -> !,
) {
    let period = Duration::from_millis((LEASE_TTL_S * 1000 / 4) as u64);
    let until = {
        let valid_until = valid_until.clone();
        move || *valid_until.lock().unwrap_or_else(|p| p.into_inner())
    };
    let renewed = move |asked_at: Instant, ttl: i64| {
        *valid_until.lock().unwrap_or_else(|p| p.into_inner()) = asked_at + trusted(ttl);
    };
    let spawned = std::thread::Builder::new()
        .name("lego-manager-lease".into())
        .spawn(move || {
            // etcd renews a lease on a stream; a broken one is opened anew
            // (at a member that answers), which renews it too.
            let mut stream: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
            let left = || until().saturating_duration_since(Instant::now());
            loop {
                std::thread::sleep(period.min(left()));
                if left().is_zero() {
                    deposed("its lease could not be renewed in time");
                }
                let asked_at = Instant::now();
                let ttl = match stream.as_mut() {
                    None => etcd
                        .call_within(left(), |mut c| async move {
                            match c.lease_keep_alive(lease).await {
                                Ok(opened) => Ok(Some(opened)),
                                Err(etcd_client::Error::LeaseKeepAliveError(m))
                                    if m.contains("not found") =>
                                {
                                    Ok(None)
                                }
                                Err(e) => Err(e),
                            }
                        })
                        .map(|opened| match opened {
                            Some(opened) => {
                                stream = Some(opened);
                                LEASE_TTL_S
                            }
                            None => 0,
                        }),
                    Some((keeper, responses)) => {
                        let renewal = async {
                            keeper.keep_alive().await?;
                            match responses.message().await? {
                                Some(r) => Ok(r.ttl()),
                                None => Err(etcd_client::Error::LeaseKeepAliveError(
                                    "the member closed the stream".into(),
                                )),
                            }
                        };
                        etcd.run(MEMBER_TIMEOUT.min(left()), renewal)
                    }
                };
                match ttl {
                    Ok(ttl) if ttl <= 0 => deposed("its lease ended"),
                    Ok(ttl) => renewed(asked_at, ttl),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot renew the leader's lease");
                        stream = None;
                    }
                }
            }
        });
    if spawned.is_err() {
        deposed("cannot start the thread that renews its lease");
    }
}

fn put(key: &str, value: &str) -> TxnOp {
    TxnOp::put(key, value, None)
}

fn delete(key: &str) -> TxnOp {
    TxnOp::delete(key, None)
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
        format!("etcd {}; leading", self.etcd.members().join(", "))
    }

    fn leading(&self) -> bool {
        Instant::now() < *self.valid_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, cluster: &Cluster, changes: &Changes) -> Result<(), String> {
        if changes.is_empty() {
            return Ok(());
        }
        // Replica lists first: a change cut short between transactions
        // then lists no replica on a component it failed or revived
        // ([`Cluster::restore`] drops those on failed and unknown ones).
        let mut ops = Vec::new();
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
        self.fenced(ops)
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

    /// Two free ports, told apart (both held while they are chosen).
    fn free() -> (String, String) {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = |l: &std::net::TcpListener| l.local_addr().unwrap().to_string();
        (at(&a), at(&b))
    }

    fn etcd() -> (Member, String) {
        let dir = std::env::temp_dir().join(format!("lego-etcd-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (client, peer) = free();
        let peer = format!("http://{peer}");
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

    /// Deposed in a test: a panic the test catches; the lease's own
    /// thread (which outlives the test's etcd) only stops.
    fn panics(why: &str) -> ! {
        if std::thread::current().name() == Some("lego-manager-lease") {
            loop {
                std::thread::park();
            }
        }
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
        etcd.call(|mut c| async move { c.delete("/t/leader", None).await })
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
