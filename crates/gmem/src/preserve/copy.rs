//! The kernel guest_memfd across a live update: a copy, honestly labelled.
//!
//! The kernel ties a guest_memfd to the VM that created it: a new process can map and read
//! the received file (with `MMAP`), but binding it to a memslot of a new VM fails with
//! `EINVAL` and the old VM cannot be run from another process (`EIO`). Until a kernel carries
//! the VM across (the state's `VM` section is there for that: [`super::VmLink::Carried`]),
//! the new owner must create a new VM and a new file and copy: [`copy_into_new`] does that,
//! restores every attribute, and reports what it cost. It is a copy, not a hand-over: its
//! time grows with the memory in use.

use std::time::{Duration, Instant};

use crate::model::error::Errno;
use crate::model::flags::Flags;
use crate::model::units::ByteRange;
use crate::sys::to_usize;
use crate::verbs::GuestMemfd;

use super::error::HandoverError;

/// Chunk of one copy step.
const CHUNK: u64 = 2 << 20;

/// What a copy cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyReport {
    /// Bytes of the file.
    pub size: u64,
    /// Bytes actually copied (holes of the old file are skipped where the backing reports
    /// them with `SEEK_DATA`/`SEEK_HOLE`, and all-zero chunks are not written).
    pub copied: u64,
    /// Attribute runs restored.
    pub runs: usize,
    /// Wall time of the copy and the attribute restore.
    pub elapsed: Duration,
}

/// The data ranges of `mem`: from `SEEK_DATA`/`SEEK_HOLE` where the backing supports them,
/// else the whole file.
fn data_ranges(mem: &GuestMemfd) -> Vec<ByteRange> {
    use rustix::fs::{seek, SeekFrom};
    let size = mem.size();
    let mut out = Vec::new();
    let mut at = 0;
    while at < size {
        let start = match seek(mem, SeekFrom::Data(at)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => {
                return vec![ByteRange {
                    start: 0,
                    end: size,
                }]
            }
        };
        let end = match seek(mem, SeekFrom::Hole(start)) {
            Ok(e) => e.min(size),
            Err(_) => {
                return vec![ByteRange {
                    start: 0,
                    end: size,
                }]
            }
        };
        if end <= start {
            break;
        }
        out.push(ByteRange { start, end });
        at = end;
    }
    out
}

/// Faults `[at, at + len)` of `mem`'s own mapping in with one call (`MADV_POPULATE_WRITE`),
/// much cheaper than a fault per page where faults are expensive (nested or software
/// virtualization). Best effort: on failure the copy faults the pages in itself.
fn populate(mem: &GuestMemfd, at: u64, len: u64) {
    if let (Some(map), Ok(off), Ok(len)) = (mem.inner.guest_map(), to_usize(at), to_usize(len)) {
        let _ = map.advise(off, len, libc::MADV_POPULATE_WRITE);
    }
}

/// Copies `old` (typically a kernel guest_memfd received from the old owner) into a new file
/// made by `create(size, flags)` (typically a guest_memfd of the new VM, through the KVM
/// crate), then restores every attribute run on it. Contents of private pages are copied too
/// (through the guest views). The new file must be fresh (reading zero) and, like `old`,
/// mappable (`MMAP`), else [`crate::AccessError::NoMapping`] (`ENODEV`).
pub fn copy_into_new(
    old: &GuestMemfd,
    create: impl FnOnce(u64, Flags) -> Result<GuestMemfd, HandoverError>,
) -> Result<(GuestMemfd, CopyReport), HandoverError> {
    let started = Instant::now();
    let new = create(old.size(), old.flags())?;
    if new.size() != old.size() {
        return Err(HandoverError::Mismatch {
            file: 0,
            what: "the new file's size differs",
        });
    }
    let (src, dst) = (old.guest()?, new.guest()?);
    let mut buf = vec![0u8; to_usize(CHUNK).unwrap_or(1 << 21)];
    let mut copied = 0;
    for r in data_ranges(old) {
        let mut at = r.start;
        while at < r.end {
            let n = (r.end - at).min(CHUNK);
            let chunk = &mut buf[..to_usize(n).unwrap_or(0)];
            src.read(at, chunk)?;
            if chunk.iter().any(|&b| b != 0) {
                populate(&new, at, n);
                dst.write(at, chunk)?;
                copied += n;
            }
            at += n;
        }
    }
    let runs = old.runs(0, old.size()).map_err(|e| HandoverError::Os {
        op: "runs",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    for run in &runs {
        let all_same = new
            .runs(run.offset, run.len)
            .map(|v| v.len() == 1 && v[0].attr == run.attr)
            .unwrap_or(false);
        if !all_same {
            new.convert(run.offset, run.len, run.attr)?;
        }
    }
    Ok((
        new,
        CopyReport {
            size: old.size(),
            copied,
            runs: runs.len(),
            elapsed: started.elapsed(),
        },
    ))
}
