//! The guest_memfd conformance catalogue, written once and run against every gmem backing.
//!
//! The catalogue ports the kernel's own guest_memfd selftests (`guest_memfd_test.c` and
//! `x86/private_mem_conversions_test.c`) to gmem's API: file creation and its errnos, the
//! refused file operations, host mappings and their `SIGBUS`es, `fallocate`, and in-place
//! conversion between shared and private, including a second process and pinned pages. Every
//! case asserts the exact errno, the `SIGBUS`, or the bytes.
//!
//! A backing plugs in by implementing [`Backend`] and instantiating the suite in an
//! integration test:
//!
//! ```
//! // tests/shmem.rs
//! gmem_conformance::conformance_suite!(shmem, gmem_conformance::Shmem);
//! ```
//!
//! which expands to one `#[test] fn conformance_<case>()` per case in a module `shmem`, so
//! `cargo test --workspace conformance` runs the whole catalogue for every backing. Cases size
//! files and `fallocate` ranges in multiples of [`Backend::block_size`] (a huge page for
//! HugeTLB) and convert, probe and check bytes per 4 KiB page.
#![deny(missing_docs)]

pub mod backend;
pub mod cases;
pub mod child;
pub mod converter;
pub mod kref;
pub mod mappings;
pub mod probe;
pub mod remap;
pub mod rollback;
pub mod stop;
pub mod touch;

pub use backend::{Backend, Shmem};

use gmem::Errno;
use gmem::{CreateError, Flags, GuestMemfd};

/// What a case runs with: the backing and the name of the test running it.
pub struct Ctx<'a> {
    backend: &'a dyn Backend,
    test: &'static str,
}

impl std::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("backend", &self.backend.name())
            .field("test", &self.test)
            .finish()
    }
}

impl<'a> Ctx<'a> {
    /// A context for running a case by hand. `test` is the test's full name as the test
    /// harness knows it (`module::test_fn`), used to re-run the test in a child process.
    pub fn new(backend: &'a dyn Backend, test: &'static str) -> Self {
        Ctx { backend, test }
    }

    /// The backing.
    pub fn backend(&self) -> &dyn Backend {
        self.backend
    }

    /// The backing's allocation unit.
    pub fn block(&self) -> u64 {
        self.backend.block_size()
    }

    /// The test's full name as the test harness knows it.
    pub fn test_name(&self) -> &'static str {
        self.test
    }

    /// `bytes` rounded up to a whole number of blocks.
    pub fn size_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.block()) * self.block()
    }

    /// Creates a file through the backing or panics with the backing's name and the error.
    #[track_caller]
    pub fn create(&self, size: u64, flags: Flags) -> GuestMemfd {
        self.try_create(size, flags).unwrap_or_else(|e| {
            panic!(
                "{}: create({size:#x}, {flags:?}) failed: {e} (errno {})",
                self.backend.name(),
                e.errno()
            )
        })
    }

    /// Creates a file through the backing.
    pub fn try_create(&self, size: u64, flags: Flags) -> Result<GuestMemfd, CreateError> {
        self.backend.create(size, flags)
    }

    /// True when the backing accepts every bit of `flags`.
    pub fn supports(&self, flags: Flags) -> bool {
        flags.difference(self.backend.supported_flags()).is_empty()
    }
}

/// Runs one case against `backend`, printing `skipped: <reason>` instead when the backing
/// cannot run on this machine. `module_test_path` is `module_path!()::test_fn` of the calling
/// test; its first segment (the test crate) is dropped to get the harness's test name.
pub fn run<B: Backend>(backend: &B, module_test_path: &'static str, case: fn(&Ctx<'_>)) {
    // A child process started by a case runs only because the case's backing was available
    // in the parent; it reaches the memory through the parent, not through the backing.
    let in_child = std::env::var_os(child::ROLE_ENV).is_some();
    if !in_child {
        if let Some(reason) = backend.unavailable() {
            eprintln!("skipped: {reason}");
            return;
        }
    }
    let test = module_test_path
        .split_once("::")
        .map_or(module_test_path, |(_, rest)| rest);
    case(&Ctx::new(backend, test));
}

/// Instantiates the whole catalogue for one backing.
///
/// `conformance_suite!(name, backend_expr)` expands to `mod name { ... }` holding one
/// `#[test] fn conformance_<case>()` per case of [`cases`]; each test evaluates
/// `backend_expr` (an expression of a type implementing [`Backend`], resolved in the calling
/// module) and runs its case with [`run`].
#[macro_export]
macro_rules! conformance_suite {
    ($name:ident, $backend:expr $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $crate::__conformance_tests!($backend;
                conformance_create_flags_single_bits => $crate::cases::file::flags_single_bits,
                conformance_create_invalid_sizes => $crate::cases::file::invalid_sizes,
                conformance_create_distinct_files => $crate::cases::file::distinct_files,
                conformance_file_io_refused => $crate::cases::file::io_refused,
                conformance_file_size_and_block => $crate::cases::file::size_and_block,
                conformance_mmap_shared_punch_rewrite => $crate::cases::mmap::shared_punch_rewrite,
                conformance_mmap_past_end_sigbus => $crate::cases::mmap::past_end_sigbus,
                conformance_mmap_private_sigbus => $crate::cases::mmap::private_sigbus,
                conformance_mmap_needs_mmap_flag => $crate::cases::mmap::needs_mmap_flag,
                conformance_mmap_copy_on_write_refused => $crate::cases::mmap::copy_on_write_refused,
                conformance_fallocate_sequence => $crate::cases::fallocate::sequence,
                conformance_fallocate_invalid_punch => $crate::cases::fallocate::invalid_punch,
                conformance_fallocate_modes => $crate::cases::fallocate::modes,
                conformance_convert_invalid_ranges => $crate::cases::convert::invalid_ranges,
                conformance_convert_in_place => $crate::cases::convert::in_place,
                conformance_convert_per_page => $crate::cases::convert::per_page,
                conformance_convert_before_allocation => $crate::cases::convert::before_allocation,
                conformance_convert_mixed_allocation => $crate::cases::convert::mixed_allocation,
                conformance_convert_punch_keeps_attributes => $crate::cases::convert::punch_keeps_attributes,
                conformance_convert_other_process => $crate::cases::convert::other_process,
                conformance_convert_pinned_page => $crate::cases::convert::pinned_page,
                conformance_ranges_explicit_conversion => $crate::cases::ranges::explicit_conversion,
                conformance_ranges_explicit_conversion_fallocate => $crate::cases::ranges::explicit_conversion_fallocate,
                conformance_ranges_punch_hole => $crate::cases::ranges::punch_hole,
            );
        }
    };
}

/// Instantiates the hardening cases ([`cases::hardening`]) for one backing, like
/// [`conformance_suite!`]: `hardening_suite!(name, backend_expr)` expands to `mod name` with
/// one `#[test] fn hardening_<case>()` per case.
#[macro_export]
macro_rules! hardening_suite {
    ($name:ident, $backend:expr $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $crate::__conformance_tests!($backend;
                hardening_madvise_every_advice => $crate::cases::hardening::madvise::every_advice_keeps_private_pages_blocked,
                hardening_madvise_protection_changes => $crate::cases::hardening::madvise::protection_changes_keep_private_pages_blocked,
                hardening_madvise_remove => $crate::cases::hardening::madvise::remove_punches_but_never_reveals,
                hardening_madvise_guard_remove_exception => $crate::cases::hardening::madvise::guard_remove_is_the_documented_exception,
                hardening_remap_moved_view => $crate::cases::hardening::remap::moved_view_leaves_no_alias,
                hardening_remap_grown_view => $crate::cases::hardening::remap::grown_view_leaves_no_alias,
                hardening_remap_dontunmap => $crate::cases::hardening::remap::dontunmap_keeps_the_view_enforced,
                hardening_remap_partly_unmapped => $crate::cases::hardening::remap::partly_unmapped_view_is_given_up,
                hardening_refs_vmsplice => $crate::cases::hardening::kernel_refs::vmspliced_page_never_shows_private_bytes,
                hardening_refs_vmsplice_partly_resident => $crate::cases::hardening::kernel_refs::vmspliced_pages_of_a_partly_resident_range_never_show_private_bytes,
                hardening_refs_moved_page_gmem_mapped => $crate::cases::hardening::kernel_refs::moved_page_gmem_mapped_keeps_the_view_blocked,
                hardening_refs_vmsplice_whole_huge_page_exception => $crate::cases::hardening::kernel_refs::vmsplice_whole_huge_page_is_the_documented_exception,
                hardening_refs_io_uring_fixed_buffer => $crate::cases::hardening::kernel_refs::io_uring_fixed_buffer_holds_an_orphan,
                hardening_refs_o_direct_race => $crate::cases::hardening::kernel_refs::o_direct_racing_conversions_never_exports_private_bytes,
                hardening_pin_pointer => $crate::cases::hardening::capabilities::pin_pointer_is_enforced,
                hardening_guest_pointer_racing_moves => $crate::cases::hardening::capabilities::guest_pointer_racing_moves_never_opens_a_view,
                hardening_debugger_paths => $crate::cases::hardening::capabilities::debugger_paths_never_read_private_pages,
                hardening_follower_no_guest_view => $crate::cases::hardening::capabilities::follower_has_no_guest_view,
                hardening_forked_child => $crate::cases::hardening::capabilities::forked_child_gets_clean_errors,
            );
        }
    };
}

/// One `#[test]` per `test_name => case_fn` pair (used by [`conformance_suite!`]).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ($backend:expr; $($test:ident => $case:path),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                let backend = $backend;
                $crate::run(
                    &backend,
                    concat!(module_path!(), "::", stringify!($test)),
                    $case,
                );
            }
        )*
    };
}

/// Instantiates the rollback cases of [`rollback::cases`] for one base-page backing.
///
/// `rollback_suite!(name, backend_expr)` expands to `mod name { ... }` holding one
/// `#[test] fn rollback_<case>()` per case, each run with [`run`] (so an unavailable backing
/// prints `skipped: <reason>`).
#[macro_export]
macro_rules! rollback_suite {
    ($name:ident, $backend:expr $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $crate::__conformance_tests!($backend;
                rollback_revoke_refused => $crate::rollback::cases::revoke_refused,
                rollback_revoke_refused_at_second_call => $crate::rollback::cases::revoke_refused_at_second_call,
                rollback_restore_refused => $crate::rollback::cases::restore_refused,
                rollback_restore_refused_at_second_call => $crate::rollback::cases::restore_refused_at_second_call,
                rollback_listener_veto => $crate::rollback::cases::listener_veto,
                rollback_poison_refused => $crate::rollback::cases::poison_refused,
                rollback_punch_refresh_refused => $crate::rollback::cases::punch_refresh_refused,
                rollback_every_call_refused_in_turn => $crate::rollback::cases::every_call_refused_in_turn,
                rollback_moved_pages_stay_unreachable => $crate::rollback::cases::moved_pages_stay_unreachable,
            );
        }
    };
}
