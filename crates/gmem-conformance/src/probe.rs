//! Touching memory that may raise `SIGBUS`, without dying: a real signal, handled.
//!
//! [`read()`] and [`write()`] touch one byte through a tiny assembly routine. If the touch raises
//! `SIGBUS`, a signal handler installed once per process sees that the faulting instruction is
//! the probe's own, sets the return value to `-si_code` and resumes at the routine's return:
//! the caller gets [`Touch::Sigbus`] with the kernel's `si_code` (`BUS_ADRERR` for a poison
//! marker or a touch past the end of the file). A `SIGBUS` anywhere else is not ours: the
//! handler restores the default action and returns, so the fault repeats and the process dies
//! as it would have without the probe. Everything the handler does is async-signal-safe (it
//! reads and writes the interrupted context only).

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
    fn gmem_probe_read(addr: *const u8) -> i32;
    fn gmem_probe_write(addr: *mut u8, value: u8) -> i32;
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
}

impl Touch {
    /// True for [`Touch::Sigbus`].
    pub fn is_sigbus(self) -> bool {
        matches!(self, Touch::Sigbus(_))
    }
}

fn label(sym: &u8) -> usize {
    sym as *const u8 as usize
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
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
    if rip == read_at || rip == write_at {
        // SAFETY: `info` is valid for an SA_SIGINFO handler.
        let code = unsafe { (*info).si_code };
        uc.uc_mcontext.gregs[rax_slot] = i64::from(-code.max(1));
        uc.uc_mcontext.gregs[rip_slot] = i64::try_from(ret_at).unwrap_or(0);
        return;
    }
    // Not a probe: fall back to the default action; the fault repeats and kills the process.
    // SAFETY: signal() is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        // SAFETY: `sa` is fully initialised; the handler is async-signal-safe.
        let ret = unsafe { libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) };
        assert_eq!(ret, 0, "sigaction(SIGBUS) failed");
    });
}

/// Reads one byte at `addr`, reporting `SIGBUS` instead of dying.
///
/// # Safety
///
/// `addr` must lie inside a mapping of this process (touching unmapped memory is `SIGSEGV`,
/// which the probe does not handle).
pub unsafe fn read(addr: *const u8) -> Touch {
    install();
    // SAFETY: the caller guarantees `addr` is mapped; a SIGBUS is turned into a return value.
    let v = unsafe { gmem_probe_read(addr) };
    match u8::try_from(v) {
        Ok(b) => Touch::Ok(b),
        Err(_) => Touch::Sigbus(-v),
    }
}

/// Writes one byte at `addr`, reporting `SIGBUS` instead of dying.
///
/// # Safety
///
/// As for [`read`], and the write must not break any Rust object (it lands in guest memory).
pub unsafe fn write(addr: *mut u8, value: u8) -> Touch {
    install();
    // SAFETY: as above.
    let v = unsafe { gmem_probe_write(addr, value) };
    if v == 0 {
        Touch::Ok(0)
    } else {
        Touch::Sigbus(-v)
    }
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
