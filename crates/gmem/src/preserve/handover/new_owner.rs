//! The new owner's side of a hand-over: reading and checking the offer, building the files,
//! confirming.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::super::error::{io, os, HandoverError};
use super::super::format::{FileState, RestructureKind, RunRecord, State, MAX_STATE_LEN};
use super::{
    recv, send, Got, Msg, Options, Restored, RestoredFile, Step, OP_ABORT, OP_ACCEPT, OP_COMMIT,
    OP_DONE, OP_OFFER, OP_REJECT, OP_RELEASED,
};
use crate::backing::{Backing, BackingKind, Received};
use crate::engine::{Assembly, Engine};
use crate::model::attr::AttrMap;
use crate::model::error::Errno;
use crate::model::numa::NumaPolicy;
use crate::sys::fd;
use crate::verbs::access::Pin;
use crate::verbs::{FileId, GuestMemfd};

/// Receives files handed over by the process at the other end of `sock` (see
/// [`super::hand_over`]). Returns once this process owns them.
pub fn receive(sock: BorrowedFd<'_>, opts: &Options) -> Result<Restored, HandoverError> {
    let (msg, fds) = match recv(sock, Some(opts.timeout))? {
        Got::Msg(m, fds) if m.op == OP_OFFER => (m, fds),
        Got::Msg(..) => {
            return Err(HandoverError::Protocol {
                what: "expected OFFER",
            })
        }
        Got::Closed => return Err(HandoverError::PeerGone { step: Step::Frozen }),
        Got::TimedOut => return Err(HandoverError::Timeout { step: Step::Frozen }),
    };
    opts.step(Step::OfferReceived);
    let mut fds = fds.into_iter();
    let state_fd = fds.next().ok_or(HandoverError::Protocol {
        what: "no descriptors",
    })?;
    let files: Vec<OwnedFd> = fds.collect();
    finish_new(Some(sock), &msg_offer(msg), state_fd, files, opts)
}

/// What an offer announced: the state's length and checksum and the number of files.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OfferInfo {
    pub crc: u32,
    pub state_len: u64,
    pub files: u32,
}

fn msg_offer(m: Msg) -> OfferInfo {
    OfferInfo {
        crc: m.crc,
        state_len: m.state_len,
        files: m.files,
    }
}

/// Steps 3 to 6 for the new owner. Without a socket (exec replacing the old owner) the new
/// owner owns at once.
pub(crate) fn finish_new(
    sock: Option<BorrowedFd<'_>>,
    offer: &OfferInfo,
    state_fd: OwnedFd,
    files: Vec<OwnedFd>,
    opts: &Options,
) -> Result<Restored, HandoverError> {
    let restored = match verify(offer, &state_fd, files) {
        Ok(r) => r,
        Err(e) => {
            if let Some(sock) = sock {
                let mut m = Msg::new(OP_REJECT, offer.crc);
                m.errno = e.errno();
                let _ = send(sock, &m);
            }
            return Err(e);
        }
    };
    opts.step(Step::Verified);
    let Some(sock) = sock else {
        return Ok(restored);
    };
    let mut restored = restored;
    if send(sock, &Msg::new(OP_ACCEPT, offer.crc)).is_err() {
        // The old owner is gone after sending everything: this side is the survivor.
        restored.old_owner_gone = true;
        return Ok(restored);
    }
    opts.step(Step::AcceptSent);
    match recv(sock, None)? {
        Got::Msg(m, _) if m.op == OP_COMMIT => {}
        Got::Msg(m, _) if m.op == OP_ABORT => return Err(HandoverError::Aborted),
        Got::Msg(..) => {
            return Err(HandoverError::Protocol {
                what: "expected COMMIT",
            })
        }
        Got::Closed | Got::TimedOut => {
            restored.old_owner_gone = true;
            return Ok(restored);
        }
    }
    opts.step(Step::CommitReceived);
    for f in &restored.files {
        f.mem.inner.gate().await_old_owner();
    }
    if send(sock, &Msg::new(OP_DONE, offer.crc)).is_err() {
        // The old owner is gone (after COMMIT), and its mappings with it.
        release_all(&restored);
    } else {
        watch_release(sock, &restored);
    }
    opts.step(Step::DoneSent);
    Ok(restored)
}

fn release_all(restored: &Restored) {
    for f in &restored.files {
        f.mem.inner.gate().old_owner_released();
    }
}

/// Lets the files convert to private once the old owner has revoked its mappings: when it
/// sends `RELEASED`, or when its end of the socket closes (it is gone). A thread waits for
/// that on a copy of the socket (the caller may close its own); if none can be started, this
/// call waits itself.
fn watch_release(sock: BorrowedFd<'_>, restored: &Restored) {
    let engines: Vec<std::sync::Weak<Engine>> = restored
        .files
        .iter()
        .map(|f| std::sync::Arc::downgrade(&f.mem.inner))
        .collect();
    let wait = move |sock: BorrowedFd<'_>| loop {
        match recv(sock, None) {
            Ok(Got::Msg(m, _)) if m.op == OP_RELEASED => break true,
            Ok(Got::Closed) => break true,
            Ok(Got::Msg(..) | Got::TimedOut) => {}
            // Anything else the socket carries is passed over: only `RELEASED` or the end
            // of the old owner lets go, and a datagram that is no message must not make the
            // files refuse to go private for good.
            Err(e @ HandoverError::Protocol { .. }) => {
                tracing::warn!("passing over a datagram before RELEASED: {e}");
            }
            Err(e) => {
                // Not knowing whether it let go, the files keep refusing to go private.
                tracing::error!("waiting for the old owner's RELEASED: {e}");
                break false;
            }
        }
    };
    let done = move |released: bool, engines: &[std::sync::Weak<Engine>]| {
        if released {
            for e in engines.iter().filter_map(std::sync::Weak::upgrade) {
                e.gate().old_owner_released();
            }
        }
    };
    let own = rustix::io::fcntl_dupfd_cloexec(sock, 0);
    let spawned = own.map_err(std::io::Error::from).and_then(|fd: OwnedFd| {
        let engines = engines.clone();
        std::thread::Builder::new()
            .name("gmem-handover".into())
            .spawn(move || done(wait(fd.as_fd()), &engines))
    });
    if let Err(e) = spawned {
        tracing::warn!("no thread to wait for RELEASED ({e}): waiting here");
        done(wait(sock), &engines);
    }
}

fn read_state(offer: &OfferInfo, f: &OwnedFd) -> Result<Vec<u8>, HandoverError> {
    let st = fd::fstat(f.as_fd()).map_err(io("fstat state"))?;
    let len = u64::try_from(st.st_size).unwrap_or(u64::MAX);
    if len != offer.state_len {
        return Err(HandoverError::Protocol {
            what: "state length differs from the offer",
        });
    }
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > MAX_STATE_LEN {
        return Err(super::super::error::FormatError::TooLarge { len }.into());
    }
    let seals = rustix::fs::fcntl_get_seals(f).map_err(os("F_GET_SEALS"))?;
    if !seals.contains(
        rustix::fs::SealFlags::WRITE | rustix::fs::SealFlags::GROW | rustix::fs::SealFlags::SHRINK,
    ) {
        return Err(HandoverError::Protocol {
            what: "state is not sealed",
        });
    }
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let at = u64::try_from(done).unwrap_or(u64::MAX);
        let n = fd::pread(f.as_fd(), &mut buf[done..], at).map_err(io("pread state"))?;
        if n == 0 {
            return Err(HandoverError::Protocol {
                what: "state shorter than announced",
            });
        }
        done += n;
    }
    Ok(buf)
}

/// Checks the state and the received files against the offer and each other, and builds
/// the files from them with everything the state recorded.
fn verify(
    offer: &OfferInfo,
    state_fd: &OwnedFd,
    files: Vec<OwnedFd>,
) -> Result<Restored, HandoverError> {
    let state = decode_offered(offer, state_fd)?;
    let n = state.files.len();
    check_file_count(offer, &state, files.len())?;
    let mut files = files;
    let mut companions = files.split_off(n).into_iter();
    let mut ids: Vec<FileId> = Vec::with_capacity(files.len());
    let mut out = Vec::with_capacity(files.len());
    for (i, (fs, f)) in state.files.into_iter().zip(files).enumerate() {
        check_file(i, &fs, &f, &mut ids)?;
        let attrs = run_map(&fs.runs, fs.pages());
        let mem = adopt_file(i, &fs, f, attrs, &mut companions)?;
        let pins = restore_file(i, &mem, &fs)?;
        out.push(RestoredFile {
            mem,
            state: fs,
            pins,
        });
    }
    Ok(Restored {
        files: out,
        generation: state.generation,
        old_owner_gone: false,
    })
}

/// Reads the state, checks it against the offer's checksum and decodes it.
fn decode_offered(offer: &OfferInfo, state_fd: &OwnedFd) -> Result<State, HandoverError> {
    let bytes = read_state(offer, state_fd)?;
    if super::super::crc::crc32c(&bytes) != offer.crc {
        return Err(HandoverError::Protocol {
            what: "state checksum differs from the offer",
        });
    }
    Ok(State::decode(&bytes)?)
}

/// Checks that `received` descriptors are one per file of the state plus one companion per
/// HugeTLB file, and that the offer announced as many files as the state holds.
fn check_file_count(
    offer: &OfferInfo,
    state: &State,
    received: usize,
) -> Result<(), HandoverError> {
    let huge = state
        .files
        .iter()
        .filter(|f| matches!(f.kind, BackingKind::HugeTlb(_)))
        .count();
    let n = state.files.len();
    if received != n + huge || usize::try_from(offer.files).ok() != Some(n) {
        return Err(HandoverError::Protocol {
            what: "file count differs from the descriptors",
        });
    }
    Ok(())
}

/// Checks file `i` against its record: size, identity (not seen before in `ids`, where it
/// is added), huge page size, and the seals and size of the received backing.
fn check_file(
    i: usize,
    fs: &FileState,
    f: &OwnedFd,
    ids: &mut Vec<FileId>,
) -> Result<(), HandoverError> {
    let mismatch = |what| HandoverError::Mismatch { file: i, what };
    let st = fd::fstat(f.as_fd()).map_err(io("fstat file"))?;
    if u64::try_from(st.st_size).ok() != Some(fs.size) {
        return Err(mismatch("size differs from fstat"));
    }
    let id = FileId {
        dev: st.st_dev,
        ino: st.st_ino,
    };
    if id != fs.id {
        return Err(mismatch("identity differs from fstat"));
    }
    if ids.contains(&id) {
        return Err(mismatch("the same file twice"));
    }
    ids.push(id);
    let block_ok = match fs.kind {
        BackingKind::HugeTlb(page) => u64::try_from(st.st_blksize).ok() == Some(page),
        _ => true,
    };
    if !block_ok {
        return Err(mismatch("huge page size differs from fstat"));
    }
    crate::backing::check_received(f.as_fd(), fs.kind, fs.size).map_err(mismatch)
}

/// Builds the engine of file `i` over `f` (and, for HugeTLB, the next of `companions`, its
/// file of pieces) with the recorded attributes `attrs`.
fn adopt_file(
    i: usize,
    fs: &FileState,
    f: OwnedFd,
    attrs: AttrMap,
    companions: &mut impl Iterator<Item = OwnedFd>,
) -> Result<GuestMemfd, HandoverError> {
    let mismatch = |what| HandoverError::Mismatch { file: i, what };
    let pieces = match fs.kind {
        BackingKind::HugeTlb(_) => {
            let p = companions.next().ok_or(mismatch("no companion file"))?;
            crate::backing::check_received(p.as_fd(), BackingKind::Shmem, fs.size)
                .map_err(|_| mismatch("companion file of the wrong size or not sealed"))?;
            Some(p)
        }
        _ => None,
    };
    let backing: Box<dyn Backing> = Box::new(
        Received::new(f, fs.kind, fs.block_size, pieces, fs.size).map_err(io("adopt file"))?,
    );
    let how = Assembly {
        attrs: Some(attrs),
        ..Assembly::default()
    };
    Ok(GuestMemfd::from_engine(
        Engine::assemble(backing, fs.size, fs.flags, how)?,
        true,
    ))
}

/// Restores what the record of file `i` says beyond attributes, in order: restructuring,
/// poison, NUMA policy; then takes its pins again and returns them with their tags.
fn restore_file(
    i: usize,
    mem: &GuestMemfd,
    fs: &FileState,
) -> Result<Vec<(u64, Pin)>, HandoverError> {
    let restore = |what, errno| HandoverError::Restore {
        file: i,
        what,
        errno,
    };
    restore_restructure(mem, &fs.restructure).map_err(|errno| restore("restructuring", errno))?;
    for &p in &fs.poison {
        mem.inject_poison(p)
            .map_err(|e| restore("poison", e.errno()))?;
    }
    if fs.numa != super::super::format::NumaRecord::default() {
        let policy: NumaPolicy = fs
            .numa
            .to_policy()
            .map_err(|e| restore("NUMA policy", e.errno()))?;
        mem.set_numa_policy(&policy)
            .map_err(|e| restore("NUMA policy", e.errno()))?;
    }
    let mut pins = Vec::with_capacity(fs.pins.len());
    for p in &fs.pins {
        pins.push((p.tag, mem.pin(p.offset, p.len)?));
    }
    Ok(pins)
}

/// Marks the huge pages the old owner had split (their pieces are in the companion file)
/// and those waiting to merge (they merge once their pins are dropped, as in the old owner).
fn restore_restructure(
    mem: &GuestMemfd,
    records: &[super::super::format::Restructured],
) -> Result<(), i32> {
    let Some(geo) = mem.inner.geometry() else {
        return Ok(());
    };
    let mut split = Vec::new();
    let mut waiting = Vec::new();
    for r in records {
        let mut at = r.offset;
        while at < r.offset + r.len {
            let h = at / geo.size;
            split.push(h);
            if r.kind == RestructureKind::PendingMerge {
                waiting.push(h);
            }
            at += geo.size;
        }
    }
    mem.inner.adopt_split(&split, &waiting).map_err(|e| e.errno)
}

/// Builds the run map from validated runs (starts increasing from 0, below `pages`), its
/// words faulted in with one call (this runs while the old owner is frozen).
fn run_map(runs: &[RunRecord], pages: u64) -> AttrMap {
    AttrMap::from_runs(
        pages,
        runs.iter().map(|r| (r.start_page, r.attr)),
        crate::sys::mapping::populate_words,
    )
}
