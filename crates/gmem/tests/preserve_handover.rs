//! The two-phase hand-over, in process (a thread plays the new owner) and with an inherited-
//! descriptor child process: contents, attributes, pins and bindings survive; the freeze
//! refuses allocation and holds conversions; failures leave the old owner in charge.
// Test patterns truncate counters to bytes on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use gmem::preserve::{
    crc32c, exec_replacing, hand_over, receive, receive_inherited, spawn_with_inherited, Binding,
    FileOffer, HandoverError, Options, Phase, Step, VmLink,
};
use gmem::Errno;
use gmem::{Attr, FallocMode, Flags, GuestMemfd};
use gmem_conformance::kref;
use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};

const P: u64 = 4096;
const PAGES: u64 = 256;

fn pair() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .unwrap()
}

/// A file with a known pattern in every page and alternating runs of several lengths.
fn build() -> GuestMemfd {
    let mem = GuestMemfd::create(PAGES * P, Flags::MMAP | Flags::INIT_SHARED).unwrap();
    let g = mem.guest().expect("guest view");
    for p in 0..PAGES {
        let fill = vec![(p as u8).wrapping_mul(31).wrapping_add(7); P as usize];
        g.write(p * P, &fill).unwrap();
        g.write(p * P, &p.to_le_bytes()).unwrap();
    }
    let mut p = 1;
    while p < PAGES {
        let len = (p % 5) + 1;
        mem.convert(p * P, len.min(PAGES - p) * P, Attr::Private)
            .unwrap();
        p += len + (p % 3) + 1;
    }
    mem
}

fn digest(mem: &GuestMemfd) -> (u32, Vec<(u64, u64, Attr)>) {
    let g = mem.guest().expect("guest view");
    let mut page = vec![0u8; P as usize];
    let mut crcs = Vec::new();
    for p in 0..mem.size() / P {
        g.read(p * P, &mut page).unwrap();
        crcs.extend_from_slice(&crc32c(&page).to_le_bytes());
    }
    let runs = mem
        .runs(0, mem.size())
        .unwrap()
        .into_iter()
        .map(|r| (r.offset, r.len, r.attr))
        .collect();
    (crc32c(&crcs), runs)
}

fn first_shared(mem: &GuestMemfd) -> u64 {
    mem.runs(0, mem.size())
        .unwrap()
        .into_iter()
        .find(|r| r.attr == Attr::Shared && r.offset > 0)
        .unwrap()
        .offset
}

#[test]
fn handover_keeps_contents_attributes_pins_and_bindings() {
    let mem = build();
    let before = digest(&mem);
    assert!(before.1.len() > 60, "{} runs", before.1.len());
    let pin_at = first_shared(&mem);
    let pin = mem.pin(pin_at, P).unwrap();
    let offer = FileOffer::new(&mem)
        .binding(Binding {
            slot: 1,
            offset: 0,
            gpa: 0x1_0000_0000,
            size: PAGES * P,
        })
        .pin(&pin, 77);
    let (a, b) = pair();
    let taker = std::thread::spawn(move || receive(b.as_fd(), &Options::default()));
    let done = hand_over(a.as_fd(), &[offer], &Options::default()).unwrap();
    assert!(done.confirmed);
    assert!(done.state_len > 48);
    let got = taker.join().unwrap().unwrap();
    assert_eq!(got.generation, 1);
    assert!(!got.old_owner_gone);
    assert!(
        got.wait_old_owner_released(Duration::from_secs(10)),
        "RELEASED"
    );
    let f = &got.files[0];
    // Same file (zero copy), same bytes, same attributes.
    assert_eq!(f.mem.id().unwrap(), mem.id().unwrap());
    assert_eq!(digest(&f.mem), before);
    assert_eq!(
        f.state.bindings,
        vec![Binding {
            slot: 1,
            offset: 0,
            gpa: 0x1_0000_0000,
            size: PAGES * P
        }]
    );
    assert_eq!(f.state.vm, VmLink::None);
    // The pin is held again in the new owner.
    assert_eq!(f.pins.len(), 1);
    assert_eq!(
        (f.pins[0].0, f.pins[0].1.offset(), f.pins[0].1.len()),
        (77, pin_at, P)
    );
    let e = f.mem.convert(pin_at, P, Attr::Private).unwrap_err();
    assert_eq!((e.errno(), e.error_offset()), (libc::EAGAIN, Some(pin_at)));
    // Private pages stay closed to the host in the new owner.
    let private = before.1.iter().find(|r| r.2 == Attr::Private).unwrap().0;
    assert_eq!(
        f.mem.read_at(private, &mut [0u8; 8]).unwrap_err().errno(),
        libc::EFAULT
    );
    // The old handles no longer own the file.
    assert_eq!(
        mem.convert(0, P, Attr::Private).unwrap_err().errno(),
        libc::EPERM
    );
    let e = mem.fallocate(FallocMode::KEEP_SIZE, 0, P).unwrap_err();
    assert_eq!(e.errno(), libc::EPERM);
    // The new owner converts and allocates.
    f.mem.convert(0, P, Attr::Private).unwrap();
    f.mem.fallocate(FallocMode::KEEP_SIZE, 0, P).unwrap();
    assert_eq!(f.mem.attr(0).unwrap(), Attr::Private);
    drop(pin);
}

#[test]
fn handover_carries_numa_policy_and_poison() {
    let mem = build();
    mem.set_numa_policy(&gmem::NumaPolicy::Bind(vec![0]))
        .unwrap();
    let shared = first_shared(&mem);
    mem.inject_poison(shared).unwrap();
    mem.inject_poison(0).unwrap();
    let (a, b) = pair();
    let t = std::thread::spawn(move || receive(b.as_fd(), &Options::default()));
    hand_over(a.as_fd(), &[FileOffer::new(&mem)], &Options::default()).unwrap();
    let got = t.join().unwrap().unwrap();
    let f = &got.files[0];
    assert_eq!(f.state.poison, vec![0, shared]);
    assert_eq!(
        f.mem.poisoned_pages().expect("poisoned pages"),
        vec![0, shared]
    );
    assert!(f.mem.is_poisoned(shared).expect("poison record"));
    assert!(f.mem.read_at(shared, &mut [0u8; 8]).is_err());
    assert_eq!(f.state.numa.mode, gmem::preserve::NumaMode::Bind);
    assert_eq!(
        f.mem.numa_policy().unwrap(),
        gmem::NumaPolicy::Bind(vec![0])
    );
}

fn page_crcs(mem: &GuestMemfd) -> Vec<u32> {
    let g = mem.guest().expect("guest view");
    let mut page = vec![0u8; P as usize];
    (0..mem.size() / P)
        .map(|p| {
            g.read(p * P, &mut page).unwrap();
            crc32c(&page)
        })
        .collect()
}

#[test]
fn hugetlb_handover_keeps_split_pages_and_pending_merges() {
    const M2: u64 = gmem::HUGE_2M;
    let Ok(_pool) = gmem::PoolGuard::grow(M2, 3) else {
        eprintln!("skipped: cannot reserve three 2 MiB huge pages");
        return;
    };
    let mem = GuestMemfd::builder(3 * M2)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(gmem::BackingChoice::HugeTlb(M2))
        .create()
        .unwrap();
    let g = mem.guest().expect("guest view");
    for p in 0..3 * M2 / P {
        g.write(p * P, &[(p % 251) as u8 + 1; 64]).unwrap();
    }
    // Huge page 1 split (one private page); huge page 2 uniform again but held by a pin on
    // one of its pieces, so it waits to merge.
    mem.convert(M2 + 5 * P, P, Attr::Private).unwrap();
    mem.convert(2 * M2 + 7 * P, P, Attr::Private).unwrap();
    let pin = mem.pin(2 * M2, P).unwrap();
    mem.convert(2 * M2 + 7 * P, P, Attr::Shared).unwrap();
    let acct = mem.hugetlb_accounting().unwrap();
    assert_eq!((acct.split_pages(), acct.waiting_to_merge()), (2, 1));
    let before = digest(&mem);
    let view = mem.map(0, 3 * M2).unwrap();
    let (a, b) = pair();
    let t = std::thread::spawn(move || receive(b.as_fd(), &Options::default()));
    let offer = FileOffer::new(&mem).pin(&pin, 1);
    hand_over(a.as_fd(), &[offer], &Options::default()).unwrap();
    let mut got = t.join().unwrap().unwrap();
    assert!(
        got.wait_old_owner_released(Duration::from_secs(10)),
        "RELEASED"
    );
    // The old owner's view is one hole now: SIGBUS everywhere, as its account says (a
    // whole huge page, a split one's shared and private pieces, one waiting to merge).
    for at in [0, M2, M2 + 5 * P, 2 * M2 + 7 * P] {
        assert_eq!(
            view.fault_at(at as usize),
            Some(gmem::HostFault::Bus),
            "at {at:#x}"
        );
        assert_eq!(
            gmem_conformance::touch::read_byte(&view, at).map_err(|f| (f.signo, f.code)),
            Err((libc::SIGBUS, libc::BUS_ADRERR)),
            "old view touched at {at:#x}"
        );
    }
    let f = got.files.remove(0);
    use gmem::preserve::{RestructureKind, Restructured};
    assert_eq!(
        f.state.restructure,
        vec![
            Restructured {
                offset: M2,
                len: M2,
                kind: RestructureKind::Split
            },
            Restructured {
                offset: 2 * M2,
                len: M2,
                kind: RestructureKind::PendingMerge
            },
        ]
    );
    assert_eq!(f.mem.backing_kind(), gmem::BackingKind::HugeTlb(M2));
    assert_eq!(digest(&f.mem), before);
    let nacct = f.mem.hugetlb_accounting().unwrap();
    assert_eq!((nacct.split_pages(), nacct.waiting_to_merge()), (2, 1));
    // The old owner lets go of everything: nothing merges there any more.
    drop(pin);
    assert_eq!(acct.split_pages(), 2);
    drop(mem);
    assert_eq!(digest(&f.mem), before);
    // The new owner's re-established pin is the last one: dropping it merges huge page 2.
    let crcs = page_crcs(&f.mem);
    drop(f.pins);
    assert_eq!((nacct.split_pages(), nacct.waiting_to_merge()), (1, 0));
    // Converting the private page back merges huge page 1; contents stay.
    f.mem.convert(M2 + 5 * P, P, Attr::Shared).unwrap();
    assert_eq!(nacct.split_pages(), 0);
    assert_eq!(page_crcs(&f.mem), crcs);
    assert_eq!(f.mem.run_count().expect("run count"), 1);
}

#[test]
fn new_owner_refusing_the_state_leaves_the_old_owner_in_charge() {
    let mem = build();
    let before = digest(&mem);
    let private = before.1.iter().find(|r| r.2 == Attr::Private).unwrap().0;
    // A pin record on a private page: well formed, but the new owner cannot take it.
    let mut offer = FileOffer::new(&mem);
    offer.pins.push(gmem::preserve::PinRecord {
        offset: private,
        len: P,
        tag: 3,
    });
    let (a, b) = pair();
    let t = std::thread::spawn(move || receive(b.as_fd(), &Options::default()));
    let e = hand_over(a.as_fd(), &[offer], &Options::default()).unwrap_err();
    assert!(
        matches!(
            e,
            HandoverError::Rejected {
                errno: libc::EFAULT
            }
        ),
        "{e:?}"
    );
    let e = t.join().unwrap().unwrap_err();
    assert_eq!(e.errno(), libc::EFAULT, "{e:?}");
    assert_eq!(digest(&mem), before);
    mem.convert(0, P, Attr::Private).unwrap();
    mem.fallocate(FallocMode::KEEP_SIZE, 0, P).unwrap();
}

#[test]
fn handover_twice_counts_generations() {
    let mem = build();
    let before = digest(&mem);
    let (a, b) = pair();
    let t = std::thread::spawn(move || receive(b.as_fd(), &Options::default()));
    hand_over(a.as_fd(), &[FileOffer::new(&mem)], &Options::default()).unwrap();
    let first = t.join().unwrap().unwrap();
    let (a, b) = pair();
    let t = std::thread::spawn(move || receive(b.as_fd(), &Options::default()));
    let opts = Options {
        generation: first.generation + 1,
        ..Options::default()
    };
    hand_over(a.as_fd(), &[FileOffer::new(&first.files[0].mem)], &opts).unwrap();
    let second = t.join().unwrap().unwrap();
    assert_eq!(second.generation, 2);
    assert_eq!(digest(&second.files[0].mem), before);
}

#[test]
fn frozen_file_refuses_allocation_and_holds_conversions_until_thawed() {
    let mem = build();
    let shared = first_shared(&mem);
    let (a, b) = pair();
    let (tx, rx) = mpsc::channel();
    let m2 = mem.clone();
    let tx = std::sync::Mutex::new(tx);
    let hook = move |s: Step| {
        let tx = tx.lock().unwrap().clone();
        if s == Step::OfferSent {
            // While frozen: allocation and punch-hole are EPERM, conversions wait.
            let e = m2.fallocate(FallocMode::KEEP_SIZE, 0, P).unwrap_err();
            let p = m2.fallocate(FallocMode::PUNCH_HOLE, 0, P).unwrap_err();
            let m3 = m2.clone();
            let tx2 = tx.clone();
            std::thread::spawn(move || {
                let r = m3.convert(shared, P, Attr::Private);
                tx2.send(("converted", r.map_err(|e| e.errno()).err().unwrap_or(0)))
                    .unwrap();
            });
            std::thread::sleep(Duration::from_millis(100));
            let still = m2.attr(shared).unwrap() == Attr::Shared;
            tx.send(("fallocate", e.errno())).unwrap();
            tx.send(("punch", p.errno())).unwrap();
            tx.send(("still shared while frozen", i32::from(still)))
                .unwrap();
        }
    };
    // The "new owner" reads the offer and goes away without answering.
    let taker = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        rustix::net::recv(&b, &mut buf, rustix::net::RecvFlags::empty()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(b);
    });
    let opts = Options {
        on_step: Some(Arc::new(hook)),
        ..Options::default()
    };
    let err = hand_over(a.as_fd(), &[FileOffer::new(&mem)], &opts).unwrap_err();
    assert!(
        matches!(
            err,
            HandoverError::PeerGone {
                step: Step::OfferSent
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.errno(), libc::ECONNRESET);
    taker.join().unwrap();
    assert_eq!(rx.recv().unwrap(), ("fallocate", libc::EPERM));
    assert_eq!(rx.recv().unwrap(), ("punch", libc::EPERM));
    assert_eq!(rx.recv().unwrap(), ("still shared while frozen", 1));
    // The conversion went through only after the thaw.
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        ("converted", 0)
    );
    assert_eq!(mem.attr(shared).unwrap(), Attr::Private);
    mem.fallocate(FallocMode::KEEP_SIZE, 0, P).unwrap();
}

#[test]
fn conversion_waiting_on_a_freeze_fails_eperm_once_handed_over() {
    let mem = build();
    let shared = first_shared(&mem);
    let (a, b) = pair();
    let (tx, rx) = mpsc::channel();
    let m2 = mem.clone();
    let tx = std::sync::Mutex::new(tx);
    let hook = move |s: Step| {
        let tx = tx.lock().unwrap().clone();
        if s == Step::OfferSent {
            let m3 = m2.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                tx.send(m3.convert(shared, P, Attr::Private).unwrap_err().errno())
                    .unwrap()
            });
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let t = std::thread::spawn(move || receive(b.as_fd(), &Options::default()));
    let opts = Options {
        on_step: Some(Arc::new(hook)),
        ..Options::default()
    };
    hand_over(a.as_fd(), &[FileOffer::new(&mem)], &opts).unwrap();
    let got = t.join().unwrap().unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        libc::EPERM
    );
    assert_eq!(got.files[0].mem.attr(shared).unwrap(), Attr::Shared);
}

#[test]
fn garbage_reply_or_silence_leaves_the_old_owner_in_charge() {
    let mem = build();
    let before = digest(&mem);
    // A reply that is not ACCEPT.
    let (a, b) = pair();
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        rustix::net::recv(&b, &mut buf, rustix::net::RecvFlags::empty()).unwrap();
        rustix::net::send(&b, &[0xa5; 32], rustix::net::SendFlags::empty()).unwrap();
        b
    });
    let e = hand_over(a.as_fd(), &[FileOffer::new(&mem)], &Options::default()).unwrap_err();
    assert_eq!(e.errno(), libc::EPROTO, "{e:?}");
    drop(t.join().unwrap());
    // No reply at all.
    let (a, b) = pair();
    let opts = Options {
        timeout: Duration::from_millis(200),
        ..Options::default()
    };
    let e = hand_over(a.as_fd(), &[FileOffer::new(&mem)], &opts).unwrap_err();
    assert!(
        matches!(
            e,
            HandoverError::Timeout {
                step: Step::OfferSent
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.errno(), libc::ETIMEDOUT);
    drop(b);
    // Still the owner, nothing changed.
    assert_eq!(digest(&mem), before);
    mem.convert(0, P, Attr::Private).unwrap();
    mem.convert(0, P, Attr::Shared).unwrap();
    mem.fallocate(FallocMode::KEEP_SIZE, 0, P).unwrap();
}

#[test]
fn files_that_cannot_be_handed_over() {
    let mem = build();
    let (a, _b) = pair();
    let e = hand_over(
        a.as_fd(),
        &[FileOffer::new(&mem), FileOffer::new(&mem)],
        &Options::default(),
    )
    .unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY, "{e:?}");
    let e = hand_over(a.as_fd(), &[], &Options::default()).unwrap_err();
    assert_eq!(e.errno(), libc::EPROTO);
    // A follower of another owner.
    let sock = mem.share_with_process().unwrap();
    let follower = GuestMemfd::attach(sock).unwrap();
    // The owner of a follower: the follower would not follow the new owner.
    let e = hand_over(a.as_fd(), &[FileOffer::new(&mem)], &Options::default()).unwrap_err();
    assert!(matches!(e, HandoverError::Busy { file: 0, .. }), "{e:?}");
    let e = hand_over(a.as_fd(), &[FileOffer::new(&follower)], &Options::default()).unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY);
    // Nothing stayed frozen.
    mem.fallocate(FallocMode::KEEP_SIZE, 0, P).unwrap();
    mem.convert(0, P, Attr::Private).unwrap();
}

#[test]
fn several_files_in_one_handover() {
    let a_mem = build();
    let b_mem = GuestMemfd::create(16 * P, Flags::MMAP).unwrap();
    b_mem
        .guest()
        .expect("guest view")
        .write(5 * P, b"private contents")
        .unwrap();
    let a_digest = digest(&a_mem);
    let (a, b) = pair();
    let t = std::thread::spawn(move || receive(b.as_fd(), &Options::default()));
    hand_over(
        a.as_fd(),
        &[FileOffer::new(&a_mem), FileOffer::new(&b_mem)],
        &Options::default(),
    )
    .unwrap();
    let got = t.join().unwrap().unwrap();
    assert_eq!(got.files.len(), 2);
    assert_eq!(digest(&got.files[0].mem), a_digest);
    let nb = &got.files[1].mem;
    assert_eq!(nb.flags(), Flags::MMAP);
    assert_eq!(nb.run_count().expect("run count"), 1);
    assert_eq!(nb.attr(0).unwrap(), Attr::Private);
    let mut buf = [0u8; 16];
    nb.guest()
        .expect("guest view")
        .read(5 * P, &mut buf)
        .unwrap();
    assert_eq!(&buf, b"private contents");
}

/// Child entry for `inherited_descriptors_spawn_mode`: does nothing unless started for a
/// hand-over.
#[test]
fn preserve_exec_child() {
    if std::env::var("GMEM_PRESERVE_EXEC_CHILD").is_err() {
        return;
    }
    // SAFETY: the descriptors named in GMEM_HANDOVER were inherited and nothing owns them.
    let got = unsafe { receive_inherited(&Options::default()) }
        .unwrap()
        .unwrap();
    let (crc, runs) = digest(&got.files[0].mem);
    println!("CHILD digest={crc:08x} runs={}", runs.len());
}

#[test]
fn inherited_descriptors_spawn_mode() {
    let mem = build();
    let (crc, runs) = digest(&mem);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "preserve_exec_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("GMEM_PRESERVE_EXEC_CHILD", "1")
    .stdout(std::process::Stdio::piped());
    let spawned =
        spawn_with_inherited(&[FileOffer::new(&mem)], &mut cmd, &Options::default()).unwrap();
    let done = spawned.outcome.unwrap();
    assert!(done.confirmed);
    let out = spawned.child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("CHILD digest={crc:08x} runs={}", runs.len())),
        "{text}"
    );
    assert_eq!(
        mem.convert(0, P, Attr::Private).unwrap_err().errno(),
        libc::EPERM
    );
    assert_eq!(gmem::preserve::Phase::Released, Phase::Released);
}

/// HugeTLB files travel with their pieces file: the descriptors outnumber the files offered,
/// and the environment says how many files there are.
#[test]
fn inherited_descriptors_spawn_mode_hugetlb_with_a_split_page() {
    const M2: u64 = gmem::HUGE_2M;
    let Ok(_pool) = gmem::PoolGuard::grow(M2, 2) else {
        eprintln!("skipped: cannot reserve two 2 MiB huge pages");
        return;
    };
    let mem = GuestMemfd::builder(2 * M2)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(gmem::BackingChoice::HugeTlb(M2))
        .create()
        .unwrap();
    let g = mem.guest().expect("guest view");
    for p in 0..2 * M2 / P {
        g.write(p * P, &[(p % 251) as u8 + 1; 64]).unwrap();
    }
    mem.convert(M2 + 3 * P, P, Attr::Private).unwrap();
    let (crc, runs) = digest(&mem);
    assert_eq!(runs.len(), 3);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "preserve_exec_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("GMEM_PRESERVE_EXEC_CHILD", "1")
    .stdout(std::process::Stdio::piped());
    let spawned =
        spawn_with_inherited(&[FileOffer::new(&mem)], &mut cmd, &Options::default()).unwrap();
    assert!(spawned.outcome.unwrap().confirmed);
    let out = spawned.child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("CHILD digest={crc:08x} runs=3")),
        "{text}"
    );
}

/// Child entry for `exec_replacing_hands_over_to_the_new_image`: the old image builds the
/// file and replaces itself; the new image (same process) receives it.
#[test]
fn preserve_exec_replace_child() {
    match std::env::var("GMEM_PRESERVE_REPLACE").as_deref() {
        Ok("old") => {
            let mem = build();
            let (crc, runs) = digest(&mem);
            println!("BEFORE digest={crc:08x} runs={}", runs.len());
            let mut cmd = Command::new(std::env::current_exe().unwrap());
            cmd.args([
                "--exact",
                "preserve_exec_replace_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("GMEM_PRESERVE_REPLACE", "new");
            let e = exec_replacing(&[FileOffer::new(&mem)], &mut cmd, &Options::default());
            panic!("exec failed: {e}");
        }
        Ok("new") => {
            // SAFETY: the descriptors named in GMEM_HANDOVER were inherited across exec.
            let got = unsafe { receive_inherited(&Options::default()) }
                .unwrap()
                .unwrap();
            assert!(!got.old_owner_gone);
            let (crc, runs) = digest(&got.files[0].mem);
            got.files[0].mem.convert(0, P, Attr::Private).unwrap();
            println!("AFTER digest={crc:08x} runs={}", runs.len());
        }
        _ => {}
    }
}

#[test]
fn exec_replacing_hands_over_to_the_new_image() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "preserve_exec_replace_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("GMEM_PRESERVE_REPLACE", "old")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let before = text
        .split("BEFORE ")
        .nth(1)
        .and_then(|t| t.lines().next())
        .expect("BEFORE");
    let after = text
        .split("AFTER ")
        .nth(1)
        .and_then(|t| t.lines().next())
        .expect("AFTER");
    assert_eq!(before, after);
}

#[test]
fn failed_exec_leaves_the_old_owner_in_charge() {
    let mem = build();
    let before = digest(&mem);
    let mut cmd = Command::new("/nonexistent/gmem-new-owner");
    let e = exec_replacing(&[FileOffer::new(&mem)], &mut cmd, &Options::default());
    assert_eq!(e.errno(), libc::ENOENT, "{e}");
    assert_eq!(digest(&mem), before);
    mem.convert(0, P, Attr::Private).unwrap();
    mem.fallocate(FallocMode::KEEP_SIZE, 0, P).unwrap();
    // The descriptors are close-on-exec again.
    let flags = rustix::io::fcntl_getfd(mem.as_fd()).unwrap();
    assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
}

#[test]
fn receive_inherited_without_environment_is_none() {
    if std::env::var("GMEM_HANDOVER").is_ok() {
        return;
    }
    // SAFETY: GMEM_HANDOVER is not set, so no descriptor is adopted.
    assert!(unsafe { receive_inherited(&Options::default()) }
        .unwrap()
        .is_none());
}

/// Forwards one SEQPACKET message with its descriptors from `from` to `to`, letting `edit`
/// swap descriptors first. False at end of file.
fn forward(
    from: &OwnedFd,
    to: &OwnedFd,
    edit: &mut dyn FnMut(Vec<OwnedFd>) -> Vec<OwnedFd>,
) -> bool {
    use rustix::net::{
        recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
        SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
    };
    use std::io::{IoSlice, IoSliceMut};
    use std::mem::MaybeUninit;
    let mut buf = vec![0u8; 1 << 16];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(16))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let Ok(got) = recvmsg(
        from,
        &mut [IoSliceMut::new(&mut buf)],
        &mut anc,
        RecvFlags::CMSG_CLOEXEC,
    ) else {
        return false;
    };
    if got.bytes == 0 {
        return false;
    }
    let mut fds = Vec::new();
    for m in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(r) = m {
            fds.extend(r);
        }
    }
    let fds = edit(fds);
    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(16))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() {
        anc.push(SendAncillaryMessage::ScmRights(&borrowed));
    }
    sendmsg(
        to,
        &[IoSlice::new(&buf[..got.bytes])],
        &mut anc,
        SendFlags::NOSIGNAL,
    )
    .is_ok()
}

/// A memfd of `len` bytes carrying `seals`.
fn memfd_with(len: u64, seals: i32) -> OwnedFd {
    let fd = rustix::fs::memfd_create(
        "hostile",
        rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
    )
    .unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    rustix::fs::fcntl_add_seals(&fd, rustix::fs::SealFlags::from_bits_retain(seals as u32))
        .unwrap();
    fd
}

/// A hostile party between the two owners swaps the offered memory for a memfd that is
/// short, or that could shrink or grow under the new owner's mappings: the new owner refuses
/// it (`EBADF`, naming the file) and the old owner stays in charge, unchanged.
#[test]
fn receive_refuses_memory_that_is_short_or_not_sealed() {
    let size = PAGES * P;
    let grow_shrink = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK;
    for (len, seals, what) in [
        (size / 2, grow_shrink, "short"),
        (size, 0, "unsealed"),
        (size, libc::F_SEAL_GROW, "may shrink"),
        (size, libc::F_SEAL_SHRINK, "may grow"),
    ] {
        let mem = build();
        let before = digest(&mem);
        let (old_end, mitm_old) = pair();
        let (mitm_new, new_end) = pair();
        let relay = std::thread::spawn(move || {
            let mut swap = |mut fds: Vec<OwnedFd>| {
                if fds.len() >= 2 {
                    fds[1] = memfd_with(len, seals);
                }
                fds
            };
            forward(&mitm_old, &mitm_new, &mut swap);
            let mut keep = |fds| fds;
            while forward(&mitm_new, &mitm_old, &mut keep) {}
        });
        let receiver = std::thread::spawn(move || receive(new_end.as_fd(), &Options::default()));
        let offered = hand_over(
            old_end.as_fd(),
            &[FileOffer::new(&mem)],
            &Options::default(),
        );
        let got = receiver.join().unwrap();
        let e = got
            .err()
            .unwrap_or_else(|| panic!("{what}: the new owner accepted it"));
        assert!(matches!(e, HandoverError::Mismatch { .. }), "{what}: {e:?}");
        assert_eq!(e.errno(), libc::EBADF, "{what}");
        assert!(
            offered.is_err(),
            "{what}: the old owner believes it handed over"
        );
        drop(old_end);
        relay.join().unwrap();
        assert_eq!(digest(&mem), before, "{what}: the old owner's file changed");
        mem.convert(0, P, Attr::Private).unwrap();
        mem.convert(0, P, Attr::Shared).unwrap();
    }
}

/// 100,000 one-page pins over a sparse 16 GiB file (a 2.4 MB state): the new owner takes them
/// all again (the work per pin is one reference per page, bounded by the file's pages), and a
/// state whose pins cover more pages than the file holds is refused before any work.
#[test]
fn many_pins_over_a_sparse_file_are_bounded_work() {
    const PINS: u64 = 100_000;
    let size = 16u64 << 30;
    let mem = GuestMemfd::create(size, Flags::MMAP | Flags::INIT_SHARED).unwrap();
    let stride = size / PINS / P * P;
    let pins: Vec<_> = (0..PINS).map(|i| mem.pin(i * stride, P).unwrap()).collect();
    let offer = pins
        .iter()
        .enumerate()
        .fold(FileOffer::new(&mem), |o, (i, p)| o.pin(p, i as u64));
    let (a, b) = pair();
    let receiver = std::thread::spawn(move || receive(b.as_fd(), &Options::default()));
    hand_over(a.as_fd(), &[offer], &Options::default()).expect("hand over");
    let got = receiver.join().unwrap().expect("receive");
    let f = &got.files[0];
    assert_eq!(f.pins.len(), PINS as usize);
    assert!(
        got.wait_old_owner_released(Duration::from_secs(10)),
        "RELEASED"
    );
    assert!(f
        .pins
        .iter()
        .enumerate()
        .all(|(i, (tag, pin))| *tag == i as u64 && pin.offset() == i as u64 * stride));
    let e = f.mem.convert(stride, P, Attr::Private).unwrap_err();
    assert_eq!((e.errno(), e.error_offset()), (libc::EAGAIN, Some(stride)));
}

/// After a hand-over the old owner reaches nothing: every access path fails with `EPERM`
/// (accessors, new views, pins, the guest view, conversions, allocation, poison, sharing), its
/// old views hold nothing, the pins it listed no longer give a pointer; the new owner's
/// private bytes stay private. A pin the old owner did not list makes the hand-over fail
/// (`EBUSY`, naming its page) and leaves the old owner in charge.
#[test]
fn old_owner_after_handover_reaches_nothing() {
    let mem = build();
    let shared = first_shared(&mem);
    // An unlisted pin: refused, nothing handed over.
    let unlisted = mem.pin(shared, P).unwrap();
    let (a, b) = pair();
    let receiver = std::thread::spawn(move || receive(b.as_fd(), &Options::default()));
    let e = hand_over(a.as_fd(), &[FileOffer::new(&mem)], &Options::default()).unwrap_err();
    assert!(
        matches!(e, HandoverError::UnlistedPin { file: 0, offset } if offset == shared),
        "{e:?}"
    );
    assert_eq!(e.errno(), libc::EBUSY);
    drop(a);
    assert!(receiver.join().unwrap().is_err());
    mem.convert(0, P, Attr::Private).unwrap();
    mem.convert(0, P, Attr::Shared).unwrap();
    drop(unlisted);
    // Now a real hand-over, with a listed pin and a view.
    let view = mem.map(0, mem.size()).unwrap();
    // A view of the last page and one page past the end of the file.
    let tail = mem.map(mem.size() - P, 2 * P).unwrap();
    assert_eq!(tail.fault_at(P as usize), Some(gmem::HostFault::Bus));
    let listed = mem.pin(shared, P).unwrap();
    let (a, b) = pair();
    let receiver = std::thread::spawn(move || receive(b.as_fd(), &Options::default()));
    let offer = FileOffer::new(&mem).pin(&listed, 5);
    hand_over(a.as_fd(), &[offer], &Options::default()).expect("hand over");
    let got = receiver.join().unwrap().expect("receive");
    assert!(
        got.wait_old_owner_released(Duration::from_secs(10)),
        "RELEASED"
    );
    let new = &got.files[0].mem;
    new.guest()
        .unwrap()
        .write(shared + P, b"new owner's")
        .unwrap();
    new.convert(shared, 2 * P, Attr::Private).unwrap_err(); // the pin holds `shared`
    assert_eq!(got.files[0].pins.len(), 1);
    let eperm = |r: Result<(), i32>, what: &str| assert_eq!(r, Err(libc::EPERM), "{what}");
    let mut buf = [0u8; 8];
    eperm(
        mem.read_at(shared, &mut buf).map_err(|e| e.errno()),
        "read_at",
    );
    eperm(
        mem.write_at(shared, &buf).map_err(|e| e.errno()),
        "write_at",
    );
    eperm(mem.map(0, P).map(drop).map_err(|e| e.errno()), "map");
    eperm(mem.pin(shared, P).map(drop).map_err(|e| e.errno()), "pin");
    eperm(mem.guest().map(drop).map_err(|e| e.errno()), "guest");
    eperm(
        mem.convert(0, P, Attr::Private).map_err(|e| e.errno()),
        "convert",
    );
    eperm(
        mem.fallocate(FallocMode::KEEP_SIZE, 0, P)
            .map_err(|e| e.errno()),
        "fallocate",
    );
    eperm(mem.inject_poison(0).map_err(|e| e.errno()), "inject_poison");
    eperm(
        mem.share_with_process().map(drop).map_err(|e| e.errno()),
        "share",
    );
    eperm(
        listed.as_ptr().map(drop).map_err(|e| e.errno()),
        "a listed pin's pointer",
    );
    eperm(
        listed.read(0, &mut buf).map_err(|e| e.errno()),
        "a listed pin's read",
    );
    // Its record of the attributes stopped being the file's: the queries refuse too.
    eperm(mem.attr(shared).map(drop).map_err(|e| e.errno()), "attr");
    eperm(mem.runs(0, P).map(drop).map_err(|e| e.errno()), "runs");
    eperm(
        mem.any_private(0, P).map(drop).map_err(|e| e.errno()),
        "any_private",
    );
    eperm(
        mem.run_count().map(drop).map_err(|e| e.errno()),
        "run_count",
    );
    eperm(
        mem.is_poisoned(0).map(drop).map_err(|e| e.errno()),
        "is_poisoned",
    );
    eperm(
        mem.poisoned_pages().map(drop).map_err(|e| e.errno()),
        "poisoned_pages",
    );
    eperm(
        mem.numa_policy().map(drop).map_err(|e| e.errno()),
        "numa_policy",
    );
    eperm(
        mem.numa_node(shared).map(drop).map_err(|e| e.errno()),
        "numa_node",
    );
    eperm(
        mem.set_numa_policy(&gmem::NumaPolicy::Default)
            .map_err(|e| e.errno()),
        "set_numa_policy",
    );
    // The old view shows nothing: every page of it refuses a kernel read (EFAULT), the page
    // the new owner wrote included, faults at a touch as gmem's account of it says.
    for p in 0..PAGES {
        let at = view.as_ptr().wrapping_add((p * P) as usize);
        let fault = view.fault_at((p * P) as usize);
        assert_eq!(fault, Some(gmem::HostFault::Segv), "old view, page {p}");
        assert_eq!(mem.host_fault(p * P), fault, "old view, page {p}");
        assert_eq!(
            gmem_conformance::touch::read_byte(&view, p * P).map_err(|f| (f.signo, f.code)),
            Err((libc::SIGSEGV, gmem_conformance::touch::SEGV_MAPERR)),
            "old view touched, page {p}"
        );
        assert_eq!(kernel_reads(at), Err(libc::EFAULT), "old view, page {p}");
        if p == 0 {
            // Past the end of the file too: the markers cover the whole revoked view.
            for at in [0, P] {
                assert_eq!(tail.fault_at(at as usize), fault, "tail view at {at:#x}");
                assert_eq!(
                    gmem_conformance::touch::read_byte(&tail, at).map_err(|f| (f.signo, f.code)),
                    Err((libc::SIGSEGV, gmem_conformance::touch::SEGV_MAPERR)),
                    "tail view touched at {at:#x}"
                );
            }
        }
        assert_eq!(
            proc_mem_reads(at),
            Err(libc::EIO),
            "old view by /proc, page {p}"
        );
    }
    // The new owner's view reads its bytes.
    let nv = new.map(0, new.size()).unwrap();
    assert_eq!(
        kernel_reads(nv.as_ptr().wrapping_add(shared as usize)),
        Ok(())
    );
}

/// Whether `/proc/self/mem` reads one byte at `addr` (the path of `ptrace` and debuggers,
/// which reads through `PROT_NONE`): `EIO` when the page is unreachable.
fn proc_mem_reads(addr: *const u8) -> Result<(), i32> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open("/proc/self/mem").unwrap();
    let mut b = [0u8; 1];
    match mem.read_at(&mut b, addr as u64) {
        Ok(1) => Ok(()),
        Ok(_) => Err(0),
        Err(e) => Err(e.raw_os_error().unwrap_or(0)),
    }
}

/// Whether the kernel can read one byte at `addr` (`write(2)` of it into a pipe): `EFAULT`
/// when a touch there would fault. No signal is raised.
fn kernel_reads(addr: *const u8) -> Result<(), i32> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: the kernel checks the address; a bad one is EFAULT, not a fault in this process.
    let n = unsafe { libc::write(fds[1], addr.cast(), 1) };
    let err = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    for fd in fds {
        // SAFETY: closes the pipe this function made.
        unsafe { libc::close(fd) };
    }
    if n == 1 {
        Ok(())
    } else {
        Err(err)
    }
}

/// The new owner owns from `COMMIT` on, but the old owner's views reach the pages that are
/// shared until it has read `DONE` and revoked them, so the new owner makes nothing private
/// before it reads `RELEASED`. With the old owner held at its `DoneReceived` step: its
/// accessors are `EPERM` already, its view still shows the shared page, and the new owner's
/// conversion of that page to private is `EAGAIN` naming it. Once the old owner released,
/// the conversion goes through and the old view refuses a kernel read (`EFAULT`) and a read
/// through `/proc/self/mem` (`EIO`).
#[test]
fn new_owner_makes_nothing_private_until_the_old_owner_released() {
    let mem = build();
    let shared = first_shared(&mem);
    let view = mem.map(0, mem.size()).unwrap();
    let at = view.as_ptr().wrapping_add(shared as usize);
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let opts = Options {
        on_step: Some(Arc::new(move |s| {
            if s == Step::DoneReceived {
                let _ = go_rx.lock().unwrap().recv();
            }
        })),
        ..Options::default()
    };
    let (a, b) = pair();
    let old = mem.clone();
    let old_owner =
        std::thread::spawn(move || hand_over(a.as_fd(), &[FileOffer::new(&old)], &opts).map(drop));
    let got = receive(b.as_fd(), &Options::default()).expect("receive");
    let new = &got.files[0].mem;
    let e = new.convert(shared, P, Attr::Private).unwrap_err();
    assert_eq!((e.errno(), e.error_offset()), (libc::EAGAIN, Some(shared)));
    assert!(!got.old_owner_released());
    let mut buf = [0u8; 8];
    assert_eq!(
        mem.read_at(shared, &mut buf).unwrap_err().errno(),
        libc::EPERM,
        "the old owner's accessor"
    );
    assert_eq!(kernel_reads(at), Ok(()), "the old view of a shared page");
    go_tx.send(()).unwrap();
    old_owner.join().unwrap().expect("hand over");
    assert!(
        got.wait_old_owner_released(Duration::from_secs(10)),
        "RELEASED"
    );
    new.convert(shared, P, Attr::Private).unwrap();
    assert_eq!(
        kernel_reads(at),
        Err(libc::EFAULT),
        "the old view, released"
    );
    assert_eq!(proc_mem_reads(at), Err(libc::EIO), "the old view by /proc");
}

/// Whatever else arrives before `RELEASED` (a datagram that is no message, a message of no
/// known operation) is passed over: the new owner's conversions to private go through once
/// the old owner released, not never.
#[test]
fn noise_before_released_does_not_keep_the_new_owner_from_going_private() {
    let mem = build();
    let shared = first_shared(&mem);
    let (a, b) = pair();
    let noise = a.try_clone().unwrap();
    let opts = Options {
        on_step: Some(Arc::new(move |s| {
            if s == Step::DoneReceived {
                rustix::net::send(&noise, b"junk", rustix::net::SendFlags::empty()).unwrap();
                let mut unknown = [0u8; 32];
                unknown[..4].copy_from_slice(b"GMHO");
                unknown[4..6].copy_from_slice(&2u16.to_le_bytes()); // protocol version
                unknown[6..8].copy_from_slice(&99u16.to_le_bytes()); // no such operation
                rustix::net::send(&noise, &unknown, rustix::net::SendFlags::empty()).unwrap();
            }
        })),
        ..Options::default()
    };
    let old = mem.clone();
    let old_owner =
        std::thread::spawn(move || hand_over(a.as_fd(), &[FileOffer::new(&old)], &opts).map(drop));
    let got = receive(b.as_fd(), &Options::default()).expect("receive");
    old_owner.join().unwrap().expect("hand over");
    assert!(
        got.wait_old_owner_released(Duration::from_secs(10)),
        "RELEASED after the noise"
    );
    got.files[0]
        .mem
        .convert(shared, P, Attr::Private)
        .expect("to private once released");
}

/// A new owner that sends `ACCEPT` and vanishes before `COMMIT`: the old owner had already
/// refused its accessors (the new owner might have owned) and gives them back; its view shows
/// the shared pages, the private ones fault, accessors and conversions work, contents and
/// attributes are as they were.
#[test]
fn new_owner_vanishing_after_accept_gives_the_old_owner_its_views_back() {
    let mem = build();
    let before = digest(&mem);
    let shared = first_shared(&mem);
    let view = mem.map(0, mem.size()).unwrap();
    let (a, b) = pair();
    let fake = std::thread::spawn(move || {
        // Read the offer (its descriptors are closed with it), accept it, then vanish.
        let mut msg = [0u8; 64];
        let got = rustix::net::recv(&b, &mut msg, rustix::net::RecvFlags::empty()).unwrap();
        assert_eq!(got.0, 32, "OFFER message");
        let mut accept = [0u8; 32];
        accept[..4].copy_from_slice(b"GMHO");
        accept[4..6].copy_from_slice(&2u16.to_le_bytes()); // protocol version
        accept[6..8].copy_from_slice(&2u16.to_le_bytes()); // ACCEPT
        accept[12..16].copy_from_slice(&msg[12..16]); // the offer's CRC
        rustix::net::send(&b, &accept, rustix::net::SendFlags::empty()).unwrap();
        drop(b);
    });
    let steps = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = steps.clone();
    let opts = Options {
        on_step: Some(Arc::new(move |s| s2.lock().unwrap().push(s))),
        ..Options::default()
    };
    let e = hand_over(a.as_fd(), &[FileOffer::new(&mem)], &opts).unwrap_err();
    fake.join().unwrap();
    assert!(
        matches!(e, HandoverError::PeerGone { .. }),
        "the new owner is gone: {e:?}"
    );
    assert!(steps.lock().unwrap().contains(&Step::AcceptReceived));
    assert_eq!(digest(&mem), before);
    for r in mem.runs(0, mem.size()).unwrap() {
        let at = view.as_ptr().wrapping_add(r.offset as usize);
        let want = match r.attr {
            Attr::Shared => Ok(()),
            Attr::Private => Err(libc::EFAULT),
        };
        assert_eq!(
            kernel_reads(at),
            want,
            "view at {:#x} ({:?})",
            r.offset,
            r.attr
        );
        let by_proc = want.map_err(|_| libc::EIO);
        assert_eq!(proc_mem_reads(at), by_proc, "/proc at {:#x}", r.offset);
    }
    let mut b = [0u8; 8];
    mem.read_at(shared, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), shared / P);
    mem.convert(shared, P, Attr::Private).unwrap();
    assert_eq!(
        kernel_reads(view.as_ptr().wrapping_add(shared as usize)),
        Err(libc::EFAULT)
    );
    mem.convert(shared, P, Attr::Shared).unwrap();
    assert_eq!(
        kernel_reads(view.as_ptr().wrapping_add(shared as usize)),
        Ok(())
    );
    mem.fallocate(FallocMode::KEEP_SIZE, 0, P).unwrap();
}

/// A page the old owner vmspliced into a pipe before the hand-over: the kernel reference
/// outlives the old owner's views, and the new owner's conversion to private moves the page
/// though no view of the new owner ever showed it, so the pipe yields the shared-time bytes,
/// never the new owner's private ones.
#[test]
fn old_owners_kernel_reference_never_sees_the_new_owners_private_bytes() {
    let mem = build();
    let shared = first_shared(&mem);
    let mut before = vec![0u8; P as usize];
    mem.read_at(shared, &mut before).unwrap();
    let view = mem.map(0, mem.size()).unwrap();
    let rd = kref::splice(view.as_ptr().wrapping_add(shared as usize), P as usize);
    let (a, b) = pair();
    let receiver = std::thread::spawn(move || receive(b.as_fd(), &Options::default()));
    hand_over(a.as_fd(), &[FileOffer::new(&mem)], &Options::default()).expect("hand over");
    let got = receiver.join().unwrap().expect("receive");
    assert!(
        got.wait_old_owner_released(Duration::from_secs(10)),
        "RELEASED"
    );
    let new = &got.files[0].mem;
    new.convert(shared, P, Attr::Private).unwrap();
    new.guest()
        .unwrap()
        .write(shared, &vec![0xa5; P as usize])
        .unwrap();
    let piped = kref::drain(&rd, P as usize);
    assert!(
        piped == before,
        "the pipe's page holds {:#04x}.., not the shared-time bytes {:#04x}..",
        piped[8],
        before[8]
    );
    let mut now = vec![0u8; P as usize];
    new.guest().unwrap().read(shared, &mut now).unwrap();
    assert!(
        now == vec![0xa5; P as usize],
        "the new owner's private page"
    );
}

/// A listener asked by the release (the hand-over's commit notice, sent with the control lock
/// held) may ask gmem how a touch of a view faults now: the answer, a revoked view's
/// `SIGSEGV`, takes no lock, so the release does not stall on its own listener.
#[test]
fn a_listener_asking_for_faults_during_the_release_does_not_stall() {
    struct AsksAtCommit {
        mem: std::sync::Mutex<Option<GuestMemfd>>,
        seen: mpsc::Sender<Option<gmem::HostFault>>,
    }
    impl gmem::ConversionListener for AsksAtCommit {
        fn prepare(&self, _: &gmem::Conversion) -> Result<(), gmem::Veto> {
            Ok(())
        }
        fn commit(&self, c: &gmem::Conversion) {
            let mem = self.mem.lock().unwrap();
            if let (Some(mem), true) = (mem.as_ref(), c.len == PAGES * P) {
                let _ = self.seen.send(mem.host_fault(0));
            }
        }
    }
    let mem = build();
    let (seen_tx, seen) = mpsc::channel();
    let asks = Arc::new(AsksAtCommit {
        mem: std::sync::Mutex::new(Some(mem.clone())),
        seen: seen_tx,
    });
    let id = mem.add_listener(asks.clone());
    let (done_tx, done) = mpsc::channel();
    let old = mem.clone();
    std::thread::spawn(move || {
        let (a, b) = pair();
        let receiver = std::thread::spawn(move || receive(b.as_fd(), &Options::default()));
        let r = hand_over(a.as_fd(), &[FileOffer::new(&old)], &Options::default());
        let got = receiver.join().unwrap();
        let _ = done_tx.send((r.map(drop).map_err(|e| e.errno()), got.is_ok()));
    });
    assert_eq!(
        done.recv_timeout(Duration::from_secs(30)),
        Ok((Ok(()), true)),
        "the hand-over completes"
    );
    assert_eq!(
        seen.recv_timeout(Duration::from_secs(1)),
        Ok(Some(gmem::HostFault::Segv)),
        "the listener's question during the release (page 0 was shared)"
    );
    mem.remove_listener(id);
    asks.mem.lock().unwrap().take();
}
