//! Fuzz target: the preserved-state parser must return (never panic, never read out of
//! bounds) on any bytes, and a state it accepts must survive a round trip through the encoder.
//!
//! Each input is parsed twice: as it is, and *resealed* (the header's total length and
//! CRC-32C recomputed), so that mutations reach the section parsers behind the checksum.
#![no_main]

use gmem::preserve::format::HEADER_LEN;
use gmem::preserve::{crc32c, State};
use libfuzzer_sys::fuzz_target;

fn check(data: &[u8]) {
    if let Ok(state) = State::decode(data) {
        let bytes = state.encode().expect("an accepted state encodes");
        let again = State::decode(&bytes).expect("an encoded state decodes");
        assert_eq!(again, state);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= HEADER_LEN {
        let mut b = data.to_vec();
        let total = b.len() as u64;
        b[16..24].copy_from_slice(&total.to_le_bytes());
        b[32..36].fill(0);
        let crc = crc32c(&b);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        check(&b);
    }
});
