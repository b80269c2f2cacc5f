//! A live update while a device holds guest memory: the old owner's host access ends before
//! the new owner may own the files, so a device still holding a slice makes the hand-over
//! fail (`EBUSY`, naming the page) instead of being left with a pointer into memory the new
//! owner may make private; once the slice is dropped the hand-over goes through and the
//! device is refused from then on.

use std::os::fd::AsFd;

use gmem::preserve::{hand_over, receive, FileOffer, HandoverError, Options};
use gmem::{Errno, Flags, GuestMemfd};
use gmem_conformance::remap::seqpacket_pair;
use gmem_vm_memory::{GmemMemory, RegionSpec};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

const P: u64 = 4096;

#[test]
fn a_held_slice_refuses_the_hand_over_until_dropped() {
    let file = GuestMemfd::create(16 * P, Flags::MMAP | Flags::INIT_SHARED).expect("create");
    let mem =
        GmemMemory::new([RegionSpec::new(0x10_0000, file.clone(), 0, 16 * P)]).expect("memory");
    mem.write_obj(0x5au64, GuestAddress(0x10_3000))
        .expect("write");
    let held = mem
        .get_slices(GuestAddress(0x10_3000), 8, Permissions::Read)
        .expect("get_slices")
        .next()
        .expect("one slice")
        .expect("slice");
    // A new owner that takes whatever it is offered; the old owner aborts.
    let (a, b) = seqpacket_pair();
    let taker = std::thread::spawn(move || receive(b.as_fd(), &Options::default()));
    let e = hand_over(a.as_fd(), &[FileOffer::new(&file)], &Options::default())
        .expect_err("a held slice");
    assert!(
        matches!(e, HandoverError::Vetoed { file: 0, offset, .. } if offset == 3 * P),
        "{e:?}"
    );
    assert_eq!((e.errno(), e.error_offset()), (libc::EBUSY, Some(3 * P)));
    let got = taker.join().expect("join");
    assert!(
        matches!(got, Err(HandoverError::Aborted)),
        "the new owner is told: {:?}",
        got.map(|_| ())
    );
    // Still the owner, and the device still reads through its slice.
    let mut b8 = [0u8; 8];
    held.copy_to(&mut b8);
    assert_eq!(u64::from_le_bytes(b8), 0x5a);
    drop(held);
    let (a, b) = seqpacket_pair();
    let taker = std::thread::spawn(move || receive(b.as_fd(), &Options::default()));
    hand_over(a.as_fd(), &[FileOffer::new(&file)], &Options::default()).expect("hand over");
    let got = taker.join().expect("join").expect("receive");
    assert_eq!(got.files.len(), 1);
    // The device is refused from now on, and takes no slice.
    assert!(mem.read_obj::<u64>(GuestAddress(0x10_3000)).is_err());
    assert!(mem
        .get_slices(GuestAddress(0x10_3000), 8, Permissions::Read)
        .expect("get_slices")
        .next()
        .expect("one item")
        .is_err());
}
