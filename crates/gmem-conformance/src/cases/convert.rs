//! In-place conversion between shared and private (DESIGN §7 item 5).
//!
//! Files here are created with `MMAP` (the guest view and host views need it); the host's
//! side is a [`HostView`] probed with `SIGBUS` checks, the guest's side is
//! [`gmem::GuestMemfd::guest`].

use gmem::{Attr, FallocMode, Flags, GuestMemfd, HostView, Pin};

use super::{expect_errno, guest_expect, guest_fill, require, runs_of, PAGE};
use crate::child::{ChildProcess, ChildSide};
use crate::touch;
use crate::Ctx;
use gmem::Errno;

const SHARED: Flags = Flags::from_bits_retain(Flags::MMAP.bits() | Flags::INIT_SHARED.bits());

#[track_caller]
fn convert(mem: &GuestMemfd, off: u64, len: u64, to: Attr) {
    mem.convert(off, len, to)
        .unwrap_or_else(|e| panic!("convert ({off:#x}, {len:#x}) to {to:?}: {e}"));
}

fn map(mem: &GuestMemfd) -> HostView {
    mem.map(0, mem.size()).expect("map the whole file")
}

/// Invalid ranges are `EINVAL` in both directions and change nothing; a range already in
/// the target state succeeds at once.
pub fn invalid_ranges(ctx: &Ctx<'_>) {
    if !require(ctx, SHARED) {
        return;
    }
    let size = ctx.size_for(4 * PAGE);
    let mem = ctx.create(size, SHARED);
    let view = map(&mem);
    touch::fill(&view, 0, size, 0x3c).expect("fill");
    convert(&mem, PAGE, PAGE, Attr::Private);
    let before = runs_of(&mem);
    let top = u64::MAX / PAGE * PAGE;
    for to in [Attr::Private, Attr::Shared] {
        for (off, len) in [
            (0, 0),
            (PAGE, 0),
            (1, PAGE),
            (PAGE - 1, PAGE),
            (0, 1),
            (0, PAGE - 1),
            (0, PAGE + 1),
            (size, PAGE),
            (size - PAGE, 2 * PAGE),
            (0, size + PAGE),
            (top, 2 * PAGE),
            (PAGE, top),
        ] {
            let e = mem
                .convert(off, len, to)
                .expect_err("invalid range accepted");
            assert_eq!(
                (e.errno(), e.error_offset()),
                (libc::EINVAL, Some(off)),
                "convert ({off:#x}, {len:#x}) to {to:?}"
            );
            assert_eq!(
                runs_of(&mem),
                before,
                "a refused conversion changed attributes"
            );
        }
    }
    // Already in the target state: success, nothing touched.
    convert(&mem, 0, PAGE, Attr::Shared);
    convert(&mem, PAGE, PAGE, Attr::Private);
    assert_eq!(runs_of(&mem), before);
    touch::expect_bytes(&view, 0, PAGE, 0x3c, "shared page after no-op conversions");
    touch::expect_fault(&view, PAGE, PAGE, "private page after no-op conversions");
    guest_expect(&mem, PAGE, PAGE, 0x3c, "private page contents");
}

/// Start private; the guest writes; to shared: the host sees the guest's bytes. The host
/// writes; to private: the host faults, the guest sees the host's bytes. Contents move in
/// neither direction.
pub fn in_place(ctx: &Ctx<'_>) {
    if !require(ctx, Flags::MMAP) {
        return;
    }
    let size = ctx.size_for(4 * PAGE);
    let mem = ctx.create(size, Flags::MMAP);
    let view = map(&mem);
    assert_eq!(runs_of(&mem), vec![(0, size, true)], "starts private");
    let pattern: Vec<u8> = (0..4 * PAGE).map(|i| (i % 251) as u8).collect();
    mem.guest()
        .expect("guest view")
        .write(0, &pattern)
        .expect("guest writes private memory");
    touch::expect_fault(&view, 0, 4 * PAGE, "private before conversion");
    let e = mem
        .read_at(0, &mut [0u8; 4])
        .expect_err("read_at of a private page");
    assert_eq!((e.errno(), e.error_offset()), (libc::EFAULT, Some(0)));

    convert(&mem, 0, 4 * PAGE, Attr::Shared);
    assert_eq!(mem.attr(0).expect("attr"), Attr::Shared);
    let seen = touch::read(&view, 0, 4 * PAGE).expect("host reads shared memory");
    assert!(
        seen == pattern,
        "the host must see the guest's bytes after conversion to shared"
    );
    let mut buf = vec![0u8; pattern.len()];
    mem.read_at(0, &mut buf).expect("read_at of shared memory");
    assert!(buf == pattern, "read_at must see the guest's bytes");

    let host: Vec<u8> = (0..4 * PAGE).map(|i| (i % 241) as u8 ^ 0xa5).collect();
    touch::write(&view, 0, &host).expect("host writes shared memory");
    convert(&mem, 0, 4 * PAGE, Attr::Private);
    touch::expect_fault(&view, 0, 4 * PAGE, "after conversion to private");
    let mut got = vec![0u8; host.len()];
    mem.guest()
        .expect("guest view")
        .read(0, &mut got)
        .expect("guest read");
    assert!(
        got == host,
        "the guest must see the host's bytes after conversion to private"
    );

    // And back once more: still the same bytes, now through a fresh view as well.
    convert(&mem, 0, 4 * PAGE, Attr::Shared);
    let fresh = map(&mem);
    assert!(touch::read(&fresh, 0, 4 * PAGE).expect("fresh view") == host);
    assert!(touch::read(&view, 0, 4 * PAGE).expect("old view") == host);
}

fn page_byte(page: u64) -> u8 {
    0x10 + u8::try_from(page).expect("page index below 16")
}

/// Over four pages, converting any single page changes exactly that page, in both
/// directions: its attribute, its host access, and nothing of anyone's bytes.
pub fn per_page(ctx: &Ctx<'_>) {
    if !require(ctx, SHARED) || !require(ctx, Flags::MMAP) {
        return;
    }
    let size = ctx.size_for(4 * PAGE);
    for target in 0..4u64 {
        // Shared file, one page to private and back.
        let mem = ctx.create(size, SHARED);
        let view = map(&mem);
        for p in 0..4 {
            touch::fill(&view, p * PAGE, PAGE, page_byte(p)).expect("fill");
        }
        convert(&mem, target * PAGE, PAGE, Attr::Private);
        for p in 0..4 {
            let what = format!("page {p} after page {target} went private");
            let attr = mem.attr(p * PAGE).expect("attr");
            if p == target {
                assert_eq!(attr, Attr::Private, "{what}");
                touch::expect_fault(&view, p * PAGE, PAGE, &what);
                let e = mem
                    .read_at(p * PAGE + 7, &mut [0u8; 2])
                    .expect_err("read_at");
                assert_eq!(
                    (e.errno(), e.error_offset()),
                    (libc::EFAULT, Some(p * PAGE + 7))
                );
            } else {
                assert_eq!(attr, Attr::Shared, "{what}");
                touch::expect_bytes(&view, p * PAGE, PAGE, page_byte(p), &what);
            }
            guest_expect(&mem, p * PAGE, PAGE, page_byte(p), &what);
        }
        let expect_runs = 1 + usize::from(target > 0) + usize::from(size > (target + 1) * PAGE);
        assert_eq!(
            mem.run_count().expect("run count"),
            expect_runs,
            "runs with page {target} private"
        );
        convert(&mem, target * PAGE, PAGE, Attr::Shared);
        assert_eq!(mem.run_count().expect("run count"), 1, "runs merge again");
        for p in 0..4 {
            touch::expect_bytes(&view, p * PAGE, PAGE, page_byte(p), "after converting back");
        }

        // Private file, one page to shared and back.
        let mem = ctx.create(size, Flags::MMAP);
        let view = map(&mem);
        for p in 0..4 {
            guest_fill(&mem, p * PAGE, PAGE, page_byte(p));
        }
        convert(&mem, target * PAGE, PAGE, Attr::Shared);
        for p in 0..4 {
            let what = format!("page {p} after page {target} went shared");
            if p == target {
                assert_eq!(mem.attr(p * PAGE).expect("attr"), Attr::Shared, "{what}");
                touch::expect_bytes(&view, p * PAGE, PAGE, page_byte(p), &what);
                touch::fill(&view, p * PAGE, PAGE, 0xee).expect("host writes the shared page");
            } else {
                assert_eq!(mem.attr(p * PAGE).expect("attr"), Attr::Private, "{what}");
                touch::expect_fault(&view, p * PAGE, PAGE, &what);
            }
        }
        convert(&mem, target * PAGE, PAGE, Attr::Private);
        assert_eq!(mem.run_count().expect("run count"), 1);
        touch::expect_fault(&view, 0, 4 * PAGE, "all private again");
        for p in 0..4 {
            let want = if p == target { 0xee } else { page_byte(p) };
            guest_expect(&mem, p * PAGE, PAGE, want, "guest after converting back");
        }
    }
}

/// Pages converted before anything allocated them read zero, on either side, in either
/// direction.
pub fn before_allocation(ctx: &Ctx<'_>) {
    if !require(ctx, SHARED) || !require(ctx, Flags::MMAP) {
        return;
    }
    let size = ctx.size_for(4 * PAGE);
    let mem = ctx.create(size, Flags::MMAP);
    let view = map(&mem);
    convert(&mem, PAGE, PAGE, Attr::Shared);
    touch::expect_bytes(
        &view,
        PAGE,
        PAGE,
        0,
        "never-allocated page converted to shared",
    );
    let mut buf = vec![0xffu8; super::PAGE_BYTES];
    mem.read_at(PAGE, &mut buf).expect("read_at");
    assert!(
        buf.iter().all(|&b| b == 0),
        "read_at of a never-allocated page"
    );
    guest_expect(&mem, PAGE, PAGE, 0, "guest view of the same page");

    let mem = ctx.create(size, SHARED);
    convert(&mem, 2 * PAGE, PAGE, Attr::Private);
    guest_expect(
        &mem,
        2 * PAGE,
        PAGE,
        0,
        "never-allocated page converted to private",
    );
    convert(&mem, 2 * PAGE, PAGE, Attr::Shared);
    let view = map(&mem);
    touch::expect_bytes(
        &view,
        0,
        4 * PAGE,
        0,
        "never-allocated pages after a round trip",
    );
}

/// One call converts eight pages of which some were written by the guest, some allocated by
/// `fallocate` (where the block is a base page) and some never touched; each page keeps its
/// bytes (zero where never written), in both directions.
pub fn mixed_allocation(ctx: &Ctx<'_>) {
    if !require(ctx, Flags::MMAP) {
        return;
    }
    let size = ctx.size_for(8 * PAGE);
    let mem = ctx.create(size, Flags::MMAP);
    let view = map(&mem);
    let written = [0u64, 3, 6];
    for &p in &written {
        guest_fill(&mem, p * PAGE, PAGE, page_byte(p));
    }
    if ctx.block() == PAGE {
        mem.fallocate(FallocMode::KEEP_SIZE, 5 * PAGE, PAGE)
            .expect("allocate page 5");
    }
    convert(&mem, 0, 8 * PAGE, Attr::Shared);
    assert_eq!(
        mem.runs(0, 8 * PAGE).expect("runs").len(),
        1,
        "one shared run"
    );
    for p in 0..8 {
        let want = if written.contains(&p) {
            page_byte(p)
        } else {
            0
        };
        touch::expect_bytes(
            &view,
            p * PAGE,
            PAGE,
            want,
            &format!("page {p} after to-shared"),
        );
    }
    // The host allocates two more pages; then all eight go private in one call.
    touch::fill(&view, PAGE, PAGE, 0x71).expect("host writes page 1");
    touch::fill(&view, 4 * PAGE, PAGE, 0x74).expect("host writes page 4");
    convert(&mem, 0, 8 * PAGE, Attr::Private);
    touch::expect_fault(&view, 0, 8 * PAGE, "all eight pages private");
    for p in 0..8 {
        let want = match p {
            1 => 0x71,
            4 => 0x74,
            _ if written.contains(&p) => page_byte(p),
            _ => 0,
        };
        guest_expect(
            &mem,
            p * PAGE,
            PAGE,
            want,
            &format!("page {p} after to-private"),
        );
    }
}

/// Punch-hole never changes attributes: a punched private block stays private (host
/// `SIGBUS`) and reads zero to the guest; a punched shared block stays shared and reads zero
/// to the host; the runs are identical before and after.
pub fn punch_keeps_attributes(ctx: &Ctx<'_>) {
    if !require(ctx, SHARED) {
        return;
    }
    let b = ctx.block();
    let size = 4 * b;
    let mem = ctx.create(size, SHARED);
    let view = map(&mem);
    touch::fill(&view, 0, size, 0xaa).expect("fill");
    convert(&mem, b, 2 * b, Attr::Private);
    guest_fill(&mem, b, 2 * b, 0xbb);
    let runs = runs_of(&mem);
    assert_eq!(
        runs,
        vec![(0, b, false), (b, 2 * b, true), (3 * b, b, false)]
    );

    mem.fallocate(FallocMode::PUNCH_HOLE, b, b)
        .expect("punch a private block");
    assert_eq!(
        runs_of(&mem),
        runs,
        "punching a private block changed attributes"
    );
    touch::expect_fault(&view, b, b, "punched private block");
    guest_expect(&mem, b, b, 0, "punched private block reads zero");
    guest_expect(&mem, 2 * b, b, 0xbb, "unpunched private block");

    mem.fallocate(FallocMode::PUNCH_HOLE, 0, b)
        .expect("punch a shared block");
    assert_eq!(
        runs_of(&mem),
        runs,
        "punching a shared block changed attributes"
    );
    touch::expect_bytes(&view, 0, b, 0, "punched shared block");
    touch::expect_bytes(&view, 3 * b, b, 0xaa, "unpunched shared block");

    mem.fallocate(FallocMode::PUNCH_HOLE, 0, size)
        .expect("punch everything");
    assert_eq!(
        runs_of(&mem),
        runs,
        "punching the whole file changed attributes"
    );
    touch::expect_fault(&view, b, 2 * b, "private blocks after punching everything");
    guest_expect(&mem, 0, size, 0, "everything reads zero");

    // Writing after a punch allocates again, still private; conversion shows it.
    guest_fill(&mem, b, PAGE, 0xcd);
    convert(&mem, b, 2 * b, Attr::Shared);
    touch::expect_bytes(&view, b, PAGE, 0xcd, "rewritten page after to-shared");
    touch::expect_bytes(
        &view,
        b + PAGE,
        2 * b - PAGE,
        0,
        "punched pages after to-shared",
    );
}

/// The child's answer to `probe`: for each of the first four pages, through the view mapped
/// at start-up, through a view mapped now, and through `read_at`: `ok:XX`, `bus` or
/// `err:ERRNO`.
fn probe_report(mem: &GuestMemfd, old: &HostView) -> String {
    let fresh = map(mem);
    let mut out = Vec::new();
    for view in [old, &fresh] {
        for p in 0..4 {
            out.push(match touch::read_byte(view, p * PAGE) {
                Ok(b) => format!("ok:{b:02x}"),
                Err(f) if f.is_access_error() => "bus".to_string(),
                Err(f) => format!("bus:{}", f.code),
            });
        }
    }
    for p in 0..4 {
        let mut b = [0u8];
        out.push(match mem.read_at(p * PAGE, &mut b) {
            Ok(()) => format!("ok:{:02x}", b[0]),
            Err(e) => format!("err:{}", e.errno()),
        });
    }
    out.join(" ")
}

fn other_process_child(side: ChildSide) {
    assert_eq!(side.role, "revoke", "unknown child role");
    let mut ctl = side.ctl;
    let mem = GuestMemfd::attach(side.peer).expect("attach to the parent's file");
    let view = map(&mem);
    ctl.send(&format!("mapped {}", probe_report(&mem, &view)));
    loop {
        match ctl.recv().as_str() {
            "probe" => ctl.send(&format!("probed {}", probe_report(&mem, &view))),
            "exit" => return,
            other => panic!("unknown command {other:?}"),
        }
    }
}

/// A second, real process that mapped and touched a page gets `SIGBUS` there once the page
/// is converted to private (in a view it had before and in a new one), its checked accessor
/// refuses it, and it sees the guest's new bytes once the page is shared again.
pub fn other_process(ctx: &Ctx<'_>) {
    if let Some(side) = crate::child::child_side() {
        return other_process_child(side);
    }
    if !require(ctx, SHARED) {
        return;
    }
    let size = ctx.size_for(4 * PAGE);
    let mem = ctx.create(size, SHARED);
    for (p, v) in [(0, 0x11), (1, 0x22), (2, 0x33)] {
        mem.write_at(p * PAGE, &[v; super::PAGE_BYTES])
            .expect("write");
    }
    let sock = mem.share_with_process().expect("share with a process");
    let mut child = ChildProcess::spawn(ctx.test_name(), "revoke", sock);
    let both = |s: &str| format!("{s} {s}");
    let shared_all = "ok:11 ok:22 ok:33 ok:00";
    assert_eq!(
        child.recv(),
        format!("mapped {} {shared_all}", both(shared_all)),
        "the child sees the shared pages"
    );

    convert(&mem, PAGE, PAGE, Attr::Private);
    guest_fill(&mem, PAGE, PAGE, 0x44);
    child.send("probe");
    let private_1 = "ok:11 bus ok:33 ok:00";
    assert_eq!(
        child.recv(),
        format!(
            "probed {} ok:11 err:{} ok:33 ok:00",
            both(private_1),
            libc::EFAULT
        ),
        "the child must fault on the page converted to private"
    );

    convert(&mem, PAGE, PAGE, Attr::Shared);
    child.send("probe");
    let shared_new = "ok:11 ok:44 ok:33 ok:00";
    assert_eq!(
        child.recv(),
        format!("probed {} {shared_new}", both(shared_new)),
        "the child sees the guest's bytes once the page is shared again"
    );

    // The whole file private, then shared again.
    convert(&mem, 0, size, Attr::Private);
    child.send("probe");
    let e = libc::EFAULT;
    assert_eq!(
        child.recv(),
        format!("probed bus bus bus bus bus bus bus bus err:{e} err:{e} err:{e} err:{e}")
    );
    convert(&mem, 0, size, Attr::Shared);
    child.send("exit");
    child.finish();

    // The child is gone: conversions go on without it.
    convert(&mem, PAGE, PAGE, Attr::Private);
    let view = map(&mem);
    touch::expect_fault(&view, PAGE, PAGE, "after the child exited");
    touch::expect_bytes(&view, 0, PAGE, 0x11, "page 0 after the child exited");
}

/// A pinned page blocks conversion to private: the bulk call fails with `EAGAIN` naming that
/// page and converts nothing (host views were revoked first and fault back in), the other
/// pages convert one by one (HugeTLB: refused, the pin holds off the split of their huge
/// page), the pinned one alone fails the same way; once unpinned the bulk
/// call succeeds and every byte is intact. Mapped and touched pages alone never block.
pub fn pinned_page(ctx: &Ctx<'_>) {
    if !require(ctx, SHARED) {
        return;
    }
    let size = ctx.size_for(4 * PAGE);
    let mem = ctx.create(size, SHARED);
    let view = map(&mem);
    for p in 0..4 {
        touch::fill(&view, p * PAGE, PAGE, page_byte(p)).expect("fill");
    }
    let before = runs_of(&mem);
    let pin = mem.pin(2 * PAGE + 10, 20).expect("pin inside page 2");
    pinned_bulk_refused(&mem, &view, &before);
    others_convert_around_the_pin(&mem, &view, &pin);
    drop(pin);
    bulk_after_unpin(&mem, &view);
    spanning_pin_names_its_first_page(&mem);
}

/// Converting `[off, off + len)` to private fails with `EAGAIN` naming the pinned page at
/// `busy`.
#[track_caller]
fn expect_busy(mem: &GuestMemfd, off: u64, len: u64, busy: u64, what: &str) {
    let e = mem.convert(off, len, Attr::Private).expect_err(what);
    assert_eq!((e.errno(), e.error_offset()), (libc::EAGAIN, Some(busy)));
}

/// With page 2 pinned, the bulk call is refused and changes neither attributes nor bytes
/// (the host views it revoked fault back in); so is any range holding the pin.
fn pinned_bulk_refused(mem: &GuestMemfd, view: &HostView, before: &[(u64, u64, bool)]) {
    expect_busy(mem, 0, 4 * PAGE, 2 * PAGE, "bulk over a pin");
    assert_eq!(
        runs_of(mem),
        before,
        "a refused conversion changed attributes"
    );
    for p in 0..4 {
        touch::expect_bytes(
            view,
            p * PAGE,
            PAGE,
            page_byte(p),
            "after the refused bulk call",
        );
    }
    expect_busy(mem, PAGE, 3 * PAGE, 2 * PAGE, "a range holding the pin");
}

/// True when a pinned page holds off the conversions of its neighbours: on HugeTLB the four
/// pages share one whole huge page, which a conversion of one of them must split, and a pin
/// holds off a split (its kernel references would keep the huge page; the documented
/// exception, `gmem probe`).
fn pin_holds_its_huge_page(mem: &GuestMemfd) -> bool {
    matches!(mem.backing_kind(), gmem::BackingKind::HugeTlb(_))
}

/// With page 2 pinned, the other pages convert one by one (on HugeTLB they are refused,
/// naming page 2, and stay shared); page 2 alone is refused, stays shared with its bytes, and
/// the pin still reads them.
fn others_convert_around_the_pin(mem: &GuestMemfd, view: &HostView, pin: &Pin) {
    for p in [0, 1, 3] {
        if pin_holds_its_huge_page(mem) {
            expect_busy(mem, p * PAGE, PAGE, 2 * PAGE, "a split under the pin");
            touch::expect_bytes(view, p * PAGE, PAGE, page_byte(p), "still shared");
            continue;
        }
        convert(mem, p * PAGE, PAGE, Attr::Private);
        touch::expect_fault(view, p * PAGE, PAGE, "page converted one by one");
    }
    expect_busy(mem, 2 * PAGE, PAGE, 2 * PAGE, "the pinned page alone");
    assert_eq!(mem.attr(2 * PAGE).expect("attr"), Attr::Shared);
    touch::expect_bytes(view, 2 * PAGE, PAGE, page_byte(2), "pinned page");
    let mut b = [0u8; 20];
    pin.read(0, &mut b).expect("read through the pin");
    assert_eq!(b, [page_byte(2); 20]);
}

/// Once unpinned, the bulk call succeeds and every byte is intact: the guest sees them while
/// private, the host once shared again.
fn bulk_after_unpin(mem: &GuestMemfd, view: &HostView) {
    convert(mem, 0, 4 * PAGE, Attr::Private);
    touch::expect_fault(view, 0, 4 * PAGE, "all private after the unpin");
    for p in 0..4 {
        guest_expect(
            mem,
            p * PAGE,
            PAGE,
            page_byte(p),
            "contents after the bulk call",
        );
    }
    convert(mem, 0, 4 * PAGE, Attr::Shared);
    for p in 0..4 {
        touch::expect_bytes(
            view,
            p * PAGE,
            PAGE,
            page_byte(p),
            "contents back in the host",
        );
    }
}

/// A pin spanning pages 1..=2 names its first page; once it is gone the bulk call succeeds,
/// and a private page cannot be pinned (`EFAULT`).
fn spanning_pin_names_its_first_page(mem: &GuestMemfd) {
    let pin = mem.pin(PAGE + 100, PAGE).expect("pin across pages 1 and 2");
    expect_busy(mem, 0, 4 * PAGE, PAGE, "bulk over a spanning pin");
    if pin_holds_its_huge_page(mem) {
        expect_busy(mem, 3 * PAGE, PAGE, PAGE, "a split under the spanning pin");
    } else {
        convert(mem, 3 * PAGE, PAGE, Attr::Private);
    }
    drop(pin);
    convert(mem, 0, 4 * PAGE, Attr::Private);
    expect_errno(mem.pin(0, 1), libc::EFAULT, "pinning a private page");
}
