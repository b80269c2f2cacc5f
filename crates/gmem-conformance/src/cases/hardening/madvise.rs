//! `madvise` of every kind, `mprotect` and `mlock` on a view: private pages stay blocked.
//!
//! A balloon device drops pages with `MADV_DONTNEED`; a VMM may mark its views `MADV_DONTFORK`,
//! `MADV_HUGEPAGE`, cold or paged out, populate them ahead of use, or change their protection.
//! None of it may make a private page readable through the view. Shmem and HugeTLB pieces are
//! blocked by guard markers, which no zap removes; whole private huge pages and the views of a
//! kernel guest_memfd by mappings that hold nothing (HugeTLB) or by sealed guard markers.

use gmem::{Attr, FallocMode};

use super::{addr, errno, Layout, PAGE, SECRET, SHARED};
use crate::Ctx;

/// One advice and what `madvise` answers for it on a shared file mapping holding guard
/// markers: `Ok` or the errno.
struct Advice {
    name: &'static str,
    advice: i32,
    /// Leaves the view's shared pages as they were (false for advices that drop data).
    keeps_data: bool,
}

const fn a(name: &'static str, advice: i32, keeps_data: bool) -> Advice {
    Advice {
        name,
        advice,
        keeps_data,
    }
}

/// Every advice of `mm/madvise.c` that applies to a process's own range, except
/// `MADV_HWPOISON`/`MADV_SOFT_OFFLINE` (memory failure; absent here), `MADV_REMOVE` (punches
/// the file: [`remove_punches_but_never_reveals`]) and `MADV_GUARD_REMOVE` (the documented
/// exception: [`guard_remove_is_the_documented_exception`]).
const ADVICES: &[Advice] = &[
    a("MADV_NORMAL", libc::MADV_NORMAL, true),
    a("MADV_RANDOM", libc::MADV_RANDOM, true),
    a("MADV_SEQUENTIAL", libc::MADV_SEQUENTIAL, true),
    a("MADV_WILLNEED", libc::MADV_WILLNEED, true),
    a("MADV_DONTNEED", libc::MADV_DONTNEED, true),
    a("MADV_FREE", libc::MADV_FREE, true),
    a("MADV_DONTFORK", libc::MADV_DONTFORK, true),
    a("MADV_DOFORK", libc::MADV_DOFORK, true),
    a("MADV_MERGEABLE", libc::MADV_MERGEABLE, true),
    a("MADV_UNMERGEABLE", libc::MADV_UNMERGEABLE, true),
    a("MADV_HUGEPAGE", libc::MADV_HUGEPAGE, true),
    a("MADV_NOHUGEPAGE", libc::MADV_NOHUGEPAGE, true),
    a("MADV_DONTDUMP", libc::MADV_DONTDUMP, true),
    a("MADV_DODUMP", libc::MADV_DODUMP, true),
    a("MADV_WIPEONFORK", libc::MADV_WIPEONFORK, true),
    a("MADV_KEEPONFORK", libc::MADV_KEEPONFORK, true),
    a("MADV_COLD", libc::MADV_COLD, true),
    a("MADV_PAGEOUT", libc::MADV_PAGEOUT, true),
    a("MADV_POPULATE_READ", 22, true),
    a("MADV_POPULATE_WRITE", 23, true),
    a("MADV_DONTNEED_LOCKED", 24, true),
    a("MADV_COLLAPSE", 25, true),
];

/// `MADV_GUARD_INSTALL` (6.13).
pub const MADV_GUARD_INSTALL: i32 = 102;
/// `MADV_GUARD_REMOVE` (6.13).
pub const MADV_GUARD_REMOVE: i32 = 103;

fn advise(l: &Layout, advice: i32) -> Result<(), i32> {
    let len = l.view.len();
    // SAFETY: the range is the view's own; no advice changes what Rust objects hold.
    let rc = unsafe { libc::madvise(addr(&l.view), len, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

/// Each advice on the whole view, then the layout checked: private pages fault as documented,
/// shared pages keep their bytes, the guest still reads the secret; finally everything back
/// to shared reads the secret in place through the same view.
pub fn every_advice_keeps_private_pages_blocked(ctx: &Ctx<'_>) {
    let Some(l) = Layout::new(ctx) else { return };
    let mut answers = Vec::new();
    for adv in ADVICES {
        let rc = advise(&l, adv.advice);
        answers.push((adv.name, rc));
        l.check(
            &l.view,
            adv.keeps_data.then_some(SHARED),
            &format!("after {} ({rc:?})", adv.name),
        );
    }
    eprintln!("{}: {answers:?}", ctx.backend().name());
    l.restore_and_check(Some(SHARED), "back to shared after every advice");
}

/// `mprotect` to read-only, to nothing and back, and `mlock`/`munlock`: refused on a sealed
/// view (`EPERM`), otherwise applied; private pages stay blocked either way.
pub fn protection_changes_keep_private_pages_blocked(ctx: &Ctx<'_>) {
    let Some(l) = Layout::new(ctx) else { return };
    let len = l.view.len();
    for (name, prot) in [
        ("PROT_READ", libc::PROT_READ),
        ("PROT_NONE", libc::PROT_NONE),
        ("PROT_READ|PROT_WRITE", libc::PROT_READ | libc::PROT_WRITE),
    ] {
        // SAFETY: the range is the view's own.
        let rc = unsafe { libc::mprotect(addr(&l.view), len, prot) };
        if l.sealed() {
            assert_eq!(
                (rc, errno()),
                (-1, libc::EPERM),
                "mprotect {name} on a sealed view"
            );
        } else {
            assert_eq!(rc, 0, "mprotect {name}: errno {}", errno());
        }
    }
    l.check(&l.view, Some(SHARED), "after mprotect");
    // SAFETY: the range is the view's own.
    let rc = unsafe { libc::mlock(addr(&l.view), len) };
    let mlock = if rc == 0 { Ok(()) } else { Err(errno()) };
    l.check(&l.view, Some(SHARED), &format!("after mlock ({mlock:?})"));
    // SAFETY: as above.
    let rc = unsafe { libc::munlock(addr(&l.view), len) };
    assert_eq!(rc, 0, "munlock: errno {}", errno());
    eprintln!("{}: mlock {mlock:?}", ctx.backend().name());
    l.restore_and_check(Some(SHARED), "back to shared after mprotect and mlock");
}

/// `MADV_REMOVE` frees the file's pages under the view (shared and private alike: the VMM
/// discards guest memory, as with a punch-hole). On shmem and HugeTLB private pages stay
/// blocked. On a kernel guest_memfd it is a documented exception: the kernel's punch-hole
/// drops the guard markers of every page mapped elsewhere at that moment (the guest mapping),
/// so such a page reads zero through the view until gmem punches or converts it again;
/// discard through [`gmem::GuestMemfd::fallocate`], which keeps the markers.
pub fn remove_punches_but_never_reveals(ctx: &Ctx<'_>) {
    let Some(l) = Layout::new(ctx) else { return };
    assert_eq!(
        advise(&l, libc::MADV_REMOVE),
        Ok(()),
        "MADV_REMOVE on a view"
    );
    if l.sealed() {
        assert_eq!(
            crate::touch::read_byte(&l.view, PAGE),
            Ok(0),
            "the documented exception: a private page punched by MADV_REMOVE"
        );
        for (at, len) in [(PAGE, PAGE), (l.last, l.size() - l.last)] {
            l.mem
                .fallocate(FallocMode::PUNCH_HOLE, at, len)
                .expect("punch through gmem");
        }
    }
    for p in l.sample().into_iter().filter(|&p| l.is_private(p)) {
        crate::touch::expect_fault(&l.view, p, PAGE, "private page after MADV_REMOVE");
    }
    super::guest_expect(
        &l.mem,
        PAGE,
        PAGE,
        0,
        "MADV_REMOVE discarded the private page",
    );
}

/// `MADV_GUARD_REMOVE` on a view lifts gmem's guard markers: on backings whose views use
/// them (shmem, HugeTLB pieces, the kernel guest_memfd) a private page becomes readable. This
/// is deliberate raw access by trusted VMM code, the one `madvise` gmem cannot fail closed
/// against on this kernel; `gmem probe` reports it. A whole private huge page is a mapping
/// that holds nothing, not guard markers, and stays blocked. The next conversion of a page
/// guards it again.
pub fn guard_remove_is_the_documented_exception(ctx: &Ctx<'_>) {
    let Some(l) = Layout::new(ctx) else { return };
    assert_eq!(
        advise(&l, MADV_GUARD_REMOVE),
        Ok(()),
        "MADV_GUARD_REMOVE on a view"
    );
    assert_eq!(
        crate::touch::read_byte(&l.view, PAGE),
        Ok(SECRET),
        "the documented exception: a guarded private page after MADV_GUARD_REMOVE"
    );
    let huge = matches!(l.mem.backing_kind(), gmem::BackingKind::HugeTlb(_));
    if huge {
        crate::touch::expect_fault(&l.view, l.last, PAGE, "a whole private huge page");
    } else {
        assert_eq!(crate::touch::read_byte(&l.view, l.last), Ok(SECRET));
    }
    l.mem.convert(PAGE, PAGE, Attr::Shared).expect("to shared");
    l.mem
        .convert(PAGE, PAGE, Attr::Private)
        .expect("to private again");
    crate::touch::expect_fault(&l.view, PAGE, PAGE, "guarded again by the next conversion");
}
