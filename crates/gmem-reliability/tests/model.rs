//! R1: model-based randomized test.
//!
//! Random operations (valid and invalid) run against a real guest memory file and the
//! reference model in lockstep. After every step the real attributes, run count, errors and
//! bytes returned must equal the model's, and a sample of pages is probed through real host
//! views (a private page must raise `SIGBUS`, a shared one must hold the model's bytes); every
//! `FULL_EVERY` steps every page of every view is probed, the whole contents are compared, and
//! the backing's allocation (`SEEK_DATA`/`SEEK_HOLE`, `st_blocks`) is compared with the model.
//!
//! A failure is shrunk (chunks of the failing prefix are removed while it still fails) and the
//! minimal sequence is printed. `GMEM_MODEL_OPS` (total operations, default 100,000) and
//! `GMEM_MODEL_SEED` (base seed) scale or reproduce a run.

#![allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gmem::{
    Attr, Conversion, ConversionListener, FallocMode, Flags, GuestMemfd, GuestView, HostView, Pin,
    Veto,
};
use gmem_conformance::probe;
use gmem_reliability::model::{Alloc, Model, Touch, PAGE};
use gmem_reliability::ops::{pattern, Generator, Op};
use gmem_reliability::outcome::reduce;
use gmem_reliability::rng::Rng;

/// Steps between full checks.
const FULL_EVERY: usize = 50;

/// A listener that vetoes conversions containing one page and counts what it hears.
#[derive(Debug, Default)]
struct Recorder {
    veto: AtomicU64,
    commits: AtomicU64,
    aborts: AtomicU64,
}

impl ConversionListener for Recorder {
    fn prepare(&self, c: &Conversion) -> Result<(), Veto> {
        let v = self.veto.load(Ordering::Relaxed);
        if v != u64::MAX && (c.offset / PAGE..(c.offset + c.len) / PAGE).contains(&v) {
            return Err(Veto {
                offset: v * PAGE,
                reason: "model veto".into(),
            });
        }
        Ok(())
    }
    fn commit(&self, _: &Conversion) {
        self.commits.fetch_add(1, Ordering::Relaxed);
    }
    fn abort(&self, _: &Conversion) {
        self.aborts.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy)]
struct Config {
    pages: u64,
    init_shared: bool,
    follower: bool,
    /// Mostly single-page ranges: hundreds of runs.
    fine: bool,
    /// HugeTLB backing with 2 MiB pages (split and merge on every mixed huge page).
    huge: bool,
}

/// The real side: the file, its views, pins, an in-process follower.
struct Real {
    mem: GuestMemfd,
    guest: GuestView,
    /// `views[0]` maps twice the file (past EOF); the follower's view, if any, is last.
    views: Vec<HostView>,
    follower: Option<GuestMemfd>,
    follower_view: Option<HostView>,
    pins: Vec<Pin>,
    listener: Arc<Recorder>,
}

struct Run {
    /// HugeTLB: the backing's allocation counters are not compared.
    huge: bool,
    model: Model,
    real: Real,
    rng: Rng,
}

fn attr_runs(runs: Vec<gmem::AttrRun>) -> Vec<(u64, u64, Attr)> {
    runs.into_iter()
        .map(|r| (r.offset, r.len, r.attr))
        .collect()
}

impl Run {
    fn new(cfg: Config, seed: u64) -> Result<Run, String> {
        let size = cfg.pages * PAGE;
        let mut flags = Flags::MMAP;
        if cfg.init_shared {
            flags = flags | Flags::INIT_SHARED;
        }
        let mut builder = GuestMemfd::builder(size).flags(flags);
        if cfg.huge {
            builder = builder.backing(gmem::BackingChoice::HugeTlb(gmem::HUGE_2M));
        }
        let mem = builder.create().map_err(|e| format!("create: {e}"))?;
        let listener = Arc::new(Recorder {
            veto: AtomicU64::new(u64::MAX),
            ..Recorder::default()
        });
        mem.add_listener(listener.clone());
        let view = mem.map(0, 2 * size).map_err(|e| format!("map: {e}"))?;
        let (follower, follower_view) = if cfg.follower {
            let sock = mem
                .share_with_process()
                .map_err(|e| format!("share: {e}"))?;
            let f = GuestMemfd::attach(sock).map_err(|e| format!("attach: {e}"))?;
            let v = f.map(0, size).map_err(|e| format!("follower map: {e}"))?;
            (Some(f), Some(v))
        } else {
            (None, None)
        };
        Ok(Run {
            model: if cfg.huge {
                Model::new(size, true, cfg.init_shared).with_block(gmem::HUGE_2M)
            } else {
                Model::new(size, true, cfg.init_shared)
            },
            huge: cfg.huge,
            real: Real {
                guest: mem.guest().expect("guest view"),
                mem,
                views: vec![view],
                follower,
                follower_view,
                pins: Vec::new(),
                listener,
            },
            rng: Rng::new(seed ^ 0x5eed),
        })
    }

    /// All views, the follower's last: (view, is the follower's).
    fn all_views(&self) -> Vec<(&HostView, bool)> {
        let mut v: Vec<_> = self.real.views.iter().map(|v| (v, false)).collect();
        if let Some(f) = &self.real.follower_view {
            v.push((f, true));
        }
        v
    }

    /// Probes one byte of a view at view offset `at` and compares with the model.
    fn probe_at(&mut self, view: usize, at: u64) -> Result<(), String> {
        let (ptr, off, len) = {
            let views = self.all_views();
            let (v, _) = views[view];
            (v.as_ptr(), v.offset(), v.len() as u64)
        };
        let at = at % len;
        // SAFETY: `at` is inside the view's mapping.
        let got = unsafe { probe::read(ptr.wrapping_add(at as usize)) };
        let want = self.model.host_read(off + at);
        compare_touch(
            got,
            want,
            &format!("host read view {view} file offset {:#x}", off + at),
        )
    }

    /// Compares attributes, runs and listener counts (every step).
    fn check_attrs(&self) -> Result<(), String> {
        let size = self.model.size();
        let want = self.model.runs(0, size).map_err(|e| format!("{e:?}"))?;
        let got = attr_runs(
            self.real
                .mem
                .runs(0, size)
                .map_err(|e| format!("runs: {e}"))?,
        );
        if got != want {
            return Err(format!("runs differ:\n real  {got:x?}\n model {want:x?}"));
        }
        let real_runs = self
            .real
            .mem
            .run_count()
            .map_err(|e| format!("run_count: {e}"))?;
        if real_runs != self.model.run_count() {
            return Err(format!(
                "run_count real {real_runs} model {}",
                self.model.run_count()
            ));
        }
        if let Some(f) = &self.real.follower {
            let fr = attr_runs(f.runs(0, size).map_err(|e| format!("follower runs: {e}"))?);
            if fr != want {
                return Err(format!(
                    "follower runs differ:\n real  {fr:x?}\n model {want:x?}"
                ));
            }
        }
        if let Some(acct) = self.real.mem.hugetlb_accounting() {
            let got = (acct.split_pages(), acct.waiting_to_merge());
            let want = (self.model.split_blocks(), self.model.waiting_blocks());
            if got != want {
                return Err(format!(
                    "huge pages (split, waiting to merge) real {got:?} model {want:?}"
                ));
            }
        }
        let got = self
            .real
            .mem
            .poisoned_pages()
            .map_err(|e| format!("poisoned_pages: {e}"))?;
        let want = self.model.poisoned_pages();
        if got != want {
            return Err(format!("poisoned pages real {got:x?} model {want:x?}"));
        }
        let l = &self.real.listener;
        let got = (
            l.commits.load(Ordering::Relaxed),
            l.aborts.load(Ordering::Relaxed),
        );
        let want = (self.model.commits(), self.model.aborts());
        if got != want {
            return Err(format!(
                "listener (commits, aborts) real {got:?} model {want:?}"
            ));
        }
        Ok(())
    }

    /// Compares the backing's allocation with the model, then every byte and every view.
    fn check_full(&mut self) -> Result<(), String> {
        self.check_attrs()?;
        let pages = self.model.pages();
        let fd = self.real.mem.as_fd().as_raw_fd();
        let mut data = data_pages(fd, self.model.size())?;
        // A page being migrated (compaction, which growing the HugeTLB pool sets off) is
        // briefly in the page cache as a folio not yet marked up to date, which `SEEK_DATA`
        // reports as a hole. Only a mismatch that persists counts.
        for _ in 0..5 {
            let stable = (0..self.model.pages())
                .all(|p| self.huge || (self.model.alloc(p) == Alloc::Data) == data[p as usize]);
            if stable {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            data = data_pages(fd, self.model.size())?;
        }
        let blocks = st_blocks(fd)?;
        let mut want_blocks = 0;
        for p in (0..pages).filter(|_| !self.huge) {
            let a = self.model.alloc(p);
            if (a == Alloc::Data) != data[p as usize] {
                return Err(format!(
                    "page {p}: model allocation {a:?}, SEEK_DATA says data={}",
                    data[p as usize]
                ));
            }
            if a != Alloc::Hole {
                want_blocks += PAGE / 512;
            }
        }
        if blocks != want_blocks && !self.huge {
            return Err(format!("st_blocks {blocks}, model {want_blocks}"));
        }
        let mut buf = vec![0u8; PAGE as usize];
        for p in 0..pages {
            if self.model.poisoned(p) {
                let got = reduce(self.real.guest.read(p * PAGE, &mut buf));
                let want = self.model.guest_read(p * PAGE, PAGE).map(drop);
                same("guest read of a poisoned page", got, want)?;
                continue;
            }
            if self.model.alloc(p) == Alloc::Hole {
                continue;
            }
            self.real
                .guest
                .read(p * PAGE, &mut buf)
                .map_err(|e| format!("guest read: {e}"))?;
            self.model.touch_page(p);
            if buf != self.model.page_bytes(p) {
                return Err(format!("page {p}: guest view bytes differ from the model"));
            }
        }
        let nviews = self.all_views().len();
        for v in 0..nviews {
            let (ptr, off, len) = {
                let views = self.all_views();
                (
                    views[v].0.as_ptr(),
                    views[v].0.offset(),
                    views[v].0.len() as u64,
                )
            };
            for at in (0..len).step_by(PAGE as usize) {
                let probe_at = at + (off + at) / PAGE % PAGE;
                self.probe_at(v, probe_at)?;
                let fo = off + at;
                if fo < self.model.size()
                    && self.model.page_attr(fo / PAGE) == Attr::Shared
                    && !self.model.poisoned(fo / PAGE)
                {
                    // The probe succeeded, so the page is mapped: copy it whole.
                    // SAFETY: the page lies inside the view and is shared (just probed).
                    let s = unsafe {
                        std::slice::from_raw_parts(ptr.wrapping_add(at as usize), PAGE as usize)
                    };
                    if s != self.model.page_bytes(fo / PAGE) {
                        return Err(format!("view {v}: page at file offset {fo:#x} differs"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Probes a few random pages on the first view and the follower's.
    fn check_sample(&mut self) -> Result<(), String> {
        self.check_attrs()?;
        let n = self.all_views().len();
        for _ in 0..3 {
            let at = self.rng.below(2 * self.model.size());
            self.probe_at(0, at)?;
        }
        if self.real.follower_view.is_some() {
            let at = self.rng.below(self.model.size());
            self.probe_at(n - 1, at)?;
        }
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), String> {
        let m = &mut self.model;
        let r = &mut self.real;
        match *op {
            Op::Convert { offset, len, to } => {
                let want = m.convert(offset, len, to);
                let got = reduce(r.mem.convert(offset, len, to));
                same("convert", got, want)
            }
            Op::FollowerConvert { offset, len } => match &r.follower {
                Some(f) => same(
                    "follower convert",
                    reduce(f.convert(offset, len, Attr::Private)),
                    m.follower_convert(offset, len),
                ),
                None => Ok(()),
            },
            Op::Fallocate { mode, offset, len } => {
                let want = m.fallocate(mode, offset, len);
                let got = reduce(r.mem.fallocate(FallocMode(mode), offset, len));
                same("fallocate", got, want)
            }
            Op::WriteAt { offset, len, seed } => {
                let data = pattern(seed, len.min(1 << 20));
                let want = m.write_at(offset, &data);
                same("write_at", reduce(r.mem.write_at(offset, &data)), want)
            }
            Op::ReadAt {
                offset,
                len,
                follower,
            } => {
                let mut buf = vec![0u8; len.min(1 << 20) as usize];
                let file = match (&r.follower, follower) {
                    (Some(f), true) => f,
                    _ => &r.mem,
                };
                let got = reduce(file.read_at(offset, &mut buf)).map(|()| buf);
                same("read_at", got, m.read_at(offset, len.min(1 << 20)))
            }
            Op::GuestWrite { offset, len, seed } => {
                let data = pattern(seed, len.min(1 << 20));
                let want = m.guest_write(offset, &data);
                same("guest write", reduce(r.guest.write(offset, &data)), want)
            }
            Op::GuestRead { offset, len } => {
                let mut buf = vec![0u8; len.min(1 << 20) as usize];
                let got = reduce(r.guest.read(offset, &mut buf)).map(|()| buf);
                same("guest read", got, m.guest_read(offset, len.min(1 << 20)))
            }
            Op::Pin {
                offset,
                len,
                follower,
            } => {
                let (file, follower) = match (&r.follower, follower) {
                    (Some(f), true) => (f, true),
                    _ => (&r.mem, false),
                };
                let got = reduce(file.pin(offset, len));
                let want = m.pin(offset, len, follower);
                match got {
                    Ok(p) => {
                        r.pins.push(p);
                        same("pin", Ok(()), want)
                    }
                    Err(e) => same("pin", Err(e), want),
                }
            }
            Op::Unpin { index } => {
                if !r.pins.is_empty() {
                    let i = index % r.pins.len();
                    r.pins.remove(i);
                    m.unpin(i);
                }
                Ok(())
            }
            Op::PinWrite {
                index,
                at,
                len,
                seed,
            } => {
                if r.pins.is_empty() {
                    return Ok(());
                }
                let i = index % r.pins.len();
                let at = at % (r.pins[i].len() + 2);
                let data = pattern(seed, len);
                let want = m.pin_write(i, at, &data);
                same("pin write", reduce(r.pins[i].write(at, &data)), want)
            }
            Op::PinRead { index, at, len } => {
                if r.pins.is_empty() {
                    return Ok(());
                }
                let i = index % r.pins.len();
                let at = at % (r.pins[i].len() + 2);
                let mut buf = vec![0u8; len as usize];
                let got = reduce(r.pins[i].read(at, &mut buf)).map(|()| buf);
                same("pin read", got, m.pin_read(i, at, len))
            }
            Op::HostWrite { view, at, value } => {
                let (ptr, off, len) = {
                    let views = self.all_views();
                    let (v, _) = views[view % views.len()];
                    (v.as_ptr(), v.offset(), v.len() as u64)
                };
                let at = at % len;
                // SAFETY: inside the view; the byte lands in guest memory.
                let got = unsafe { probe::write(ptr.wrapping_add(at as usize), value) };
                let want = self.model.host_write(off + at, value);
                compare_touch(
                    got,
                    want,
                    &format!("host write at file offset {:#x}", off + at),
                )
            }
            Op::HostRead { view, at } => {
                let n = self.all_views().len();
                self.probe_at(view % n, at)
            }
            Op::Map { offset, len } => {
                let want = m.map(offset, len);
                match reduce(r.mem.map(offset, len)) {
                    Ok(v) => {
                        if r.views.len() < 5 {
                            r.views.push(v);
                        }
                        same("map", Ok(()), want)
                    }
                    Err(e) => same("map", Err(e), want),
                }
            }
            Op::Unmap { index } => {
                if r.views.len() > 1 {
                    let i = 1 + index % (r.views.len() - 1);
                    r.views.remove(i);
                }
                Ok(())
            }
            Op::SetVeto { page } => {
                m.set_veto(page);
                r.listener
                    .veto
                    .store(page.unwrap_or(u64::MAX), Ordering::Relaxed);
                Ok(())
            }
            Op::InjectPoison { offset } => same(
                "inject_poison",
                reduce(r.mem.inject_poison(offset)),
                m.inject_poison(offset),
            ),
            Op::AttrAt { offset } => same("attr", reduce(r.mem.attr(offset)), m.attr(offset)),
            Op::Runs { offset, len } => same(
                "runs",
                reduce(r.mem.runs(offset, len)).map(attr_runs),
                m.runs(offset, len),
            ),
        }
    }
}

fn compare_touch(got: probe::Touch, want: Touch, what: &str) -> Result<(), String> {
    let ok = match (got, want) {
        (probe::Touch::Ok(a), Touch::Ok(b)) => a == b,
        (got, Touch::Sigbus) => got.is_fault(),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{what}: real {got:?}, model {want:?}"))
    }
}

thread_local! {
    /// Per operation: how often the model expected success and each error class.
    static TALLY: std::cell::RefCell<std::collections::BTreeMap<String, u64>> =
        const { std::cell::RefCell::new(std::collections::BTreeMap::new()) };
}

fn same<T: PartialEq + std::fmt::Debug>(
    what: &str,
    got: Result<T, gmem_reliability::outcome::Fault>,
    want: Result<T, gmem_reliability::outcome::Fault>,
) -> Result<(), String> {
    let key = match &want {
        Ok(_) => format!("{what}: ok"),
        Err(f) if f.reached.is_some() => format!("{what}: {:?} (stopped part way)", f.class),
        Err(f) => format!("{what}: {:?}", f.class),
    };
    TALLY.with(|t| *t.borrow_mut().entry(key).or_default() += 1);
    if got == want {
        return Ok(());
    }
    let show = |r: &Result<T, _>| match r {
        Ok(v) => {
            let s = format!("Ok({v:?})");
            if s.len() > 200 {
                format!("{}...", &s[..200])
            } else {
                s
            }
        }
        Err(e) => format!("Err({e:?})"),
    };
    Err(format!(
        "{what}: real {}, model {}",
        show(&got),
        show(&want)
    ))
}

/// Pages that `SEEK_DATA` reports as data.
fn data_pages(fd: i32, size: u64) -> Result<Vec<bool>, String> {
    let mut out = vec![false; (size / PAGE) as usize];
    let mut at: i64 = 0;
    let end = size as i64;
    while at < end {
        // SAFETY: lseek on a valid descriptor.
        let d = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if d < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(format!("SEEK_DATA: {e}"));
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        if h < 0 {
            return Err(format!("SEEK_HOLE: {}", std::io::Error::last_os_error()));
        }
        for p in (d as u64 / PAGE)..(h as u64).div_ceil(PAGE) {
            out[p as usize] = true;
        }
        at = h;
    }
    Ok(out)
}

fn st_blocks(fd: i32) -> Result<u64, String> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `st` is a writable stat buffer.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return Err(format!("fstat: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fstat filled it.
    Ok(unsafe { st.assume_init() }.st_blocks as u64)
}

/// Runs `ops` from a fresh file; returns the index of the failing step and the reason.
fn execute(cfg: Config, seed: u64, ops: &[Op]) -> Result<(), (usize, String)> {
    let mut run = Run::new(cfg, seed).map_err(|e| (0, e))?;
    run.check_full()
        .map_err(|e| (0, format!("initial state: {e}")))?;
    for (i, op) in ops.iter().enumerate() {
        let res = run.step(op).and_then(|()| {
            run.model.settle();
            if (i + 1) % FULL_EVERY == 0 {
                run.check_full()
            } else {
                run.check_sample()
            }
        });
        res.map_err(|e| (i, e))?;
    }
    run.check_full()
        .map_err(|e| (ops.len(), format!("final state: {e}")))
}

/// Removes chunks of `ops` while the sequence still fails (any divergence counts).
fn shrink(cfg: Config, seed: u64, mut ops: Vec<Op>, budget: Duration) -> (Vec<Op>, String) {
    let start = Instant::now();
    let mut reason = match execute(cfg, seed, &ops) {
        Err((i, r)) => {
            ops.truncate(i + 1);
            r
        }
        Ok(()) => return (ops, "did not fail again".into()),
    };
    let mut chunk = ops.len().div_ceil(2).max(1);
    loop {
        let mut i = 0;
        while i < ops.len() && start.elapsed() < budget {
            let mut shorter = ops.clone();
            shorter.drain(i..(i + chunk).min(ops.len()));
            match execute(cfg, seed, &shorter) {
                Err((at, r)) => {
                    shorter.truncate(at + 1);
                    ops = shorter;
                    reason = r;
                }
                Ok(()) => i += chunk,
            }
        }
        if chunk == 1 || start.elapsed() >= budget {
            return (ops, reason);
        }
        chunk = chunk.div_ceil(2);
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The configurations a CI run cycles through: small files (cheap probes, dense operations),
/// a fragmented file (mostly single-page conversions: hundreds of runs, across several words
/// of the attribute bitmap), files of 2.5 MiB (bulk conversions over whole and partial 2 MiB
/// chunks), and HugeTLB files of two 2 MiB pages (conversions split and merge them).
fn configs() -> Vec<(Config, u64)> {
    let hole_pages = (2u64 << 20) / PAGE;
    let cfg = |pages, init_shared, follower, fine| Config {
        pages,
        init_shared,
        follower,
        fine,
        huge: false,
    };
    let huge = |pages, init_shared, fine| Config {
        huge: true,
        ..cfg(pages, init_shared, false, fine)
    };
    let hp = gmem::HUGE_2M / PAGE;
    vec![
        (cfg(64, true, false, false), 30),
        (cfg(64, false, false, false), 10),
        (cfg(128, true, true, false), 20),
        (cfg(512, true, false, true), 15),
        (cfg(384, false, true, true), 10),
        (
            cfg(2 * hole_pages + hole_pages / 2 + 3, true, false, false),
            10,
        ),
        (cfg(2 * hole_pages + 5, false, true, false), 5),
        (huge(2 * hp, true, false), 10),
        (huge(2 * hp, false, true), 8),
    ]
}

#[test]
fn model_based_random_operations() {
    let total = env_u64("GMEM_MODEL_OPS", 100_000);
    let base = env_u64("GMEM_MODEL_SEED", 0x6d65_6d67);
    let per_run = 2_000u64;
    // HugeTLB configurations need 2 huge pages of the pool; grow it for the run.
    let pool = gmem::PoolGuard::grow(gmem::HUGE_2M, 2);
    let plan: Vec<(Config, u64)> = match &pool {
        Ok(_) => configs(),
        Err(e) => {
            eprintln!("skipped: HugeTLB configurations (cannot reserve 2 huge pages: {e})");
            configs().into_iter().filter(|(c, _)| !c.huge).collect()
        }
    };
    let weight: u64 = plan.iter().map(|(_, w)| w).sum();
    let mut done = 0u64;
    let mut run_no = 0u64;
    let mut used = vec![0u64; plan.len()];
    let t0 = Instant::now();
    while done < total {
        // Pick configurations in proportion to their weights, spread over the runs.
        let mut pick = Rng::new(base ^ run_no).next_u64() % weight;
        let which = plan
            .iter()
            .position(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .unwrap_or(0);
        let cfg = plan[which].0;
        used[which] += 1;
        let seed = base.wrapping_add(run_no.wrapping_mul(0x9e37_79b9));
        let n = per_run.min(total - done);
        let mut generator = Generator::new(seed, cfg.pages * PAGE, cfg.follower);
        if cfg.fine {
            generator = generator.fine();
        }
        if cfg.huge {
            generator = generator.block(gmem::HUGE_2M);
        }
        let ops: Vec<Op> = (0..n).map(|_| generator.op()).collect();
        if let Err((i, reason)) = execute(cfg, seed, &ops) {
            eprintln!("divergence at step {i} (seed {seed:#x}, {cfg:?}): {reason}\nshrinking...");
            let (min, why) = shrink(cfg, seed, ops, Duration::from_secs(90));
            panic!(
                "model divergence: {why}\nconfig {cfg:?}, seed {seed:#x}\nminimal sequence ({} ops):\n{min:#?}",
                min.len()
            );
        }
        done += n;
        run_no += 1;
    }
    eprintln!(
        "{done} operations in {run_no} runs, {:.1} s, zero divergences",
        t0.elapsed().as_secs_f64()
    );
    for ((cfg, _), n) in plan.iter().zip(&used) {
        eprintln!("  {n} runs of {cfg:?}");
    }
    TALLY.with(|t| {
        for (k, n) in t.borrow().iter() {
            eprintln!("  {k}: {n}");
        }
    });
}
