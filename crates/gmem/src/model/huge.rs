//! Restructuring state of a HugeTLB file: which huge pages are split into 4 KiB pieces, which
//! wait to merge, which merged pages keep their pieces cached, and the accounting a caller
//! can watch. Pure state: the engine performs the splits and merges.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes of pieces per file that stay allocated after merges, so that splitting one of those
/// huge pages again copies into memory that is already there (a plain `memcpy`) instead of
/// allocating 512 pages: eight 2 MiB pages; 1 GiB pages are never cached.
pub const PIECE_CACHE_BYTES: u64 = 16 << 20;

/// Restructuring counters of one HugeTLB file. The handle outlives the file, so a caller can
/// watch pieces that outlive it (a pin held after the last handle is closed) come back.
#[derive(Debug)]
pub struct Accounting {
    page_size: u64,
    huge_pages: u64,
    piece_limit: u64,
    split: AtomicU64,
    waiting: AtomicU64,
    splits: AtomicU64,
    merges: AtomicU64,
    cached: AtomicU64,
    refused: AtomicU64,
}

impl Accounting {
    /// The huge page size of the file (its original allocation unit).
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Huge pages the file holds from the pool (reserved at creation, never fewer).
    pub fn huge_pages(&self) -> u64 {
        self.huge_pages
    }

    /// Huge pages currently split into 4 KiB pieces.
    pub fn split_pages(&self) -> u64 {
        self.split.load(Ordering::Acquire)
    }

    /// Split huge pages that are uniform again but wait for their pieces (held by the host)
    /// before merging.
    pub fn waiting_to_merge(&self) -> u64 {
        self.waiting.load(Ordering::Acquire)
    }

    /// Bytes of 4 KiB pieces currently in use (split pages times the huge page size): memory
    /// the file holds on top of its huge pages.
    pub fn piece_bytes(&self) -> u64 {
        self.split_pages() * self.page_size
    }

    /// The most bytes of pieces the file may hold at once (the builder's
    /// [`max_piece_bytes`](crate::Builder::max_piece_bytes)); a split past it fails with
    /// `ENOMEM`.
    pub fn piece_limit(&self) -> u64 {
        self.piece_limit
    }

    /// Splits refused because they would have gone past [`Accounting::piece_limit`].
    pub fn refused_splits(&self) -> u64 {
        self.refused.load(Ordering::Acquire)
    }

    /// Bytes of pieces kept allocated after a merge, for a quick split of the same huge page
    /// (at most [`PIECE_CACHE_BYTES`]).
    pub fn cached_piece_bytes(&self) -> u64 {
        self.cached.load(Ordering::Acquire) * self.page_size
    }

    /// Splits performed since creation.
    pub fn splits(&self) -> u64 {
        self.splits.load(Ordering::Acquire)
    }

    /// Merges performed since creation.
    pub fn merges(&self) -> u64 {
        self.merges.load(Ordering::Acquire)
    }
}

/// Which huge pages are split, waiting or cached (indices of huge pages).
#[derive(Debug)]
pub struct HugeState {
    page: u64,
    split: BTreeSet<u64>,
    waiting: BTreeSet<u64>,
    /// Merged huge pages whose pieces are still allocated, oldest first.
    cached: VecDeque<u64>,
    acct: Arc<Accounting>,
}

impl HugeState {
    /// State of a file of `huge_pages` huge pages of `page` bytes, holding at most
    /// `piece_limit` bytes of pieces.
    pub fn new(page: u64, huge_pages: u64, piece_limit: u64) -> Self {
        HugeState {
            page,
            split: BTreeSet::new(),
            waiting: BTreeSet::new(),
            cached: VecDeque::new(),
            acct: Arc::new(Accounting {
                page_size: page,
                huge_pages,
                piece_limit,
                split: AtomicU64::new(0),
                waiting: AtomicU64::new(0),
                splits: AtomicU64::new(0),
                merges: AtomicU64::new(0),
                cached: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            }),
        }
    }

    /// The counters (a handle that outlives the file).
    pub fn accounting(&self) -> Arc<Accounting> {
        self.acct.clone()
    }

    /// True when huge page `h` is split.
    pub fn is_split(&self, h: u64) -> bool {
        self.split.contains(&h)
    }

    /// True when one more split stays within the piece limit; counts a refusal otherwise.
    pub fn may_split(&self) -> bool {
        let next = (self.split.len() as u64 + 1).saturating_mul(self.page);
        let ok = next <= self.acct.piece_limit;
        if !ok {
            self.acct.refused.fetch_add(1, Ordering::AcqRel);
        }
        ok
    }

    /// Records `h` as split.
    pub fn set_split(&mut self, h: u64) {
        if self.split.insert(h) {
            self.acct.splits.fetch_add(1, Ordering::AcqRel);
            self.publish();
        }
    }

    /// Records `h` as merged (no longer split nor waiting).
    pub fn set_merged(&mut self, h: u64) {
        if self.split.remove(&h) {
            self.acct.merges.fetch_add(1, Ordering::AcqRel);
        }
        self.waiting.remove(&h);
        self.publish();
    }

    /// Records whether split page `h` waits for its pieces before merging.
    pub fn set_waiting(&mut self, h: u64, waiting: bool) {
        if waiting && self.split.contains(&h) {
            self.waiting.insert(h);
        } else {
            self.waiting.remove(&h);
        }
        self.publish();
    }

    /// True when some split page waits to merge.
    pub fn any_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Split huge pages in `[first, end)`.
    pub fn split_in(&self, first: u64, end: u64) -> Vec<u64> {
        self.split.range(first..end.max(first)).copied().collect()
    }

    /// Waiting huge pages in `[first, end)`.
    pub fn waiting_in(&self, first: u64, end: u64) -> Vec<u64> {
        self.waiting.range(first..end.max(first)).copied().collect()
    }

    /// Takes `h` out of the piece cache; true when its pieces were still allocated.
    pub fn take_cached(&mut self, h: u64) -> bool {
        let hit = match self.cached.iter().position(|&c| c == h) {
            Some(i) => self.cached.remove(i).is_some(),
            None => false,
        };
        self.publish();
        hit
    }

    /// Puts merged page `h` into the piece cache; returns the page pushed out, whose pieces
    /// must be dropped. Huge pages larger than the cache are never cached (returned at once).
    pub fn cache(&mut self, h: u64) -> Option<u64> {
        let cap = usize::try_from(PIECE_CACHE_BYTES / self.page).unwrap_or(0);
        if cap == 0 {
            return Some(h);
        }
        self.cached.push_back(h);
        let out = (self.cached.len() > cap)
            .then(|| self.cached.pop_front())
            .flatten();
        self.publish();
        out
    }

    fn publish(&self) {
        let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        self.acct
            .split
            .store(n(self.split.len()), Ordering::Release);
        self.acct
            .waiting
            .store(n(self.waiting.len()), Ordering::Release);
        self.acct
            .cached
            .store(n(self.cached.len()), Ordering::Release);
    }
}
