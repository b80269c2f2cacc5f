//! This process's host views of one file, and how every change of attributes reaches their
//! page tables.
//!
//! The engine calls these with the control lock held. Each operation leaves every view in
//! a state where the pages that are private (or poisoned) fault and the others do not; see
//! [`slot`] for the mechanism of each backing and [`tracker`] for what happens when the VMM
//! itself moves or unmaps a view.

pub(crate) mod slot;
pub(crate) mod tracker;

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use slot::{hole_fd, reserve, Aside, Mech, Slot, Window};

use crate::model::attr::{Attr, AttrMap};
use crate::model::huge::HugeState;
use crate::model::numa::NumaPolicy;
use crate::model::poison::PoisonSet;
use crate::model::units::{HugeGeometry, PageRange, PAGE_SIZE};
use crate::sys::mapping::Mapping;
use crate::sys::uffd::Uffd;
use crate::sys::{numa, to_usize};

/// What the views need to know about the file to change their page tables.
#[derive(Clone, Copy)]
pub(crate) struct Ctx<'a> {
    /// The file.
    pub fd: BorrowedFd<'a>,
    /// Its size.
    pub size: u64,
    /// HugeTLB: the geometry and the companion file of pieces.
    pub huge: Option<(HugeGeometry, BorrowedFd<'a>)>,
    /// The NUMA policy new windows get.
    pub numa: Option<&'a NumaPolicy>,
}

/// Attributes, poison and restructuring, as the views must show them.
#[derive(Clone, Copy)]
pub(crate) struct Shown<'a> {
    pub attrs: &'a AttrMap,
    pub poison: &'a PoisonSet,
    pub huge: Option<&'a HugeState>,
}

impl Shown<'_> {
    /// The pages of `r` that must fault in a guard-based view (or in a split window): private
    /// runs and poisoned shared pages, as page ranges in order.
    pub fn faulting(&self, r: PageRange) -> Vec<PageRange> {
        let mut out: Vec<PageRange> = self
            .attrs
            .runs(r.start, r.end)
            .filter(|run| run.attr == Attr::Private)
            .map(|run| run.pages())
            .collect();
        for p in self.poison.in_range(r) {
            if self.attrs.get(p) == Attr::Shared {
                out.push(PageRange::one(p));
            }
        }
        out.sort();
        out
    }
}

/// The host views of one file.
#[derive(Debug)]
pub(crate) struct ViewSet {
    mech: Mech,
    slots: Vec<Slot>,
    next_id: u64,
    /// The internal view pins point into.
    device: Option<u64>,
    /// Sealed views given up by their owner: fully guarded, never unmapped.
    retired: Vec<Mapping>,
    /// File pages shown by views dropped since they last moved (see `engine::moves`).
    history: Vec<PageRange>,
    uffd: Option<Arc<Uffd>>,
    pub(crate) tracker: Option<tracker::Tracker>,
    generation: u64,
}

fn huge_geo<'a>(ctx: &Ctx<'a>) -> io::Result<(HugeGeometry, BorrowedFd<'a>)> {
    ctx.huge
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

impl ViewSet {
    pub fn new(mech: Mech) -> Self {
        ViewSet {
            mech,
            slots: Vec::new(),
            next_id: 1,
            device: None,
            retired: Vec::new(),
            history: Vec::new(),
            uffd: None,
            tracker: None,
            generation: crate::sys::fork::generation(),
        }
    }

    pub fn mech(&self) -> Mech {
        self.mech
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// The view userfaultfd (created on first use by [`ViewSet::uffd_or_open`]).
    pub fn uffd(&self) -> Option<&Arc<Uffd>> {
        self.uffd.as_ref()
    }

    pub fn uffd_or_open(&mut self) -> io::Result<Arc<Uffd>> {
        if let Some(u) = &self.uffd {
            return Ok(u.clone());
        }
        let u = Arc::new(Uffd::new(true)?);
        self.uffd = Some(u.clone());
        Ok(u)
    }

    /// Creates a view of `len` bytes from file offset `offset` (block aligned), showing
    /// `shown`, and returns its id and address. Nothing is reachable through the new mapping
    /// before it is returned, and it is returned only fully enforced.
    pub fn create(
        &mut self,
        ctx: &Ctx<'_>,
        offset: u64,
        len: usize,
        shown: Shown<'_>,
    ) -> io::Result<(u64, usize)> {
        let align = match self.mech {
            Mech::Huge => to_usize(huge_geo(ctx)?.0.size)?,
            _ => to_usize(PAGE_SIZE)?,
        };
        let map = reserve(len, align)?;
        let in_file = to_usize(ctx.size.saturating_sub(offset))?.min(len);
        let mut slot = Slot {
            id: self.next_id,
            map,
            offset,
            len,
            in_file,
            mech: self.mech,
            windows: Default::default(),
            registered: false,
        };
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        if in_file > 0 {
            slot.map.map_file_at(0, in_file, ctx.fd, offset)?;
        }
        if in_file < len {
            // Past the end: a hole (a writable mapping of a HugeTLB file would grow it; for
            // the others the file's own end faults the same way).
            let tail = len - in_file;
            slot.map
                .map_fixed(in_file, tail, Some(hole_fd()?), 0, libc::MAP_SHARED, rw)?;
        }
        slot.map.keep_from_children()?;
        if let Some(p) = ctx.numa {
            if in_file > 0 {
                numa::mbind(&slot.map, 0, in_file, p)?;
            }
        }
        self.enforce(ctx, &mut slot, shown)?;
        match self.mech {
            Mech::Sealed => slot.map.seal()?,
            Mech::Guards | Mech::Huge => {
                let u = self.uffd_or_open()?;
                u.register(slot.base(), len)?;
                slot.registered = true;
            }
        }
        let out = (slot.id, slot.base());
        self.next_id += 1;
        self.slots.push(slot);
        Ok(out)
    }

    /// Makes `slot` show `shown` from scratch: every private or poisoned page faults.
    fn enforce(&self, ctx: &Ctx<'_>, slot: &mut Slot, shown: Shown<'_>) -> io::Result<()> {
        let pages = slot.file_pages();
        match slot.mech {
            Mech::Guards | Mech::Sealed => {
                for r in shown.faulting(pages) {
                    slot.guard(r)?;
                }
            }
            Mech::Huge => {
                let (geo, companion) = huge_geo(ctx)?;
                for h in geo.covering(pages) {
                    let hp = geo.pages(h);
                    let split = shown.huge.is_some_and(|s| s.is_split(h));
                    // Not registered yet: the windows are replaced as they are.
                    let t = Track::default();
                    if split {
                        let aside = pieces_aside(ctx, companion, geo, h, &shown.faulting(hp))?;
                        place(slot, geo, h, aside.map, t)?;
                        slot.windows.insert(h, Window::Pieces);
                    } else if shown.attrs.all(hp.start, hp.end, Attr::Private) {
                        place(slot, geo, h, hole_aside(geo, (h, 1))?, t)?;
                        slot.windows.insert(h, Window::Hole);
                    } else {
                        slot.windows.remove(&h);
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes view `id` (its owner dropped it). Returns the file pages it showed.
    pub fn remove(&mut self, id: u64) -> Option<PageRange> {
        let i = self.slots.iter().position(|s| s.id == id)?;
        let slot = self.slots.remove(i);
        let pages = slot.file_pages();
        self.history.push(pages);
        if slot.registered {
            if let Some(u) = &self.uffd {
                if let Err(e) = u.unregister(slot.base(), slot.len) {
                    tracing::debug!("unregistering a view: {e}");
                }
            }
        }
        if slot.map.is_kept() {
            // Sealed: it cannot be unmapped; make every page fault and keep it.
            if let Err(e) = slot.map.guard(0, slot.len) {
                tracing::error!("guarding a retired sealed view: {e}");
            }
            self.retired.push(slot.map);
        }
        Some(pages)
    }

    /// The internal view pins and device slices point into: the whole file, created on
    /// first use, never handed out as a [`crate::HostView`].
    pub fn device(&mut self, ctx: &Ctx<'_>, shown: Shown<'_>) -> io::Result<usize> {
        if let Some(id) = self.device {
            if let Some(s) = self.slots.iter().find(|s| s.id == id) {
                return Ok(s.base());
            }
        }
        let block = match self.mech {
            Mech::Huge => huge_geo(ctx)?.0.size,
            _ => PAGE_SIZE,
        };
        let len = to_usize(ctx.size.div_ceil(block) * block)?;
        let (id, base) = self.create(ctx, 0, len, shown)?;
        self.device = Some(id);
        Ok(base)
    }

    /// True when some view is sealed (its mapping, and so the file, stays until the process
    /// exits).
    pub fn holds_sealed(&self) -> bool {
        !self.retired.is_empty() || self.slots.iter().any(|s| s.map.is_kept())
    }

    /// Base address of the device view, when it exists.
    pub fn device_base(&self) -> Option<usize> {
        let id = self.device?;
        self.slots.iter().find(|s| s.id == id).map(Slot::base)
    }

    /// True when a live view shows a page of `r` or a dropped one did since `forget` was last
    /// called for it (see `engine::moves`).
    pub fn exposed(&self, r: PageRange) -> bool {
        self.slots
            .iter()
            .any(|s| s.file_pages().intersect(&r).is_some())
            || self.history.iter().any(|h| h.intersect(&r).is_some())
    }

    /// Records that something outside the views showed the pages of `r` (another process's
    /// mappings): they count as exposed until forgotten.
    pub fn note_shown(&mut self, r: PageRange) {
        if !r.is_empty() {
            self.history.push(r);
        }
    }

    /// Forgets the history of `r` (its pages just moved to fresh memory).
    pub fn forget_history(&mut self, r: PageRange) {
        // Most files have no history: nothing to rebuild.
        if self.history.is_empty() {
            return;
        }
        let mut kept = Vec::with_capacity(self.history.len());
        for h in self.history.drain(..) {
            match h.intersect(&r) {
                None => kept.push(h),
                Some(_) => {
                    if h.start < r.start {
                        kept.push(PageRange::new(h.start, r.start));
                    }
                    if h.end > r.end {
                        kept.push(PageRange::new(r.end, h.end));
                    }
                }
            }
        }
        self.history = kept;
    }

    /// Makes the pages of `r` fault in every view. On HugeTLB views `r` lies inside one huge
    /// page that is split, or covers whole huge pages (which become holes).
    pub fn revoke(&mut self, ctx: &Ctx<'_>, r: PageRange) -> io::Result<()> {
        let t = Track::of(&self.uffd, &self.tracker);
        match self.mech {
            Mech::Guards | Mech::Sealed => self
                .slots
                .iter()
                .try_for_each(|s| vacated_ok(s, r, s.guard(r), t)),
            Mech::Huge => {
                let (geo, _) = huge_geo(ctx)?;
                let _own = self.announce_replaced(geo, r, Window::Whole);
                for slot in &mut self.slots {
                    // Whole huge pages that became private outside a split (a bulk
                    // conversion of whole pages): their windows become one hole per run.
                    let mut run = Run::default();
                    for h in geo.covering(r) {
                        if slot.huge_span(geo, h).is_none() {
                            run.flush(slot, geo, t, None)?;
                            continue;
                        }
                        let hp = geo.pages(h);
                        match slot.window(h) {
                            Window::Pieces => {
                                run.flush(slot, geo, t, None)?;
                                let p = r.intersect(&hp).unwrap_or(r);
                                vacated_ok(slot, p, slot.guard(p), t)?;
                            }
                            Window::Hole => run.flush(slot, geo, t, None)?,
                            Window::Whole if r.intersect(&hp) == Some(hp) => run.add(h),
                            Window::Whole => {
                                return Err(io::Error::from_raw_os_error(libc::EINVAL));
                            }
                        }
                    }
                    run.flush(slot, geo, t, None)?;
                }
                Ok(())
            }
        }
    }

    /// Lets the host reach the pages of `r` in every view, except `keep` (poisoned pages,
    /// which keep faulting). On HugeTLB views as for [`ViewSet::revoke`].
    pub fn restore(&mut self, ctx: &Ctx<'_>, r: PageRange, keep: &[u64]) -> io::Result<()> {
        let parts = minus(r, keep);
        let t = Track::of(&self.uffd, &self.tracker);
        match self.mech {
            Mech::Guards | Mech::Sealed => {
                for s in &self.slots {
                    for p in &parts {
                        vacated_ok(s, *p, s.unguard(*p), t)?;
                    }
                }
                Ok(())
            }
            Mech::Huge => {
                let (geo, _) = huge_geo(ctx)?;
                let _own = self.announce_replaced(geo, r, Window::Hole);
                for slot in &mut self.slots {
                    // Wholly private huge pages, now wholly shared: the huge pages again, one
                    // mapping per run.
                    let mut run = Run::default();
                    let shared = Some(ctx);
                    for h in geo.covering(r) {
                        if slot.huge_span(geo, h).is_none() {
                            run.flush(slot, geo, t, shared)?;
                            continue;
                        }
                        let hp = geo.pages(h);
                        match slot.window(h) {
                            Window::Pieces => {
                                run.flush(slot, geo, t, shared)?;
                                for p in &parts {
                                    if let Some(p) = p.intersect(&hp) {
                                        vacated_ok(slot, p, slot.unguard(p), t)?;
                                    }
                                }
                            }
                            Window::Whole => run.flush(slot, geo, t, shared)?,
                            Window::Hole if r.intersect(&hp) == Some(hp) && keep.is_empty() => {
                                run.add(h);
                            }
                            Window::Hole => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
                        }
                    }
                    run.flush(slot, geo, t, shared)?;
                }
                Ok(())
            }
        }
    }

    /// Guards single pages (poison) in every view. On HugeTLB views only pages inside split
    /// windows are guarded (a hole faults already; a poisoned page of a whole window is
    /// split first by the engine).
    pub fn guard_pages(&self, ctx: &Ctx<'_>, pages: &[u64]) -> io::Result<()> {
        let t = Track::of(&self.uffd, &self.tracker);
        for s in &self.slots {
            for &p in pages {
                let guarded = match (s.mech, ctx.huge) {
                    (Mech::Huge, Some((geo, _))) => s.window(geo.of_page(p)) == Window::Pieces,
                    _ => true,
                };
                if guarded {
                    let r = PageRange::one(p);
                    vacated_ok(s, r, s.guard(r), t)?;
                }
            }
        }
        Ok(())
    }

    /// Announces the remaps of huge page `h`'s windows to the tracker (they replace registered
    /// ranges, which raises unmap events gmem itself must not wait for).
    pub fn announce(&self, geo: HugeGeometry, h: u64) -> Option<tracker::OwnGuard> {
        let windows: Vec<(usize, usize)> = self
            .slots
            .iter()
            .filter_map(|s| s.huge_span(geo, h).map(|(off, len)| (s.base() + off, len)))
            .collect();
        self.tracker.as_ref().map(|t| t.own.expect(&windows))
    }

    /// Announces the windows a revoke or restore of `r` replaces: those of the huge pages `r`
    /// covers whole that show as `from` (a whole huge page becoming a hole, or a hole
    /// becoming the huge page). `None` when there is none (or no tracker).
    fn announce_replaced(
        &self,
        geo: HugeGeometry,
        r: PageRange,
        from: Window,
    ) -> Option<tracker::OwnGuard> {
        let mut windows = Vec::new();
        for h in geo.covering(r) {
            if r.intersect(&geo.pages(h)) != Some(geo.pages(h)) {
                continue;
            }
            windows.extend(
                self.slots
                    .iter()
                    .filter(|s| s.window(h) == from)
                    .filter_map(|s| s.huge_span(geo, h).map(|(off, len)| (s.base() + off, len))),
            );
        }
        if windows.is_empty() {
            return None;
        }
        // Adjacent windows are replaced as one run (one unmap event over all of them).
        windows.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(windows.len());
        for (a, l) in windows {
            match merged.last_mut() {
                Some((ma, ml)) if *ma + *ml == a => *ml += l,
                _ => merged.push((a, l)),
            }
        }
        self.tracker.as_ref().map(|t| t.own.expect(&merged))
    }

    /// The windows of huge page `h` in every view that shows it, for freezing writers:
    /// `(address, len)` of windows that map memory (holes hold nothing).
    pub fn huge_windows(&self, geo: HugeGeometry, h: u64) -> Vec<(usize, usize)> {
        self.slots
            .iter()
            .filter(|s| s.window(h) != Window::Hole)
            .filter_map(|s| s.huge_span(geo, h).map(|(off, len)| (s.base() + off, len)))
            .collect()
    }

    /// Shows huge page `h` split into pieces in every view (private and poisoned pieces
    /// guarded). The caller has copied the contents into the companion file.
    pub fn split(&mut self, ctx: &Ctx<'_>, h: u64, shown: Shown<'_>) -> io::Result<()> {
        let (geo, companion) = huge_geo(ctx)?;
        let faulting = shown.faulting(geo.pages(h));
        let _own = self.announce(geo, h);
        let t = Track::of(&self.uffd, &self.tracker);
        for slot in &mut self.slots {
            if slot.huge_span(geo, h).is_none() {
                continue;
            }
            let aside = pieces_aside(ctx, companion, geo, h, &faulting)?;
            // Replaced while still registered: writers of the window are blocked on its
            // write protection, and unregistering would wake them into the old window, whose
            // bytes were already copied (their writes would be lost). The remap raises
            // events (announced), which the tracker thread reads.
            place(slot, geo, h, aside.map, t)?;
            slot.windows.insert(h, Window::Pieces);
        }
        Ok(())
    }

    /// Shows huge page `h` whole again in every view: a hole when `private`, else the huge
    /// page. The caller has copied the pieces back.
    pub fn merge(&mut self, ctx: &Ctx<'_>, h: u64, private: bool) -> io::Result<()> {
        let (geo, _) = huge_geo(ctx)?;
        let _own = self.announce(geo, h);
        let t = Track::of(&self.uffd, &self.tracker);
        for slot in &mut self.slots {
            if slot.huge_span(geo, h).is_none() || slot.window(h) != Window::Pieces {
                continue;
            }
            // Replaced while still registered, as in a split (its writers are blocked).
            if private {
                place(slot, geo, h, hole_aside(geo, (h, 1))?, t)?;
                slot.windows.insert(h, Window::Hole);
            } else {
                place(slot, geo, h, whole_aside(ctx, geo, (h, 1))?, t)?;
                slot.windows.remove(&h);
            }
        }
        Ok(())
    }

    /// Makes every page of every view fault (the file was handed over to another process).
    pub fn release_all(&mut self) {
        let windows: Vec<(usize, usize)> = self
            .slots
            .iter()
            .filter(|s| s.mech == Mech::Huge)
            .map(|s| (s.base(), s.len))
            .collect();
        let _own = self.tracker.as_ref().map(|t| t.own.expect(&windows));
        let t = Track::of(&self.uffd, &self.tracker);
        for slot in &mut self.slots {
            let res = match slot.mech {
                Mech::Guards | Mech::Sealed => slot.map.guard(0, slot.len),
                // One hole over the whole view, moved in registered (as in `place`).
                Mech::Huge => hole_fd()
                    .and_then(|fd| Mapping::shared(fd, 0, slot.len, 0))
                    .and_then(|m| {
                        m.advise(0, m.len(), libc::MADV_DONTFORK)?;
                        install(slot, 0, m, t)
                    }),
            };
            if let Err(e) = res {
                tracing::error!(view = slot.id, "revoking a view at hand-over: {e}");
            }
        }
    }

    /// Applies the NUMA policy to every view's file part.
    pub fn mbind_all(&self, policy: &NumaPolicy) -> io::Result<()> {
        for s in &self.slots {
            if s.in_file > 0 && !s.map.is_kept() {
                numa::mbind(&s.map, 0, s.in_file, policy)?;
            } else if s.in_file > 0 {
                // Sealed views accept mbind too (it changes no mapping).
                numa::mbind(&s.map, 0, s.in_file, policy)?;
            }
        }
        Ok(())
    }

    /// Re-establishes enforcement in every view after the VMM moved page tables behind
    /// gmem's back (`mremap` with `MREMAP_DONTUNMAP` leaves a view mapped but empty of
    /// markers): every private or poisoned page faults again.
    pub fn reenforce(&mut self, ctx: &Ctx<'_>, shown: Shown<'_>) -> io::Result<()> {
        let mut slots = std::mem::take(&mut self.slots);
        let res = slots.iter_mut().try_for_each(|s| match s.mech {
            Mech::Huge => {
                // Pieces windows carry guards; holes and huge windows need none.
                let (geo, _) = huge_geo(ctx)?;
                let pieces: Vec<u64> = s
                    .windows
                    .iter()
                    .filter(|(_, w)| **w == Window::Pieces)
                    .map(|(h, _)| *h)
                    .collect();
                pieces.into_iter().try_for_each(|h| {
                    shown
                        .faulting(geo.pages(h))
                        .into_iter()
                        .try_for_each(|r| s.guard(r))
                })
            }
            _ => shown
                .faulting(s.file_pages())
                .into_iter()
                .try_for_each(|r| s.guard(r)),
        });
        self.slots = slots;
        res
    }

    /// Puts the markers of the private and poisoned pages of `r` back in every view (after a
    /// punch-hole: truncation drops the markers of a page something else mapped meanwhile).
    pub fn reenforce_range(
        &mut self,
        ctx: &Ctx<'_>,
        shown: Shown<'_>,
        r: PageRange,
    ) -> io::Result<()> {
        let faulting = shown.faulting(r);
        if faulting.is_empty() {
            return Ok(());
        }
        let t = Track::of(&self.uffd, &self.tracker);
        for s in &self.slots {
            match s.mech {
                Mech::Guards | Mech::Sealed => faulting
                    .iter()
                    .try_for_each(|f| vacated_ok(s, *f, s.guard(*f), t))?,
                Mech::Huge => {
                    let (geo, _) = huge_geo(ctx)?;
                    for f in &faulting {
                        if s.window(geo.of_page(f.start)) == Window::Pieces {
                            vacated_ok(s, *f, s.guard(*f), t)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Gives up view `id`'s mapping without unmapping it (the VMM unmapped or moved part of
    /// it): gmem never touches that address range again.
    pub fn lose(&mut self, id: u64) {
        if let Some(i) = self.slots.iter().position(|s| s.id == id) {
            let slot = self.slots.remove(i);
            self.history.push(slot.file_pages());
            if self.device == Some(id) {
                self.device = None;
            }
            slot.map.forget();
        }
    }
}

impl Drop for ViewSet {
    fn drop(&mut self) {
        // A registered range unmapped without unregistering first would stop this thread
        // until someone read the unmap event: unregister every view before it goes.
        if !crate::sys::fork::generation_is_current(self.generation) {
            return;
        }
        if let Some(u) = &self.uffd {
            for s in self.slots.iter().filter(|s| s.registered) {
                if let Err(e) = u.unregister(s.base(), s.len) {
                    tracing::debug!("unregistering a view: {e}");
                }
            }
        }
    }
}

/// The pieces of huge page `h` mapped aside, the pages `faulting` guarded, under the NUMA
/// policy: ready to be placed over a window.
fn pieces_aside(
    ctx: &Ctx<'_>,
    companion: BorrowedFd<'_>,
    geo: HugeGeometry,
    h: u64,
    faulting: &[PageRange],
) -> io::Result<Aside> {
    let aside = Aside::pieces(companion, geo, h, faulting)?;
    if let Some(p) = ctx.numa {
        numa::mbind(&aside.map, 0, aside.map.len(), p)?;
    }
    Ok(aside)
}

/// `r` minus the single pages `keep`, as ranges in order.
fn minus(r: PageRange, keep: &[u64]) -> Vec<PageRange> {
    let mut out = Vec::new();
    let mut at = r.start;
    let mut keep: Vec<u64> = keep
        .iter()
        .copied()
        .filter(|p| r.iter().contains(p))
        .collect();
    keep.sort_unstable();
    for p in keep {
        if p > at {
            out.push(PageRange::new(at, p));
        }
        at = at.max(p + 1);
    }
    if at < r.end {
        out.push(PageRange::new(at, r.end));
    }
    out
}

/// How a window replacement keeps a view tracked: the view userfaultfd, and the reader's
/// record of gmem's own remaps (both absent for a view not registered yet).
#[derive(Clone, Copy, Default)]
struct Track<'a> {
    uffd: Option<&'a Uffd>,
    own: Option<&'a tracker::OwnOps>,
}

impl<'a> Track<'a> {
    /// Borrowed from the view set's fields (not through `&self`, so that its slots can be
    /// borrowed mutably beside it, and no `Arc` is cloned on the conversion path).
    fn of(uffd: &'a Option<Arc<Uffd>>, tracker: &'a Option<tracker::Tracker>) -> Self {
        Track {
            uffd: uffd.as_deref(),
            own: tracker.as_ref().map(|t| &*t.own),
        }
    }
}

/// Moves `aside` (a whole mapping built elsewhere) over `[off, off + aside.len())` of
/// `slot`. A registered view's replacement is registered with the view userfaultfd *before*
/// it moves in: a mapping created in place, or a window unregistered for a moment, could be
/// moved by the VMM in between, and the moved range would map the file with nothing tracking
/// it. The move raises an unmap event (the old window) and a remap event (the aside), both
/// announced as gmem's own.
fn install(slot: &Slot, off: usize, aside: Mapping, t: Track<'_>) -> io::Result<()> {
    let at = slot.base() + off;
    if aside.addr() < at + aside.len() && at < aside.addr() + aside.len() {
        // The kernel placed the aside where the window was: the VMM moved or unmapped the
        // view meanwhile. Nothing is replaced (the aside goes); the view is given up when
        // the change is neutralised.
        return match t.own {
            Some(own) => {
                own.note_foreign();
                Ok(())
            }
            None => Err(io::Error::from_raw_os_error(libc::EBUSY)),
        };
    }
    if let (Some(u), Some(own), true) = (t.uffd, t.own, slot.registered) {
        // Announced first: if the move fails, dropping the aside raises an unmap event too.
        own.expect_aside(aside.addr(), aside.len());
        u.register(aside.addr(), aside.len())?;
        return slot.map.replace_with(off, aside);
    }
    let len = aside.len();
    slot.map.replace_with(off, aside)?;
    if let (Some(u), true) = (t.uffd, slot.registered) {
        u.register(slot.base() + off, len)?;
    }
    Ok(())
}

/// `res`, the outcome of a view operation on `r` in `slot`, unless it failed because the VMM
/// moved or unmapped the view under gmem (`ENOMEM`, and nothing mapped there any more): that
/// is no failure of the conversion. The reader is told, and the view is given up (and its
/// moved pages neutralised) before the conversion returns. Any other error stands.
fn vacated_ok(slot: &Slot, r: PageRange, res: io::Result<()>, t: Track<'_>) -> io::Result<()> {
    match (res, t.own) {
        (Err(e), Some(own)) if e.raw_os_error() == Some(libc::ENOMEM) && slot.vacated(r) => {
            own.note_foreign();
            Ok(())
        }
        (res, _) => res,
    }
}

/// Moves `aside` over the windows of the `n` huge pages from `h` in `slot` (see
/// [`install`]).
fn place_run(
    slot: &Slot,
    geo: HugeGeometry,
    (h, n): (u64, u64),
    aside: Mapping,
    t: Track<'_>,
) -> io::Result<()> {
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    let (off, len) = slot.huge_span(geo, h).ok_or_else(einval)?;
    let last = h
        .checked_add(n)
        .and_then(|e| e.checked_sub(1))
        .ok_or_else(einval)?;
    let (last_off, _) = slot.huge_span(geo, last).ok_or_else(einval)?;
    if last_off + len - off != aside.len() {
        return Err(einval());
    }
    install(slot, off, aside, t)
}

/// Moves `aside` over huge page `h`'s window in `slot` (see [`install`]).
fn place(slot: &Slot, geo: HugeGeometry, h: u64, aside: Mapping, t: Track<'_>) -> io::Result<()> {
    place_run(slot, geo, (h, 1), aside, t)
}

/// Consecutive huge pages whose windows a revoke or restore replaces, gathered so that each
/// run is replaced with one mapping (two events for the reader, not two per huge page).
#[derive(Default)]
struct Run {
    first: u64,
    n: u64,
}

impl Run {
    fn add(&mut self, h: u64) {
        if self.n == 0 {
            self.first = h;
        }
        self.n += 1;
    }

    /// Replaces the run's windows, with holes (`shared` is `None`) or the huge pages of the
    /// file (`Some`, with its context), and records them; the run is empty after.
    fn flush(
        &mut self,
        slot: &mut Slot,
        geo: HugeGeometry,
        t: Track<'_>,
        shared: Option<&Ctx<'_>>,
    ) -> io::Result<()> {
        if self.n == 0 {
            return Ok(());
        }
        let run = (self.first, self.n);
        *self = Run::default();
        let aside = match shared {
            None => hole_aside(geo, run)?,
            Some(ctx) => whole_aside(ctx, geo, run)?,
        };
        place_run(slot, geo, run, aside, t)?;
        for h in run.0..run.0 + run.1 {
            match shared {
                None => slot.windows.insert(h, Window::Hole),
                Some(_) => slot.windows.remove(&h),
            };
        }
        Ok(())
    }
}

/// The bytes of the `n` huge pages from `h`: offset and length.
fn run_bytes(geo: HugeGeometry, (h, n): (u64, u64)) -> io::Result<(u64, usize)> {
    let start = geo.bytes(h).start;
    let len = n
        .checked_mul(geo.size)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok((start, to_usize(len)?))
}

/// The empty memfd mapped aside for the windows of the `n` huge pages from `h` (every page
/// there is private). Holes map the empty memfd at their own file offset, so adjacent holes
/// are one mapping.
fn hole_aside(geo: HugeGeometry, run: (u64, u64)) -> io::Result<Mapping> {
    let (start, len) = run_bytes(geo, run)?;
    let m = Mapping::shared(hole_fd()?, start, len, 0)?;
    m.advise(0, len, libc::MADV_DONTFORK)?;
    Ok(m)
}

/// The `n` huge pages from `h` of the file mapped aside, under the NUMA policy (every page
/// there is shared).
fn whole_aside(ctx: &Ctx<'_>, geo: HugeGeometry, run: (u64, u64)) -> io::Result<Mapping> {
    let (start, len) = run_bytes(geo, run)?;
    let m = Mapping::shared(ctx.fd, start, len, 0)?;
    m.advise(0, len, libc::MADV_DONTFORK)?;
    if let Some(p) = ctx.numa {
        numa::mbind(&m, 0, len, p)?;
    }
    Ok(m)
}
