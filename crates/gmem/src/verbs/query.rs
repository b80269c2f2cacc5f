//! What a file is: size, flags, identity, attributes; and the file operations guest memory
//! refuses (`read`, `write`, resize).

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use crate::backing::BackingKind;
use crate::engine::gate::GateError;
use crate::model::error::Errno;
use crate::model::flags::Flags;
use crate::model::units::{ByteRange, RangeError};

use super::{AttrRun, FileId, GuestMemfd};
use crate::model::attr::Attr;

/// Errors of the file operations a guest memory file refuses (`read`, `write`, resize) and of
/// attribute queries.
///
/// Attribute queries answer only where the record is the file's: a forked child's copy of
/// the page state stops following the parent's conversions at the fork (and may have been
/// copied while a parent thread was changing it), and an old owner's stops at the hand-over,
/// so there they fail with `EPERM` ([`FileError::Gate`]), as the other verbs do.
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
    /// The caller is a forked child of the process that owns the file, or the file was
    /// handed over to another process (`EPERM`).
    #[error(transparent)]
    Gate(#[from] GateError),
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

impl Errno for FileError {
    fn errno(&self) -> i32 {
        match self {
            FileError::Unsupported {
                op: "pread" | "pwrite",
            } => libc::ESPIPE,
            FileError::Unsupported { .. } | FileError::Resize { .. } | FileError::Range(_) => {
                libc::EINVAL
            }
            FileError::Gate(e) => e.errno(),
            FileError::Os { source, .. } => crate::model::error::os_errno(source),
        }
    }

    fn error_offset(&self) -> Option<u64> {
        match self {
            FileError::Range(e) => Some(e.offset()),
            _ => None,
        }
    }
}

impl GuestMemfd {
    /// Size in bytes (never changes).
    pub fn size(&self) -> u64 {
        self.inner.size()
    }

    /// Creation flags.
    pub fn flags(&self) -> Flags {
        self.inner.flags()
    }

    /// The allocation unit: 4 KiB, or the huge page size for HugeTLB.
    pub fn block_size(&self) -> u64 {
        self.inner.block_size()
    }

    /// The backing's kind.
    pub fn backing_kind(&self) -> BackingKind {
        self.inner.backing().kind()
    }

    /// True for a handle attached to another process's file ([`GuestMemfd::attach`]).
    pub fn is_follower(&self) -> bool {
        self.inner.gate().is_follower()
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
        self.inner.gate().queries()?;
        let page = self.inner.page_at(offset)?;
        Ok(self.inner.attr(page))
    }

    /// The runs of equal attributes inside `[offset, offset + len)` (page aligned), clipped.
    pub fn runs(&self, offset: u64, len: u64) -> Result<Vec<AttrRun>, FileError> {
        self.inner.gate().queries()?;
        let r = self.inner.page_range(offset, len)?;
        let p = r.pages();
        Ok(self
            .inner
            .runs(p.start, p.end)
            .into_iter()
            .map(AttrRun::from)
            .collect())
    }

    /// True when some page of `[offset, offset + len)` is private (any alignment).
    pub fn any_private(&self, offset: u64, len: u64) -> Result<bool, FileError> {
        self.inner.gate().queries()?;
        let r: ByteRange = self.inner.byte_range(offset, len)?;
        let p = r.pages();
        Ok(self.inner.any_attr(p.start, p.end, Attr::Private))
    }

    /// The number of runs covering the whole file.
    pub fn run_count(&self) -> Result<usize, FileError> {
        self.inner.gate().queries()?;
        Ok(self.inner.run_count())
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
        if self.inner.backing().kernel_refuses_io() {
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
    /// The backing descriptor: a capability. Memory reached through a raw mapping of it is
    /// outside gmem's enforcement: pass it only to KVM memslots or to a gmem peer. A file
    /// whose views are sealed (the kernel guest_memfd) is emptied when its last gmem handle
    /// goes, unless it was shared with another process through gmem.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.fd()
    }
}
