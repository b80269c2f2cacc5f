//! Ranges and patterns of the kernel's `x86/private_mem_conversions_test.c` (DESIGN §7
//! item 6), on several threads at once, each on its own area of one file.
//!
//! Each thread owns an area of `2 MiB + 4 KiB` of data (the selftest's `PER_CPU_DATA_SIZE`),
//! starting at a multiple of `max(2 MiB, block)`, and its own host view of it (as each vCPU
//! has its own memslot); a whole-file view shared by every thread is checked too. The
//! selftest's shared memory is a separate buffer; here conversion is in place, so where the
//! selftest expects the host to keep seeing its old shared bytes, the host instead gets
//! `SIGBUS` on private pages and sees the guest's bytes once a page is shared again.

use std::sync::Barrier;

use gmem::{Attr, FallocMode, Flags, GuestMemfd, HostView};

use super::{guest_expect, guest_fill, require, PAGE};
use crate::touch;
use crate::Ctx;
use gmem::Errno;

const SZ_2M: u64 = 2 << 20;
/// Data per thread: the selftest's `PER_CPU_DATA_SIZE`.
pub const AREA_DATA: u64 = SZ_2M + PAGE;
/// The selftest's ranges `(offset, size)` inside each area.
pub const RANGES: [(u64, u64); 5] = [
    (0, PAGE),
    (0, SZ_2M),
    (PAGE, PAGE),
    (PAGE, SZ_2M),
    (SZ_2M, PAGE),
];
/// Threads (the selftest's vCPUs) running at once; two when an area is larger than
/// [`SMALL_AREA`] (1 GiB huge pages), to keep the file small.
pub const THREADS: u64 = 4;
/// Largest area for which [`THREADS`] threads run.
pub const SMALL_AREA: u64 = 64 << 20;

const DEF_P: u8 = 0xaa;
const INIT_P: u8 = 0xcc;
const P1: u8 = 0x11;
const P2: u8 = 0x22;
const P3: u8 = 0x33;
const P4: u8 = 0x44;

/// One thread's area: file offset `base`, its own view, and the whole-file view.
struct Area<'a> {
    mem: &'a GuestMemfd,
    base: u64,
    view: HostView,
    all: &'a HostView,
    t: u64,
}

impl Area<'_> {
    fn what(&self, s: &str) -> String {
        format!("thread {}: {s}", self.t)
    }

    #[track_caller]
    fn convert(&self, off: u64, len: u64, to: Attr) {
        self.mem
            .convert(self.base + off, len, to)
            .unwrap_or_else(|e| {
                panic!(
                    "{}",
                    self.what(&format!("convert ({off:#x}, {len:#x}) to {to:?}: {e}"))
                )
            });
    }

    #[track_caller]
    fn guest_fill(&self, off: u64, len: u64, v: u8) {
        guest_fill(self.mem, self.base + off, len, v);
    }

    #[track_caller]
    fn guest_expect(&self, off: u64, len: u64, v: u8, s: &str) {
        guest_expect(self.mem, self.base + off, len, v, &self.what(s));
    }

    /// The host sees `v` in `[off, off + len)` through both views.
    #[track_caller]
    fn host_expect(&self, off: u64, len: u64, v: u8, s: &str) {
        touch::expect_bytes(&self.view, off, len, v, &self.what(s));
        touch::expect_bytes(self.all, self.base + off, len, v, &self.what(s));
    }

    #[track_caller]
    fn host_fill(&self, off: u64, len: u64, v: u8) {
        touch::fill(&self.view, off, len, v)
            .unwrap_or_else(|f| panic!("{}", self.what(&format!("host fill faulted: {f:?}"))));
    }

    /// The host faults on every page of `[off, off + len)` through both views.
    #[track_caller]
    fn host_sigbus(&self, off: u64, len: u64, s: &str) {
        touch::expect_fault(&self.view, off, len, &self.what(s));
        touch::expect_fault(self.all, self.base + off, len, &self.what(s));
    }

    /// The guest sees `v` outside `[off, off + len)` in the area.
    #[track_caller]
    fn guest_expect_outside(&self, off: u64, len: u64, v: u8, s: &str) {
        if off > 0 {
            self.guest_expect(0, off, v, s);
        }
        if off + len < AREA_DATA {
            self.guest_expect(off + len, AREA_DATA - off - len, v, s);
        }
    }

    /// The host sees `v` outside `[off, off + len)` in the area.
    #[track_caller]
    fn host_expect_outside(&self, off: u64, len: u64, v: u8, s: &str) {
        if off > 0 {
            self.host_expect(0, off, v, s);
        }
        if off + len < AREA_DATA {
            self.host_expect(off + len, AREA_DATA - off - len, v, s);
        }
    }

    /// `guest_test_explicit_conversion`, in place.
    fn explicit_conversion(&self, area_len: u64, do_fallocate: bool) {
        self.default_then_initial_pattern();
        for (off, size) in RANGES {
            let r = |s: &str| format!("range ({off:#x}, {size:#x}): {s}");
            self.guest_fill(off, size, P1);
            if do_fallocate {
                self.allocate_blocks_of(off, size);
            }
            self.range_to_private(off, size, &r);
            self.odd_frames_back_to_shared(off, size, &r);
            self.range_back_to_shared(off, size, area_len, &r);
            self.reset_area(area_len, do_fallocate, &r);
        }
    }

    /// Memory is shared by default: the host sees the guest's default pattern, then the guest
    /// sees the host's initial pattern.
    fn default_then_initial_pattern(&self) {
        self.guest_fill(0, AREA_DATA, DEF_P);
        self.guest_expect(0, AREA_DATA, DEF_P, "default pattern");
        self.host_expect(0, AREA_DATA, DEF_P, "host sees the default pattern");
        self.host_fill(0, AREA_DATA, INIT_P);
        self.guest_expect(
            0,
            AREA_DATA,
            INIT_P,
            "guest sees the host's initial pattern",
        );
    }

    /// Allocates the blocks holding `[off, off + size)` of the area.
    fn allocate_blocks_of(&self, off: u64, size: u64) {
        let block = self.mem.block_size();
        let start = (self.base + off) / block * block;
        let end = (self.base + off + size).div_ceil(block) * block;
        self.mem
            .fallocate(FallocMode::KEEP_SIZE, start, end - start)
            .expect("allocate before conversion");
    }

    /// The range goes private: the host faults on it and still sees its initial pattern
    /// around it; the guest writes its private data over the range and sees the initial
    /// pattern around it.
    fn range_to_private(&self, off: u64, size: u64, r: &dyn Fn(&str) -> String) {
        self.convert(off, size, Attr::Private);
        self.host_sigbus(off, size, &r("private range"));
        self.host_expect_outside(off, size, INIT_P, &r("shared around the private range"));

        // The guest writes its private data: the first page, then the rest.
        self.guest_fill(off, PAGE, P2);
        self.guest_expect(off, PAGE, P2, &r("first private page"));
        if size > PAGE {
            self.guest_expect(off + PAGE, size - PAGE, P1, &r("rest of the private range"));
            self.guest_fill(off + PAGE, size - PAGE, P2);
        }
        self.guest_expect(off, size, P2, &r("private data"));
        self.guest_expect_outside(off, size, INIT_P, &r("shared data around"));
    }

    /// Odd frames back to shared (holes in the private range): in place, the host sees the
    /// guest's private bytes, writes its own, and the guest sees those; even frames stay
    /// private. The range is then one run per frame.
    fn odd_frames_back_to_shared(&self, off: u64, size: u64, r: &dyn Fn(&str) -> String) {
        for j in (0..size / PAGE).map(|k| k * PAGE) {
            if (j / PAGE) & 1 == 1 {
                self.convert(off + j, PAGE, Attr::Shared);
                self.host_expect(off + j, PAGE, P2, &r("odd frame back to shared"));
                self.host_fill(off + j, PAGE, P3);
                self.guest_expect(off + j, PAGE, P3, &r("odd frame after the host wrote"));
            } else {
                self.host_sigbus(off + j, PAGE, &r("even frame still private"));
                self.guest_expect(off + j, PAGE, P2, &r("even frame keeps its bytes"));
            }
        }
        let frames = size / PAGE;
        assert_eq!(
            self.mem.runs(self.base + off, size).expect("runs").len() as u64,
            frames,
            "{}",
            self.what(&r("one run per frame"))
        );
    }

    /// The whole range back to shared; the guest writes P3, the host checks it and writes P4,
    /// the guest checks that and writes the initial pattern again. The area is then one
    /// shared run.
    fn range_back_to_shared(&self, off: u64, size: u64, area_len: u64, r: &dyn Fn(&str) -> String) {
        self.convert(off, size, Attr::Shared);
        self.guest_fill(off, size, P3);
        self.host_expect(off, size, P3, &r("host sees the guest's pattern"));
        self.host_fill(off, size, P4);
        self.guest_expect(off, size, P4, &r("guest sees the host's pattern"));
        self.guest_fill(off, size, INIT_P);
        assert_eq!(
            self.mem.runs(self.base, area_len).expect("runs").len(),
            1,
            "{}",
            self.what(&r("the area is one shared run again"))
        );
    }

    /// With `do_fallocate`, frees the whole area (in place, its shared bytes are gone too:
    /// the host sees zeroes) and writes the initial pattern again; either way the host sees
    /// the initial pattern over the whole area.
    fn reset_area(&self, area_len: u64, do_fallocate: bool, r: &dyn Fn(&str) -> String) {
        if do_fallocate {
            self.mem
                .fallocate(FallocMode::PUNCH_HOLE, self.base, area_len)
                .expect("punch the area");
            self.host_expect(0, AREA_DATA, 0, &r("area after punch-hole"));
            self.guest_fill(0, AREA_DATA, INIT_P);
        }
        self.host_expect(0, AREA_DATA, INIT_P, &r("area reset"));
    }

    /// `guest_test_punch_hole`: punch-hole frees private memory, which reads zero after, and
    /// never changes attributes. Ranges that are not block aligned are refused (`EINVAL`)
    /// and keep their bytes.
    fn punch_hole(&self, area_len: u64, precise: bool) {
        let block = self.mem.block_size();
        self.convert(0, area_len, Attr::Private);
        for (off, size) in RANGES {
            let r = |s: &str| format!("range ({off:#x}, {size:#x}), precise {precise}: {s}");
            self.mem
                .fallocate(FallocMode::PUNCH_HOLE, self.base, area_len)
                .expect("punch the whole area");
            self.guest_expect(0, AREA_DATA, 0, &r("area after punching it"));
            if precise {
                self.guest_fill(off, size, INIT_P);
                self.guest_expect(off, size, INIT_P, &r("range filled"));
            } else {
                self.guest_fill(0, AREA_DATA, INIT_P);
                self.guest_expect(0, AREA_DATA, INIT_P, &r("area filled"));
            }
            let res = self
                .mem
                .fallocate(FallocMode::PUNCH_HOLE, self.base + off, size);
            let aligned = (self.base + off) & (block - 1) == 0 && size & (block - 1) == 0;
            if aligned {
                res.unwrap_or_else(|e| panic!("{}", self.what(&r(&format!("punch: {e}")))));
                self.guest_expect(off, size, 0, &r("punched range reads zero"));
            } else {
                let e = res.expect_err("punching an unaligned range");
                assert_eq!(
                    e.errno(),
                    libc::EINVAL,
                    "{}",
                    self.what(&r("unaligned punch"))
                );
                self.guest_expect(off, size, INIT_P, &r("refused punch keeps the bytes"));
            }
            if !precise {
                self.guest_expect_outside(off, size, INIT_P, &r("bytes around the punch"));
            }
            let runs = self.mem.runs(self.base, area_len).expect("runs");
            assert!(
                runs.len() == 1 && runs[0].attr == Attr::Private,
                "{}",
                self.what(&r("punch-hole changed attributes"))
            );
            self.host_sigbus(off, size, &r("punched private range"));
        }
        self.convert(0, area_len, Attr::Shared);
    }
}

fn with_areas(ctx: &Ctx<'_>, body: impl Fn(&Area<'_>, u64) + Sync) {
    let flags = Flags::MMAP | Flags::INIT_SHARED;
    if !require(ctx, flags) {
        return;
    }
    let area_len = AREA_DATA.div_ceil(SZ_2M.max(ctx.block())) * SZ_2M.max(ctx.block());
    let threads = if area_len <= SMALL_AREA { THREADS } else { 2 };
    let size = area_len * threads;
    let mem = ctx.create(size, flags);
    let all = mem.map(0, size).expect("map the whole file");
    // Every thread's view is mapped before any thread starts, so a failure here cannot
    // leave threads waiting at the barrier.
    let areas: Vec<Area<'_>> = (0..threads)
        .map(|t| {
            let base = t * area_len;
            let view = mem.map(base, AREA_DATA).expect("map the thread's area");
            Area {
                mem: &mem,
                base,
                view,
                all: &all,
                t,
            }
        })
        .collect();
    let start = Barrier::new(areas.len());
    std::thread::scope(|s| {
        for area in &areas {
            let (start, body) = (&start, &body);
            std::thread::Builder::new()
                .name(format!("area-{}", area.t))
                .spawn_scoped(s, move || {
                    start.wait();
                    body(area, area_len);
                })
                .expect("spawn area thread");
        }
    });
    drop(areas);
    // Every area ends shared, and the file can be freed and allocated whole afterwards.
    assert_eq!(
        mem.run_count().expect("run count"),
        1,
        "the whole file is one shared run at the end"
    );
    assert_eq!(mem.attr(0).expect("attr"), Attr::Shared);
    mem.fallocate(FallocMode::PUNCH_HOLE, 0, size)
        .expect("punch the file");
    mem.fallocate(FallocMode::KEEP_SIZE, 0, size)
        .expect("allocate the file");
    touch::expect_bytes(&all, 0, size, 0, "the whole file after punch and allocate");
}

/// The selftest's explicit conversions over every range, on [`THREADS`] threads at once.
pub fn explicit_conversion(ctx: &Ctx<'_>) {
    with_areas(ctx, |a, len| a.explicit_conversion(len, false));
}

/// The same with `fallocate`: each range is allocated before it goes private, and each
/// area is punched after each range (in place, that zeroes it; the test checks so and
/// writes the initial pattern again).
pub fn explicit_conversion_fallocate(ctx: &Ctx<'_>) {
    with_areas(ctx, |a, len| a.explicit_conversion(len, true));
}

/// The selftest's punch-hole test, with the whole area faulted in and with only the range,
/// on [`THREADS`] threads at once.
pub fn punch_hole(ctx: &Ctx<'_>) {
    with_areas(ctx, |a, len| {
        a.punch_hole(len, false);
        a.punch_hole(len, true);
    });
}
