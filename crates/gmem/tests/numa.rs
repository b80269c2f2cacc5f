//! NUMA policy: round trip of every policy, bind to node 0 verified with the kernel's own
//! answers, bad policies and nodes refused.
// Sizes here are small multiples of pages on a 64-bit host: casts to usize and u8 are exact.
#![allow(clippy::cast_possible_truncation)]

mod hugepool;

use gmem::online_nodes;
use gmem::Errno;
use gmem::{BackingChoice, CreateError, Flags, GuestMemfd, NumaError, NumaPolicy, HUGE_2M};

const P: u64 = 4096;

fn mem(size: u64) -> GuestMemfd {
    GuestMemfd::builder(size)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .create()
        .expect("create")
}

fn policies() -> Vec<NumaPolicy> {
    let online = online_nodes().expect("online nodes");
    vec![
        NumaPolicy::Preferred(online[0]),
        NumaPolicy::Bind(online.clone()),
        NumaPolicy::Interleave(online.clone()),
        NumaPolicy::Bind(vec![online[0]]),
        NumaPolicy::Default,
    ]
}

#[test]
fn every_policy_round_trips_through_the_kernel() {
    let m = mem(64 * P);
    assert_eq!(m.numa_policy().expect("query"), NumaPolicy::Default);
    for p in policies() {
        m.set_numa_policy(&p).expect("set");
        assert_eq!(m.numa_policy().expect("query"), p);
        // The text form round-trips too.
        assert_eq!(p.to_string().parse::<NumaPolicy>().expect("parse"), p);
    }
    for p in policies() {
        let m = GuestMemfd::builder(16 * P)
            .flags(Flags::MMAP)
            .numa(p.clone())
            .create()
            .expect("create with policy");
        assert_eq!(m.numa_policy().expect("query"), p);
    }
}

/// The policy field of gmem's mapping in /proc/self/numa_maps.
fn numa_maps_policy(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/numa_maps").expect("numa_maps");
    let line = maps
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&format!("{addr:x}")))
        .unwrap_or_else(|| panic!("no numa_maps line for {addr:x}"));
    line.split_whitespace()
        .nth(1)
        .expect("policy field")
        .to_owned()
}

#[test]
fn bind_to_node_zero_places_pages_there() {
    let m = GuestMemfd::builder(256 * P)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .numa(NumaPolicy::Bind(vec![0]))
        .create()
        .expect("create");
    assert_eq!(m.numa_node(0).expect("node"), None, "not allocated yet");
    m.write_at(0, &vec![1u8; 256 * P as usize]).expect("write");
    for page in [0, 17, 255] {
        assert_eq!(m.numa_node(page * P).expect("node"), Some(0), "page {page}");
    }
    assert_eq!(
        numa_maps_policy(m.guest().expect("guest view").as_ptr() as usize),
        "bind:0"
    );
    assert_eq!(
        m.numa_node(256 * P).expect_err("past the end").errno(),
        libc::EINVAL
    );
}

#[test]
fn bind_applies_to_hugetlb_files_and_their_views() {
    let Some(_pool) = hugepool::pool(HUGE_2M, 2) else {
        return;
    };
    let m = GuestMemfd::builder(2 * HUGE_2M)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(BackingChoice::HugeTlb(HUGE_2M))
        .numa(NumaPolicy::Bind(vec![0]))
        .create()
        .expect("create");
    let view = m.map(0, 2 * HUGE_2M).expect("map");
    assert_eq!(numa_maps_policy(view.as_ptr() as usize), "bind:0");
    m.write_at(0, &[7u8; 64]).expect("write");
    assert_eq!(m.numa_node(0).expect("node"), Some(0));
    assert_eq!(m.numa_policy().expect("query"), NumaPolicy::Bind(vec![0]));
    // A split keeps the policy on the remapped window.
    m.convert(P, P, gmem::Attr::Private).expect("split");
    assert_eq!(m.numa_policy().expect("query"), NumaPolicy::Bind(vec![0]));
    assert_eq!(
        numa_maps_policy(m.guest().expect("guest view").as_ptr() as usize),
        "bind:0"
    );
}

#[test]
fn bad_policies_and_nodes_are_refused_and_change_nothing() {
    let online = online_nodes().expect("online");
    let offline = online.iter().max().expect("a node") + 1;
    let m = mem(16 * P);
    m.set_numa_policy(&NumaPolicy::Preferred(online[0]))
        .expect("set");
    let bad = [
        NumaPolicy::Bind(vec![offline]),
        NumaPolicy::Interleave(vec![online[0], offline]),
        NumaPolicy::Preferred(offline),
        NumaPolicy::Bind(vec![]),
        NumaPolicy::Interleave(vec![]),
    ];
    for p in &bad {
        let e = m.set_numa_policy(p).expect_err("refused");
        assert_eq!(e.errno(), libc::EINVAL, "{p:?}");
        assert_eq!(
            m.numa_policy().expect("query"),
            NumaPolicy::Preferred(online[0])
        );
    }
    assert!(matches!(
        m.set_numa_policy(&NumaPolicy::Bind(vec![offline])),
        Err(NumaError::NodeOffline { node, .. }) if node == offline
    ));
    for text in [
        "",
        "bogus",
        "bind",
        "bind:x",
        "preferred:0,0",
        "default:0",
        "bind:3-1",
    ] {
        let e = text.parse::<NumaPolicy>().expect_err(text);
        assert_eq!(e.errno(), libc::EINVAL, "{text:?}");
    }
    for mode in [-1, 4, 5, 7, 100] {
        let e = NumaPolicy::from_raw(mode, &[0]).expect_err("mode");
        assert_eq!(e.errno(), libc::EINVAL, "mode {mode}");
    }
    let e = GuestMemfd::builder(16 * P)
        .numa(NumaPolicy::Bind(vec![offline]))
        .create()
        .expect_err("create with an offline node");
    assert!(matches!(e, CreateError::Numa(_)));
    assert_eq!(e.errno(), libc::EINVAL);
}
