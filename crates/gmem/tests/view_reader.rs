//! The views' reader thread of a HugeTLB file follows gmem's own window replacements while a
//! split or merge announces them (woken when the announcement starts), and sleeps once they
//! end: splits and merges leave no CPU busy behind them.
// Sizes here are small multiples of pages on a 64-bit host: casts to usize are exact.
#![allow(clippy::cast_possible_truncation)]

mod hugepool;

use std::time::Duration;

use gmem::{Attr, BackingChoice, Flags, GuestMemfd, HUGE_2M};
use hugepool::pool;

const P: u64 = 4096;

/// The thread ids of this process's threads named `gmem-views`.
fn readers() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .filter_map(|e| {
            let tid = e.ok()?.file_name().into_string().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            (comm.trim() == "gmem-views").then_some(tid)
        })
        .collect()
}

/// The state letter and the CPU time in clock ticks (user + system) of thread `tid`.
fn sched(tid: &str) -> (char, u64) {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).expect("stat");
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("comm end") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks = |i: usize| f[i].parse::<u64>().expect("ticks");
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let state = f[0].chars().next().expect("state");
    (state, ticks(11) + ticks(12))
}

#[test]
fn the_view_reader_sleeps_once_splits_and_merges_end() {
    let Some(_pool) = pool(HUGE_2M, 2) else {
        return;
    };
    let mem = GuestMemfd::builder(2 * HUGE_2M)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(BackingChoice::HugeTlb(HUGE_2M))
        .create()
        .expect("create");
    let view = mem.map(0, 2 * HUGE_2M).expect("map");
    let acct = mem.hugetlb_accounting().expect("accounting");
    for i in 0..20 {
        let off = (5 + i) * P;
        mem.convert(off, P, Attr::Private).expect("split");
        mem.convert(off, P, Attr::Shared).expect("merge");
    }
    assert_eq!((acct.splits(), acct.merges()), (20, 20));
    let tids = readers();
    assert_eq!(tids.len(), 1, "one reader for the one file with views");
    let tid = &tids[0];
    // Past every follow-up (at most a few milliseconds).
    std::thread::sleep(Duration::from_millis(50));
    let (_, before) = sched(tid);
    std::thread::sleep(Duration::from_millis(500));
    let (state, after) = sched(tid);
    // A reader that kept looking would have used about 50 ticks (100 per second).
    assert!(
        after - before <= 2,
        "the reader used {} ticks in 500 ms of quiet",
        after - before
    );
    assert_eq!(state, 'S', "the reader sleeps in its poll");
    drop(view);
}
