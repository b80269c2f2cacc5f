//! Fuzz target: the command-line object syntax (`gmem_cli::object::parse`), QEMU's
//! `-object memory-backend-...,key=value,...`. On any input it must return (never panic), every
//! error must carry `EINVAL`, and an accepted object must print (`Display`) as a string that
//! parses back to the same object.
#![no_main]

use gmem_cli::object::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match parse(s) {
        Ok(obj) => {
            let printed = obj.to_string();
            let again = parse(&printed).unwrap_or_else(|e| panic!("{printed:?} does not parse: {e}"));
            assert_eq!(again, obj, "{printed:?}");
        }
        Err(e) => assert_eq!(e.errno(), libc::EINVAL),
    }
});
