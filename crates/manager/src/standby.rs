//! A manager that does not lead (with `--store etcd://...`, while another
//! leads or etcd cannot be reached) still listens on its address, so a
//! client or component given several managers is never left guessing: it
//! shakes hands as any manager does and answers every request with
//! [`Reply::Standby`], naming the leader (and why it does not lead
//! itself). It acts on nothing. When it comes to lead, the same socket is
//! handed to the [`crate::Manager`].

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use lego_protocol::control::{self, Reply};
use lego_protocol::Message;
use lego_transport::auth::Credential;
use lego_transport::{ConnError, FramedConn, Stream, Tcp, Transport};

/// How long a standby's client may stay silent.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The leader (empty: none) and why this manager does not lead.
type Said = Arc<Mutex<(String, String)>>;

/// A standby answering on a listening socket.
pub struct Standby {
    said: Said,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    addr: String,
}

impl Standby {
    /// Answers on (a copy of) `listener` with `cred`'s handshake until
    /// [`Standby::stop`].
    pub fn serve(listener: &TcpListener, cred: Credential) -> std::io::Result<Self> {
        let own = listener.try_clone()?;
        let addr = listener.local_addr()?.to_string();
        let said: Said = Arc::new(Mutex::new((
            String::new(),
            "starting: no leader known yet".into(),
        )));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (said, stop_conn) = (said.clone(), stop.clone());
            let cred = Arc::new(cred);
            lego_transport::serve_connections(own, "lego-standby", stop.clone(), move |s| {
                answer(s, &cred, &said, &stop_conn)
            })
        };
        Ok(Self {
            said,
            stop,
            accept: Some(accept),
            addr,
        })
    }

    /// What it answers from now on: `leader` leads (empty: none does),
    /// and why this one does not.
    pub fn set(&self, leader: &str, why: &str) {
        let mut s = self.said.lock().unwrap_or_else(|p| p.into_inner());
        *s = (leader.to_string(), why.to_string());
    }

    /// Stops answering: new connections wait for whoever accepts on the
    /// socket next, and those open are closed at their next request (their
    /// clients connect again, to the leader).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The accept loop sees the flag once it accepts: wake it.
        // If it cannot be woken, it is left to end with the process.
        let woken = Tcp.connect(&self.addr, Duration::from_secs(1)).is_ok();
        if let Some(t) = self.accept.take().filter(|_| woken) {
            let _ = t.join();
        }
    }
}

/// A manager's metrics while it stands by (`leading` false): only that;
/// the leader's start with it (true).
pub fn scrape(leading: bool) -> lego_metrics::Scrape {
    let mut m = lego_metrics::Scrape::new();
    m.gauge(
        "lego_manager_leading",
        "1 if this manager leads (serves the cluster), 0 while it stands by.",
        lego_metrics::labels(&[]),
        if leading { 1.0 } else { 0.0 },
    );
    m
}

fn answer<S: Stream>(stream: S, cred: &Credential, said: &Said, stop: &AtomicBool) {
    let peer = stream.peer();
    let mut conn = FramedConn::new(stream);
    let result = conn
        .server_handshake(0, crate::HELLO_TIMEOUT, cred)
        .and_then(|_| {
            conn.be_patient(Some(IDLE_TIMEOUT))?;
            loop {
                let f = conn.recv()?;
                if stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let id = f.request_id;
                let reply = match f.message {
                    Message::Control { .. } => {
                        let (leader, message) =
                            said.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        Reply::Standby { leader, message }
                    }
                    other => Reply::Error {
                        message: format!(
                            "{} is not a request the global manager serves",
                            other.name()
                        ),
                    },
                };
                let json = control::to_json(&reply);
                conn.send(id, &Message::Control { json: &json })?;
            }
        });
    match result {
        Ok(()) | Err(ConnError::Closed) => tracing::debug!(%peer, "standby: connection closed"),
        Err(e) => tracing::debug!(%peer, error = %e, "standby: closing connection"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lego_protocol::control::Request;
    use lego_transport::ControlClient;

    #[test]
    fn a_client_is_sent_to_the_leader_and_told_why_when_none_leads() {
        let cred = Credential::generate().unwrap();
        // The leader: a real manager on an embedded store.
        let dir = std::env::temp_dir().join(format!("lego-standby-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let leader = crate::Manager::start(
            "127.0.0.1:0",
            &dir,
            (Duration::from_secs(3), 1),
            cred.clone(),
        )
        .unwrap();
        let socket = TcpListener::bind("127.0.0.1:0").unwrap();
        let standby = Standby::serve(&socket, cred.clone()).unwrap();
        let at = socket.local_addr().unwrap().to_string();
        standby.set(
            leader.addr(),
            &format!("standby; manager {} leads", leader.addr()),
        );
        // Asked at the standby, answered by the leader.
        let mut c = ControlClient::connect(&at, "t", Duration::from_secs(2), &cred).unwrap();
        assert!(matches!(
            c.call(&Request::Status).unwrap(),
            Reply::Status(_)
        ));
        assert_eq!(c.addr(), leader.addr());
        // No leader: the standby's reason is the error, naming it.
        standby.set("", "waiting for etcd: connection refused");
        let mut c = ControlClient::connect(&at, "t", Duration::from_secs(2), &cred).unwrap();
        let e = c.call(&Request::Status).unwrap_err().to_string();
        assert!(e.contains("no manager leads") && e.contains(&at), "{e}");
        assert!(e.contains("waiting for etcd"), "{e}");
        // A leader named that cannot be reached: the next manager listed.
        let gone = TcpListener::bind("127.0.0.1:0").unwrap();
        let gone_at = gone.local_addr().unwrap().to_string();
        drop(gone);
        standby.set(&gone_at, "standby");
        let both = format!("{at},{}", leader.addr());
        let mut c = ControlClient::connect(&both, "t", Duration::from_secs(2), &cred).unwrap();
        assert!(matches!(
            c.call(&Request::Status).unwrap(),
            Reply::Status(_)
        ));
        assert_eq!(c.addr(), leader.addr());
        // Stopped: a connection open to it is closed at its next request,
        // and the socket goes on accepting (for the manager taking it).
        let mut open = ControlClient::connect(&at, "t", Duration::from_secs(2), &cred).unwrap();
        standby.stop();
        assert!(open.call(&Request::Status).is_err());
        let m = crate::Manager::serve_on(
            socket,
            &at,
            Box::new(crate::db::Db::open(&dir.join("second")).unwrap()),
            (Duration::from_secs(3), 1, crate::state::DEFAULT_VNODE_NET),
            cred.clone(),
        )
        .unwrap();
        let mut c = ControlClient::connect(&at, "t", Duration::from_secs(2), &cred).unwrap();
        match c.call(&Request::Status).unwrap() {
            Reply::Status(s) => assert_eq!(s.manager, at),
            other => panic!("{other:?}"),
        }
        m.shutdown();
        leader.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
