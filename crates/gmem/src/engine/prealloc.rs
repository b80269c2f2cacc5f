//! Preallocation: populating every page of a file up front.
//!
//! [`GuestMemfd::preallocate`](crate::GuestMemfd::preallocate) allocates (and zeroes) every
//! page, in chunks, calling a progress callback after each. How depends on the backing,
//! measured on this class of machine (`BENCHMARKS.md`, P6):
//!
//! - **HugeTLB**: `MADV_POPULATE_WRITE` on gmem's own mapping, the chunks handed out to worker
//!   threads. Zeroing huge pages is the whole cost and faults on disjoint ranges of one
//!   mapping run in parallel (the mapping lock is taken shared; HugeTLB faults serialise only
//!   per huge page), so it spreads over the cores; `fallocate(2)` would zero them all under
//!   the inode lock. The pages end up mapped in gmem's mapping too.
//! - **other backings** (shmem, the kernel guest_memfd): `fallocate(2)`, chunk after chunk on
//!   one thread. It allocates without building page tables, which costs about four times less
//!   than populating a 4 KiB mapping, and it serialises on the inode lock anyway, so more
//!   threads would not help.
//!
//! Private pages are allocated like shared ones (neither path goes through a host view). The
//! NUMA policy (set on the builder) is in force before preallocation starts.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::Engine;
use crate::model::error::Errno;
use crate::sys::to_usize;

/// Progress of a preallocation, as reported to the callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes populated so far.
    pub done: u64,
    /// Bytes to populate in all.
    pub total: u64,
}

type Callback = Arc<dyn Fn(Progress) + Send + Sync>;

/// Preallocation options. `Prealloc::default()` uses every available core (at most 16, for
/// HugeTLB; other backings use one thread, see the [`crate::GuestMemfd::preallocate`]) and 64 MiB
/// chunks, with no callback.
#[derive(Clone)]
pub struct Prealloc {
    threads: usize,
    chunk: u64,
    progress: Option<Callback>,
}

impl fmt::Debug for Prealloc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prealloc")
            .field("threads", &self.threads)
            .field("chunk", &self.chunk)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl Default for Prealloc {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Prealloc {
            threads: cores.min(16),
            chunk: 64 << 20,
            progress: None,
        }
    }
}

impl Prealloc {
    /// Default options (see the type docs).
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of worker threads for HugeTLB files (at least 1).
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n.max(1);
        self
    }

    /// Bytes per chunk handed to a worker (rounded up to the file's block size).
    pub fn chunk(mut self, bytes: u64) -> Self {
        self.chunk = bytes.max(1);
        self
    }

    /// Called after each chunk with the bytes done so far.
    pub fn on_progress(mut self, f: impl Fn(Progress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }
}

/// Why preallocation failed.
#[derive(Debug, thiserror::Error)]
pub enum PreallocError {
    /// A HugeTLB file without gmem's mapping (never, in practice): `ENODEV`.
    #[error("the file has no mapping to populate")]
    NoMapping,
    /// This process may not allocate now (`EPERM`: frozen, handed over, a follower, a
    /// forked child).
    #[error(transparent)]
    Gate(#[from] super::gate::GateError),
    /// Populating a chunk failed (`ENOMEM`, `EFAULT` past a HugeTLB reservation...).
    #[error("populating at offset {offset:#x}: {source}")]
    Os {
        /// First byte of the chunk that failed.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Errno for PreallocError {
    fn errno(&self) -> i32 {
        match self {
            PreallocError::NoMapping => libc::ENODEV,
            PreallocError::Os { source, .. } => crate::model::error::os_errno(source),
            PreallocError::Gate(e) => e.errno(),
        }
    }

    fn error_offset(&self) -> Option<u64> {
        match self {
            PreallocError::Os { offset, .. } => Some(*offset),
            _ => None,
        }
    }
}

impl Engine {
    /// Allocates every page of the file now (see the [module docs](self)).
    pub(crate) fn preallocate(&self, opts: &Prealloc) -> Result<(), PreallocError> {
        self.gate().allocation()?;
        let map = self.guest_map();
        let block = self.block_size();
        let chunk = opts.chunk.div_ceil(block) * block;
        let total = self.size();
        let chunks = total.div_ceil(chunk);
        let hugetlb = matches!(self.backing().kind(), crate::BackingKind::HugeTlb(_));
        let map = match (hugetlb, map) {
            (true, None) => return Err(PreallocError::NoMapping),
            (_, m) => m,
        };
        let threads = if hugetlb {
            u64::try_from(opts.threads)
                .unwrap_or(1)
                .clamp(1, chunks.max(1))
        } else {
            1
        };
        let next = AtomicU64::new(0);
        let done = AtomicU64::new(0);
        let failure: Mutex<Option<PreallocError>> = Mutex::new(None);
        let work = || loop {
            if failure.lock().map_or(true, |f| f.is_some()) {
                return;
            }
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= chunks {
                return;
            }
            let start = i * chunk;
            let len = chunk.min(total - start);
            let res = if let Some(map) = map.filter(|_| hugetlb) {
                to_usize(start)
                    .and_then(|s| Ok((s, to_usize(len)?)))
                    .and_then(|(s, l)| map.advise(s, l, libc::MADV_POPULATE_WRITE))
            } else {
                self.backing()
                    .fallocate(libc::FALLOC_FL_KEEP_SIZE, start, len)
            };
            if let Err(source) = res {
                if let Ok(mut f) = failure.lock() {
                    f.get_or_insert(PreallocError::Os {
                        offset: start,
                        source,
                    });
                }
                return;
            }
            let d = done.fetch_add(len, Ordering::AcqRel) + len;
            if let Some(cb) = &opts.progress {
                cb(Progress { done: d, total });
            }
        };
        // HugeTLB faults the guest mapping without the page-state lock: a page move meanwhile
        // must re-guard the views after its punch.
        let _unlocked = hugetlb.then(|| self.unlocked_faults());
        std::thread::scope(|s| {
            for _ in 1..threads {
                s.spawn(work);
            }
            work();
        });
        match failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
