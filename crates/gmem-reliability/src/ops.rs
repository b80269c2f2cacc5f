//! The operations of the randomized driver and their generator.
//!
//! Each operation carries raw arguments; indices into the current pins and views are reduced
//! modulo their count when the operation runs, so removing operations from a failing sequence
//! (shrinking) leaves every remaining operation meaningful. A sequence prints with `{:#?}`.

use gmem::Attr;

use crate::model::PAGE;
use crate::rng::Rng;

/// One operation on a guest memory file (and, where named, its follower in the same process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `convert(offset, len, to)` on the owner.
    Convert {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Target attribute.
        to: Attr,
    },
    /// `convert` on the follower (always `EPERM` once the range is valid).
    FollowerConvert {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// `fallocate(mode, offset, len)`.
    Fallocate {
        /// Raw mode bits.
        mode: i32,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// `write_at(offset, pattern(seed, len))`.
    WriteAt {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Pattern seed.
        seed: u8,
    },
    /// `read_at(offset, len)` (on the follower when `follower`).
    ReadAt {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Read through the follower.
        follower: bool,
    },
    /// The guest writes `pattern(seed, len)` at `offset`.
    GuestWrite {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Pattern seed.
        seed: u8,
    },
    /// The guest reads `len` bytes at `offset`.
    GuestRead {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// `pin(offset, len)` (on the follower when `follower`).
    Pin {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Pin in the follower.
        follower: bool,
    },
    /// Drops pin number `index % pins`.
    Unpin {
        /// Raw index.
        index: usize,
    },
    /// `Pin::write(at % (len + 2), pattern(seed, len_raw % 64))` on pin `index % pins`.
    PinWrite {
        /// Raw index.
        index: usize,
        /// Raw offset in the pin.
        at: u64,
        /// Raw length.
        len: u64,
        /// Pattern seed.
        seed: u8,
    },
    /// `Pin::read` on pin `index % pins`, reduced as for `PinWrite`.
    PinRead {
        /// Raw index.
        index: usize,
        /// Raw offset in the pin.
        at: u64,
        /// Raw length.
        len: u64,
    },
    /// A one-byte write through view `view % views` at `at % view_len`.
    HostWrite {
        /// Raw view index (the follower's view is the last one when present).
        view: usize,
        /// Raw byte offset in the view.
        at: u64,
        /// Byte written.
        value: u8,
    },
    /// A one-byte read through view `view % views` at `at % view_len`.
    HostRead {
        /// Raw view index.
        view: usize,
        /// Raw byte offset in the view.
        at: u64,
    },
    /// A new host view of `(offset, len)` (may be invalid).
    Map {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Drops an extra view (never the first whole-file one).
    Unmap {
        /// Raw index.
        index: usize,
    },
    /// The listener vetoes conversions containing `page` (none for `None`).
    SetVeto {
        /// Page to protect.
        page: Option<u64>,
    },
    /// `inject_poison(offset)` (owner only; files without a follower).
    InjectPoison {
        /// Offset (may be past the end).
        offset: u64,
    },
    /// `attr(offset)`.
    AttrAt {
        /// Offset.
        offset: u64,
    },
    /// `runs(offset, len)`.
    Runs {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

/// Deterministic contents for a write: never all zero, different per seed and position.
pub fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let i = i.to_le_bytes()[0];
            seed.wrapping_mul(31).wrapping_add(i.wrapping_mul(7)) | 1
        })
        .collect()
}

/// Generates operations for a file of `size` bytes.
#[derive(Debug)]
pub struct Generator {
    rng: Rng,
    size: u64,
    follower: bool,
    fine: bool,
    block: u64,
}

impl Generator {
    /// A generator seeded with `seed` for a file of `size` bytes; `follower` adds follower
    /// operations.
    pub fn new(seed: u64, size: u64, follower: bool) -> Self {
        Generator {
            rng: Rng::new(seed),
            size,
            follower,
            fine: false,
            block: PAGE,
        }
    }

    /// Generates for a backing with `block`-byte allocation units (HugeTLB): most fallocate
    /// ranges are then block aligned.
    pub fn block(mut self, block: u64) -> Self {
        self.block = block;
        self
    }

    /// Makes most page ranges a single page, so the file fragments into many runs (hundreds,
    /// past the attribute index's chunk size).
    pub fn fine(mut self) -> Self {
        self.fine = true;
        self
    }

    /// A byte range, valid about 85% of the time, otherwise one of the invalid classes.
    fn bytes(&mut self) -> (u64, u64) {
        let size = self.size;
        let r = &mut self.rng;
        if r.chance(85, 100) {
            let off = r.below(size);
            let max = (size - off).min(3 * PAGE);
            let len = if r.chance(1, 4) {
                r.range(1, 16)
            } else {
                r.range(1, max)
            };
            return (off, len.min(size - off));
        }
        match r.below(5) {
            0 => (r.below(size), 0),
            1 => (size + r.below(2 * PAGE), r.range(1, 64)),
            2 => (u64::MAX - r.below(64), r.range(65, 4 * PAGE)),
            3 => {
                let off = r.below(size);
                (off, size - off + r.range(1, PAGE))
            }
            _ => (size - r.range(1, 8), r.range(9, 64)),
        }
    }

    /// A page range, valid about 80% of the time, otherwise one of the invalid classes.
    fn pages(&mut self) -> (u64, u64) {
        let pages = self.size / PAGE;
        let r = &mut self.rng;
        if self.fine && r.chance(7, 10) {
            return (r.below(pages) * PAGE, PAGE);
        }
        if r.chance(80, 100) {
            let start = r.below(pages);
            let left = pages - start;
            let n = match r.below(10) {
                0..=5 => r.range(1, left.min(4)),
                6..=8 => r.range(1, left),
                _ => left,
            };
            return if r.chance(1, 10) {
                (0, pages * PAGE)
            } else {
                (start * PAGE, n * PAGE)
            };
        }
        match r.below(7) {
            0 => (r.below(pages) * PAGE, 0),
            1 => (r.below(pages) * PAGE + r.range(1, PAGE - 1), PAGE),
            2 => (
                r.below(pages) * PAGE,
                r.range(1, 3) * PAGE + r.range(1, PAGE - 1),
            ),
            3 => (
                u64::MAX - PAGE + 1 - r.below(4) * PAGE,
                r.range(2, 8) * PAGE,
            ),
            4 => (pages * PAGE, PAGE),
            5 => {
                let start = r.below(pages);
                (start * PAGE, (pages - start + r.range(1, 4)) * PAGE)
            }
            _ => (r.below(4) * PAGE, u64::MAX - PAGE + 1),
        }
    }

    fn fallocate(&mut self) -> Op {
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let punch = keep | libc::FALLOC_FL_PUNCH_HOLE;
        let mode = match self.rng.below(20) {
            0..=9 => punch,
            10..=15 => keep,
            16 => 0,
            17 => libc::FALLOC_FL_PUNCH_HOLE,
            18 => keep | libc::FALLOC_FL_ZERO_RANGE,
            _ => 1 << self.rng.range(8, 30),
        };
        let blocks = self.size / self.block;
        let (offset, len) = if self.block > PAGE && self.rng.chance(7, 10) {
            let start = self.rng.below(blocks);
            (
                start * self.block,
                self.rng.range(1, blocks - start) * self.block,
            )
        } else if self.rng.chance(1, 10) {
            // Past the end: punch is a no-op, allocation is EINVAL.
            (
                self.size + self.rng.below(4) * PAGE,
                self.rng.range(1, 4) * PAGE,
            )
        } else if self.rng.chance(1, 20) {
            (i64::MAX as u64 - PAGE + 1, 2 * PAGE)
        } else {
            self.pages()
        };
        Op::Fallocate { mode, offset, len }
    }

    /// The next operation.
    pub fn op(&mut self) -> Op {
        let seed = self.rng.byte();
        let follower = self.follower && self.rng.chance(1, 4);
        match self.rng.below(100) {
            0..=29 => self.convert(),
            30..=37 => self.fallocate(),
            k @ 38..=61 => self.access(k, seed, follower),
            k @ 62..=80 => self.pin_op(k, seed, follower),
            k @ 81..=93 => self.view_op(k, seed),
            94 => self.set_veto(),
            95 if !self.follower && self.rng.chance(1, 2) => self.inject_poison(),
            95 => self.attr_at(),
            k => self.runs_or_follower_convert(k),
        }
    }

    /// `convert` of a page range to either attribute.
    fn convert(&mut self) -> Op {
        let (offset, len) = self.pages();
        let to = if self.rng.chance(1, 2) {
            Attr::Private
        } else {
            Attr::Shared
        };
        Op::Convert { offset, len, to }
    }

    /// A host or guest access of a byte range, for `k` in 38..=61 of [`Generator::op`]'s
    /// draw.
    fn access(&mut self, k: u64, seed: u8, follower: bool) -> Op {
        let (offset, len) = self.bytes();
        match k {
            38..=46 => Op::WriteAt { offset, len, seed },
            47..=52 => Op::ReadAt {
                offset,
                len,
                follower,
            },
            53..=59 => Op::GuestWrite { offset, len, seed },
            _ => Op::GuestRead { offset, len },
        }
    }

    /// A pin, an unpin, or an access through a pin, for `k` in 62..=80 of
    /// [`Generator::op`]'s draw.
    fn pin_op(&mut self, k: u64, seed: u8, follower: bool) -> Op {
        match k {
            62..=68 => {
                let (offset, len) = self.bytes();
                Op::Pin {
                    offset,
                    len,
                    follower,
                }
            }
            69..=75 => Op::Unpin {
                index: self.rng.index(64),
            },
            76..=78 => Op::PinWrite {
                index: self.rng.index(64),
                at: self.rng.next_u64(),
                len: self.rng.below(64),
                seed,
            },
            _ => Op::PinRead {
                index: self.rng.index(64),
                at: self.rng.next_u64(),
                len: self.rng.below(64),
            },
        }
    }

    /// A one-byte access through a host view, a new view or dropping one, for `k` in 81..=93
    /// of [`Generator::op`]'s draw.
    fn view_op(&mut self, k: u64, seed: u8) -> Op {
        match k {
            81..=87 => Op::HostWrite {
                view: self.rng.index(8),
                at: self.rng.next_u64(),
                value: seed,
            },
            88..=91 => Op::HostRead {
                view: self.rng.index(8),
                at: self.rng.next_u64(),
            },
            92 => self.map(),
            _ => Op::Unmap {
                index: self.rng.index(8),
            },
        }
    }

    /// A new host view: mostly of whole pages (possibly past the end), else of a byte range.
    fn map(&mut self) -> Op {
        let (offset, len) = if self.rng.chance(3, 4) {
            let pages = self.size / PAGE;
            let start = self.rng.below(pages);
            (start * PAGE, self.rng.range(1, pages + 2 - start) * PAGE)
        } else {
            self.bytes()
        };
        Op::Map { offset, len }
    }

    /// The listener's veto: one page half the time, none the other half.
    fn set_veto(&mut self) -> Op {
        Op::SetVeto {
            page: self
                .rng
                .chance(1, 2)
                .then(|| self.rng.below(self.size / PAGE)),
        }
    }

    /// Poison at an offset, rarely past the end.
    fn inject_poison(&mut self) -> Op {
        Op::InjectPoison {
            offset: if self.rng.chance(15, 16) {
                self.rng.below(self.size)
            } else {
                self.size + self.rng.below(4 * PAGE)
            },
        }
    }

    /// `attr` at an offset, sometimes anywhere past the end.
    fn attr_at(&mut self) -> Op {
        Op::AttrAt {
            offset: if self.rng.chance(9, 10) {
                self.rng.below(self.size)
            } else {
                self.size + self.rng.below(u64::MAX - self.size)
            },
        }
    }

    /// `runs` of a page range, for `k` in 96..=99 of [`Generator::op`]'s draw; for 98 and 99
    /// the follower's `convert` of it instead, when there is a follower.
    fn runs_or_follower_convert(&mut self, k: u64) -> Op {
        let (offset, len) = self.pages();
        if k >= 98 && self.follower {
            Op::FollowerConvert { offset, len }
        } else {
            Op::Runs { offset, len }
        }
    }
}
