//! A follower applies its owner's steps: the same changes to its own views, without moving
//! pages (the owner's move covers the file, and so every process). The owner coordinates
//! every process; what a follower registers itself are its device listeners
//! ([`crate::GuestMemfd::add_device_listener`]): a revoke or restore is a conversion for
//! them (prepare, which may veto, then commit or abort), and poison steps reach their relays.

use super::convert::parts;
use super::listener::Conversion;
use super::participant::{Step, StepError};
use super::views::Ctx;
use super::Engine;
use crate::model::attr::{Attr, Run};
use crate::model::units::{page_offset, ByteRange, PageRange};
use crate::sys::to_usize;

fn step_err(offset: u64, e: &std::io::Error) -> StepError {
    StepError {
        errno: crate::model::error::os_errno(e),
        offset,
    }
}

impl Engine {
    /// Applies one of the owner's steps to this follower. `EAGAIN` (naming a page) when this
    /// process holds a page the step would take away.
    pub(crate) fn apply_remote(&self, step: &Step) -> Result<(), StepError> {
        let r = step.range();
        let pages = r.pages();
        let mut ctl = self.control_unchecked();
        let numa = self.numa_policy_set();
        let ctx = self.view_ctx(numa.as_ref());
        let res = match *step {
            Step::Revoke(_) => self.as_conversion(&mut ctl, r, Attr::Private, |this, ctl| {
                this.follow_revoke(ctl, &ctx, r)
            }),
            Step::Restore(_) => self.as_conversion(&mut ctl, r, Attr::Shared, |this, ctl| {
                this.follow_restore(ctl, &ctx, r)
            }),
            Step::Freeze(_) => self.follow_freeze(&mut ctl, r),
            Step::Thaw(_) => {
                if let Some(huge) = self.huge() {
                    Self::release_for_owner(&mut ctl, huge.geo.of_page(pages.start));
                }
                Ok(())
            }
            Step::Split(_) | Step::Merge(_) => self.follow_restructure(&mut ctl, step, r),
            // This process's own participants (device listeners' poison relays) hear it as
            // they would in the owner.
            Step::Poison(_) => self
                .follow_poison(&mut ctl, &ctx, r)
                .map(|()| ctl.participants.notify(step)),
            Step::Refresh(_) => {
                let st = self.read_pages();
                let hs = self.huge().map(|h| h.state());
                ctl.views
                    .reenforce_range(&ctx, self.shown(&st, hs.as_deref()), pages)
                    .map_err(|e| step_err(r.start, &e))
            }
            Step::Unpoison(_) => self
                .follow_unpoison(&mut ctl, &ctx, r)
                .map(|()| ctl.participants.notify(step)),
        };
        // A view the VMM moved or unmapped under the step is neutralised before the owner
        // hears the answer.
        self.after_own_remap(&mut ctl);
        res
    }

    /// Runs `apply` (a revoke or a restore of `r`) as a conversion of `r` to `to` for this
    /// process's listeners, as the owner's conversion is for its own: they prepare first (a
    /// veto is `EAGAIN` at the listener's offset, and nothing changes), then hear the commit,
    /// or the abort when `apply` fails. So a device that holds pages in a follower (a
    /// backend in another process) vetoes the owner's conversion the way it would in the
    /// owner. An undo from the owner arrives as the opposite step: a conversion back.
    fn as_conversion(
        &self,
        ctl: &mut super::Control,
        r: ByteRange,
        to: Attr,
        apply: impl FnOnce(&Engine, &mut super::Control) -> Result<(), StepError>,
    ) -> Result<(), StepError> {
        let conv = Conversion {
            offset: r.start,
            len: r.len(),
            to,
        };
        ctl.listeners.prepare(&conv).map_err(|v| StepError {
            errno: libc::EAGAIN,
            offset: v.offset,
        })?;
        match apply(self, ctl) {
            Ok(()) => {
                ctl.listeners.commit(&conv);
                Ok(())
            }
            Err(e) => {
                ctl.listeners.abort(&conv);
                Err(e)
            }
        }
    }

    /// `EAGAIN`, naming the page, when this process holds a page of `pages`.
    fn check_not_busy(&self, pages: PageRange) -> Result<(), StepError> {
        match self.refs().first_busy(pages) {
            Some(p) => Err(StepError {
                errno: libc::EAGAIN,
                offset: page_offset(p),
            }),
            None => Ok(()),
        }
    }

    /// The owner revoked `r`: the pages become private here, leave every view (the
    /// attributes are put back when a view fails) and this process's mapping of the file.
    fn follow_revoke(
        &self,
        ctl: &mut super::Control,
        ctx: &Ctx<'_>,
        r: ByteRange,
    ) -> Result<(), StepError> {
        let pages = r.pages();
        let old: Vec<Run> = {
            let mut st = self.write_pages();
            self.check_not_busy(pages)?;
            let old = st.attrs.runs(pages.start, pages.end).collect();
            st.attrs.set(pages.start, pages.end, Attr::Private);
            old
        };
        for run in old.iter().filter(|r| r.attr == Attr::Shared) {
            if let Err(e) = ctl.views.revoke(ctx, run.pages()) {
                let mut st = self.write_pages();
                for run in &old {
                    st.attrs.set(run.start, run.end, run.attr);
                }
                return Err(step_err(r.start, &e));
            }
        }
        // The pages leave this process's mapping of the file too: the owner moves
        // them next, and the kernel guest_memfd's punch-hole drops every view's
        // markers at a page something still maps (see `Engine::orphan`).
        if let Some(g) = self.guest_map() {
            let (off, len) = (to_usize(r.start), to_usize(r.len()));
            if let (Ok(off), Ok(len)) = (off, len) {
                if let Err(e) = g.advise(off, len, libc::MADV_DONTNEED) {
                    tracing::debug!(offset = r.start, "unmapping revoked pages: {e}");
                }
            }
        }
        Ok(())
    }

    /// The owner restored `r`: its private pages come back in every view (poisoned ones
    /// stay guarded), then the range becomes shared here.
    fn follow_restore(
        &self,
        ctl: &mut super::Control,
        ctx: &Ctx<'_>,
        r: ByteRange,
    ) -> Result<(), StepError> {
        let pages = r.pages();
        let (private, keep) = {
            let st = self.read_pages();
            let runs: Vec<Run> = st.attrs.runs(pages.start, pages.end).collect();
            (parts(&runs, Attr::Private), st.poison.in_range(pages))
        };
        for p in private {
            ctl.views
                .restore(ctx, p, &keep)
                .map_err(|e| step_err(r.start, &e))?;
        }
        self.write_pages()
            .attrs
            .set(pages.start, pages.end, Attr::Shared);
        Ok(())
    }

    /// The owner poisoned the page at `r`: it is recorded here, and guarded in every view
    /// when shared.
    fn follow_poison(
        &self,
        ctl: &mut super::Control,
        ctx: &Ctx<'_>,
        r: ByteRange,
    ) -> Result<(), StepError> {
        let page = r.pages().start;
        let shared = {
            let mut st = self.write_pages();
            st.poison.insert(page);
            st.attrs.get(page) == Attr::Shared
        };
        if shared {
            ctl.views
                .guard_pages(ctx, &[page])
                .map_err(|e| step_err(r.start, &e))?;
        }
        Ok(())
    }

    /// The owner cleared the poison of `r`: the shared pages among those cleared come back
    /// in every view.
    fn follow_unpoison(
        &self,
        ctl: &mut super::Control,
        ctx: &Ctx<'_>,
        r: ByteRange,
    ) -> Result<(), StepError> {
        let pages = r.pages();
        let cleared: Vec<u64> = {
            let mut st = self.write_pages();
            let gone = st.poison.remove_range(pages);
            gone.into_iter()
                .filter(|&p| st.attrs.get(p) == Attr::Shared)
                .collect()
        };
        for p in cleared {
            ctl.views
                .restore(ctx, PageRange::one(p), &[])
                .map_err(|e| step_err(r.start, &e))?;
        }
        Ok(())
    }

    /// The owner is about to split or merge the huge page `r`: its writers here are held
    /// off until the owner's next step about it (`EAGAIN` naming a page a pin here holds).
    fn follow_freeze(&self, ctl: &mut super::Control, r: ByteRange) -> Result<(), StepError> {
        use super::huge::RestructureError as E;
        let (_, h) = self.whole_huge_page(r)?;
        self.hold_for_owner(ctl, h).map_err(|e| match e {
            E::Busy { offset } => StepError {
                errno: libc::EAGAIN,
                offset,
            },
            E::NoMem { offset } => StepError {
                errno: libc::ENOMEM,
                offset,
            },
            E::Participant { offset, errno } => StepError { errno, offset },
            E::Os { offset, source } => step_err(offset, &source),
        })
    }

    /// The restructuring state and the huge page `r` names exactly (`EINVAL` otherwise, and
    /// on other backings).
    fn whole_huge_page(&self, r: ByteRange) -> Result<(&super::huge::Huge, u64), StepError> {
        let einval = StepError {
            errno: libc::EINVAL,
            offset: r.start,
        };
        let huge = self.huge().ok_or(einval)?;
        let h = huge.geo.of_page(r.pages().start);
        if huge.geo.bytes(h) != r {
            return Err(einval);
        }
        Ok((huge, h))
    }

    /// The owner split or merged the huge page `r`: the follower checks its references
    /// (unless it held the page's writers for the owner, and checked then) and remaps its
    /// guest mapping and views (the owner moved the contents), then lets held writers go on.
    fn follow_restructure(
        &self,
        ctl: &mut super::Control,
        step: &Step,
        r: ByteRange,
    ) -> Result<(), StepError> {
        let (huge, h) = self.whole_huge_page(r)?;
        let hp = huge.geo.pages(h);
        let split = matches!(step, Step::Split(_));
        let private = if Self::held_for_owner(ctl, h) {
            // Writers held now may hold the page-state lock for reading: no write lock here.
            self.read_pages().attrs.all(hp.start, hp.end, Attr::Private)
        } else {
            let st = self.write_pages();
            if let Some(p) = self.refs().first_busy(hp) {
                return Err(StepError {
                    errno: libc::EAGAIN,
                    offset: page_offset(p),
                });
            }
            st.attrs.all(hp.start, hp.end, Attr::Private)
        };
        let res = self.remap_for_owner(ctl, huge, h, split, private, r);
        // The announcement ends with the hold: a foreign event read until then is seen here.
        Self::release_for_owner(ctl, h);
        self.after_own_remap(ctl);
        res
    }

    /// The remaps of [`Engine::follow_restructure`].
    fn remap_for_owner(
        &self,
        ctl: &mut super::Control,
        huge: &super::huge::Huge,
        h: u64,
        split: bool,
        private: bool,
        r: ByteRange,
    ) -> Result<(), StepError> {
        let fd = if split { huge.companion() } else { self.fd() };
        if self.guest_map().is_some() {
            self.remap_guest_window(h, fd)
                .map_err(|e| step_err(r.start, &e))?;
        }
        let numa = self.numa_policy_set();
        let ctx = self.view_ctx(numa.as_ref());
        let res = if split {
            huge.state().set_split(h);
            let st = self.read_pages();
            let hs = huge.state();
            ctl.views
                .split(&ctx, h, self.shown(&st, Some(&hs)))
                .map_err(|e| step_err(r.start, &e))
        } else {
            let res = ctl
                .views
                .merge(&ctx, h, private)
                .map_err(|e| step_err(r.start, &e));
            huge.state().set_merged(h);
            res
        };
        res
    }

    /// Marks huge pages split (a hand-over's new owner, a follower's hello): maps their
    /// pieces in the guest mapping; views made later show them split. `waiting` pages also
    /// wait to merge.
    pub(crate) fn adopt_split(&self, split: &[u64], waiting: &[u64]) -> Result<(), StepError> {
        let Some(huge) = self.huge() else {
            return Ok(());
        };
        let mut ctl = self.control_unchecked();
        for &h in split {
            let r = huge.geo.bytes(h);
            self.follow_restructure(&mut ctl, &Step::Split(r), r)?;
        }
        let mut hs = huge.state();
        for &h in waiting {
            hs.set_waiting(h, true);
        }
        self.note_merge_waiting(hs.any_waiting());
        Ok(())
    }
}
