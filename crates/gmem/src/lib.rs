//! # gmem: guest-first memory for Rust virtual machine monitors
//!
//! gmem gives a VMM the memory model of Linux's guest_memfd: every page of guest memory is
//! *shared* or *private*; the host maps and touches only shared pages (a host touch of a
//! private page is a real `SIGBUS`); the guest converts pages in place, and conversion to
//! private is refused with `EAGAIN` while the host still holds a page. Every error names the
//! errno the kernel uses for the same case (`err.errno()`), so the kernel and gmem can be
//! compared call for call.
//!
//! - [`GuestMemfd`]: the file; [`GuestMemfd::builder`] creates one.
//! - [`GuestMemfd::convert`]: in-place conversion ([`convert`] module docs give the rules).
//! - [`GuestMemfd::map`]: host views ([`HostView`]), enforced by poison markers
//!   ([`view::host`] docs give the mechanism and its limits).
//! - [`GuestMemfd::read_at`], [`GuestMemfd::write_at`], [`GuestMemfd::pin`]: checked host
//!   access that returns an error for private pages instead of faulting.
//! - [`GuestMemfd::guest`]: the guest view, which reaches every page.
//! - [`GuestMemfd::fallocate`]: allocate and punch-hole with the kernel's rules.
//! - [`GuestMemfd::add_listener`]: conversion listeners that may veto.
//! - [`GuestMemfd::share_with_process`] / [`GuestMemfd::attach`]: other processes.
//! - [`BackingChoice::HugeTlb`]: 2 MiB / 1 GiB pages reserved at creation
//!   ([`backing::hugetlb`]); mixed huge pages are split and merged back ([`restructure`]).
//! - [`GuestMemfd::inject_poison`]: memory failure ([`poison`]);
//!   [`GuestMemfd::set_numa_policy`]: placement ([`numa`]); [`GuestMemfd::preallocate`] and
//!   [`Builder::prealloc`]: populating up front ([`prealloc`]).
#![deny(missing_docs)]

pub mod access;
pub mod attr;
pub mod backing;
pub mod convert;
pub mod fallocate;
pub mod file;
pub mod flags;
pub mod listener;
pub mod numa;
pub mod peer;
pub mod poison;
pub mod prealloc;
pub mod preserve;
pub mod range;
mod refs;
pub mod restructure;
pub mod sys;
pub mod view;

pub use access::{AccessError, Pin};
pub use attr::{Attr, RunMap};
pub use backing::hugetlb::{HugeTlbError, PoolGuard, PoolStats, HUGE_1G, HUGE_2M};
pub use backing::{Backing, BackingKind};
pub use convert::ConvertError;
pub use fallocate::{FallocMode, FallocateError};
pub use file::{AttrRun, BackingChoice, Builder, CreateError, FileError, FileId, GuestMemfd};
pub use flags::Flags;
pub use listener::{Conversion, ConversionListener, ListenerId, Veto};
pub use numa::{NumaError, NumaPolicy};
pub use peer::PeerError;
pub use poison::PoisonError;
pub use prealloc::{Prealloc, PreallocError, Progress};
pub use range::{ByteRange, RangeError};
pub use restructure::Accounting;
pub use sys::PAGE_SIZE;
pub use view::guest::GuestView;
pub use view::host::{HostView, MapError, Sharing};

impl GuestMemfd {
    /// Adds a conversion listener; it hears of every conversion from now on.
    pub fn add_listener(&self, listener: std::sync::Arc<dyn ConversionListener>) -> ListenerId {
        self.inner.control().listeners.add(listener)
    }

    /// Removes a listener; returns false when it was not registered.
    pub fn remove_listener(&self, id: ListenerId) -> bool {
        self.inner.control().listeners.remove(id)
    }
}

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
