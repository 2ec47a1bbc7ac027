//! The memory interface of the program, as the interposers and the region
//! heap call it: `mmap`, `munmap`, `mremap`, `madvise`, `mprotect`, `brk`
//! and `free` of large blocks on region memory. The layout is decided with
//! the home memory daemon (over the layout connection), and every change
//! is made at a backup daemon too, which takes over if the home fails;
//! contents are the pager's business.

use std::net::TcpStream;

use lego_protocol::{Message, VirtAddr, PAGE_SIZE};
use lego_transport::{FramedConn, Stream};

use crate::heap::RuntimeCall;
use crate::pager::PagerError;
use crate::pool::{self, DaemonError};
use crate::runtime::{lock, stop, Runtime};

/// The connection to the home daemon that holds this space's layout, and
/// to its backup.
pub struct LayoutConn {
    pub conn: FramedConn<TcpStream>,
    /// The home daemon's address.
    pub addr: String,
    pub next_id: u64,
    /// A second daemon holding the same layout (address, connection):
    /// every change made at the home is made there too (the layout is a
    /// deterministic function of its changes, and the answers are
    /// compared), and it becomes the home if the home fails.
    pub backup: Option<(String, FramedConn<TcpStream>)>,
    /// How long the home may leave a call unanswered while there is a
    /// backup (`LEGO_FAILOVER_MS`).
    pub failover: std::time::Duration,
}

impl LayoutConn {
    /// One layout request and its reply: at the home, then, if it changes
    /// the layout, at the backup. A home that fails is replaced by the
    /// backup, which is asked instead.
    pub fn call(&mut self, msg: &Message<'_>) -> Result<Message<'static>, DaemonError> {
        self.next_id += 1;
        let id = self.next_id;
        let reply = loop {
            // With a backup, a home that does not answer within the
            // failover time is given up like a closed one.
            let r = match (&self.backup, self.failover.is_zero()) {
                (Some(_), false) => {
                    pool::call_within(&mut self.conn, &self.addr, (id, self.failover), msg)
                }
                _ => pool::call(&mut self.conn, &self.addr, id, msg),
            };
            match r.and_then(|r| owned(&self.addr, msg, r)) {
                Ok(r) => break r,
                Err(e) if e.is_loss() && self.promote_backup() => {
                    lego_sys::process::warn(&format!(
                        "{e}; the layout's backup at {} takes over",
                        self.addr
                    ));
                }
                Err(e) => return Err(e),
            }
        };
        let changes = !matches!(msg, Message::Brk { new_brk } if new_brk.0 == 0);
        if let (true, Some((addr, conn))) = (changes, self.backup.as_mut()) {
            let same = pool::call(conn, addr, id, msg)
                .and_then(|r| owned(addr, msg, r))
                .map_err(|e| e.to_string())
                .and_then(|r| {
                    if r == reply {
                        Ok(())
                    } else {
                        Err(format!(
                            "it answered {} where the home answered {}",
                            r.describe(),
                            reply.describe()
                        ))
                    }
                });
            if let Err(e) = same {
                // The repair thread makes a new backup from the home's
                // layout.
                lego_sys::process::warn(&format!(
                    "memory daemon {addr} no longer keeps the layout's backup ({e})"
                ));
                self.backup = None;
            }
        }
        Ok(reply)
    }

    /// Makes `conn`, a connection to the daemon at `addr` attached to the
    /// space, the layout's backup: it is given the home's layout.
    pub fn set_backup(
        &mut self,
        addr: String,
        mut conn: FramedConn<TcpStream>,
    ) -> Result<(), DaemonError> {
        self.next_id += 1;
        let reply = pool::call(
            &mut self.conn,
            &self.addr,
            self.next_id,
            &Message::GetLayout,
        )?;
        let Message::Layout {
            brk_start,
            brk,
            mappings,
        } = reply
        else {
            return Err(pool::unexpected(&self.addr, "GetLayout", &reply));
        };
        let layout = Message::Layout {
            brk_start,
            brk,
            mappings,
        };
        pool::space_call(&mut conn, &addr, &layout)?;
        self.backup = Some((addr, conn));
        Ok(())
    }

    /// The backup becomes the home (the home is drained or failed); there
    /// is no backup until the repair thread makes one.
    pub fn promote_backup(&mut self) -> bool {
        match self.backup.take() {
            Some((addr, conn)) => {
                (self.addr, self.conn) = (addr, conn);
                true
            }
            None => false,
        }
    }

    /// The descriptors of the layout connections.
    pub fn fds(&self) -> Vec<i32> {
        let mut fds: Vec<i32> = self.conn.stream().raw_fd().into_iter().collect();
        fds.extend(self.backup.as_ref().and_then(|b| b.1.stream().raw_fd()));
        fds
    }
}

/// A layout reply, owned; anything but `Mapped`, `BrkIs` and `Done` is
/// unexpected.
fn owned(
    addr: &str,
    msg: &Message<'_>,
    reply: Message<'_>,
) -> Result<Message<'static>, DaemonError> {
    match reply {
        Message::Mapped { addr } => Ok(Message::Mapped { addr }),
        Message::BrkIs { brk } => Ok(Message::BrkIs { brk }),
        Message::Done => Ok(Message::Done),
        other => Err(pool::unexpected(addr, msg.name(), &other)),
    }
}

/// Why a memory call did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Refused as Linux would refuse it: the errno the program sees.
    #[error("refused with errno {0}")]
    Refused(i32),
    /// The runtime cannot go on.
    #[error(transparent)]
    Failed(#[from] PagerError),
}

impl From<DaemonError> for CallError {
    fn from(e: DaemonError) -> Self {
        match e.errno() {
            Some(errno) => CallError::Refused(errno),
            None => CallError::Failed(e.into()),
        }
    }
}

impl CallError {
    /// The errno for the program, or the end of the program if the runtime
    /// failed (the decision of the entry points: interposers, region heap).
    pub fn errno_or_stop(self) -> i32 {
        match self {
            CallError::Refused(errno) => errno,
            CallError::Failed(e) => stop(e),
        }
    }
}

fn page_align_up(v: usize) -> usize {
    v.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

impl Runtime {
    /// `[addr, addr+len)` rounded to pages, if it is a page-aligned range
    /// of the region.
    fn region_range(&self, addr: usize, len: usize) -> Result<usize, CallError> {
        let len = page_align_up(len);
        if !addr.is_multiple_of(PAGE_SIZE) || !self.region.covers(addr, len) {
            return Err(CallError::Refused(libc::EINVAL));
        }
        Ok(len)
    }

    fn layout_call(&self, msg: &Message<'_>) -> Result<Message<'static>, CallError> {
        Ok(lock(&self.layout).call(msg)?)
    }

    /// Places a new anonymous mapping in the region.
    pub fn map(&self, len: usize) -> Result<usize, CallError> {
        let _call = RuntimeCall::enter();
        match self.layout_call(&Message::Mmap { len: len as u64 })? {
            Message::Mapped { addr } => Ok(addr.0 as usize),
            _ => Err(CallError::Refused(libc::ENOMEM)),
        }
    }

    /// The program freed `[addr, addr+len)` (page-aligned, inside a block
    /// of the region heap): see [`crate::pager::Pager::freed`].
    pub fn freed(&self, addr: usize, len: usize) -> Result<(), CallError> {
        let _call = RuntimeCall::enter();
        if len == 0 || !self.region.covers(addr, len) {
            return Ok(());
        }
        self.with_pager(|pager, pool, _| pager.freed(pool, addr, len))?;
        Ok(())
    }

    /// Unmaps a range of the region: contents are freed here and remotely,
    /// the address range returns to the layout.
    pub fn unmap(&self, addr: usize, len: usize) -> Result<(), CallError> {
        let _call = RuntimeCall::enter();
        let len = self.region_range(addr, len)?;
        let mut st = lock(&self.state);
        self.layout_call(&Message::Munmap {
            addr: VirtAddr(addr as u64),
            len: len as u64,
        })?;
        self.with_pager_locked(&mut st, |pager, pool, t| {
            pager.discard(t, pool, addr, len, true)
        })?;
        Ok(())
    }

    /// `madvise(MADV_DONTNEED/FREE)` on the region: contents read back as
    /// zeros afterwards.
    pub fn discard(&self, addr: usize, len: usize) -> Result<(), CallError> {
        let _call = RuntimeCall::enter();
        let len = self.region_range(addr, len)?;
        self.with_pager(|pager, pool, t| pager.discard(t, pool, addr, len, false))?;
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
    ) -> Result<usize, CallError> {
        let _call = RuntimeCall::enter();
        let new_len = page_align_up(new_len);
        let old_len = self.region_range(old, old_len)?;
        if new_len == 0 {
            return Err(CallError::Refused(libc::EINVAL));
        }
        let mut st = lock(&self.state);
        // Every page of the old range goes remote (or stays never-written).
        self.with_pager_locked(&mut st, |pager, pool, t| {
            pager.evict_range(t, pool, old, old_len)
        })?;
        let new = match self.layout_call(&Message::Mremap {
            old: VirtAddr(old as u64),
            old_len: old_len as u64,
            new_len: new_len as u64,
            may_move,
        })? {
            Message::Mapped { addr } => addr.0 as usize,
            _ => return Err(CallError::Refused(libc::ENOMEM)),
        };
        self.with_pager_locked(&mut st, |pager, pool, t| {
            if new_len < old_len {
                pager.discard(t, pool, old + new_len, old_len - new_len, true)?;
            }
            if new != old {
                let kept = old_len.min(new_len);
                pager.move_contents(pool, old, new, kept)?;
                pager.discard(t, pool, old, kept, false)?;
            }
            Ok::<_, PagerError>(())
        })?;
        Ok(new)
    }

    /// `mprotect` of region memory. Pages losing read access are evicted
    /// first, so the pager never reads a page the program cannot (and the
    /// program still gets SIGSEGV on them, from the kernel).
    pub fn protect(&self, addr: usize, len: usize, prot: i32) -> Result<(), CallError> {
        let _call = RuntimeCall::enter();
        let len = self.region_range(addr, len)?;
        let mut st = lock(&self.state);
        if prot & libc::PROT_READ == 0 {
            self.with_pager_locked(&mut st, |pager, pool, t| {
                pager.evict_range(t, pool, addr, len)
            })?;
        }
        lego_sys::mm::mprotect_raw(addr, len, prot)
            .map_err(|e| CallError::Refused(e.raw_os_error().unwrap_or(libc::EINVAL)))
    }

    /// Moves the program break (`0` queries it); returns the break, which
    /// stays where it was if the move is refused.
    pub fn brk(&self, new_brk: usize) -> Result<usize, CallError> {
        let _call = RuntimeCall::enter();
        let mut st = lock(&self.state);
        let brk_is = |reply: Message<'_>| match reply {
            Message::BrkIs { brk } => Some(brk.0 as usize),
            _ => None,
        };
        let query = Message::Brk {
            new_brk: VirtAddr(0),
        };
        let Some(old) = brk_is(self.layout_call(&query)?) else {
            return Err(CallError::Refused(libc::ENOMEM));
        };
        if new_brk == 0 {
            return Ok(old);
        }
        let now = match self.layout_call(&Message::Brk {
            new_brk: VirtAddr(new_brk as u64),
        }) {
            Ok(reply) => brk_is(reply).unwrap_or(old),
            Err(CallError::Refused(_)) => old,
            Err(e) => return Err(e),
        };
        let (old_top, new_top) = (page_align_up(old), page_align_up(now));
        if new_top < old_top {
            self.with_pager_locked(&mut st, |pager, pool, t| {
                pager.discard(t, pool, new_top, old_top - new_top, true)
            })?;
        }
        Ok(now)
    }
}
