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
//! | 1 | freezes every file (the engine stops every conversion and `fallocate`), snapshots the state into a sealed memfd | | |
//! | 2 | | `OFFER` + `SCM_RIGHTS` [state, file 0, file 1, ...] → | |
//! | 3 | | | reads the state, checks checksum, sizes (`fstat`), identities, runs; builds its files; takes the recorded pins again |
//! | 4 | | ← `ACCEPT` (or `REJECT errno`) | |
//! | 5 | its conversion listeners let go as before a conversion of the whole file to private (a device holding a page vetoes: [`HandoverError::Vetoed`], `EBUSY`, `ABORT` sent); its accessors, pins and guest view `EPERM` (given back if the hand-over fails from here) | `COMMIT` → | **owns** from here; its conversions to private fail with `EAGAIN` until step 7 |
//! | 6 | | ← `DONE` | runs the guest |
//! | 7 | marks its files handed over (conversions and allocation `EPERM`), revokes every view, pin pointer and its guest mapping | `RELEASED` → | converts to private from here (or once the old owner is gone) |
//!
//! Until the old owner has revoked its mappings (step 7), its views still reach the pages that
//! were shared at the freeze; the new owner therefore makes no page private before it reads
//! `RELEASED` or end of file: a conversion to private in that interval fails with `EAGAIN`, as
//! the kernel answers while the host still holds a page, and the guest retries. The guest
//! runs from step 6 on, so the revocation (which costs what unmapping the views costs) is no
//! part of its pause. A file received this way counts every page as shown by a view
//! (`engine::moves`): a kernel reference the old owner took (a page vmspliced into a pipe, an
//! io_uring buffer) outlives its views, and the new owner's first conversion of a resident
//! page to private moves it.
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
//! | old | after `DONE`, before `RELEASED` | new owner: end of file tells it the old owner's mappings are gone; it converts to private from then on |
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

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{
    recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendFlags,
};

mod new_owner;
mod old_owner;
pub(crate) mod step;

pub use new_owner::receive;
pub(crate) use new_owner::{finish_new, OfferInfo};
pub use old_owner::hand_over;
pub(crate) use old_owner::{finish_old, freeze};
pub use step::Step;

use crate::verbs::access::Pin;
use crate::verbs::GuestMemfd;

use super::error::{os, HandoverError};
use super::format::{Binding, FileState, PinRecord, VmLink};

const MAGIC: u32 = u32::from_le_bytes(*b"GMHO");
const PROTO_VERSION: u16 = 2;
const MSG_LEN: usize = 32;
pub(crate) const OP_OFFER: u16 = 1;
pub(crate) const OP_ACCEPT: u16 = 2;
pub(crate) const OP_REJECT: u16 = 3;
pub(crate) const OP_COMMIT: u16 = 4;
pub(crate) const OP_ABORT: u16 = 5;
pub(crate) const OP_DONE: u16 = 6;
pub(crate) const OP_RELEASED: u16 = 7;
/// Descriptors one offer carries at most (the kernel's `SCM_MAX_FD`).
pub(crate) const MAX_FDS: usize = 253;

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
    /// How long this process held the files frozen: from the freeze to its letting go (its
    /// mappings revoked after `DONE`). The new owner's guest may run from `DONE` on.
    pub pause: Duration,
    /// When the freeze began (what `pause` counts from).
    pub frozen_at: Instant,
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

impl Restored {
    /// True once every file may convert to private: the old owner has revoked its mappings
    /// (`RELEASED`) or is gone. Until then a conversion to private fails with `EAGAIN`.
    pub fn old_owner_released(&self) -> bool {
        self.files
            .iter()
            .all(|f| !f.mem.inner.gate().old_owner_maps())
    }

    /// Waits up to `timeout` for [`Restored::old_owner_released`]; its value at the end.
    pub fn wait_old_owner_released(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while !self.old_owner_released() {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        true
    }
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
    pub(crate) fn new(op: u16, crc: u32) -> Msg {
        Msg {
            op,
            errno: 0,
            crc,
            state_len: 0,
            files: 0,
        }
    }

    pub(crate) fn encode(&self) -> [u8; MSG_LEN] {
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

    pub(crate) fn decode(b: &[u8]) -> Result<Msg, HandoverError> {
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

pub(crate) fn send(sock: BorrowedFd<'_>, m: &Msg) -> Result<(), rustix::io::Errno> {
    rustix::net::send(sock, &m.encode(), SendFlags::NOSIGNAL).map(drop)
}

/// What a wait for a message gave.
pub(crate) enum Got {
    Msg(Msg, Vec<OwnedFd>),
    Closed,
    TimedOut,
}

/// Waits up to `timeout` (forever with `None`) for one message and its descriptors.
pub(crate) fn recv(sock: BorrowedFd<'_>, timeout: Option<Duration>) -> Result<Got, HandoverError> {
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
