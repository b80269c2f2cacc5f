//! Rollback cases for base-page backings (shmem, the kernel guest_memfd): a participant or a
//! listener refuses each kind of step a change sends, or the Nth call, and the file, its
//! views, its listeners and every other participant end as they were.
//!
//! Every case starts from the same file ([`rig`]): 16 pages, created `MMAP | INIT_SHARED`,
//! each page holding its own [`pattern`](super::pattern); pages 3, 9 and 10 private; one
//! host view of the whole file and one of its second half; participants `a`, `b`, `c` and
//! listeners `L1`, `L2`, `L3` added last. `b` is the one that refuses.

use gmem::{Attr, Conversion, ConvertError, Errno, FallocMode, Flags, Step, Veto};

use super::{at, expect_refusal, fill, pages, sweep, Call, Heard, Kind, Mirror, Refuse, Rig, PAGE};
use crate::cases::require;
use crate::Ctx;

const SHARED: Flags = Flags::from_bits_retain(Flags::MMAP.bits() | Flags::INIT_SHARED.bits());

/// Pages of the rig's file.
pub const PAGES: u64 = 16;

/// The rig every case starts from (module docs), or `None` when the backing lacks
/// `MMAP | INIT_SHARED`.
pub fn rig(ctx: &Ctx<'_>) -> Option<Rig> {
    if !require(ctx, SHARED) {
        return None;
    }
    let mem = ctx.create(PAGES * PAGE, SHARED);
    let list: Vec<u64> = (0..PAGES).collect();
    fill(&mem, &list);
    mem.convert(3 * PAGE, PAGE, Attr::Private).expect("page 3");
    mem.convert(9 * PAGE, 2 * PAGE, Attr::Private)
        .expect("pages 9, 10");
    let views = vec![
        mem.map(0, PAGES * PAGE).expect("map all"),
        mem.map(8 * PAGE, 8 * PAGE).expect("map the second half"),
    ];
    Some(Rig::new(mem, views, list, Vec::new()))
}

fn conv(first: u64, end: u64, to: Attr) -> Conversion {
    Conversion {
        offset: first * PAGE,
        len: (end - first) * PAGE,
        to,
    }
}

fn heard_abort(c: Conversion) -> Vec<(String, Heard)> {
    super::heard(c, Heard::Abort)
}

fn heard_commit(c: Conversion) -> Vec<(String, Heard)> {
    super::heard(c, Heard::Commit)
}

/// Every participant believes what the file says now.
#[track_caller]
fn beliefs_agree(rig: &Rig, from: &Mirror) {
    super::beliefs_agree(rig, from, &[]);
}

/// `b` refuses the first revoke of a conversion to private of pages 2..6 (two runs: 2 and
/// 4..6, page 3 being private already): the conversion fails with `b`'s errno and offset, `a`
/// undoes the step it applied, `c` never hears of it, the listeners hear an abort, and
/// attributes, bytes and every view are as before. Once `b` accepts, the same call succeeds
/// and every participant hears each revoke, then a refresh of each run (its pages moved to
/// fresh memory, see `gmem` engine docs).
pub fn revoke_refused(ctx: &Ctx<'_>) {
    let Some(rig) = rig(ctx) else { return };
    let before = rig.snapshot();
    let m0 = rig.mirror(&[]);
    rig.b.set(Refuse::Kind(Kind::Revoke), libc::EIO);
    let r1 = Step::Revoke(pages(2, 3));
    let r2 = Step::Revoke(pages(4, 6));
    let err = rig
        .mem
        .convert(2 * PAGE, 4 * PAGE, Attr::Private)
        .expect_err("b refuses");
    expect_refusal(&err, &r1, libc::EIO);
    assert!(matches!(err, ConvertError::Peer { offset, errno: libc::EIO } if offset == 2 * PAGE));
    assert_eq!(
        rig.journal.all(),
        vec![
            at("a", Call::Apply(r1)),
            at("b", Call::Refused(r1)),
            at("a", Call::Undo(r1)),
        ]
    );
    assert_eq!(rig.heard(), heard_abort(conv(2, 6, Attr::Private)));
    assert_eq!(rig.snapshot(), before);
    beliefs_agree(&rig, &m0);

    rig.journal.clear();
    rig.b.set(Refuse::Never, 0);
    rig.mem
        .convert(2 * PAGE, 4 * PAGE, Attr::Private)
        .expect("the retry succeeds");
    let refresh = [Step::Refresh(pages(2, 3)), Step::Refresh(pages(4, 6))];
    let mut want = Vec::new();
    for s in [r1, r2, refresh[0], refresh[1]] {
        want.extend(["a", "b", "c"].map(|w| at(w, Call::Apply(s))));
    }
    assert_eq!(rig.journal.all(), want);
    assert_eq!(rig.heard(), heard_commit(conv(2, 6, Attr::Private)));
    beliefs_agree(&rig, &m0);
    rig.snapshot();
}

/// `b` accepts the first revoke and refuses the second (its call 1) with `EAGAIN`: the
/// conversion fails with [`ConvertError::Busy`] naming `b`'s page; `a` undoes the second
/// revoke, then `c`, `b` and `a` undo the first, in that order; nothing changed.
pub fn revoke_refused_at_second_call(ctx: &Ctx<'_>) {
    let Some(rig) = rig(ctx) else { return };
    let before = rig.snapshot();
    let m0 = rig.mirror(&[]);
    rig.b.set(Refuse::Call(1), libc::EAGAIN);
    let r1 = Step::Revoke(pages(2, 3));
    let r2 = Step::Revoke(pages(4, 6));
    let err = rig
        .mem
        .convert(2 * PAGE, 4 * PAGE, Attr::Private)
        .expect_err("b refuses");
    assert!(matches!(err, ConvertError::Busy { offset } if offset == 5 * PAGE));
    expect_refusal(&err, &r2, libc::EAGAIN);
    assert_eq!(
        rig.journal.all(),
        vec![
            at("a", Call::Apply(r1)),
            at("b", Call::Apply(r1)),
            at("c", Call::Apply(r1)),
            at("a", Call::Apply(r2)),
            at("b", Call::Refused(r2)),
            at("a", Call::Undo(r2)),
            at("c", Call::Undo(r1)),
            at("b", Call::Undo(r1)),
            at("a", Call::Undo(r1)),
        ]
    );
    assert_eq!(rig.heard(), heard_abort(conv(2, 6, Attr::Private)));
    assert_eq!(rig.snapshot(), before);
    beliefs_agree(&rig, &m0);
}

/// `b` refuses the restore of a conversion to shared of pages 8..12 (private run 9..11): the
/// conversion fails, `a` undoes its restore, the views fault again on pages 9 and 10, the
/// attributes never changed.
pub fn restore_refused(ctx: &Ctx<'_>) {
    let Some(rig) = rig(ctx) else { return };
    let before = rig.snapshot();
    let m0 = rig.mirror(&[]);
    rig.b.set(Refuse::Kind(Kind::Restore), libc::EIO);
    let s = Step::Restore(pages(9, 11));
    let err = rig
        .mem
        .convert(8 * PAGE, 4 * PAGE, Attr::Shared)
        .expect_err("b refuses");
    expect_refusal(&err, &s, libc::EIO);
    assert_eq!(
        rig.journal.all(),
        vec![
            at("a", Call::Apply(s)),
            at("b", Call::Refused(s)),
            at("a", Call::Undo(s)),
        ]
    );
    assert_eq!(rig.heard(), heard_abort(conv(8, 12, Attr::Shared)));
    assert_eq!(rig.snapshot(), before);
    beliefs_agree(&rig, &m0);
}

/// A conversion of the whole file to shared restores two runs (3 and 9..11); `b` refuses the
/// second: both are undone in reverse, by every participant that applied them.
pub fn restore_refused_at_second_call(ctx: &Ctx<'_>) {
    let Some(rig) = rig(ctx) else { return };
    let before = rig.snapshot();
    let m0 = rig.mirror(&[]);
    rig.b.set(Refuse::Call(1), libc::ENOMEM);
    let s1 = Step::Restore(pages(3, 4));
    let s2 = Step::Restore(pages(9, 11));
    let err = rig
        .mem
        .convert(0, PAGES * PAGE, Attr::Shared)
        .expect_err("b refuses");
    expect_refusal(&err, &s2, libc::ENOMEM);
    assert_eq!(
        rig.journal.all(),
        vec![
            at("a", Call::Apply(s1)),
            at("b", Call::Apply(s1)),
            at("c", Call::Apply(s1)),
            at("a", Call::Apply(s2)),
            at("b", Call::Refused(s2)),
            at("a", Call::Undo(s2)),
            at("c", Call::Undo(s1)),
            at("b", Call::Undo(s1)),
            at("a", Call::Undo(s1)),
        ]
    );
    assert_eq!(rig.heard(), heard_abort(conv(0, PAGES, Attr::Shared)));
    assert_eq!(rig.snapshot(), before);
    beliefs_agree(&rig, &m0);
}

/// The second of three listeners vetoes, in both directions: `EAGAIN` with the listener's
/// offset and reason; the first listener hears an abort, the third nothing; no participant
/// hears anything; nothing changed.
pub fn listener_veto(ctx: &Ctx<'_>) {
    let Some(rig) = rig(ctx) else { return };
    let before = rig.snapshot();
    let veto = Veto {
        offset: 5 * PAGE,
        reason: "device busy".to_string(),
    };
    rig.l2.veto(Some(veto.clone()));
    for (first, end, to) in [(2, 6, Attr::Private), (8, 12, Attr::Shared)] {
        let err = rig
            .mem
            .convert(first * PAGE, (end - first) * PAGE, to)
            .expect_err("L2 vetoes");
        assert!(
            matches!(&err, ConvertError::Vetoed { offset, reason } if *offset == veto.offset && *reason == veto.reason),
            "{err:?}"
        );
        assert_eq!(err.errno(), libc::EAGAIN);
        assert_eq!(err.error_offset(), Some(veto.offset));
        let c = conv(first, end, to);
        assert_eq!(
            rig.heard(),
            vec![
                ("L1".to_string(), Heard::Prepare(c)),
                ("L2".to_string(), Heard::Prepare(c)),
                ("L1".to_string(), Heard::Abort(c)),
            ]
        );
        assert_eq!(rig.journal.all(), vec![]);
        assert_eq!(rig.snapshot(), before);
    }
    rig.l2.veto(None);
    rig.mem
        .convert(2 * PAGE, 4 * PAGE, Attr::Private)
        .expect("no veto");
    assert_eq!(rig.heard(), heard_commit(conv(2, 6, Attr::Private)));
}

/// Poison cannot be refused: `b` refusing it is logged, the page is poisoned all the same
/// (every view faults on it, accessors say `EHWPOISON`), `a` and `c` record it, nothing is
/// undone; only `b` is out of step (it does not believe the page poisoned).
pub fn poison_refused(ctx: &Ctx<'_>) {
    let Some(rig) = rig(ctx) else { return };
    let m0 = rig.mirror(&[]);
    rig.b.set(Refuse::Kind(Kind::Poison), libc::EIO);
    let p = Step::Poison(pages(5, 6));
    rig.mem
        .inject_poison(5 * PAGE + 17)
        .expect("poison is not refused");
    assert_eq!(
        rig.journal.all(),
        vec![
            at("a", Call::Apply(p)),
            at("b", Call::Refused(p)),
            at("c", Call::Apply(p)),
        ]
    );
    assert_eq!(
        rig.mem.poisoned_pages().expect("poisoned pages"),
        vec![5 * PAGE]
    );
    let snap = rig.snapshot();
    let five = &snap.pages[5];
    assert_eq!(
        (five.guest, five.host),
        (Err(libc::EHWPOISON), Err(libc::EHWPOISON))
    );
    let now = rig.mirror(&[]);
    assert_eq!(rig.believed(&m0, "a"), now);
    assert_eq!(rig.believed(&m0, "c"), now);
    assert_eq!(rig.believed(&m0, "b"), m0, "b refused: it is out of step");
    assert!(rig.heard().is_empty(), "listeners hear conversions only");
}

/// A punch-hole of pages 2..8 (page 3 private, page 5 poisoned) tells every participant to
/// refresh the range, then to unpoison it. Neither can be refused: with `b` refusing the
/// refresh, and then the unpoison, the punch succeeds, the range reads zero, page 3 still
/// faults in every view, page 5 is no longer poisoned and reads zero, the pages around the
/// range keep their bytes.
pub fn punch_refresh_refused(ctx: &Ctx<'_>) {
    let Some(rig) = rig(ctx) else { return };
    let m0 = rig.mirror(&[]);
    let refresh = Step::Refresh(pages(2, 8));
    let unpoison = Step::Unpoison(pages(2, 8));
    let zero = super::digest(&[0u8; 4096]);
    for kind in [Kind::Refresh, Kind::Unpoison] {
        rig.mem.inject_poison(5 * PAGE).expect("poison");
        rig.journal.clear();
        rig.b.set(Refuse::Kind(kind), libc::EIO);
        rig.mem
            .fallocate(FallocMode::PUNCH_HOLE, 2 * PAGE, 6 * PAGE)
            .expect("punch-hole is not refused");
        let b = |s: Step| {
            if Kind::of(&s) == kind {
                Call::Refused(s)
            } else {
                Call::Apply(s)
            }
        };
        assert_eq!(
            rig.journal.all(),
            vec![
                at("a", Call::Apply(refresh)),
                at("b", b(refresh)),
                at("c", Call::Apply(refresh)),
                at("a", Call::Apply(unpoison)),
                at("b", b(unpoison)),
                at("c", Call::Apply(unpoison)),
            ],
            "{kind:?} refused"
        );
        assert_eq!(
            rig.mem.poisoned_pages().expect("poisoned pages"),
            Vec::<u64>::new()
        );
        let snap = rig.snapshot();
        for p in 2..8usize {
            assert_eq!(snap.pages[p].guest, Ok(zero), "page {p} punched");
        }
        assert_eq!(
            snap.pages[3].host,
            Err(libc::EFAULT),
            "page 3 stays private"
        );
        assert_eq!(snap.pages[5].host, Ok(zero), "page 5 is a fresh page");
        for (i, p) in [(1usize, 1u64), (8, 8)] {
            let want = super::digest(&super::pattern(p));
            assert_eq!(snap.pages[i].guest, Ok(want), "page {p} untouched");
        }
        assert_eq!(
            rig.mirror(&[]).private,
            m0.private,
            "punch-hole never changes attributes"
        );
    }
    assert!(rig.heard().is_empty(), "listeners hear conversions only");
}

/// Every call of a conversion refused in turn ([`sweep`]): to private of the whole file
/// (three revokes, three refreshes), and to shared of the whole file (two restores).
pub fn every_call_refused_in_turn(ctx: &Ctx<'_>) {
    if !require(ctx, SHARED) {
        return;
    }
    let make = || rig(ctx).expect("rig");
    let size = PAGES * PAGE;
    let n = sweep(&make, &|m| m.convert(0, size, Attr::Private), libc::EIO);
    assert_eq!(n, 6, "three revokes and three refreshes");
    let n = sweep(&make, &|m| m.convert(0, size, Attr::Shared), libc::EAGAIN);
    assert_eq!(n, 2, "two restores");
}

/// The orphaning step of a conversion to private ([`gmem`]'s moves: a page a host view
/// showed is copied out, punched and written back to a fresh page) never makes the page
/// reachable through a view. The witness is a page whose bytes no host path may ever show:
/// written through the guest view while private, then poisoned, then converted to shared
/// (its bytes stay, the poison keeps it faulting). A prober reads it through a view while
/// the page is converted to private (and moved) and back, thousands of times: it must never
/// read those bytes. (On the kernel guest_memfd a punch-hole drops every view's markers at
/// a page that some mapping maps, and the move's own copy mapped it.)
pub fn moved_pages_stay_unreachable(ctx: &Ctx<'_>) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    if !require(ctx, SHARED) {
        return;
    }
    const HIDDEN: u8 = 0xEE;
    let mem = ctx.create(PAGES * PAGE, SHARED);
    let view = mem.map(0, PAGES * PAGE).expect("map");
    let p = 5;
    mem.convert(p * PAGE, PAGE, Attr::Private).expect("private");
    mem.guest()
        .expect("guest view")
        .write(p * PAGE, &[HIDDEN; 4096])
        .expect("guest write");
    mem.inject_poison(p * PAGE).expect("poison");
    mem.convert(p * PAGE, PAGE, Attr::Shared)
        .expect("shared, poisoned");
    let stop = AtomicBool::new(false);
    let (seen, probes) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            let at = usize::try_from(p * PAGE).expect("offset");
            while !stop.load(Ordering::Relaxed) {
                for b in [0, 100, 4095] {
                    // SAFETY: inside the live view; the probe reports the fault.
                    let t = unsafe { crate::probe::read(view.as_ptr().wrapping_add(at + b)) };
                    if t == crate::probe::Touch::Ok(HIDDEN) {
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                    probes.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        for _ in 0..5000 {
            mem.convert(p * PAGE, PAGE, Attr::Private)
                .expect("to private");
            mem.convert(p * PAGE, PAGE, Attr::Shared)
                .expect("to shared");
        }
        stop.store(true, Ordering::Relaxed);
    });
    let probes = probes.load(Ordering::Relaxed);
    assert!(probes > 0);
    assert_eq!(
        seen.load(Ordering::Relaxed),
        0,
        "{probes} probes: a view showed the page's bytes while it moved"
    );
    let t = crate::touch::read_byte(&view, p * PAGE);
    assert!(matches!(t, Err(f) if f.is_access_error()), "{t:?}");
}
