//! Stopping a racing thread however the checking thread leaves its scope.

use std::sync::atomic::{AtomicBool, Ordering};

/// Sets its flag when dropped. A check that panics inside a [`std::thread::scope`] still
/// stops the scope's racing threads, whose join would otherwise wait forever.
#[derive(Debug)]
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}
