//! A VMM wiring gmem into its device layer: guest RAM in a gmem file, the device's view of it
//! through `GmemAddressSpace`, a virtio-rng device on virtio-queue serving a driver, and the
//! guest converting memory under it.
//!
//! `cargo run -p gmem-vm-memory --example virtio_rng`

// The device's and driver's whole API is used by the tests.
#[allow(dead_code)]
mod device;
// The driver helpers are shared with the tests, which use all of them.
#[allow(dead_code)]
mod driver;

use gmem::{Attr, Errno, Flags, GuestMemfd};
use gmem_vm_memory::{GmemAddressSpace, GmemMemory, RegionSpec};
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestAddressSpace;

/// A counter as entropy: the output is easy to check.
struct Counter(u8);

impl std::io::Read for Counter {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        for b in buf.iter_mut() {
            *b = self.0;
            self.0 = self.0.wrapping_add(1);
        }
        Ok(buf.len())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const RAM: u64 = 0x10_0000; // guest RAM at 1 MiB, 1 MiB long; the rest is a hole
    let ram = GuestMemfd::builder(1 << 20)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .create()?;
    // The VMM's memory map, as devices see it. A VMM with gmem-kvm bindings would use
    // `RegionSpec::from_binding(&binding, file)` for each memslot.
    let space = GmemAddressSpace::new(GmemMemory::new([RegionSpec::new(
        RAM,
        ram.clone(),
        0,
        1 << 20,
    )])?);

    // The guest's driver: a 16-entry queue at RAM+0x1000, four 512-byte buffers after it.
    // (It writes through the guest's view, as a vCPU would.)
    let guest = ram.guest()?;
    let layout = driver::Layout::new(RAM + 0x1000, 16);
    let drv = driver::Driver::new(layout, |gpa: u64, b: &[u8]| {
        guest.write(gpa - RAM, b).expect("guest write")
    })
    .with_read(|gpa: u64, b: &mut [u8]| guest.read(gpa - RAM, b).expect("guest read"));
    let buf = |i: u16| RAM + 0x8000 + u64::from(i) * 0x1000;
    for i in 0..4 {
        drv.set_desc(i, Descriptor::new(buf(i), 512, driver::F_WRITE, 0));
        drv.offer(i, i);
    }

    let mut rng = device::RngDevice::new(layout.queue(), Counter(0));
    let mem = space.memory();
    let report = rng.process(&mem, 64);
    println!(
        "served {} requests, {} bytes; used idx {}",
        report.completed,
        report.bytes,
        drv.used_idx()
    );

    // The guest makes buffer 3's page private and offers it again: the device is refused,
    // says why, returns the chain empty, and goes on.
    ram.convert(buf(3) - RAM, 0x1000, Attr::Private)?;
    drv.offer(4, 3);
    let report = rng.process(&mem, 64);
    for e in &report.errors {
        println!("device error: {e}");
    }

    // The device holds a request while the guest tries to take its buffer.
    ram.convert(buf(3) - RAM, 0x1000, Attr::Shared)?;
    drv.offer(5, 2);
    let req = rng.next_request(&mem)?.expect("a request");
    let err = ram
        .convert(buf(2) - RAM, 0x1000, Attr::Private)
        .unwrap_err();
    println!(
        "guest converts a buffer the device holds: errno {} (EAGAIN) at offset {:#x}",
        err.errno(),
        err.error_offset().unwrap_or(0)
    );
    rng.complete(&mem, req)?;
    ram.convert(buf(2) - RAM, 0x1000, Attr::Private)?;
    println!("after the device completed the request the conversion succeeds");
    println!("refusals recorded: {}", mem.refusals().count());
    Ok(())
}
