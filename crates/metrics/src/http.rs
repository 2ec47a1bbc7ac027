//! The HTTP server of `--metrics ADDR`: `GET /metrics` answers the
//! scrape; anything else gets a 404 (another path) or 405 (another
//! method), and a request that is not HTTP, too large or too slow gets a
//! 400 or is dropped. At most [`MAX_CONNECTIONS`] are served at once, each
//! on its own thread, within [`REQUEST_TIMEOUT`]; nothing a client sends
//! can stop the daemon. HTTP/1.0 and 1.1, one request per connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Scrape;

/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client has to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The most a request's head may take.
const MAX_HEAD: usize = 8192;

/// Builds one scrape.
pub type ScrapeFn = Arc<dyn Fn() -> Scrape + Send + Sync>;

/// A running metrics server (stops when dropped).
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl MetricsServer {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// Where `--metrics ADDR` listens: `PORT` alone is loopback's; a
/// `HOST:PORT` is taken as it is.
pub fn listen_addr(addr: &str) -> Result<String, String> {
    if addr.parse::<u16>().is_ok() {
        return Ok(format!("127.0.0.1:{addr}"));
    }
    if addr
        .rsplit_once(':')
        .is_none_or(|(_, p)| p.parse::<u16>().is_err())
    {
        return Err(format!(
            "--metrics {addr:?}: give HOST:PORT, or a PORT for 127.0.0.1"
        ));
    }
    Ok(addr.to_string())
}

/// Serves `scrape` at `http://ADDR/metrics` ([`listen_addr`]) on
/// background threads.
pub fn serve(addr: &str, scrape: ScrapeFn) -> Result<MetricsServer, String> {
    let addr = listen_addr(addr)?;
    let listener =
        TcpListener::bind(&addr).map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    if !local.ip().is_loopback() {
        tracing::warn!(addr = %local, "metrics are served beyond this host, to anyone who can reach it");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let busy = Arc::new(AtomicUsize::new(0));
    let stopping = stop.clone();
    std::thread::Builder::new()
        .name("lego-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else {
                    // Out of descriptors, say: not a busy loop meanwhile.
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                let Some(slot) = Slot::take(&busy) else {
                    continue;
                };
                let scrape = scrape.clone();
                let spawned = std::thread::Builder::new()
                    .name("lego-metrics-conn".into())
                    .spawn(move || {
                        let _slot = slot;
                        let peer = conn.peer_addr().ok();
                        if let Err(e) = answer(conn, &scrape) {
                            tracing::debug!(?peer, error = %e, "metrics request not answered");
                        }
                    });
                if spawned.is_err() {
                    tracing::warn!("cannot start a metrics connection thread");
                }
            }
        })
        .map_err(|e| format!("cannot start the metrics server: {e}"))?;
    Ok(MetricsServer { addr: local, stop })
}

/// One of the [`MAX_CONNECTIONS`] served at once, given back on drop
/// (also if the thread could not start, or a scrape panicked).
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(busy: &Arc<AtomicUsize>) -> Option<Slot> {
        if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            busy.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Slot(busy.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Reads one request's head (up to the blank line).
fn read_head(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || head.len() > MAX_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too slow or too large",
            ));
        }
        conn.set_read_timeout(Some(left))?;
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

fn answer(mut conn: TcpStream, scrape: &ScrapeFn) -> std::io::Result<()> {
    conn.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let head = match read_head(&mut conn) {
        Ok(h) => h,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            return respond(&mut conn, "400 Bad Request", "text/plain", "bad request\n")
        }
        Err(e) => return Err(e),
    };
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let Some(("GET" | "HEAD", target, _)) =
        method.zip(target).zip(version).map(|((m, t), v)| (m, t, v))
    else {
        return match (method, version) {
            (Some(_), Some(v)) if v.starts_with("HTTP/") => respond(
                &mut conn,
                "405 Method Not Allowed",
                "text/plain",
                "only GET /metrics\n",
            ),
            _ => respond(&mut conn, "400 Bad Request", "text/plain", "bad request\n"),
        };
    };
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return respond(&mut conn, "404 Not Found", "text/plain", "only /metrics\n");
    }
    let body = scrape().encode();
    let body = if method == Some("HEAD") {
        String::new()
    } else {
        body
    };
    respond(
        &mut conn,
        "200 OK",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        &body,
    )
}

fn respond(conn: &mut TcpStream, status: &str, kind: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(request).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    }

    #[test]
    fn metrics_are_served_and_anything_else_is_refused() {
        let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let m = n.clone();
        let server = serve(
            "127.0.0.1:0",
            Arc::new(move || {
                let mut s = Scrape::new();
                s.counter(
                    "lego_test_scrapes",
                    "Scrapes.",
                    vec![],
                    m.fetch_add(1, Ordering::SeqCst) + 1,
                );
                s
            }),
        )
        .unwrap();
        let a = server.addr();
        let first = get(a, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
        assert!(first.contains("lego_test_scrapes_total 1\n"), "{first}");
        assert!(first.ends_with("# EOF\n"), "{first}");
        let second = get(a, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n");
        assert!(second.contains("lego_test_scrapes_total 2\n"), "{second}");
        assert!(get(a, b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(a, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(get(a, b"\x16\x03\x01garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
        let huge = vec![b'a'; 20_000];
        assert!(get(a, &huge).starts_with("HTTP/1.1 400"));
        // A client that never finishes does not hold up the others.
        let _slow = TcpStream::connect(a).unwrap();
        assert!(get(a, b"GET /metrics HTTP/1.1\r\n\r\n").contains("_total 3\n"));
        drop(server);
    }

    #[test]
    fn a_port_alone_is_loopback_and_nonsense_is_refused() {
        assert_eq!(listen_addr("9100").unwrap(), "127.0.0.1:9100");
        assert_eq!(listen_addr("0.0.0.0:9100").unwrap(), "0.0.0.0:9100");
        assert_eq!(listen_addr("[::1]:9100").unwrap(), "[::1]:9100");
        assert!(listen_addr("localhost").is_err());
        assert!(listen_addr("host:port").is_err());
    }
}
