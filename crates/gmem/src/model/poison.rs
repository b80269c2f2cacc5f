//! The record of poisoned base pages (memory failure), kept per file offset.

use std::collections::BTreeSet;

use super::units::PageRange;

/// The poisoned base pages of one file. Queries on a file with no poisoned page cost one
/// comparison.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PoisonSet {
    pages: BTreeSet<u64>,
}

impl PoisonSet {
    /// The first poisoned page in `r`.
    pub fn first_in(&self, r: PageRange) -> Option<u64> {
        if self.pages.is_empty() || r.is_empty() {
            return None;
        }
        self.pages.range(r.start..r.end).next().copied()
    }

    /// True when a page of `r` is poisoned.
    pub fn any_in(&self, r: PageRange) -> bool {
        self.first_in(r).is_some()
    }

    /// The poisoned pages of `r`, in order.
    pub fn in_range(&self, r: PageRange) -> Vec<u64> {
        if self.pages.is_empty() || r.is_empty() {
            return Vec::new();
        }
        self.pages.range(r.start..r.end).copied().collect()
    }

    /// Records `page`; false when it was already recorded.
    pub fn insert(&mut self, page: u64) -> bool {
        self.pages.insert(page)
    }

    /// Clears the records in `r`, returning the pages cleared.
    pub fn remove_range(&mut self, r: PageRange) -> Vec<u64> {
        let gone = self.in_range(r);
        for p in &gone {
            self.pages.remove(p);
        }
        gone
    }

    /// Every poisoned page, in order.
    pub fn all(&self) -> Vec<u64> {
        self.pages.iter().copied().collect()
    }

    /// Number of poisoned pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// True when no page is poisoned.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}
