//! A VM's guest-physical layout: regions of gmem files at guest-physical addresses, with holes
//! between them, validated with the kernel's memslot rules.

use gmem::{BackingKind, Errno, FileId, GuestMemfd, MapError, PAGE_SIZE};

/// Why a layout was refused. The layout (and any snapshot it was derived from) is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A region of zero bytes (`EINVAL`).
    #[error("region at {gpa:#x} is empty")]
    Empty {
        /// Guest-physical address given.
        gpa: u64,
    },
    /// Guest-physical address, file offset or length not page aligned (`EINVAL`).
    #[error("region {gpa:#x}+{len:#x} at file offset {offset:#x} is not page aligned")]
    Unaligned {
        /// Guest-physical address given.
        gpa: u64,
        /// File offset given.
        offset: u64,
        /// Length given.
        len: u64,
    },
    /// `gpa + len` or `offset + len` wraps around `u64` (`EINVAL`).
    #[error("region {gpa:#x}+{len:#x} at file offset {offset:#x} wraps")]
    Wraps {
        /// Guest-physical address given.
        gpa: u64,
        /// File offset given.
        offset: u64,
        /// Length given.
        len: u64,
    },
    /// The file range ends past the end of the file (`EINVAL`).
    #[error(
        "region at {gpa:#x}: file range {offset:#x}+{len:#x} ends past the file size {size:#x}"
    )]
    PastFile {
        /// Guest-physical address given.
        gpa: u64,
        /// File offset given.
        offset: u64,
        /// Length given.
        len: u64,
        /// Size of the file.
        size: u64,
    },
    /// The guest-physical range overlaps another region (`EEXIST`, as for memslots).
    #[error("region {gpa:#x}+{len:#x} overlaps the region at {other:#x}")]
    Overlap {
        /// Guest-physical address given.
        gpa: u64,
        /// Length given.
        len: u64,
        /// Start of the region it overlaps.
        other: u64,
    },
    /// The file range overlaps another region of the same file (`EINVAL`, as for
    /// guest_memfd bindings).
    #[error("region at {gpa:#x}: file range at {offset:#x} overlaps the region at {other:#x}")]
    FileOverlap {
        /// Guest-physical address given.
        gpa: u64,
        /// File offset given.
        offset: u64,
        /// Start of the region whose file range it overlaps.
        other: u64,
    },
    /// The region was made from a memslot binding ([`RegionSpec::from_binding`]) of another
    /// file than the one given (`EINVAL`).
    #[error("region at {gpa:#x}: the file is not the one its memslot binding binds")]
    NotBindingFile {
        /// Guest-physical address given.
        gpa: u64,
    },
    /// No region starts at this guest-physical address (`ENOENT`).
    #[error("no region starts at {gpa:#x}")]
    NoRegion {
        /// Guest-physical address given.
        gpa: u64,
    },
    /// The file cannot be mapped by the host (created without `MMAP`): `ENODEV`.
    #[error("region at {gpa:#x}: the file has no host mapping")]
    NotMappable {
        /// Guest-physical address given.
        gpa: u64,
    },
    /// [`HoldMode::Tracked`] asked for a HugeTLB file (`EINVAL`): a split of a huge page
    /// does not wait for tracked holds, and a tracked slice handed to the kernel (`O_DIRECT`,
    /// an io_uring buffer) would keep reaching the huge page a split leaves behind. HugeTLB
    /// regions hold with pins, which hold splits off.
    #[error("region at {gpa:#x}: tracked holds on a HugeTLB file (its splits wait for pins only)")]
    TrackedHugeTlb {
        /// Guest-physical address given.
        gpa: u64,
    },
    /// The region is larger than this host's address space (`EOVERFLOW`).
    #[error("region at {gpa:#x} is too large for this host")]
    TooLarge {
        /// Guest-physical address given.
        gpa: u64,
    },
    /// Mapping the region's host view failed.
    #[error("region at {gpa:#x}: {source}")]
    Map {
        /// Guest-physical address given.
        gpa: u64,
        /// gmem's error.
        #[source]
        source: MapError,
    },
    /// Identifying the file or registering its device listener failed.
    #[error("region at {gpa:#x}: {source}")]
    File {
        /// Guest-physical address given.
        gpa: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl LayoutError {
    /// The errno the kernel gives for the same memslot mistake.
    pub fn errno(&self) -> i32 {
        match self {
            LayoutError::Empty { .. }
            | LayoutError::Unaligned { .. }
            | LayoutError::Wraps { .. }
            | LayoutError::PastFile { .. }
            | LayoutError::FileOverlap { .. }
            | LayoutError::NotBindingFile { .. }
            | LayoutError::TrackedHugeTlb { .. } => libc::EINVAL,
            LayoutError::Overlap { .. } => libc::EEXIST,
            LayoutError::NoRegion { .. } => libc::ENOENT,
            LayoutError::NotMappable { .. } => libc::ENODEV,
            LayoutError::TooLarge { .. } => libc::EOVERFLOW,
            LayoutError::Map { source, .. } => source.errno(),
            LayoutError::File { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// The guest-physical address of the region the error is about.
    pub fn gpa(&self) -> u64 {
        match *self {
            LayoutError::Empty { gpa }
            | LayoutError::Unaligned { gpa, .. }
            | LayoutError::Wraps { gpa, .. }
            | LayoutError::PastFile { gpa, .. }
            | LayoutError::Overlap { gpa, .. }
            | LayoutError::FileOverlap { gpa, .. }
            | LayoutError::NotBindingFile { gpa }
            | LayoutError::TrackedHugeTlb { gpa }
            | LayoutError::NoRegion { gpa }
            | LayoutError::NotMappable { gpa }
            | LayoutError::TooLarge { gpa }
            | LayoutError::Map { gpa, .. }
            | LayoutError::File { gpa, .. } => gpa,
        }
    }
}

/// How a region's slices hold their pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldMode {
    /// A device listener ([`GuestMemfd::add_device_listener`]) tracks page states (poison
    /// included) and vetoes conversions of held pages; holds are thread slots
    /// ([`crate::hold`]), slices point into a gmem host view (where a private page would
    /// fault, never read). The default for shmem and kernel guest_memfd files, the owner's
    /// and followers' alike (a file attached from another process with
    /// [`GuestMemfd::attach`]: the owner's steps reach its listeners, and their veto
    /// refuses the owner's conversion).
    Tracked,
    /// A gmem [`Pin`](gmem::Pin) per slice, pointing into gmem's device view. The default for
    /// HugeTLB files (a huge page is not split or merged while a pin holds a page of it: a
    /// conversion that would is refused with `EAGAIN`). Each slice pays gmem's page lock and
    /// per-page reference counts: about 60 ns more than `Tracked` per slice here
    /// (`BENCHMARKS.md`).
    Pinned,
}

/// One region of the layout: `len` bytes of `file` from `offset`, at guest-physical `gpa`.
#[derive(Debug, Clone)]
pub struct RegionSpec {
    /// First guest-physical address (page aligned).
    pub gpa: u64,
    /// The guest memory file.
    pub file: GuestMemfd,
    /// File offset mapped at `gpa` (page aligned).
    pub offset: u64,
    /// Length in bytes (page aligned, non-zero).
    pub len: u64,
    /// How slices hold pages; `None` chooses: [`HoldMode::Pinned`] for HugeTLB,
    /// [`HoldMode::Tracked`] otherwise. `Tracked` on a HugeTLB file is refused
    /// ([`LayoutError::TrackedHugeTlb`]).
    pub hold: Option<HoldMode>,
    /// The identity of the file the memslot binding this region was made from binds
    /// ([`RegionSpec::from_binding`]); the layout refuses the region when `file` is another
    /// ([`LayoutError::NotBindingFile`]). `None`: no binding to check against.
    pub binding_file: Option<FileId>,
}

impl RegionSpec {
    /// A region of the file's owner.
    pub fn new(gpa: u64, file: GuestMemfd, offset: u64, len: u64) -> Self {
        RegionSpec {
            gpa,
            file,
            offset,
            len,
            hold: None,
            binding_file: None,
        }
    }

    /// A region of a file attached from another process ([`GuestMemfd::attach`]). Holds work
    /// as in the owner (tracked on shmem and kernel guest_memfd files, pins on HugeTLB): a
    /// held slice makes the owner's conversion of its pages fail with `EAGAIN`.
    pub fn follower(gpa: u64, file: GuestMemfd, offset: u64, len: u64) -> Self {
        RegionSpec::new(gpa, file, offset, len)
    }

    /// The region of a gmem-kvm memslot binding of `file`. Building a layout with it fails
    /// with [`LayoutError::NotBindingFile`] when `file` is not the file `binding` binds.
    pub fn from_binding(binding: &gmem_kvm::Binding, file: GuestMemfd) -> Self {
        RegionSpec {
            binding_file: Some(binding.file_id()),
            ..RegionSpec::new(binding.gpa().raw(), file, binding.offset(), binding.len())
        }
    }

    /// The hold mode this region will use.
    pub fn hold_mode(&self) -> HoldMode {
        self.hold.unwrap_or(match self.file.backing_kind() {
            BackingKind::HugeTlb(_) => HoldMode::Pinned,
            _ => HoldMode::Tracked,
        })
    }

    /// One past the last guest-physical address.
    pub(crate) fn end(&self) -> u64 {
        self.gpa.saturating_add(self.len)
    }

    /// Checks the region alone: alignment, wrap, inside the file.
    pub(crate) fn check(&self) -> Result<(), LayoutError> {
        let (gpa, offset, len) = (self.gpa, self.offset, self.len);
        if len == 0 {
            return Err(LayoutError::Empty { gpa });
        }
        if gpa % PAGE_SIZE != 0 || offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(LayoutError::Unaligned { gpa, offset, len });
        }
        let (Some(_), Some(file_end)) = (gpa.checked_add(len), offset.checked_add(len)) else {
            return Err(LayoutError::Wraps { gpa, offset, len });
        };
        let size = self.file.size();
        if file_end > size {
            return Err(LayoutError::PastFile {
                gpa,
                offset,
                len,
                size,
            });
        }
        if usize::try_from(len).is_err() {
            return Err(LayoutError::TooLarge { gpa });
        }
        if !self.file.flags().contains(gmem::Flags::MMAP) {
            return Err(LayoutError::NotMappable { gpa });
        }
        if self.hold == Some(HoldMode::Tracked)
            && matches!(self.file.backing_kind(), BackingKind::HugeTlb(_))
        {
            return Err(LayoutError::TrackedHugeTlb { gpa });
        }
        Ok(())
    }

    /// Checks this region against one already in the layout.
    pub(crate) fn check_against(
        &self,
        other_gpa: u64,
        other_len: u64,
        other_offset: u64,
        same_file: bool,
    ) -> Result<(), LayoutError> {
        let other_end = other_gpa + other_len;
        if self.gpa < other_end && other_gpa < self.end() {
            return Err(LayoutError::Overlap {
                gpa: self.gpa,
                len: self.len,
                other: other_gpa,
            });
        }
        if same_file
            && self.offset < other_offset + other_len
            && other_offset < self.offset + self.len
        {
            return Err(LayoutError::FileOverlap {
                gpa: self.gpa,
                offset: self.offset,
                other: other_gpa,
            });
        }
        Ok(())
    }
}
