//! The guest_memfd conformance catalogue, written once and run against every gmem backing.
#![deny(missing_docs)]

pub mod probe;
