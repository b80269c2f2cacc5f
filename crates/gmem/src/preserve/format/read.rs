//! Reading a state from untrusted bytes: a bounds-checked cursor, one function per section,
//! and the cross-section checks of each file (the layout is in the
//! [parent module's docs](super)).

use super::super::crc::{crc32c, update};
use super::super::error::FormatError;
use super::{
    tag, Binding, FileState, NumaMode, NumaRecord, PinRecord, RestructureKind, Restructured,
    RunRecord, State, VmLink, FLAG_OPTIONAL, HEADER_LEN, MAGIC, MAX_FILES, MAX_FILE_SIZE,
    MAX_NUMA_WORDS, MAX_STATE_LEN, VERSION,
};
use crate::backing::BackingKind;
use crate::model::attr::Attr;
use crate::model::flags::Flags;
use crate::model::units::PAGE_SIZE;
use crate::verbs::FileId;

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

/// What the header announces.
struct Header {
    files: usize,
    sections: u32,
    crc: u32,
    generation: u64,
}

impl State {
    /// Parses and validates a state from untrusted bytes. Never panics; every failure names
    /// the byte offset where the problem was found.
    pub fn decode(bytes: &[u8]) -> Result<State, FormatError> {
        if bytes.len() > MAX_STATE_LEN {
            return Err(FormatError::TooLarge { len: bytes.len() });
        }
        let mut r = Reader::new(bytes, 0);
        let header = read_header(&mut r, bytes.len())?;
        check_checksum(bytes, header.crc)?;
        let mut parts: Vec<Partial> = (0..header.files).map(|_| Partial::default()).collect();
        for _ in 0..header.sections {
            read_section(&mut r, &mut parts)?;
        }
        if !r.done() {
            return Err(invalid(r.at(), "bytes after the last section"));
        }
        let mut out = Vec::with_capacity(header.files);
        for p in parts {
            out.push(finish(p)?);
        }
        Ok(State {
            generation: header.generation,
            files: out,
        })
    }
}

/// Reads and checks the header of a state of `len` bytes, leaving `r` at the first section.
fn read_header(r: &mut Reader<'_>, len: usize) -> Result<Header, FormatError> {
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
    if usize::try_from(total).ok() != Some(len) {
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
    Ok(Header {
        files,
        sections,
        crc,
        generation,
    })
}

/// Checks the checksum of the whole state (computed with its own header field zeroed)
/// against `crc`, the one the header announces.
fn check_checksum(bytes: &[u8], crc: u32) -> Result<(), FormatError> {
    let mut zeroed = [0u8; HEADER_LEN];
    zeroed.copy_from_slice(bytes.get(..HEADER_LEN).ok_or(FormatError::Truncated {
        at: 0,
        need: HEADER_LEN,
    })?);
    zeroed[32..36].fill(0);
    let body = bytes.get(HEADER_LEN..).unwrap_or(&[]);
    let actual = update(crc32c(&zeroed), body);
    if actual != crc {
        return Err(FormatError::Checksum {
            expected: crc,
            actual,
        });
    }
    Ok(())
}

/// Reads one section at `r` (header, payload and padding) and parses it into the part of
/// the file it names; skips an unknown section marked optional.
fn read_section(r: &mut Reader<'_>, parts: &mut [Partial]) -> Result<(), FormatError> {
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
            return Ok(());
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
    parse_section(t, Reader::new(payload, payload_at), part, at)
}

fn parse_section(t: u16, r: Reader<'_>, part: &mut Partial, at: usize) -> Result<(), FormatError> {
    match t {
        tag::FILE => section_file(r, part, at),
        tag::RUNS => section_runs(r, part, at),
        tag::NUMA => section_numa(r, part, at),
        tag::BINDINGS => section_bindings(r, part, at),
        tag::RESTRUCTURE => section_restructure(r, part, at),
        tag::POISON => section_poison(r, part, at),
        tag::PINS => section_pins(r, part, at),
        tag::VM => section_vm(r, part, at),
        _ => Err(FormatError::UnknownSection { at, tag: t }),
    }
}

/// `FILE`: kind, flags, size, block size, identity.
fn section_file(mut r: Reader<'_>, part: &mut Partial, at: usize) -> Result<(), FormatError> {
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

/// `RUNS`: the attribute runs.
fn section_runs(mut r: Reader<'_>, part: &mut Partial, at: usize) -> Result<(), FormatError> {
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

/// `NUMA`: mode and node mask.
fn section_numa(mut r: Reader<'_>, part: &mut Partial, at: usize) -> Result<(), FormatError> {
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

/// `BINDINGS`: file ranges bound to guest-physical ranges.
fn section_bindings(mut r: Reader<'_>, part: &mut Partial, at: usize) -> Result<(), FormatError> {
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

/// `RESTRUCTURE`: split and waiting huge pages.
fn section_restructure(
    mut r: Reader<'_>,
    part: &mut Partial,
    at: usize,
) -> Result<(), FormatError> {
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

/// `POISON`: poisoned page offsets.
fn section_poison(mut r: Reader<'_>, part: &mut Partial, at: usize) -> Result<(), FormatError> {
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

/// `PINS`: pins to take again.
fn section_pins(mut r: Reader<'_>, part: &mut Partial, at: usize) -> Result<(), FormatError> {
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

/// `VM`: the VM link.
fn section_vm(mut r: Reader<'_>, part: &mut Partial, at: usize) -> Result<(), FormatError> {
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
    // Taking a pin again costs a reference per page: the pins may cover the file once in
    // all, so no state makes the new owner work longer than for one pass over its pages.
    let pinned = pins
        .iter()
        .try_fold(0u64, |acc, p| acc.checked_add(p.len.div_ceil(PAGE_SIZE)));
    if pinned.is_none_or(|n| n > size / PAGE_SIZE) {
        return Err(invalid(
            HEADER_LEN,
            "pins cover more pages than the file holds",
        ));
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
