//! Cross-process coordination: another process maps the same file and loses access to pages
//! converted to private, as every mapper of a kernel guest_memfd does.
//!
//! # Protocol
//!
//! The owner calls [`GuestMemfd::share_with_process`], which creates a `SOCK_SEQPACKET`
//! socket pair, keeps one end and returns the other, to be inherited by a child or sent with
//! `SCM_RIGHTS`. The owner writes one *hello* packet on it at once, carrying the file's size,
//! flags, block size and backing kind, with two descriptors: the memory itself and a sealed
//! memfd holding the attribute runs at that instant (HugeTLB: a third, the companion file of
//! split pieces, followed by one `SPLIT` request per huge page split at that instant), then
//! one `POISON` request per poisoned page. The other process calls [`GuestMemfd::attach`],
//! which builds a *follower* file from the hello, applies the requests already queued behind
//! it, and starts an agent thread that serves the owner's requests:
//!
//! | request (owner → follower) | the follower | reply |
//! |---|---|---|
//! | `REVOKE offset len` | zaps its views, checks its own host references, marks the range private, poisons it in its views | `0`, or `EAGAIN` + first busy page |
//! | `RESTORE offset len` | marks the range shared and lifts the markers | `0` |
//! | `SPLIT offset len` (HugeTLB) | maps the owner's pieces of that huge page over its windows (see [`crate::restructure`]) | `0`, or `EAGAIN` + a page it holds |
//! | `MERGE offset len` (HugeTLB) | maps the huge page back over its windows | `0`, or `EAGAIN` + a page it holds |
//! | `POISON offset len` | records the page as poisoned and marks it in its views | `0` |
//! | `UNPOISON offset len` | clears poison records in the range (after a punch-hole) | `0` |
//!
//! Packets are 24 bytes, little-endian: `op:u32 seq:u32 offset:u64 len:u64`; replies
//! `seq:u32 errno:i32 offset:u64 0:u64`. A conversion in the owner waits for every follower's
//! reply ([`PEER_TIMEOUT`] at most, then fails with `ETIMEDOUT` and is rolled back). A
//! follower refusing a revoke makes the whole conversion fail with `EAGAIN`, rolled back in the
//! owner and in the followers that had accepted.
//!
//! # When one side dies
//!
//! - A follower dies: its mappings die with its address space (the kernel tears down the
//!   address space before it closes the descriptors), so the owner, seeing the socket closed,
//!   drops the follower and goes on.
//! - The owner dies: the follower's agent sees the socket closed and stops. The follower keeps
//!   the memory (it holds the descriptor) with the attributes last received, still enforced in
//!   its views; it receives no more conversions.
//!
//! Conversions are made by the owner: [`GuestMemfd::convert`] on a follower is `EPERM`.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Weak};
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{
    recvmsg, sendmsg, socketpair, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage,
    RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

use crate::attr::{Attr, RunMap};
use crate::backing::{BackingKind, Received};
use crate::convert::{restore_local, revoke_local, ConvertError};
use crate::file::{CreateError, GuestMemfd, Inner};
use crate::flags::Flags;
use crate::range::ByteRange;
use crate::sys::mapping::Mapping;
use crate::sys::{fd, to_usize, PAGE_SIZE};

/// How long an owner waits for a follower's reply before failing the conversion.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);

const MAGIC: u32 = u32::from_le_bytes(*b"GMP1");
const HELLO_LEN: usize = 48;
const MSG_LEN: usize = 24;
const OP_REVOKE: u32 = 1;
const OP_RESTORE: u32 = 2;
/// HugeTLB: the owner split the huge page at `offset` (its contents are in the companion file
/// sent with the hello); map the pieces over its window.
const OP_SPLIT: u32 = 3;
/// HugeTLB: the owner is merging the huge page at `offset`; map the huge page back.
const OP_MERGE: u32 = 4;
/// The owner recorded the page at `offset` as poisoned (memory failure).
const OP_POISON: u32 = 5;
/// A punch-hole gave `[offset, offset + len)` fresh pages: poison records there are cleared.
const OP_UNPOISON: u32 = 6;
/// Largest number of runs a hello may announce (2^30 runs = 8 GiB of run table).
const MAX_RUNS: u64 = 1 << 30;

/// Why sharing with or attaching to another process failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// A syscall failed.
    #[error("{op}: {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The hello packet was malformed (`EPROTO`).
    #[error("malformed hello: {0}")]
    Protocol(&'static str),
    /// The received file could not be set up.
    #[error(transparent)]
    Create(#[from] CreateError),
}

impl PeerError {
    /// The errno for this error.
    pub fn errno(&self) -> i32 {
        match self {
            PeerError::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            PeerError::Protocol(_) => libc::EPROTO,
            PeerError::Create(e) => e.errno(),
        }
    }
}

fn os(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> PeerError {
    move |e| PeerError::Os {
        op,
        source: e.into(),
    }
}

/// The owner's end of each follower.
#[derive(Debug, Default)]
pub(crate) struct PeerSet {
    links: std::sync::Mutex<Vec<OwnedFd>>,
    seq: std::sync::atomic::AtomicU32,
}

impl PeerSet {
    fn links(&self) -> std::sync::MutexGuard<'_, Vec<OwnedFd>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when no follower is attached. A live-update hand-over refuses a file with
    /// followers: they would go on following this process, not the new owner.
    pub(crate) fn is_empty(&self) -> bool {
        self.links().is_empty()
    }

    /// Asks every follower to revoke `r`; on a refusal, restores those that accepted.
    pub fn revoke(&self, r: ByteRange) -> Result<(), ConvertError> {
        let mut links = self.links();
        let mut done = 0;
        let mut failure = None;
        let mut dead = Vec::new();
        for (i, link) in links.iter().enumerate() {
            match self.call(link.as_fd(), OP_REVOKE, r) {
                Ok(None) => done = i + 1,
                Ok(Some(e)) => {
                    failure = Some(e);
                    break;
                }
                Err(_) => {
                    dead.push(i);
                    done = i + 1;
                }
            }
        }
        if let Some(e) = failure {
            for link in &links[..done] {
                let _ = self.call(link.as_fd(), OP_RESTORE, r);
            }
            return Err(e);
        }
        for i in dead.into_iter().rev() {
            links.remove(i);
        }
        Ok(())
    }

    /// Tells every follower that the huge page `r` is split; on a refusal (`EAGAIN`, a
    /// follower's reference on a page of it), merges back those that accepted.
    pub fn split(&self, r: ByteRange) -> Result<(), ConvertError> {
        self.all_or_undo(OP_SPLIT, OP_MERGE, r)
    }

    /// Tells every follower that the huge page `r` merges; on a refusal, splits back those
    /// that accepted.
    pub fn merge(&self, r: ByteRange) -> Result<(), ConvertError> {
        self.all_or_undo(OP_MERGE, OP_SPLIT, r)
    }

    fn all_or_undo(&self, op: u32, undo: u32, r: ByteRange) -> Result<(), ConvertError> {
        let mut links = self.links();
        let mut done = 0;
        let mut dead = Vec::new();
        for (i, link) in links.iter().enumerate() {
            match self.call(link.as_fd(), op, r) {
                Ok(None) => done = i + 1,
                Ok(Some(e)) => {
                    for link in &links[..done] {
                        let _ = self.call(link.as_fd(), undo, r);
                    }
                    return Err(e);
                }
                Err(()) => {
                    dead.push(i);
                    done = i + 1;
                }
            }
        }
        for i in dead.into_iter().rev() {
            links.remove(i);
        }
        Ok(())
    }

    /// Tells every follower about poison (`poison`) or its clearing by a punch-hole in `r`.
    /// Best effort: a follower that fails is logged; a dead one is dropped.
    pub fn poison(&self, r: ByteRange, poison: bool) {
        let op = if poison { OP_POISON } else { OP_UNPOISON };
        let mut links = self.links();
        links.retain(|l| match self.call(l.as_fd(), op, r) {
            Ok(None) => true,
            Ok(Some(e)) => {
                tracing::error!(offset = r.start, "a peer failed to follow poison: {e}");
                true
            }
            Err(()) => false,
        });
    }

    /// Queues a request without waiting for its reply (a later call skips the reply).
    fn post(&self, sock: BorrowedFd<'_>, op: u32, r: ByteRange) -> Result<(), PeerError> {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut msg = [0u8; MSG_LEN];
        msg[0..4].copy_from_slice(&op.to_le_bytes());
        msg[4..8].copy_from_slice(&seq.to_le_bytes());
        msg[8..16].copy_from_slice(&r.start.to_le_bytes());
        msg[16..24].copy_from_slice(&r.len().to_le_bytes());
        rustix::net::send(sock, &msg, SendFlags::NOSIGNAL).map_err(os("send"))?;
        Ok(())
    }

    /// Tells every follower `r` is shared.
    pub fn restore(&self, r: ByteRange) {
        self.restore_runs(std::iter::once(r));
    }

    /// Tells every follower each range is shared (rollback of a revoke).
    pub fn restore_runs(&self, parts: impl Iterator<Item = ByteRange>) {
        let mut links = self.links();
        if links.is_empty() {
            return;
        }
        for part in parts {
            links.retain(|l| self.call(l.as_fd(), OP_RESTORE, part).is_ok());
        }
    }

    /// Sends one request and waits for its reply. `Err` means the follower is gone.
    fn call(
        &self,
        sock: BorrowedFd<'_>,
        op: u32,
        r: ByteRange,
    ) -> Result<Option<ConvertError>, ()> {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut msg = [0u8; MSG_LEN];
        msg[0..4].copy_from_slice(&op.to_le_bytes());
        msg[4..8].copy_from_slice(&seq.to_le_bytes());
        msg[8..16].copy_from_slice(&r.start.to_le_bytes());
        msg[16..24].copy_from_slice(&r.len().to_le_bytes());
        if rustix::net::send(sock, &msg, SendFlags::NOSIGNAL).is_err() {
            return Err(());
        }
        loop {
            let mut fds = [PollFd::new(&sock, PollFlags::IN)];
            let timeout = Timespec::try_from(PEER_TIMEOUT).ok();
            match poll(&mut fds, timeout.as_ref()) {
                Ok(0) => {
                    return Ok(Some(ConvertError::Peer {
                        offset: r.start,
                        errno: libc::ETIMEDOUT,
                    }))
                }
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return Err(()),
            }
            let mut reply = [0u8; MSG_LEN];
            let n = match rustix::net::recv(sock, &mut reply, RecvFlags::empty()) {
                Ok((n, _)) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return Err(()),
            };
            if n == 0 {
                return Err(());
            }
            let (got, errno, offset) = decode_reply(&reply);
            if got != seq {
                continue; // a late reply to a request that timed out
            }
            return Ok(match errno {
                0 => None,
                libc::EAGAIN => Some(ConvertError::Busy { offset }),
                e => Some(ConvertError::Peer { offset, errno: e }),
            });
        }
    }
}

fn decode_reply(b: &[u8; MSG_LEN]) -> (u32, i32, u64) {
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut off = [0u8; 8];
    off.copy_from_slice(&b[8..16]);
    (
        u32_at(0),
        i32::from_le_bytes(u32_at(4).to_le_bytes()),
        u64::from_le_bytes(off),
    )
}

fn kind_code(k: BackingKind) -> (u32, u64) {
    match k {
        BackingKind::Shmem => (0, 0),
        BackingKind::HugeTlb(sz) => (1, sz),
        BackingKind::KernelGuestMemfd => (2, 0),
    }
}

impl GuestMemfd {
    /// Lets another process map this file: returns the socket end to give it (inherit it, or
    /// send it with `SCM_RIGHTS`); that process calls [`GuestMemfd::attach`] on it. See the
    /// [module docs](crate::peer) for the protocol and what happens when either side dies.
    pub fn share_with_process(&self) -> Result<OwnedFd, PeerError> {
        let inner = &self.inner;
        let (mine, theirs) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(os("socketpair"))?;
        let ctl = inner.control();
        let runs_fd = {
            let attrs = inner.attrs_read();
            write_runs(&attrs)?
        };
        let runs = u64::try_from(inner.attrs_read().len()).unwrap_or(u64::MAX);
        let (kind, huge) = kind_code(inner.backing.kind());
        let mut hello = [0u8; HELLO_LEN];
        hello[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        hello[4..8].copy_from_slice(&kind.to_le_bytes());
        hello[8..16].copy_from_slice(&inner.size.to_le_bytes());
        hello[16..24].copy_from_slice(&inner.flags.bits().to_le_bytes());
        hello[24..32].copy_from_slice(&inner.backing.block_size().to_le_bytes());
        hello[32..40].copy_from_slice(&huge.to_le_bytes());
        hello[40..48].copy_from_slice(&runs.to_le_bytes());
        let mut fds = vec![inner.backing.fd(), runs_fd.as_fd()];
        if let Some(rs) = inner.restructure.as_ref() {
            fds.push(rs.companion());
        }
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
        let mut anc = SendAncillaryBuffer::new(&mut space);
        anc.push(SendAncillaryMessage::ScmRights(&fds));
        sendmsg(
            mine.as_fd(),
            &[IoSlice::new(&hello)],
            &mut anc,
            SendFlags::NOSIGNAL,
        )
        .map_err(os("sendmsg"))?;
        if let Some(rs) = inner.restructure.as_ref() {
            // Huge pages split now: the follower maps their pieces before any later request.
            for h in rs.split_in(0, u64::MAX) {
                let r = ByteRange {
                    start: h * rs.page,
                    end: (h + 1) * rs.page,
                };
                ctl.peers.post(mine.as_fd(), OP_SPLIT, r)?;
            }
        }
        for p in inner.poison_records() {
            let r = ByteRange {
                start: p,
                end: p + PAGE_SIZE,
            };
            ctl.peers.post(mine.as_fd(), OP_POISON, r)?;
        }
        ctl.peers.links().push(mine);
        Ok(theirs)
    }

    /// Attaches to a file shared by another process through `sock` (see
    /// [`GuestMemfd::share_with_process`]). The returned file is a follower: it maps, reads,
    /// writes and pins like any other, and its views lose access to pages the owner converts
    /// to private.
    pub fn attach(sock: OwnedFd) -> Result<GuestMemfd, PeerError> {
        let mut hello = [0u8; HELLO_LEN];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
        let mut anc = RecvAncillaryBuffer::new(&mut space);
        let msg = recvmsg(
            sock.as_fd(),
            &mut [IoSliceMut::new(&mut hello)],
            &mut anc,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(os("recvmsg"))?;
        let mut fds: Vec<OwnedFd> = Vec::new();
        for m in anc.drain() {
            if let RecvAncillaryMessage::ScmRights(r) = m {
                fds.extend(r);
            }
        }
        if msg.bytes != HELLO_LEN || !(2..=3).contains(&fds.len()) {
            return Err(PeerError::Protocol("short hello or missing descriptors"));
        }
        let Hello {
            kind,
            size,
            flags,
            block,
            runs,
        } = parse_hello(&hello)?;
        let mut fds = fds.into_iter();
        let (Some(mem), Some(runs_fd)) = (fds.next(), fds.next()) else {
            return Err(PeerError::Protocol("missing descriptors"));
        };
        let attrs = read_runs(runs_fd.as_fd(), runs, size / PAGE_SIZE)?;
        let pieces = fds.next();
        let backing = Received {
            fd: mem,
            kind,
            block,
            pieces,
        };
        let file = GuestMemfd::assemble(Box::new(backing), size, flags, Some(attrs), true)?;
        // Requests already queued behind the hello (the `SPLIT`s of a HugeTLB file, or
        // conversions made since) are applied before the file is handed out, so its first
        // views see the state of the hello plus them.
        loop {
            let mut msg = [0u8; MSG_LEN];
            match rustix::net::recv(&sock, &mut msg, RecvFlags::DONTWAIT) {
                Ok((MSG_LEN, _)) => {
                    if !answer(&sock, &file.inner, &msg) {
                        return Err(PeerError::Protocol("owner gone while attaching"));
                    }
                }
                Ok(_) => return Err(PeerError::Protocol("short request")),
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => break,
            }
        }
        let weak = Arc::downgrade(&file.inner);
        std::thread::Builder::new()
            .name("gmem-peer".into())
            .spawn(move || serve(sock, weak))
            .map_err(|source| PeerError::Os {
                op: "spawn",
                source,
            })?;
        Ok(file)
    }
}

/// Writes the runs as `(start_page << 1) | private` little-endian words into a sealed memfd.
fn write_runs(attrs: &RunMap) -> Result<OwnedFd, PeerError> {
    let io = |op| move |source| PeerError::Os { op, source };
    let f = fd::memfd_create(c"gmem-runs", 0).map_err(io("memfd_create"))?;
    let mut buf = Vec::with_capacity(attrs.len() * 8);
    for run in attrs.runs(0, attrs.pages()) {
        let word = (run.start << 1) | u64::from(run.attr == Attr::Private);
        buf.extend_from_slice(&word.to_le_bytes());
    }
    let mut done = 0;
    while done < buf.len() {
        let at = u64::try_from(done).unwrap_or(u64::MAX);
        done += fd::pwrite(f.as_fd(), &buf[done..], at).map_err(io("pwrite"))?;
    }
    fd::add_seals(
        f.as_fd(),
        libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
    )
    .map_err(io("seal"))?;
    Ok(f)
}

/// Reads and validates the run table: strictly increasing starts, the first at page 0,
/// alternating attributes, all below `pages`.
fn read_runs(f: BorrowedFd<'_>, runs: u64, pages: u64) -> Result<RunMap, PeerError> {
    let io = |op| move |source| PeerError::Os { op, source };
    let bytes = runs
        .checked_mul(8)
        .ok_or(PeerError::Protocol("run count overflows"))?;
    let (st_size, _) = {
        let st = fd::fstat(f).map_err(io("fstat"))?;
        (u64::try_from(st.st_size).unwrap_or(0), ())
    };
    if st_size != bytes {
        return Err(PeerError::Protocol("run table size does not match"));
    }
    let map = Mapping::map(
        Some(f),
        0,
        to_usize(bytes).map_err(io("size"))?,
        libc::MAP_SHARED,
        libc::PROT_READ,
    )
    .map_err(io("mmap"))?;
    let mut table = vec![0u8; map.len()];
    crate::access::copy_out(
        &map,
        ByteRange {
            start: 0,
            end: bytes,
        },
        &mut table,
    );
    parse_runs(&table, pages)
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

/// Parses a hello packet: bytes received from another process, so untrusted. Never panics.
pub fn parse_hello(hello: &[u8]) -> Result<Hello, PeerError> {
    if hello.len() != HELLO_LEN {
        return Err(PeerError::Protocol("short hello or missing descriptors"));
    }
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&hello[i..i + 8]);
        u64::from_le_bytes(b)
    };
    if hello[0..4] != MAGIC.to_le_bytes() {
        return Err(PeerError::Protocol("bad magic"));
    }
    let kind = match (hello[4], word(32)) {
        (0, _) => BackingKind::Shmem,
        (1, sz) if sz.is_power_of_two() && sz >= PAGE_SIZE => BackingKind::HugeTlb(sz),
        (2, _) => BackingKind::KernelGuestMemfd,
        _ => return Err(PeerError::Protocol("unknown backing kind")),
    };
    let (size, flags, block, runs) = (
        word(8),
        Flags::from_bits_retain(word(16)),
        word(24),
        word(40),
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

/// Parses a run table (`(start_page << 1) | private` little-endian words) for a file of
/// `pages` pages: strictly increasing starts, the first at page 0, alternating attributes, all
/// below `pages`. Untrusted input; never panics.
pub fn parse_runs(table: &[u8], pages: u64) -> Result<RunMap, PeerError> {
    if table.len() % 8 != 0 {
        return Err(PeerError::Protocol("run table size does not match"));
    }
    let mut result: Option<RunMap> = None;
    let mut prev: Option<(u64, Attr)> = None;
    for chunk in table.chunks_exact(8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        let word = u64::from_le_bytes(w);
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
            None => result = Some(RunMap::new(pages, attr)),
            Some(m) => m.set(start, pages, attr),
        }
        prev = Some((start, attr));
    }
    result.ok_or(PeerError::Protocol("no runs"))
}

/// The follower's agent: serves the owner's requests until either side goes away.
fn serve(sock: OwnedFd, file: Weak<Inner>) {
    loop {
        let mut msg = [0u8; MSG_LEN];
        let n = match rustix::net::recv(&sock, &mut msg, RecvFlags::empty()) {
            Ok((n, _)) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return,
        };
        if n != MSG_LEN {
            return;
        }
        let Some(inner) = file.upgrade() else { return };
        if !answer(&sock, &inner, &msg) {
            return;
        }
    }
}

/// Applies one request and sends its reply; false when the owner is gone.
fn answer(sock: &OwnedFd, inner: &Inner, msg: &[u8; MSG_LEN]) -> bool {
    let (op, seq, offset, len) = decode_request(msg);
    let (errno, at) = match inner.page_range(offset, len) {
        Err(e) => (libc::EINVAL, e.offset()),
        Ok(r) => apply(inner, op, r),
    };
    let mut reply = [0u8; MSG_LEN];
    reply[0..4].copy_from_slice(&seq.to_le_bytes());
    reply[4..8].copy_from_slice(&errno.to_le_bytes());
    reply[8..16].copy_from_slice(&at.to_le_bytes());
    rustix::net::send(sock, &reply, SendFlags::NOSIGNAL).is_ok()
}

fn decode_request(b: &[u8; MSG_LEN]) -> (u32, u32, u64, u64) {
    let (op, seq, offset) = decode_reply(b);
    let mut len = [0u8; 8];
    len.copy_from_slice(&b[16..24]);
    (
        op,
        u32::from_le_bytes(seq.to_le_bytes()),
        offset,
        u64::from_le_bytes(len),
    )
}

/// Applies one request locally; returns (errno, offset), `(0, 0)` on success.
fn apply(inner: &Inner, op: u32, r: ByteRange) -> (i32, u64) {
    let mut ctl = inner.control();
    let res = match op {
        OP_REVOKE => revoke_local(inner, &mut ctl.views, r).map(drop),
        OP_RESTORE => restore_local(inner, &mut ctl.views, r),
        OP_SPLIT => crate::restructure::follow(inner, &mut ctl.views, true, r),
        OP_MERGE => crate::restructure::follow(inner, &mut ctl.views, false, r),
        OP_POISON => crate::poison::follow(inner, &mut ctl.views, r),
        OP_UNPOISON => {
            crate::poison::clear(inner, &mut ctl.views, r).map_err(|source| ConvertError::Os {
                offset: r.start,
                source,
            })
        }
        _ => return (libc::EINVAL, r.start),
    };
    match res {
        Ok(()) => (0, 0),
        Err(e) => (e.errno(), e.error_offset().unwrap_or(r.start)),
    }
}
