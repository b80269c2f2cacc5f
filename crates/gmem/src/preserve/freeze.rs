//! The live-update freeze of one file.
//!
//! While a hand-over runs, the file is *frozen*: the state sent to the new owner must stay
//! true until the new owner confirms. So:
//!
//! - conversions **wait** (they block until the hand-over ends; a VMM pauses its vCPUs for the
//!   hand-over anyway, and a conversion that arrives during the pause goes through as soon as
//!   the old owner resumes, or fails with `EPERM` ([`ConvertError::NotOwner`]) once the file
//!   has been handed over, because this process no longer owns it);
//! - `fallocate` (allocation and punch-hole) is refused with `EPERM`, as the kernel's
//!   live-update freeze of a guest_memfd refuses new allocation;
//! - contents stay writable through the guest view and host views: they are the file itself,
//!   shared with the new owner, not part of the state.
//!
//! [`ConvertError::NotOwner`]: crate::ConvertError::NotOwner

use std::sync::{Condvar, Mutex, MutexGuard};

use crate::convert::ConvertError;
use crate::file::{Control, Inner};

/// Where a file stands in a hand-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Not being handed over: every operation works.
    #[default]
    Live,
    /// A hand-over is running: conversions wait, allocation is `EPERM`.
    Frozen,
    /// Handed over to a new owner: conversions and allocation are `EPERM`.
    Released,
}

/// The freeze state of a file (one per file, inside the core's shared state).
#[derive(Debug, Default)]
pub struct Freeze {
    phase: Mutex<Phase>,
    thawed: Condvar,
}

impl Freeze {
    fn lock(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.lock()
    }

    /// Takes the file's control lock once the file is live: waits while it is frozen and
    /// fails with `EPERM` once it has been handed over. The phase is checked under the control
    /// lock, and [`Freeze::set`] is called under it too, so no conversion can start after a
    /// freeze has taken its snapshot.
    pub(crate) fn lock_control<'a>(
        &self,
        inner: &'a Inner,
    ) -> Result<MutexGuard<'a, Control>, ConvertError> {
        loop {
            let ctl = inner.control();
            match self.phase() {
                Phase::Live => return Ok(ctl),
                Phase::Released => return Err(ConvertError::NotOwner),
                Phase::Frozen => {
                    drop(ctl);
                    let mut phase = self.lock();
                    while *phase == Phase::Frozen {
                        phase = self.thawed.wait(phase).unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
        }
    }

    /// True while frozen or handed over: `fallocate` answers `EPERM`.
    pub(crate) fn refuses_allocation(&self) -> bool {
        self.phase() != Phase::Live
    }

    /// Moves to `phase` and wakes waiting conversions. Callers hold the control lock.
    pub(crate) fn set(&self, phase: Phase) {
        *self.lock() = phase;
        self.thawed.notify_all();
    }
}
