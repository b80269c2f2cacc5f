//! How a VMM wires gmem into its device layer (the README's example, compiled and run by
//! `cargo test -p gmem-vm-memory --test readme`).

use gmem::{Attr, Errno, Flags, GuestMemfd};
use gmem_vm_memory::{GmemAddressSpace, GmemMemory, Refusal, RegionSpec};
use virtio_queue::{Queue, QueueT, Reader};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. Guest RAM: gmem files, laid out in guest-physical space (holes in between). With
    //    gmem-kvm, use `RegionSpec::from_binding(&binding, file)` for each memslot.
    let low = GuestMemfd::builder(1 << 20)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .create()?;
    let high = GuestMemfd::builder(1 << 20)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .create()?;
    let space = GmemAddressSpace::new(
        GmemMemory::builder()
            .region(RegionSpec::new(0, low.clone(), 0, 1 << 20))
            .region(RegionSpec::new(0x1_0000_0000, high.clone(), 0, 1 << 20))
            .dirty_tracking(true) // for live migration
            .build()?,
    );

    // 2. Devices take `space.memory()` wherever rust-vmm code wants a `GuestMemory`.
    let mem = space.memory();
    let mut queue = Queue::new(16)?;
    queue.set_desc_table_address(Some(0x1000), Some(0));
    queue.set_avail_ring_address(Some(0x1100), Some(0));
    queue.set_used_ring_address(Some(0x1200), Some(0));
    queue.set_ready(true);

    // (The guest's driver offers one 8-byte buffer at 0x2000.)
    let guest = low.guest()?;
    guest.write(0x1000, &[0, 0x20, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0])?;
    guest.write(0x2000, b"request!")?;
    guest.write(0x1102, &1u16.to_le_bytes())?;

    // 3. Unchanged virtio-queue code: the device holds the buffer while the Reader lives.
    let chain = queue.pop_descriptor_chain(mem.clone()).ok_or("no chain")?;
    let mut reader = Reader::new(&*mem, chain)?;
    let err = low.convert(0x2000, 0x1000, Attr::Private).unwrap_err();
    assert_eq!(
        (err.errno(), err.error_offset()),
        (libc::EAGAIN, Some(0x2000))
    );
    assert_eq!(reader.read_obj::<[u8; 8]>()?, *b"request!");
    drop(reader);

    // 4. Once the device lets go, the guest's conversion succeeds, and device access to the
    //    page is refused with an error naming the gpa: never a fault.
    low.convert(0x2000, 0x1000, Attr::Private)?;
    let err = mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap_err();
    assert_eq!(Refusal::of(&err), Some(Refusal::Private { gpa: 0x2000 }));
    // virtio-queue may swallow such errors: the device asks the memory why.
    assert_eq!(mem.refusals().last().map(|r| r.refusal.gpa()), Some(0x2000));

    // 5. What devices write is tracked for migration.
    mem.write_obj(0xfeed_u64, GuestAddress(0x1_0000_0008))?;
    assert_eq!(mem.take_dirty(), vec![0x1_0000_0000]);

    // 6. Hot-unplug: a new snapshot; devices pick it up at their next `memory()`.
    space.remove_region(0x1_0000_0000)?;
    assert_eq!(space.memory().regions().len(), 1);
    Ok(())
}
