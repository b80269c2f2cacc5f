//! Fork detection: a child inherits gmem's objects but not its address-space state (views
//! are `MADV_DONTFORK`, a userfaultfd acts on the address space that created it), so every
//! object records the *generation* it was made in and refuses to work in another one.
//!
//! The generation is a per-process counter that an `atfork` child handler increments, so a
//! check is one atomic load. A child made by a raw `clone(2)` that bypasses libc's fork
//! handlers is not detected.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

static GENERATION: AtomicU64 = AtomicU64::new(0);

extern "C" fn in_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// The current fork generation (registers the fork handler on first use).
pub(crate) fn generation() -> u64 {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // SAFETY: registers a child handler that only increments an atomic, which is
        // async-signal-safe and valid in a forked child.
        let r = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        if r != 0 {
            tracing::error!("pthread_atfork failed: {r}");
        }
    });
    GENERATION.load(Ordering::Relaxed)
}

/// True when `g` is the current generation (this is the process that recorded it).
pub(crate) fn generation_is_current(g: u64) -> bool {
    g == generation()
}
