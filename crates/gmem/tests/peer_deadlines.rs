//! A follower that does not answer, or answers with the wrong sequence numbers: the owner's
//! waits have real total deadlines ([`gmem::peer::PEER_TIMEOUT`]), a stalled follower costs
//! one deadline once, no page is reported private while it has not confirmed, and host
//! accessors never wait for it.
//!
//! The follower here is played by the test on the raw socket (24-byte packets, see
//! `gmem::peer`), so that it can misbehave exactly.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use gmem::peer::PEER_TIMEOUT;
use gmem::{Attr, Errno, Flags, GuestMemfd};

const P: u64 = 4096;
const MSG: usize = 24;

/// The test's end of a follower socket, past the hello.
struct FakeFollower {
    sock: OwnedFd,
}

impl FakeFollower {
    fn attach(mem: &GuestMemfd) -> FakeFollower {
        let sock = mem.share_with_process().expect("share");
        let mut hello = [0u8; 48];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
        let mut anc = rustix::net::RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &sock,
            &mut [std::io::IoSliceMut::new(&mut hello)],
            &mut anc,
            rustix::net::RecvFlags::CMSG_CLOEXEC,
        )
        .expect("hello");
        assert_eq!(got.bytes, 48);
        let received = anc.drain().count();
        assert!(received > 0, "the hello carries descriptors");
        FakeFollower { sock }
    }

    /// The next request's `(op, seq)`, waiting at most `wait`.
    fn request(&self, wait: Duration) -> Option<(u32, u32)> {
        let mut fds = [rustix::event::PollFd::new(
            &self.sock,
            rustix::event::PollFlags::IN,
        )];
        let t = rustix::event::Timespec::try_from(wait).expect("timespec");
        if rustix::event::poll(&mut fds, Some(&t)).expect("poll") == 0 {
            return None;
        }
        let mut m = [0u8; MSG];
        let (n, _) =
            rustix::net::recv(&self.sock, &mut m, rustix::net::RecvFlags::empty()).expect("recv");
        assert_eq!(n, MSG);
        let op = u32::from_le_bytes(m[0..4].try_into().expect("4 bytes"));
        let seq = u32::from_le_bytes(m[4..8].try_into().expect("4 bytes"));
        Some((op, seq))
    }

    fn reply(&self, seq: u32, errno: i32) {
        let mut m = [0u8; MSG];
        m[0..4].copy_from_slice(&seq.to_le_bytes());
        m[4..8].copy_from_slice(&errno.to_le_bytes());
        let flags = rustix::net::SendFlags::NOSIGNAL | rustix::net::SendFlags::DONTWAIT;
        let _ = rustix::net::send(&self.sock, &m, flags);
    }

    /// Answers every request queued now, correctly.
    fn answer_all(&self) -> usize {
        let mut n = 0;
        while let Some((_, seq)) = self.request(Duration::from_millis(50)) {
            self.reply(seq, 0);
            n += 1;
        }
        n
    }
}

fn file() -> GuestMemfd {
    let mem = GuestMemfd::create(16 * P, Flags::MMAP | Flags::INIT_SHARED).expect("create");
    mem.write_at(0, &[0x5a; 4096]).expect("write");
    mem
}

/// A follower that answers every request with a flood of replies carrying other sequence
/// numbers: the conversion still fails with `ETIMEDOUT` after one deadline in all (the wrong
/// replies do not extend it), rolled back: the page is still shared.
#[test]
fn wrong_sequence_numbers_do_not_extend_the_deadline() {
    let mem = file();
    let f = FakeFollower::attach(&mem);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let flood = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            match f.request(Duration::from_millis(20)) {
                Some((_, seq)) => {
                    for k in 1..=200u32 {
                        f.reply(seq.wrapping_add(k), 0);
                    }
                }
                None => f.reply(0xdead_beef, 0),
            }
        }
        f
    });
    let t = Instant::now();
    let e = mem.convert(P, P, Attr::Private).unwrap_err();
    let took = t.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        (e.errno(), e.error_offset()),
        (libc::ETIMEDOUT, Some(P)),
        "{e}"
    );
    assert!(
        took < PEER_TIMEOUT * 2,
        "the wrong replies extended the wait: {took:?}"
    );
    assert_eq!(
        mem.runs(0, 16 * P).expect("runs").len(),
        1,
        "rolled back: all shared"
    );
    let mut b = [0u8; 4];
    mem.read_at(0, &mut b).expect("read_at");
    assert_eq!(b, [0x5a; 4]);
    drop(flood.join().expect("flood"));
}

/// A follower that stops answering: the first conversion to private fails with `ETIMEDOUT`
/// after one deadline while host accessors go on meanwhile; later conversions to private fail
/// at once; conversions to shared go on; once the follower answers again (and is sent the
/// undo of what timed out) conversions to private work again.
#[test]
fn a_stuck_follower_costs_one_deadline_then_fails_fast() {
    let mem = file();
    mem.convert(2 * P, P, Attr::Private)
        .expect("a private page, follower live");
    let f = FakeFollower::attach(&mem);
    let reader = {
        let mem = mem.clone();
        std::thread::spawn(move || {
            // Host accessors do not wait for the follower.
            std::thread::sleep(PEER_TIMEOUT / 5);
            let t = Instant::now();
            let mut b = [0u8; 4];
            mem.read_at(0, &mut b).expect("read_at during the wait");
            (b, t.elapsed())
        })
    };
    let t = Instant::now();
    let e = mem.convert(P, P, Attr::Private).unwrap_err();
    assert_eq!(
        (e.errno(), e.error_offset()),
        (libc::ETIMEDOUT, Some(P)),
        "{e}"
    );
    assert!(
        t.elapsed() >= PEER_TIMEOUT,
        "gave up early: {:?}",
        t.elapsed()
    );
    let (b, read_took) = reader.join().expect("reader");
    assert_eq!(b, [0x5a; 4]);
    assert!(read_took < PEER_TIMEOUT / 2, "read_at waited {read_took:?}");
    let t = Instant::now();
    let e = mem.convert(3 * P, P, Attr::Private).unwrap_err();
    assert_eq!(e.errno(), libc::ETIMEDOUT);
    assert!(
        t.elapsed() < PEER_TIMEOUT / 5,
        "a stalled follower waited again: {:?}",
        t.elapsed()
    );
    let runs = mem.runs(0, 16 * P).expect("runs");
    assert_eq!(
        runs.iter().filter(|r| r.attr == Attr::Private).count(),
        1,
        "only page 2"
    );
    mem.convert(2 * P, P, Attr::Shared)
        .expect("to shared goes on");
    // The follower answers again: everything it was sent, then the undo and the queued steps.
    assert!(
        f.answer_all() >= 1,
        "the follower got the timed-out request"
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let answerer = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some((_, seq)) = f.request(Duration::from_millis(20)) {
                f.reply(seq, 0);
            }
        }
        f
    });
    let again = mem.convert(P, P, Attr::Private);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    again.expect("converts again once the follower answers");
    assert_eq!(mem.runs(P, P).expect("runs")[0].attr, Attr::Private);
    drop(answerer.join().expect("answerer"));
}
