//! The manager's state in etcd (issue 18, first part): a real etcd
//! (Debian's etcd-server) on loopback, managers sharing it with one
//! leading; a standby takes over when the leader is killed, with the same
//! cluster; a leader frozen past its lease writes nothing when it wakes,
//! stands by, and leads again when the other goes.
//!
//! Built with the `etcd` feature (`scripts/test` builds with it).

#![cfg(feature = "etcd")]

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// One etcd member on loopback ports of its own (killed, its data
/// removed, on drop).
struct Etcd {
    child: Child,
    dir: std::path::PathBuf,
    client: String,
    peer: String,
    /// Where its certificates are, if clients reach it over TLS.
    tls: Option<std::path::PathBuf>,
}

impl Etcd {
    fn start() -> Etcd {
        Self::start_with(None)
    }

    /// Clients reach it over TLS, with the certificates in `certs` (see
    /// [`certificates`]), and must show one of the authority's.
    fn start_with(tls: Option<&std::path::Path>) -> Etcd {
        let dir = tmp().join(format!("etcd-{}-{}", std::process::id(), unique()));
        // Ports free a moment ago may be taken by the time etcd binds
        // them (tests run side by side): then new ones.
        for _ in 0..5 {
            let _ = std::fs::remove_dir_all(&dir);
            let (a, b) = (
                std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
                std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            );
            let client = a.local_addr().unwrap().to_string();
            let peer = format!("http://{}", b.local_addr().unwrap());
            drop((a, b));
            if let Some(child) = Self::spawn(&dir, &client, &peer, tls) {
                return Etcd {
                    child,
                    dir,
                    client,
                    peer,
                    tls: tls.map(std::path::Path::to_path_buf),
                };
            }
        }
        panic!("etcd did not start");
    }

    /// etcd on these ports, once it answers (None: it ended first).
    fn spawn(
        dir: &std::path::Path,
        client: &str,
        peer: &str,
        tls: Option<&std::path::Path>,
    ) -> Option<Child> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut etcd = Command::new("etcd");
        if let Some(certs) = tls {
            etcd.arg("--cert-file")
                .arg(certs.join("server.pem"))
                .arg("--key-file")
                .arg(certs.join("server.key"))
                .arg("--trusted-ca-file")
                .arg(certs.join("ca.pem"))
                .arg("--client-cert-auth");
        }
        let mut child = etcd
            .args(["--name", "e1", "--data-dir"])
            .arg(dir)
            .args(["--listen-client-urls", &format!("{scheme}://{client}")])
            .args(["--advertise-client-urls", &format!("{scheme}://{client}")])
            .args([
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
            ])
            .args(["--initial-cluster", &format!("e1={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (apt-get install etcd-server)");
        let mut ended = false;
        let up = wait_until(Duration::from_secs(20), || {
            ended = matches!(child.try_wait(), Ok(Some(_)));
            ended || std::net::TcpStream::connect(client).is_ok()
        });
        assert!(up, "etcd did not start");
        (!ended).then_some(child)
    }

    /// Killed (-9): no quorum, nothing answers.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Started again on its data.
    fn restart(&mut self) {
        self.child = Self::spawn(&self.dir, &self.client, &self.peer, self.tls.as_deref())
            .expect("etcd did not start again");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free loopback address.
fn free_addr() -> String {
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listen.local_addr().unwrap().to_string()
}

/// `lego manager --store etcd://...` on a free port; its stderr lines come
/// on the channel.
fn manager(etcd: &Etcd) -> (Daemon, mpsc::Receiver<String>) {
    manager_at(etcd, &free_addr(), &[])
}

/// As [`manager`], on `addr`, with flags `more`.
fn manager_at(etcd: &Etcd, addr: &str, more: &[&str]) -> (Daemon, mpsc::Receiver<String>) {
    manager_on(&format!("etcd://{}", etcd.client), addr, more)
}

/// As [`manager_at`], with the store `store`.
fn manager_on(store: &str, addr: &str, more: &[&str]) -> (Daemon, mpsc::Receiver<String>) {
    let addr = addr.to_string();
    let mut child = lego_cmd()
        .args(["manager", "--listen", &addr, "--heartbeat-timeout", "8s"])
        .args(["--store", store])
        .args(more)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = stderr_lines(&mut child);
    (Daemon { child, addr }, rx)
}

/// A memory daemon joined to the manager(s) at `manager`.
fn memory_daemon(manager: &str) -> Daemon {
    Daemon::start_with(
        &[
            "memory",
            "--listen",
            "127.0.0.1:0",
            "--capacity",
            "256M",
            "--manager",
            manager,
        ],
        &[],
    )
}

fn status(addr: &str) -> serde_json::Value {
    let out = lego_cmd()
        .args(["status", "--json", "--manager", addr])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_standby_takes_over_with_the_same_cluster_and_a_frozen_leader_writes_nothing() {
    let etcd = Etcd::start();
    let (mut a, a_says) = manager(&etcd);
    assert!(
        said(&a_says, "serving on", Duration::from_secs(10)),
        "a never led"
    );
    let b_metrics = free_addr();
    let (mut b, b_says) = manager_at(&etcd, &free_addr(), &["--metrics", &b_metrics]);
    assert!(
        said(&b_says, "standby; manager", Duration::from_secs(10)),
        "b is no standby"
    );
    // Its metrics say it stands by (and say nothing of the cluster).
    let standing = http_get(&b_metrics, "/metrics");
    assert!(standing.contains("\nlego_manager_leading 0"), "{standing}");
    assert!(!standing.contains("lego_manager_components"), "{standing}");
    // Asked, it sends the client on to a.
    assert_eq!(status(&b.addr)["manager"], a.addr.as_str());
    // The memory daemon knows both managers, and the one started later:
    // it follows the leader.
    let c_addr = free_addr();
    let both = format!("{},{}", a.addr, b.addr);
    let mem = memory_daemon(&format!("{both},{c_addr}"));
    let before = components(&status(&a.addr));
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0].1, mem.addr);
    // The leader killed: the standby leads within the lease (2 s) and a
    // little, with the same cluster.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let killed = Instant::now();
    assert!(
        said(&b_says, "serving on", Duration::from_secs(10)),
        "b never led"
    );
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(4), "took over after {took:?}");
    let leading = http_get(&b_metrics, "/metrics");
    assert!(leading.contains("\nlego_manager_leading 1"), "{leading}");
    assert!(leading.contains("lego_manager_components"), "{leading}");
    assert_eq!(components(&status(&b.addr)), before);
    // Past the heartbeat timeout (8 s) the memory daemon is alive at the
    // new leader: its heartbeats went there. A client given both
    // managers finds it too.
    std::thread::sleep(Duration::from_secs(9));
    let now = status(&both);
    assert_eq!(components(&now), before);
    // It says which manager leads and how the store is.
    assert_eq!(now["manager"], b.addr.as_str(), "{now}");
    let store = now["store"].as_str().unwrap();
    assert!(
        store.starts_with("etcd ") && store.contains(&format!("{} up", etcd.client)),
        "{store}"
    );
    // Split brain: b frozen past its lease and past the heartbeat timeout
    // (its clock says the memory daemon went silent), c leads. A drain
    // reaches b while it is frozen (it waits in b's backlog). Woken, b
    // writes none of it (neither the drain nor the failure), stands down
    // and starts again as a standby.
    let pid = b.child.id();
    let signal = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success())
    };
    signal("-STOP");
    let (mut c, c_says) = manager_at(&etcd, &c_addr, &[]);
    assert!(
        said(&c_says, "serving on", Duration::from_secs(10)),
        "c never led"
    );
    std::thread::sleep(Duration::from_secs(9));
    let drain = lego_cmd()
        .args([
            "drain",
            &before[0].0.to_string(),
            "--no-wait",
            "--manager",
            &b.addr,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // And a question: b, woken, does not answer it as the leader.
    let asked = lego_cmd()
        .args(["status", "--json", "--manager", &b.addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    signal("-CONT");
    let drain = drain.wait_with_output().unwrap();
    assert!(!drain.status.success(), "{}", text(&drain.stdout));
    let asked = asked.wait_with_output().unwrap();
    if asked.status.success() {
        let told: serde_json::Value = serde_json::from_slice(&asked.stdout).unwrap();
        assert_eq!(told["manager"], c.addr.as_str(), "woken b answered: {told}");
    }
    assert!(
        said(&b_says, "no longer the leader", Duration::from_secs(5)),
        "the deposed leader goes on"
    );
    assert!(
        said(&b_says, "standby; manager", Duration::from_secs(5)),
        "the deposed leader is no standby"
    );
    assert_eq!(
        components(&status(&c.addr)),
        before,
        "b's drain or failure landed"
    );
    // Asked now, the standby b sends a client on to c.
    assert_eq!(status(&b.addr)["manager"], c.addr.as_str());
    // And when c goes, b (the same process) leads again, with the same
    // cluster.
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    assert!(
        said(&b_says, "serving on", Duration::from_secs(10)),
        "b never led again"
    );
    assert!(matches!(b.child.try_wait(), Ok(None)));
    assert_eq!(components(&status(&b.addr)), before);
    drop(mem);
}

#[test]
fn without_etcd_the_leader_stops_acting_and_leads_again_when_it_returns() {
    let mut etcd = Etcd::start();
    let (a, a_says) = manager(&etcd);
    assert!(
        said(&a_says, "serving on", Duration::from_secs(10)),
        "a never led"
    );
    let mem = memory_daemon(&a.addr);
    let before = components(&status(&a.addr));
    assert_eq!(before.len(), 1, "{before:?}");
    etcd.kill();
    // A change while etcd is gone is refused with the store's error (or,
    // once the leader stood down, finds no manager).
    let drain = lego_cmd()
        .args([
            "drain",
            &before[0].0.to_string(),
            "--no-wait",
            "--manager",
            &a.addr,
        ])
        .output()
        .unwrap();
    assert!(!drain.status.success());
    let said_why = text(&drain.stderr);
    assert!(
        said_why.contains("etcd") || said_why.contains("global manager"),
        "{said_why}"
    );
    assert!(
        said(&a_says, "no longer the leader", Duration::from_secs(5)),
        "the leader goes on without etcd"
    );
    assert!(said(&a_says, "waiting for etcd", Duration::from_secs(5)));
    // etcd back: the same manager leads again, with the same cluster, and
    // nothing of the refused drain.
    etcd.restart();
    assert!(
        said(&a_says, "serving on", Duration::from_secs(15)),
        "a never led again"
    );
    assert_eq!(components(&status(&a.addr)), before);
    drop(mem);
}

/// A certificate authority, a certificate for etcd at 127.0.0.1 and one
/// for its clients (PEM: ca, server and client .pem and .key), made with
/// openssl in a directory of their own.
fn certificates() -> std::path::PathBuf {
    let dir = tmp().join(format!("etcd-certs-{}-{}", std::process::id(), unique()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            text(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
            &["-subj", "/CN=lego test authority"],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
            &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    for name in ["server", "client"] {
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        openssl(
            &[
                &["req", "-new"][..],
                &ec,
                &[
                    "-keyout",
                    &key,
                    "-out",
                    &csr,
                    "-subj",
                    &format!("/CN={name}"),
                ],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ]);
    }
    dir
}

#[test]
fn over_tls_a_manager_with_the_cluster_certificate_leads_and_others_are_told_why_not() {
    let certs = certificates();
    let etcd = Etcd::start_with(Some(&certs));
    let file = |name: &str| certs.join(name).to_str().unwrap().to_string();
    let store = |ca: &str, client: bool| {
        let mut s = format!("etcds://{}?ca={ca}", etcd.client);
        if client {
            s += &format!("&cert={}&key={}", file("client.pem"), file("client.key"));
        }
        s
    };
    // With the authority and a client certificate it signed: the manager
    // leads, and the cluster works through it.
    let (a, a_says) = manager_on(&store(&file("ca.pem"), true), &free_addr(), &[]);
    assert!(
        said(&a_says, "serving on", Duration::from_secs(15)),
        "no manager led over TLS"
    );
    let mem = memory_daemon(&a.addr);
    let s = status(&a.addr);
    assert_eq!(components(&s).len(), 1, "{s}");
    assert_eq!(components(&s)[0].1, mem.addr);
    let health = s["store"].as_str().unwrap();
    assert!(health.contains(&format!("{} up", etcd.client)), "{health}");
    // Without a client certificate etcd refuses it; trusting another
    // authority, it does not trust etcd: each waits for etcd, saying why.
    let (_b, b_says) = manager_on(&store(&file("ca.pem"), false), &free_addr(), &[]);
    let other = certificates();
    let other_ca = other.join("ca.pem").to_str().unwrap().to_string();
    let (_c, c_says) = manager_on(&store(&other_ca, true), &free_addr(), &[]);
    for (says, who, why) in [
        (
            &b_says,
            "without a certificate",
            "want a client certificate",
        ),
        (
            &c_says,
            "trusting another authority",
            "invalid peer certificate",
        ),
    ] {
        let waits = (0..100)
            .map_while(|_| says.recv_timeout(Duration::from_secs(15)).ok())
            .find(|l| l.contains("waiting for etcd"));
        let waits = waits.unwrap_or_else(|| panic!("a manager {who} does not say it waits"));
        eprintln!("a manager {who}: {waits}");
        assert!(
            waits.contains(&etcd.client) && waits.contains(why),
            "{who}: {waits}"
        );
    }
    // Settings that cannot work: one line, and it ends.
    for (bad, why) in [
        (format!("etcds://{}", etcd.client), "needs ca=FILE"),
        (
            format!("etcds://{}?ca=/nonexistent/ca.pem", etcd.client),
            "cannot read it",
        ),
        (
            format!(
                "etcds://{}?ca={}&cert={}",
                etcd.client,
                file("ca.pem"),
                file("client.pem")
            ),
            "go together",
        ),
        (
            format!("etcds://{}?ca={}", etcd.client, file("client.key")),
            "holds no CERTIFICATE",
        ),
        (
            format!("etcds://{}?ca={}&pin=x", etcd.client, file("ca.pem")),
            "not a setting",
        ),
        (
            format!("etcd://{}?ca={}", etcd.client, file("ca.pem")),
            "etcds://",
        ),
    ] {
        let out = lego_cmd()
            .args(["manager", "--listen", &free_addr(), "--store", &bad])
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{bad}: {err}");
        assert!(err.contains(why), "{bad}: {err}");
    }
    let _ = std::fs::remove_dir_all(&certs);
    let _ = std::fs::remove_dir_all(&other);
}
