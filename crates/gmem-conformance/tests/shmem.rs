//! The conformance catalogue on the shmem backing.

gmem_conformance::conformance_suite!(shmem, gmem_conformance::Shmem);
