//! The guest's side of a split virtqueue, written through the guest's view of memory (which
//! reaches private pages too): what a guest driver does, for tests and benchmarks.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::ByteValued;

/// `VRING_DESC_F_NEXT`.
pub const F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`: the device writes the buffer.
pub const F_WRITE: u16 = 2;
/// `VRING_DESC_F_INDIRECT`: the buffer is a table of descriptors.
pub const F_INDIRECT: u16 = 4;

/// Where a queue's three parts live in guest-physical memory.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Descriptor table (16 bytes per entry).
    pub desc: u64,
    /// Available ring: flags, idx, ring[size], used_event.
    pub avail: u64,
    /// Used ring: flags, idx, ring[size] of (id, len), avail_event.
    pub used: u64,
    /// Queue size.
    pub size: u16,
}

impl Layout {
    /// The three parts one after the other from `base` (page aligned), used ring 4-aligned.
    pub fn new(base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let desc = base;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        Layout {
            desc,
            avail,
            used,
            size,
        }
    }

    /// One past the last byte of the used ring.
    pub fn end(&self) -> u64 {
        self.used + 6 + 8 * u64::from(self.size)
    }

    /// A device-side queue configured with this layout and ready.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size is a power of two");
        let lo = |a: u64| Some(u32::try_from(a & 0xffff_ffff).unwrap_or(0));
        let hi = |a: u64| Some(u32::try_from(a >> 32).unwrap_or(0));
        q.set_desc_table_address(lo(self.desc), hi(self.desc));
        q.set_avail_ring_address(lo(self.avail), hi(self.avail));
        q.set_used_ring_address(lo(self.used), hi(self.used));
        q.set_ready(true);
        q
    }
}

type WriteFn<'a> = Box<dyn Fn(u64, &[u8]) + 'a>;
type ReadFn<'a> = Box<dyn Fn(u64, &mut [u8]) + 'a>;

/// The driver: writes descriptors and the available ring, reads the used ring.
pub struct Driver<'a> {
    /// The queue's layout.
    pub layout: Layout,
    write: WriteFn<'a>,
    read: Option<ReadFn<'a>>,
}

impl<'a> Driver<'a> {
    /// A driver writing guest memory with `write(gpa, bytes)`.
    pub fn new(layout: Layout, write: impl Fn(u64, &[u8]) + 'a) -> Self {
        Driver {
            layout,
            write: Box::new(write),
            read: None,
        }
    }

    /// Also reads guest memory with `read(gpa, buf)` (for the used ring).
    pub fn with_read(mut self, read: impl Fn(u64, &mut [u8]) + 'a) -> Self {
        self.read = Some(Box::new(read));
        self
    }

    /// Writes descriptor `i` of the table.
    pub fn set_desc(&self, i: u16, d: Descriptor) {
        (self.write)(self.layout.desc + 16 * u64::from(i), d.as_slice());
    }

    /// Writes descriptor `i` of a table at `table` (an indirect table).
    pub fn set_table_desc(&self, table: u64, i: u16, d: Descriptor) {
        (self.write)(table + 16 * u64::from(i), d.as_slice());
    }

    /// Puts `head` in slot `slot` of the available ring.
    pub fn set_avail_entry(&self, slot: u16, head: u16) {
        let at = self.layout.avail + 4 + 2 * u64::from(slot % self.layout.size);
        (self.write)(at, &head.to_le_bytes());
    }

    /// Publishes the available index.
    pub fn set_avail_idx(&self, idx: u16) {
        (self.write)(self.layout.avail + 2, &idx.to_le_bytes());
    }

    /// Offers the chain starting at `head` in slot `slot` and publishes `slot + 1`.
    pub fn offer(&self, slot: u16, head: u16) {
        self.set_avail_entry(slot, head);
        self.set_avail_idx(slot.wrapping_add(1));
    }

    /// The used index the device published.
    pub fn used_idx(&self) -> u16 {
        let mut b = [0u8; 2];
        if let Some(r) = &self.read {
            r(self.layout.used + 2, &mut b);
        }
        u16::from_le_bytes(b)
    }

    /// Used ring entry `slot`: (head id, bytes written).
    pub fn used_entry(&self, slot: u16) -> (u32, u32) {
        let mut b = [0u8; 8];
        if let Some(r) = &self.read {
            r(
                self.layout.used + 4 + 8 * u64::from(slot % self.layout.size),
                &mut b,
            );
        }
        let (id, len) = b.split_at(4);
        (
            u32::from_le_bytes(id.try_into().unwrap_or([0; 4])),
            u32::from_le_bytes(len.try_into().unwrap_or([0; 4])),
        )
    }
}
