//! Cross-process coordination: another process maps the same file and loses access to pages
//! converted to private, as every mapper of a kernel guest_memfd does.
//!
//! # Protocol
//!
//! The owner calls [`crate::GuestMemfd::share_with_process`], which creates a `SOCK_SEQPACKET`
//! socket pair, keeps one end and returns the other, to be inherited by a child or sent with
//! `SCM_RIGHTS`. The owner writes one *hello* packet on it at once, carrying the file's size,
//! flags, block size and backing kind, with two descriptors: the memory itself and a sealed
//! memfd holding the attribute runs at that instant (HugeTLB: a third, the companion file of
//! split pieces, followed by one `SPLIT` request per huge page split at that instant), then
//! one `POISON` request per poisoned page. The other process calls [`crate::GuestMemfd::attach`],
//! which checks every descriptor (size and seals: a file that could shrink under the
//! follower's mappings is refused), builds a *follower* file from the hello, applies the
//! requests already queued behind it, and starts an agent thread that serves the owner's
//! requests:
//!
//! | request (owner → follower) | the follower | reply |
//! |---|---|---|
//! | `REVOKE offset len` | checks its own host references, marks the range private, revokes it in its views | `0`, or `EAGAIN` + first busy page |
//! | `RESTORE offset len` | lets its views reach the range, marks it shared | `0` |
//! | `FREEZE offset len` (HugeTLB) | holds off the writers of that huge page in its guest mapping and views (userfaultfd write protection) before the owner copies it, until the `SPLIT`, `MERGE` or `THAW` that follows (or [`FREEZE_LIMIT`] without a request: the owner gave up) | `0`, or `EAGAIN` + a page it holds |
//! | `THAW offset len` (HugeTLB) | lets the writers it held go on (the split or merge did not happen) | `0` |
//! | `SPLIT offset len` (HugeTLB) | maps the owner's pieces of that huge page over its windows, lets held writers go on | `0`, or `EAGAIN` + a page it holds |
//! | `MERGE offset len` (HugeTLB) | maps the huge page back over its windows, lets held writers go on | `0`, or `EAGAIN` + a page it holds |
//! | `POISON offset len` | records the page as poisoned and guards it in its views | `0` |
//! | `UNPOISON offset len` | clears poison records in the range (after a punch-hole) | `0` |
//! | `REFRESH offset len` | puts the markers of the range's private and poisoned pages back (after a punch-hole) | `0` |
//!
//! Packets are 24 bytes, little-endian: `op:u32 seq:u32 offset:u64 len:u64`; replies
//! `seq:u32 errno:i32 offset:u64 0:u64`. Each follower is a [participant](crate::Participant)
//! of every conversion: a follower refusing a revoke makes the whole conversion fail with
//! `EAGAIN`, rolled back in the owner and in the followers that had accepted.
//!
//! # Time: a follower that does not answer
//!
//! The owner waits at most [`PEER_TIMEOUT`] in all for a reply (replies to older requests do
//! not extend the wait), holding the file's control lock. A follower that misses it is
//! *stalled*: that conversion fails with `ETIMEDOUT` and is rolled back, and from then on
//! every conversion to private, split, merge fails at once with `ETIMEDOUT` (no page is
//! reported private while a process that may still map it has not confirmed), while
//! conversions to shared go on. A stalled follower that answers again is sent the undo of
//! what timed out and is live again; one whose socket closes is dropped. So a stuck follower
//! costs one `PEER_TIMEOUT` once, then blocks conversions to private of its file until it
//! answers or dies — it cannot hold the control lock longer.
//!
//! # When one side dies
//!
//! - A follower dies: its mappings die with its address space (the kernel tears down the
//!   address space before it closes the descriptors), so the owner, seeing the socket closed,
//!   drops the follower and goes on.
//! - The owner dies: the follower's agent sees the socket closed, lets go of any writers it
//!   held for a split or merge, and stops. The follower keeps
//!   the memory (it holds the descriptor) with the attributes last received, still enforced in
//!   its views; it receives no more conversions.
//!
//! # What a follower is
//!
//! Host code. Conversions are the owner's ([`crate::GuestMemfd::convert`] on a follower is `EPERM`),
//! and a follower has no guest view unless it was attached with
//! [`crate::GuestMemfd::attach_with_guest_view`] (a software hypervisor's vCPU process).

mod follower;
mod owner;
pub(crate) mod wire;

use std::io;
use std::time::Duration;

use crate::engine::CreateError;
use crate::model::error::Errno;

pub use wire::{parse_hello, parse_runs, Hello};

/// The longest an owner waits for a follower's reply, in all.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a follower holds off its writers of a huge page for its owner's split or
/// merge (from the `FREEZE` it accepted) without a request: an owner that timed out on this
/// follower rolled back, and its `THAW` waits for its next request. Six times
/// [`PEER_TIMEOUT`]: an owner that was answered in time sends the `SPLIT` or `MERGE` once
/// its other followers have answered their own `FREEZE`, each within [`PEER_TIMEOUT`].
pub const FREEZE_LIMIT: Duration = Duration::from_secs(30);

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
    /// A received descriptor does not hold what the hello announced, or lacks the seals gmem
    /// relies on (`EBADF`).
    #[error("received descriptor refused: {0}")]
    Descriptor(&'static str),
    /// The received file could not be set up.
    #[error(transparent)]
    Create(#[from] CreateError),
    /// This process may not share the file (`EPERM`).
    #[error(transparent)]
    Gate(#[from] crate::engine::gate::GateError),
}

impl Errno for PeerError {
    fn errno(&self) -> i32 {
        match self {
            PeerError::Os { source, .. } => crate::model::error::os_errno(source),
            PeerError::Protocol(_) => libc::EPROTO,
            PeerError::Descriptor(_) => libc::EBADF,
            PeerError::Create(e) => e.errno(),
            PeerError::Gate(e) => e.errno(),
        }
    }
}

pub(crate) fn os(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> PeerError {
    move |e| PeerError::Os {
        op,
        source: e.into(),
    }
}
