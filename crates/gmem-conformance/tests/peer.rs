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
