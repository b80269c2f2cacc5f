//! Kernel references that outlive a conversion: moving pages to fresh memory.
//!
//! The kernel refuses to convert a guest_memfd page to private while anything still holds
//! it, including references the *kernel* took through a host mapping: a page `vmsplice`d
//! into a pipe, an io_uring fixed buffer, O_DIRECT I/O in flight. A userspace process cannot
//! see those references. gmem guarantees the outcome that matters instead: **a reference
//! taken before a conversion to private never observes or modifies a byte written while the
//! page is private.** After the views are revoked (so no new reference can be taken: guard
//! markers make every kernel access through a view fail with `EFAULT`), each page that a
//! kernel reference may hold is *moved*: its contents are copied out, the page is punched
//! out of the file (the stale reference keeps the old page, now an orphan) and the contents
//! are written back into a fresh page. The guest then writes its private bytes into the
//! fresh page only.
//!
//! A page may hold a kernel reference only if it is allocated and a host view showed it
//! since it last moved (a live view, or one dropped since). Pages never allocated, or never
//! shown by a view, take the cheap path and are not touched; a page whose contents are all
//! zero is punched and allocated again, with no copy. The move happens under the control lock after every view and
//! participant has revoked the page, and host accessors are already refused (the page is
//! private), so only the guest can race it: a guest write to a page *while that page's own
//! conversion to private runs* may be lost.
//!
//! HugeTLB pages are not moved (moving a huge page needs a second huge page the pool may
//! not have): on HugeTLB files a kernel reference taken through a view before a conversion
//! keeps seeing the huge page. This is a documented exception, reported by `gmem probe` and
//! pinned by a test; split pages' 4 KiB pieces are moved like shmem pages.

use std::io;

use super::views::slot::Mech;
use super::{Control, Engine};
use crate::model::units::{PageRange, PAGE_SIZE};
use crate::sys::mapping::Mapping;
use crate::sys::{fd, to_usize};

/// Pages moved per copy.
const CHUNK_PAGES: u64 = 64;

impl Engine {
    /// Moves the allocated pages of `parts` that a host view showed to fresh memory (module
    /// docs). Called with the control lock held, after every view and participant revoked
    /// them.
    pub(crate) fn orphan(&self, ctl: &mut Control, parts: &[PageRange]) -> io::Result<()> {
        for &r in parts {
            if !ctl.views.exposed(r) {
                continue;
            }
            match ctl.views.mech() {
                Mech::Guards | Mech::Sealed => {
                    let Some(map) = self.guest_map() else {
                        continue;
                    };
                    self.move_range(map, r, Target::File)?;
                }
                Mech::Huge => {
                    let Some(huge) = self.huge() else { continue };
                    let split: Vec<u64> = {
                        let st = huge.state();
                        let c = huge.geo.covering(r);
                        st.split_in(c.start, c.end)
                    };
                    for h in split {
                        if let Some(sub) = huge.geo.pages(h).intersect(&r) {
                            self.move_range(huge.pieces_map(), sub, Target::Companion)?;
                        }
                    }
                }
            }
            ctl.views.forget_history(r);
            let st = self.read_pages();
            self.refresh(ctl, &st, r)?;
        }
        Ok(())
    }

    /// Moves the resident pages of `r`, reached through `map` (a mapping of the whole file or
    /// of the companion, at file offsets).
    fn move_range(&self, map: &Mapping, r: PageRange, target: Target) -> io::Result<()> {
        let off = to_usize(r.bytes().start)?;
        let len = to_usize(r.bytes().len())?;
        let resident = map.residency(off, len)?;
        let page = to_usize(PAGE_SIZE)?;
        let mut buf = vec![0u8; to_usize(CHUNK_PAGES * PAGE_SIZE)?];
        let mut i = 0usize;
        while i < resident.len() {
            if resident[i] & 1 == 0 {
                i += 1;
                continue;
            }
            let start = i;
            while i < resident.len() && resident[i] & 1 == 1 && i - start < buf.len() / page {
                i += 1;
            }
            let first = r.start + start as u64;
            let run = PageRange::new(first, r.start + i as u64);
            self.move_run(map, run, &mut buf[..(i - start) * page], target)?;
        }
        Ok(())
    }

    fn move_run(
        &self,
        map: &Mapping,
        run: PageRange,
        buf: &mut [u8],
        target: Target,
    ) -> io::Result<()> {
        let b = run.bytes();
        let off = to_usize(b.start)?;
        let src = map.as_ptr().wrapping_add(off);
        // SAFETY: `[off, off + buf.len())` lies inside the live mapping (the range is inside
        // the file, which the mapping covers); `buf` is a separate buffer.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        // The kernel guest_memfd's punch-hole drops the guard markers of every view at the
        // offset of a page that some mapping still maps (`unmap_mapping_folio`), which would
        // leave the pages, private already, reachable through every view until the refresh
        // after the move. The copy just mapped them in gmem's mapping: unmap them there first,
        // so the views keep their markers through the punch (followers unmap theirs when they
        // revoke, see `Engine::apply_remote`).
        map.advise(off, buf.len(), libc::MADV_DONTNEED)?;
        let punch = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;
        let tfd = match target {
            Target::File => self.fd(),
            Target::Companion => match self.huge() {
                Some(h) => h.companion(),
                None => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
            },
        };
        fd::fallocate(tfd, punch, b.start, b.len())?;
        // Back page by page: zeros need no copy (a fresh allocation is zero, and stays
        // allocated, as a preallocated file expects); the rest is written back.
        let page = to_usize(PAGE_SIZE)?;
        let mut i = 0;
        while i < buf.len() {
            let zero = |j: usize| buf[j..j + page].iter().all(|&x| x == 0);
            let z = zero(i);
            let mut j = i + page;
            while j < buf.len() && zero(j) == z {
                j += page;
            }
            let at = b.start + i as u64;
            if z {
                fd::fallocate(tfd, libc::FALLOC_FL_KEEP_SIZE, at, (j - i) as u64)?;
            } else if self.backing().kernel_refuses_io() && target == Target::File {
                // The kernel guest_memfd has no write(2): through the mapping (the fault
                // allocates the fresh page).
                let dst = map.as_ptr().wrapping_add(off + i);
                // SAFETY: `[off + i, off + j)` lies inside the live mapping (as above); the
                // pages were just punched and fault in fresh.
                unsafe { std::ptr::copy_nonoverlapping(buf[i..j].as_ptr(), dst, j - i) };
            } else {
                fd::pwrite_all(tfd, &buf[i..j], at)?;
            }
            i = j;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    File,
    Companion,
}
