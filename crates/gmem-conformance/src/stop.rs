//! Stopping a racing thread however the checking thread leaves its scope, and a watchdog
//! that turns a run that never ends (a deadlock) into a failure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Sets its flag when dropped. A check that panics inside a [`std::thread::scope`] still
/// stops the scope's racing threads, whose join would otherwise wait forever.
#[derive(Debug)]
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Aborts the process, naming the limit, unless `done` is set within `limit`. Join the
/// handle after setting `done`.
pub fn watchdog(limit: Duration, done: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let t0 = Instant::now();
        while !done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
            if t0.elapsed() > limit {
                eprintln!("watchdog: the run did not finish within {limit:?}: deadlock");
                std::process::abort();
            }
        }
    })
}
