//! Preallocation: populating every page of a file up front (mechanism per backing in
//! [`Prealloc`]'s docs).

use crate::engine::prealloc::{Prealloc, PreallocError};

use super::GuestMemfd;

impl GuestMemfd {
    /// Allocates every page of the file now, calling `opts`' progress callback after each
    /// chunk. HugeTLB: `MADV_POPULATE_WRITE` spread over worker threads; other backings:
    /// `fallocate(2)` chunk after chunk.
    pub fn preallocate(&self, opts: &Prealloc) -> Result<(), PreallocError> {
        self.inner.preallocate(opts)
    }
}
