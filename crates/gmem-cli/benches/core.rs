//! `cargo bench -p gmem-cli --bench core`: the core bars P1–P5 with their baselines.

#[global_allocator]
static ALLOC: gmem_cli::bench::CountingAlloc = gmem_cli::bench::CountingAlloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo bench` passes `--bench`; a size in MiB may follow for quicker runs.
    let mib: u64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    let rows = gmem_cli::bench::run_core(mib << 20)?;
    print!("{}", gmem_cli::bench::markdown(&rows));
    Ok(())
}
