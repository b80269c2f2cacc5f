//! Kernel references that outlive a conversion: moving pages to fresh memory.
//!
//! The kernel refuses to convert a guest_memfd page to private while anything still holds
//! it, including references the *kernel* took through a host mapping: a page `vmsplice`d
//! into a pipe, an io_uring fixed buffer, O_DIRECT I/O in flight. A userspace process cannot
//! see those references. gmem guarantees the outcome that matters instead: **a reference
//! taken before a conversion to private never observes or modifies a byte written while the
//! page is private.** After the views are revoked (so no new reference can be taken: guard
//! markers make every kernel access through a view fail with `EFAULT`), each page that a
//! kernel reference may hold is *moved*: its contents are copied out (read from the file,
//! or through gmem's mapping on the kernel guest_memfd, which has no `read(2)`), the page
//! is punched out of the file (the stale reference keeps the old page, now an orphan) and
//! the contents are written back into a fresh page. The guest then writes its private
//! bytes into the fresh page only.
//!
//! A page may hold a kernel reference only if it is allocated and a host view showed it
//! since it last moved (a live view, or one dropped since), or another process may have
//! mapped it: every page of a file shared with a peer follower (for as long as one follows,
//! and until each page moves after it left), and of a file received by a hand-over (the old
//! owner's views showed any page). Pages never allocated, or never shown, take the cheap
//! path and are not touched; a page whose contents are all
//! zero is punched and allocated again, with no copy. The move happens under the control
//! lock after every view and participant has revoked the page, and host accessors are
//! already refused (the page is private); the guest view's copies wait for it. Only a
//! guest that writes through the guest mapping directly (a vCPU on an hva memslot) races
//! it: a write to a page *while that page's own conversion to private runs* may be lost.
//!
//! A punched page must be mapped nowhere: the kernel's truncation drops the guard markers
//! of every mapping of a folio still mapped somewhere. The views and participants revoked
//! it, and the punch finds it mapped nowhere else: a shmem punch unmaps the range from every
//! mapping before it truncates, and on the kernel guest_memfd, whose punch truncates at once,
//! gmem unmaps it from its own mapping right before (the
//! `hardening_refs_moved_page_gmem_mapped` case); a follower attached
//! with the guest view that maps the page at that moment, or a vCPU faulting it through
//! the guest mapping, can still make the kernel drop markers, which [`Engine::refresh`]
//! puts back right after (a window of one punch). The refresh is needed only then: while no
//! participant is registered, the guest mapping's address was never handed out and no
//! HugeTLB preallocation faults the guest mapping, only gmem's own code, which waits for the
//! page-state lock, could map the page in that window, and the markers survive the punch.
//! The 131,072-run case of the conformance catalogue probes every page it moved so;
//! `hardening_guest_pointer_racing_moves` and the HugeTLB preallocation race test race the
//! window.
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
    /// them. The page state is held for writing while a range moves: the guest view's copies
    /// wait, so none of them maps a page between its unmapping and its punch.
    pub(crate) fn orphan(&self, ctl: &mut Control, parts: &[PageRange]) -> io::Result<()> {
        // Read before any page is unmapped from gmem's mappings.
        let seq = self.unlocked_faults_seq();
        for &r in parts {
            if !ctl.may_be_referenced(r) {
                continue;
            }
            // Every view has revoked `r`, so no new kernel reference can be taken through
            // one: a page not resident now never held one. Most conversions find none and
            // take no lock.
            let Some(resident) = self.residency(ctl, r)? else {
                ctl.forget_shown(r);
                continue;
            };
            let st = self.write_pages();
            let moved = match ctl.views.mech() {
                // The residency read above serves the move: a page that became resident
                // since was not resident when every view had revoked it, so it holds no
                // kernel reference.
                Mech::Guards | Mech::Sealed => match self.guest_map() {
                    Some(map) => self.move_range(map, r, Target::File, Some(resident))?,
                    None => false,
                },
                Mech::Huge => {
                    let Some(huge) = self.huge() else { continue };
                    let split: Vec<u64> = {
                        let st = huge.state();
                        let c = huge.geo.covering(r);
                        st.split_in(c.start, c.end)
                    };
                    let mut moved = false;
                    for h in split {
                        if let Some(sub) = huge.geo.pages(h).intersect(&r) {
                            // The pieces' residency was read with the range's (as above).
                            let from = to_usize(sub.start - r.start)?;
                            let to = to_usize(sub.end - r.start)?;
                            let part = resident.get(from..to).map(<[u8]>::to_vec);
                            moved |=
                                self.move_range(huge.pieces_map(), sub, Target::Companion, part)?;
                        }
                    }
                    moved
                }
            };
            // A page no mapping holds has no kernel reference either (a reference keeps
            // the page allocated and resident): what was not moved needs no new page.
            ctl.forget_shown(r);
            // The kernel's truncation keeps the views' markers of a page mapped nowhere, and
            // a moved page was mapped nowhere at its punch unless something outside gmem's
            // locked paths could fault it there (module docs). Asked after the punch.
            if moved && self.others_may_have_mapped(ctl, seq) {
                self.refresh(ctl, &st, r)?;
            }
        }
        Ok(())
    }

    /// The residency of `r` (one byte per page, `mincore`'s) in the memory a move would take
    /// it from, or `None` when no page of it is resident.
    ///
    /// The file's page cache is asked first, for the whole range (`cachestat`, a third of a
    /// `mincore` on this machine kind: the `residency` row of `gmem bench`): when it holds none of the range's pages (what most conversions find)
    /// or all of them (a page the host touched), that is the answer; only a range partly
    /// resident, or a kernel without `cachestat`, pays the per-page `mincore`. A shmem page
    /// swapped out counts as resident (it may still be in the swap cache): the move then
    /// reads it back in, which is slower, never wrong.
    fn residency(&self, ctl: &Control, r: PageRange) -> io::Result<Option<Vec<u8>>> {
        let (off, len) = (to_usize(r.bytes().start)?, to_usize(r.bytes().len())?);
        let (map, file) = match ctl.views.mech() {
            Mech::Guards | Mech::Sealed => (self.guest_map(), Some(self.fd())),
            Mech::Huge => match self.huge() {
                Some(h) => (Some(h.pieces_map()), Some(h.companion())),
                None => (None, None),
            },
        };
        let Some(m) = map else { return Ok(None) };
        if let Some(fd) = file {
            match fd::cached_or_evicted(fd, r.bytes().start, r.bytes().len()) {
                Ok(0) => return Ok(None),
                Ok(n) if n == r.len() => return Ok(Some(vec![1; to_usize(n)?])),
                _ => {}
            }
        }
        let v = m.residency(off, len)?;
        Ok(v.iter().any(|b| b & 1 == 1).then_some(v))
    }

    /// Moves the resident pages of `r`, reached through `map` (a mapping of the whole file or
    /// of the companion, at file offsets); true when there was one. `resident` is the
    /// range's residency when the caller has read it (read here otherwise).
    fn move_range(
        &self,
        map: &Mapping,
        r: PageRange,
        target: Target,
        resident: Option<Vec<u8>>,
    ) -> io::Result<bool> {
        let off = to_usize(r.bytes().start)?;
        let len = to_usize(r.bytes().len())?;
        let resident = match resident {
            Some(v) => v,
            None => map.residency(off, len)?,
        };
        let page = to_usize(PAGE_SIZE)?;
        // Allocated on the first resident page: most ranges hold none.
        let mut buf = Vec::new();
        let mut i = 0usize;
        while i < resident.len() {
            if resident[i] & 1 == 0 {
                i += 1;
                continue;
            }
            if buf.is_empty() {
                // As large as the resident pages left need, at most a chunk: a conversion of
                // one page copies one page.
                let left = resident[i..].iter().filter(|&&b| b & 1 == 1).count();
                let pages = left.min(to_usize(CHUNK_PAGES)?);
                buf = vec![0u8; pages * page];
            }
            let start = i;
            while i < resident.len() && resident[i] & 1 == 1 && i - start < buf.len() / page {
                i += 1;
            }
            let first = r.start + start as u64;
            let run = PageRange::new(first, r.start + i as u64);
            self.move_run(map, run, &mut buf[..(i - start) * page], target)?;
        }
        Ok(!buf.is_empty())
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
        let tfd = match target {
            Target::File => self.fd(),
            Target::Companion => match self.huge() {
                Some(h) => h.companion(),
                None => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
            },
        };
        // The kernel guest_memfd has no read(2) or write(2): its pages are copied through
        // the mapping. Every other file is read and written with syscalls, which take the
        // page cache's pages as they are: a copy through gmem's mapping would fault each
        // page into it (a page the views populated is not mapped there) only for the
        // unmapping below to zap it again, two page-table changes and a TLB flush per page.
        let by_mapping = self.backing().kernel_refuses_io() && target == Target::File;
        if by_mapping {
            let src = map.as_ptr().wrapping_add(off);
            // SAFETY: `[off, off + buf.len())` lies inside the live mapping (the range is
            // inside the file, which the mapping covers); `buf` is a separate buffer.
            unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        } else {
            fd::pread_exact(tfd, buf, b.start)?;
        }
        // The page must be mapped nowhere when it is punched: the kernel's truncation drops
        // the guard markers of every mapping of a folio that is still mapped somewhere
        // (`unmap_mapping_folio`), which would open the views until they are re-guarded.
        // The views and participants have revoked it; the punch, or gmem's guest mapping
        // right before it, unmaps it from the rest (`unmap_before_punch`: the companion is
        // shmem, whose punch does it).
        if target == Target::File {
            self.unmap_before_punch(b)?;
        }
        let punch = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;
        fd::fallocate(tfd, punch, b.start, b.len())?;
        // Back page by page: zeros need no copy (a fresh allocation is zero, and stays
        // allocated, as a preallocated file expects); the rest is written back.
        let page = to_usize(PAGE_SIZE)?;
        let mut i = 0;
        while i < buf.len() {
            let zero = |j: usize| all_zero(&buf[j..j + page]);
            let z = zero(i);
            let mut j = i + page;
            while j < buf.len() && zero(j) == z {
                j += page;
            }
            let at = b.start + i as u64;
            if z {
                fd::fallocate(tfd, libc::FALLOC_FL_KEEP_SIZE, at, (j - i) as u64)?;
            } else if by_mapping {
                // Through the mapping (the fault allocates the fresh page).
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

/// True when every byte of `b` is zero: the bytes of each 512-byte block are OR-ed together,
/// which the compiler turns into vector ORs with one test per block (64-bit words assembled
/// byte by byte, as this did before, were not vectorised).
fn all_zero(b: &[u8]) -> bool {
    b.chunks(512)
        .all(|block| block.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    File,
    Companion,
}

#[cfg(test)]
mod tests {
    use super::all_zero;

    #[test]
    fn all_zero_finds_any_set_byte() {
        let mut page = vec![0u8; 4096 + 3];
        assert!(all_zero(&page));
        for at in [0, 7, 63, 64, 4095, 4096, 4098] {
            page[at] = 1;
            assert!(!all_zero(&page), "byte {at}");
            page[at] = 0;
        }
        assert!(all_zero(&[]));
    }
}
