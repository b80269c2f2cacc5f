//! A forked child and the parent's locks: a child forked while a thread of its parent holds
//! one of a file's locks (a conversion, a punch or a split under way) never gets it back, so
//! every gmem call in the child answers without waiting for one. Each test forks with the
//! lock held by a parent thread and gives the child ten seconds.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::listener::{Conversion, ConversionListener, Veto};
use super::participant::{Participant, Step, StepError};
use super::Engine;
use crate::model::error::Errno;
use crate::model::fault::HostFault;
use crate::{Flags, GuestMemfd};

/// Forks while a thread runs `hold` on the file's engine, which takes a lock and calls its
/// second argument with it held (that call returns once the child is done); the child runs
/// `child` and exits with its code. Panics when the child hangs or exits other than 0.
fn fork_while_held(
    mem: &GuestMemfd,
    hold: fn(&Engine, &dyn Fn()),
    child: impl FnOnce() -> i32,
    what: &str,
) {
    let engine = mem.inner.clone();
    let (held_tx, held_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        hold(&engine, &|| {
            held_tx.send(()).expect("send");
            let _ = go_rx.recv();
        });
    });
    held_rx.recv().expect("the holder holds the lock");
    // SAFETY: the child only calls gmem and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = child();
        // SAFETY: ends the child at once, without unwinding into the test harness.
        unsafe { libc::_exit(code) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = 0;
    let hung = loop {
        // SAFETY: polls the child forked above.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break false;
        }
        if Instant::now() > deadline {
            // SAFETY: ends the child forked above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: reaps the child forked above.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            break true;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(go_tx);
    holder.join().expect("the holder");
    assert!(!hung, "the forked child hangs: {what}");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{what}: the child's check failed (status {status:#x}, exit code {})",
        libc::WEXITSTATUS(status)
    );
}

fn shmem() -> GuestMemfd {
    GuestMemfd::builder(1 << 20)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .create()
        .expect("create")
}

/// The accessors and the queries fail with `EPERM` at once while a parent thread holds the
/// page-state lock for writing: they check the fork before they wait for the lock.
#[test]
fn accessors_and_queries_get_eperm_not_a_hang() {
    let mem = shmem();
    fork_while_held(
        &mem,
        |e, held| {
            let _w = e.write_pages();
            held();
        },
        || {
            let mut b = [0u8; 8];
            let errnos = [
                mem.read_at(0, &mut b).map(drop).map_err(|e| e.errno()),
                mem.write_at(0, &b).map(drop).map_err(|e| e.errno()),
                mem.pin(0, 4096).map(drop).map_err(|e| e.errno()),
                mem.attr(0).map(drop).map_err(|e| e.errno()),
                mem.runs(0, 4096).map(drop).map_err(|e| e.errno()),
                mem.any_private(0, 8).map(drop).map_err(|e| e.errno()),
                mem.run_count().map(drop).map_err(|e| e.errno()),
                mem.is_poisoned(0).map(drop).map_err(|e| e.errno()),
                mem.poisoned_pages().map(drop).map_err(|e| e.errno()),
                mem.numa_policy().map(drop).map_err(|e| e.errno()),
                mem.numa_node(0).map(drop).map_err(|e| e.errno()),
                mem.set_numa_policy(&crate::NumaPolicy::Default)
                    .map_err(|e| e.errno()),
            ];
            // The exit code names the first call that did not fail with EPERM.
            errnos
                .iter()
                .position(|r| *r != Err(libc::EPERM))
                .map_or(0, |i| i32::try_from(i).unwrap_or(99) + 1)
        },
        "page-state lock held for writing",
    );
}

struct Quiet;

impl ConversionListener for Quiet {
    fn prepare(&self, _: &Conversion) -> Result<(), Veto> {
        Ok(())
    }

    fn commit(&self, _: &Conversion) {}
}

impl crate::DeviceListener for Quiet {
    fn poisoned(&self, _: u64) {}

    fn unpoisoned(&self, _: u64, _: u64) {}
}

impl Participant for Quiet {
    fn name(&self) -> &str {
        "quiet"
    }

    fn apply(&mut self, _: &Step) -> Result<(), StepError> {
        Ok(())
    }

    fn undo(&mut self, _: &Step) {}
}

/// Listeners and participants register nothing in a forked child (nor remove the parent's)
/// and the fault account
/// says `SIGSEGV` (no view is mapped there), all without the control lock a parent thread
/// holds; the view's address is indeed unmapped in the child.
#[test]
fn registrations_and_fault_accounts_do_not_wait_for_the_control_lock() {
    let mem = shmem();
    let view = mem.map(0, 1 << 20).expect("map");
    let parent_listener = mem.add_listener(Arc::new(Quiet));
    let (device, _) = mem
        .add_device_listener(Arc::new(Quiet))
        .expect("device listener");
    fork_while_held(
        &mem,
        |e, held| {
            let _c = e.control_unchecked();
            held();
        },
        || {
            let l = mem.add_listener(Arc::new(Quiet));
            let p = mem.add_participant(Box::new(Quiet));
            let checks = [
                !mem.remove_listener(l),
                !mem.remove_listener(parent_listener),
                !mem.remove_participant(p),
                !mem.remove_device_listener(device),
                view.fault_at(0) == Some(HostFault::Segv),
                mem.host_fault(0) == Some(HostFault::Segv),
                // SAFETY: asks about the view's address range; nothing is touched.
                unsafe {
                    let mut v = [0u8; 1];
                    libc::mincore(view.as_ptr().cast(), 4096, v.as_mut_ptr()) == -1
                        && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOMEM)
                },
                mem.hugetlb_accounting().is_none(),
            ];
            checks
                .iter()
                .position(|ok| !ok)
                .map_or(0, |i| i32::try_from(i).unwrap_or(99) + 1)
        },
        "control lock held",
    );
    assert!(
        mem.remove_listener(parent_listener),
        "the parent's listener stays"
    );
    assert!(
        mem.remove_device_listener(device),
        "the parent's device listener stays"
    );
    assert_eq!(view.fault_at(0), None, "the parent's view shows the page");
}

/// The HugeTLB counters come without the restructuring state's lock, which a parent thread
/// holds during a split or merge.
#[test]
fn hugetlb_counters_do_not_wait_for_the_restructuring_lock() {
    let pool = match crate::PoolGuard::grow(crate::HUGE_2M, 2) {
        Ok(p) => p,
        Err(e) => {
            println!("skipped: no HugeTLB pages to reserve: {e}");
            return;
        }
    };
    let mem = GuestMemfd::builder(2 * crate::HUGE_2M)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(crate::BackingChoice::HugeTlb(crate::HUGE_2M))
        .create()
        .expect("create");
    fork_while_held(
        &mem,
        |e, held| {
            let _s = e.huge().map(|h| h.state());
            held();
        },
        || {
            let checks = [
                mem.hugetlb_accounting().is_some(),
                mem.attr(0).map_err(|e| e.errno()).err() == Some(libc::EPERM),
            ];
            checks
                .iter()
                .position(|ok| !ok)
                .map_or(0, |i| i32::try_from(i).unwrap_or(99) + 1)
        },
        "HugeTLB restructuring lock held",
    );
    drop(mem);
    drop(pool);
}
