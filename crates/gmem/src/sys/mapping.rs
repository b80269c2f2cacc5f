//! An owned memory mapping, unmapped on drop.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use super::{cvt, to_off};

/// An owned `mmap(2)` region. Dropping it unmaps the region.
#[derive(Debug)]
pub struct Mapping {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; access is coordinated by its users.
unsafe impl Send for Mapping {}
// SAFETY: as above; the type hands out only raw pointers.
unsafe impl Sync for Mapping {}

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

    /// Maps `len` bytes of private anonymous memory, zero-filled on first touch.
    pub fn anonymous(len: usize) -> io::Result<Self> {
        Self::map(
            None,
            0,
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
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
        Ok(Mapping { addr, len })
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
        let wide = std::mem::ManuallyDrop::new(Self::map(None, 0, total, flags, libc::PROT_NONE)?);
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
        Ok(Mapping { addr, len })
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

    /// True when the mapping is zero bytes long (never, in practice).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `madvise(2)` on `[offset, offset + len)` of this mapping.
    pub fn advise(&self, offset: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        debug_assert!(end <= self.len);
        let at = self.as_ptr().wrapping_add(offset);
        // SAFETY: the range lies inside this mapping; madvise does not create Rust references.
        cvt(unsafe { libc::madvise(at.cast(), len, advice) }).map(drop)
    }

    /// Replaces `[offset, offset + len)` of this mapping with `MAP_SHARED | MAP_FIXED` of `fd`
    /// at `fd_offset`, read-write. The range stays owned by this mapping (unmapped on drop).
    pub fn map_fixed(
        &self,
        offset: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        fd_offset: u64,
    ) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let at = self.as_ptr().wrapping_add(offset);
        let off = to_off(fd_offset)?;
        // SAFETY: the range lies inside this mapping, which no Rust reference aliases; MAP_FIXED
        // replaces the pages in place and the mapping's owner still unmaps the whole region.
        let p = unsafe {
            libc::mmap(
                at.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `mbind(2)` the whole mapping with `mode` and the node mask `nodes` (bit n = node n).
    pub fn mbind(&self, mode: libc::c_int, nodes: &[libc::c_ulong], flags: u32) -> io::Result<()> {
        let maxnode = nodes.len() * libc::c_ulong::BITS as usize + 1;
        let mask = if nodes.is_empty() {
            std::ptr::null()
        } else {
            nodes.as_ptr()
        };
        // SAFETY: the range is this mapping; `mask` is valid for `maxnode - 1` bits or null.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_mbind,
                self.as_ptr(),
                self.len,
                mode,
                mask,
                maxnode,
                flags,
            )
        };
        if ret == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
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
