//! What the threads of a stress run share (a stop flag, the first violation, each thread's
//! progress for the watchdog), and the punching thread both stress suites run.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gmem::{FallocMode, GuestMemfd};

use crate::rng::Rng;

const PAGE: u64 = 4096;

/// Stop flag, first violation, and per-thread progress of one process's stress run.
#[derive(Debug)]
pub struct Board {
    stop: AtomicBool,
    violation: Mutex<Option<String>>,
    names: Vec<&'static str>,
    progress: Vec<AtomicU64>,
}

impl Board {
    /// A board for threads named `names` (thread `i` ticks `progress[i]`).
    pub fn new(names: &[&'static str]) -> Arc<Board> {
        Arc::new(Board {
            stop: AtomicBool::new(false),
            violation: Mutex::new(None),
            names: names.to_vec(),
            progress: names.iter().map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Records `what` unless a violation came first, and stops the run.
    pub fn violate(&self, what: String) {
        let mut v = self.violation.lock().unwrap_or_else(|e| e.into_inner());
        if v.is_none() {
            *v = Some(what);
        }
        self.stop();
    }

    /// Thread `i` made one more iteration.
    pub fn tick(&self, i: usize) {
        if let Some(p) = self.progress.get(i) {
            p.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Stops the run.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// True once the run stops.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// The name of thread `i`.
    pub fn name(&self, i: usize) -> &'static str {
        self.names.get(i).copied().unwrap_or("?")
    }

    /// The names of the threads, in order.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }

    /// Each thread's iterations so far, in order.
    pub fn counts(&self) -> Vec<u64> {
        self.progress
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .collect()
    }

    /// The first violation, taken.
    pub fn take_violation(&self) -> Option<String> {
        self.violation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// Thread `me`: punches holes in (three times in four) or allocates random block-aligned
/// ranges of the first `pages` pages of `mem`, `pause` apart, until the board stops; a
/// failing call is a violation.
pub fn puncher(mem: &GuestMemfd, b: &Board, me: usize, seed: u64, pages: u64, pause: Duration) {
    let mut r = Rng::new(seed);
    let per = mem.block_size() / PAGE;
    while !b.stopped() {
        b.tick(me);
        let start = r.below(pages / per) * per;
        let n = r.range(1, ((pages - start) / per).min(16)) * per;
        let mode = if r.chance(3, 4) {
            FallocMode::PUNCH_HOLE
        } else {
            FallocMode::KEEP_SIZE
        };
        if let Err(e) = mem.fallocate(mode, start * PAGE, n * PAGE) {
            b.violate(format!("fallocate failed: {e}"));
        }
        std::thread::sleep(pause);
    }
}
