//! Queries of the page state (attributes and poison records), each one hold of the
//! page-state lock for reading. Called with or without the control lock held (taken before
//! the page state, as everywhere).

use crate::model::attr::{Attr, AttrMap, Run};
use crate::model::units::{page_offset, PageRange};

use super::Engine;

impl Engine {
    /// The attribute of page `page` (inside the file).
    pub(crate) fn attr(&self, page: u64) -> Attr {
        self.read_pages().attrs.get(page)
    }

    /// The runs of equal attributes of pages `[start, end)`, clipped to the file.
    pub(crate) fn runs(&self, start: u64, end: u64) -> Vec<Run> {
        self.read_pages().attrs.runs(start, end).collect()
    }

    /// The runs of equal attributes covering the whole file, in order.
    pub(crate) fn all_runs(&self) -> Vec<Run> {
        let st = self.read_pages();
        st.attrs.runs(0, st.attrs.pages()).collect()
    }

    /// The runs covering the whole file, with the attribute map's change count they were
    /// read at (see [`AttrMap::changes`]).
    pub(crate) fn all_runs_counted(&self) -> (u64, Vec<Run>) {
        let st = self.read_pages();
        (
            st.attrs.changes(),
            st.attrs.runs(0, st.attrs.pages()).collect(),
        )
    }

    /// The attribute map's change count now.
    pub(crate) fn attr_changes(&self) -> u64 {
        self.read_pages().attrs.changes()
    }

    /// True when some page of `[start, end)` has attribute `attr`.
    pub(crate) fn any_attr(&self, start: u64, end: u64, attr: Attr) -> bool {
        self.read_pages().attrs.any(start, end, attr)
    }

    /// The number of runs of equal attributes covering the whole file.
    pub(crate) fn run_count(&self) -> usize {
        self.read_pages().attrs.len()
    }

    /// Calls `f` with the attribute map, the page-state lock held for reading meanwhile
    /// (for code that encodes the whole map, such as the peer protocol's runs).
    pub(crate) fn with_attrs<R>(&self, f: impl FnOnce(&AttrMap) -> R) -> R {
        f(&self.read_pages().attrs)
    }

    /// True when page `page` is poisoned.
    pub(crate) fn is_poisoned(&self, page: u64) -> bool {
        self.read_pages().poison.any_in(PageRange::one(page))
    }

    /// Every poisoned page, in order.
    pub(crate) fn poisoned(&self) -> Vec<u64> {
        self.read_pages().poison.all()
    }

    /// The byte offset of every poisoned page, in order.
    pub(crate) fn poisoned_offsets(&self) -> Vec<u64> {
        self.poisoned().into_iter().map(page_offset).collect()
    }
}
