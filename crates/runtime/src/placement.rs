//! Which memory daemon holds each part of the region, in units of
//! [`PLACEMENT_BYTES`].
//!
//! Without a global manager the placement is fixed: vRegion `i` (1 GiB)
//! lives on daemon `i mod n`. With one (`LEGO_MANAGER`), a unit is placed
//! by the manager's GMM (the alive memory daemon with the most free
//! capacity), so a program can use more memory than any one daemon has,
//! and a daemon that joins the cluster while it runs takes its new units at
//! once. Pages of a unit that was never placed were never stored anywhere:
//! they read as zeros.
//!
//! The manager is asked ahead of need and off the fault path: when the
//! pager first installs a page of an unplaced unit it asks for the unit
//! ([`Placer::want`]), and the runtime's placer thread ([`Placer::run`])
//! asks the manager and connects to a daemon that is new to this program,
//! holding no lock the pager needs. By the time a page of the unit is
//! evicted its placement is normally there to look up; if not, eviction
//! waits for the placer, not for a round trip of its own.

use std::net::TcpStream;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use lego_protocol::control::{Reply, Request, PLACEMENT_BYTES};
use lego_protocol::VREGION_BYTES;
use lego_transport::{ControlClient, FramedConn};

const UNIT: usize = PLACEMENT_BYTES as usize;
const UNPLACED: u8 = u8::MAX;

/// The global manager this program asks, and the manager ids of the
/// daemons it is connected to (in the order of the runtime's daemon list).
struct Gmm {
    addr: String,
    ids: Vec<u64>,
}

pub struct Placement {
    /// Daemon index of each unit, or `UNPLACED`.
    table: Vec<u8>,
    gmm: Option<Gmm>,
}

impl Placement {
    /// The fixed placement over `n` daemons of a region of `len` bytes.
    pub fn fixed(len: usize, n: usize) -> Self {
        let per_vregion = VREGION_BYTES as usize / UNIT;
        let table = (0..len.div_ceil(UNIT))
            .map(|u| ((u / per_vregion) % n) as u8)
            .collect();
        Self { table, gmm: None }
    }

    /// Placement by the global manager at `manager`; `ids` are the manager
    /// ids of the daemons, in the runtime's order.
    pub fn managed(len: usize, manager: String, ids: Vec<u64>) -> Self {
        Self {
            table: vec![UNPLACED; len.div_ceil(UNIT)],
            gmm: Some(Gmm { addr: manager, ids }),
        }
    }

    /// The daemon holding region offset `off`, if its unit is placed.
    pub fn placed(&self, off: usize) -> Option<usize> {
        match self.table.get(off / UNIT) {
            Some(&d) if d != UNPLACED => Some(d as usize),
            _ => None,
        }
    }

    /// The units overlapping `[off, off+len)` that are placed, with their
    /// daemons.
    pub fn placed_in(&self, off: usize, len: usize) -> impl Iterator<Item = usize> + '_ {
        let first = off / UNIT;
        let end = (off + len).div_ceil(UNIT).min(self.table.len());
        self.table[first.min(end)..end]
            .iter()
            .filter(|&&d| d != UNPLACED)
            .map(|&d| d as usize)
    }

    /// The unit of region offset `off`.
    pub fn unit_of(off: usize) -> usize {
        off / UNIT
    }

    /// Records that unit `unit` lives on daemon `id` of the manager, the
    /// runtime's daemon `index` if it is connected to it. Returns the
    /// index, or `None` if the daemon is new to this program (connect, then
    /// [`Placement::bind`]).
    pub fn placed_on(&mut self, unit: usize, id: u64) -> Option<usize> {
        let d = self.index_of(id)?;
        self.table[unit] = d as u8;
        Some(d)
    }

    /// The manager ids of the daemons, in the runtime's order.
    pub fn ids(&self) -> &[u64] {
        self.gmm.as_ref().map_or(&[], |g| g.ids.as_slice())
    }

    /// Region offset `off`'s unit lives on daemon `id` of the manager, now
    /// connected as the runtime's daemon `index` (the next one).
    pub fn bind(&mut self, off: usize, id: u64, index: usize) -> Result<(), String> {
        let Some(gmm) = self.gmm.as_mut() else {
            return Err("no global manager".into());
        };
        if index >= UNPLACED as usize {
            return Err(format!("too many memory daemons (at most {UNPLACED})"));
        }
        debug_assert_eq!(index, gmm.ids.len());
        gmm.ids.push(id);
        self.table[off / UNIT] = index as u8;
        Ok(())
    }

    /// The global manager's address, if it places this program's memory.
    pub fn manager(&self) -> Option<&str> {
        self.gmm.as_ref().map(|g| g.addr.as_str())
    }

    /// The runtime's index of the daemon with manager id `id`, if this
    /// program is connected to it.
    pub fn index_of(&self, id: u64) -> Option<usize> {
        self.gmm.as_ref()?.ids.iter().position(|&i| i == id)
    }

    /// The first unit placed on daemon `d`, as a region offset.
    pub fn first_on(&self, d: usize) -> Option<usize> {
        self.table
            .iter()
            .position(|&x| x as usize == d)
            .map(|u| u * UNIT)
    }

    /// Forgets where region offset `off`'s unit lives, so the next
    /// [`Placement::place`] asks the manager again (a drain moving it).
    pub fn unplace(&mut self, off: usize) {
        if let Some(x) = self.table.get_mut(off / UNIT) {
            *x = UNPLACED;
        }
    }

    /// Records that region offset `off`'s unit lives on daemon `d` (a move
    /// that failed puts it back).
    pub fn set(&mut self, off: usize, d: usize) {
        if let Some(x) = self.table.get_mut(off / UNIT) {
            *x = d as u8;
        }
    }
}

/// A unit the placer placed: where, and a new connection if the daemon is
/// new to this program.
pub struct Placed {
    pub unit: usize,
    pub id: u64,
    pub addr: String,
    pub conn: Option<FramedConn<TcpStream>>,
}

/// What the pager and the placer thread share (under its own lock, never
/// the pager's).
#[derive(Default)]
struct Queue {
    wanted: Vec<usize>,
    placed: Vec<Placed>,
    /// Units whose placement failed, and why.
    failed: Vec<(usize, String)>,
    /// Manager ids of the daemons this program is connected to or being
    /// connected to by the placer.
    known: Vec<u64>,
}

/// The placer: units asked for, units placed. See the module docs.
pub struct Placer {
    manager: String,
    queue: Mutex<Queue>,
    changed: Condvar,
}

fn lock(m: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Placer {
    /// A placer asking `manager`; `known` are the manager ids of the
    /// daemons the program is connected to.
    pub fn new(manager: String, known: Vec<u64>) -> Self {
        Self {
            manager,
            queue: Mutex::new(Queue {
                known,
                ..Queue::default()
            }),
            changed: Condvar::new(),
        }
    }

    /// Asks for unit `unit` to be placed (again, if it was placed before
    /// and the placement was forgotten).
    pub fn want(&self, unit: usize) {
        let mut q = lock(&self.queue);
        if !q.wanted.contains(&unit) {
            q.wanted.push(unit);
            self.changed.notify_all();
        }
    }

    /// The program closed its connection to daemon `id` (drained it): a
    /// unit placed there again needs a new one.
    pub fn forget(&self, id: u64) {
        lock(&self.queue).known.retain(|&k| k != id);
    }

    /// Takes the units placed so far, and those whose placement failed.
    pub fn take(&self, placed: &mut Vec<Placed>, failed: &mut Vec<(usize, String)>) {
        let mut q = lock(&self.queue);
        placed.append(&mut q.placed);
        failed.append(&mut q.failed);
    }

    /// Waits until something was placed or failed, at most `limit`.
    pub fn wait(&self, limit: Duration) {
        let q = lock(&self.queue);
        if q.placed.is_empty() && q.failed.is_empty() {
            let _ = self.changed.wait_timeout(q, limit);
        }
    }

    /// The placer thread: asks the manager for each unit wanted, and
    /// connects (with `attach`) to a daemon new to this program. Holds no
    /// lock of the pager's while it does.
    pub fn run(
        &self,
        space: u64,
        timeout: Duration,
        attach: impl Fn(&str) -> Result<FramedConn<TcpStream>, String>,
    ) -> ! {
        let mut client: Option<ControlClient> = None;
        loop {
            let units = {
                let mut q = lock(&self.queue);
                while q.wanted.is_empty() {
                    q = self.changed.wait(q).unwrap_or_else(|p| p.into_inner());
                }
                q.wanted.clone()
            };
            for unit in units {
                let placed =
                    ask(&self.manager, &mut client, space, unit, timeout).and_then(|(id, addr)| {
                        let new = !lock(&self.queue).known.contains(&id);
                        let conn = if new { Some(attach(&addr)?) } else { None };
                        Ok(Placed {
                            unit,
                            id,
                            addr,
                            conn,
                        })
                    });
                let mut q = lock(&self.queue);
                q.wanted.retain(|&u| u != unit);
                match placed {
                    Ok(p) => {
                        if p.conn.is_some() {
                            q.known.push(p.id);
                        }
                        q.placed.push(p);
                    }
                    Err(e) => q.failed.push((unit, e)),
                }
                self.changed.notify_all();
            }
        }
    }
}

/// Asks the manager at `manager` where unit `unit` of `space` goes,
/// retrying for `timeout` while it is unreachable (restarting).
fn ask(
    manager: &str,
    client: &mut Option<ControlClient>,
    space: u64,
    unit: usize,
    timeout: Duration,
) -> Result<(u64, String), String> {
    let req = Request::PlaceMemory {
        space,
        unit: unit as u64,
    };
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        if client.is_none() {
            match ControlClient::connect(
                manager,
                "lego-runtime",
                Duration::from_secs(3),
                crate::config::credential(),
            ) {
                Ok(c) => *client = Some(c),
                Err(e) => {
                    last = e.to_string();
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
        }
        let c = client.as_mut().expect("connected above");
        match c.call(&req) {
            Ok(Reply::Placed { id, addr }) => return Ok((id, addr)),
            Ok(Reply::Error { message }) => return Err(message),
            Ok(other) => return Err(format!("unexpected answer {other:?}")),
            Err(e) => {
                last = e.to_string();
                *client = None;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Err(format!(
        "global manager {manager} unreachable for {timeout:.0?} ({last}): cannot place new memory"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_placement_is_vregion_mod_n() {
        let p = Placement::fixed(8 * VREGION_BYTES as usize, 3);
        assert_eq!(p.placed(0), Some(0));
        assert_eq!(p.placed(VREGION_BYTES as usize + 5), Some(1));
        assert_eq!(p.placed(3 * VREGION_BYTES as usize), Some(0));
        assert_eq!(p.placed(100 * VREGION_BYTES as usize), None);
    }

    #[test]
    fn a_unit_unplaced_for_a_move_is_asked_for_again() {
        let mut p = Placement::managed(64 << 20, "127.0.0.1:1".into(), vec![4, 9]);
        assert_eq!(p.manager(), Some("127.0.0.1:1"));
        assert_eq!(p.index_of(9), Some(1));
        assert_eq!(p.index_of(5), None);
        p.set(UNIT + 5, 1);
        p.set(3 * UNIT, 1);
        assert_eq!(p.first_on(1), Some(UNIT));
        assert_eq!(p.first_on(0), None);
        p.unplace(UNIT);
        assert_eq!(p.placed(UNIT), None);
        assert_eq!(p.first_on(1), Some(3 * UNIT));
        assert_eq!(Placement::fixed(1 << 30, 1).manager(), None);
    }

    #[test]
    fn an_unreachable_manager_is_a_clear_error() {
        crate::config::set_credential(lego_transport::auth::Credential::generate().unwrap());
        let e = ask("127.0.0.1:1", &mut None, 7, 0, Duration::from_millis(300)).unwrap_err();
        assert!(
            e.contains("unreachable") && e.contains("cannot place new memory"),
            "{e}"
        );
    }

    #[test]
    fn the_placer_thread_reports_a_failure_to_whoever_waits() {
        crate::config::set_credential(lego_transport::auth::Credential::generate().unwrap());
        let placer = std::sync::Arc::new(Placer::new("127.0.0.1:1".into(), vec![1]));
        let p = placer.clone();
        std::thread::spawn(move || p.run(7, Duration::from_millis(200), |_| Err("no".into())));
        placer.want(3);
        let (mut got, mut failed) = (Vec::new(), Vec::new());
        let start = Instant::now();
        while failed.is_empty() {
            assert!(start.elapsed() < Duration::from_secs(5));
            placer.wait(Duration::from_secs(1));
            placer.take(&mut got, &mut failed);
        }
        assert_eq!(failed[0].0, 3);
        assert!(
            failed[0].1.contains("cannot place new memory"),
            "{failed:?}"
        );
        assert!(got.is_empty());
    }

    #[test]
    fn a_unit_placed_on_a_known_daemon_is_recorded_at_once() {
        let mut p = Placement::managed(64 << 20, "127.0.0.1:1".into(), vec![4, 9]);
        assert_eq!(p.placed_on(2, 9), Some(1));
        assert_eq!(p.placed(2 * UNIT), Some(1));
        assert_eq!(p.placed_on(3, 5), None);
        assert_eq!(p.placed(3 * UNIT), None);
        assert_eq!(p.ids(), &[4, 9]);
    }
}
