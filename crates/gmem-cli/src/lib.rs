//! The `gmem` command-line tool: QEMU-style memory objects, the demo, host probing, inspection,
//! benchmarks and hand-over.
#![deny(missing_docs)]

pub mod bench;
pub mod demo;
pub mod object;
pub mod probe;
