//! Touching memory that may fault, without dying: a real signal, handled.
//!
//! [`read()`] and [`write()`] touch one byte through a tiny assembly routine. If the touch raises
//! `SIGBUS` (a hole, past the end of the file) or `SIGSEGV` (a guard marker), a signal handler
//! installed once per process sees that the faulting instruction is the probe's own, sets the
//! return value to encode the signal and `si_code` and resumes at the routine's return: the
//! caller gets [`Touch::Sigbus`] or [`Touch::Sigsegv`] with the kernel's `si_code`. A fault
//! anywhere else is not ours: the handler writes the signal, the faulting address and the
//! faulting instruction's address to standard error (with `write(2)` alone), restores the
//! default action and returns, so the fault repeats and the process dies where it faulted,
//! named in the output. Everything the handler does is async-signal-safe.

use std::sync::Once;

#[cfg(not(target_arch = "x86_64"))]
compile_error!("the SIGBUS probe is written for x86_64");

std::arch::global_asm!(
    ".pushsection .text.gmem_probe,\"ax\",@progbits",
    ".globl gmem_probe_read",
    "gmem_probe_read:",
    ".globl gmem_probe_read_insn",
    "gmem_probe_read_insn:",
    "movzx eax, byte ptr [rdi]",
    ".globl gmem_probe_ret",
    "gmem_probe_ret:",
    "ret",
    ".globl gmem_probe_write",
    "gmem_probe_write:",
    ".globl gmem_probe_write_insn",
    "gmem_probe_write_insn:",
    "mov byte ptr [rdi], sil",
    "xor eax, eax",
    "ret",
    ".popsection",
);

extern "C" {
    fn gmem_probe_read(addr: *const u8) -> i64;
    fn gmem_probe_write(addr: *mut u8, value: u8) -> i64;
    static gmem_probe_read_insn: u8;
    static gmem_probe_write_insn: u8;
    static gmem_probe_ret: u8;
}

/// What a touch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    /// The byte was read (its value), or written (`0`).
    Ok(u8),
    /// The touch raised `SIGBUS` with this `si_code`.
    Sigbus(i32),
    /// The touch raised `SIGSEGV` with this `si_code`.
    Sigsegv(i32),
}

impl Touch {
    /// True for [`Touch::Sigbus`].
    pub fn is_sigbus(self) -> bool {
        matches!(self, Touch::Sigbus(_))
    }

    /// True when the touch faulted (either signal).
    pub fn is_fault(self) -> bool {
        !matches!(self, Touch::Ok(_))
    }

    /// The signal the touch raised, if any.
    pub fn signal(self) -> Option<i32> {
        match self {
            Touch::Ok(_) => None,
            Touch::Sigbus(_) => Some(libc::SIGBUS),
            Touch::Sigsegv(_) => Some(libc::SIGSEGV),
        }
    }
}

/// Return values of the probe routine at or below this encode a fault: `-(signal << 16 | code)`.
const FAULT: i64 = -1;

fn label(sym: &u8) -> usize {
    sym as *const u8 as usize
}

/// Writes `msg` then `v` in hex to standard error, with `write(2)` only.
fn report(msg: &[u8], v: usize) {
    let mut buf = [0u8; 20];
    let mut n = buf.len();
    let mut x = v;
    loop {
        n -= 1;
        let d = u8::try_from(x & 0xf).unwrap_or(0);
        buf[n] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
        x >>= 4;
        if x == 0 || n == 2 {
            break;
        }
    }
    n -= 2;
    buf[n] = b'0';
    buf[n + 1] = b'x';
    // SAFETY: write(2) of live buffers is async-signal-safe.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    // SAFETY: as above.
    unsafe { libc::write(2, buf[n..].as_ptr().cast(), buf.len() - n) };
}

extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t for an SA_SIGINFO handler.
    let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
    let rip_slot = usize::try_from(libc::REG_RIP).unwrap_or(0);
    let rax_slot = usize::try_from(libc::REG_RAX).unwrap_or(0);
    let rip = usize::try_from(uc.uc_mcontext.gregs[rip_slot]).unwrap_or(0);
    // SAFETY: taking the address of a linker symbol reads nothing.
    let (read_at, write_at, ret_at) = unsafe {
        (
            label(&gmem_probe_read_insn),
            label(&gmem_probe_write_insn),
            label(&gmem_probe_ret),
        )
    };
    // SAFETY: `info` is valid for an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    if rip == read_at || rip == write_at {
        let enc = (i64::from(sig) << 16) | i64::from(code.clamp(0, 0xffff));
        uc.uc_mcontext.gregs[rax_slot] = -enc.max(1);
        uc.uc_mcontext.gregs[rip_slot] = i64::try_from(ret_at).unwrap_or(0);
        return;
    }
    // Not a probe: say where, fall back to the default action; the fault repeats and kills
    // the process at the faulting instruction.
    // SAFETY: `info` is valid for an SA_SIGINFO handler.
    let info = unsafe { &*info };
    // SAFETY: si_addr is the field the kernel fills for SIGBUS and SIGSEGV.
    let addr = unsafe { info.si_addr() } as usize;
    let what: &[u8] = if sig == libc::SIGBUS {
        b"\ngmem probe: SIGBUS outside the probe, address "
    } else {
        b"\ngmem probe: SIGSEGV outside the probe, address "
    };
    report(what, addr);
    report(b" instruction ", rip);
    report(b" si_code ", usize::try_from(code).unwrap_or(0));
    // SAFETY: write(2) is async-signal-safe.
    unsafe { libc::write(2, b"\n".as_ptr().cast(), 1) };
    // SAFETY: signal() is async-signal-safe.
    unsafe { libc::signal(sig, libc::SIG_DFL) };
}

fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_fault as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        for sig in [libc::SIGBUS, libc::SIGSEGV] {
            // SAFETY: `sa` is fully initialised; the handler is async-signal-safe.
            let ret = unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) };
            assert_eq!(ret, 0, "sigaction({sig}) failed");
        }
    });
}

fn decode(v: i64) -> Touch {
    if v > FAULT {
        return Touch::Ok(u8::try_from(v).unwrap_or(0));
    }
    let enc = -v;
    let (sig, code) = (enc >> 16, i32::try_from(enc & 0xffff).unwrap_or(0));
    if sig == i64::from(libc::SIGSEGV) {
        Touch::Sigsegv(code)
    } else {
        Touch::Sigbus(code)
    }
}

/// Reads one byte at `addr`, reporting `SIGBUS` or `SIGSEGV` instead of dying.
///
/// # Safety
///
/// `addr` must lie inside memory of this process that gmem or the test mapped (a fault is
/// reported, but a read must not race with the unmapping of a Rust object).
pub unsafe fn read(addr: *const u8) -> Touch {
    install();
    // SAFETY: the caller guarantees `addr` may be touched; a fault is turned into a value.
    decode(unsafe { gmem_probe_read(addr) })
}

/// Writes one byte at `addr`, reporting `SIGBUS` or `SIGSEGV` instead of dying.
///
/// # Safety
///
/// As for [`read`], and the write must not break any Rust object (it lands in guest memory).
pub unsafe fn write(addr: *mut u8, value: u8) -> Touch {
    install();
    // SAFETY: as above.
    decode(unsafe { gmem_probe_write(addr, value) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reads_and_catches_sigbus_past_eof() {
        let mem = gmem::GuestMemfd::create(4096, gmem::Flags::MMAP | gmem::Flags::INIT_SHARED)
            .expect("create");
        let view = mem.map(0, 8192).expect("map");
        mem.write_at(0, &[0x5a]).expect("write");
        let (p0, p1) = (view.as_ptr(), view.as_ptr().wrapping_add(4096));
        // SAFETY: `p0` is inside the view.
        assert_eq!(unsafe { read(p0) }, Touch::Ok(0x5a));
        // SAFETY: `p1` is inside the view (past the end of the file).
        assert_eq!(unsafe { read(p1) }, Touch::Sigbus(libc::BUS_ADRERR));
        // SAFETY: as above; the write faults and changes nothing.
        assert_eq!(unsafe { write(p1, 1) }, Touch::Sigbus(libc::BUS_ADRERR));
        // SAFETY: `p0` is inside the view and maps guest memory, not a Rust object.
        assert_eq!(unsafe { write(p0, 7) }, Touch::Ok(0));
        let mut b = [0u8];
        mem.read_at(0, &mut b).expect("read");
        assert_eq!(b, [7]);
    }
}
