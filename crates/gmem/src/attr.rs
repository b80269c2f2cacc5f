//! Per-page shared/private attributes, kept as merged runs.
//!
//! The kernel keeps guest_memfd attributes in a maple tree keyed by range; gmem keeps a
//! `BTreeMap` from the first page of each run to the run's attribute. The runs cover the whole
//! file and neighbours with equal attributes are always merged, so a uniform file is a single
//! entry whatever its size, and every operation costs `O(log runs)` plus the runs it touches.

use std::collections::BTreeMap;
use std::ops::Bound;

/// Whether the host may reach a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Attr {
    /// The host may map and touch the page.
    Shared,
    /// Only the guest reaches the page; a host touch is `SIGBUS`.
    Private,
}

impl Attr {
    /// The other attribute.
    pub fn flip(self) -> Attr {
        match self {
            Attr::Shared => Attr::Private,
            Attr::Private => Attr::Shared,
        }
    }
}

/// One run of pages with the same attribute, in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First page of the run.
    pub start: u64,
    /// One past the last page of the run.
    pub end: u64,
    /// Attribute of every page in the run.
    pub attr: Attr,
}

impl Run {
    /// The run as a byte range.
    pub fn bytes(&self) -> crate::range::ByteRange {
        crate::range::ByteRange {
            start: self.start * crate::sys::PAGE_SIZE,
            end: self.end * crate::sys::PAGE_SIZE,
        }
    }
}

/// Attributes of `pages` pages as merged runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunMap {
    pages: u64,
    starts: BTreeMap<u64, Attr>,
}

impl RunMap {
    /// A map of `pages` pages (at least one), all with attribute `attr`.
    pub fn new(pages: u64, attr: Attr) -> Self {
        let mut starts = BTreeMap::new();
        starts.insert(0, attr);
        RunMap { pages, starts }
    }

    /// Number of pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Number of runs.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// Always false: a map covers at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The attribute of `page`. `page` must be below [`RunMap::pages`].
    pub fn get(&self, page: u64) -> Attr {
        self.run_at(page).attr
    }

    /// The run containing `page`.
    pub fn run_at(&self, page: u64) -> Run {
        let (&start, &attr) = self
            .starts
            .range(..=page)
            .next_back()
            .unwrap_or((&0, &Attr::Shared));
        let end = self.next_start(start);
        Run { start, end, attr }
    }

    fn next_start(&self, start: u64) -> u64 {
        self.starts
            .range((Bound::Excluded(start), Bound::Unbounded))
            .next()
            .map_or(self.pages, |(&s, _)| s)
    }

    /// True when every page of `[start, end)` has attribute `attr`.
    pub fn all(&self, start: u64, end: u64, attr: Attr) -> bool {
        let run = self.run_at(start);
        run.attr == attr && run.end >= end
    }

    /// The first page in `[start, end)` whose attribute is `attr`, if any.
    pub fn first(&self, start: u64, end: u64, attr: Attr) -> Option<u64> {
        self.runs(start, end).find(|r| r.attr == attr).map(|r| r.start)
    }

    /// The runs overlapping `[start, end)`, clipped to it, in order.
    pub fn runs(&self, start: u64, end: u64) -> impl Iterator<Item = Run> + '_ {
        let first = self.run_at(start);
        let rest = self
            .starts
            .range((Bound::Excluded(first.start), Bound::Excluded(end)));
        std::iter::once((first.start, first.attr))
            .chain(rest.map(|(&s, &a)| (s, a)))
            .map(move |(s, attr)| {
                let run_end = self.next_start(s);
                Run {
                    start: s.max(start),
                    end: run_end.min(end),
                    attr,
                }
            })
    }

    /// Sets `[start, end)` to `attr`, merging with equal neighbours.
    ///
    /// `start < end <= pages()` must hold; callers validate ranges before they get here.
    pub fn set(&mut self, start: u64, end: u64, attr: Attr) {
        let after = (end < self.pages).then(|| self.get(end));
        let before = start.checked_sub(1).map(|p| self.get(p));
        let inner: Vec<u64> = self.starts.range(start..=end).map(|(&s, _)| s).collect();
        for s in inner {
            self.starts.remove(&s);
        }
        if before != Some(attr) {
            self.starts.insert(start, attr);
        }
        if let Some(a) = after {
            if a != attr {
                self.starts.insert(end, a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(m: &RunMap) -> Vec<(u64, u64, Attr)> {
        m.runs(0, m.pages()).map(|r| (r.start, r.end, r.attr)).collect()
    }

    #[test]
    fn set_merges_neighbours() {
        let mut m = RunMap::new(8, Attr::Private);
        m.set(2, 4, Attr::Shared);
        assert_eq!(
            runs(&m),
            vec![
                (0, 2, Attr::Private),
                (2, 4, Attr::Shared),
                (4, 8, Attr::Private)
            ]
        );
        m.set(4, 8, Attr::Shared);
        assert_eq!(runs(&m), vec![(0, 2, Attr::Private), (2, 8, Attr::Shared)]);
        m.set(0, 2, Attr::Shared);
        assert_eq!(runs(&m), vec![(0, 8, Attr::Shared)]);
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn every_other_page_then_uniform() {
        let mut m = RunMap::new(1024, Attr::Shared);
        for p in (0..1024).step_by(2) {
            m.set(p, p + 1, Attr::Private);
        }
        assert_eq!(m.len(), 1024);
        assert!(m.all(1, 2, Attr::Shared));
        assert_eq!(m.first(1, 1024, Attr::Private), Some(2));
        m.set(0, 1024, Attr::Private);
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn matches_per_page_model() {
        let mut m = RunMap::new(64, Attr::Shared);
        let mut model = [Attr::Shared; 64];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let a = x % 64;
            let b = a + 1 + (x >> 8) % (64 - a);
            let attr = if x & 1 == 0 { Attr::Shared } else { Attr::Private };
            m.set(a, b, attr);
            for p in a..b {
                model[usize::try_from(p).unwrap()] = attr;
            }
            for (p, want) in model.iter().enumerate() {
                assert_eq!(m.get(p as u64), *want);
            }
            let rs = runs(&m);
            for w in rs.windows(2) {
                assert_ne!(w[0].2, w[1].2, "unmerged neighbours");
                assert_eq!(w[0].1, w[1].0);
            }
        }
    }
}
