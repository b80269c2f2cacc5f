//! P10 and P11 (DESIGN.md §8): device access through gmem's `GuestMemory` against vm-memory's
//! `GuestMemoryMmap` mapping the same memfd, measured in the same run, interleaved.
//!
//! - P10: `Bytes::read_obj::<u64>` and a 16-byte descriptor read (`read_obj` of a split-ring
//!   descriptor), on a file of 1 run (all shared) and of 1,048,576 runs (every other page
//!   private; reads go to the shared pages);
//! - P11: a virtio-queue device loop (pop a chain, `Writer` over it, write 1,500 bytes,
//!   `add_used`) over a 256-entry queue of single 1,500-byte buffers.
//!
//! `cargo bench -p gmem-vm-memory --bench device_access` (add `-- quick` for a short run).

use std::hint::black_box;
use std::io::Write as _;
use std::os::fd::AsFd;
use std::time::Instant;

use gmem::{Attr, Flags, GuestMemfd};
use gmem_vm_memory::{GmemMemory, HoldMode, RegionSpec};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT, Writer};
use vm_memory::bitmap::{BitmapSlice, WithBitmapSlice};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap};

#[path = "../examples/virtio_rng/driver.rs"]
#[allow(dead_code)]
mod driver;

fn mmap_of(file: &GuestMemfd) -> GuestMemoryMmap {
    let fd = file.as_fd().try_clone_to_owned().expect("dup");
    let size = usize::try_from(file.size()).expect("size");
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size,
        Some(FileOffset::new(std::fs::File::from(fd), 0)),
    )])
    .expect("GuestMemoryMmap over the memfd")
}

/// Nanoseconds per call of `f(i)` over `n` calls.
fn per_op(n: u64, mut f: impl FnMut(u64)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Reads `T` at `addrs` (cycled) through `mem`.
fn reads<M: GuestMemory, T: vm_memory::ByteValued>(mem: &M, addrs: &[u64], n: u64) -> f64 {
    let mask = addrs.len() - 1;
    per_op(n, |i| {
        let a = addrs[usize::try_from(i).unwrap_or(0) & mask];
        black_box(mem.read_obj::<T>(GuestAddress(black_box(a))).expect("read"));
    })
}

fn p10(label: &str, file: &GuestMemfd, addrs: &[u64], n: u64, rounds: usize) {
    p10_with(label, file, addrs, n, rounds, None);
}

/// P10 with the region's hold mode forced (`None`: the default for the backing).
fn p10_with(
    label: &str,
    file: &GuestMemfd,
    addrs: &[u64],
    n: u64,
    rounds: usize,
    hold: Option<HoldMode>,
) {
    let base = mmap_of(file);
    let spec = RegionSpec {
        hold,
        ..RegionSpec::new(0, file.clone(), 0, file.size())
    };
    let mem = GmemMemory::new([spec]).expect("mem");
    for (what, read_g, read_b) in [
        (
            "read_obj::<u64>",
            reads::<GmemMemory, u64> as fn(&GmemMemory, &[u64], u64) -> f64,
            reads::<GuestMemoryMmap, u64> as fn(&GuestMemoryMmap, &[u64], u64) -> f64,
        ),
        (
            "16-byte descriptor",
            reads::<GmemMemory, Descriptor>,
            reads::<GuestMemoryMmap, Descriptor>,
        ),
    ] {
        let (mut g, mut b) = (Vec::new(), Vec::new());
        read_g(&mem, addrs, n / 10);
        read_b(&base, addrs, n / 10);
        for _ in 0..rounds {
            g.push(read_g(&mem, addrs, n));
            b.push(read_b(&base, addrs, n));
        }
        let min_ratio = min(&g) / min(&b);
        let (g, b) = (median(g), median(b));
        println!(
            "P10 {label:<14} {what:<20} gmem {g:6.2} ns  GuestMemoryMmap {b:6.2} ns  ratio {:.2}x (of minima {min_ratio:.2}x)  (bar <= 1.5x: {})",
            g / b,
            if g / b <= 1.5 { "met" } else { "NOT met" }
        );
    }
}

/// One round of the device loop: the driver made `qsize` chains available; the device
/// consumes them all. Returns ns per chain.
fn device_round<M>(mem: &M, q: &mut Queue, payload: &[u8]) -> usize
where
    M: GuestMemory,
    for<'a> <M as GuestMemory>::Bitmap: WithBitmapSlice<'a>,
    for<'a> <<M as GuestMemory>::Bitmap as WithBitmapSlice<'a>>::S: BitmapSlice,
{
    let mut done = 0;
    while let Some(chain) = q.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let mut w: Writer<'_, _> = Writer::new(mem, chain).expect("writer");
        w.write_all(payload).expect("write");
        let len = u32::try_from(w.bytes_written()).unwrap_or(0);
        q.add_used(mem, head, len).expect("add_used");
        done += 1;
    }
    done
}

fn p11(rounds: usize, iters: usize) {
    const QSIZE: u16 = 256;
    const BUF: u32 = 1500;
    let file = GuestMemfd::builder(4 << 20)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .create()
        .expect("file");
    let base = mmap_of(&file);
    let mem = GmemMemory::new([RegionSpec::new(0, file.clone(), 0, file.size())]).expect("mem");
    let layout = driver::Layout::new(0x1000, QSIZE);
    let drv = driver::Driver::new(layout, |gpa: u64, bytes: &[u8]| {
        file.guest()
            .expect("guest view")
            .write(gpa, bytes)
            .expect("guest write")
    });
    for i in 0..QSIZE {
        let addr = 0x10_0000 + u64::from(i) * 2048;
        drv.set_desc(i, Descriptor::new(addr, BUF, driver::F_WRITE, 0));
        drv.set_avail_entry(i, i);
    }
    let payload = vec![0x5au8; usize::try_from(BUF).unwrap_or(0)];
    let run = |use_gmem: bool| -> f64 {
        let mut q = layout.queue();
        let mut avail = 0u16;
        let t = Instant::now();
        let mut chains = 0;
        for _ in 0..iters {
            avail = avail.wrapping_add(QSIZE);
            drv.set_avail_idx(avail);
            chains += if use_gmem {
                device_round(&mem, &mut q, &payload)
            } else {
                device_round(&base, &mut q, &payload)
            };
        }
        assert_eq!(chains, iters * usize::from(QSIZE));
        t.elapsed().as_nanos() as f64 / chains as f64
    };
    run(true);
    run(false);
    // Many short pairs, each gmem then GuestMemoryMmap (a few ms each): a pair that load hit
    // skews one ratio, not the median.
    let (mut g, mut b, mut pairs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (x, y) = (run(true), run(false));
        g.push(x);
        b.push(y);
        // Throughput ratio: chains/s through gmem over chains/s through GuestMemoryMmap.
        pairs.push(y / x);
    }
    let min_ratio = min(&b) / min(&g);
    let (g, b, ratio) = (median(g), median(b), median(pairs));
    println!(
        "P11 device loop, 1,500-byte chains: gmem {g:7.1} ns/chain  GuestMemoryMmap {b:7.1} ns/chain  throughput ratio {ratio:.2} (median of {rounds} pairs; of minima {min_ratio:.2})  (bar >= 0.8: {})",
        if ratio >= 0.8 { "met" } else { "NOT met" }
    );
}

/// Conversion to private and back of one page: on a file no host view ever showed, and on a
/// file with the adapter attached (its host view, its listener's `membarrier` per conversion
/// to private, and gmem's own work for a page a view shows).
fn conversion_cost(rounds: usize) {
    let n = 2000u64;
    let file = || {
        GuestMemfd::builder(n * 4096)
            .flags(Flags::MMAP | Flags::INIT_SHARED)
            .create()
            .expect("file")
    };
    let pair = |f: &GuestMemfd| {
        per_op(n, |p| {
            f.convert(p * 4096, 4096, Attr::Private)
                .expect("to private");
            f.convert(p * 4096, 4096, Attr::Shared).expect("to shared");
        }) / 1000.0
    };
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        without.push(pair(&file()));
        let f = file();
        let mem = GmemMemory::new([RegionSpec::new(0, f.clone(), 0, f.size())]).expect("mem");
        // A device thread that has taken slices (so the process has a slot table).
        black_box(mem.read_obj::<u64>(GuestAddress(0)).expect("read"));
        with.push(pair(&f));
        drop(mem);
    }
    let (w, wo) = (median(with), median(without));
    println!(
        "conversion pair (4 KiB to private and back): with the adapter {w:.2} us, on a file no view showed {wo:.2} us, ratio {:.2}x",
        w / wo
    );
}

/// Two address sets per file: "hot", 512 addresses on 64 pages spread over the file, on
/// distinct cache lines (a device's rings and descriptors: in cache, TLB-resident); "cold",
/// 4096 addresses on 4096 pages spread over the file (every access misses the caches).
/// `shared_page` maps a page number to a shared page near it.
fn sets(size: u64, shared_page: &dyn Fn(u64) -> u64) -> (Vec<u64>, Vec<u64>) {
    let pages = size / 4096;
    let hot: Vec<u64> = (0..512u64)
        .map(|i| shared_page((i / 8) * (pages / 64)) * 4096 + ((i * 7) % 64) * 64)
        .collect();
    let cold: Vec<u64> = (0..4096u64)
        .map(|i| shared_page((i * 2_654_435_761) % pages) * 4096 + (i % 64) * 8)
        .collect();
    (hot, cold)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "quick");
    // Optional filters: `p10-hot`, `p10-pinned`, `p10-cold`, `p10-1m`, `p11`, `conv` (default:
    // all).
    let only: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with('-') && *a != "quick" && *a != "--bench")
        .collect();
    let want = |what: &str| only.is_empty() || only.contains(&what);
    let (n, rounds) = if quick {
        (2_000_000, 3)
    } else {
        (10_000_000, 5)
    };
    println!(
        "gmem-vm-memory device access; slot path (membarrier): {}",
        gmem_vm_memory::hold::fast_path_available()
    );
    // 1 run: 64 MiB, all shared.
    let one = GuestMemfd::builder(64 << 20)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .create()
        .expect("file");
    let (hot, cold) = sets(64 << 20, &|p| p);
    for &a in hot.iter().chain(&cold) {
        one.write_at(a & !4095, &[1]).expect("populate");
    }
    if want("p10-hot") {
        p10("1 run, hot", &one, &hot, n, rounds);
    }
    if want("p10-pinned") {
        p10_with(
            "1 run, pinned",
            &one,
            &hot,
            n / 4,
            rounds,
            Some(HoldMode::Pinned),
        );
    }
    if want("p10-cold") {
        p10("1 run, cold", &one, &cold, n / 4, rounds);
    }
    drop(one);

    if want("p10-1m") {
        p10_1m(n, rounds);
    }
    if want("p11") {
        // 256 chains per iteration: quick 11 pairs of 51,200 chains, full 41 pairs of 25,600.
        if quick {
            p11(11, 200);
        } else {
            p11(41, 100);
        }
    }
    if want("conv") {
        conversion_cost(rounds);
    }
}

/// P10 on 1,048,576 runs: 4 GiB (sparse), every odd page private; reads on even pages.
fn p10_1m(n: u64, rounds: usize) {
    let pages: u64 = 1 << 20;
    let big = GuestMemfd::builder(pages * 4096)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .create()
        .expect("file");
    let t = Instant::now();
    for p in (1..pages).step_by(2) {
        big.convert(p * 4096, 4096, Attr::Private).expect("convert");
    }
    println!(
        "  (made {} runs in {:.1} s)",
        big.run_count().expect("run count"),
        t.elapsed().as_secs_f64()
    );
    let (hot, cold) = sets(pages * 4096, &|p| p & !1);
    for &a in hot.iter().chain(&cold) {
        big.write_at(a & !4095, &[1]).expect("populate");
    }
    p10("1M runs, hot", &big, &hot, n, rounds);
    p10("1M runs, cold", &big, &cold, n / 4, rounds);
}
