//! Device layers: a conversion listener that also hears of memory failures, registered
//! together with the state it starts from.
//!
//! A device layer (a vm-memory adapter, an IOMMU shadow) keeps its own per-page view of a file
//! so that its hot path can check a page without taking gmem's locks. It must hear of every
//! change of that state (conversions, which it may veto, and poison, which it may not), and it
//! must start from a state that no change can slip past. [`GuestMemfd::add_device_listener`]
//! gives both: the listener and a poison relay are added, and the file's attributes and
//! poison records are read, in one hold of the file's control lock, which every conversion,
//! poison injection and punch-hole takes. So the snapshot plus every notice delivered after
//! it is exactly the file's state.
//!
//! When notices arrive, relative to what host views show:
//!
//! - conversions: [`ConversionListener::prepare`] before anything changes (a veto fails the
//!   conversion with `EAGAIN` at the listener's offset), [`ConversionListener::commit`] once
//!   every view shows the new state (to shared: mapped; to private: faulting), or
//!   [`ConversionListener::abort`];
//! - poison: [`DeviceListener::poisoned`] after gmem's views fault on the page; a holder of
//!   the page that touches it in a view meanwhile faults, as a touch of a failed page does;
//! - a punch-hole clearing poison: [`DeviceListener::unpoisoned`] after the views reach the
//!   shared ones again.
//!
//! On a follower (a file attached from another process) the notices come from the owner's
//! steps as the follower's agent applies them: a revoke is a conversion to private, a
//! restore one to shared (an undo arrives as the opposite conversion), and a veto here fails
//! the owner's conversion with `EAGAIN` at the listener's offset, so a device backend in
//! another process holds pages the way one in the owner does.

use std::sync::Arc;

use crate::engine::gate::GateError;
use crate::engine::listener::{Conversion, ConversionListener, ListenerId, Veto};
use crate::engine::participant::{Participant, ParticipantId, Step, StepError};
use crate::model::error::Errno;
use crate::model::units::page_offset;

use super::{AttrRun, GuestMemfd};

/// A conversion listener that also hears of memory failures (see the module docs for when
/// each notice arrives). Every method runs with the file's control lock held: none may
/// convert, map, poison or register listeners on the same file, and each must return
/// promptly.
pub trait DeviceListener: ConversionListener {
    /// The page at `offset` (page aligned) was poisoned.
    fn poisoned(&self, offset: u64);
    /// The poison records of `[offset, offset + len)` (page aligned) were cleared: a
    /// punch-hole gave those pages fresh memory.
    fn unpoisoned(&self, offset: u64, len: u64);
}

/// The state a [`DeviceListener`] starts from, read in the same hold of the control lock that
/// registered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSnapshot {
    /// The runs of equal attributes covering the whole file, in order.
    pub runs: Vec<AttrRun>,
    /// Byte offsets of the poisoned pages, in order.
    pub poisoned: Vec<u64>,
}

/// Handle of a registered [`DeviceListener`], to remove it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceListenerId {
    listener: ListenerId,
    relay: ParticipantId,
}

/// Why a device listener could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// This process may not use the file (`EPERM`): handed over, or a forked child.
    #[error(transparent)]
    Gate(#[from] GateError),
}

impl Errno for DeviceError {
    fn errno(&self) -> i32 {
        match self {
            DeviceError::Gate(e) => e.errno(),
        }
    }
}

/// The listener half: conversions, delegated.
struct Conversions(Arc<dyn DeviceListener>);

impl ConversionListener for Conversions {
    fn prepare(&self, conv: &Conversion) -> Result<(), Veto> {
        self.0.prepare(conv)
    }

    fn commit(&self, conv: &Conversion) {
        self.0.commit(conv)
    }

    fn abort(&self, conv: &Conversion) {
        self.0.abort(conv)
    }
}

/// The participant half: poison notices, relayed. It follows every other step (it has no
/// mapping of its own to change) and never refuses one.
struct PoisonRelay(Arc<dyn DeviceListener>);

impl Participant for PoisonRelay {
    fn name(&self) -> &str {
        "device-listener"
    }

    fn apply(&mut self, step: &Step) -> Result<(), StepError> {
        match *step {
            Step::Poison(r) => self.0.poisoned(r.start),
            Step::Unpoison(r) => self.0.unpoisoned(r.start, r.len()),
            Step::Revoke(_)
            | Step::Restore(_)
            | Step::Freeze(_)
            | Step::Thaw(_)
            | Step::Split(_)
            | Step::Merge(_)
            | Step::Refresh(_) => {}
        }
        Ok(())
    }

    fn undo(&mut self, step: &Step) {
        // Only conversion and restructuring steps are ever undone, and this participant
        // changed nothing for them.
        let _ = step;
    }
}

impl GuestMemfd {
    /// Adds a [`DeviceListener`] and returns the state it starts from, read in the same hold
    /// of the control lock: every conversion, poison and punch-hole after the snapshot is
    /// told to the listener, none before it is.
    ///
    /// `EPERM` once the file was handed over and in a forked child ([`DeviceError::Gate`]).
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use gmem::{Attr, Conversion, ConversionListener, DeviceListener, Flags, GuestMemfd, Veto};
    ///
    /// #[derive(Default)]
    /// struct Log(Mutex<Vec<String>>);
    /// impl ConversionListener for Log {
    ///     fn prepare(&self, _: &Conversion) -> Result<(), Veto> { Ok(()) }
    ///     fn commit(&self, c: &Conversion) {
    ///         self.0.lock().unwrap().push(format!("{:#x} {:?}", c.offset, c.to));
    ///     }
    /// }
    /// impl DeviceListener for Log {
    ///     fn poisoned(&self, offset: u64) {
    ///         self.0.lock().unwrap().push(format!("{offset:#x} poisoned"));
    ///     }
    ///     fn unpoisoned(&self, offset: u64, len: u64) {
    ///         self.0.lock().unwrap().push(format!("{offset:#x}+{len:#x} unpoisoned"));
    ///     }
    /// }
    ///
    /// let mem = GuestMemfd::builder(4 * 4096).flags(Flags::MMAP | Flags::INIT_SHARED).create()?;
    /// mem.convert(0, 4096, Attr::Private)?;
    /// let log = Arc::new(Log::default());
    /// let (id, snap) = mem.add_device_listener(log.clone())?;
    /// assert_eq!(snap.runs.len(), 2);
    /// assert!(snap.poisoned.is_empty());
    /// mem.inject_poison(0x2000)?;
    /// mem.convert(0x1000, 4096, Attr::Private)?;
    /// assert_eq!(*log.0.lock().unwrap(), ["0x2000 poisoned", "0x1000 Private"]);
    /// assert!(mem.remove_device_listener(id));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn add_device_listener(
        &self,
        listener: Arc<dyn DeviceListener>,
    ) -> Result<(DeviceListenerId, DeviceSnapshot), DeviceError> {
        let added = self.inner.add_observer(
            Arc::new(Conversions(listener.clone())),
            Box::new(PoisonRelay(listener)),
        )?;
        let snapshot = DeviceSnapshot {
            runs: added.runs.into_iter().map(AttrRun::from).collect(),
            poisoned: added.poisoned.into_iter().map(page_offset).collect(),
        };
        let id = DeviceListenerId {
            listener: added.listener,
            relay: added.relay,
        };
        Ok((id, snapshot))
    }

    /// Removes a [`DeviceListener`]; false when it was not registered on this file.
    pub fn remove_device_listener(&self, id: DeviceListenerId) -> bool {
        self.inner.remove_observer(id.listener, id.relay)
    }
}
