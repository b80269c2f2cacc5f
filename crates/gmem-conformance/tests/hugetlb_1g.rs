//! The hardening cases on HugeTLB with 1 GiB pages: a view of a split 1 GiB page (262,144
//! pieces) and of a whole private one, under the VMM's own page-table operations, kernel
//! references, pins, followers and fork.
//!
//! Each test grows the 1 GiB pool for its own run and gives the pages back when it ends
//! (root only; the tests print `skipped: <reason>` when the pool cannot be grown, which
//! needs 2 GiB of physically contiguous memory). Pool changes are serialised within the
//! process, so the tests of this binary take turns.

use gmem::{BackingChoice, CreateError, Flags, GuestMemfd, PoolGuard, HUGE_1G};
use gmem_conformance::Backend;

/// Huge pages each test uses: the layout's two.
const POOL_PAGES: u64 = 2;

/// HugeTLB with 1 GiB pages; holds the pool it grew until the test ends. Splitting one
/// 1 GiB page takes 1 GiB of pieces, so the file's piece limit is raised to that.
struct HugeTlb1G {
    pool: Result<PoolGuard, String>,
}

impl HugeTlb1G {
    fn new() -> Self {
        let in_child = std::env::var_os(gmem_conformance::child::ROLE_ENV).is_some();
        let pool = if in_child {
            Err("child process".to_string())
        } else {
            PoolGuard::grow(HUGE_1G, POOL_PAGES).map_err(|e| e.to_string())
        };
        HugeTlb1G { pool }
    }
}

impl Backend for HugeTlb1G {
    fn name(&self) -> String {
        "hugetlb-1048576k".to_string()
    }

    fn block_size(&self) -> u64 {
        HUGE_1G
    }

    fn supported_flags(&self) -> Flags {
        Flags::MMAP | Flags::INIT_SHARED
    }

    fn create(&self, size: u64, flags: Flags) -> Result<GuestMemfd, CreateError> {
        GuestMemfd::builder(size)
            .flags(flags)
            .backing(BackingChoice::HugeTlb(HUGE_1G))
            .max_piece_bytes(HUGE_1G)
            .create()
    }

    fn unavailable(&self) -> Option<String> {
        self.pool
            .as_ref()
            .err()
            .map(|e| format!("cannot reserve {POOL_PAGES} huge pages of 1 GiB: {e}"))
    }
}

gmem_conformance::hardening_suite!(hugetlb_1g_hardening, super::HugeTlb1G::new());
