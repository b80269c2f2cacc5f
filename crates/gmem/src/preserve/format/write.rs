//! Writing a state (the layout is in the [parent module's docs](super)).

use super::super::crc::crc32c;
use super::super::error::FormatError;
use super::{
    tag, FileState, NumaMode, NumaRecord, RestructureKind, State, VmLink, HEADER_LEN, MAGIC,
    MAX_FILES, MAX_STATE_LEN, VERSION,
};
use crate::backing::BackingKind;
use crate::model::attr::Attr;

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
            write_file(&mut w, i, f)?;
        }
        Ok(finish_header(w, self.files.len(), self.generation))
    }
}

/// Writes the sections of file `i`: file and runs always, the others when not empty.
fn write_file(w: &mut Writer, i: u32, f: &FileState) -> Result<(), FormatError> {
    section_file(w, i, f)?;
    section_runs(w, i, f)?;
    section_numa(w, i, f)?;
    section_bindings(w, i, f)?;
    section_restructure(w, i, f)?;
    section_poison(w, i, f)?;
    section_pins(w, i, f)?;
    section_vm(w, i, f)
}

/// Writes the file section of file `i`: kind, flags, size, block size and identity.
fn section_file(w: &mut Writer, i: u32, f: &FileState) -> Result<(), FormatError> {
    w.section(tag::FILE, i, |w| {
        w.u32(kind_code(f.kind));
        w.u32(0);
        w.u64(f.flags.bits());
        w.u64(f.size);
        w.u64(f.block_size);
        w.u64(f.id.dev);
        w.u64(f.id.ino);
    })
}

/// Writes the runs section of file `i`: the first page of each run, its attribute in bit 0.
fn section_runs(w: &mut Writer, i: u32, f: &FileState) -> Result<(), FormatError> {
    w.section(tag::RUNS, i, |w| {
        for r in &f.runs {
            w.u64((r.start_page << 1) | u64::from(r.attr == Attr::Private));
        }
    })
}

/// Writes the NUMA section of file `i`, when its policy is not the default one.
fn section_numa(w: &mut Writer, i: u32, f: &FileState) -> Result<(), FormatError> {
    if f.numa != NumaRecord::default() {
        w.section(tag::NUMA, i, |w| {
            w.u32(numa_code(f.numa.mode));
            w.u32(0);
            for &n in &f.numa.nodes {
                w.u64(n);
            }
        })?;
    }
    Ok(())
}

/// Writes the bindings section of file `i`, when it has bindings.
fn section_bindings(w: &mut Writer, i: u32, f: &FileState) -> Result<(), FormatError> {
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
    Ok(())
}

/// Writes the restructuring section of file `i`, when it has split or merging huge pages.
fn section_restructure(w: &mut Writer, i: u32, f: &FileState) -> Result<(), FormatError> {
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
    Ok(())
}

/// Writes the poison section of file `i`, when it has poisoned pages.
fn section_poison(w: &mut Writer, i: u32, f: &FileState) -> Result<(), FormatError> {
    if !f.poison.is_empty() {
        w.section(tag::POISON, i, |w| {
            for &p in &f.poison {
                w.u64(p);
            }
        })?;
    }
    Ok(())
}

/// Writes the pins section of file `i`, when it has pins.
fn section_pins(w: &mut Writer, i: u32, f: &FileState) -> Result<(), FormatError> {
    if !f.pins.is_empty() {
        w.section(tag::PINS, i, |w| {
            for p in &f.pins {
                w.u64(p.offset);
                w.u64(p.len);
                w.u64(p.tag);
            }
        })?;
    }
    Ok(())
}

/// Writes the VM section of file `i`, when it carries a VM.
fn section_vm(w: &mut Writer, i: u32, f: &FileState) -> Result<(), FormatError> {
    if let VmLink::Carried { token } = f.vm {
        w.section(tag::VM, i, |w| {
            w.u32(1);
            w.u32(0);
            w.u64(token);
        })?;
    }
    Ok(())
}

/// Fills in the header of a state of `files` files and `generation`, checksum last, and
/// returns the whole state.
fn finish_header(mut w: Writer, files: usize, generation: u64) -> Vec<u8> {
    let total = w.buf.len();
    let files = u32::try_from(files).unwrap_or(u32::MAX);
    let h = &mut w.buf[..HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[10..12].copy_from_slice(&u16::try_from(HEADER_LEN).unwrap_or(0).to_le_bytes());
    h[16..24].copy_from_slice(&u64::try_from(total).unwrap_or(u64::MAX).to_le_bytes());
    h[24..28].copy_from_slice(&files.to_le_bytes());
    h[28..32].copy_from_slice(&w.sections.to_le_bytes());
    h[40..48].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32c(&w.buf);
    w.buf[32..36].copy_from_slice(&crc.to_le_bytes());
    w.buf
}
