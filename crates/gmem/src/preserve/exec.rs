//! Hand-over to a process started with inherited descriptors.
//!
//! Instead of sending the descriptors with `SCM_RIGHTS`, the old owner starts the new
//! program with them open: the state memfd, every file, and one end of a control socket on
//! which the same two-phase protocol runs ([`super::handover`]: `ACCEPT`, `COMMIT`, `DONE`).
//! Their numbers travel in the environment variable [`HANDOVER_ENV`]:
//!
//! ```text
//! GMEM_HANDOVER=v1;sock=<fd>;state=<fd>;len=<state length>;crc=<hex crc32c>;files=<fd>,<fd>,...
//! ```
//!
//! The descriptors stay close-on-exec in the old owner and are made inheritable only in the
//! child, between `fork` and `exec`, so no other program started concurrently inherits them.
//! The new program calls [`receive_inherited`] first thing. Crash behaviour is the socket
//! hand-over's: the old owner keeps ownership until the new program has confirmed.
//!
//! With `sock=-` ([`exec_replacing`]), the old program replaces itself: `exec` either fails
//! (the old owner thaws and goes on) or the new image runs with every descriptor, and owns at
//! once.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};

use super::error::{os, HandoverError};
use super::handover::{
    finish_new, finish_old, freeze, FileOffer, HandedOver, OfferInfo, Options, Restored, Step,
};

/// The environment variable naming the inherited descriptors.
pub const HANDOVER_ENV: &str = "GMEM_HANDOVER";

/// A new owner started by [`spawn_with_inherited`].
#[derive(Debug)]
pub struct Spawned {
    /// The child process (wait for it or let it run; it is the new owner on success).
    pub child: Child,
    /// How the hand-over ended. On error this process still owns the files (thawed).
    pub outcome: Result<HandedOver, HandoverError>,
}

/// The value of [`HANDOVER_ENV`]. `files` lists every file descriptor (HugeTLB pieces
/// included) and `count` the number of files offered, as the `OFFER` message carries it.
fn env_value(
    sock: Option<RawFd>,
    state: RawFd,
    len: usize,
    crc: u32,
    files: &[RawFd],
    count: u32,
) -> String {
    let sock = sock.map_or("-".to_string(), |s| s.to_string());
    let files: Vec<String> = files.iter().map(|f| f.to_string()).collect();
    format!(
        "v1;sock={sock};state={state};len={len};crc={crc:08x};files={};count={count}",
        files.join(",")
    )
}

/// Makes `fds` inheritable in the child, between `fork` and `exec`.
fn inherit_in_child(cmd: &mut Command, fds: Vec<RawFd>) {
    let hook = move || {
        for &fd in &fds {
            // SAFETY: fcntl is async-signal-safe; `fd` is open in the child (forked from a
            // parent that holds it) and clearing FD_CLOEXEC changes no Rust-owned state.
            let ret = unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
            if ret == -1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook only calls fcntl, which is async-signal-safe, and allocates nothing.
    unsafe { cmd.pre_exec(hook) };
}

/// Starts `cmd` as the new owner of `offers`, with the descriptors inherited, and runs the
/// two-phase hand-over with it. Fails before starting anything when the files cannot be
/// frozen or the program cannot be started (the files are then thawed).
pub fn spawn_with_inherited(
    offers: &[FileOffer],
    cmd: &mut Command,
    opts: &Options,
) -> Result<Spawned, HandoverError> {
    let frozen = freeze(offers, opts.generation)?;
    opts.step(Step::Frozen);
    let (mine, theirs) = socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(os("socketpair"))?;
    let fds: Vec<RawFd> = frozen.fds().iter().map(|f| f.as_raw_fd()).collect();
    let (state, files) = fds.split_first().ok_or(HandoverError::Protocol {
        what: "no descriptors",
    })?;
    let value = env_value(
        Some(theirs.as_raw_fd()),
        *state,
        frozen.state_len,
        frozen.crc,
        files,
        frozen.offer_msg().files,
    );
    let mut all = fds.clone();
    all.push(theirs.as_raw_fd());
    inherit_in_child(cmd, all);
    cmd.env(HANDOVER_ENV, value);
    let child = cmd.spawn().map_err(|source| HandoverError::Os {
        op: "spawn",
        source,
    })?;
    drop(theirs);
    opts.step(Step::OfferSent);
    let outcome = finish_old(mine.as_fd(), frozen, opts);
    Ok(Spawned { child, outcome })
}

/// Replaces this program with `cmd`, handing `offers` over through inherited descriptors.
/// Returns only when that fails, with the files thawed and still owned here.
pub fn exec_replacing(offers: &[FileOffer], cmd: &mut Command, opts: &Options) -> HandoverError {
    let frozen = match freeze(offers, opts.generation) {
        Ok(f) => f,
        Err(e) => return e,
    };
    opts.step(Step::Frozen);
    let fds: Vec<RawFd> = frozen.fds().iter().map(|f| f.as_raw_fd()).collect();
    let Some((state, files)) = fds.split_first() else {
        return HandoverError::Protocol {
            what: "no descriptors",
        };
    };
    cmd.env(
        HANDOVER_ENV,
        env_value(
            None,
            *state,
            frozen.state_len,
            frozen.crc,
            files,
            frozen.offer_msg().files,
        ),
    );
    inherit_in_child_exec(&fds);
    let err = cmd.exec();
    restore_cloexec(&fds);
    drop(frozen);
    HandoverError::Os {
        op: "exec",
        source: err,
    }
}

/// For `exec` without `fork`: clears close-on-exec in this process (restored on failure).
fn inherit_in_child_exec(fds: &[RawFd]) {
    for &fd in fds {
        // SAFETY: `fd` is open (held by the frozen files); F_SETFD changes only its flag.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    }
}

fn restore_cloexec(fds: &[RawFd]) {
    for &fd in fds {
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

struct Parsed {
    sock: Option<RawFd>,
    state: RawFd,
    len: u64,
    crc: u32,
    files: Vec<RawFd>,
    /// Files offered (fewer than descriptors when HugeTLB pieces travel too).
    count: u32,
}

fn parse_env(v: &str) -> Result<Parsed, HandoverError> {
    let bad = |what| HandoverError::Protocol { what };
    let mut it = v.split(';');
    if it.next() != Some("v1") {
        return Err(bad("GMEM_HANDOVER version"));
    }
    let mut field = |name: &str| -> Result<&str, HandoverError> {
        let kv = it.next().ok_or(bad("GMEM_HANDOVER field missing"))?;
        kv.strip_prefix(name)
            .and_then(|r| r.strip_prefix('='))
            .ok_or(bad("GMEM_HANDOVER field out of order"))
    };
    let fd = |s: &str| {
        s.parse::<RawFd>()
            .ok()
            .filter(|&f| f >= 0)
            .ok_or(bad("GMEM_HANDOVER descriptor"))
    };
    let sock = match field("sock")? {
        "-" => None,
        s => Some(fd(s)?),
    };
    let state = fd(field("state")?)?;
    let len = field("len")?
        .parse()
        .map_err(|_| bad("GMEM_HANDOVER len"))?;
    let crc = u32::from_str_radix(field("crc")?, 16).map_err(|_| bad("GMEM_HANDOVER crc"))?;
    let files_s = field("files")?;
    let files = files_s.split(',').map(fd).collect::<Result<Vec<_>, _>>()?;
    if files.is_empty() || files.len() > super::format::MAX_FILES {
        return Err(bad("GMEM_HANDOVER file count"));
    }
    let count: u32 = field("count")?
        .parse()
        .map_err(|_| bad("GMEM_HANDOVER count"))?;
    let mut all: Vec<RawFd> = files.clone();
    all.push(state);
    all.extend(sock);
    all.sort_unstable();
    if all.windows(2).any(|w| w[0] == w[1]) {
        return Err(bad("GMEM_HANDOVER names a descriptor twice"));
    }
    Ok(Parsed {
        sock,
        state,
        len,
        crc,
        files,
        count,
    })
}

fn adopt(fd: RawFd) -> Result<OwnedFd, HandoverError> {
    // SAFETY: F_GETFD only reads the descriptor's flags; it fails with EBADF when not open.
    let ret = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if ret == -1 {
        return Err(HandoverError::Os {
            op: "inherited descriptor",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the descriptor is open, and the caller of `receive_inherited` guarantees that
    // nothing else in this process owns the descriptors named in the environment.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Keep them out of programs this process starts later.
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC).map_err(os("F_SETFD"))?;
    Ok(owned)
}

/// Receives files handed over through inherited descriptors ([`spawn_with_inherited`] or
/// [`exec_replacing`]). Returns `Ok(None)` when [`HANDOVER_ENV`] is not set (this program was
/// not started for a hand-over), and the restored files once this process owns them.
///
/// # Safety
///
/// The descriptors named in [`HANDOVER_ENV`] must be open and owned by nothing else in this
/// process (true at program start, when they were inherited); this function takes ownership
/// of them. Call it once.
pub unsafe fn receive_inherited(opts: &Options) -> Result<Option<Restored>, HandoverError> {
    let Ok(v) = std::env::var(HANDOVER_ENV) else {
        return Ok(None);
    };
    let p = parse_env(&v)?;
    // Adopt the socket first, so that any failure below still reaches the old owner as a
    // closed socket or a REJECT.
    let sock = p.sock.map(adopt).transpose()?;
    let state = adopt(p.state)?;
    let files = p
        .files
        .iter()
        .map(|&f| adopt(f))
        .collect::<Result<Vec<_>, _>>()?;
    let offer = OfferInfo {
        crc: p.crc,
        state_len: p.len,
        files: p.count,
    };
    opts.step(Step::OfferReceived);
    let sock_fd: Option<BorrowedFd<'_>> = sock.as_ref().map(|s| s.as_fd());
    finish_new(sock_fd, &offer, state, files, opts).map(Some)
}
