//! The memslots gmem made for one VM, and which VM owns each non-kernel file: the table the
//! binding verbs (`memslot`) change and the doorbell and attribute paths read.

use std::collections::HashMap;
use std::sync::Mutex;

use gmem::{FileId, GuestMemfd, ParticipantId};

use crate::gpa::Gpa;

/// One memslot gmem made.
#[derive(Debug)]
pub(crate) struct SlotEntry {
    pub slot: u32,
    pub gpa: Gpa,
    pub len: u64,
    pub offset: u64,
    pub file: FileId,
    pub mem: GuestMemfd,
    /// The kernel-attributes participant added to the file for this binding.
    pub attrs: Option<ParticipantId>,
}

/// The memslots of one VM.
#[derive(Debug)]
pub(crate) struct SlotTable {
    max: usize,
    pub entries: Vec<SlotEntry>,
}

/// A guest-physical range resolved to a file range.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub mem: GuestMemfd,
    pub offset: u64,
    slot_gpa: Gpa,
    slot_offset: u64,
}

impl Resolved {
    /// The guest-physical address of file offset `off` (`None` below the binding's start or
    /// when the address would wrap).
    pub fn gpa_of(&self, off: u64) -> Option<Gpa> {
        self.slot_gpa
            .checked_add(off.checked_sub(self.slot_offset)?)
    }
}

impl SlotTable {
    pub fn new(max: usize) -> Self {
        SlotTable {
            max,
            entries: Vec::new(),
        }
    }

    pub fn free_slot(&self) -> Option<u32> {
        let limit = u32::try_from(self.max).unwrap_or(u32::MAX);
        (0..limit).find(|s| self.entries.iter().all(|e| e.slot != *s))
    }

    pub fn gpa_overlap(&self, gpa: Gpa, len: u64) -> Option<u32> {
        self.entries
            .iter()
            .find(|e| gpa.overlaps(len, e.gpa, e.len))
            .map(|e| e.slot)
    }

    pub fn file_overlap(&self, file: FileId, offset: u64, end: u64) -> Option<u32> {
        self.entries
            .iter()
            .find(|e| e.file == file && offset < e.offset + e.len && e.offset < end)
            .map(|e| e.slot)
    }

    /// The file range behind `[gpa, gpa + len)`, which must lie inside one binding.
    pub fn resolve(&self, gpa: Gpa, len: u64) -> Option<Resolved> {
        let end = gpa.checked_add(len)?;
        let e = self
            .entries
            .iter()
            .find(|e| e.gpa <= gpa && e.gpa.checked_add(e.len).is_some_and(|e_end| end <= e_end))?;
        Some(Resolved {
            mem: e.mem.clone(),
            offset: e.offset.checked_add(gpa.checked_offset_from(e.gpa)?)?,
            slot_gpa: e.gpa,
            slot_offset: e.offset,
        })
    }
}

/// Owners of non-kernel files: file identity → [`Vm::id`](crate::Vm::id).
static OWNERS: Mutex<Option<HashMap<FileId, u64>>> = Mutex::new(None);

pub(crate) fn owners() -> std::sync::MutexGuard<'static, Option<HashMap<FileId, u64>>> {
    OWNERS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Forgets every file `vm` owned (the VM is gone).
pub(crate) fn release_owner(vm: u64) {
    if let Some(map) = owners().as_mut() {
        map.retain(|_, owner| *owner != vm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gmem::{Flags, PAGE_SIZE};

    /// A table with one binding: 8 pages of a file from offset 4 pages, at gpa 0x10_0000.
    fn table() -> SlotTable {
        let mem =
            GuestMemfd::create(16 * PAGE_SIZE, Flags::MMAP | Flags::INIT_SHARED).expect("create");
        let file = mem.id().expect("id");
        let mut t = SlotTable::new(8);
        t.entries.push(SlotEntry {
            slot: 0,
            gpa: Gpa::new(0x10_0000),
            len: 8 * PAGE_SIZE,
            offset: 4 * PAGE_SIZE,
            file,
            mem,
            attrs: None,
        });
        t
    }

    #[test]
    fn resolve_maps_gpas_inside_one_binding_only() {
        let t = table();
        let r = t.resolve(Gpa::new(0x10_2000), 0x2000).expect("inside");
        assert_eq!(r.offset, 4 * PAGE_SIZE + 0x2000);
        assert_eq!(r.gpa_of(4 * PAGE_SIZE + 0x3000), Some(Gpa::new(0x10_3000)));
        assert_eq!(r.gpa_of(PAGE_SIZE), None, "below the binding's file offset");
        assert!(
            t.resolve(Gpa::new(0x10_7000), 0x2000).is_none(),
            "crosses the end"
        );
        assert!(
            t.resolve(Gpa::new(0x0f_f000), 0x2000).is_none(),
            "starts below"
        );
        assert!(
            t.resolve(Gpa::new(u64::MAX - 0xfff), 0x2000).is_none(),
            "wraps"
        );
    }

    #[test]
    fn gpa_overlap_is_half_open() {
        let t = table();
        assert_eq!(t.gpa_overlap(Gpa::new(0x10_7000), 0x1000), Some(0));
        assert_eq!(t.gpa_overlap(Gpa::new(0x0f_f000), 0x2000), Some(0));
        assert_eq!(t.gpa_overlap(Gpa::new(0x10_8000), 0x1000), None);
        assert_eq!(t.gpa_overlap(Gpa::new(0x0f_f000), 0x1000), None);
    }
}
