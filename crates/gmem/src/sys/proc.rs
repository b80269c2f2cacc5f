//! What `/proc` tells about this process's address space: the mappings (with their
//! userfaultfd registration) and the map count against `vm.max_map_count`.

use std::io;

/// One mapping of the address space, as `/proc/self/smaps` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Vma {
    /// First address.
    pub start: usize,
    /// One past the last address.
    pub end: usize,
    /// File offset of `start`.
    pub offset: u64,
    /// Device of the mapped file (`major << 8 | minor` as printed, 0 when anonymous).
    pub dev: (u32, u32),
    /// Inode of the mapped file (0 when anonymous).
    pub inode: u64,
    /// Registered with a userfaultfd in write-protect mode (`uw` in `VmFlags`).
    pub uffd_wp: bool,
}

fn parse_header(line: &str) -> Option<Vma> {
    let mut it = line.split_whitespace();
    let (start, end) = it.next()?.split_once('-')?;
    let _perms = it.next()?;
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let (maj, min) = it.next()?.split_once(':')?;
    let inode = it.next()?.parse().ok()?;
    Some(Vma {
        start: usize::from_str_radix(start, 16).ok()?,
        end: usize::from_str_radix(end, 16).ok()?,
        offset,
        dev: (
            u32::from_str_radix(maj, 16).ok()?,
            u32::from_str_radix(min, 16).ok()?,
        ),
        inode,
        uffd_wp: false,
    })
}

/// Every mapping of this process, with its userfaultfd registration. `O(mappings)`; gmem
/// reads it only when the VMM moved or unmapped a view.
pub(crate) fn mappings() -> io::Result<Vec<Vma>> {
    let text = std::fs::read_to_string("/proc/self/smaps")?;
    let mut out: Vec<Vma> = Vec::new();
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(last) = out.last_mut() {
                last.uffd_wp = flags.split_whitespace().any(|f| f == "uw");
            }
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            if let Some(v) = parse_header(line) {
                out.push(v);
            }
        }
    }
    Ok(out)
}

/// The number of mappings of this process (lines of `/proc/self/maps`).
///
/// Read into a 64 KiB buffer each thread keeps (the kernel fills about a page per `read`): a
/// split or merge of a huge page asks it, and `read_to_string` makes about eight syscalls
/// more (a `statx`, then one `read` per doubling of a buffer that starts at 32 bytes).
pub(crate) fn map_count() -> io::Result<usize> {
    use std::io::Read;
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut f = std::fs::File::open("/proc/self/maps")?;
    BUF.with_borrow_mut(|buf| {
        if buf.is_empty() {
            buf.resize(64 << 10, 0);
        }
        let mut lines = 0;
        loop {
            match f.read(buf) {
                Ok(0) => return Ok(lines),
                Ok(n) => lines += buf[..n].iter().filter(|&&b| b == b'\n').count(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    })
}

/// `vm.max_map_count`.
pub(crate) fn max_map_count() -> io::Result<usize> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")?
        .trim()
        .parse()
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Device numbers of a file as `/proc/self/smaps` prints them, from `fstat`'s `st_dev`.
pub(crate) fn dev_pair(st_dev: u64) -> (u32, u32) {
    // glibc's major()/minor() encoding of a 64-bit dev_t.
    let major = ((st_dev >> 8) & 0xfff) | ((st_dev >> 32) & !0xfff);
    let minor = (st_dev & 0xff) | ((st_dev >> 12) & !0xff);
    (
        u32::try_from(major).unwrap_or(u32::MAX),
        u32::try_from(minor).unwrap_or(u32::MAX),
    )
}

#[cfg(test)]
mod tests {
    use super::map_count;

    /// The chunked count is the line count of the whole text, over many reads (the 8,000
    /// mappings made here print about 400 KiB): asked between two whole reads that agree
    /// (other tests of this binary map and unmap meanwhile), it equals them.
    #[test]
    fn map_count_counts_every_line() {
        const PAGES: usize = 8000;
        let _more = gmem_conformance::mappings::ManyMappings::new(PAGES).expect("mappings");
        let whole = || {
            std::fs::read_to_string("/proc/self/maps")
                .expect("read /proc/self/maps")
                .lines()
                .count()
        };
        for _ in 0..100 {
            let before = whole();
            let n = map_count().expect("map_count");
            if before == whole() {
                assert_eq!(n, before);
                assert!(n >= PAGES, "{n} mappings");
                return;
            }
        }
        panic!("the mappings never stayed still");
    }
}
