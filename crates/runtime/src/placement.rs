//! Which memory daemon holds each part of the region, in units of
//! [`PLACEMENT_BYTES`].
//!
//! Without a global manager the placement is fixed: vRegion `i` (1 GiB)
//! lives on daemon `i mod n`. With one (`LEGO_MANAGER`), a unit is placed
//! when its first page is written back: the runtime asks the manager's GMM,
//! which picks the alive memory daemon with the most free capacity. So a
//! program can use more memory than any one daemon has, and a daemon that
//! joins the cluster while it runs takes its new units at once (the
//! runtime connects to it then). Pages of a unit that was never placed
//! were never stored anywhere: they read as zeros.

use std::time::{Duration, Instant};

use lego_protocol::control::{Reply, Request, PLACEMENT_BYTES};
use lego_protocol::VREGION_BYTES;
use lego_transport::ControlClient;

const UNIT: usize = PLACEMENT_BYTES as usize;
const UNPLACED: u8 = u8::MAX;

/// The global manager this program asks, and the manager ids of the
/// daemons it is connected to (in the order of the runtime's daemon list).
struct Gmm {
    addr: String,
    ids: Vec<u64>,
    client: Option<ControlClient>,
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
            gmm: Some(Gmm {
                addr: manager,
                ids,
                client: None,
            }),
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

    /// The daemon that holds (or, placed now, will hold) region offset
    /// `off` of address space `space`. Asks the manager for a new unit,
    /// retrying for `timeout` while it is unreachable (restarting). A unit
    /// placed on a daemon this program is not connected to yet comes back
    /// as `Err((id, addr))`: connect, then [`Placement::bind`].
    pub fn place(
        &mut self,
        off: usize,
        space: u64,
        timeout: Duration,
    ) -> Result<Result<usize, (u64, String)>, String> {
        if let Some(d) = self.placed(off) {
            return Ok(Ok(d));
        }
        let unit = off / UNIT;
        let Some(gmm) = self.gmm.as_mut() else {
            return Err(format!("region offset {off:#x} is outside the region"));
        };
        let req = Request::PlaceMemory {
            space,
            unit: unit as u64,
        };
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if gmm.client.is_none() {
                match ControlClient::connect(&gmm.addr, "lego-runtime", Duration::from_secs(3)) {
                    Ok(c) => gmm.client = Some(c),
                    Err(e) => {
                        last = e.to_string();
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
            }
            let c = gmm.client.as_mut().expect("connected above");
            match c.call(&req) {
                Ok(Reply::Placed { id, addr }) => {
                    let Some(d) = gmm.ids.iter().position(|&i| i == id) else {
                        return Ok(Err((id, addr)));
                    };
                    self.table[unit] = d as u8;
                    return Ok(Ok(d));
                }
                Ok(Reply::Error { message }) => return Err(message),
                Ok(other) => return Err(format!("unexpected answer {other:?}")),
                Err(e) => {
                    last = e.to_string();
                    gmm.client = None;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        Err(format!(
            "global manager {} unreachable for {:.0?} ({last}): cannot place new memory",
            gmm.addr, timeout
        ))
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

    /// In a forked child: the parent's connection to the manager is the
    /// parent's (this drops only the child's copy of its descriptor).
    pub fn after_fork(&mut self) {
        if let Some(g) = self.gmm.as_mut() {
            g.client = None;
        }
    }
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
        let mut p = Placement::managed(1 << 30, "127.0.0.1:1".into(), vec![1]);
        assert_eq!(p.placed(0), None);
        let e = p.place(0, 7, Duration::from_millis(300)).unwrap_err();
        assert!(
            e.contains("unreachable") && e.contains("cannot place new memory"),
            "{e}"
        );
    }
}
