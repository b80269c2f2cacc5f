//! KVM integration for gmem: the kernel guest_memfd backing, memslots and a VM runner.
#![deny(missing_docs)]
