//! Which memory daemons hold each part of the region, in units of
//! [`PLACEMENT_BYTES`]: every unit has one or more *replicas*, each on a
//! different daemon. A writeback goes to every replica and counts as done
//! when all have acknowledged it; a read goes to the first *whole* replica
//! (one not still being filled by re-replication); a replica lost with its
//! daemon is dropped and the unit served by the others (`crate::repair`
//! gives it a new one).
//!
//! Without a global manager the placement is fixed: vRegion `i` (1 GiB)
//! lives on daemons `i, i+1, ...` mod n (`LEGO_REPLICAS` of them). With
//! one (`LEGO_MANAGER`), a unit is placed by the manager's GMM (the alive
//! memory daemons with the most free capacity, in different zones), so a
//! program can use more memory than any one daemon has, and a daemon that
//! joins the cluster while it runs takes its new units at once. Pages of a
//! unit that was never placed were never stored anywhere: they read as
//! zeros.
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

use lego_protocol::control::{Replica, Reply, Request, PLACEMENT_BYTES};
use lego_protocol::VREGION_BYTES;
use lego_transport::{ControlClient, FramedConn};

const UNIT: usize = PLACEMENT_BYTES as usize;
/// Most replicas of one unit.
pub const MAX_REPLICAS: usize = 4;
/// Most daemons a program uses (indices are bytes).
const MAX_DAEMONS: usize = u8::MAX as usize;

/// The replicas of one unit: daemon indices, and which are still being
/// filled (written to, never read), with the epoch of their fill.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replicas {
    d: [u8; MAX_REPLICAS],
    n: u8,
    /// Bit k: replica k is being filled.
    filling: u8,
    /// Replica k's fill epoch (the daemon takes copies of it only).
    epoch: [u64; MAX_REPLICAS],
}

impl Replicas {
    /// Every replica: where writes go.
    pub fn all(&self) -> impl Iterator<Item = usize> + '_ {
        self.d[..self.n as usize].iter().map(|&d| d as usize)
    }

    /// The whole replicas: where reads may go.
    pub fn whole(&self) -> impl Iterator<Item = usize> + '_ {
        self.all()
            .enumerate()
            .filter(|(k, _)| self.filling & (1 << k) == 0)
            .map(|(_, d)| d)
    }

    /// The replicas being filled.
    pub fn filling(&self) -> impl Iterator<Item = usize> + '_ {
        self.all()
            .enumerate()
            .filter(|(k, _)| self.filling & (1 << k) != 0)
            .map(|(_, d)| d)
    }

    pub fn len(&self) -> usize {
        self.n as usize
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn contains(&self, d: usize) -> bool {
        self.all().any(|x| x == d)
    }

    /// Adds daemon `d`, whole, or filling with `epoch` (`Some`); false if
    /// the unit has its most.
    pub fn add(&mut self, d: usize, filling: Option<u64>) -> bool {
        if self.contains(d) {
            return true;
        }
        if self.len() == MAX_REPLICAS || d >= MAX_DAEMONS {
            return false;
        }
        self.d[self.len()] = d as u8;
        if let Some(e) = filling {
            self.filling |= 1 << self.n;
            self.epoch[self.len()] = e;
        }
        self.n += 1;
        true
    }

    /// The fill epoch of daemon `d`'s replica (0 if it is not filling).
    pub fn epoch_of(&self, d: usize) -> u64 {
        self.all()
            .position(|x| x == d)
            .filter(|&k| self.filling & (1 << k) != 0)
            .map_or(0, |k| self.epoch[k])
    }

    /// Drops daemon `d`'s replica.
    pub fn remove(&mut self, d: usize) {
        let Some(k) = self.all().position(|x| x == d) else {
            return;
        };
        let n = self.len();
        self.d.copy_within(k + 1..n, k);
        self.epoch.copy_within(k + 1..n, k);
        let low = self.filling & ((1 << k) - 1);
        let high = (self.filling >> (k + 1)) << k;
        self.filling = low | high;
        self.n -= 1;
    }

    /// Daemon `d`'s replica is filled: it may be read.
    pub fn filled(&mut self, d: usize) {
        let k = self.all().position(|x| x == d);
        if let Some(k) = k {
            self.filling &= !(1 << k);
        }
    }
}

/// The global manager this program asks, and the manager ids of the
/// daemons it is connected to (in the order of the runtime's daemon list).
struct Gmm {
    addr: String,
    ids: Vec<u64>,
}

pub struct Placement {
    /// The replicas of each unit (none: not placed).
    table: Vec<Replicas>,
    /// How many whole replicas each unit should have: the most the
    /// manager (or the fixed placement) gave it. Fewer: it is short.
    target: Vec<u8>,
    gmm: Option<Gmm>,
}

impl Placement {
    /// The fixed placement over `n` daemons of a region of `len` bytes,
    /// `replicas` of each unit (at most `n`).
    pub fn fixed(len: usize, n: usize, replicas: usize) -> Self {
        let per_vregion = VREGION_BYTES as usize / UNIT;
        let r = replicas.clamp(1, n.clamp(1, MAX_REPLICAS));
        let table = (0..len.div_ceil(UNIT))
            .map(|u| {
                let mut set = Replicas::default();
                for k in 0..r {
                    set.add((u / per_vregion + k) % n.max(1), None);
                }
                set
            })
            .collect::<Vec<_>>();
        Self {
            target: table.iter().map(|r| r.len() as u8).collect(),
            table,
            gmm: None,
        }
    }

    /// Placement by the global manager at `manager`; `ids` are the manager
    /// ids of the daemons, in the runtime's order.
    pub fn managed(len: usize, manager: String, ids: Vec<u64>) -> Self {
        let units = len.div_ceil(UNIT);
        Self {
            table: vec![Replicas::default(); units],
            target: vec![0; units],
            gmm: Some(Gmm { addr: manager, ids }),
        }
    }

    /// The daemon to read region offset `off` from (its unit's first whole
    /// replica), if its unit is placed.
    pub fn placed(&self, off: usize) -> Option<usize> {
        self.table.get(off / UNIT)?.whole().next()
    }

    /// The replicas of region offset `off`'s unit (empty: not placed).
    pub fn replicas(&self, off: usize) -> Replicas {
        self.table.get(off / UNIT).copied().unwrap_or_default()
    }

    /// The units, as (unit, replicas), placed or not.
    pub fn units(&self) -> impl Iterator<Item = (usize, Replicas)> + '_ {
        self.table.iter().copied().enumerate()
    }

    /// The daemons holding a replica of a unit overlapping
    /// `[off, off+len)` (a daemon may come more than once).
    pub fn placed_in(&self, off: usize, len: usize) -> impl Iterator<Item = usize> + '_ {
        let first = off / UNIT;
        let end = (off + len).div_ceil(UNIT).min(self.table.len());
        self.table[first.min(end)..end]
            .iter()
            .flat_map(Replicas::all)
    }

    /// The unit of region offset `off`.
    pub fn unit_of(off: usize) -> usize {
        off / UNIT
    }

    /// Records that unit `unit` lives, whole, on the runtime's daemons
    /// `members` (a new placement: there is nothing to fill), and should
    /// have `target` replicas.
    pub fn place(&mut self, unit: usize, members: &[usize], target: usize) {
        if let Some(r) = self.table.get_mut(unit) {
            *r = Replicas::default();
            for &d in members {
                r.add(d, None);
            }
            self.target[unit] = target.max(r.len()).min(MAX_REPLICAS) as u8;
        }
    }

    /// Adds daemon `d` to unit `unit`, to be filled with `epoch`.
    pub fn add_filling(&mut self, unit: usize, d: usize, epoch: u64) -> bool {
        self.table
            .get_mut(unit)
            .is_some_and(|r| r.add(d, Some(epoch)))
    }

    /// Daemon `d`'s replica of unit `unit` is filled.
    pub fn filled(&mut self, unit: usize, d: usize) {
        if let Some(r) = self.table.get_mut(unit) {
            r.filled(d);
        }
    }

    /// Drops daemon `d`'s replica of unit `unit` (it moved away).
    pub fn remove(&mut self, unit: usize, d: usize) {
        if let Some(r) = self.table.get_mut(unit) {
            r.remove(d);
        }
    }

    /// Daemon `d` is lost: its replicas are dropped. Returns the units
    /// left with no whole replica (their pages are lost), if any.
    pub fn lose(&mut self, d: usize) -> Vec<usize> {
        let mut lost = Vec::new();
        for (u, r) in self.table.iter_mut().enumerate() {
            if !r.contains(d) {
                continue;
            }
            r.remove(d);
            if r.whole().next().is_none() {
                lost.push(u);
            }
        }
        lost
    }

    /// Whether every unit on daemon `d` has another whole replica (`d`
    /// can be given up without losing anything).
    pub fn expendable(&self, d: usize) -> bool {
        self.table
            .iter()
            .filter(|r| r.contains(d))
            .all(|r| r.whole().any(|x| x != d))
    }

    /// Whether unit `unit` has fewer whole replicas than it should.
    pub fn is_short(&self, unit: usize) -> bool {
        match (self.table.get(unit), self.target.get(unit)) {
            (Some(r), Some(&t)) => r.whole().count() < t as usize,
            _ => false,
        }
    }

    /// Unit `unit` should have (at least) `n` replicas.
    pub fn want_at_least(&mut self, unit: usize, n: usize) {
        if let Some(t) = self.target.get_mut(unit) {
            *t = (*t).max(n.min(MAX_REPLICAS) as u8);
        }
    }

    /// The manager ids of the daemons, in the runtime's order.
    pub fn ids(&self) -> &[u64] {
        self.gmm.as_ref().map_or(&[], |g| g.ids.as_slice())
    }

    /// A daemon new to this program, with manager id `id`, is the
    /// runtime's daemon `index` (the next one).
    pub fn bind(&mut self, id: u64, index: usize) -> Result<(), String> {
        let Some(gmm) = self.gmm.as_mut() else {
            return Err("no global manager".into());
        };
        if index >= MAX_DAEMONS {
            return Err(format!("too many memory daemons (at most {MAX_DAEMONS})"));
        }
        debug_assert_eq!(index, gmm.ids.len());
        gmm.ids.push(id);
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

    /// Whether daemon `d` holds a replica of any unit.
    pub fn holds_any(&self, d: usize) -> bool {
        self.table.iter().any(|r| r.contains(d))
    }
}

/// A unit the placer placed: its replicas, each with a new connection if
/// the daemon is new to this program, and how many the manager named
/// (more than there are: one could not be reached, and the repair thread
/// asks for another).
pub struct Placed {
    pub unit: usize,
    pub replicas: Vec<(Replica, Option<crate::side::Side>)>,
    pub named: usize,
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
    /// Daemons this program lost, and when: new units avoid them until
    /// the manager has seen them fail, or for [`crate::pool::LOST_FOR`].
    avoid: Vec<(u64, Instant)>,
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
        if !q.wanted.contains(&unit) && !q.placed.iter().any(|p| p.unit == unit) {
            q.wanted.push(unit);
            self.changed.notify_all();
        }
    }

    /// The program closed its connection to daemon `id` (drained it): a
    /// unit placed there again needs a new one.
    pub fn forget(&self, id: u64) {
        lock(&self.queue).known.retain(|&k| k != id);
    }

    /// The program lost daemon `id`: new units avoid it for a while.
    pub fn avoid(&self, id: u64) {
        lock(&self.queue).avoid.push((id, Instant::now()));
    }

    /// The manager saw daemon `id` fail, or fail and come back: new units
    /// may go there again.
    pub fn unavoid(&self, id: u64) {
        lock(&self.queue).avoid.retain(|&(a, _)| a != id);
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
                let avoid = {
                    let mut q = lock(&self.queue);
                    q.avoid
                        .retain(|(_, at)| at.elapsed() < crate::pool::LOST_FOR);
                    q.avoid.iter().map(|&(id, _)| id).collect()
                };
                let req = Request::PlaceMemory {
                    space,
                    unit: unit as u64,
                    keep: vec![],
                    avoid,
                };
                let placed = ask(&self.manager, &mut client, &req, timeout).and_then(|replicas| {
                    // A replica that cannot be reached is left out (the
                    // unit is short: the repair thread asks for another),
                    // unless none can be.
                    let mut with = Vec::with_capacity(replicas.len());
                    let mut last = String::new();
                    let named = replicas.len();
                    for r in replicas {
                        let new = !lock(&self.queue).known.contains(&r.id);
                        let made = if new {
                            attach(&r.addr).map(|c| Some(crate::side::Side::new(c)))
                        } else {
                            Ok(None)
                        };
                        match made {
                            Ok(conn) => with.push((r, conn)),
                            Err(e) => last = e,
                        }
                    }
                    if with.is_empty() {
                        return Err(last);
                    }
                    Ok(Placed {
                        unit,
                        replicas: with,
                        named,
                    })
                });
                let mut q = lock(&self.queue);
                q.wanted.retain(|&u| u != unit);
                match placed {
                    Ok(p) => {
                        for (r, conn) in &p.replicas {
                            if conn.is_some() {
                                q.known.push(r.id);
                            }
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

/// Asks the manager at `manager` where a unit's replicas go (`req`, a
/// `PlaceMemory`), retrying for `timeout` while it is unreachable
/// (restarting).
pub fn ask(
    manager: &str,
    client: &mut Option<ControlClient>,
    req: &Request,
    timeout: Duration,
) -> Result<Vec<Replica>, String> {
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
        match c.call(req) {
            Ok(Reply::Placed { replicas }) if !replicas.is_empty() => return Ok(replicas),
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
    fn fixed_placement_is_vregion_mod_n_with_the_next_daemons_as_replicas() {
        let p = Placement::fixed(8 * VREGION_BYTES as usize, 3, 1);
        assert_eq!(p.placed(0), Some(0));
        assert_eq!(p.placed(VREGION_BYTES as usize + 5), Some(1));
        assert_eq!(p.placed(3 * VREGION_BYTES as usize), Some(0));
        assert_eq!(p.placed(100 * VREGION_BYTES as usize), None);
        let p = Placement::fixed(8 * VREGION_BYTES as usize, 3, 2);
        let r = p.replicas(2 * VREGION_BYTES as usize);
        assert_eq!(r.all().collect::<Vec<_>>(), [2, 0]);
        // More replicas than daemons: one per daemon.
        let p = Placement::fixed(VREGION_BYTES as usize, 2, 3);
        assert_eq!(p.replicas(0).len(), 2);
        assert_eq!(Placement::fixed(1 << 30, 1, 2).manager(), None);
    }

    #[test]
    fn replicas_being_filled_take_writes_but_no_reads() {
        let mut r = Replicas::default();
        assert!(r.add(3, None) && r.add(5, Some(50)) && r.add(7, Some(70)));
        assert_eq!(r.all().collect::<Vec<_>>(), [3, 5, 7]);
        assert_eq!(r.whole().collect::<Vec<_>>(), [3]);
        assert_eq!(r.filling().collect::<Vec<_>>(), [5, 7]);
        r.remove(3);
        // The flags and epochs move with their replicas.
        assert_eq!(r.whole().count(), 0);
        assert_eq!(r.filling().collect::<Vec<_>>(), [5, 7]);
        assert_eq!((r.epoch_of(5), r.epoch_of(7), r.epoch_of(3)), (50, 70, 0));
        r.filled(7);
        assert_eq!(r.whole().collect::<Vec<_>>(), [7]);
        assert_eq!(r.epoch_of(7), 0);
        assert!(r.add(1, None) && r.add(2, None));
        assert!(!r.add(9, None), "at most {MAX_REPLICAS}");
        assert!(r.add(2, Some(1)), "already there: nothing changes");
        assert_eq!(r.whole().collect::<Vec<_>>(), [7, 1, 2]);
    }

    #[test]
    fn a_lost_daemon_leaves_its_units_short_and_lost_only_without_a_whole_replica() {
        let mut p = Placement::managed(64 << 20, "127.0.0.1:1".into(), vec![4, 9, 11]);
        assert_eq!(p.manager(), Some("127.0.0.1:1"));
        assert_eq!(p.index_of(9), Some(1));
        assert_eq!(p.index_of(5), None);
        p.place(0, &[0, 1], 2);
        p.place(1, &[1, 2], 2);
        p.place(2, &[0], 1);
        assert!(p.add_filling(2, 1, 8));
        assert!(!p.expendable(0), "unit 2 has no other whole replica");
        assert!(p.expendable(2));
        assert_eq!(p.placed(0), Some(0));
        // 1 goes: units 0 and 1 are short but served by 0 and 2.
        assert!(p.lose(1).is_empty());
        assert_eq!(p.placed(UNIT), Some(2));
        assert!(p.is_short(0) && p.is_short(1));
        assert!(
            !p.is_short(2),
            "its one replica is there (filling: not whole)"
        );
        assert!(!p.is_short(3));
        // 0 goes: unit 0 has none left, and unit 2 had no other whole
        // replica.
        assert_eq!(p.lose(0), [0, 2]);
        assert_eq!(p.placed(0), None);
        assert!(p.holds_any(2) && !p.holds_any(0));
        p.add_filling(1, 0, 9);
        assert!(p.is_short(1), "filling is not whole");
        p.filled(1, 0);
        assert!(!p.is_short(1));
        p.want_at_least(1, 3);
        assert!(p.is_short(1));
    }

    #[test]
    fn an_unreachable_manager_is_a_clear_error() {
        crate::config::set_credential(lego_transport::auth::Credential::generate().unwrap());
        let req = Request::PlaceMemory {
            space: 7,
            unit: 0,
            keep: vec![],
            avoid: vec![],
        };
        let e = ask("127.0.0.1:1", &mut None, &req, Duration::from_millis(300)).unwrap_err();
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
}
