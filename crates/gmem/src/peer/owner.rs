//! The owner's side: sharing the file, and each follower as a participant of every change.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{
    sendmsg, socketpair, AddressFamily, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags, SocketFlags, SocketType,
};

use super::wire::{self, Hello, MSG_LEN};
use super::{os, PeerError, PEER_TIMEOUT};
use crate::engine::participant::{Participant, Step, StepError};
use crate::model::units::page_offset;
use crate::verbs::GuestMemfd;

/// Where a follower stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Live,
    /// Missed a deadline: the steps to send when it answers again.
    Stalled,
    Gone,
}

/// The owner's end of one follower.
#[derive(Debug)]
pub(crate) struct PeerLink {
    sock: OwnedFd,
    /// Sequence number of the next request.
    seq: u32,
    /// Sequence number of the last request sent (its reply settles every earlier one).
    last: u32,
    state: State,
    /// Steps to send once a stalled follower answers again (undos of what timed out).
    resend: Vec<Step>,
}

fn timed_out(offset: u64) -> StepError {
    StepError {
        errno: libc::ETIMEDOUT,
        offset,
    }
}

impl PeerLink {
    fn new(sock: OwnedFd) -> Self {
        PeerLink {
            sock,
            seq: 0,
            last: 0,
            state: State::Live,
            resend: Vec::new(),
        }
    }

    /// Queues a request without waiting for its reply.
    fn post(&mut self, step: &Step) -> Result<u32, ()> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let msg = wire::encode_request(step, seq);
        match rustix::net::send(&self.sock, &msg, SendFlags::NOSIGNAL) {
            Ok(_) => {
                self.last = seq;
                Ok(seq)
            }
            Err(_) => {
                self.state = State::Gone;
                Err(())
            }
        }
    }

    /// Waits for the reply to `seq` until `deadline` (replies to older requests are read and
    /// dropped; they do not extend the wait). `Ok(None)` on timeout.
    fn wait(&mut self, seq: u32, deadline: Instant) -> Result<Option<(i32, u64)>, ()> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [PollFd::new(&self.sock, PollFlags::IN)];
            let timeout = Timespec::try_from(left).ok();
            match poll(&mut fds, timeout.as_ref()) {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => {
                    self.state = State::Gone;
                    return Err(());
                }
            }
            let mut reply = [0u8; MSG_LEN];
            match rustix::net::recv(&self.sock, &mut reply, RecvFlags::DONTWAIT) {
                Ok((0, _)) => {
                    self.state = State::Gone;
                    return Err(());
                }
                Ok((n, _)) if n != MSG_LEN => {}
                Ok(_) => {
                    let (got, errno, offset) = wire::decode_reply(&reply);
                    if got == seq {
                        return Ok(Some((errno, offset)));
                    }
                }
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                Err(_) => {
                    self.state = State::Gone;
                    return Err(());
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    /// A stalled follower that answered everything it was sent is live again, after the
    /// steps that timed out are undone on it.
    fn recover(&mut self) -> bool {
        if self.state != State::Stalled {
            return self.state == State::Live;
        }
        let deadline = Instant::now();
        match self.wait(self.last, deadline) {
            Ok(Some(_)) => {}
            _ => return false,
        }
        self.state = State::Live;
        let resend = std::mem::take(&mut self.resend);
        for step in resend {
            if self.call(&step).is_err() {
                return false;
            }
        }
        self.state == State::Live
    }

    /// Sends `step` and waits for its reply within [`PEER_TIMEOUT`].
    fn call(&mut self, step: &Step) -> Result<(), StepError> {
        let at = step.range().start;
        let Ok(seq) = self.post(step) else {
            return Ok(());
        };
        match self.wait(seq, Instant::now() + PEER_TIMEOUT) {
            Err(()) => Ok(()),
            Ok(None) => {
                self.state = State::Stalled;
                Err(timed_out(at))
            }
            Ok(Some((0, _))) => Ok(()),
            Ok(Some((errno, offset))) => Err(StepError { errno, offset }),
        }
    }
}

impl Participant for PeerLink {
    fn name(&self) -> &str {
        "peer"
    }

    fn maps_file(&self) -> bool {
        true
    }

    fn apply(&mut self, step: &Step) -> Result<(), StepError> {
        let at = step.range().start;
        if self.state == State::Gone {
            return Ok(());
        }
        let restricts = matches!(
            step,
            Step::Revoke(_) | Step::Freeze(_) | Step::Split(_) | Step::Merge(_)
        );
        if !self.recover() {
            if self.state == State::Gone {
                return Ok(());
            }
            if restricts {
                return Err(timed_out(at));
            }
            // Permissive or unrefusable steps reach it when it answers again.
            self.resend.push(*step);
            return Ok(());
        }
        match self.call(step) {
            Err(e) if e.errno == libc::ETIMEDOUT => {
                if restricts {
                    // Rolled back in the owner: undo it here once the follower answers.
                    self.resend.push(step.inverse());
                    Err(e)
                } else {
                    Ok(())
                }
            }
            other => other,
        }
    }

    fn undo(&mut self, step: &Step) {
        let inverse = step.inverse();
        if self.state == State::Live {
            if let Err(e) = self.call(&inverse) {
                tracing::error!(?step, "a peer could not undo: {e}");
            }
        } else if self.state == State::Stalled {
            self.resend.push(inverse);
        }
    }

    fn is_gone(&self) -> bool {
        self.state == State::Gone
    }
}

impl GuestMemfd {
    /// Lets another process map this file: returns the socket end to give it (inherit it, or
    /// send it with `SCM_RIGHTS`); that process calls [`GuestMemfd::attach`] on it. See the
    /// [module docs](crate::peer) for the protocol, deadlines, and what happens when either
    /// side dies.
    pub fn share_with_process(&self) -> Result<OwnedFd, PeerError> {
        let inner = &self.inner;
        let (mine, theirs) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(os("socketpair"))?;
        inner.share_out(|| {
            let (runs_fd, runs) = inner.with_attrs(|attrs| -> Result<_, PeerError> {
                Ok((wire::write_runs(attrs)?, attrs.len()))
            })?;
            let hello = Hello {
                kind: inner.backing().kind(),
                size: inner.size(),
                flags: inner.flags(),
                block: inner.block_size(),
                runs: u64::try_from(runs).unwrap_or(u64::MAX),
            };
            let mut fds: Vec<BorrowedFd<'_>> = vec![inner.fd(), runs_fd.as_fd()];
            if let Some(h) = inner.huge() {
                fds.push(h.companion());
            }
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
            let mut anc = SendAncillaryBuffer::new(&mut space);
            anc.push(SendAncillaryMessage::ScmRights(&fds));
            sendmsg(
                mine.as_fd(),
                &[IoSlice::new(&wire::encode_hello(&hello))],
                &mut anc,
                SendFlags::NOSIGNAL,
            )
            .map_err(os("sendmsg"))?;
            let mut link = PeerLink::new(mine);
            if let Some(h) = inner.huge() {
                // Huge pages split now: the follower maps their pieces before any later
                // request.
                for hp in h.state().split_in(0, u64::MAX) {
                    if link.post(&Step::Split(h.geo.bytes(hp))).is_err() {
                        return Err(PeerError::Protocol("follower gone while sharing"));
                    }
                }
            }
            for p in inner.poisoned() {
                let r = crate::model::units::PageRange::one(p).bytes();
                debug_assert_eq!(r.start, page_offset(p));
                if link.post(&Step::Poison(r)).is_err() {
                    return Err(PeerError::Protocol("follower gone while sharing"));
                }
            }
            Ok(Box::new(link))
        })?;
        Ok(theirs)
    }

    /// True when a follower is attached (a live-update hand-over refuses such a file: its
    /// followers would go on following this process, not the new owner).
    pub fn has_followers(&self) -> bool {
        self.inner.has_participant_named("peer")
    }
}
