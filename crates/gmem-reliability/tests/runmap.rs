//! The attribute map against a per-page reference, with many runs (well past one index
//! chunk) and every query: `get`, `run_at`, `all`, `first`, `runs` over random windows, `len`.
#![allow(clippy::cast_possible_truncation)]

use gmem::{Attr, AttrMap};
use gmem_reliability::rng::Rng;

fn check(m: &AttrMap, pages: &[Attr], r: &mut Rng, step: usize) {
    let n = pages.len() as u64;
    let mut runs = 0;
    for p in 0..pages.len() {
        if p == 0 || pages[p] != pages[p - 1] {
            runs += 1;
        }
    }
    assert_eq!(m.len(), runs, "step {step}: run count");
    for _ in 0..32 {
        let a = r.below(n);
        let b = a + 1 + r.below(n - a);
        assert_eq!(m.get(a), pages[a as usize], "step {step}: get({a})");
        let run = m.run_at(a);
        assert!(
            run.start <= a && a < run.end,
            "step {step}: run_at({a}) = {run:?}"
        );
        assert!((run.start..run.end).all(|p| pages[p as usize] == run.attr));
        assert!(run.start == 0 || pages[run.start as usize - 1] != run.attr);
        assert!(run.end == n || pages[run.end as usize] != run.attr);
        for attr in [Attr::Shared, Attr::Private] {
            let want_all = (a..b).all(|p| pages[p as usize] == attr);
            assert_eq!(
                m.all(a, b, attr),
                want_all,
                "step {step}: all({a},{b},{attr:?})"
            );
            let want_first = (a..b).find(|&p| pages[p as usize] == attr);
            assert_eq!(
                m.first(a, b, attr),
                want_first,
                "step {step}: first({a},{b},{attr:?})"
            );
        }
        let got: Vec<(u64, u64, Attr)> = m.runs(a, b).map(|x| (x.start, x.end, x.attr)).collect();
        let mut want: Vec<(u64, u64, Attr)> = Vec::new();
        for p in a..b {
            match want.last_mut() {
                Some(l) if l.2 == pages[p as usize] => l.1 = p + 1,
                _ => want.push((p, p + 1, pages[p as usize])),
            }
        }
        assert_eq!(got, want, "step {step}: runs({a},{b})");
    }
}

#[test]
fn runmap_matches_a_per_page_reference() {
    for (seed, n) in [(1u64, 256u64), (2, 2048), (3, 1000), (4, 64), (5, 130)] {
        let mut r = Rng::new(seed);
        let mut m = AttrMap::new(n, Attr::Shared);
        let mut pages = vec![Attr::Shared; n as usize];
        for step in 0..2000 {
            let a = r.below(n);
            let len = match r.below(4) {
                0 => 1,
                1 => r.range(1, 8),
                2 => r.range(1, 64),
                _ => r.range(1, n),
            };
            let b = (a + len).min(n);
            let attr = if r.chance(1, 2) {
                Attr::Shared
            } else {
                Attr::Private
            };
            m.set(a, b, attr);
            pages[a as usize..b as usize].fill(attr);
            check(&m, &pages, &mut r, step);
        }
    }
}

/// A refused conversion puts the replaced runs back one by one: the map must come back exactly.
#[test]
fn runmap_put_back_restores_exactly() {
    for (seed, n) in [(11u64, 256u64), (12, 128), (13, 2048)] {
        let mut r = Rng::new(seed);
        let mut m = AttrMap::new(n, Attr::Shared);
        let mut pages = vec![Attr::Shared; n as usize];
        for step in 0..3000 {
            let a = r.below(n);
            let b = (a + r.range(1, 16)).min(n);
            let attr = if r.chance(1, 2) {
                Attr::Shared
            } else {
                Attr::Private
            };
            if r.chance(1, 2) {
                m.set(a, b, attr);
                pages[a as usize..b as usize].fill(attr);
            } else {
                let old: Vec<_> = m.runs(a, b).collect();
                m.set(a, b, attr);
                for run in &old {
                    m.set(run.start, run.end, run.attr);
                }
            }
            check(&m, &pages, &mut r, step);
        }
    }
}
