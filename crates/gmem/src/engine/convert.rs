//! In-place conversion between shared and private: the plan and its transaction.
//!
//! `convert(range, to)` follows the kernel's guest_memfd conversion:
//!
//! 1. the range is page aligned, non-empty, does not wrap and lies inside the file (`EINVAL`,
//!    checked by the verb);
//! 2. the gate: a follower, a file handed over, a forked child get `EPERM`; a file frozen for
//!    a hand-over makes the call wait;
//! 3. a range already entirely in the target state succeeds at once, touching nothing;
//!    otherwise, to private, a file received by a hand-over whose old owner may still map it
//!    refuses with `EAGAIN` naming the first shared page;
//! 4. listeners are asked and may veto (`EAGAIN` naming their offset);
//! 5. the plan: on HugeTLB one *segment* per huge page, each `[split] set [merge]` (a huge
//!    page is split before it becomes mixed and merged once it is whole again); elsewhere
//!    one segment, `set`;
//! 6. each `set` is a transaction. To private, *restrict first*: under the page-state lock
//!    the pages' host references are checked (any: `EAGAIN` with `error_offset` = the first
//!    such page, nothing changed) and the attributes set, so no new reference can be taken;
//!    then every view of this process is revoked, then every participant (peer processes,
//!    the kernel's attributes), then pages that a kernel reference may still hold are moved
//!    to fresh memory ([`super::moves`]). To shared, *permit last*: views, participants, and
//!    only then the attributes. Any failure undoes every part that was done, in reverse.
//!
//! A base-page file with no listener has one segment and nobody to ask in step 4: its
//! transaction makes step 3 itself, under the page-state lock it takes anyway (the write
//! lock, to private), with the same outcomes in the same order. A conversion there that
//! finds nothing to do takes that lock too, where the other files take a read lock.
//!
//! Base-page backings convert the whole range or nothing. HugeTLB converts one huge page at a
//! time (a run of huge pages that convert whole, none split, at once): a failure after the
//! first is [`ConvertError::Partial`], naming the first byte not converted. Contents are
//! never copied except by a move, so they survive in both directions.

use std::io;

use super::gate::GateError;
use super::huge::RestructureError;
use super::listener::Conversion;
use super::participant::{Step, StepError};
use super::{Control, Engine, PageState};
use crate::model::attr::{Attr, Run};
use crate::model::error::Errno;
use crate::model::units::{ByteRange, PageRange, RangeError};

/// Why a conversion failed. The file is unchanged after every error (HugeTLB:
/// [`ConvertError::Partial`] says how far it got).
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Bad range (`EINVAL`).
    #[error(transparent)]
    Range(#[from] RangeError),
    /// A page still has a host user: a pin, a borrowed slice, in this process or a peer
    /// (`EAGAIN`), in the range or (HugeTLB) in a huge page the conversion must split.
    /// `offset` is the first such page.
    #[error("page at offset {offset:#x} is in use by the host")]
    Busy {
        /// First page in the range with a host user.
        offset: u64,
    },
    /// A listener refused (`EAGAIN`).
    #[error("listener vetoed at offset {offset:#x}: {reason}")]
    Vetoed {
        /// Offset the listener named.
        offset: u64,
        /// The listener's reason.
        reason: String,
    },
    /// This process may not convert the file (`EPERM`): it follows another process, was
    /// handed over, or this is a forked child.
    #[error(transparent)]
    Gate(#[from] GateError),
    /// Revoking or restoring host mappings failed (the OS error's errno).
    #[error("changing host mappings at offset {offset:#x}: {source}")]
    Os {
        /// Start of the range being changed.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A participant (a peer process, the kernel's attributes) failed: `ETIMEDOUT` when it
    /// did not answer in time, its errno otherwise.
    #[error("participant failed at offset {offset:#x}: errno {errno}")]
    Peer {
        /// The offset the participant named.
        offset: u64,
        /// The errno.
        errno: i32,
    },
    /// HugeTLB: splitting the huge page would exceed the file's piece limit, or the process
    /// is too close to `vm.max_map_count` (`ENOMEM`).
    #[error("no room to split the huge page at offset {offset:#x}")]
    NoMem {
        /// Start of the huge page.
        offset: u64,
    },
    /// A HugeTLB conversion, which proceeds one huge page (or run of whole huge pages) at a
    /// time, stopped part way:
    /// `[offset, reached)` was converted, nothing from `reached` on. `errno()` and
    /// `error_offset()` are those of `source`, the error that stopped it.
    #[error("conversion stopped at {reached:#x}: {source}")]
    Partial {
        /// First byte not converted (a huge page boundary).
        reached: u64,
        /// Why it stopped.
        #[source]
        source: Box<ConvertError>,
    },
}

impl Errno for ConvertError {
    fn errno(&self) -> i32 {
        match self {
            ConvertError::Range(_) => libc::EINVAL,
            ConvertError::Busy { .. } | ConvertError::Vetoed { .. } => libc::EAGAIN,
            ConvertError::Gate(e) => e.errno(),
            ConvertError::Os { source, .. } => crate::model::error::os_errno(source),
            ConvertError::Peer { errno, .. } => *errno,
            ConvertError::NoMem { .. } => libc::ENOMEM,
            ConvertError::Partial { source, .. } => source.errno(),
        }
    }

    fn error_offset(&self) -> Option<u64> {
        match self {
            ConvertError::Range(e) => Some(e.offset()),
            ConvertError::Busy { offset }
            | ConvertError::Vetoed { offset, .. }
            | ConvertError::Os { offset, .. }
            | ConvertError::Peer { offset, .. }
            | ConvertError::NoMem { offset } => Some(*offset),
            ConvertError::Gate(_) => None,
            ConvertError::Partial { source, .. } => source.error_offset(),
        }
    }
}

impl ConvertError {
    /// For a conversion that stopped part way ([`ConvertError::Partial`]), the first byte not
    /// converted.
    pub fn reached(&self) -> Option<u64> {
        match self {
            ConvertError::Partial { reached, .. } => Some(*reached),
            _ => None,
        }
    }
}

impl From<StepError> for ConvertError {
    fn from(e: StepError) -> Self {
        if e.errno == libc::EAGAIN {
            ConvertError::Busy { offset: e.offset }
        } else {
            ConvertError::Peer {
                offset: e.offset,
                errno: e.errno,
            }
        }
    }
}

impl From<RestructureError> for ConvertError {
    fn from(e: RestructureError) -> Self {
        match e {
            RestructureError::Busy { offset } => ConvertError::Busy { offset },
            RestructureError::NoMem { offset } => ConvertError::NoMem { offset },
            RestructureError::Participant { offset, errno } => ConvertError::Peer { offset, errno },
            RestructureError::Os { offset, source } => ConvertError::Os { offset, source },
        }
    }
}

impl Engine {
    /// Applies `steps` to every participant in order, all or nothing: on a refusal the steps
    /// already applied are undone (in reverse) and the refusal returned.
    fn apply_all(&self, ctl: &mut Control, steps: &[Step]) -> Result<(), StepError> {
        for (i, s) in steps.iter().enumerate() {
            if let Err(e) = ctl.participants.apply(s) {
                steps[..i]
                    .iter()
                    .rev()
                    .for_each(|s| ctl.participants.undo(s));
                return Err(e);
            }
        }
        Ok(())
    }
}

/// The participants' steps for `parts`, one per range: none (and no allocation) when no
/// participant is registered.
fn steps_for(ctl: &Control, parts: &[PageRange], step: fn(ByteRange) -> Step) -> Vec<Step> {
    if ctl.participants.is_empty() {
        return Vec::new();
    }
    parts.iter().map(|p| step(p.bytes())).collect()
}

/// A failure of the OS while changing the host mappings of `seg`.
fn os_error(seg: PageRange) -> impl Fn(io::Error) -> ConvertError {
    move |source| ConvertError::Os {
        offset: seg.bytes().start,
        source,
    }
}

/// The runs of `old` with attribute `attr`, as page ranges.
pub(super) fn parts(old: &[Run], attr: Attr) -> Vec<PageRange> {
    let mut out = Vec::new();
    parts_into(old, attr, &mut out);
    out
}

/// [`parts`], appended to `out`.
fn parts_into(old: &[Run], attr: Attr, out: &mut Vec<PageRange>) {
    out.extend(old.iter().filter(|r| r.attr == attr).map(Run::pages));
}

impl Engine {
    /// Converts `r` (validated: page aligned, inside the file) to `to`. See the module docs.
    pub(crate) fn convert(&self, r: ByteRange, to: Attr) -> Result<(), ConvertError> {
        let mut ctl = self.control_live()?;
        let pr = r.pages();
        if self.geometry().is_none() && ctl.listeners.is_empty() {
            // One segment, and no listener to hear of the conversion: the segment's
            // transaction makes step 3 itself, under the page-state lock it takes anyway.
            self.settle(&mut ctl);
            return self.convert_segment(&mut ctl, pr, to, None);
        }
        {
            let st = self.read_pages();
            if st.attrs.all(pr.start, pr.end, to) {
                return Ok(());
            }
            if to == Attr::Private {
                if let Some(e) = self.refused_for_old_owner(&st, pr) {
                    return Err(e);
                }
            }
        }
        self.settle(&mut ctl);
        let conv = Conversion {
            offset: r.start,
            len: r.len(),
            to,
        };
        ctl.listeners
            .prepare(&conv)
            .map_err(|v| ConvertError::Vetoed {
                offset: v.offset,
                reason: v.reason,
            })?;
        let res = match self.geometry() {
            None => self.convert_segment(&mut ctl, pr, to, None),
            Some(geo) => {
                let mut res = Ok(());
                for (seg, h) in self.segments(geo, pr, to) {
                    if let Err(e) = self.convert_segment(&mut ctl, seg, to, h) {
                        let at = seg.bytes().start;
                        res = Err(if at == r.start {
                            e
                        } else {
                            ConvertError::Partial {
                                reached: at,
                                source: Box::new(e),
                            }
                        });
                        break;
                    }
                }
                res
            }
        };
        match &res {
            Ok(()) => ctl.listeners.commit(&conv),
            Err(e) => {
                ctl.listeners.abort(&conv);
                if let Some(reached) = e.reached() {
                    ctl.listeners.commit(&Conversion {
                        offset: r.start,
                        len: reached - r.start,
                        to,
                    });
                }
            }
        }
        res
    }

    /// The segments of a HugeTLB conversion of `pr` to `to`, in order: one per huge page
    /// that splits, merges, is converted in part or (to private) has a page the host holds
    /// (with that huge page), and one for each run of huge pages that convert whole (`None`:
    /// none is split, each is uniform now and stays unpoisoned when it becomes shared), so
    /// that a view's windows over the run are replaced at once. A held page ends the run
    /// before it, so the conversion stops there as it would one huge page at a time; a run
    /// that fails otherwise converts none of its pages (the error names its start).
    fn segments(
        &self,
        geo: crate::model::units::HugeGeometry,
        pr: PageRange,
        to: Attr,
    ) -> Vec<(PageRange, Option<u64>)> {
        let whole = |h: u64| {
            let hp = geo.pages(h);
            let Some(huge) = self.huge() else {
                return false;
            };
            let st = self.read_pages();
            pr.intersect(&hp) == Some(hp)
                && !huge.state().is_split(h)
                && (st.attrs.all(hp.start, hp.end, Attr::Shared)
                    || st.attrs.all(hp.start, hp.end, Attr::Private))
                && match to {
                    Attr::Private => self.refs().first_busy(hp).is_none(),
                    Attr::Shared => !st.poison.any_in(hp),
                }
        };
        let mut out: Vec<(PageRange, Option<u64>)> = Vec::new();
        for h in geo.covering(pr) {
            let hp = geo.pages(h);
            if !whole(h) {
                if let Some(seg) = hp.intersect(&pr) {
                    out.push((seg, Some(h)));
                }
                continue;
            }
            match out.last_mut() {
                Some((run, None)) if run.end == hp.start => run.end = hp.end,
                _ => out.push((hp, None)),
            }
        }
        out
    }

    /// One segment: `[split] set [merge]` (HugeTLB: `seg` lies inside huge page `h`, or is
    /// a run of huge pages that convert whole when `h` is `None`).
    fn convert_segment(
        &self,
        ctl: &mut Control,
        seg: PageRange,
        to: Attr,
        h: Option<u64>,
    ) -> Result<(), ConvertError> {
        let mut split_made = false;
        if let (Some(h), Some(huge)) = (h, self.huge()) {
            let hp = huge.geo.pages(h);
            let needs_split = {
                let st = self.read_pages();
                if st.attrs.all(seg.start, seg.end, to) {
                    return Ok(());
                }
                let rest_same = |a: u64, b: u64| a >= b || st.attrs.all(a, b, to);
                let uniform_after = rest_same(hp.start, seg.start) && rest_same(seg.end, hp.end);
                !(uniform_after && (to == Attr::Private || !st.poison.any_in(hp)))
            };
            if needs_split && !huge.state().is_split(h) {
                self.split(ctl, h)?;
                split_made = true;
            }
        }
        let res = match to {
            Attr::Private => self.to_private(ctl, seg),
            Attr::Shared => self.to_shared(ctl, seg),
        };
        if let Some(h) = h {
            // Merge when whole again; this also undoes a split made for a conversion that
            // failed. A merge that cannot happen now leaves the page split: it is retried.
            if res.is_ok() || split_made {
                if let Err(e) = self.merge(ctl, h, true) {
                    tracing::error!(huge_page = h, "merging after a conversion: {e:?}");
                }
            }
        }
        // A view the VMM moved or unmapped meanwhile is neutralised before the conversion
        // returns.
        self.after_own_remap(ctl);
        res
    }

    /// While the old owner of a hand-over may still map the file (its views are not revoked
    /// yet, so they may reach the pages that are shared), a conversion of `pr` to private is
    /// refused: [`ConvertError::Busy`] naming the first shared page (module docs, step 3).
    fn refused_for_old_owner(&self, st: &PageState, pr: PageRange) -> Option<ConvertError> {
        if !self.gate().old_owner_maps() {
            return None;
        }
        let first = st.attrs.first(pr.start, pr.end, Attr::Shared);
        Some(ConvertError::Busy {
            offset: PageRange::one(first.unwrap_or(pr.start)).bytes().start,
        })
    }

    /// `seg` to private, all or nothing (module docs, steps 3 and 6).
    fn to_private(&self, ctl: &mut Control, seg: PageRange) -> Result<(), ConvertError> {
        let (mut old, mut shared) = ctl.scratch.take();
        {
            let mut st = self.write_pages();
            if st.attrs.all(seg.start, seg.end, Attr::Private) {
                ctl.scratch.give_back(old, shared);
                return Ok(());
            }
            let refused = self.refused_for_old_owner(&st, seg).or_else(|| {
                self.refs().first_busy(seg).map(|p| ConvertError::Busy {
                    offset: PageRange::one(p).bytes().start,
                })
            });
            if let Some(e) = refused {
                ctl.scratch.give_back(old, shared);
                return Err(e);
            }
            old.extend(st.attrs.runs(seg.start, seg.end));
            st.attrs.set(seg.start, seg.end, Attr::Private);
        }
        parts_into(&old, Attr::Shared, &mut shared);
        let res = self.revoke_private(ctl, seg, &old, &shared);
        ctl.scratch.give_back(old, shared);
        res
    }

    /// The rest of [`Engine::to_private`] once the attributes are private: `old` were the
    /// runs of `seg`, `shared` the ranges of them that were shared.
    fn revoke_private(
        &self,
        ctl: &mut Control,
        seg: PageRange,
        old: &[Run],
        shared: &[PageRange],
    ) -> Result<(), ConvertError> {
        let os = os_error(seg);
        let numa = self.numa_policy_set();
        let ctx = self.view_ctx(numa.as_ref());
        // Only what was shared is revoked: the private runs already fault.
        for (i, p) in shared.iter().enumerate() {
            if let Err(e) = ctl.views.revoke(&ctx, *p) {
                self.undo_private(ctl, old, &shared[..i]);
                return Err(os(e));
            }
        }
        // Participants get exactly the pages that change, so that undoing a step restores
        // exactly them (a page that was private stays private everywhere).
        let steps = steps_for(ctl, shared, Step::Revoke);
        if let Err(e) = self.apply_all(ctl, &steps) {
            self.undo_private(ctl, old, shared);
            return Err(e.into());
        }
        if let Err(e) = self.orphan(ctl, shared) {
            steps.iter().rev().for_each(|s| ctl.participants.undo(s));
            self.undo_private(ctl, old, shared);
            return Err(os(e));
        }
        Ok(())
    }

    /// Undoes the local part of [`Engine::to_private`]: the views of `revoked` reach their
    /// pages again (poisoned pages excepted) and the old runs are back.
    fn undo_private(&self, ctl: &mut Control, old: &[Run], revoked: &[PageRange]) {
        let numa = self.numa_policy_set();
        let ctx = self.view_ctx(numa.as_ref());
        let mut st = self.write_pages();
        for p in revoked {
            let keep = st.poison.in_range(*p);
            if let Err(e) = ctl.views.restore(&ctx, *p, &keep) {
                tracing::error!(page = p.start, "restoring a view during a rollback: {e}");
            }
        }
        for run in old {
            st.attrs.set(run.start, run.end, run.attr);
        }
    }

    /// `seg` to shared, all or nothing (module docs, steps 3 and 6).
    fn to_shared(&self, ctl: &mut Control, seg: PageRange) -> Result<(), ConvertError> {
        let (mut runs, mut private) = ctl.scratch.take();
        let keep = {
            let st = self.read_pages();
            if st.attrs.all(seg.start, seg.end, Attr::Shared) {
                ctl.scratch.give_back(runs, private);
                return Ok(());
            }
            runs.extend(st.attrs.runs(seg.start, seg.end));
            st.poison.in_range(seg)
        };
        parts_into(&runs, Attr::Private, &mut private);
        let res = self.restore_shared(ctl, seg, &private, &keep);
        ctl.scratch.give_back(runs, private);
        res
    }

    /// The rest of [`Engine::to_shared`]: `private` are the ranges of `seg` that were
    /// private, `keep` its poisoned pages.
    fn restore_shared(
        &self,
        ctl: &mut Control,
        seg: PageRange,
        private: &[PageRange],
        keep: &[u64],
    ) -> Result<(), ConvertError> {
        let os = os_error(seg);
        let numa = self.numa_policy_set();
        let ctx = self.view_ctx(numa.as_ref());
        for (i, p) in private.iter().enumerate() {
            if let Err(e) = ctl.views.restore(&ctx, *p, keep) {
                for q in &private[..i] {
                    if let Err(e2) = ctl.views.revoke(&ctx, *q) {
                        tracing::error!(page = q.start, "re-revoking during a rollback: {e2}");
                    }
                }
                return Err(os(e));
            }
        }
        let steps = steps_for(ctl, private, Step::Restore);
        if let Err(e) = self.apply_all(ctl, &steps) {
            for q in private {
                if let Err(e2) = ctl.views.revoke(&ctx, *q) {
                    tracing::error!(page = q.start, "re-revoking during a rollback: {e2}");
                }
            }
            return Err(e.into());
        }
        self.write_pages()
            .attrs
            .set(seg.start, seg.end, Attr::Shared);
        Ok(())
    }
}
