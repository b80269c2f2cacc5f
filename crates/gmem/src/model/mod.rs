//! The model: pure state, no syscalls.
//!
//! Attributes, units, flags, poison records, NUMA policies, HugeTLB restructuring state and
//! the errno trait. Everything here is plain data that the engine keeps consistent with the
//! page tables; nothing here touches memory or the kernel.

pub mod attr;
pub mod error;
pub mod fault;
pub mod flags;
pub mod huge;
pub mod numa;
pub mod poison;
pub mod units;
