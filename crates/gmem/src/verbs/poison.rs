//! Memory failure: injecting and querying poison (rules in the engine's poison docs).

use crate::engine::poison::PoisonError;

use super::GuestMemfd;

impl GuestMemfd {
    /// Marks the base page containing `offset` as poisoned (memory failure): host views fault
    /// on it, accessors and the guest view fail with `EHWPOISON`, a punch-hole clears it,
    /// peer processes follow. Injecting an already poisoned page succeeds.
    pub fn inject_poison(&self, offset: u64) -> Result<(), PoisonError> {
        let page = self.inner.page_at(offset)?;
        self.inner.inject_poison(page)
    }

    /// True when the page containing `offset` is poisoned. `EINVAL` past the end of the
    /// file; `EPERM` in a forked child and once handed over (the record stopped being the
    /// file's at the fork or the hand-over).
    pub fn is_poisoned(&self, offset: u64) -> Result<bool, PoisonError> {
        self.inner.gate().queries()?;
        let page = self.inner.page_at(offset)?;
        Ok(self.inner.is_poisoned(page))
    }

    /// Byte offsets of every poisoned page, in order; `EPERM` in a forked child and once
    /// handed over.
    pub fn poisoned_pages(&self) -> Result<Vec<u64>, PoisonError> {
        self.inner.gate().queries()?;
        Ok(self.inner.poisoned_offsets())
    }
}
