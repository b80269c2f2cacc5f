//! The two-phase hand-over of guest memory files to a new owner process.
//!
//! # Protocol
//!
//! Over a connected `SOCK_SEQPACKET` Unix socket (a socket pair, or an accepted connection),
//! 32-byte messages, little-endian: `magic:u32 ("GMHO") version:u16 op:u16 errno:i32 crc:u32
//! state_len:u64 files:u32 0:u32`.
//!
//! | # | old owner | message | new owner |
//! |---|---|---|---|
//! | 1 | freezes every file ([`super::freeze`]), snapshots the state into a sealed memfd | | |
//! | 2 | | `OFFER` + `SCM_RIGHTS` [state, file 0, file 1, ...] → | |
//! | 3 | | | reads the state, checks checksum, sizes (`fstat`), identities, runs; builds its files; takes the recorded pins again |
//! | 4 | | ← `ACCEPT` (or `REJECT errno`) | |
//! | 5 | | `COMMIT` → | **owns** from here |
//! | 6 | | ← `DONE` | |
//! | 7 | marks its files handed over (conversions and allocation `EPERM`) | | |
//!
//! # When a side dies
//!
//! The rule: the new owner owns once it has read `COMMIT`, or once it has sent `ACCEPT` and the
//! old owner is gone; the old owner gives up ownership only when it has read `DONE`. A side
//! learns the other is gone from the socket (end of file, `EPIPE`), which happens only when the
//! other process has died or dropped its end, so both never own at once:
//!
//! | dies | at | survivor |
//! |---|---|---|
//! | old | before `OFFER` is sent | the new owner receives nothing ([`HandoverError::PeerGone`]); no hand-over happened, the memory was the old owner's alone |
//! | old | after `OFFER`, at any later step | new owner: it reads the offer (descriptors in flight keep the files alive), verifies, and owns on end of file |
//! | new | before sending `ACCEPT` | old owner: sees end of file, thaws, goes on |
//! | new | after `ACCEPT`, before `DONE` | old owner: `COMMIT` fails or `DONE` never comes (end of file): thaws, goes on |
//! | new | after `DONE` | nobody: the hand-over was complete; this is a crash of the new owner |
//!
//! Poison is the one change a freeze cannot hold back (a memory failure does not wait): the
//! old owner compares each file's poison list again before `COMMIT` and, if it changed,
//! sends `ABORT` and keeps the files ([`HandoverError::Busy`], `EBUSY`); the hand-over can be
//! retried.
//!
//! Nothing is lost in any surviving case: contents are the files themselves, and while frozen
//! the old owner changes no attribute, so the state read by the new owner stays exact.
//! [`Options::timeout`] bounds the wait for `ACCEPT` (then the old owner sends `ABORT` and
//! thaws) and for `DONE`; the new owner never gives up after `ACCEPT` while the old owner lives.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

use crate::access::Pin;
use crate::attr::{Attr, RunMap};
use crate::backing::hugetlb::HugeTlb;
use crate::backing::{Backing, BackingKind, Received};
use crate::file::{FileId, GuestMemfd};
use crate::sys::fd;

use super::error::{io, os, HandoverError};
use super::format::{
    Binding, FileState, NumaRecord, PinRecord, RestructureKind, Restructured, RunRecord, State,
    VmLink, MAX_FILES, MAX_STATE_LEN,
};
use super::freeze::Phase;

const MAGIC: u32 = u32::from_le_bytes(*b"GMHO");
const PROTO_VERSION: u16 = 1;
const MSG_LEN: usize = 32;
const OP_OFFER: u16 = 1;
const OP_ACCEPT: u16 = 2;
const OP_REJECT: u16 = 3;
const OP_COMMIT: u16 = 4;
const OP_ABORT: u16 = 5;
const OP_DONE: u16 = 6;
/// Descriptors one offer carries at most (the kernel's `SCM_MAX_FD`).
const MAX_FDS: usize = 253;

/// The steps of a hand-over, in order, as [`Options::on_step`] reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// Old owner: every file frozen and the state written; nothing sent yet.
    Frozen,
    /// Old owner: `OFFER` sent with the descriptors.
    OfferSent,
    /// Old owner: `ACCEPT` read.
    AcceptReceived,
    /// Old owner: `COMMIT` sent; the new owner owns once it reads it.
    CommitSent,
    /// Old owner: `DONE` read; the files are handed over.
    DoneReceived,
    /// New owner: `OFFER` and descriptors read.
    OfferReceived,
    /// New owner: the state verified and the files built, pins taken.
    Verified,
    /// New owner: `ACCEPT` sent.
    AcceptSent,
    /// New owner: `COMMIT` read; it owns the files.
    CommitReceived,
    /// New owner: `DONE` sent.
    DoneSent,
}

impl Step {
    /// Every step, old owner's first.
    pub const ALL: [Step; 10] = [
        Step::Frozen,
        Step::OfferSent,
        Step::AcceptReceived,
        Step::CommitSent,
        Step::DoneReceived,
        Step::OfferReceived,
        Step::Verified,
        Step::AcceptSent,
        Step::CommitReceived,
        Step::DoneSent,
    ];

    /// The step's name, as used in logs and by the fault-injection tests.
    pub fn name(self) -> &'static str {
        match self {
            Step::Frozen => "frozen",
            Step::OfferSent => "offer-sent",
            Step::AcceptReceived => "accept-received",
            Step::CommitSent => "commit-sent",
            Step::DoneReceived => "done-received",
            Step::OfferReceived => "offer-received",
            Step::Verified => "verified",
            Step::AcceptSent => "accept-sent",
            Step::CommitReceived => "commit-received",
            Step::DoneSent => "done-sent",
        }
    }

    /// The step named `name`.
    pub fn from_name(name: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// Hand-over settings.
#[derive(Clone)]
pub struct Options {
    /// How long the old owner waits for `ACCEPT` and for `DONE`, and the new owner for `OFFER`.
    pub timeout: Duration,
    /// Called after each step completes (progress reporting, tracing, fault injection). It
    /// runs on the hand-over's thread while the files are frozen: converting them from it
    /// would wait for the hand-over it is part of.
    pub on_step: Option<Arc<dyn Fn(Step) + Send + Sync>>,
    /// The generation the old owner writes in the state: how many hand-overs the memory has
    /// been through, this one included (pass [`Restored::generation`] `+ 1` when handing over
    /// memory that was itself received).
    pub generation: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_secs(30),
            on_step: None,
            generation: 1,
        }
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("timeout", &self.timeout)
            .field("on_step", &self.on_step.is_some())
            .field("generation", &self.generation)
            .finish()
    }
}

impl Options {
    pub(crate) fn step(&self, s: Step) {
        tracing::debug!(step = s.name(), "hand-over");
        if let Some(f) = &self.on_step {
            f(s);
        }
    }
}

/// One file offered to the new owner, with what gmem cannot read from the file itself.
///
/// Attributes, NUMA policy, poison and restructuring metadata are read from the file when it
/// is frozen; bindings, pins to re-establish and the VM link come from the VMM.
#[derive(Debug, Clone)]
pub struct FileOffer {
    /// The file.
    pub mem: GuestMemfd,
    /// Its bindings to guest-physical memory (from the VMM's memslots).
    pub bindings: Vec<Binding>,
    /// Pins the new owner must take again.
    pub pins: Vec<PinRecord>,
    /// How the VM travels (today always [`VmLink::None`]).
    pub vm: VmLink,
}

impl FileOffer {
    /// Offers `mem` with no bindings and no pins.
    pub fn new(mem: &GuestMemfd) -> Self {
        FileOffer {
            mem: mem.clone(),
            bindings: Vec::new(),
            pins: Vec::new(),
            vm: VmLink::None,
        }
    }

    /// Adds a binding.
    pub fn binding(mut self, b: Binding) -> Self {
        self.bindings.push(b);
        self
    }

    /// Records `pin` (held by this process) so that the new owner takes it again, under `tag`.
    pub fn pin(mut self, pin: &Pin, tag: u64) -> Self {
        self.pins.push(PinRecord {
            offset: pin.offset(),
            len: pin.len(),
            tag,
        });
        self
    }
}

/// The old owner's result of a completed hand-over.
#[derive(Debug)]
pub struct HandedOver {
    /// How long the files were frozen (the pause a guest sees), from freeze to `DONE`.
    pub pause: Duration,
    /// Size of the state sent, in bytes.
    pub state_len: usize,
    /// True when `DONE` came back; false when it timed out after `COMMIT` (the new owner owns
    /// the files anyway).
    pub confirmed: bool,
}

/// A file received by the new owner.
#[derive(Debug)]
pub struct RestoredFile {
    /// The file, with its attributes restored.
    pub mem: GuestMemfd,
    /// Everything the state said about it (bindings, NUMA, poison, restructuring, VM link).
    pub state: FileState,
    /// The recorded pins, taken again, with their tags.
    pub pins: Vec<(u64, Pin)>,
}

/// The new owner's result.
#[derive(Debug)]
pub struct Restored {
    /// The files, in the order they were offered.
    pub files: Vec<RestoredFile>,
    /// Hand-over count of this memory (1 after the first hand-over).
    pub generation: u64,
    /// True when the old owner died after the offer and before `COMMIT` (this side owns
    /// anyway: see the module docs).
    pub old_owner_gone: bool,
}

// ---------------------------------------------------------------------------------------
// Messages

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Msg {
    pub op: u16,
    pub errno: i32,
    pub crc: u32,
    pub state_len: u64,
    pub files: u32,
}

impl Msg {
    fn new(op: u16, crc: u32) -> Msg {
        Msg {
            op,
            errno: 0,
            crc,
            state_len: 0,
            files: 0,
        }
    }

    fn encode(&self) -> [u8; MSG_LEN] {
        let mut b = [0u8; MSG_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&PROTO_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&self.op.to_le_bytes());
        b[8..12].copy_from_slice(&self.errno.to_le_bytes());
        b[12..16].copy_from_slice(&self.crc.to_le_bytes());
        b[16..24].copy_from_slice(&self.state_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.files.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<Msg, HandoverError> {
        let bad = |what| HandoverError::Protocol { what };
        if b.len() != MSG_LEN {
            return Err(bad("message length"));
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if u32_at(0) != MAGIC
            || u16::from_le_bytes([b[4], b[5]]) != PROTO_VERSION
            || u32_at(28) != 0
        {
            return Err(bad("magic, version or reserved word"));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&b[16..24]);
        Ok(Msg {
            op: u16::from_le_bytes([b[6], b[7]]),
            errno: i32::from_le_bytes(u32_at(8).to_le_bytes()),
            crc: u32_at(12),
            state_len: u64::from_le_bytes(len),
            files: u32_at(24),
        })
    }
}

fn send(sock: BorrowedFd<'_>, m: &Msg) -> Result<(), rustix::io::Errno> {
    rustix::net::send(sock, &m.encode(), SendFlags::NOSIGNAL).map(drop)
}

/// What a wait for a message gave.
enum Got {
    Msg(Msg, Vec<OwnedFd>),
    Closed,
    TimedOut,
}

/// Waits up to `timeout` (forever with `None`) for one message and its descriptors.
fn recv(sock: BorrowedFd<'_>, timeout: Option<Duration>) -> Result<Got, HandoverError> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left == Some(Duration::ZERO) {
            return Ok(Got::TimedOut);
        }
        let ts = left.and_then(|l| Timespec::try_from(l).ok());
        let mut fds = [PollFd::new(&sock, PollFlags::IN)];
        match poll(&mut fds, ts.as_ref()) {
            Ok(0) => continue,
            Ok(_) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(os("poll")(e)),
        }
    }
    let mut buf = [0u8; MSG_LEN + 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let msg = loop {
        match recvmsg(
            sock,
            &mut [IoSliceMut::new(&mut buf)],
            &mut anc,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(m) => break m,
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::CONNRESET) => return Ok(Got::Closed),
            Err(e) => return Err(os("recvmsg")(e)),
        }
    };
    let mut fds = Vec::new();
    for m in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(r) = m {
            fds.extend(r);
        }
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Ok(Got::Closed);
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) || msg.flags.contains(ReturnFlags::TRUNC) {
        return Err(HandoverError::Protocol {
            what: "message or descriptors truncated",
        });
    }
    Ok(Got::Msg(
        Msg::decode(buf.get(..msg.bytes).unwrap_or(&[]))?,
        fds,
    ))
}

// ---------------------------------------------------------------------------------------
// Old owner

/// Files frozen for a hand-over, with their state written. Dropping it thaws the files
/// unless they were handed over.
pub(crate) struct Frozen {
    files: Vec<GuestMemfd>,
    /// Poisoned pages and restructuring of each file when the state was written. Poison can
    /// arrive during the freeze (a memory failure does not wait, and on HugeTLB it splits);
    /// both are compared again before `COMMIT`.
    poison: Vec<(Vec<u64>, Vec<Restructured>)>,
    pub state_fd: OwnedFd,
    pub state_len: usize,
    pub crc: u32,
    started: Instant,
    released: bool,
}

impl Frozen {
    fn set_all(&self, phase: Phase) {
        for f in &self.files {
            let _ctl = f.inner.control();
            f.inner.freeze.set(phase);
        }
    }

    /// The descriptors to send: the state, then each file.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        // The state, then each file, then the companion file of pieces of each HugeTLB file,
        // in file order.
        std::iter::once(self.state_fd.as_fd())
            .chain(self.files.iter().map(|f| f.inner.backing.fd()))
            .chain(
                self.files
                    .iter()
                    .filter_map(|f| f.inner.restructure.as_ref().map(|rs| rs.companion())),
            )
            .collect()
    }

    /// The `OFFER` message.
    pub fn offer_msg(&self) -> Msg {
        Msg {
            op: OP_OFFER,
            errno: 0,
            crc: self.crc,
            state_len: u64::try_from(self.state_len).unwrap_or(u64::MAX),
            files: u32::try_from(self.files.len()).unwrap_or(u32::MAX),
        }
    }

    /// The first file whose poison list changed since the state was written.
    fn poison_changed(&self) -> Option<usize> {
        self.files
            .iter()
            .zip(&self.poison)
            .position(|(f, (p, r))| f.poisoned_pages() != *p || restructure_of(f) != *r)
    }

    fn release(mut self) -> Duration {
        self.set_all(Phase::Released);
        self.released = true;
        self.started.elapsed()
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.released {
            self.set_all(Phase::Live);
        }
    }
}

/// Freezes every offered file and writes the state into a sealed memfd.
pub(crate) fn freeze(offers: &[FileOffer], generation: u64) -> Result<Frozen, HandoverError> {
    if offers.is_empty() || offers.len() > MAX_FILES {
        return Err(HandoverError::Protocol {
            what: "offer between 1 and 250 files",
        });
    }
    let started = Instant::now();
    let mut frozen = Frozen {
        files: Vec::with_capacity(offers.len()),
        poison: Vec::new(),
        state_fd: fd::memfd_create(c"gmem-state", 0).map_err(io("memfd_create"))?,
        state_len: 0,
        crc: 0,
        started,
        released: false,
    };
    for (i, o) in offers.iter().enumerate() {
        let inner = &o.mem.inner;
        if inner.follower {
            return Err(HandoverError::Busy {
                file: i,
                what: "it follows another process",
            });
        }
        if frozen
            .files
            .iter()
            .any(|f| std::sync::Arc::ptr_eq(&f.inner, inner))
        {
            return Err(HandoverError::Busy {
                file: i,
                what: "offered twice",
            });
        }
        let ctl = inner.control();
        if !ctl.peers.is_empty() {
            return Err(HandoverError::Busy {
                file: i,
                what: "shared with peer processes, which would keep following this one",
            });
        }
        if inner.freeze.phase() != Phase::Live {
            return Err(HandoverError::Busy {
                file: i,
                what: "already frozen or handed over",
            });
        }
        inner.freeze.set(Phase::Frozen);
        drop(ctl);
        frozen.files.push(o.mem.clone());
    }
    let mut files = Vec::with_capacity(offers.len());
    for o in offers {
        files.push(snapshot(o)?);
    }
    frozen.poison = files
        .iter()
        .map(|f: &FileState| (f.poison.clone(), f.restructure.clone()))
        .collect();
    let state = State { generation, files };
    let bytes = state.encode()?;
    write_sealed(frozen.state_fd.as_fd(), &bytes)?;
    frozen.state_len = bytes.len();
    frozen.crc = super::crc::crc32c(&bytes);
    Ok(frozen)
}

fn snapshot(o: &FileOffer) -> Result<FileState, HandoverError> {
    let mem = &o.mem;
    let inner = &mem.inner;
    let id = mem.id().map_err(|e| HandoverError::Os {
        op: "fstat",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    let runs = {
        let attrs = inner.attrs_read();
        attrs
            .runs(0, attrs.pages())
            .map(|r| RunRecord {
                start_page: r.start,
                attr: r.attr,
            })
            .collect()
    };
    let numa = inner
        .numa
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(NumaRecord::from_policy)
        .unwrap_or_default();
    let restructure = restructure_of(mem);
    Ok(FileState {
        kind: mem.backing_kind(),
        block_size: mem.block_size(),
        flags: mem.flags(),
        size: mem.size(),
        id,
        runs,
        numa,
        bindings: o.bindings.clone(),
        restructure,
        poison: mem.poisoned_pages(),
        pins: o.pins.clone(),
        vm: o.vm,
    })
}

/// The split (and waiting-to-merge) huge pages of a HugeTLB file, one record per huge page.
fn restructure_of(mem: &GuestMemfd) -> Vec<Restructured> {
    let Some(rs) = mem.inner.restructure.as_ref() else {
        return Vec::new();
    };
    let st = rs.state();
    st.split
        .iter()
        .map(|&h| Restructured {
            offset: h * rs.page,
            len: rs.page,
            kind: if st.waiting.contains(&h) {
                RestructureKind::PendingMerge
            } else {
                RestructureKind::Split
            },
        })
        .collect()
}

fn write_sealed(f: BorrowedFd<'_>, bytes: &[u8]) -> Result<(), HandoverError> {
    let mut done = 0;
    while done < bytes.len() {
        let at = u64::try_from(done).unwrap_or(u64::MAX);
        let n = fd::pwrite(f, &bytes[done..], at).map_err(io("pwrite state"))?;
        if n == 0 {
            return Err(io("pwrite state")(std::io::Error::from_raw_os_error(
                libc::EIO,
            )));
        }
        done += n;
    }
    fd::add_seals(
        f,
        libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
    )
    .map_err(io("seal state"))
}

/// Hands `offers` over to the process at the other end of `sock` (a connected
/// `SOCK_SEQPACKET` Unix socket) and waits for it to take them.
///
/// On success this process no longer owns the files: conversions and `fallocate` on them fail
/// with `EPERM`; drop them. On error the files are thawed and owned by this process as before
/// (see the [module docs](self) for every failure case).
pub fn hand_over(
    sock: BorrowedFd<'_>,
    offers: &[FileOffer],
    opts: &Options,
) -> Result<HandedOver, HandoverError> {
    let frozen = freeze(offers, opts.generation)?;
    opts.step(Step::Frozen);
    let msg = frozen.offer_msg();
    {
        let fds = frozen.fds();
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut anc = SendAncillaryBuffer::new(&mut space);
        if !anc.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(HandoverError::Protocol {
                what: "too many descriptors",
            });
        }
        let bytes = msg.encode();
        match sendmsg(sock, &[IoSlice::new(&bytes)], &mut anc, SendFlags::NOSIGNAL) {
            Ok(_) => {}
            Err(rustix::io::Errno::PIPE | rustix::io::Errno::CONNRESET) => {
                return Err(HandoverError::PeerGone { step: Step::Frozen })
            }
            Err(e) => return Err(os("sendmsg")(e)),
        }
    }
    opts.step(Step::OfferSent);
    finish_old(sock, frozen, opts)
}

/// Steps 4 to 7 for the old owner, once the offer has reached the new owner.
pub(crate) fn finish_old(
    sock: BorrowedFd<'_>,
    frozen: Frozen,
    opts: &Options,
) -> Result<HandedOver, HandoverError> {
    match recv(sock, Some(opts.timeout))? {
        Got::Msg(m, _) if m.op == OP_ACCEPT && m.crc == frozen.crc => {}
        Got::Msg(m, _) if m.op == OP_REJECT => {
            return Err(HandoverError::Rejected { errno: m.errno })
        }
        Got::Msg(..) => {
            let _ = send(sock, &Msg::new(OP_ABORT, frozen.crc));
            return Err(HandoverError::Protocol {
                what: "expected ACCEPT",
            });
        }
        Got::Closed => {
            return Err(HandoverError::PeerGone {
                step: Step::OfferSent,
            })
        }
        Got::TimedOut => {
            let _ = send(sock, &Msg::new(OP_ABORT, frozen.crc));
            return Err(HandoverError::Timeout {
                step: Step::OfferSent,
            });
        }
    }
    opts.step(Step::AcceptReceived);
    if let Some(file) = frozen.poison_changed() {
        let _ = send(sock, &Msg::new(OP_ABORT, frozen.crc));
        return Err(HandoverError::Busy {
            file,
            what: "a page was poisoned during the hand-over",
        });
    }
    if send(sock, &Msg::new(OP_COMMIT, frozen.crc)).is_err() {
        return Err(HandoverError::PeerGone {
            step: Step::AcceptReceived,
        });
    }
    opts.step(Step::CommitSent);
    let state_len = frozen.state_len;
    let confirmed = match recv(sock, Some(opts.timeout))? {
        Got::Msg(m, _) if m.op == OP_DONE => true,
        // The new owner died before it could say it owns: it owned nothing that outlives it,
        // and this side still holds every file, so this side goes on.
        Got::Closed => {
            return Err(HandoverError::PeerGone {
                step: Step::CommitSent,
            })
        }
        // It may own the files and be alive: do not take them back.
        Got::Msg(..) | Got::TimedOut => false,
    };
    let pause = frozen.release();
    opts.step(Step::DoneReceived);
    Ok(HandedOver {
        pause,
        state_len,
        confirmed,
    })
}

// ---------------------------------------------------------------------------------------
// New owner

/// Receives files handed over by the process at the other end of `sock` (see
/// [`hand_over`]). Returns once this process owns them.
pub fn receive(sock: BorrowedFd<'_>, opts: &Options) -> Result<Restored, HandoverError> {
    let (msg, fds) = match recv(sock, Some(opts.timeout))? {
        Got::Msg(m, fds) if m.op == OP_OFFER => (m, fds),
        Got::Msg(..) => {
            return Err(HandoverError::Protocol {
                what: "expected OFFER",
            })
        }
        Got::Closed => return Err(HandoverError::PeerGone { step: Step::Frozen }),
        Got::TimedOut => return Err(HandoverError::Timeout { step: Step::Frozen }),
    };
    opts.step(Step::OfferReceived);
    let mut fds = fds.into_iter();
    let state_fd = fds.next().ok_or(HandoverError::Protocol {
        what: "no descriptors",
    })?;
    let files: Vec<OwnedFd> = fds.collect();
    finish_new(Some(sock), &msg_offer(msg), state_fd, files, opts)
}

/// What an offer announced: the state's length and checksum and the number of files.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OfferInfo {
    pub crc: u32,
    pub state_len: u64,
    pub files: u32,
}

fn msg_offer(m: Msg) -> OfferInfo {
    OfferInfo {
        crc: m.crc,
        state_len: m.state_len,
        files: m.files,
    }
}

/// Steps 3 to 6 for the new owner. Without a socket (exec replacing the old owner) the new
/// owner owns at once.
pub(crate) fn finish_new(
    sock: Option<BorrowedFd<'_>>,
    offer: &OfferInfo,
    state_fd: OwnedFd,
    files: Vec<OwnedFd>,
    opts: &Options,
) -> Result<Restored, HandoverError> {
    let restored = match verify(offer, &state_fd, files) {
        Ok(r) => r,
        Err(e) => {
            if let Some(sock) = sock {
                let mut m = Msg::new(OP_REJECT, offer.crc);
                m.errno = e.errno();
                let _ = send(sock, &m);
            }
            return Err(e);
        }
    };
    opts.step(Step::Verified);
    let Some(sock) = sock else {
        return Ok(restored);
    };
    let mut restored = restored;
    if send(sock, &Msg::new(OP_ACCEPT, offer.crc)).is_err() {
        // The old owner is gone after sending everything: this side is the survivor.
        restored.old_owner_gone = true;
        return Ok(restored);
    }
    opts.step(Step::AcceptSent);
    match recv(sock, None)? {
        Got::Msg(m, _) if m.op == OP_COMMIT => {}
        Got::Msg(m, _) if m.op == OP_ABORT => return Err(HandoverError::Aborted),
        Got::Msg(..) => {
            return Err(HandoverError::Protocol {
                what: "expected COMMIT",
            })
        }
        Got::Closed | Got::TimedOut => {
            restored.old_owner_gone = true;
            return Ok(restored);
        }
    }
    opts.step(Step::CommitReceived);
    let _ = send(sock, &Msg::new(OP_DONE, offer.crc));
    opts.step(Step::DoneSent);
    Ok(restored)
}

fn read_state(offer: &OfferInfo, f: &OwnedFd) -> Result<Vec<u8>, HandoverError> {
    let st = fd::fstat(f.as_fd()).map_err(io("fstat state"))?;
    let len = u64::try_from(st.st_size).unwrap_or(u64::MAX);
    if len != offer.state_len {
        return Err(HandoverError::Protocol {
            what: "state length differs from the offer",
        });
    }
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > MAX_STATE_LEN {
        return Err(super::error::FormatError::TooLarge { len }.into());
    }
    let seals = rustix::fs::fcntl_get_seals(f).map_err(os("F_GET_SEALS"))?;
    if !seals.contains(
        rustix::fs::SealFlags::WRITE | rustix::fs::SealFlags::GROW | rustix::fs::SealFlags::SHRINK,
    ) {
        return Err(HandoverError::Protocol {
            what: "state is not sealed",
        });
    }
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let at = u64::try_from(done).unwrap_or(u64::MAX);
        let n = fd::pread(f.as_fd(), &mut buf[done..], at).map_err(io("pread state"))?;
        if n == 0 {
            return Err(HandoverError::Protocol {
                what: "state shorter than announced",
            });
        }
        done += n;
    }
    Ok(buf)
}

fn verify(
    offer: &OfferInfo,
    state_fd: &OwnedFd,
    files: Vec<OwnedFd>,
) -> Result<Restored, HandoverError> {
    let bytes = read_state(offer, state_fd)?;
    if super::crc::crc32c(&bytes) != offer.crc {
        return Err(HandoverError::Protocol {
            what: "state checksum differs from the offer",
        });
    }
    let state = State::decode(&bytes)?;
    let huge = state
        .files
        .iter()
        .filter(|f| matches!(f.kind, BackingKind::HugeTlb(_)))
        .count();
    let n = state.files.len();
    if files.len() != n + huge || usize::try_from(offer.files).ok() != Some(n) {
        return Err(HandoverError::Protocol {
            what: "file count differs from the descriptors",
        });
    }
    let mut files = files;
    let mut companions = files.split_off(n).into_iter();
    let mut ids: Vec<FileId> = Vec::with_capacity(files.len());
    let mut out = Vec::with_capacity(files.len());
    for (i, (fs, f)) in state.files.into_iter().zip(files).enumerate() {
        let mismatch = |what| HandoverError::Mismatch { file: i, what };
        let st = fd::fstat(f.as_fd()).map_err(io("fstat file"))?;
        if u64::try_from(st.st_size).ok() != Some(fs.size) {
            return Err(mismatch("size differs from fstat"));
        }
        let id = FileId {
            dev: st.st_dev,
            ino: st.st_ino,
        };
        if id != fs.id {
            return Err(mismatch("identity differs from fstat"));
        }
        if ids.contains(&id) {
            return Err(mismatch("the same file twice"));
        }
        ids.push(id);
        let attrs = run_map(&fs.runs, fs.pages());
        let backing: Box<dyn Backing> = match fs.kind {
            BackingKind::HugeTlb(page) => {
                if u64::try_from(st.st_blksize).ok() != Some(page) {
                    return Err(mismatch("huge page size differs from fstat"));
                }
                let pieces = companions.next().ok_or(mismatch("no companion file"))?;
                let pst = fd::fstat(pieces.as_fd()).map_err(io("fstat companion"))?;
                if u64::try_from(pst.st_size).ok() != Some(fs.size) {
                    return Err(mismatch("companion size differs from the file's"));
                }
                let huge = HugeTlb::adopt(f, fs.size, page).map_err(io("map HugeTLB file"))?;
                Box::new(AdoptedHuge { huge, pieces })
            }
            kind => Box::new(Received {
                fd: f,
                kind,
                block: fs.block_size,
                pieces: None,
            }),
        };
        let mem = GuestMemfd::assemble(backing, fs.size, fs.flags, Some(attrs), false)?;
        let restore = |what, errno| HandoverError::Restore {
            file: i,
            what,
            errno,
        };
        restore_restructure(&mem, &fs.restructure)
            .map_err(|e| restore("restructuring", e.errno()))?;
        for &p in &fs.poison {
            mem.inject_poison(p)
                .map_err(|e| restore("poison", e.errno()))?;
        }
        if fs.numa != NumaRecord::default() {
            let policy = fs
                .numa
                .to_policy()
                .map_err(|e| restore("NUMA policy", e.errno()))?;
            mem.set_numa_policy(&policy)
                .map_err(|e| restore("NUMA policy", e.errno()))?;
        }
        let mut pins = Vec::with_capacity(fs.pins.len());
        for p in &fs.pins {
            pins.push((p.tag, mem.pin(p.offset, p.len)?));
        }
        out.push(RestoredFile {
            mem,
            state: fs,
            pins,
        });
    }
    Ok(Restored {
        files: out,
        generation: state.generation,
        old_owner_gone: false,
    })
}

/// A HugeTLB file adopted from the old owner, with its companion file of split pieces.
#[derive(Debug)]
struct AdoptedHuge {
    huge: HugeTlb,
    pieces: OwnedFd,
}

impl AsFd for AdoptedHuge {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.huge.as_fd()
    }
}

impl Backing for AdoptedHuge {
    fn kind(&self) -> BackingKind {
        self.huge.kind()
    }
    fn block_size(&self) -> u64 {
        self.huge.page_size()
    }
    fn as_hugetlb(&self) -> Option<&HugeTlb> {
        Some(&self.huge)
    }
    fn companion(&self) -> Option<BorrowedFd<'_>> {
        Some(self.pieces.as_fd())
    }
}

/// Maps the pieces of every huge page the old owner had split over its window, and marks the
/// pages waiting to merge (they merge once their pins are dropped, as in the old owner).
fn restore_restructure(
    mem: &GuestMemfd,
    records: &[Restructured],
) -> Result<(), crate::ConvertError> {
    let inner = &mem.inner;
    let Some(rs) = inner.restructure.as_ref() else {
        return Ok(());
    };
    let mut ctl = inner.control();
    for r in records {
        let mut at = r.offset;
        while at < r.offset + r.len {
            let range = crate::range::ByteRange {
                start: at,
                end: at + rs.page,
            };
            crate::restructure::follow(inner, &mut ctl.views, true, range)?;
            if r.kind == RestructureKind::PendingMerge {
                rs.set_waiting(at / rs.page, true);
            }
            at += rs.page;
        }
    }
    Ok(())
}

/// Builds the run map from validated runs (starts increasing from 0, below `pages`).
fn run_map(runs: &[RunRecord], pages: u64) -> RunMap {
    let first = runs.first().map_or(Attr::Shared, |r| r.attr);
    let mut map = RunMap::new(pages, first);
    for (i, r) in runs.iter().enumerate().skip(1) {
        let end = runs.get(i + 1).map_or(pages, |n| n.start_page);
        map.set(r.start_page, end, r.attr);
    }
    map
}
