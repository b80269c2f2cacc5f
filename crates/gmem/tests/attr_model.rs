//! Property test of [`AttrMap`] against a per-page reference model.
//!
//! Random `set`s (tiny and whole-file ranges, ranges on word boundaries, at the file end,
//! empty and past-the-end ones) on files of 1 page, of 63/64/65/128/129 pages and of random
//! sizes; after each step every query is compared with a `Vec<Attr>` holding one attribute per
//! page.

use gmem::model::attr::{Attr, AttrMap, Run};
use proptest::prelude::*;

/// One `set` as drawn: a start, a length and an attribute, before they meet a page count.
#[derive(Debug, Clone)]
enum Op {
    /// 1 to 4 pages from anywhere.
    Tiny(u64, u64, bool),
    /// From a word boundary, for a whole number of words or to the end.
    Words(u64, u64, bool),
    /// The last few pages, up to the end.
    Tail(u64, bool),
    /// Anywhere to the end of the file.
    ToEnd(u64, bool),
    /// Any start and end, including empty and past-the-end ranges.
    Raw(u64, u64, bool),
    /// The whole file.
    Whole(bool),
}

fn attr(private: bool) -> Attr {
    if private {
        Attr::Private
    } else {
        Attr::Shared
    }
}

impl Op {
    /// The `(start, end, attr)` passed to `set` on a file of `pages` pages.
    fn range(&self, pages: u64) -> (u64, u64, Attr) {
        match *self {
            Op::Tiny(s, l, p) => {
                let s = s % pages;
                (s, s + 1 + l % 4, attr(p))
            }
            Op::Words(s, l, p) => {
                let s = (s % pages.div_ceil(64)) * 64;
                (s, s + 64 * (1 + l % 3), attr(p))
            }
            Op::Tail(k, p) => (pages.saturating_sub(1 + k % 70), pages, attr(p)),
            Op::ToEnd(s, p) => (s % pages, pages, attr(p)),
            Op::Raw(s, e, p) => (s % (pages + 3), e % (pages + 70), attr(p)),
            Op::Whole(p) => (0, pages, attr(p)),
        }
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(s, l, p)| Op::Tiny(s, l, p)),
        2 => (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(s, l, p)| Op::Words(s, l, p)),
        1 => (any::<u64>(), any::<bool>()).prop_map(|(k, p)| Op::Tail(k, p)),
        1 => (any::<u64>(), any::<bool>()).prop_map(|(s, p)| Op::ToEnd(s, p)),
        2 => (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(s, e, p)| Op::Raw(s, e, p)),
        1 => any::<bool>().prop_map(Op::Whole),
    ]
}

fn pages() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(1u64),
        Just(2),
        Just(63),
        Just(64),
        Just(65),
        Just(128),
        Just(129),
        3u64..700,
        // Long enough for scans that skip eight empty words at a time, both ways.
        700u64..5000,
    ]
}

fn idx(p: u64) -> usize {
    usize::try_from(p).expect("test page fits usize")
}

/// The maximal runs of the model.
fn model_runs(model: &[Attr]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (p, &a) in (0u64..).zip(model) {
        match out.last_mut() {
            Some(r) if r.attr == a => r.end = p + 1,
            _ => out.push(Run {
                start: p,
                end: p + 1,
                attr: a,
            }),
        }
    }
    out
}

/// Compares every query of `m` with `model`, on the whole file and on windows around `probes`.
fn check(m: &AttrMap, model: &[Attr], probes: &[u64]) -> Result<(), TestCaseError> {
    let n = m.pages();
    prop_assert_eq!(idx(n), model.len());
    let want = model_runs(model);
    prop_assert_eq!(m.runs(0, n).collect::<Vec<_>>(), want.clone());
    prop_assert_eq!(m.len(), want.len());
    prop_assert!(!m.is_empty());
    if want.len() == 1 {
        prop_assert_eq!(m.heap_bytes(), 0, "uniform map holds heap");
    } else {
        prop_assert_eq!(m.heap_bytes(), idx(n.div_ceil(64) * 8));
    }
    for r in &want {
        for p in r.start..r.end {
            prop_assert_eq!(m.get(p), r.attr, "get({})", p);
            prop_assert_eq!(m.run_at(p), *r, "run_at({})", p);
        }
    }
    for &q in probes {
        let q = q.min(n - 1);
        for e in [q + 1, q + 2, q + 16, q + 64, q + 65, q + 300, n] {
            let e = e.min(n);
            let slice = &model[idx(q)..idx(e)];
            for a in [Attr::Shared, Attr::Private] {
                prop_assert_eq!(
                    m.all(q, e, a),
                    slice.iter().all(|x| *x == a),
                    "all({}, {}, {:?})",
                    q,
                    e,
                    a
                );
                prop_assert_eq!(
                    m.any(q, e, a),
                    slice.contains(&a),
                    "any({}, {}, {:?})",
                    q,
                    e,
                    a
                );
                let first = (q..e).zip(slice).find(|(_, x)| **x == a).map(|(p, _)| p);
                prop_assert_eq!(m.first(q, e, a), first, "first({}, {}, {:?})", q, e, a);
            }
            let clipped: Vec<Run> = want
                .iter()
                .filter(|r| r.start < e && r.end > q)
                .map(|r| Run {
                    start: r.start.max(q),
                    end: r.end.min(e),
                    attr: r.attr,
                })
                .collect();
            prop_assert_eq!(
                m.runs(q, e).collect::<Vec<_>>(),
                clipped,
                "runs({}, {})",
                q,
                e
            );
        }
    }
    // One representation per set of attributes: a map rebuilt from the runs is equal.
    let mut rebuilt = AttrMap::new(n, want[0].attr);
    for r in &want[1..] {
        rebuilt.set(r.start, r.end, r.attr);
    }
    prop_assert_eq!(&rebuilt, m);
    prop_assert_eq!(&m.clone(), m);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    #[test]
    fn attr_map_matches_per_page_model(
        pages in pages(),
        start_private in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..48),
    ) {
        let init = attr(start_private);
        let mut m = AttrMap::new(pages, init);
        let mut model = vec![init; idx(pages)];
        check(&m, &model, &[0])?;
        for op in &ops {
            let (s, e, a) = op.range(pages);
            m.set(s, e, a);
            for p in s..e.min(pages) {
                model[idx(p)] = a;
            }
            check(&m, &model, &[s, e, s.midpoint(e), 0, pages - 1])?;
        }
    }

    #[test]
    fn attr_map_returns_to_zero_heap_when_uniform(
        pages in 2u64..2000,
        seeds in proptest::collection::vec(any::<u64>(), 1..64),
        end_private in any::<bool>(),
    ) {
        let mut m = AttrMap::new(pages, Attr::Shared);
        for s in &seeds {
            let p = s % pages;
            m.set(p, p + 1 + (s >> 32) % 8, attr(s & 1 == 1));
        }
        // Undo page by page, in a scattered order (7919 is prime and above `pages`, so the walk
        // visits every page once): the page that evens the map frees the bits.
        let a = attr(end_private);
        let mut p = seeds[0] % pages;
        for _ in 0..pages {
            m.set(p, p + 1, a);
            p = (p + 7919) % pages;
        }
        prop_assert_eq!(m.len(), 1);
        prop_assert_eq!(m.heap_bytes(), 0);
        prop_assert_eq!(m, AttrMap::new(pages, a));
    }
}

#[test]
fn attr_map_out_of_range_queries_answer_as_private_past_the_end() {
    let mut m = AttrMap::new(130, Attr::Shared);
    m.set(64, 66, Attr::Private);
    assert!(m.any(129, 131, Attr::Private));
    assert!(!m.all(120, 1000, Attr::Shared));
    assert_eq!(m.first(100, u64::MAX, Attr::Private), Some(130));
    assert_eq!(m.first(66, u64::MAX, Attr::Shared), Some(66));
    assert_eq!(m.run_at(u64::MAX).attr, Attr::Private);
    assert_eq!(m.runs(0, u64::MAX).count(), 3);
    m.set(u64::MAX - 1, u64::MAX, Attr::Private);
    assert_eq!(m.len(), 3);
}
