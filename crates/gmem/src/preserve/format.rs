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

use crate::attr::Attr;
use crate::backing::BackingKind;
use crate::file::FileId;
use crate::flags::Flags;
use crate::sys::PAGE_SIZE;

use super::crc::crc32c;
use super::error::FormatError;

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
mod tag {
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

const FLAG_OPTIONAL: u32 = 1;

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
    pub fn from_policy(p: &crate::numa::NumaPolicy) -> NumaRecord {
        use crate::numa::NumaPolicy as P;
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
    pub fn to_policy(&self) -> Result<crate::numa::NumaPolicy, crate::numa::NumaError> {
        crate::numa::NumaPolicy::from_raw(
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

// ---------------------------------------------------------------------------------------
// Encoding

struct Writer {
    buf: Vec<u8>,
    sections: u32,
}

impl Writer {
    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn section(
        &mut self,
        tag: u16,
        file: u32,
        body: impl FnOnce(&mut Writer),
    ) -> Result<(), FormatError> {
        let at = self.buf.len();
        self.buf.extend_from_slice(&tag.to_le_bytes());
        self.buf.extend_from_slice(&1u16.to_le_bytes());
        self.u32(file);
        self.u32(0);
        self.u32(0);
        let start = self.buf.len();
        body(self);
        let len = self.buf.len() - start;
        let len32 = u32::try_from(len).map_err(|_| FormatError::TooLarge {
            len: self.buf.len(),
        })?;
        self.buf[at + 12..at + 16].copy_from_slice(&len32.to_le_bytes());
        self.buf.resize(start + len.next_multiple_of(8), 0);
        self.sections += 1;
        if self.buf.len() > MAX_STATE_LEN {
            return Err(FormatError::TooLarge {
                len: self.buf.len(),
            });
        }
        Ok(())
    }
}

fn kind_code(kind: BackingKind) -> u32 {
    match kind {
        BackingKind::Shmem => 0,
        BackingKind::HugeTlb(_) => 1,
        BackingKind::KernelGuestMemfd => 2,
    }
}

fn numa_code(mode: NumaMode) -> u32 {
    match mode {
        NumaMode::Default => 0,
        NumaMode::Preferred => 1,
        NumaMode::Bind => 2,
        NumaMode::Interleave => 3,
    }
}

impl State {
    /// Serialises the state. Fails with `E2BIG` past [`MAX_STATE_LEN`] or [`MAX_FILES`].
    /// The result decodes back to an equal state when the state is valid.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        if self.files.is_empty() || self.files.len() > MAX_FILES {
            return Err(FormatError::Invalid {
                at: 24,
                what: "file count",
            });
        }
        let mut w = Writer {
            buf: Vec::with_capacity(HEADER_LEN),
            sections: 0,
        };
        w.buf.resize(HEADER_LEN, 0);
        for (i, f) in self.files.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            w.section(tag::FILE, i, |w| {
                w.u32(kind_code(f.kind));
                w.u32(0);
                w.u64(f.flags.bits());
                w.u64(f.size);
                w.u64(f.block_size);
                w.u64(f.id.dev);
                w.u64(f.id.ino);
            })?;
            w.section(tag::RUNS, i, |w| {
                for r in &f.runs {
                    w.u64((r.start_page << 1) | u64::from(r.attr == Attr::Private));
                }
            })?;
            if f.numa != NumaRecord::default() {
                w.section(tag::NUMA, i, |w| {
                    w.u32(numa_code(f.numa.mode));
                    w.u32(0);
                    for &n in &f.numa.nodes {
                        w.u64(n);
                    }
                })?;
            }
            if !f.bindings.is_empty() {
                w.section(tag::BINDINGS, i, |w| {
                    for b in &f.bindings {
                        w.u32(b.slot);
                        w.u32(0);
                        w.u64(b.offset);
                        w.u64(b.gpa);
                        w.u64(b.size);
                    }
                })?;
            }
            if !f.restructure.is_empty() {
                w.section(tag::RESTRUCTURE, i, |w| {
                    for r in &f.restructure {
                        w.u64(r.offset);
                        w.u64(r.len);
                        w.u32(match r.kind {
                            RestructureKind::Split => 1,
                            RestructureKind::PendingMerge => 2,
                        });
                        w.u32(0);
                    }
                })?;
            }
            if !f.poison.is_empty() {
                w.section(tag::POISON, i, |w| {
                    for &p in &f.poison {
                        w.u64(p);
                    }
                })?;
            }
            if !f.pins.is_empty() {
                w.section(tag::PINS, i, |w| {
                    for p in &f.pins {
                        w.u64(p.offset);
                        w.u64(p.len);
                        w.u64(p.tag);
                    }
                })?;
            }
            if let VmLink::Carried { token } = f.vm {
                w.section(tag::VM, i, |w| {
                    w.u32(1);
                    w.u32(0);
                    w.u64(token);
                })?;
            }
        }
        let total = w.buf.len();
        let files = u32::try_from(self.files.len()).unwrap_or(u32::MAX);
        let h = &mut w.buf[..HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..10].copy_from_slice(&VERSION.to_le_bytes());
        h[10..12].copy_from_slice(&u16::try_from(HEADER_LEN).unwrap_or(0).to_le_bytes());
        h[16..24].copy_from_slice(&u64::try_from(total).unwrap_or(u64::MAX).to_le_bytes());
        h[24..28].copy_from_slice(&files.to_le_bytes());
        h[28..32].copy_from_slice(&w.sections.to_le_bytes());
        h[40..48].copy_from_slice(&self.generation.to_le_bytes());
        let crc = crc32c(&w.buf);
        w.buf[32..36].copy_from_slice(&crc.to_le_bytes());
        Ok(w.buf)
    }
}

// ---------------------------------------------------------------------------------------
// Decoding

/// A bounds-checked cursor over untrusted bytes; `at` is the absolute offset of `buf[0]`.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize) -> Self {
        Reader { buf, pos: 0, base }
    }
    fn at(&self) -> usize {
        self.base + self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end.and_then(|e| self.buf.get(self.pos..e)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(FormatError::Truncated {
                at: self.at(),
                need: n,
            }),
        }
    }
    fn u16(&mut self) -> Result<u16, FormatError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        let b = self.take(8)?;
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        Ok(u64::from_le_bytes(w))
    }
    fn zero32(&mut self, what: &'static str) -> Result<(), FormatError> {
        let at = self.at();
        if self.u32()? != 0 {
            return Err(FormatError::Invalid { at, what });
        }
        Ok(())
    }
    fn done(&self) -> bool {
        self.pos == self.buf.len()
    }
    /// The number of `size`-byte records, refusing a payload that is not a whole number.
    fn records(&self, size: usize, what: &'static str) -> Result<usize, FormatError> {
        if self.buf.len() % size != 0 {
            return Err(FormatError::Invalid {
                at: self.base,
                what,
            });
        }
        Ok(self.buf.len() / size)
    }
}

fn invalid(at: usize, what: &'static str) -> FormatError {
    FormatError::Invalid { at, what }
}

/// Sections seen so far for one file.
#[derive(Default)]
struct Partial {
    file: Option<(BackingKind, u64, Flags, u64, FileId)>,
    runs: Option<Vec<RunRecord>>,
    numa: Option<NumaRecord>,
    bindings: Option<Vec<Binding>>,
    restructure: Option<Vec<Restructured>>,
    poison: Option<Vec<u64>>,
    pins: Option<Vec<PinRecord>>,
    vm: Option<VmLink>,
}

fn put<T>(slot: &mut Option<T>, v: T, at: usize) -> Result<(), FormatError> {
    if slot.is_some() {
        return Err(invalid(at, "duplicate section"));
    }
    *slot = Some(v);
    Ok(())
}

impl State {
    /// Parses and validates a state from untrusted bytes. Never panics; every failure names
    /// the byte offset where the problem was found.
    pub fn decode(bytes: &[u8]) -> Result<State, FormatError> {
        if bytes.len() > MAX_STATE_LEN {
            return Err(FormatError::TooLarge { len: bytes.len() });
        }
        let mut r = Reader::new(bytes, 0);
        if r.take(8)? != MAGIC {
            return Err(invalid(0, "magic"));
        }
        let version = r.u16()?;
        if version != VERSION {
            return Err(FormatError::Version { version });
        }
        if usize::from(r.u16()?) != HEADER_LEN {
            return Err(invalid(10, "header length"));
        }
        r.zero32("header flags")?;
        let total = r.u64()?;
        if usize::try_from(total).ok() != Some(bytes.len()) {
            return Err(FormatError::Truncated {
                at: 16,
                need: usize::try_from(total).unwrap_or(usize::MAX),
            });
        }
        let files = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
        if files == 0 || files > MAX_FILES {
            return Err(invalid(24, "file count"));
        }
        let sections = r.u32()?;
        let crc = r.u32()?;
        r.zero32("reserved header word")?;
        let generation = r.u64()?;
        let mut zeroed = [0u8; HEADER_LEN];
        zeroed.copy_from_slice(bytes.get(..HEADER_LEN).ok_or(FormatError::Truncated {
            at: 0,
            need: HEADER_LEN,
        })?);
        zeroed[32..36].fill(0);
        let body = bytes.get(HEADER_LEN..).unwrap_or(&[]);
        let actual = super::crc::update(crc32c(&zeroed), body);
        if actual != crc {
            return Err(FormatError::Checksum {
                expected: crc,
                actual,
            });
        }
        let mut parts: Vec<Partial> = (0..files).map(|_| Partial::default()).collect();
        for _ in 0..sections {
            let at = r.at();
            let t = r.u16()?;
            let v = r.u16()?;
            let file = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
            let flags = r.u32()?;
            let len = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
            if flags & !FLAG_OPTIONAL != 0 {
                return Err(invalid(at + 8, "section flags"));
            }
            let payload_at = r.at();
            let payload = r.take(len)?;
            let pad = r.take(len.next_multiple_of(8) - len)?;
            if pad.iter().any(|&b| b != 0) {
                return Err(invalid(payload_at + len, "section padding"));
            }
            if t == 0 || t > tag::LAST {
                if flags & FLAG_OPTIONAL != 0 {
                    continue;
                }
                return Err(FormatError::UnknownSection { at, tag: t });
            }
            if v != 1 {
                return Err(FormatError::SectionVersion {
                    at,
                    tag: t,
                    version: v,
                });
            }
            let part = parts
                .get_mut(file)
                .ok_or(invalid(at + 4, "section file index"))?;
            parse_section(t, Reader::new(payload, payload_at), part, at)?;
        }
        if !r.done() {
            return Err(invalid(r.at(), "bytes after the last section"));
        }
        let mut out = Vec::with_capacity(files);
        for p in parts {
            out.push(finish(p)?);
        }
        Ok(State {
            generation,
            files: out,
        })
    }
}

fn parse_section(
    t: u16,
    mut r: Reader<'_>,
    part: &mut Partial,
    at: usize,
) -> Result<(), FormatError> {
    match t {
        tag::FILE => {
            if r.buf.len() != 48 {
                return Err(invalid(at + 12, "FILE section length"));
            }
            let kind_at = r.at();
            let kind = r.u32()?;
            r.zero32("FILE reserved word")?;
            let flags_at = r.at();
            let flags = Flags::from_bits_retain(r.u64()?);
            let size_at = r.at();
            let size = r.u64()?;
            let block_at = r.at();
            let block = r.u64()?;
            let id = FileId {
                dev: r.u64()?,
                ino: r.u64()?,
            };
            if !flags.difference(Flags::ALL).is_empty() {
                return Err(invalid(flags_at, "unknown file flags"));
            }
            let kind = match kind {
                0 if block == PAGE_SIZE => BackingKind::Shmem,
                2 if block == PAGE_SIZE => BackingKind::KernelGuestMemfd,
                1 if block.is_power_of_two() && block > PAGE_SIZE && block <= 1 << 30 => {
                    BackingKind::HugeTlb(block)
                }
                0..=2 => return Err(invalid(block_at, "block size")),
                _ => return Err(invalid(kind_at, "backing kind")),
            };
            if size == 0 || size % block != 0 || size > MAX_FILE_SIZE {
                return Err(invalid(size_at, "file size"));
            }
            put(&mut part.file, (kind, block, flags, size, id), at)
        }
        tag::RUNS => {
            let n = r.records(8, "RUNS section length")?;
            if n == 0 {
                return Err(invalid(at, "no runs"));
            }
            let mut runs = Vec::with_capacity(n);
            let mut prev: Option<RunRecord> = None;
            for _ in 0..n {
                let w_at = r.at();
                let w = r.u64()?;
                let run = RunRecord {
                    start_page: w >> 1,
                    attr: if w & 1 == 1 {
                        Attr::Private
                    } else {
                        Attr::Shared
                    },
                };
                match prev {
                    None if run.start_page != 0 => {
                        return Err(invalid(w_at, "first run does not start at 0"))
                    }
                    Some(p) if run.start_page <= p.start_page => {
                        return Err(invalid(w_at, "runs not increasing"))
                    }
                    Some(p) if run.attr == p.attr => return Err(invalid(w_at, "runs not merged")),
                    _ => {}
                }
                runs.push(run);
                prev = Some(run);
            }
            put(&mut part.runs, runs, at)
        }
        tag::NUMA => {
            let mode_at = r.at();
            let mode = match r.u32()? {
                0 => NumaMode::Default,
                1 => NumaMode::Preferred,
                2 => NumaMode::Bind,
                3 => NumaMode::Interleave,
                _ => return Err(invalid(mode_at, "NUMA mode")),
            };
            r.zero32("NUMA reserved word")?;
            let mask = Reader::new(&r.buf[r.pos..], r.at());
            let words = mask.records(8, "NUMA mask length")?;
            if words > MAX_NUMA_WORDS {
                return Err(invalid(mask.base, "NUMA mask too long"));
            }
            let mut nodes = Vec::with_capacity(words);
            for _ in 0..words {
                nodes.push(r.u64()?);
            }
            let fits = if mode == NumaMode::Default {
                nodes.is_empty()
            } else {
                nodes.iter().any(|&w| w != 0)
            };
            if !fits {
                return Err(invalid(mask.base, "NUMA mask does not fit the mode"));
            }
            put(&mut part.numa, NumaRecord { mode, nodes }, at)
        }
        tag::BINDINGS => {
            let n = r.records(32, "BINDINGS section length")?;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let b_at = r.at();
                let slot = r.u32()?;
                r.zero32("binding reserved word")?;
                let b = Binding {
                    slot,
                    offset: r.u64()?,
                    gpa: r.u64()?,
                    size: r.u64()?,
                };
                let aligned =
                    b.offset % PAGE_SIZE == 0 && b.gpa % PAGE_SIZE == 0 && b.size % PAGE_SIZE == 0;
                if !aligned
                    || b.size == 0
                    || b.gpa.checked_add(b.size).is_none()
                    || b.offset.checked_add(b.size).is_none()
                {
                    return Err(invalid(b_at, "binding range"));
                }
                v.push(b);
            }
            let mut by_off: Vec<&Binding> = v.iter().collect();
            by_off.sort_by_key(|b| b.offset);
            if by_off
                .windows(2)
                .any(|w| w[0].offset + w[0].size > w[1].offset)
            {
                return Err(invalid(at, "bindings overlap in the file"));
            }
            by_off.sort_by_key(|b| b.gpa);
            if by_off.windows(2).any(|w| w[0].gpa + w[0].size > w[1].gpa) {
                return Err(invalid(at, "bindings overlap in guest-physical space"));
            }
            by_off.sort_by_key(|b| b.slot);
            if by_off.windows(2).any(|w| w[0].slot == w[1].slot) {
                return Err(invalid(at, "two bindings with one slot"));
            }
            put(&mut part.bindings, v, at)
        }
        tag::RESTRUCTURE => {
            let n = r.records(24, "RESTRUCTURE section length")?;
            let mut v: Vec<Restructured> = Vec::with_capacity(n);
            for _ in 0..n {
                let e_at = r.at();
                let offset = r.u64()?;
                let len = r.u64()?;
                let kind = match r.u32()? {
                    1 => RestructureKind::Split,
                    2 => RestructureKind::PendingMerge,
                    _ => return Err(invalid(e_at + 16, "restructure kind")),
                };
                r.zero32("restructure reserved word")?;
                if len == 0 || offset.checked_add(len).is_none() {
                    return Err(invalid(e_at, "restructure range"));
                }
                if v.last().is_some_and(|p| p.offset + p.len > offset) {
                    return Err(invalid(
                        e_at,
                        "restructure ranges not sorted or overlapping",
                    ));
                }
                v.push(Restructured { offset, len, kind });
            }
            put(&mut part.restructure, v, at)
        }
        tag::POISON => {
            let n = r.records(8, "POISON section length")?;
            let mut v: Vec<u64> = Vec::with_capacity(n);
            for _ in 0..n {
                let p_at = r.at();
                let p = r.u64()?;
                if p % PAGE_SIZE != 0 || v.last().is_some_and(|&l| l >= p) {
                    return Err(invalid(p_at, "poisoned page offset"));
                }
                v.push(p);
            }
            put(&mut part.poison, v, at)
        }
        tag::PINS => {
            let n = r.records(24, "PINS section length")?;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let p_at = r.at();
                let p = PinRecord {
                    offset: r.u64()?,
                    len: r.u64()?,
                    tag: r.u64()?,
                };
                if p.len == 0 || p.offset.checked_add(p.len).is_none() {
                    return Err(invalid(p_at, "pin range"));
                }
                v.push(p);
            }
            put(&mut part.pins, v, at)
        }
        tag::VM => {
            if r.buf.len() != 16 {
                return Err(invalid(at + 12, "VM section length"));
            }
            let kind = r.u32()?;
            r.zero32("VM reserved word")?;
            let token = r.u64()?;
            let link = match (kind, token) {
                (0, 0) => VmLink::None,
                (1, token) => VmLink::Carried { token },
                _ => return Err(invalid(r.base, "VM link")),
            };
            put(&mut part.vm, link, at)
        }
        _ => Err(FormatError::UnknownSection { at, tag: t }),
    }
}

/// Checks that the sections of one file agree with its size and builds the file's state.
fn finish(p: Partial) -> Result<FileState, FormatError> {
    let (kind, block_size, flags, size, id) = p
        .file
        .ok_or(invalid(HEADER_LEN, "file without FILE section"))?;
    let runs = p
        .runs
        .ok_or(invalid(HEADER_LEN, "file without RUNS section"))?;
    let pages = size / PAGE_SIZE;
    if runs.last().is_some_and(|r| r.start_page >= pages) {
        return Err(invalid(HEADER_LEN, "run past the end of the file"));
    }
    let bindings = p.bindings.unwrap_or_default();
    if bindings.iter().any(|b| b.offset + b.size > size) {
        return Err(invalid(HEADER_LEN, "binding past the end of the file"));
    }
    let restructure = p.restructure.unwrap_or_default();
    if restructure
        .iter()
        .any(|r| r.offset % block_size != 0 || r.len % block_size != 0 || r.offset + r.len > size)
    {
        return Err(invalid(
            HEADER_LEN,
            "restructure range not block aligned or past the end",
        ));
    }
    let poison = p.poison.unwrap_or_default();
    if poison.last().is_some_and(|&o| o >= size) {
        return Err(invalid(
            HEADER_LEN,
            "poisoned page past the end of the file",
        ));
    }
    let pins = p.pins.unwrap_or_default();
    if pins.iter().any(|p| p.offset + p.len > size) {
        return Err(invalid(HEADER_LEN, "pin past the end of the file"));
    }
    Ok(FileState {
        kind,
        block_size,
        flags,
        size,
        id,
        runs,
        numa: p.numa.unwrap_or_default(),
        bindings,
        restructure,
        poison,
        pins,
        vm: p.vm.unwrap_or_default(),
    })
}
