//! The engine's rollback, from the outside: a participant or a listener refuses each kind of
//! step a change sends (revoke, restore, split, merge, poison, unpoison, refresh), or its Nth
//! call, and the file (attributes, bytes, every host view, HugeTLB accounting and the pool)
//! and every other participant end exactly as they were, each undo in reverse order.
//!
//! Base-page cases run on shmem from the shared suite (`gmem_conformance::rollback`); the
//! HugeTLB cases (2 MiB, and 1 GiB where a page can be reserved) are here.
#![allow(clippy::cast_possible_truncation)]

mod hugepool;

use gmem::{
    Attr, BackingChoice, ByteRange, Conversion, ConvertError, Errno, FallocMode, Flags, GuestMemfd,
    PoisonError, PoolGuard, Step, HUGE_1G, HUGE_2M,
};
use gmem_conformance::rollback::{
    at, beliefs_agree, digest, expect_refusal, expect_undo_in_reverse, fill, heard, pages, pattern,
    sweep, Call, Counters, Heard, Kind, Refuse, Rig, PAGE, PARTICIPANTS,
};

gmem_conformance::rollback_suite!(shmem, gmem_conformance::Shmem);

/// A HugeTLB file's shape: huge page size and count.
#[derive(Debug, Clone, Copy)]
struct Geo {
    page: u64,
    n: u64,
}

const M2: Geo = Geo {
    page: HUGE_2M,
    n: 2,
};
const G1: Geo = Geo {
    page: HUGE_1G,
    n: 1,
};

impl Geo {
    /// Base pages per huge page.
    fn per(self) -> u64 {
        self.page / PAGE
    }
    /// First base page of the last huge page.
    fn last(self) -> u64 {
        (self.n - 1) * self.per()
    }
    /// The last huge page as a byte range.
    fn last_range(self) -> ByteRange {
        pages(self.last(), self.last() + self.per())
    }
    /// The page the cases convert or poison: inside the last huge page.
    fn target(self) -> u64 {
        self.last() + 7
    }
    /// The pages snapshots look at: every page of a 2 MiB file; a sample of a 1 GiB one.
    fn list(self) -> Vec<u64> {
        let total = self.n * self.per();
        if self.page == HUGE_2M {
            return (0..total).collect();
        }
        let t = self.target();
        let mut v: Vec<u64> = (0..8)
            .chain(t - 1..t + 2)
            .chain([self.per() / 2, self.per() / 2 + 1])
            .chain(total - 4..total)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Grows the pool by the rig's huge pages (restored on drop), or prints `skipped: ...`.
fn reserve(g: Geo) -> Option<PoolGuard> {
    hugepool::pool(g.page, g.n)
}

/// A HugeTLB rig: the file of `g` filled with the pattern, page 5 private on a file of two
/// huge pages (its first huge page split), then `private` (page ranges) converted; views of
/// the whole file and of the last huge page.
fn huge_rig(g: Geo, private: &[(u64, u64)], split: Vec<u64>) -> Rig {
    let mem = GuestMemfd::builder(g.n * g.page)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(BackingChoice::HugeTlb(g.page))
        .create()
        .expect("create on HugeTLB");
    let list = g.list();
    fill(&mem, &list);
    if g.n > 1 {
        mem.convert(5 * PAGE, PAGE, Attr::Private).expect("page 5");
    }
    for &(first, end) in private {
        mem.convert(first * PAGE, (end - first) * PAGE, Attr::Private)
            .expect("setup conversion");
    }
    let mut views = vec![mem.map(0, g.n * g.page).expect("map all")];
    if g.n > 1 {
        views.push(
            mem.map(g.last() * PAGE, g.page)
                .expect("map the last huge page"),
        );
    }
    let mut known = if g.n > 1 { vec![0] } else { Vec::new() };
    known.extend(split);
    Rig::new(mem, views, list, known)
}

fn counters(rig: &Rig) -> Counters {
    Counters::of(&rig.mem.hugetlb_accounting().expect("HugeTLB accounting"))
}

/// The accounting moved by one split and one merge since `c0` (a 2 MiB page's pieces are
/// kept for the next split).
fn expect_one_split_and_merge(rig: &Rig, g: Geo, c0: &Counters) {
    let cached = if g.page == HUGE_2M { g.page } else { 0 };
    assert_eq!(
        counters(rig),
        Counters {
            splits: c0.splits + 1,
            merges: c0.merges + 1,
            cached: c0.cached + cached,
            ..*c0
        }
    );
}

/// Huge pages of the pool free and not reserved by anyone.
fn available(g: Geo) -> u64 {
    hugepool::stats(g.page).available()
}

fn each(who: &[&str], call: Call) -> Vec<(String, Call)> {
    who.iter().map(|w| at(w, call)).collect()
}

/// What every participant hears of a split or merge `step` that happens: the freeze of its
/// huge page, then the step.
fn restructured(step: Step) -> Vec<(String, Call)> {
    let mut v = each(&PARTICIPANTS, Call::Apply(Step::Freeze(step.range())));
    v.extend(each(&PARTICIPANTS, Call::Apply(step)));
    v
}

/// What the participants hear of a split or merge `step` that `b` refuses: every one froze
/// the huge page, `a` undoes the step, and every one is let go, in reverse order.
fn restructure_refused(step: Step) -> Vec<(String, Call)> {
    let freeze = Step::Freeze(step.range());
    let mut v = each(&PARTICIPANTS, Call::Apply(freeze));
    v.extend([
        at("a", Call::Apply(step)),
        at("b", Call::Refused(step)),
        at("a", Call::Undo(step)),
    ]);
    v.extend(PARTICIPANTS.iter().rev().map(|w| at(w, Call::Undo(freeze))));
    v
}

fn aborted(c: Conversion) -> Vec<(String, Heard)> {
    heard(c, Heard::Abort)
}

fn one(page: u64, to: Attr) -> Conversion {
    Conversion {
        offset: page * PAGE,
        len: PAGE,
        to,
    }
}

/// Splitting the last huge page for a conversion of one of its pages: `b` refuses the split
/// (`errno`). The conversion fails with `b`'s errno and offset (the huge page's last 4 KiB),
/// `a` undoes the split, nothing is split, counted or reserved differently, every byte and
/// view is as before. Once `b` accepts, the same call splits (every participant hears
/// split, revoke, refresh) and converts.
fn split_refused(g: Geo, errno: i32) {
    let rig = huge_rig(g, &[], Vec::new());
    let (before, c0, pool0) = (rig.snapshot(), counters(&rig), available(g));
    let m0 = rig.mirror(&rig.split);
    let split = Step::Split(g.last_range());
    rig.b.set(Refuse::Kind(Kind::Split), errno);
    let t = g.target();
    let err = rig
        .mem
        .convert(t * PAGE, PAGE, Attr::Private)
        .expect_err("b refuses the split");
    expect_refusal(&err, &split, errno);
    assert_eq!(rig.journal.all(), restructure_refused(split));
    expect_undo_in_reverse(&rig.journal.all());
    assert_eq!(rig.heard(), aborted(one(t, Attr::Private)));
    assert_eq!(rig.snapshot(), before);
    assert_eq!(counters(&rig), c0);
    assert_eq!(available(g), pool0);
    beliefs_agree(&rig, &m0, &rig.split);

    rig.journal.clear();
    rig.b.set(Refuse::Never, 0);
    rig.mem
        .convert(t * PAGE, PAGE, Attr::Private)
        .expect("the retry succeeds");
    let mut want = restructured(split);
    want.extend(each(
        &PARTICIPANTS,
        Call::Apply(Step::Revoke(pages(t, t + 1))),
    ));
    want.extend(each(
        &PARTICIPANTS,
        Call::Apply(Step::Refresh(pages(t, t + 1))),
    ));
    assert_eq!(rig.journal.all(), want);
    let c1 = counters(&rig);
    assert_eq!(
        (c1.split_pages, c1.splits),
        (c0.split_pages + 1, c0.splits + 1)
    );
    let mut now_split = rig.split.clone();
    now_split.push(g.last_range().start);
    beliefs_agree(&rig, &m0, &now_split);
    rig.snapshot();
}

/// `b` accepts the split and refuses the revoke that follows: the conversion fails with its
/// errno, `a` undoes the revoke, and the split made for the conversion is undone by a merge
/// that every participant hears. Attributes, bytes, views, the pool and the pages split are
/// as before; the counters show one split and one merge more (and, for 2 MiB pages, the
/// merged page's pieces kept in the piece cache).
fn revoke_refused_after_split(g: Geo, errno: i32) {
    let rig = huge_rig(g, &[], Vec::new());
    let (before, c0, pool0) = (rig.snapshot(), counters(&rig), available(g));
    let m0 = rig.mirror(&rig.split);
    let (split, merge) = (Step::Split(g.last_range()), Step::Merge(g.last_range()));
    let t = g.target();
    let revoke = Step::Revoke(pages(t, t + 1));
    rig.b.set(Refuse::Kind(Kind::Revoke), errno);
    let err = rig
        .mem
        .convert(t * PAGE, PAGE, Attr::Private)
        .expect_err("b refuses the revoke");
    expect_refusal(&err, &revoke, errno);
    let mut want = restructured(split);
    want.extend([
        at("a", Call::Apply(revoke)),
        at("b", Call::Refused(revoke)),
        at("a", Call::Undo(revoke)),
    ]);
    want.extend(restructured(merge));
    assert_eq!(rig.journal.all(), want);
    assert_eq!(rig.heard(), aborted(one(t, Attr::Private)));
    assert_eq!(rig.snapshot(), before);
    assert_eq!(available(g), pool0);
    expect_one_split_and_merge(&rig, g, &c0);
    beliefs_agree(&rig, &m0, &rig.split);
}

/// The last huge page is split (page `target` private); converting that page back to shared
/// makes it uniform, and the merge that follows is refused by `b` (`errno`). The conversion
/// succeeds (a merge is not part of its transaction); the page stays split, `a` undid its
/// merge, every view reads the page's bytes. `merge_pending` merges it once `b` accepts;
/// with `EAGAIN` the page waits to merge meanwhile.
fn merge_refused(g: Geo, errno: i32) {
    let t = g.target();
    let rig = huge_rig(g, &[(t, t + 1)], vec![g.last_range().start]);
    let (c0, pool0) = (counters(&rig), available(g));
    let m0 = rig.mirror(&rig.split);
    let merge = Step::Merge(g.last_range());
    let restore = Step::Restore(pages(t, t + 1));
    rig.b.set(Refuse::Kind(Kind::Merge), errno);
    rig.mem
        .convert(t * PAGE, PAGE, Attr::Shared)
        .expect("a refused merge does not fail the conversion");
    let mut want = each(&PARTICIPANTS, Call::Apply(restore));
    want.extend(restructure_refused(merge));
    assert_eq!(rig.journal.all(), want);
    expect_undo_in_reverse(&rig.journal.all());
    let waiting = u64::from(errno == libc::EAGAIN);
    assert_eq!(counters(&rig), Counters { waiting, ..c0 });
    assert_eq!(rig.mem.attr(t * PAGE).expect("attr"), Attr::Shared);
    let snap = rig.snapshot();
    let i = rig
        .list
        .iter()
        .position(|&p| p == t)
        .expect("target listed");
    assert_eq!(snap.pages[i].host, Ok(digest(&pattern(t))));
    beliefs_agree(&rig, &m0, &rig.split);

    let mid = rig.mirror(&rig.split);
    rig.journal.clear();
    rig.b.set(Refuse::Never, 0);
    assert_eq!(rig.mem.merge_pending().expect("merge_pending"), 1);
    assert_eq!(rig.journal.all(), restructured(merge));
    let c1 = counters(&rig);
    assert_eq!(
        (c1.split_pages, c1.waiting, c1.merges),
        (c0.split_pages - 1, 0, c0.merges + 1)
    );
    assert_eq!(
        rig.snapshot(),
        snap,
        "merging changes no byte and no reachability"
    );
    assert_eq!(available(g), pool0);
    let now_split: Vec<u64> = rig
        .split
        .iter()
        .copied()
        .filter(|&s| s != g.last_range().start)
        .collect();
    beliefs_agree(&rig, &mid, &now_split);
}

/// The last huge page wholly private (a hole in every view); converting one of its pages to
/// shared splits it, and `b` refuses the restore: the conversion fails, the split is undone by
/// a merge back into a hole, every page of it still faults as a hole (`SIGBUS`).
fn restore_refused_in_a_hole(g: Geo, errno: i32) {
    let last = g.last();
    let rig = huge_rig(g, &[(last, last + g.per())], Vec::new());
    let (before, c0, pool0) = (rig.snapshot(), counters(&rig), available(g));
    let m0 = rig.mirror(&rig.split);
    let t = g.target();
    let (split, merge) = (Step::Split(g.last_range()), Step::Merge(g.last_range()));
    let restore = Step::Restore(pages(t, t + 1));
    rig.b.set(Refuse::Kind(Kind::Restore), errno);
    let err = rig
        .mem
        .convert(t * PAGE, PAGE, Attr::Shared)
        .expect_err("b refuses the restore");
    expect_refusal(&err, &restore, errno);
    let mut want = restructured(split);
    want.extend([
        at("a", Call::Apply(restore)),
        at("b", Call::Refused(restore)),
        at("a", Call::Undo(restore)),
    ]);
    want.extend(restructured(merge));
    assert_eq!(rig.journal.all(), want);
    assert_eq!(rig.heard(), aborted(one(t, Attr::Shared)));
    assert_eq!(rig.snapshot(), before);
    let view = &rig.views[0];
    assert_eq!(
        view.fault_at((t * PAGE) as usize),
        Some(gmem::HostFault::Bus),
        "a hole again"
    );
    assert_eq!(available(g), pool0);
    expect_one_split_and_merge(&rig, g, &c0);
    beliefs_agree(&rig, &m0, &rig.split);
}

/// Poisoning a shared page of a whole huge page splits it first; `b` refuses the split: the
/// poison fails with `EBUSY` naming the page, nothing is poisoned or split. Once `b`
/// accepts, every participant hears the split and the poison.
fn poison_split_refused(g: Geo, errno: i32) {
    let rig = huge_rig(g, &[], Vec::new());
    let (before, c0, pool0) = (rig.snapshot(), counters(&rig), available(g));
    let m0 = rig.mirror(&rig.split);
    let t = g.target();
    let split = Step::Split(g.last_range());
    rig.b.set(Refuse::Kind(Kind::Split), errno);
    let err = rig.mem.inject_poison(t * PAGE).expect_err("b refuses");
    assert!(
        matches!(err, PoisonError::Busy { offset } if offset == t * PAGE),
        "{err:?}"
    );
    assert_eq!(
        (err.errno(), err.error_offset()),
        (libc::EBUSY, Some(t * PAGE))
    );
    assert_eq!(rig.journal.all(), restructure_refused(split));
    assert_eq!(rig.snapshot(), before);
    assert_eq!(counters(&rig), c0);
    assert_eq!(available(g), pool0);
    beliefs_agree(&rig, &m0, &rig.split);

    rig.journal.clear();
    rig.b.set(Refuse::Never, 0);
    rig.mem.inject_poison(t * PAGE).expect("poison");
    let mut want = restructured(split);
    want.extend(each(
        &PARTICIPANTS,
        Call::Apply(Step::Poison(pages(t, t + 1))),
    ));
    assert_eq!(rig.journal.all(), want);
    assert!(rig.heard().is_empty());
    let mut now_split = rig.split.clone();
    now_split.push(g.last_range().start);
    beliefs_agree(&rig, &m0, &now_split);
    rig.snapshot();
}

/// The last huge page split because page `target` is poisoned; a punch-hole of it tells
/// every participant to refresh, to unpoison, and (the page uniform and unpoisoned now) to
/// merge. `b` refuses one of them (`kind`): the punch succeeds all the same, the huge page
/// reads zero, the poison is gone, the pool holds the file's reservation as before; a refused
/// merge leaves the page split until `merge_pending`.
fn punch_refused(g: Geo, kind: Kind) {
    let rig = huge_rig(g, &[], Vec::new());
    let t = g.target();
    rig.mem.inject_poison(t * PAGE).expect("poison");
    let pool0 = available(g);
    let c0 = counters(&rig);
    assert_eq!(c0.split_pages, rig.split.len() as u64 + 1);
    rig.journal.clear();
    rig.b.set(Refuse::Kind(kind), libc::EIO);
    let r = g.last_range();
    rig.mem
        .fallocate(FallocMode::PUNCH_HOLE, r.start, r.len())
        .expect("punch-hole is not refused");
    let b = |s: Step| {
        if Kind::of(&s) == kind {
            Call::Refused(s)
        } else {
            Call::Apply(s)
        }
    };
    let mut want = Vec::new();
    for s in [Step::Refresh(r), Step::Unpoison(r)] {
        want.extend([
            at("a", Call::Apply(s)),
            at("b", b(s)),
            at("c", Call::Apply(s)),
        ]);
    }
    if kind == Kind::Merge {
        want.extend(restructure_refused(Step::Merge(r)));
    } else {
        want.extend(restructured(Step::Merge(r)));
    }
    assert_eq!(rig.journal.all(), want);
    expect_undo_in_reverse(&rig.journal.all());
    assert_eq!(
        rig.mem.poisoned_pages().expect("poisoned pages"),
        Vec::<u64>::new()
    );
    assert_eq!(
        available(g),
        pool0,
        "the punched huge page is reserved again"
    );
    let c1 = counters(&rig);
    if kind == Kind::Merge {
        assert_eq!((c1.split_pages, c1.merges), (c0.split_pages, c0.merges));
        assert_eq!(
            rig.mem.merge_pending().expect("merge_pending"),
            0,
            "b refuses still"
        );
        rig.b.set(Refuse::Never, 0);
        assert_eq!(rig.mem.merge_pending().expect("merge_pending"), 1);
    }
    let c1 = counters(&rig);
    assert_eq!(
        (c1.split_pages, c1.merges),
        (c0.split_pages - 1, c0.merges + 1)
    );
    let snap = rig.snapshot();
    let zero = digest(&[0u8; 4096]);
    for (i, &p) in rig.list.iter().enumerate() {
        let want = if p >= g.last() {
            zero
        } else if p == 5 && g.n > 1 {
            continue;
        } else {
            digest(&pattern(p))
        };
        assert_eq!(snap.pages[i].guest, Ok(want), "page {p}");
    }
    assert_eq!(available(g), pool0);
}

/// A conversion of both huge pages to private stops part way: `b` refuses the revoke of the
/// second huge page (its call after the first huge page's revokes, refreshes, freeze and
/// merge). The
/// error is [`ConvertError::Partial`]: the first huge page converted (and merged into a hole),
/// the second untouched; listeners hear the abort of the whole conversion, then the commit of
/// the part done; every participant believes exactly that.
fn partial_conversion(g: Geo) {
    let make = || huge_rig(g, &[], Vec::new());
    let size = g.n * g.page;
    let first = pages(0, g.per());
    let (r1, r2) = (Step::Revoke(pages(0, 5)), Step::Revoke(pages(6, g.per())));
    let whole = Step::Revoke(g.last_range());
    let reference: Vec<Step> = vec![
        r1,
        r2,
        Step::Refresh(pages(0, 5)),
        Step::Refresh(pages(6, g.per())),
        Step::Freeze(first),
        Step::Merge(first),
        // A whole huge page is not moved (module docs of the engine's moves): no refresh.
        whole,
    ];
    {
        let rig = make();
        rig.mem.convert(0, size, Attr::Private).expect("reference");
        let applied: Vec<Call> = reference.iter().map(|s| Call::Apply(*s)).collect();
        assert_eq!(rig.journal.of("b"), applied, "the plan of the conversion");
    }
    let rig = make();
    let before = rig.snapshot();
    let m0 = rig.mirror(&rig.split);
    let c0 = counters(&rig);
    rig.b.set(Refuse::Call(6), libc::EIO);
    let err = rig
        .mem
        .convert(0, size, Attr::Private)
        .expect_err("b refuses the second huge page");
    match &err {
        ConvertError::Partial { reached, source } => {
            assert_eq!(*reached, g.page);
            expect_refusal(source, &whole, libc::EIO);
        }
        other => panic!("expected a partial conversion, got {other:?}"),
    }
    assert_eq!(err.reached(), Some(g.page));
    assert_eq!(
        (err.errno(), err.error_offset()),
        (libc::EIO, Some(size - PAGE))
    );
    let mut want = Vec::new();
    for s in &reference[..6] {
        want.extend(each(&PARTICIPANTS, Call::Apply(*s)));
    }
    want.extend([
        at("a", Call::Apply(whole)),
        at("b", Call::Refused(whole)),
        at("a", Call::Undo(whole)),
    ]);
    assert_eq!(rig.journal.all(), want);
    let conv = Conversion {
        offset: 0,
        len: size,
        to: Attr::Private,
    };
    let mut heard = aborted(conv);
    heard.extend(["L1", "L2", "L3"].iter().map(|l| {
        (
            l.to_string(),
            Heard::Commit(Conversion {
                len: g.page,
                ..conv
            }),
        )
    }));
    assert_eq!(rig.heard(), heard);
    let runs = rig.mem.runs(0, size).expect("runs");
    assert_eq!(
        runs.iter()
            .map(|r| (r.offset, r.len, r.attr))
            .collect::<Vec<_>>(),
        vec![(0, g.page, Attr::Private), (g.page, g.page, Attr::Shared)]
    );
    let after = rig.snapshot();
    assert_eq!(
        after.pages[g.per() as usize..],
        before.pages[g.per() as usize..]
    );
    assert_eq!(
        rig.views[0].fault_at(0),
        Some(gmem::HostFault::Bus),
        "the first huge page merged into a hole"
    );
    let c1 = counters(&rig);
    assert_eq!((c1.split_pages, c1.merges), (0, c0.merges + 1));
    beliefs_agree(&rig, &m0, &[]);
}

/// A listener vetoes a conversion that would split a huge page: nothing is split, no
/// participant hears anything, the counters do not move.
fn listener_veto(g: Geo) {
    let rig = huge_rig(g, &[], Vec::new());
    let (before, c0) = (rig.snapshot(), counters(&rig));
    let t = g.target();
    rig.l2.veto(Some(gmem::Veto {
        offset: t * PAGE,
        reason: "DMA in flight".into(),
    }));
    let err = rig
        .mem
        .convert(t * PAGE, PAGE, Attr::Private)
        .expect_err("vetoed");
    assert!(matches!(&err, ConvertError::Vetoed { offset, .. } if *offset == t * PAGE));
    assert_eq!(err.errno(), libc::EAGAIN);
    assert_eq!(rig.journal.all(), vec![]);
    assert_eq!(rig.snapshot(), before);
    assert_eq!(counters(&rig), c0);
}

/// A split refused for a huge page whose pieces sit in the piece cache (it was split and
/// merged before) leaves the cache as it was: the refusal changes no counter.
fn split_refused_keeps_the_piece_cache(g: Geo) {
    let rig = huge_rig(g, &[], Vec::new());
    let t = g.target();
    rig.mem
        .convert(t * PAGE, PAGE, Attr::Private)
        .expect("split");
    rig.mem
        .convert(t * PAGE, PAGE, Attr::Shared)
        .expect("merge");
    let (before, c0) = (rig.snapshot(), counters(&rig));
    assert_eq!(c0.cached, g.page, "the merged page's pieces are cached");
    rig.b.set(Refuse::Kind(Kind::Split), libc::EIO);
    let err = rig
        .mem
        .convert(t * PAGE, PAGE, Attr::Private)
        .expect_err("b refuses the split");
    expect_refusal(&err, &Step::Split(g.last_range()), libc::EIO);
    assert_eq!(rig.snapshot(), before);
    assert_eq!(counters(&rig), c0);
    rig.b.set(Refuse::Never, 0);
    rig.mem
        .convert(t * PAGE, PAGE, Attr::Private)
        .expect("split");
    assert_eq!(counters(&rig).cached, 0, "the cached pieces were used");
}

/// Every call refused in turn ([`sweep`]) for conversions that split (one page of the whole
/// huge page to private), merge (the split page's private page back to shared) and convert
/// a whole huge page (to private, no split).
fn every_call_refused_in_turn(g: Geo, errno: i32) {
    let make = || huge_rig(g, &[], Vec::new());
    let t = g.target();
    let n = sweep(&make, &|m| m.convert(t * PAGE, PAGE, Attr::Private), errno);
    assert_eq!(n, 4, "freeze, split, revoke, refresh");
    let n = sweep(&make, &|m| m.convert(5 * PAGE, PAGE, Attr::Shared), errno);
    assert_eq!(n, 3, "restore, freeze, merge");
    let r = g.last_range();
    let n = sweep(
        &make,
        &|m| m.convert(r.start, r.len(), Attr::Private),
        errno,
    );
    assert_eq!(n, 1, "revoke (a whole huge page is not moved: no refresh)");
}

macro_rules! huge_cases {
    ($geo:ident, $( $name:ident => $body:expr ),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let Some(_pool) = reserve($geo) else { return };
                $body;
            }
        )*
    };
}

huge_cases!(M2,
    hugetlb_2m_split_refused => split_refused(M2, libc::EIO),
    hugetlb_2m_split_refused_busy => split_refused(M2, libc::EAGAIN),
    hugetlb_2m_revoke_refused_after_split => revoke_refused_after_split(M2, libc::EIO),
    hugetlb_2m_merge_refused => merge_refused(M2, libc::EIO),
    hugetlb_2m_merge_refused_busy_waits => merge_refused(M2, libc::EAGAIN),
    hugetlb_2m_restore_refused_in_a_hole => restore_refused_in_a_hole(M2, libc::ETIMEDOUT),
    hugetlb_2m_poison_split_refused => poison_split_refused(M2, libc::EAGAIN),
    hugetlb_2m_punch_refresh_refused => punch_refused(M2, Kind::Refresh),
    hugetlb_2m_punch_unpoison_refused => punch_refused(M2, Kind::Unpoison),
    hugetlb_2m_punch_merge_refused => punch_refused(M2, Kind::Merge),
    hugetlb_2m_partial_conversion => partial_conversion(M2),
    hugetlb_2m_listener_veto => listener_veto(M2),
    hugetlb_2m_split_refused_keeps_the_piece_cache => split_refused_keeps_the_piece_cache(M2),
    hugetlb_2m_every_call_refused_in_turn => every_call_refused_in_turn(M2, libc::EIO),
    hugetlb_2m_every_call_refused_in_turn_busy => every_call_refused_in_turn(M2, libc::EAGAIN),
);

huge_cases!(G1,
    hugetlb_1g_split_refused => split_refused(G1, libc::EIO),
    hugetlb_1g_revoke_refused_after_split => revoke_refused_after_split(G1, libc::EAGAIN),
    hugetlb_1g_merge_refused => merge_refused(G1, libc::EIO),
    hugetlb_1g_restore_refused_in_a_hole => restore_refused_in_a_hole(G1, libc::EIO),
    hugetlb_1g_poison_split_refused => poison_split_refused(G1, libc::EIO),
    hugetlb_1g_listener_veto => listener_veto(G1),
);
