//! NUMA policies: what a file's pages follow, validated against the online nodes.
//!
//! A [`NumaPolicy`] is applied with `mbind(2)` on gmem's own mapping of the file (and on every
//! host view and every window gmem remaps) before pages are allocated: set it on the
//! [`Builder`](crate::Builder) so it is in force before preallocation, or later with
//! [`GuestMemfd::set_numa_policy`](crate::GuestMemfd::set_numa_policy) for pages not yet
//! allocated. On shmem the policy is the
//! file's shared policy, which every mapping and `fallocate` follow; on HugeTLB it is the
//! policy of gmem's mappings, through which the pages are allocated.
//!
//! Nodes are validated against `/sys/devices/system/node/online`: an empty node set, a node
//! that is not online, or an unknown policy is `EINVAL` (the kernel's answer to `mbind`), and
//! nothing changes. [`GuestMemfd::numa_policy`](crate::GuestMemfd::numa_policy) reads the
//! policy back from the kernel (`get_mempolicy(MPOL_F_ADDR)`), and
//! [`GuestMemfd::numa_node`](crate::GuestMemfd::numa_node) tells where a page lives.

use std::fmt;
use std::io;
use std::str::FromStr;

const MPOL_DEFAULT: i32 = 0;
const MPOL_PREFERRED: i32 = 1;
const MPOL_BIND: i32 = 2;
const MPOL_INTERLEAVE: i32 = 3;
/// Bits of node mask gmem passes (enough for every machine Linux supports by default).
pub const MAX_NODES: usize = 1024;
/// Words of a node mask.
pub const WORDS: usize = MAX_NODES / 64;

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
    /// This process may not use the file now: it is a forked child of the owner, or the file
    /// was handed over to another process (`EPERM`, as every verb there).
    #[error("this process does not own the file (a forked child, or handed over)")]
    NotOwner,
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

impl crate::model::error::Errno for NumaError {
    fn errno(&self) -> i32 {
        match self {
            NumaError::BadPolicy(_)
            | NumaError::NoNodes(_)
            | NumaError::NodeOffline { .. }
            | NumaError::Offset { .. } => libc::EINVAL,
            NumaError::NoMapping => libc::ENODEV,
            NumaError::NotOwner => libc::EPERM,
            NumaError::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// Parses a node list such as `0-3,5`.
pub fn parse_node_list(s: &str) -> Option<Vec<u32>> {
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

    /// The kernel's mode number (`MPOL_*`).
    pub fn mode(&self) -> i32 {
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

    /// Checks the policy against the `online` nodes; `EINVAL` on an empty or offline node set.
    pub fn validate_against(&self, online: &[u32]) -> Result<(), NumaError> {
        let nodes = self.nodes();
        match self {
            NumaPolicy::Default => return Ok(()),
            NumaPolicy::Bind(_) if nodes.is_empty() => return Err(NumaError::NoNodes("bind")),
            NumaPolicy::Interleave(_) if nodes.is_empty() => {
                return Err(NumaError::NoNodes("interleave"))
            }
            _ => {}
        }
        if let Some(&node) = nodes.iter().find(|n| !online.contains(n)) {
            return Err(NumaError::NodeOffline {
                node,
                online: online.to_vec(),
            });
        }
        Ok(())
    }

    /// The node mask passed to `mbind(2)` (bit n = node n).
    pub fn mask(&self) -> [libc::c_ulong; WORDS] {
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
