//! NUMA placement of a file's pages: setting the policy and reading where pages live.

use crate::model::numa::{NumaError, NumaPolicy};
use crate::sys::{numa, to_usize};

use super::GuestMemfd;

/// The online NUMA nodes (`/sys/devices/system/node/online`).
pub fn online_nodes() -> Result<Vec<u32>, NumaError> {
    numa::online_nodes().map_err(|source| NumaError::Os {
        op: "read /sys/devices/system/node/online",
        source,
    })
}

/// Checks `policy` against the online nodes.
pub(crate) fn validate(policy: &NumaPolicy) -> Result<(), NumaError> {
    policy.validate_against(&online_nodes()?)
}

impl GuestMemfd {
    /// Sets the NUMA policy for the file's pages not yet allocated. Validated first (`EINVAL`,
    /// nothing changes); applied to gmem's mapping of the file and to every host view.
    /// `EPERM` in a forked child, while a hand-over commits and once handed over.
    pub fn set_numa_policy(&self, policy: &NumaPolicy) -> Result<(), NumaError> {
        validate(policy)?;
        self.inner.set_numa(policy)
    }

    /// The policy in force for the file, read back from the kernel (`get_mempolicy` on gmem's
    /// mapping). `EPERM` in a forked child and once handed over, where that mapping is not
    /// the file's.
    pub fn numa_policy(&self) -> Result<NumaPolicy, NumaError> {
        self.inner
            .gate()
            .queries()
            .map_err(|_| NumaError::NotOwner)?;
        let guest = self.inner.guest_map().ok_or(NumaError::NoMapping)?;
        let (mode, nodes) = numa::policy_at(guest).map_err(|source| NumaError::Os {
            op: "get_mempolicy",
            source,
        })?;
        NumaPolicy::from_raw(mode, &nodes)
    }

    /// The node holding the page at `offset`, or `None` when it is not allocated (or not
    /// mapped in gmem's mapping yet). Asks `move_pages(2)` without moving anything, so nothing
    /// is allocated by asking. `EPERM` in a forked child and once handed over.
    pub fn numa_node(&self, offset: u64) -> Result<Option<u32>, NumaError> {
        self.inner
            .gate()
            .queries()
            .map_err(|_| NumaError::NotOwner)?;
        if offset >= self.size() {
            return Err(NumaError::Offset { offset });
        }
        let guest = self.inner.guest_map().ok_or(NumaError::NoMapping)?;
        let off = to_usize(offset).map_err(|_| NumaError::Offset { offset })?;
        numa::node_of(guest, off).map_err(|source| NumaError::Os {
            op: "move_pages",
            source,
        })
    }
}
