//! The page-state lock: a reader-writer lock with one reader shard per CPU.
//!
//! Accessors and pins read the page state on every call, from many threads at once; a
//! conversion writes it once per call. A plain reader-writer lock makes every reader write
//! one shared cache line, so two threads pinning at once pay for each other's pins. Here each
//! thread counts itself in its own shard's line, and the writer writes one word and reads
//! every shard's count. There are as many shards as the machine has CPUs (rounded up to a
//! power of two, at most [`MAX_SHARDS`]).
//!
//! The protocol, in the style of the kernel's per-CPU reader-writer semaphore:
//!
//! - a **reader** adds itself to its shard's count, then reads the writer word: free, it
//!   holds the lock; taken, it takes itself off the count again and sleeps until the word is
//!   free, then starts over;
//! - the **writer** takes the word (so readers arriving from then on back off), then waits
//!   for every shard's count to reach zero.
//!
//! Both sides write their own word before they read the other's, with sequentially
//! consistent atomics, so of a reader and a writer arriving together at least one sees the
//! other: no reader holds the lock while the writer does. A writer costs one atomic
//! read-modify-write to take the word, one to give it back and a load per shard, where a
//! reader-writer lock per shard costs two per shard. Waiting is a futex wait: a reader leaving
//! a count of zero while the word is taken wakes the writer, a writer giving back a word that
//! others wait for wakes them. Readers give way to a writer that waits (so a conversion is
//! not starved by a stream of accessors); writers wait for each other on the word.

use std::cell::{Cell, UnsafeCell};
use std::hint::spin_loop;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::OnceLock;

use crossbeam_utils::CachePadded;

use crate::sys::futex;

/// The most shards a lock has.
pub(crate) const MAX_SHARDS: usize = 8;

/// The writer word: no writer.
const FREE: u32 = 0;
/// The writer word: a writer holds (or is taking) the lock, nobody sleeps on the word.
const HELD: u32 = 1;
/// The writer word: a writer holds the lock and others may sleep on the word.
const CONTENDED: u32 = 2;

/// Checks of a word before a thread sleeps on it: most holds are shorter than a sleep.
const SPINS: u32 = 100;

/// A reader-writer lock whose readers count themselves in one shard (their thread's) and
/// whose writer waits for every shard's readers (module docs). Nothing is poisoned: the page
/// state is valid between any two writes.
pub(crate) struct ShardLock<T> {
    /// Readers holding the lock or trying to, per shard.
    readers: Box<[CachePadded<AtomicU32>]>,
    /// [`FREE`], [`HELD`] or [`CONTENDED`].
    writer: CachePadded<AtomicU32>,
    value: UnsafeCell<T>,
}

// SAFETY: `value` is read only by a thread counted in a shard while the writer word is free,
// and written only by the thread that took the writer word and saw every count at zero
// (module docs), so the lock hands out `&T` to many threads at once (`T: Sync`) and `&mut T`
// to one thread at a time (`T: Send`), as `std::sync::RwLock` does.
unsafe impl<T: Send + Sync> Sync for ShardLock<T> {}

impl<T: std::fmt::Debug> std::fmt::Debug for ShardLock<T> {
    /// Shows the value only when it can be read at once: formatting never waits, so a
    /// thread that holds the lock for writing can still print the engine.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ShardLock");
        d.field("shards", &self.readers.len());
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
            readers: (0..n)
                .map(|_| CachePadded::new(AtomicU32::new(0)))
                .collect(),
            writer: CachePadded::new(AtomicU32::new(FREE)),
            value: UnsafeCell::new(value),
        }
    }

    /// The calling thread's shard count.
    fn own_count(&self) -> &AtomicU32 {
        // The shard count is a power of two: a mask, not a division, on every read.
        &self.readers[thread_number() & (self.readers.len() - 1)]
    }

    /// Locks for reading: waits while a writer holds or waits for the lock.
    #[inline]
    pub(crate) fn read(&self) -> ShardReadGuard<'_, T> {
        match self.read_unless(|| Ok::<(), std::convert::Infallible>(())) {
            Ok(g) => g,
            Err(never) => match never {},
        }
    }

    /// [`ShardLock::read`], but `give_up` is asked before each wait and its error returned:
    /// for a caller that must not wait for a writer that may never give the lock back (a
    /// thread of a forked child, whose parent's writer is not in the child). A lock taken
    /// at once never asks it.
    #[inline]
    pub(crate) fn read_unless<E>(
        &self,
        give_up: impl Fn() -> Result<(), E>,
    ) -> Result<ShardReadGuard<'_, T>, E> {
        let count = self.own_count();
        loop {
            if let Some(g) = self.enter(count) {
                return Ok(g);
            }
            give_up()?;
            self.wait_until_free();
        }
    }

    /// Locks for reading, or `None` when a writer holds or waits for the lock.
    fn try_read(&self) -> Option<ShardReadGuard<'_, T>> {
        self.enter(self.own_count())
    }

    /// Counts this thread in `count` and keeps the count if the writer word is free.
    #[inline]
    fn enter<'a>(&'a self, count: &'a AtomicU32) -> Option<ShardReadGuard<'a, T>> {
        count.fetch_add(1, Ordering::SeqCst);
        if self.writer.load(Ordering::SeqCst) == FREE {
            return Some(ShardReadGuard { count, lock: self });
        }
        self.leave(count);
        None
    }

    /// Takes this thread off `count`; the last reader out while a writer holds the word wakes
    /// it (it may sleep on the count).
    fn leave(&self, count: &AtomicU32) {
        if count.fetch_sub(1, Ordering::SeqCst) == 1 && self.writer.load(Ordering::SeqCst) != FREE {
            futex::wake_all(count);
        }
    }

    /// Returns once the writer word has been seen free.
    fn wait_until_free(&self) {
        for _ in 0..SPINS {
            if self.writer.load(Ordering::Relaxed) == FREE {
                return;
            }
            spin_loop();
        }
        loop {
            match self.writer.load(Ordering::Relaxed) {
                FREE => return,
                // Marked first, so the writer's release wakes this thread.
                HELD => {
                    if self
                        .writer
                        .compare_exchange(HELD, CONTENDED, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                    {
                        futex::wait(&self.writer, CONTENDED);
                    }
                }
                _ => futex::wait(&self.writer, CONTENDED),
            }
        }
    }

    /// Locks for writing: takes the writer word, then waits for every shard's readers.
    pub(crate) fn write(&self) -> ShardWriteGuard<'_, T> {
        if self
            .writer
            .compare_exchange(FREE, HELD, Ordering::SeqCst, Ordering::Relaxed)
            .is_err()
        {
            self.take_contended();
        }
        for count in self.readers.iter() {
            Self::drain(count);
        }
        ShardWriteGuard { lock: self }
    }

    /// Takes the writer word from another writer. A writer that had to wait takes it as
    /// [`CONTENDED`]: others may still sleep on it, and the release must wake them.
    fn take_contended(&self) {
        for _ in 0..SPINS {
            if self
                .writer
                .compare_exchange(FREE, HELD, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
            spin_loop();
        }
        while self.writer.swap(CONTENDED, Ordering::SeqCst) != FREE {
            futex::wait(&self.writer, CONTENDED);
        }
    }

    /// Returns once `count` has been seen at zero (the writer holds the word: readers that
    /// arrive now leave again at once).
    fn drain(count: &AtomicU32) {
        for _ in 0..SPINS {
            if count.load(Ordering::SeqCst) == 0 {
                return;
            }
            spin_loop();
        }
        loop {
            let n = count.load(Ordering::SeqCst);
            if n == 0 {
                return;
            }
            futex::wait(count, n);
        }
    }
}

/// A read lock of a [`ShardLock`]: shared access to its value.
pub(crate) struct ShardReadGuard<'a, T> {
    count: &'a AtomicU32,
    lock: &'a ShardLock<T>,
}

impl<T> Deref for ShardReadGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: this guard is counted in a shard and saw the writer word free after it was
        // counted, so no writer (which waits for every count to reach zero after taking the
        // word) holds `&mut T` while the returned reference lives.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> Drop for ShardReadGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.leave(self.count);
    }
}

/// The write lock of a [`ShardLock`]: exclusive access to its value.
pub(crate) struct ShardWriteGuard<'a, T> {
    lock: &'a ShardLock<T>,
}

impl<T> Deref for ShardWriteGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: this guard holds the writer word and saw every shard's count at zero after
        // taking it: no reader and no other writer holds a reference to the value.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for ShardWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as for `deref`; `&mut self` makes the returned reference the only one.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for ShardWriteGuard<'_, T> {
    fn drop(&mut self) {
        if self.lock.writer.swap(FREE, Ordering::Release) == CONTENDED {
            futex::wake_all(&self.lock.writer);
        }
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
        assert_eq!(ShardLock::with_shards(0u8, 0).readers.len(), 1);
        assert_eq!(ShardLock::with_shards(0u8, 3).readers.len(), 4);
        assert_eq!(ShardLock::with_shards(0u8, 100).readers.len(), MAX_SHARDS);
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
    fn a_reader_waits_for_the_writer_and_sees_its_write() {
        let lock = Arc::new(ShardLock::with_shards(0u64, 2));
        let mut g = lock.write();
        let reader = {
            let lock = lock.clone();
            std::thread::spawn(move || *lock.read())
        };
        // Long enough for the reader to spin out and sleep on the writer word.
        std::thread::sleep(Duration::from_millis(50));
        assert!(!reader.is_finished(), "the reader got in past the writer");
        assert!(lock.try_read().is_none());
        *g = 9;
        drop(g);
        assert_eq!(reader.join().unwrap(), 9);
        assert_eq!(lock.writer.load(Ordering::Relaxed), FREE);
    }

    #[test]
    fn sleeping_holders_hand_the_lock_on_without_lost_wake_ups() {
        // Every hold sleeps, so waiters spin out and sleep on the futex words: a lost wake-up
        // leaves a thread asleep and the run unfinished.
        let lock = Arc::new(ShardLock::with_shards((0u64, 0u64), 2));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let threads: Vec<_> = (0..6)
            .map(|i| {
                let (lock, done_tx) = (lock.clone(), done_tx.clone());
                std::thread::spawn(move || {
                    for _ in 0..300 {
                        if i < 2 {
                            let mut g = lock.write();
                            g.0 += 1;
                            std::thread::sleep(Duration::from_micros(20));
                            g.1 += 1;
                        } else {
                            let g = lock.read();
                            assert_eq!(g.0, g.1);
                            std::thread::sleep(Duration::from_micros(20));
                            assert_eq!(g.0, g.1);
                        }
                    }
                    done_tx.send(()).unwrap();
                })
            })
            .collect();
        for _ in 0..6 {
            if done_rx.recv_timeout(Duration::from_secs(30)).is_err() {
                let panicked = threads.iter().filter(|t| t.is_finished()).count();
                panic!(
                    "{panicked} thread(s) panicked (messages above); the others still wait: \
                     a lost wake-up if none panicked"
                );
            }
        }
        for t in threads {
            t.join().expect("a holder");
        }
        assert_eq!(*lock.read(), (600, 600));
        assert_eq!(lock.writer.load(Ordering::Relaxed), FREE);
        assert!(lock.readers.iter().all(|c| c.load(Ordering::Relaxed) == 0));
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
