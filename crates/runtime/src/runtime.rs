//! The runtime of one process: its connections to memory daemons, the
//! ExCache, and the pager thread that serves userfaultfd faults.
//!
//! # Miss path (pager thread)
//! fault event → page not resident → make room (evict a batch if the budget
//! is full) → page remote? fetch it with `ReadPages` : use the zero page →
//! `UFFDIO_COPY` (write-protected unless the fault was a write) → resume.
//!
//! # Eviction
//! take the oldest resident pages → write-protect the dirty ones (writers
//! now block in a write-protect fault) → copy them and send one
//! `WritePages` per daemon → wait for every ack → drop all victims with one
//! `process_madvise(MADV_DONTNEED)` → blocked writers are served as misses.
//! Clean pages are write-protected from the moment they are installed, so
//! dropping them needs no writeback and cannot lose a write.
//!
//! # Locks
//! `shared` (cache and page connections) is taken before `control` (layout
//! connection), never the other way round.
//!
//! # The pager never touches program memory
//! Anything the pager thread reads must live on the runtime's own heap or
//! stack: a read of region memory that is not resident faults to the pager
//! itself and deadlocks. That includes the environment (`getenv` reads
//! `environ`, which the program may have reallocated into the region):
//! settings are read once, at start.

use std::net::TcpStream;
use std::sync::atomic::{AtomicI32, AtomicPtr, Ordering, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lego_protocol::control::{Reply, Request, PLACEMENT_BYTES};
use lego_protocol::{ErrorCode, Message, Role, SpaceId, VirtAddr, MAX_BATCH_PAGES, PAGE_SIZE};
use lego_sys::process::die;
use lego_sys::stats::SharedStats;
use lego_sys::uffd::{Fault, Uffd};
use lego_sys::{mm, process};
use lego_transport::{ConnError, ControlClient, FramedConn, Stream, Tcp, Transport};

use crate::config::{Tuning, MAX_PREFETCH_PAGES};
use crate::excache::{ExCache, Victim};
use crate::heap::{self, RuntimeCall, RuntimeScope};
use crate::placement::Placement;
use crate::prefetch::Prefetcher;
use crate::region::{self, Region};
use crate::{config::Config, coverage};

/// How often a program's runtime asks the global manager which memory
/// daemons are draining.
const DRAIN_POLL: Duration = Duration::from_millis(200);

/// The longest gap [`Runtime::spans`] bridges, in pages.
const BRIDGE_PAGES: usize = 64;

/// A memory daemon this program uses. Its index in `Shared::daemons` is
/// what the placement table records, so a drained daemon keeps its place
/// with its connection closed (`None`): no unit is placed on it any more.
struct Daemon {
    addr: String,
    conn: Option<FramedConn<TcpStream>>,
}

impl Daemon {
    /// Polls the connection for data or hang-up.
    fn pollfd(&self) -> Option<libc::pollfd> {
        Some(libc::pollfd {
            fd: self.conn.as_ref()?.stream().raw_fd().unwrap_or(-1),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        })
    }
}

/// The open connection of a daemon that holds a placed unit (a drained
/// one, closed, holds none).
fn live<'a>(
    conn: &'a mut Option<FramedConn<TcpStream>>,
    addr: &str,
) -> &'a mut FramedConn<TcpStream> {
    conn.as_mut().unwrap_or_else(|| {
        die(&format!(
            "runtime: memory daemon {addr} was drained, yet a page placed on it was asked for"
        ))
    })
}

struct Shared {
    cache: ExCache,
    daemons: Vec<Daemon>,
    /// Bumped whenever a daemon connection opens or closes (the pager
    /// polls them all).
    daemons_changed: u64,
    /// The daemon holding the space's layout (the control connection's).
    home: usize,
    /// The control connection's descriptor, for a fork child to close.
    control_fd: i32,
    placement: Placement,
    next_id: u64,
    victims: Vec<Victim>,
    wb_addrs: Vec<Vec<VirtAddr>>,
    wb_data: Vec<Vec<u8>>,
    ranges: Vec<(usize, usize)>,
    /// Scratch list of page indices for `spans`.
    span_pages: Vec<usize>,
    /// Pages evicted per batch.
    batch: usize,
    prefetch: Prefetcher,
    /// Scratch lists of one miss: pages to fetch, pages to zero-fill.
    fetch: Vec<usize>,
    fill: Vec<usize>,
    fetch_addrs: Vec<VirtAddr>,
    /// Dirty victims of the current batch found holding what they were
    /// installed with (not written back): all zeros and never stored, or
    /// their fetched contents.
    clean_victims: Vec<usize>,
}

struct Control {
    conn: FramedConn<TcpStream>,
    /// The home daemon's address.
    addr: String,
    next_id: u64,
}

/// Where a runtime's address space comes from.
#[derive(Clone, Copy)]
enum Origin {
    /// A new program image.
    Fresh,
    /// A forked child: a copy-on-write clone of the parent's space.
    Fork { parent: SpaceId },
}

/// The process's runtime, created by [`init`] (and again in a forked child).
pub struct Runtime {
    pub region: Region,
    uffd: Uffd,
    shared: Mutex<Shared>,
    control: Mutex<Control>,
    space: SpaceId,
    program: String,
    timeout: Duration,
    stats: Option<&'static SharedStats>,
    tuning: Tuning,
    pid: u32,
    pidfd: i32,
    /// Descriptors a forked child must close besides the daemon and
    /// control connections (userfaultfd, pidfd).
    fds: Vec<i32>,
    /// Zeros to install from: a fault page and a full prefetch window.
    zero: Box<[u8]>,
}

static RUNTIME: AtomicPtr<Runtime> = AtomicPtr::new(std::ptr::null_mut());

/// The runtime, once connected.
pub fn get() -> Option<&'static Runtime> {
    let p = RUNTIME.load(Ordering::Acquire);
    if p.is_null() {
        return None;
    }
    // SAFETY: RUNTIME only ever holds leaked Boxes, never freed.
    Some(unsafe { &*p })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A layout call was refused: the errno the program sees.
pub struct Errno(pub i32);

fn page_align_up(v: usize) -> usize {
    v.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

fn connect(addr: &str, program: &str, timeout: Duration) -> FramedConn<TcpStream> {
    let s = Tcp
        .connect(addr, Duration::from_secs(5))
        .unwrap_or_else(|e| die(&format!("runtime: {e}")));
    let _ = s.set_read_timeout(Some(timeout));
    let mut c = FramedConn::new(s);
    match c.client_handshake(Role::Runtime, program) {
        Ok(_) => c,
        Err(ConnError::Refused(r)) => {
            die(&format!("memory daemon {addr} refused the handshake: {r}"))
        }
        Err(e) => die(&format!("memory daemon {addr}: handshake failed: {e}")),
    }
}

/// Sends a request that must be answered with `SpaceOpened` or `Done`.
fn space_call(c: &mut FramedConn<TcpStream>, addr: &str, msg: &Message<'_>) -> Option<SpaceId> {
    match c.call(1, msg) {
        Ok(f) => match f.message {
            Message::SpaceOpened { space } => Some(space),
            Message::Done => None,
            other => die(&format!(
                "memory daemon {addr}: cannot set up the address space: {other:?}"
            )),
        },
        Err(e) => die(&format!("memory daemon {addr}: {e}")),
    }
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
        None => Placement::fixed(region.len, cfg.daemons.len()),
    };
    let home = cfg.daemons[0].clone();
    start(
        region,
        home,
        cfg.daemons.into_iter().map(|a| (a, true)).collect(),
        program_name(),
        cfg.timeout,
        cfg.stats,
        cfg.tuning,
        cache,
        placement,
        Origin::Fresh,
    );
    process::at_fork(before_fork, after_fork_parent, after_fork_child);
}

/// Opens the address space at the daemons, registers the region with a new
/// userfaultfd, publishes the runtime and starts its pager.
// Everything a runtime is made of, passed once by `init` and once by the
// fork child; a struct for them would only be unpacked again here.
#[allow(clippy::too_many_arguments)]
fn start(
    region: Region,
    home: String,
    daemon_addrs: Vec<(String, bool)>,
    program: String,
    timeout: Duration,
    stats: Option<&'static SharedStats>,
    tuning: Tuning,
    cache: ExCache,
    placement: Placement,
    origin: Origin,
) {
    let uffd = Uffd::open(true).unwrap_or_else(|e| die(&format!("runtime: {e}")));
    let mut control = connect(&home, &program, timeout);
    let open = match origin {
        Origin::Fresh => Message::OpenSpace {
            pid: std::process::id(),
            program: &program,
            region_base: VirtAddr(region.base as u64),
            region_bytes: region.len as u64,
            bootstrap_bytes: heap::BOOTSTRAP_BYTES as u64,
        },
        Origin::Fork { parent } => Message::ForkSpace {
            parent,
            child: SpaceId(0),
        },
    };
    let space = space_call(&mut control, &home, &open).unwrap_or_else(|| {
        die(&format!(
            "memory daemon {home}: no address space was opened"
        ))
    });
    let attach = Message::AttachSpace {
        space,
        region_base: VirtAddr(region.base as u64),
        region_bytes: region.len as u64,
    };
    // A drained daemon (not to connect to) keeps its index, unconnected.
    let daemons: Vec<Daemon> = daemon_addrs
        .into_iter()
        .map(|(addr, connect_to)| {
            if !connect_to {
                return Daemon { addr, conn: None };
            }
            let mut conn = connect(&addr, &program, timeout);
            let msg = match origin {
                Origin::Fork { parent } if addr != home => Message::ForkSpace {
                    parent,
                    child: space,
                },
                _ => attach.clone(),
            };
            space_call(&mut conn, &addr, &msg);
            Daemon {
                addr,
                conn: Some(conn),
            }
        })
        .collect();
    let home_index = daemons
        .iter()
        .position(|d| d.conn.is_some() && d.addr == home)
        .unwrap_or_else(|| die("runtime: the home memory daemon is not among the daemons"));
    uffd.register(region.base, region.len)
        .unwrap_or_else(|e| die(&format!("runtime: {e}")));

    let n = daemons.len();
    let budget_pages = cache.budget();
    // The daemon connections' descriptors are found in `Shared` at fork
    // (their list grows while the program runs).
    let control_fd = control.stream().raw_fd().unwrap_or(-1);
    let mut fds = vec![uffd.as_raw_fd()];
    let pidfd = mm::own_pidfd();
    fds.push(pidfd);
    let rt = Box::new(Runtime {
        region,
        uffd,
        shared: Mutex::new(Shared {
            cache,
            daemons,
            daemons_changed: 0,
            home: home_index,
            control_fd,
            placement,
            next_id: 1,
            victims: Vec::new(),
            wb_addrs: vec![Vec::new(); n],
            wb_data: vec![Vec::new(); n],
            ranges: Vec::new(),
            span_pages: Vec::new(),
            batch: (budget_pages / 16).clamp(8, 256),
            prefetch: Prefetcher::new(tuning.prefetch_pages),
            fetch: Vec::with_capacity(MAX_PREFETCH_PAGES + 1),
            fill: Vec::with_capacity(MAX_PREFETCH_PAGES + 1),
            fetch_addrs: Vec::with_capacity(MAX_PREFETCH_PAGES + 1),
            clean_victims: Vec::new(),
        }),
        control: Mutex::new(Control {
            conn: control,
            addr: home,
            next_id: 2,
        }),
        space,
        program,
        timeout,
        stats,
        tuning,
        pid: std::process::id(),
        pidfd,
        fds,
        zero: vec![0; (MAX_PREFETCH_PAGES + 1) * PAGE_SIZE].into_boxed_slice(),
    });
    if let Some(s) = rt.stats {
        s.processes.fetch_add(1, Relaxed);
    }
    let rt: &'static Runtime = Box::leak(rt);
    RUNTIME.store(rt as *const Runtime as *mut Runtime, Ordering::Release);
    process::spawn_thread(heap::mark_runtime_thread, move || rt.pager_loop())
        .unwrap_or_else(|e| die(&format!("runtime: cannot start the pager thread: {e}")));
    if let Some(manager) = lock(&rt.shared).placement.manager().map(str::to_string) {
        process::spawn_thread(heap::mark_runtime_thread, move || rt.drain_loop(manager))
            .unwrap_or_else(|e| die(&format!("runtime: cannot start the drain thread: {e}")));
    }
}

// fork: the prepare handler freezes the pager (no writeback can change the
// parent's remote pages) until the child has cloned the parent's space at
// the daemons; the child then runs its own runtime on the clone.

/// The ExCache lock held across fork (a boxed guard; a thread-local would
/// allocate from the locked region heap on first use).
static FORK_GUARD: AtomicPtr<MutexGuard<'static, Shared>> = AtomicPtr::new(std::ptr::null_mut());
static FORK_PIPE: [AtomicI32; 2] = [AtomicI32::new(-1), AtomicI32::new(-1)];

extern "C" fn before_fork() {
    heap::prepare_fork_region();
    if let Some(rt) = get() {
        let _scope = RuntimeScope::enter();
        let guard = Box::new(lock(&rt.shared));
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
    let Some(parent) = get() else {
        return;
    };
    let _scope = RuntimeScope::enter();
    RUNTIME.store(std::ptr::null_mut(), Ordering::Release);
    let guard = FORK_GUARD.swap(std::ptr::null_mut(), Relaxed);
    if guard.is_null() {
        die("runtime: fork handlers out of order");
    }
    // SAFETY: set by before_fork from Box::into_raw (copied into this child
    // by fork), taken once.
    let mut guard = unsafe { Box::from_raw(guard) };
    let mut cache = std::mem::replace(&mut guard.cache, ExCache::new(0, 1));
    let mut placement = std::mem::replace(&mut guard.placement, Placement::fixed(0, 1));
    let daemon_addrs: Vec<(String, bool)> = guard
        .daemons
        .iter()
        .map(|d| (d.addr.clone(), d.conn.is_some()))
        .collect();
    let mut daemon_fds: Vec<i32> = guard
        .daemons
        .iter()
        .filter_map(|d| d.conn.as_ref()?.stream().raw_fd())
        .collect();
    daemon_fds.push(guard.control_fd);
    let home = guard.daemons[guard.home].addr.clone();
    drop(guard);
    placement.after_fork();
    // fork cleared the write protection of clean pages: treat every
    // resident page as dirty.
    cache.mark_resident_dirty();
    // The parent's connections, userfaultfd and pidfd are the parent's.
    for &fd in daemon_fds.iter().chain(&parent.fds) {
        process::close(fd);
    }
    start(
        parent.region,
        home,
        daemon_addrs,
        parent.program.clone(),
        parent.timeout,
        parent.stats,
        parent.tuning,
        cache,
        placement,
        Origin::Fork {
            parent: parent.space,
        },
    );
    let (r, w) = take_fork_pipe();
    if w >= 0 {
        process::signal_pipe(w);
        process::close(w);
        process::close(r);
    }
}

impl Runtime {
    fn page_index(&self, addr: usize) -> usize {
        (addr - self.region.base) / PAGE_SIZE
    }

    fn page_addr(&self, index: usize) -> usize {
        self.region.base + index * PAGE_SIZE
    }

    /// The daemon holding `addr`, a page some daemon holds (a remote page
    /// is always in a placed unit).
    fn daemon_of(&self, g: &Shared, addr: usize) -> usize {
        g.placement
            .placed(addr - self.region.base)
            .unwrap_or_else(|| {
                die(&format!(
                    "runtime: page {addr:#x} is remote but its memory was never placed"
                ))
            })
    }

    /// The daemon that stores `addr` (placing its unit now if needed, and
    /// connecting to the daemon the manager picks if it is a new one).
    fn daemon_for(&self, g: &mut Shared, addr: usize) -> usize {
        self.try_daemon_for(g, addr)
            .unwrap_or_else(|e| die(&format!("runtime: {e}; stopping the program")))
    }

    /// [`Runtime::daemon_for`], with the manager's refusal (or absence) as
    /// an error.
    fn try_daemon_for(&self, g: &mut Shared, addr: usize) -> Result<usize, String> {
        let off = addr - self.region.base;
        let (id, daemon_addr) = match g.placement.place(off, self.space.0, self.timeout)? {
            Ok(d) if g.daemons[d].conn.is_some() => return Ok(d),
            // A daemon this program drained, placed on again (its drain
            // was cancelled): attached anew.
            Ok(d) => {
                g.daemons[d].conn = Some(self.attach(&g.daemons[d].addr));
                g.daemons_changed += 1;
                return Ok(d);
            }
            Err(new) => new,
        };
        let conn = self.attach(&daemon_addr);
        let d = g.daemons.len();
        g.placement.bind(off, id, d)?;
        g.daemons.push(Daemon {
            addr: daemon_addr,
            conn: Some(conn),
        });
        g.daemons_changed += 1;
        g.wb_addrs.push(Vec::new());
        g.wb_data.push(Vec::new());
        Ok(d)
    }

    /// A new connection to the daemon at `addr`, bound to this space.
    fn attach(&self, addr: &str) -> FramedConn<TcpStream> {
        let mut conn = connect(addr, &self.program, self.timeout);
        space_call(
            &mut conn,
            addr,
            &Message::AttachSpace {
                space: self.space,
                region_base: VirtAddr(self.region.base as u64),
                region_bytes: self.region.len as u64,
            },
        );
        conn
    }

    /// The drain thread of a program whose memory a global manager
    /// places: a few times a second it asks which memory daemons are
    /// draining, and moves this program's units off those it uses (see
    /// [`Runtime::drain_daemon`]). The manager being away only delays it.
    fn drain_loop(&'static self, manager: String) -> ! {
        let _scope = RuntimeScope::enter();
        let mut client: Option<ControlClient> = None;
        let mut failing: Option<String> = None;
        loop {
            std::thread::sleep(DRAIN_POLL);
            if client.is_none() {
                client = ControlClient::connect(&manager, "lego-runtime", DRAIN_POLL * 5).ok();
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
                let g = lock(&self.shared);
                ids.iter()
                    .filter_map(|&id| g.placement.index_of(id))
                    .filter(|&d| g.daemons[d].conn.is_some())
                    .collect()
            };
            for d in drained {
                match self.drain_daemon(d) {
                    Ok(()) => failing = None,
                    // Said once per reason; tried again at the next poll.
                    Err(e) if failing.as_ref() != Some(&e) => {
                        process::warn(&format!(
                            "cannot move memory off a draining daemon yet: {e}"
                        ));
                        failing = Some(e);
                    }
                    Err(_) => {}
                }
            }
        }
    }

    /// Moves every unit of this program on daemon `d` to a daemon the
    /// manager places it on now, one unit per hold of the lock so the
    /// program's faults are served in between; then, if `d` is the home,
    /// moves the layout too; then closes the connections to `d`, which
    /// frees the space there.
    fn drain_daemon(&self, d: usize) -> Result<(), String> {
        loop {
            let mut g = lock(&self.shared);
            if let Some(off) = g.placement.first_on(d) {
                self.move_unit(&mut g, d, off)?;
                continue;
            }
            // Still under the lock that found no unit on `d`: none can be
            // placed there before its connection closes.
            if g.home == d {
                self.move_home(&mut g)?;
            }
            // The last reference to the space at `d`: it frees it.
            g.daemons[d].conn = None;
            g.daemons_changed += 1;
            return Ok(());
        }
    }

    /// Moves the unit at region offset `off` from daemon `d`: placed anew
    /// by the manager, its pages `d` holds are copied to the new daemon,
    /// then forgotten at `d`. Until the copy is complete the unit stays on
    /// `d`; the lock is held throughout, so no writeback or fetch of the
    /// program sees it half moved.
    fn move_unit(&self, g: &mut Shared, d: usize, off: usize) -> Result<(), String> {
        let unit = PLACEMENT_BYTES as usize;
        let base = self.region.base + off / unit * unit;
        g.placement.unplace(off);
        let t = match self.try_daemon_for(g, base) {
            Ok(t) if t != d => t,
            Ok(_) => return Err("the manager placed the unit on the draining daemon again".into()),
            Err(e) => {
                g.placement.set(off, d);
                return Err(e);
            }
        };
        let first = self.page_index(base);
        let end = (first + unit / PAGE_SIZE).min(self.region.len / PAGE_SIZE);
        let pages: Vec<VirtAddr> = (first..end)
            .filter(|&i| g.cache.is_remote(i))
            .map(|i| VirtAddr(self.page_addr(i) as u64))
            .collect();
        for chunk in pages.chunks(MAX_BATCH_PAGES) {
            if let Err(e) = self.copy_pages(g, d, t, chunk) {
                g.placement.set(off, d);
                return Err(e);
            }
        }
        let id = g.next_id;
        g.next_id += 1;
        let Daemon { addr, conn } = &mut g.daemons[d];
        let discard = Message::Discard {
            addr: VirtAddr(base as u64),
            len: unit.min(self.region.base + self.region.len - base) as u64,
        };
        match live(conn, addr).call(id, &discard) {
            Ok(f) if f.message == Message::Done => {}
            Ok(f) => die(&format!(
                "memory daemon {addr}: discard failed: {:?}",
                f.message
            )),
            Err(e) => self.daemon_failed(addr, e),
        }
        if let Some(s) = self.stats {
            s.migrated_pages.fetch_add(pages.len() as u64, Relaxed);
        }
        Ok(())
    }

    /// Reads `addrs` from daemon `from` and stores them at daemon `to`.
    fn copy_pages(
        &self,
        g: &mut Shared,
        from: usize,
        to: usize,
        addrs: &[VirtAddr],
    ) -> Result<(), String> {
        let (rid, wid) = (g.next_id, g.next_id + 1);
        g.next_id += 2;
        let [src, dst] = g
            .daemons
            .get_disjoint_mut([from, to])
            .map_err(|_| "a unit cannot move to the daemon it is on".to_string())?;
        let data = match live(&mut src.conn, &src.addr).call(
            rid,
            &Message::ReadPages {
                addrs: addrs.into(),
            },
        ) {
            Ok(f) => match f.message {
                Message::Pages { data } if data.len() == addrs.len() * PAGE_SIZE => data,
                other => die(&format!(
                    "memory daemon {} answered a page read with {other:?}",
                    src.addr
                )),
            },
            Err(e) => self.daemon_failed(&src.addr, e),
        };
        match live(&mut dst.conn, &dst.addr).call(
            wid,
            &Message::WritePages {
                addrs: addrs.into(),
                data,
            },
        ) {
            Ok(f) if f.message == Message::Done => Ok(()),
            Ok(f) => Err(format!(
                "memory daemon {} refused the moved pages: {:?}",
                dst.addr, f.message
            )),
            Err(e) => self.daemon_failed(&dst.addr, e),
        }
    }

    /// Makes another daemon the home of this space: the one holding the
    /// region's first unit (placed now if need be), given the layout the
    /// old home had. The control connection moves there. The unit is not
    /// placed anew: if it sits on another draining daemon, the manager
    /// would move it without its pages; the home follows it there and
    /// moves again when that daemon is drained.
    fn move_home(&self, g: &mut Shared) -> Result<(), String> {
        let old = g.home;
        let h = match self.try_daemon_for(g, self.region.base) {
            Ok(h) if h != old => h,
            Ok(_) => return Err("the manager placed the home on the draining daemon".into()),
            Err(e) => return Err(e),
        };
        let mut c = lock(&self.control);
        let id = c.next_id;
        c.next_id += 1;
        let Control { conn, addr, .. } = &mut *c;
        let layout = match conn.call(id, &Message::GetLayout) {
            Ok(f) => match f.message {
                layout @ Message::Layout { .. } => layout,
                other => die(&format!(
                    "memory daemon {addr} answered a layout request with {other:?}"
                )),
            },
            Err(e) => self.daemon_failed(addr, e),
        };
        let new_addr = g.daemons[h].addr.clone();
        let mut new = self.attach(&new_addr);
        space_call(&mut new, &new_addr, &layout);
        g.control_fd = new.stream().raw_fd().unwrap_or(-1);
        c.conn = new;
        c.addr = new_addr;
        g.home = h;
        Ok(())
    }

    fn pager_loop(&'static self) -> ! {
        let _scope = RuntimeScope::enter();
        let mut faults: Vec<Fault> = Vec::with_capacity(16);
        let mut fds: Vec<libc::pollfd> = vec![libc::pollfd {
            fd: self.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let mut polled = None;
        let mut last_sample = Instant::now();
        loop {
            // The daemons this program uses (more join while it runs,
            // drained ones are closed).
            {
                let g = lock(&self.shared);
                if polled != Some(g.daemons_changed) {
                    fds.truncate(1);
                    fds.extend(g.daemons.iter().filter_map(Daemon::pollfd));
                    polled = Some(g.daemons_changed);
                }
            }
            let _ = process::poll(&mut fds, 500);
            if fds[1..].iter().any(|f| f.revents != 0) {
                self.check_daemons();
            }
            if fds[0].revents != 0 {
                match self.uffd.read_faults(&mut faults) {
                    Ok(_) => {
                        for f in &faults {
                            self.serve(*f);
                        }
                    }
                    Err(e) => die(&format!("runtime: reading userfaultfd events failed: {e}")),
                }
            }
            self.refill_free_pool();
            if last_sample.elapsed() >= Duration::from_millis(500) {
                self.sample_coverage();
                last_sample = Instant::now();
            }
        }
    }

    /// Evicts while the pager has nothing else to do, until a batch of the
    /// budget is free: the misses that follow find room without waiting
    /// for an eviction. Stops as soon as a fault is waiting.
    fn refill_free_pool(&self) {
        loop {
            let mut g = lock(&self.shared);
            let reserve = g.batch;
            if g.cache.has_room(reserve) {
                return;
            }
            self.evict_batch(&mut g);
            drop(g);
            let mut p = [libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            if process::poll(&mut p, 0).unwrap_or(0) > 0 {
                return;
            }
        }
    }

    /// A daemon socket became readable while no request was in flight: the
    /// daemon went away (or broke the protocol). Its pages are lost.
    fn check_daemons(&self) {
        let mut g = lock(&self.shared);
        for d in &mut g.daemons {
            let (Some(p), Some(conn)) = (d.pollfd(), d.conn.as_mut()) else {
                continue;
            };
            if process::poll(&mut [p], 0).unwrap_or(0) == 0 {
                continue;
            }
            let why = match conn.recv() {
                Err(ConnError::Closed) => "closed the connection".to_string(),
                Err(e) => e.to_string(),
                Ok(f) => format!("sent an unexpected {:?}", f.message),
            };
            die(&format!(
                "memory daemon {} {why}; the program's pages there are lost, stopping it",
                d.addr
            ));
        }
    }

    /// Serves one fault event.
    fn serve(&self, f: Fault) {
        if !self.region.contains(f.page) {
            let _ = self.uffd.wake(f.page, PAGE_SIZE);
            return;
        }
        let i = self.page_index(f.page);
        let mut g = lock(&self.shared);
        if g.cache.is_resident(i) {
            if f.wp {
                g.cache.dirtied(i);
                if let Some(s) = self.stats {
                    s.dirtied.fetch_add(1, Relaxed);
                }
                if let Err(e) = self.uffd.write_protect(f.page, PAGE_SIZE, false) {
                    die(&format!("runtime: cannot unprotect a page: {e}"));
                }
            } else {
                let _ = self.uffd.wake(f.page, PAGE_SIZE);
            }
            return;
        }
        let start = Instant::now();
        let g = &mut *g;
        self.plan_miss(g, i);
        let remote = g.cache.is_remote(i);
        // Room for every page planned, the faulting one included (it is in
        // `fetch` only when remote).
        while !g
            .cache
            .has_room(g.fetch.len() + g.fill.len() + usize::from(!remote))
        {
            self.evict_batch(g);
        }
        // The faulting page first: its thread resumes as soon as it is in.
        if !remote {
            let zero = &self.zero[..PAGE_SIZE];
            match self.install_fault_page(&mut g.cache, i, zero, !f.write, false) {
                Ok(true) => {}
                // Unmapped under us (munmap raced the fault): nothing to do.
                Ok(false) => return,
                Err(e) => die(&format!("runtime: cannot install page {:#x}: {e}", f.page)),
            }
        }
        if !g.fetch.is_empty() {
            self.fetch_and_install(g, remote.then_some(f.write));
        }
        let filled = self.fill_ahead(g);
        if let Some(s) = self.stats {
            if remote {
                s.remote_misses.fetch_add(1, Relaxed);
            } else {
                s.zero_fills.fetch_add(1, Relaxed);
            }
            let ahead = g.fetch.len().saturating_sub(remote as usize);
            s.prefetched.fetch_add(ahead as u64, Relaxed);
            s.prefilled.fetch_add(filled as u64, Relaxed);
            s.record_latency(start.elapsed().as_micros() as u64);
            s.peak_resident_bytes
                .fetch_max((g.cache.resident() * PAGE_SIZE) as u64, Relaxed);
        }
    }

    /// Decides what a miss on page `i` brings in: `fetch` gets the remote
    /// pages (`i` first if it is remote), `fill` the never-written pages
    /// ahead to zero-fill (`i` itself is installed separately when not
    /// remote). Resident pages ahead are skipped; the pages stop at the
    /// region's end and at a change of daemon, and take at most a quarter
    /// of the budget.
    fn plan_miss(&self, g: &mut Shared, i: usize) {
        g.fetch.clear();
        g.fill.clear();
        if g.cache.is_remote(i) {
            g.fetch.push(i);
        }
        let Some(ahead) = g.prefetch.on_miss(i) else {
            return;
        };
        let pages = self.region.len / PAGE_SIZE;
        // One read goes to one daemon: the first remote page's.
        let mut home = g
            .cache
            .is_remote(i)
            .then(|| self.daemon_of(g, self.page_addr(i)));
        let max = ahead
            .count
            .min(g.cache.budget() / 4)
            .min(MAX_PREFETCH_PAGES);
        for k in 1..=max as i64 {
            let j = ahead.from + k * ahead.stride;
            if j < 0 || j as usize >= pages {
                break;
            }
            if j as usize == i || g.cache.is_resident(j as usize) {
                continue;
            }
            let j = j as usize;
            if g.cache.is_remote(j) {
                let d = self.daemon_of(g, self.page_addr(j));
                if *home.get_or_insert(d) != d {
                    break;
                }
                g.fetch.push(j);
            } else {
                g.fill.push(j);
            }
        }
    }

    /// Installs the faulting page `i` from `src`, write-protected (clean)
    /// if `wp`; `predicted`: writable only because its last residency was
    /// written. `Ok(false)`: not installed because its range is gone (its
    /// thread is woken to fault again) or it was already present.
    fn install_fault_page(
        &self,
        cache: &mut ExCache,
        i: usize,
        src: &[u8],
        wp: bool,
        predicted: bool,
    ) -> std::io::Result<bool> {
        let at = self.page_addr(i);
        match self.uffd.copy(at, src, wp) {
            Ok(1) if predicted => cache.installed_unobserved(i, Some(src)),
            Ok(1) => cache.installed(i, !wp),
            Ok(_) => return Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let _ = self.uffd.wake(at, PAGE_SIZE);
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        Ok(true)
    }

    /// Fetches `g.fetch` in one `ReadPages` and installs the pages; if
    /// `fault_write` is set the first one is the faulting page (installed
    /// writable if the fault was a write or a write is predicted), the
    /// others are prefetched (see `install_runs`).
    fn fetch_and_install(&self, g: &mut Shared, fault_write: Option<bool>) {
        let d = self.daemon_of(g, self.page_addr(g.fetch[0]));
        let id = g.next_id;
        g.next_id += 1;
        g.fetch_addrs.clear();
        for &j in &g.fetch {
            g.fetch_addrs.push(VirtAddr(self.page_addr(j) as u64));
        }
        let Shared {
            daemons,
            cache,
            fetch,
            fetch_addrs,
            ..
        } = g;
        let Daemon { addr, conn } = &mut daemons[d];
        let conn = live(conn, addr);
        let (out0, in0) = (conn.bytes_out, conn.bytes_in);
        let msg = Message::ReadPages {
            addrs: fetch_addrs.as_slice().into(),
        };
        let reply = if self.tuning.poll_us == 0 {
            conn.call(id, &msg)
        } else {
            call_polling(conn, id, &msg, self.tuning.poll_us)
        };
        let data = match reply {
            Ok(frame) => match frame.message {
                Message::Pages { data } if data.len() == fetch.len() * PAGE_SIZE => data,
                other => die(&format!(
                    "memory daemon {addr} answered a page read with {other:?}"
                )),
            },
            Err(e) => self.daemon_failed(addr, e),
        };
        let mut k = 0;
        if let Some(write) = fault_write {
            let predicted = !write && cache.predicts_write(fetch[0]);
            let wp = !write && !predicted;
            if let Err(e) =
                self.install_fault_page(cache, fetch[0], &data[..PAGE_SIZE], wp, predicted)
            {
                let at = self.page_addr(fetch[0]);
                die(&format!("runtime: cannot install page {at:#x}: {e}"));
            }
            k = 1;
        }
        // Prefetched pages, one UFFDIO_COPY per run of neighbours: clean,
        // but writable if their last residency was written.
        install_runs(
            &self.uffd,
            self.region.base,
            cache,
            &fetch[k..],
            &data[k * PAGE_SIZE..],
        );
        if let Some(s) = self.stats {
            s.bytes_out.fetch_add(conn.bytes_out - out0, Relaxed);
            s.bytes_in.fetch_add(conn.bytes_in - in0, Relaxed);
        }
    }

    /// Zero-fills the never-written pages ahead of a miss (`g.fill`). They
    /// are installed writable and counted dirty: the program is expected to
    /// write them, and eviction drops a still-zero one without writeback.
    /// Returns how many were installed.
    fn fill_ahead(&self, g: &mut Shared) -> usize {
        let before = g.cache.resident();
        let zeros = &self.zero[..g.fill.len() * PAGE_SIZE];
        install_runs(&self.uffd, self.region.base, &mut g.cache, &g.fill, zeros);
        g.cache.resident() - before
    }

    fn daemon_failed(&self, addr: &str, e: ConnError) -> ! {
        match e {
            ConnError::TimedOut => die(&format!(
                "memory daemon {addr} did not answer in time; stopping the program"
            )),
            ConnError::Closed => die(&format!(
                "memory daemon {addr} closed the connection; the program's pages there are lost, stopping it"
            )),
            e => die(&format!("memory daemon {addr}: {e}; stopping the program")),
        }
    }

    /// Evicts the oldest batch of resident pages.
    fn evict_batch(&self, g: &mut Shared) {
        let mut victims = std::mem::take(&mut g.victims);
        g.cache.pick_victims(g.batch, &mut victims);
        if victims.is_empty() {
            die("runtime: ExCache is full but nothing can be evicted");
        }
        self.write_back_and_drop(g, &victims);
        g.victims = victims;
    }

    /// Writes back the dirty pages among `victims`, waits for every ack,
    /// then drops them all locally; a batch at a time, so the buffers stay
    /// small however large the range (mremap, mprotect flush whole ranges).
    fn write_back_and_drop(&self, g: &mut Shared, victims: &[Victim]) {
        let batch = g.batch;
        for chunk in victims.chunks(batch) {
            self.write_back_and_drop_batch(g, chunk);
        }
    }

    fn write_back_and_drop_batch(&self, g: &mut Shared, victims: &[Victim]) {
        let n = g.daemons.len();
        for d in 0..n {
            g.wb_addrs[d].clear();
            g.wb_data[d].clear();
        }
        let mut dirty = 0u64;
        let mut unchanged_remote = 0u64;
        g.clean_victims.clear();
        // Stop writers before copying: a write after the copy would be
        // lost. One ioctl per run of dirty victims, bridging pages that are
        // not mapped or already write-protected (clean).
        g.span_pages.clear();
        g.span_pages
            .extend(victims.iter().filter(|v| v.dirty).map(|v| v.index));
        let cache = &g.cache;
        self.spans(
            &mut g.span_pages,
            |k| !cache.is_resident(k) || !cache.is_dirty(k),
            &mut g.ranges,
        );
        for &(addr, len) in &g.ranges {
            if let Err(e) = self.uffd.write_protect(addr, len, true) {
                die(&format!(
                    "runtime: cannot write-protect pages for eviction: {e}"
                ));
            }
        }
        for v in victims.iter().filter(|v| v.dirty) {
            let addr = self.page_addr(v.index);
            let d = self.daemon_for(g, addr);
            let buf = &mut g.wb_data[d];
            let at = buf.len();
            buf.resize(at + PAGE_SIZE, 0);
            // SAFETY: addr is a resident page of the region: only this code
            // (under the shared lock) drops region pages, and writers are
            // stopped by the write protection just set.
            unsafe { mm::copy_page_out(addr, &mut buf[at..]) };
            // A page dirty only by prediction may hold what it was installed
            // with: zeros no daemon holds (dropped, it reads as zeros
            // again), or its fetched contents (the daemon's copy is
            // current). Either needs no writeback.
            let remote = g.cache.is_remote(v.index);
            let unchanged = if remote {
                g.cache.unchanged_since_fetch(v.index, &buf[at..])
            } else {
                buf[at..].iter().all(|&b| b == 0)
            };
            if unchanged {
                buf.truncate(at);
                g.clean_victims.push(v.index);
                unchanged_remote += u64::from(remote);
                continue;
            }
            // Written: predicted again at its next fetch.
            g.cache.saw_write(v.index);
            g.wb_addrs[d].push(VirtAddr(addr as u64));
            dirty += 1;
        }
        if dirty > 0 {
            self.send_writebacks(g);
        }
        // Bridging only pages that are not mapped.
        g.span_pages.clear();
        g.span_pages.extend(victims.iter().map(|v| v.index));
        let cache = &g.cache;
        self.spans(&mut g.span_pages, |k| !cache.is_resident(k), &mut g.ranges);
        if let Err(e) = mm::drop_pages(&g.ranges, self.pidfd) {
            die(&format!("runtime: cannot drop evicted pages: {e}"));
        }
        // `clean_victims` lists victims in the order of `victims`.
        let mut clean = g.clean_victims.iter().peekable();
        for v in victims {
            let unchanged = clean.next_if_eq(&&v.index).is_some();
            g.cache.evicted(Victim {
                dirty: v.dirty && !unchanged,
                ..*v
            });
        }
        if let Some(s) = self.stats {
            s.evictions.fetch_add(victims.len() as u64, Relaxed);
            s.writebacks.fetch_add(dirty, Relaxed);
            s.zero_drops
                .fetch_add(g.clean_victims.len() as u64 - unchanged_remote, Relaxed);
            s.unchanged_drops.fetch_add(unchanged_remote, Relaxed);
        }
    }

    /// Address ranges covering `pages` (page indices, sorted here), merged
    /// across gaps of at most [`BRIDGE_PAGES`] pages that `bridge` allows
    /// to be covered too. Each ioctl that changes mappings ends in a TLB
    /// shootdown: an IPI to every other CPU running the program, which on
    /// these VMs costs about as much as a page fetch. Victims come in
    /// eviction order, two threads' pages interleaved, so sorting alone
    /// often halves the ranges.
    fn spans(
        &self,
        pages: &mut [usize],
        bridge: impl Fn(usize) -> bool,
        out: &mut Vec<(usize, usize)>,
    ) {
        pages.sort_unstable();
        out.clear();
        let mut run: Option<(usize, usize)> = None; // first page, end
        for &p in pages.iter() {
            run = match run {
                Some((first, end)) if p < end => Some((first, end)),
                Some((first, end)) if p - end <= BRIDGE_PAGES && (end..p).all(&bridge) => {
                    Some((first, p + 1))
                }
                Some((first, end)) => {
                    out.push((self.page_addr(first), (end - first) * PAGE_SIZE));
                    Some((p, p + 1))
                }
                None => Some((p, p + 1)),
            };
        }
        if let Some((first, end)) = run {
            out.push((self.page_addr(first), (end - first) * PAGE_SIZE));
        }
    }

    /// Sends the batched writebacks to every daemon (all requests first,
    /// then all acks) and checks each ack.
    fn send_writebacks(&self, g: &mut Shared) {
        let n = g.daemons.len();
        let mut pending = Vec::new();
        for d in 0..n {
            let addrs = std::mem::take(&mut g.wb_addrs[d]);
            let data = std::mem::take(&mut g.wb_data[d]);
            for (k, chunk) in addrs.chunks(MAX_BATCH_PAGES).enumerate() {
                let id = g.next_id;
                g.next_id += 1;
                let from = k * MAX_BATCH_PAGES * PAGE_SIZE;
                let bytes = &data[from..from + chunk.len() * PAGE_SIZE];
                let Daemon { addr, conn } = &mut g.daemons[d];
                let conn = live(conn, addr);
                let out0 = conn.bytes_out;
                if let Err(e) = conn.send(
                    id,
                    &Message::WritePages {
                        addrs: chunk.into(),
                        data: bytes,
                    },
                ) {
                    self.daemon_failed(addr, e);
                }
                if let Some(s) = self.stats {
                    s.bytes_out.fetch_add(conn.bytes_out - out0, Relaxed);
                }
                pending.push((d, id));
            }
            g.wb_addrs[d] = addrs;
            g.wb_data[d] = data;
        }
        for (d, id) in pending {
            let Daemon { addr, conn } = &mut g.daemons[d];
            let conn = live(conn, addr);
            let in0 = conn.bytes_in;
            match conn.recv() {
                Ok(f) if f.request_id == id && f.message == Message::Done => {}
                Ok(f) => match f.message {
                    Message::Error {
                        code: ErrorCode::NoMemory,
                        message,
                    } => die(&format!(
                        "memory daemon {addr} is out of memory ({message}); cannot write back evicted pages, stopping the program"
                    )),
                    other => die(&format!(
                        "memory daemon {addr} refused a writeback: {other:?}"
                    )),
                },
                Err(e) => self.daemon_failed(addr, e),
            }
            if let Some(s) = self.stats {
                s.bytes_in.fetch_add(conn.bytes_in - in0, Relaxed);
            }
        }
    }

    /// One request on the layout connection.
    fn layout_call(&self, msg: &Message<'_>) -> Result<Message<'static>, Errno> {
        let mut c = lock(&self.control);
        let id = c.next_id;
        c.next_id += 1;
        let Control { conn, addr, .. } = &mut *c;
        let reply = match conn.call(id, msg) {
            Ok(f) => f.message,
            Err(e) => self.daemon_failed(addr, e),
        };
        match reply {
            Message::Mapped { addr } => Ok(Message::Mapped { addr }),
            Message::BrkIs { brk } => Ok(Message::BrkIs { brk }),
            Message::Done => Ok(Message::Done),
            Message::Error { code, .. } => Err(Errno(code.errno())),
            other => die(&format!(
                "memory daemon {addr} sent an unexpected {other:?}"
            )),
        }
    }

    /// Places a new anonymous mapping in the region.
    pub fn map(&self, len: usize) -> Result<usize, Errno> {
        let _call = RuntimeCall::enter();
        match self.layout_call(&Message::Mmap { len: len as u64 })? {
            Message::Mapped { addr } => Ok(addr.0 as usize),
            _ => Err(Errno(libc::ENOMEM)),
        }
    }

    /// Forgets the contents of `[addr, addr+len)` locally and at the
    /// non-home daemons (the home forgets its own as part of `msg`).
    fn forget(&self, g: &mut Shared, addr: usize, len: usize, home_done: bool) {
        let first = self.page_index(addr);
        let remote = g.cache.any_remote(first, len / PAGE_SIZE);
        g.cache.discard(first, len / PAGE_SIZE);
        if let Err(e) = mm::madvise_raw(addr, len, libc::MADV_DONTNEED) {
            die(&format!("runtime: cannot drop pages: {e}"));
        }
        if !remote {
            // No daemon holds a page of the range: nothing to tell them.
            return;
        }
        self.discard_at_daemons(g, addr, len, home_done);
    }

    /// Each daemon holding a vRegion of `[addr, addr+len)` forgets its
    /// part (but the home if `skip_home`).
    fn discard_at_daemons(&self, g: &mut Shared, addr: usize, len: usize, skip_home: bool) {
        let n = g.daemons.len();
        let mut seen = vec![false; n];
        for d in g.placement.placed_in(addr - self.region.base, len) {
            seen[d] = true;
        }
        for (d, s) in seen.into_iter().enumerate() {
            if !s || (skip_home && d == g.home) {
                continue;
            }
            let id = g.next_id;
            g.next_id += 1;
            let Daemon { addr: at, conn } = &mut g.daemons[d];
            match live(conn, at).call(
                id,
                &Message::Discard {
                    addr: VirtAddr(addr as u64),
                    len: len as u64,
                },
            ) {
                Ok(f) if f.message == Message::Done => {}
                Ok(f) => die(&format!(
                    "memory daemon {at}: discard failed: {:?}",
                    f.message
                )),
                Err(e) => self.daemon_failed(at, e),
            }
        }
    }

    /// The program freed `[addr, addr+len)` (page-aligned, inside a block
    /// of the region heap): its contents are dead. Resident pages stay for
    /// the heap to reuse; remote copies are dropped, so reuse neither
    /// fetches nor writes back stale data.
    pub fn freed(&self, addr: usize, len: usize) {
        let _call = RuntimeCall::enter();
        if len == 0 || !self.region.covers(addr, len) {
            return;
        }
        let mut g = lock(&self.shared);
        if g.cache
            .forget_remote(self.page_index(addr), len / PAGE_SIZE)
        {
            self.discard_at_daemons(&mut g, addr, len, false);
        }
    }

    /// Unmaps a range of the region: contents are freed here and remotely,
    /// the address range returns to the layout.
    pub fn unmap(&self, addr: usize, len: usize) -> Result<(), Errno> {
        let _call = RuntimeCall::enter();
        let len = page_align_up(len);
        if !addr.is_multiple_of(PAGE_SIZE) || !self.region.covers(addr, len) {
            return Err(Errno(libc::EINVAL));
        }
        let mut g = lock(&self.shared);
        self.layout_call(&Message::Munmap {
            addr: VirtAddr(addr as u64),
            len: len as u64,
        })?;
        self.forget(&mut g, addr, len, true);
        Ok(())
    }

    /// `madvise(MADV_DONTNEED/FREE)` on the region: contents read back as
    /// zeros afterwards.
    pub fn discard(&self, addr: usize, len: usize) -> Result<(), Errno> {
        let _call = RuntimeCall::enter();
        let len = page_align_up(len);
        if !addr.is_multiple_of(PAGE_SIZE) || !self.region.covers(addr, len) {
            return Err(Errno(libc::EINVAL));
        }
        let mut g = lock(&self.shared);
        self.forget(&mut g, addr, len, false);
        Ok(())
    }

    /// `mremap` of a region mapping. Contents of a moved mapping are copied
    /// page by page through this process (old and new addresses may belong
    /// to different daemons).
    pub fn remap(
        &self,
        old: usize,
        old_len: usize,
        new_len: usize,
        may_move: bool,
    ) -> Result<usize, Errno> {
        let _call = RuntimeCall::enter();
        let (old_len, new_len) = (page_align_up(old_len), page_align_up(new_len));
        if !old.is_multiple_of(PAGE_SIZE) || new_len == 0 || !self.region.covers(old, old_len) {
            return Err(Errno(libc::EINVAL));
        }
        let mut g = lock(&self.shared);
        // Every page of the old range goes remote (or stays never-written).
        let resident = g
            .cache
            .resident_in(self.page_index(old), old_len / PAGE_SIZE);
        if !resident.is_empty() {
            self.write_back_and_drop(&mut g, &resident);
        }
        let new = match self.layout_call(&Message::Mremap {
            old: VirtAddr(old as u64),
            old_len: old_len as u64,
            new_len: new_len as u64,
            may_move,
        })? {
            Message::Mapped { addr } => addr.0 as usize,
            _ => return Err(Errno(libc::ENOMEM)),
        };
        if new_len < old_len {
            self.forget(&mut g, old + new_len, old_len - new_len, true);
        }
        if new != old {
            self.move_contents(&mut g, old, new, old_len.min(new_len));
            self.forget(&mut g, old, old_len.min(new_len), false);
        }
        Ok(new)
    }

    /// Copies the remote pages of `[from, from+len)` to `to`.
    fn move_contents(&self, g: &mut Shared, from: usize, to: usize, len: usize) {
        let remote: Vec<usize> = (0..len / PAGE_SIZE)
            .filter(|k| g.cache.is_remote(self.page_index(from) + k))
            .collect();
        for chunk in remote.chunks(g.batch) {
            for &k in chunk {
                let src = from + k * PAGE_SIZE;
                let d = self.daemon_of(g, src);
                let id = g.next_id;
                g.next_id += 1;
                let Daemon { addr, conn } = &mut g.daemons[d];
                let page = match live(conn, addr).call(
                    id,
                    &Message::ReadPages {
                        addrs: vec![VirtAddr(src as u64)].into(),
                    },
                ) {
                    Ok(f) => match f.message {
                        Message::Pages { data } => data.to_vec(),
                        other => die(&format!("memory daemon {addr}: {other:?}")),
                    },
                    Err(e) => self.daemon_failed(addr, e),
                };
                let dst = to + k * PAGE_SIZE;
                let d = self.daemon_for(g, dst);
                g.wb_addrs[d].push(VirtAddr(dst as u64));
                g.wb_data[d].extend_from_slice(&page);
            }
            self.send_writebacks(g);
            for d in 0..g.daemons.len() {
                g.wb_addrs[d].clear();
                g.wb_data[d].clear();
            }
        }
        let (first_from, first_to) = (self.page_index(from), self.page_index(to));
        g.cache.move_remote(first_from, first_to, len / PAGE_SIZE);
    }

    /// `mprotect` of region memory. Pages losing read access are evicted
    /// first, so the pager never reads a page the program cannot (and the
    /// program still gets SIGSEGV on them, from the kernel).
    pub fn protect(&self, addr: usize, len: usize, prot: i32) -> Result<(), Errno> {
        let _call = RuntimeCall::enter();
        let len = page_align_up(len);
        if !addr.is_multiple_of(PAGE_SIZE) || !self.region.covers(addr, len) {
            return Err(Errno(libc::EINVAL));
        }
        let mut g = lock(&self.shared);
        if prot & libc::PROT_READ == 0 {
            let resident = g.cache.resident_in(self.page_index(addr), len / PAGE_SIZE);
            if !resident.is_empty() {
                self.write_back_and_drop(&mut g, &resident);
            }
        }
        mm::mprotect_raw(addr, len, prot)
            .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EINVAL)))
    }

    /// Moves the program break (`0` queries it).
    pub fn brk(&self, new_brk: usize) -> usize {
        let _call = RuntimeCall::enter();
        let mut g = lock(&self.shared);
        let old = match self.layout_call(&Message::Brk {
            new_brk: VirtAddr(0),
        }) {
            Ok(Message::BrkIs { brk }) => brk.0 as usize,
            _ => return 0,
        };
        if new_brk == 0 {
            return old;
        }
        let now = match self.layout_call(&Message::Brk {
            new_brk: VirtAddr(new_brk as u64),
        }) {
            Ok(Message::BrkIs { brk }) => brk.0 as usize,
            _ => old,
        };
        let (old_top, new_top) = (page_align_up(old), page_align_up(now));
        if new_top < old_top {
            self.forget(&mut g, new_top, old_top - new_top, true);
        }
        now
    }

    /// Records this process's coverage: its disaggregated footprint against
    /// the anonymous memory it has outside the region.
    pub fn sample_coverage(&self) {
        let Some(stats) = self.stats else {
            return;
        };
        let _scope = RuntimeScope::enter();
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
            return;
        };
        let local = coverage::anonymous_outside(
            &smaps,
            self.region.base,
            self.region.base + self.region.len,
        );
        let holding = lock(&self.shared).cache.holding();
        stats.record_coverage(self.pid, (holding * PAGE_SIZE) as u64, local);
    }
}

/// `FramedConn::call`, but busy-polls the socket for up to `spin_us` before
/// sleeping on it: one wakeup fewer per miss when the reply comes quickly,
/// a core spent while it does not.
fn call_polling<'c>(
    conn: &'c mut FramedConn<TcpStream>,
    id: u64,
    msg: &Message<'_>,
    spin_us: u64,
) -> Result<lego_protocol::Frame<'c>, ConnError> {
    conn.send(id, msg)?;
    let fd = conn.stream().raw_fd().unwrap_or(-1);
    let start = Instant::now();
    let limit = Duration::from_micros(spin_us);
    loop {
        let mut p = [libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        if process::poll(&mut p, 0).unwrap_or(1) > 0 || start.elapsed() >= limit {
            break;
        }
        std::hint::spin_loop();
    }
    conn.recv_reply(id)
}

/// Installs `pages` (ascending or descending page indices of the region at
/// `base`) from the matching pages of `data`, one `UFFDIO_COPY` per run of
/// consecutive pages that are installed alike: a page no daemon holds (a
/// zero fill) or whose last residency was written goes in writable and
/// counts dirty (by prediction), any other write-protected and clean. A
/// page that cannot be installed (its range unmapped, or already present)
/// is skipped: it was only brought ahead, a later access faults it in.
fn install_runs(uffd: &Uffd, base: usize, cache: &mut ExCache, pages: &[usize], data: &[u8]) {
    let writable = |c: &ExCache, p: usize| !c.is_remote(p) || c.predicts_write(p);
    let mut k = 0;
    while k < pages.len() {
        let w = writable(cache, pages[k]);
        let mut len = 1;
        while k + len < pages.len()
            && pages[k + len] == pages[k] + len
            && writable(cache, pages[k + len]) == w
        {
            len += 1;
        }
        let src = &data[k * PAGE_SIZE..(k + len) * PAGE_SIZE];
        let done = match uffd.copy(base + pages[k] * PAGE_SIZE, src, !w) {
            Ok(done) => done,
            Err(e) => {
                if e.raw_os_error() == Some(libc::ENOENT) {
                    let _ = uffd.wake(base + pages[k] * PAGE_SIZE, len * PAGE_SIZE);
                }
                0
            }
        };
        for (n, &p) in pages[k..k + done].iter().enumerate() {
            if w {
                // A fetched page is kept track of: eviction compares it.
                let fetched = cache
                    .is_remote(p)
                    .then(|| &src[n * PAGE_SIZE..(n + 1) * PAGE_SIZE]);
                cache.installed_unobserved(p, fetched);
            } else {
                cache.installed(p, false);
            }
        }
        k += len;
    }
}
