//! The reference model: a guest memory file's whole state in plain Rust, no syscalls.
//!
//! The model keeps, per base page, the attribute, the contents (every byte), whether the page
//! is allocated, and the host references held by pins in the owning process and in a follower
//! process. It also counts what a conversion listener must have heard. Each method takes the
//! same arguments as the real call and returns what the real call must return, applying the
//! rules of the design (`DESIGN.md` §2) independently of gmem's code: range checks in the
//! kernel's order, "already in the target state" before any other check, listener veto before
//! the reference check, local references before a follower's, punch-hole that zeroes and
//! deallocates but keeps attributes, contents that survive conversion, poisoned pages that
//! fault in every host view, are refused (`EHWPOISON`) by accessors and the guest view before
//! any attribute check, survive conversions and are cleared by punch-hole.

use gmem::Attr;

use crate::outcome::{Class, Fault};

/// The base page size.
pub const PAGE: u64 = 4096;

/// `fallocate` bits the VFS knows at all (anything else is `EOPNOTSUPP`).
const VFS_KNOWN: i32 = libc::FALLOC_FL_KEEP_SIZE
    | libc::FALLOC_FL_PUNCH_HOLE
    | libc::FALLOC_FL_COLLAPSE_RANGE
    | libc::FALLOC_FL_ZERO_RANGE
    | libc::FALLOC_FL_INSERT_RANGE
    | libc::FALLOC_FL_UNSHARE_RANGE
    | 0x80;

/// Mode words the VFS passes on to the file; other combinations of known bits are
/// `EOPNOTSUPP` before the size check (measured against the kernel guest_memfd).
const VFS_MODES: [i32; 10] = [0x0, 0x1, 0x3, 0x8, 0x10, 0x11, 0x20, 0x40, 0x41, 0x80];

/// Checks `(offset, len)` the way every gmem range is checked: empty, unaligned, wrapping,
/// past the end, in that order; all `EINVAL`, all naming `offset`.
pub fn check_range(offset: u64, len: u64, align: u64, size: u64) -> Result<(u64, u64), Fault> {
    let fault = |class| Fault::at(class, libc::EINVAL, offset);
    if len == 0 {
        return Err(fault(Class::Empty));
    }
    if offset % align != 0 || len % align != 0 {
        return Err(fault(Class::Unaligned));
    }
    let Some(end) = offset.checked_add(len) else {
        return Err(fault(Class::Overflow));
    };
    if end > size {
        return Err(fault(Class::OutOfBounds));
    }
    Ok((offset, end))
}

/// A pin as the model keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinRec {
    /// First byte pinned.
    pub offset: u64,
    /// Bytes pinned.
    pub len: u64,
    /// Held by the follower process rather than the owner.
    pub follower: bool,
}

impl PinRec {
    fn pages(&self) -> std::ops::Range<usize> {
        page(self.offset)..idx((self.offset + self.len).div_ceil(PAGE))
    }
}

fn page(byte: u64) -> usize {
    usize::try_from(byte / PAGE).unwrap_or(usize::MAX)
}

fn idx(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// What a one-byte touch through a host view does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    /// The byte is reachable; a read sees this value.
    Ok(u8),
    /// `SIGBUS` (`BUS_ADRERR`).
    Sigbus,
}

/// Allocation state of a page, as the backing keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alloc {
    /// No page: reads back zero, `SEEK_HOLE` sees a hole, no blocks counted.
    Hole,
    /// Allocated by `fallocate` but never touched: counted in `st_blocks`, yet still a hole
    /// for `SEEK_DATA` (the page is not up to date until first use).
    Reserved,
    /// Allocated and in use: data for `SEEK_DATA`.
    Data,
}

/// A guest memory file's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    size: u64,
    block: u64,
    mmap: bool,
    attrs: Vec<Attr>,
    bytes: Vec<u8>,
    allocated: Vec<Alloc>,
    refs: Vec<u32>,
    follower_refs: Vec<u32>,
    pins: Vec<PinRec>,
    poisoned: Vec<bool>,
    /// Per block (huge page): split into base pages.
    split: Vec<bool>,
    veto: Option<u64>,
    commits: u64,
    aborts: u64,
}

impl Model {
    /// A fresh file of `size` bytes (page aligned, non-zero): every page unallocated, zero,
    /// shared when `init_shared`, otherwise private.
    pub fn new(size: u64, mmap: bool, init_shared: bool) -> Self {
        let pages = page(size);
        let attr = if init_shared {
            Attr::Shared
        } else {
            Attr::Private
        };
        Model {
            size,
            block: PAGE,
            mmap,
            attrs: vec![attr; pages],
            bytes: vec![0; idx(size)],
            allocated: vec![Alloc::Hole; pages],
            refs: vec![0; pages],
            follower_refs: vec![0; pages],
            pins: Vec::new(),
            poisoned: vec![false; pages],
            split: Vec::new(),
            veto: None,
            commits: 0,
            aborts: 0,
        }
    }

    /// The same file on a backing whose allocation unit is `block` bytes (a HugeTLB huge
    /// page): fallocate ranges and view offsets align to it, and a conversion proceeds one
    /// block at a time, stopping part way (reporting how far it got) at the first block it
    /// cannot convert.
    pub fn with_block(mut self, block: u64) -> Self {
        self.block = block;
        self.split = vec![false; idx(self.size / block)];
        self
    }

    /// True when block `h` can be one huge page: all private, or all shared with no poisoned
    /// page.
    fn whole(&self, h: usize) -> bool {
        let per = idx(self.block / PAGE);
        let r = h * per..(h + 1) * per;
        self.attrs[r.clone()].iter().all(|&a| a == Attr::Private)
            || (self.attrs[r.clone()].iter().all(|&a| a == Attr::Shared)
                && !self.poisoned[r].iter().any(|&p| p))
    }

    fn referenced(&self, h: usize) -> bool {
        let per = idx(self.block / PAGE);
        (h * per..(h + 1) * per).any(|p| self.refs[p] != 0 || self.follower_refs[p] != 0)
    }

    /// Brings the split state up to date after an operation: a block that is not whole is
    /// split; a split block that is whole merges once nothing references its pages (until then
    /// it waits).
    pub fn settle(&mut self) {
        for h in 0..self.split.len() {
            if !self.whole(h) {
                self.split[h] = true;
            } else if self.split[h] && !self.referenced(h) {
                self.split[h] = false;
            }
        }
    }

    /// Blocks split into base pages (HugeTLB).
    pub fn split_blocks(&self) -> u64 {
        self.split.iter().filter(|&&s| s).count() as u64
    }

    /// Split blocks that are whole and wait for their references to go before merging.
    pub fn waiting_blocks(&self) -> u64 {
        (0..self.split.len())
            .filter(|&h| self.split[h] && self.whole(h))
            .count() as u64
    }

    /// Allocation unit in bytes.
    pub fn block(&self) -> u64 {
        self.block
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of base pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE
    }

    /// Attribute of page `p`.
    pub fn page_attr(&self, p: u64) -> Attr {
        self.attrs[idx(p)]
    }

    /// Contents of page `p`.
    pub fn page_bytes(&self, p: u64) -> &[u8] {
        let s = idx(p * PAGE);
        &self.bytes[s..s + idx(PAGE)]
    }

    /// Allocation state of page `p`.
    pub fn alloc(&self, p: u64) -> Alloc {
        self.allocated[idx(p)]
    }

    /// Whether page `p` is poisoned.
    pub fn poisoned(&self, p: u64) -> bool {
        self.poisoned[idx(p)]
    }

    /// Byte offsets of the poisoned pages, in order (`GuestMemfd::poisoned_pages`).
    pub fn poisoned_pages(&self) -> Vec<u64> {
        (0..self.pages())
            .filter(|&p| self.poisoned[idx(p)])
            .map(|p| p * PAGE)
            .collect()
    }

    /// `GuestMemfd::inject_poison(offset)`: marks the page holding `offset` as failed.
    pub fn inject_poison(&mut self, offset: u64) -> Result<(), Fault> {
        if offset >= self.size {
            return Err(Fault::at(Class::OutOfBounds, libc::EINVAL, offset));
        }
        let p = page(offset);
        if self.block > PAGE && !self.poisoned[p] {
            // A block that must split for the poison is not split while a reference holds a
            // page of it: `EBUSY` naming the page.
            let per = idx(self.block / PAGE);
            let h = p / per;
            let all_private = self.attrs[h * per..(h + 1) * per]
                .iter()
                .all(|&a| a == Attr::Private);
            if !all_private && !self.split[h] && self.referenced(h) {
                return Err(Fault::at(Class::Busy, libc::EBUSY, p as u64 * PAGE));
            }
        }
        self.poisoned[p] = true;
        Ok(())
    }

    /// The first poisoned byte of `[s, e)`, as accessors report it.
    fn first_poisoned(&self, s: u64, e: u64) -> Option<u64> {
        (page(s)..page(e.div_ceil(PAGE) * PAGE))
            .find(|&p| self.poisoned[p])
            .map(|p| (p as u64 * PAGE).max(s))
    }

    /// Pins held, in the order they were taken.
    pub fn pins(&self) -> &[PinRec] {
        &self.pins
    }

    /// Conversions the listener must have seen committed.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// Conversions the listener must have seen abandoned after preparing.
    pub fn aborts(&self) -> u64 {
        self.aborts
    }

    /// The page the listener vetoes, if any.
    pub fn veto(&self) -> Option<u64> {
        self.veto
    }

    /// Makes the listener veto every conversion whose range contains `page`.
    pub fn set_veto(&mut self, page: Option<u64>) {
        self.veto = page;
    }

    /// The merged runs covering `[start, end)` pages, as `(offset, len, attr)` in bytes.
    fn runs_between(&self, start: usize, end: usize) -> Vec<(u64, u64, Attr)> {
        let mut out: Vec<(u64, u64, Attr)> = Vec::new();
        for p in start..end {
            let a = self.attrs[p];
            match out.last_mut() {
                Some(last) if last.2 == a => last.1 += PAGE,
                _ => out.push((p as u64 * PAGE, PAGE, a)),
            }
        }
        out
    }

    /// `GuestMemfd::runs(offset, len)`.
    pub fn runs(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, Attr)>, Fault> {
        let (s, e) = check_range(offset, len, PAGE, self.size)?;
        Ok(self.runs_between(page(s), page(e)))
    }

    /// `GuestMemfd::run_count()`.
    pub fn run_count(&self) -> usize {
        self.runs_between(0, self.attrs.len()).len()
    }

    /// `GuestMemfd::attr(offset)`.
    pub fn attr(&self, offset: u64) -> Result<Attr, Fault> {
        if offset >= self.size {
            return Err(Fault::at(Class::OutOfBounds, libc::EINVAL, offset));
        }
        Ok(self.attrs[page(offset)])
    }

    fn touch(&mut self, s: u64, e: u64) {
        for p in page(s)..page(e.div_ceil(PAGE) * PAGE) {
            self.allocated[p] = Alloc::Data;
        }
    }

    /// `GuestMemfd::convert(offset, len, to)` on the owner.
    pub fn convert(&mut self, offset: u64, len: u64, to: Attr) -> Result<(), Fault> {
        let (s, e) = check_range(offset, len, PAGE, self.size)?;
        let (ps, pe) = (page(s), page(e));
        if self.attrs[ps..pe].iter().all(|&a| a == to) {
            return Ok(());
        }
        if let Some(v) = self.veto.filter(|&v| (ps as u64..pe as u64).contains(&v)) {
            return Err(Fault::at(Class::Vetoed, libc::EAGAIN, v * PAGE));
        }
        if self.block == PAGE {
            if to == Attr::Private {
                if let Some(f) = self.first_busy(ps, pe) {
                    self.aborts += 1;
                    return Err(f);
                }
            }
            if to == Attr::Private && self.mmap {
                self.moved(ps, pe);
            }
            self.attrs[ps..pe].fill(to);
            self.commits += 1;
            return Ok(());
        }
        // One block at a time: blocks already in the target state are skipped; the first
        // block that cannot convert stops the call, the blocks before it stay converted.
        let per = idx(self.block / PAGE);
        let mut at = ps;
        while at < pe {
            let end = ((at / per + 1) * per).min(pe);
            let (hf, he) = ((at / per) * per, (at / per + 1) * per);
            let uniform_after = self.attrs[hf..at].iter().all(|&a| a == to)
                && self.attrs[end..he].iter().all(|&a| a == to);
            let poisoned = self.poisoned[hf..he].iter().any(|&p| p);
            if self.attrs[at..end].iter().any(|&a| a != to)
                && !(uniform_after && (to == Attr::Private || !poisoned))
            {
                // A block a reference holds a page of is not split: the call stops there,
                // naming that page.
                if !self.split[at / per] {
                    if let Some(f) = self.first_busy(hf, he) {
                        return Err(self.stopped_at(f, ps, at));
                    }
                }
                // Split before converting; a failed conversion leaves it split until the
                // references that refused it go.
                self.split[at / per] = true;
            }
            if to == Attr::Private && self.attrs[at..end].iter().any(|&a| a != to) {
                if let Some(f) = self.first_busy(at, end) {
                    return Err(self.stopped_at(f, ps, at));
                }
            }
            self.attrs[at..end].fill(to);
            at = end;
        }
        self.commits += 1;
        Ok(())
    }

    /// A HugeTLB conversion of pages from `ps` refused with `f` at page `at`: the listener
    /// hears an abort, and the commit of the part before `at`, which `f` reports.
    fn stopped_at(&mut self, mut f: Fault, ps: usize, at: usize) -> Fault {
        self.aborts += 1;
        if at > ps {
            f.reached = Some(at as u64 * PAGE);
            self.commits += 1;
        }
        f
    }

    /// The first page of `[ps, pe)` holding a host reference, local before a follower's.
    fn first_busy(&self, ps: usize, pe: usize) -> Option<Fault> {
        [&self.refs, &self.follower_refs]
            .into_iter()
            .find_map(|refs| {
                (ps..pe)
                    .find(|&p| refs[p] != 0)
                    .map(|p| Fault::at(Class::Busy, libc::EAGAIN, p as u64 * PAGE))
            })
    }

    /// `GuestMemfd::convert` on a follower: range checks, then `EPERM`.
    pub fn follower_convert(&self, offset: u64, len: u64) -> Result<(), Fault> {
        check_range(offset, len, PAGE, self.size)?;
        Err(Fault::bare(Class::NotOwner, libc::EPERM))
    }

    /// `GuestMemfd::fallocate(mode, offset, len)`.
    pub fn fallocate(&mut self, mode: i32, offset: u64, len: u64) -> Result<(), Fault> {
        let max = i64::MAX as u64;
        if len == 0 {
            return Err(Fault::at(Class::Empty, libc::EINVAL, offset));
        }
        if offset > max || len > max {
            return Err(Fault::at(Class::Overflow, libc::EINVAL, offset));
        }
        let unsupported = Fault::bare(Class::Unsupported, libc::EOPNOTSUPP);
        if mode & !VFS_KNOWN != 0 || !VFS_MODES.contains(&mode) {
            return Err(unsupported);
        }
        let end = match offset.checked_add(len) {
            Some(e) if e <= max => e,
            _ => return Err(Fault::at(Class::TooBig, libc::EFBIG, offset)),
        };
        let (keep, punch) = (libc::FALLOC_FL_KEEP_SIZE, libc::FALLOC_FL_PUNCH_HOLE);
        if mode & keep == 0 || mode & !(keep | punch) != 0 {
            return Err(unsupported);
        }
        if offset % self.block != 0 || len % self.block != 0 {
            return Err(Fault::at(Class::Unaligned, libc::EINVAL, offset));
        }
        if mode & punch != 0 {
            let end = end.min(self.size);
            if offset < end {
                self.bytes[idx(offset)..idx(end)].fill(0);
                self.allocated[page(offset)..page(end)].fill(Alloc::Hole);
                self.poisoned[page(offset)..page(end)].fill(false);
            }
            Ok(())
        } else {
            if end > self.size {
                return Err(Fault::at(Class::OutOfBounds, libc::EINVAL, offset));
            }
            // A first allocation leaves the page not up to date; allocating it again finds
            // it reserved and brings it up to date (zeroed), as shmem does.
            for a in &mut self.allocated[page(offset)..page(end)] {
                *a = match *a {
                    Alloc::Hole => Alloc::Reserved,
                    Alloc::Reserved | Alloc::Data => Alloc::Data,
                };
            }
            Ok(())
        }
    }

    /// A conversion to private moves the allocated shared pages of `[ps, pe)` to fresh memory
    /// (a kernel reference taken through a host view keeps the old page): a page whose bytes
    /// are all zero comes back allocated but not up to date, as `fallocate` leaves it.
    fn moved(&mut self, ps: usize, pe: usize) {
        let page_bytes = idx(PAGE);
        for p in ps..pe {
            let zero = self.bytes[p * page_bytes..(p + 1) * page_bytes]
                .iter()
                .all(|&b| b == 0);
            if self.attrs[p] == Attr::Shared && self.allocated[p] != Alloc::Hole && zero {
                self.allocated[p] = Alloc::Reserved;
            }
        }
    }

    fn first_private(&self, s: u64, e: u64) -> Option<u64> {
        (page(s)..page(e.div_ceil(PAGE) * PAGE))
            .find(|&p| self.attrs[p] == Attr::Private)
            .map(|p| (p as u64 * PAGE).max(s))
    }

    fn checked_host(&self, offset: u64, len: u64) -> Result<(u64, u64), Fault> {
        let (s, e) = check_range(offset, len, 1, self.size)?;
        if let Some(at) = self.first_poisoned(s, e) {
            return Err(Fault::at(Class::Poisoned, libc::EHWPOISON, at));
        }
        if let Some(at) = self.first_private(s, e) {
            return Err(Fault::at(Class::Private, libc::EFAULT, at));
        }
        Ok((s, e))
    }

    /// `GuestMemfd::read_at(offset, buf)` with `buf.len() == len`.
    pub fn read_at(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, Fault> {
        let (s, e) = self.checked_host(offset, len)?;
        self.touch(s, e);
        Ok(self.bytes[idx(s)..idx(e)].to_vec())
    }

    /// `GuestMemfd::write_at(offset, data)`.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), Fault> {
        let (s, e) = self.checked_host(offset, data.len() as u64)?;
        self.touch(s, e);
        self.bytes[idx(s)..idx(e)].copy_from_slice(data);
        Ok(())
    }

    /// `GuestView::read(offset, buf)`: any attribute.
    pub fn guest_read(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, Fault> {
        let (s, e) = check_range(offset, len, 1, self.size)?;
        if let Some(at) = self.first_poisoned(s, e) {
            return Err(Fault::at(Class::Poisoned, libc::EHWPOISON, at));
        }
        self.touch(s, e);
        Ok(self.bytes[idx(s)..idx(e)].to_vec())
    }

    /// `GuestView::write(offset, data)`: any attribute.
    pub fn guest_write(&mut self, offset: u64, data: &[u8]) -> Result<(), Fault> {
        let (s, e) = check_range(offset, data.len() as u64, 1, self.size)?;
        if let Some(at) = self.first_poisoned(s, e) {
            return Err(Fault::at(Class::Poisoned, libc::EHWPOISON, at));
        }
        self.touch(s, e);
        self.bytes[idx(s)..idx(e)].copy_from_slice(data);
        Ok(())
    }

    /// `GuestMemfd::pin(offset, len)`, in the owner or a follower (whose attributes follow the
    /// owner's). On success the pin is appended to [`Model::pins`].
    pub fn pin(&mut self, offset: u64, len: u64, follower: bool) -> Result<(), Fault> {
        let (s, e) = self.checked_host(offset, len)?;
        let rec = PinRec {
            offset: s,
            len: e - s,
            follower,
        };
        let refs = if follower {
            &mut self.follower_refs
        } else {
            &mut self.refs
        };
        for p in rec.pages() {
            refs[p] += 1;
        }
        self.pins.push(rec);
        Ok(())
    }

    /// Drops pin number `i` (an index into [`Model::pins`]).
    pub fn unpin(&mut self, i: usize) -> PinRec {
        let rec = self.pins.remove(i);
        let refs = if rec.follower {
            &mut self.follower_refs
        } else {
            &mut self.refs
        };
        for p in rec.pages() {
            refs[p] -= 1;
        }
        rec
    }

    fn pin_sub(&self, i: usize, at: u64, len: u64) -> Result<(u64, u64), Fault> {
        let rec = self.pins[i];
        let (s, e) = check_range(at, len, 1, rec.len)?;
        Ok((rec.offset + s, rec.offset + e))
    }

    /// `Pin::read(at, buf)` on pin number `i`.
    pub fn pin_read(&mut self, i: usize, at: u64, len: u64) -> Result<Vec<u8>, Fault> {
        let (s, e) = self.pin_sub(i, at, len)?;
        self.touch(s, e);
        Ok(self.bytes[idx(s)..idx(e)].to_vec())
    }

    /// `Pin::write(at, data)` on pin number `i`.
    pub fn pin_write(&mut self, i: usize, at: u64, data: &[u8]) -> Result<(), Fault> {
        let (s, e) = self.pin_sub(i, at, data.len() as u64)?;
        self.touch(s, e);
        self.bytes[idx(s)..idx(e)].copy_from_slice(data);
        Ok(())
    }

    /// `GuestMemfd::map(offset, len)`: the argument checks (the mapping itself is real).
    pub fn map(&self, offset: u64, len: u64) -> Result<(), Fault> {
        if !self.mmap {
            return Err(Fault::bare(Class::NotMappable, libc::ENODEV));
        }
        check_range(offset, len, 1, u64::MAX)?;
        if offset % self.block != 0 {
            return Err(Fault::at(Class::Unaligned, libc::EINVAL, offset));
        }
        Ok(())
    }

    /// A one-byte read through a host view at file offset `at` (which may lie past the end).
    pub fn host_read(&mut self, at: u64) -> Touch {
        if at >= self.size || self.attrs[page(at)] == Attr::Private || self.poisoned[page(at)] {
            return Touch::Sigbus;
        }
        self.touch(at, at + 1);
        Touch::Ok(self.bytes[idx(at)])
    }

    /// A one-byte write through a host view at file offset `at`.
    pub fn host_write(&mut self, at: u64, v: u8) -> Touch {
        if at >= self.size || self.attrs[page(at)] == Attr::Private || self.poisoned[page(at)] {
            return Touch::Sigbus;
        }
        self.touch(at, at + 1);
        self.bytes[idx(at)] = v;
        Touch::Ok(0)
    }

    /// Records that page `p` was touched (read) through some mapping.
    pub fn touch_page(&mut self, p: u64) {
        self.allocated[idx(p)] = Alloc::Data;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_follows_the_rules() {
        let mut m = Model::new(8 * PAGE, true, true);
        assert_eq!(m.run_count(), 1);
        m.write_at(PAGE + 5, b"abc").unwrap();
        m.pin(PAGE, 1, false).unwrap();
        assert_eq!(
            m.convert(0, 4 * PAGE, Attr::Private),
            Err(Fault::at(Class::Busy, libc::EAGAIN, PAGE))
        );
        m.convert(0, PAGE, Attr::Private).unwrap();
        assert_eq!(
            m.read_at(10, PAGE),
            Err(Fault::at(Class::Private, libc::EFAULT, 10))
        );
        assert_eq!(m.run_count(), 2);
        m.unpin(0);
        m.convert(0, 4 * PAGE, Attr::Private).unwrap();
        m.convert(0, 8 * PAGE, Attr::Shared).unwrap();
        assert_eq!(&m.read_at(PAGE + 5, 3).unwrap(), b"abc");
        m.fallocate(
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
            PAGE,
            PAGE,
        )
        .unwrap();
        assert_eq!(m.read_at(PAGE + 5, 3).unwrap(), vec![0; 3]);
        assert_eq!(
            m.convert(u64::MAX - PAGE + 1, 2 * PAGE, Attr::Private),
            Err(Fault::at(
                Class::Overflow,
                libc::EINVAL,
                u64::MAX - PAGE + 1
            ))
        );
        assert_eq!((m.commits(), m.aborts()), (3, 1));
    }
}
