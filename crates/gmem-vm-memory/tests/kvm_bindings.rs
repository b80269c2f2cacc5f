//! The adapter's layout from gmem-kvm memslot bindings: a kernel guest_memfd and a shmem
//! file bound in one VM, seen by devices at the bindings' guest-physical addresses.

use gmem::{Attr, Errno, Flags, GuestMemfd};
use gmem_kvm::{Gpa, Vm, VmError};
use gmem_vm_memory::{GmemMemory, LayoutError, Refusal, RegionSpec};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

const P: u64 = 4096;

#[test]
fn kvm_bindings_become_the_device_layout() {
    let vm = match Vm::new() {
        Err(VmError::Open { errno }) => {
            eprintln!("skipped: /dev/kvm does not open (errno {errno})");
            return;
        }
        r => r.expect("vm"),
    };
    let kernel = vm
        .create_guest_memfd(16 * P, Flags::MMAP | Flags::INIT_SHARED)
        .expect("kernel guest_memfd");
    let shmem = GuestMemfd::create(16 * P, Flags::MMAP | Flags::INIT_SHARED).expect("shmem");
    let low = vm
        .bind(&kernel, Gpa::new(0), 0, 16 * P)
        .expect("bind kernel file");
    let high = vm
        .bind(&shmem, Gpa::new(0x10_0000), 4 * P, 8 * P)
        .expect("bind shmem");
    let mem = GmemMemory::new([
        RegionSpec::from_binding(&low, kernel.clone()),
        RegionSpec::from_binding(&high, shmem.clone()),
    ])
    .expect("layout from bindings");
    assert_eq!(low.file_id(), kernel.id().expect("id"));
    assert_eq!(high.file_id(), shmem.id().expect("id"));
    // A binding given with another file than the one it binds is refused.
    let e = GmemMemory::new([RegionSpec::from_binding(&high, kernel.clone())])
        .expect_err("another file");
    assert!(
        matches!(e, LayoutError::NotBindingFile { gpa: 0x10_0000 }),
        "{e}"
    );
    assert_eq!((e.errno(), e.gpa()), (libc::EINVAL, 0x10_0000));
    assert_eq!(
        mem.regions(),
        vec![(0, 16 * P, 0), (0x10_0000, 8 * P, 4 * P)]
    );
    kernel
        .guest()
        .expect("guest view")
        .write(3 * P, b"kernel")
        .expect("guest");
    shmem
        .guest()
        .expect("guest view")
        .write(5 * P, b"shmem!")
        .expect("guest");
    let mut b = [0u8; 6];
    mem.read_slice(&mut b, GuestAddress(3 * P)).expect("read");
    assert_eq!(&b, b"kernel");
    mem.read_slice(&mut b, GuestAddress(0x10_1000))
        .expect("read");
    assert_eq!(&b, b"shmem!");
    // The kernel file's conversions are enforced the same way.
    kernel.convert(3 * P, P, Attr::Private).expect("to private");
    let err = mem
        .read_obj::<u8>(GuestAddress(3 * P))
        .expect_err("private");
    assert_eq!(Refusal::of(&err), Some(Refusal::Private { gpa: 3 * P }));
    let held = mem.get_slices(GuestAddress(4 * P), 8, vm_memory::Permissions::Read);
    let held: Vec<_> = held
        .expect("slices")
        .collect::<Result<_, _>>()
        .expect("held");
    let e = kernel.convert(4 * P, P, Attr::Private).expect_err("held");
    assert_eq!((e.errno(), e.error_offset()), (libc::EAGAIN, Some(4 * P)));
    drop(held);
    kernel.convert(4 * P, P, Attr::Private).expect("released");
}
