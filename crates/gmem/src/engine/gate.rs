//! Who may use a file now: the one check every verb makes before it touches state.
//!
//! A file refuses work (`EPERM`) when this process no longer owns it (handed over by a live
//! update), when the caller is a forked child (the file's mappings and userfaultfd belong to
//! the parent's address space), and, for conversions and allocation, when the file follows
//! another process's owner. While a hand-over runs the file is *frozen*: conversions wait for
//! the freeze to end, allocation is refused. From the moment the new owner may own the file
//! (right before `COMMIT` is sent) it is *committing*: host access is refused too, and stays
//! refused once handed over; a hand-over that fails then goes back to frozen, then live. A
//! file received by a hand-over refuses conversions to private (`EAGAIN`) until its old owner
//! has revoked its mappings.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::model::error::Errno;
use crate::sys::fork;

/// Where a file stands in a hand-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Not being handed over: every operation works.
    #[default]
    Live,
    /// A hand-over is running: conversions wait, allocation is `EPERM`.
    Frozen,
    /// The new owner may own the file from the next message on: host access (reads, writes,
    /// pins, new views, the guest view) is `EPERM`, conversions wait. A hand-over that fails
    /// from here goes back to [`Phase::Frozen`].
    Committing,
    /// Handed over to a new owner: every operation is `EPERM`.
    Released,
}

impl Phase {
    fn code(self) -> u8 {
        match self {
            Phase::Live => 0,
            Phase::Frozen => 1,
            Phase::Committing => 2,
            Phase::Released => 3,
        }
    }

    fn from_code(c: u8) -> Phase {
        match c {
            0 => Phase::Live,
            1 => Phase::Frozen,
            2 => Phase::Committing,
            _ => Phase::Released,
        }
    }
}

/// Why the gate refused. Every case is `EPERM`: this process may not do that with the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    /// The file was handed over to a new owner by a live update.
    #[error("the file was handed over to another process")]
    Released,
    /// A live update is handing the file over: the new owner may own it already.
    #[error("the file is being handed over to another process")]
    Committing,
    /// The caller is a forked child of the process that owns the file.
    #[error("the file belongs to the parent process (this is a forked child)")]
    Forked,
    /// The file follows another process; conversions and allocation are the owner's.
    #[error("conversions are made by the owning process")]
    Follower,
    /// Allocation during a live-update hand-over.
    #[error("the file is frozen for a live-update hand-over")]
    Frozen,
}

impl Errno for GateError {
    fn errno(&self) -> i32 {
        libc::EPERM
    }
}

/// The gate of one file.
#[derive(Debug)]
pub(crate) struct Gate {
    phase: AtomicU8,
    lock: Mutex<()>,
    thawed: Condvar,
    generation: u64,
    follower: bool,
    /// The old owner of a hand-over may still map the file (it has not sent `RELEASED`).
    old_owner_maps: AtomicBool,
}

impl Gate {
    pub fn new(follower: bool) -> Self {
        Gate {
            phase: AtomicU8::new(Phase::Live.code()),
            lock: Mutex::new(()),
            thawed: Condvar::new(),
            generation: fork::generation(),
            follower,
            old_owner_maps: AtomicBool::new(false),
        }
    }

    /// The file was received from an old owner that still maps it: conversions to private
    /// are refused (`EAGAIN`) until [`Gate::old_owner_released`].
    pub fn await_old_owner(&self) {
        self.old_owner_maps.store(true, Ordering::Release);
    }

    /// The old owner revoked every mapping of the file, or is gone.
    pub fn old_owner_released(&self) {
        self.old_owner_maps.store(false, Ordering::Release);
    }

    /// True while the old owner of a hand-over may still map the file.
    pub fn old_owner_maps(&self) -> bool {
        self.old_owner_maps.load(Ordering::Acquire)
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        Phase::from_code(self.phase.load(Ordering::Acquire))
    }

    /// True when the file follows another process.
    pub fn is_follower(&self) -> bool {
        self.follower
    }

    /// True in the process (and fork generation) that created the file.
    pub fn in_creator(&self) -> bool {
        self.generation == fork::generation()
    }

    /// `EPERM` in a forked child. The accessors also ask it before they wait for the
    /// page-state lock: a lock that a thread of the parent held at the fork is never given
    /// back in the child.
    pub fn creator(&self) -> Result<(), GateError> {
        if self.in_creator() {
            Ok(())
        } else {
            Err(GateError::Forked)
        }
    }

    /// Queries of the page state (attributes, poison records): refused in a forked child,
    /// whose copy of the state stopped at the fork, and once handed over, when the new owner
    /// converts. While a hand-over commits the state is still the file's (the new owner
    /// makes no page private before the release).
    pub fn queries(&self) -> Result<(), GateError> {
        self.creator()?;
        match self.phase() {
            Phase::Released => Err(GateError::Released),
            Phase::Live | Phase::Frozen | Phase::Committing => Ok(()),
        }
    }

    /// Host access (read, write, pin, map): refused while a hand-over commits, once handed
    /// over, and in a forked child.
    pub fn access(&self) -> Result<(), GateError> {
        self.creator()?;
        match self.phase() {
            Phase::Committing => Err(GateError::Committing),
            Phase::Released => Err(GateError::Released),
            Phase::Live | Phase::Frozen => Ok(()),
        }
    }

    /// Changes that only an owner makes (conversion, poison, allocation): also refused on a
    /// follower.
    pub fn owner(&self) -> Result<(), GateError> {
        self.owner_anytime()?;
        self.access()
    }

    /// Allocation and punch-hole: refused while frozen too.
    pub fn allocation(&self) -> Result<(), GateError> {
        self.owner()?;
        if self.phase() == Phase::Frozen {
            return Err(GateError::Frozen);
        }
        Ok(())
    }

    /// The checks of [`Gate::owner`] that do not depend on the phase.
    fn owner_anytime(&self) -> Result<(), GateError> {
        self.creator()?;
        if self.follower {
            return Err(GateError::Follower);
        }
        Ok(())
    }

    /// Takes `control` once the file is live: waits while it is frozen or committing, fails
    /// once handed over. The phase is checked under the control lock, and [`Gate::set`] is
    /// called under it too, so no conversion starts after a freeze has taken its snapshot.
    pub fn lock_live<'a, T>(&self, control: &'a Mutex<T>) -> Result<MutexGuard<'a, T>, GateError> {
        let waits = |p| matches!(p, Phase::Frozen | Phase::Committing);
        loop {
            self.owner_anytime()?;
            let ctl = control.lock().unwrap_or_else(|e| e.into_inner());
            match self.phase() {
                Phase::Live => return Ok(ctl),
                Phase::Released => return Err(GateError::Released),
                Phase::Frozen | Phase::Committing => {
                    drop(ctl);
                    let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                    while waits(self.phase()) {
                        g = self.thawed.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
        }
    }

    /// Moves to `phase` and wakes waiting conversions. Callers hold the control lock.
    pub fn set(&self, phase: Phase) {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.phase.store(phase.code(), Ordering::Release);
        self.thawed.notify_all();
    }
}
