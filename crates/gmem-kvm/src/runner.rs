//! A small VM runner: vCPUs, the run loop, exit handling, and the demo guest.
//!
//! [`Vcpu::run`] enters the guest and returns at the next exit the caller should see. Guest
//! conversion requests are served inside the loop ([`crate::request`]): a doorbell read
//! ([`crate::doorbell`]), a `KVM_EXIT_HYPERCALL` with `KVM_HC_MAP_GPA_RANGE`, or a
//! `KVM_EXIT_MEMORY_FAULT`; each returns [`Exit::Converted`] with the request and its status
//! after the status has been handed to the guest, so the next [`Vcpu::run`] resumes it.
//!
//! # Guest accesses and private pages on this machine kind
//!
//! KVM on a software hypervisor runs real-mode guest code in its instruction emulator, and
//! the emulator reaches guest memory through the memslot's `userspace_addr`, not through the
//! guest_memfd, even in a gmem-only slot. What that means for private pages:
//!
//! - gmem binds the guest view as `userspace_addr` (the kernel guest_memfd's own mapping for
//!   gmem-only slots, gmem's unenforced mapping for hva slots), so the guest reaches private
//!   pages, as the model requires, while every host view and accessor is refused;
//! - the confidentiality is the VMM's discipline, not hardware's: the guest view is readable
//!   by the VMM process. gmem never hands it to device emulation or other host code;
//! - an enforced mapping as `userspace_addr` ([`crate::Vm::bind_at`] with a host view) turns
//!   a guest access to a private page into `KVM_EXIT_MMIO` at that address;
//! - a kernel guest_memfd without `MMAP` has no mapping at all, so an emulated guest cannot
//!   reach it (every access is `KVM_EXIT_MMIO`): bind files with `MMAP` on such hosts.
//!
//! The crate's tests check each of these on `/dev/kvm`.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use gmem::{AccessError, Attr, BackingKind, ConvertError, CreateError, Flags, GuestMemfd};
use kvm_bindings::KVM_SYNC_X86_REGS;
use kvm_ioctls::{Cap, SyncReg, VcpuExit, VcpuFd};

use crate::caps::{Capabilities, Mode};
use crate::doorbell::{self, DOORBELL_ERROR_HI_PORT, DOORBELL_ERROR_LO_PORT, DOORBELL_PORT};
use crate::gpa::Gpa;
use crate::memslot::BindError;
use crate::payload::{Asm, PayloadError, REPORT_MISMATCH, REPORT_OK, REPORT_PORT};
use crate::request::{self, Report, Source, Status};
use crate::vm::{Vm, VmError, VmShared};
use gmem::Errno;

/// Why running a vCPU failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A vCPU ioctl failed.
    #[error("{op} failed: errno {errno}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// Its errno.
        errno: i32,
    },
}

impl RunError {
    /// The errno of the failed call.
    pub fn errno(&self) -> i32 {
        match self {
            RunError::Ioctl { errno, .. } => *errno,
        }
    }

    fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RunError {
        move |e| RunError::Ioctl {
            op,
            errno: e.errno(),
        }
    }
}

/// Why the guest stopped and control came back to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The guest executed `hlt`.
    Halt,
    /// A guest conversion request was served; its status is already with the guest.
    Converted(Report),
    /// The guest wrote to an I/O port other than the doorbell's (`value` is the data,
    /// little-endian, zero-extended).
    IoOut {
        /// The port.
        port: u16,
        /// The data.
        value: u32,
        /// Access size in bytes.
        size: usize,
    },
    /// The guest touched guest-physical memory no slot maps (or a slot whose
    /// `userspace_addr` faults). A read gets all ones.
    Mmio {
        /// The address.
        gpa: Gpa,
        /// Access size in bytes.
        len: usize,
        /// True for a write.
        write: bool,
    },
    /// `KVM_RUN` was interrupted by a signal (a [`Watchdog`] fired).
    Interrupted,
    /// The guest shut down (triple fault).
    Shutdown,
    /// KVM failed to emulate an instruction or deliver an event.
    InternalError,
    /// VM entry failed (the hardware reason).
    FailEntry(u64),
    /// Any other exit, by name.
    Unhandled(String),
}

/// A vCPU of a [`Vm`].
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    vm: Arc<VmShared>,
    error_gpa: Gpa,
    /// KVM copies the general registers into `kvm_run` at every exit (`KVM_CAP_SYNC_REGS`),
    /// so a doorbell request is read without a `KVM_GET_REGS` (which costs about as much as
    /// an exit on a software hypervisor).
    sync_regs: bool,
}

impl Vm {
    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u64) -> Result<Vcpu, VmError> {
        let mut fd = self
            .shared
            .fd
            .create_vcpu(id)
            .map_err(VmError::ioctl("KVM_CREATE_VCPU"))?;
        let sync = u32::try_from(self.shared.fd.check_extension_int(Cap::SyncRegs)).unwrap_or(0);
        let sync_regs = sync & KVM_SYNC_X86_REGS != 0;
        if sync_regs {
            fd.set_sync_valid_reg(SyncReg::Register);
        }
        Ok(Vcpu {
            fd,
            vm: self.shared.clone(),
            error_gpa: Gpa::default(),
            sync_regs,
        })
    }
}

/// What [`Vcpu::run`] does after an exit.
enum Pending {
    /// The exit was served inside the loop: enter the guest again.
    Resume,
    /// A doorbell read, served once KVM's exit data is no longer borrowed.
    Doorbell,
    /// An exit for the caller.
    Done(Exit),
}

/// A guest read of `port`: the doorbell is served after the exit, the error-address ports
/// get the two halves of `error_gpa`, any other port all ones.
fn io_in(port: u16, data: &mut [u8], error_gpa: Gpa) -> Pending {
    match port {
        DOORBELL_PORT if data.len() == 4 => Pending::Doorbell,
        DOORBELL_ERROR_LO_PORT if data.len() == 4 => {
            data.copy_from_slice(&error_gpa.low32().to_le_bytes());
            Pending::Resume
        }
        DOORBELL_ERROR_HI_PORT if data.len() == 4 => {
            data.copy_from_slice(&error_gpa.high32().to_le_bytes());
            Pending::Resume
        }
        _ => {
            data.fill(0xff);
            Pending::Resume
        }
    }
}

/// A guest write to `port`: ignored on the doorbell's ports, returned to the caller on any
/// other.
fn io_out(port: u16, data: &[u8]) -> Pending {
    if matches!(
        port,
        DOORBELL_PORT | DOORBELL_ERROR_LO_PORT | DOORBELL_ERROR_HI_PORT
    ) {
        return Pending::Resume;
    }
    let mut v = [0u8; 4];
    let n = data.len().min(4);
    v[..n].copy_from_slice(&data[..n]);
    Pending::Done(Exit::IoOut {
        port,
        value: u32::from_le_bytes(v),
        size: data.len(),
    })
}

impl Vcpu {
    /// Points the vCPU at real-mode code at `gpa` (below 1 MiB): `cs` is the 64 KiB segment
    /// holding it, `ip` the rest.
    pub fn set_real_mode_entry(&self, gpa: Gpa) -> Result<(), RunError> {
        let gpa = gpa.raw();
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(RunError::ioctl("KVM_GET_SREGS"))?;
        let seg = (gpa >> 4) & 0xf000;
        sregs.cs.selector = u16::try_from(seg).unwrap_or(0);
        sregs.cs.base = seg << 4;
        self.fd
            .set_sregs(&sregs)
            .map_err(RunError::ioctl("KVM_SET_SREGS"))?;
        let mut regs = self
            .fd
            .get_regs()
            .map_err(RunError::ioctl("KVM_GET_REGS"))?;
        regs.rip = gpa - (seg << 4);
        regs.rflags = 2;
        self.fd
            .set_regs(&regs)
            .map_err(RunError::ioctl("KVM_SET_REGS"))
    }

    /// Chooses how doorbell requests are read: from the registers KVM copies into `kvm_run`
    /// at every exit (`KVM_CAP_SYNC_REGS`, the default where the kernel has it), or with
    /// `KVM_GET_REGS` after the exit. Returns whether the copy is now in use (false when
    /// asked for and the kernel lacks it).
    pub fn use_sync_regs(&mut self, on: bool) -> bool {
        let sync = u32::try_from(self.vm.fd.check_extension_int(Cap::SyncRegs)).unwrap_or(0);
        self.sync_regs = on && sync & KVM_SYNC_X86_REGS != 0;
        if self.sync_regs {
            self.fd.set_sync_valid_reg(SyncReg::Register);
        } else {
            self.fd.clear_sync_valid_reg(SyncReg::Register);
        }
        self.sync_regs
    }

    /// The vCPU descriptor, for ioctls gmem does not wrap.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Runs the guest until an exit the caller should see (see the [module docs](self)).
    pub fn run(&mut self) -> Result<Exit, RunError> {
        loop {
            match self.run_once()? {
                Pending::Resume => continue,
                Pending::Done(exit) => return Ok(exit),
                Pending::Doorbell => return self.doorbell(),
            }
        }
    }

    /// Enters the guest once and handles the exit as far as it can be while KVM's exit data
    /// is borrowed.
    fn run_once(&mut self) -> Result<Pending, RunError> {
        let error_gpa = self.error_gpa;
        let pending = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Pending::Done(Exit::Interrupted),
            Err(e) => {
                return Err(RunError::Ioctl {
                    op: "KVM_RUN",
                    errno: e.errno(),
                })
            }
            Ok(VcpuExit::IoIn(port, data)) => io_in(port, data, error_gpa),
            Ok(VcpuExit::IoOut(port, data)) => io_out(port, data),
            Ok(VcpuExit::Hypercall(h)) => {
                let (ret, report) = request::map_gpa_range(&self.vm, h.nr, h.args);
                *h.ret = ret;
                match report {
                    Some(report) => {
                        self.error_gpa = report.status.gpa();
                        Pending::Done(Exit::Converted(report))
                    }
                    None => Pending::Resume,
                }
            }
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                let report = request::memory_fault(&self.vm, flags, Gpa::new(gpa), size);
                self.error_gpa = report.status.gpa();
                Pending::Done(Exit::Converted(report))
            }
            Ok(VcpuExit::MmioRead(gpa, data)) => {
                data.fill(0xff);
                Pending::Done(Exit::Mmio {
                    gpa: Gpa::new(gpa),
                    len: data.len(),
                    write: false,
                })
            }
            Ok(VcpuExit::MmioWrite(gpa, data)) => Pending::Done(Exit::Mmio {
                gpa: Gpa::new(gpa),
                len: data.len(),
                write: true,
            }),
            Ok(VcpuExit::Hlt) => Pending::Done(Exit::Halt),
            Ok(VcpuExit::Shutdown) => Pending::Done(Exit::Shutdown),
            Ok(VcpuExit::InternalError) => Pending::Done(Exit::InternalError),
            Ok(VcpuExit::FailEntry(reason, _)) => Pending::Done(Exit::FailEntry(reason)),
            Ok(other) => Pending::Done(Exit::Unhandled(format!("{other:?}"))),
        };
        Ok(pending)
    }

    /// Serves a doorbell read: the request is in the registers, the status goes in the
    /// read's data.
    fn doorbell(&mut self) -> Result<Exit, RunError> {
        let regs = if self.sync_regs {
            self.fd.sync_regs().regs
        } else {
            self.fd
                .get_regs()
                .map_err(RunError::ioctl("KVM_GET_REGS"))?
        };
        let report = match doorbell::decode(&regs) {
            Ok(r) => request::serve(&self.vm, Source::Doorbell, r.gpa, r.size, r.to),
            Err(gpa) => Report {
                source: Source::Doorbell,
                gpa,
                size: regs.rcx & 0xffff_ffff,
                to: Attr::Shared,
                status: Status::Invalid { gpa },
            },
        };
        self.error_gpa = report.status.gpa();
        let status = u32::try_from(report.status.errno()).unwrap_or(u32::MAX);
        self.set_io_in_data(&status.to_le_bytes());
        Ok(Exit::Converted(report))
    }

    /// Fills the data of the pending `KVM_EXIT_IO` read.
    fn set_io_in_data(&mut self, bytes: &[u8; 4]) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_IO (the caller saw `VcpuExit::IoIn`), so `io` is
        // the union member the kernel filled.
        let io = unsafe { run.__bindgen_anon_1.io };
        let Ok(off) = usize::try_from(io.data_offset) else {
            return;
        };
        let len = usize::from(io.size) * usize::try_from(io.count).unwrap_or(0);
        let n = len.min(bytes.len());
        // Stays inside the kvm_run mapping: the kernel places the data there.
        let dst = std::ptr::from_mut(run).cast::<u8>().wrapping_add(off);
        // SAFETY: the kernel places the I/O data at `data_offset` inside the kvm_run mapping,
        // which this vCPU owns and which lives as long as `self.fd`; `n` bytes fit in it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, n) };
    }
}

/// The signal a [`Watchdog`] sends; its handler does nothing, so `KVM_RUN` returns `EINTR`.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 4
}

extern "C" fn on_kick(_: libc::c_int) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: an all-zero sigaction is a valid value to fill in.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = 0; // no SA_RESTART: KVM_RUN returns EINTR
                         // SAFETY: installs a handler that does nothing for a real-time signal gmem owns.
        let ret = unsafe { libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) };
        debug_assert_eq!(ret, 0);
    });
}

/// Interrupts `KVM_RUN` on the thread that armed it once `timeout` has passed, again every
/// 10 ms until dropped: [`Vcpu::run`] then returns [`Exit::Interrupted`]. A guard against
/// guests that never halt, for tests and demos.
#[derive(Debug)]
pub struct Watchdog {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Arms a watchdog for the calling thread (the one that will run the vCPU).
    pub fn arm(timeout: Duration) -> std::io::Result<Watchdog> {
        install_kick_handler();
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("gmem-kvm-watchdog".into())
            .spawn(move || {
                let (lock, cv) = &*flag;
                let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                let mut wait = timeout;
                while !*stopped {
                    let (guard, res) = cv
                        .wait_timeout(stopped, wait)
                        .unwrap_or_else(|e| e.into_inner());
                    stopped = guard;
                    if *stopped {
                        break;
                    }
                    if res.timed_out() {
                        // SAFETY: the target thread is alive: it owns this watchdog, whose drop
                        // sets `stopped` and joins this thread before the target can exit.
                        unsafe { libc::pthread_kill(target, kick_signal()) };
                        wait = Duration::from_millis(10);
                    }
                }
            })?;
        Ok(Watchdog {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why the demo guest failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Setting up the VM or vCPU.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Creating the file.
    #[error(transparent)]
    Create(#[from] CreateError),
    /// Binding it.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Running the vCPU.
    #[error(transparent)]
    Run(#[from] RunError),
    /// Assembling the guest.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// A host access.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// A host conversion.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// The guest or the host saw something other than expected.
    #[error("demo step {step}: {detail}")]
    Unexpected {
        /// The step.
        step: &'static str,
        /// What happened.
        detail: String,
    },
}

impl DemoError {
    /// The errno of the failure (`EIO` for an unexpected guest result).
    pub fn errno(&self) -> i32 {
        match self {
            DemoError::Vm(e) => e.errno(),
            DemoError::Create(e) => e.errno(),
            DemoError::Bind(e) => e.errno(),
            DemoError::Run(e) => e.errno(),
            DemoError::Payload(e) => e.errno(),
            DemoError::Access(e) => e.errno(),
            DemoError::Convert(e) => e.errno(),
            DemoError::Unexpected { .. } => libc::EIO,
        }
    }
}

/// What [`demo_guest`] did.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// The probed capabilities.
    pub capabilities: Capabilities,
    /// The mode in force.
    pub mode: Mode,
    /// The backing of the guest's memory.
    pub backing: BackingKind,
    /// One line per step, in order.
    pub steps: Vec<String>,
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.capabilities)?;
        writeln!(f, "guest memory backing: {}", self.backing)?;
        for (i, s) in self.steps.iter().enumerate() {
            writeln!(f, "{:2}. {s}", i + 1)?;
        }
        Ok(())
    }
}

/// Runs `vcpu` to its next exit and checks that it is the one the demo expects at `step`.
fn expect(
    vcpu: &mut Vcpu,
    step: &'static str,
    ok: impl Fn(&Exit) -> bool,
) -> Result<Exit, DemoError> {
    let exit = vcpu.run()?;
    if ok(&exit) {
        Ok(exit)
    } else {
        Err(DemoError::Unexpected {
            step,
            detail: format!("{exit:?}"),
        })
    }
}

/// Runs `vcpu` to its next exit, which must be a completed guest request to convert to `to`.
fn expect_converted(vcpu: &mut Vcpu, step: &'static str, to: Attr) -> Result<Report, DemoError> {
    match vcpu.run()? {
        Exit::Converted(r) if r.status == Status::Done && r.to == to => Ok(r),
        exit => Err(DemoError::Unexpected {
            step,
            detail: format!("{exit:?}"),
        }),
    }
}

/// Memory layout of the demo guest (guest-physical = file offset).
const DEMO_SIZE: u64 = 2 << 20;
const DEMO_CODE: u64 = 0x1000;
const DEMO_DATA: u64 = 0x1_0000;
const DEMO_SECRET: u64 = 0x2_0000;
const DEMO_SECRET_BYTES: &[u8] = b"gmem guest secret";

/// Runs the demo guest on `/dev/kvm` and reports each step.
///
/// The guest's memory is a 2 MiB kernel guest_memfd (`MMAP | INIT_SHARED`, gmem-only slot)
/// where the VM accepts `MMAP`, else a shmem file (hva slot). The host fills a page with
/// `0xaa`; the guest checks it and writes `0xff`, which the host reads back. The guest writes
/// a secret and asks, through the doorbell, for its page to become private; the host's
/// checked read is refused. The guest asks for the page back shared and the host reads the
/// secret. Fails with [`DemoError`] at the first step that does not go as described.
pub fn demo_guest() -> Result<DemoReport, DemoError> {
    let vm = Vm::new()?;
    let caps = *vm.capabilities();
    let mut steps = Vec::new();
    let mem = demo_memory(&vm, &caps)?;
    let binding = vm.bind(&mem, Gpa::new(0), 0, DEMO_SIZE)?;
    steps.push(format!(
        "{} file of {} KiB bound at gpa 0 (slot {}, {:?})",
        mem.backing_kind(),
        DEMO_SIZE / 1024,
        binding.slot(),
        binding.kind()
    ));

    mem.write_at(DEMO_DATA, &[0xaa; 4096])?;
    steps.push(format!("host wrote 0xaa to gpa {DEMO_DATA:#x}+0x1000"));

    let code = demo_code()?;
    mem.guest()
        .and_then(|g| g.write(DEMO_CODE, &code))
        .map_err(DemoError::Access)?;

    let mut vcpu = vm.create_vcpu(0)?;
    vcpu.set_real_mode_entry(Gpa::new(DEMO_CODE))?;
    let _watchdog = Watchdog::arm(Duration::from_secs(20)).map_err(|e| DemoError::Unexpected {
        step: "watchdog",
        detail: e.to_string(),
    })?;

    demo_fill(&mut vcpu, &mem, &mut steps)?;
    demo_private(&mut vcpu, &mem, &mut steps)?;
    demo_shared(&mut vcpu, &mem, &mut steps)?;
    Ok(DemoReport {
        capabilities: caps,
        mode: caps.mode(),
        backing: mem.backing_kind(),
        steps,
    })
}

/// The demo guest's memory: a kernel guest_memfd where the VM accepts `MMAP`, else a shmem
/// file, `MMAP | INIT_SHARED` either way.
fn demo_memory(vm: &Vm, caps: &Capabilities) -> Result<GuestMemfd, DemoError> {
    let flags = Flags::MMAP | Flags::INIT_SHARED;
    let mem = if caps.guest_memfd && caps.guest_memfd_flags.contains(Flags::MMAP) {
        vm.create_guest_memfd(DEMO_SIZE, flags)?
    } else {
        GuestMemfd::create(DEMO_SIZE, flags)?
    };
    Ok(mem)
}

/// The demo guest's code: check the data page and fill it, write the secret, ask for its
/// page private then shared (reporting each status), halt.
fn demo_code() -> Result<Vec<u8>, PayloadError> {
    let mut asm = Asm::new();
    let bad = asm.label();
    let (data, secret) = (Gpa::new(DEMO_DATA), Gpa::new(DEMO_SECRET));
    asm.check_fill(data, 4096, 0xaa, 0xff, bad)
        .report(REPORT_OK)
        .store_bytes(secret, DEMO_SECRET_BYTES)
        .doorbell(secret, 4096, true)
        .report_eax()
        .doorbell(secret, 4096, false)
        .report_eax()
        .hlt();
    asm.place(bad).report(REPORT_MISMATCH).hlt();
    asm.finish()
}

/// True for the guest's report of a status 0.
fn status0(e: &Exit) -> bool {
    matches!(
        e,
        Exit::IoOut {
            port: REPORT_PORT,
            value: 0,
            ..
        }
    )
}

/// The guest finds the host's `0xaa` and writes `0xff`, which the host reads back.
fn demo_fill(vcpu: &mut Vcpu, mem: &GuestMemfd, steps: &mut Vec<String>) -> Result<(), DemoError> {
    expect(vcpu, "guest checks 0xaa", |e| {
        matches!(
            e,
            Exit::IoOut {
                port: REPORT_PORT,
                value: REPORT_OK,
                ..
            }
        )
    })?;
    let mut page = vec![0u8; 4096];
    mem.read_at(DEMO_DATA, &mut page)?;
    if page.iter().any(|b| *b != 0xff) {
        return Err(DemoError::Unexpected {
            step: "host reads 0xff",
            detail: "the guest's writes are not visible".into(),
        });
    }
    steps.push("guest found 0xaa everywhere and wrote 0xff; host reads 0xff".into());
    Ok(())
}

/// The guest asks for the secret's page private; the host's read of it is refused.
fn demo_private(
    vcpu: &mut Vcpu,
    mem: &GuestMemfd,
    steps: &mut Vec<String>,
) -> Result<(), DemoError> {
    let asked = expect_converted(vcpu, "guest asks private", Attr::Private)?;
    steps.push(format!("guest wrote a secret and asked: {asked}"));
    expect(vcpu, "guest reads status 0", status0)?;
    let mut secret = vec![0u8; DEMO_SECRET_BYTES.len()];
    match mem.read_at(DEMO_SECRET, &mut secret) {
        Err(e) => steps.push(format!(
            "host read of the private page refused: {e} (errno {})",
            e.errno()
        )),
        Ok(()) => {
            return Err(DemoError::Unexpected {
                step: "host read refused",
                detail: "the host read a private page".into(),
            })
        }
    }
    Ok(())
}

/// The guest asks for the secret's page shared again and halts; the host reads the secret.
fn demo_shared(
    vcpu: &mut Vcpu,
    mem: &GuestMemfd,
    steps: &mut Vec<String>,
) -> Result<(), DemoError> {
    let asked = expect_converted(vcpu, "guest asks shared", Attr::Shared)?;
    steps.push(format!("guest asked: {asked}"));
    expect(vcpu, "guest reads status 0", status0)?;
    expect(vcpu, "guest halts", |e| matches!(e, Exit::Halt))?;
    let mut secret = vec![0u8; DEMO_SECRET_BYTES.len()];
    mem.read_at(DEMO_SECRET, &mut secret)?;
    if secret != DEMO_SECRET_BYTES {
        return Err(DemoError::Unexpected {
            step: "host reads the secret",
            detail: format!("read {secret:?}"),
        });
    }
    steps.push(format!(
        "guest halted; host reads the shared page: {:?}",
        String::from_utf8_lossy(&secret)
    ));
    Ok(())
}
