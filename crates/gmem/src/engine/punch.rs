//! Punch-hole and allocation, per backing.
//!
//! Punch-hole discards contents (they read back zero), clears poison records in the range
//! and never changes attributes. On HugeTLB a huge page punched through the kernel would go
//! back to the pool and lose its reservation until gmem reserved the range again, and in
//! between any other user of the pool (another process, another file) may take the page:
//! the reservation then fails (`ENOMEM` from the punch) and a later touch of the page, by
//! gmem's own accessors too, is a `SIGBUS`. Nothing is gained by returning it either: the
//! page is reserved for the file again at once, so no one else could use it. So, with
//! accessors excluded (the page-state lock held for writing):
//!
//! - a huge page is zeroed in place: it stays allocated and reserved, and whoever holds it
//!   (a pin, a device slice) reads zeros, as the file does;
//! - the pieces of a split huge page are dropped and the page merges back when it can.

use std::io;

use super::participant::Step;
use super::Engine;
use crate::model::units::{ByteRange, PageRange};
use crate::sys::to_usize;

const PUNCH: libc::c_int = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;

impl Engine {
    /// Allocates `r` (validated by the verb).
    pub(crate) fn allocate(&self, mode: libc::c_int, r: ByteRange) -> io::Result<()> {
        let _ctl = self.control_unchecked();
        self.backing().fallocate(mode, r.start, r.len())
    }

    /// Punches `r` (block aligned, inside the file): see the module docs.
    pub(crate) fn punch(&self, r: ByteRange) -> io::Result<()> {
        let mut ctl = self.control_unchecked();
        self.settle(&mut ctl);
        let pages = r.pages();
        {
            // Accessors and the guest view's copies wait for the whole punch: none of them
            // may fault a punched page in (which would drop its markers) or write a private
            // byte into it before its markers are back.
            let mut st = self.write_pages();
            let cleared = match self.huge() {
                None => {
                    self.unmap_before_punch(r)?;
                    self.backing().fallocate(PUNCH, r.start, r.len())?;
                    st.poison.remove_range(pages)
                }
                Some(huge) => self.punch_huge(huge, &mut st, pages)?,
            };
            ctl.forget_shown(pages);
            self.refresh(&mut ctl, &st, pages)?;
            if !cleared.is_empty() {
                self.unguard_cleared(&mut ctl, &st, &cleared)?;
                ctl.participants.notify(&Step::Unpoison(r));
            }
        }
        // A view the VMM moved or unmapped under the punch is neutralised now.
        self.after_own_remap(&mut ctl);
        if let Some(huge) = self.huge() {
            let c = huge.geo.covering(pages);
            let hs = huge.state().split_in(c.start, c.end);
            for h in hs {
                if let Err(e) = self.merge(&mut ctl, h, false) {
                    tracing::error!(huge_page = h, "merging after a punch-hole: {e:?}");
                }
            }
        }
        Ok(())
    }

    /// The HugeTLB part of a punch-hole of `pages` (whole huge pages), with the page state
    /// held for writing. Returns the poison records it cleared.
    fn punch_huge(
        &self,
        huge: &super::huge::Huge,
        st: &mut super::PageState,
        pages: PageRange,
    ) -> io::Result<Vec<u64>> {
        let geo = huge.geo;
        let mut cleared = Vec::new();
        for h in geo.covering(pages) {
            let hr = geo.bytes(h);
            let pieces = {
                let mut hs = huge.state();
                let cached = hs.take_cached(h);
                cached || hs.is_split(h)
            };
            if pieces {
                huge.punch_pieces(h)?;
            }
            self.zero_huge(hr)?;
            cleared.extend(st.poison.remove_range(geo.pages(h)));
        }
        Ok(cleared)
    }

    /// Right before a punch of `r` in the file itself: a page mapped nowhere when it is
    /// punched keeps every view's guard markers (the kernel's truncation drops the markers of
    /// every mapping of a folio that is still mapped somewhere). A backing whose punch unmaps
    /// the range from every mapping first (shmem: [`Backing::punch_unmaps_mappings`]) needs
    /// nothing; otherwise (the kernel guest_memfd) gmem's guest mapping lets go of it here.
    /// The HugeTLB companion is shmem: its punches need nothing either.
    ///
    /// [`Backing::punch_unmaps_mappings`]: crate::backing::Backing::punch_unmaps_mappings
    pub(crate) fn unmap_before_punch(&self, r: ByteRange) -> io::Result<()> {
        if self.backing().punch_unmaps_mappings() {
            return Ok(());
        }
        let (off, len) = (to_usize(r.start)?, to_usize(r.len())?);
        if let Some(g) = self.guest_map() {
            g.advise(off, len, libc::MADV_DONTNEED)?;
        }
        Ok(())
    }

    /// Zeroes huge page range `hr` in place through gmem's mapping of the huge pages.
    fn zero_huge(&self, hr: ByteRange) -> io::Result<()> {
        let map = self
            .backing()
            .as_hugetlb()
            .map(|h| h.huge_mapping())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let off = to_usize(hr.start)?;
        let len = to_usize(hr.len())?;
        if off.checked_add(len).is_none_or(|e| e > map.len()) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: the range lies inside gmem's live mapping of the huge pages (checked); no
        // Rust reference covers guest memory.
        unsafe { std::ptr::write_bytes(map.as_ptr().wrapping_add(off), 0, len) };
        Ok(())
    }

    /// Lets the views reach shared pages whose poison record a punch-hole cleared.
    fn unguard_cleared(
        &self,
        ctl: &mut super::Control,
        st: &super::PageState,
        cleared: &[u64],
    ) -> io::Result<()> {
        let shared: Vec<u64> = cleared
            .iter()
            .copied()
            .filter(|&p| st.attrs.get(p) == crate::model::attr::Attr::Shared)
            .collect();
        let numa = self.numa_policy_set();
        let ctx = self.view_ctx(numa.as_ref());
        for p in shared {
            ctl.views.restore(&ctx, PageRange::one(p), &[])?;
        }
        Ok(())
    }
}
