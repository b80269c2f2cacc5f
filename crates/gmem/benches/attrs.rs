//! P3: the attribute map at 1M runs against `roaring`, binary search and the old run map.
//!
//! `cargo bench -p gmem --bench attrs`
//!
//! Every structure holds the same worst pattern, every other page private, on 1,048,576 pages
//! (4 GiB of 4 KiB pages): exactly 1,048,576 runs. Each is asked the same random keys in the
//! same order:
//!
//! - [`AttrMap`] (`gmem::model::attr`): one bit per page, allocated only while the file is
//!   mixed;
//! - [`RoaringBitmap`] of the private pages, after `optimize()`;
//! - binary search of a sorted `Vec<u64>` of the run starts (the baseline: attributes
//!   alternate at every start, so the run index gives the attribute);
//! - [`RunMap`], the chunked run map gmem uses today.
//!
//! Lookups are timed two ways: independent (a loop over the keys, so the CPU overlaps
//! lookups: throughput, how such numbers are usually quoted) and dependent (each key is XORed
//! with the previous answer, so one lookup must finish before the next starts: latency, what a
//! single accessor call pays). The range check is "is any page of `[p, p + k)` private?" for
//! k = 2 and 16, the question every host read, write and pin asks; roaring answers it with
//! its fastest way measured here (one `contains` per page, stopping at the first hit; the
//! other ways are extra rows). Heap bytes are counted by a global allocator that tracks live
//! bytes. Every timing is the median of [`REPS`] rounds, the structures interleaved within
//! each round so that the machine's noise reaches them alike.
//!
//! Further rows, beyond the 1M-run pattern: range checks that find nothing, on 16 GiB with
//! 10k runs (16 and 512 pages inside shared stretches); lookups and range checks on 64 GiB of
//! the alternating pattern (16M runs, a 2 MiB bitmap, past L2); `set` of one page (flip and
//! flip back) at 1M runs; `runs()` over the whole file at 1M runs, and at 10k runs on 1 and
//! 16 GiB (the bitmap is scanned, so its size shows); rebuilding a map from 10k runs (what
//! a live-update receiver does); heap bytes at the worst pattern, for uniform files and at 10k
//! runs on 16 GiB.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use gmem::model::attr::{Attr, AttrMap};
#[path = "baseline/runmap.rs"]
mod runmap;
use roaring::RoaringBitmap;
use runmap::RunMap;

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` with the caller's arguments unchanged; the
// counter is only arithmetic on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, which `System.alloc` shares.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds the rest.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// 4 GiB of 4 KiB pages; every other page private gives exactly 1,048,576 runs.
const PAGES: u64 = 1 << 20;
/// Pages per GiB.
const GIB_PAGES: u64 = 1 << 18;
/// Random keys per timed loop.
const KEYS: usize = 1 << 20;
/// Keys per round for `set` (the old run map's `set` costs microseconds).
const SET_KEYS: usize = 1 << 16;
/// Rounds; every timing is a median over them.
const REPS: usize = 9;

/// The value `f` builds and the heap bytes it still holds once built.
fn heap<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    let t = f();
    let after = LIVE.load(Ordering::Relaxed);
    (t, after.saturating_sub(before))
}

/// Run starts with alternating attributes, searched by binary search: the baseline.
struct Starts {
    starts: Vec<u64>,
    first: Attr,
}

impl Starts {
    fn run_of(&self, page: u64) -> usize {
        self.starts.partition_point(|&s| s <= page) - 1
    }

    fn get(&self, page: u64) -> Attr {
        if self.run_of(page) % 2 == 0 {
            self.first
        } else {
            self.first.flip()
        }
    }

    /// Any private page in `[start, end)`: the run of `start` is private, or another run
    /// (the next one is private when this one is not) begins before `end`.
    fn any_private(&self, start: u64, end: u64) -> bool {
        let i = self.run_of(start);
        let here = if i % 2 == 0 {
            self.first
        } else {
            self.first.flip()
        };
        here == Attr::Private || self.starts.get(i + 1).is_some_and(|&s| s < end)
    }
}

/// Xorshift64 keys below `below`.
fn keys(n: usize, below: u64, mut x: u64) -> Vec<u64> {
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % below
        })
        .collect()
}

/// Nanoseconds per item of one timed call of `f` over `n` items.
fn ns(n: usize, f: impl FnOnce() -> u64) -> f64 {
    let t = Instant::now();
    black_box(f());
    t.elapsed().as_secs_f64() * 1e9 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One row of timings: a label and the samples of each structure.
#[derive(Default)]
struct Row {
    what: &'static str,
    attr: Vec<f64>,
    roaring: Vec<f64>,
    bsearch: Vec<f64>,
    runmap: Vec<f64>,
}

/// Rounds timed so far, by row label.
struct Rows(Vec<Row>);

impl Rows {
    fn row(&mut self, what: &'static str) -> &mut Row {
        if let Some(i) = self.0.iter().position(|r| r.what == what) {
            return &mut self.0[i];
        }
        self.0.push(Row {
            what,
            ..Row::default()
        });
        self.0.last_mut().expect("just pushed")
    }
}

fn cell(v: &[f64]) -> String {
    if v.is_empty() {
        "–".to_string()
    } else {
        format!("{:.2}", median(v.to_vec()))
    }
}

fn ratio(a: &[f64], b: &[f64]) -> String {
    if a.is_empty() || b.is_empty() {
        "–".to_string()
    } else {
        format!("{:.3}", median(a.to_vec()) / median(b.to_vec()))
    }
}

/// The fastest way found to ask roaring "any of `[p, p + k)` present?" where a page of the
/// range is present: one `contains` per page, which stops at the first hit, so at most two
/// calls on the alternating pattern (`range(..).next()` and `range_cardinality` are the extra
/// rows; the latter ranks inside a bitmap container: hundreds of nanoseconds).
#[inline]
fn roaring_any(r: &RoaringBitmap, p: u32, k: u32) -> bool {
    (p..p + k).any(|q| r.contains(q))
}

fn to_u32(p: u64) -> u32 {
    u32::try_from(p).expect("bench pages fit u32")
}

/// Every other page private (odd pages) on `pages` pages, in each structure.
fn alternating_attr(pages: u64) -> AttrMap {
    let mut m = AttrMap::new(pages, Attr::Shared);
    for p in (1..pages).step_by(2) {
        m.set(p, p + 1, Attr::Private);
    }
    m
}

fn alternating_roaring(pages: u64) -> RoaringBitmap {
    let mut r = RoaringBitmap::new();
    for p in (1..pages).step_by(2) {
        r.insert(to_u32(p));
    }
    r.optimize();
    r
}

fn alternating_runmap(pages: u64) -> RunMap {
    let mut m = RunMap::new(pages, Attr::Shared);
    for p in (1..pages).step_by(2) {
        m.set(p, p + 1, Attr::Private);
    }
    m
}

/// `runs` runs spread over `pages` pages: single private pages at a stride.
fn sparse_attr(pages: u64, runs: u64) -> AttrMap {
    let mut m = AttrMap::new(pages, Attr::Shared);
    let stride = pages / (runs / 2);
    for i in 0..runs / 2 {
        m.set(i * stride + 1, i * stride + 2, Attr::Private);
    }
    m
}

fn sparse_runmap(pages: u64, runs: u64) -> RunMap {
    let mut m = RunMap::new(pages, Attr::Shared);
    let stride = pages / (runs / 2);
    for i in 0..runs / 2 {
        m.set(i * stride + 1, i * stride + 2, Attr::Private);
    }
    m
}

fn main() {
    let (attr, attr_heap) = heap(|| alternating_attr(PAGES));
    let (roar, roar_heap) = heap(|| alternating_roaring(PAGES));
    let (runmap, runmap_heap) = heap(|| alternating_runmap(PAGES));
    let (starts, starts_heap) = heap(|| Starts {
        starts: (0..PAGES).collect(),
        first: Attr::Shared,
    });
    assert_eq!(attr.len(), 1 << 20);
    assert_eq!(runmap.len(), 1 << 20);
    assert_eq!(roar.len(), PAGES / 2);

    // Same keys for all: below PAGES - 16 so that every range check stays inside the file,
    // and XOR with a 0/1 answer stays below PAGES.
    let k64 = keys(KEYS, PAGES - 16, 0x9e37_79b9_7f4a_7c15);
    let k32: Vec<u32> = k64.iter().map(|&p| to_u32(p)).collect();
    for (i, &p) in k64.iter().enumerate().step_by(997) {
        let want = attr.get(p);
        assert_eq!(roar.contains(k32[i]), want == Attr::Private);
        assert_eq!(starts.get(p), want);
        assert_eq!(runmap.get(p), want);
    }

    let mut rows = Rows(Vec::new());
    let mut attr_s = attr.clone();
    let mut roar_s = roar.clone();
    let mut runmap_s = runmap.clone();
    let set_keys = &k64[..SET_KEYS];
    let sparse_pages = 16 * GIB_PAGES;
    let sparse = sparse_attr(sparse_pages, 10_000);
    let sparse_old = sparse_runmap(sparse_pages, 10_000);
    let sparse_1 = sparse_attr(GIB_PAGES, 10_000);
    let sparse_old_1 = sparse_runmap(GIB_PAGES, 10_000);
    let sparse_roar = {
        let mut r = RoaringBitmap::new();
        let stride = sparse_pages / 5_000;
        for i in 0..5_000 {
            r.insert(to_u32(i * stride + 1));
        }
        r.optimize();
        r
    };
    // Range checks that find nothing: ranges of 16 and 512 pages (2 MiB) inside the shared
    // stretches of the 16 GiB map with 10k runs, the accessor's common case.
    let miss_keys = |k: u64| -> Vec<u64> {
        let stride = sparse_pages / 5_000;
        keys(KEYS, u64::MAX, 0x2545_f491_4f6c_dd1d)
            .into_iter()
            .map(|x| (x % 5_000) * stride + 2 + (x >> 20) % (stride - 2 - k))
            .collect()
    };
    let miss16 = miss_keys(16);
    // The same pattern on 64 GiB (16M runs): a 2 MiB bitmap for both, past this machine's L2.
    let big_pages = 64 * GIB_PAGES;
    let big = alternating_attr(big_pages);
    let big_roar = alternating_roaring(big_pages);
    let big_keys = keys(KEYS, big_pages - 16, 0x6a09_e667_f3bc_c908);
    let big_keys32: Vec<u32> = big_keys.iter().map(|&p| to_u32(p)).collect();
    let miss512 = miss_keys(512);
    for &p in miss512.iter().step_by(1001) {
        assert!(!sparse.any(p, p + 512, Attr::Private));
        assert!(sparse_old.all(p, p + 512, Attr::Shared));
        assert!(sparse_roar
            .range(to_u32(p)..to_u32(p + 512))
            .next()
            .is_none());
    }
    assert_eq!(sparse.len(), sparse_old.len());

    for _ in 0..REPS {
        let (a, r, s, o) = (
            black_box(&attr),
            black_box(&roar),
            black_box(&starts),
            black_box(&runmap),
        );

        let row = rows.row("random lookup, independent (ns)");
        row.attr.push(ns(KEYS, || {
            k64.iter()
                .map(|&p| u64::from(a.get(p) == Attr::Private))
                .sum()
        }));
        row.roaring.push(ns(KEYS, || {
            k32.iter().map(|&p| u64::from(r.contains(p))).sum()
        }));
        row.bsearch.push(ns(KEYS, || {
            k64.iter()
                .map(|&p| u64::from(s.get(p) == Attr::Private))
                .sum()
        }));
        row.runmap.push(ns(KEYS, || {
            k64.iter()
                .map(|&p| u64::from(o.get(p) == Attr::Private))
                .sum()
        }));

        let row = rows.row("random lookup, dependent (ns)");
        row.attr.push(ns(KEYS, || {
            let mut d = 0;
            for &p in &k64 {
                d = u64::from(a.get(p ^ d) == Attr::Private);
            }
            d
        }));
        row.roaring.push(ns(KEYS, || {
            let mut d = 0;
            for &p in &k32 {
                d = u32::from(r.contains(p ^ d));
            }
            u64::from(d)
        }));
        row.bsearch.push(ns(KEYS, || {
            let mut d = 0;
            for &p in &k64 {
                d = u64::from(s.get(p ^ d) == Attr::Private);
            }
            d
        }));
        row.runmap.push(ns(KEYS, || {
            let mut d = 0;
            for &p in &k64 {
                d = u64::from(o.get(p ^ d) == Attr::Private);
            }
            d
        }));

        for (label, label_dep, k) in [
            (
                "any(p, p+2, Private), independent (ns)",
                "any(p, p+2, Private), dependent (ns)",
                2u64,
            ),
            (
                "any(p, p+16, Private), independent (ns)",
                "any(p, p+16, Private), dependent (ns)",
                16,
            ),
        ] {
            let k32l = to_u32(k);
            let row = rows.row(label);
            row.attr.push(ns(KEYS, || {
                k64.iter()
                    .map(|&p| u64::from(a.any(p, p + k, Attr::Private)))
                    .sum()
            }));
            // The fastest roaring way measured (the other ways are extra rows below).
            row.roaring.push(ns(KEYS, || {
                k32.iter()
                    .map(|&p| u64::from(roaring_any(r, p, k32l)))
                    .sum()
            }));
            row.bsearch.push(ns(KEYS, || {
                k64.iter()
                    .map(|&p| u64::from(s.any_private(p, p + k)))
                    .sum()
            }));
            row.runmap.push(ns(KEYS, || {
                k64.iter()
                    .map(|&p| u64::from(!o.all(p, p + k, Attr::Shared)))
                    .sum()
            }));
            let row = rows.row(label_dep);
            row.attr.push(ns(KEYS, || {
                let mut d = 0;
                for &p in &k64 {
                    d = u64::from(a.any(p ^ d, (p ^ d) + k, Attr::Private));
                }
                d
            }));
            row.roaring.push(ns(KEYS, || {
                let mut d = 0;
                for &p in &k32 {
                    d = u32::from(roaring_any(r, p ^ d, k32l));
                }
                u64::from(d)
            }));
            row.bsearch.push(ns(KEYS, || {
                let mut d = 0;
                for &p in &k64 {
                    d = u64::from(s.any_private(p ^ d, (p ^ d) + k));
                }
                d
            }));
            row.runmap.push(ns(KEYS, || {
                let mut d = 0;
                for &p in &k64 {
                    d = u64::from(!o.all(p ^ d, (p ^ d) + k, Attr::Shared));
                }
                d
            }));
        }

        // Other roaring ways to ask the range check, to show which is fastest.
        for (label, k) in [
            (
                "roaring any(p, p+2) by range_cardinality(..) != 0 (ns)",
                2u32,
            ),
            (
                "roaring any(p, p+16) by range_cardinality(..) != 0 (ns)",
                16,
            ),
        ] {
            rows.row(label).roaring.push(ns(KEYS, || {
                k32.iter()
                    .map(|&p| u64::from(r.range_cardinality(p..p + k) != 0))
                    .sum()
            }));
        }
        rows.row("roaring any(p, p+2) by range(..).next() (ns)")
            .roaring
            .push(ns(KEYS, || {
                k32.iter()
                    .map(|&p| u64::from(r.range(p..p + 2).next().is_some()))
                    .sum()
            }));
        for (label, keys, k) in [
            (
                "any(p, p+16, Private) finding none, 16 GiB, 10k runs (ns)",
                &miss16,
                16u64,
            ),
            (
                "any(p, p+512, Private) finding none, 16 GiB, 10k runs (ns)",
                &miss512,
                512,
            ),
        ] {
            let (m, o, q) = (
                black_box(&sparse),
                black_box(&sparse_old),
                black_box(&sparse_roar),
            );
            let k32l = to_u32(k);
            let row = rows.row(label);
            row.attr.push(ns(KEYS, || {
                keys.iter()
                    .map(|&p| u64::from(m.any(p, p + k, Attr::Private)))
                    .sum()
            }));
            row.roaring.push(ns(KEYS, || {
                keys.iter()
                    .map(|&p| {
                        let p = to_u32(p);
                        u64::from(q.range(p..p + k32l).next().is_some())
                    })
                    .sum()
            }));
            row.runmap.push(ns(KEYS, || {
                keys.iter()
                    .map(|&p| u64::from(!o.all(p, p + k, Attr::Shared)))
                    .sum()
            }));
        }
        rows.row("roaring any(p, p+16) finding none by 16 contains (ns)")
            .roaring
            .push(ns(KEYS, || {
                miss16
                    .iter()
                    .map(|&p| {
                        let p = to_u32(p);
                        u64::from((p..p + 16).any(|v| sparse_roar.contains(v)))
                    })
                    .sum()
            }));
        rows.row("roaring any(p, p+16) by range(..).next() (ns)")
            .roaring
            .push(ns(KEYS, || {
                k32.iter()
                    .map(|&p| u64::from(r.range(p..p + 16).next().is_some()))
                    .sum()
            }));
        rows.row("roaring any(p, p+16) by 16 contains (ns)")
            .roaring
            .push(ns(KEYS, || {
                k32.iter()
                    .map(|&p| u64::from((p..p + 16).any(|q| r.contains(q))))
                    .sum()
            }));

        // One page flipped and flipped back: two sets per key, each merging three runs into
        // one or splitting one into three.
        let (m, q) = (black_box(&big), black_box(&big_roar));
        let row = rows.row("random lookup, dependent, 64 GiB, 16M runs (ns)");
        row.attr.push(ns(KEYS, || {
            let mut d = 0;
            for &p in &big_keys {
                d = u64::from(m.get(p ^ d) == Attr::Private);
            }
            d
        }));
        row.roaring.push(ns(KEYS, || {
            let mut d = 0;
            for &p in &big_keys32 {
                d = u32::from(q.contains(p ^ d));
            }
            u64::from(d)
        }));
        let row = rows.row("any(p, p+2, Private), dependent, 64 GiB, 16M runs (ns)");
        row.attr.push(ns(KEYS, || {
            let mut d = 0;
            for &p in &big_keys {
                d = u64::from(m.any(p ^ d, (p ^ d) + 2, Attr::Private));
            }
            d
        }));
        row.roaring.push(ns(KEYS, || {
            let mut d = 0;
            for &p in &big_keys32 {
                d = u32::from(roaring_any(q, p ^ d, 2));
            }
            u64::from(d)
        }));

        let row = rows.row("set one page, 1M runs (ns per set)");
        row.attr.push(ns(2 * SET_KEYS, || {
            for &p in set_keys {
                let now = attr_s.get(p);
                attr_s.set(p, p + 1, now.flip());
                attr_s.set(p, p + 1, now);
            }
            attr_s.len() as u64
        }));
        row.roaring.push(ns(2 * SET_KEYS, || {
            for &p in set_keys {
                let v = to_u32(p);
                if roar_s.contains(v) {
                    roar_s.remove(v);
                    roar_s.insert(v);
                } else {
                    roar_s.insert(v);
                    roar_s.remove(v);
                }
            }
            roar_s.len()
        }));
        row.runmap.push(ns(2 * SET_KEYS, || {
            for &p in set_keys {
                let now = runmap_s.get(p);
                let other = match now {
                    Attr::Shared => Attr::Private,
                    Attr::Private => Attr::Shared,
                };
                runmap_s.set(p, p + 1, other);
                runmap_s.set(p, p + 1, now);
            }
            runmap_s.len() as u64
        }));

        // Full iteration. roaring's `next_range` yields only the private runs (half of them);
        // the cost is given per run of the file all the same.
        let row = rows.row("runs() full iteration, 1M runs (ns per run)");
        row.attr.push(ns(1 << 20, || {
            a.runs(0, PAGES).map(|r| r.end - r.start).sum()
        }));
        row.roaring.push(ns(1 << 20, || {
            let mut it = r.iter();
            let mut n = 0u64;
            while let Some(r) = it.next_range() {
                n += u64::from(r.end() - r.start() + 1);
            }
            n
        }));
        row.runmap.push(ns(1 << 20, || {
            o.runs(0, PAGES).map(|r| r.end - r.start).sum()
        }));
        for (label, m, o, pages) in [
            (
                "runs() full iteration, 1 GiB, 10k runs (ns per run)",
                &sparse_1,
                &sparse_old_1,
                GIB_PAGES,
            ),
            (
                "runs() full iteration, 16 GiB, 10k runs (ns per run)",
                &sparse,
                &sparse_old,
                sparse_pages,
            ),
        ] {
            let row = rows.row(label);
            row.attr.push(ns(10_000, || {
                black_box(m).runs(0, pages).map(|r| r.end - r.start).sum()
            }));
            row.runmap.push(ns(10_000, || {
                black_box(o).runs(0, pages).map(|r| r.end - r.start).sum()
            }));
        }
        for (label, pages) in [
            ("rebuild from 10k runs, 1 GiB (us)", GIB_PAGES),
            ("rebuild from 10k runs, 16 GiB (us)", sparse_pages),
        ] {
            let row = rows.row(label);
            row.attr
                .push(ns(1, || sparse_attr(pages, 10_000).len() as u64) / 1e3);
            row.runmap
                .push(ns(1, || sparse_runmap(pages, 10_000).len() as u64) / 1e3);
        }
        let row = rows.row("len(), 1M runs (ns)");
        row.attr.push(ns(KEYS, || {
            (0..KEYS).map(|_| black_box(a).len() as u64).sum()
        }));
        row.runmap.push(ns(KEYS, || {
            (0..KEYS).map(|_| black_box(o).len() as u64).sum()
        }));
    }

    // Memory: heap bytes held once built.
    let gib = |bytes: usize, pages: u64| bytes as f64 * GIB_PAGES as f64 / pages as f64;
    let (w_attr, w_attr_heap) = heap(|| alternating_attr(GIB_PAGES));
    let (w_roar, w_roar_heap) = heap(|| alternating_roaring(GIB_PAGES));
    let (w_run, w_run_heap) = heap(|| alternating_runmap(GIB_PAGES));
    assert_eq!(w_attr_heap, w_attr.heap_bytes());
    let u_pages = 16 * GIB_PAGES;
    let (u_attr_p, u_attr_p_heap) = heap(|| AttrMap::new(u_pages, Attr::Private));
    let (u_attr_back, u_attr_back_heap) = heap(|| {
        let mut m = alternating_attr(u_pages);
        m.set(0, u_pages, Attr::Shared);
        m
    });
    let (u_roar_p, u_roar_p_heap) = heap(|| {
        let mut r = RoaringBitmap::new();
        r.insert_range(0..to_u32(u_pages));
        r.optimize();
        r
    });
    let (u_roar_s, u_roar_s_heap) = heap(RoaringBitmap::new);
    let (u_run, u_run_heap) = heap(|| RunMap::new(u_pages, Attr::Private));
    let (_, sparse_heap) = heap(|| sparse_attr(sparse_pages, 10_000));
    let (_, sparse_old_heap) = heap(|| sparse_runmap(sparse_pages, 10_000));
    let (_, sparse_roar_heap) = heap(|| {
        let mut r = sparse_roar.clone();
        r.optimize();
        r
    });
    black_box((
        &w_attr,
        &w_roar,
        &w_run,
        &u_attr_p,
        &u_attr_back,
        &u_roar_p,
        &u_roar_s,
        &u_run,
    ));

    println!("P3 attribute map, {REPS} rounds, medians; 1M runs = 1,048,576 pages (4 GiB), every other page private.\n");
    println!("| what | AttrMap | roaring | binary search (baseline) | RunMap (old) | AttrMap ÷ baseline | AttrMap ÷ roaring | AttrMap ÷ RunMap |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows.0 {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.what,
            cell(&r.attr),
            cell(&r.roaring),
            cell(&r.bsearch),
            cell(&r.runmap),
            ratio(&r.attr, &r.bsearch),
            ratio(&r.attr, &r.roaring),
            ratio(&r.attr, &r.runmap),
        );
    }
    let kib = |b: f64| format!("{:.2} KiB", b / 1024.0);
    println!(
        "| heap per GiB, 1M runs at 4 GiB | {} | {} | {} | {} | {:.3} | {:.3} | {:.3} |",
        kib(gib(attr_heap, PAGES)),
        kib(gib(roar_heap, PAGES)),
        kib(gib(starts_heap, PAGES)),
        kib(gib(runmap_heap, PAGES)),
        attr_heap as f64 / starts_heap as f64,
        attr_heap as f64 / roar_heap as f64,
        attr_heap as f64 / runmap_heap as f64,
    );
    println!(
        "| heap per GiB, 1 GiB every other page (262,144 runs) | {} | {} | – | {} | – | {:.3} | {:.3} |",
        kib(w_attr_heap as f64),
        kib(w_roar_heap as f64),
        kib(w_run_heap as f64),
        w_attr_heap as f64 / w_roar_heap as f64,
        w_attr_heap as f64 / w_run_heap as f64,
    );
    println!(
        "| uniform 16 GiB private: heap + struct bytes | {} + {} B | {} + {} B | – | {} + {} B | – | – | – |",
        u_attr_p_heap,
        std::mem::size_of::<AttrMap>(),
        u_roar_p_heap,
        std::mem::size_of::<RoaringBitmap>(),
        u_run_heap,
        std::mem::size_of::<RunMap>(),
    );
    println!(
        "| uniform 16 GiB shared (roaring: empty); AttrMap made mixed then uniform again | {} + {} B | {} + {} B | – | – | – | – | – |",
        u_attr_back_heap,
        std::mem::size_of::<AttrMap>(),
        u_roar_s_heap,
        std::mem::size_of::<RoaringBitmap>(),
    );
    println!(
        "| heap, 16 GiB with 10k runs | {} | {} | – | {} | – | {:.3} | {:.3} |",
        kib(sparse_heap as f64),
        kib(sparse_roar_heap as f64),
        kib(sparse_old_heap as f64),
        sparse_heap as f64 / sparse_roar_heap as f64,
        sparse_heap as f64 / sparse_old_heap as f64,
    );
    println!(
        "\nbaseline heap (sorted Vec<u64> of 1M run starts): {} bytes",
        starts_heap
    );
}
