//! Futex waits and wakes on a 32-bit word, for gmem's own locks (process-private).

use std::sync::atomic::AtomicU32;

use rustix::thread::futex;

/// Sleeps while `word` holds `expected`. Returns at once when it does not, and may return
/// early (a signal, a spurious wake-up): the caller checks its condition again.
pub(crate) fn wait(word: &AtomicU32, expected: u32) {
    // EAGAIN (the word changed) and EINTR are the early returns the caller expects; no other
    // error is possible for a valid private futex word without a timeout.
    let _ = futex::wait(word, futex::Flags::PRIVATE, expected, None);
}

/// Wakes every thread sleeping in [`wait`] on `word`.
pub(crate) fn wake_all(word: &AtomicU32) {
    // The wake of a valid private futex word cannot fail.
    let _ = futex::wake(word, futex::Flags::PRIVATE, i32::MAX.unsigned_abs());
}
