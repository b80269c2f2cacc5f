//! `gmem probe`: what this host offers gmem.

use std::fs;

use serde::Serialize;

/// What the host offers.
#[derive(Debug, Serialize)]
pub struct HostReport {
    /// Kernel release.
    pub kernel: String,
    /// userfaultfd with `UFFD_FEATURE_POISON` (host-view enforcement).
    pub uffd_poison: Result<(), String>,
    /// `/dev/kvm` can be opened.
    pub kvm: Result<(), String>,
    /// HugeTLB pools: (page size in KiB, total pages, free pages).
    pub hugetlb: Vec<(u64, u64, u64)>,
    /// Online NUMA nodes.
    pub numa_nodes: String,
    /// `vm.max_map_count`.
    pub max_map_count: u64,
}

fn read(p: &str) -> String {
    fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn hugetlb() -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/sys/kernel/mm/hugepages") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let kb = name
            .trim_start_matches("hugepages-")
            .trim_end_matches("kB")
            .parse()
            .unwrap_or(0);
        let base = e.path();
        let num = |f: &str| read(&base.join(f).to_string_lossy()).parse().unwrap_or(0);
        out.push((kb, num("nr_hugepages"), num("free_hugepages")));
    }
    out.sort_unstable();
    out
}

/// Collects the report.
pub fn report() -> HostReport {
    let uffd_poison = gmem::GuestMemfd::create(4096, gmem::Flags::MMAP)
        .map_err(|e| e.to_string())
        .and_then(|m| m.map(0, 4096).map(drop).map_err(|e| e.to_string()));
    let kvm = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| e.to_string());
    HostReport {
        kernel: read("/proc/sys/kernel/osrelease"),
        uffd_poison,
        kvm,
        hugetlb: hugetlb(),
        numa_nodes: read("/sys/devices/system/node/online"),
        max_map_count: read("/proc/sys/vm/max_map_count").parse().unwrap_or(0),
    }
}

/// Prints the report.
pub fn run(json: bool) -> Result<(), Box<dyn std::error::Error>> {
    let r = report();
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let ok = |x: &Result<(), String>| match x {
        Ok(()) => "yes".to_string(),
        Err(e) => format!("no ({e})"),
    };
    println!("kernel                 {}", r.kernel);
    println!(
        "host-view enforcement  {} (userfaultfd poison markers)",
        ok(&r.uffd_poison)
    );
    println!("/dev/kvm               {}", ok(&r.kvm));
    for (kb, total, free) in &r.hugetlb {
        println!("hugetlb {:>8} KiB   {total} pages, {free} free", kb);
    }
    println!("NUMA nodes online      {}", r.numa_nodes);
    println!("vm.max_map_count       {}", r.max_map_count);
    Ok(())
}
