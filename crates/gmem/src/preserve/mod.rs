//! Preservation across live update: hand guest memory and all its state to a new process.
//!
//! - [`format`](mod@format): the preserved state (documented byte layout, versioned, checksummed,
//!   size-limited, parsed as untrusted input).
//! - [`handover`]: the two-phase hand-over over a Unix socket with `SCM_RIGHTS`
//!   ([`hand_over`] / [`receive`]), crash-safe at every step.
//! - [`exec`]: the same hand-over to a process started with inherited descriptors.
//! - [`copy`]: the honest path for the kernel guest_memfd, which cannot be bound to another VM:
//!   a new file, contents copied, attributes restored, measured as a copy.
//!
//! # The freeze
//!
//! While a hand-over runs, the file is *frozen*: the state sent to the new owner must stay
//! true until the new owner confirms. Conversions **wait** (a VMM pauses its vCPUs for the
//! hand-over anyway; a conversion that arrives during the pause goes through as soon as the
//! old owner resumes, or fails with `EPERM` once the file has been handed over);
//! `fallocate` (allocation and punch-hole) is refused with `EPERM`, as the kernel's
//! live-update freeze of a guest_memfd refuses new allocation; contents stay writable through
//! the guest view and host views: they are the file itself, shared with the new owner.
//!
//! # The old owner afterwards
//!
//! Once the file is handed over, every access path of the old owner fails with `EPERM`
//! (accessors, pins, new views, the guest view, conversions, and the attribute and poison
//! queries, whose record stopped being the file's), and every mapping gmem handed out there
//! stops reaching the file: views and pin pointers fault everywhere (as
//! [`HostView::fault_at`](crate::HostView::fault_at) says), the guest mapping (an old vCPU's
//! memslot) too. A hand-over with a pin the offer does not list is
//! refused (`EBUSY`), so no live pin stays behind.
//!
//! Contents are never copied by the hand-over: the files themselves travel as descriptors.
//!
//! # What travels, and from where
//!
//! | state | taken from |
//! |---|---|
//! | size, flags, backing kind, block size, identity | the file (`fstat` checked again by the new owner) |
//! | attribute runs | the file's run map, frozen |
//! | NUMA policy | the policy set with [`GuestMemfd::set_numa_policy`](crate::GuestMemfd::set_numa_policy); applied again by the new owner |
//! | poison | [`GuestMemfd::poisoned_pages`](crate::GuestMemfd::poisoned_pages); injected again by the new owner |
//! | restructuring | the split / waiting-to-merge huge pages of a HugeTLB file, with the companion file of pieces as a descriptor |
//! | bindings, VM link | the VMM, through [`FileOffer`] (memslots belong to the VM, not to the file) |
//! | pins | the VMM, through [`FileOffer::pin`]; taken again by the new owner, returned in [`RestoredFile::pins`] |
//!
//! # Limits
//!
//! - HugeTLB files travel with their companion file of split pieces (one more descriptor per
//!   HugeTLB file, after the files): the new owner maps the pieces of every split huge page
//!   and marks those waiting to merge, so it can split and merge on its own afterwards. While
//!   frozen, and once handed over, nothing merges in the old owner, and poison (which splits)
//!   is compared again before `COMMIT`; after the hand-over the old owner refuses poison
//!   (`EPERM`): the new owner records it.
//! - A file shared with peer processes ([`crate::peer`]) is refused (`EBUSY`): its followers
//!   would go on following the old owner and miss the new owner's conversions. A follower
//!   that died is forgotten at the owner's next conversion to private.
//! - The kernel guest_memfd travels (the new owner can map and read it) but cannot be bound to
//!   a new VM: [`copy_into_new`] is the path, a copy, measured as one.
//!
//! ```
//! use gmem::preserve::{hand_over, receive, FileOffer, Options};
//! use gmem::{Attr, Errno, Flags, GuestMemfd};
//! use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
//! use std::os::fd::AsFd;
//!
//! let mem = GuestMemfd::create(8 * 4096, Flags::MMAP | Flags::INIT_SHARED)?;
//! mem.write_at(0, b"kept")?;
//! mem.convert(4096, 4096, Attr::Private)?;
//! let (old, new) = socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
//! // The new owner is usually another process; a thread shows the same protocol.
//! let taker = std::thread::spawn(move || receive(new.as_fd(), &Options::default()));
//! let done = hand_over(old.as_fd(), &[FileOffer::new(&mem)], &Options::default())?;
//! let restored = taker.join().unwrap()?;
//! let got = &restored.files[0].mem;
//! let mut buf = [0u8; 4];
//! got.read_at(0, &mut buf)?;
//! assert_eq!(&buf, b"kept");
//! assert_eq!(got.attr(4096)?, Attr::Private);
//! // The old handle no longer owns the file.
//! assert_eq!(mem.convert(0, 4096, Attr::Private).unwrap_err().errno(), libc::EPERM);
//! println!("paused {:?}", done.pause);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod copy;
mod crc;
pub mod error;
pub mod exec;
pub mod format;
pub mod handover;

pub use crate::engine::gate::Phase;
pub use copy::{copy_into_new, CopyReport};
pub use crc::{crc32c, update as crc32c_update};
pub use error::{FormatError, HandoverError};
pub use exec::{exec_replacing, receive_inherited, spawn_with_inherited, Spawned, HANDOVER_ENV};
pub use format::{
    Binding, FileState, NumaMode, NumaRecord, PinRecord, RestructureKind, Restructured, RunRecord,
    State, VmLink,
};
pub use handover::{
    hand_over, receive, FileOffer, HandedOver, Options, Restored, RestoredFile, Step,
};
