//! HugeTLB backing: a memfd whose pages come from the kernel's HugeTLB pool.
//!
//! # Reservation
//!
//! The whole size is reserved when the file is created: the backing keeps one `MAP_SHARED`
//! mapping of the whole file made *without* `MAP_NORESERVE`, and the kernel reserves every huge
//! page of a shared HugeTLB mapping at `mmap` time (`HugePages_Rsvd`), refusing the mapping
//! with `ENOMEM` when the pool is short. The reservation belongs to the file (the inode's
//! reservation map), so every later fault through any mapping is served from it: a short pool
//! is reported at creation ([`HugeTlbError::PoolShort`], naming the page size and the
//! shortfall), never as a `SIGBUS` under load.
//!
//! A punch-hole through the kernel would return the punched huge pages to the pool and drop
//! their reservation (the kernel's rule), and another user of the pool could take them before
//! the range is reserved again ([`HugeTlb::reserve`]). gmem's punch-hole zeroes huge pages in
//! place instead (see the engine's punch-hole), so the file never loses its guarantee.
//!
//! The same mapping is gmem's path to the huge pages themselves while a huge page is split
//! (see the engine's HugeTLB restructuring): it is never remapped.
//!
//! # Pool
//!
//! [`PoolStats`] reads the pool counters of one page size from sysfs; [`PoolGuard`] grows the
//! pool (root only) and gives the pages back on drop, serialising every grower in the process.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use super::{Backing, BackingKind};
use crate::sys::mapping::Mapping;
use crate::sys::{fd, to_usize};

/// 2 MiB huge pages.
pub const HUGE_2M: u64 = 2 << 20;
/// 1 GiB huge pages.
pub const HUGE_1G: u64 = 1 << 30;

/// Why a HugeTLB backing could not be created or its pool changed.
#[derive(Debug, thiserror::Error)]
pub enum HugeTlbError {
    /// The page size is not 2 MiB or 1 GiB, or the kernel has no pool of that size (`EINVAL`).
    #[error("huge page size {page_size:#x} is not supported")]
    UnsupportedPageSize {
        /// Page size requested.
        page_size: u64,
    },
    /// The pool cannot reserve the whole file (`ENOMEM`, the kernel's answer to the `mmap`).
    #[error(
        "HugeTLB pool of {} KiB pages is short by {shortfall} pages: the file needs {needed}, \
         {available} are free and unreserved",
        page_size / 1024
    )]
    PoolShort {
        /// Huge page size in bytes.
        page_size: u64,
        /// Huge pages the file needs.
        needed: u64,
        /// Pages free and not reserved by anyone when the reservation failed.
        available: u64,
        /// `needed - available`.
        shortfall: u64,
    },
    /// A syscall or sysfs access failed.
    #[error("{op}: {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl crate::model::error::Errno for HugeTlbError {
    fn errno(&self) -> i32 {
        match self {
            HugeTlbError::UnsupportedPageSize { .. } => libc::EINVAL,
            HugeTlbError::PoolShort { .. } => libc::ENOMEM,
            HugeTlbError::Os { source, .. } => crate::model::error::os_errno(source),
        }
    }
}

fn os(op: &'static str) -> impl FnOnce(io::Error) -> HugeTlbError {
    move |source| HugeTlbError::Os { op, source }
}

/// The counters of one HugeTLB pool (one page size), as sysfs reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Pages in the pool (`nr_hugepages`).
    pub total: u64,
    /// Pages not allocated (`free_hugepages`).
    pub free: u64,
    /// Free pages promised to mappings (`resv_hugepages`).
    pub reserved: u64,
    /// Surplus pages (`surplus_hugepages`).
    pub surplus: u64,
}

impl PoolStats {
    /// Pages a new reservation may take: free and not reserved.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }

    /// Reads the counters of the pool of `page_size` pages.
    pub fn read(page_size: u64) -> Result<Self, HugeTlbError> {
        let dir = pool_dir(page_size)?;
        let get = |name: &str| -> Result<u64, HugeTlbError> {
            let text = std::fs::read_to_string(dir.join(name)).map_err(os("read pool counter"))?;
            text.trim().parse().map_err(|_| HugeTlbError::Os {
                op: "parse pool counter",
                source: io::Error::from_raw_os_error(libc::EINVAL),
            })
        };
        Ok(PoolStats {
            total: get("nr_hugepages")?,
            free: get("free_hugepages")?,
            reserved: get("resv_hugepages")?,
            surplus: get("surplus_hugepages")?,
        })
    }
}

/// The sysfs directory of the pool of `page_size` pages.
fn pool_dir(page_size: u64) -> Result<PathBuf, HugeTlbError> {
    if page_size != HUGE_2M && page_size != HUGE_1G {
        return Err(HugeTlbError::UnsupportedPageSize { page_size });
    }
    let dir = PathBuf::from(format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB",
        page_size / 1024
    ));
    if !dir.is_dir() {
        return Err(HugeTlbError::UnsupportedPageSize { page_size });
    }
    Ok(dir)
}

/// A memfd of huge pages, fully reserved, of fixed size.
#[derive(Debug)]
pub struct HugeTlb {
    /// Field order matters: the reservation mapping goes before the descriptor.
    reservation: Mapping,
    fd: OwnedFd,
    page_size: u64,
}

impl HugeTlb {
    /// Creates a HugeTLB memfd of `size` bytes (a multiple of `page_size`, checked by the
    /// caller) and reserves every page of it.
    pub fn create(size: u64, page_size: u64) -> Result<Self, HugeTlbError> {
        pool_dir(page_size)?;
        let shift = libc::c_uint::try_from(page_size.trailing_zeros()).unwrap_or(0);
        let fd = fd::memfd_create(
            c"gmem-hugetlb",
            libc::MFD_HUGETLB | (shift << libc::MFD_HUGE_SHIFT),
        )
        .map_err(os("memfd_create(MFD_HUGETLB)"))?;
        fd::ftruncate(fd.as_fd(), size).map_err(os("ftruncate"))?;
        fd::add_seals(
            fd.as_fd(),
            libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
        )
        .map_err(os("F_ADD_SEALS"))?;
        let len = to_usize(size).map_err(os("size"))?;
        let mut reservation = match Mapping::shared(fd.as_fd(), 0, len, 0) {
            Ok(m) => m,
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                let needed = size / page_size;
                let available = PoolStats::read(page_size).map_or(0, |s| s.available());
                return Err(HugeTlbError::PoolShort {
                    page_size,
                    needed,
                    available,
                    shortfall: needed.saturating_sub(available).max(1),
                });
            }
            Err(e) => return Err(os("mmap(reserve)")(e)),
        };
        reservation
            .keep_from_children()
            .map_err(os("madvise(DONTFORK)"))?;
        Ok(HugeTlb {
            reservation,
            fd,
            page_size,
        })
    }

    /// The huge page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Adopts a HugeTLB memfd of `size` bytes received from its owner (a live-update
    /// hand-over): its pages are already allocated and reserved, so mapping them takes
    /// nothing from the pool.
    pub(crate) fn adopt(fd: OwnedFd, size: u64, page_size: u64) -> io::Result<Self> {
        let len = to_usize(size)?;
        let mut reservation = Mapping::shared(fd.as_fd(), 0, len, 0)?;
        reservation.keep_from_children()?;
        Ok(HugeTlb {
            reservation,
            fd,
            page_size,
        })
    }

    /// Reserves `[offset, offset + len)` again after a punch-hole dropped its reservation:
    /// a transient shared mapping of the range reserves it in the file's reservation map,
    /// which outlives the mapping. Fails with `ENOMEM` when the pool is short.
    pub fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        let map = Mapping::shared(self.fd.as_fd(), offset, to_usize(len)?, 0)?;
        drop(map);
        Ok(())
    }

    /// gmem's own mapping of every huge page (never remapped, never registered).
    pub(crate) fn huge_mapping(&self) -> &Mapping {
        &self.reservation
    }
}

impl AsFd for HugeTlb {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Backing for HugeTlb {
    fn kind(&self) -> BackingKind {
        BackingKind::HugeTlb(self.page_size)
    }

    fn block_size(&self) -> u64 {
        self.page_size
    }

    fn as_hugetlb(&self) -> Option<&HugeTlb> {
        Some(self)
    }
}

/// Serialises pool changes (and the users of the pages) within the process.
static POOL_LOCK: Mutex<()> = Mutex::new(());

/// Extra huge pages added to a pool, given back when dropped.
///
/// Holding a guard also holds a lock shared by every process on the machine (`flock` on
/// [`POOL_LOCK_PATH`], plus a mutex within the process), so tests and benchmarks that grow
/// the pool run one after another, even from different test binaries, and each sees the pool
/// it asked for.
#[derive(Debug)]
pub struct PoolGuard {
    page_size: u64,
    old_total: u64,
    _file_lock: OwnedFd,
    _lock: MutexGuard<'static, ()>,
}

/// The lock file that serialises pool changes between processes.
pub const POOL_LOCK_PATH: &str = "/tmp/gmem-hugetlb-pool.lock";

/// Opens the lock file and takes an exclusive `flock` on it, waiting for other holders.
fn lock_file() -> Result<OwnedFd, HugeTlbError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(POOL_LOCK_PATH)
        .map_err(os("open pool lock"))?;
    let fd = OwnedFd::from(file);
    loop {
        // SAFETY: plain syscall on a descriptor this function owns.
        let r = unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX) };
        if r == 0 {
            return Ok(fd);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(os("flock pool lock")(e));
        }
    }
}

impl PoolGuard {
    /// Grows the pool of `page_size` pages so that at least `pages` more are available than
    /// now (root only). Fails with `ENOMEM` naming how many the kernel could provide when it
    /// cannot find enough contiguous memory; the pool is then put back as it was.
    pub fn grow(page_size: u64, pages: u64) -> Result<PoolGuard, HugeTlbError> {
        let lock = POOL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let file_lock = lock_file()?;
        let before = PoolStats::read(page_size)?;
        let want = before.total + pages.saturating_sub(before.available());
        let guard = PoolGuard {
            page_size,
            old_total: before.total,
            _file_lock: file_lock,
            _lock: lock,
        };
        write_total(page_size, want)?;
        let after = PoolStats::read(page_size)?;
        if after.available() < pages {
            return Err(HugeTlbError::PoolShort {
                page_size,
                needed: pages,
                available: after.available(),
                shortfall: pages - after.available(),
            });
        }
        Ok(guard)
    }

    /// The page size of the pool this guard grew.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }
}

impl Drop for PoolGuard {
    fn drop(&mut self) {
        // Freed huge pages can reach the pool a moment after their last user is gone (1 GiB
        // pages are released asynchronously), and a page still in use cannot be removed: retry
        // for up to a second until the pool is back to its old size.
        for _ in 0..50 {
            if let Err(e) = write_total(self.page_size, self.old_total) {
                tracing::error!("restoring the HugeTLB pool: {e}");
                return;
            }
            match PoolStats::read(self.page_size) {
                Ok(s) if s.total > self.old_total => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                _ => return,
            }
        }
        tracing::error!(
            page_size = self.page_size,
            "the HugeTLB pool could not be shrunk back to {} pages",
            self.old_total
        );
    }
}

/// Sets the pool size; the default size goes through `/proc/sys/vm/nr_hugepages`.
fn write_total(page_size: u64, total: u64) -> Result<(), HugeTlbError> {
    let default = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("Hugepagesize:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                })
        })
        .map(|kb| kb * 1024);
    let path = if default == Some(page_size) {
        PathBuf::from("/proc/sys/vm/nr_hugepages")
    } else {
        pool_dir(page_size)?.join("nr_hugepages")
    };
    std::fs::write(path, total.to_string()).map_err(os("write nr_hugepages"))
}
