//! What happens to memory shared between processes when one side dies (see `gmem::peer`).

use std::os::fd::{FromRawFd, OwnedFd};

use gmem::Errno;
use gmem::{Attr, Flags, GuestMemfd};
use gmem_conformance::child::{child_side, ChildProcess};
use gmem_conformance::kref;
use gmem_conformance::probe::{read, Touch};

const P: u64 = 4096;

/// Takes descriptor `fd` out of process `pid` (`pidfd_getfd`).
fn grab_fd(pid: u32, fd: i32) -> OwnedFd {
    let pid = libc::pid_t::try_from(pid).expect("pid");
    // SAFETY: plain syscall with integer arguments.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: plain syscall with integer arguments.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) };
    assert!(got >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
    // SAFETY: pidfd_open returned a fresh descriptor that nothing else owns.
    drop(unsafe { OwnedFd::from_raw_fd(i32::try_from(pidfd).expect("fd")) });
    // SAFETY: pidfd_getfd returned a fresh descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(i32::try_from(got).expect("fd")) }
}

fn dummy_peer() -> OwnedFd {
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    drop(a);
    OwnedFd::from(b)
}

/// A follower that dies: the owner drops it and keeps converting; the memory is intact.
#[test]
fn peer_follower_killed_owner_continues() {
    if let Some(mut side) = child_side() {
        let mem = GuestMemfd::attach(side.peer).expect("attach");
        let _view = mem.map(0, mem.size()).expect("map");
        side.ctl.send("mapped");
        // Die without any cleanup while holding the view.
        let me = libc::pid_t::try_from(std::process::id()).expect("pid");
        // SAFETY: plain syscall on this process.
        unsafe { libc::kill(me, libc::SIGKILL) };
        return;
    }
    let mem = GuestMemfd::create(16 * P, Flags::MMAP | Flags::INIT_SHARED).expect("create");
    mem.write_at(P, b"kept").expect("write");
    let mut child = ChildProcess::spawn(
        "peer_follower_killed_owner_continues",
        "follower",
        mem.share_with_process().expect("share"),
    );
    assert_eq!(child.recv(), "mapped");
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| child.finish()));
    assert!(out.is_err(), "the follower was expected to die of SIGKILL");
    mem.convert(0, 4 * P, Attr::Private)
        .expect("convert with a dead follower");
    mem.convert(0, 4 * P, Attr::Shared).expect("convert back");
    let mut buf = [0u8; 4];
    mem.read_at(P, &mut buf).expect("read");
    assert_eq!(&buf, b"kept");
}

/// An owner that dies: the follower keeps the memory and the attributes it last received,
/// still enforced, and can no longer convert.
#[test]
fn peer_owner_killed_follower_keeps_memory() {
    if let Some(mut side) = child_side() {
        let mem = GuestMemfd::create(16 * P, Flags::MMAP | Flags::INIT_SHARED).expect("create");
        mem.guest()
            .expect("guest view")
            .write(P, b"private bytes")
            .expect("guest write");
        mem.write_at(2 * P, b"shared bytes").expect("write");
        let sock = mem.share_with_process().expect("share");
        use std::os::fd::AsRawFd;
        side.ctl
            .send(&format!("{} {}", std::process::id(), sock.as_raw_fd()));
        assert_eq!(side.ctl.recv(), "attached");
        mem.convert(P, P, Attr::Private)
            .expect("convert, served by the follower");
        side.ctl.send("converted");
        // Wait to be killed by the parent.
        let _ = side.ctl.try_recv();
        drop(side.peer);
        return;
    }
    let mut child = ChildProcess::spawn(
        "peer_owner_killed_follower_keeps_memory",
        "owner",
        dummy_peer(),
    );
    let line = child.recv();
    let (pid, fd) = line.split_once(' ').expect("pid and fd");
    let (pid, fd): (u32, i32) = (pid.parse().expect("pid"), fd.parse().expect("fd"));
    let mem = GuestMemfd::attach_with_guest_view(grab_fd(pid, fd)).expect("attach");
    let view = mem.map(0, mem.size()).expect("map");
    let page1 = view.as_ptr().wrapping_add(usize::try_from(P).expect("P"));
    // SAFETY: inside the view.
    assert_eq!(unsafe { read(page1) }, Touch::Ok(b'p'));
    child.send("attached");
    assert_eq!(child.recv(), "converted");
    // SAFETY: plain syscall.
    unsafe { libc::kill(libc::pid_t::try_from(pid).expect("pid"), libc::SIGKILL) };
    let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| child.finish()));
    assert!(died.is_err(), "the owner was expected to die of SIGKILL");
    // The owner is gone; the follower keeps its memory and the last attributes it received.
    // SAFETY: inside the view.
    assert!(unsafe { read(page1) }.is_fault());
    assert_eq!(
        mem.read_at(P, &mut [0u8; 4]).unwrap_err().errno(),
        libc::EFAULT
    );
    let mut buf = [0u8; 12];
    mem.read_at(2 * P, &mut buf).expect("shared page readable");
    assert_eq!(&buf, b"shared bytes");
    let mut secret = [0u8; 13];
    mem.guest()
        .expect("guest view of a guest-running follower")
        .read(P, &mut secret)
        .expect("guest read");
    assert_eq!(&secret, b"private bytes");
    let e = mem.convert(0, P, Attr::Private).unwrap_err();
    assert_eq!(e.errno(), libc::EPERM);
}

/// One page, as a buffer length.
const PAGE_BYTES: usize = 4096;

/// A follower's kernel reference (a page of its view vmspliced into a pipe) is invisible to
/// the owner, which has no view at all: the owner's conversion to private moves the page
/// anyway, so the follower's pipe yields the shared-time bytes, never the guest's private
/// ones.
#[test]
fn peer_follower_kernel_reference_never_sees_private_bytes() {
    if let Some(mut side) = child_side() {
        let mem = GuestMemfd::attach(side.peer).expect("attach");
        let view = mem.map(0, mem.size()).expect("map");
        let rd = kref::splice(view.as_ptr().wrapping_add(PAGE_BYTES), PAGE_BYTES);
        side.ctl.send("spliced");
        assert_eq!(side.ctl.recv(), "written");
        let got = kref::drain(&rd, PAGE_BYTES);
        let what = if got.iter().all(|&b| b == 0x11) {
            "shared-time bytes"
        } else if got.iter().all(|&b| b == 0x5a) {
            "private bytes"
        } else {
            "other bytes"
        };
        side.ctl.send(what);
        return;
    }
    let mem = GuestMemfd::create(16 * P, Flags::MMAP | Flags::INIT_SHARED).expect("create");
    mem.write_at(P, &[0x11; PAGE_BYTES]).expect("write");
    let mut child = ChildProcess::spawn(
        "peer_follower_kernel_reference_never_sees_private_bytes",
        "follower",
        mem.share_with_process().expect("share"),
    );
    assert_eq!(child.recv(), "spliced");
    mem.convert(P, P, Attr::Private).expect("to private");
    mem.guest()
        .expect("guest view")
        .write(P, &[0x5a; PAGE_BYTES])
        .expect("guest write");
    child.send("written");
    assert_eq!(child.recv(), "shared-time bytes", "the follower's pipe");
    child.finish();
    let mut b = [0u8; 4];
    mem.guest()
        .expect("guest view")
        .read(P, &mut b)
        .expect("read");
    assert_eq!(b, [0x5a; 4], "the guest's page keeps its private bytes");
}

/// A HugeTLB file of two 2 MiB huge pages shared with a follower process running `test`, or
/// `None` (with `skipped:`) when the pool cannot be grown.
fn shared_hugetlb(test: &str) -> Option<(gmem::PoolGuard, GuestMemfd, ChildProcess)> {
    let pool = match gmem::PoolGuard::grow(gmem::HUGE_2M, 2) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("skipped: cannot reserve 2 huge pages of 2 MiB: {e}");
            return None;
        }
    };
    let mem = GuestMemfd::builder(2 * gmem::HUGE_2M)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(gmem::BackingChoice::HugeTlb(gmem::HUGE_2M))
        .create()
        .expect("create on HugeTLB");
    let child = ChildProcess::spawn(test, "follower", mem.share_with_process().expect("share"));
    Some((pool, mem, child))
}

/// The 8-byte slots the follower writes once each: pages 64..512 of the first huge page.
const SLOTS: std::ops::Range<u64> = 64 * P / 8..512 * P / 8;

/// A follower writes every slot of the first huge page once, through its view, while the
/// owner splits and merges that huge page over and over (a 4 KiB page to private and back):
/// the follower's writers are held off while the owner copies the huge page, so no write is
/// lost, whichever copy it landed in.
#[test]
fn peer_follower_writes_survive_the_owners_splits_and_merges() {
    if let Some(mut side) = child_side() {
        let mem = GuestMemfd::attach(side.peer).expect("attach");
        let view = mem.map(0, mem.size()).expect("map");
        side.ctl.send("mapped");
        assert_eq!(side.ctl.recv(), "go");
        let base = view.as_ptr();
        for slot in SLOTS {
            let at = usize::try_from(slot * 8).expect("offset");
            // SAFETY: inside the view, on a shared page; an aligned 8-byte store.
            unsafe { std::ptr::write_volatile(base.wrapping_add(at).cast::<u64>(), slot) };
            for _ in 0..200 {
                std::hint::spin_loop();
            }
        }
        let done = usize::try_from(gmem::HUGE_2M).expect("offset");
        // SAFETY: the first byte of the second huge page, shared and never converted.
        unsafe { std::ptr::write_volatile(base.wrapping_add(done), 1u8) };
        side.ctl.send("done");
        let _ = side.ctl.try_recv();
        return;
    }
    let Some((_pool, mem, mut child)) =
        shared_hugetlb("peer_follower_writes_survive_the_owners_splits_and_merges")
    else {
        return;
    };
    let acct = mem.hugetlb_accounting().expect("accounting");
    assert_eq!(child.recv(), "mapped");
    child.send("go");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut pairs = 0u64;
    loop {
        let mut done = [0u8; 1];
        mem.read_at(gmem::HUGE_2M, &mut done)
            .expect("read the flag");
        if done[0] == 1 || std::time::Instant::now() > until {
            break;
        }
        mem.convert(5 * P, P, Attr::Private).expect("split");
        mem.convert(5 * P, P, Attr::Shared).expect("merge");
        pairs += 1;
    }
    assert_eq!(child.recv(), "done");
    assert!(pairs > 0, "no split while the follower wrote");
    assert_eq!((acct.splits(), acct.merges()), (pairs, pairs));
    let mut page = vec![0u8; usize::try_from((SLOTS.end - SLOTS.start) * 8).expect("fits")];
    mem.read_at(SLOTS.start * 8, &mut page)
        .expect("read the slots");
    let lost: Vec<u64> = SLOTS
        .zip(page.chunks_exact(8))
        .filter(|(slot, b)| u64::from_le_bytes((*b).try_into().expect("8 bytes")) != *slot)
        .map(|(slot, _)| slot * 8)
        .collect();
    eprintln!("{pairs} splits and merges while the follower wrote");
    assert!(
        lost.is_empty(),
        "{} of {} writes lost, the first at {:#x}",
        lost.len(),
        SLOTS.end - SLOTS.start,
        lost[0]
    );
    child.send("bye");
    child.finish();
}

/// A follower's pin on one page of a whole huge page holds off the owner's split of it, as
/// the owner's own pin does: the owner's conversion of another page fails with `EAGAIN`
/// naming the follower's page, nothing splits; once the follower lets go it converts.
#[test]
fn peer_follower_pin_holds_off_the_owners_split() {
    if let Some(mut side) = child_side() {
        let mem = GuestMemfd::attach(side.peer).expect("attach");
        let pin = mem.pin(3 * P, P).expect("pin");
        side.ctl.send("pinned");
        assert_eq!(side.ctl.recv(), "unpin");
        drop(pin);
        side.ctl.send("unpinned");
        let _ = side.ctl.try_recv();
        return;
    }
    let Some((_pool, mem, mut child)) =
        shared_hugetlb("peer_follower_pin_holds_off_the_owners_split")
    else {
        return;
    };
    let acct = mem.hugetlb_accounting().expect("accounting");
    assert_eq!(child.recv(), "pinned");
    let e = mem
        .convert(7 * P, P, Attr::Private)
        .expect_err("a split under the follower's pin");
    assert_eq!((e.errno(), e.error_offset()), (libc::EAGAIN, Some(3 * P)));
    assert_eq!((acct.splits(), acct.split_pages()), (0, 0));
    assert_eq!(mem.attr(7 * P).expect("attr"), Attr::Shared);
    child.send("unpin");
    assert_eq!(child.recv(), "unpinned");
    mem.convert(7 * P, P, Attr::Private)
        .expect("split once unpinned");
    assert_eq!(acct.split_pages(), 1);
    child.send("bye");
    child.finish();
}
