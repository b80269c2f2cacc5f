//! The old owner's side of a hand-over: freeze, snapshot, offer, and letting go.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

use super::super::error::{io, os, HandoverError};
use super::super::format::{
    FileState, NumaRecord, RestructureKind, Restructured, RunRecord, State, MAX_FILES,
};
use super::{
    recv, send, FileOffer, Got, HandedOver, Msg, Options, Step, MAX_FDS, OP_ABORT, OP_ACCEPT,
    OP_COMMIT, OP_DONE, OP_OFFER, OP_REJECT, OP_RELEASED,
};
use crate::model::attr::Run;
use crate::model::error::Errno;
use crate::model::units::ByteRange;
use crate::sys::fd;
use crate::verbs::GuestMemfd;

/// Files frozen for a hand-over, with their state written. Dropping it thaws the files
/// unless they were handed over.
pub(crate) struct Frozen {
    files: Vec<GuestMemfd>,
    /// Poisoned pages and restructuring of each file when the state was written. Poison can
    /// arrive during the freeze (a memory failure does not wait, and on HugeTLB it splits);
    /// both are compared again before `COMMIT`.
    poison: Vec<(Vec<u64>, Vec<Restructured>)>,
    pub state_fd: OwnedFd,
    pub state_len: usize,
    pub crc: u32,
    started: Instant,
    released: bool,
}

impl Frozen {
    /// The descriptors to send: the state, then each file.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        // The state, then each file, then the companion file of pieces of each HugeTLB file,
        // in file order.
        std::iter::once(self.state_fd.as_fd())
            .chain(self.files.iter().map(|f| f.inner.fd()))
            .chain(
                self.files
                    .iter()
                    .filter_map(|f| f.inner.huge().map(|h| h.companion())),
            )
            .collect()
    }

    /// The `OFFER` message.
    pub fn offer_msg(&self) -> Msg {
        Msg {
            op: OP_OFFER,
            errno: 0,
            crc: self.crc,
            state_len: u64::try_from(self.state_len).unwrap_or(u64::MAX),
            files: u32::try_from(self.files.len()).unwrap_or(u32::MAX),
        }
    }

    /// The first file whose poison list changed since the state was written.
    fn poison_changed(&self) -> Option<usize> {
        self.files
            .iter()
            .zip(&self.poison)
            .position(|(f, (p, r))| f.inner.poisoned_offsets() != *p || restructure_of(f) != *r)
    }

    /// Ends the listeners' and accessors' hold on every file, reversibly (see
    /// [`Engine::commit`]); on error the files committed so far are given back when this is
    /// dropped.
    ///
    /// [`Engine::commit`]: crate::engine::Engine::commit
    fn commit(&self) -> Result<(), HandoverError> {
        for (file, f) in self.files.iter().enumerate() {
            f.inner.commit().map_err(|v| HandoverError::Vetoed {
                file,
                offset: v.offset,
                reason: v.reason,
            })?;
        }
        Ok(())
    }

    fn release(mut self) -> Duration {
        for f in &self.files {
            f.inner.release();
        }
        self.released = true;
        self.started.elapsed()
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.released {
            for f in &self.files {
                f.inner.thaw();
            }
        }
    }
}

/// Freezes every offered file and writes the state into a sealed memfd.
pub(crate) fn freeze(offers: &[FileOffer], generation: u64) -> Result<Frozen, HandoverError> {
    if offers.is_empty() || offers.len() > MAX_FILES {
        return Err(HandoverError::Protocol {
            what: "offer between 1 and 250 files",
        });
    }
    // The runs are read before the freeze (the longest step of the snapshot on big files);
    // a file whose attributes changed in between is read again, frozen.
    let early: Vec<(u64, Vec<Run>)> = offers
        .iter()
        .map(|o| o.mem.inner.all_runs_counted())
        .collect();
    let started = Instant::now();
    let mut frozen = Frozen {
        files: Vec::with_capacity(offers.len()),
        poison: Vec::new(),
        state_fd: fd::memfd_create(c"gmem-state", 0).map_err(io("memfd_create"))?,
        state_len: 0,
        crc: 0,
        started,
        released: false,
    };
    for (i, o) in offers.iter().enumerate() {
        let inner = &o.mem.inner;
        if frozen
            .files
            .iter()
            .any(|f| std::sync::Arc::ptr_eq(&f.inner, inner))
        {
            return Err(HandoverError::Busy {
                file: i,
                what: "offered twice",
            });
        }
        inner
            .freeze()
            .map_err(|what| HandoverError::Busy { file: i, what })?;
        frozen.files.push(o.mem.clone());
        // Every host reference must travel: a pin left behind would keep a page the new
        // owner may make private.
        let listed: Vec<ByteRange> = o
            .pins
            .iter()
            .filter_map(|p| ByteRange::new(p.offset, p.len))
            .collect();
        if let Some(offset) = inner.unlisted_ref(&listed) {
            return Err(HandoverError::UnlistedPin { file: i, offset });
        }
    }
    let mut files = Vec::with_capacity(offers.len());
    for (o, early) in offers.iter().zip(early) {
        files.push(snapshot(o, early)?);
    }
    frozen.poison = files
        .iter()
        .map(|f: &FileState| (f.poison.clone(), f.restructure.clone()))
        .collect();
    let state = State { generation, files };
    let bytes = state.encode()?;
    write_sealed(frozen.state_fd.as_fd(), &bytes)?;
    frozen.state_len = bytes.len();
    frozen.crc = super::super::crc::crc32c(&bytes);
    Ok(frozen)
}

/// The state of frozen file `o`; `early` is its runs read before the freeze, with the
/// change count they were read at, used when nothing changed since.
fn snapshot(o: &FileOffer, early: (u64, Vec<Run>)) -> Result<FileState, HandoverError> {
    let mem = &o.mem;
    let inner = &mem.inner;
    let id = mem.id().map_err(|e| HandoverError::Os {
        op: "fstat",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    let (counted, early) = early;
    let runs = if inner.attr_changes() == counted {
        early
    } else {
        inner.all_runs()
    };
    let runs = runs
        .into_iter()
        .map(|r| RunRecord {
            start_page: r.start,
            attr: r.attr,
        })
        .collect();
    let numa = inner
        .numa_policy_set()
        .as_ref()
        .map(NumaRecord::from_policy)
        .unwrap_or_default();
    let restructure = restructure_of(mem);
    Ok(FileState {
        kind: mem.backing_kind(),
        block_size: mem.block_size(),
        flags: mem.flags(),
        size: mem.size(),
        id,
        runs,
        numa,
        bindings: o.bindings.clone(),
        restructure,
        poison: mem.inner.poisoned_offsets(),
        pins: o.pins.clone(),
        vm: o.vm,
    })
}

/// The split (and waiting-to-merge) huge pages of a HugeTLB file, one record per huge page.
fn restructure_of(mem: &GuestMemfd) -> Vec<Restructured> {
    let Some(geo) = mem.inner.geometry() else {
        return Vec::new();
    };
    let rec = mem.inner.huge_records();
    rec.split
        .iter()
        .map(|&h| Restructured {
            offset: geo.bytes(h).start,
            len: geo.size,
            kind: if rec.waiting.contains(&h) {
                RestructureKind::PendingMerge
            } else {
                RestructureKind::Split
            },
        })
        .collect()
}

fn write_sealed(f: BorrowedFd<'_>, bytes: &[u8]) -> Result<(), HandoverError> {
    let mut done = 0;
    while done < bytes.len() {
        let at = u64::try_from(done).unwrap_or(u64::MAX);
        let n = fd::pwrite(f, &bytes[done..], at).map_err(io("pwrite state"))?;
        if n == 0 {
            return Err(io("pwrite state")(std::io::Error::from_raw_os_error(
                libc::EIO,
            )));
        }
        done += n;
    }
    fd::add_seals(
        f,
        libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
    )
    .map_err(io("seal state"))
}

/// Hands `offers` over to the process at the other end of `sock` (a connected
/// `SOCK_SEQPACKET` Unix socket) and waits for it to take them.
///
/// On success this process no longer owns the files: conversions and `fallocate` on them fail
/// with `EPERM`; drop them. On error the files are thawed and owned by this process as before
/// (see the [module docs](crate::preserve::handover) for every failure case).
pub fn hand_over(
    sock: BorrowedFd<'_>,
    offers: &[FileOffer],
    opts: &Options,
) -> Result<HandedOver, HandoverError> {
    let frozen = freeze(offers, opts.generation)?;
    opts.step(Step::Frozen);
    let msg = frozen.offer_msg();
    {
        let fds = frozen.fds();
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut anc = SendAncillaryBuffer::new(&mut space);
        if !anc.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(HandoverError::Protocol {
                what: "too many descriptors",
            });
        }
        let bytes = msg.encode();
        match sendmsg(sock, &[IoSlice::new(&bytes)], &mut anc, SendFlags::NOSIGNAL) {
            Ok(_) => {}
            Err(rustix::io::Errno::PIPE | rustix::io::Errno::CONNRESET) => {
                return Err(HandoverError::PeerGone { step: Step::Frozen })
            }
            Err(e) => return Err(os("sendmsg")(e)),
        }
    }
    opts.step(Step::OfferSent);
    finish_old(sock, frozen, opts)
}

/// Steps 4 to 7 for the old owner, once the offer has reached the new owner.
pub(crate) fn finish_old(
    sock: BorrowedFd<'_>,
    frozen: Frozen,
    opts: &Options,
) -> Result<HandedOver, HandoverError> {
    match recv(sock, Some(opts.timeout))? {
        Got::Msg(m, _) if m.op == OP_ACCEPT && m.crc == frozen.crc => {}
        Got::Msg(m, _) if m.op == OP_REJECT => {
            return Err(HandoverError::Rejected { errno: m.errno })
        }
        Got::Msg(..) => {
            let _ = send(sock, &Msg::new(OP_ABORT, frozen.crc));
            return Err(HandoverError::Protocol {
                what: "expected ACCEPT",
            });
        }
        Got::Closed => {
            return Err(HandoverError::PeerGone {
                step: Step::OfferSent,
            })
        }
        Got::TimedOut => {
            let _ = send(sock, &Msg::new(OP_ABORT, frozen.crc));
            return Err(HandoverError::Timeout {
                step: Step::OfferSent,
            });
        }
    }
    opts.step(Step::AcceptReceived);
    if let Some(file) = frozen.poison_changed() {
        let _ = send(sock, &Msg::new(OP_ABORT, frozen.crc));
        return Err(HandoverError::Busy {
            file,
            what: "a page was poisoned during the hand-over",
        });
    }
    // The new owner owns once it reads COMMIT: this process's listeners let go and its
    // accessors stop first (given back if the hand-over fails from here); its views stay
    // until it has read DONE, and the new owner makes nothing private before RELEASED.
    if let Err(e) = frozen.commit() {
        let _ = send(sock, &Msg::new(OP_ABORT, frozen.crc));
        return Err(e);
    }
    if send(sock, &Msg::new(OP_COMMIT, frozen.crc)).is_err() {
        return Err(HandoverError::PeerGone {
            step: Step::AcceptReceived,
        });
    }
    opts.step(Step::CommitSent);
    let state_len = frozen.state_len;
    let frozen_crc = frozen.crc;
    let confirmed = match recv(sock, Some(opts.timeout))? {
        Got::Msg(m, _) if m.op == OP_DONE => true,
        // The new owner died before it could say it owns: it owned nothing that outlives it,
        // and this side still holds every file, so this side goes on.
        Got::Closed => {
            return Err(HandoverError::PeerGone {
                step: Step::CommitSent,
            })
        }
        // It may own the files and be alive: do not take them back.
        Got::Msg(..) | Got::TimedOut => false,
    };
    opts.step(Step::DoneReceived);
    let frozen_at = frozen.started;
    let pause = frozen.release();
    // The new owner makes no page private before it reads this (or end of file).
    let _ = send(sock, &Msg::new(OP_RELEASED, frozen_crc));
    opts.step(Step::Released);
    Ok(HandedOver {
        pause,
        frozen_at,
        state_len,
        confirmed,
    })
}

#[cfg(test)]
mod tests {
    use super::{snapshot, FileOffer};
    use crate::{Attr, Flags, GuestMemfd};

    const P: u64 = 4096;

    fn starts(mem: &GuestMemfd, early: (u64, Vec<crate::model::attr::Run>)) -> Vec<u64> {
        let st = snapshot(&FileOffer::new(mem), early).expect("snapshot");
        st.runs.iter().map(|r| r.start_page).collect()
    }

    /// The runs read before the freeze serve the snapshot only while the attributes are
    /// unchanged; a conversion in between makes it read them again.
    #[test]
    fn early_runs_serve_only_an_unchanged_file() {
        let mem = GuestMemfd::create(64 * P, Flags::MMAP | Flags::INIT_SHARED).expect("create");
        mem.convert(4 * P, 2 * P, Attr::Private).expect("convert");
        let early = mem.inner.all_runs_counted();
        assert_eq!(starts(&mem, early), vec![0, 4, 6]);
        // Unchanged: the early runs are what the snapshot holds (an empty list shows it).
        let (count, _) = mem.inner.all_runs_counted();
        assert_eq!(starts(&mem, (count, Vec::new())), Vec::<u64>::new());
        let early = mem.inner.all_runs_counted();
        mem.convert(10 * P, P, Attr::Private).expect("convert");
        assert_eq!(starts(&mem, early), vec![0, 4, 6, 10, 11]);
        // A count that moved on and back to equal runs is still read again (counts only
        // grow), and gives the same answer.
        let early = mem.inner.all_runs_counted();
        mem.convert(10 * P, P, Attr::Shared).expect("convert");
        mem.convert(10 * P, P, Attr::Private).expect("convert");
        assert_eq!(starts(&mem, early), vec![0, 4, 6, 10, 11]);
    }
}
