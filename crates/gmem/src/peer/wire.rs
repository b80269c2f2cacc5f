//! The peer protocol's bytes: the hello, requests and replies, the run table. Everything
//! read here comes from another process and is parsed as untrusted input (never panics).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::backing::BackingKind;
use crate::engine::participant::Step;
use crate::model::attr::{Attr, AttrMap};
use crate::model::flags::Flags;
use crate::model::units::{ByteRange, PAGE_SIZE};
use crate::sys::mapping::Mapping;
use crate::sys::{fd, to_usize};

use super::PeerError;

pub(crate) const MAGIC: u32 = u32::from_le_bytes(*b"GMP1");
pub(crate) const HELLO_LEN: usize = 48;
pub(crate) const MSG_LEN: usize = 24;
const OP_REVOKE: u32 = 1;
const OP_RESTORE: u32 = 2;
const OP_SPLIT: u32 = 3;
const OP_MERGE: u32 = 4;
const OP_POISON: u32 = 5;
const OP_UNPOISON: u32 = 6;
const OP_REFRESH: u32 = 7;
const OP_FREEZE: u32 = 8;
const OP_THAW: u32 = 9;
/// Largest number of runs a hello may announce (2^30 runs = 8 GiB of run table).
const MAX_RUNS: u64 = 1 << 30;

/// A request as it travels: `op:u32 seq:u32 offset:u64 len:u64`, little-endian.
pub(crate) fn encode_request(step: &Step, seq: u32) -> [u8; MSG_LEN] {
    let (op, r) = match *step {
        Step::Revoke(r) => (OP_REVOKE, r),
        Step::Restore(r) => (OP_RESTORE, r),
        Step::Split(r) => (OP_SPLIT, r),
        Step::Merge(r) => (OP_MERGE, r),
        Step::Poison(r) => (OP_POISON, r),
        Step::Unpoison(r) => (OP_UNPOISON, r),
        Step::Refresh(r) => (OP_REFRESH, r),
        Step::Freeze(r) => (OP_FREEZE, r),
        Step::Thaw(r) => (OP_THAW, r),
    };
    let mut msg = [0u8; MSG_LEN];
    msg[0..4].copy_from_slice(&op.to_le_bytes());
    msg[4..8].copy_from_slice(&seq.to_le_bytes());
    msg[8..16].copy_from_slice(&r.start.to_le_bytes());
    msg[16..24].copy_from_slice(&r.len().to_le_bytes());
    msg
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[i..i + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(w)
}

/// A decoded request: the step (or `Err(offset)` for an unknown op or a bad range) and its
/// sequence number.
pub(crate) fn decode_request(b: &[u8; MSG_LEN]) -> (Result<Step, u64>, u32) {
    let (op, seq, offset, len) = (u32_at(b, 0), u32_at(b, 4), u64_at(b, 8), u64_at(b, 16));
    let Some(r) = ByteRange::new(offset, len) else {
        return (Err(offset), seq);
    };
    let step = match op {
        OP_REVOKE => Step::Revoke(r),
        OP_RESTORE => Step::Restore(r),
        OP_SPLIT => Step::Split(r),
        OP_MERGE => Step::Merge(r),
        OP_POISON => Step::Poison(r),
        OP_UNPOISON => Step::Unpoison(r),
        OP_REFRESH => Step::Refresh(r),
        OP_FREEZE => Step::Freeze(r),
        OP_THAW => Step::Thaw(r),
        _ => return (Err(offset), seq),
    };
    (Ok(step), seq)
}

/// A reply: `seq:u32 errno:i32 offset:u64 0:u64`.
pub(crate) fn encode_reply(seq: u32, errno: i32, offset: u64) -> [u8; MSG_LEN] {
    let mut reply = [0u8; MSG_LEN];
    reply[0..4].copy_from_slice(&seq.to_le_bytes());
    reply[4..8].copy_from_slice(&errno.to_le_bytes());
    reply[8..16].copy_from_slice(&offset.to_le_bytes());
    reply
}

/// `(seq, errno, offset)` of a reply.
pub(crate) fn decode_reply(b: &[u8; MSG_LEN]) -> (u32, i32, u64) {
    (
        u32_at(b, 0),
        i32::from_le_bytes(u32_at(b, 4).to_le_bytes()),
        u64_at(b, 8),
    )
}

/// What a hello packet announces, as [`parse_hello`] validated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Backing kind (with the huge page size for HugeTLB).
    pub kind: BackingKind,
    /// File size in bytes: non-zero, page aligned.
    pub size: u64,
    /// Creation flags, unknown bits kept (file creation refuses them).
    pub flags: Flags,
    /// Block size: a power of two.
    pub block: u64,
    /// Number of runs in the run table: at least one, at most one per page.
    pub runs: u64,
}

fn kind_code(k: BackingKind) -> (u32, u64) {
    match k {
        BackingKind::Shmem => (0, 0),
        BackingKind::HugeTlb(sz) => (1, sz),
        BackingKind::KernelGuestMemfd => (2, 0),
    }
}

/// The hello packet for `h`.
pub(crate) fn encode_hello(h: &Hello) -> [u8; HELLO_LEN] {
    let (kind, huge) = kind_code(h.kind);
    let mut hello = [0u8; HELLO_LEN];
    hello[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    hello[4..8].copy_from_slice(&kind.to_le_bytes());
    hello[8..16].copy_from_slice(&h.size.to_le_bytes());
    hello[16..24].copy_from_slice(&h.flags.bits().to_le_bytes());
    hello[24..32].copy_from_slice(&h.block.to_le_bytes());
    hello[32..40].copy_from_slice(&huge.to_le_bytes());
    hello[40..48].copy_from_slice(&h.runs.to_le_bytes());
    hello
}

/// Parses a hello packet: bytes received from another process, so untrusted. Never panics.
pub fn parse_hello(hello: &[u8]) -> Result<Hello, PeerError> {
    if hello.len() != HELLO_LEN {
        return Err(PeerError::Protocol("short hello or missing descriptors"));
    }
    if u32_at(hello, 0) != MAGIC {
        return Err(PeerError::Protocol("bad magic"));
    }
    let kind = match (hello[4], u64_at(hello, 32)) {
        (0, _) => BackingKind::Shmem,
        (1, sz) if sz.is_power_of_two() && sz >= PAGE_SIZE => BackingKind::HugeTlb(sz),
        (2, _) => BackingKind::KernelGuestMemfd,
        _ => return Err(PeerError::Protocol("unknown backing kind")),
    };
    let (size, flags, block, runs) = (
        u64_at(hello, 8),
        Flags::from_bits_retain(u64_at(hello, 16)),
        u64_at(hello, 24),
        u64_at(hello, 40),
    );
    if size == 0
        || size % PAGE_SIZE != 0
        || !block.is_power_of_two()
        || runs == 0
        || runs > MAX_RUNS
    {
        return Err(PeerError::Protocol("bad size, block size or run count"));
    }
    if runs > size / PAGE_SIZE {
        return Err(PeerError::Protocol("more runs than pages"));
    }
    Ok(Hello {
        kind,
        size,
        flags,
        block,
        runs,
    })
}

/// Writes the runs as `(start_page << 1) | private` little-endian words into a sealed memfd.
pub(crate) fn write_runs(attrs: &AttrMap) -> Result<OwnedFd, PeerError> {
    let io = |op| move |source| PeerError::Os { op, source };
    let f = fd::memfd_create(c"gmem-runs", 0).map_err(io("memfd_create"))?;
    let mut buf = Vec::with_capacity(attrs.len() * 8);
    for run in attrs.runs(0, attrs.pages()) {
        let word = (run.start << 1) | u64::from(run.attr == Attr::Private);
        buf.extend_from_slice(&word.to_le_bytes());
    }
    fd::pwrite_all(f.as_fd(), &buf, 0).map_err(io("pwrite"))?;
    fd::add_seals(
        f.as_fd(),
        libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
    )
    .map_err(io("seal"))?;
    Ok(f)
}

/// Checks that a memfd received from another process holds exactly `size` bytes and carries
/// the seals `need` (so it can neither shrink under a mapping nor grow).
pub(crate) fn check_sealed(f: BorrowedFd<'_>, size: u64, need: libc::c_int) -> io::Result<()> {
    let st = fd::fstat(f)?;
    if u64::try_from(st.st_size).ok() != Some(size) {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    let seals = fd::seals(f)?;
    if seals & need != need {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    Ok(())
}

/// Reads and validates the run table: sealed, of the announced size, strictly increasing
/// starts from page 0, alternating attributes, all below `pages`.
pub(crate) fn read_runs(f: BorrowedFd<'_>, runs: u64, pages: u64) -> Result<AttrMap, PeerError> {
    let io = |op| move |source| PeerError::Os { op, source };
    let bytes = runs
        .checked_mul(8)
        .ok_or(PeerError::Protocol("run count overflows"))?;
    check_sealed(
        f,
        bytes,
        libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK,
    )
    .map_err(|_| PeerError::Protocol("run table not sealed or of the wrong size"))?;
    let map = Mapping::map(
        Some(f),
        0,
        to_usize(bytes).map_err(io("size"))?,
        libc::MAP_SHARED,
        libc::PROT_READ,
    )
    .map_err(io("mmap"))?;
    let mut table = vec![0u8; map.len()];
    crate::engine::access::copy_out(
        &map,
        ByteRange {
            start: 0,
            end: bytes,
        },
        &mut table,
    );
    parse_runs(&table, pages)
}

/// Parses a run table (`(start_page << 1) | private` little-endian words) for a file of
/// `pages` pages: strictly increasing starts, the first at page 0, alternating attributes, all
/// below `pages`. Untrusted input; never panics.
pub fn parse_runs(table: &[u8], pages: u64) -> Result<AttrMap, PeerError> {
    if table.len() % 8 != 0 {
        return Err(PeerError::Protocol("run table size does not match"));
    }
    let mut result: Option<AttrMap> = None;
    let mut prev: Option<(u64, Attr)> = None;
    for chunk in table.chunks_exact(8) {
        let word = u64_at(chunk, 0);
        let (start, attr) = (
            word >> 1,
            if word & 1 == 1 {
                Attr::Private
            } else {
                Attr::Shared
            },
        );
        match prev {
            None if start != 0 => return Err(PeerError::Protocol("first run does not start at 0")),
            Some((p, a)) if start <= p || a == attr => {
                return Err(PeerError::Protocol("runs not increasing or not merged"))
            }
            _ if start >= pages => return Err(PeerError::Protocol("run past the end")),
            _ => {}
        }
        match result.as_mut() {
            None => result = Some(AttrMap::new(pages, attr)),
            Some(m) => m.set(start, pages, attr),
        }
        prev = Some((start, attr));
    }
    result.ok_or(PeerError::Protocol("no runs"))
}
