#![allow(dead_code, missing_docs)]
//! The run map gmem used before [`AttrMap`](gmem::model::attr::AttrMap): merged runs in
//! chunks of sorted boundaries. Kept here only as the attribute bench's baseline.
//!
//! The kernel keeps guest_memfd attributes in a maple tree keyed by range; gmem keeps merged
//! runs that cover the whole file (see [`RunMap`] for the layout), so a uniform file costs the
//! same few bytes whatever its size, and every operation costs `O(log runs)` plus the runs it
//! touches.

use gmem::model::attr::{Attr, Run};

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
