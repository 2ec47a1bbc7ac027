//! What an `FsCall` does to a tree, and how its answer is encoded in the
//! `FsReply` (little endian, fixed layouts).

use std::io;

use lego_protocol::{FsOp, MAX_FS_DATA};

use crate::tree::{Attr, Kind, Space, Time, Tree};

/// One entry of a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub kind: Kind,
}

fn kind_byte(k: Kind) -> u8 {
    match k {
        Kind::File => 1,
        Kind::Dir => 2,
        Kind::Symlink => 3,
        Kind::Other => 4,
    }
}

fn byte_kind(b: u8) -> Kind {
    match b {
        1 => Kind::File,
        2 => Kind::Dir,
        3 => Kind::Symlink,
        _ => Kind::Other,
    }
}

fn short() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "a storage reply was cut short")
}

/// Applies `op` to `t`; its answer goes to `out`.
pub(crate) fn apply(
    t: &Tree,
    op: FsOp,
    (path, to): (&str, &str),
    (offset, len, mode): (u64, u64, u32),
    data: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    match op {
        FsOp::Getattr => encode_attr(&t.getattr(path)?, out),
        FsOp::Readdir => {
            let entries = t.readdir(path)?;
            encode_dir(&entries, offset as usize, out);
        }
        FsOp::Create => t.create(path, mode)?,
        FsOp::Mkdir => t.mkdir(path, mode)?,
        FsOp::Unlink => t.unlink(path)?,
        FsOp::Rmdir => t.rmdir(path)?,
        FsOp::Rename => t.rename(path, to)?,
        FsOp::Symlink => t.symlink(to, path)?,
        FsOp::Readlink => out.extend_from_slice(t.readlink(path)?.as_bytes()),
        FsOp::Truncate => t.truncate(path, len)?,
        FsOp::Read => out.extend(t.read(path, offset, (len as usize).min(MAX_FS_DATA))?),
        FsOp::Write => t.write(path, offset, data)?,
        FsOp::Fsync => t.fsync(path)?,
        FsOp::Chmod => t.chmod(path, mode)?,
        FsOp::Utimens => t.utimens(path, Time::from_wire(offset), Time::from_wire(len))?,
        // Served by the daemon (`remove_tree`), never here.
        FsOp::RemoveTree => return Err(io::Error::from_raw_os_error(22)),
        FsOp::Statfs => {
            let s = t.statfs()?;
            out.extend_from_slice(&s.total_bytes.to_le_bytes());
            out.extend_from_slice(&s.free_bytes.to_le_bytes());
        }
    }
    Ok(())
}

fn encode_attr(a: &Attr, out: &mut Vec<u8>) {
    out.push(kind_byte(a.kind));
    out.extend_from_slice(&a.size.to_le_bytes());
    out.extend_from_slice(&a.mode.to_le_bytes());
    out.extend_from_slice(&a.nlink.to_le_bytes());
    out.extend_from_slice(&a.ino.to_le_bytes());
    out.extend_from_slice(&a.mtime_ns.to_le_bytes());
}

fn u64_at(d: &[u8], at: usize) -> io::Result<u64> {
    d.get(at..at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(short)
}

pub(crate) fn decode_attr(d: &[u8]) -> io::Result<Attr> {
    let kind = byte_kind(*d.first().ok_or_else(short)?);
    let mode = d
        .get(9..13)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .ok_or_else(short)?;
    let mtime_ns = d
        .get(29..45)
        .map(|b| i128::from_le_bytes(b.try_into().expect("16 bytes")))
        .ok_or_else(short)?;
    Ok(Attr {
        kind,
        size: u64_at(d, 1)?,
        mode,
        nlink: u64_at(d, 13)?,
        ino: u64_at(d, 21)?,
        mtime_ns,
    })
}

/// Entries from the `from`-th on, as many as fit one reply; the first
/// byte says whether more follow.
fn encode_dir(entries: &[(String, Kind)], from: usize, out: &mut Vec<u8>) {
    out.push(0);
    for (k, (name, kind)) in entries.iter().enumerate().skip(from) {
        if out.len() + 3 + name.len() > MAX_FS_DATA {
            out[0] = u8::from(k < entries.len());
            return;
        }
        out.push(kind_byte(*kind));
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
    }
}

pub(crate) fn decode_dir(d: &[u8]) -> io::Result<(Vec<DirEntry>, bool)> {
    let more = *d.first().ok_or_else(short)? != 0;
    let mut at = 1;
    let mut entries = Vec::new();
    while at < d.len() {
        let kind = byte_kind(d[at]);
        let n = d
            .get(at + 1..at + 3)
            .map(|b| u16::from_le_bytes(b.try_into().expect("2 bytes")) as usize)
            .ok_or_else(short)?;
        let name = d.get(at + 3..at + 3 + n).ok_or_else(short)?;
        entries.push(DirEntry {
            name: String::from_utf8_lossy(name).into_owned(),
            kind,
        });
        at += 3 + n;
    }
    Ok((entries, more))
}

pub(crate) fn decode_space(d: &[u8]) -> io::Result<Space> {
    Ok(Space {
        total_bytes: u64_at(d, 0)?,
        free_bytes: u64_at(d, 8)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_and_directories_roundtrip() {
        let a = Attr {
            kind: Kind::Symlink,
            size: 1 << 40,
            mode: 0o755,
            nlink: 3,
            ino: 99,
            mtime_ns: -5,
        };
        let mut out = Vec::new();
        encode_attr(&a, &mut out);
        assert_eq!(decode_attr(&out).unwrap(), a);
        assert!(decode_attr(&out[..20]).is_err());
        let entries: Vec<(String, Kind)> = (0..100_000)
            .map(|k| (format!("file-{k:06}"), Kind::File))
            .collect();
        let (mut got, mut from) = (Vec::new(), 0);
        loop {
            out.clear();
            encode_dir(&entries, from, &mut out);
            assert!(out.len() <= MAX_FS_DATA);
            let (e, more) = decode_dir(&out).unwrap();
            from += e.len();
            got.extend(e);
            if !more {
                break;
            }
        }
        assert_eq!(got.len(), entries.len());
        assert_eq!(got[99_999].name, "file-099999");
    }
}
