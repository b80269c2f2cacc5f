//! A device backend in another process: the follower side of `gmem::peer` exposes the same
//! `GuestMemory`, with the same enforcement, and its held slices refuse the owner's
//! conversions (real child processes).

use gmem::{Attr, Errno, Flags, GuestMemfd};
use gmem_conformance::child::{child_side, ChildProcess};
use gmem_vm_memory::{GmemMemory, HoldMode, Refusal, RegionSpec};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

const P: u64 = 4096;
/// Where the follower puts the memory in its guest-physical layout.
const GPA: u64 = 0x8000_0000;

/// The backend process: attaches, builds its `GuestMemory`, and obeys one-line commands.
fn backend(side: gmem_conformance::child::ChildSide) {
    let mut ctl = side.ctl;
    let file = GuestMemfd::attach(side.peer).expect("attach");
    let mem =
        GmemMemory::new([RegionSpec::follower(GPA, file.clone(), 0, file.size())]).expect("memory");
    assert_eq!(mem.hold_mode(GPA), Some(HoldMode::Tracked));
    let mut held = Vec::new();
    ctl.send("ready");
    loop {
        let line = ctl.recv();
        let words: Vec<&str> = line.split(' ').collect();
        let arg =
            |i: usize| u64::from_str_radix(words[i].trim_start_matches("0x"), 16).expect("hex");
        match words[0] {
            "read" => match mem.read_obj::<u64>(GuestAddress(arg(1))) {
                Ok(v) => ctl.send(&format!("ok {v:#x}")),
                Err(e) => {
                    let r = Refusal::of(&e).expect("a refusal");
                    ctl.send(&format!("refused {} {:#x}", r.errno(), r.gpa()))
                }
            },
            "write" => {
                mem.write_obj(arg(2), GuestAddress(arg(1))).expect("write");
                ctl.send("ok");
            }
            "hold" => {
                let s: Vec<_> = mem
                    .get_slices(GuestAddress(arg(1)), 8, Permissions::Write)
                    .expect("slices")
                    .collect::<Result<_, _>>()
                    .expect("held");
                held.push(s);
                ctl.send("held");
            }
            "release" => {
                held.clear();
                ctl.send("released");
            }
            "check" => ctl.send(&format!(
                "{}",
                mem.check_range(GuestAddress(arg(1)), 8, Permissions::Read)
            )),
            "exit" => return,
            other => panic!("unknown command {other}"),
        }
    }
}

#[test]
fn follower_backend_gets_the_same_guest_memory() {
    if let Some(side) = child_side() {
        backend(side);
        return;
    }
    let mem = GuestMemfd::create(16 * P, Flags::MMAP | Flags::INIT_SHARED).expect("create");
    mem.write_at(P, &0x1111u64.to_le_bytes()).expect("write");
    let mut child = ChildProcess::spawn(
        "follower_backend_gets_the_same_guest_memory",
        "backend",
        mem.share_with_process().expect("share"),
    );
    assert_eq!(child.recv(), "ready");
    let mut ask = |cmd: &str| {
        child.send(cmd);
        child.recv()
    };
    // Shared memory works both ways.
    assert_eq!(ask(&format!("read {:#x}", GPA + P)), "ok 0x1111");
    assert_eq!(ask(&format!("write {:#x} 0x2222", GPA + 2 * P)), "ok");
    let mut b = [0u8; 8];
    mem.read_at(2 * P, &mut b).expect("read");
    assert_eq!(u64::from_le_bytes(b), 0x2222);
    // The owner's conversion reaches the follower: refused there, with the gpa.
    mem.convert(2 * P, P, Attr::Private).expect("to private");
    assert_eq!(
        ask(&format!("read {:#x}", GPA + 2 * P + 8)),
        format!("refused {} {:#x}", libc::EFAULT, GPA + 2 * P + 8)
    );
    assert_eq!(ask(&format!("check {:#x}", GPA + 2 * P)), "false");
    // A slice the backend holds refuses the owner's conversion with EAGAIN at that page.
    assert_eq!(ask(&format!("hold {:#x}", GPA + 3 * P)), "held");
    let e = mem
        .convert(0, 8 * P, Attr::Private)
        .expect_err("held by the backend");
    assert_eq!((e.errno(), e.error_offset()), (libc::EAGAIN, Some(3 * P)));
    assert_eq!(
        mem.attr(0).expect("attr"),
        Attr::Shared,
        "nothing converted"
    );
    assert_eq!(ask("release"), "released");
    mem.convert(0, 8 * P, Attr::Private).expect("after release");
    assert_eq!(
        ask(&format!("read {:#x}", GPA + 3 * P)),
        format!("refused {} {:#x}", libc::EFAULT, GPA + 3 * P)
    );
    // The guest writes while private; shared again, the backend sees it.
    mem.guest()
        .expect("guest view")
        .write(3 * P, &0x3333u64.to_le_bytes())
        .expect("guest");
    mem.convert(0, 8 * P, Attr::Shared).expect("to shared");
    assert_eq!(ask(&format!("read {:#x}", GPA + 3 * P)), "ok 0x3333");
    // Poison reaches the follower too.
    mem.inject_poison(5 * P).expect("poison");
    assert_eq!(
        ask(&format!("read {:#x}", GPA + 5 * P)),
        format!("refused {} {:#x}", libc::EHWPOISON, GPA + 5 * P)
    );
    child.send("exit");
    child.finish();
}

/// A follower region holds as the owner's do (tracked on shmem): its tracker hears the
/// owner's conversions through the follower's agent, so a page made private is refused with
/// its gpa at once.
#[test]
fn follower_regions_are_tracked_and_hear_the_owners_conversions() {
    if let Some(mut side) = child_side() {
        let file = GuestMemfd::attach(side.peer).expect("attach");
        let mem =
            GmemMemory::new([RegionSpec::new(0, file.clone(), 0, file.size())]).expect("memory");
        side.ctl.send(&format!("{:?}", mem.hold_mode(0)));
        assert_eq!(side.ctl.recv(), "converted");
        let r = mem
            .read_obj::<u64>(GuestAddress(P))
            .expect_err("private now");
        side.ctl.send(&format!("{:?}", Refusal::of(&r)));
        return;
    }
    let mem = GuestMemfd::create(4 * P, Flags::MMAP | Flags::INIT_SHARED).expect("create");
    let mut child = ChildProcess::spawn(
        "follower_regions_are_tracked_and_hear_the_owners_conversions",
        "backend",
        mem.share_with_process().expect("share"),
    );
    assert_eq!(child.recv(), "Some(Tracked)");
    mem.convert(P, P, Attr::Private).expect("to private");
    child.send("converted");
    assert_eq!(
        child.recv(),
        format!("{:?}", Some(Refusal::Private { gpa: P }))
    );
    child.finish();
}
