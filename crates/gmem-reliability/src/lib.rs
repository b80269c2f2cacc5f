//! Reliability suites for gmem.
//!
//! - [`board`]: what a stress run's threads share, and the punching thread of both stress
//!   suites.
//! - [`model`]: a reference model of a guest memory file's whole state in plain Rust (no
//!   syscalls): per-page attribute, contents, allocation, host references (pins) and the
//!   listener's view of conversions. Every operation returns what the real file must return.
//! - [`ops`]: the operations the randomized driver applies, a generator that mixes valid and
//!   invalid arguments, and their printable form (a failing sequence prints as Rust-like text).
//! - [`outcome`]: real gmem errors reduced to `(class, errno, offset)` so they compare with the
//!   model's expectations.
//! - [`rng`]: a small deterministic generator (SplitMix64), so a seed reproduces a run.
//!
//! The suites themselves live in `tests/`: the model-based randomized test (R1), the
//! concurrency stress test (R2), the parser fuzzing fallback (R3), the bad-input sweep (R5)
//! and resource limits (R6).
#![deny(missing_docs)]

pub mod board;
pub mod model;
pub mod ops;
pub mod outcome;
pub mod rng;
