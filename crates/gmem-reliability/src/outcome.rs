//! Real gmem errors reduced to what the model predicts: a class, the errno and the offset.

use std::fmt;

use gmem::Errno;
use gmem::{AccessError, ConvertError, FallocateError, FileError, MapError, RangeError};

/// Which case an error is, independent of the module that reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Zero length.
    Empty,
    /// Offset or length not aligned.
    Unaligned,
    /// `offset + len` wraps (or, for fallocate, an offset or length above `i64::MAX`).
    Overflow,
    /// The range ends past the end of the file.
    OutOfBounds,
    /// A page in the range is private (checked host access).
    Private,
    /// A page in the range is poisoned (memory failure).
    Poisoned,
    /// A page in the range holds a host reference (conversion to private).
    Busy,
    /// A listener refused the conversion.
    Vetoed,
    /// The call is not supported (fallocate mode, file I/O, resize).
    Unsupported,
    /// `offset + len` beyond the largest file (fallocate).
    TooBig,
    /// A page holds too many references.
    TooManyRefs,
    /// The file has no host mapping.
    NoMapping,
    /// A follower tried to convert.
    NotOwner,
    /// The file was created without `MMAP`.
    NotMappable,
    /// A copy-on-write mapping was requested.
    CopyOnWrite,
    /// An OS error (the errno tells which).
    Os,
    /// A peer failed.
    Peer,
}

/// An expected or observed error: class, errno and offending offset.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fault {
    /// The case.
    pub class: Class,
    /// The errno reported.
    pub errno: i32,
    /// The offending offset, where the error names one.
    pub offset: Option<u64>,
    /// For a conversion that stopped part way (HugeTLB, one huge page at a time): the first
    /// byte not converted.
    pub reached: Option<u64>,
}

impl fmt::Debug for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}(errno {}", self.class, self.errno)?;
        if let Some(o) = self.offset {
            write!(f, ", offset {o:#x}")?;
        }
        if let Some(r) = self.reached {
            write!(f, ", stopped at {r:#x}")?;
        }
        write!(f, ")")
    }
}

impl Fault {
    /// A fault with an offset.
    pub fn at(class: Class, errno: i32, offset: u64) -> Self {
        Fault {
            class,
            errno,
            offset: Some(offset),
            reached: None,
        }
    }

    /// A fault without an offset.
    pub fn bare(class: Class, errno: i32) -> Self {
        Fault {
            class,
            errno,
            offset: None,
            reached: None,
        }
    }
}

/// Reduces a real error to a [`Fault`]. Variants this crate does not know yet reduce to
/// [`Class::Os`] with their errno, so they show up as a divergence rather than a build error.
pub trait Reduce {
    /// The error's class, errno and offset.
    fn reduce(&self) -> Fault;
}

impl Reduce for RangeError {
    fn reduce(&self) -> Fault {
        let class = match self {
            RangeError::Empty { .. } => Class::Empty,
            RangeError::Unaligned { .. } => Class::Unaligned,
            RangeError::Overflow { .. } => Class::Overflow,
            RangeError::OutOfBounds { .. } => Class::OutOfBounds,
        };
        Fault::at(class, self.errno(), self.offset())
    }
}

impl Reduce for AccessError {
    fn reduce(&self) -> Fault {
        let errno = self.errno();
        match self {
            AccessError::Range(r) => Fault {
                errno,
                ..r.reduce()
            },
            AccessError::Private { offset } => Fault::at(Class::Private, errno, *offset),
            AccessError::TooManyRefs { offset } => Fault::at(Class::TooManyRefs, errno, *offset),
            AccessError::NoMapping => Fault::bare(Class::NoMapping, errno),
            AccessError::Poisoned { offset } => Fault::at(Class::Poisoned, errno, *offset),
            #[allow(unreachable_patterns)]
            _ => Fault::bare(Class::Os, errno),
        }
    }
}

impl Reduce for ConvertError {
    fn reduce(&self) -> Fault {
        let errno = self.errno();
        let offset = self.error_offset();
        let class = match self {
            ConvertError::Range(r) => {
                return Fault {
                    errno,
                    ..r.reduce()
                }
            }
            ConvertError::Busy { .. } => Class::Busy,
            ConvertError::Vetoed { .. } => Class::Vetoed,
            ConvertError::Gate(_) => Class::NotOwner,
            ConvertError::NoMem { .. } => Class::Os,
            ConvertError::Os { .. } => Class::Os,
            ConvertError::Peer { .. } => Class::Peer,
            ConvertError::Partial { reached, source } => {
                return Fault {
                    reached: Some(*reached),
                    ..source.reduce()
                }
            }
            #[allow(unreachable_patterns)]
            _ => Class::Os,
        };
        Fault {
            class,
            errno,
            offset,
            reached: None,
        }
    }
}

impl Reduce for FallocateError {
    fn reduce(&self) -> Fault {
        let errno = self.errno();
        match self {
            FallocateError::Range(r) => Fault {
                errno,
                ..r.reduce()
            },
            FallocateError::Unsupported { .. } => Fault::bare(Class::Unsupported, errno),
            FallocateError::TooBig { offset, .. } => Fault::at(Class::TooBig, errno, *offset),
            FallocateError::Os { offset, .. } => Fault::at(Class::Os, errno, *offset),
            #[allow(unreachable_patterns)]
            _ => Fault::bare(Class::Os, errno),
        }
    }
}

impl Reduce for FileError {
    fn reduce(&self) -> Fault {
        let errno = self.errno();
        match self {
            FileError::Range(r) => Fault {
                errno,
                ..r.reduce()
            },
            FileError::Unsupported { .. } | FileError::Resize { .. } => {
                Fault::bare(Class::Unsupported, errno)
            }
            FileError::Gate(_) => Fault::bare(Class::NotOwner, errno),
            FileError::Os { .. } => Fault::bare(Class::Os, errno),
            #[allow(unreachable_patterns)]
            _ => Fault::bare(Class::Os, errno),
        }
    }
}

impl Reduce for MapError {
    fn reduce(&self) -> Fault {
        let errno = self.errno();
        match self {
            MapError::Range(r) => Fault {
                errno,
                ..r.reduce()
            },
            MapError::NotMappable => Fault::bare(Class::NotMappable, errno),
            MapError::CopyOnWrite => Fault::bare(Class::CopyOnWrite, errno),
            MapError::Os { offset, .. } => Fault::at(Class::Os, errno, *offset),
            #[allow(unreachable_patterns)]
            _ => Fault::bare(Class::Os, errno),
        }
    }
}

impl Reduce for gmem::PoisonError {
    fn reduce(&self) -> Fault {
        let errno = self.errno();
        match self {
            gmem::PoisonError::Range(r) => Fault {
                errno,
                ..r.reduce()
            },
            gmem::PoisonError::Busy { offset } => Fault::at(Class::Busy, errno, *offset),
            gmem::PoisonError::Os { offset, .. } => Fault::at(Class::Os, errno, *offset),
            #[allow(unreachable_patterns)]
            _ => Fault::bare(Class::Os, errno),
        }
    }
}

/// Reduces a real result to `Result<T, Fault>`.
pub fn reduce<T, E: Reduce>(r: Result<T, E>) -> Result<T, Fault> {
    r.map_err(|e| e.reduce())
}
