//! The kernel guest_memfd backing: its answers against the raw kernel's, case by case, and
//! host-view enforcement without userfaultfd.

mod common;

use std::os::fd::{AsFd, AsRawFd};

use common::{create, vm_or_skip, Kind};
use gmem::Errno;
use gmem::{AccessError, Attr, BackingKind, FallocMode, Flags, MapError};
use gmem_conformance::touch;
use gmem_kvm::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};

const PAGE: u64 = 4096;

fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().map(|e| e.raw_os_error().unwrap_or(-1))
}

/// Raw `fallocate(2)` with the arguments reinterpreted as the kernel sees them.
fn raw_fallocate(fd: i32, mode: i32, offset: u64, len: u64) -> Option<i32> {
    // Two's-complement reinterpretation: a u64 above i64::MAX is a negative loff_t.
    let (o, l) = (offset as i64, len as i64);
    // SAFETY: plain syscall on a descriptor the test owns.
    let ret = unsafe { libc::fallocate(fd, mode, o, l) };
    errno_of(if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    })
}

#[test]
fn kernel_flags_add_init_shared_only_with_mmap() {
    let Some(vm) = vm_or_skip() else { return };
    let accepted = vm.capabilities().guest_memfd_flags;
    let both = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    let expect_mmap = if accepted.contains(Flags::INIT_SHARED) {
        both
    } else {
        GUEST_MEMFD_FLAG_MMAP
    };
    assert_eq!(vm.kernel_flags_for(Flags::MMAP), expect_mmap);
    assert_eq!(vm.kernel_flags_for(Flags::NONE), 0);
    assert_eq!(
        vm.kernel_flags_for(Flags::INIT_SHARED),
        GUEST_MEMFD_FLAG_INIT_SHARED
    );
    assert_eq!(vm.kernel_flags_for(Flags::from_bits_retain(1 << 9)), 1 << 9);
    let mem = vm
        .create_guest_memfd(4 * PAGE, Flags::MMAP)
        .expect("create");
    assert_eq!(mem.flags(), Flags::MMAP, "gmem keeps the caller's flags");
    assert_eq!(mem.backing_kind(), BackingKind::KernelGuestMemfd);
    // gmem's attributes start private as asked, whatever the kernel object got.
    assert_eq!(mem.runs(0, 4 * PAGE).expect("runs")[0].attr, Attr::Private);
}

#[test]
fn create_errors_are_the_kernels() {
    let Some(vm) = vm_or_skip() else { return };
    for (size, flags) in [
        (0, 0),
        (1, 0),
        (PAGE + 1, 0),
        (u64::MAX, 0),
        (PAGE, 1 << 2),
        (PAGE, 1 << 63),
    ] {
        let e = vm
            .create_guest_memfd(size, Flags::from_bits_retain(flags))
            .expect_err("refused");
        assert_eq!(
            e.errno(),
            libc::EINVAL,
            "size {size:#x} flags {flags:#x}: {e}"
        );
        assert!(e.to_string().contains("KVM_CREATE_GUEST_MEMFD"), "{e}");
    }
}

#[test]
fn fallocate_answers_equal_the_raw_kernel_answers() {
    let Some(vm) = vm_or_skip() else { return };
    let size = 16 * PAGE;
    let mem = vm
        .create_guest_memfd(size, Flags::MMAP | Flags::INIT_SHARED)
        .expect("create");
    let raw = vm
        .create_guest_memfd(size, Flags::MMAP | Flags::INIT_SHARED)
        .expect("create");
    let raw_fd = raw.as_fd().as_raw_fd();
    let modes = [
        0,
        libc::FALLOC_FL_KEEP_SIZE,
        libc::FALLOC_FL_PUNCH_HOLE,
        libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
        libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_ZERO_RANGE,
        libc::FALLOC_FL_ZERO_RANGE,
        libc::FALLOC_FL_COLLAPSE_RANGE,
        libc::FALLOC_FL_INSERT_RANGE,
        libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_UNSHARE_RANGE,
        libc::FALLOC_FL_KEEP_SIZE | 0x80,
        libc::FALLOC_FL_KEEP_SIZE | 0x100,
        libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE,
    ];
    let values = [
        0,
        1,
        PAGE - 1,
        PAGE,
        PAGE + 1,
        2 * PAGE,
        size - PAGE,
        size,
        size + PAGE,
        i64::MAX as u64 - PAGE + 1,
        i64::MAX as u64,
        1 << 63,
        u64::MAX - PAGE + 1,
    ];
    let mut cases = 0;
    for mode in modes {
        for offset in values {
            for len in values {
                let gmem = mem
                    .fallocate(FallocMode(mode), offset, len)
                    .err()
                    .map(|e| e.errno());
                let kernel = raw_fallocate(raw_fd, mode, offset, len);
                assert_eq!(
                    gmem, kernel,
                    "fallocate(mode {mode:#x}, offset {offset:#x}, len {len:#x}): gmem vs kernel"
                );
                cases += 1;
            }
        }
    }
    assert_eq!(cases, modes.len() * values.len() * values.len());
}

#[test]
fn read_write_answers_equal_the_raw_kernel_answers_on_every_backing() {
    let Some(vm) = vm_or_skip() else { return };
    let kernel = create(
        &vm,
        Kind::Kernel,
        4 * PAGE,
        Flags::MMAP | Flags::INIT_SHARED,
    );
    let fd = kernel.as_fd().as_raw_fd();
    let mut buf = [0u8; 16];
    let errno = |ret: isize| {
        assert_eq!(ret, -1, "the raw call must fail");
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    };
    let (p, n) = (buf.as_mut_ptr(), buf.len());
    // SAFETY: each call reads into or writes from the local buffer, on a descriptor the test
    // owns; errno is read right after each.
    let raw_errnos = [
        errno(unsafe { libc::read(fd, p.cast(), n) }),
        // SAFETY: as above.
        errno(unsafe { libc::write(fd, p.cast(), n) }),
        // SAFETY: as above.
        errno(unsafe { libc::pread(fd, p.cast(), n, 0) }),
        // SAFETY: as above.
        errno(unsafe { libc::pwrite(fd, p.cast(), n, 0) }),
    ];
    assert_eq!(
        raw_errnos,
        [libc::EINVAL, libc::EINVAL, libc::ESPIPE, libc::ESPIPE]
    );
    for mem in [&kernel, &create(&vm, Kind::Shmem, 4 * PAGE, Flags::MMAP)] {
        let got = [
            mem.read(&mut buf).unwrap_err().errno(),
            mem.write(&buf).unwrap_err().errno(),
            mem.pread(&mut buf, 0).unwrap_err().errno(),
            mem.pwrite(&buf, 0).unwrap_err().errno(),
        ];
        assert_eq!(got, raw_errnos, "{}", mem.backing_kind());
    }
}

#[test]
fn kernel_file_without_mmap_has_no_host_access() {
    let Some(vm) = vm_or_skip() else { return };
    let mem = vm
        .create_guest_memfd(4 * PAGE, Flags::INIT_SHARED)
        .expect("create");
    assert_eq!(mem.map(0, PAGE).unwrap_err().errno(), libc::ENODEV);
    assert!(matches!(mem.map(0, PAGE), Err(MapError::NotMappable)));
    assert_eq!(mem.read_at(0, &mut [0u8; 1]), Err(AccessError::NoMapping));
    assert_eq!(mem.pin(0, PAGE).unwrap_err().errno(), libc::ENODEV);
    assert!(mem.guest().expect("guest view").as_ptr().is_null());
    // Attributes and conversion are gmem's and work all the same.
    mem.convert(0, PAGE, Attr::Private).expect("convert");
    assert_eq!(mem.attr(0).expect("attr"), Attr::Private);
    mem.fallocate(FallocMode::KEEP_SIZE, 0, 4 * PAGE)
        .expect("allocate");
    mem.fallocate(FallocMode::PUNCH_HOLE, 0, PAGE)
        .expect("punch");
}

/// The number of mappings (VMAs) inside `[start, start + len)` of this process.
fn vmas_in(start: usize, len: usize) -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .expect("maps")
        .lines()
        .filter_map(|l| {
            let range = l.split_whitespace().next()?;
            let (a, b) = range.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .filter(|&(a, b)| a >= start && b <= start + len)
        .count()
}

/// `write(2)` of one byte at `addr` into a pipe: the errno when the kernel cannot read it.
fn kernel_reads(addr: *const u8) -> Result<(), i32> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the kernel checks `addr` itself and fails with EFAULT rather than fault us.
    let n = unsafe { libc::write(fds[1], addr.cast(), 1) };
    let res = if n == 1 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    };
    for fd in fds {
        // SAFETY: closes the descriptors this function opened.
        unsafe { libc::close(fd) };
    }
    res
}

#[test]
fn host_views_of_kernel_files_are_guarded_in_one_sealed_mapping() {
    let Some(vm) = vm_or_skip() else { return };
    let pages = 64;
    let size = pages * PAGE;
    let mem = vm
        .create_guest_memfd(size, Flags::MMAP | Flags::INIT_SHARED)
        .expect("create");
    let view = mem.map(0, size).expect("view");
    let (start, len) = (view.as_ptr() as usize, view.len());
    assert_eq!(vmas_in(start, len), 1, "a fresh view is one mapping");
    touch::fill(&view, 0, size, 0x42).expect("fill");
    // Every other page private: guard markers, still one mapping.
    for p in (0..pages).step_by(2) {
        mem.convert(p * PAGE, PAGE, Attr::Private)
            .expect("to private");
    }
    for p in 0..pages {
        let at = view
            .as_ptr()
            .wrapping_add(usize::try_from(p * PAGE).unwrap());
        if p % 2 == 0 {
            // SAFETY: inside the view; the probe reports the fault.
            let t = unsafe { gmem_conformance::probe::read(at) };
            assert!(
                matches!(t, gmem_conformance::probe::Touch::Sigsegv(_)),
                "page {p}: {t:?}"
            );
            assert!(touch::faults_as_documented(&view, p * PAGE, t));
            assert_eq!(
                kernel_reads(at),
                Err(libc::EFAULT),
                "kernel read of private page {p}"
            );
        } else {
            assert_eq!(
                touch::read_byte(&view, p * PAGE),
                Ok(0x42),
                "page {p} is shared"
            );
            assert_eq!(kernel_reads(at), Ok(()), "kernel read of shared page {p}");
        }
    }
    assert_eq!(
        vmas_in(start, len),
        1,
        "guards need no mapping of their own"
    );
    // The view is sealed: the VMM's own page-table operations on it are refused with EPERM.
    let addr = view.as_ptr().cast::<libc::c_void>();
    // SAFETY: names the view's own range; refused without changing it.
    let rc = unsafe { libc::mprotect(addr, len, libc::PROT_READ) };
    assert_eq!(
        (rc, errno()),
        (-1, libc::EPERM),
        "mprotect on a sealed view"
    );
    // SAFETY: as above.
    let moved = unsafe { libc::mremap(addr, len, 2 * len, libc::MREMAP_MAYMOVE) };
    assert_eq!((moved, errno()), (libc::MAP_FAILED, libc::EPERM), "mremap");
    // SAFETY: as above.
    let rc = unsafe { libc::munmap(addr, len) };
    assert_eq!((rc, errno()), (-1, libc::EPERM), "munmap on a sealed view");
    // MADV_DONTNEED (a balloon) leaves the markers.
    // SAFETY: the range is the view's; dropping its page-table entries loses no data.
    let rc = unsafe { libc::madvise(addr, len, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    assert!(touch::read_byte(&view, 0).is_err());
    // The whole file back to shared: contents survive in place.
    mem.convert(0, size, Attr::Shared).expect("to shared");
    touch::expect_bytes(&view, 0, size, 0x42, "contents survive in place");
    assert_eq!(vmas_in(start, len), 1);
}

#[test]
fn second_process_follows_conversions_of_a_kernel_file() {
    // Covered by the catalogue's `conformance_convert_other_process` on this backing; here the
    // point is that the follower's views need no userfaultfd either.
    let Some(vm) = vm_or_skip() else { return };
    let mem = vm
        .create_guest_memfd(4 * PAGE, Flags::MMAP | Flags::INIT_SHARED)
        .expect("create");
    let sock = mem.share_with_process().expect("share");
    let follower = gmem::GuestMemfd::attach(sock).expect("attach in the same process");
    let view = follower.map(0, 4 * PAGE).expect("follower view");
    mem.convert(PAGE, PAGE, Attr::Private).expect("convert");
    assert!(touch::read_byte(&view, PAGE).is_err());
    assert_eq!(touch::read_byte(&view, 0), Ok(0));
    mem.convert(PAGE, PAGE, Attr::Shared).expect("convert back");
    assert_eq!(touch::read_byte(&view, PAGE), Ok(0));
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}
