//! Pointers and capabilities handed to host code: a pin's pointer, the guest mapping's
//! address, a follower, a forked child; and the debugger paths into the process's memory.

use std::os::fd::AsRawFd;

use gmem::{Attr, Errno, GuestMemfd};

use super::{errno, sink, sink_bytes, Layout, SECRET, SHARED};
use crate::child::{child_side, ChildProcess, ChildSide};
use crate::probe::{self, Touch};
use crate::Ctx;

const PAGE: u64 = 4096;
const PAGE_BYTES: usize = 4096;

/// A pin's pointer reaches exactly the pinned shared page: `write(2)` of one page too many
/// stops at the private neighbour (the kernel copies the pinned page, then `EFAULT`), and the
/// pointer kept after unpinning faults once the page is private, with the signal
/// [`GuestMemfd::host_fault`] names.
pub fn pin_pointer_is_enforced(ctx: &Ctx<'_>) {
    let Some(l) = Layout::new(ctx) else { return };
    let pin = l.mem.pin(0, PAGE).expect("pin page 0");
    let ptr = pin.as_ptr().expect("pointer of a pin");
    let out = sink();
    // SAFETY: writes from the pin's pointer; the kernel checks every byte it copies.
    let n = unsafe { libc::write(out.as_raw_fd(), ptr.cast(), 2 * PAGE_BYTES) };
    assert_eq!(
        n,
        4096,
        "write(2) stops at the private page: errno {}",
        errno()
    );
    // SAFETY: as above, starting at the private page.
    let n = unsafe { libc::write(out.as_raw_fd(), ptr.wrapping_add(PAGE_BYTES).cast(), 8) };
    assert_eq!(
        (n, errno()),
        (-1, libc::EFAULT),
        "write(2) from the private page"
    );
    assert_eq!(
        sink_bytes(&out),
        vec![SHARED; PAGE_BYTES],
        "only the pinned page went out"
    );
    // SAFETY: the probe reports a fault instead of dying.
    let t = unsafe { probe::read(ptr) };
    assert_eq!(t, Touch::Ok(SHARED), "the pinned page");
    // SAFETY: as above.
    let t = unsafe { probe::read(ptr.wrapping_add(PAGE_BYTES)) };
    assert!(
        t.is_fault(),
        "the private neighbour through the pin's pointer: {t:?}"
    );
    drop(pin);
    l.mem
        .convert(0, PAGE, Attr::Private)
        .expect("unpinned page to private");
    super::guest_fill(&l.mem, 0, PAGE, SECRET);
    let want = l.mem.host_fault(0).expect("a private page is blocked");
    // SAFETY: as above: a stale pointer.
    let t = unsafe { probe::read(ptr) };
    assert_eq!(t.signal(), Some(want.signo()), "a stale pin pointer: {t:?}");
    l.mem
        .convert(0, PAGE, Attr::Shared)
        .expect("back to shared");
    // SAFETY: as above.
    let t = unsafe { probe::read(ptr) };
    assert_eq!(t, Touch::Ok(SECRET), "shared again, in place");
}

fn follower_child(side: ChildSide) {
    let mut ctl = side.ctl;
    let mem = match side.role.as_str() {
        "plain" => GuestMemfd::attach(side.peer).expect("attach"),
        _ => GuestMemfd::attach_with_guest_view(side.peer).expect("attach with the guest view"),
    };
    let guest = match mem.guest() {
        Ok(g) => {
            let mut b = [0u8; 4];
            g.read(PAGE, &mut b).expect("guest read");
            format!("guest:{:02x}", b[0])
        }
        Err(e) => format!("guest-err:{}", e.errno()),
    };
    let pin = mem.pin(0, PAGE).expect("pin a shared page");
    let ptr = pin.as_ptr().expect("pointer of a follower's pin");
    // SAFETY: the probe reports a fault instead of dying.
    let next = unsafe { probe::read(ptr.wrapping_add(PAGE_BYTES)) };
    let convert = mem.convert(0, PAGE, Attr::Private).map_err(|e| e.errno());
    ctl.send(&format!(
        "{guest} follower:{} next-faults:{} convert:{convert:?}",
        mem.is_follower(),
        next.is_fault()
    ));
    assert_eq!(ctl.recv(), "exit");
}

/// A follower is host code: `guest()` is `EPERM`, its pins point into enforced memory, it
/// cannot convert (`EPERM`). A follower attached with `attach_with_guest_view` (a software
/// hypervisor's vCPU process) gets the guest view and reads private bytes through it.
pub fn follower_has_no_guest_view(ctx: &Ctx<'_>) {
    if let Some(side) = child_side() {
        return follower_child(side);
    }
    let Some(l) = Layout::new(ctx) else { return };
    for (role, want) in [
        ("plain", format!("guest-err:{}", libc::EPERM)),
        ("guest", format!("guest:{SECRET:02x}")),
    ] {
        let sock = l.mem.share_with_process().expect("share");
        let mut child = ChildProcess::spawn(ctx.test_name(), role, sock);
        assert_eq!(
            child.recv(),
            format!(
                "{want} follower:true next-faults:true convert:Err({})",
                libc::EPERM
            ),
            "{role} follower"
        );
        child.send("exit");
        child.finish();
    }
    l.check(&l.view, Some(SHARED), "after the followers");
}

/// What a forked child sees, as one line: its gmem calls' errnos and whether the parent's
/// view is mapped in it.
fn in_forked_child(l: &Layout) -> String {
    let e = |r: Result<(), i32>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => e.to_string(),
    };
    let read = l.mem.read_at(0, &mut [0u8; 8]).map_err(|e| e.errno());
    let write = l.mem.write_at(0, &[0u8; 8]).map_err(|e| e.errno());
    let map = l.mem.map(0, PAGE).map(drop).map_err(|e| e.errno());
    let pin = l.mem.pin(0, PAGE).map(drop).map_err(|e| e.errno());
    let guest = l.mem.guest().map(drop).map_err(|e| e.errno());
    let convert = l.mem.convert(0, PAGE, Attr::Private).map_err(|e| e.errno());
    let view = l.view.as_ptr() as u64;
    let mapped = std::fs::read_to_string("/proc/self/maps")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            line.split_whitespace()
                .next()?
                .split_once('-')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .any(|(a, b)| {
            let (a, b) = (
                u64::from_str_radix(&a, 16).unwrap_or(0),
                u64::from_str_radix(&b, 16).unwrap_or(0),
            );
            a <= view && view < b
        });
    format!(
        "read:{} write:{} map:{} pin:{} guest:{} convert:{} view-mapped:{mapped}",
        e(read),
        e(write),
        e(map),
        e(pin),
        e(guest),
        e(convert)
    )
}

/// A forked child gets `EPERM` from every gmem call and has no copy of the parent's views
/// (they are `MADV_DONTFORK`, re-applied before every `fork` even if the VMM set
/// `MADV_DOFORK`); the parent's views and conversions are untouched by it.
pub fn forked_child_gets_clean_errors(ctx: &Ctx<'_>) {
    let Some(l) = Layout::new(ctx) else { return };
    for dofork in [false, true] {
        if dofork {
            // SAFETY: the range is the view's own.
            let rc =
                unsafe { libc::madvise(super::addr(&l.view), l.view.len(), libc::MADV_DOFORK) };
            assert_eq!(rc, 0, "MADV_DOFORK: errno {}", errno());
        }
        let (rd, wr) = {
            let mut fds = [0; 2];
            // SAFETY: `fds` has room for two descriptors.
            assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            (fds[0], fds[1])
        };
        // SAFETY: the child only calls gmem, reads /proc, writes one line and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: errno {}", errno());
        if pid == 0 {
            let line = in_forked_child(&l);
            // SAFETY: writes a live buffer to the pipe, then leaves without unwinding.
            unsafe {
                libc::write(wr, line.as_ptr().cast(), line.len());
            }
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: closes the parent's copy of the write end.
        unsafe { libc::close(wr) };
        let mut out = String::new();
        // SAFETY: `rd` is the pipe's read end, owned here from now on.
        let mut f = std::fs::File::from(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(rd)
        });
        std::io::Read::read_to_string(&mut f, &mut out).expect("read the child's line");
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child status {status:#x}"
        );
        let p = libc::EPERM;
        assert_eq!(
            out,
            format!("read:{p} write:{p} map:{p} pin:{p} guest:{p} convert:{p} view-mapped:false"),
            "the forked child (MADV_DOFORK first: {dofork})"
        );
        l.check(&l.view, Some(SHARED), "the parent after its child");
    }
    l.restore_and_check(Some(SHARED), "the parent converts after its children");
}

/// What `/proc/self/mem` reads at `addr` (8 bytes): the bytes, or the errno.
fn proc_mem_read(addr: *const u8) -> Result<Vec<u8>, i32> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open("/proc/self/mem").expect("open /proc/self/mem");
    let mut b = vec![0u8; 8];
    match mem.read_at(&mut b, addr as u64) {
        Ok(8) => Ok(b),
        Ok(n) => Err(-i32::try_from(n).unwrap_or(i32::MAX)),
        Err(e) => Err(e.raw_os_error().unwrap_or(0)),
    }
}

/// What `process_vm_readv` of this process reads at `addr` (8 bytes): the bytes, or the errno.
fn vm_readv(addr: *const u8) -> Result<Vec<u8>, i32> {
    let mut b = vec![0u8; 8];
    let local = libc::iovec {
        iov_base: b.as_mut_ptr().cast(),
        iov_len: b.len(),
    };
    let remote = libc::iovec {
        iov_base: addr.cast_mut().cast(),
        iov_len: 8,
    };
    let pid = libc::pid_t::try_from(std::process::id()).expect("pid");
    // SAFETY: the local iovec covers `b`; the kernel checks the remote one.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    match n {
        8 => Ok(b),
        -1 => Err(errno()),
        n => Err(-i32::try_from(n).unwrap_or(i32::MAX)),
    }
}

/// The debugger paths (`/proc/<pid>/mem`, which `ptrace` peeks and core dumps share and
/// which reads through `PROT_NONE`, and `process_vm_readv`) read shared pages of a view and
/// never a private one: `EIO` and `EFAULT`.
pub fn debugger_paths_never_read_private_pages(ctx: &Ctx<'_>) {
    let Some(l) = Layout::new(ctx) else { return };
    for p in l.sample() {
        let addr = l
            .view
            .as_ptr()
            .wrapping_add(usize::try_from(p).expect("fits"))
            .cast_const();
        let (by_proc, by_readv) = (proc_mem_read(addr), vm_readv(addr));
        if l.is_private(p) {
            assert_eq!(
                by_proc,
                Err(libc::EIO),
                "/proc/self/mem, private page {p:#x}"
            );
            assert_eq!(
                by_readv,
                Err(libc::EFAULT),
                "process_vm_readv, private page {p:#x}"
            );
        } else {
            assert_eq!(
                by_proc,
                Ok(vec![SHARED; 8]),
                "/proc/self/mem, shared page {p:#x}"
            );
            assert_eq!(
                by_readv,
                Ok(vec![SHARED; 8]),
                "process_vm_readv, shared page {p:#x}"
            );
        }
    }
}

/// Pages one run of [`guest_pointer_racing_moves_never_opens_a_view`] converts.
const RACED_PAGES: u64 = 256;

/// The user of the guest mapping's address (an hva memslot, a software vCPU) faulting the
/// very page a conversion to private moves, at any moment of the move, never opens a view.
/// The kernel's truncation drops the views' markers of a page something maps at its punch;
/// gmem puts them back before the conversion returns. Every page a view showed is converted
/// on its own while a thread reads that page through the guest mapping in a loop; each then
/// faults through the view with its documented signal, keeps its bytes for the guest, and
/// reads what the guest wrote once it is shared again.
pub fn guest_pointer_racing_moves_never_opens_a_view(ctx: &Ctx<'_>) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let flags = gmem::Flags::MMAP | gmem::Flags::INIT_SHARED;
    if !crate::cases::require(ctx, flags) {
        return;
    }
    let len = RACED_PAGES * PAGE;
    let size = ctx.block().max(len);
    let mem = ctx.create(size, flags);
    let view = mem.map(0, size).expect("map the file");
    crate::touch::fill(&view, 0, len, SHARED).expect("the view shows every page");
    let base = mem.guest().expect("guest view").as_ptr() as usize;
    let target = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let reading = AtomicBool::new(false);
    let reads = std::thread::scope(|s| {
        let racer = s.spawn(|| {
            let mut reads = 0u64;
            while !done.load(Ordering::Acquire) {
                let p = target.load(Ordering::Acquire);
                let at = base + usize::try_from(p * PAGE + reads % 64).expect("fits");
                // SAFETY: `at` lies inside the guest mapping, which lives until the scope
                // ends (`mem` outlives it); the guest mapping reads every page, private or
                // shared, and never faults on an in-file address.
                let b = unsafe { std::ptr::read_volatile(at as *const u8) };
                std::hint::black_box(b);
                reads += 1;
                reading.store(true, Ordering::Release);
            }
            reads
        });
        let stop = crate::stop::StopOnDrop(&done);
        // The conversions start once the racer reads: on a loaded machine it may not be
        // scheduled before all of them are over, and then nothing raced.
        while !reading.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        for p in 0..RACED_PAGES {
            target.store(p, Ordering::Release);
            mem.convert(p * PAGE, PAGE, Attr::Private)
                .unwrap_or_else(|e| panic!("page {p} to private: {e}"));
            crate::touch::expect_fault(
                &view,
                p * PAGE,
                PAGE,
                &format!("page {p}, moved while the guest mapping read it"),
            );
        }
        drop(stop);
        racer.join().expect("the racing reader")
    });
    assert!(reads > 0, "the racing reader never read");
    crate::cases::guest_expect(
        &mem,
        0,
        len,
        SHARED,
        "the moved pages' bytes, for the guest",
    );
    crate::cases::guest_fill(&mem, 0, len, SECRET);
    crate::touch::expect_fault(&view, 0, len, "every moved page, after the guest wrote");
    mem.convert(0, len, Attr::Shared).expect("back to shared");
    crate::touch::expect_bytes(&view, 0, len, SECRET, "shared again, in place");
}
