//! R3 in the ordinary test run: the properties the fuzz targets check (`fuzz/fuzz_targets`),
//! over the committed seed corpora and many deterministic mutations of them (bit flips, byte
//! changes, insertions, deletions, splices, truncations). cargo-fuzz explores far more
//! (`fuzz/run.sh`); this keeps the parsers honest on every CI run.
#![allow(clippy::cast_possible_truncation)]

use std::path::Path;

use gmem::peer::{parse_hello, parse_runs};
use gmem::Attr;
use gmem::Errno;
use gmem_reliability::rng::Rng;

const MUTATIONS: usize = 20_000;

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.expect("entry").path()).expect("read seed"))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

fn mutate(r: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut b = seeds[r.index(seeds.len())].clone();
    for _ in 0..r.range(1, 4) {
        let len = b.len();
        match r.below(7) {
            0 if len > 0 => {
                let i = r.index(len);
                b[i] ^= 1 << r.below(8);
            }
            1 if len > 0 => {
                let i = r.index(len);
                b[i] = [0, 1, 0x7f, 0x80, 0xff, r.byte()][r.index(6)];
            }
            2 => {
                let i = r.index(len + 1);
                b.insert(i, r.byte());
            }
            3 if len > 0 => {
                let i = r.index(len);
                b.remove(i);
            }
            4 if len > 0 => b.truncate(r.index(len)),
            5 => {
                let other = &seeds[r.index(seeds.len())];
                let i = r.index(len + 1);
                let j = r.index(other.len() + 1);
                b.truncate(i);
                b.extend_from_slice(&other[j..]);
            }
            _ if len >= 8 => {
                // An 8-byte word set to an edge value.
                let i = r.index(len - 7);
                let v: u64 = [0, 1, u64::MAX, 1 << 63, 4096, (1 << 30) + 1][r.index(6)];
                b[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ => b.push(r.byte()),
        }
    }
    b
}

/// The `peer_hello` fuzz target's property.
fn peer_property(data: &[u8]) {
    let (hello, table) = data.split_at(data.len().min(48));
    let pages = match parse_hello(hello) {
        Ok(h) => {
            assert!(h.size > 0 && h.size % 4096 == 0 && h.block.is_power_of_two());
            assert!(h.runs >= 1 && h.runs <= h.size / 4096);
            h.size / 4096
        }
        Err(e) => {
            assert_eq!(e.errno(), libc::EPROTO);
            u64::from(data.first().copied().unwrap_or(1)) * 3 + 1
        }
    }
    .min(1 << 20);
    if let Ok(map) = parse_runs(table, pages) {
        let mut words = Vec::new();
        let mut prev = None;
        let mut covered = 0;
        for run in map.runs(0, pages) {
            assert_eq!(run.start, covered);
            assert_ne!(prev, Some(run.attr));
            prev = Some(run.attr);
            covered = run.end;
            words.extend_from_slice(
                &((run.start << 1) | u64::from(run.attr == Attr::Private)).to_le_bytes(),
            );
        }
        assert_eq!(covered, pages);
        assert_eq!(words, table, "accepted table does not round-trip");
    }
}

#[test]
fn parsers_peer_hello_and_run_table() {
    let seeds = seeds("peer_hello");
    let mut accepted = 0;
    for s in &seeds {
        peer_property(s);
        accepted += usize::from(parse_hello(&s[..s.len().min(48)]).is_ok());
    }
    assert!(accepted >= 5, "the valid seeds must parse");
    let mut r = Rng::new(0x7065_6572);
    for _ in 0..MUTATIONS {
        peer_property(&mutate(&mut r, &seeds));
    }
    // Pure random bytes too.
    for _ in 0..MUTATIONS {
        let n = r.index(200);
        let b: Vec<u8> = (0..n).map(|_| r.byte()).collect();
        peer_property(&b);
    }
}

/// The `cli_object` fuzz target's property.
fn object_property(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match gmem_cli::object::parse(s) {
        Ok(obj) => {
            let printed = obj.to_string();
            let again = gmem_cli::object::parse(&printed).unwrap_or_else(|e| {
                panic!("{s:?} printed as {printed:?}, which does not parse: {e}")
            });
            assert_eq!(again, obj, "{s:?} -> {printed:?}");
        }
        Err(e) => assert_eq!(e.errno(), libc::EINVAL),
    }
}

#[test]
fn parsers_cli_object_syntax() {
    let seeds = seeds("cli_object");
    let ok = seeds
        .iter()
        .filter(|s| gmem_cli::object::parse(std::str::from_utf8(s).unwrap_or("")).is_ok())
        .count();
    assert!(ok >= 5, "the valid seeds must parse");
    let mut r = Rng::new(0x006f_626a);
    for s in &seeds {
        object_property(s);
    }
    for _ in 0..MUTATIONS {
        object_property(&mutate(&mut r, &seeds));
    }
}
