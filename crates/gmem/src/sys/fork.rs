//! Fork: detection, and keeping gmem's mappings out of children.
//!
//! A child inherits gmem's objects but not its address-space state (a userfaultfd acts on
//! the address space that created it), so every object records the *generation* it was made
//! in and refuses to work in another one. The generation is a per-process counter that an
//! `atfork` child handler increments, so a check is one atomic load.
//!
//! Views and the guest mapping must never be inherited: a child's copy would escape every
//! later conversion. They are `MADV_DONTFORK`, and since the VMM may undo that
//! (`MADV_DOFORK`) by accident, an `atfork` prepare handler applies `MADV_DONTFORK` again to
//! every such mapping right before each `fork`. The registry of those mappings is guarded by
//! a lock that the prepare handler holds across the fork, so that a child never inherits it
//! locked. A child made by a raw `clone(2)` that bypasses libc's fork handlers is not
//! covered.

use std::cell::UnsafeCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Mappings kept out of children: start address → length.
struct Registry {
    lock: UnsafeCell<libc::pthread_mutex_t>,
    ranges: UnsafeCell<BTreeMap<usize, usize>>,
}

// SAFETY: `ranges` is only touched with `lock` held (see `with_registry` and the handlers).
unsafe impl Sync for Registry {}

static REGISTRY: Registry = Registry {
    lock: UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER),
    ranges: UnsafeCell::new(BTreeMap::new()),
};

fn lock() {
    // SAFETY: a statically initialised, never moved mutex.
    unsafe { libc::pthread_mutex_lock(REGISTRY.lock.get()) };
}

fn unlock() {
    // SAFETY: called only by the thread that locked it (in a child: the forking thread's copy).
    unsafe { libc::pthread_mutex_unlock(REGISTRY.lock.get()) };
}

fn with_registry<R>(f: impl FnOnce(&mut BTreeMap<usize, usize>) -> R) -> R {
    register_handlers();
    lock();
    // SAFETY: the lock is held; no other reference to the map exists meanwhile.
    let r = f(unsafe { &mut *REGISTRY.ranges.get() });
    unlock();
    r
}

extern "C" fn before_fork() {
    lock();
    // SAFETY: the lock is held until `after_fork_*`; nothing else touches the map.
    let ranges = unsafe { &*REGISTRY.ranges.get() };
    for (&addr, &len) in ranges {
        // SAFETY: only sets a flag on gmem's own mappings; a range partly gone is skipped by
        // the kernel (ENOMEM), which is harmless here.
        unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTFORK) };
    }
}

extern "C" fn after_fork_parent() {
    unlock();
}

extern "C" fn after_fork_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
    unlock();
}

fn register_handlers() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // SAFETY: the handlers only lock, unlock, call madvise and increment an atomic, all
        // valid around fork and in a forked child.
        let r = unsafe {
            libc::pthread_atfork(
                Some(before_fork),
                Some(after_fork_parent),
                Some(after_fork_child),
            )
        };
        if r != 0 {
            tracing::error!("pthread_atfork failed: {r}");
        }
    });
}

/// The current fork generation (registers the fork handlers on first use).
pub(crate) fn generation() -> u64 {
    register_handlers();
    GENERATION.load(Ordering::Relaxed)
}

/// True when `g` is the current generation (this is the process that recorded it).
pub(crate) fn generation_is_current(g: u64) -> bool {
    g == generation()
}

/// Keeps `[addr, addr + len)` out of every child: `MADV_DONTFORK` now and before each fork.
pub(crate) fn keep_from_children(addr: usize, len: usize) -> std::io::Result<()> {
    // SAFETY: sets a flag on a mapping the caller owns.
    super::cvt(unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTFORK) })?;
    with_registry(|r| r.insert(addr, len));
    Ok(())
}

/// Stops re-applying `MADV_DONTFORK` to the mapping at `addr` (it is unmapped or given up).
pub(crate) fn release_from_children(addr: usize) {
    with_registry(|r| r.remove(&addr));
}

/// True when the mapping at `addr` is kept out of children.
#[cfg(test)]
pub(crate) fn is_kept_from_children(addr: usize) -> bool {
    with_registry(|r| r.contains_key(&addr))
}

#[cfg(test)]
mod tests {
    use super::super::mapping::Mapping;
    use super::*;

    #[test]
    fn a_mapping_kept_from_children_is_registered_until_dropped_or_forgotten() {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let mut m = Mapping::map(None, 0, 4096, flags, rw).expect("map");
        let addr = m.addr();
        assert!(!is_kept_from_children(addr));
        m.keep_from_children().expect("keep from children");
        assert!(is_kept_from_children(addr));
        drop(m);
        assert!(!is_kept_from_children(addr));
        let mut m = Mapping::map(None, 0, 4096, flags, rw).expect("map");
        let addr = m.addr();
        m.keep_from_children().expect("keep from children");
        // SAFETY: the test unmaps its own mapping, then forgets the owner.
        unsafe { libc::munmap(m.as_ptr().cast(), 4096) };
        m.forget();
        assert!(!is_kept_from_children(addr));
    }
}
