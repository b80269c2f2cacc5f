//! Conversion listeners: the device layer and DMA users hear of each conversion.
//!
//! A listener is told before a conversion and may veto it (a device that cannot quiesce, an
//! IOMMU mapping that cannot be dropped); after the conversion it is told it happened, or that
//! it was abandoned. This is the role QEMU's `RamDiscardManager` listeners play for guest_memfd.
//!
//! Listeners run with the file's control lock held: they must not convert, map or register
//! listeners on the same file.

use std::fmt;
use std::sync::Arc;

use crate::model::attr::{Attr, Run};

use super::gate::GateError;
use super::participant::{Participant, ParticipantId};
use super::Engine;

/// One conversion, as listeners see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conversion {
    /// First byte of the range.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Attribute the range converts to.
    pub to: Attr,
}

/// A listener's refusal of a conversion.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("vetoed at offset {offset:#x}: {reason}")]
pub struct Veto {
    /// The first page the listener cannot give up.
    pub offset: u64,
    /// Why.
    pub reason: String,
}

/// Hears of conversions of one file.
///
/// Listeners are called with the file's control lock held (a conversion, a hand-over's
/// commit and release): a callback must not call an operation that takes that lock
/// (converting, mapping or dropping a view, [`HostView::fault_at`](crate::HostView::fault_at),
/// registering a listener), which would wait for the callback's own caller.
/// [`GuestMemfd::host_fault`](crate::GuestMemfd::host_fault) takes no such lock.
pub trait ConversionListener: Send + Sync {
    /// Called before the range converts; an error vetoes the conversion.
    fn prepare(&self, conv: &Conversion) -> Result<(), Veto>;
    /// Called after the range has converted.
    fn commit(&self, conv: &Conversion);
    /// Called when a conversion this listener prepared for did not happen.
    fn abort(&self, conv: &Conversion) {
        let _ = conv;
    }
}

/// Handle returned when a listener is added, to remove it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerId(u64);

impl ListenerId {
    /// A new id. Ids are unique across files, so an id from another file never removes a
    /// listener of this one.
    fn fresh() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        ListenerId(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

/// The listeners of one file, in registration order.
#[derive(Default)]
pub(crate) struct ListenerSet {
    list: Vec<(ListenerId, Arc<dyn ConversionListener>)>,
}

impl fmt::Debug for ListenerSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerSet")
            .field("count", &self.list.len())
            .finish()
    }
}

impl ListenerSet {
    pub fn add(&mut self, l: Arc<dyn ConversionListener>) -> ListenerId {
        let id = ListenerId::fresh();
        self.list.push((id, l));
        id
    }

    pub fn remove(&mut self, id: ListenerId) -> bool {
        let before = self.list.len();
        self.list.retain(|(i, _)| *i != id);
        self.list.len() != before
    }

    /// True when no listener is registered.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Asks every listener; on a veto, tells those already asked that it is abandoned.
    pub fn prepare(&self, conv: &Conversion) -> Result<(), Veto> {
        for (i, (_, l)) in self.list.iter().enumerate() {
            if let Err(v) = l.prepare(conv) {
                self.list[..i].iter().for_each(|(_, l)| l.abort(conv));
                return Err(v);
            }
        }
        Ok(())
    }

    pub fn commit(&self, conv: &Conversion) {
        self.list.iter().for_each(|(_, l)| l.commit(conv));
    }

    pub fn abort(&self, conv: &Conversion) {
        self.list.iter().for_each(|(_, l)| l.abort(conv));
    }
}

impl Engine {
    /// Adds a conversion listener under the control lock, whatever the phase. In a forked
    /// child nothing is registered (the child converts nothing, and a thread of the parent
    /// may have held the control lock at the fork): the id is fresh and removes nothing.
    pub(crate) fn add_listener(&self, listener: Arc<dyn ConversionListener>) -> ListenerId {
        if !self.gate().in_creator() {
            return ListenerId::fresh();
        }
        self.control_unchecked().listeners.add(listener)
    }

    /// Removes a listener under the control lock, whatever the phase; false when it was not
    /// registered, and in a forked child.
    pub(crate) fn remove_listener(&self, id: ListenerId) -> bool {
        self.gate().in_creator() && self.control_unchecked().listeners.remove(id)
    }

    /// Adds `listener` and the participant `relay` and reads the whole file's attribute runs
    /// and poisoned pages, all in one hold of the control lock (refused in a forked child
    /// and once handed over): no change can fall between the state read and the first
    /// notice.
    pub(crate) fn add_observer(
        &self,
        listener: Arc<dyn ConversionListener>,
        relay: Box<dyn Participant>,
    ) -> Result<Observer, GateError> {
        let mut ctl = self.control()?;
        let (runs, poisoned) = {
            let st = self.read_pages();
            (
                st.attrs.runs(0, self.pages_total()).collect(),
                st.poison.all(),
            )
        };
        Ok(Observer {
            listener: ctl.listeners.add(listener),
            relay: ctl.participants.add(relay),
            runs,
            poisoned,
        })
    }

    /// Removes what [`Engine::add_observer`] added, in one hold of the control lock
    /// (whatever the phase); false when the listener was not registered on this file, and in
    /// a forked child, where nothing was added.
    pub(crate) fn remove_observer(&self, listener: ListenerId, relay: ParticipantId) -> bool {
        if !self.gate().in_creator() {
            return false;
        }
        let mut ctl = self.control_unchecked();
        // Listener ids are unique across files, participant ids only within one: the relay is
        // removed only once the listener proved the id belongs to this file.
        if !ctl.listeners.remove(listener) {
            return false;
        }
        ctl.participants.remove(relay)
    }
}

/// What [`Engine::add_observer`] registered, and the state it starts from.
#[derive(Debug)]
pub(crate) struct Observer {
    /// The listener's id.
    pub listener: ListenerId,
    /// The relay participant's id.
    pub relay: ParticipantId,
    /// The runs of equal attributes covering the whole file, in order.
    pub runs: Vec<Run>,
    /// The poisoned pages, in order.
    pub poisoned: Vec<u64>,
}
