//! Every message lego components exchange on the wire, and its codec.
//!
//! No other crate defines a wire struct: daemons, the runtime and the CLI all
//! speak through [`Message`], [`encode`] and [`decode`].
//!
//! # Frames
//!
//! Every frame is a fixed 14-byte header followed by a body:
//!
//! ```text
//! +------------+-----------+--------------+------------------+
//! | body_len   | kind      | request_id   | body (body_len)  |
//! | u32 LE     | u16 LE    | u64 LE       |                  |
//! +------------+-----------+--------------+------------------+
//! ```
//!
//! `kind` 0 is invalid on purpose, so a zeroed buffer never decodes. The body
//! length is checked against [`MAX_BODY_BYTES`] *before* anything is
//! allocated, strings against [`MAX_STRING_BYTES`], page batches against
//! [`MAX_BATCH_PAGES`]. A reply carries the `request_id` of its request, so a
//! client may keep several requests in flight on one connection; a daemon
//! answers the requests of one connection in the order it received them.
//!
//! # Sequence
//!
//! ```text
//! runtime                              home memory daemon
//!    | Hello{magic, version, role}          |
//!    | Auth{identity, noise e}              |   version != ours, or
//!    |------------------------------------->|   not the credential:
//!    |                    AuthOk{noise e}   |   Refused{reason}, close
//!    |<-------------------------------------|
//!    |  ... from here every frame is sealed (encrypted, authenticated)
//!    |          HelloOk{version, capacity}  |
//!    |<-------------------------------------|
//!    | OpenSpace{pid, region, bootstrap}    |
//!    |------------------------------------->|
//!    |                 SpaceOpened{space}   |
//!    |<-------------------------------------|
//!    | Mmap / Munmap / Mremap / Brk         |   the daemon owns the layout
//!    |------------------------------------->|
//!    |          Mapped{addr} / Done / Error |
//!    |<-------------------------------------|
//!    | WritePages{pages} (eviction)         |
//!    | ReadPages{addrs}  (miss)             |
//!    |------------------------------------->|
//!    |             Done / Pages{data}       |
//!    |<-------------------------------------|
//!    | (connection closes: space freed)     |
//! ```
//!
//! Other memory daemons of the same process see `Hello`, then
//! `AttachSpace{space, capability}`, then page traffic and `Discard`.
//!
//! `Hello`, `HelloOk` and `Refused` keep their encoding in every protocol
//! version, so that peers of different versions can always tell each other
//! why they cannot talk.

#![deny(unsafe_code)]

use std::borrow::Cow;

use thiserror::Error;

pub mod control;

/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u16 = 4;
/// First bytes of every `Hello`, so a stray client is recognised at once.
pub const MAGIC: [u8; 4] = *b"LEGO";
/// Bytes in a page, the unit of every transfer.
pub const PAGE_SIZE: usize = 4096;
/// Size of a vRegion (as in LegoOS): the unit of an address space's layout
/// and of its placement on memory daemons.
pub const VREGION_BYTES: u64 = 1 << 30;
/// Most pages in one `ReadPages`/`WritePages`/`Pages` batch.
pub const MAX_BATCH_PAGES: usize = 512;
/// Longest string field.
pub const MAX_STRING_BYTES: usize = 4096;
/// Largest frame body accepted; anything larger is refused before allocation.
pub const MAX_BODY_BYTES: usize = MAX_BATCH_PAGES * (PAGE_SIZE + 8) + 64;
/// Most bytes of a standard stream in one `Stdio` frame.
pub const MAX_STDIO_BYTES: usize = 64 << 10;
/// Most mappings in one `Layout` (one frame body).
pub const MAX_MAPPINGS: usize = (MAX_BODY_BYTES - 24) / 16;
/// Longest control message (JSON).
pub const MAX_CONTROL_BYTES: usize = 1 << 20;
/// Size of the fixed frame header.
pub const HEADER_BYTES: usize = 14;

/// Identifies one disaggregated address space (one process image).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpaceId(pub u64);

/// The secret that lets a connection use an address space: chosen at
/// random by the space's runtime, never shown by any status.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Capability(pub [u8; 16]);

impl std::fmt::Debug for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Capability(..)")
    }
}

/// A virtual address in a disaggregated address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VirtAddr(pub u64);

/// What a peer is, announced in `Hello`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// The processor runtime inside a program.
    Runtime = 1,
    /// A command-line client (status, tests).
    Client = 2,
}

/// Stable error codes carried by [`Message::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The daemon has no capacity left for the request.
    NoMemory = 1,
    /// Address or length outside what the layout allows.
    BadAddress = 2,
    /// The message is not valid in this state (e.g. page traffic before a space).
    BadState = 3,
    /// A request argument is invalid.
    Invalid = 4,
    /// Unknown address space.
    NoSpace = 5,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => Self::NoMemory,
            2 => Self::BadAddress,
            3 => Self::BadState,
            4 => Self::Invalid,
            5 => Self::NoSpace,
            other => return Err(DecodeError::BadValue("error code", other as u64)),
        })
    }

    /// The errno a program should see for this code.
    pub fn errno(self) -> i32 {
        match self {
            Self::NoMemory => 12,   // ENOMEM
            Self::BadAddress => 14, // EFAULT
            _ => 22,                // EINVAL
        }
    }
}

/// Counters a memory daemon reports about itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DaemonStats {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub spaces: u64,
    pub connections: u64,
}

/// One wire message. Page data is borrowed from the frame it was decoded from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// First message of every connection.
    Hello {
        version: u16,
        role: Role,
        name: &'a str,
    },
    /// The handshake was accepted.
    HelloOk { version: u16, capacity_bytes: u64 },
    /// The handshake was refused; the connection closes after this.
    Refused { reason: &'a str },
    /// Second message of every connection: who the client is (an
    /// identity its credential vouches for) and the first message of the
    /// Noise handshake that proves it (lego_transport's `auth` module).
    Auth { identity: &'a str, noise: &'a [u8] },
    /// The daemon's Noise handshake answer; every later frame is sealed.
    AuthOk { noise: &'a [u8] },
    /// Create an address space whose home is this daemon. `region_*` is the
    /// virtual range the runtime reserved; `bootstrap_bytes` at its start
    /// were already used before the runtime could connect.
    /// `capability` is the space's secret, chosen by the runtime: every
    /// later `AttachSpace` and `ForkSpace` of it must present it.
    OpenSpace {
        pid: u32,
        program: &'a str,
        region_base: VirtAddr,
        region_bytes: u64,
        bootstrap_bytes: u64,
        capability: Capability,
    },
    /// Reply to `OpenSpace` and `ForkSpace`.
    SpaceOpened { space: SpaceId },
    /// Clone `parent` (whose capability is `parent_capability`)
    /// copy-on-write into a new space with capability `child_capability`
    /// (its layout too, on the home daemon) and attach this connection to
    /// it. `child` 0 lets the daemon choose the id (home daemon); other
    /// daemons get the home's.
    ForkSpace {
        parent: SpaceId,
        parent_capability: Capability,
        child: SpaceId,
        child_capability: Capability,
    },
    /// Use a space on this (non-home) daemon for page storage: made with
    /// this capability if the daemon has no such space yet, else only with
    /// the capability it was made with.
    AttachSpace {
        space: SpaceId,
        capability: Capability,
        region_base: VirtAddr,
        region_bytes: u64,
    },
    /// Place a new anonymous mapping of `len` bytes.
    Mmap { len: u64 },
    /// Reply to `Mmap` and `Mremap`.
    Mapped { addr: VirtAddr },
    /// Remove a mapping range and free its pages.
    Munmap { addr: VirtAddr, len: u64 },
    /// Resize a mapping, possibly moving it. Only the layout changes; the
    /// runtime moves page contents itself (they may change daemon).
    Mremap {
        old: VirtAddr,
        old_len: u64,
        new_len: u64,
        may_move: bool,
    },
    /// Move the program break; `new_brk` 0 only asks for the current one.
    Brk { new_brk: VirtAddr },
    /// Reply to `Brk`: the break after the call.
    BrkIs { brk: VirtAddr },
    /// Forget the contents of a range (pages read back as zeros).
    Discard { addr: VirtAddr, len: u64 },
    /// Fetch pages; the reply is `Pages` with their contents in order.
    ReadPages { addrs: Cow<'a, [VirtAddr]> },
    /// Page contents, `PAGE_SIZE` bytes per requested page.
    Pages { data: &'a [u8] },
    /// Store pages; acknowledged with `Done` once stored.
    WritePages {
        addrs: Cow<'a, [VirtAddr]>,
        data: &'a [u8],
    },
    /// Store each page the space does not hold yet, if it lies in a range
    /// being filled with this `epoch` (a copy from another replica: it
    /// must not overwrite what the program wrote here since the fill
    /// began, and a late copy of an earlier fill is not stored at all);
    /// acknowledged with `Done`.
    FillPages {
        epoch: u64,
        addrs: Cow<'a, [VirtAddr]>,
        data: &'a [u8],
    },
    /// Empty `[addr, addr+len)` of the connection's space and take fills
    /// of it (`FillPages`) with `epoch` only, from now on; `Done`.
    BeginFill {
        addr: VirtAddr,
        len: u64,
        epoch: u64,
    },
    /// Generic success.
    Done,
    /// A request failed; the connection stays usable.
    Error { code: ErrorCode, message: &'a str },
    /// Ask for the daemon's counters.
    GetStats,
    /// Reply to `GetStats`.
    Stats(DaemonStats),
    /// A control-plane request or reply (to and from the global manager,
    /// processor daemons), a [`control::Request`] or [`control::Reply`] as
    /// JSON. Rare and small next to page traffic, so it is kept readable.
    Control { json: &'a str },
    /// Bytes of a program's standard stream `fd` (0 in, 1 out, 2 err),
    /// between `lego run` and the processor daemon running the program;
    /// empty data is end of file.
    Stdio { fd: u8, data: &'a [u8] },
    /// Ask the home daemon of the connection's space for its layout (a
    /// drain moving the home elsewhere); answered with `Layout`.
    GetLayout,
    /// An address space's layout: the mappings (start, end) and the break.
    /// Sent to a daemon, it makes that daemon the space's home.
    Layout {
        brk_start: VirtAddr,
        brk: VirtAddr,
        mappings: Vec<(u64, u64)>,
    },
    /// Copy the pages this daemon holds of `[addr, addr+len)` of the
    /// connection's space to the memory daemon at `to` (which the runtime
    /// attached to the space first), with `FillPages`: re-replication,
    /// daemon to daemon. Answered with `Copied`.
    CopyRange {
        addr: VirtAddr,
        len: u64,
        to: &'a str,
        epoch: u64,
    },
    /// Reply to `CopyRange`: how many pages were sent.
    Copied { pages: u64 },
    /// A file-system operation on vNode `vnode`'s tree, to a storage
    /// daemon: `path` (and `to`, for `Rename` and `Symlink`'s target),
    /// `offset`/`len` (read, write, truncate, readdir), `mode`, `data`
    /// (write). Answered with `FsReply`.
    FsCall {
        vnode: u64,
        op: FsOp,
        path: &'a str,
        to: &'a str,
        offset: u64,
        len: u64,
        mode: u32,
        data: &'a [u8],
    },
    /// Reply to `FsCall`: `errno` 0 and what the operation returns
    /// (encoded per operation, see `lego_storage`), or the errno.
    FsReply { errno: u32, data: &'a [u8] },
}

/// A file-system operation of [`Message::FsCall`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FsOp {
    Getattr = 1,
    Readdir = 2,
    Create = 3,
    Mkdir = 4,
    Unlink = 5,
    Rmdir = 6,
    Rename = 7,
    Symlink = 8,
    Readlink = 9,
    Truncate = 10,
    Read = 11,
    Write = 12,
    Fsync = 13,
    Statfs = 14,
    /// `mode` is the new permission bits.
    Chmod = 15,
    /// `offset` and `len` are the new access and modification times, in
    /// nanoseconds since the epoch (as i64), or [`TIME_NOW`]/[`TIME_OMIT`].
    Utimens = 16,
    /// Removes the vNode's whole tree (the vNode was deleted); later
    /// calls for it fail with `ESTALE` until the daemon restarts.
    RemoveTree = 17,
}

/// In a `Utimens`: set this time to the storage daemon's clock.
pub const TIME_NOW: u64 = u64::MAX;
/// In a `Utimens`: leave this time as it is.
pub const TIME_OMIT: u64 = u64::MAX - 1;

impl FsOp {
    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        use FsOp::*;
        Ok(match v {
            1 => Getattr,
            2 => Readdir,
            3 => Create,
            4 => Mkdir,
            5 => Unlink,
            6 => Rmdir,
            7 => Rename,
            8 => Symlink,
            9 => Readlink,
            10 => Truncate,
            11 => Read,
            12 => Write,
            13 => Fsync,
            14 => Statfs,
            15 => Chmod,
            16 => Utimens,
            17 => RemoveTree,
            other => return Err(DecodeError::BadValue("file-system operation", other as u64)),
        })
    }
}

/// Most bytes of file data in one `FsCall` or `FsReply`.
pub const MAX_FS_DATA: usize = 1 << 20;

impl Message<'_> {
    /// The message's kind, for error messages ("ReadPages").
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::HelloOk { .. } => "HelloOk",
            Message::Refused { .. } => "Refused",
            Message::Auth { .. } => "Auth",
            Message::AuthOk { .. } => "AuthOk",
            Message::OpenSpace { .. } => "OpenSpace",
            Message::SpaceOpened { .. } => "SpaceOpened",
            Message::ForkSpace { .. } => "ForkSpace",
            Message::AttachSpace { .. } => "AttachSpace",
            Message::Mmap { .. } => "Mmap",
            Message::Mapped { .. } => "Mapped",
            Message::Munmap { .. } => "Munmap",
            Message::Mremap { .. } => "Mremap",
            Message::Brk { .. } => "Brk",
            Message::BrkIs { .. } => "BrkIs",
            Message::Discard { .. } => "Discard",
            Message::ReadPages { .. } => "ReadPages",
            Message::Pages { .. } => "Pages",
            Message::WritePages { .. } => "WritePages",
            Message::Done => "Done",
            Message::Error { .. } => "Error",
            Message::GetStats => "GetStats",
            Message::Stats(_) => "Stats",
            Message::Control { .. } => "Control",
            Message::Stdio { .. } => "Stdio",
            Message::GetLayout => "GetLayout",
            Message::Layout { .. } => "Layout",
            Message::FillPages { .. } => "FillPages",
            Message::BeginFill { .. } => "BeginFill",
            Message::CopyRange { .. } => "CopyRange",
            Message::Copied { .. } => "Copied",
            Message::FsCall { .. } => "FsCall",
            Message::FsReply { .. } => "FsReply",
        }
    }

    /// A short description for error messages: the kind, and for an
    /// `Error` its code and text (never page data, which can be 2 MiB).
    pub fn describe(&self) -> String {
        match self {
            Message::Error { code, message } => format!("Error {code:?}: {message}"),
            Message::Pages { data } => format!("Pages ({} bytes)", data.len()),
            other => other.name().to_string(),
        }
    }
}

/// A message with the request id of its frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub request_id: u64,
    pub message: Message<'a>,
}

/// Why bytes did not decode. Every variant is a reason to close the connection.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame body of {0} bytes exceeds the limit of {MAX_BODY_BYTES}")]
    TooLarge(usize),
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("message truncated while reading {0}")]
    Truncated(&'static str),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("invalid {0}: {1}")]
    BadValue(&'static str, u64),
    #[error("string field is not UTF-8")]
    BadUtf8,
    #[error("page data length {0} does not match {1} pages")]
    PageData(usize, usize),
}

mod kind {
    pub const HELLO: u16 = 1;
    pub const HELLO_OK: u16 = 2;
    pub const REFUSED: u16 = 3;
    pub const AUTH: u16 = 4;
    pub const AUTH_OK: u16 = 5;
    pub const OPEN_SPACE: u16 = 10;
    pub const SPACE_OPENED: u16 = 11;
    pub const ATTACH_SPACE: u16 = 12;
    pub const FORK_SPACE: u16 = 13;
    pub const MMAP: u16 = 20;
    pub const MAPPED: u16 = 21;
    pub const MUNMAP: u16 = 22;
    pub const MREMAP: u16 = 23;
    pub const BRK: u16 = 24;
    pub const BRK_IS: u16 = 25;
    pub const DISCARD: u16 = 26;
    pub const READ_PAGES: u16 = 30;
    pub const PAGES: u16 = 31;
    pub const WRITE_PAGES: u16 = 32;
    pub const DONE: u16 = 40;
    pub const ERROR: u16 = 41;
    pub const GET_STATS: u16 = 50;
    pub const STATS: u16 = 51;
    pub const CONTROL: u16 = 60;
    pub const STDIO: u16 = 61;
    pub const GET_LAYOUT: u16 = 62;
    pub const LAYOUT: u16 = 63;
    pub const FILL_PAGES: u16 = 64;
    pub const COPY_RANGE: u16 = 65;
    pub const COPIED: u16 = 66;
    pub const BEGIN_FILL: u16 = 67;
    pub const FS_CALL: u16 = 68;
    pub const FS_REPLY: u16 = 69;
}

struct Writer<'b>(&'b mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        let s = &s.as_bytes()[..s.len().min(MAX_STRING_BYTES)];
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s);
    }
    fn bytes(&mut self, b: &[u8]) {
        assert!(b.len() <= MAX_STRING_BYTES, "byte field too long");
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn addrs(&mut self, addrs: &[VirtAddr]) {
        self.u32(addrs.len() as u32);
        for a in addrs {
            self.u64(a.0);
        }
    }
}

/// Appends the frame for `message` to `out`.
///
/// # Panics
/// If a page batch is larger than [`MAX_BATCH_PAGES`] or page data does not
/// match its address list: those are bugs of the sender, not wire input.
pub fn encode(request_id: u64, message: &Message<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_BYTES]);
    let mut w = Writer(out);
    let kind = match message {
        Message::Hello {
            version,
            role,
            name,
        } => {
            w.0.extend_from_slice(&MAGIC);
            w.u16(*version);
            w.u8(*role as u8);
            w.str(name);
            kind::HELLO
        }
        Message::HelloOk {
            version,
            capacity_bytes,
        } => {
            w.u16(*version);
            w.u64(*capacity_bytes);
            kind::HELLO_OK
        }
        Message::Refused { reason } => {
            w.str(reason);
            kind::REFUSED
        }
        Message::Auth { identity, noise } => {
            w.str(identity);
            w.bytes(noise);
            kind::AUTH
        }
        Message::AuthOk { noise } => {
            w.bytes(noise);
            kind::AUTH_OK
        }
        Message::OpenSpace {
            pid,
            program,
            region_base,
            region_bytes,
            bootstrap_bytes,
            capability,
        } => {
            w.u32(*pid);
            w.str(program);
            w.u64(region_base.0);
            w.u64(*region_bytes);
            w.u64(*bootstrap_bytes);
            w.0.extend_from_slice(&capability.0);
            kind::OPEN_SPACE
        }
        Message::SpaceOpened { space } => {
            w.u64(space.0);
            kind::SPACE_OPENED
        }
        Message::AttachSpace {
            space,
            capability,
            region_base,
            region_bytes,
        } => {
            w.u64(space.0);
            w.0.extend_from_slice(&capability.0);
            w.u64(region_base.0);
            w.u64(*region_bytes);
            kind::ATTACH_SPACE
        }
        Message::ForkSpace {
            parent,
            parent_capability,
            child,
            child_capability,
        } => {
            w.u64(parent.0);
            w.0.extend_from_slice(&parent_capability.0);
            w.u64(child.0);
            w.0.extend_from_slice(&child_capability.0);
            kind::FORK_SPACE
        }
        Message::Mmap { len } => {
            w.u64(*len);
            kind::MMAP
        }
        Message::Mapped { addr } => {
            w.u64(addr.0);
            kind::MAPPED
        }
        Message::Munmap { addr, len } => {
            w.u64(addr.0);
            w.u64(*len);
            kind::MUNMAP
        }
        Message::Mremap {
            old,
            old_len,
            new_len,
            may_move,
        } => {
            w.u64(old.0);
            w.u64(*old_len);
            w.u64(*new_len);
            w.u8(*may_move as u8);
            kind::MREMAP
        }
        Message::Brk { new_brk } => {
            w.u64(new_brk.0);
            kind::BRK
        }
        Message::BrkIs { brk } => {
            w.u64(brk.0);
            kind::BRK_IS
        }
        Message::Discard { addr, len } => {
            w.u64(addr.0);
            w.u64(*len);
            kind::DISCARD
        }
        Message::ReadPages { addrs } => {
            assert!(addrs.len() <= MAX_BATCH_PAGES, "read batch too large");
            w.addrs(addrs);
            kind::READ_PAGES
        }
        Message::Pages { data } => {
            assert!(data.len() % PAGE_SIZE == 0 && data.len() / PAGE_SIZE <= MAX_BATCH_PAGES);
            w.u32((data.len() / PAGE_SIZE) as u32);
            w.0.extend_from_slice(data);
            kind::PAGES
        }
        Message::WritePages { addrs, data } => {
            assert!(addrs.len() <= MAX_BATCH_PAGES, "write batch too large");
            assert_eq!(addrs.len() * PAGE_SIZE, data.len(), "page data mismatch");
            w.addrs(addrs);
            w.0.extend_from_slice(data);
            kind::WRITE_PAGES
        }
        Message::FillPages { epoch, addrs, data } => {
            assert!(addrs.len() <= MAX_BATCH_PAGES, "fill batch too large");
            assert_eq!(addrs.len() * PAGE_SIZE, data.len(), "page data mismatch");
            w.u64(*epoch);
            w.addrs(addrs);
            w.0.extend_from_slice(data);
            kind::FILL_PAGES
        }
        Message::BeginFill { addr, len, epoch } => {
            w.u64(addr.0);
            w.u64(*len);
            w.u64(*epoch);
            kind::BEGIN_FILL
        }
        Message::CopyRange {
            addr,
            len,
            to,
            epoch,
        } => {
            w.u64(addr.0);
            w.u64(*len);
            w.str(to);
            w.u64(*epoch);
            kind::COPY_RANGE
        }
        Message::Copied { pages } => {
            w.u64(*pages);
            kind::COPIED
        }
        Message::FsCall {
            vnode,
            op,
            path,
            to,
            offset,
            len,
            mode,
            data,
        } => {
            assert!(data.len() <= MAX_FS_DATA, "file data too large");
            w.u64(*vnode);
            w.u8(*op as u8);
            w.str(path);
            w.str(to);
            w.u64(*offset);
            w.u64(*len);
            w.u32(*mode);
            w.u32(data.len() as u32);
            w.0.extend_from_slice(data);
            kind::FS_CALL
        }
        Message::FsReply { errno, data } => {
            assert!(data.len() <= MAX_FS_DATA + 4096, "reply data too large");
            w.u32(*errno);
            w.u32(data.len() as u32);
            w.0.extend_from_slice(data);
            kind::FS_REPLY
        }
        Message::Done => kind::DONE,
        Message::Error { code, message } => {
            w.u16(*code as u16);
            w.str(message);
            kind::ERROR
        }
        Message::GetStats => kind::GET_STATS,
        Message::Stats(s) => {
            w.u64(s.capacity_bytes);
            w.u64(s.used_bytes);
            w.u64(s.spaces);
            w.u64(s.connections);
            kind::STATS
        }
        Message::Control { json } => {
            assert!(json.len() <= MAX_CONTROL_BYTES, "control message too large");
            w.u32(json.len() as u32);
            w.0.extend_from_slice(json.as_bytes());
            kind::CONTROL
        }
        Message::Stdio { fd, data } => {
            assert!(data.len() <= MAX_STDIO_BYTES, "stdio chunk too large");
            w.u8(*fd);
            w.u32(data.len() as u32);
            w.0.extend_from_slice(data);
            kind::STDIO
        }
        Message::GetLayout => kind::GET_LAYOUT,
        Message::Layout {
            brk_start,
            brk,
            mappings,
        } => {
            assert!(mappings.len() <= MAX_MAPPINGS, "layout too large");
            w.u64(brk_start.0);
            w.u64(brk.0);
            w.u32(mappings.len() as u32);
            for &(start, end) in mappings {
                w.u64(start);
                w.u64(end);
            }
            kind::LAYOUT
        }
    };
    let body_len = out.len() - start - HEADER_BYTES;
    debug_assert!(body_len <= MAX_BODY_BYTES);
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + 6].copy_from_slice(&kind.to_le_bytes());
    out[start + 6..start + 14].copy_from_slice(&request_id.to_le_bytes());
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub body_len: usize,
    pub kind: u16,
    pub request_id: u64,
}

/// Parses and checks a frame header; rejects oversize bodies before any
/// buffer is allocated for them.
pub fn decode_header(bytes: &[u8; HEADER_BYTES]) -> Result<Header, DecodeError> {
    let body_len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
    let kind = u16::from_le_bytes(bytes[4..6].try_into().expect("2 bytes"));
    let request_id = u64::from_le_bytes(bytes[6..14].try_into().expect("8 bytes"));
    if body_len > MAX_BODY_BYTES {
        return Err(DecodeError::TooLarge(body_len));
    }
    if !(kind::HELLO..=kind::FS_REPLY).contains(&kind) {
        return Err(DecodeError::UnknownKind(kind));
    }
    Ok(Header {
        body_len,
        kind,
        request_id,
    })
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2"),
        ))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }
    fn addr(&mut self, what: &'static str) -> Result<VirtAddr, DecodeError> {
        self.u64(what).map(VirtAddr)
    }
    fn str(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        let len = self.u32(what)? as usize;
        if len > MAX_STRING_BYTES {
            return Err(DecodeError::BadValue("string length", len as u64));
        }
        std::str::from_utf8(self.take(len, what)?).map_err(|_| DecodeError::BadUtf8)
    }
    fn capability(&mut self) -> Result<Capability, DecodeError> {
        Ok(Capability(
            self.take(16, "capability")?.try_into().expect("16 bytes"),
        ))
    }
    fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(what)? as usize;
        if len > MAX_STRING_BYTES {
            return Err(DecodeError::BadValue("field length", len as u64));
        }
        self.take(len, what)
    }
    fn count(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let n = self.u32(what)? as usize;
        if n > MAX_BATCH_PAGES {
            return Err(DecodeError::BadValue("batch size", n as u64));
        }
        Ok(n)
    }
    fn addrs(&mut self) -> Result<Vec<VirtAddr>, DecodeError> {
        let n = self.count("page count")?;
        if self.buf.len() < n * 8 {
            return Err(DecodeError::Truncated("page addresses"));
        }
        (0..n).map(|_| self.addr("page address")).collect()
    }
}

/// Decodes one frame body of the given header.
pub fn decode_body<'a>(header: Header, body: &'a [u8]) -> Result<Frame<'a>, DecodeError> {
    if body.len() != header.body_len {
        return Err(DecodeError::Truncated("body"));
    }
    let mut r = Reader { buf: body };
    let message = match header.kind {
        kind::HELLO => {
            if r.take(4, "magic")? != MAGIC {
                return Err(DecodeError::BadValue("magic", 0));
            }
            let version = r.u16("version")?;
            let role = match r.u8("role")? {
                1 => Role::Runtime,
                2 => Role::Client,
                other => return Err(DecodeError::BadValue("role", other as u64)),
            };
            Message::Hello {
                version,
                role,
                name: r.str("name")?,
            }
        }
        kind::HELLO_OK => Message::HelloOk {
            version: r.u16("version")?,
            capacity_bytes: r.u64("capacity")?,
        },
        kind::REFUSED => Message::Refused {
            reason: r.str("reason")?,
        },
        kind::AUTH => Message::Auth {
            identity: r.str("identity")?,
            noise: r.bytes("handshake")?,
        },
        kind::AUTH_OK => Message::AuthOk {
            noise: r.bytes("handshake")?,
        },
        kind::OPEN_SPACE => Message::OpenSpace {
            pid: r.u32("pid")?,
            program: r.str("program")?,
            region_base: r.addr("region base")?,
            region_bytes: r.u64("region size")?,
            bootstrap_bytes: r.u64("bootstrap size")?,
            capability: r.capability()?,
        },
        kind::SPACE_OPENED => Message::SpaceOpened {
            space: SpaceId(r.u64("space")?),
        },
        kind::ATTACH_SPACE => Message::AttachSpace {
            space: SpaceId(r.u64("space")?),
            capability: r.capability()?,
            region_base: r.addr("region base")?,
            region_bytes: r.u64("region size")?,
        },
        kind::FORK_SPACE => Message::ForkSpace {
            parent: SpaceId(r.u64("parent space")?),
            parent_capability: r.capability()?,
            child: SpaceId(r.u64("child space")?),
            child_capability: r.capability()?,
        },
        kind::MMAP => Message::Mmap {
            len: r.u64("length")?,
        },
        kind::MAPPED => Message::Mapped {
            addr: r.addr("address")?,
        },
        kind::MUNMAP => Message::Munmap {
            addr: r.addr("address")?,
            len: r.u64("length")?,
        },
        kind::MREMAP => Message::Mremap {
            old: r.addr("address")?,
            old_len: r.u64("old length")?,
            new_len: r.u64("new length")?,
            may_move: match r.u8("may_move")? {
                0 => false,
                1 => true,
                other => return Err(DecodeError::BadValue("may_move", other as u64)),
            },
        },
        kind::BRK => Message::Brk {
            new_brk: r.addr("break")?,
        },
        kind::BRK_IS => Message::BrkIs {
            brk: r.addr("break")?,
        },
        kind::DISCARD => Message::Discard {
            addr: r.addr("address")?,
            len: r.u64("length")?,
        },
        kind::READ_PAGES => Message::ReadPages {
            addrs: r.addrs()?.into(),
        },
        kind::PAGES => {
            let n = r.count("page count")?;
            let data = r.take(n * PAGE_SIZE, "page data")?;
            Message::Pages { data }
        }
        kind::WRITE_PAGES => {
            let addrs = r.addrs()?;
            let data = r.take(addrs.len() * PAGE_SIZE, "page data")?;
            Message::WritePages {
                addrs: addrs.into(),
                data,
            }
        }
        kind::FILL_PAGES => {
            let epoch = r.u64("epoch")?;
            let addrs = r.addrs()?;
            let data = r.take(addrs.len() * PAGE_SIZE, "page data")?;
            Message::FillPages {
                epoch,
                addrs: addrs.into(),
                data,
            }
        }
        kind::BEGIN_FILL => Message::BeginFill {
            addr: r.addr("address")?,
            len: r.u64("length")?,
            epoch: r.u64("epoch")?,
        },
        kind::COPY_RANGE => Message::CopyRange {
            addr: r.addr("address")?,
            len: r.u64("length")?,
            to: r.str("target")?,
            epoch: r.u64("epoch")?,
        },
        kind::COPIED => Message::Copied {
            pages: r.u64("pages")?,
        },
        kind::FS_CALL => {
            let vnode = r.u64("vnode")?;
            let op = FsOp::from_u8(r.u8("operation")?)?;
            let path = r.str("path")?;
            let to = r.str("second path")?;
            let offset = r.u64("offset")?;
            let len = r.u64("length")?;
            let mode = r.u32("mode")?;
            let n = r.u32("data length")? as usize;
            if n > MAX_FS_DATA {
                return Err(DecodeError::BadValue("file data length", n as u64));
            }
            Message::FsCall {
                vnode,
                op,
                path,
                to,
                offset,
                len,
                mode,
                data: r.take(n, "file data")?,
            }
        }
        kind::FS_REPLY => {
            let errno = r.u32("errno")?;
            let n = r.u32("data length")? as usize;
            if n > MAX_FS_DATA + 4096 {
                return Err(DecodeError::BadValue("reply data length", n as u64));
            }
            Message::FsReply {
                errno,
                data: r.take(n, "reply data")?,
            }
        }
        kind::DONE => Message::Done,
        kind::ERROR => Message::Error {
            code: ErrorCode::from_u16(r.u16("error code")?)?,
            message: r.str("message")?,
        },
        kind::GET_STATS => Message::GetStats,
        kind::STATS => Message::Stats(DaemonStats {
            capacity_bytes: r.u64("capacity")?,
            used_bytes: r.u64("used")?,
            spaces: r.u64("spaces")?,
            connections: r.u64("connections")?,
        }),
        kind::CONTROL => {
            let len = r.u32("control length")? as usize;
            if len > MAX_CONTROL_BYTES {
                return Err(DecodeError::BadValue("control length", len as u64));
            }
            let json = std::str::from_utf8(r.take(len, "control message")?)
                .map_err(|_| DecodeError::BadUtf8)?;
            Message::Control { json }
        }
        kind::STDIO => {
            let fd = r.u8("stream")?;
            if fd > 2 {
                return Err(DecodeError::BadValue("stream", fd as u64));
            }
            let len = r.u32("stdio length")? as usize;
            if len > MAX_STDIO_BYTES {
                return Err(DecodeError::BadValue("stdio length", len as u64));
            }
            Message::Stdio {
                fd,
                data: r.take(len, "stdio data")?,
            }
        }
        kind::GET_LAYOUT => Message::GetLayout,
        kind::LAYOUT => {
            let brk_start = r.addr("break start")?;
            let brk = r.addr("break")?;
            let n = r.u32("mapping count")? as usize;
            if n > MAX_MAPPINGS || r.buf.len() < n * 16 {
                return Err(DecodeError::BadValue("mapping count", n as u64));
            }
            let mappings = (0..n)
                .map(|_| Ok((r.u64("mapping start")?, r.u64("mapping end")?)))
                .collect::<Result<_, DecodeError>>()?;
            Message::Layout {
                brk_start,
                brk,
                mappings,
            }
        }
        other => return Err(DecodeError::UnknownKind(other)),
    };
    if !r.buf.is_empty() {
        return Err(DecodeError::Trailing(r.buf.len()));
    }
    Ok(Frame {
        request_id: header.request_id,
        message,
    })
}

/// Decodes one whole frame (header and body) from `bytes`, which must hold
/// exactly one frame.
pub fn decode(bytes: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let head: &[u8; HEADER_BYTES] = bytes
        .get(..HEADER_BYTES)
        .ok_or(DecodeError::Truncated("header"))?
        .try_into()
        .expect("header length");
    let header = decode_header(head)?;
    decode_body(header, &bytes[HEADER_BYTES..])
}

/// Checks a peer's `Hello` version; the error text is what the refusing side
/// sends and logs.
pub fn check_version(peer_version: u16) -> Result<(), String> {
    if peer_version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(format!(
            "peer speaks lego protocol version {peer_version}, this side speaks version {PROTOCOL_VERSION}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(m: Message<'_>) {
        let mut buf = Vec::new();
        encode(42, &m, &mut buf);
        let f = decode(&buf).expect("decodes");
        assert_eq!(f.request_id, 42);
        assert_eq!(f.message, m);
    }

    #[test]
    fn every_message_roundtrips() {
        let page = vec![7u8; PAGE_SIZE * 2];
        for m in [
            Message::Hello {
                version: 1,
                role: Role::Runtime,
                name: "python3",
            },
            Message::HelloOk {
                version: 1,
                capacity_bytes: 1 << 30,
            },
            Message::Refused { reason: "no" },
            Message::Auth {
                identity: "user:alice",
                noise: &[1, 2, 3],
            },
            Message::AuthOk { noise: &[9; 48] },
            Message::OpenSpace {
                pid: 7,
                program: "sort",
                region_base: VirtAddr(1 << 40),
                region_bytes: 1 << 36,
                bootstrap_bytes: 1 << 20,
                capability: Capability([7; 16]),
            },
            Message::SpaceOpened { space: SpaceId(3) },
            Message::AttachSpace {
                space: SpaceId(3),
                capability: Capability([1; 16]),
                region_base: VirtAddr(4096),
                region_bytes: 8192,
            },
            Message::ForkSpace {
                parent: SpaceId(3),
                parent_capability: Capability([2; 16]),
                child: SpaceId(0),
                child_capability: Capability([3; 16]),
            },
            Message::Mmap { len: 8192 },
            Message::Mapped {
                addr: VirtAddr(4096),
            },
            Message::Munmap {
                addr: VirtAddr(4096),
                len: 4096,
            },
            Message::Mremap {
                old: VirtAddr(4096),
                old_len: 4096,
                new_len: 8192,
                may_move: true,
            },
            Message::Brk {
                new_brk: VirtAddr(0),
            },
            Message::BrkIs {
                brk: VirtAddr(8192),
            },
            Message::Discard {
                addr: VirtAddr(4096),
                len: 4096,
            },
            Message::ReadPages {
                addrs: vec![VirtAddr(4096), VirtAddr(8192)].into(),
            },
            Message::Pages { data: &page },
            Message::WritePages {
                addrs: vec![VirtAddr(4096), VirtAddr(8192)].into(),
                data: &page,
            },
            Message::Done,
            Message::Error {
                code: ErrorCode::NoMemory,
                message: "full",
            },
            Message::GetStats,
            Message::Stats(DaemonStats {
                capacity_bytes: 1,
                used_bytes: 2,
                spaces: 3,
                connections: 4,
            }),
            Message::Control {
                json: r#"{"op":"status"}"#,
            },
            Message::Stdio {
                fd: 1,
                data: b"hello\n",
            },
            Message::GetLayout,
            Message::FillPages {
                epoch: 9,
                addrs: vec![VirtAddr(4096), VirtAddr(8192)].into(),
                data: &page,
            },
            Message::BeginFill {
                addr: VirtAddr(1 << 24),
                len: 16 << 20,
                epoch: 9,
            },
            Message::CopyRange {
                addr: VirtAddr(1 << 24),
                len: 16 << 20,
                to: "10.0.0.3:7000",
                epoch: 9,
            },
            Message::Copied { pages: 12 },
            Message::FsCall {
                vnode: 3,
                op: FsOp::Write,
                path: "dir/file.db",
                to: "",
                offset: 8192,
                len: 5,
                mode: 0o644,
                data: b"hello",
            },
            Message::FsReply {
                errno: 2,
                data: b"",
            },
            Message::Layout {
                brk_start: VirtAddr(1 << 30),
                brk: VirtAddr((1 << 30) + 8192),
                mappings: vec![(1 << 31, (1 << 31) + 4096)],
            },
        ] {
            roundtrip(m);
        }
    }

    #[test]
    fn zero_kind_is_invalid() {
        assert_eq!(
            decode(&[0u8; HEADER_BYTES]),
            Err(DecodeError::UnknownKind(0))
        );
    }

    #[test]
    fn oversize_body_is_refused_from_the_header() {
        let mut h = [0u8; HEADER_BYTES];
        h[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        h[4..6].copy_from_slice(&kind::PAGES.to_le_bytes());
        assert!(matches!(decode_header(&h), Err(DecodeError::TooLarge(_))));
    }

    #[test]
    fn batch_count_larger_than_data_is_truncated_not_allocated() {
        let mut buf = Vec::new();
        encode(
            1,
            &Message::ReadPages {
                addrs: vec![].into(),
            },
            &mut buf,
        );
        // Claim 512 addresses but carry none.
        buf[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&512u32.to_le_bytes());
        assert_eq!(decode(&buf), Err(DecodeError::Truncated("page addresses")));
    }

    #[test]
    fn version_mismatch_names_both_versions() {
        let e = check_version(PROTOCOL_VERSION + 1).unwrap_err();
        assert!(e.contains(&format!("version {}", PROTOCOL_VERSION + 1)));
        assert!(e.contains(&format!("version {PROTOCOL_VERSION}")));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn arbitrary_body_with_valid_header_never_panics(
            kind in 0u16..70,
            body in proptest::collection::vec(any::<u8>(), 0..1024),
        ) {
            let mut buf = Vec::new();
            buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
            buf.extend_from_slice(&kind.to_le_bytes());
            buf.extend_from_slice(&9u64.to_le_bytes());
            buf.extend_from_slice(&body);
            let _ = decode(&buf);
        }

        #[test]
        fn truncating_a_valid_frame_never_panics(cut in 0usize..64, n in 0usize..4) {
            let page = vec![1u8; PAGE_SIZE * n];
            let addrs: Vec<_> = (0..n as u64).map(|i| VirtAddr(i * 4096)).collect();
            let mut buf = Vec::new();
            encode(5, &Message::WritePages { addrs: addrs.into(), data: &page }, &mut buf);
            let keep = buf.len().saturating_sub(cut);
            let r = decode(&buf[..keep]);
            if cut == 0 { prop_assert!(r.is_ok()); } else { prop_assert!(r.is_err()); }
        }
    }
}
