//! P10 for a device backend's view: `read_obj` through a follower of the file (a
//! `GuestMemfd::attach`ed file, as a vhost-user backend in another process has; attached in
//! this process here, so the owner's steps reach it through the follower's agent the same
//! way), against vm-memory's `GuestMemoryMmap` over the same memfd, interleaved.
//!
//! `cargo bench -p gmem-vm-memory --bench follower_access` (`-- quick` for a short run). The
//! set is `device_access`'s hot set: 512 addresses on 64 pages spread over a 64 MiB file. A
//! separate binary, so its code does not change how the compiler lays out `device_access`.

use std::hint::black_box;
use std::os::fd::AsFd;
use std::time::Instant;

use gmem::{Flags, GuestMemfd};
use gmem_vm_memory::{GmemMemory, HoldMode, RegionSpec};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap};

fn reads<M: GuestMemory>(mem: &M, addrs: &[u64], n: u64) -> f64 {
    let mask = addrs.len() - 1;
    let t = Instant::now();
    for i in 0..n {
        let a = addrs[usize::try_from(i).unwrap_or(0) & mask];
        black_box(
            mem.read_obj::<u64>(GuestAddress(black_box(a)))
                .expect("read"),
        );
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let (n, rounds) = if quick {
        (2_000_000, 3)
    } else {
        (10_000_000, 5)
    };
    let size: u64 = 64 << 20;
    let owner = GuestMemfd::builder(size)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .create()
        .expect("file");
    let pages = size / 4096;
    let hot: Vec<u64> = (0..512u64)
        .map(|i| (i / 8) * (pages / 64) * 4096 + ((i * 7) % 64) * 64)
        .collect();
    for &a in &hot {
        owner.write_at(a & !4095, &[1]).expect("populate");
    }
    let follower = GuestMemfd::attach(owner.share_with_process().expect("share")).expect("attach");
    let mem = GmemMemory::new([RegionSpec::follower(0, follower.clone(), 0, size)])
        .expect("follower memory");
    assert_eq!(mem.hold_mode(0), Some(HoldMode::Tracked));
    let fd = owner.as_fd().try_clone_to_owned().expect("dup");
    let base: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        usize::try_from(size).expect("size"),
        Some(FileOffset::new(std::fs::File::from(fd), 0)),
    )])
    .expect("GuestMemoryMmap over the memfd");
    reads(&mem, &hot, n / 10);
    reads(&base, &hot, n / 10);
    let (mut g, mut b) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        g.push(reads(&mem, &hot, n));
        b.push(reads(&base, &hot, n));
    }
    g.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (g, b) = (g[g.len() / 2], b[b.len() / 2]);
    println!(
        "P10 1 run, hot, follower  read_obj::<u64>  gmem {g:6.2} ns  GuestMemoryMmap {b:6.2} ns  ratio {:.2}x  (bar <= 1.5x: {})",
        g / b,
        if g / b <= 1.5 { "met" } else { "NOT met" }
    );
}
