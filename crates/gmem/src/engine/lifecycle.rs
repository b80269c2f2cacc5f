//! The file's life across a live update, as the preservation subsystem drives it: freeze,
//! thaw, release, and the state it snapshots and restores.

use super::gate::Phase;
use super::listener::{Conversion, Veto};
use super::{Control, Engine};
use crate::model::attr::Attr;
use crate::model::units::{page_offset, ByteRange, PageRange};

/// The restructuring of a HugeTLB file: split huge pages, and those waiting to merge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HugeRecords {
    pub split: Vec<u64>,
    pub waiting: Vec<u64>,
}

impl Engine {
    /// Freezes the file for a hand-over; `Err(why)` when it cannot be handed over now.
    pub(crate) fn freeze(&self) -> Result<(), &'static str> {
        if self.gate().is_follower() {
            return Err("it follows another process");
        }
        if !self.gate().in_creator() {
            return Err("it belongs to the parent process");
        }
        let ctl = self.control_unchecked();
        if ctl.participants.any_named("peer") {
            return Err("shared with peer processes, which would keep following this one");
        }
        if self.gate().phase() != Phase::Live {
            return Err("already frozen or handed over");
        }
        self.gate().set(Phase::Frozen);
        Ok(())
    }

    /// Ends a freeze that did not hand the file over (after a commit, host access is given
    /// back first).
    pub(crate) fn thaw(&self) {
        let ctl = self.control_unchecked();
        if self.gate().phase() == Phase::Committing {
            self.uncommit(&ctl);
        }
        if self.gate().phase() == Phase::Frozen {
            self.gate().set(Phase::Live);
        }
    }

    /// The new owner may own the file from the next message on: the listeners let go (a
    /// device holding a page vetoes) and host accessors are refused from here (the phase
    /// changes under the page-state write lock, so no accessor copy is in flight after it and
    /// none starts), reversibly ([`Engine::thaw`] gives them back). The views stay until
    /// [`Engine::release`]: the new owner makes no page private before it. On a veto the file
    /// is as before the call, still frozen.
    pub(crate) fn commit(&self) -> Result<(), Veto> {
        let ctl = self.control_unchecked();
        // Listeners let go first, as before a conversion of the whole file to private: a
        // device holding a slice refuses, and takes no new one while committing.
        ctl.listeners.prepare(&self.handed_over())?;
        let _pages = self.write_pages();
        self.gate().set(Phase::Committing);
        Ok(())
    }

    /// What a hand-over is to this process's listeners: the whole file becomes unreachable,
    /// as by a conversion to private.
    fn handed_over(&self) -> Conversion {
        Conversion {
            offset: 0,
            len: self.size,
            to: Attr::Private,
        }
    }

    /// Ends a commit whose hand-over failed: host access works again, the listeners hear
    /// that the hand-over did not happen, the file is frozen.
    fn uncommit(&self, ctl: &Control) {
        self.gate().set(Phase::Frozen);
        ctl.listeners.abort(&self.handed_over());
    }

    /// The file now belongs to another process: every access path of this one fails with
    /// `EPERM`, and every mapping gmem handed out here (views, the guest mapping, pin
    /// pointers) stops reaching the file.
    pub(crate) fn release(&self) {
        let mut ctl = self.control_unchecked();
        // A view the VMM moved before this took the lock is neutralised (and given up)
        // first, so the release does not mark the range the move left empty.
        self.settle(&mut ctl);
        let committed = self.gate().phase() == Phase::Committing;
        {
            // No accessor copy is in flight once this is held, and none starts after it.
            let _pages = self.write_pages();
            self.gate().set(Phase::Released);
        }
        self.mark_shared_out();
        self.release_mappings(&mut ctl);
        if committed {
            ctl.listeners.commit(&self.handed_over());
        }
    }

    /// The split and waiting huge pages.
    pub(crate) fn huge_records(&self) -> HugeRecords {
        match self.huge() {
            None => HugeRecords::default(),
            Some(h) => {
                let st = h.state();
                HugeRecords {
                    split: st.split_in(0, u64::MAX),
                    waiting: st.waiting_in(0, u64::MAX),
                }
            }
        }
    }

    /// The first page held by a reference that none of `listed` (pins the caller hands over)
    /// accounts for, when there is one: the hand-over refuses to leave a live pin behind.
    ///
    /// References beyond the listed ones number `total - Σ min(refs(p), listed(p))` over the
    /// listed pages, so the check costs the listed pages, not the file; only when it finds
    /// some does it look for the page.
    pub(crate) fn unlisted_ref(&self, listed: &[ByteRange]) -> Option<u64> {
        let mut want = std::collections::BTreeMap::<u64, u64>::new();
        for r in listed {
            for p in r.pages().iter() {
                *want.entry(p).or_default() += 1;
            }
        }
        let refs = |p: u64| self.refs().count(PageRange::one(p));
        let accounted: u64 = want.iter().map(|(&p, &w)| refs(p).min(w)).sum();
        if self.refs().total() <= accounted {
            return None;
        }
        self.all_pages()
            .iter()
            .find(|&p| refs(p) > want.get(&p).copied().unwrap_or(0))
            .map(page_offset)
    }
}
