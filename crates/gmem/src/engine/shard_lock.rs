//! The page-state lock: a reader-writer lock with one reader shard per CPU.
//!
//! Accessors and pins read the page state on every call, from many threads at once; a
//! conversion writes it once per call. A plain reader-writer lock makes every reader write
//! one shared cache line, so two threads pinning at once pay for each other's pins. A
//! sharded lock gives each thread its own line to read-lock and makes the writer lock every
//! shard. Its write cost grows with the number of shards, so there are as many as the
//! machine has CPUs (rounded up to a power of two, at most [`MAX_SHARDS`]): on a machine of
//! two CPUs a write locks two shards, not eight.

use std::cell::{Cell, UnsafeCell};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crossbeam_utils::CachePadded;

/// The most shards a lock has.
pub(crate) const MAX_SHARDS: usize = 8;

/// A reader-writer lock whose readers lock one shard (their thread's) and whose writer locks
/// all of them. Poisoning is ignored: the page state is valid between any two writes.
pub(crate) struct ShardLock<T> {
    shards: Box<[CachePadded<RwLock<()>>]>,
    value: UnsafeCell<T>,
}

// SAFETY: `value` is read only under a shard's read lock and written only under every
// shard's write lock, so the lock hands out `&T` to many threads at once (`T: Sync`) and
// `&mut T` to one thread at a time (`T: Send`), as `std::sync::RwLock` does.
unsafe impl<T: Send + Sync> Sync for ShardLock<T> {}

impl<T: std::fmt::Debug> std::fmt::Debug for ShardLock<T> {
    /// Shows the value only when it can be read at once: formatting never waits, so a
    /// thread that holds the lock for writing can still print the engine.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ShardLock");
        d.field("shards", &self.shards.len());
        match self.try_read() {
            Some(g) => d.field("value", &*g),
            None => d.field("value", &format_args!("<locked>")),
        };
        d.finish()
    }
}

/// The number of shards for this machine, asked once per process (the question reads the
/// CPU affinity and the cgroup's CPU quota, several syscalls: too many for every file).
fn shard_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .next_power_of_two()
            .min(MAX_SHARDS)
    })
}

/// Threads are numbered in the order they first ask for their number; every per-thread
/// shard in gmem (this lock's readers, the reference totals, the handles' anchors) is chosen
/// by it, so a thread uses the same index everywhere.
static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The calling thread's number (see [`NEXT_THREAD`]).
pub(crate) fn thread_number() -> usize {
    THREAD.with(|t| match t.get() {
        Some(n) => n,
        None => {
            let n = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
            t.set(Some(n));
            n
        }
    })
}

impl<T> ShardLock<T> {
    /// A lock holding `value`, with one shard per CPU.
    pub(crate) fn new(value: T) -> Self {
        Self::with_shards(value, shard_count())
    }

    /// A lock holding `value` with `n` shards, rounded up to a power of two (at least one,
    /// at most [`MAX_SHARDS`]).
    fn with_shards(value: T, n: usize) -> Self {
        let n = n.clamp(1, MAX_SHARDS).next_power_of_two();
        ShardLock {
            shards: (0..n).map(|_| CachePadded::new(RwLock::new(()))).collect(),
            value: UnsafeCell::new(value),
        }
    }

    /// The calling thread's shard.
    fn own_shard(&self) -> &RwLock<()> {
        // The shard count is a power of two: a mask, not a division, on every read.
        &self.shards[thread_number() & (self.shards.len() - 1)]
    }

    /// Locks this thread's shard for reading.
    pub(crate) fn read(&self) -> ShardReadGuard<'_, T> {
        ShardReadGuard {
            _shard: self.own_shard().read().unwrap_or_else(|e| e.into_inner()),
            lock: self,
        }
    }

    /// This thread's shard for reading, or `None` when a writer holds or waits for it.
    fn try_read(&self) -> Option<ShardReadGuard<'_, T>> {
        let guard = match self.own_shard().try_read() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(ShardReadGuard {
            _shard: guard,
            lock: self,
        })
    }

    /// Locks every shard for writing, in order (so two writers cannot deadlock).
    pub(crate) fn write(&self) -> ShardWriteGuard<'_, T> {
        let mut shards: [Option<RwLockWriteGuard<'_, ()>>; MAX_SHARDS] = Default::default();
        for (slot, shard) in shards.iter_mut().zip(self.shards.iter()) {
            *slot = Some(shard.write().unwrap_or_else(|e| e.into_inner()));
        }
        ShardWriteGuard {
            _shards: shards,
            lock: self,
        }
    }
}

/// A read lock of a [`ShardLock`]: shared access to its value.
pub(crate) struct ShardReadGuard<'a, T> {
    _shard: RwLockReadGuard<'a, ()>,
    lock: &'a ShardLock<T>,
}

impl<T> Deref for ShardReadGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: this guard holds a shard's read lock, so no writer (which holds every
        // shard's write lock) can hold `&mut T` while the returned reference lives.
        unsafe { &*self.lock.value.get() }
    }
}

/// The write lock of a [`ShardLock`]: exclusive access to its value.
pub(crate) struct ShardWriteGuard<'a, T> {
    _shards: [Option<RwLockWriteGuard<'a, ()>>; MAX_SHARDS],
    lock: &'a ShardLock<T>,
}

impl<T> Deref for ShardWriteGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: this guard holds every shard's write lock: no reader and no other writer
        // holds a reference to the value.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for ShardWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as for `deref`; `&mut self` makes the returned reference the only one.
        unsafe { &mut *self.lock.value.get() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn shards_are_a_power_of_two_up_to_the_cpus() {
        let n = shard_count();
        assert!(n.is_power_of_two() && n <= MAX_SHARDS);
        assert_eq!(ShardLock::with_shards(0u8, 0).shards.len(), 1);
        assert_eq!(ShardLock::with_shards(0u8, 3).shards.len(), 4);
        assert_eq!(ShardLock::with_shards(0u8, 100).shards.len(), MAX_SHARDS);
    }

    #[test]
    fn a_writer_waits_for_readers_on_every_shard() {
        for shards in [1, 2, 4] {
            let lock = Arc::new(ShardLock::with_shards(0u64, shards));
            // Four readers on four threads, numbered one after the other, so on every shard,
            // each holding its lock until told to go; the writer must not get in before all
            // have gone.
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let rx = Arc::new(std::sync::Mutex::new(rx));
            let (held_tx, held_rx) = std::sync::mpsc::channel();
            let readers: Vec<_> = (0..4)
                .map(|_| {
                    let (lock, rx, held_tx) = (lock.clone(), rx.clone(), held_tx.clone());
                    std::thread::spawn(move || {
                        let g = lock.read();
                        held_tx.send(*g).unwrap();
                        let _ = rx.lock().unwrap().recv();
                        *g
                    })
                })
                .collect();
            for _ in 0..4 {
                assert_eq!(held_rx.recv().unwrap(), 0);
            }
            let writer = {
                let lock = lock.clone();
                std::thread::spawn(move || *lock.write() = 7)
            };
            std::thread::sleep(Duration::from_millis(50));
            assert!(!writer.is_finished(), "{shards} shards: the writer got in");
            // Formatting does not wait for the waiting writer.
            assert!(format!("{:?}", lock).contains("ShardLock"));
            drop(tx);
            for r in readers {
                assert_eq!(r.join().unwrap(), 0);
            }
            writer.join().unwrap();
            assert_eq!(*lock.read(), 7);
        }
    }

    #[test]
    fn formatting_while_writing_does_not_wait() {
        let lock = ShardLock::with_shards(5u32, 2);
        let g = lock.write();
        assert_eq!(
            format!("{lock:?}"),
            "ShardLock { shards: 2, value: <locked> }"
        );
        drop(g);
        assert_eq!(format!("{lock:?}"), "ShardLock { shards: 2, value: 5 }");
    }

    #[test]
    fn concurrent_writers_and_readers_see_whole_writes() {
        let lock = Arc::new(ShardLock::with_shards((0u64, 0u64), 2));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let lock = lock.clone();
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        if i % 2 == 0 {
                            let mut g = lock.write();
                            g.0 += 1;
                            g.1 += 1;
                        } else {
                            let g = lock.read();
                            assert_eq!(g.0, g.1);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*lock.read(), (40_000, 40_000));
    }
}
