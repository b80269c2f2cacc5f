//! The follower's side: attaching to a shared file, checking what was received, and the agent
//! thread that applies the owner's requests.

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Weak};
use std::time::Instant;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendFlags};

use super::wire::{self, HELLO_LEN, MSG_LEN};
use super::{os, PeerError, FREEZE_LIMIT};
use crate::backing::{BackingKind, Received};
use crate::engine::{Assembly, Engine};
use crate::model::units::PAGE_SIZE;
use crate::verbs::GuestMemfd;

impl GuestMemfd {
    /// Attaches to a file shared by another process through `sock` (see
    /// [`GuestMemfd::share_with_process`]). The returned file is a follower: host code that
    /// maps, reads, writes and pins like any other, whose views lose access to pages the owner
    /// converts to private. It has no guest view.
    pub fn attach(sock: OwnedFd) -> Result<GuestMemfd, PeerError> {
        Self::attach_inner(sock, false)
    }

    /// [`GuestMemfd::attach`] for a process that runs the guest (a software hypervisor's vCPU
    /// process): the follower also has the guest view, which reaches private pages. Give it
    /// only to such a process.
    pub fn attach_with_guest_view(sock: OwnedFd) -> Result<GuestMemfd, PeerError> {
        Self::attach_inner(sock, true)
    }

    fn attach_inner(sock: OwnedFd, guest_view: bool) -> Result<GuestMemfd, PeerError> {
        let (hello, fds) = recv_hello(&sock)?;
        let mut fds = fds.into_iter();
        let (Some(mem), Some(runs_fd)) = (fds.next(), fds.next()) else {
            return Err(PeerError::Protocol("missing descriptors"));
        };
        crate::backing::check_received(mem.as_fd(), hello.kind, hello.size)
            .map_err(PeerError::Descriptor)?;
        let attrs = wire::read_runs(runs_fd.as_fd(), hello.runs, hello.size / PAGE_SIZE)?;
        let pieces = fds.next();
        check_pieces(&hello, pieces.as_ref())?;
        let backing =
            Received::new(mem, hello.kind, hello.block, pieces, hello.size).map_err(|source| {
                PeerError::Os {
                    op: "adopt",
                    source,
                }
            })?;
        let how = Assembly {
            attrs: Some(attrs),
            follower: true,
            piece_limit: Some(u64::MAX),
        };
        let engine = Engine::assemble(Box::new(backing), hello.size, hello.flags, how)?;
        // Requests already queued behind the hello (the `SPLIT`s of a HugeTLB file, poison,
        // or conversions made since) are applied before the file is handed out, so its first
        // views see the state of the hello plus them.
        apply_queued(&sock, &engine)?;
        let weak = Arc::downgrade(&engine);
        std::thread::Builder::new()
            .name("gmem-peer".into())
            .spawn(move || serve(sock, weak))
            .map_err(|source| PeerError::Os {
                op: "spawn",
                source,
            })?;
        Ok(GuestMemfd::from_engine(engine, guest_view))
    }
}

/// Receives the owner's hello and the descriptors that come with it (two, or three for a
/// HugeTLB file), and validates the hello.
fn recv_hello(sock: &OwnedFd) -> Result<(wire::Hello, Vec<OwnedFd>), PeerError> {
    let mut hello = [0u8; HELLO_LEN];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let msg = recvmsg(
        sock.as_fd(),
        &mut [IoSliceMut::new(&mut hello)],
        &mut anc,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(os("recvmsg"))?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for m in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(r) = m {
            fds.extend(r);
        }
    }
    if msg.bytes != HELLO_LEN || !(2..=3).contains(&fds.len()) {
        return Err(PeerError::Protocol("short hello or missing descriptors"));
    }
    Ok((wire::parse_hello(&hello)?, fds))
}

/// Checks the third descriptor: present exactly for a HugeTLB file, and then its companion
/// file of pieces, sealed and of the file's size.
fn check_pieces(hello: &wire::Hello, pieces: Option<&OwnedFd>) -> Result<(), PeerError> {
    match (hello.kind, pieces) {
        (BackingKind::HugeTlb(_), Some(p)) => {
            crate::backing::check_received(p.as_fd(), BackingKind::Shmem, hello.size).map_err(
                |_| PeerError::Descriptor("companion file of the wrong size or not sealed"),
            )?
        }
        (BackingKind::HugeTlb(_), None) => {
            return Err(PeerError::Protocol(
                "HugeTLB hello without its companion file",
            ))
        }
        (_, Some(_)) => return Err(PeerError::Protocol("unexpected third descriptor")),
        (_, None) => {}
    }
    Ok(())
}

/// Applies the requests already queued on `sock` behind the hello, without waiting for more.
fn apply_queued(sock: &OwnedFd, engine: &Engine) -> Result<(), PeerError> {
    loop {
        let mut msg = [0u8; MSG_LEN];
        match rustix::net::recv(sock, &mut msg, RecvFlags::DONTWAIT) {
            Ok((MSG_LEN, _)) => {
                if !answer(sock, engine, &msg) {
                    return Err(PeerError::Protocol("owner gone while attaching"));
                }
            }
            Ok(_) => return Err(PeerError::Protocol("short request")),
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => break,
        }
    }
    Ok(())
}

/// The follower's agent: serves the owner's requests until either side goes away. Writers
/// held for an owner that went away mid-split go on.
fn serve(sock: OwnedFd, file: Weak<Engine>) {
    serve_until_gone(&sock, &file);
    if let Some(engine) = file.upgrade() {
        engine.release_all_for_owner();
    }
}

fn serve_until_gone(sock: &OwnedFd, file: &Weak<Engine>) {
    loop {
        if file.upgrade().is_some_and(|e| e.holds_for_owner()) && !request_within(sock) {
            // An owner answered in time sends its split or merge within the limit; none came:
            // it gave up on this follower (a stalled link, whose `Thaw` waits for the next
            // request), and the held writers go on.
            if let Some(engine) = file.upgrade() {
                engine.release_all_for_owner();
            }
        }
        let mut msg = [0u8; MSG_LEN];
        let n = match rustix::net::recv(sock, &mut msg, RecvFlags::empty()) {
            Ok((n, _)) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return,
        };
        if n != MSG_LEN {
            return;
        }
        let Some(engine) = file.upgrade() else { return };
        if !answer(sock, &engine, &msg) {
            return;
        }
    }
}

/// True when a request (or the end of the stream) arrives within [`FREEZE_LIMIT`].
fn request_within(sock: &OwnedFd) -> bool {
    let deadline = Instant::now() + FREEZE_LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(sock, PollFlags::IN)];
        let timeout = Timespec::try_from(left).ok();
        match poll(&mut fds, timeout.as_ref()) {
            Ok(0) => return false,
            Err(rustix::io::Errno::INTR) => continue,
            Ok(_) | Err(_) => return true,
        }
    }
}

/// Applies one request and sends its reply; false when the owner is gone.
fn answer(sock: &OwnedFd, engine: &Engine, msg: &[u8; MSG_LEN]) -> bool {
    let (step, seq) = wire::decode_request(msg);
    let (errno, at) = match step {
        Err(offset) => (libc::EINVAL, offset),
        Ok(step) => {
            let r = step.range();
            match engine.page_range(r.start, r.len()) {
                Err(e) => (libc::EINVAL, e.offset()),
                Ok(_) => match engine.apply_remote(&step) {
                    Ok(()) => (0, 0),
                    Err(e) => (e.errno, e.offset),
                },
            }
        }
    };
    let reply = wire::encode_reply(seq, errno, at);
    rustix::net::send(sock, &reply, SendFlags::NOSIGNAL).is_ok()
}

#[cfg(test)]
mod tests {
    //! A hostile owner: hellos whose descriptors do not hold what they announce.

    use std::io::IoSlice;
    use std::mem::MaybeUninit;
    use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

    use rustix::net::{
        sendmsg, socketpair, AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
        SocketFlags, SocketType,
    };

    use super::super::wire::{self, Hello};
    use super::super::PeerError;
    use crate::backing::BackingKind;
    use crate::model::attr::{Attr, AttrMap};
    use crate::model::error::Errno;
    use crate::model::flags::Flags;
    use crate::sys::fd;
    use crate::verbs::GuestMemfd;

    const SIZE: u64 = 16 * 4096;

    fn memfd(len: u64, seals: libc::c_int) -> OwnedFd {
        let f = fd::memfd_create(c"hostile", libc::MFD_ALLOW_SEALING).expect("memfd");
        fd::ftruncate(f.as_fd(), len).expect("ftruncate");
        if seals != 0 {
            fd::add_seals(f.as_fd(), seals).expect("seal");
        }
        f
    }

    /// Sends `hello` with `fds` on a new socket pair: (the owner's end, the follower's).
    fn send_hello(hello: &Hello, fds: &[BorrowedFd<'_>]) -> (OwnedFd, OwnedFd) {
        let (mine, theirs) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("socketpair");
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
        let mut anc = SendAncillaryBuffer::new(&mut space);
        anc.push(SendAncillaryMessage::ScmRights(fds));
        sendmsg(
            mine.as_fd(),
            &[IoSlice::new(&wire::encode_hello(hello))],
            &mut anc,
            SendFlags::NOSIGNAL,
        )
        .expect("sendmsg");
        (mine, theirs)
    }

    /// Sends a hello announcing a shared shmem file of `SIZE` bytes (or `kind`) with the given
    /// descriptors, and attaches to it.
    fn attach_to(kind: BackingKind, fds: &[BorrowedFd<'_>]) -> Result<GuestMemfd, PeerError> {
        let hello = Hello {
            kind,
            size: SIZE,
            flags: Flags::MMAP | Flags::INIT_SHARED,
            block: 4096,
            runs: 1,
        };
        let (mine, theirs) = send_hello(&hello, fds);
        let r = GuestMemfd::attach(theirs);
        drop(mine);
        r
    }

    fn runs() -> OwnedFd {
        wire::write_runs(&AttrMap::new(SIZE / 4096, Attr::Shared)).expect("runs")
    }

    const SIZE_SEALS: libc::c_int = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK;

    #[test]
    fn a_memory_file_shorter_than_announced_is_refused() {
        let mem = memfd(SIZE / 2, SIZE_SEALS);
        let e = attach_to(BackingKind::Shmem, &[mem.as_fd(), runs().as_fd()]).unwrap_err();
        assert!(
            matches!(e, PeerError::Descriptor(m) if m.contains("size")),
            "{e}"
        );
        assert_eq!(e.errno(), libc::EBADF);
    }

    #[test]
    fn a_memory_file_that_could_shrink_or_grow_is_refused() {
        for seals in [0, libc::F_SEAL_GROW, libc::F_SEAL_SHRINK] {
            let mem = memfd(SIZE, seals);
            let e = attach_to(BackingKind::Shmem, &[mem.as_fd(), runs().as_fd()]).unwrap_err();
            assert!(
                matches!(e, PeerError::Descriptor(m) if m.contains("sealed")),
                "{e}"
            );
            assert_eq!(e.errno(), libc::EBADF);
        }
    }

    #[test]
    fn a_plain_memfd_announced_as_a_kernel_guest_memfd_is_refused() {
        let mem = memfd(SIZE, SIZE_SEALS);
        let e = attach_to(
            BackingKind::KernelGuestMemfd,
            &[mem.as_fd(), runs().as_fd()],
        )
        .unwrap_err();
        assert!(
            matches!(e, PeerError::Descriptor(m) if m.contains("kernel")),
            "{e}"
        );
    }

    #[test]
    fn a_run_table_that_could_change_is_refused() {
        let mem = memfd(SIZE, SIZE_SEALS);
        let table = memfd(8, 0);
        let e = attach_to(BackingKind::Shmem, &[mem.as_fd(), table.as_fd()]).unwrap_err();
        assert!(
            matches!(e, PeerError::Protocol(m) if m.contains("sealed")),
            "{e}"
        );
        assert_eq!(e.errno(), libc::EPROTO);
    }

    #[test]
    fn a_huge_file_with_a_short_companion_is_refused() {
        let mem = memfd(SIZE, SIZE_SEALS);
        let pieces = memfd(SIZE / 2, SIZE_SEALS);
        let kind = BackingKind::HugeTlb(crate::backing::hugetlb::HUGE_2M);
        let e = attach_to(kind, &[mem.as_fd(), runs().as_fd(), pieces.as_fd()]).unwrap_err();
        assert!(
            matches!(e, PeerError::Descriptor(m) if m.contains("companion")),
            "{e}"
        );
    }

    #[test]
    fn a_well_formed_hello_attaches() {
        let mem = memfd(SIZE, SIZE_SEALS);
        let f = attach_to(BackingKind::Shmem, &[mem.as_fd(), runs().as_fd()]).expect("attach");
        assert!(f.is_follower());
        assert_eq!(f.size(), SIZE);
    }

    /// An owner that froze a huge page and then never sent the split (a stalled link, whose
    /// `THAW` waits for its next request): the follower's writers of that page are held, and
    /// go on after [`FREEZE_LIMIT`](super::super::FREEZE_LIMIT).
    #[test]
    fn writers_held_for_an_owner_that_gives_up_go_on() {
        use crate::engine::participant::Step;
        use crate::model::units::ByteRange;
        const M2: u64 = crate::HUGE_2M;
        let Ok(_pool) = crate::PoolGuard::grow(M2, 1) else {
            eprintln!("skipped: cannot reserve a 2 MiB huge page");
            return;
        };
        let owner = GuestMemfd::builder(M2)
            .flags(Flags::MMAP | Flags::INIT_SHARED)
            .backing(crate::BackingChoice::HugeTlb(M2))
            .create()
            .expect("owner");
        let hello = Hello {
            kind: owner.backing_kind(),
            size: M2,
            flags: Flags::MMAP | Flags::INIT_SHARED,
            block: M2,
            runs: 1,
        };
        let table = wire::write_runs(&AttrMap::new(M2 / 4096, Attr::Shared)).expect("runs");
        let companion = owner.inner.huge().expect("HugeTLB").companion();
        let (mine, theirs) = send_hello(&hello, &[owner.inner.fd(), table.as_fd(), companion]);
        let follower = GuestMemfd::attach(theirs).expect("attach");
        let view = follower.map(0, M2).expect("map");
        let freeze = wire::encode_request(&Step::Freeze(ByteRange { start: 0, end: M2 }), 1);
        rustix::net::send(&mine, &freeze, SendFlags::NOSIGNAL).expect("send FREEZE");
        let mut reply = [0u8; wire::MSG_LEN];
        rustix::net::recv(&mine, &mut reply, rustix::net::RecvFlags::empty()).expect("reply");
        assert_eq!(wire::decode_reply(&reply), (1, 0, 0), "FREEZE accepted");
        let at = view.as_ptr() as usize + 100;
        let writer = std::thread::spawn(move || {
            // SAFETY: byte 100 of the follower's live view of a shared huge page.
            unsafe { std::ptr::write_volatile(at as *mut u8, 7) };
        });
        std::thread::sleep(std::time::Duration::from_secs(1));
        assert!(!writer.is_finished(), "a writer went on while held");
        let until = std::time::Instant::now() + 2 * super::super::FREEZE_LIMIT;
        while !writer.is_finished() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(writer.is_finished(), "the held writer never went on");
        writer.join().expect("the writer");
        let mut b = [0u8; 1];
        owner.read_at(100, &mut b).expect("read");
        assert_eq!(b, [7]);
        drop(view);
        drop(mine);
    }
}
