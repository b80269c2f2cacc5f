//! Fault injection (R4): the old or the new owner is killed with SIGKILL at every step of the
//! hand-over, in real child processes; the survivor must own every byte (per-page CRC-32C)
//! and every attribute. And a hand-over while a software guest keeps writing loses nothing.
//!
//! Each case starts two children from this test binary (`--exact preserve_fault_child`), an
//! old owner and a new owner joined by an inherited socket pair. `GMEM_FAULT_ROLE` names the
//! role and `GMEM_FAULT_DIE` the step at which that process sends itself SIGKILL.
// Test patterns truncate counters to bytes on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use gmem::preserve::{crc32c, hand_over, receive, Binding, FileOffer, Options, Step};
use gmem::Errno;
use gmem::{Attr, FallocMode, Flags, GuestMemfd, HostView};
use gmem_conformance::touch;
use rustix::io::{fcntl_setfd, FdFlags};
use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};

const P: u64 = 4096;
const PAGES: u64 = 1024;
/// Guest-writer slots: one u64 counter every 64 bytes of the first 64 pages.
const SLOTS: u64 = 64 * 64;

/// Spawning with inheritable descriptors must not overlap between tests of this binary.
static SPAWN: Mutex<()> = Mutex::new(());

/// The file of a child (HugeTLB when `GMEM_FAULT_HUGE` is set).
fn build() -> GuestMemfd {
    build_with(std::env::var("GMEM_FAULT_HUGE").is_ok())
}

/// A file with a pattern in every page and runs over its first 4 MiB. On HugeTLB (three
/// 2 MiB pages) the first two huge pages are split by those runs and the third stays whole.
fn build_with(huge: bool) -> GuestMemfd {
    let mem = if huge {
        GuestMemfd::builder(3 * gmem::HUGE_2M)
            .flags(Flags::MMAP | Flags::INIT_SHARED)
            .backing(gmem::BackingChoice::HugeTlb(gmem::HUGE_2M))
            .create()
            .unwrap()
    } else {
        GuestMemfd::create(PAGES * P, Flags::MMAP | Flags::INIT_SHARED).unwrap()
    };
    let g = mem.guest().expect("guest view");
    let mut page = vec![0u8; P as usize];
    for p in 0..mem.size() / P {
        for (i, b) in page.iter_mut().enumerate() {
            *b = (p as u8).wrapping_mul(13) ^ (i as u8).wrapping_mul(7);
        }
        page[..8].copy_from_slice(&p.to_le_bytes());
        g.write(p * P, &page).unwrap();
    }
    let mut p = 3;
    while p < PAGES {
        let len = (p % 7) + 1;
        mem.convert(p * P, len.min(PAGES - p) * P, Attr::Private)
            .unwrap();
        p += len + (p % 4) + 1;
    }
    mem
}

/// One line: CRC-32C over the per-page CRCs, and the CRC of the run list.
fn digest(mem: &GuestMemfd) -> String {
    let g = mem.guest().expect("guest view");
    let mut page = vec![0u8; P as usize];
    let mut crcs = Vec::new();
    for p in 0..mem.size() / P {
        g.read(p * P, &mut page).unwrap();
        crcs.extend_from_slice(&crc32c(&page).to_le_bytes());
    }
    let runs = mem.runs(0, mem.size()).unwrap();
    let mut r = Vec::new();
    for run in &runs {
        r.extend_from_slice(&run.offset.to_le_bytes());
        r.extend_from_slice(&run.len.to_le_bytes());
        r.push(u8::from(run.attr == Attr::Private));
    }
    format!(
        "pages={:08x} runs={}:{:08x}",
        crc32c(&crcs),
        runs.len(),
        crc32c(&r)
    )
}

fn die_hook(die: Option<Step>) -> Options {
    Options {
        on_step: Some(Arc::new(move |s| {
            if Some(s) == die {
                let me = std::process::id() as libc::pid_t;
                // SAFETY: plain syscall; SIGKILL ends this process on the spot.
                unsafe { libc::kill(me, libc::SIGKILL) };
            }
        })),
        ..Options::default()
    }
}

fn inherited_sock() -> OwnedFd {
    let fd: i32 = std::env::var("GMEM_FAULT_SOCK").unwrap().parse().unwrap();
    // SAFETY: the parent passed this descriptor to this process alone; nothing here owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    fcntl_setfd(&sock, FdFlags::CLOEXEC).unwrap();
    sock
}

/// Proves the survivor is a working owner: a round trip of conversion and an allocation,
/// which leave contents and attributes as they were.
fn exercise(mem: &GuestMemfd) {
    let r = mem.runs(0, mem.size()).unwrap();
    let shared = r.iter().find(|r| r.attr == Attr::Shared).unwrap().offset;
    mem.convert(shared, P, Attr::Private).unwrap();
    mem.convert(shared, P, Attr::Shared).unwrap();
    mem.fallocate(FallocMode::KEEP_SIZE, 0, mem.size()).unwrap();
}

/// After a failed hand-over the old owner's view shows what it showed before (the old owner
/// ends its host access before `COMMIT` and gives it back): shared pages read, their first
/// byte the page's index past the guest writer's slots; private pages fault.
fn view_as_before(mem: &GuestMemfd, view: &HostView) {
    for r in mem.runs(0, mem.size()).unwrap() {
        for p in r.offset / P..(r.offset + r.len) / P {
            let got = touch::read_byte(view, p * P);
            match r.attr {
                Attr::Shared if p * P >= SLOTS * 64 => assert_eq!(got, Ok(p as u8), "page {p}"),
                Attr::Shared => assert!(got.is_ok(), "page {p}: {got:?}"),
                Attr::Private => {
                    assert!(got.is_err_and(|f| f.is_access_error()), "page {p}: {got:?}")
                }
            }
        }
    }
}

fn old_role(die: Option<Step>, writer: bool) {
    let sock = inherited_sock();
    let mem = build();
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(0));
    let guest = writer.then(|| {
        let (g, stop, last) = (mem.guest().expect("guest view"), stop.clone(), last.clone());
        std::thread::spawn(move || {
            let mut k: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                match g.write((k % SLOTS) * 64, &k.to_le_bytes()) {
                    Ok(()) => last.store(k, Ordering::Release),
                    // Handed over: this process's guest no longer reaches the memory.
                    Err(e) if e.errno() == libc::EPERM => break,
                    Err(e) => panic!("guest write: {e}"),
                }
            }
        })
    });
    if writer {
        while last.load(Ordering::Acquire) < 100_000 {
            std::thread::yield_now();
        }
    }
    let view = mem.map(0, mem.size()).unwrap();
    let pin = mem.pin(0, P).unwrap();
    let offer = FileOffer::new(&mem)
        .binding(Binding {
            slot: 0,
            offset: 0,
            gpa: 0,
            size: mem.size(),
        })
        .pin(&pin, 5);
    let res = hand_over(sock.as_fd(), &[offer], &die_hook(die));
    if let Some(t) = guest {
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        println!("LAST {}", last.load(Ordering::Acquire));
    }
    match res {
        Ok(_) => println!("OUTCOME handed-over"),
        Err(e) => {
            drop(pin);
            view_as_before(&mem, &view);
            exercise(&mem);
            println!("OUTCOME kept errno={} {}", e.errno(), digest(&mem));
        }
    }
}

fn new_role(die: Option<Step>, writer: bool) {
    let sock = inherited_sock();
    let got = match receive(sock.as_fd(), &die_hook(die)) {
        Ok(got) => got,
        Err(e) => {
            println!("OUTCOME none errno={}", e.errno());
            return;
        }
    };
    // Conversions to private wait for the old owner's RELEASED (or its end).
    assert!(got.wait_old_owner_released(std::time::Duration::from_secs(30)));
    let mut files = got.files;
    let f = files.remove(0);
    assert_eq!(f.pins.len(), 1);
    assert_eq!(
        f.state.bindings,
        vec![Binding {
            slot: 0,
            offset: 0,
            gpa: 0,
            size: f.mem.size()
        }]
    );
    if writer {
        // Wait until the old owner's guest has stopped, then check every slot holds the
        // last value written to it.
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).unwrap();
        let last: u64 = line.trim().parse().unwrap();
        let g = f.mem.guest().expect("guest view");
        for slot in 0..SLOTS {
            let mut b = [0u8; 8];
            g.read(slot * 64, &mut b).unwrap();
            let want = last - (last + SLOTS - slot) % SLOTS;
            assert_eq!(u64::from_le_bytes(b), want, "slot {slot}");
        }
        println!("GUEST-WRITES intact up to {last}");
    }
    drop(f.pins);
    exercise(&f.mem);
    println!(
        "OUTCOME owner old_gone={} {}",
        got.old_owner_gone,
        digest(&f.mem)
    );
}

/// Child entry: does nothing unless started by `run_case`.
#[test]
fn preserve_fault_child() {
    let Ok(role) = std::env::var("GMEM_FAULT_ROLE") else {
        return;
    };
    let die = std::env::var("GMEM_FAULT_DIE")
        .ok()
        .and_then(|s| Step::from_name(&s));
    let writer = std::env::var("GMEM_FAULT_WRITER").is_ok();
    match role.as_str() {
        "old" => old_role(die, writer),
        "new" => new_role(die, writer),
        r => panic!("unknown role {r}"),
    }
}

fn spawn(role: &str, sock: BorrowedFd<'_>, die: Option<Step>, writer: bool, huge: bool) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "preserve_fault_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("GMEM_FAULT_ROLE", role)
    .env("GMEM_FAULT_SOCK", sock.as_raw_fd().to_string())
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if let Some(d) = die {
        cmd.env("GMEM_FAULT_DIE", d.name());
    }
    if writer {
        cmd.env("GMEM_FAULT_WRITER", "1");
    }
    if huge {
        cmd.env("GMEM_FAULT_HUGE", "1");
    }
    cmd.spawn().unwrap()
}

struct Ended {
    out: String,
    killed: bool,
}

fn ended(child: Child) -> Ended {
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let killed = o.status.signal() == Some(libc::SIGKILL);
    assert!(
        killed || o.status.success(),
        "child failed: {:?}\n{out}",
        o.status
    );
    Ended { out, killed }
}

fn outcome(e: &Ended) -> &str {
    e.out
        .lines()
        .find_map(|l| l.split_once("OUTCOME ").map(|(_, o)| o))
        .unwrap_or("")
}

/// Runs one hand-over between two children; `die_old`/`die_new` name the step at which each
/// kills itself.
fn run_case(die_old: Option<Step>, die_new: Option<Step>, writer: bool) -> (Ended, Ended) {
    run_case_on(die_old, die_new, writer, false)
}

fn run_case_on(
    die_old: Option<Step>,
    die_new: Option<Step>,
    writer: bool,
    huge: bool,
) -> (Ended, Ended) {
    let (old, new) = {
        let _g = SPAWN.lock().unwrap_or_else(|e| e.into_inner());
        let (a, b) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::empty(),
            None,
        )
        .unwrap();
        fcntl_setfd(&b, FdFlags::CLOEXEC).unwrap();
        let old = spawn("old", a.as_fd(), die_old, writer, huge);
        fcntl_setfd(&a, FdFlags::CLOEXEC).unwrap();
        fcntl_setfd(&b, FdFlags::empty()).unwrap();
        let new = spawn("new", b.as_fd(), die_new, writer, huge);
        (old, new)
    };
    let old = ended(old);
    let mut new = new;
    if writer {
        let last = old
            .out
            .lines()
            .find_map(|l| l.split_once("LAST ").map(|(_, o)| o))
            .expect("LAST line");
        writeln!(new.stdin.take().unwrap(), "{last}").unwrap();
    }
    (old, ended(new))
}

#[test]
fn kill_old_owner_at_every_step_survivor_owns_everything() {
    let want = digest(&build());
    for step in Step::ALL.into_iter().filter(|s| s.is_old_owners()) {
        let (old, new) = run_case(Some(step), None, false);
        assert!(old.killed, "{step:?}: old not killed\n{}", old.out);
        if step == Step::Frozen {
            // Killed before anything was sent: no hand-over took place.
            assert_eq!(
                outcome(&new),
                format!("none errno={}", libc::ECONNRESET),
                "{step:?}"
            );
            continue;
        }
        let got = outcome(&new);
        assert!(got.starts_with("owner "), "{step:?}: {got}");
        assert!(got.ends_with(&want), "{step:?}: {got} != {want}");
        let gone = matches!(step, Step::OfferSent | Step::AcceptReceived);
        assert!(got.contains(&format!("old_gone={gone}")), "{step:?}: {got}");
    }
}

#[test]
fn kill_new_owner_at_every_step_survivor_owns_everything() {
    let want = digest(&build());
    for step in [
        Step::OfferReceived,
        Step::Verified,
        Step::AcceptSent,
        Step::CommitReceived,
    ] {
        let (old, new) = run_case(None, Some(step), false);
        assert!(new.killed, "{step:?}: new not killed\n{}", new.out);
        assert_eq!(
            outcome(&old),
            format!("kept errno={} {want}", libc::ECONNRESET),
            "{step:?}"
        );
    }
    // After DONE the hand-over is complete: the old owner has let go; the death of the new
    // owner from then on is an ordinary crash of the owner.
    let (old, new) = run_case(None, Some(Step::DoneSent), false);
    assert!(new.killed);
    assert_eq!(outcome(&old), "handed-over");
}

#[test]
fn clean_handover_between_processes() {
    let want = digest(&build());
    let (old, new) = run_case(None, None, false);
    assert_eq!(outcome(&old), "handed-over");
    assert_eq!(outcome(&new), format!("owner old_gone=false {want}"));
}

#[test]
fn guest_writing_during_handover_loses_nothing() {
    let (old, new) = run_case(None, None, true);
    assert_eq!(outcome(&old), "handed-over");
    assert!(new.out.contains("GUEST-WRITES intact up to"), "{}", new.out);
    assert!(
        outcome(&new).starts_with("owner old_gone=false "),
        "{}",
        new.out
    );
}

/// The same kills with a HugeTLB file whose first two huge pages are split: the companion
/// file of pieces travels with it, and the survivor owns every byte and attribute.
#[test]
fn hugetlb_kill_either_side_at_every_step_survivor_owns_everything() {
    let Ok(_pool) = gmem::PoolGuard::grow(gmem::HUGE_2M, 6) else {
        eprintln!("skipped: cannot reserve six 2 MiB huge pages");
        return;
    };
    let want = digest(&build_with(true));
    for step in [
        Step::OfferSent,
        Step::AcceptReceived,
        Step::CommitSent,
        Step::DoneReceived,
        Step::Released,
    ] {
        let (old, new) = run_case_on(Some(step), None, false, true);
        assert!(old.killed, "{step:?}: old not killed\n{}", old.out);
        let got = outcome(&new);
        assert!(
            got.starts_with("owner ") && got.ends_with(&want),
            "{step:?}: {got} != {want}"
        );
    }
    for step in [
        Step::OfferReceived,
        Step::Verified,
        Step::AcceptSent,
        Step::CommitReceived,
    ] {
        let (old, new) = run_case_on(None, Some(step), false, true);
        assert!(new.killed, "{step:?}: new not killed\n{}", new.out);
        assert_eq!(
            outcome(&old),
            format!("kept errno={} {want}", libc::ECONNRESET),
            "{step:?}"
        );
    }
    let (old, new) = run_case_on(None, None, false, true);
    assert_eq!(outcome(&old), "handed-over");
    assert_eq!(outcome(&new), format!("owner old_gone=false {want}"));
}
