//! The verbs: `impl GuestMemfd`, one file per concern, each a thin layer over the engine.
//!
//! A [`GuestMemfd`] is a handle on an engine (the file's shared state). Every verb validates
//! its arguments, asks the gate, and calls one engine method; nothing here touches page
//! tables or the control lock.

pub(crate) mod access;
pub(crate) mod convert;
pub(crate) mod create;
pub(crate) mod device;
pub(crate) mod fallocate;
pub(crate) mod guest;
pub(crate) mod listen;
pub(crate) mod map;
pub(crate) mod numa;
pub(crate) mod poison;
pub(crate) mod prealloc;
pub(crate) mod query;

use std::sync::Arc;

use crate::engine::Engine;
use crate::model::attr::Attr;

/// A file's identity: distinct files have distinct identities, like distinct inodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    /// Device of the inode.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
}

/// One run of equal attributes, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttrRun {
    /// First byte of the run.
    pub offset: u64,
    /// Length of the run in bytes.
    pub len: u64,
    /// Attribute of every page in the run.
    pub attr: Attr,
}

impl From<crate::model::attr::Run> for AttrRun {
    fn from(run: crate::model::attr::Run) -> AttrRun {
        let b = run.pages().bytes();
        AttrRun {
            offset: b.start,
            len: b.len(),
            attr: run.attr,
        }
    }
}

/// A guest memory file: pages that are each shared or private, with host access enforced.
///
/// Cloning is cheap and yields another handle to the same file (like `dup(2)`); the file lives
/// until the last handle, view and pin is gone.
///
/// ```
/// use gmem::{Attr, Errno, Flags, GuestMemfd};
///
/// let mem = GuestMemfd::builder(4 * 4096)
///     .flags(Flags::MMAP | Flags::INIT_SHARED)
///     .create()?;
/// mem.write_at(0, b"hello")?;
/// mem.convert(0, 4096, Attr::Private)?;
/// // The host can no longer read the page; the guest still can.
/// assert_eq!(mem.read_at(0, &mut [0u8; 5]).unwrap_err().errno(), libc::EFAULT);
/// let mut buf = [0u8; 5];
/// mem.guest()?.read(0, &mut buf)?;
/// assert_eq!(&buf, b"hello");
/// mem.convert(0, 4096, Attr::Shared)?;
/// mem.read_at(0, &mut buf)?;
/// assert_eq!(&buf, b"hello");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct GuestMemfd {
    pub(crate) inner: Arc<Engine>,
    anchors: Arc<[Arc<Anchor>]>,
    /// A follower attached without the guest-view capability.
    guest_view: bool,
}

/// Keeps a file alive for the pins taken through it.
///
/// A pin must keep the file alive (it may outlive every handle), yet cloning the file's own
/// `Arc` from several threads would make them all write one cache line. Each handle carries
/// [`ANCHORS`] anchors, each its own allocation on its own cache line and holding the file;
/// a pin clones the anchor of its thread's shard.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Anchor {
    pub inner: Arc<Engine>,
}

/// Anchors per file handle.
const ANCHORS: usize = 8;

impl GuestMemfd {
    pub(crate) fn from_engine(inner: Arc<Engine>, guest_view: bool) -> Self {
        let anchors = (0..ANCHORS)
            .map(|_| {
                Arc::new(Anchor {
                    inner: inner.clone(),
                })
            })
            .collect();
        GuestMemfd {
            inner,
            anchors,
            guest_view,
        }
    }

    /// The anchor of the calling thread's shard.
    pub(crate) fn anchor(&self) -> Arc<Anchor> {
        let shard = crate::engine::shard_lock::thread_number();
        self.anchors[shard % self.anchors.len()].clone()
    }
}
