//! Hardening cases: the VMM's own ordinary operations on its views, kernel references taken
//! through a view, pointers and capabilities handed to host code (DESIGN §13, promise 1).
//!
//! Every case builds the same [`Layout`]: a shared file whose pages carry [`SHARED`], with one
//! private 4 KiB page inside the first block (a split huge page on HugeTLB) and the whole last
//! block private (8 pages on shmem, one private huge page on HugeTLB), each holding [`SECRET`] written by
//! the guest after the conversion. A case then does something to a view and checks that no
//! host path reads [`SECRET`]:
//!
//! - [`madvise`]: every `madvise` advice, `mprotect`, `mlock`;
//! - [`remap`]: `mremap` (move, grow, `MREMAP_DONTUNMAP`), `munmap` of part of a view,
//!   `MAP_FIXED` over a view;
//! - [`kernel_refs`]: a page vmspliced into a pipe, an io_uring fixed buffer, `O_DIRECT`;
//! - [`capabilities`]: pins, the guest mapping's address, followers, forked children, the debugger paths (`/proc/<pid>/mem`,
//!   `process_vm_readv`).

pub mod capabilities;
pub mod kernel_refs;
pub mod madvise;
pub mod remap;

use gmem::{Attr, BackingKind, Flags, GuestMemfd, HostView};

use super::{guest_expect, guest_fill, require, PAGE};
use crate::touch;
use crate::Ctx;

/// What shared pages hold.
pub const SHARED: u8 = 0x5a;
/// What the guest writes into private pages after converting them.
pub const SECRET: u8 = 0xc5;

/// A file, a view of all of it, and where its private pages are.
#[derive(Debug)]
pub struct Layout {
    /// The file.
    pub mem: GuestMemfd,
    /// A host view of the whole file.
    pub view: HostView,
    /// Offset of the first page of the private last block.
    pub last: u64,
}

impl Layout {
    /// Builds the layout, or `None` (printing why) when the backing cannot map files.
    pub fn new(ctx: &Ctx<'_>) -> Option<Layout> {
        let flags = Flags::MMAP | Flags::INIT_SHARED;
        if !require(ctx, flags) {
            return None;
        }
        let block = ctx.block();
        let size = (2 * block).max(16 * PAGE);
        let mem = ctx.create(size, flags);
        let view = mem.map(0, size).expect("map the whole file");
        touch::fill(&view, 0, size, SHARED).expect("fill the shared file");
        let last = size - block.max(8 * PAGE);
        mem.convert(PAGE, PAGE, Attr::Private)
            .expect("one page of the first block to private");
        mem.convert(last, size - last, Attr::Private)
            .expect("the last block to private");
        guest_fill(&mem, PAGE, PAGE, SECRET);
        guest_fill(&mem, last, size - last, SECRET);
        Some(Layout { mem, view, last })
    }

    /// The file's size.
    pub fn size(&self) -> u64 {
        self.mem.size()
    }

    /// True for the offset of a private page.
    pub fn is_private(&self, offset: u64) -> bool {
        let page = offset & !(PAGE - 1);
        page == PAGE || page >= self.last
    }

    /// The pages a check touches: all of them up to 64 MiB; on larger files (1 GiB huge
    /// pages) the first and last 16 pages of every block and the pages around the split one.
    pub fn sample(&self) -> Vec<u64> {
        let size = self.size();
        if size <= 64 << 20 {
            return (0..size).step_by(4096).collect();
        }
        let block = self.mem.stat().map_or(size, |(_, b)| b);
        let mut pages: Vec<u64> = (0..size / block)
            .flat_map(|b| {
                let lo = b * block;
                (lo..lo + 16 * PAGE)
                    .chain(lo + block - 16 * PAGE..lo + block)
                    .step_by(4096)
            })
            .collect();
        pages.sort_unstable();
        pages.dedup();
        pages
    }

    /// True when the file is a kernel guest_memfd (its views are sealed).
    pub fn sealed(&self) -> bool {
        self.mem.backing_kind() == BackingKind::KernelGuestMemfd
    }

    /// Asserts the layout holds in `view` (of any part of the file): every private page faults with the view's documented
    /// signal, every shared page reads `shared`, and the guest reads [`SECRET`] in every
    /// private page; the accessors refuse private pages with `EFAULT`.
    #[track_caller]
    pub fn check(&self, view: &HostView, shared: Option<u8>, what: &str) {
        let (lo, hi) = (view.offset(), view.offset() + view.len() as u64);
        for p in self.sample().into_iter().filter(|&p| p >= lo && p < hi) {
            if self.is_private(p) {
                let what = format!("{what}: private page {p:#x}");
                touch::expect_fault(view, p - lo, PAGE, &what);
            } else if let Some(v) = shared {
                let what = format!("{what}: shared page {p:#x}");
                touch::expect_bytes(view, p - lo, PAGE, v, &what);
            }
        }
        for p in self.sample().into_iter().filter(|&p| self.is_private(p)) {
            guest_expect(
                &self.mem,
                p,
                PAGE,
                SECRET,
                &format!("{what}: guest, {p:#x}"),
            );
        }
        let e = self
            .mem
            .read_at(PAGE, &mut [0u8; 8])
            .expect_err("read_at of a private page");
        assert_eq!(
            (gmem::Errno::errno(&e), gmem::Errno::error_offset(&e)),
            (libc::EFAULT, Some(PAGE)),
            "{what}: read_at of a private page"
        );
    }

    /// Converts every private page back to shared and asserts the view reads [`SECRET`] there
    /// in place (the enforcement was lifted by gmem, not lost) and `shared` elsewhere.
    #[track_caller]
    pub fn restore_and_check(&self, shared: Option<u8>, what: &str) {
        self.mem
            .convert(0, self.size(), Attr::Shared)
            .expect("everything back to shared");
        for p in self.sample() {
            if self.is_private(p) {
                touch::expect_bytes(&self.view, p, PAGE, SECRET, &format!("{what}: {p:#x}"));
            } else if let Some(v) = shared {
                touch::expect_bytes(&self.view, p, PAGE, v, &format!("{what}: {p:#x}"));
            }
        }
    }
}

/// `errno` of the last failed call.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The view's address as a C pointer.
pub fn addr(view: &HostView) -> *mut libc::c_void {
    view.as_ptr().cast()
}

/// A memfd to write into and read back.
pub fn sink() -> std::fs::File {
    // SAFETY: plain syscall with a static name.
    let fd = unsafe { libc::memfd_create(c"gmem-sink".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: errno {}", errno());
    // SAFETY: `fd` is fresh and owned by nobody else.
    std::fs::File::from(unsafe {
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
    })
}

/// Everything written into a [`sink`].
pub fn sink_bytes(f: &std::fs::File) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let len = f.metadata().expect("fstat").len();
    let mut out = vec![0u8; usize::try_from(len).expect("fits")];
    f.read_exact_at(&mut out, 0).expect("read back");
    out
}
