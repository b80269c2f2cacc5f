//! An owned memory mapping, unmapped on drop, and the page-table operations gmem makes on it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use super::{cvt, fork, to_off};

/// `MADV_GUARD_INSTALL` (Linux 6.13): guard markers on every page of a range.
pub(crate) const MADV_GUARD_INSTALL: libc::c_int = 102;
/// `MADV_GUARD_REMOVE` (Linux 6.13): removes guard markers, leaving contents intact.
pub(crate) const MADV_GUARD_REMOVE: libc::c_int = 103;

/// An owned `mmap(2)` region. Dropping it unmaps the region, except in a forked child (the
/// region may not exist there: views are `MADV_DONTFORK`) and when it was
/// [forgotten](Mapping::forget) or sealed.
#[derive(Debug)]
pub(crate) struct Mapping {
    addr: NonNull<u8>,
    len: usize,
    generation: u64,
    keep: bool,
    /// Registered with [`fork::keep_from_children`].
    no_fork: bool,
}

// SAFETY: the mapping is plain memory owned by this value; access is coordinated by its users.
unsafe impl Send for Mapping {}
// SAFETY: as above; the type hands out only raw pointers.
unsafe impl Sync for Mapping {}

fn range_ok(offset: usize, len: usize, total: usize) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(e) if e <= total => Ok(()),
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

impl Mapping {
    /// Maps `len` bytes of `fd` at `offset`, read-write and `MAP_SHARED` with `extra` flags.
    pub fn shared(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        extra: libc::c_int,
    ) -> io::Result<Self> {
        Self::map(
            Some(fd),
            offset,
            len,
            libc::MAP_SHARED | extra,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    }

    /// The general form: `flags` and `prot` are passed to `mmap(2)` unchanged.
    pub fn map(
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
        len: usize,
        flags: libc::c_int,
        prot: libc::c_int,
    ) -> io::Result<Self> {
        let raw = fd.map_or(-1, |f| f.as_raw_fd());
        let off = to_off(offset)?;
        // SAFETY: a fresh mapping at an address of the kernel's choice aliases no Rust object.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, raw, off) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(Mapping {
            addr,
            len,
            generation: fork::generation(),
            keep: false,
            no_fork: false,
        })
    }

    /// Reserves `len` bytes of address space aligned to `align` (a power of two, such as a
    /// huge page size), inaccessible until parts are mapped over it with
    /// [`Mapping::map_fixed`].
    pub fn reserve_aligned(len: usize, align: usize) -> io::Result<Self> {
        let einval = || io::Error::from_raw_os_error(libc::EINVAL);
        if !align.is_power_of_two() {
            return Err(einval());
        }
        let total = len.checked_add(align).ok_or_else(einval)?;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        let mut wide = Self::map(None, 0, total, flags, libc::PROT_NONE)?;
        wide.keep = true;
        let start = wide.addr();
        let aligned = (start + align - 1) & !(align - 1);
        let head = aligned - start;
        let tail = total - head - len;
        if head > 0 {
            // SAFETY: `[start, aligned)` is the unused head of the reservation just made.
            cvt(unsafe { libc::munmap(wide.as_ptr().cast(), head) })?;
        }
        if tail > 0 {
            let at = wide.as_ptr().wrapping_add(head + len);
            // SAFETY: `[aligned + len, start + total)` is the unused tail of the reservation.
            cvt(unsafe { libc::munmap(at.cast(), tail) })?;
        }
        let addr = NonNull::new(wide.as_ptr().wrapping_add(head))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(Mapping {
            addr,
            len,
            generation: wide.generation,
            keep: false,
            no_fork: false,
        })
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// Address of the mapping as an integer.
    pub fn addr(&self) -> usize {
        self.addr.as_ptr() as usize
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `madvise(2)` on `[offset, offset + len)` of this mapping.
    pub fn advise(&self, offset: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
        range_ok(offset, len, self.len)?;
        let at = self.as_ptr().wrapping_add(offset);
        // SAFETY: the range lies inside this mapping; madvise does not create Rust references.
        cvt(unsafe { libc::madvise(at.cast(), len, advice) }).map(drop)
    }

    /// Guard markers on `[offset, offset + len)`: every touch is `SIGSEGV`, every kernel
    /// access through the address `EFAULT`; they survive `MADV_DONTNEED`, `mprotect` and
    /// punch-hole. The kernel zaps present pages itself (its walk retries after a zap), so
    /// one call does it.
    pub fn guard(&self, offset: usize, len: usize) -> io::Result<()> {
        self.advise(offset, len, MADV_GUARD_INSTALL)
    }

    /// Removes guard markers from `[offset, offset + len)`; pages fault in again on use.
    pub fn unguard(&self, offset: usize, len: usize) -> io::Result<()> {
        self.advise(offset, len, MADV_GUARD_REMOVE)
    }

    /// Replaces `[offset, offset + len)` with `mmap(MAP_FIXED | flags, prot)` of `fd` at
    /// `fd_offset` (anonymous when `fd` is `None`). The range stays owned by this mapping.
    pub fn map_fixed(
        &self,
        offset: usize,
        len: usize,
        fd: Option<BorrowedFd<'_>>,
        fd_offset: u64,
        flags: libc::c_int,
        prot: libc::c_int,
    ) -> io::Result<()> {
        range_ok(offset, len, self.len)?;
        let at = self.as_ptr().wrapping_add(offset);
        let off = to_off(fd_offset)?;
        let raw = fd.map_or(-1, |f| f.as_raw_fd());
        // SAFETY: the range lies inside this mapping, which no Rust reference aliases; MAP_FIXED
        // replaces the pages in place and the mapping's owner still unmaps the whole region.
        let p = unsafe { libc::mmap(at.cast(), len, prot, flags | libc::MAP_FIXED, raw, off) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `MAP_SHARED` read-write mapping of `fd` over `[offset, offset + len)`.
    pub fn map_file_at(
        &self,
        offset: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        fd_offset: u64,
    ) -> io::Result<()> {
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        self.map_fixed(offset, len, Some(fd), fd_offset, libc::MAP_SHARED, rw)
    }

    /// Moves `part` (a mapping of exactly `len` bytes, prepared elsewhere) over
    /// `[offset, offset + len)` of this mapping with `mremap(MREMAP_FIXED)`: its page tables
    /// (guard markers included) move with it, so the window changes from the old contents to
    /// the prepared ones in one step, with nothing in between.
    pub fn replace_with(&self, offset: usize, part: Mapping) -> io::Result<()> {
        let len = part.len;
        range_ok(offset, len, self.len)?;
        let at = self.as_ptr().wrapping_add(offset);
        let mut part = part;
        // SAFETY: `part` is a whole mapping owned by this call; the destination lies inside
        // this mapping, which no Rust reference aliases. On success `part` no longer exists
        // at its old address (it is forgotten below); on failure it is unmapped on drop.
        let p = unsafe {
            libc::mremap(
                part.as_ptr().cast(),
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                at.cast::<libc::c_void>(),
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        part.keep = true;
        part.release_from_children();
        Ok(())
    }

    /// Seals the whole mapping (`mseal(2)`, Linux 6.10): it can no longer be unmapped,
    /// moved, resized, remapped over or have its protection changed, by anyone, until the
    /// process exits. The mapping is then never unmapped on drop.
    pub fn seal(&mut self) -> io::Result<()> {
        // SAFETY: plain syscall on a range this value owns; sealing changes no contents.
        let r = unsafe { libc::syscall(libc::SYS_mseal, self.as_ptr(), self.len, 0) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        self.keep = true;
        Ok(())
    }

    /// True when the mapping is sealed (never unmapped).
    pub fn is_kept(&self) -> bool {
        self.keep
    }

    /// Gives up the region without unmapping it: it was unmapped or moved by someone else.
    pub fn forget(mut self) {
        self.keep = true;
        self.release_from_children();
    }

    /// Keeps the whole mapping out of every child process: `MADV_DONTFORK` now, and again
    /// right before each `fork` (in case it was undone with `MADV_DOFORK`).
    pub fn keep_from_children(&mut self) -> io::Result<()> {
        fork::keep_from_children(self.addr(), self.len)?;
        self.no_fork = true;
        Ok(())
    }

    fn release_from_children(&mut self) {
        if self.no_fork && self.generation == fork::generation() {
            fork::release_from_children(self.addr());
            self.no_fork = false;
        }
    }

    /// Residency of the pages of `[offset, offset + len)` (`mincore(2)`): one byte per page,
    /// bit 0 set when the page is in memory.
    pub fn residency(&self, offset: usize, len: usize) -> io::Result<Vec<u8>> {
        range_ok(offset, len, self.len)?;
        let page = usize::try_from(crate::model::units::PAGE_SIZE).unwrap_or(4096);
        let mut vec = vec![0u8; len.div_ceil(page)];
        let at = self.as_ptr().wrapping_add(offset);
        // SAFETY: the range lies inside this mapping and `vec` has one byte per page of it.
        cvt(unsafe { libc::mincore(at.cast(), len, vec.as_mut_ptr()) })?;
        Ok(vec)
    }
}

/// True when part of `[addr, addr + len)` is mapped by nothing (`mincore` answers `ENOMEM`):
/// the VMM moved or unmapped a view of gmem's under it.
pub fn vacant(addr: usize, len: usize) -> bool {
    let page = usize::try_from(crate::model::units::PAGE_SIZE).unwrap_or(4096);
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: mincore reads no memory of the range, it only writes one byte per page of it
    // into `vec`, which has that many.
    let r = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOMEM)
}

/// Replaces `[addr, addr + len)` with a read-write `MAP_SHARED | MAP_FIXED` mapping of `fd`
/// from offset 0: whatever was mapped there is gone at once, with nothing in between.
///
/// For the view tracker only, on a range it found in `/proc/self/smaps` mapping the guest
/// memory file outside every live view (a view the VMM moved or grew, the target of a
/// `MREMAP_DONTUNMAP`, what remains of a view given up): such a range holds guest memory,
/// never a Rust object.
///
/// The new mapping is deliberately not owned by a [`Mapping`]: it lies in address space
/// gmem does not own, or no longer owns. The VMM created the range with its own `mremap`
/// and unmaps it itself; what remains of a view given up belongs to that view's
/// [`Mapping`], which is [forgotten](Mapping::forget) right after. A second owner would
/// unmap on drop addresses the VMM may since have mapped anew.
pub(crate) fn replace_foreign(addr: usize, len: usize, fd: BorrowedFd<'_>) -> io::Result<()> {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_SHARED | libc::MAP_FIXED;
    // SAFETY: replaces a mapping of guest memory that gmem found at `addr` (see above) in
    // place; no Rust object lives there.
    let p = unsafe { libc::mmap(addr as *mut libc::c_void, len, rw, flags, fd.as_raw_fd(), 0) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.keep || self.generation != fork::generation() {
            return;
        }
        self.release_from_children();
        // SAFETY: this value owns the region; nothing borrows it past drop.
        let ret = unsafe { libc::munmap(self.as_ptr().cast(), self.len) };
        if ret != 0 {
            tracing::error!(
                addr = self.addr(),
                len = self.len,
                "munmap failed: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// Faults in the whole pages inside `words` (a fresh heap allocation) with one
/// `MADV_POPULATE_WRITE`, so filling them costs no page fault per 4 KiB (expensive under a
/// software hypervisor). Best effort: the contents are unchanged either way, and an error
/// (an old kernel, an allocation not from anonymous memory) only leaves the faults to come.
pub(crate) fn populate_words(words: &mut [u64]) {
    let page = usize::try_from(crate::model::units::PAGE_SIZE).unwrap_or(4096);
    let start = words.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(words);
    let (lo, hi) = (start.next_multiple_of(page), end - end % page);
    if lo >= hi {
        return;
    }
    // SAFETY: `[lo, hi)` lies inside `words`, memory this call borrows exclusively;
    // MADV_POPULATE_WRITE faults pages in without changing their contents.
    let ret = unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_POPULATE_WRITE) };
    if ret != 0 {
        tracing::debug!(
            "populating {} bytes: {}",
            hi - lo,
            io::Error::last_os_error()
        );
    }
}
