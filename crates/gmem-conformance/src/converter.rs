//! A thread converting part of a file to private and back in a loop, which a case can hold
//! between two conversion pairs (to look at the file while nothing converts).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use gmem::{Attr, GuestMemfd};

/// The converting thread; [`Converter::stop`] ends it.
#[derive(Debug)]
pub struct Converter {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    /// Conversion pairs begun and ended: odd while one runs.
    busy: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl Converter {
    /// Starts converting `[offset, offset + len)` of `mem` to private and back, over and
    /// over; a conversion that fails panics the thread (seen by [`Converter::hold`] and
    /// [`Converter::stop`]).
    pub fn spawn(mem: &Arc<GuestMemfd>, offset: u64, len: u64) -> Converter {
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicU64::new(0));
        let thread = {
            let (mem, stop, pause, busy) = (mem.clone(), stop.clone(), pause.clone(), busy.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    if pause.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                        continue;
                    }
                    busy.fetch_add(1, Ordering::AcqRel);
                    mem.convert(offset, len, Attr::Private).expect("to private");
                    mem.convert(offset, len, Attr::Shared).expect("to shared");
                    busy.fetch_add(1, Ordering::AcqRel);
                }
            })
        };
        Converter {
            stop,
            pause,
            busy,
            thread,
        }
    }

    /// Asks the thread to start no new pair, and returns once the pair in flight (if any)
    /// has ended. A pair whose start raced the request may begin after: only what ended
    /// before this returned is sure to be done.
    #[track_caller]
    pub fn hold(&self, what: &str) {
        self.pause.store(true, Ordering::Release);
        let b = self.busy.load(Ordering::Acquire);
        if b % 2 == 1 {
            while self.busy.load(Ordering::Acquire) == b {
                assert!(!self.thread.is_finished(), "{what}: the converter failed");
                std::hint::spin_loop();
            }
        }
    }

    /// Lets the thread go on after [`Converter::hold`].
    pub fn resume(&self) {
        self.pause.store(false, Ordering::Release);
    }

    /// Stops the thread; returns the number of conversion pairs it made.
    #[track_caller]
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("converter");
        self.busy.load(Ordering::Acquire) / 2
    }
}
