//! Per-page shared/private attributes as a lazily allocated flat bitmap.
//!
//! [`AttrMap`] keeps one bit per page (1 = [`Attr::Private`]), the layout QEMU uses for the
//! same job, so the two questions on the host accessor path ("what is page `p`?" and "is any
//! page of `[a, b)` private?") cost one or two word loads whatever the number of runs. What the
//! bitmap costs is bounded and exact:
//!
//! - a uniform file (the state every file starts in, and the common state of a running guest's
//!   file) holds no heap at all: the map is its own few words on the stack;
//! - the first [`AttrMap::set`] that makes the file non-uniform allocates exactly
//!   `ceil(pages / 64)` words, which is 32 KiB per GiB of 4 KiB pages, whatever the pattern;
//! - a [`AttrMap::set`] that makes the file uniform again frees the words.
//!
//! The number of runs (maximal stretches of equal pages) is kept up to date by every `set`, so
//! [`AttrMap::len`] is O(1); [`AttrMap::runs`] walks the words, skipping words that hold no
//! boundary eight at a time, so it costs the runs it yields plus a scan of the bitmap over the
//! range asked for (at memory bandwidth, 32 KiB per GiB).
//!
//! The module uses nothing of gmem but `std`; ranges and positions are in pages.
//!
//! # Pages past the end
//!
//! No method panics or loops for any argument. A page at or past [`AttrMap::pages`] reads as
//! [`Attr::Private`] (not reachable by the host, as past the end of a guest_memfd), and every
//! query answers as if the map went on with private pages forever: [`AttrMap::any`] of
//! `Private` over a range that reaches past the end is true, [`AttrMap::all`] of `Shared` over
//! it false, [`AttrMap::first`] of `Private` finds the end, [`AttrMap::run_at`] past the end is
//! the run `[pages, u64::MAX)`. [`AttrMap::runs`] and [`AttrMap::set`] are clipped to the file.
//! An empty range (`start >= end`) has no page: `any` is false, `all` true, `first` `None`.

use std::fmt;
use std::iter::FusedIterator;

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
    #[inline]
    pub const fn flip(self) -> Attr {
        match self {
            Attr::Shared => Attr::Private,
            Attr::Private => Attr::Shared,
        }
    }

    /// The attribute of a page whose bit is `bit` (only its lowest bit counts).
    #[inline]
    const fn of_bit(bit: u64) -> Attr {
        if bit & 1 == 0 {
            Attr::Shared
        } else {
            Attr::Private
        }
    }

    /// The word whose every bit reads as this attribute.
    #[inline]
    const fn fill(self) -> u64 {
        match self {
            Attr::Shared => 0,
            Attr::Private => !0,
        }
    }
}

/// One run of pages with the same attribute, in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Run {
    /// First page of the run.
    pub start: u64,
    /// One past the last page of the run.
    pub end: u64,
    /// Attribute of every page in the run.
    pub attr: Attr,
}

/// The largest page count a map holds: every 4 KiB page of a 64-bit byte space.
///
/// [`AttrMap::new`] clamps to it, which keeps every word index representable in `usize` on
/// 64-bit hosts.
pub const MAX_PAGES: u64 = 1 << 52;

/// How the bits are held.
#[derive(Clone, PartialEq, Eq)]
enum Repr {
    /// Every page has this attribute; no heap.
    Uniform(Attr),
    /// `ceil(pages / 64)` words, bit `p % 64` of word `p / 64` set when page `p` is private.
    /// Never uniform; the bits past the last page are clear. Both make the representation of
    /// a set of attributes unique, so the derived equality is equality of attributes.
    Bits(Box<[u64]>),
}

/// Attributes of `pages` pages, one bit per page, allocated only while the file is mixed.
///
/// See the [module documentation](self) for the layout, the costs and the answers for pages
/// past the end.
///
/// ```
/// use gmem::model::attr::{Attr, AttrMap, Run};
///
/// let mut m = AttrMap::new(1 << 18, Attr::Shared); // 1 GiB of 4 KiB pages
/// assert_eq!(m.heap_bytes(), 0);
/// m.set(10, 20, Attr::Private);
/// assert!(m.any(15, 25, Attr::Private));
/// assert!(m.all(20, 1 << 18, Attr::Shared));
/// assert_eq!(m.first(0, 1 << 18, Attr::Private), Some(10));
/// assert_eq!(m.run_at(12), Run { start: 10, end: 20, attr: Attr::Private });
/// assert_eq!(m.len(), 3);
/// assert_eq!(m.heap_bytes(), 32 * 1024);
/// m.set(10, 20, Attr::Shared);
/// assert_eq!((m.len(), m.heap_bytes()), (1, 0));
/// ```
#[derive(Clone)]
pub struct AttrMap {
    pages: u64,
    /// Pages `p` in `1..pages` whose attribute differs from page `p - 1`'s: the run count
    /// less one.
    boundaries: u64,
    repr: Repr,
    /// Calls of `set` since the map was made (see [`AttrMap::changes`]).
    changes: u64,
}

/// Maps are equal when they hold the same attributes, whatever their history.
impl PartialEq for AttrMap {
    fn eq(&self, other: &Self) -> bool {
        self.pages == other.pages && self.boundaries == other.boundaries && self.repr == other.repr
    }
}

impl Eq for AttrMap {}

/// Index of the word holding page `page`.
///
/// Callers pass pages below the page count of a map holding [`Repr::Bits`], whose word index
/// is below the length of a slice; or use the result only through `get`, which returns `None`
/// for an index past the words whatever it is.
#[inline]
#[allow(
    clippy::cast_possible_truncation,
    reason = "a word index of a page inside an allocated bitmap is below the slice's length, a usize; \
              past it the index is only ever used through a checked get"
)]
const fn widx(page: u64) -> usize {
    (page >> 6) as usize
}

/// The mask of bits `from % 64 ..= 63`.
#[inline]
const fn head_mask(from: u64) -> u64 {
    !0 << (from & 63)
}

/// The mask of bits `0 ..= (last % 64)`.
#[inline]
const fn tail_mask(last: u64) -> u64 {
    !0 >> (63 - (last & 63))
}

/// The page of bit `x.trailing_zeros()` in word `i` (`x != 0`).
#[inline]
fn page_of(i: usize, bit: u32) -> u64 {
    (i as u64) * 64 + u64::from(bit)
}

/// Word `i` XOR `inv`, or 0 (nothing to find) for an index past the words.
#[inline]
fn word(w: &[u64], i: usize, inv: u64) -> u64 {
    w.get(i).map_or(0, |&x| x ^ inv)
}

/// First page in `[start, stop)` whose bit XOR `inv` is 1, with `start < stop`.
///
/// Touches one word per word of the range up to the answer; runs of words with nothing to find
/// are skipped eight at a time.
#[inline]
fn find(w: &[u64], start: u64, stop: u64, inv: u64) -> Option<u64> {
    let (a, b) = (widx(start), widx(stop - 1));
    let x = word(w, a, inv) & head_mask(start);
    if a == b {
        let x = x & tail_mask(stop - 1);
        return (x != 0).then(|| page_of(a, x.trailing_zeros()));
    }
    if x != 0 {
        return Some(page_of(a, x.trailing_zeros()));
    }
    find_from(w, a + 1, b, stop, inv)
}

/// The part of [`find`] past its first word: words `a..b` whole, then word `b` up to `stop`.
#[inline(never)]
fn find_from(w: &[u64], a: usize, b: usize, stop: u64, inv: u64) -> Option<u64> {
    if let Some(i) = first_differing(w, a, b, inv) {
        return Some(page_of(i, word(w, i, inv).trailing_zeros()));
    }
    let x = word(w, b, inv) & tail_mask(stop - 1);
    (x != 0).then(|| page_of(b, x.trailing_zeros()))
}

/// The first index in `from..to` whose word is not `fill`, if any.
///
/// Eight words a step where they all equal `fill` (a loop the compiler vectorizes), then word
/// by word.
#[inline]
fn first_differing(w: &[u64], from: usize, to: usize, fill: u64) -> Option<usize> {
    let mid = w.get(from..to.min(w.len()))?;
    let mut chunks = mid.chunks_exact(8);
    let mut base = from;
    for c in &mut chunks {
        if c.iter().fold(0, |acc, &x| acc | (x ^ fill)) != 0 {
            return c.iter().position(|&x| x != fill).map(|j| base + j);
        }
        base += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&x| x != fill)
        .map(|j| base + j)
}

/// Last page in `[start, stop)` whose bit XOR `inv` is 1, with `start < stop`.
fn rfind(w: &[u64], start: u64, stop: u64, inv: u64) -> Option<u64> {
    let (a, b) = (widx(start), widx(stop - 1));
    let last = |i: usize, x: u64| page_of(i, 63 - x.leading_zeros());
    let x = word(w, b, inv) & tail_mask(stop - 1);
    if a == b {
        let x = x & head_mask(start);
        return (x != 0).then(|| last(a, x));
    }
    if x != 0 {
        return Some(last(b, x));
    }
    let mid = w.get(a + 1..b).unwrap_or(&[]);
    let mut chunks = mid.rchunks_exact(8);
    let mut top = b;
    for c in &mut chunks {
        top -= 8;
        if c.iter().fold(0, |acc, &x| acc | (x ^ inv)) != 0 {
            for (j, &x) in c.iter().enumerate().rev() {
                let x = x ^ inv;
                if x != 0 {
                    return Some(last(top + j, x));
                }
            }
        }
    }
    for (j, &x) in chunks.remainder().iter().enumerate().rev() {
        let x = x ^ inv;
        if x != 0 {
            return Some(last(a + 1 + j, x));
        }
    }
    let x = word(w, a, inv) & head_mask(start);
    (x != 0).then(|| last(a, x))
}

/// Number of boundaries at positions `[lo, hi)`, `1 <= lo < hi <= pages`: positions `p` whose
/// bit differs from bit `p - 1`.
fn count_boundaries(w: &[u64], lo: u64, hi: u64) -> u64 {
    let (a, b) = (widx(lo), widx(hi - 1));
    let carry = |i: usize| match i.checked_sub(1) {
        // Position 0 is never a boundary: compare bit 0 with itself.
        None => w.first().map_or(0, |&x| x & 1),
        Some(j) => w.get(j).map_or(0, |&x| x >> 63),
    };

    let mut n = 0;
    let mut c = carry(a);
    for (i, &x) in w.iter().enumerate().take(b + 1).skip(a) {
        let mut e = x ^ ((x << 1) | c);
        if i == a {
            e &= head_mask(lo);
        }
        if i == b {
            e &= tail_mask(hi - 1);
        }
        n += u64::from(e.count_ones());
        c = x >> 63;
    }
    n
}

impl AttrMap {
    /// A map of `pages` pages, all with attribute `attr`. It holds no heap.
    ///
    /// `pages` is clamped to `1..=`[`MAX_PAGES`]: a map covers at least one page.
    pub fn new(pages: u64, attr: Attr) -> Self {
        AttrMap {
            pages: pages.clamp(1, MAX_PAGES),
            boundaries: 0,
            repr: Repr::Uniform(attr),
            changes: 0,
        }
    }

    /// The map of `pages` pages made of consecutive runs: `starts` gives each run's first
    /// page and attribute, in increasing order, the first at page 0 (what [`AttrMap::runs`]
    /// of a whole map yields). Runs past the end are dropped; adjacent runs of one attribute
    /// merge. Costs one pass over the words, not a `set` per run.
    ///
    /// `prepare` sees the fresh words before they are written (all zero), once, when the map
    /// is not uniform: a caller that knows its allocator hands out untouched memory can fault
    /// it in with one call there instead of a page fault per 4 KiB page as the words fill.
    pub fn from_runs(
        pages: u64,
        starts: impl IntoIterator<Item = (u64, Attr)>,
        prepare: impl FnOnce(&mut [u64]),
    ) -> Self {
        let pages = pages.clamp(1, MAX_PAGES);
        let mut runs: Vec<(u64, Attr)> = Vec::new();
        for (start, attr) in starts {
            if start >= pages || runs.last().is_some_and(|&(s, _)| start <= s) {
                if start >= pages {
                    break;
                }
                continue;
            }
            if runs.last().is_some_and(|&(_, a)| a == attr) {
                continue;
            }
            runs.push((start, attr));
        }
        let first = runs.first().map_or(Attr::Shared, |&(_, a)| a);
        if runs.len() <= 1 {
            return AttrMap::new(pages, first);
        }
        let mut w = vec![0u64; widx(pages - 1) + 1].into_boxed_slice();
        prepare(&mut w);
        // `runs` starts at page 0 only if the caller's did; a first run starting later is
        // taken from page 0.
        for (i, &(start, attr)) in runs.iter().enumerate() {
            if attr == Attr::Private {
                let start = if i == 0 { 0 } else { start };
                let end = runs.get(i + 1).map_or(pages, |&(s, _)| s);
                fill(&mut w, start, end, Attr::Private);
            }
        }
        AttrMap {
            pages,
            boundaries: (runs.len() - 1) as u64,
            repr: Repr::Bits(w),
            changes: 0,
        }
    }

    /// How many times [`AttrMap::set`] was called on this map (clipped-empty ranges
    /// excepted): while the count stays the same the map does, so a snapshot of its runs
    /// taken with the count is still exact when the count is unchanged.
    #[inline]
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Number of pages covered.
    #[inline]
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Number of runs (maximal stretches of pages with the same attribute), at least one. O(1).
    #[inline]
    pub fn len(&self) -> usize {
        usize::try_from(self.boundaries)
            .unwrap_or(usize::MAX)
            .saturating_add(1)
    }

    /// Always false: a map covers at least one page, so it has at least one run.
    #[inline]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Bytes of heap the map holds: 0 while uniform, else `8 * ceil(pages / 64)`.
    pub fn heap_bytes(&self) -> usize {
        match &self.repr {
            Repr::Uniform(_) => 0,
            Repr::Bits(w) => std::mem::size_of_val::<[u64]>(w),
        }
    }

    /// The attribute of `page`.
    ///
    /// `page` must be below [`AttrMap::pages`] (checked in debug builds); in release builds a
    /// page past the end reads as [`Attr::Private`].
    #[inline]
    pub fn get(&self, page: u64) -> Attr {
        debug_assert!(
            page < self.pages,
            "AttrMap::get({page}) past {} pages",
            self.pages
        );
        self.get_or_private(page)
    }

    /// [`AttrMap::get`] without the debug check: private past the end.
    #[inline]
    fn get_or_private(&self, page: u64) -> Attr {
        if page >= self.pages {
            return Attr::Private;
        }
        match &self.repr {
            Repr::Uniform(a) => *a,
            Repr::Bits(w) => w
                .get(widx(page))
                .map_or(Attr::Private, |&x| Attr::of_bit(x >> (page & 63))),
        }
    }

    /// First page in `[start, stop)` with attribute `attr`, for `start < stop <= pages`.
    #[inline]
    fn find_in(&self, start: u64, stop: u64, attr: Attr) -> Option<u64> {
        match &self.repr {
            Repr::Uniform(a) => (*a == attr).then_some(start),
            // Looking for set bits finds private pages; for shared ones, look at the inverse.
            Repr::Bits(w) => find(w, start, stop, attr.flip().fill()),
        }
    }

    /// Last page in `[start, stop)` with attribute `attr`, for `start < stop <= pages`.
    fn rfind_in(&self, start: u64, stop: u64, attr: Attr) -> Option<u64> {
        match &self.repr {
            Repr::Uniform(a) => (*a == attr).then(|| stop - 1),
            Repr::Bits(w) => rfind(w, start, stop, attr.flip().fill()),
        }
    }

    /// True when some page of `[start, end)` has attribute `attr`: the accessor's range check.
    ///
    /// Touches one word per 64 pages of the range at most (one or two for a small range), and
    /// none while the map is uniform. Pages past the end count as private.
    #[inline]
    pub fn any(&self, start: u64, end: u64, attr: Attr) -> bool {
        if end <= self.pages {
            return start < end && self.find_in(start, end, attr).is_some();
        }
        self.first(start, end, attr).is_some()
    }

    /// True when every page of `[start, end)` has attribute `attr` (true for an empty range).
    ///
    /// Costs as [`AttrMap::any`]. Pages past the end count as private.
    #[inline]
    pub fn all(&self, start: u64, end: u64, attr: Attr) -> bool {
        !self.any(start, end, attr.flip())
    }

    /// The first page in `[start, end)` whose attribute is `attr`, if any.
    ///
    /// Costs the words up to the answer. Pages past the end count as private, so for
    /// [`Attr::Private`] a range reaching past the end always has an answer.
    #[inline]
    pub fn first(&self, start: u64, end: u64, attr: Attr) -> Option<u64> {
        let stop = end.min(self.pages);
        if start < stop {
            if let Some(p) = self.find_in(start, stop, attr) {
                return Some(p);
            }
        }
        // Past the end, every page reads as private.
        (attr == Attr::Private && end > self.pages && start < end).then(|| start.max(self.pages))
    }

    /// The maximal run containing `page`.
    ///
    /// A page past the end is in the private run `[pages, u64::MAX)`. Costs the words between
    /// the run's ends (one or two for a short run).
    pub fn run_at(&self, page: u64) -> Run {
        if page >= self.pages {
            return Run {
                start: self.pages,
                end: u64::MAX,
                attr: Attr::Private,
            };
        }
        let attr = self.get_or_private(page);
        let other = attr.flip();
        let end = match page + 1 < self.pages {
            true => self.find_in(page + 1, self.pages, other),
            false => None,
        };
        let start = match page > 0 {
            true => self.rfind_in(0, page, other).map_or(0, |p| p + 1),
            false => 0,
        };
        Run {
            start,
            end: end.unwrap_or(self.pages),
            attr,
        }
    }

    /// The runs overlapping `[start, end)`, clipped to it and to the file, in order.
    ///
    /// Costs the runs it yields plus a scan of the words of the range (eight words a step
    /// where they hold no boundary); a uniform map yields its one run at once.
    pub fn runs(&self, start: u64, end: u64) -> Runs<'_> {
        Runs::new(self, start, end.min(self.pages))
    }

    /// Sets `[start, end)` to `attr`, clipped to the file; nothing happens when the clipped
    /// range is empty.
    ///
    /// Costs the words of the range (counting the boundaries it removes, then filling), O(1)
    /// for the whole file. The `set` that makes a uniform map mixed allocates and fills the
    /// bitmap (`ceil(pages / 64)` words; out of memory aborts, as any Rust allocation); the one
    /// that makes it uniform again frees it.
    pub fn set(&mut self, start: u64, end: u64, attr: Attr) {
        let end = end.min(self.pages);
        if start >= end {
            return;
        }
        self.changes = self.changes.wrapping_add(1);
        if start == 0 && end == self.pages {
            self.repr = Repr::Uniform(attr);
            self.boundaries = 0;
            return;
        }
        let pages = self.pages;
        if let Repr::Uniform(a) = self.repr {
            if a == attr {
                return;
            }
            let mut w = vec![a.fill(); widx(pages - 1) + 1].into_boxed_slice();
            if let Some(last) = w.last_mut() {
                *last &= tail_mask(pages - 1);
            }
            self.repr = Repr::Bits(w);
        }
        let Repr::Bits(w) = &mut self.repr else {
            return;
        };
        // Boundaries can change only at positions start..=end (inside the file, past 0).
        let lo = start.max(1);
        let hi = (end + 1).min(pages);
        let before = if lo < hi {
            count_boundaries(w, lo, hi)
        } else {
            0
        };
        fill(w, start, end, attr);
        // Inside the range every page is now `attr`: only its two edges can be boundaries.
        let differs = |w: &[u64], p: u64| {
            w.get(widx(p))
                .is_some_and(|&x| Attr::of_bit(x >> (p & 63)) != attr)
        };
        let after = u64::from(start > 0 && differs(w, start - 1))
            + u64::from(end < pages && differs(w, end));
        self.boundaries = self.boundaries - before + after;
        if self.boundaries == 0 {
            let a = w.first().map_or(attr, |&x| Attr::of_bit(x));
            self.repr = Repr::Uniform(a);
        }
    }
}

/// Sets bits `[start, end)` (inside the words) to `attr`.
fn fill(w: &mut [u64], start: u64, end: u64, attr: Attr) {
    let (a, b) = (widx(start), widx(end - 1));
    let apply = |x: &mut u64, m: u64| match attr {
        Attr::Private => *x |= m,
        Attr::Shared => *x &= !m,
    };
    if a == b {
        if let Some(x) = w.get_mut(a) {
            apply(x, head_mask(start) & tail_mask(end - 1));
        }
        return;
    }
    if let Some(x) = w.get_mut(a) {
        apply(x, head_mask(start));
    }
    if let Some(mid) = w.get_mut(a + 1..b) {
        mid.fill(attr.fill());
    }
    if let Some(x) = w.get_mut(b) {
        apply(x, tail_mask(end - 1));
    }
}

impl fmt::Debug for AttrMap {
    /// The page count, the run count, the heap held and, while uniform, the attribute; not the
    /// bits (32 KiB per GiB).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("AttrMap");
        d.field("pages", &self.pages).field("runs", &self.len());
        match &self.repr {
            Repr::Uniform(a) => d.field("uniform", a),
            Repr::Bits(_) => d.field("heap_bytes", &self.heap_bytes()),
        };
        d.finish()
    }
}

/// Iterator over the runs of a map, see [`AttrMap::runs`].
///
/// A cursor over the map's boundary bits (`x ^ (x << 1 | carry)`: bit `p` set where page `p`
/// differs from page `p - 1`): each run costs one `trailing_zeros`, and words without a
/// boundary are skipped eight at a time.
#[derive(Clone)]
pub struct Runs<'a> {
    /// The bitmap, or nothing while the map is uniform.
    words: &'a [u64],
    /// Start of the next run.
    pos: u64,
    /// End of the iteration, at most the page count.
    stop: u64,
    /// Attribute of the run starting at `pos`.
    attr: Attr,
    /// Index of the word whose boundaries `edges` holds.
    i: usize,
    /// Boundaries in word `i` past `pos` not yet yielded.
    edges: u64,
}

impl<'a> Runs<'a> {
    fn new(map: &'a AttrMap, start: u64, stop: u64) -> Self {
        let words: &[u64] = match &map.repr {
            Repr::Bits(w) if start < stop => w,
            _ => &[],
        };
        let i = widx(start);
        let x = words.get(i).copied().unwrap_or(0);
        let carry = match i.checked_sub(1) {
            Some(j) => words.get(j).map_or(0, |&y| y >> 63),
            None => x & 1,
        };
        // Boundaries strictly after `start` in its word.
        let edges = (x ^ ((x << 1) | carry)) & (head_mask(start) << 1);
        Runs {
            words,
            pos: start,
            stop,
            attr: map.get_or_private(start),
            i,
            edges,
        }
    }

    /// The next boundary after `pos`, or `stop`.
    #[inline]
    fn next_boundary(&mut self) -> u64 {
        loop {
            if self.edges != 0 {
                let b = page_of(self.i, self.edges.trailing_zeros());
                self.edges &= self.edges - 1;
                return b;
            }
            let Some(&top) = self.words.get(self.i) else {
                return self.stop;
            };
            // Past word `i` and up to the next boundary, every word repeats its last bit.
            let fill = (top >> 63).wrapping_neg();
            let last = widx(self.stop - 1);
            match first_differing(self.words, self.i + 1, last + 1, fill) {
                None => return self.stop,
                Some(j) => {
                    let x = self.words.get(j).copied().unwrap_or(fill);
                    self.i = j;
                    self.edges = x ^ ((x << 1) | (fill & 1));
                }
            }
        }
    }
}

impl Iterator for Runs<'_> {
    type Item = Run;

    #[inline]
    fn next(&mut self) -> Option<Run> {
        if self.pos >= self.stop {
            return None;
        }
        let start = self.pos;
        let attr = self.attr;
        let end = self.next_boundary().min(self.stop);
        self.pos = end;
        self.attr = attr.flip();
        Some(Run { start, end, attr })
    }
}

impl FusedIterator for Runs<'_> {}

impl fmt::Debug for Runs<'_> {
    /// Where the iteration stands, not the bits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runs")
            .field("pos", &self.pos)
            .field("stop", &self.stop)
            .field("attr", &self.attr)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(m: &AttrMap) -> Vec<(u64, u64, Attr)> {
        m.runs(0, m.pages())
            .map(|r| (r.start, r.end, r.attr))
            .collect()
    }

    #[test]
    fn from_runs_is_the_map_the_sets_make() {
        let pages = 1000;
        let patterns: Vec<Vec<(u64, Attr)>> = vec![
            vec![(0, Attr::Shared)],
            vec![(0, Attr::Private)],
            vec![(0, Attr::Shared), (1, Attr::Private), (2, Attr::Shared)],
            vec![
                (0, Attr::Private),
                (63, Attr::Shared),
                (64, Attr::Private),
                (999, Attr::Shared),
            ],
            // Adjacent runs of one attribute merge; runs past the end are dropped.
            vec![
                (0, Attr::Shared),
                (10, Attr::Shared),
                (20, Attr::Private),
                (2000, Attr::Shared),
            ],
            // A first run that starts late is taken from page 0.
            vec![(5, Attr::Private), (500, Attr::Shared)],
            (0..pages)
                .map(|p| {
                    (
                        p,
                        if p % 2 == 1 {
                            Attr::Private
                        } else {
                            Attr::Shared
                        },
                    )
                })
                .collect(),
        ];
        for pat in patterns {
            let mut want = AttrMap::new(pages, pat[0].1);
            for (i, &(start, attr)) in pat.iter().enumerate().skip(1) {
                let end = pat.get(i + 1).map_or(pages, |&(s, _)| s);
                want.set(start, end, attr);
            }
            let mut prepared = None;
            let got = AttrMap::from_runs(pages, pat.iter().copied(), |w| {
                prepared = Some((w.len(), w.iter().all(|&x| x == 0)));
            });
            assert_eq!(got, want, "{pat:?}");
            assert_eq!(got.len(), want.len(), "{pat:?}");
            assert_eq!(runs(&got), runs(&want), "{pat:?}");
            match prepared {
                Some(p) => assert_eq!(p, (16, true), "fresh zero words, once: {pat:?}"),
                None => assert_eq!(got.len(), 1, "only a uniform map skips it: {pat:?}"),
            }
        }
    }

    #[test]
    fn attr_map_new_is_uniform_without_heap() {
        let m = AttrMap::new(1 << 22, Attr::Private);
        assert_eq!(m.len(), 1);
        assert_eq!(m.heap_bytes(), 0);
        assert!(std::mem::size_of::<AttrMap>() <= 64);
        assert_eq!(runs(&m), vec![(0, 1 << 22, Attr::Private)]);
        assert!(m.all(0, 1 << 22, Attr::Private));
        assert!(!m.any(0, 1 << 22, Attr::Shared));
        assert_eq!(m.first(5, 1 << 22, Attr::Private), Some(5));
    }

    #[test]
    fn attr_map_new_clamps_page_count() {
        assert_eq!(AttrMap::new(0, Attr::Shared).pages(), 1);
        assert_eq!(AttrMap::new(u64::MAX, Attr::Shared).pages(), MAX_PAGES);
    }

    #[test]
    fn set_merges_neighbours() {
        let mut m = AttrMap::new(8, Attr::Private);
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
        assert_eq!(m.heap_bytes(), 0);
    }

    #[test]
    fn every_other_page_then_uniform() {
        let mut m = AttrMap::new(1024, Attr::Shared);
        for p in (0..1024).step_by(2) {
            m.set(p, p + 1, Attr::Private);
        }
        assert_eq!(m.len(), 1024);
        assert_eq!(m.heap_bytes(), 1024 / 8);
        assert!(m.all(1, 2, Attr::Shared));
        assert_eq!(m.first(1, 1024, Attr::Private), Some(2));
        assert_eq!(
            m.run_at(513),
            Run {
                start: 513,
                end: 514,
                attr: Attr::Shared
            }
        );
        m.set(0, 1024, Attr::Private);
        assert_eq!(m.len(), 1);
        assert_eq!(m.heap_bytes(), 0);
    }

    #[test]
    fn every_other_page_undone_page_by_page_frees_the_bits() {
        let mut m = AttrMap::new(300, Attr::Private);
        for p in (1..300).step_by(2) {
            m.set(p, p + 1, Attr::Shared);
        }
        assert_eq!(m.len(), 300);
        for p in (1..300).step_by(2) {
            m.set(p, p + 1, Attr::Private);
        }
        assert_eq!(m, AttrMap::new(300, Attr::Private));
        assert_eq!(m.heap_bytes(), 0);
    }

    #[test]
    fn one_page_file() {
        let mut m = AttrMap::new(1, Attr::Shared);
        m.set(0, 1, Attr::Private);
        assert_eq!(m.get(0), Attr::Private);
        assert_eq!(m.len(), 1);
        assert_eq!(m.heap_bytes(), 0);
        assert_eq!(
            m.run_at(0),
            Run {
                start: 0,
                end: 1,
                attr: Attr::Private
            }
        );
    }

    #[test]
    fn word_boundaries_and_file_end() {
        for pages in [63u64, 64, 65, 127, 128, 129, 1000] {
            let mut m = AttrMap::new(pages, Attr::Shared);
            m.set(pages - 1, pages, Attr::Private);
            assert_eq!(m.len(), 2, "{pages}");
            assert_eq!(m.first(0, pages, Attr::Private), Some(pages - 1));
            assert_eq!(m.run_at(0).end, pages - 1);
            assert_eq!(m.run_at(pages - 1).start, pages - 1);
            m.set(63.min(pages - 1), pages, Attr::Private);
            assert_eq!(m.first(0, pages, Attr::Private), Some(63.min(pages - 1)));
            assert_eq!(m.len(), 2, "{pages}");
            m.set(0, 64.min(pages), Attr::Private);
            assert_eq!(m.len(), 1, "{pages}");
            assert_eq!(m.heap_bytes(), 0);
        }
    }

    #[test]
    fn out_of_range_reads_private_and_never_panics() {
        let mut m = AttrMap::new(100, Attr::Shared);
        m.set(10, 20, Attr::Private);
        for map in [m.clone(), AttrMap::new(100, Attr::Shared)] {
            assert_eq!(map.get_or_private(100), Attr::Private);
            assert_eq!(map.get_or_private(u64::MAX), Attr::Private);
            assert!(map.any(90, 101, Attr::Private));
            assert!(map.any(200, 300, Attr::Private));
            assert!(!map.any(200, 300, Attr::Shared));
            assert!(map.all(200, 300, Attr::Private));
            assert!(!map.all(99, 101, Attr::Shared));
            assert_eq!(map.first(95, u64::MAX, Attr::Private), Some(100));
            assert_eq!(map.first(500, 600, Attr::Private), Some(500));
            assert_eq!(map.first(500, 600, Attr::Shared), None);
            assert!(!map.any(5, 5, Attr::Private));
            assert!(!map.any(7, 3, Attr::Private));
            assert!(map.all(7, 3, Attr::Shared));
            assert_eq!(map.first(7, 3, Attr::Shared), None);
            assert_eq!(
                map.run_at(100),
                Run {
                    start: 100,
                    end: u64::MAX,
                    attr: Attr::Private
                }
            );
            assert_eq!(map.runs(100, 200).count(), 0);
            assert_eq!(map.runs(50, 40).count(), 0);
            assert_eq!(map.runs(95, u64::MAX).last().map(|r| r.end), Some(100));
        }
        let before = m.clone();
        m.set(100, 200, Attr::Private);
        m.set(30, 30, Attr::Private);
        m.set(40, 30, Attr::Private);
        assert_eq!(m, before);
        m.set(90, u64::MAX, Attr::Private);
        assert_eq!(m.len(), 4);
        assert_eq!(m.first(0, 100, Attr::Private), Some(10));
        assert_eq!(m.run_at(95).start, 90);
    }

    #[test]
    fn debug_names_pages_and_runs_not_bits() {
        let mut m = AttrMap::new(4096, Attr::Shared);
        assert_eq!(
            format!("{m:?}"),
            "AttrMap { pages: 4096, runs: 1, uniform: Shared }"
        );
        m.set(1, 2, Attr::Private);
        assert_eq!(
            format!("{m:?}"),
            "AttrMap { pages: 4096, runs: 3, heap_bytes: 512 }"
        );
    }

    /// Xorshift64: the tests' deterministic random source.
    fn next(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// A reference map: one attribute per page.
    fn check(m: &AttrMap, model: &[Attr], probes: &[u64]) {
        let n = model.len() as u64;
        let at = |p: u64| model[usize::try_from(p).unwrap()];
        let mut want_runs = Vec::new();
        let mut s = 0u64;
        for p in 1..=n {
            if p == n || at(p) != at(s) {
                want_runs.push((s, p, at(s)));
                s = p;
            }
        }
        assert_eq!(runs(m), want_runs);
        assert_eq!(m.len(), want_runs.len());
        assert_eq!(m.heap_bytes() == 0, want_runs.len() == 1);
        if want_runs.len() > 1 {
            assert_eq!(m.heap_bytes(), usize::try_from(n.div_ceil(64) * 8).unwrap());
        }
        let mut run_of = Vec::with_capacity(model.len());
        for r in &want_runs {
            run_of.extend((r.0..r.1).map(|_| *r));
        }
        for p in 0..n {
            assert_eq!(m.get(p), at(p), "get({p})");
            let r = run_of[usize::try_from(p).unwrap()];
            assert_eq!(
                m.run_at(p),
                Run {
                    start: r.0,
                    end: r.1,
                    attr: r.2
                },
                "run_at({p})"
            );
        }
        for &q in probes {
            let q = q.min(n - 1);
            for e in [q + 1, q + 2, (q + 64).min(n), (q + 200).min(n), n] {
                let e = e.min(n);
                for a in [Attr::Shared, Attr::Private] {
                    let slice = &model[usize::try_from(q).unwrap()..usize::try_from(e).unwrap()];
                    assert_eq!(
                        m.all(q, e, a),
                        slice.iter().all(|x| *x == a),
                        "all({q},{e},{a:?})"
                    );
                    assert_eq!(m.any(q, e, a), slice.contains(&a), "any({q},{e},{a:?})");
                    let wf = slice.iter().position(|x| *x == a).map(|i| q + i as u64);
                    assert_eq!(m.first(q, e, a), wf, "first({q},{e},{a:?})");
                }
                let clipped: Vec<_> = m.runs(q, e).map(|r| (r.start, r.end, r.attr)).collect();
                let want: Vec<_> = want_runs
                    .iter()
                    .filter(|r| r.0 < e && r.1 > q)
                    .map(|r| (r.0.max(q), r.1.min(e), r.2))
                    .collect();
                assert_eq!(clipped, want, "runs({q},{e})");
            }
        }
    }

    #[test]
    fn matches_per_page_model() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for n in [1u64, 2, 63, 64, 65, 200, 600, 2100] {
            let mut m = AttrMap::new(n, Attr::Shared);
            let mut model = vec![Attr::Shared; usize::try_from(n).unwrap()];
            for _ in 0..600 {
                let r = next(&mut x);
                let a = match r % 5 {
                    0 => (r >> 8) % n.div_ceil(64) * 64,
                    _ => (r >> 8) % n,
                }
                .min(n - 1);
                let len = match (r >> 4) % 4 {
                    0 => 1 + (r >> 20) % 4,
                    1 => 64 - a % 64,
                    2 => n - a,
                    _ => 1 + (r >> 20) % (n - a),
                };
                let b = (a + len).min(n);
                let attr = if r & 1 == 0 {
                    Attr::Shared
                } else {
                    Attr::Private
                };
                m.set(a, b, attr);
                for p in a..b {
                    model[usize::try_from(p).unwrap()] = attr;
                }
                check(&m, &model, &[a, b, (a + b) / 2, 0, n - 1]);
            }
        }
    }

    /// The pattern of the kernel's private_mem_conversions test on four areas of one map.
    #[test]
    fn four_areas_odd_frames() {
        let pages = 4096u64;
        let mut m = AttrMap::new(pages, Attr::Shared);
        let mut model = vec![Attr::Shared; 4096];
        let mut set = |m: &mut AttrMap, a: u64, b: u64, at: Attr| {
            m.set(a, b, at);
            for p in a..b {
                model[usize::try_from(p).unwrap()] = at;
            }
            let mut got = Vec::with_capacity(model.len());
            for run in m.runs(0, pages) {
                got.extend((run.start..run.end).map(|_| run.attr));
            }
            assert!(got == model, "set({a},{b},{at:?}) diverged");
        };
        for (off, sz) in [(0u64, 1u64), (0, 512), (1, 1), (1, 512), (512, 1)] {
            for t in 0..4u64 {
                let base = t * 1024;
                set(&mut m, base + off, base + off + sz, Attr::Private);
            }
            for j in (1..sz).step_by(2) {
                for t in 0..4u64 {
                    let base = t * 1024 + off + j;
                    set(&mut m, base, base + 1, Attr::Shared);
                }
            }
            for t in 0..4u64 {
                let base = t * 1024;
                set(&mut m, base + off, base + off + sz, Attr::Shared);
            }
        }
        assert_eq!(m.len(), 1);
        assert_eq!(m.heap_bytes(), 0);
    }
}
