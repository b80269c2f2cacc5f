//! virtio-queue 0.18, unchanged, over gmem: the example virtio-rng device served by a driver
//! that writes through the guest's view. Honest chains work; rings, tables and buffers in
//! private memory give the device an error it reports; a hostile driver never makes the device
//! fault, hang or abort; a buffer the device holds cannot be made private until it lets go.

#[path = "../examples/virtio_rng/device.rs"]
#[allow(dead_code)]
mod device;
#[path = "../examples/virtio_rng/driver.rs"]
#[allow(dead_code)]
mod driver;

use std::sync::mpsc;
use std::time::Duration;

use device::{DeviceError, RngDevice, STATUS_NEEDS_RESET};
use driver::{Driver, Layout, F_INDIRECT, F_NEXT, F_WRITE};
use gmem::{Attr, Errno, Flags, GuestMemfd};
use gmem_vm_memory::{GmemMemory, Refusal, RegionSpec};
use virtio_queue::desc::split::Descriptor;

const P: u64 = 4096;
const PU: usize = 4096;
/// Guest RAM: 1 MiB at gpa 1 MiB.
const RAM: u64 = 0x10_0000;
const QSIZE: u16 = 16;

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

struct Vm {
    ram: GuestMemfd,
    mem: GmemMemory,
    layout: Layout,
}

impl Vm {
    fn new() -> Vm {
        let ram = GuestMemfd::builder(1 << 20)
            .flags(Flags::MMAP | Flags::INIT_SHARED)
            .create()
            .expect("ram");
        let mem = GmemMemory::new([RegionSpec::new(RAM, ram.clone(), 0, 1 << 20)]).expect("mem");
        Vm {
            ram,
            mem,
            layout: Layout::new(RAM + 0x1000, QSIZE),
        }
    }

    fn driver(&self) -> Driver<'_> {
        let g = self.ram.guest().expect("guest view");
        let g2 = self.ram.guest().expect("guest view");
        Driver::new(self.layout, move |gpa: u64, b: &[u8]| {
            g.write(gpa - RAM, b).expect("guest write")
        })
        .with_read(move |gpa: u64, b: &mut [u8]| g2.read(gpa - RAM, b).expect("guest read"))
    }

    fn device(&self) -> RngDevice<Counter> {
        RngDevice::new(self.layout.queue(), Counter(0))
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.ram
            .guest()
            .expect("guest view")
            .read(gpa - RAM, &mut v)
            .expect("guest read");
        v
    }

    fn to_private(&self, gpa: u64) {
        self.ram
            .convert((gpa - RAM) & !(P - 1), P, Attr::Private)
            .expect("to private");
    }
}

fn buf(i: u64) -> u64 {
    RAM + 0x2_0000 + i * 0x1000
}

fn counting(from: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| from.wrapping_add(u8::try_from(i % 256).unwrap_or(0)))
        .collect()
}

/// Runs `f` on another thread and fails the test if it does not return within 10 s.
fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the device hung or panicked")
}

#[test]
fn rng_fills_chains_over_shared_pages() {
    let vm = Vm::new();
    let drv = vm.driver();
    // Chain 0: one buffer. Chain 1: two buffers. Chain 2: an indirect table of two buffers.
    drv.set_desc(0, Descriptor::new(buf(0), 100, F_WRITE, 0));
    drv.set_desc(1, Descriptor::new(buf(1), 64, F_WRITE | F_NEXT, 2));
    drv.set_desc(2, Descriptor::new(buf(2), 36, F_WRITE, 0));
    let table = buf(8);
    drv.set_table_desc(table, 0, Descriptor::new(buf(3), 10, F_WRITE | F_NEXT, 1));
    drv.set_table_desc(table, 1, Descriptor::new(buf(4), 20, F_WRITE, 0));
    drv.set_desc(3, Descriptor::new(table, 32, F_INDIRECT, 0));
    drv.set_avail_entry(0, 0);
    drv.set_avail_entry(1, 1);
    drv.set_avail_entry(2, 3);
    drv.set_avail_idx(3);
    let mut dev = vm.device();
    let report = dev.process(&vm.mem, 64);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!((report.completed, report.bytes), (3, 230));
    assert_eq!(drv.used_idx(), 3);
    assert_eq!(drv.used_entry(0), (0, 100));
    assert_eq!(drv.used_entry(1), (1, 100));
    assert_eq!(drv.used_entry(2), (3, 30));
    assert_eq!(vm.read(buf(0), 100), counting(0, 100));
    assert_eq!(vm.read(buf(1), 64), counting(100, 64));
    assert_eq!(vm.read(buf(2), 36), counting(164, 36));
    assert_eq!(vm.read(buf(3), 10), counting(200, 10));
    assert_eq!(vm.read(buf(4), 20), counting(210, 20));
    assert_eq!(vm.mem.refusals().count(), 0);
}

#[test]
fn private_buffer_is_reported_and_the_chain_returned_empty() {
    let vm = Vm::new();
    let drv = vm.driver();
    drv.set_desc(0, Descriptor::new(buf(0) + 0x10, 64, F_WRITE, 0));
    drv.set_desc(1, Descriptor::new(buf(1), 64, F_WRITE, 0));
    drv.set_avail_entry(0, 0);
    drv.set_avail_entry(1, 1);
    drv.set_avail_idx(2);
    vm.to_private(buf(0));
    let mut dev = vm.device();
    let report = dev.process(&vm.mem, 64);
    assert_eq!(report.completed, 1);
    assert!(matches!(
        report.errors.as_slice(),
        [DeviceError::Chain { head: 0, refusal: Refusal::Private { gpa } }] if *gpa == buf(0) + 0x10
    ));
    assert_eq!(drv.used_entry(0), (0, 0), "returned with nothing written");
    assert_eq!(drv.used_entry(1), (1, 64));
    assert_eq!(
        dev.status() & STATUS_NEEDS_RESET,
        0,
        "a bad chain does not stop the device"
    );
}

#[test]
fn private_descriptor_table_is_reported() {
    // The table alone on its page (the rings stay shared).
    let mut vm = Vm::new();
    vm.layout.desc = RAM + 0xa000;
    let drv = vm.driver();
    drv.set_desc(0, Descriptor::new(buf(0), 64, F_WRITE, 0));
    drv.offer(0, 0);
    vm.to_private(vm.layout.desc);
    let mut dev = vm.device();
    let report = dev.process(&vm.mem, 64);
    assert_eq!(report.completed, 0);
    let refusal = report.errors.first().and_then(DeviceError::refusal);
    assert_eq!(
        refusal,
        Some(Refusal::Private {
            gpa: vm.layout.desc
        })
    );
    assert_eq!(vm.read(buf(0), 64), vec![0u8; 64], "nothing written");
}

#[test]
fn private_indirect_table_is_reported() {
    let vm = Vm::new();
    let drv = vm.driver();
    let table = buf(8);
    drv.set_table_desc(table, 0, Descriptor::new(buf(0), 64, F_WRITE, 0));
    drv.set_desc(0, Descriptor::new(table, 16, F_INDIRECT, 0));
    drv.offer(0, 0);
    vm.to_private(table);
    let mut dev = vm.device();
    let report = dev.process(&vm.mem, 64);
    assert_eq!(report.completed, 0);
    let refusal = report.errors.first().and_then(DeviceError::refusal);
    assert_eq!(refusal, Some(Refusal::Private { gpa: table }));
    assert_eq!(drv.used_entry(0), (0, 0));
}

#[test]
fn private_avail_ring_stops_the_device_which_says_why() {
    let vm = Vm::new();
    let drv = vm.driver();
    drv.set_desc(0, Descriptor::new(buf(0), 64, F_WRITE, 0));
    drv.offer(0, 0);
    // The avail ring shares a page with the table: make it private.
    vm.to_private(vm.layout.avail);
    let mut dev = vm.device();
    let report = dev.process(&vm.mem, 64);
    assert_eq!(report.completed, 0);
    assert!(
        matches!(report.errors.as_slice(), [DeviceError::Ring(Refusal::Private { gpa })] if *gpa == vm.layout.avail + 2),
        "{:?}",
        report.errors
    );
    assert_eq!(dev.status() & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);
    // Stopped until reset: nothing more happens.
    assert!(dev.process(&vm.mem, 64).errors.is_empty());
}

#[test]
fn ring_and_used_ring_on_a_private_page_of_their_own() {
    let vm = Vm::new();
    // A queue whose used ring is alone on its page.
    let layout = Layout {
        used: RAM + 0x9000,
        ..Layout::new(RAM + 0x1000, QSIZE)
    };
    let g = vm.ram.guest().expect("guest view");
    let drv = Driver::new(layout, move |gpa: u64, b: &[u8]| {
        g.write(gpa - RAM, b).expect("guest write")
    });
    drv.set_desc(0, Descriptor::new(buf(0), 64, F_WRITE, 0));
    drv.offer(0, 0);
    vm.to_private(layout.used);
    let mut dev = RngDevice::new(layout.queue(), Counter(0));
    let report = dev.process(&vm.mem, 64);
    assert_eq!(report.completed, 0);
    assert!(
        matches!(report.errors.as_slice(), [DeviceError::Used(msg)] if msg.contains("private")),
        "{:?}",
        report.errors
    );
    assert_eq!(dev.status() & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);
}

#[test]
fn guest_conversion_of_a_held_buffer_fails_until_the_device_lets_go() {
    let vm = Vm::new();
    let drv = vm.driver();
    drv.set_desc(0, Descriptor::new(buf(0), 2 * 4096u32, F_WRITE, 0));
    drv.offer(0, 0);
    let mut dev = vm.device();
    let req = dev.next_request(&vm.mem).expect("ok").expect("a request");
    assert_eq!(req.capacity(), 2 * PU);
    let off = buf(0) - RAM;
    for page in [off, off + P] {
        let e = vm.ram.convert(page, P, Attr::Private).expect_err("held");
        assert_eq!((e.errno(), e.error_offset()), (libc::EAGAIN, Some(page)));
    }
    let e = vm.ram.convert(0, 1 << 20, Attr::Private).expect_err("held");
    assert_eq!((e.errno(), e.error_offset()), (libc::EAGAIN, Some(off)));
    assert_eq!(dev.complete(&vm.mem, req).expect("complete"), 2 * PU);
    vm.ram
        .convert(off, 2 * P, Attr::Private)
        .expect("after the device let go");
    // The bytes the device wrote are the guest's now, in place.
    let mut b = [0u8; 4];
    vm.ram
        .guest()
        .expect("guest view")
        .read(off, &mut b)
        .expect("guest");
    assert_eq!(b, [0, 1, 2, 3]);
}

/// Every case a hostile driver can write; the device must report or ignore each, never
/// fault, hang or abort.
#[test]
fn hostile_driver_never_takes_the_device_down() {
    type Setup = fn(&Driver<'_>, &Vm);
    let cases: Vec<(&str, Setup)> = vec![
        ("descriptor in a hole", |d, _| {
            d.set_desc(0, Descriptor::new(0x4000_0000, 64, F_WRITE, 0));
            d.offer(0, 0);
        }),
        ("descriptor wrapping the address space", |d, _| {
            d.set_desc(0, Descriptor::new(u64::MAX - 8, 64, F_WRITE, 0));
            d.offer(0, 0);
        }),
        ("4 GiB descriptor", |d, _| {
            d.set_desc(0, Descriptor::new(RAM, u32::MAX, F_WRITE, 0));
            d.offer(0, 0);
        }),
        ("descriptor over the ring itself", |d, vm| {
            d.set_desc(0, Descriptor::new(vm.layout.desc, 0x100, F_WRITE, 0));
            d.offer(0, 0);
        }),
        ("loop in the table", |d, _| {
            d.set_desc(0, Descriptor::new(buf(0), 8, F_WRITE | F_NEXT, 1));
            d.set_desc(1, Descriptor::new(buf(1), 8, F_WRITE | F_NEXT, 0));
            d.offer(0, 0);
        }),
        ("loop in an indirect table", |d, _| {
            let t = buf(8);
            d.set_table_desc(t, 0, Descriptor::new(buf(0), 8, F_WRITE | F_NEXT, 1));
            d.set_table_desc(t, 1, Descriptor::new(buf(1), 8, F_WRITE | F_NEXT, 0));
            d.set_desc(0, Descriptor::new(t, 32, F_INDIRECT, 0));
            d.offer(0, 0);
        }),
        ("indirect table pointing at itself", |d, _| {
            let t = buf(8);
            d.set_table_desc(t, 0, Descriptor::new(t, 16, F_INDIRECT, 0));
            d.set_desc(0, Descriptor::new(t, 16, F_INDIRECT, 0));
            d.offer(0, 0);
        }),
        ("indirect table in a hole", |d, _| {
            d.set_desc(0, Descriptor::new(0x7000_0000, 16, F_INDIRECT, 0));
            d.offer(0, 0);
        }),
        ("indirect table of odd length", |d, _| {
            d.set_desc(0, Descriptor::new(buf(8), 17, F_INDIRECT, 0));
            d.offer(0, 0);
        }),
        ("huge indirect table", |d, _| {
            d.set_desc(0, Descriptor::new(buf(8), 0xffff_fff0, F_INDIRECT, 0));
            d.offer(0, 0);
        }),
        ("next index out of the table", |d, _| {
            d.set_desc(0, Descriptor::new(buf(0), 8, F_WRITE | F_NEXT, 999));
            d.offer(0, 0);
        }),
        ("head index out of the table", |d, _| {
            d.offer(0, 40_000);
        }),
        ("avail index far ahead", |d, _| {
            d.set_avail_idx(0x8000);
        }),
        ("every slot the same head", |d, _| {
            d.set_desc(0, Descriptor::new(buf(0), 8, F_WRITE, 0));
            for s in 0..QSIZE {
                d.set_avail_entry(s, 0);
            }
            d.set_avail_idx(QSIZE);
        }),
        ("readable-only buffer", |d, _| {
            d.set_desc(0, Descriptor::new(buf(0), 8, 0, 0));
            d.offer(0, 0);
        }),
        ("buffer straddling into private memory", |d, vm| {
            vm.to_private(buf(1));
            d.set_desc(0, Descriptor::new(buf(0) + P - 8, 64, F_WRITE, 0));
            d.offer(0, 0);
        }),
    ];
    for (name, setup) in cases {
        let vm = Vm::new();
        setup(&vm.driver(), &vm);
        let (ram, mem, layout) = (vm.ram.clone(), vm.mem.clone(), vm.layout);
        let (completed, errors, status) = bounded(move || {
            let mut dev = RngDevice::new(layout.queue(), Counter(0));
            let r = dev.process(&mem, 64);
            (r.completed, r.errors.len(), dev.status())
        });
        println!("{name}: {completed} completed, {errors} errors, status {status:#x}");
        assert!(completed <= usize::from(QSIZE), "{name}");
        // The VMM lives on: memory still works and every page converts (nothing held).
        ram.convert(0, 1 << 20, Attr::Private).expect(name);
        ram.convert(0, 1 << 20, Attr::Shared).expect(name);
    }
}
