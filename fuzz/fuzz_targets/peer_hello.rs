//! Fuzz target: the peer hello and run-table parsers (`gmem::peer::parse_hello`,
//! `gmem::peer::parse_runs`) take bytes from another process. They must return on any input
//! (never panic, never read out of bounds), and a run table they accept must describe merged,
//! alternating runs covering every page, which encode back to the same words.
//!
//! Input layout: the first 48 bytes are the hello; the rest is the run table. The table is
//! parsed for the page count the hello announces when it parses, otherwise for a page count
//! taken from the input's first byte (so the table parser is reached on its own too).
#![no_main]

use gmem::peer::{parse_hello, parse_runs};
use gmem::Attr;
use libfuzzer_sys::fuzz_target;

const HELLO_LEN: usize = 48;

fuzz_target!(|data: &[u8]| {
    let (hello, table) = data.split_at(data.len().min(HELLO_LEN));
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
    };
    // Bound the work: a table longer than the pages cannot be valid anyway.
    let pages = pages.min(1 << 20);
    if let Ok(map) = parse_runs(table, pages) {
        assert_eq!(map.pages(), pages);
        let mut words = Vec::new();
        let mut prev: Option<Attr> = None;
        let mut covered = 0;
        for run in map.runs(0, pages) {
            assert_eq!(run.start, covered);
            assert!(run.end > run.start);
            assert_ne!(prev, Some(run.attr));
            prev = Some(run.attr);
            covered = run.end;
            words.extend_from_slice(&((run.start << 1) | u64::from(run.attr == Attr::Private)).to_le_bytes());
        }
        assert_eq!(covered, pages);
        assert_eq!(words, table);
        assert_eq!(map.len() * 8, table.len());
    }
});
