//! R5: the bad-input sweep.
//!
//! For every public entry point of `GuestMemfd`, `HostView`, `Pin` and `GuestView`, each
//! invalid argument class (zero, unaligned, overflowing, out of range, unknown flag, wrong
//! state) must return the typed error with the kernel's errno and the offending offset, and
//! leave the file exactly as it was: attributes, every byte, allocation, host references (which
//! pages a conversion to private would refuse), listener notifications and what every host
//! view shows (`SIGBUS` or the byte) are compared before and after each refused call.
//! `fallocate` mode bits are also compared one by one with the kernel's own guest_memfd where
//! `/dev/kvm` opens.
#![allow(clippy::cast_possible_truncation)]

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use gmem::Errno;
use gmem::{
    Attr, Conversion, ConversionListener, FallocMode, Flags, GuestMemfd, HostView, Pin, Sharing,
    Veto,
};
use gmem_conformance::probe;
use gmem_reliability::outcome::{reduce, Class, Fault};

const PAGE: u64 = 4096;
const PAGES: u64 = 16;
const SIZE: u64 = PAGES * PAGE;

/// Tests in this binary count descriptors and mappings: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn einval(class: Class, offset: u64) -> Fault {
    Fault::at(class, libc::EINVAL, offset)
}

#[derive(Default)]
struct Counter {
    events: AtomicU64,
    veto_page: AtomicU64,
}

impl ConversionListener for Counter {
    fn prepare(&self, c: &Conversion) -> Result<(), Veto> {
        self.events.fetch_add(1, Ordering::SeqCst);
        let v = self.veto_page.load(Ordering::SeqCst);
        if (c.offset / PAGE..(c.offset + c.len) / PAGE).contains(&v) {
            return Err(Veto {
                offset: v * PAGE,
                reason: "device busy".into(),
            });
        }
        Ok(())
    }
    fn commit(&self, _: &Conversion) {
        self.events.fetch_add(1, Ordering::SeqCst);
    }
    fn abort(&self, _: &Conversion) {
        self.events.fetch_add(1, Ordering::SeqCst);
    }
}

/// A file in a non-trivial state: distinct bytes, pages 4..7 private, a pin over pages 1..2,
/// page 9 punched, page 10 allocated only, a view of twice the file, a vetoing listener.
struct Fixture {
    mem: GuestMemfd,
    view: HostView,
    pin: Pin,
    listener: Arc<Counter>,
}

#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    runs: Vec<(u64, u64, Attr)>,
    bytes: Vec<u8>,
    data: Vec<bool>,
    blocks: i64,
    view: Vec<probe::Touch>,
    busy: Vec<bool>,
    events: u64,
    fds: usize,
    poisoned: Vec<u64>,
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

impl Fixture {
    fn new() -> Fixture {
        let mem = GuestMemfd::create(SIZE, Flags::MMAP | Flags::INIT_SHARED).expect("create");
        let pattern: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8 + 1).collect();
        mem.write_at(0, &pattern).expect("fill");
        mem.convert(4 * PAGE, 3 * PAGE, Attr::Private)
            .expect("private");
        mem.fallocate(FallocMode::PUNCH_HOLE, 9 * PAGE, PAGE)
            .expect("punch");
        mem.fallocate(FallocMode::PUNCH_HOLE, 10 * PAGE, PAGE)
            .expect("punch");
        mem.fallocate(FallocMode::KEEP_SIZE, 10 * PAGE, PAGE)
            .expect("allocate");
        let pin = mem.pin(PAGE + 10, PAGE).expect("pin");
        let view = mem.map(0, 2 * SIZE).expect("map");
        let listener = Arc::new(Counter {
            events: AtomicU64::new(0),
            veto_page: AtomicU64::new(12),
        });
        mem.add_listener(listener.clone());
        Fixture {
            mem,
            view,
            pin,
            listener,
        }
    }

    /// Everything observable about the file. The reference probe converts each shared page
    /// to private and back (contents survive), so it runs after the listener count is read.
    fn snapshot(&self) -> Snapshot {
        let mem = &self.mem;
        let runs = mem
            .runs(0, SIZE)
            .expect("runs")
            .into_iter()
            .map(|r| (r.offset, r.len, r.attr))
            .collect();
        let fd = mem.as_fd().as_raw_fd();
        let data = (0..PAGES)
            .map(|p| {
                // SAFETY: lseek on a valid descriptor.
                let d = unsafe { libc::lseek(fd, (p * PAGE) as i64, libc::SEEK_DATA) };
                d == (p * PAGE) as i64
            })
            .collect();
        let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
        // SAFETY: `st` is writable.
        assert_eq!(unsafe { libc::fstat(fd, st.as_mut_ptr()) }, 0);
        // SAFETY: fstat filled it.
        let blocks = unsafe { st.assume_init() }.st_blocks;
        // Bytes through the guest view, only for pages that hold data (reading allocates).
        let mut bytes = vec![0u8; SIZE as usize];
        let guest = mem.guest().expect("guest view");
        for p in 0..PAGES {
            if p != 9 && p != 10 && !mem.is_poisoned(p * PAGE).expect("poison record") {
                let s = (p * PAGE) as usize;
                guest
                    .read(p * PAGE, &mut bytes[s..s + PAGE as usize])
                    .expect("guest read");
            }
        }
        let view = (0..2 * PAGES)
            .filter(|&p| p != 9 && p != 10)
            // SAFETY: inside the view.
            .map(|p| unsafe {
                probe::read(self.view.as_ptr().wrapping_add((p * PAGE + 7) as usize))
            })
            .collect();
        let events = self.listener.events.load(Ordering::SeqCst);
        let veto = self.listener.veto_page.swap(u64::MAX, Ordering::SeqCst);
        let busy = (0..PAGES)
            .map(|p| {
                if mem.attr(p * PAGE).expect("attr") == Attr::Private {
                    return false;
                }
                match mem.convert(p * PAGE, PAGE, Attr::Private) {
                    Ok(()) => {
                        mem.convert(p * PAGE, PAGE, Attr::Shared).expect("back");
                        false
                    }
                    Err(e) => {
                        assert_eq!(e.errno(), libc::EAGAIN, "reference probe: {e}");
                        true
                    }
                }
            })
            .collect();
        self.listener.veto_page.store(veto, Ordering::SeqCst);
        self.listener.events.store(events, Ordering::SeqCst);
        Snapshot {
            runs,
            bytes,
            data,
            blocks,
            view,
            busy,
            events,
            fds: fd_count(),
            poisoned: mem.poisoned_pages().expect("poisoned pages"),
        }
    }
}

impl Snapshot {
    /// The fields that differ, by name (the contents are too long to print).
    fn diff(&self, o: &Snapshot) -> Vec<String> {
        let mut d = Vec::new();
        if self.runs != o.runs {
            d.push(format!("runs {:x?} -> {:x?}", self.runs, o.runs));
        }
        if let Some(i) = (0..self.bytes.len()).find(|&i| self.bytes[i] != o.bytes[i]) {
            d.push(format!("bytes differ first at {i:#x}"));
        }
        if self.data != o.data || self.blocks != o.blocks {
            d.push(format!(
                "allocation {:?}/{} -> {:?}/{}",
                self.data, self.blocks, o.data, o.blocks
            ));
        }
        if self.view != o.view {
            d.push(format!("view {:?} -> {:?}", self.view, o.view));
        }
        if self.busy != o.busy {
            d.push(format!("references {:?} -> {:?}", self.busy, o.busy));
        }
        if self.events != o.events {
            d.push(format!("listener events {} -> {}", self.events, o.events));
        }
        if self.poisoned != o.poisoned {
            d.push(format!(
                "poisoned {:x?} -> {:x?}",
                self.poisoned, o.poisoned
            ));
        }
        if self.fds != o.fds {
            d.push(format!("descriptors {} -> {}", self.fds, o.fds));
        }
        d
    }
}

/// Runs `f` on the fixture and checks it returned `want` and changed nothing; the listener
/// may have heard `events` notifications (a prepare, then an abort, for a refused
/// conversion it was asked about).
fn refused_with<T: std::fmt::Debug>(
    fx: &Fixture,
    what: &str,
    want: Fault,
    events: u64,
    f: impl FnOnce(&Fixture) -> Result<T, Fault>,
) {
    let before = fx.snapshot();
    let got = f(fx);
    match got {
        Err(e) => assert_eq!(e, want, "{what}"),
        Ok(v) => panic!("{what}: accepted ({v:?}), expected {want:?}"),
    }
    let mut after = fx.snapshot();
    assert_eq!(
        after.events,
        before.events + events,
        "{what}: listener notifications"
    );
    after.events = before.events;
    let d = before.diff(&after);
    assert!(
        d.is_empty(),
        "{what}: state changed by a refused call: {d:?}"
    );
}

fn refused<T: std::fmt::Debug>(
    fx: &Fixture,
    what: &str,
    want: Fault,
    f: impl FnOnce(&Fixture) -> Result<T, Fault>,
) {
    refused_with(fx, what, want, 0, f);
}

#[test]
fn bad_input_create() {
    let _g = serial();
    let fds = fd_count();
    let mmap = Flags::MMAP | Flags::INIT_SHARED;
    for size in [0, 1, 512, PAGE - 1, PAGE + 1, 3 * PAGE + 17, u64::MAX] {
        let e = GuestMemfd::create(size, mmap).expect_err("bad size accepted");
        assert!(
            matches!(e, gmem::CreateError::InvalidSize { size: s, block: PAGE } if s == size),
            "size {size}: {e:?}"
        );
        assert_eq!(e.errno(), libc::EINVAL);
        let e = GuestMemfd::builder(size)
            .flags(mmap)
            .create()
            .expect_err("builder");
        assert_eq!(e.errno(), libc::EINVAL);
    }
    for bit in 2..64 {
        let flags = Flags::from_bits_retain(1 << bit) | Flags::MMAP;
        let e = GuestMemfd::create(PAGE, flags).expect_err("unknown flag accepted");
        assert!(
            matches!(e, gmem::CreateError::UnknownFlags { bits } if bits == 1 << bit),
            "bit {bit}: {e:?}"
        );
        assert_eq!(e.errno(), libc::EINVAL);
        // Unknown flags are refused before the size is looked at, as the kernel does.
        let e = GuestMemfd::create(0, flags).expect_err("unknown flag with size 0");
        assert!(matches!(e, gmem::CreateError::UnknownFlags { .. }), "{e:?}");
    }
    // Nothing leaked.
    assert_eq!(fd_count(), fds);
}

#[test]
fn bad_input_convert() {
    let _g = serial();
    let fx = Fixture::new();
    let to = [Attr::Private, Attr::Shared];
    for attr in to {
        let conv = |o: u64, l: u64| move |fx: &Fixture| reduce(fx.mem.convert(o, l, attr));
        refused(&fx, "convert zero", einval(Class::Empty, 0), conv(0, 0));
        refused(
            &fx,
            "convert zero at end",
            einval(Class::Empty, SIZE),
            conv(SIZE, 0),
        );
        refused(
            &fx,
            "convert unaligned offset",
            einval(Class::Unaligned, 1),
            conv(1, PAGE),
        );
        refused(
            &fx,
            "convert unaligned len",
            einval(Class::Unaligned, 0),
            conv(0, PAGE + 1),
        );
        refused(
            &fx,
            "convert half page",
            einval(Class::Unaligned, 0),
            conv(0, PAGE / 2),
        );
        let wrap = u64::MAX - PAGE + 1;
        refused(
            &fx,
            "convert wrapping",
            einval(Class::Overflow, wrap),
            conv(wrap, 2 * PAGE),
        );
        refused(
            &fx,
            "convert len wraps",
            einval(Class::Overflow, PAGE),
            conv(PAGE, wrap),
        );
        refused(
            &fx,
            "convert at end",
            einval(Class::OutOfBounds, SIZE),
            conv(SIZE, PAGE),
        );
        refused(
            &fx,
            "convert past end",
            einval(Class::OutOfBounds, 0),
            conv(0, SIZE + PAGE),
        );
        refused(
            &fx,
            "convert far past end",
            einval(Class::OutOfBounds, 1 << 40),
            conv(1 << 40, PAGE),
        );
    }
    // Wrong state: a pinned page (pages 1 and 2 are pinned) refuses conversion to private,
    // naming the first pinned page, with nothing converted.
    refused_with(
        &fx,
        "convert pinned",
        Fault::at(Class::Busy, libc::EAGAIN, PAGE),
        2,
        |fx| reduce(fx.mem.convert(0, 4 * PAGE, Attr::Private)),
    );
    refused_with(
        &fx,
        "convert pinned (2)",
        Fault::at(Class::Busy, libc::EAGAIN, 2 * PAGE),
        2,
        |fx| reduce(fx.mem.convert(2 * PAGE, 10 * PAGE, Attr::Private)),
    );
    // A listener veto (page 12), in both directions.
    refused_with(
        &fx,
        "convert vetoed",
        Fault::at(Class::Vetoed, libc::EAGAIN, 12 * PAGE),
        1,
        |fx| reduce(fx.mem.convert(8 * PAGE, 8 * PAGE, Attr::Private)),
    );
    fx.mem
        .convert(12 * PAGE, PAGE, Attr::Private)
        .expect_err("veto");
    // A follower never converts.
    let follower = GuestMemfd::attach(fx.mem.share_with_process().expect("share")).expect("attach");
    refused(
        &fx,
        "follower convert",
        Fault::bare(Class::NotOwner, libc::EPERM),
        |_| reduce(follower.convert(0, PAGE, Attr::Private)),
    );
    refused(
        &fx,
        "follower convert (bad range first)",
        einval(Class::Unaligned, 1),
        |_| reduce(follower.convert(1, PAGE, Attr::Private)),
    );
    drop(follower);
    // After the pin goes, the bulk conversion succeeds with contents intact.
    let mut before = vec![0u8; SIZE as usize];
    fx.mem
        .guest()
        .expect("guest view")
        .read(0, &mut before)
        .expect("read");
    let Fixture { mem, pin, .. } = fx;
    drop(pin);
    mem.convert(0, 4 * PAGE, Attr::Private).expect("unpinned");
    let mut after = vec![0u8; SIZE as usize];
    mem.guest()
        .expect("guest view")
        .read(0, &mut after)
        .expect("read");
    assert_eq!(before, after);
}

#[test]
fn bad_input_fallocate() {
    let _g = serial();
    let fx = Fixture::new();
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    let punch = keep | libc::FALLOC_FL_PUNCH_HOLE;
    let fa =
        |m: i32, o: u64, l: u64| move |fx: &Fixture| reduce(fx.mem.fallocate(FallocMode(m), o, l));
    let nosup = Fault::bare(Class::Unsupported, libc::EOPNOTSUPP);
    for mode in [keep, punch] {
        refused(
            &fx,
            "fallocate zero",
            einval(Class::Empty, 0),
            fa(mode, 0, 0),
        );
        refused(
            &fx,
            "fallocate unaligned offset",
            einval(Class::Unaligned, 1),
            fa(mode, 1, PAGE),
        );
        refused(
            &fx,
            "fallocate unaligned len",
            einval(Class::Unaligned, 0),
            fa(mode, 0, PAGE - 1),
        );
        refused(
            &fx,
            "fallocate (p, p-1)",
            einval(Class::Unaligned, PAGE),
            fa(mode, PAGE, PAGE - 1),
        );
        let neg = 1u64 << 63;
        refused(
            &fx,
            "fallocate negative offset",
            einval(Class::Overflow, neg),
            fa(mode, neg, PAGE),
        );
        refused(
            &fx,
            "fallocate negative len",
            einval(Class::Overflow, 0),
            fa(mode, 0, neg),
        );
        let big = i64::MAX as u64 - PAGE + 1;
        refused(
            &fx,
            "fallocate past the largest file",
            Fault::at(Class::TooBig, libc::EFBIG, big),
            fa(mode, big, 2 * PAGE),
        );
    }
    refused(
        &fx,
        "allocate past end",
        einval(Class::OutOfBounds, SIZE),
        fa(keep, SIZE, PAGE),
    );
    refused(
        &fx,
        "allocate across end",
        einval(Class::OutOfBounds, 0),
        fa(keep, 0, SIZE + PAGE),
    );
    refused(&fx, "fallocate without KEEP_SIZE", nosup, fa(0, 0, PAGE));
    refused(
        &fx,
        "punch without KEEP_SIZE",
        nosup,
        fa(libc::FALLOC_FL_PUNCH_HOLE, 0, PAGE),
    );
    refused(
        &fx,
        "zero range",
        nosup,
        fa(keep | libc::FALLOC_FL_ZERO_RANGE, 0, PAGE),
    );
    refused(
        &fx,
        "unshare",
        nosup,
        fa(keep | libc::FALLOC_FL_UNSHARE_RANGE, 0, PAGE),
    );
    for bit in 8..31 {
        refused(
            &fx,
            "unknown mode bit",
            nosup,
            fa(keep | (1 << bit), 0, PAGE),
        );
    }
    // Punch at or past the end: success and nothing changes.
    let before = fx.snapshot();
    fx.mem
        .fallocate(FallocMode::PUNCH_HOLE, SIZE, PAGE)
        .expect("punch at end");
    fx.mem
        .fallocate(FallocMode::PUNCH_HOLE, SIZE + PAGE, PAGE)
        .expect("punch past end");
    assert_eq!(before, fx.snapshot());
}

#[test]
fn bad_input_host_access() {
    let _g = serial();
    let fx = Fixture::new();
    let mut buf = [0u8; 8];
    let wrap = u64::MAX - 3;
    // read_at / write_at: zero, wrapping, out of range, private (first private byte named).
    let cases: Vec<(&str, u64, usize, Fault)> = vec![
        ("zero", 0, 0, einval(Class::Empty, 0)),
        ("zero at end", SIZE, 0, einval(Class::Empty, SIZE)),
        ("wrapping", wrap, 8, einval(Class::Overflow, wrap)),
        ("at end", SIZE, 1, einval(Class::OutOfBounds, SIZE)),
        (
            "across end",
            SIZE - 4,
            8,
            einval(Class::OutOfBounds, SIZE - 4),
        ),
        (
            "private",
            4 * PAGE + 3,
            8,
            Fault::at(Class::Private, libc::EFAULT, 4 * PAGE + 3),
        ),
        (
            "into private",
            4 * PAGE - 4,
            8,
            Fault::at(Class::Private, libc::EFAULT, 4 * PAGE),
        ),
    ];
    for (what, off, len, want) in &cases {
        refused(&fx, &format!("read_at {what}"), *want, |fx| {
            reduce(fx.mem.read_at(*off, &mut buf[..*len]))
        });
        refused(&fx, &format!("write_at {what}"), *want, |fx| {
            reduce(fx.mem.write_at(*off, &[0xcc; 8][..*len]))
        });
        refused(&fx, &format!("pin {what}"), *want, |fx| {
            reduce(fx.mem.pin(*off, *len as u64)).map(|p| p.offset())
        });
        if want.class != Class::Private {
            refused(&fx, &format!("guest read {what}"), *want, |fx| {
                reduce(
                    fx.mem
                        .guest()
                        .expect("guest view")
                        .read(*off, &mut buf[..*len]),
                )
            });
            refused(&fx, &format!("guest write {what}"), *want, |fx| {
                reduce(
                    fx.mem
                        .guest()
                        .expect("guest view")
                        .write(*off, &[0xcc; 8][..*len]),
                )
            });
        }
    }
    // Pin::read / Pin::write outside the pin (4096 bytes).
    let plen = fx.pin.len();
    let pin_cases: Vec<(&str, u64, usize, Fault)> = vec![
        ("zero", 0, 0, einval(Class::Empty, 0)),
        ("at end", plen, 1, einval(Class::OutOfBounds, plen)),
        (
            "across end",
            plen - 2,
            4,
            einval(Class::OutOfBounds, plen - 2),
        ),
        ("wrapping", wrap, 8, einval(Class::Overflow, wrap)),
    ];
    for (what, at, len, want) in &pin_cases {
        refused(&fx, &format!("Pin::read {what}"), *want, |fx| {
            reduce(fx.pin.read(*at, &mut buf[..*len]))
        });
        refused(&fx, &format!("Pin::write {what}"), *want, |fx| {
            reduce(fx.pin.write(*at, &[0xcc; 8][..*len]))
        });
    }
    // Queries.
    refused(&fx, "attr at end", einval(Class::OutOfBounds, SIZE), |fx| {
        reduce(fx.mem.attr(SIZE))
    });
    refused(
        &fx,
        "attr max",
        einval(Class::OutOfBounds, u64::MAX),
        |fx| reduce(fx.mem.attr(u64::MAX)),
    );
    let runs = |o: u64, l: u64| move |fx: &Fixture| reduce(fx.mem.runs(o, l)).map(|r| r.len());
    refused(&fx, "runs zero", einval(Class::Empty, 0), runs(0, 0));
    refused(
        &fx,
        "runs unaligned",
        einval(Class::Unaligned, 1),
        runs(1, PAGE),
    );
    refused(
        &fx,
        "runs wrapping",
        einval(Class::Overflow, u64::MAX - PAGE + 1),
        runs(u64::MAX - PAGE + 1, 2 * PAGE),
    );
    refused(
        &fx,
        "runs past end",
        einval(Class::OutOfBounds, 0),
        runs(0, SIZE + PAGE),
    );
    // File operations the kernel refuses.
    let unsup = Fault::bare(Class::Unsupported, libc::EINVAL);
    refused(&fx, "read", unsup, |fx| reduce(fx.mem.read(&mut [0u8; 8])));
    refused(&fx, "write", unsup, |fx| reduce(fx.mem.write(&[1u8; 8])));
    // pread/pwrite: ESPIPE, as the kernel guest_memfd (not seekable) answers.
    let espipe = Fault::bare(Class::Unsupported, libc::ESPIPE);
    refused(&fx, "pread", espipe, |fx| {
        reduce(fx.mem.pread(&mut [0u8; 8], PAGE))
    });
    refused(&fx, "pwrite", espipe, |fx| {
        reduce(fx.mem.pwrite(&[1u8; 8], PAGE))
    });
    for size in [0, SIZE / 2, 2 * SIZE] {
        refused(&fx, "set_len", unsup, |fx| reduce(fx.mem.set_len(size)));
    }
    // Removing a listener of another file (wrong state) is refused and removes nothing: the
    // fixture's listener still vetoes.
    let other = GuestMemfd::create(PAGE, Flags::MMAP).expect("other");
    let id = other.add_listener(Arc::new(Counter::default()));
    let before = fx.snapshot();
    assert!(
        !fx.mem.remove_listener(id),
        "a foreign listener id removed a listener"
    );
    assert!(before.diff(&fx.snapshot()).is_empty());
    refused_with(
        &fx,
        "vetoed after a foreign remove",
        Fault::at(Class::Vetoed, libc::EAGAIN, 12 * PAGE),
        1,
        |fx| reduce(fx.mem.convert(12 * PAGE, PAGE, Attr::Private)),
    );
}

#[test]
fn bad_input_map() {
    let _g = serial();
    let fx = Fixture::new();
    let map = |o: u64, l: u64| move |fx: &Fixture| reduce(fx.mem.map(o, l)).map(|v| v.len());
    refused(&fx, "map zero", einval(Class::Empty, 0), map(0, 0));
    refused(
        &fx,
        "map unaligned",
        einval(Class::Unaligned, 1),
        map(1, PAGE),
    );
    refused(
        &fx,
        "map unaligned (p-1)",
        einval(Class::Unaligned, PAGE - 1),
        map(PAGE - 1, PAGE),
    );
    let wrap = u64::MAX - PAGE + 1;
    refused(
        &fx,
        "map wrapping",
        einval(Class::Overflow, wrap),
        map(wrap, 2 * PAGE),
    );
    refused(
        &fx,
        "map copy-on-write",
        Fault::bare(Class::CopyOnWrite, libc::EINVAL),
        |fx| reduce(fx.mem.map_with(0, PAGE, Sharing::CopyOnWrite)).map(|v| v.len()),
    );
    // A file without MMAP cannot be mapped at all (ENODEV), whatever the arguments.
    let nommap = GuestMemfd::create(SIZE, Flags::INIT_SHARED).expect("create");
    for (o, l) in [(0, PAGE), (1, 0), (0, SIZE)] {
        let e = nommap.map(o, l).expect_err("mapped without MMAP");
        assert_eq!(
            gmem_reliability::outcome::Reduce::reduce(&e),
            Fault::bare(Class::NotMappable, libc::ENODEV)
        );
    }
    // A view created after refused calls still enforces: private pages fault, shared read.
    let v = fx.mem.map(0, SIZE).expect("map");
    // SAFETY: inside the view.
    let private = unsafe { probe::read(v.as_ptr().wrapping_add(4 * PAGE as usize)) };
    // SAFETY: inside the view.
    let shared = unsafe { probe::read(v.as_ptr()) };
    assert!(gmem_conformance::touch::faults_as_documented(
        &v,
        4 * PAGE,
        private
    ));
    assert_eq!(shared, probe::Touch::Ok(1));
}

/// A real guest_memfd from KVM, for comparing errnos with the kernel's.
fn kernel_guest_memfd(size: u64) -> Option<(OwnedFd, OwnedFd)> {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .ok()?;
    // SAFETY: KVM_CREATE_VM with the default type.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), 0xAE01, 0) };
    if vm < 0 {
        return None;
    }
    // SAFETY: `vm` is a fresh descriptor.
    let vm = unsafe { OwnedFd::from_raw_fd(vm) };
    #[repr(C)]
    struct CreateGuestMemfd {
        size: u64,
        flags: u64,
        reserved: [u64; 6],
    }
    let mut arg = CreateGuestMemfd {
        size,
        flags: 3, // MMAP | INIT_SHARED
        reserved: [0; 6],
    };
    // KVM_CREATE_GUEST_MEMFD = _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
    let nr = (3u64 << 30) | (64 << 16) | (0xAE << 8) | 0xd4;
    // SAFETY: `arg` is a valid struct for the ioctl.
    let fd = unsafe { libc::ioctl(vm.as_raw_fd(), nr as _, &mut arg) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fresh descriptor.
    Some((vm, unsafe { OwnedFd::from_raw_fd(fd) }))
}

#[test]
fn bad_input_errnos_match_the_kernel() {
    let _g = serial();
    let Some((_vm, kfd)) = kernel_guest_memfd(SIZE) else {
        eprintln!("skipped: /dev/kvm or KVM_CREATE_GUEST_MEMFD unavailable");
        return;
    };
    let mem = GuestMemfd::create(SIZE, Flags::MMAP | Flags::INIT_SHARED).expect("create");
    let ranges = [
        (0, 0),
        (0, PAGE),
        (1, PAGE),
        (0, PAGE - 1),
        (PAGE, PAGE - 1),
        (SIZE, PAGE),
        (SIZE + PAGE, PAGE),
        (0, SIZE + PAGE),
        (1 << 63, PAGE),
        (i64::MAX as u64 - PAGE + 1, 2 * PAGE),
    ];
    let mut mismatches = Vec::new();
    let mut compared = 0;
    let modes = (0..256)
        .chain((8..31).map(|b| 1 << b))
        .chain((8..31).map(|b| (1 << b) | 3));
    for mode in modes {
        {
            for &(off, len) in &ranges {
                // SAFETY: fallocate on a valid descriptor.
                let k = unsafe { libc::fallocate(kfd.as_raw_fd(), mode, off as i64, len as i64) };
                let kernel = if k == 0 {
                    0
                } else {
                    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
                };
                let ours = mem
                    .fallocate(FallocMode(mode), off, len)
                    .map_or_else(|e| e.errno(), |()| 0);
                compared += 1;
                if kernel != ours {
                    mismatches.push(format!(
                        "mode {mode:#x} ({off:#x}, {len:#x}): kernel {kernel}, gmem {ours}"
                    ));
                }
            }
        }
    }
    // The file operations guest memory refuses.
    let kerr = |r: isize| {
        if r < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        }
    };
    let mut b = [0u8; 8];
    let k = [
        // SAFETY: `b` is a valid buffer for each call.
        kerr(unsafe { libc::read(kfd.as_raw_fd(), b.as_mut_ptr().cast(), 8) }),
        // SAFETY: as above.
        kerr(unsafe { libc::write(kfd.as_raw_fd(), b.as_ptr().cast(), 8) }),
        // SAFETY: as above.
        kerr(unsafe { libc::pread(kfd.as_raw_fd(), b.as_mut_ptr().cast(), 8, 0) }),
        // SAFETY: as above.
        kerr(unsafe { libc::pwrite(kfd.as_raw_fd(), b.as_ptr().cast(), 8, 0) }),
    ];
    let g = [
        mem.read(&mut b).map_or_else(|e| e.errno(), |_| 0),
        mem.write(&b).map_or_else(|e| e.errno(), |_| 0),
        mem.pread(&mut b, 0).map_or_else(|e| e.errno(), |_| 0),
        mem.pwrite(&b, 0).map_or_else(|e| e.errno(), |_| 0),
    ];
    for (i, op) in ["read", "write", "pread", "pwrite"].iter().enumerate() {
        compared += 1;
        if k[i] != g[i] {
            mismatches.push(format!("{op}: kernel {}, gmem {}", k[i], g[i]));
        }
    }
    eprintln!("{compared} calls compared with the kernel guest_memfd");
    assert!(
        mismatches.is_empty(),
        "errnos differ from the kernel:\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn bad_input_poison() {
    let _g = serial();
    let fx = Fixture::new();
    // Out of range: refused, nothing poisoned, nothing else changed.
    for off in [SIZE, SIZE + 1, u64::MAX] {
        refused(
            &fx,
            "inject_poison out of range",
            einval(Class::OutOfBounds, off),
            |fx| reduce(fx.mem.inject_poison(off)),
        );
        assert!(fx.mem.poisoned_pages().expect("poisoned pages").is_empty());
    }
    // A poisoned page (wrong state) refuses every checked access and the guest view with
    // EHWPOISON naming the first poisoned byte, before the attribute check; the file is
    // otherwise unchanged by each refused call.
    fx.mem.inject_poison(8 * PAGE + 100).expect("inject");
    fx.mem
        .inject_poison(5 * PAGE)
        .expect("inject a private page");
    assert_eq!(
        fx.mem.poisoned_pages().expect("poisoned pages"),
        vec![5 * PAGE, 8 * PAGE]
    );
    let hw = |o| Fault::at(Class::Poisoned, libc::EHWPOISON, o);
    let mut buf = [0u8; 16];
    refused(&fx, "read_at poisoned", hw(8 * PAGE + 3), |fx| {
        reduce(fx.mem.read_at(8 * PAGE + 3, &mut buf))
    });
    refused(&fx, "write_at into poisoned", hw(8 * PAGE), |fx| {
        reduce(fx.mem.write_at(8 * PAGE - 8, &[1; 16]))
    });
    refused(&fx, "pin poisoned", hw(8 * PAGE), |fx| {
        reduce(fx.mem.pin(7 * PAGE, 2 * PAGE)).map(|p| p.len())
    });
    refused(&fx, "poisoned before private", hw(5 * PAGE), |fx| {
        reduce(fx.mem.read_at(5 * PAGE, &mut buf))
    });
    refused(&fx, "guest read poisoned", hw(5 * PAGE + 1), |fx| {
        reduce(
            fx.mem
                .guest()
                .expect("guest view")
                .read(5 * PAGE + 1, &mut buf),
        )
    });
    refused(&fx, "guest write poisoned", hw(8 * PAGE), |fx| {
        reduce(
            fx.mem
                .guest()
                .expect("guest view")
                .write(8 * PAGE, &[1; 16]),
        )
    });
    // Host views fault on it whatever its attribute.
    // SAFETY: inside the view.
    let t = unsafe { probe::read(fx.view.as_ptr().wrapping_add((8 * PAGE) as usize)) };
    assert!(
        gmem_conformance::touch::faults_as_documented(&fx.view, 8 * PAGE, t),
        "{t:?}"
    );
    // Conversions around it still work, and it still faults after returning to shared.
    fx.mem
        .convert(8 * PAGE, PAGE, Attr::Private)
        .expect("convert poisoned page");
    fx.mem
        .convert(8 * PAGE, PAGE, Attr::Shared)
        .expect("and back");
    // SAFETY: inside the view.
    let t = unsafe { probe::read(fx.view.as_ptr().wrapping_add((8 * PAGE) as usize)) };
    assert!(
        gmem_conformance::touch::faults_as_documented(&fx.view, 8 * PAGE, t),
        "{t:?}"
    );
    // Punch-hole clears it: fresh zero page.
    fx.mem
        .fallocate(FallocMode::PUNCH_HOLE, 8 * PAGE, PAGE)
        .expect("punch");
    assert_eq!(
        fx.mem.poisoned_pages().expect("poisoned pages"),
        vec![5 * PAGE]
    );
    fx.mem
        .read_at(8 * PAGE, &mut buf)
        .expect("read after punch");
    assert_eq!(buf, [0; 16]);
}

#[test]
fn bad_input_hugetlb() {
    let _g = serial();
    const HUGE: u64 = gmem::HUGE_2M;
    let fl = Flags::MMAP | Flags::INIT_SHARED;
    let hb = |size: u64, page: u64| {
        GuestMemfd::builder(size)
            .flags(fl)
            .backing(gmem::BackingChoice::HugeTlb(page))
            .create()
    };
    // Unsupported page sizes: EINVAL before anything is reserved.
    for page in [0, PAGE, 1 << 20, 3 << 20, 4 << 20, HUGE + PAGE] {
        let e = hb(HUGE, page).expect_err("unsupported page size accepted");
        assert_eq!(e.errno(), libc::EINVAL, "page size {page:#x}: {e}");
    }
    // Sizes not a multiple of the huge page: EINVAL naming the block size.
    for size in [0, PAGE, HUGE - PAGE, HUGE + PAGE, 3 * HUGE / 2] {
        let e = hb(size, HUGE).expect_err("unaligned HugeTLB size accepted");
        assert!(
            matches!(e, gmem::CreateError::InvalidSize { size: s, block: HUGE } if s == size),
            "size {size:#x}: {e:?}"
        );
        assert_eq!(e.errno(), libc::EINVAL);
    }
    let Ok(_pool) = gmem::PoolGuard::grow(HUGE, 2) else {
        eprintln!("skipped: the HugeTLB part (cannot reserve 2 huge pages)");
        return;
    };
    let mem = hb(2 * HUGE, HUGE).expect("HugeTLB file");
    mem.write_at(HUGE + 5, b"kept").expect("write");
    let runs = || mem.runs(0, 2 * HUGE).expect("runs");
    let before = runs();
    // fallocate and map align to the huge page.
    for (o, l) in [
        (PAGE, HUGE),
        (0, PAGE),
        (0, HUGE + PAGE),
        (HUGE / 2, HUGE / 2),
    ] {
        for mode in [FallocMode::KEEP_SIZE, FallocMode::PUNCH_HOLE] {
            let e = mem
                .fallocate(mode, o, l)
                .expect_err("unaligned fallocate accepted");
            assert_eq!(
                gmem_reliability::outcome::Reduce::reduce(&e),
                einval(Class::Unaligned, o),
                "fallocate({o:#x}, {l:#x})"
            );
        }
    }
    for o in [PAGE, HUGE / 2, HUGE + PAGE] {
        let e = mem.map(o, HUGE).expect_err("unaligned view accepted");
        assert_eq!(
            gmem_reliability::outcome::Reduce::reduce(&e),
            einval(Class::Unaligned, o)
        );
    }
    // Conversion ranges keep base-page granularity; bad ones are refused as on shmem.
    let e = mem
        .convert(1, PAGE, Attr::Private)
        .expect_err("unaligned convert");
    assert_eq!(
        gmem_reliability::outcome::Reduce::reduce(&e),
        einval(Class::Unaligned, 1)
    );
    let e = mem
        .convert(HUGE, 2 * HUGE, Attr::Private)
        .expect_err("past the end");
    assert_eq!(
        gmem_reliability::outcome::Reduce::reduce(&e),
        einval(Class::OutOfBounds, HUGE)
    );
    // A pin in the second huge page: a two-huge-page conversion converts the first, then
    // stops, naming the pinned page and how far it got.
    let pin = mem.pin(HUGE + 3 * PAGE, 10).expect("pin");
    let e = mem.convert(0, 2 * HUGE, Attr::Private).expect_err("pinned");
    let f = gmem_reliability::outcome::Reduce::reduce(&e);
    assert_eq!(
        (f.class, f.errno, f.offset, f.reached),
        (Class::Busy, libc::EAGAIN, Some(HUGE + 3 * PAGE), Some(HUGE)),
        "{e}"
    );
    assert_eq!(mem.attr(0).expect("attr"), Attr::Private);
    assert_eq!(mem.attr(HUGE).expect("attr"), Attr::Shared);
    drop(pin);
    mem.convert(0, 2 * HUGE, Attr::Shared).expect("back");
    assert_eq!(runs(), before);
    let mut b = [0u8; 4];
    mem.read_at(HUGE + 5, &mut b).expect("read");
    assert_eq!(&b, b"kept");
}

#[test]
fn bad_input_from_backing() {
    let _g = serial();
    let fds = fd_count();
    for size in [0, 1, PAGE - 1, PAGE + 1] {
        let b = gmem::backing::Shmem::create(4 * PAGE).expect("memfd");
        let e = GuestMemfd::from_backing(Box::new(b), size, Flags::MMAP).expect_err("bad size");
        assert!(matches!(e, gmem::CreateError::InvalidSize { .. }), "{e:?}");
        assert_eq!(e.errno(), libc::EINVAL);
    }
    let b = gmem::backing::Shmem::create(4 * PAGE).expect("memfd");
    let e = GuestMemfd::from_backing(Box::new(b), 4 * PAGE, Flags::from_bits_retain(1 << 9))
        .expect_err("unknown flag");
    assert!(
        matches!(e, gmem::CreateError::UnknownFlags { bits: 512 }),
        "{e:?}"
    );
    // The refused backings were dropped with their descriptors.
    assert_eq!(fd_count(), fds);
}

/// Sends `bytes` as one packet on a fresh `SOCK_SEQPACKET` pair and attaches to the other end.
fn attach_with(bytes: &[u8]) -> Result<GuestMemfd, gmem::peer::PeerError> {
    let (a, b) = gmem_conformance::remap::seqpacket_pair();
    if !bytes.is_empty() {
        // SAFETY: `bytes` is valid for its length.
        let n = unsafe { libc::send(a.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        assert_eq!(n, bytes.len() as isize);
    }
    drop(a);
    GuestMemfd::attach(b)
}

#[test]
fn bad_input_attach() {
    let _g = serial();
    let fds = fd_count();
    let mut hello = Vec::new();
    hello.extend_from_slice(b"GMP1");
    hello.extend_from_slice(&0u32.to_le_bytes());
    for w in [SIZE, 3, PAGE, 0, 1] {
        hello.extend_from_slice(&w.to_le_bytes());
    }
    // A well-formed hello parses; without its descriptors the attach is refused.
    let h = gmem::peer::parse_hello(&hello).expect("well-formed hello");
    assert_eq!((h.size, h.runs), (SIZE, 1));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no packet (peer closed)", Vec::new()),
        ("short packet", hello[..10].to_vec()),
        ("hello without descriptors", hello.clone()),
        ("long packet", [hello.clone(), vec![0; 8]].concat()),
    ];
    for (what, bytes) in cases {
        match attach_with(&bytes) {
            Ok(_) => panic!("{what}: attached"),
            Err(e) => assert!(
                matches!(e.errno(), libc::EPROTO),
                "{what}: {e} (errno {})",
                e.errno()
            ),
        }
    }
    // Malformed hellos are refused by the parser with EPROTO, each field in turn.
    let mut bad = Vec::new();
    let set = |at: usize, v: u64| {
        let mut b = hello.clone();
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        b
    };
    let mut magic = hello.clone();
    magic[0] = b'X';
    bad.push(("bad magic", magic));
    let mut kind = hello.clone();
    kind[4] = 7;
    bad.push(("unknown kind", kind));
    bad.push(("size zero", set(8, 0)));
    bad.push(("size unaligned", set(8, SIZE + 1)));
    bad.push(("block not a power of two", set(24, 3 * PAGE)));
    bad.push(("no runs", set(40, 0)));
    bad.push(("more runs than pages", set(40, PAGES + 1)));
    bad.push(("run count overflow", set(40, u64::MAX)));
    let mut huge = hello.clone();
    huge[4] = 1;
    bad.push(("HugeTLB with a bad page size", huge));
    for (what, b) in bad {
        let e = gmem::peer::parse_hello(&b).expect_err(what);
        assert_eq!(e.errno(), libc::EPROTO, "{what}: {e}");
    }
    // Run tables: not starting at 0, not increasing, not merged, past the end, ragged.
    let w = |s: u64, private: bool| ((s << 1) | u64::from(private)).to_le_bytes();
    let tables: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("first run not at 0", w(1, false).to_vec()),
        (
            "not increasing",
            [w(0, false), w(4, true), w(4, false)].concat(),
        ),
        ("not merged", [w(0, false), w(4, false)].concat()),
        ("past the end", [w(0, false), w(PAGES, true)].concat()),
        ("ragged", [w(0, false).to_vec(), vec![1, 2, 3]].concat()),
    ];
    for (what, t) in tables {
        let e = gmem::peer::parse_runs(&t, PAGES).expect_err(what);
        assert_eq!(e.errno(), libc::EPROTO, "{what}: {e}");
    }
    assert_eq!(fd_count(), fds, "descriptors leaked by refused attaches");
}
