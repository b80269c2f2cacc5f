//! `GuestMemfd::add_device_listener`: the snapshot a device layer starts from and the notices
//! it gets after it (conversions, poison, punch-hole), its veto, and where it is refused.

use std::sync::{Arc, Mutex};

use gmem::{
    Attr, AttrRun, Conversion, ConversionListener, DeviceListener, Errno, FallocMode, Flags,
    GuestMemfd, Veto,
};

const P: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Notice {
    Prepare(u64, u64, Attr),
    Commit(u64, u64, Attr),
    Abort(u64, u64, Attr),
    Poisoned(u64),
    Unpoisoned(u64, u64),
}

/// Records every notice; vetoes conversions to private that touch `veto` (a byte offset).
#[derive(Default)]
struct Recorder {
    notices: Mutex<Vec<Notice>>,
    veto: Option<u64>,
}

impl Recorder {
    fn push(&self, n: Notice) {
        self.notices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(n);
    }

    fn take(&self) -> Vec<Notice> {
        std::mem::take(&mut *self.notices.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl ConversionListener for Recorder {
    fn prepare(&self, c: &Conversion) -> Result<(), Veto> {
        self.push(Notice::Prepare(c.offset, c.len, c.to));
        match self.veto {
            Some(v) if c.to == Attr::Private && (c.offset..c.offset + c.len).contains(&v) => {
                Err(Veto {
                    offset: v,
                    reason: "held by the test".into(),
                })
            }
            _ => Ok(()),
        }
    }

    fn commit(&self, c: &Conversion) {
        self.push(Notice::Commit(c.offset, c.len, c.to));
    }

    fn abort(&self, c: &Conversion) {
        self.push(Notice::Abort(c.offset, c.len, c.to));
    }
}

impl DeviceListener for Recorder {
    fn poisoned(&self, offset: u64) {
        self.push(Notice::Poisoned(offset));
    }

    fn unpoisoned(&self, offset: u64, len: u64) {
        self.push(Notice::Unpoisoned(offset, len));
    }
}

fn file(pages: u64) -> GuestMemfd {
    GuestMemfd::builder(pages * P)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .create()
        .expect("create")
}

fn run(offset: u64, len: u64, attr: Attr) -> AttrRun {
    AttrRun { offset, len, attr }
}

#[test]
fn device_listener_snapshot_is_the_state_at_registration() {
    let f = file(8);
    f.convert(P, 2 * P, Attr::Private).expect("to private");
    f.inject_poison(5 * P + 12).expect("poison");
    let rec = Arc::new(Recorder::default());
    let (_id, snap) = f.add_device_listener(rec.clone()).expect("register");
    assert_eq!(
        snap.runs,
        vec![
            run(0, P, Attr::Shared),
            run(P, 2 * P, Attr::Private),
            run(3 * P, 5 * P, Attr::Shared),
        ]
    );
    assert_eq!(snap.poisoned, vec![5 * P]);
    // Nothing that happened before the snapshot is told again.
    assert_eq!(rec.take(), vec![]);
}

#[test]
fn device_listener_hears_conversions_poison_and_punch_in_order() {
    let f = file(8);
    let rec = Arc::new(Recorder::default());
    let (_id, _) = f.add_device_listener(rec.clone()).expect("register");
    f.convert(2 * P, P, Attr::Private).expect("to private");
    f.inject_poison(4 * P).expect("poison");
    // Already poisoned: nothing new to tell.
    f.inject_poison(4 * P + 1).expect("poison again");
    f.convert(2 * P, P, Attr::Shared).expect("to shared");
    f.fallocate(FallocMode::PUNCH_HOLE, 4 * P, 2 * P)
        .expect("punch");
    // A punch-hole that clears no poison record tells nothing.
    f.fallocate(FallocMode::PUNCH_HOLE, 6 * P, P)
        .expect("punch");
    assert_eq!(
        rec.take(),
        vec![
            Notice::Prepare(2 * P, P, Attr::Private),
            Notice::Commit(2 * P, P, Attr::Private),
            Notice::Poisoned(4 * P),
            Notice::Prepare(2 * P, P, Attr::Shared),
            Notice::Commit(2 * P, P, Attr::Shared),
            Notice::Unpoisoned(4 * P, 2 * P),
        ]
    );
    assert!(!f.is_poisoned(4 * P).expect("poison record"));
}

#[test]
fn device_listener_veto_fails_the_conversion_with_eagain_and_changes_nothing() {
    let f = file(4);
    let rec = Arc::new(Recorder {
        veto: Some(3 * P),
        ..Recorder::default()
    });
    let (_id, _) = f.add_device_listener(rec.clone()).expect("register");
    let e = f.convert(2 * P, 2 * P, Attr::Private).expect_err("vetoed");
    assert_eq!((e.errno(), e.error_offset()), (libc::EAGAIN, Some(3 * P)));
    assert_eq!(
        f.runs(0, 4 * P).expect("runs"),
        vec![run(0, 4 * P, Attr::Shared)]
    );
    assert_eq!(
        rec.take(),
        vec![Notice::Prepare(2 * P, 2 * P, Attr::Private)]
    );
    // The pages the listener does not hold convert.
    f.convert(2 * P, P, Attr::Private).expect("to private");
}

#[test]
fn device_listener_removed_hears_nothing_and_ids_of_other_files_remove_nothing() {
    let a = file(4);
    let b = file(4);
    let ra = Arc::new(Recorder::default());
    let rb = Arc::new(Recorder::default());
    let (ia, _) = a.add_device_listener(ra.clone()).expect("register on a");
    let (ib, _) = b.add_device_listener(rb.clone()).expect("register on b");
    assert!(!b.remove_device_listener(ia), "a's id on b");
    b.inject_poison(0).expect("poison b");
    assert_eq!(rb.take(), vec![Notice::Poisoned(0)], "b's listener stays");
    assert!(a.remove_device_listener(ia));
    assert!(!a.remove_device_listener(ia), "removed twice");
    a.convert(0, P, Attr::Private).expect("to private");
    a.inject_poison(P).expect("poison a");
    assert_eq!(ra.take(), vec![]);
    assert!(b.remove_device_listener(ib));
}

#[test]
fn device_listener_on_a_follower_hears_the_owners_steps_and_its_veto_refuses_them() {
    let owner = file(4);
    owner.convert(3 * P, P, Attr::Private).expect("page 3");
    let follower = GuestMemfd::attach(owner.share_with_process().expect("share")).expect("attach");
    let rec = Arc::new(Recorder {
        veto: Some(P),
        ..Recorder::default()
    });
    let (id, snap) = follower
        .add_device_listener(rec.clone())
        .expect("register on the follower");
    assert_eq!(
        snap.runs,
        vec![
            AttrRun {
                offset: 0,
                len: 3 * P,
                attr: Attr::Shared
            },
            AttrRun {
                offset: 3 * P,
                len: P,
                attr: Attr::Private
            },
        ]
    );
    // The follower's listener holds page 1: the owner's conversion is refused there, and
    // nothing changed anywhere.
    let e = owner
        .convert(0, 2 * P, Attr::Private)
        .expect_err("vetoed in the follower");
    assert_eq!((e.errno(), e.error_offset()), (libc::EAGAIN, Some(P)));
    assert_eq!(
        rec.take(),
        vec![Notice::Prepare(0, 2 * P, Attr::Private)],
        "the veto changes nothing, so there is nothing to abort"
    );
    assert_eq!(owner.attr(0).expect("attr"), Attr::Shared);
    assert_eq!(follower.attr(0).expect("attr"), Attr::Shared);
    // Pages it does not hold convert, and it hears the commit.
    owner.convert(2 * P, P, Attr::Private).expect("page 2");
    assert_eq!(
        rec.take(),
        vec![
            Notice::Prepare(2 * P, P, Attr::Private),
            Notice::Commit(2 * P, P, Attr::Private)
        ]
    );
    owner.convert(2 * P, 2 * P, Attr::Shared).expect("back");
    assert_eq!(
        rec.take(),
        vec![
            Notice::Prepare(2 * P, 2 * P, Attr::Shared),
            Notice::Commit(2 * P, 2 * P, Attr::Shared)
        ]
    );
    // Poison and its clearing reach it too.
    owner.inject_poison(0).expect("poison");
    owner
        .fallocate(FallocMode::PUNCH_HOLE, 0, P)
        .expect("punch clears poison");
    assert_eq!(
        rec.take(),
        vec![Notice::Poisoned(0), Notice::Unpoisoned(0, P)]
    );
    assert!(follower.remove_device_listener(id));
}

/// Replays a snapshot and the commits after it into a page map.
#[derive(Default)]
struct Replay {
    pages: Mutex<Vec<Attr>>,
}

impl ConversionListener for Replay {
    fn prepare(&self, _: &Conversion) -> Result<(), Veto> {
        Ok(())
    }

    fn commit(&self, c: &Conversion) {
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        for p in c.offset / P..(c.offset + c.len) / P {
            if let Some(a) = pages.get_mut(usize::try_from(p).unwrap_or(usize::MAX)) {
                *a = c.to;
            }
        }
    }
}

impl DeviceListener for Replay {
    fn poisoned(&self, _: u64) {}
    fn unpoisoned(&self, _: u64, _: u64) {}
}

#[test]
fn device_listener_snapshot_and_later_commits_are_the_file_under_concurrent_conversions() {
    const PAGES: u64 = 64;
    let f = file(PAGES);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let converter = {
        let (f, stop) = (f.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15_u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let page = x % PAGES;
                let to = if x & (1 << 40) == 0 {
                    Attr::Private
                } else {
                    Attr::Shared
                };
                f.convert(page * P, P, to).expect("convert");
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(20));
    let replay = Arc::new(Replay::default());
    {
        // The device layer's pattern: its own lock, which its commits take, held across the
        // registration and the replay of the snapshot.
        let mut pages = replay.pages.lock().unwrap_or_else(|e| e.into_inner());
        let (_id, snap) = f.add_device_listener(replay.clone()).expect("register");
        for r in snap.runs {
            pages.extend((0..r.len / P).map(|_| r.attr));
        }
        assert_eq!(pages.len(), 64);
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    converter.join().expect("converter");
    let pages = replay.pages.lock().unwrap_or_else(|e| e.into_inner());
    for (i, a) in pages.iter().enumerate() {
        let off = u64::try_from(i).expect("page") * P;
        assert_eq!(*a, f.attr(off).expect("attr"), "page {i}");
    }
}
