//! vhost-user with real processes: a gmem frontend hands its regions in `SET_MEM_TABLE`;
//! a gmem-aware backend (built on the `vhost` crate, in a child process) attaches as a
//! follower and refuses private buffers; an unmodified backend from crates.io
//! (`vhost-device-rng`, installed by `.ci/run`) works on shared memory, and its documented
//! limit — it reaches private pages — is pinned by a test.

#[path = "../examples/vhost_user_rng/backend.rs"]
#[allow(dead_code)]
mod backend;
#[path = "../examples/virtio_rng/driver.rs"]
#[allow(dead_code)]
mod driver;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use driver::{Driver, Layout, F_WRITE};
use gmem::{Attr, Flags, GuestMemfd};
use gmem_conformance::child::{child_side, ChildProcess};
use gmem_vm_memory::vhost_user::{frontend_addr, mem_table, BackendMemory, VhostMemoryError};
use gmem_vm_memory::{GmemMemory, RegionSpec};
use vhost::vhost_user::message::{VhostUserMemoryRegion, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use virtio_queue::desc::split::Descriptor;
use vmm_sys_util::eventfd::EventFd;

const P: u64 = 4096;
const RAM: u64 = 0x10_0000;
const QSIZE: u16 = 16;

struct Counter(u8);

impl std::io::Read for Counter {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        for b in buf.iter_mut() {
            *b = self.0;
            self.0 = self.0.wrapping_add(1);
        }
        Ok(buf.len())
    }
}

fn counting(from: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| from.wrapping_add(u8::try_from(i % 256).unwrap_or(0)))
        .collect()
}

fn buf(i: u64) -> u64 {
    RAM + 0x2_0000 + i * P
}

fn socket_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("gmem-vu-{tag}-{}.sock", std::process::id()))
}

/// The VMM side: guest RAM, its `GuestMemory`, the guest's driver, the vhost-user frontend.
struct Vmm {
    ram: GuestMemfd,
    mem: GmemMemory,
    layout: Layout,
    fe: Frontend,
    kick: EventFd,
    call: EventFd,
}

impl Vmm {
    fn connect(path: &Path, ram: GuestMemfd) -> Vmm {
        let deadline = Instant::now() + Duration::from_secs(20);
        let fe = loop {
            match Frontend::connect(path, 1) {
                Ok(fe) => break fe,
                Err(e) if Instant::now() > deadline => panic!("connect {path:?}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mem = GmemMemory::new([RegionSpec::new(RAM, ram.clone(), 0, ram.size())]).expect("mem");
        Vmm {
            ram,
            mem,
            layout: Layout::new(RAM + 0x1000, QSIZE),
            fe,
            kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            call: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        }
    }

    /// Negotiates and starts queue 0. Returns the error of the first refused step.
    fn start(&mut self) -> Result<(), vhost::Error> {
        let fe = &mut self.fe;
        fe.set_owner()?;
        let offered = fe.get_features()?;
        let proto = offered & backend::VHOST_USER_F_PROTOCOL_FEATURES;
        fe.set_features(offered & (backend::VIRTIO_F_VERSION_1 | proto))?;
        if proto != 0 {
            let _ = fe.get_protocol_features()?;
            fe.set_protocol_features(VhostUserProtocolFeatures::empty())?;
        }
        fe.set_mem_table(&mem_table(&self.mem))?;
        fe.set_vring_num(0, QSIZE)?;
        let l = self.layout;
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: frontend_addr(l.desc),
                used_ring_addr: frontend_addr(l.used),
                avail_ring_addr: frontend_addr(l.avail),
                log_addr: None,
            },
        )?;
        fe.set_vring_base(0, 0)?;
        fe.set_vring_call(0, &self.call)?;
        fe.set_vring_kick(0, &self.kick)?;
        if proto != 0 {
            fe.set_vring_enable(0, true)?;
        }
        Ok(())
    }

    fn driver(&self) -> Driver<'_> {
        let (g, g2) = (
            self.ram.guest().expect("guest view"),
            self.ram.guest().expect("guest view"),
        );
        Driver::new(self.layout, move |gpa: u64, b: &[u8]| {
            g.write(gpa - RAM, b).expect("guest write")
        })
        .with_read(move |gpa: u64, b: &mut [u8]| g2.read(gpa - RAM, b).expect("guest read"))
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.ram
            .guest()
            .expect("guest view")
            .read(gpa - RAM, &mut v)
            .expect("guest read");
        v
    }

    /// Kicks the backend and waits until the used index reaches `idx`.
    ///
    /// Kicks again after every 100 ms without an answer, as a driver may: vhost-user sends
    /// `SET_VRING_ENABLE` without waiting for the backend to apply it, and a backend whose
    /// worker sees a kick while the ring is still disabled drops it.
    fn kick_and_wait(&self, idx: u16) {
        let drv = self.driver();
        let deadline = Instant::now() + Duration::from_secs(20);
        while drv.used_idx() != idx {
            assert!(
                Instant::now() < deadline,
                "the backend did not answer (used idx {})",
                drv.used_idx()
            );
            self.kick.write(1).expect("kick");
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            let _ = self.call.read();
        }
    }
}

fn ram() -> GuestMemfd {
    GuestMemfd::builder(1 << 20)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .create()
        .expect("ram")
}

#[test]
fn vhost_user_gmem_backend_attaches_as_follower_and_refuses_private_buffers() {
    if let Some(mut side) = child_side() {
        let file = GuestMemfd::attach(side.peer).expect("attach");
        let path = PathBuf::from(side.ctl.recv());
        let listener = UnixListener::bind(&path).expect("bind");
        side.ctl.send("listening");
        let (stream, _) = listener.accept().expect("accept");
        backend::serve(stream, vec![file], Counter(0));
        let _ = std::fs::remove_file(&path);
        return;
    }
    let ram = ram();
    let mut child = ChildProcess::spawn(
        "vhost_user_gmem_backend_attaches_as_follower_and_refuses_private_buffers",
        "backend",
        ram.share_with_process().expect("share"),
    );
    let path = socket_path("aware");
    let _ = std::fs::remove_file(&path);
    child.send(path.to_str().expect("utf-8 path"));
    assert_eq!(child.recv(), "listening");
    let mut vmm = Vmm::connect(&path, ram);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        vmm.start().expect("negotiation");
        let drv = vmm.driver();
        drv.set_desc(0, Descriptor::new(buf(0), 64, F_WRITE, 0));
        drv.set_desc(1, Descriptor::new(buf(1), 100, F_WRITE, 0));
        drv.set_avail_entry(0, 0);
        drv.set_avail_entry(1, 1);
        drv.set_avail_idx(2);
        vmm.kick_and_wait(2);
        assert_eq!(drv.used_entry(0), (0, 64));
        assert_eq!(drv.used_entry(1), (1, 100));
        assert_eq!(vmm.read(buf(0), 64), counting(0, 64));
        assert_eq!(vmm.read(buf(1), 100), counting(64, 100));
        // The guest makes a buffer private: the backend is refused, returns the chain empty.
        vmm.ram
            .convert(buf(2) - RAM, P, Attr::Private)
            .expect("to private");
        drv.set_desc(2, Descriptor::new(buf(2), 64, F_WRITE, 0));
        drv.offer(2, 2);
        vmm.kick_and_wait(3);
        assert_eq!(drv.used_entry(2), (2, 0));
        assert_eq!(
            vmm.read(buf(2), 64),
            vec![0u8; 64],
            "the private page was not written"
        );
    }));
    drop(vmm);
    // The backend exits when the frontend hangs up; its output explains a failure.
    let output = child.finish();
    if let Err(panic) = outcome {
        eprintln!("{output}");
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn vhost_user_gmem_backend_refuses_memory_it_did_not_attach() {
    let attached = ram();
    let other = ram();
    // In-process: the table's rules, exactly.
    let region = |gpa| VhostUserMemoryRegion::new(gpa, 1 << 20, gpa, 0);
    let fd = |f: &GuestMemfd| {
        File::from(
            std::os::fd::AsFd::as_fd(f)
                .try_clone_to_owned()
                .expect("dup"),
        )
    };
    let e = BackendMemory::from_mem_table(
        &[region(RAM)],
        &[fd(&other)],
        std::slice::from_ref(&attached),
    )
    .expect_err("not attached");
    assert!(matches!(e, VhostMemoryError::NotAttached { gpa: RAM }));
    assert_eq!(e.errno(), libc::EPERM);
    let e = BackendMemory::from_mem_table(&[region(RAM)], &[], std::slice::from_ref(&attached))
        .expect_err("mismatch");
    assert_eq!(e.errno(), libc::EINVAL);
    let e = BackendMemory::from_mem_table(
        &[region(RAM), region(RAM + 0x8_0000)],
        &[fd(&attached), fd(&attached)],
        std::slice::from_ref(&attached),
    )
    .expect_err("overlap");
    assert_eq!(e.errno(), libc::EEXIST);
    let m = BackendMemory::from_mem_table(
        &[region(RAM)],
        &[fd(&attached)],
        std::slice::from_ref(&attached),
    )
    .expect("attached");
    assert_eq!(m.va_to_gpa(RAM + 5), Some(RAM + 5));
    assert_eq!(m.va_to_gpa(RAM + (1 << 20)), None);
    assert_eq!(m.memory().regions(), vec![(RAM, 1 << 20, 0)]);
}

/// Finds the unmodified backend: `$GMEM_VHOST_DEVICE_RNG`, `$PATH`, or cargo's bin dir.
fn vhost_device_rng() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("GMEM_VHOST_DEVICE_RNG") {
        // Named explicitly (as `.ci/run` does): it must be there.
        assert!(
            Path::new(&p).is_file(),
            "GMEM_VHOST_DEVICE_RNG={p} does not exist"
        );
        return Some(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("vhost-device-rng"))
        .find(|p| p.is_file())
}

struct Backend(Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn vhost_user_unmodified_backend_works_on_shared_memory_and_reaches_private_pages() {
    let Some(bin) = vhost_device_rng() else {
        println!("skipped: vhost-device-rng is not installed (.ci/run installs it)");
        return;
    };
    // Its entropy source: a file of known bytes.
    let source = std::env::temp_dir().join(format!("gmem-vu-source-{}", std::process::id()));
    std::fs::write(&source, counting(7, 1 << 16)).expect("source");
    let path = socket_path("unaware");
    let listen = PathBuf::from(format!("{}0", path.display()));
    let _ = std::fs::remove_file(&listen);
    let _backend = Backend(
        Command::new(&bin)
            .arg("--socket-path")
            .arg(&path)
            .arg("--rng-source")
            .arg(&source)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vhost-device-rng"),
    );
    let mut vmm = Vmm::connect(&listen, ram());
    vmm.start().expect("negotiation");
    let drv = vmm.driver();
    drv.set_desc(0, Descriptor::new(buf(0), 64, F_WRITE, 0));
    drv.offer(0, 0);
    vmm.kick_and_wait(1);
    assert_eq!(drv.used_entry(0), (0, 64));
    assert_eq!(
        vmm.read(buf(0), 64),
        counting(7, 64),
        "served from shared memory"
    );
    // The documented limit of an unaware backend: its raw mapping is not revoked, so it
    // writes a page the guest made private (gmem-aware backends refuse, test above).
    vmm.ram
        .convert(buf(1) - RAM, P, Attr::Private)
        .expect("to private");
    drv.set_desc(1, Descriptor::new(buf(1), 64, F_WRITE, 0));
    drv.offer(1, 1);
    vmm.kick_and_wait(2);
    assert_eq!(drv.used_entry(1), (1, 64));
    assert_eq!(
        vmm.read(buf(1), 64),
        counting(71, 64),
        "an unaware backend reaches private pages"
    );
    // And it holds nothing: the guest converts a buffer it was just given.
    vmm.ram
        .convert(buf(0) - RAM, P, Attr::Private)
        .expect("no host reference from it");
    let _ = std::fs::remove_file(&source);
    let _ = std::fs::remove_file(&listen);
}
