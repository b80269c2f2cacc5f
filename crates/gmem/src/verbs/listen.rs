//! Who else hears of conversions: listeners (the VMM's device layer, which may veto),
//! participants (peer processes, the kernel's attributes: part of the transaction), and the
//! HugeTLB restructuring counters.

use std::sync::Arc;

use crate::engine::convert::ConvertError;
use crate::engine::listener::{ConversionListener, ListenerId};
use crate::engine::participant::{Participant, ParticipantId};
use crate::model::huge::Accounting;

use super::GuestMemfd;

impl GuestMemfd {
    /// Adds a conversion listener; it hears of every conversion from now on. Listeners run
    /// with the file's control lock held: they must not convert, map or add listeners on the
    /// same file. In a forked child (which converts nothing) nothing is registered.
    pub fn add_listener(&self, listener: Arc<dyn ConversionListener>) -> ListenerId {
        self.inner.add_listener(listener)
    }

    /// Removes a listener; returns false when it was not registered (and in a forked child).
    pub fn remove_listener(&self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    /// Adds a participant: from now on every conversion, split, merge and poison of the file
    /// is applied to it inside the transaction, and undone on it when a later part fails.
    /// (The KVM crate adds one that keeps the kernel's memory attributes in step.) In a forked
    /// child nothing is registered.
    pub fn add_participant(&self, participant: Box<dyn Participant>) -> ParticipantId {
        self.inner.add_participant(participant)
    }

    /// Removes a participant; returns false when it was not registered (and in a forked
    /// child).
    pub fn remove_participant(&self, id: ParticipantId) -> bool {
        self.inner.remove_participant(id)
    }

    /// The restructuring counters of a HugeTLB file (`None` for other backings). The handle
    /// stays valid after the file is gone.
    pub fn hugetlb_accounting(&self) -> Option<Arc<Accounting>> {
        self.inner.huge().map(|h| h.accounting())
    }

    /// Merges every split huge page that is uniform and no longer held. Returns how many
    /// merged. Merges normally happen on their own (after conversions and when the last
    /// reference to a piece is dropped); this is for a caller that wants them now.
    pub fn merge_pending(&self) -> Result<u64, ConvertError> {
        Ok(self.inner.merge_pending()?)
    }
}
