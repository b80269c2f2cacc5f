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
    /// Create guest memory, then hand it (zero copy) to a new `gmem` process, which checks
    /// every byte and attribute and reports.
    Handover {
        /// e.g. memory-backend-guest-memfd,id=ram0,size=64M,init-shared=on
        #[arg(long = "object", short = 'o')]
        object: String,
        /// Conversions to apply before the hand-over, OFFSET:LEN:shared|private.
        #[arg(long = "convert")]
        convert: Vec<String>,
    },
    /// Run the core benchmarks (P1–P5, P12, P2's floor, residency, small accesses) and print
    /// a table with ratios.
    Bench {
        /// File size in MiB for P1, P2, P4 (the bars are defined at 1024).
        #[arg(long, default_value_t = 1024)]
        mib: u64,
    },
    /// Internal: the new owner of a hand-over (descriptors inherited).
    #[command(name = "__receive", hide = true)]
    Receive {
        /// Checksum of the contents the old owner saw.
        sum: String,
        /// Runs the old owner saw.
        runs: usize,
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

/// FNV-1a over every byte of the file, read through the guest view (any attribute).
fn checksum(mem: &GuestMemfd) -> R<u64> {
    let guest = mem.guest()?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < mem.size() {
        let n = usize::try_from((mem.size() - off).min(1 << 20))?;
        guest.read(off, &mut buf[..n])?;
        for b in &buf[..n] {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        off += u64::try_from(n)?;
    }
    Ok(h)
}

fn handover(spec: &str, conversions: &[String]) -> R<()> {
    let (obj, mem) = build(spec, conversions, false)?;
    // Some contents to carry: each page's first bytes name the page.
    let guest = mem.guest()?;
    for page in (0..mem.size()).step_by(4096) {
        guest.write(page, &page.to_le_bytes())?;
    }
    let sum = checksum(&mem)?;
    let runs = mem.run_count()?;
    println!("{obj}");
    println!("old owner: {} run(s), checksum {sum:016x}", runs);
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["__receive", &format!("{sum:016x}"), &runs.to_string()]);
    let offers = [gmem::preserve::FileOffer::new(&mem)];
    let spawned = gmem::preserve::spawn_with_inherited(
        &offers,
        &mut cmd,
        &gmem::preserve::Options::default(),
    )?;
    let mut child = spawned.child;
    match spawned.outcome {
        Ok(h) => println!(
            "handed over: pause {:.3} ms, state {} bytes, confirmed {}",
            h.pause.as_secs_f64() * 1e3,
            h.state_len,
            h.confirmed
        ),
        Err(e) => {
            // The new owner refused or died: let it finish saying why.
            let _ = child.wait();
            return Err(
                format!("hand-over failed, this process still owns the memory: {e}").into(),
            );
        }
    }
    let status = child.wait()?;
    if !status.success() {
        return Err(format!("the new owner failed: {status}").into());
    }
    Ok(())
}

fn receive(sum: &str, runs: usize) -> R<()> {
    // SAFETY: called once, at start, before anything else in this process opens descriptors.
    let restored =
        unsafe { gmem::preserve::receive_inherited(&gmem::preserve::Options::default()) }?
            .ok_or("not started for a hand-over")?;
    for f in &restored.files {
        let got = checksum(&f.mem)?;
        println!(
            "new owner (generation {}): {} MiB {}, {} run(s), checksum {got:016x}",
            restored.generation,
            f.mem.size() >> 20,
            f.mem.backing_kind(),
            f.mem.run_count()?
        );
        if format!("{got:016x}") != sum || f.mem.run_count()? != runs {
            return Err("contents or attributes differ from the old owner's".into());
        }
    }
    println!("new owner: every byte and every attribute arrived");
    Ok(())
}

fn create(json: bool, spec: &str, conversions: &[String]) -> R<()> {
    let (obj, mem) = build(spec, conversions, json)?;
    report(json, &obj, &mem)
}

/// Creates the memory an object describes and applies the conversions.
fn build(spec: &str, conversions: &[String], json: bool) -> R<(object::MemoryObject, GuestMemfd)> {
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
        object::PolicyKind::Default => gmem::NumaPolicy::Default,
        object::PolicyKind::Preferred => {
            gmem::NumaPolicy::Preferred(obj.host_nodes.first().copied().unwrap_or(0))
        }
        object::PolicyKind::Bind => gmem::NumaPolicy::Bind(obj.host_nodes.clone()),
        object::PolicyKind::Interleave => gmem::NumaPolicy::Interleave(obj.host_nodes.clone()),
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
    Ok((obj, mem))
}

fn report(json: bool, obj: &object::MemoryObject, mem: &GuestMemfd) -> R<()> {
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
    let mut opts = gmem::Prealloc::default();
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
        Cmd::Handover { object, convert } => handover(&object, &convert),
        Cmd::Receive { sum, runs } => receive(&sum, runs),
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
