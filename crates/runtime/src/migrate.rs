//! Draining: a program whose memory a global manager places moves its
//! units off memory daemons being drained, while it runs (LegoOS's memory
//! migration). A thread of the runtime asks the manager a few times a
//! second which daemons are draining; each unit of this program on one is
//! placed anew, its pages copied there, then forgotten at the old daemon;
//! the layout follows if that daemon is the home; last, the connection to
//! the drained daemon closes, which frees the space there.

use std::net::TcpStream;
use std::time::Duration;

use lego_protocol::control::{Reply, Request, PLACEMENT_BYTES};
use lego_protocol::Message;
use lego_sys::process;
use lego_transport::{ControlClient, FramedConn, Stream};

use crate::heap::RuntimeScope;
use crate::pager::{Backing, PagerError};
use crate::pool::{self, DaemonError};
use crate::runtime::{lock, Runtime, State};

/// How often a program's runtime asks the global manager which memory
/// daemons are draining.
const DRAIN_POLL: Duration = Duration::from_millis(200);

/// Why a drain could not proceed yet (it is tried again at the next poll).
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(transparent)]
    Pager(#[from] PagerError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("the manager placed {0} on the draining daemon again")]
    PlacedBack(&'static str),
}

impl Runtime {
    /// The drain thread (see the module docs). The manager being away only
    /// delays it.
    pub(crate) fn drain_loop(&'static self, manager: String) -> ! {
        let _scope = RuntimeScope::enter();
        let mut client: Option<ControlClient> = None;
        let mut failing: Option<String> = None;
        loop {
            std::thread::sleep(DRAIN_POLL);
            if client.is_none() {
                client = ControlClient::connect(
                    &manager,
                    "lego-runtime",
                    DRAIN_POLL * 5,
                    crate::config::credential(),
                )
                .ok();
            }
            let Some(c) = client.as_mut() else {
                continue;
            };
            let ids = match c.call(&Request::Draining) {
                Ok(Reply::Draining { ids }) => ids,
                _ => {
                    client = None;
                    continue;
                }
            };
            let drained: Vec<usize> = {
                let st = lock(&self.state);
                ids.iter()
                    .filter_map(|&id| st.pool.placement.index_of(id))
                    .filter(|&d| st.pool.daemons[d].conn.is_some())
                    .collect()
            };
            for d in drained {
                match self.drain_daemon(d) {
                    Ok(()) => failing = None,
                    // Said once per reason; tried again at the next poll.
                    Err(e) => {
                        let e = e.to_string();
                        if failing.as_ref() != Some(&e) {
                            process::warn(&format!(
                                "cannot move memory off a draining daemon yet: {e}"
                            ));
                            failing = Some(e);
                        }
                    }
                }
            }
        }
    }

    /// Moves every unit of this program on daemon `d` elsewhere, one unit
    /// per hold of the lock so the program's faults are served in between;
    /// then the layout, if `d` is the home; then closes `d`.
    fn drain_daemon(&self, d: usize) -> Result<(), DrainError> {
        // A connection to the next home, made without holding the lock.
        let mut next_home: Option<(usize, FramedConn<TcpStream>)> = None;
        loop {
            let mut st = lock(&self.state);
            if let Some(off) = st.pool.placement.first_on(d) {
                self.move_unit(&mut st, d, off)?;
                continue;
            }
            // Still under the lock that found no unit on `d`: none can be
            // placed there before its connection closes.
            if st.pool.home == d {
                let h = st.pool.daemon_for(self.region.base)?;
                if h == d {
                    return Err(DrainError::PlacedBack("the home"));
                }
                let conn = match next_home.take() {
                    Some((at, conn)) if at == h => conn,
                    _ => {
                        let addr = st.pool.daemons[h].addr.clone();
                        drop(st);
                        let region = (self.region.base, self.region.len);
                        let conn = pool::attach(
                            &addr,
                            &self.program,
                            self.timeout,
                            (self.space, self.capability),
                            region,
                        )?;
                        next_home = Some((h, conn));
                        // Looked at again under the lock: units may have
                        // moved meanwhile.
                        continue;
                    }
                };
                self.move_home(&mut st, h, conn)?;
            }
            st.pool.close(d);
            return Ok(());
        }
    }

    /// Moves the unit at region offset `off` from daemon `d` to where the
    /// manager places it now. Until the copy is complete the unit stays on
    /// `d`; the lock is held throughout, so no writeback or fetch of the
    /// program sees it half moved.
    fn move_unit(&self, st: &mut State, d: usize, off: usize) -> Result<(), DrainError> {
        let unit = PLACEMENT_BYTES as usize;
        let base = self.region.base + off / unit * unit;
        let len = unit.min(self.region.base + self.region.len - base);
        st.pool.placement.unplace(off);
        let moved = (|| {
            let to = st.pool.daemon_for(base)?;
            if to == d {
                return Err(DrainError::PlacedBack("a unit"));
            }
            self.with_pager_locked(st, |pager, pool, _| pager.move_unit(pool, base, len, d, to))?;
            Ok(())
        })();
        if moved.is_err() {
            st.pool.placement.set(off, d);
        }
        moved
    }

    /// Makes daemon `h` the home of this space (the one holding the
    /// region's first unit), over `conn`, a connection to it attached to
    /// the space: it is given the layout the old home had, and the layout
    /// connection moves there. The first unit is not placed anew: if it sits
    /// on another draining daemon, the manager would move it without its
    /// pages; the home follows it there and moves again when that daemon is
    /// drained.
    fn move_home(
        &self,
        st: &mut State,
        h: usize,
        mut conn: FramedConn<TcpStream>,
    ) -> Result<(), DrainError> {
        let mut layout = lock(&self.layout);
        layout.next_id += 1;
        let id = layout.next_id;
        let addr = layout.addr.clone();
        let reply = pool::call(&mut layout.conn, &addr, id, &Message::GetLayout)?;
        let Message::Layout {
            brk_start,
            brk,
            mappings,
        } = reply
        else {
            return Err(pool::unexpected(&addr, "GetLayout", &reply).into());
        };
        let new_addr = st.pool.daemons[h].addr.clone();
        let layout_msg = Message::Layout {
            brk_start,
            brk,
            mappings,
        };
        pool::space_call(&mut conn, &new_addr, &layout_msg)?;
        st.layout_fd = conn.stream().raw_fd().unwrap_or(-1);
        layout.conn = conn;
        layout.addr = new_addr;
        st.pool.home = h;
        Ok(())
    }
}
