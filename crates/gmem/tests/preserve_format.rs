//! The preserved-state format: round trips, and refusal of corrupted, truncated, oversized
//! and malformed inputs with the exact error, never a panic.
// Test patterns truncate counters to bytes on purpose.
#![allow(clippy::cast_possible_truncation)]

use gmem::preserve::format::{HEADER_LEN, MAX_STATE_LEN};
use gmem::preserve::{
    crc32c, Binding, FileState, FormatError, NumaMode, NumaRecord, PinRecord, RestructureKind,
    Restructured, RunRecord, State, VmLink,
};
use gmem::Errno;
use gmem::{Attr, BackingKind, FileId, Flags};

const P: u64 = 4096;

fn file(size: u64) -> FileState {
    FileState {
        kind: BackingKind::Shmem,
        block_size: P,
        flags: Flags::MMAP | Flags::INIT_SHARED,
        size,
        id: FileId { dev: 7, ino: 42 },
        runs: vec![RunRecord {
            start_page: 0,
            attr: Attr::Shared,
        }],
        numa: NumaRecord::default(),
        bindings: vec![],
        restructure: vec![],
        poison: vec![],
        pins: vec![],
        vm: VmLink::None,
    }
}

fn full() -> State {
    let mut a = file(64 * P);
    a.runs = (0..16)
        .map(|i| RunRecord {
            start_page: i * 4,
            attr: if i % 2 == 0 {
                Attr::Shared
            } else {
                Attr::Private
            },
        })
        .collect();
    a.numa = NumaRecord {
        mode: NumaMode::Interleave,
        nodes: vec![0b11],
    };
    a.bindings = vec![
        Binding {
            slot: 0,
            offset: 0,
            gpa: 0,
            size: 32 * P,
        },
        Binding {
            slot: 3,
            offset: 32 * P,
            gpa: 1 << 32,
            size: 32 * P,
        },
    ];
    a.poison = vec![4 * P, 9 * P];
    a.pins = vec![PinRecord {
        offset: 0,
        len: 100,
        tag: 9,
    }];
    a.vm = VmLink::Carried { token: 0xfeed };
    let mut b = file(8 << 20);
    b.kind = BackingKind::HugeTlb(2 << 20);
    b.block_size = 2 << 20;
    b.flags = Flags::MMAP;
    b.id = FileId { dev: 7, ino: 43 };
    b.runs = vec![RunRecord {
        start_page: 0,
        attr: Attr::Private,
    }];
    b.restructure = vec![
        Restructured {
            offset: 0,
            len: 2 << 20,
            kind: RestructureKind::Split,
        },
        Restructured {
            offset: 4 << 20,
            len: 2 << 20,
            kind: RestructureKind::PendingMerge,
        },
    ];
    State {
        generation: 3,
        files: vec![a, b],
    }
}

/// Re-stamps the total length, section count and checksum after a hand edit.
fn reseal(mut b: Vec<u8>, sections_delta: i32) -> Vec<u8> {
    let total = b.len() as u64;
    b[16..24].copy_from_slice(&total.to_le_bytes());
    let n = u32::from_le_bytes(b[28..32].try_into().unwrap());
    b[28..32].copy_from_slice(&(n as i32 + sections_delta).to_le_bytes());
    b[32..36].fill(0);
    let crc = crc32c(&b);
    b[32..36].copy_from_slice(&crc.to_le_bytes());
    b
}

fn section(tag: u16, version: u16, file: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&tag.to_le_bytes());
    s.extend_from_slice(&version.to_le_bytes());
    s.extend_from_slice(&file.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    s.extend_from_slice(payload);
    s.resize(s.len().next_multiple_of(8), 0);
    s
}

fn words(ws: &[u64]) -> Vec<u8> {
    ws.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A one-file state whose sections after FILE are `extra` (RUNS included by the caller).
fn one_file_with(extra: &[Vec<u8>]) -> Vec<u8> {
    let base = State {
        generation: 1,
        files: vec![file(64 * P)],
    }
    .encode()
    .unwrap();
    // Keep header + FILE section (16 + 48 bytes); drop the RUNS section.
    let mut b = base[..HEADER_LEN + 64].to_vec();
    b[28..32].copy_from_slice(&1u32.to_le_bytes());
    for s in extra {
        b.extend_from_slice(s);
    }
    reseal(b, extra.len() as i32)
}

fn runs_ok() -> Vec<u8> {
    section(2, 1, 0, 0, &words(&[0]))
}

fn invalid_what(r: Result<State, FormatError>) -> &'static str {
    match r {
        Err(FormatError::Invalid { what, .. }) => what,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn round_trip_every_section() {
    let s = full();
    let b = s.encode().unwrap();
    assert_eq!(&b[0..8], b"GMEMSTAT");
    assert_eq!(b.len() % 8, 0);
    assert_eq!(State::decode(&b).unwrap(), s);
}

#[test]
fn hand_built_state_matches_encoder() {
    let b = one_file_with(&[runs_ok()]);
    let s = State::decode(&b).unwrap();
    assert_eq!(s.files[0], file(64 * P));
    assert_eq!(
        b,
        State {
            generation: 1,
            files: vec![file(64 * P)]
        }
        .encode()
        .unwrap()
    );
}

#[test]
fn every_single_bit_flip_is_refused() {
    let b = full().encode().unwrap();
    for i in 0..b.len() {
        for bit in 0..8 {
            let mut c = b.clone();
            c[i] ^= 1 << bit;
            assert!(
                State::decode(&c).is_err(),
                "flip of byte {i} bit {bit} accepted"
            );
        }
    }
}

#[test]
fn corrupted_body_is_a_checksum_error() {
    let mut b = full().encode().unwrap();
    let n = b.len();
    b[n - 1] ^= 0x40;
    let e = State::decode(&b).unwrap_err();
    assert!(matches!(e, FormatError::Checksum { .. }), "{e:?}");
    assert_eq!(e.errno(), libc::EBADMSG);
    assert_eq!(e.offset(), 32);
}

#[test]
fn every_truncation_is_refused() {
    let b = full().encode().unwrap();
    for len in 0..b.len() {
        let e = State::decode(&b[..len]).unwrap_err();
        assert_eq!(e.errno(), libc::EPROTO, "len {len}: {e:?}");
    }
    // Truncated but with the header's length re-stamped and checksum fixed: still refused.
    for len in (HEADER_LEN..b.len()).step_by(8) {
        let e = State::decode(&reseal(b[..len].to_vec(), 0)).unwrap_err();
        assert_eq!(e.errno(), libc::EPROTO, "resealed len {len}: {e:?}");
    }
}

#[test]
fn oversized_inputs_are_refused_before_parsing() {
    let big = vec![0u8; MAX_STATE_LEN + 1];
    let e = State::decode(&big).unwrap_err();
    assert_eq!(
        e,
        FormatError::TooLarge {
            len: MAX_STATE_LEN + 1
        }
    );
    assert_eq!(e.errno(), libc::E2BIG);
    // A header announcing more than it holds.
    let mut b = full().encode().unwrap();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(State::decode(&b).unwrap_err().errno(), libc::EPROTO);
    // A section announcing a 4 GiB payload.
    let mut s = runs_ok();
    s[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = State::decode(&one_file_with(&[s])).unwrap_err();
    assert_eq!(
        e,
        FormatError::Truncated {
            at: 128,
            need: u32::MAX as usize
        }
    );
}

#[test]
fn encoder_refuses_oversized_state() {
    let mut s = State {
        generation: 1,
        files: vec![file(1 << 40)],
    };
    s.files[0].runs = (0..(MAX_STATE_LEN as u64 / 8 + 1))
        .map(|i| RunRecord {
            start_page: i,
            attr: if i % 2 == 0 {
                Attr::Shared
            } else {
                Attr::Private
            },
        })
        .collect();
    assert_eq!(s.encode().unwrap_err().errno(), libc::E2BIG);
}

#[test]
fn version_and_magic() {
    let mut b = full().encode().unwrap();
    b[8..10].copy_from_slice(&2u16.to_le_bytes());
    let b = reseal(b, 0);
    assert_eq!(
        State::decode(&b).unwrap_err(),
        FormatError::Version { version: 2 }
    );
    assert_eq!(
        State::decode(&b).unwrap_err().errno(),
        libc::EPROTONOSUPPORT
    );
    let mut b = full().encode().unwrap();
    b[0] = b'X';
    assert_eq!(invalid_what(State::decode(&reseal(b, 0))), "magic");
}

#[test]
fn unknown_sections_optional_skipped_mandatory_refused() {
    let b = one_file_with(&[runs_ok(), section(77, 9, 0, 1, b"future")]);
    assert_eq!(State::decode(&b).unwrap().files[0], file(64 * P));
    let b = one_file_with(&[runs_ok(), section(77, 1, 0, 0, b"future")]);
    let e = State::decode(&b).unwrap_err();
    assert_eq!(e, FormatError::UnknownSection { at: 136, tag: 77 });
    assert_eq!(e.errno(), libc::EPROTONOSUPPORT);
    let b = one_file_with(&[section(2, 2, 0, 0, &words(&[0]))]);
    assert_eq!(
        State::decode(&b).unwrap_err(),
        FormatError::SectionVersion {
            at: 112,
            tag: 2,
            version: 2
        }
    );
}

#[test]
fn run_table_rules() {
    let cases: [(&[u64], &str); 5] = [
        (&[], "no runs"),
        (&[2], "first run does not start at 0"),
        (&[0, 4 << 1 | 1, 2 << 1], "runs not increasing"),
        (&[0, 4 << 1], "runs not merged"),
        (&[0, 64 << 1 | 1], "run past the end of the file"),
    ];
    for (runs, what) in cases {
        let b = one_file_with(&[section(2, 1, 0, 0, &words(runs))]);
        assert_eq!(invalid_what(State::decode(&b)), what, "{runs:?}");
    }
    let b = one_file_with(&[section(2, 1, 0, 0, &[0, 0, 0, 0])]);
    assert_eq!(invalid_what(State::decode(&b)), "RUNS section length");
    let b = one_file_with(&[]);
    assert_eq!(invalid_what(State::decode(&b)), "file without RUNS section");
    let b = one_file_with(&[runs_ok(), runs_ok()]);
    assert_eq!(invalid_what(State::decode(&b)), "duplicate section");
}

fn binding(slot: u32, offset: u64, gpa: u64, size: u64) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&slot.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&words(&[offset, gpa, size]));
    v
}

#[test]
fn binding_rules() {
    let cases = [
        (binding(0, 1, 0, P), "binding range"),
        (binding(0, 0, 0, 0), "binding range"),
        (binding(0, 0, u64::MAX - P + 1, 2 * P), "binding range"),
        (
            [binding(0, 0, 0, 2 * P), binding(1, P, 1 << 30, P)].concat(),
            "bindings overlap in the file",
        ),
        (
            [binding(0, 0, 0, 2 * P), binding(1, 4 * P, P, P)].concat(),
            "bindings overlap in guest-physical space",
        ),
        (
            [binding(5, 0, 0, P), binding(5, P, P, P)].concat(),
            "two bindings with one slot",
        ),
        (
            binding(0, 60 * P, 0, 8 * P),
            "binding past the end of the file",
        ),
    ];
    for (payload, what) in cases {
        let b = one_file_with(&[runs_ok(), section(4, 1, 0, 0, &payload)]);
        assert_eq!(invalid_what(State::decode(&b)), what);
    }
}

#[test]
fn numa_poison_pins_vm_restructure_rules() {
    let numa = |mode: u32, mask: &[u64]| {
        let mut v = mode.to_le_bytes().to_vec();
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&words(mask));
        section(3, 1, 0, 0, &v)
    };
    for (s, what) in [
        (numa(4, &[1]), "NUMA mode"),
        (numa(0, &[1]), "NUMA mask does not fit the mode"),
        (numa(2, &[]), "NUMA mask does not fit the mode"),
        (numa(2, &[0, 0]), "NUMA mask does not fit the mode"),
        (numa(2, &[1; 17]), "NUMA mask too long"),
        (section(6, 1, 0, 0, &words(&[P, P])), "poisoned page offset"),
        (section(6, 1, 0, 0, &words(&[1])), "poisoned page offset"),
        (
            section(6, 1, 0, 0, &words(&[64 * P])),
            "poisoned page past the end of the file",
        ),
        (section(7, 1, 0, 0, &words(&[0, 0, 1])), "pin range"),
        (section(7, 1, 0, 0, &words(&[u64::MAX, 2, 1])), "pin range"),
        (
            section(7, 1, 0, 0, &words(&[63 * P, P + 1, 1])),
            "pin past the end of the file",
        ),
        (
            // 65 one-page pins of the same page over a 64-page file: more work than one pass
            // over the file's pages, refused.
            section(7, 1, 0, 0, &words(&[0, P, 1].repeat(65))),
            "pins cover more pages than the file holds",
        ),
        (section(8, 1, 0, 0, &words(&[0, 5])), "VM link"),
        (section(8, 1, 0, 0, &words(&[2])), "VM section length"),
        (
            section(
                5,
                1,
                0,
                0,
                &[words(&[0, P]), 3u64.to_le_bytes().to_vec()].concat(),
            ),
            "restructure kind",
        ),
        (
            section(
                5,
                1,
                0,
                0,
                &[words(&[0, 0]), 1u64.to_le_bytes().to_vec()].concat(),
            ),
            "restructure range",
        ),
        (section(3, 1, 9, 0, &[0; 8]), "section file index"),
    ] {
        let b = one_file_with(&[runs_ok(), s]);
        assert_eq!(invalid_what(State::decode(&b)), what);
    }
    // Restructuring of a shmem file must be 4 KiB aligned, of a HugeTLB file huge aligned.
    let mut s = full();
    s.files[1].restructure = vec![Restructured {
        offset: P,
        len: 2 << 20,
        kind: RestructureKind::Split,
    }];
    let b = s.encode().unwrap();
    assert_eq!(
        invalid_what(State::decode(&b)),
        "restructure range not block aligned or past the end"
    );
}

#[test]
fn file_section_rules() {
    let base = State {
        generation: 1,
        files: vec![file(64 * P)],
    }
    .encode()
    .unwrap();
    // FILE payload starts at HEADER_LEN + 16: kind, 0, flags, size, block, dev, ino.
    let f = HEADER_LEN + 16;
    let patch = |at: usize, v: &[u8]| {
        let mut b = base.clone();
        b[at..at + v.len()].copy_from_slice(v);
        reseal(b, 0)
    };
    assert_eq!(
        invalid_what(State::decode(&patch(f, &9u32.to_le_bytes()))),
        "backing kind"
    );
    assert_eq!(
        invalid_what(State::decode(&patch(f + 8, &4u64.to_le_bytes()))),
        "unknown file flags"
    );
    assert_eq!(
        invalid_what(State::decode(&patch(f + 16, &0u64.to_le_bytes()))),
        "file size"
    );
    assert_eq!(
        invalid_what(State::decode(&patch(f + 16, &(P + 1).to_le_bytes()))),
        "file size"
    );
    assert_eq!(
        invalid_what(State::decode(&patch(f + 24, &8192u64.to_le_bytes()))),
        "block size"
    );
    assert_eq!(
        invalid_what(State::decode(&patch(f + 4, &1u32.to_le_bytes()))),
        "FILE reserved word"
    );
    // HugeTLB with a non power-of-two block.
    let mut b = patch(f, &1u32.to_le_bytes());
    b[f + 24..f + 32].copy_from_slice(&(3u64 << 20).to_le_bytes());
    assert_eq!(invalid_what(State::decode(&reseal(b, 0))), "block size");
    // Zero files, too many files.
    assert_eq!(
        invalid_what(State::decode(&patch(24, &0u32.to_le_bytes()))),
        "file count"
    );
    assert_eq!(
        invalid_what(State::decode(&patch(24, &251u32.to_le_bytes()))),
        "file count"
    );
    // A second file announced but never described.
    assert_eq!(
        invalid_what(State::decode(&patch(24, &2u32.to_le_bytes()))),
        "file without FILE section"
    );
    // Non-zero padding and trailing bytes.
    let b = one_file_with(&[section(7, 1, 0, 0, &[1; 20]), runs_ok()]);
    assert_eq!(invalid_what(State::decode(&b)), "PINS section length");
    let mut b = base.clone();
    b.extend_from_slice(&[0; 8]);
    assert_eq!(
        invalid_what(State::decode(&reseal(b, 0))),
        "bytes after the last section"
    );
}

/// Random and mutated inputs: the parser returns, never panics, and accepts only states that
/// survive a round trip through the encoder.
#[test]
fn random_and_mutated_inputs_never_panic() {
    let seed = full().encode().unwrap();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut accepted = 0;
    for round in 0..200_000 {
        let mut b = if round % 4 == 0 {
            (0..(next() % 256))
                .map(|_| next() as u8)
                .collect::<Vec<u8>>()
        } else {
            seed.clone()
        };
        for _ in 0..(1 + next() % 4) {
            if b.is_empty() {
                break;
            }
            let i = (next() as usize) % b.len();
            match next() % 4 {
                0 => b[i] ^= 1 << (next() % 8),
                1 => b[i] = next() as u8,
                2 => b.truncate(i),
                _ => b.insert(i, next() as u8),
            }
        }
        if round % 2 == 0 && b.len() >= HEADER_LEN {
            b = reseal(b, 0);
        }
        if let Ok(s) = State::decode(&b) {
            accepted += 1;
            // Sections may come in another order than the encoder writes them; the meaning
            // must survive a round trip.
            assert_eq!(State::decode(&s.encode().unwrap()).unwrap(), s);
        }
    }
    // Resealed single-field mutations are sometimes valid states; most are not.
    assert!(accepted < 200_000);
}

/// The fuzz seed corpus (`fuzz/seeds/state_parser`) holds valid states of every section kind;
/// `GMEM_BLESS_SEEDS=1` rewrites it.
#[test]
fn fuzz_seed_corpus_is_current() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/state_parser");
    let mut minimal = State {
        generation: 1,
        files: vec![file(P)],
    };
    let seeds = [
        ("minimal", minimal.encode().unwrap()),
        ("full", full().encode().unwrap()),
        (
            "optional-section",
            one_file_with(&[runs_ok(), section(77, 9, 0, 1, b"future")]),
        ),
        ("many-runs", {
            minimal.files[0] = file(4096 * P);
            minimal.files[0].runs = (0..4096)
                .map(|i| RunRecord {
                    start_page: i,
                    attr: if i % 2 == 0 {
                        Attr::Shared
                    } else {
                        Attr::Private
                    },
                })
                .collect();
            minimal.encode().unwrap()
        }),
    ];
    for (name, bytes) in seeds {
        State::decode(&bytes).unwrap();
        let path = dir.join(name);
        if std::env::var("GMEM_BLESS_SEEDS").is_ok() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "{name} is stale: run with GMEM_BLESS_SEEDS=1"
        );
    }
}
