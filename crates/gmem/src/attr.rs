//! Per-page shared/private attributes, kept as merged runs.
//!
//! The kernel keeps guest_memfd attributes in a maple tree keyed by range; gmem keeps merged
//! runs that cover the whole file (see [`RunMap`] for the layout), so a uniform file costs the
//! same few bytes whatever its size, and every operation costs `O(log runs)` plus the runs it
//! touches.

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

/// Keys per chunk before it splits.
const CHUNK_MAX: usize = 64;

/// Index entries per summary entry.
const SUMMARY_STRIDE: usize = 64;

/// A slice of consecutive boundaries, with the attribute of the run starting at the first.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chunk {
    keys: Vec<u64>,
    attr: Attr,
}

impl Chunk {
    /// Attribute of the run starting at `keys[i]`: attributes alternate at every boundary.
    fn attr_at(&self, i: usize) -> Attr {
        if i % 2 == 0 {
            self.attr
        } else {
            self.attr.flip()
        }
    }
}

/// Attributes of `pages` pages as merged runs.
///
/// Stored as the sorted *boundaries* (the first page of every run but the first), split into
/// chunks of at most 64, with a top-level index of each chunk's first boundary. Because there
/// are two attributes and neighbours are merged, attributes alternate at every boundary, so a
/// chunk records only the attribute of its first run. A lookup is a binary search of the
/// index (about 128 KiB at a million runs, so it stays in cache) and one of a chunk; an update
/// touches only the chunks it overlaps. A uniform file has no chunk at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunMap {
    pages: u64,
    first: Attr,
    index: Vec<u64>,
    /// Every [`SUMMARY_STRIDE`]-th entry of `index`: a few hundred words that stay in L1 and
    /// narrow the search of `index` to one block.
    summary: Vec<u64>,
    chunks: Vec<Chunk>,
    keys: usize,
}

impl RunMap {
    /// A map of `pages` pages (at least one), all with attribute `attr`.
    pub fn new(pages: u64, attr: Attr) -> Self {
        RunMap {
            pages,
            first: attr,
            index: Vec::new(),
            summary: Vec::new(),
            chunks: Vec::new(),
            keys: 0,
        }
    }

    /// Number of pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Number of runs.
    pub fn len(&self) -> usize {
        self.keys + 1
    }

    /// Always false: a map covers at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The last chunk whose first boundary is `<= page`, or `None` before any.
    fn chunk_of(&self, page: u64) -> Option<usize> {
        let b = self
            .summary
            .partition_point(|&k| k <= page)
            .checked_sub(1)?;
        let lo = b * SUMMARY_STRIDE;
        let hi = (lo + SUMMARY_STRIDE).min(self.index.len());
        let i = self.index[lo..hi].partition_point(|&k| k <= page);
        Some(lo + i - 1)
    }

    /// Rebuilds the summary from index entry `from` on, after entries were inserted or
    /// removed there.
    fn resummarize(&mut self, from: usize) {
        self.summary.truncate(from / SUMMARY_STRIDE);
        let start = self.summary.len() * SUMMARY_STRIDE;
        self.summary.extend(
            self.index
                .iter()
                .skip(start)
                .step_by(SUMMARY_STRIDE)
                .copied(),
        );
    }

    /// Sets the first boundary of chunk `c` in the index (and the summary).
    fn set_first(&mut self, c: usize, key: u64) {
        self.index[c] = key;
        if c % SUMMARY_STRIDE == 0 {
            self.summary[c / SUMMARY_STRIDE] = key;
        }
    }

    /// Position of the last boundary `<= page`: (chunk, key index), or `None` before any.
    fn locate(&self, page: u64) -> Option<(usize, usize)> {
        let c = self.chunk_of(page)?;
        let i = self.chunks[c]
            .keys
            .partition_point(|&k| k <= page)
            .checked_sub(1)?;
        Some((c, i))
    }

    /// The boundary after position `(c, i)`, or `pages` when it is the last.
    fn next_key(&self, c: usize, i: usize) -> u64 {
        match self.chunks[c].keys.get(i + 1) {
            Some(&k) => k,
            None => self.index.get(c + 1).copied().unwrap_or(self.pages),
        }
    }

    /// The attribute of `page`. `page` must be below [`RunMap::pages`].
    pub fn get(&self, page: u64) -> Attr {
        match self.locate(page) {
            None => self.first,
            Some((c, i)) => self.chunks[c].attr_at(i),
        }
    }

    /// The run containing `page`.
    pub fn run_at(&self, page: u64) -> Run {
        match self.locate(page) {
            None => Run {
                start: 0,
                end: self.index.first().copied().unwrap_or(self.pages),
                attr: self.first,
            },
            Some((c, i)) => Run {
                start: self.chunks[c].keys[i],
                end: self.next_key(c, i),
                attr: self.chunks[c].attr_at(i),
            },
        }
    }

    /// True when every page of `[start, end)` has attribute `attr`.
    pub fn all(&self, start: u64, end: u64, attr: Attr) -> bool {
        let run = self.run_at(start);
        run.attr == attr && run.end >= end
    }

    /// The first page in `[start, end)` whose attribute is `attr`, if any.
    pub fn first(&self, start: u64, end: u64, attr: Attr) -> Option<u64> {
        self.runs(start, end)
            .find(|r| r.attr == attr)
            .map(|r| r.start)
    }

    /// The runs overlapping `[start, end)`, clipped to it, in order.
    pub fn runs(&self, start: u64, end: u64) -> RunIter<'_> {
        let (cur, attr, next) = match self.locate(start) {
            None => (0, self.first, (!self.chunks.is_empty()).then_some((0, 0))),
            Some((c, i)) => (
                self.chunks[c].keys[i],
                self.chunks[c].attr_at(i),
                self.step(c, i),
            ),
        };
        RunIter {
            map: self,
            cur,
            attr,
            next,
            start,
            end,
        }
    }

    /// The position after `(c, i)`.
    fn step(&self, c: usize, i: usize) -> Option<(usize, usize)> {
        if i + 1 < self.chunks[c].keys.len() {
            Some((c, i + 1))
        } else if c + 1 < self.chunks.len() {
            Some((c + 1, 0))
        } else {
            None
        }
    }

    /// Sets `[start, end)` to `attr`, merging with equal neighbours.
    ///
    /// `start < end <= pages()` must hold; callers validate ranges before they get here.
    pub fn set(&mut self, start: u64, end: u64, attr: Attr) {
        if start >= end {
            return;
        }
        let before = start.checked_sub(1).map(|p| self.get(p));
        let after = (end < self.pages).then(|| self.get(end));
        self.remove_keys(start, end);
        let mut grown = [None, None];
        if start == 0 {
            self.first = attr;
        } else if before != Some(attr) {
            grown[0] = Some(self.insert_key(start, attr));
        }
        if let Some(a) = after {
            if a != attr {
                grown[1] = Some(self.insert_key(end, a));
            }
        }
        // Split only now: between the two insertions a chunk need not alternate, and a split
        // derives the new chunk's first attribute from the alternation. Insertions move no
        // chunk, so the indices still hold; the later chunk splits first.
        let [g0, g1] = grown;
        let (lo_c, hi_c) = match (g0, g1) {
            (Some(x), Some(y)) => (Some(x.min(y)), Some(x.max(y)).filter(|&m| m != x.min(y))),
            (x, y) => (x.or(y), None),
        };
        for c in [hi_c, lo_c].into_iter().flatten() {
            self.split_if_full(c);
        }
    }

    /// Removes every boundary in `[lo, hi]`, keeping each chunk's first attribute right.
    /// Chunks left empty are dropped in one pass, so a bulk change costs the chunks it
    /// touches, not that many shifts of the whole map.
    fn remove_keys(&mut self, lo: u64, hi: u64) {
        let start = self.chunk_of(lo).unwrap_or(0);
        let mut end = start;
        let mut emptied = false;
        while end < self.chunks.len() && self.index[end] <= hi {
            let ch = &mut self.chunks[end];
            let a = ch.keys.partition_point(|&k| k < lo);
            let b = ch.keys.partition_point(|&k| k <= hi);
            if a < b {
                if a == 0 && b < ch.keys.len() {
                    ch.attr = ch.attr_at(b);
                }
                ch.keys.drain(a..b);
                self.keys -= b - a;
                match ch.keys.first() {
                    None => emptied = true,
                    Some(&first) if a == 0 => self.set_first(end, first),
                    Some(_) => {}
                }
            }
            end += 1;
        }
        if !emptied {
            return;
        }
        let mut kept = start;
        for c in start..end {
            if !self.chunks[c].keys.is_empty() {
                self.chunks.swap(kept, c);
                kept += 1;
            }
        }
        self.chunks.drain(kept..end);
        let firsts: Vec<u64> = self.chunks[start..kept].iter().map(|c| c.keys[0]).collect();
        self.index.splice(start..end, firsts);
        self.resummarize(start);
    }

    /// Inserts boundary `key` (not present) where the run starting at it has `attr`.
    fn insert_key(&mut self, key: u64, attr: Attr) -> usize {
        self.keys += 1;
        let c = self.chunk_of(key).map_or(0, |c| c + 1);
        if c == 0 {
            match self.chunks.first_mut() {
                Some(ch) => {
                    ch.keys.insert(0, key);
                    ch.attr = attr;
                    self.set_first(0, key);
                }
                None => {
                    self.chunks.push(Chunk {
                        keys: vec![key],
                        attr,
                    });
                    self.index.push(key);
                    self.resummarize(0);
                }
            }
            return 0;
        }
        let ch = &mut self.chunks[c - 1];
        let at = ch.keys.partition_point(|&k| k < key);
        ch.keys.insert(at, key);
        c - 1
    }

    /// Splits chunk `c` in two if it grew past [`CHUNK_MAX`]. Every chunk must alternate when
    /// this runs.
    fn split_if_full(&mut self, c: usize) {
        let ch = &mut self.chunks[c];
        if ch.keys.len() <= CHUNK_MAX {
            return;
        }
        let mid = ch.keys.len() / 2;
        let tail = Chunk {
            attr: ch.attr_at(mid),
            keys: ch.keys.split_off(mid),
        };
        self.index.insert(c + 1, tail.keys[0]);
        self.chunks.insert(c + 1, tail);
        self.resummarize(c + 1);
    }
}

/// Iterator over runs, see [`RunMap::runs`].
#[derive(Debug, Clone)]
pub struct RunIter<'a> {
    map: &'a RunMap,
    cur: u64,
    attr: Attr,
    next: Option<(usize, usize)>,
    start: u64,
    end: u64,
}

impl Iterator for RunIter<'_> {
    type Item = Run;

    fn next(&mut self) -> Option<Run> {
        if self.cur >= self.end {
            return None;
        }
        let stop = match self.next {
            Some((c, i)) => self.map.chunks[c].keys[i],
            None => self.map.pages,
        };
        let run = Run {
            start: self.cur.max(self.start),
            end: stop.min(self.end),
            attr: self.attr,
        };
        self.cur = stop;
        self.attr = self.attr.flip();
        self.next = self.next.and_then(|(c, i)| self.map.step(c, i));
        Some(run)
    }
}

#[cfg(test)]
// Page numbers in these tests are small; indexing the per-page model with them cannot truncate.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn runs(m: &RunMap) -> Vec<(u64, u64, Attr)> {
        m.runs(0, m.pages())
            .map(|r| (r.start, r.end, r.attr))
            .collect()
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

    const N: u64 = 600;

    #[test]
    fn matches_per_page_model() {
        let mut m = RunMap::new(N, Attr::Shared);
        let mut model = [Attr::Shared; N as usize];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..4000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let a = x % N;
            let len = if x & 2 == 0 {
                1 + (x >> 8) % 4
            } else {
                1 + (x >> 8) % (N - a)
            };
            let b = (a + len).min(N);
            let attr = if x & 1 == 0 {
                Attr::Shared
            } else {
                Attr::Private
            };
            m.set(a, b, attr);
            for p in a..b {
                model[usize::try_from(p).unwrap()] = attr;
            }
            for (p, want) in model.iter().enumerate() {
                assert_eq!(m.get(p as u64), *want);
                let run = m.run_at(p as u64);
                let i = p;
                let mut s0 = i;
                while s0 > 0 && model[s0 - 1] == *want {
                    s0 -= 1;
                }
                let mut e0 = i + 1;
                while e0 < model.len() && model[e0] == *want {
                    e0 += 1;
                }
                assert_eq!(
                    (run.start, run.end, run.attr),
                    (s0 as u64, e0 as u64, *want),
                    "run_at({p})"
                );
            }
            for q in [a, b.saturating_sub(1), (a + b) / 2] {
                let q = q.min(N - 1);
                for e in [q + 1, (q + 7).min(N), N] {
                    for at in [Attr::Shared, Attr::Private] {
                        let want = model[q as usize..e as usize].iter().all(|x| *x == at);
                        assert_eq!(m.all(q, e, at), want, "all({q},{e},{at:?})");
                        let wf = model[q as usize..e as usize]
                            .iter()
                            .position(|x| *x == at)
                            .map(|i| q + i as u64);
                        assert_eq!(m.first(q, e, at), wf, "first({q},{e},{at:?})");
                    }
                }
            }
            let rs = runs(&m);
            assert_eq!(rs.len(), m.len());
            assert_eq!(rs.first().map(|r| r.0), Some(0));
            assert_eq!(rs.last().map(|r| r.1), Some(N));
            let mid = a.min(N - 1);
            let clipped: Vec<_> = m.runs(mid, N).collect();
            assert_eq!(clipped[0].start, mid);
            assert_eq!(clipped[0].attr, model[mid as usize]);
            for w in rs.windows(2) {
                assert_ne!(w[0].2, w[1].2, "unmerged neighbours");
                assert_eq!(w[0].1, w[1].0);
            }
        }
    }
}

#[cfg(test)]
mod replay {
    use super::*;

    /// The pattern of the kernel's private_mem_conversions test on four areas of one map:
    /// many chunks, splits between the two boundaries one `set` inserts.
    #[test]
    fn four_areas_odd_frames() {
        let pages = 4096u64;
        let mut m = RunMap::new(pages, Attr::Shared);
        let mut model = vec![Attr::Shared; 4096];
        let mut set = |m: &mut RunMap, a: u64, b: u64, at: Attr, what: &str| {
            m.set(a, b, at);
            for p in a..b {
                model[usize::try_from(p).unwrap()] = at;
            }
            let mut got = Vec::with_capacity(model.len());
            for run in m.runs(0, pages) {
                got.extend((run.start..run.end).map(|_| run.attr));
            }
            assert!(got == model, "{what}: set({a},{b},{at:?}) diverged");
        };
        for (off, sz) in [(0u64, 1u64), (0, 512), (1, 1), (1, 512), (512, 1)] {
            for t in 0..4u64 {
                let base = t * 1024;
                set(
                    &mut m,
                    base + off,
                    base + off + sz,
                    Attr::Private,
                    "to private",
                );
            }
            for j in (1..sz).step_by(2) {
                for t in 0..4u64 {
                    let base = t * 1024 + off + j;
                    set(&mut m, base, base + 1, Attr::Shared, "odd frame");
                }
            }
            for t in 0..4u64 {
                let base = t * 1024;
                set(&mut m, base + off, base + off + sz, Attr::Shared, "back");
            }
        }
        assert_eq!(m.len(), 1);
    }
}
