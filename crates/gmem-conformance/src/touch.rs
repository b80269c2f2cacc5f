//! Host touches of a [`HostView`] that report faults (`SIGBUS`, `SIGSEGV`) instead of dying.
//!
//! Attributes are per 4 KiB page and a touch past the end of the file faults per page too, so
//! each helper probes the first byte it touches in every page with [`crate::probe`] and copies
//! the rest of that page only when the probe succeeded. The result names the first faulting
//! byte (as an offset into the view) and the signal's `si_code`.

use gmem::{HostView, PAGE_SIZE};

use crate::probe::{self, Touch};

/// `SEGV_MAPERR` (`siginfo.h`; the libc crate does not carry it).
pub const SEGV_MAPERR: i32 = 1;
/// `SEGV_ACCERR`.
pub const SEGV_ACCERR: i32 = 2;

/// A host touch faulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Offset into the view of the byte whose touch faulted.
    pub at: u64,
    /// The signal: `SIGBUS` (a hole, past the end of the file) or `SIGSEGV` (a guard marker).
    pub signo: i32,
    /// The signal's `si_code`.
    pub code: i32,
}

impl Fault {
    /// True for the codes a host touch of a private page or a page past the end may carry:
    /// `SIGBUS` with `BUS_ADRERR`, or `SIGSEGV` with `SEGV_ACCERR`/`SEGV_MAPERR` (a guard
    /// marker).
    pub fn is_access_error(&self) -> bool {
        match self.signo {
            libc::SIGBUS => self.code == libc::BUS_ADRERR || self.code == libc::BUS_MCEERR_AR,
            libc::SIGSEGV => self.code == SEGV_ACCERR || self.code == SEGV_MAPERR,
            _ => false,
        }
    }
}

fn fault(at: u64, t: Touch) -> Result<u8, Fault> {
    match t {
        Touch::Ok(b) => Ok(b),
        Touch::Sigbus(code) => Err(Fault {
            at,
            signo: libc::SIGBUS,
            code,
        }),
        Touch::Sigsegv(code) => Err(Fault {
            at,
            signo: libc::SIGSEGV,
            code,
        }),
    }
}

fn page_chunks(at: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = at + len;
    let mut cur = at;
    std::iter::from_fn(move || {
        if cur >= end {
            return None;
        }
        let next = ((cur / PAGE_SIZE) + 1) * PAGE_SIZE;
        let chunk = (cur, next.min(end) - cur);
        cur = next.min(end);
        Some(chunk)
    })
}

fn addr(view: &HostView, at: u64, len: u64) -> *mut u8 {
    let end = at.checked_add(len).expect("range overflows");
    assert!(
        end <= view.len() as u64,
        "touch {at:#x}+{len:#x} outside the view of {:#x} bytes",
        view.len()
    );
    view.as_ptr()
        .wrapping_add(usize::try_from(at).expect("offset fits usize"))
}

fn as_usize(v: u64) -> usize {
    usize::try_from(v).expect("length fits usize")
}

/// Reads one byte at `at`.
pub fn read_byte(view: &HostView, at: u64) -> Result<u8, Fault> {
    let p = addr(view, at, 1);
    // SAFETY: `p` lies inside the live view (checked by `addr`); a fault is reported.
    fault(at, unsafe { probe::read(p) })
}

/// Writes one byte at `at`.
pub fn write_byte(view: &HostView, at: u64, value: u8) -> Result<(), Fault> {
    let p = addr(view, at, 1);
    // SAFETY: `p` lies inside the live view, which maps guest memory, not a Rust object.
    fault(at, unsafe { probe::write(p, value) }).map(drop)
}

/// Reads `len` bytes from `at`; fails at the first page that faults.
pub fn read(view: &HostView, at: u64, len: u64) -> Result<Vec<u8>, Fault> {
    let base = addr(view, at, len);
    let mut out = vec![0u8; as_usize(len)];
    for (off, n) in page_chunks(at, len) {
        read_byte(view, off)?;
        let src = base.wrapping_add(as_usize(off - at));
        let dst = &mut out[as_usize(off - at)..as_usize(off - at + n)];
        // SAFETY: the page holding `src..src + n` is mapped and was just read without a fault;
        // nothing converts it while the catalogue's own thread reads it. `dst` is a separate
        // Rust buffer of `n` bytes.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), as_usize(n)) };
    }
    Ok(out)
}

/// Writes `data` at `at`; fails at the first page that faults (earlier pages are written).
pub fn write(view: &HostView, at: u64, data: &[u8]) -> Result<(), Fault> {
    let base = addr(view, at, data.len() as u64);
    for (off, n) in page_chunks(at, data.len() as u64) {
        let src = &data[as_usize(off - at)..as_usize(off - at + n)];
        write_byte(view, off, src[0])?;
        let dst = base.wrapping_add(as_usize(off - at));
        // SAFETY: as in `read`, with the copy going into the mapped page.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, as_usize(n)) };
    }
    Ok(())
}

/// Fills `len` bytes from `at` with `value`; fails at the first page that faults.
pub fn fill(view: &HostView, at: u64, len: u64, value: u8) -> Result<(), Fault> {
    let base = addr(view, at, len);
    for (off, n) in page_chunks(at, len) {
        write_byte(view, off, value)?;
        let dst = base.wrapping_add(as_usize(off - at));
        // SAFETY: as in `write`.
        unsafe { std::ptr::write_bytes(dst, value, as_usize(n)) };
    }
    Ok(())
}

/// Index and value of the first byte of `bytes` that is not `value`.
pub fn first_mismatch(bytes: &[u8], value: u8) -> Option<(usize, u8)> {
    bytes
        .iter()
        .position(|&b| b != value)
        .map(|i| (i, bytes[i]))
}

/// Asserts that every byte of `[at, at + len)` reads `value` through the host view.
#[track_caller]
pub fn expect_bytes(view: &HostView, at: u64, len: u64, value: u8, what: &str) {
    let bytes = read(view, at, len)
        .unwrap_or_else(|f| panic!("{what}: host read of {at:#x}+{len:#x} faulted: {f:?}"));
    if let Some((i, got)) = first_mismatch(&bytes, value) {
        panic!(
            "{what}: host expected {value:#04x} at view offset {:#x}, got {got:#04x}",
            at + i as u64
        );
    }
}

/// Asserts that reading and writing the first and the last byte of each page of
/// `[at, at + len)` faults with an access-error code at the byte touched, with exactly the
/// signal and `si_code` the view's mechanism gives there ([`HostView::fault_at`]: `SIGSEGV`
/// `SEGV_MAPERR` for a guard marker, `SIGBUS` `BUS_ADRERR` for a hole or past the end of the
/// file).
#[track_caller]
pub fn expect_fault(view: &HostView, at: u64, len: u64, what: &str) {
    for (off, n) in page_chunks(at, len) {
        for byte in [off, off + n - 1] {
            let want = view
                .fault_at(as_usize(byte))
                .unwrap_or_else(|| panic!("{what}: view offset {byte:#x} is not blocked"));
            for (kind, res) in [
                ("read", read_byte(view, byte).map(drop)),
                ("write", write_byte(view, byte, 0x5a)),
            ] {
                match res {
                    Err(f)
                        if f.at == byte && f.signo == want.signo() && f.code == want.si_code() => {}
                    other => panic!(
                        "{what}: host {kind} at view offset {byte:#x}: expected {want:?}, got {other:?}"
                    ),
                }
            }
        }
    }
}

/// True when `t`, a touch at byte `at` of `view`, faulted exactly as the view's mechanism
/// says a touch there must ([`HostView::fault_at`]): the same signal and `si_code`. False for
/// a touch that succeeded or faulted otherwise.
pub fn faults_as_documented(view: &HostView, at: u64, t: Touch) -> bool {
    let Some(want) = view.fault_at(as_usize(at)) else {
        return false;
    };
    match fault(at, t) {
        Err(f) => f.signo == want.signo() && f.code == want.si_code(),
        Ok(_) => false,
    }
}
