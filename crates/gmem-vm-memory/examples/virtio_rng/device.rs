//! A virtio-rng device (virtio 1.2 §5.4) on virtio-queue 0.18, unchanged, over gmem's
//! `GuestMemory`: every buffer the driver offers is filled from an entropy source.
//!
//! The device learns why a chain or the ring could not be read from the memory's refusal
//! record (virtio-queue ends an unreadable chain silently and logs an unreadable avail ring),
//! reports it as a [`DeviceError`], gives the chain back to the driver with nothing written,
//! and goes on: a hostile or confused driver never takes the VMM down.

use std::io::{Read, Write};

use gmem_vm_memory::{GmemMemory, GmemSlice, Refusal};
use virtio_queue::{Queue, QueueOwnedT, QueueT, Writer};

/// `DEVICE_NEEDS_RESET` in the device status (virtio 1.2 §2.1).
pub const STATUS_NEEDS_RESET: u8 = 0x40;

/// Why the device could not serve the driver.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The available ring could not be read: the device stops until reset.
    #[error("available ring: {0}")]
    Ring(Refusal),
    /// The queue library refused the ring's state (for example an available index that ran
    /// more than the queue size ahead): the device stops until reset.
    #[error("queue: {0}")]
    Queue(virtio_queue::Error),
    /// A chain's descriptors or buffers could not be reached; the chain was returned empty.
    #[error("chain {head}: {refusal}")]
    Chain {
        /// Head index of the chain.
        head: u16,
        /// Why.
        refusal: Refusal,
    },
    /// A chain was malformed (virtio-queue's error); it was returned empty.
    #[error("chain {head}: {source}")]
    BadChain {
        /// Head index of the chain.
        head: u16,
        /// virtio-queue's error.
        source: virtio_queue::Error,
    },
    /// The used ring could not be written: the device stops until reset.
    #[error("used ring: {0}")]
    Used(String),
    /// The entropy source failed.
    #[error("entropy source: {0}")]
    Source(std::io::Error),
}

impl DeviceError {
    /// The refusal behind the error, if memory refused something.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            DeviceError::Ring(r) | DeviceError::Chain { refusal: r, .. } => Some(*r),
            _ => None,
        }
    }
}

/// One request the device took from the ring: its buffers are held (the guest cannot make
/// them private) until it is completed or dropped.
pub struct Request<'m> {
    head: u16,
    writer: Writer<'m, GmemSlice<'m>>,
}

impl Request<'_> {
    /// Head index of the chain.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Bytes the driver offered.
    pub fn capacity(&self) -> usize {
        self.writer.available_bytes()
    }
}

/// What one [`RngDevice::process`] call did.
#[derive(Debug, Default)]
pub struct Report {
    /// Chains filled and returned.
    pub completed: usize,
    /// Bytes written in all.
    pub bytes: usize,
    /// What went wrong, in order.
    pub errors: Vec<DeviceError>,
}

/// The device: one request queue and an entropy source.
pub struct RngDevice<S> {
    queue: Queue,
    source: S,
    status: u8,
}

fn refusal_of(e: &virtio_queue::Error) -> Option<Refusal> {
    match e {
        virtio_queue::Error::GuestMemory(m) | virtio_queue::Error::GuestMemoryError(m) => {
            Refusal::of(m)
        }
        _ => None,
    }
}

impl<S: Read> RngDevice<S> {
    /// A device serving `queue` (configured by the driver) from `source`.
    pub fn new(queue: Queue, source: S) -> Self {
        RngDevice {
            queue,
            source,
            status: 0,
        }
    }

    /// The device status bits the device sets ([`STATUS_NEEDS_RESET`]).
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The queue (for the VMM's notification logic).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    fn stop(&mut self, e: DeviceError) -> DeviceError {
        self.status |= STATUS_NEEDS_RESET;
        e
    }

    /// Takes the next request from the ring, holding its buffers. `Ok(None)`: no request.
    pub fn next_request<'m>(
        &mut self,
        mem: &'m GmemMemory,
    ) -> Result<Option<Request<'m>>, DeviceError> {
        if self.status & STATUS_NEEDS_RESET != 0 {
            return Ok(None);
        }
        let before = mem.refusals().count();
        let chain = match self.queue.iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => {
                let err = match refusal_of(&e) {
                    Some(r) => DeviceError::Ring(r),
                    None => DeviceError::Queue(e),
                };
                return Err(self.stop(err));
            }
        };
        let Some(chain) = chain else {
            // An unreadable ring entry ends the iteration silently: the record says why.
            if mem.refusals().count() != before {
                if let Some(r) = mem.refusals().last() {
                    return Err(self.stop(DeviceError::Ring(r.refusal)));
                }
            }
            return Ok(None);
        };
        let head = chain.head_index();
        let writer = match Writer::new(mem, chain) {
            Ok(w) => w,
            Err(e) => {
                let err = match refusal_of(&e) {
                    Some(refusal) => DeviceError::Chain { head, refusal },
                    None => DeviceError::BadChain { head, source: e },
                };
                self.give_back(mem, head)?;
                return Err(err);
            }
        };
        // An unreadable descriptor or indirect table ends the chain silently too.
        if mem.refusals().count() != before {
            if let Some(r) = mem.refusals().last() {
                drop(writer);
                self.give_back(mem, head)?;
                return Err(DeviceError::Chain {
                    head,
                    refusal: r.refusal,
                });
            }
        }
        Ok(Some(Request { head, writer }))
    }

    /// Returns a chain with nothing written.
    fn give_back(&mut self, mem: &GmemMemory, head: u16) -> Result<(), DeviceError> {
        self.queue.add_used(mem, head, 0).map_err(|e| {
            let msg = match refusal_of(&e) {
                Some(r) => r.to_string(),
                None => e.to_string(),
            };
            self.stop(DeviceError::Used(msg))
        })
    }

    /// Fills the request's buffers and returns the chain to the driver; the buffers are
    /// released. Returns the bytes written.
    pub fn complete(
        &mut self,
        mem: &GmemMemory,
        mut req: Request<'_>,
    ) -> Result<usize, DeviceError> {
        let mut chunk = [0u8; 256];
        let mut done = 0;
        while req.writer.available_bytes() > 0 {
            let n = req.writer.available_bytes().min(chunk.len());
            if let Err(e) = self.source.read_exact(&mut chunk[..n]) {
                self.give_back(mem, req.head)?;
                return Err(DeviceError::Source(e));
            }
            // Writing into held slices cannot fail on memory grounds.
            if let Err(e) = req.writer.write_all(&chunk[..n]) {
                self.give_back(mem, req.head)?;
                return Err(DeviceError::Source(e));
            }
            done += n;
        }
        let (head, len) = (req.head, u32::try_from(done).unwrap_or(u32::MAX));
        drop(req);
        self.queue.add_used(mem, head, len).map_err(|e| {
            let msg = match refusal_of(&e) {
                Some(r) => r.to_string(),
                None => e.to_string(),
            };
            self.stop(DeviceError::Used(msg))
        })?;
        Ok(done)
    }

    /// Serves every request the driver made available, at most `limit` of them.
    pub fn process(&mut self, mem: &GmemMemory, limit: usize) -> Report {
        let mut report = Report::default();
        for _ in 0..limit {
            match self.next_request(mem) {
                Ok(Some(req)) => match self.complete(mem, req) {
                    Ok(n) => {
                        report.completed += 1;
                        report.bytes += n;
                    }
                    Err(e) => report.errors.push(e),
                },
                Ok(None) => break,
                Err(e) => {
                    let fatal = self.status & STATUS_NEEDS_RESET != 0;
                    report.errors.push(e);
                    if fatal {
                        break;
                    }
                }
            }
        }
        report
    }
}
