//! The preserved state: what a new owner needs besides the file descriptors themselves.
//!
//! Contents never travel in the state: they are the files, handed over as descriptors. The
//! state describes each file (size, flags, backing, identity) and everything gmem keeps
//! outside the file: attributes, NUMA policy, bindings, restructuring metadata, poison and
//! the pins the new owner must take again. It is parsed as untrusted bytes: [`State::decode`]
//! checks every length against the input before reading, never panics, and refuses anything
//! it does not fully understand.
//!
//! # Byte layout (version 1, all integers little-endian)
//!
//! A 48-byte header, then `section_count` sections, nothing after them.
//!
//! | offset | size | field | rule |
//! |---:|---:|---|---|
//! | 0 | 8 | magic | `b"GMEMSTAT"` |
//! | 8 | 2 | version | `1` (other: `EPROTONOSUPPORT`) |
//! | 10 | 2 | header length | `48` |
//! | 12 | 4 | flags | `0` |
//! | 16 | 8 | total length | header + sections = the input's length, at most [`MAX_STATE_LEN`] (`E2BIG`) |
//! | 24 | 4 | file count | 1..=[`MAX_FILES`] |
//! | 28 | 4 | section count | |
//! | 32 | 4 | CRC-32C | over the whole state with this field zero (`EBADMSG`) |
//! | 36 | 4 | reserved | `0` |
//! | 40 | 8 | generation | how many hand-overs this memory has been through |
//!
//! Each section is a 16-byte header and a payload padded with zeros to a multiple of 8:
//!
//! | offset | size | field | rule |
//! |---:|---:|---|---|
//! | 0 | 2 | tag | see below; an unknown tag is refused unless flag bit 0 (*optional*) is set |
//! | 2 | 2 | version | `1` for every tag below |
//! | 4 | 4 | file | index of the file it describes (`< file count`) |
//! | 8 | 4 | flags | bit 0: optional (a reader that does not know the tag skips it) |
//! | 12 | 4 | payload length | bytes, before padding |
//!
//! Each file has exactly one `FILE` and one `RUNS` section and at most one of each other.
//! File `i` is descriptor `i` of the hand-over (after the state's own descriptor).
//!
//! | tag | section | payload |
//! |---:|---|---|
//! | 1 | `FILE` | `kind:u32` (0 shmem, 1 HugeTLB, 2 kernel guest_memfd), `0:u32`, `flags:u64`, `size:u64`, `block_size:u64`, `dev:u64`, `ino:u64` (48 bytes) |
//! | 2 | `RUNS` | one `u64` per run: `start_page << 1 \| private`; the first starts at 0, starts increase, attributes alternate, all below the page count |
//! | 3 | `NUMA` | `mode:u32` (0 default, 1 preferred, 2 bind, 3 interleave), `0:u32`, then up to 16 `u64` node-mask words (none for default, a non-zero mask otherwise) |
//! | 4 | `BINDINGS` | 32 bytes each: `slot:u32`, `0:u32`, `offset:u64`, `gpa:u64`, `size:u64`; page aligned, non-empty, inside the file, no overlap in the file or in guest-physical space, distinct slots |
//! | 5 | `RESTRUCTURE` | 24 bytes each: `offset:u64`, `len:u64`, `kind:u32` (1 split, 2 waiting to merge), `0:u32`; block aligned, inside the file, sorted, disjoint |
//! | 6 | `POISON` | one `u64` per poisoned page offset: page aligned, inside the file, increasing |
//! | 7 | `PINS` | 24 bytes each: `offset:u64`, `len:u64`, `tag:u64`; non-empty, inside the file |
//! | 8 | `VM` | `kind:u32` (0 none, 1 carried by the kernel), `0:u32`, `token:u64` (0 for none) |
//!
//! The `VM` section is where a kernel that can carry a VM across a live update (a preserved
//! VM file descriptor or session token) would be named; today it is always *none* and the
//! kernel guest_memfd backing is restored by copy ([`super::copy`]).

mod read;
mod write;

use crate::backing::BackingKind;
use crate::model::attr::Attr;
use crate::model::flags::Flags;
use crate::model::units::PAGE_SIZE;
use crate::verbs::FileId;

/// The state's magic bytes.
pub const MAGIC: [u8; 8] = *b"GMEMSTAT";
/// The only version this build writes and reads.
pub const VERSION: u16 = 1;
/// Length of the header.
pub const HEADER_LEN: usize = 48;
/// Length of a section header.
pub const SECTION_HEADER_LEN: usize = 16;
/// Largest state accepted (64 MiB: 8 million runs).
pub const MAX_STATE_LEN: usize = 64 << 20;
/// Largest number of files in one state (bounded by the 253 descriptors `SCM_RIGHTS` carries
/// in one message, one of which is the state itself).
pub const MAX_FILES: usize = 250;
/// Largest NUMA node mask, in 64-bit words (1024 nodes).
pub const MAX_NUMA_WORDS: usize = 16;
/// Largest file size accepted (2^52 bytes, 4 PiB).
pub const MAX_FILE_SIZE: u64 = 1 << 52;

/// Section tags.
pub(crate) mod tag {
    pub const FILE: u16 = 1;
    pub const RUNS: u16 = 2;
    pub const NUMA: u16 = 3;
    pub const BINDINGS: u16 = 4;
    pub const RESTRUCTURE: u16 = 5;
    pub const POISON: u16 = 6;
    pub const PINS: u16 = 7;
    pub const VM: u16 = 8;
    pub const LAST: u16 = 8;
}

pub(crate) const FLAG_OPTIONAL: u32 = 1;

/// One run of equal attributes, in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunRecord {
    /// First page of the run (the run ends where the next begins, or at the end of the file).
    pub start_page: u64,
    /// Attribute of every page of the run.
    pub attr: Attr,
}

/// NUMA policy mode, with the kernel's `MPOL_*` numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NumaMode {
    /// `MPOL_DEFAULT`.
    #[default]
    Default,
    /// `MPOL_PREFERRED`.
    Preferred,
    /// `MPOL_BIND`.
    Bind,
    /// `MPOL_INTERLEAVE`.
    Interleave,
}

/// NUMA policy of a file as recorded: mode and host node mask (bit `n` of word `n / 64` =
/// node `n`). Converts to and from the core's [`crate::NumaPolicy`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NumaRecord {
    /// The mode.
    pub mode: NumaMode,
    /// The node mask; empty for [`NumaMode::Default`].
    pub nodes: Vec<u64>,
}

/// A file range bound to guest-physical memory, described without reference to any VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// Memory slot id the range was bound as.
    pub slot: u32,
    /// File offset.
    pub offset: u64,
    /// Guest-physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
}

/// What restructuring left on a huge page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestructureKind {
    /// The huge page is split into base pages.
    Split,
    /// Split pieces are waiting to merge back.
    PendingMerge,
}

/// Restructuring metadata for one range of huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restructured {
    /// File offset (block aligned).
    pub offset: u64,
    /// Length (block aligned).
    pub len: u64,
    /// What state the range is in.
    pub kind: RestructureKind,
}

/// A pin the new owner must take again (a DMA mapping, for example).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinRecord {
    /// File offset of the pinned range.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The owner's name for the pin (given back with the re-established pin).
    pub tag: u64,
}

/// How the file's VM link travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VmLink {
    /// The VM does not travel: the new owner creates its own (today's kernels).
    #[default]
    None,
    /// A kernel that preserves the VM across the update names it with this token.
    Carried {
        /// The kernel's token for the preserved VM.
        token: u64,
    },
}

/// Everything preserved about one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileState {
    /// Backing kind.
    pub kind: BackingKind,
    /// Allocation unit of the backing.
    pub block_size: u64,
    /// Creation flags.
    pub flags: Flags,
    /// Size in bytes.
    pub size: u64,
    /// Identity of the file (checked against the received descriptor with `fstat`).
    pub id: FileId,
    /// Attribute runs covering the whole file.
    pub runs: Vec<RunRecord>,
    /// NUMA policy.
    pub numa: NumaRecord,
    /// Bindings to guest-physical memory.
    pub bindings: Vec<Binding>,
    /// Restructuring metadata (HugeTLB).
    pub restructure: Vec<Restructured>,
    /// Poisoned pages (byte offsets).
    pub poison: Vec<u64>,
    /// Pins to re-establish.
    pub pins: Vec<PinRecord>,
    /// VM link.
    pub vm: VmLink,
}

impl NumaRecord {
    /// The record of a core policy.
    pub fn from_policy(p: &crate::model::numa::NumaPolicy) -> NumaRecord {
        use crate::model::numa::NumaPolicy as P;
        let (mode, nodes): (NumaMode, &[u32]) = match p {
            P::Default => (NumaMode::Default, &[]),
            P::Preferred(n) => (NumaMode::Preferred, std::slice::from_ref(n)),
            P::Bind(v) => (NumaMode::Bind, v),
            P::Interleave(v) => (NumaMode::Interleave, v),
        };
        let mut mask = Vec::new();
        for &n in nodes {
            let (w, b) = (usize::try_from(n / 64).unwrap_or(usize::MAX), n % 64);
            if w >= MAX_NUMA_WORDS {
                continue;
            }
            if mask.len() <= w {
                mask.resize(w + 1, 0);
            }
            mask[w] |= 1u64 << b;
        }
        NumaRecord { mode, nodes: mask }
    }

    /// The node numbers in the mask, in order.
    pub fn node_list(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for (w, &word) in self.nodes.iter().enumerate() {
            for b in 0..64u32 {
                if word & (1u64 << b) != 0 {
                    out.push(
                        u32::try_from(w)
                            .unwrap_or(u32::MAX)
                            .saturating_mul(64)
                            .saturating_add(b),
                    );
                }
            }
        }
        out
    }

    /// The core policy this record describes (validated by the core when applied).
    pub fn to_policy(
        &self,
    ) -> Result<crate::model::numa::NumaPolicy, crate::model::numa::NumaError> {
        crate::model::numa::NumaPolicy::from_raw(
            match self.mode {
                NumaMode::Default => 0,
                NumaMode::Preferred => 1,
                NumaMode::Bind => 2,
                NumaMode::Interleave => 3,
            },
            &self.node_list(),
        )
    }
}

impl FileState {
    /// The number of base pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
}

/// A whole preserved state: one entry per handed-over file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// How many hand-overs this memory has been through.
    pub generation: u64,
    /// The files, in descriptor order.
    pub files: Vec<FileState>,
}
