//! Participants: everything outside this process's own page tables that must follow a
//! conversion — peer processes that map the file, the kernel's memory attributes of the VMs
//! the file is bound to — applied through one interface, all or nothing.
//!
//! The engine applies each [`Step`] of a conversion to its own views first and then to every
//! participant in registration order ([`Participants::apply`]); when one fails, those that
//! applied it are told to undo it, in reverse order, and the engine undoes its own part, so
//! the file is as it was. This fan-out exists once, here.

use std::fmt;

use crate::model::error::Errno;
use crate::model::units::ByteRange;

use super::gate::GateError;
use super::Engine;

/// One change a conversion (or poison, or punch-hole) makes, as a participant applies it.
/// Ranges are file bytes, page aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The pages become private: stop every host access to them (a participant that holds
    /// one of them refuses with `EAGAIN` naming it).
    Revoke(ByteRange),
    /// The pages become shared.
    Restore(ByteRange),
    /// HugeTLB: the huge page is about to be split or merged: hold off every writer of it
    /// until the [`Step::Split`] or [`Step::Merge`] that follows (or a [`Step::Thaw`]), so
    /// that nothing written to the copy being taken is lost. A participant that holds a
    /// page of it refuses with `EAGAIN` naming it.
    Freeze(ByteRange),
    /// HugeTLB: the split or merge a [`Step::Freeze`] announced did not happen; writers of
    /// the huge page go on where they were.
    Thaw(ByteRange),
    /// HugeTLB: the huge page is split into 4 KiB pieces (its contents are already in the
    /// companion file of pieces); writers a [`Step::Freeze`] held go on on the pieces.
    Split(ByteRange),
    /// HugeTLB: the huge page is merged back (its contents are already in the huge page);
    /// writers a [`Step::Freeze`] held go on on the huge page.
    Merge(ByteRange),
    /// The page is poisoned (memory failure).
    Poison(ByteRange),
    /// Poison records in the range are cleared (a punch-hole gave the pages fresh memory).
    Unpoison(ByteRange),
    /// The range was punched out of the file: put the markers of its private and poisoned
    /// pages back (the kernel's truncation drops the markers of a page that something else
    /// still mapped at that moment).
    Refresh(ByteRange),
}

impl Step {
    /// The range the step is about.
    pub fn range(&self) -> ByteRange {
        match *self {
            Step::Revoke(r)
            | Step::Restore(r)
            | Step::Freeze(r)
            | Step::Thaw(r)
            | Step::Split(r)
            | Step::Merge(r)
            | Step::Poison(r)
            | Step::Unpoison(r)
            | Step::Refresh(r) => r,
        }
    }

    /// The step that undoes this one.
    pub fn inverse(&self) -> Step {
        match *self {
            Step::Revoke(r) => Step::Restore(r),
            Step::Restore(r) => Step::Revoke(r),
            Step::Freeze(r) => Step::Thaw(r),
            Step::Thaw(r) => Step::Freeze(r),
            Step::Split(r) => Step::Merge(r),
            Step::Merge(r) => Step::Split(r),
            Step::Poison(r) => Step::Unpoison(r),
            Step::Unpoison(r) => Step::Poison(r),
            Step::Refresh(r) => Step::Refresh(r),
        }
    }
}

/// A participant's refusal of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("participant refused at offset {offset:#x} (errno {errno})")]
pub struct StepError {
    /// The errno: `EAGAIN` when the participant holds a page, `ETIMEDOUT` when it did not
    /// answer in time, anything else when it failed.
    pub errno: i32,
    /// The first offending byte offset.
    pub offset: u64,
}

impl Errno for StepError {
    fn errno(&self) -> i32 {
        self.errno
    }
    fn error_offset(&self) -> Option<u64> {
        Some(self.offset)
    }
}

/// Something outside this process's page tables that follows every change of a file.
///
/// [`Participant::apply`] is called with the file's control lock held, after gmem changed its
/// own views (to private) or before (to shared); it must return within a bounded time.
/// [`Participant::undo`] reverses a step it applied, best effort (it is only called during a
/// rollback and must not fail; it logs what it cannot do).
pub trait Participant: Send {
    /// A short name for logs.
    fn name(&self) -> &str;
    /// Applies `step`.
    fn apply(&mut self, step: &Step) -> Result<(), StepError>;
    /// Reverses `step`, which this participant applied.
    fn undo(&mut self, step: &Step);
    /// True once the participant is gone for good (a peer process that died): the engine
    /// drops it.
    fn is_gone(&self) -> bool {
        false
    }
    /// True when the participant is another process that maps the file's pages (a peer
    /// follower): kernel references it takes there are invisible here, so every page counts
    /// as shown by a view while it participates, and a conversion to private moves resident
    /// pages to fresh memory as for a page a view showed.
    fn maps_file(&self) -> bool {
        false
    }
}

/// Handle returned when a participant is added, to remove it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParticipantId(u64);

impl ParticipantId {
    /// A new id, unique across files, so that an id of another file removes nothing.
    fn fresh() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        ParticipantId(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

/// The participants of one file, in registration order.
#[derive(Default)]
pub(crate) struct Participants {
    list: Vec<(ParticipantId, Box<dyn Participant>)>,
}

impl fmt::Debug for Participants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.list.iter().map(|(_, p)| p.name()).collect();
        f.debug_struct("Participants")
            .field("list", &names)
            .finish()
    }
}

impl Participants {
    pub fn add(&mut self, p: Box<dyn Participant>) -> ParticipantId {
        let id = ParticipantId::fresh();
        self.list.push((id, p));
        id
    }

    pub fn remove(&mut self, id: ParticipantId) -> bool {
        let before = self.list.len();
        self.list.retain(|(i, _)| *i != id);
        before != self.list.len()
    }

    /// True when no participant is registered.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// True when a registered participant maps the file in another process.
    pub fn maps_elsewhere(&self) -> bool {
        self.list.iter().any(|(_, p)| p.maps_file())
    }

    /// True when a participant whose name starts with `prefix` is registered.
    pub fn any_named(&self, prefix: &str) -> bool {
        self.list.iter().any(|(_, p)| p.name().starts_with(prefix))
    }

    /// Applies `step` to every participant; on the first refusal undoes it on those that
    /// applied it (reverse order) and returns the refusal. Participants that are gone are
    /// dropped first.
    pub fn apply(&mut self, step: &Step) -> Result<(), StepError> {
        self.list.retain(|(_, p)| !p.is_gone());
        for i in 0..self.list.len() {
            if let Err(e) = self.list[i].1.apply(step) {
                for (_, p) in self.list[..i].iter_mut().rev() {
                    p.undo(step);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Undoes `step` on every participant (reverse order): the rollback of a step all of
    /// them applied.
    pub fn undo(&mut self, step: &Step) {
        for (_, p) in self.list.iter_mut().rev() {
            p.undo(step);
        }
    }

    /// Applies `step` to every participant, logging refusals instead of rolling back: for
    /// changes that cannot be refused (poison, punch-hole).
    pub fn notify(&mut self, step: &Step) {
        self.list.retain(|(_, p)| !p.is_gone());
        for (_, p) in self.list.iter_mut() {
            if let Err(e) = p.apply(step) {
                tracing::error!(participant = p.name(), ?step, "could not follow: {e}");
            }
        }
    }
}

impl Engine {
    /// Adds a participant under the control lock, whatever the phase. In a forked child
    /// nothing is registered (as for listeners, [`Engine::add_listener`]).
    pub(crate) fn add_participant(&self, participant: Box<dyn Participant>) -> ParticipantId {
        if !self.gate().in_creator() {
            return ParticipantId::fresh();
        }
        self.control_unchecked().participants.add(participant)
    }

    /// Removes a participant under the control lock, whatever the phase; false when it was
    /// not registered, and in a forked child.
    pub(crate) fn remove_participant(&self, id: ParticipantId) -> bool {
        self.gate().in_creator() && self.control_unchecked().participants.remove(id)
    }

    /// True when a participant whose name starts with `prefix` is registered (read under the
    /// control lock, whatever the gate says).
    pub(crate) fn has_participant_named(&self, prefix: &str) -> bool {
        self.control_unchecked().participants.any_named(prefix)
    }

    /// Gives the file to another process: once the file is live, takes the control lock
    /// (`EPERM` on a follower, once handed over, in a forked child; waits while frozen) and,
    /// holding it, calls `join`, adds the participant it returns and marks the file shared
    /// out. No change of the file can fall between what `join` reads of it (through the
    /// engine's queries) and the participant's first step. Nothing is added when `join`
    /// fails.
    pub(crate) fn share_out<E: From<GateError>>(
        &self,
        join: impl FnOnce() -> Result<Box<dyn Participant>, E>,
    ) -> Result<ParticipantId, E> {
        let mut ctl = self.control_live()?;
        let participant = join()?;
        if participant.maps_file() {
            // What it maps stays shown after it leaves, until each page moves.
            ctl.views.note_shown(self.all_pages());
        }
        let id = ctl.participants.add(participant);
        self.mark_shared_out();
        Ok(id)
    }
}
