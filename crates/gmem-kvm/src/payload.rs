//! Tiny real-mode guest programs, assembled here byte by byte.
//!
//! [`Asm`] emits the handful of 16-bit x86 instructions the tests, the demo and the benches
//! need: byte loads, stores and checks anywhere below 1 MiB (each memory operation loads its
//! segment register first), the doorbell request of [`crate::doorbell`], 32-bit port I/O, and
//! short jumps to labels. A program reports to the VMM by writing 32 bits to [`REPORT_PORT`]
//! (the runner returns [`crate::runner::Exit::IoOut`]) and ends with `hlt`.
//!
//! ```
//! use gmem_kvm::payload::{Asm, REPORT_OK};
//! use gmem_kvm::Gpa;
//! let mut asm = Asm::new();
//! let fail = asm.label();
//! asm.check_fill(Gpa::new(0x10000), 4096, 0xaa, 0xff, fail); // every byte 0xaa? make it 0xff
//! asm.report(REPORT_OK).hlt();
//! asm.place(fail).report(1).hlt();
//! let code = asm.finish()?;
//! assert_eq!(code[0], 0xb8); // mov ax, segment
//! # Ok::<(), gmem_kvm::payload::PayloadError>(())
//! ```

use crate::doorbell::{
    DOORBELL_ERROR_HI_PORT, DOORBELL_ERROR_LO_PORT, DOORBELL_PORT, DOORBELL_TO_PRIVATE,
};
use crate::gpa::Gpa;

/// Port a program writes 32 bits to in order to report a value to the VMM.
pub const REPORT_PORT: u16 = 0x0e10;
/// The value programs report for "all checks passed".
pub const REPORT_OK: u32 = 0x600d;
/// The value [`check_and_fill`] reports when a byte did not hold the expected value.
pub const REPORT_MISMATCH: u32 = 0xbad;
/// Real mode reaches guest-physical addresses below this bound (1 MiB).
pub const REAL_MODE_LIMIT: Gpa = Gpa::new(0x10_0000);

/// Why a program could not be assembled (`EINVAL`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// A jump's target is farther than a short jump reaches.
    #[error("jump at {at:#x} cannot reach label {label}")]
    JumpRange {
        /// Offset of the jump in the program.
        at: usize,
        /// The label.
        label: usize,
    },
    /// A label was jumped to but never placed.
    #[error("label {0} is never placed")]
    Unplaced(usize),
    /// An address or range real mode cannot reach in one segment.
    #[error("guest-physical range {gpa:#x}+{len:#x} is not reachable from real mode")]
    Unreachable {
        /// First address.
        gpa: Gpa,
        /// Length in bytes.
        len: u64,
    },
}

impl PayloadError {
    /// `EINVAL`, for every case.
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }
}

/// A jump target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label(usize);

/// 32-bit registers, by their x86 encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reg32 {
    /// `eax`
    Eax = 0,
    /// `ecx`
    Ecx = 1,
    /// `edx`
    Edx = 2,
    /// `ebx`
    Ebx = 3,
    /// `esi`
    Esi = 6,
    /// `edi`
    Edi = 7,
}

/// An assembler for 16-bit real-mode code.
#[derive(Debug, Default)]
pub struct Asm {
    code: Vec<u8>,
    labels: Vec<Option<usize>>,
    /// (position of the displacement, label, displacement width in bytes).
    fixups: Vec<(usize, usize, usize)>,
    error: Option<PayloadError>,
}

impl Asm {
    /// An empty program.
    pub fn new() -> Self {
        Self::default()
    }

    /// The program so far, in bytes.
    pub fn len(&self) -> usize {
        self.code.len()
    }

    /// True when nothing has been emitted.
    pub fn is_empty(&self) -> bool {
        self.code.is_empty()
    }

    fn emit(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }

    fn fail(&mut self, e: PayloadError) {
        self.error.get_or_insert(e);
    }

    /// A new label, placed later with [`Asm::place`].
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Places `l` at the current position.
    pub fn place(&mut self, l: Label) -> &mut Self {
        if let Some(slot) = self.labels.get_mut(l.0) {
            *slot = Some(self.code.len());
        }
        self
    }

    /// A jump with an 8-bit displacement (`loop`).
    fn rel8(&mut self, opcode: u8, l: Label) -> &mut Self {
        self.emit(&[opcode, 0]);
        self.fixups.push((self.code.len() - 1, l.0, 1));
        self
    }

    /// A jump with a 16-bit displacement (`opcode` is one or two bytes).
    fn rel16(&mut self, opcode: &[u8], l: Label) -> &mut Self {
        self.emit(opcode).emit(&[0, 0]);
        self.fixups.push((self.code.len() - 2, l.0, 2));
        self
    }

    /// Splits `[gpa, gpa + len)` into a real-mode segment and offset, or records an error.
    fn seg_off(&mut self, gpa: Gpa, len: u64) -> (u16, u16) {
        let seg = (gpa.raw() >> 4) & 0xf000;
        let off = gpa.raw() & 0xffff;
        if gpa >= REAL_MODE_LIMIT || off + len > 0x1_0000 {
            self.fail(PayloadError::Unreachable { gpa, len });
            return (0, 0);
        }
        (
            u16::try_from(seg).unwrap_or(0),
            u16::try_from(off).unwrap_or(0),
        )
    }

    /// `mov ax, imm16; mov ds, ax` (`es` when `es` is true).
    fn load_segment(&mut self, seg: u16, es: bool) -> &mut Self {
        let [lo, hi] = seg.to_le_bytes();
        self.emit(&[0xb8, lo, hi]);
        self.emit(if es { &[0x8e, 0xc0] } else { &[0x8e, 0xd8] })
    }

    /// `mov r32, imm32`.
    pub fn mov32(&mut self, reg: Reg32, imm: u32) -> &mut Self {
        self.emit(&[0x66, 0xb8 + reg as u8]);
        self.emit(&imm.to_le_bytes())
    }

    /// `mov dx, port; in eax, dx`: a 32-bit port read into `eax`.
    pub fn in32(&mut self, port: u16) -> &mut Self {
        let [lo, hi] = port.to_le_bytes();
        self.emit(&[0xba, lo, hi, 0x66, 0xed])
    }

    /// `mov dx, port; out dx, eax`: a 32-bit port write of `eax`.
    pub fn out32(&mut self, port: u16) -> &mut Self {
        let [lo, hi] = port.to_le_bytes();
        self.emit(&[0xba, lo, hi, 0x66, 0xef])
    }

    /// Reports `eax` to the VMM.
    pub fn report_eax(&mut self) -> &mut Self {
        self.out32(REPORT_PORT)
    }

    /// Reports `value` to the VMM.
    pub fn report(&mut self, value: u32) -> &mut Self {
        self.mov32(Reg32::Eax, value).report_eax()
    }

    /// Asks the VMM to convert `[gpa, gpa + size)` through the doorbell; the status lands in
    /// `eax`.
    pub fn doorbell(&mut self, gpa: Gpa, size: u32, to_private: bool) -> &mut Self {
        self.mov32(Reg32::Ebx, gpa.low32())
            .mov32(Reg32::Edi, gpa.high32())
            .mov32(Reg32::Ecx, size)
            .mov32(Reg32::Esi, if to_private { DOORBELL_TO_PRIVATE } else { 0 })
            .in32(DOORBELL_PORT)
    }

    /// Reports the doorbell's failing address of the last request (low half, then high half).
    pub fn report_error_gpa(&mut self) -> &mut Self {
        self.in32(DOORBELL_ERROR_LO_PORT)
            .report_eax()
            .in32(DOORBELL_ERROR_HI_PORT)
            .report_eax()
    }

    /// `mov byte [gpa], value`.
    pub fn store(&mut self, gpa: Gpa, value: u8) -> &mut Self {
        let (seg, off) = self.seg_off(gpa, 1);
        let [lo, hi] = off.to_le_bytes();
        self.load_segment(seg, false)
            .emit(&[0xc6, 0x06, lo, hi, value])
    }

    /// Stores `bytes` from `gpa` on, one `mov byte` each.
    pub fn store_bytes(&mut self, gpa: Gpa, bytes: &[u8]) -> &mut Self {
        // An address that would wrap lies past real mode: the first store has failed already.
        for (at, b) in (0..).map_while(|i| gpa.checked_add(i)).zip(bytes) {
            self.store(at, *b);
        }
        self
    }

    /// `mov al, [gpa]`.
    pub fn load_al(&mut self, gpa: Gpa) -> &mut Self {
        let (seg, off) = self.seg_off(gpa, 1);
        let [lo, hi] = off.to_le_bytes();
        self.load_segment(seg, false).emit(&[0xa0, lo, hi])
    }

    /// `cmp al, value; jne target`.
    pub fn jump_if_al_ne(&mut self, value: u8, target: Label) -> &mut Self {
        self.emit(&[0x3c, value]).rel16(&[0x0f, 0x85], target)
    }

    /// `cmp eax, value; jne target`.
    pub fn jump_if_eax_ne(&mut self, value: u32, target: Label) -> &mut Self {
        self.emit(&[0x66, 0x3d])
            .emit(&value.to_le_bytes())
            .rel16(&[0x0f, 0x85], target)
    }

    /// Fills `len` bytes (1..=0xffff, inside one 64 KiB segment) from `gpa` with `value`
    /// (`rep stosb`).
    pub fn fill(&mut self, gpa: Gpa, len: u16, value: u8) -> &mut Self {
        let (seg, off) = self.seg_off(gpa, u64::from(len));
        let [olo, ohi] = off.to_le_bytes();
        let [llo, lhi] = len.to_le_bytes();
        self.load_segment(seg, true).emit(&[
            0xbf, olo, ohi, 0xb9, llo, lhi, 0xb0, value, 0xfc, 0xf3, 0xaa,
        ])
    }

    /// Checks that each of `len` bytes (1..=0xffff, inside one 64 KiB segment) from `gpa`
    /// holds `expect` and overwrites it with `fill`; jumps to `mismatch` at the first byte
    /// that differs.
    pub fn check_fill(
        &mut self,
        gpa: Gpa,
        len: u16,
        expect: u8,
        fill: u8,
        mismatch: Label,
    ) -> &mut Self {
        self.check_inner(gpa, len, expect, Some(fill), mismatch)
    }

    /// Checks that each of `len` bytes from `gpa` holds `expect`; jumps to `mismatch` at the
    /// first byte that differs.
    pub fn check(&mut self, gpa: Gpa, len: u16, expect: u8, mismatch: Label) -> &mut Self {
        self.check_inner(gpa, len, expect, None, mismatch)
    }

    fn check_inner(
        &mut self,
        gpa: Gpa,
        len: u16,
        expect: u8,
        fill: Option<u8>,
        mismatch: Label,
    ) -> &mut Self {
        let (seg, off) = self.seg_off(gpa, u64::from(len));
        let [olo, ohi] = off.to_le_bytes();
        let [llo, lhi] = len.to_le_bytes();
        // mov si, off; mov cx, len; cld
        self.load_segment(seg, false)
            .emit(&[0xbe, olo, ohi, 0xb9, llo, lhi, 0xfc]);
        let top = self.label();
        self.place(top);
        // lodsb; cmp al, expect; jne mismatch
        self.emit(&[0xac, 0x3c, expect])
            .rel16(&[0x0f, 0x85], mismatch);
        if let Some(v) = fill {
            // mov byte [si - 1], v
            self.emit(&[0xc6, 0x44, 0xff, v]);
        }
        // loop top
        self.rel8(0xe2, top)
    }

    /// `jmp target` (near).
    pub fn jmp(&mut self, target: Label) -> &mut Self {
        self.rel16(&[0xe9], target)
    }

    /// `hlt`.
    pub fn hlt(&mut self) -> &mut Self {
        self.emit(&[0xf4])
    }

    /// Resolves the jumps and returns the machine code.
    pub fn finish(mut self) -> Result<Vec<u8>, PayloadError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        for &(at, label, width) in &self.fixups {
            let target = self
                .labels
                .get(label)
                .copied()
                .flatten()
                .ok_or(PayloadError::Unplaced(label))?;
            let rel =
                i64::try_from(target).unwrap_or(i64::MAX) - i64::try_from(at + width).unwrap_or(0);
            let range = PayloadError::JumpRange { at, label };
            if width == 1 {
                let rel = i8::try_from(rel).map_err(|_| range)?;
                self.code[at] = rel.to_le_bytes()[0];
            } else {
                let rel = i16::try_from(rel).map_err(|_| range)?;
                self.code[at..at + 2].copy_from_slice(&rel.to_le_bytes());
            }
        }
        Ok(self.code)
    }
}

/// Checks that `len` bytes at `data_gpa` hold `expect` and overwrites them with `fill`; reports
/// [`REPORT_OK`] or [`REPORT_MISMATCH`], then halts.
pub fn check_and_fill(
    data_gpa: Gpa,
    len: u16,
    expect: u8,
    fill: u8,
) -> Result<Vec<u8>, PayloadError> {
    let mut asm = Asm::new();
    let bad = asm.label();
    asm.check_fill(data_gpa, len, expect, fill, bad)
        .report(REPORT_OK)
        .hlt();
    asm.place(bad).report(REPORT_MISMATCH).hlt();
    asm.finish()
}

/// Asks for `[gpa, gpa + 4 KiB)` private, then shared, forever: one doorbell exit per request.
pub fn doorbell_loop(gpa: Gpa) -> Result<Vec<u8>, PayloadError> {
    let mut asm = Asm::new();
    let top = asm.label();
    asm.place(top)
        .doorbell(gpa, 4096, true)
        .doorbell(gpa, 4096, false)
        .jmp(top);
    asm.finish()
}

/// Asks for `[gpa, gpa + 4 KiB)` shared forever (the range is already shared: a doorbell exit
/// whose conversion has nothing to do).
pub fn doorbell_noop_loop(gpa: Gpa) -> Result<Vec<u8>, PayloadError> {
    let mut asm = Asm::new();
    let top = asm.label();
    asm.place(top).doorbell(gpa, 4096, false).jmp(top);
    asm.finish()
}

/// Loads the doorbell's registers as [`doorbell_noop_loop`] does, then reports `eax` instead of
/// ringing: the same guest instructions, one bare I/O exit per iteration.
pub fn report_loop_like_doorbell(gpa: Gpa) -> Result<Vec<u8>, PayloadError> {
    let mut asm = Asm::new();
    let top = asm.label();
    asm.place(top)
        .mov32(Reg32::Ebx, gpa.low32())
        .mov32(Reg32::Edi, gpa.high32())
        .mov32(Reg32::Ecx, 4096)
        .mov32(Reg32::Esi, 0)
        .report_eax()
        .jmp(top);
    asm.finish()
}

/// Reports 0 forever: one bare I/O exit per iteration.
pub fn report_loop() -> Result<Vec<u8>, PayloadError> {
    let mut asm = Asm::new();
    let top = asm.label();
    asm.place(top).report_eax().jmp(top);
    asm.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_jumps_resolve_and_far_ones_fail() {
        let mut asm = Asm::new();
        let l = asm.label();
        asm.place(l).hlt().jmp(l);
        assert_eq!(asm.finish(), Ok(vec![0xf4, 0xe9, 0xfc, 0xff]));

        // `loop` has an 8-bit displacement: a check over a long body is out of its reach only
        // when the body is, which `check_inner` never makes; test the bound directly.
        let mut asm = Asm::new();
        let l = asm.label();
        asm.place(l);
        for _ in 0..200 {
            asm.hlt();
        }
        asm.rel8(0xe2, l);
        assert_eq!(
            asm.finish(),
            Err(PayloadError::JumpRange { at: 201, label: 0 })
        );

        let mut asm = Asm::new();
        let l = asm.label();
        asm.jmp(l);
        assert_eq!(asm.finish(), Err(PayloadError::Unplaced(0)));
    }

    #[test]
    fn addresses_past_real_mode_are_refused() {
        let mut asm = Asm::new();
        asm.store(REAL_MODE_LIMIT, 1);
        assert_eq!(
            asm.finish(),
            Err(PayloadError::Unreachable {
                gpa: REAL_MODE_LIMIT,
                len: 1
            })
        );
        let mut asm = Asm::new();
        asm.fill(Gpa::new(0xf000), 0x2000, 0);
        assert!(matches!(
            asm.finish(),
            Err(PayloadError::Unreachable { .. })
        ));
    }

    #[test]
    fn store_encodes_segment_and_offset() {
        let mut asm = Asm::new();
        asm.store(Gpa::new(0x2_3456), 0x7f);
        // mov ax, 0x2000; mov ds, ax; mov byte [0x3456], 0x7f
        assert_eq!(
            asm.finish(),
            Ok(vec![
                0xb8, 0x00, 0x20, 0x8e, 0xd8, 0xc6, 0x06, 0x56, 0x34, 0x7f
            ])
        );
    }
}
