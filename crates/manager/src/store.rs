//! Where the manager keeps the cluster's state. Every change the state
//! machine ([`crate::state::Cluster`]) makes is stored before the manager
//! answers it, and a manager that starts (again) rebuilds the cluster from
//! the store: the embedded redb database ([`crate::db::Db`], the default)
//! or etcd ([`crate::etcd::EtcdStore`], shared by several managers, one
//! leading).
//!
//! A change the store refused is not made: the manager's cluster in
//! memory then holds it all the same, so the manager no longer trusts that
//! copy and rebuilds it from the store before it serves another request
//! (see `Inner::apply` in the crate root).

use crate::state::{Changes, Cluster};

pub trait Store: Send + Sync {
    /// The stored cluster, rebuilt at time `now` (every live component
    /// gets a full `timeout_ms` to heartbeat again).
    fn load(&self, timeout_ms: u64, now: u64) -> Result<Cluster, String>;

    /// Stores what `changes` names of `cluster`. An error means the change
    /// is not durable: the request is answered with it, not acknowledged.
    fn save(&self, cluster: &Cluster, changes: &Changes) -> Result<(), String>;

    /// Where the state is and how the store is, for `lego status`.
    fn health(&self) -> String;

    /// Whether this manager may act: a store shared by several managers
    /// says no once this one can no longer be sure it leads (its lease
    /// may have ended), even before it finds out for certain.
    fn leading(&self) -> bool {
        true
    }
}

impl Store for crate::db::Db {
    fn load(&self, timeout_ms: u64, now: u64) -> Result<Cluster, String> {
        crate::db::Db::load(self, timeout_ms, now)
    }

    fn save(&self, cluster: &Cluster, changes: &Changes) -> Result<(), String> {
        crate::db::Db::save(self, cluster, changes)
    }

    fn health(&self) -> String {
        format!("redb {}", self.path().display())
    }
}
