//! `mremap`, `munmap` and `MAP_FIXED` on a view: never an unenforced alias.
//!
//! Views of shmem and HugeTLB files are tracked (userfaultfd `REMAP`/`UNMAP` events): a moved
//! or grown view, the target of `MREMAP_DONTUNMAP`, and what remains of a view partly unmapped
//! are replaced by mappings that hold nothing (every touch `SIGBUS`), and a view that is no
//! longer whole at its address is given up (gmem never touches that address again, not even
//! when the view is dropped). Views of a kernel guest_memfd are sealed: all of these fail with
//! `EPERM` and the view stays as it was. A HugeTLB view whose huge pages differ (a split one,
//! a private one) is several mappings, which `mremap` refuses as a whole (`EFAULT`); each
//! case then runs on views of one huge page each as well.

use gmem::{Attr, HostView};

use super::{errno, Layout, SHARED};
use crate::probe;
use crate::Ctx;

const PAGE: usize = 4096;

/// An anonymous mapping of `len` bytes: a target to move a view onto, or what a moved view
/// left behind, owned by the test.
struct Anon {
    ptr: *mut u8,
    len: usize,
}

impl Anon {
    /// Maps fresh anonymous memory.
    fn new(len: usize) -> Anon {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a fresh anonymous mapping where the kernel chooses.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, rw, flags, -1, 0) };
        assert_ne!(p, libc::MAP_FAILED, "anonymous mmap: errno {}", errno());
        Anon { ptr: p.cast(), len }
    }

    /// Takes ownership of a mapping gmem no longer owns.
    fn adopt(ptr: *mut u8, len: usize) -> Anon {
        Anon { ptr, len }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: this value owns the mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Asserts that every page of `[ptr, ptr + len)` faults on read, with `signo`.
#[track_caller]
fn all_fault(ptr: *mut u8, len: usize, signo: i32, what: &str) {
    for off in (0..len).step_by(PAGE) {
        // SAFETY: the probe reads one byte and reports a fault instead of dying.
        let t = unsafe { probe::read(ptr.wrapping_add(off)) };
        assert_eq!(t.signal(), Some(signo), "{what}: page {off:#x}: {t:?}");
    }
}

/// The device and inode of the layout's file.
fn inode(l: &Layout) -> u64 {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed `stat` is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat of a live descriptor into a live struct.
    let rc = unsafe { libc::fstat(std::os::fd::AsFd::as_fd(&l.mem).as_raw_fd(), &mut st) };
    assert_eq!(rc, 0, "fstat: errno {}", errno());
    st.st_ino
}

/// The lines of `/proc/self/maps` overlapping `[lo, hi)`.
fn maps_in(lo: usize, hi: usize) -> Vec<String> {
    std::fs::read_to_string("/proc/self/maps")
        .expect("read /proc/self/maps")
        .lines()
        .filter(|line| {
            let range = line.split_whitespace().next().unwrap_or("0-0");
            let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
            let a = usize::from_str_radix(a, 16).unwrap_or(0);
            let b = usize::from_str_radix(b, 16).unwrap_or(0);
            a < hi && b > lo
        })
        .map(str::to_string)
        .collect()
}

/// The views a case runs on: the whole file's, then on HugeTLB one view per huge page.
fn views(l: &Layout) -> Vec<HostView> {
    let block = l.mem.stat().map_or(4096, |(_, b)| b);
    let mut v = vec![l.mem.map(0, l.size()).expect("map the file")];
    if block > 4096 {
        for b in (0..l.size()).step_by(usize::try_from(block).expect("fits")) {
            v.push(l.mem.map(b, block).expect("map one huge page"));
        }
    }
    v
}

/// The file still works after views went away: conversions both ways, the accessors, and a
/// fresh view that shows the layout.
#[track_caller]
fn file_still_works(l: &Layout, what: &str) {
    l.mem
        .convert(2 * 4096, 4096, Attr::Private)
        .unwrap_or_else(|e| panic!("{what}: convert after: {e}"));
    l.mem
        .convert(2 * 4096, 4096, Attr::Shared)
        .unwrap_or_else(|e| panic!("{what}: convert back: {e}"));
    let mut b = [0u8; 4];
    l.mem.read_at(0, &mut b).expect("read_at a shared page");
    assert_eq!(b, [SHARED; 4], "{what}: read_at");
    let fresh = l.mem.map(0, l.size()).expect("a fresh view");
    l.check(&fresh, Some(SHARED), &format!("{what}: fresh view"));
    l.check(
        &l.view,
        Some(SHARED),
        &format!("{what}: the layout's own view"),
    );
}

/// What `mremap` answered: the new address, or the errno after checking that a refusal left
/// the view as it was. `EPERM` for a sealed view, `EFAULT` for a view that is several
/// mappings; anything else fails the test.
#[track_caller]
fn remapped(l: &Layout, view: &HostView, ret: *mut libc::c_void, what: &str) -> Option<*mut u8> {
    if ret != libc::MAP_FAILED {
        return Some(ret.cast());
    }
    let e = errno();
    let lo = view.as_ptr() as usize;
    let pieces = maps_in(lo, lo + view.len()).len();
    let want = if l.sealed() {
        libc::EPERM
    } else if pieces > 1 {
        libc::EFAULT
    } else {
        panic!("{what}: refused with errno {e} for a view of one mapping")
    };
    assert_eq!(e, want, "{what}: a refused mremap ({pieces} mappings)");
    l.check(
        view,
        Some(SHARED),
        &format!("{what}: a view after a refused mremap"),
    );
    None
}

/// `mremap` to another address: the moved pages hold nothing there, nothing maps the file at
/// the old address, dropping the view leaves whatever maps that address now alone.
pub fn moved_view_leaves_no_alias(ctx: &Ctx<'_>) {
    let Some(l) = Layout::new(ctx) else { return };
    let ino = inode(&l).to_string();
    for view in views(&l) {
        let len = view.len();
        let target = Anon::new(len);
        let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
        // SAFETY: moves the view's own range onto `target`, a mapping this test owns.
        let ret = unsafe {
            libc::mremap(
                view.as_ptr().cast(),
                len,
                len,
                flags,
                target.ptr.cast::<libc::c_void>(),
            )
        };
        let Some(moved) = remapped(&l, &view, ret, "move") else {
            continue;
        };
        assert_eq!(moved, target.ptr);
        std::mem::forget(target);
        let moved = Anon::adopt(moved, len);
        all_fault(moved.ptr, len, libc::SIGBUS, "the moved view");
        let old = view.as_ptr() as usize;
        let of_file = maps_in(old, old + len)
            .into_iter()
            .filter(|m| m.split_whitespace().nth(4) == Some(ino.as_str()))
            .count();
        assert_eq!(of_file, 0, "the old address maps the file");
        let before = maps_in(old, old + len);
        drop(view);
        assert_eq!(
            maps_in(old, old + len),
            before,
            "dropping a given-up view unmapped something"
        );
        file_still_works(&l, "after a move");
        all_fault(
            moved.ptr,
            len,
            libc::SIGBUS,
            "the moved view after conversions",
        );
    }
}

/// Growing a view: refused in place (`ENOMEM`: a fence page follows every view); with
/// `MREMAP_MAYMOVE` the grown view holds nothing at its new address.
pub fn grown_view_leaves_no_alias(ctx: &Ctx<'_>) {
    let Some(l) = Layout::new(ctx) else { return };
    for view in views(&l) {
        let len = view.len();
        // SAFETY: asks to grow the view's own range in place.
        let ret = unsafe { libc::mremap(view.as_ptr().cast(), len, 2 * len, 0) };
        if ret != libc::MAP_FAILED || errno() != libc::ENOMEM {
            assert_eq!(
                remapped(&l, &view, ret, "grow in place"),
                None,
                "grew in place"
            );
        }
        l.check(&view, Some(SHARED), "after a refused growth in place");
        // SAFETY: grows the view's own range, letting the kernel move it.
        let ret = unsafe { libc::mremap(view.as_ptr().cast(), len, 2 * len, libc::MREMAP_MAYMOVE) };
        let Some(grown) = remapped(&l, &view, ret, "grow") else {
            continue;
        };
        let grown = Anon::adopt(grown, 2 * len);
        all_fault(grown.ptr, 2 * len, libc::SIGBUS, "the grown view");
        drop(view);
        file_still_works(&l, "after a growth");
    }
}

/// `MREMAP_DONTUNMAP`: the target holds nothing, the view stays where it was, enforced, with
/// its markers back.
pub fn dontunmap_keeps_the_view_enforced(ctx: &Ctx<'_>) {
    let Some(l) = Layout::new(ctx) else { return };
    for view in views(&l) {
        let len = view.len();
        let target = Anon::new(len);
        let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP;
        // SAFETY: moves the view's page tables onto `target`, a mapping this test owns.
        let ret = unsafe {
            libc::mremap(
                view.as_ptr().cast(),
                len,
                len,
                flags,
                target.ptr.cast::<libc::c_void>(),
            )
        };
        let Some(moved) = remapped(&l, &view, ret, "DONTUNMAP") else {
            continue;
        };
        assert_eq!(moved, target.ptr);
        all_fault(target.ptr, len, libc::SIGBUS, "the DONTUNMAP target");
        l.check(&view, Some(SHARED), "the view after DONTUNMAP");
        file_still_works(&l, "after DONTUNMAP");
        l.check(
            &view,
            Some(SHARED),
            "the view after DONTUNMAP and conversions",
        );
        all_fault(
            target.ptr,
            len,
            libc::SIGBUS,
            "the DONTUNMAP target after conversions",
        );
    }
    l.restore_and_check(Some(SHARED), "back to shared after DONTUNMAP");
}

/// Unmapping the first page of a view (`munmap`, or `MAP_FIXED` of something else over it):
/// the rest of the view holds nothing from then on (those mappings are the caller's now), and
/// dropping the view leaves every mapping there alone.
pub fn partly_unmapped_view_is_given_up(ctx: &Ctx<'_>) {
    let Some(l) = Layout::new(ctx) else { return };
    for map_fixed in [false, true] {
        for view in views(&l) {
            let len = view.len();
            let base = view.as_ptr();
            let rc = if map_fixed {
                let rw = libc::PROT_READ | libc::PROT_WRITE;
                let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
                // SAFETY: replaces the view's first page with anonymous memory.
                let p = unsafe { libc::mmap(base.cast(), PAGE, rw, flags, -1, 0) };
                if p == libc::MAP_FAILED {
                    -1
                } else {
                    0
                }
            } else {
                // SAFETY: unmaps the view's first page.
                unsafe { libc::munmap(base.cast(), PAGE) }
            };
            let what = if map_fixed {
                "MAP_FIXED over"
            } else {
                "munmap of"
            };
            if l.sealed() {
                assert_eq!((rc, errno()), (-1, libc::EPERM), "{what} a sealed view");
                l.check(
                    &view,
                    Some(SHARED),
                    &format!("sealed view after a refused {what}"),
                );
                continue;
            }
            assert_eq!(rc, 0, "{what} part of a view: errno {}", errno());
            all_fault(base.wrapping_add(PAGE), len - PAGE, libc::SIGBUS, what);
            let lo = base as usize;
            let before = maps_in(lo, lo + len);
            drop(view);
            assert_eq!(
                maps_in(lo, lo + len),
                before,
                "{what}: the drop unmapped something"
            );
            all_fault(base.wrapping_add(PAGE), len - PAGE, libc::SIGBUS, what);
            // What is left there is the caller's now: the anonymous page (MAP_FIXED) or the
            // hole (munmap), and the neutralised rest.
            drop(Anon::adopt(base, len));
            file_still_works(&l, what);
        }
    }
}
