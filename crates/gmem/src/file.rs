//! The guest memory file: creation, identity, queries, and the refused file operations.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_utils::sync::{ShardedLock, ShardedLockReadGuard, ShardedLockWriteGuard};

use crate::attr::{Attr, RunMap};
use crate::backing::{Backing, BackingKind, Shmem};
use crate::flags::Flags;
use crate::listener::ListenerSet;
use crate::range::{ByteRange, RangeError};
use crate::refs::RefTable;
use crate::sys::mapping::Mapping;
use crate::sys::uffd::Uffd;
use crate::sys::{to_usize, PAGE_SIZE};
use crate::view::host::ViewSlot;

/// Why a guest memory file could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// Size is zero or not a multiple of the backing's block size (`EINVAL`).
    #[error("size {size:#x} is zero or not a multiple of {block:#x}")]
    InvalidSize {
        /// Size requested.
        size: u64,
        /// Block size of the backing.
        block: u64,
    },
    /// A flag bit gmem does not know (`EINVAL`).
    #[error("unknown flags {bits:#x}")]
    UnknownFlags {
        /// The unknown bits.
        bits: u64,
    },
    /// The HugeTLB backing could not be created: unsupported page size (`EINVAL`) or a pool
    /// too short to reserve the whole file (`ENOMEM`, naming the shortfall).
    #[error(transparent)]
    HugeTlb(#[from] crate::backing::hugetlb::HugeTlbError),
    /// The NUMA policy was refused (`EINVAL`) or could not be applied.
    #[error(transparent)]
    Numa(#[from] crate::numa::NumaError),
    /// Preallocation failed.
    #[error(transparent)]
    Prealloc(#[from] crate::prealloc::PreallocError),
    /// The backing could not be created or mapped.
    #[error("{op} failed: {source}")]
    Backing {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl CreateError {
    /// The errno the kernel returns for the same case.
    pub fn errno(&self) -> i32 {
        match self {
            CreateError::InvalidSize { .. } | CreateError::UnknownFlags { .. } => libc::EINVAL,
            CreateError::Backing { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            CreateError::HugeTlb(e) => e.errno(),
            CreateError::Numa(e) => e.errno(),
            CreateError::Prealloc(e) => e.errno(),
        }
    }
}

/// Errors of the file operations a guest memory file refuses (`read`, `write`, resize) and of
/// attribute queries.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The operation is not supported on guest memory. The errno is the kernel guest_memfd's:
    /// `EINVAL` for `read`/`write`, `ESPIPE` for `pread`/`pwrite` (the file is not seekable).
    #[error("{op} is not supported on guest memory")]
    Unsupported {
        /// The refused operation.
        op: &'static str,
    },
    /// The size of a guest memory file never changes (`EINVAL`).
    #[error("guest memory cannot be resized to {size:#x}")]
    Resize {
        /// Size requested.
        size: u64,
    },
    /// A range argument was invalid (`EINVAL`).
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The kernel refused the operation itself (kernel backing).
    #[error("{op}: {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl FileError {
    /// The errno the kernel returns for the same case.
    pub fn errno(&self) -> i32 {
        match self {
            FileError::Unsupported {
                op: "pread" | "pwrite",
            } => libc::ESPIPE,
            FileError::Unsupported { .. } | FileError::Resize { .. } | FileError::Range(_) => {
                libc::EINVAL
            }
            FileError::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

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

/// State that changes only under the control lock: the views to revoke, the listeners, the
/// userfaultfd. Conversion, mapping and listener registration serialise on it.
#[derive(Debug, Default)]
pub(crate) struct Control {
    pub views: Vec<ViewSlot>,
    pub next_view: u64,
    pub listeners: ListenerSet,
    pub uffd: Option<Arc<Uffd>>,
    pub peers: crate::peer::PeerSet,
}

/// Shared state of one guest memory file; [`GuestMemfd`] and its views hold it by `Arc`.
#[derive(Debug)]
pub(crate) struct Inner {
    pub backing: Box<dyn Backing>,
    pub size: u64,
    pub flags: Flags,
    pub attrs: ShardedLock<RunMap>,
    pub refs: RefTable,
    pub control: Mutex<Control>,
    /// gmem's own mapping of the whole file: the guest view, and the path accessors copy
    /// through after checking attributes. Never registered for enforcement, never forked.
    pub guest: Option<Mapping>,
    /// Set on a file attached to another process's owner: conversions come from the owner.
    pub follower: bool,
    /// Split/merge state of a HugeTLB file (`None` for other backings).
    pub restructure: Option<crate::restructure::Restructure>,
    /// Poisoned pages.
    pub poison: crate::poison::PoisonSet,
    /// NUMA policy set on the file, re-applied to every window gmem maps afresh.
    pub numa: Mutex<Option<crate::numa::NumaPolicy>>,
    /// Live-update freeze: conversions wait and allocation is refused while a hand-over runs.
    pub freeze: crate::preserve::Freeze,
}

impl Inner {
    pub fn attrs_read(&self) -> ShardedLockReadGuard<'_, RunMap> {
        self.attrs.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn attrs_write(&self) -> ShardedLockWriteGuard<'_, RunMap> {
        self.attrs.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks a page-aligned range inside the file.
    pub fn page_range(&self, offset: u64, len: u64) -> Result<ByteRange, RangeError> {
        ByteRange::checked(offset, len, PAGE_SIZE, self.size)
    }
}

/// Which backing a [`Builder`] creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackingChoice {
    /// memfd with 4 KiB pages.
    #[default]
    Shmem,
    /// HugeTLB memfd with huge pages of this size in bytes
    /// ([`HUGE_2M`](crate::HUGE_2M) or [`HUGE_1G`](crate::HUGE_1G)), the whole size reserved at
    /// creation.
    HugeTlb(u64),
}

/// Builder for [`GuestMemfd`].
#[derive(Debug, Clone)]
pub struct Builder {
    size: u64,
    flags: Flags,
    backing: BackingChoice,
    numa: Option<crate::numa::NumaPolicy>,
    prealloc: Option<crate::prealloc::Prealloc>,
}

impl Builder {
    /// Sets the creation flags.
    pub fn flags(mut self, flags: Flags) -> Self {
        self.flags = flags;
        self
    }

    /// Chooses the backing.
    pub fn backing(mut self, backing: BackingChoice) -> Self {
        self.backing = backing;
        self
    }

    /// Sets the NUMA policy, applied before any page is allocated (validated at
    /// [`Builder::create`]).
    pub fn numa(mut self, policy: crate::numa::NumaPolicy) -> Self {
        self.numa = Some(policy);
        self
    }

    /// Preallocates every page at creation (`None`: pages are allocated on first use).
    pub fn prealloc(mut self, prealloc: Option<crate::prealloc::Prealloc>) -> Self {
        self.prealloc = prealloc;
        self
    }

    /// Creates the file.
    pub fn create(self) -> Result<GuestMemfd, CreateError> {
        let block = match self.backing {
            BackingChoice::Shmem => crate::sys::PAGE_SIZE,
            BackingChoice::HugeTlb(page) => page,
        };
        if let BackingChoice::HugeTlb(page_size) = self.backing {
            if page_size != crate::HUGE_2M && page_size != crate::HUGE_1G {
                return Err(crate::HugeTlbError::UnsupportedPageSize { page_size }.into());
            }
        }
        check_args(self.size, self.flags, block)?;
        if let Some(p) = &self.numa {
            p.validate()?;
        }
        let backing: Box<dyn Backing> = match self.backing {
            BackingChoice::Shmem => {
                Box::new(
                    Shmem::create(self.size).map_err(|source| CreateError::Backing {
                        op: "memfd_create",
                        source,
                    })?,
                )
            }
            BackingChoice::HugeTlb(page) => {
                Box::new(crate::backing::HugeTlb::create(self.size, page)?)
            }
        };
        let mem = GuestMemfd::from_backing(backing, self.size, self.flags)?;
        if let Some(p) = &self.numa {
            mem.set_numa_policy(p)?;
        }
        if let Some(p) = &self.prealloc {
            mem.preallocate(p)?;
        }
        Ok(mem)
    }
}

fn check_args(size: u64, flags: Flags, block: u64) -> Result<(), CreateError> {
    let unknown = flags.difference(Flags::ALL);
    if !unknown.is_empty() {
        return Err(CreateError::UnknownFlags {
            bits: unknown.bits(),
        });
    }
    if size == 0 || size % block != 0 {
        return Err(CreateError::InvalidSize { size, block });
    }
    Ok(())
}

/// A guest memory file: pages that are each shared or private, with host access enforced.
///
/// Cloning is cheap and yields another handle to the same file (like `dup(2)`); the file lives
/// until the last handle, view and pin is gone.
///
/// ```
/// use gmem::{Attr, Flags, GuestMemfd};
///
/// let mem = GuestMemfd::builder(4 * 4096)
///     .flags(Flags::MMAP | Flags::INIT_SHARED)
///     .create()?;
/// mem.write_at(0, b"hello")?;
/// mem.convert(0, 4096, Attr::Private)?;
/// // The host can no longer read the page; the guest still can.
/// assert_eq!(mem.read_at(0, &mut [0u8; 5]).unwrap_err().errno(), libc::EFAULT);
/// let mut buf = [0u8; 5];
/// mem.guest().read(0, &mut buf)?;
/// assert_eq!(&buf, b"hello");
/// mem.convert(0, 4096, Attr::Shared)?;
/// mem.read_at(0, &mut buf)?;
/// assert_eq!(&buf, b"hello");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct GuestMemfd {
    pub(crate) inner: Arc<Inner>,
    anchors: Arc<[Arc<Anchor>]>,
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
    pub inner: Arc<Inner>,
}

/// Anchors per file handle.
const ANCHORS: usize = 8;

impl GuestMemfd {
    pub(crate) fn from_inner(inner: Arc<Inner>) -> Self {
        let anchors = (0..ANCHORS)
            .map(|_| {
                Arc::new(Anchor {
                    inner: inner.clone(),
                })
            })
            .collect();
        GuestMemfd { inner, anchors }
    }

    /// The anchor of the calling thread's shard.
    pub(crate) fn anchor(&self) -> Arc<Anchor> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed);
        }
        let shard = SHARD.with(|s| *s) % self.anchors.len();
        self.anchors[shard].clone()
    }
}

impl GuestMemfd {
    /// Starts building a file of `size` bytes (shmem backing, no flags).
    pub fn builder(size: u64) -> Builder {
        Builder {
            size,
            flags: Flags::NONE,
            backing: BackingChoice::Shmem,
            numa: None,
            prealloc: None,
        }
    }

    /// Creates a shmem-backed file of `size` bytes with `flags`.
    pub fn create(size: u64, flags: Flags) -> Result<Self, CreateError> {
        Self::builder(size).flags(flags).create()
    }

    /// Wraps a backing created elsewhere (for example the kernel guest_memfd from the KVM
    /// crate). `size` and `flags` are validated against the backing's block size.
    pub fn from_backing(
        backing: Box<dyn Backing>,
        size: u64,
        flags: Flags,
    ) -> Result<Self, CreateError> {
        Self::assemble(backing, size, flags, None, false)
    }

    pub(crate) fn assemble(
        backing: Box<dyn Backing>,
        size: u64,
        flags: Flags,
        attrs: Option<RunMap>,
        follower: bool,
    ) -> Result<Self, CreateError> {
        check_args(size, flags, backing.block_size())?;
        let pages = size / PAGE_SIZE;
        let init = if flags.contains(Flags::INIT_SHARED) {
            Attr::Shared
        } else {
            Attr::Private
        };
        let attrs = attrs.unwrap_or_else(|| RunMap::new(pages, init));
        let len = to_usize(size).map_err(|source| CreateError::Backing { op: "size", source })?;
        let guest = if backing.mappable(flags) {
            let map = Mapping::shared(backing.as_fd(), 0, len, libc::MAP_NORESERVE)
                .map_err(|source| CreateError::Backing { op: "mmap", source })?;
            map.advise(0, len, libc::MADV_DONTFORK)
                .map_err(|source| CreateError::Backing {
                    op: "madvise",
                    source,
                })?;
            Some(map)
        } else {
            None
        };
        let restructure = match backing.kind() {
            BackingKind::HugeTlb(page) => Some(
                crate::restructure::Restructure::for_backing(backing.as_ref(), size, page)
                    .map_err(|source| CreateError::Backing {
                        op: "memfd_create(pieces)",
                        source,
                    })?,
            ),
            _ => None,
        };
        let refs = RefTable::new(
            to_usize(pages).map_err(|source| CreateError::Backing { op: "size", source })?,
        )
        .map_err(|source| CreateError::Backing {
            op: "reference table",
            source,
        })?;
        Ok(GuestMemfd::from_inner(Arc::new(Inner {
            backing,
            size,
            flags,
            attrs: ShardedLock::new(attrs),
            refs,
            control: Mutex::new(Control::default()),
            guest,
            follower,
            restructure,
            poison: crate::poison::PoisonSet::default(),
            numa: Mutex::new(None),
            freeze: crate::preserve::Freeze::default(),
        })))
    }

    /// Size in bytes (never changes).
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// Creation flags.
    pub fn flags(&self) -> Flags {
        self.inner.flags
    }

    /// The allocation unit: 4 KiB, or the huge page size for HugeTLB.
    pub fn block_size(&self) -> u64 {
        self.inner.backing.block_size()
    }

    /// The backing's kind.
    pub fn backing_kind(&self) -> BackingKind {
        self.inner.backing.kind()
    }

    /// Size and block size as the kernel reports them for the descriptor (`fstat`).
    pub fn stat(&self) -> Result<(u64, u64), FileError> {
        let st = crate::sys::fd::fstat(self.as_fd()).map_err(|source| FileError::Os {
            op: "fstat",
            source,
        })?;
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let blksize = u64::try_from(st.st_blksize).unwrap_or(0);
        Ok((size, blksize))
    }

    /// The file's identity (device and inode of the descriptor).
    pub fn id(&self) -> Result<FileId, FileError> {
        let st = crate::sys::fd::fstat(self.as_fd()).map_err(|source| FileError::Os {
            op: "fstat",
            source,
        })?;
        Ok(FileId {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }

    /// The attribute of the page containing `offset`.
    pub fn attr(&self, offset: u64) -> Result<Attr, FileError> {
        if offset >= self.inner.size {
            return Err(RangeError::OutOfBounds {
                offset,
                len: 1,
                size: self.inner.size,
            }
            .into());
        }
        Ok(self.inner.attrs_read().get(offset / PAGE_SIZE))
    }

    /// The runs of equal attributes inside `[offset, offset + len)` (page aligned), clipped.
    pub fn runs(&self, offset: u64, len: u64) -> Result<Vec<AttrRun>, FileError> {
        let r = self.inner.page_range(offset, len)?;
        let attrs = self.inner.attrs_read();
        Ok(attrs
            .runs(r.start / PAGE_SIZE, r.end / PAGE_SIZE)
            .map(|run| AttrRun {
                offset: run.start * PAGE_SIZE,
                len: (run.end - run.start) * PAGE_SIZE,
                attr: run.attr,
            })
            .collect())
    }

    /// The number of runs covering the whole file.
    pub fn run_count(&self) -> usize {
        self.inner.attrs_read().len()
    }

    /// `read(2)` on guest memory: refused with `EINVAL`, as by the kernel.
    pub fn read(&self, buf: &mut [u8]) -> Result<usize, FileError> {
        self.raw_io("read", |fd| crate::sys::fd::read(fd, buf))
    }

    /// `write(2)` on guest memory: refused with `EINVAL`, as by the kernel.
    pub fn write(&self, buf: &[u8]) -> Result<usize, FileError> {
        self.raw_io("write", |fd| crate::sys::fd::write(fd, buf))
    }

    /// `pread(2)` on guest memory: refused with `ESPIPE`, as by the kernel (not seekable).
    pub fn pread(&self, buf: &mut [u8], offset: u64) -> Result<usize, FileError> {
        self.raw_io("pread", |fd| crate::sys::fd::pread(fd, buf, offset))
    }

    /// `pwrite(2)` on guest memory: refused with `ESPIPE`, as by the kernel (not seekable).
    pub fn pwrite(&self, buf: &[u8], offset: u64) -> Result<usize, FileError> {
        self.raw_io("pwrite", |fd| crate::sys::fd::pwrite(fd, buf, offset))
    }

    fn raw_io(
        &self,
        op: &'static str,
        f: impl FnOnce(BorrowedFd<'_>) -> io::Result<usize>,
    ) -> Result<usize, FileError> {
        if self.inner.backing.kernel_refuses_io() {
            // The kernel object answers for itself; its answer is what conformance compares.
            return f(self.as_fd()).map_err(|source| FileError::Os { op, source });
        }
        Err(FileError::Unsupported { op })
    }

    /// Resizing is refused with `EINVAL`: a guest memory file has a fixed size.
    pub fn set_len(&self, size: u64) -> Result<(), FileError> {
        Err(FileError::Resize { size })
    }
}

impl AsFd for GuestMemfd {
    /// The backing descriptor. Memory reached through a raw mapping of it is outside gmem's
    /// enforcement: pass it only to KVM memslots or to a gmem peer.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.backing.as_fd()
    }
}
