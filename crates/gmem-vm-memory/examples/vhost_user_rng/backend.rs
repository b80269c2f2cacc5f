//! A gmem-aware vhost-user virtio-rng backend: a thin request handler on rust-vmm's `vhost`
//! crate (vhost-user-backend is tied to `GuestMemoryMmap`), whose memory is the VMM's gmem
//! files attached as followers, and whose device is the virtio-rng example on virtio-queue.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use gmem::GuestMemfd;
use gmem_vm_memory::vhost_user::BackendMemory;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Backend, Error, GpuBackend, Result, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;

#[path = "../virtio_rng/device.rs"]
#[allow(dead_code)]
mod device;

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

#[derive(Debug, Default, Clone, Copy)]
struct Vring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    base: u16,
    enabled: bool,
}

/// The request handler.
pub struct RngBackend<S> {
    followers: Vec<GuestMemfd>,
    memory: Option<BackendMemory>,
    acked: u64,
    protocol: u64,
    vring: Vring,
    call: Option<File>,
    worker: Option<JoinHandle<()>>,
    source: Option<S>,
}

fn refuse(what: &'static str) -> Error {
    Error::InvalidOperation(what)
}

impl<S: Read + Send + 'static> RngBackend<S> {
    /// A backend whose memory is `followers` (attached gmem files), serving entropy from
    /// `source`.
    pub fn new(followers: Vec<GuestMemfd>, source: S) -> Self {
        RngBackend {
            followers,
            memory: None,
            acked: 0,
            protocol: 0,
            vring: Vring::default(),
            call: None,
            worker: None,
            source: Some(source),
        }
    }

    /// Starts the device thread on the kick descriptor.
    fn start(&mut self, mut kick: File) -> Result<()> {
        let memory = self.memory.clone().ok_or(refuse("no memory table"))?;
        let v = self.vring;
        let gpa = |va: u64| memory.va_to_gpa(va).ok_or(Error::InvalidParam);
        let (desc, avail, used) = (gpa(v.desc)?, gpa(v.avail)?, gpa(v.used)?);
        let mut call = self
            .call
            .as_ref()
            .ok_or(refuse("no call descriptor"))?
            .try_clone()
            .map_err(Error::ReqHandlerError)?;
        let source = self
            .source
            .take()
            .ok_or(refuse("the device already started"))?;
        use virtio_queue::QueueT;
        let mut q = virtio_queue::Queue::new(v.size).map_err(|_| Error::InvalidParam)?;
        {
            let lo = |a: u64| Some(u32::try_from(a & 0xffff_ffff).unwrap_or(0));
            let hi = |a: u64| Some(u32::try_from(a >> 32).unwrap_or(0));
            q.set_desc_table_address(lo(desc), hi(desc));
            q.set_avail_ring_address(lo(avail), hi(avail));
            q.set_used_ring_address(lo(used), hi(used));
            q.set_next_avail(v.base);
            q.set_next_used(v.base);
            q.set_ready(true);
        }
        self.worker = Some(std::thread::spawn(move || {
            let mut dev = device::RngDevice::new(q, source);
            let mem = memory.memory();
            // One round per kick. The frontend may have made the eventfd non-blocking (the
            // flag is shared with it), so wait for it to be readable first.
            while wait_readable(&kick) {
                let mut tick = [0u8; 8];
                match kick.read(&mut tick) {
                    Ok(8) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    _ => break,
                }
                let report = dev.process(mem, 256);
                let mut line = format!("completed {} bytes {}", report.completed, report.bytes);
                for e in &report.errors {
                    line.push_str(&format!("; error {e}"));
                }
                eprintln!("vhost-user rng backend: {line}");
                let _ = call.write_all(&1u64.to_ne_bytes());
            }
        }));
        Ok(())
    }
}

impl<S: Read + Send + 'static> VhostUserBackendReqHandlerMut for RngBackend<S> {
    fn set_owner(&mut self) -> Result<()> {
        Ok(())
    }
    fn reset_owner(&mut self) -> Result<()> {
        Ok(())
    }
    fn reset_device(&mut self) -> Result<()> {
        Err(refuse("reset_device"))
    }
    fn get_features(&mut self) -> Result<u64> {
        Ok(VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES)
    }
    fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !(VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
            return Err(Error::InvalidParam);
        }
        self.acked = features;
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        // Never mapped: each descriptor only names which attached file the region is.
        let mem = BackendMemory::from_mem_table(ctx, &files, &self.followers)
            .map_err(|e| Error::ReqHandlerError(std::io::Error::from_raw_os_error(e.errno())))?;
        self.memory = Some(mem);
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        if index != 0 {
            return Err(Error::InvalidParam);
        }
        self.vring.size = u16::try_from(num).map_err(|_| Error::InvalidParam)?;
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        if index != 0 {
            return Err(Error::InvalidParam);
        }
        self.vring.desc = descriptor;
        self.vring.used = used;
        self.vring.avail = available;
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        if index != 0 {
            return Err(Error::InvalidParam);
        }
        self.vring.base = u16::try_from(base).map_err(|_| Error::InvalidParam)?;
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        Ok(VhostUserVringState::new(index, u32::from(self.vring.base)))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        if index != 0 {
            return Err(Error::InvalidParam);
        }
        let fd = fd.ok_or(Error::InvalidParam)?;
        self.start(fd)
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        if index != 0 {
            return Err(Error::InvalidParam);
        }
        self.call = fd;
        Ok(())
    }
    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> Result<()> {
        Ok(())
    }
    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::empty())
    }
    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.protocol = features;
        Ok(())
    }
    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(1)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        if index != 0 {
            return Err(Error::InvalidParam);
        }
        self.vring.enabled = enable;
        Ok(())
    }
    fn get_config(
        &mut self,
        _offset: u32,
        _size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        Err(refuse("virtio-rng has no config space"))
    }
    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> Result<()> {
        Err(refuse("virtio-rng has no config space"))
    }
    fn set_backend_req_fd(&mut self, _backend: Backend) {}
    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(refuse("gpu socket"))
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(refuse("shared objects"))
    }
    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File)> {
        Err(refuse("inflight descriptors"))
    }
    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> Result<()> {
        Err(refuse("inflight descriptors"))
    }
    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Err(refuse("memory slots"))
    }
    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        Err(refuse("memory slots"))
    }
    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> Result<()> {
        Err(refuse("memory slots"))
    }
    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(refuse("device state"))
    }
    fn check_device_state(&mut self) -> Result<()> {
        Err(refuse("device state"))
    }
    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(refuse("shared memory regions"))
    }
    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<()> {
        Err(refuse("dirty log"))
    }
}

/// Waits until `f` is readable; false when it cannot be waited on.
fn wait_readable(f: &File) -> bool {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, -1) };
        if r > 0 {
            return pfd.revents & libc::POLLIN != 0;
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// Serves one vhost-user connection on `stream` until the frontend goes away.
pub fn serve<S: Read + Send + 'static>(
    stream: std::os::unix::net::UnixStream,
    followers: Vec<GuestMemfd>,
    source: S,
) {
    let backend = Arc::new(Mutex::new(RngBackend::new(followers, source)));
    let mut handler = vhost::vhost_user::BackendReqHandler::from_stream(stream, backend);
    while handler.handle_request().is_ok() {}
}
