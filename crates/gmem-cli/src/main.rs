//! `gmem`: guest-first memory from the command line.

use std::io::Write;

use clap::{Parser, Subcommand};
use gmem::{Attr, Flags, GuestMemfd};
use gmem_cli::{bench, demo, object};

#[global_allocator]
static ALLOC: bench::CountingAlloc = bench::CountingAlloc;

/// Guest-first memory for virtual machine monitors.
#[derive(Debug, Parser)]
#[command(name = "gmem", version, about)]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the demo: a guest writes a secret, makes it private, the host is kept out.
    Demo {
        /// Size of guest memory in MiB.
        #[arg(long, default_value_t = 16)]
        mib: u64,
        /// Backing of the guest memory.
        #[arg(long, value_enum, default_value_t = demo::DemoBacking::Auto)]
        backing: demo::DemoBacking,
    },
    /// Report what this host offers (userfaultfd poison, HugeTLB pool, NUMA nodes, limits).
    Probe,
    /// Create guest memory from a QEMU-style -object, apply conversions, show its attributes.
    Create {
        /// e.g. memory-backend-guest-memfd,id=ram0,size=64M
        #[arg(long = "object", short = 'o')]
        object: String,
        /// Conversions to apply in order, OFFSET:LEN:shared|private (sizes accept K/M/G).
        #[arg(long = "convert")]
        convert: Vec<String>,
    },
    /// Run the core benchmarks (P1–P5) and print a table with ratios.
    Bench {
        /// File size in MiB for P1, P2, P4 (the bars are defined at 1024).
        #[arg(long, default_value_t = 1024)]
        mib: u64,
    },
    /// Internal: child process of the demo.
    #[command(name = "__touch", hide = true)]
    Touch { fd: i32, offset: u64 },
}

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn parse_conversion(s: &str) -> R<(u64, u64, Attr)> {
    let parts: Vec<&str> = s.split(':').collect();
    let [off, len, to] = parts[..] else {
        return Err(format!("conversion '{s}' is not OFFSET:LEN:shared|private").into());
    };
    let to = match to {
        "shared" => Attr::Shared,
        "private" => Attr::Private,
        _ => return Err(format!("conversion target '{to}' is not shared or private").into()),
    };
    Ok((
        object::parse_size("offset", off)?,
        object::parse_size("len", len)?,
        to,
    ))
}

fn create(json: bool, spec: &str, conversions: &[String]) -> R<()> {
    let obj = object::parse(spec)?;
    let mut flags = Flags::NONE;
    if obj.mmap {
        flags = flags | Flags::MMAP;
    }
    if obj.init_shared {
        flags = flags | Flags::INIT_SHARED;
    }
    let backing = match obj.source {
        object::Source::Shmem => gmem::BackingChoice::Shmem,
        object::Source::HugeTlb(sz) => gmem::BackingChoice::HugeTlb(sz),
    };
    let policy = match obj.policy {
        object::PolicyKind::Default => gmem::numa::NumaPolicy::Default,
        object::PolicyKind::Preferred => {
            gmem::numa::NumaPolicy::Preferred(obj.host_nodes.first().copied().unwrap_or(0))
        }
        object::PolicyKind::Bind => gmem::numa::NumaPolicy::Bind(obj.host_nodes.clone()),
        object::PolicyKind::Interleave => {
            gmem::numa::NumaPolicy::Interleave(obj.host_nodes.clone())
        }
    };
    let mem = GuestMemfd::builder(obj.size)
        .flags(flags)
        .backing(backing)
        .numa(policy)
        .create()?;
    if obj.prealloc {
        preallocate(&mem, json)?;
    }
    for c in conversions {
        let (off, len, to) = parse_conversion(c)?;
        mem.convert(off, len, to)?;
    }
    let runs = mem.runs(0, mem.size())?;
    if json {
        let runs: Vec<_> = runs
            .iter()
            .map(|r| serde_json::json!({"offset": r.offset, "len": r.len, "attr": format!("{:?}", r.attr).to_lowercase()}))
            .collect();
        let v = serde_json::json!({"object": obj, "backing": mem.backing_kind().to_string(), "runs": runs});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{obj}");
        println!("backing {}, {} run(s):", mem.backing_kind(), runs.len());
        for r in runs {
            println!(
                "  {:#014x}..{:#014x} {:?}",
                r.offset,
                r.offset + r.len,
                r.attr
            );
        }
    }
    Ok(())
}

/// Preallocates with a progress bar on a terminal (none with `--json` or when piped).
fn preallocate(mem: &GuestMemfd, json: bool) -> R<()> {
    use std::io::IsTerminal;
    let mut opts = gmem::prealloc::Prealloc::default();
    if !json && std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(mem.size());
        bar.set_style(indicatif::ProgressStyle::with_template(
            "preallocating {bar:40} {bytes}/{total_bytes} ({bytes_per_sec})",
        )?);
        let shown = bar.clone();
        opts = opts.on_progress(move |p| shown.set_position(p.done));
        mem.preallocate(&opts)?;
        bar.finish();
        return Ok(());
    }
    mem.preallocate(&opts)?;
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Demo { mib, backing } => run_demo(cli.json, mib, backing),
        Cmd::Probe => gmem_cli::probe::run(cli.json),
        Cmd::Create { object, convert } => create(cli.json, &object, &convert),
        Cmd::Bench { mib } => run_bench(cli.json, mib),
        Cmd::Touch { fd, offset } => demo::touch_child(fd, offset).map(|b| println!("{b:#04x}")),
    };
    if let Err(e) = res {
        eprintln!("gmem: error: {e}");
        std::process::exit(1);
    }
}

fn run_demo(json: bool, mib: u64, backing: demo::DemoBacking) -> R<()> {
    // A real vCPU first, where KVM runs: the guest converts through gmem's doorbell.
    let vcpu = if backing == demo::DemoBacking::Shmem {
        None
    } else {
        let t = std::time::Instant::now();
        match gmem_kvm::demo_guest() {
            Ok(report) => Some((report, t.elapsed())),
            Err(e) if backing == demo::DemoBacking::Kvm => return Err(e.into()),
            Err(e) => {
                eprintln!("note: KVM guest not run: {e}");
                None
            }
        }
    };
    let steps = demo::run_software(mib << 20, backing)?;
    if json {
        let v = serde_json::json!({
            "kvm_guest": vcpu.as_ref().map(|(r, d)| serde_json::json!({
                "backing": r.backing.to_string(),
                "steps": r.steps,
                "micros": d.as_secs_f64() * 1e6,
            })),
            "walkthrough": steps,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if let Some((report, took)) = &vcpu {
        println!(
            "gmem demo, part 1: a guest on /dev/kvm ({:.1} ms)",
            took.as_secs_f64() * 1e3
        );
        print!("{report}");
        println!();
    }
    println!("gmem demo, part 2: the host kept out of private memory, step by step");
    demo::print(&steps, &mut std::io::stdout())?;
    Ok(())
}

fn run_bench(json: bool, mib: u64) -> R<()> {
    let rows = bench::run_core(mib << 20)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", bench::markdown(&rows));
        std::io::stdout().flush()?;
    }
    Ok(())
}
