//! P7: live-update pause against a copy-based hand-over, measured in the same run.
//!
//! `cargo bench -p gmem --bench preserve_pause`
//!
//! For 1, 4 and 16 GiB files with 10,000 attribute runs, the pause is the guest's: from the
//! freeze in the old owner until the new owner owns the files and has said so (`DONE` sent),
//! when it can run the guest again. The new owner is a thread of this process on the other
//! end of a `SOCK_SEQPACKET` pair, doing exactly what a new process does: receive the
//! descriptors, read and verify the state, `fstat` the file, map it, rebuild the runs. Also
//! printed: until the old owner has let go (read `DONE` and revoked its mappings), which it
//! does while the new owner's guest already runs. The files are sparse (one written page per run):
//! the pause does not touch contents, so it does not depend on how much is populated.
//!
//! The baseline is a copy-based hand-over of the same memory: [`copy_into_new`] (what the
//! kernel guest_memfd backing must do today) of a fully written file into a fresh one, with
//! the attributes restored. It is measured at 1 and 4 GiB; 16 GiB is extrapolated linearly
//! from the cheaper of the two rates per GiB (16 GiB written twice would not fit this
//! machine's memory next to everything else).

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gmem::preserve::{copy_into_new, hand_over, receive, FileOffer, Options};
use gmem::{Attr, Flags, GuestMemfd};
use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};

const GIB: u64 = 1 << 30;
const P: u64 = 4096;
const RUNS: u64 = 10_000;
const ROUNDS: usize = 31;

fn with_runs(size: u64) -> GuestMemfd {
    let mem = GuestMemfd::create(size, Flags::MMAP | Flags::INIT_SHARED).expect("create");
    let stride = size / P / (RUNS / 2);
    for i in 0..RUNS / 2 {
        let page = i * stride + 1;
        mem.guest()
            .expect("guest view")
            .write(page * P, &i.to_le_bytes())
            .expect("write");
        mem.convert(page * P, P, Attr::Private).expect("convert");
    }
    mem
}

/// A 2 MiB HugeTLB file of `size` bytes, every other huge page private (a view of it holds a
/// hole window for each private one and maps the others whole).
fn huge_with_runs(size: u64) -> GuestMemfd {
    let mem = GuestMemfd::builder(size)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(gmem::BackingChoice::HugeTlb(gmem::HUGE_2M))
        .create()
        .expect("create HugeTLB");
    let mut at = 0;
    while at < size {
        mem.convert(at, gmem::HUGE_2M, Attr::Private)
            .expect("convert");
        at += 2 * gmem::HUGE_2M;
    }
    mem
}

/// Pauses of `rounds` hand-overs of a HugeTLB file of `size` bytes whose old owner holds a
/// host view of all of it (its commit revokes the view); medians and minima as [`measure`].
fn measure_huge_view(size: u64, rounds: usize) -> ([(Duration, Duration); 2], usize) {
    let mut mem = huge_with_runs(size);
    let runs = mem.run_count().expect("run count");
    let (mut resumed, mut released) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let view = mem.map(0, size).expect("map a view");
        let (t, next) = one(mem, round as u64 + 1);
        drop(view);
        resumed.push(t.resumed);
        released.push(t.released);
        mem = next;
    }
    let stats = |v: Vec<Duration>| (*v.iter().min().expect("rounds"), median(v));
    ([stats(resumed), stats(released)], runs)
}

/// One hand-over's times from the freeze: the new owner owns and has said so, the old owner
/// has let go.
struct Times {
    resumed: Duration,
    released: Duration,
}

/// One hand-over of `mem` to a thread; returns its times and the new owner's file.
fn one(mem: GuestMemfd, generation: u64) -> (Times, GuestMemfd) {
    let (a, b) = socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .expect("socketpair");
    let owned = Arc::new(Mutex::new(None));
    let marks = Arc::new(Mutex::new(Vec::new()));
    let (o2, m3) = (owned.clone(), marks.clone());
    let t0 = Instant::now();
    let taker = std::thread::spawn(move || {
        let opts = Options {
            on_step: Some(Arc::new(move |s| {
                m3.lock().unwrap().push((s, t0.elapsed()));
                if s == gmem::preserve::Step::DoneSent {
                    *o2.lock().unwrap() = Some(Instant::now());
                }
            })),
            ..Options::default()
        };
        receive(b.as_fd(), &opts)
    });
    let m2 = marks.clone();
    let opts = Options {
        generation,
        on_step: Some(Arc::new(move |s| {
            m2.lock().unwrap().push((s, t0.elapsed()))
        })),
        ..Options::default()
    };
    let done = hand_over(a.as_fd(), &[FileOffer::new(&mem)], &opts).expect("hand over");
    // `pause` runs from the freeze (the runs are read before it, while the guest runs) to
    // the old owner's letting go.
    let released = done.pause;
    let frozen_at = done.frozen_at;
    drop(mem);
    if std::env::var("GMEM_BENCH_STEPS").is_ok() {
        let mut m = marks.lock().unwrap().clone();
        m.sort_by_key(|&(_, t)| t);
        eprintln!("{m:?}");
    }
    let mut got = taker.join().expect("join").expect("receive");
    let resumed = owned.lock().unwrap().expect("DONE sent") - frozen_at;
    (Times { resumed, released }, got.files.remove(0).mem)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// `rounds` hand-overs of a file of `size` bytes back and forth; medians and minima of both
/// times, and the run count the file kept.
fn measure(size: u64, rounds: usize) -> ([(Duration, Duration); 2], usize) {
    let mut mem = with_runs(size);
    let runs = mem.run_count().expect("run count");
    let (mut resumed, mut released) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (t, next) = one(mem, round as u64 + 1);
        resumed.push(t.resumed);
        released.push(t.released);
        mem = next;
    }
    assert_eq!(mem.run_count().expect("run count"), runs);
    let stats = |v: Vec<Duration>| (*v.iter().min().expect("rounds"), median(v));
    ([stats(resumed), stats(released)], runs)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn copy_time(size: u64) -> Duration {
    let mem = with_runs(size);
    // Populate every page, as a running guest's memory is.
    let chunk = vec![0x5au8; 1 << 20];
    let mut at = 0;
    while at < size {
        mem.guest()
            .expect("guest view")
            .write(at, &chunk)
            .expect("fill");
        at += 1 << 20;
    }
    let (new, report) = copy_into_new(&mem, |size, flags| {
        GuestMemfd::create(size, flags).map_err(Into::into)
    })
    .expect("copy");
    assert_eq!(report.copied, size);
    assert_eq!(
        new.run_count().expect("run count"),
        mem.run_count().expect("run count")
    );
    report.elapsed
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this once quickly.
    let quick = !std::env::args().any(|a| a == "--bench");
    let sizes: &[u64] = if quick {
        &[GIB / 16]
    } else {
        &[GIB, 4 * GIB, 16 * GIB]
    };
    let line = |gib: u64, runs: usize, [(rmin, rmed), (lmin, lmed)]: [(Duration, Duration); 2]| {
        println!(
            "pause {gib:>2} GiB, {runs} runs: median {:.3} ms, min {:.3} ms; \
             until the old owner let go: median {:.3} ms, min {:.3} ms",
            ms(rmed),
            ms(rmin),
            ms(lmed),
            ms(lmin)
        );
    };
    // GMEM_BENCH_HUGE_VIEW=1,4 measures only the pause of 2 MiB HugeTLB files with a host
    // view, in that order of sizes (GiB; the pool grows for the run).
    if let Ok(list) = std::env::var("GMEM_BENCH_HUGE_VIEW") {
        for gib in list.split(',').filter_map(|s| s.parse::<u64>().ok()) {
            let pages = gib * GIB / gmem::HUGE_2M;
            let Ok(_pool) = gmem::PoolGuard::grow(gmem::HUGE_2M, pages) else {
                println!("skipped: cannot reserve {pages} 2 MiB pages");
                continue;
            };
            let (t, runs) = measure_huge_view(gib * GIB, ROUNDS);
            print!("HugeTLB 2 MiB with a view: ");
            line(gib, runs, t);
        }
        return;
    }
    // GMEM_BENCH_PAUSE_ONLY=16,1,4 measures only the pause, in that order of sizes (GiB).
    if let Ok(list) = std::env::var("GMEM_BENCH_PAUSE_ONLY") {
        for gib in list.split(',').filter_map(|s| s.parse::<u64>().ok()) {
            let (t, runs) = measure(gib * GIB, ROUNDS);
            line(gib, runs, t);
        }
        return;
    }
    let mut pauses = Vec::new();
    for &size in sizes {
        let (t, runs) = measure(size, if quick { 2 } else { ROUNDS });
        line(size / GIB, runs, t);
        pauses.push((size, t[0].1, t[1].1));
    }
    if quick {
        return;
    }
    let c1 = copy_time(GIB);
    let c4 = copy_time(4 * GIB);
    println!("copy  1 GiB (populated): {:.1} ms", c1.as_secs_f64() * 1e3);
    println!("copy  4 GiB (populated): {:.1} ms", c4.as_secs_f64() * 1e3);
    // Extrapolated from the cheaper rate per GiB, so the baseline is never overstated.
    let c16 = (c1 * 16).min(c4 * 4);
    println!(
        "copy 16 GiB: {:.1} ms (extrapolated: min(16 x the 1 GiB copy, 4 x the 4 GiB copy))",
        c16.as_secs_f64() * 1e3
    );
    for ((size, pause, _), copy) in pauses.iter().zip([c1, c4, c16]) {
        println!(
            "ratio {:>2} GiB: pause / copy = {:.5} (copy is {:.0}x the pause)",
            size / GIB,
            pause.as_secs_f64() / copy.as_secs_f64(),
            copy.as_secs_f64() / pause.as_secs_f64()
        );
    }
    let growth = |a: Duration, b: Duration| b.as_secs_f64() / a.as_secs_f64();
    println!(
        "growth of the pause from 1 to 16 GiB: {:.2}x (until the old owner let go: {:.2}x)",
        growth(pauses[0].1, pauses[2].1),
        growth(pauses[0].2, pauses[2].2)
    );
}
