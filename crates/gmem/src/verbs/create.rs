//! Creating a file: the builder, and wrapping a backing made elsewhere.

use crate::backing::{Backing, HugeTlb, Shmem};
use crate::engine::prealloc::Prealloc;
use crate::engine::{Assembly, CreateError, Engine};
use crate::model::flags::Flags;
use crate::model::numa::NumaPolicy;
use crate::model::units::PAGE_SIZE;

use super::GuestMemfd;

/// Which backing a [`Builder`] creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackingChoice {
    /// memfd with 4 KiB pages.
    #[default]
    Shmem,
    /// HugeTLB memfd with huge pages of this size in bytes
    /// ([`HUGE_2M`](crate::HUGE_2M) or [`HUGE_1G`](crate::HUGE_1G)), the whole size reserved at
    /// creation.
    HugeTlb(u64),
}

/// Builder for [`GuestMemfd`].
#[derive(Debug, Clone)]
pub struct Builder {
    size: u64,
    flags: Flags,
    backing: BackingChoice,
    numa: Option<NumaPolicy>,
    prealloc: Option<Prealloc>,
    piece_limit: Option<u64>,
}

impl Builder {
    /// Sets the creation flags.
    pub fn flags(mut self, flags: Flags) -> Self {
        self.flags = flags;
        self
    }

    /// Chooses the backing.
    pub fn backing(mut self, backing: BackingChoice) -> Self {
        self.backing = backing;
        self
    }

    /// Sets the NUMA policy, applied before any page is allocated (validated at
    /// [`Builder::create`]).
    pub fn numa(mut self, policy: NumaPolicy) -> Self {
        self.numa = Some(policy);
        self
    }

    /// Preallocates every page at creation (`None`: pages are allocated on first use).
    pub fn prealloc(mut self, prealloc: Option<Prealloc>) -> Self {
        self.prealloc = prealloc;
        self
    }

    /// HugeTLB: the most bytes of 4 KiB pieces the file may hold at once (each split huge
    /// page holds its size in pieces on top of the huge page). A split past it fails with
    /// `ENOMEM`, so a guest that mixes attributes in every huge page cannot make the host
    /// double its memory. Default: a quarter of the file, at least 16 MiB and one huge page.
    pub fn max_piece_bytes(mut self, bytes: u64) -> Self {
        self.piece_limit = Some(bytes);
        self
    }

    /// Creates the file.
    pub fn create(self) -> Result<GuestMemfd, CreateError> {
        let block = match self.backing {
            BackingChoice::Shmem => PAGE_SIZE,
            BackingChoice::HugeTlb(page) => page,
        };
        if let BackingChoice::HugeTlb(page_size) = self.backing {
            if page_size != crate::HUGE_2M && page_size != crate::HUGE_1G {
                return Err(crate::HugeTlbError::UnsupportedPageSize { page_size }.into());
            }
        }
        crate::engine::check_args(self.size, self.flags, block)?;
        if let Some(p) = &self.numa {
            crate::verbs::numa::validate(p)?;
        }
        let backing: Box<dyn Backing> = match self.backing {
            BackingChoice::Shmem => {
                Box::new(
                    Shmem::create(self.size).map_err(|source| CreateError::Backing {
                        op: "memfd_create",
                        source,
                    })?,
                )
            }
            BackingChoice::HugeTlb(page) => Box::new(HugeTlb::create(self.size, page)?),
        };
        let how = Assembly {
            piece_limit: self.piece_limit,
            ..Assembly::default()
        };
        let mem =
            GuestMemfd::from_engine(Engine::assemble(backing, self.size, self.flags, how)?, true);
        if let Some(p) = &self.numa {
            mem.set_numa_policy(p)?;
        }
        if let Some(p) = &self.prealloc {
            mem.preallocate(p)?;
        }
        Ok(mem)
    }
}

impl GuestMemfd {
    /// Starts building a file of `size` bytes (shmem backing, no flags).
    pub fn builder(size: u64) -> Builder {
        Builder {
            size,
            flags: Flags::NONE,
            backing: BackingChoice::Shmem,
            numa: None,
            prealloc: None,
            piece_limit: None,
        }
    }

    /// Creates a shmem-backed file of `size` bytes with `flags`.
    pub fn create(size: u64, flags: Flags) -> Result<Self, CreateError> {
        Self::builder(size).flags(flags).create()
    }

    /// Wraps a backing created elsewhere (for example the kernel guest_memfd from the KVM
    /// crate). `size` and `flags` are validated against the backing's block size.
    pub fn from_backing(
        backing: Box<dyn Backing>,
        size: u64,
        flags: Flags,
    ) -> Result<Self, CreateError> {
        let engine = Engine::assemble(backing, size, flags, Assembly::default())?;
        Ok(GuestMemfd::from_engine(engine, true))
    }
}
