//! Errors of the preserved-state parser and of the hand-over.

use std::io;

use crate::engine::access::AccessError;
use crate::engine::convert::ConvertError;
use crate::engine::CreateError;
use crate::model::error::Errno;

use super::handover::step::Step;

/// Why a preserved state was refused. Every variant names where in the input it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The state is larger than [`super::format::MAX_STATE_LEN`] (`E2BIG`).
    #[error("state of {len} bytes exceeds the limit")]
    TooLarge {
        /// Length of the input.
        len: usize,
    },
    /// The input ends before a field it announces (`EPROTO`).
    #[error("truncated at byte {at}: {need} more bytes needed")]
    Truncated {
        /// Offset of the field that does not fit.
        at: usize,
        /// Bytes the field needs.
        need: usize,
    },
    /// A field holds a value the format does not allow (`EPROTO`).
    #[error("invalid {what} at byte {at}")]
    Invalid {
        /// Offset of the field.
        at: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// The state was written by a version this build does not read (`EPROTONOSUPPORT`).
    #[error("unsupported state version {version}")]
    Version {
        /// Version found.
        version: u16,
    },
    /// The checksum does not match the contents (`EBADMSG`).
    #[error("checksum {actual:#010x} does not match {expected:#010x}")]
    Checksum {
        /// Checksum stored in the header.
        expected: u32,
        /// Checksum of the bytes received.
        actual: u32,
    },
    /// A mandatory section this build does not know (`EPROTONOSUPPORT`).
    #[error("unknown mandatory section {tag} at byte {at}")]
    UnknownSection {
        /// Offset of the section header.
        at: usize,
        /// Its tag.
        tag: u16,
    },
    /// A known section in a version this build does not read (`EPROTONOSUPPORT`).
    #[error("section {tag} at byte {at} has unsupported version {version}")]
    SectionVersion {
        /// Offset of the section header.
        at: usize,
        /// Its tag.
        tag: u16,
        /// Version found.
        version: u16,
    },
}

impl Errno for FormatError {
    fn errno(&self) -> i32 {
        match self {
            FormatError::TooLarge { .. } => libc::E2BIG,
            FormatError::Truncated { .. } | FormatError::Invalid { .. } => libc::EPROTO,
            FormatError::Version { .. }
            | FormatError::UnknownSection { .. }
            | FormatError::SectionVersion { .. } => libc::EPROTONOSUPPORT,
            FormatError::Checksum { .. } => libc::EBADMSG,
        }
    }
}

impl FormatError {
    /// The byte offset in the state where the problem was found.
    pub fn offset(&self) -> usize {
        match self {
            FormatError::TooLarge { .. } => super::format::MAX_STATE_LEN,
            FormatError::Truncated { at, .. }
            | FormatError::Invalid { at, .. }
            | FormatError::UnknownSection { at, .. }
            | FormatError::SectionVersion { at, .. } => *at,
            FormatError::Version { .. } => 8,
            FormatError::Checksum { .. } => 32,
        }
    }
}

/// Why a hand-over failed. On every error the side that reports it still owns what it owned
/// before (the old owner has thawed its files; the new one holds nothing).
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// A syscall failed.
    #[error("{op}: {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The state could not be parsed.
    #[error("preserved state: {0}")]
    Format(#[from] FormatError),
    /// A message of the hand-over protocol was malformed or out of order (`EPROTO`).
    #[error("hand-over protocol: {what}")]
    Protocol {
        /// What was wrong.
        what: &'static str,
    },
    /// A received descriptor does not match the state (`EBADF`). `offset` is the file's
    /// index in the state.
    #[error("file {file}: {what}")]
    Mismatch {
        /// Index of the file in the state.
        file: usize,
        /// What does not match.
        what: &'static str,
    },
    /// The other side went away at `step` (`ECONNRESET`).
    #[error("the other side went away at step {step:?}")]
    PeerGone {
        /// The last step this side had completed.
        step: Step,
    },
    /// The new owner refused the offer with `errno`.
    #[error("the new owner refused the state (errno {errno})")]
    Rejected {
        /// The errno the new owner reported.
        errno: i32,
    },
    /// The old owner called the hand-over off (`ECANCELED`).
    #[error("the old owner aborted the hand-over")]
    Aborted,
    /// The other side did not answer in time (`ETIMEDOUT`).
    #[error("no answer at step {step:?}")]
    Timeout {
        /// The last step completed.
        step: Step,
    },
    /// A file cannot be handed over now: it follows another process, is already frozen
    /// or was handed over (`EBUSY`). `file` is its index in the offer.
    #[error("file {file} cannot be handed over: {what}")]
    Busy {
        /// Index of the file in the offer.
        file: usize,
        /// Why.
        what: &'static str,
    },
    /// A host reference (a pin) on the file is not among the offer's pins: the hand-over
    /// would leave it behind on a page the new owner may make private (`EBUSY`).
    #[error("file {file}: a pin at offset {offset:#x} is not offered")]
    UnlistedPin {
        /// Index of the file in the offer.
        file: usize,
        /// First page held by a pin the offer does not list.
        offset: u64,
    },
    /// A conversion listener of a file (a device holding a page, a DMA user) refused to let
    /// it go before `COMMIT` (`EBUSY`): its access would outlive the old owner's on a page
    /// the new owner may make private. Nothing was handed over; retry once it let go.
    #[error("file {file}: a listener holds offset {offset:#x}: {reason}")]
    Vetoed {
        /// Index of the file in the offer.
        file: usize,
        /// The first page the listener holds.
        offset: u64,
        /// The listener's reason.
        reason: String,
    },
    /// Restoring part of a file's state in the new owner failed with `errno`.
    #[error("file {file}: restoring the {what} failed (errno {errno})")]
    Restore {
        /// Index of the file.
        file: usize,
        /// What was being restored.
        what: &'static str,
        /// The errno of the failure.
        errno: i32,
    },
    /// A received file could not be set up.
    #[error(transparent)]
    Create(#[from] CreateError),
    /// Host access failed: a recorded pin could not be taken again, or a file to copy has
    /// no mapping.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// Restoring an attribute on a copied file failed.
    #[error(transparent)]
    Convert(#[from] ConvertError),
}

impl Errno for HandoverError {
    fn errno(&self) -> i32 {
        match self {
            HandoverError::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            HandoverError::Format(e) => e.errno(),
            HandoverError::Protocol { .. } => libc::EPROTO,
            HandoverError::Mismatch { .. } => libc::EBADF,
            HandoverError::PeerGone { .. } => libc::ECONNRESET,
            HandoverError::Rejected { errno } => *errno,
            HandoverError::Aborted => libc::ECANCELED,
            HandoverError::Timeout { .. } => libc::ETIMEDOUT,
            HandoverError::Busy { .. }
            | HandoverError::UnlistedPin { .. }
            | HandoverError::Vetoed { .. } => libc::EBUSY,
            HandoverError::Restore { errno, .. } => *errno,
            HandoverError::Create(e) => e.errno(),
            HandoverError::Access(e) => e.errno(),
            HandoverError::Convert(e) => e.errno(),
        }
    }

    /// The page a pin or a listener holds, or the inner error's offset.
    fn error_offset(&self) -> Option<u64> {
        match self {
            HandoverError::UnlistedPin { offset, .. } | HandoverError::Vetoed { offset, .. } => {
                Some(*offset)
            }
            HandoverError::Access(e) => e.error_offset(),
            HandoverError::Convert(e) => e.error_offset(),
            _ => None,
        }
    }
}

pub(crate) fn os(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> HandoverError {
    move |e| HandoverError::Os {
        op,
        source: e.into(),
    }
}

pub(crate) fn io(op: &'static str) -> impl FnOnce(io::Error) -> HandoverError {
    move |source| HandoverError::Os { op, source }
}
