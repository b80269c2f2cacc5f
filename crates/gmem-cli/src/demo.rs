//! The demo: a software guest writes a secret, converts it to private, and the host is kept
//! out, in this process and in a child process, until the guest shares it again.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::time::Instant;

use gmem::Errno;
use gmem::{Attr, Flags, GuestMemfd, PAGE_SIZE};

/// One step of the demo, with its timing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Step {
    /// What happened.
    pub what: String,
    /// The outcome, as shown to the user.
    pub outcome: String,
    /// Time the step took, in microseconds.
    pub micros: f64,
}

type R<T> = Result<T, Box<dyn std::error::Error>>;

const SECRET: &[u8] = b"guest secret: 0xfeedface";

fn timed<T>(steps: &mut Vec<Step>, what: &str, f: impl FnOnce() -> R<(T, String)>) -> R<T> {
    let t = Instant::now();
    let (v, outcome) = f()?;
    steps.push(Step {
        what: what.to_string(),
        outcome,
        micros: t.elapsed().as_secs_f64() * 1e6,
    });
    Ok(v)
}

fn clear_cloexec(fd: &OwnedFd) -> R<()> {
    // SAFETY: plain fcntl on a descriptor we own.
    let ret = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) };
    if ret == -1 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Where the demo's guest memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoBacking {
    /// The kernel guest_memfd where `/dev/kvm` offers one with `MMAP`, else shmem.
    Auto,
    /// The kernel guest_memfd (fails without `/dev/kvm`).
    Kvm,
    /// memfd (shmem).
    Shmem,
}

/// Creates the demo's file: the kernel's guest_memfd when asked or available.
fn create(size: u64, backing: DemoBacking) -> R<(GuestMemfd, String)> {
    let flags = Flags::MMAP | Flags::INIT_SHARED;
    if backing != DemoBacking::Shmem {
        match gmem_kvm::Vm::new() {
            Ok(vm) if vm.capabilities().guest_memfd_flags.contains(Flags::MMAP) => {
                let m = vm.create_guest_memfd(size, flags)?;
                return Ok((m, "kernel guest_memfd through KVM".to_string()));
            }
            Ok(_) if backing == DemoBacking::Kvm => {
                return Err("this KVM offers no guest_memfd with MMAP".into())
            }
            Err(e) if backing == DemoBacking::Kvm => return Err(e.into()),
            Ok(_) => {}
            Err(e) => eprintln!("note: KVM not used ({e}); the demo runs on shmem"),
        }
    }
    Ok((GuestMemfd::create(size, flags)?, "shmem".to_string()))
}

/// Runs the walkthrough with a software guest (the guest view) on a file of `size` bytes.
pub fn run_software(size: u64, backing: DemoBacking) -> R<Vec<Step>> {
    let mut steps = Vec::new();
    let secret_at = PAGE_SIZE;
    let dma_at = 2 * PAGE_SIZE;
    let mem = timed(&mut steps, "create guest memory (MMAP|INIT_SHARED)", || {
        let (m, what) = create(size, backing)?;
        let s = format!(
            "{} MiB on {what}, {} run(s), all shared",
            size >> 20,
            m.run_count()?
        );
        Ok((m, s))
    })?;
    let guest = mem.guest()?;
    timed(&mut steps, "guest writes a secret at 0x1000", || {
        guest.write(secret_at, SECRET)?;
        Ok(((), format!("{:?}", String::from_utf8_lossy(SECRET))))
    })?;
    timed(&mut steps, "guest converts 0x1000 to private", || {
        mem.convert(secret_at, PAGE_SIZE, Attr::Private)?;
        Ok(((), format!("{} runs now", mem.run_count()?)))
    })?;
    timed(
        &mut steps,
        "host child process maps the file and touches 0x1000",
        || child_touches(&mem, secret_at),
    )?;
    timed(&mut steps, "host safe accessor reads 0x1000", || {
        host_reads_private(&mem, secret_at)
    })?;
    let pin = timed(&mut steps, "host device pins 0x2000 for DMA", || {
        let p = mem.pin(dma_at, PAGE_SIZE)?;
        Ok((p, "pinned".to_string()))
    })?;
    timed(
        &mut steps,
        "guest asks for 0x0..0x3000 private while pinned",
        || convert_while_pinned(&mem),
    )?;
    timed(
        &mut steps,
        "device unpins; the same request is retried",
        || {
            drop(pin);
            mem.convert(0, 3 * PAGE_SIZE, Attr::Private)?;
            Ok(((), format!("converted; {} runs", mem.run_count()?)))
        },
    )?;
    timed(
        &mut steps,
        "guest converts 0x0..0x3000 back to shared",
        || {
            mem.convert(0, 3 * PAGE_SIZE, Attr::Shared)?;
            Ok(((), format!("{} run(s)", mem.run_count()?)))
        },
    )?;
    timed(
        &mut steps,
        "host reads 0x1000 through the safe accessor",
        || host_reads_secret(&mem, secret_at),
    )?;
    Ok(steps)
}

/// Shares the file with a child process of this program that maps it and touches
/// `secret_at`; the outcome is how the child ended, against the fault the file documents.
fn child_touches(mem: &GuestMemfd, secret_at: u64) -> R<((), String)> {
    let sock = mem.share_with_process()?;
    clear_cloexec(&sock)?;
    let exe = std::env::current_exe()?;
    let status = Command::new(exe)
        .args([
            "__touch",
            &sock.as_raw_fd().to_string(),
            &secret_at.to_string(),
        ])
        .status()?;
    drop(sock);
    Ok(((), child_outcome(status, mem.host_fault(secret_at))))
}

/// How the touching child ended, against `want`, the fault expected at the private page.
fn child_outcome(status: std::process::ExitStatus, want: Option<gmem::HostFault>) -> String {
    use std::os::unix::process::ExitStatusExt;
    let name = |s: i32| match s {
        libc::SIGBUS => "SIGBUS".to_string(),
        libc::SIGSEGV => "SIGSEGV".to_string(),
        s => format!("signal {s}"),
    };
    let expected = want.map_or("no fault".to_string(), |f| name(f.signo()));
    match (status.signal(), want) {
        (Some(s), Some(f)) if s == f.signo() => format!(
            "child killed by {} ({})",
            name(s),
            match f {
                gmem::HostFault::Segv => "a guard marker on the private page",
                gmem::HostFault::Bus => "a hole over the private huge page",
            }
        ),
        (Some(s), _) => format!("child killed by {} (expected {expected})", name(s)),
        (None, _) => format!("child exited with {status} (expected {expected})"),
    }
}

/// The host's checked read of the private page at `secret_at`; the outcome is the refusal.
fn host_reads_private(mem: &GuestMemfd, secret_at: u64) -> R<((), String)> {
    let mut buf = [0u8; 8];
    let outcome = match mem.read_at(secret_at, &mut buf) {
        Err(e) => format!("refused: {e} (errno {})", e.errno()),
        Ok(()) => "read succeeded (unexpected)".to_string(),
    };
    Ok(((), outcome))
}

/// Asks for `0x0..0x3000` private while a page of it is pinned; the outcome is the refusal,
/// with the file unchanged.
fn convert_while_pinned(mem: &GuestMemfd) -> R<((), String)> {
    let outcome = match mem.convert(0, 3 * PAGE_SIZE, Attr::Private) {
        Err(e) => format!(
            "refused: {e} (errno {}, error_offset {:#x}); nothing changed: {} runs",
            e.errno(),
            e.error_offset().unwrap_or(0),
            mem.run_count()?
        ),
        Ok(()) => "converted (unexpected)".to_string(),
    };
    Ok(((), outcome))
}

/// The host's checked read of the secret, shared again; the outcome says whether it is
/// unchanged.
fn host_reads_secret(mem: &GuestMemfd, secret_at: u64) -> R<((), String)> {
    let mut buf = vec![0u8; SECRET.len()];
    mem.read_at(secret_at, &mut buf)?;
    let same = buf == SECRET;
    Ok((
        (),
        format!(
            "{:?} ({})",
            String::from_utf8_lossy(&buf),
            if same {
                "preserved in place"
            } else {
                "CHANGED"
            }
        ),
    ))
}

/// The child side of the demo: attach, map, touch one byte (dies of the documented fault if
/// private).
pub fn touch_child(fd: i32, offset: u64) -> R<u8> {
    use std::os::fd::FromRawFd;
    // SAFETY: the parent passed this descriptor to us and nothing else in this process owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mem = GuestMemfd::attach(sock)?;
    let view = mem.map(0, mem.size())?;
    let at = usize::try_from(offset)?;
    if at >= view.len() {
        return Err("offset past the view".into());
    }
    let p = view.as_ptr().wrapping_add(at);
    // SAFETY: `at` is inside the view; the read may fault, which is the point.
    let b = unsafe { std::ptr::read_volatile(p) };
    Ok(b)
}

/// Prints steps as a table.
pub fn print(steps: &[Step], out: &mut impl Write) -> std::io::Result<()> {
    for (i, s) in steps.iter().enumerate() {
        writeln!(out, "{:>2}. {:<58} {:>10.1} µs", i + 1, s.what, s.micros)?;
        writeln!(out, "    -> {}", s.outcome)?;
    }
    Ok(())
}
