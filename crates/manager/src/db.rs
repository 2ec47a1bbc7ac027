//! The manager's state on disk: an embedded database (redb) in the state
//! directory, one transaction per change, so a manager killed at any point
//! restarts with every change it acknowledged.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};

use crate::state::{Changes, Cluster, Component};

/// Component id → its record (JSON).
const COMPONENTS: TableDefinition<u64, &str> = TableDefinition::new("components");
/// vNode name → its record (JSON).
const VNODES: TableDefinition<&str, &str> = TableDefinition::new("vnodes");
/// (space, unit) → the memory daemons holding its replicas (JSON list).
const REPLICAS: TableDefinition<(u64, u64), &str> = TableDefinition::new("replicas");
/// (space, unit) → component id: one replica per unit, as a manager before
/// replication stored it (read once, then moved to `REPLICAS`).
const PLACEMENTS: TableDefinition<(u64, u64), u64> = TableDefinition::new("placements");

/// File name of the database in the state directory.
pub const DB_FILE: &str = "manager.redb";

pub struct Db {
    db: Database,
    path: std::path::PathBuf,
}

/// The record stored for vNode `name` (none: it is deleted): its own, or,
/// for [`crate::state::RETIRED_VIDS`], the highest retired vID and the
/// last vIP given.
pub fn vnode_record(cluster: &Cluster, name: &str) -> Option<crate::state::Vnode> {
    if name == crate::state::RETIRED_VIDS {
        return Some(crate::state::Vnode {
            vid: cluster.retired_vid,
            vip: cluster.last_vip,
            storage: 0,
            storage_quota: 0,
            owner: String::new(),
            peers: Default::default(),
        });
    }
    cluster.vnodes.get(name).cloned()
}

#[derive(Debug, thiserror::Error)]
#[error("state database {path}: {message}")]
pub struct DbError {
    path: String,
    message: String,
}

impl Db {
    /// Opens (or creates) the database in directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, DbError> {
        let path = dir.join(DB_FILE);
        let err = |message: String| DbError {
            path: path.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("cannot create the directory: {e}")))?;
        let db = Database::create(&path).map_err(|e| err(e.to_string()))?;
        // Both tables exist from the start, so reads never miss one.
        let tx = db.begin_write().map_err(|e| err(e.to_string()))?;
        tx.open_table(COMPONENTS).map_err(|e| err(e.to_string()))?;
        tx.open_table(PLACEMENTS).map_err(|e| err(e.to_string()))?;
        tx.open_table(REPLICAS).map_err(|e| err(e.to_string()))?;
        tx.open_table(VNODES).map_err(|e| err(e.to_string()))?;
        tx.commit().map_err(|e| err(e.to_string()))?;
        Ok(Self { db, path })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored cluster, rebuilt at time `now`.
    pub fn load(&self, timeout_ms: u64, now: u64) -> Result<Cluster, String> {
        let tx = self.db.begin_read().map_err(|e| e.to_string())?;
        let comps = tx.open_table(COMPONENTS).map_err(|e| e.to_string())?;
        let mut components = Vec::new();
        for row in comps.iter().map_err(|e| e.to_string())? {
            let (k, v) = row.map_err(|e| e.to_string())?;
            let c: Component = serde_json::from_str(v.value())
                .map_err(|e| format!("component {}: {e}", k.value()))?;
            components.push((k.value(), c));
        }
        let mut placements = std::collections::BTreeMap::new();
        let old = tx.open_table(PLACEMENTS).map_err(|e| e.to_string())?;
        for row in old.iter().map_err(|e| e.to_string())? {
            let (k, v) = row.map_err(|e| e.to_string())?;
            placements.insert(k.value(), vec![v.value()]);
        }
        let sets = tx.open_table(REPLICAS).map_err(|e| e.to_string())?;
        for row in sets.iter().map_err(|e| e.to_string())? {
            let (k, v) = row.map_err(|e| e.to_string())?;
            let ids: Vec<u64> = serde_json::from_str(v.value())
                .map_err(|e| format!("replicas of {:?}: {e}", k.value()))?;
            placements.insert(k.value(), ids);
        }
        let table = tx.open_table(VNODES).map_err(|e| e.to_string())?;
        let mut vnodes = Vec::new();
        for row in table.iter().map_err(|e| e.to_string())? {
            let (k, v) = row.map_err(|e| e.to_string())?;
            let vnode =
                serde_json::from_str(v.value()).map_err(|e| format!("vNode {}: {e}", k.value()))?;
            vnodes.push((k.value().to_string(), vnode));
        }
        Ok(Cluster::restore(
            timeout_ms, now, components, placements, vnodes,
        ))
    }

    /// Writes the records `changes` names, as they are in `cluster`.
    pub fn save(&self, cluster: &Cluster, changes: &Changes) -> Result<(), String> {
        if changes.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut comps = tx.open_table(COMPONENTS).map_err(|e| e.to_string())?;
            for id in &changes.components {
                match cluster.components.get(id) {
                    Some(c) => {
                        let json = serde_json::to_string(c).map_err(|e| e.to_string())?;
                        comps
                            .insert(*id, json.as_str())
                            .map_err(|e| e.to_string())?;
                    }
                    None => {
                        comps.remove(*id).map_err(|e| e.to_string())?;
                    }
                }
            }
            let mut vnodes = tx.open_table(VNODES).map_err(|e| e.to_string())?;
            for name in &changes.vnodes {
                match vnode_record(cluster, name) {
                    Some(v) => {
                        let json = serde_json::to_string(&v).map_err(|e| e.to_string())?;
                        vnodes
                            .insert(name.as_str(), json.as_str())
                            .map_err(|e| e.to_string())?;
                    }
                    None => {
                        vnodes.remove(name.as_str()).map_err(|e| e.to_string())?;
                    }
                }
            }
            let mut old = tx.open_table(PLACEMENTS).map_err(|e| e.to_string())?;
            let mut places = tx.open_table(REPLICAS).map_err(|e| e.to_string())?;
            for key in changes.placed.iter().chain(&changes.unplaced) {
                old.remove(*key).map_err(|e| e.to_string())?;
                match cluster.placements.get(key) {
                    Some(p) => {
                        let json = serde_json::to_string(&p.replicas).map_err(|e| e.to_string())?;
                        places
                            .insert(*key, json.as_str())
                            .map_err(|e| e.to_string())?;
                    }
                    None => {
                        places.remove(*key).map_err(|e| e.to_string())?;
                    }
                }
            }
        }
        tx.commit().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lego_protocol::control::{Kind, Reply, Request};

    #[test]
    fn the_cluster_survives_a_reopen() {
        let dir = std::env::temp_dir().join(format!("lego-db-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let db = Db::open(&dir).unwrap();
            let mut c = db.load(1000, 0).unwrap();
            let (r, ch) = c.apply(
                0,
                Request::Register {
                    kind: Kind::Memory,
                    addr: "10.0.0.2:7000".into(),
                    capacity_bytes: 64 << 20,
                    id: None,
                    key: String::new(),
                    zone: String::new(),
                },
            );
            assert!(matches!(r, Reply::Registered { id: 1, .. }));
            db.save(&c, &ch).unwrap();
            let (_, ch) = c.apply(
                1,
                Request::PlaceMemory {
                    space: 9,
                    unit: 2,
                    keep: vec![],
                    avoid: vec![],
                },
            );
            db.save(&c, &ch).unwrap();
            let (r, ch) = c.apply(
                2,
                Request::Register {
                    kind: Kind::Storage,
                    addr: "10.0.0.3:7300".into(),
                    capacity_bytes: 1 << 30,
                    id: None,
                    key: String::new(),
                    zone: String::new(),
                },
            );
            assert!(matches!(r, Reply::Registered { id: 2, .. }));
            db.save(&c, &ch).unwrap();
            let (r, ch) = c.apply(
                3,
                Request::CreateVnode {
                    name: "web".into(),
                    storage_quota: 1 << 20,
                    owner: "alice".into(),
                },
            );
            assert!(matches!(r, Reply::Vnode(_)), "{r:?}");
            db.save(&c, &ch).unwrap();
            // A second vNode, deleted: its vID is never given again.
            for req in [
                Request::CreateVnode {
                    name: "tmp".into(),
                    storage_quota: 1 << 20,
                    owner: String::new(),
                },
                Request::DeleteVnode { name: "tmp".into() },
            ] {
                let (r, ch) = c.apply(4, req);
                assert!(matches!(r, Reply::Vnode(_)), "{r:?}");
                db.save(&c, &ch).unwrap();
            }
        }
        let db = Db::open(&dir).unwrap();
        let c = db.load(1000, 5).unwrap();
        assert_eq!(c.components[&1].addr, "10.0.0.2:7000");
        assert_eq!(c.placements[&(9, 2)].replicas, [1]);
        let web = &c.vnodes["web"];
        assert_eq!((web.vid, web.storage, web.storage_quota), (1, 2, 1 << 20));
        assert_eq!(web.owner, "alice");
        assert_eq!(c.vnodes.len(), 1, "the retired vIDs are no vNode");
        let mut c = c;
        let (r, _) = c.apply(
            6,
            Request::CreateVnode {
                name: "new".into(),
                storage_quota: 1 << 20,
                owner: String::new(),
            },
        );
        match r {
            Reply::Vnode(v) => {
                assert_eq!(v.vid, 3, "not tmp's 2");
                assert_eq!(v.vip, "10.77.0.3", "not tmp's vIP: the last given is kept");
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
