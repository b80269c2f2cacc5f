//! NUMA placement of a file's pages.
//!
//! A [`NumaPolicy`] is applied with `mbind(2)` on gmem's own mapping of the file (and on every
//! host view and every window gmem remaps) before pages are allocated: set it on the
//! [`Builder`](crate::Builder) so it is in force before preallocation, or later with
//! [`GuestMemfd::set_numa_policy`] for pages not yet allocated. On shmem the policy is the
//! file's shared policy, which every mapping and `fallocate` follow; on HugeTLB it is the
//! policy of gmem's mappings, through which the pages are allocated.
//!
//! Nodes are validated against `/sys/devices/system/node/online`: an empty node set, a node
//! that is not online, or an unknown policy is `EINVAL` (the kernel's answer to `mbind`), and
//! nothing changes. [`GuestMemfd::numa_policy`] reads the policy back from the kernel
//! (`get_mempolicy(MPOL_F_ADDR)`), and [`GuestMemfd::numa_node`] tells where a page lives.

use std::fmt;
use std::io;
use std::str::FromStr;

use crate::file::{GuestMemfd, Inner};
use crate::sys::mapping::Mapping;
use crate::sys::to_usize;

const MPOL_DEFAULT: i32 = 0;
const MPOL_PREFERRED: i32 = 1;
const MPOL_BIND: i32 = 2;
const MPOL_INTERLEAVE: i32 = 3;
const MPOL_F_ADDR: libc::c_ulong = 2;
/// Bits of node mask gmem passes (enough for every machine Linux supports by default).
const MAX_NODES: usize = 1024;
const WORDS: usize = MAX_NODES / 64;

/// Where a file's pages are allocated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NumaPolicy {
    /// The allocating thread's policy (usually its local node).
    #[default]
    Default,
    /// Prefer this node, fall back to others.
    Preferred(u32),
    /// Only these nodes.
    Bind(Vec<u32>),
    /// Round-robin over these nodes, page by page.
    Interleave(Vec<u32>),
}

/// Why a NUMA policy was refused or could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum NumaError {
    /// Unknown policy name or mode number (`EINVAL`).
    #[error("unknown NUMA policy {0:?}")]
    BadPolicy(String),
    /// A policy that needs nodes was given none (`EINVAL`).
    #[error("NUMA policy {0} needs at least one node")]
    NoNodes(&'static str),
    /// A node is not online (`EINVAL`).
    #[error("NUMA node {node} is not online (online: {online:?})")]
    NodeOffline {
        /// The node given.
        node: u32,
        /// The online nodes.
        online: Vec<u32>,
    },
    /// The offset is outside the file (`EINVAL`).
    #[error("offset {offset:#x} is outside the file")]
    Offset {
        /// The offset given.
        offset: u64,
    },
    /// The file has no mapping gmem could bind (`ENODEV`).
    #[error("the file has no mapping to bind")]
    NoMapping,
    /// A syscall failed.
    #[error("{op}: {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl NumaError {
    /// The errno the kernel returns for the same case.
    pub fn errno(&self) -> i32 {
        match self {
            NumaError::BadPolicy(_)
            | NumaError::NoNodes(_)
            | NumaError::NodeOffline { .. }
            | NumaError::Offset { .. } => libc::EINVAL,
            NumaError::NoMapping => libc::ENODEV,
            NumaError::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// The online NUMA nodes (`/sys/devices/system/node/online`, a list such as `0-3,5`).
pub fn online_nodes() -> Result<Vec<u32>, NumaError> {
    let text = std::fs::read_to_string("/sys/devices/system/node/online").map_err(|source| {
        NumaError::Os {
            op: "read /sys/devices/system/node/online",
            source,
        }
    })?;
    parse_node_list(text.trim()).ok_or_else(|| NumaError::BadPolicy(text.trim().to_owned()))
}

/// Parses a node list such as `0-3,5`.
fn parse_node_list(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?);
                if a > b {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

impl NumaPolicy {
    /// Builds a policy from the kernel's mode number (`MPOL_*`) and node list; unknown modes
    /// are `EINVAL`.
    pub fn from_raw(mode: i32, nodes: &[u32]) -> Result<Self, NumaError> {
        let p = match mode {
            MPOL_DEFAULT => NumaPolicy::Default,
            MPOL_PREFERRED => match nodes {
                [n] => NumaPolicy::Preferred(*n),
                _ => {
                    return Err(NumaError::BadPolicy(format!(
                        "preferred with nodes {nodes:?}"
                    )))
                }
            },
            MPOL_BIND => NumaPolicy::Bind(nodes.to_vec()),
            MPOL_INTERLEAVE => NumaPolicy::Interleave(nodes.to_vec()),
            other => return Err(NumaError::BadPolicy(format!("mode {other}"))),
        };
        Ok(p)
    }

    fn mode(&self) -> i32 {
        match self {
            NumaPolicy::Default => MPOL_DEFAULT,
            NumaPolicy::Preferred(_) => MPOL_PREFERRED,
            NumaPolicy::Bind(_) => MPOL_BIND,
            NumaPolicy::Interleave(_) => MPOL_INTERLEAVE,
        }
    }

    fn nodes(&self) -> Vec<u32> {
        match self {
            NumaPolicy::Default => Vec::new(),
            NumaPolicy::Preferred(n) => vec![*n],
            NumaPolicy::Bind(v) | NumaPolicy::Interleave(v) => v.clone(),
        }
    }

    /// Checks the policy against the online nodes; `EINVAL` on an empty or offline node set.
    pub fn validate(&self) -> Result<(), NumaError> {
        let nodes = self.nodes();
        match self {
            NumaPolicy::Default => return Ok(()),
            NumaPolicy::Bind(_) if nodes.is_empty() => return Err(NumaError::NoNodes("bind")),
            NumaPolicy::Interleave(_) if nodes.is_empty() => {
                return Err(NumaError::NoNodes("interleave"))
            }
            _ => {}
        }
        let online = online_nodes()?;
        if let Some(&node) = nodes.iter().find(|n| !online.contains(n)) {
            return Err(NumaError::NodeOffline { node, online });
        }
        Ok(())
    }

    fn mask(&self) -> [libc::c_ulong; WORDS] {
        let mut mask = [0; WORDS];
        for n in self.nodes() {
            let n = n as usize;
            if n < MAX_NODES {
                mask[n / 64] |= 1 << (n % 64);
            }
        }
        mask
    }
}

impl fmt::Display for NumaPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        match self {
            NumaPolicy::Default => write!(f, "default"),
            NumaPolicy::Preferred(n) => write!(f, "preferred:{n}"),
            NumaPolicy::Bind(v) => write!(f, "bind:{}", list(v)),
            NumaPolicy::Interleave(v) => write!(f, "interleave:{}", list(v)),
        }
    }
}

impl FromStr for NumaPolicy {
    type Err = NumaError;

    /// Parses `default`, `preferred:N`, `bind:LIST` or `interleave:LIST` (`LIST` like `0-3,5`).
    fn from_str(s: &str) -> Result<Self, NumaError> {
        let (name, nodes) = s.split_once(':').unwrap_or((s, ""));
        let list = parse_node_list(nodes).ok_or_else(|| NumaError::BadPolicy(s.to_owned()))?;
        match name {
            "default" if nodes.is_empty() => Ok(NumaPolicy::Default),
            "preferred" => Self::from_raw(MPOL_PREFERRED, &list),
            "bind" | "interleave" if list.is_empty() => Err(NumaError::NoNodes("bind/interleave")),
            "bind" => Ok(NumaPolicy::Bind(list)),
            "interleave" => Ok(NumaPolicy::Interleave(list)),
            _ => Err(NumaError::BadPolicy(s.to_owned())),
        }
    }
}

/// `mbind(2)` of `[off, off + len)` of `map` with `policy`.
fn mbind(map: &Mapping, off: usize, len: usize, policy: &NumaPolicy) -> io::Result<()> {
    if !matches!(off.checked_add(len), Some(e) if e <= map.len()) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mask = policy.mask();
    let (ptr, maxnode) = match policy {
        NumaPolicy::Default => (std::ptr::null(), 0),
        _ => (mask.as_ptr(), MAX_NODES + 1),
    };
    let addr = map.as_ptr().wrapping_add(off);
    // SAFETY: the range lies inside the live mapping; `ptr` is null or valid for `MAX_NODES`
    // bits; mbind changes only placement, never contents.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            len,
            policy.mode(),
            ptr,
            maxnode,
            0u32,
        )
    };
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Applies the file's policy (if one was set) to `[off, off + len)` of `map`: gmem calls it on
/// every window it maps afresh, since a new VMA starts without a policy.
pub(crate) fn reapply(inner: &Inner, map: &Mapping, off: usize, len: usize) -> io::Result<()> {
    let policy = inner.numa.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match policy {
        Some(p) => mbind(map, off, len, &p),
        None => Ok(()),
    }
}

impl GuestMemfd {
    /// Sets the NUMA policy for the file's pages not yet allocated. Validated first (`EINVAL`,
    /// nothing changes); applied to gmem's mapping of the file and to every host view.
    pub fn set_numa_policy(&self, policy: &NumaPolicy) -> Result<(), NumaError> {
        policy.validate()?;
        let inner = &self.inner;
        let guest = inner.guest.as_ref().ok_or(NumaError::NoMapping)?;
        let ctl = inner.control();
        let os = |source| NumaError::Os {
            op: "mbind",
            source,
        };
        mbind(guest, 0, guest.len(), policy).map_err(os)?;
        if let Some(huge) = inner.backing.as_hugetlb() {
            let m = huge.huge_mapping();
            mbind(m, 0, m.len(), policy).map_err(os)?;
        }
        for v in &ctl.views {
            mbind(&v.map, 0, v.map.len(), policy).map_err(os)?;
        }
        *inner.numa.lock().unwrap_or_else(|e| e.into_inner()) = Some(policy.clone());
        Ok(())
    }

    /// The policy in force for the file, read back from the kernel (`get_mempolicy` on gmem's
    /// mapping).
    pub fn numa_policy(&self) -> Result<NumaPolicy, NumaError> {
        let guest = self.inner.guest.as_ref().ok_or(NumaError::NoMapping)?;
        let mut mode: libc::c_int = 0;
        let mut mask = [0 as libc::c_ulong; WORDS];
        // SAFETY: `mode` and `mask` are valid for writing (`MAX_NODES` bits); the address is
        // inside a live mapping.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_get_mempolicy,
                &mut mode as *mut libc::c_int,
                mask.as_mut_ptr(),
                MAX_NODES as libc::c_ulong,
                guest.as_ptr(),
                MPOL_F_ADDR,
            )
        };
        if ret == -1 {
            return Err(NumaError::Os {
                op: "get_mempolicy",
                source: io::Error::last_os_error(),
            });
        }
        let nodes: Vec<u32> = (0..MAX_NODES)
            .filter(|n| mask[n / 64] & (1 << (n % 64)) != 0)
            .filter_map(|n| u32::try_from(n).ok())
            .collect();
        // Mode flags (MPOL_F_STATIC_NODES and friends) live in the high bits.
        NumaPolicy::from_raw(mode & 0xff, &nodes)
    }

    /// The node holding the page at `offset`, or `None` when it is not allocated (or not
    /// mapped in gmem's mapping yet). Asks `move_pages(2)` without moving anything, so nothing
    /// is allocated by asking.
    pub fn numa_node(&self, offset: u64) -> Result<Option<u32>, NumaError> {
        if offset >= self.inner.size {
            return Err(NumaError::Offset { offset });
        }
        let guest = self.inner.guest.as_ref().ok_or(NumaError::NoMapping)?;
        let off = to_usize(offset).map_err(|_| NumaError::Offset { offset })?;
        let mut page = guest.as_ptr().wrapping_add(off).cast::<libc::c_void>();
        let mut status: libc::c_int = 0;
        // SAFETY: one page address inside a live mapping and one status slot, both valid for
        // the call; a null node list only queries.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_move_pages,
                0,
                1 as libc::c_ulong,
                &mut page as *mut *mut libc::c_void,
                std::ptr::null::<libc::c_int>(),
                &mut status as *mut libc::c_int,
                0,
            )
        };
        if ret == -1 {
            return Err(NumaError::Os {
                op: "move_pages",
                source: io::Error::last_os_error(),
            });
        }
        Ok(u32::try_from(status).ok())
    }
}
