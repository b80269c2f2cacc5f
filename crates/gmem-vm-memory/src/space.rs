//! [`GmemAddressSpace`]: the current [`GmemMemory`] snapshot, swapped when regions change.

use std::sync::{Arc, RwLock};

use vm_memory::GuestAddressSpace;

use crate::layout::{LayoutError, RegionSpec};
use crate::memory::GmemMemory;

/// vm-memory's [`GuestAddressSpace`] over gmem: devices call
/// [`memory()`](GuestAddressSpace::memory) for the current snapshot and keep using it (and
/// the slices they took from it) while the VMM swaps in a new one.
///
/// Changes go through [`GmemAddressSpace::update`]: the new snapshot is built and validated
/// from the current one, then published whole; a refused change publishes nothing.
#[derive(Debug, Clone)]
pub struct GmemAddressSpace {
    current: Arc<RwLock<Arc<GmemMemory>>>,
}

impl GmemAddressSpace {
    /// An address space starting with `mem`.
    pub fn new(mem: GmemMemory) -> Self {
        GmemAddressSpace {
            current: Arc::new(RwLock::new(Arc::new(mem))),
        }
    }

    /// Builds a new snapshot from the current one with `f` and publishes it. Updates are
    /// serialised; on error the current snapshot stays.
    pub fn update(
        &self,
        f: impl FnOnce(&GmemMemory) -> Result<GmemMemory, LayoutError>,
    ) -> Result<(), LayoutError> {
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        let next = f(&cur)?;
        *cur = Arc::new(next);
        Ok(())
    }

    /// Adds a region (see [`GmemMemory::insert_region`]).
    pub fn insert_region(&self, spec: RegionSpec) -> Result<(), LayoutError> {
        self.update(|m| m.insert_region(spec))
    }

    /// Removes the region starting at `gpa` (see [`GmemMemory::remove_region`]).
    pub fn remove_region(&self, gpa: u64) -> Result<(), LayoutError> {
        self.update(|m| m.remove_region(gpa))
    }
}

impl GuestAddressSpace for GmemAddressSpace {
    type M = GmemMemory;
    type T = Arc<GmemMemory>;

    fn memory(&self) -> Arc<GmemMemory> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
