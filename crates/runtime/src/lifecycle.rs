//! A runtime's life: [`init`] when the library loads (connect, register
//! the region, start the pager), and fork, which gives the child a runtime
//! of its own over a copy-on-write clone of the parent's space. exec needs
//! nothing: the new image loads the library again; exit needs nothing
//! either: the daemons free a space when its last connection closes.
//!
//! # fork
//! The prepare handler takes the region heap, the pager's state lock and
//! the internal heap (in that order), so the child inherits them
//! consistent and the parent's pager is frozen: no writeback can change
//! the parent's remote pages until the child has cloned the space at the
//! daemons. The child handler runs in the forking thread before anything
//! else of the program does: it uses only the internal heap and glibc state
//! that lives there, so nothing it does can fault (connects, the handshake,
//! the new userfaultfd, and `pthread_create` of the child's pager, whose
//! start-up reads glibc's locale and loader data).

use std::sync::atomic::{AtomicI32, AtomicPtr, Ordering::Relaxed};
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use lego_protocol::{Capability, Message, SpaceId, VirtAddr, PAGE_SIZE};
use lego_sys::mm;
use lego_sys::process::{self, die};
use lego_sys::stats::SharedStats;
use lego_sys::uffd::Uffd;

use crate::config::{Config, Tuning};
use crate::excache::ExCache;
use crate::heap::{self, RuntimeScope};
use crate::memory_calls::LayoutConn;
use crate::pager::Pager;
use crate::placement::{Placement, Placer};
use crate::pool::{self, Daemon, DaemonError, DaemonPool};
use crate::region::{self, Region};
use crate::runtime::{self, lock, Runtime, State};
use crate::spin::Keeper;

/// Where a runtime's address space comes from.
#[derive(Clone, Copy)]
enum Origin {
    /// A new program image.
    Fresh,
    /// A forked child: a copy-on-write clone of the parent's space.
    Fork {
        parent: SpaceId,
        parent_capability: Capability,
    },
}

/// A new capability for a space, from the kernel's random numbers.
fn fresh_capability() -> Capability {
    let mut c = [0u8; 16];
    getrandom::getrandom(&mut c)
        .unwrap_or_else(|e| die(&format!("runtime: no random numbers for the space: {e}")));
    Capability(c)
}

/// What a runtime is made of, besides its connections.
struct Parts {
    region: Region,
    home: String,
    /// The daemon keeping the layout's backup (a fork child's parent's),
    /// if any.
    backup: Option<String>,
    /// Every daemon's address, and whether to connect to it (a drained
    /// one keeps its index, unconnected).
    daemons: Vec<(String, bool)>,
    program: String,
    timeout: Duration,
    stats: Option<&'static SharedStats>,
    tuning: Tuning,
    inject_self_fault: bool,
    failover: Duration,
    pager: Pager,
    placement: Placement,
}

fn program_name() -> String {
    std::fs::read_link("/proc/self/exe")
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Connects to the memory daemons, registers the region and starts the
/// pager. Without `LEGO_MEMORY` in the environment the runtime stays off
/// and the program runs with its heap in ordinary local memory.
pub fn init() {
    let _scope = RuntimeScope::enter();
    heap::learn_system_code();
    let Some(cfg) = Config::from_env() else {
        return;
    };
    region::ensure();
    let region =
        region::get().unwrap_or_else(|| die("runtime: cannot reserve the disaggregated region"));
    let budget_pages = (cfg.excache_bytes / PAGE_SIZE).max(16);
    let mut cache = ExCache::with_policy(region.len / PAGE_SIZE, budget_pages, cfg.tuning.eviction);
    // Pages the program touched before the runtime connected are resident
    // and (for all we know) dirty.
    let used = heap::BOOTSTRAP_USED
        .load(Relaxed)
        .min(heap::BOOTSTRAP_BYTES);
    if let Ok(present) = mm::resident_pages(region.base, used / PAGE_SIZE) {
        for (i, p) in present.into_iter().enumerate() {
            if p {
                cache.installed(i, true);
            }
        }
    }
    let placement = match cfg.manager {
        Some((manager, ids)) => {
            if ids.len() != cfg.daemons.len() {
                die("runtime: LEGO_MEMORY_IDS must give one manager id per daemon of LEGO_MEMORY");
            }
            Placement::managed(region.len, manager, ids)
        }
        None => Placement::fixed(region.len, cfg.daemons.len(), cfg.replicas),
    };
    let parts = Parts {
        region,
        home: cfg.daemons[0].clone(),
        backup: None,
        daemons: cfg.daemons.into_iter().map(|a| (a, true)).collect(),
        program: program_name(),
        timeout: cfg.timeout,
        stats: cfg.stats,
        tuning: cfg.tuning,
        inject_self_fault: cfg.inject_self_fault,
        failover: cfg.failover,
        pager: Pager::new(region.base, region.len, cache, cfg.tuning.prefetch_pages)
            .with_tier(cfg.excache_bytes / 100 * cfg.tuning.tier_percent),
        placement,
    };
    start(parts, Origin::Fresh).unwrap_or_else(|e| die(&format!("{e}")));
    process::at_fork(before_fork, after_fork_parent, after_fork_child);
}

/// Opens the address space at the daemons, registers the region with a new
/// userfaultfd, publishes the runtime and starts its threads.
fn start(mut p: Parts, origin: Origin) -> Result<(), DaemonError> {
    let uffd = Uffd::open(true).unwrap_or_else(|e| die(&format!("runtime: {e}")));
    // The space's secret: only this process's connections present it.
    let capability = fresh_capability();
    let open = match origin {
        Origin::Fresh => Message::OpenSpace {
            pid: std::process::id(),
            program: &p.program,
            region_base: VirtAddr(p.region.base as u64),
            region_bytes: p.region.len as u64,
            bootstrap_bytes: heap::BOOTSTRAP_BYTES as u64,
            capability,
        },
        Origin::Fork {
            parent,
            parent_capability,
        } => Message::ForkSpace {
            parent,
            parent_capability,
            child: SpaceId(0),
            child_capability: capability,
        },
    };
    // A forked child whose parent's home just failed clones the space at
    // the layout's backup.
    let (layout, space) = match open_at(&p.home, &p.program, p.timeout, &open) {
        Ok(opened) => opened,
        Err(e) => match (origin, p.backup.take()) {
            (Origin::Fork { .. }, Some(backup)) if e.is_loss() => {
                let opened = open_at(&backup, &p.program, p.timeout, &open)?;
                p.home = backup;
                opened
            }
            _ => return Err(e),
        },
    };
    let attach = Message::AttachSpace {
        space,
        capability,
        region_base: VirtAddr(p.region.base as u64),
        region_bytes: p.region.len as u64,
    };
    let mut daemons = Vec::with_capacity(p.daemons.len());
    let mut placement = p.placement;
    for (d, (addr, connect_to)) in p.daemons.into_iter().enumerate() {
        if !connect_to {
            daemons.push(Daemon { addr, conn: None });
            continue;
        }
        let msg = match origin {
            Origin::Fork {
                parent,
                parent_capability,
            } if addr != p.home => Message::ForkSpace {
                parent,
                parent_capability,
                child: space,
                child_capability: capability,
            },
            _ => attach.clone(),
        };
        let conn = pool::connect(&addr, &p.program, p.timeout)
            .and_then(|mut c| pool::space_call(&mut c, &addr, &msg).map(|_| c));
        match conn {
            Ok(conn) => daemons.push(Daemon {
                addr,
                conn: Some(conn),
            }),
            // A forked child goes on without a daemon that failed as it
            // was born, if the others hold its units.
            Err(e) if e.is_loss() && matches!(origin, Origin::Fork { .. }) => {
                let lost = placement.lose(d);
                if !lost.is_empty() {
                    return Err(DaemonError::Lost {
                        cause: Box::new(e),
                        units: lost.len(),
                    });
                }
                process::warn(&format!(
                    "{e}; its units are served by their other replicas"
                ));
                daemons.push(Daemon { addr, conn: None });
            }
            Err(e) => return Err(e),
        }
    }
    // The pool's index of the layout's home (which forgets the pages of a
    // range it unmaps by itself). A fork child whose parent's pool gave the
    // home up holds no replicas there: no index (nothing is skipped).
    let home = daemons
        .iter()
        .position(|d| d.conn.is_some() && d.addr == p.home)
        .unwrap_or(usize::MAX);
    // The layout's backup: the parent's daemon for it if there is one,
    // else the first other daemon.
    let mut layout = LayoutConn {
        conn: layout,
        addr: p.home,
        next_id: 1,
        backup: None,
        failover: p.failover,
    };
    let backup = p
        .backup
        .filter(|b| daemons.iter().any(|d| d.conn.is_some() && d.addr == *b))
        .or_else(|| {
            daemons
                .iter()
                .find(|d| d.conn.is_some() && d.addr != layout.addr)
                .map(|d| d.addr.clone())
        });
    if let Some(addr) = backup {
        let conn = pool::connect(&addr, &p.program, p.timeout)
            .and_then(|mut c| pool::space_call(&mut c, &addr, &attach).map(|_| c));
        let made = conn.and_then(|c| layout.set_backup(addr.clone(), c));
        if let Err(e) = made {
            // The repair thread tries again.
            process::warn(&format!("no backup of the layout at {addr} yet: {e}"));
        }
    }
    uffd.register(p.region.base, p.region.len)
        .unwrap_or_else(|e| die(&format!("runtime: {e}")));
    // With a manager, units are placed by a thread of their own.
    let placer = placement
        .manager()
        .map(|m| Arc::new(Placer::new(m.to_string(), placement.ids().to_vec())));
    let manager = placement.manager().map(str::to_string);
    let pool = DaemonPool::new(
        daemons,
        placement,
        home,
        (space, capability),
        (p.region.base, p.region.len),
        p.program.clone(),
        p.timeout,
        (p.tuning.poll_us, p.failover),
        placer.clone(),
    );
    let rt = runtime::publish(Box::new(Runtime {
        region: p.region,
        uffd,
        pidfd: mm::own_pidfd(),
        state: std::sync::Mutex::new(State {
            pager: p.pager,
            pool,
        }),
        layout: std::sync::Mutex::new(layout),
        space,
        capability,
        program: p.program,
        timeout: p.timeout,
        stats: p.stats,
        tuning: p.tuning,
        inject_self_fault: p.inject_self_fault,
        failover: p.failover,
        pid: std::process::id(),
        keeper: Keeper::new(Duration::from_micros(p.tuning.spin_us)),
    }));
    if let Some(s) = rt.stats {
        s.processes.fetch_add(1, Relaxed);
        s.record_space(rt.pid, space.0);
    }
    process::spawn_thread(heap::mark_runtime_thread, move || rt.pager_loop())
        .unwrap_or_else(|e| die(&format!("runtime: cannot start the pager thread: {e}")));
    for _ in 0..rt.keeper.threads() {
        process::spawn_thread(heap::mark_runtime_thread, move || rt.keeper.keep_awake())
            .unwrap_or_else(|e| die(&format!("runtime: cannot start a keeper thread: {e}")));
    }
    if let Some(placer) = placer {
        let attach = move |addr: &str| rt.attach(addr).map_err(|e| e.to_string());
        process::spawn_thread(heap::mark_runtime_thread, move || {
            process::set_thread_name(process::PLACER_THREAD_NAME);
            placer.run(space.0, rt.timeout, attach)
        })
        .unwrap_or_else(|e| die(&format!("runtime: cannot start the placer thread: {e}")));
    }
    // With one daemon and no manager (the embedded default) there is
    // nothing to repair: no thread, and none of its memory in every process.
    let daemons = lock(&rt.state).pool.daemons.len();
    if manager.is_some() || daemons > 1 {
        process::spawn_thread(heap::mark_runtime_thread, move || {
            process::set_thread_name(process::REPAIR_THREAD_NAME);
            rt.repair_loop(manager)
        })
        .unwrap_or_else(|e| die(&format!("runtime: cannot start the repair thread: {e}")));
    }
    Ok(())
}

/// Connects to the daemon at `addr` and opens (or forks) the space there
/// with `open`: the connection, and the space.
fn open_at(
    addr: &str,
    program: &str,
    timeout: Duration,
    open: &Message<'_>,
) -> Result<(lego_transport::FramedConn<std::net::TcpStream>, SpaceId), DaemonError> {
    let mut conn = pool::connect(addr, program, timeout)?;
    let space =
        pool::space_call(&mut conn, addr, open)?.ok_or_else(|| DaemonError::Unexpected {
            addr: addr.to_string(),
            request: open.name(),
            reply: "Done (no address space was opened)".into(),
        })?;
    Ok((conn, space))
}

/// The state and layout locks held across fork (boxed guards; a
/// thread-local would allocate from the locked region heap on first use).
struct ForkGuards {
    state: MutexGuard<'static, State>,
    layout: MutexGuard<'static, LayoutConn>,
}

static FORK_GUARD: AtomicPtr<ForkGuards> = AtomicPtr::new(std::ptr::null_mut());
static FORK_PIPE: [AtomicI32; 2] = [AtomicI32::new(-1), AtomicI32::new(-1)];

extern "C" fn before_fork() {
    heap::prepare_fork_region();
    if let Some(rt) = runtime::get() {
        let _scope = RuntimeScope::enter();
        let state = lock(&rt.state);
        let guard = Box::new(ForkGuards {
            state,
            layout: lock(&rt.layout),
        });
        FORK_GUARD.store(Box::into_raw(guard), Relaxed);
        if let Ok((r, w)) = process::pipe() {
            FORK_PIPE[0].store(r, Relaxed);
            FORK_PIPE[1].store(w, Relaxed);
        }
    }
    heap::prepare_fork_internal();
}

/// The pipe `before_fork` opened (read end, write end), if any; -1s if not.
fn take_fork_pipe() -> (i32, i32) {
    (
        FORK_PIPE[0].swap(-1, Relaxed),
        FORK_PIPE[1].swap(-1, Relaxed),
    )
}

extern "C" fn after_fork_parent() {
    heap::finish_fork_internal();
    let (r, w) = take_fork_pipe();
    if r >= 0 {
        // Wait until the child has cloned our space (or died trying).
        process::close(w);
        process::wait_readable_or_eof(r);
        process::close(r);
    }
    let guard = FORK_GUARD.swap(std::ptr::null_mut(), Relaxed);
    if !guard.is_null() {
        // SAFETY: set by before_fork from Box::into_raw, taken once.
        drop(unsafe { Box::from_raw(guard) });
    }
    heap::finish_fork_region();
}

extern "C" fn after_fork_child() {
    heap::finish_fork_internal();
    heap::finish_fork_region();
    let Some(parent) = runtime::get() else {
        return;
    };
    let _scope = RuntimeScope::enter();
    runtime::unpublish();
    let guard = FORK_GUARD.swap(std::ptr::null_mut(), Relaxed);
    if guard.is_null() {
        die("runtime: fork handlers out of order");
    }
    // SAFETY: set by before_fork from Box::into_raw (copied into this child
    // by fork), taken once.
    let mut guard = unsafe { Box::from_raw(guard) };
    let st = &mut *guard.state;
    let mut pager = std::mem::replace(&mut st.pager, Pager::new(0, 0, ExCache::new(0, 1), 0));
    let placement = std::mem::replace(&mut st.pool.placement, Placement::fixed(0, 1, 1));
    let daemons: Vec<(String, bool)> = st
        .pool
        .daemons
        .iter()
        .map(|d| (d.addr.clone(), d.conn.is_some()))
        .collect();
    let home = guard.layout.addr.clone();
    let backup = guard.layout.backup.as_ref().map(|b| b.0.clone());
    // The parent's connections, userfaultfd and pidfd are the parent's.
    let mut fds = guard.state.pool.fds();
    fds.extend(guard.layout.fds());
    fds.extend([parent.uffd.as_raw_fd(), parent.pidfd]);
    // And the helper threads' connections outside the pool.
    fds.extend(crate::side::take_listed());
    drop(guard);
    for fd in fds {
        process::close(fd);
    }
    // fork cleared the write protection of clean pages.
    pager.after_fork();
    let parts = Parts {
        region: parent.region,
        home,
        backup,
        daemons,
        program: parent.program.clone(),
        timeout: parent.timeout,
        stats: parent.stats,
        tuning: parent.tuning,
        inject_self_fault: false,
        failover: parent.failover,
        pager,
        placement,
    };
    let origin = Origin::Fork {
        parent: parent.space,
        parent_capability: parent.capability,
    };
    start(parts, origin).unwrap_or_else(|e| die(&format!("{e}")));
    let (r, w) = take_fork_pipe();
    if w >= 0 {
        process::signal_pipe(w);
        process::close(w);
        process::close(r);
    }
}
