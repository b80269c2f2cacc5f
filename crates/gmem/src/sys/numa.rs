//! The NUMA syscalls: `mbind(2)`, `get_mempolicy(2)`, `move_pages(2)` (query only), and the
//! online node list.

use std::io;

use super::mapping::Mapping;
use crate::model::numa::{parse_node_list, NumaPolicy, MAX_NODES, WORDS};

const MPOL_F_ADDR: libc::c_ulong = 2;

/// The online NUMA nodes (`/sys/devices/system/node/online`, a list such as `0-3,5`).
pub(crate) fn online_nodes() -> io::Result<Vec<u32>> {
    let text = std::fs::read_to_string("/sys/devices/system/node/online")?;
    parse_node_list(text.trim()).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `mbind(2)` of `[off, off + len)` of `map` with `policy`.
pub(crate) fn mbind(map: &Mapping, off: usize, len: usize, policy: &NumaPolicy) -> io::Result<()> {
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

/// The policy of the mapping at `map`'s first byte (`get_mempolicy(MPOL_F_ADDR)`): the mode
/// (flags stripped) and the node list.
pub(crate) fn policy_at(map: &Mapping) -> io::Result<(i32, Vec<u32>)> {
    let mut mode: libc::c_int = 0;
    let mut mask = [0 as libc::c_ulong; WORDS];
    let maxnode = libc::c_ulong::try_from(MAX_NODES).unwrap_or(0);
    // SAFETY: `mode` and `mask` are valid for writing (`MAX_NODES` bits); the address is
    // inside a live mapping.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut libc::c_int,
            mask.as_mut_ptr(),
            maxnode,
            map.as_ptr(),
            MPOL_F_ADDR,
        )
    };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    let nodes = (0..MAX_NODES)
        .filter(|n| mask[n / 64] & (1 << (n % 64)) != 0)
        .filter_map(|n| u32::try_from(n).ok())
        .collect();
    // Mode flags (MPOL_F_STATIC_NODES and friends) live in the high bits.
    Ok((mode & 0xff, nodes))
}

/// The node of the page at `off` in `map` (`None` when not allocated there), asked with
/// `move_pages(2)` without moving anything.
pub(crate) fn node_of(map: &Mapping, off: usize) -> io::Result<Option<u32>> {
    if off >= map.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut page = map.as_ptr().wrapping_add(off).cast::<libc::c_void>();
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
        return Err(io::Error::last_os_error());
    }
    Ok(u32::try_from(status).ok())
}
