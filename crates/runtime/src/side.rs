//! Connections the runtime's helper threads hold outside the daemon pool
//! (a connection the placer made and the pool has not taken yet, the
//! repair thread's copy connections). A forked child closes them with the
//! pool's: kept open there, they would hold the parent's space at a
//! daemon alive until the child exits.
//!
//! A connection is listed from when it is made until just before its
//! socket closes (or the pool takes it), so a listed descriptor is always
//! an open socket of the runtime's, never a number the program reused.

use std::net::TcpStream;
use std::sync::atomic::{AtomicI32, Ordering::SeqCst};

use lego_transport::{FramedConn, Stream};

/// How many side connections are listed at once; more are not closed by
/// a forked child (the cost: a space freed late).
const SLOTS: usize = 32;

static LISTED: [AtomicI32; SLOTS] = [const { AtomicI32::new(-1) }; SLOTS];

/// A connection a helper thread holds, listed for a forked child to close.
pub struct Side(Option<FramedConn<TcpStream>>);

impl Side {
    pub fn new(conn: FramedConn<TcpStream>) -> Self {
        if let Some(fd) = conn.stream().raw_fd() {
            for slot in &LISTED {
                if slot.compare_exchange(-1, fd, SeqCst, SeqCst).is_ok() {
                    break;
                }
            }
        }
        Side(Some(conn))
    }

    pub fn conn(&mut self) -> &mut FramedConn<TcpStream> {
        self.0.as_mut().expect("taken only by into_inner")
    }

    /// The connection, no longer listed (the pool holds it now).
    pub fn into_inner(mut self) -> FramedConn<TcpStream> {
        let conn = self.0.take().expect("taken once");
        unlist(&conn);
        conn
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        // Unlisted before the socket closes.
        if let Some(conn) = self.0.take() {
            unlist(&conn);
        }
    }
}

fn unlist(conn: &FramedConn<TcpStream>) {
    if let Some(fd) = conn.stream().raw_fd() {
        for slot in &LISTED {
            if slot.compare_exchange(fd, -1, SeqCst, SeqCst).is_ok() {
                break;
            }
        }
    }
}

/// Takes the listed descriptors off the list (in a forked child: the
/// parent's helpers' sockets, which the child closes; the child's own
/// helpers list theirs anew).
pub fn take_listed() -> Vec<i32> {
    LISTED
        .iter()
        .map(|s| s.swap(-1, SeqCst))
        .filter(|&fd| fd >= 0)
        .collect()
}
