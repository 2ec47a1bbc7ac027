//! The repair thread: keeps every unit of this program's memory on as many
//! memory daemons as the global manager gives it, and the layout on two.
//!
//! A few times a second — at once after the pager lost a daemon — it asks
//! the manager which memory daemons drain and which failed or left. A
//! failed daemon the program still uses is given up (its replicas are
//! dropped; the others serve its units, see [`crate::pool`]). Then each
//! unit that lost a replica, has one on a draining daemon, or has one
//! still being filled is repaired:
//!
//! 1. `PlaceMemory{keep, avoid}`: the manager answers the unit's replicas,
//!    the ones it keeps plus new ones on other daemons (and zones);
//! 2. under the pager's lock, each new replica begins a fill with a new
//!    epoch (`BeginFill`: emptied, and taking copies of that epoch only)
//!    and is added as *filling*: from now on every writeback goes there
//!    too, but no read;
//! 3. a whole replica copies the unit there, daemon to daemon
//!    (`CopyRange`, sent as `FillPages` of the fill's epoch, which never
//!    overwrite a page the program wrote since), off the pager's lock;
//! 4. under the lock, the replica is whole; replicas the manager did not
//!    answer (a draining daemon's) are discarded and dropped;
//! 5. `Restored`: the manager no longer counts the unit degraded.
//!
//! Why it is correct: every write the program makes after step 2 reaches
//! the new replica directly, and every write made before it was
//! acknowledged by the source before its copy began (writebacks complete
//! under the lock of step 2), so the copy brings all of those. A page the
//! copy brings late is not stored over a newer one, and a copy of an
//! earlier fill (one given up) is not stored at all. A replica is read only
//! once its copy is complete, and a daemon given up is never read again
//! unless it is emptied and filled anew (so its stale copies are never
//! served, also when it comes back after a network cut).
//!
//! The layout: the home's backup is made here again whenever it is lost,
//! and a home or backup on a draining daemon moves. A daemon drained of
//! all its units and of the layout is closed, which frees the space there.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use lego_protocol::control::{Reply, Request, PLACEMENT_BYTES};
use lego_protocol::{Message, VirtAddr};
use lego_sys::process;
use lego_transport::ControlClient;

use crate::heap::RuntimeScope;
use crate::pager::Backing;
use crate::placement;
use crate::pool::{self, DaemonError};
use crate::runtime::{lock, stop, Runtime};
use crate::side::Side;

/// How often a program's runtime asks the global manager which memory
/// daemons are draining or failed.
const POLL: Duration = Duration::from_millis(200);
/// A unit the manager could give no new replica is asked about again
/// this often (a daemon may have joined).
const RETRY_SHORT: Duration = Duration::from_secs(2);
const UNIT: usize = PLACEMENT_BYTES as usize;

/// Wakes the repair thread before its next poll.
#[derive(Default)]
pub struct Wake {
    woken: Mutex<bool>,
    cv: Condvar,
}

impl Wake {
    pub fn wake(&self) {
        *self.woken.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }

    fn wait(&self, limit: Duration) {
        let g = self.woken.lock().unwrap_or_else(|p| p.into_inner());
        let (mut g, _) = self
            .cv
            .wait_timeout_while(g, limit, |w| !*w)
            .unwrap_or_else(|p| p.into_inner());
        *g = false;
    }
}

/// Why a repair could not be made yet (it is tried again at the next poll).
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("{0}")]
    Manager(String),
    #[error("unit {0} has no whole replica to copy from")]
    NoSource(usize),
}

/// What the manager said this round.
#[derive(Default)]
struct Verdict {
    draining: Vec<u64>,
    failed: Vec<u64>,
    /// Daemons back after a failure, and how many milliseconds ago.
    back: Vec<(u64, u64)>,
}

impl Runtime {
    /// The repair thread (see the module docs). The manager being away
    /// only delays it.
    pub(crate) fn repair_loop(&'static self, manager: Option<String>) -> ! {
        let _scope = RuntimeScope::enter();
        let wake = lock(&self.state).pool.repair.clone();
        let mut client: Option<ControlClient> = None;
        let mut said: Option<String> = None;
        // Units the manager could give no more replicas, and when to ask
        // again.
        let mut later: Vec<(usize, Instant)> = Vec::new();
        loop {
            wake.wait(POLL);
            let verdict = match &manager {
                Some(m) => match ask_verdict(m, &mut client) {
                    Some(v) => v,
                    None => continue,
                },
                None => Verdict::default(),
            };
            self.give_up_failed(&verdict.failed);
            let mut result = Ok(());
            if let Some(m) = &manager {
                let avoid = lock(&self.state)
                    .pool
                    .avoided(&verdict.failed, &verdict.back);
                later.retain(|(_, at)| Instant::now() < *at);
                for unit in self.units_to_repair(&verdict.draining) {
                    if later.iter().any(|&(u, _)| u == unit) {
                        continue;
                    }
                    // One unit's trouble does not hold the others up.
                    match self.repair_unit(m, &mut client, unit, (&verdict.draining, &avoid)) {
                        Ok(true) => {}
                        Ok(false) => later.push((unit, Instant::now() + RETRY_SHORT)),
                        Err(RepairError::Daemon(e @ DaemonError::Lost { .. })) => stop(e),
                        Err(e) => result = Err(e),
                    }
                }
            }
            match self.repair_layout(&verdict.draining) {
                Err(RepairError::Daemon(e @ DaemonError::Lost { .. })) => stop(e),
                Err(e) => result = Err(e),
                Ok(()) => {}
            }
            self.close_drained(&verdict.draining);
            // Said once per reason; tried again at the next poll.
            match result {
                Ok(()) => said = None,
                Err(e) => {
                    let e = e.to_string();
                    if said.as_ref() != Some(&e) {
                        process::warn(&format!("cannot restore memory's replicas yet: {e}"));
                        said = Some(e);
                    }
                }
            }
        }
    }

    /// Gives up the daemons the manager says failed or left.
    fn give_up_failed(&self, failed: &[u64]) {
        let mut st = lock(&self.state);
        // Not fatal here: the pager meets the same error if the unit is
        // ever written.
        let _ = st.pool.collect_placed();
        for &id in failed {
            let Some(d) = st.pool.placement.index_of(id) else {
                continue;
            };
            if st.pool.daemons[d].conn.is_none() {
                continue;
            }
            let cause = DaemonError::Placement(format!(
                "the global manager reports memory daemon {} failed",
                st.pool.daemons[d].addr
            ));
            if let Err(e) = st.pool.lose(d, cause) {
                stop(e);
            }
        }
    }

    /// The units with fewer whole replicas than they should have, one on
    /// a draining daemon, or one still being filled.
    fn units_to_repair(&self, draining: &[u64]) -> Vec<usize> {
        let st = lock(&self.state);
        let p = &st.pool.placement;
        let draining: Vec<usize> = draining.iter().filter_map(|&id| p.index_of(id)).collect();
        p.units()
            .filter(|(u, r)| {
                !r.is_empty()
                    && (p.is_short(*u)
                        || r.filling().next().is_some()
                        || r.all().any(|d| draining.contains(&d)))
            })
            .map(|(u, _)| u)
            .collect()
    }

    /// Repairs unit `unit` (steps 1–5 of the module docs). Returns whether
    /// it has as many whole replicas as it should (false: the manager had
    /// no daemon for another, or one could not be filled; asked again
    /// later).
    fn repair_unit(
        &self,
        manager: &str,
        client: &mut Option<ControlClient>,
        unit: usize,
        (draining, avoid): (&[u64], &[u64]),
    ) -> Result<bool, RepairError> {
        let off = unit * UNIT;
        let base = self.region.base + off;
        let len = UNIT.min(self.region.len - off);
        // 1. What the manager makes of it.
        let keep: Vec<u64> = {
            let st = lock(&self.state);
            let ids = st.pool.placement.ids();
            st.pool
                .placement
                .replicas(off)
                .all()
                .filter_map(|d| ids.get(d).copied())
                .filter(|id| !draining.contains(id))
                .collect()
        };
        let req = Request::PlaceMemory {
            space: self.space.0,
            unit: unit as u64,
            keep,
            avoid: avoid.to_vec(),
        };
        let answer =
            placement::ask(manager, client, &req, self.timeout).map_err(RepairError::Manager)?;
        // New daemons are connected to off the lock; one that cannot be
        // reached is avoided, and the unit stays short for now.
        let mut replicas = Vec::with_capacity(answer.len());
        for r in &answer {
            let connected = {
                let st = lock(&self.state);
                st.pool
                    .placement
                    .index_of(r.id)
                    .is_some_and(|d| st.pool.daemons[d].conn.is_some())
            };
            if connected {
                replicas.push((r, None));
                continue;
            }
            match self.attach(&r.addr) {
                Ok(c) => replicas.push((r, Some(Side::new(c)))),
                Err(_) => lock(&self.state).pool.avoid(r.id),
            }
        }
        // 2. New replicas are emptied and take every write from now on.
        let (members, targets, source) = {
            let mut st = lock(&self.state);
            let st = &mut *st;
            st.pool.placement.want_at_least(unit, answer.len());
            let mut members = Vec::with_capacity(replicas.len());
            for (r, conn) in replicas {
                let conn = conn.map(Side::into_inner);
                members.push(st.pool.daemon_index(r.id, &r.addr, conn)?);
            }
            for &d in &members {
                if !st.pool.placement.replicas(off).contains(d) {
                    let epoch = next_epoch();
                    st.pool.begin_fill(d, base, len, epoch)?;
                    if st.pool.daemons[d].conn.is_some() {
                        st.pool.placement.add_filling(unit, d, epoch);
                    }
                }
            }
            let r = st.pool.placement.replicas(off);
            let draining_idx: Vec<usize> = draining
                .iter()
                .filter_map(|&id| st.pool.placement.index_of(id))
                .collect();
            let source = r
                .whole()
                .find(|d| !draining_idx.contains(d))
                .or_else(|| r.whole().next())
                .ok_or(RepairError::NoSource(unit))?;
            let addr = |d: usize| st.pool.daemons[d].addr.clone();
            let targets: Vec<(usize, String, u64)> =
                r.filling().map(|d| (d, addr(d), r.epoch_of(d))).collect();
            (members, targets, (source, addr(source)))
        };
        // 3. Copied daemon to daemon, off the lock.
        for (t, to, epoch) in targets {
            match self.copy_unit(&source.1, (base, len), &to, epoch) {
                Ok(pages) => {
                    if let Some(s) = self.stats {
                        s.migrated_pages
                            .fetch_add(pages, std::sync::atomic::Ordering::Relaxed);
                    }
                    // 4. Whole.
                    lock(&self.state).pool.placement.filled(unit, t);
                }
                Err(e) => {
                    // Not this target (the source cannot reach it, or it
                    // died): dropped, avoided for a while; the source's
                    // own trouble shows in the pager.
                    process::warn(&format!("cannot copy a unit to {to}: {e}"));
                    let mut st = lock(&self.state);
                    st.pool.placement.remove(unit, t);
                    let _ = st.pool.discard_on(t, base, len);
                    if let Some(&id) = st.pool.placement.ids().get(t) {
                        st.pool.avoid(id);
                    }
                }
            }
        }
        let mut st = lock(&self.state);
        let r = st.pool.placement.replicas(off);
        if r.whole().any(|d| members.contains(&d)) {
            for d in r.all().filter(|d| !members.contains(d)).collect::<Vec<_>>() {
                st.pool.placement.remove(unit, d);
                st.pool.discard_on(d, base, len)?;
            }
        }
        let r = st.pool.placement.replicas(off);
        let whole = !st.pool.placement.is_short(unit) && r.filling().next().is_none();
        let ids = st.pool.placement.ids();
        let filled: Vec<u64> = r.whole().filter_map(|d| ids.get(d).copied()).collect();
        drop(st);
        // 5. Not degraded any more (the manager checks it has them all).
        if let Some(c) = client.as_mut() {
            let _ = c.call(&Request::Restored {
                space: self.space.0,
                unit: unit as u64,
                ids: filled,
            });
        }
        Ok(whole)
    }

    /// Has the daemon at `from` copy its pages of `[base, base+len)` to
    /// the daemon at `to` (filling with `epoch`), over a connection of
    /// this thread's own.
    fn copy_unit(
        &self,
        from: &str,
        (base, len): (usize, usize),
        to: &str,
        epoch: u64,
    ) -> Result<u64, DaemonError> {
        let mut side = Side::new(self.attach(from)?);
        let conn = side.conn();
        let msg = Message::CopyRange {
            addr: VirtAddr(base as u64),
            len: len as u64,
            to,
            epoch,
        };
        match pool::call(conn, from, 2, &msg)? {
            Message::Copied { pages } => Ok(pages),
            other => Err(pool::unexpected(from, "CopyRange", &other)),
        }
    }

    /// Moves the layout off a draining daemon, and makes a new backup of
    /// it where it has none.
    fn repair_layout(&self, draining: &[u64]) -> Result<(), RepairError> {
        let candidate = {
            let mut st = lock(&self.state);
            let mut layout = lock(&self.layout);
            // Daemons the layout may live on: connected, not draining.
            let ids = st.pool.placement.ids();
            let ok: Vec<String> = st
                .pool
                .daemons
                .iter()
                .enumerate()
                .filter(|(d, x)| {
                    x.conn.is_some() && ids.get(*d).is_none_or(|id| !draining.contains(id))
                })
                .map(|(_, x)| x.addr.clone())
                .collect();
            let usable = |addr: &str| ok.iter().any(|a| a == addr);
            if layout
                .backup
                .as_ref()
                .is_some_and(|(addr, _)| !usable(addr))
            {
                layout.backup = None;
            }
            if !usable(&layout.addr) && layout.promote_backup() {
                process::warn(&format!(
                    "the layout moved to memory daemon {} (its home is drained or lost)",
                    layout.addr
                ));
            }
            if let Some(h) = st.pool.daemons.iter().position(|x| x.addr == layout.addr) {
                st.pool.home = h;
            }
            if layout.backup.is_some() {
                return Ok(());
            }
            let home = layout.addr.clone();
            ok.into_iter().find(|addr| *addr != home)
        };
        let Some(addr) = candidate else {
            return Ok(());
        };
        let conn = Side::new(self.attach(&addr)?);
        let _st = lock(&self.state);
        let mut layout = lock(&self.layout);
        if layout.backup.is_none() && layout.addr != addr {
            layout.set_backup(addr, conn.into_inner())?;
        }
        Ok(())
    }

    /// Closes the connections to draining daemons that hold none of this
    /// program's units and not its layout: that frees the space there.
    fn close_drained(&self, draining: &[u64]) {
        let mut st = lock(&self.state);
        let layout = lock(&self.layout);
        for &id in draining {
            let Some(d) = st.pool.placement.index_of(id) else {
                continue;
            };
            let addr = st.pool.daemons[d].addr.clone();
            let layout_there =
                addr == layout.addr || layout.backup.as_ref().is_some_and(|b| b.0 == addr);
            if st.pool.daemons[d].conn.is_some() && !layout_there && !st.pool.placement.holds_any(d)
            {
                st.pool.close(d);
            }
        }
    }
}

/// A fill epoch not used before by this process (a daemon stores the
/// pages of a fill only with the epoch it was begun with).
fn next_epoch() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    use std::sync::atomic::Ordering::Relaxed;
    if NEXT.load(Relaxed) == 0 {
        let mut b = [0u8; 8];
        let _ = getrandom::getrandom(&mut b);
        let _ = NEXT.compare_exchange(0, u64::from_le_bytes(b) >> 2 | 1, Relaxed, Relaxed);
    }
    NEXT.fetch_add(1, Relaxed)
}

/// Asks the manager which memory daemons drain and which failed; `None`
/// if it cannot be asked now.
fn ask_verdict(manager: &str, client: &mut Option<ControlClient>) -> Option<Verdict> {
    if client.is_none() {
        *client = ControlClient::connect(
            manager,
            "lego-runtime",
            POLL * 5,
            crate::config::credential(),
        )
        .ok();
    }
    match client.as_mut()?.call(&Request::Draining) {
        Ok(Reply::Draining { ids, failed, back }) => Some(Verdict {
            draining: ids,
            failed,
            back,
        }),
        _ => {
            *client = None;
            None
        }
    }
}
