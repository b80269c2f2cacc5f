//! Many mappings in the calling process, for tests and benches of what scales with them (the
//! count gmem keeps `vm.max_map_count` headroom with, a split's cost).

use std::io;

const PAGE: usize = 4096;

/// `n` more mappings of this process while the value lives: an anonymous reservation of `n`
/// pages with every other page made readable, so that no two neighbours merge and each page
/// is one mapping. Unmapped on drop.
#[derive(Debug)]
pub struct ManyMappings {
    base: *mut libc::c_void,
    len: usize,
}

impl ManyMappings {
    /// Makes `n` mappings (`n` at least 1). Fails with the OS error of the reservation or of
    /// a split (`ENOMEM` near `vm.max_map_count`), unmapping what it made.
    pub fn new(n: usize) -> io::Result<ManyMappings> {
        let len = n
            .max(1)
            .checked_mul(PAGE)
            .ok_or(io::ErrorKind::InvalidInput)?;
        // SAFETY: a fresh anonymous reservation where the kernel chooses.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let many = ManyMappings { base, len };
        for i in (0..n).step_by(2) {
            let at = base.cast::<u8>().wrapping_add(i * PAGE);
            // SAFETY: a page of the reservation above, which nothing else uses.
            if unsafe { libc::mprotect(at.cast(), PAGE, libc::PROT_READ) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(many)
    }
}

impl Drop for ManyMappings {
    fn drop(&mut self) {
        // SAFETY: the reservation made in `new`, unmapped once.
        unsafe { libc::munmap(self.base, self.len) };
    }
}
