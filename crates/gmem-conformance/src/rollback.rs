//! Rollback harness: participants and listeners that record every call and refuse on cue, a
//! mirror of what a participant believes, and snapshots of everything a failed change must
//! leave as it was.
//!
//! gmem's engine applies every step of a change (revoke, restore, split, merge, poison,
//! unpoison, refresh) to its own views and then to every [`Participant`] in registration order;
//! when one refuses, those that applied the step undo it in reverse order, earlier steps are
//! undone in reverse, and the engine undoes its own part. The helpers here let a test check
//! that from the outside:
//!
//! - [`Scripted`]: a participant that records each call in a shared [`Journal`] and refuses
//!   (with a chosen errno, naming the last page of the step: [`refusal_offset`]) a kind of step
//!   or the Nth call, as its [`Script`] says;
//! - [`Recorder`]: a conversion listener that records what it hears and may veto;
//! - [`Mirror`]: the state a participant believes in after replaying its calls, to compare
//!   with the file's;
//! - [`Snapshot`]: attributes, poison, and per page the guest's bytes, the checked accessor's
//!   answer and a real touch through every host view (each checked against the attributes
//!   on the spot: a private or poisoned page must fault as [`gmem::HostView::fault_at`] says,
//!   a shared one must read the guest's byte);
//! - [`Counters`]: a HugeTLB file's restructuring counters.
//!
//! The cases for base-page backings are in [`cases`], instantiated per backing with
//! [`crate::rollback_suite!`].

pub mod cases;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use gmem::{
    Accounting, Attr, AttrRun, ByteRange, Conversion, ConversionListener, Errno, GuestMemfd,
    HostView, Participant, Step, StepError, Veto, PAGE_SIZE,
};

use crate::probe::{self, Touch};

/// The base page.
pub const PAGE: u64 = PAGE_SIZE;

/// The byte range of pages `[first, end)`.
pub fn pages(first: u64, end: u64) -> ByteRange {
    ByteRange {
        start: first * PAGE,
        end: end * PAGE,
    }
}

/// The kinds of [`Step`], to script refusals by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// [`Step::Revoke`].
    Revoke,
    /// [`Step::Restore`].
    Restore,
    /// [`Step::Freeze`].
    Freeze,
    /// [`Step::Thaw`].
    Thaw,
    /// [`Step::Split`].
    Split,
    /// [`Step::Merge`].
    Merge,
    /// [`Step::Poison`].
    Poison,
    /// [`Step::Unpoison`].
    Unpoison,
    /// [`Step::Refresh`].
    Refresh,
}

impl Kind {
    /// The kind of `step`.
    pub fn of(step: &Step) -> Kind {
        match step {
            Step::Revoke(_) => Kind::Revoke,
            Step::Restore(_) => Kind::Restore,
            Step::Freeze(_) => Kind::Freeze,
            Step::Thaw(_) => Kind::Thaw,
            Step::Split(_) => Kind::Split,
            Step::Merge(_) => Kind::Merge,
            Step::Poison(_) => Kind::Poison,
            Step::Unpoison(_) => Kind::Unpoison,
            Step::Refresh(_) => Kind::Refresh,
        }
    }

    /// True for the kinds a conversion's transaction rolls back when refused; the others are
    /// notifications (poison, punch-hole) that cannot be refused, or a merge, which is retried
    /// later.
    pub fn is_transactional(self) -> bool {
        matches!(self, Kind::Revoke | Kind::Restore | Kind::Split)
    }
}

/// One call a participant received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `apply(step)`, accepted.
    Apply(Step),
    /// `apply(step)`, refused.
    Refused(Step),
    /// `undo(step)`.
    Undo(Step),
}

/// Every call to every scripted participant of a test, in the order they happened, with the
/// participant's name.
#[derive(Debug, Clone, Default)]
pub struct Journal(Arc<Mutex<Vec<(String, Call)>>>);

impl Journal {
    /// An empty journal.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&self, who: &str, call: Call) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((who.to_string(), call));
    }

    /// Every call so far, in order.
    pub fn all(&self) -> Vec<(String, Call)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The calls participant `who` received, in order.
    pub fn of(&self, who: &str) -> Vec<Call> {
        self.all()
            .into_iter()
            .filter(|(w, _)| w == who)
            .map(|(_, c)| c)
            .collect()
    }

    /// Forgets every call so far.
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// When a [`Scripted`] participant refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refuse {
    /// Never.
    Never,
    /// Every `apply` of this kind of step.
    Kind(Kind),
    /// The `apply` call with this index (0-based, counted from the participant's creation or
    /// the last [`Script::set`]), and no other.
    Call(usize),
}

/// The refusal offset a [`Scripted`] participant names: the last page of the step, so that a
/// test tells it apart from the start of the conversion.
pub fn refusal_offset(step: &Step) -> u64 {
    step.range().end - PAGE
}

/// The handle a test keeps on a [`Scripted`] participant.
#[derive(Debug, Clone)]
pub struct Script {
    refuse: Arc<Mutex<(Refuse, i32)>>,
    calls: Arc<AtomicUsize>,
}

impl Script {
    /// Refuses per `refuse` with `errno` from now on, counting calls from zero again.
    pub fn set(&self, refuse: Refuse, errno: i32) {
        *self.refuse.lock().unwrap_or_else(|e| e.into_inner()) = (refuse, errno);
        self.calls.store(0, Ordering::SeqCst);
    }

    /// `apply` calls since creation or the last [`Script::set`].
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// A participant that records every call in a [`Journal`] and refuses as its [`Script`] says.
#[derive(Debug)]
pub struct Scripted {
    name: String,
    journal: Journal,
    script: Script,
}

impl Scripted {
    /// A participant named `name` writing to `journal`, refusing per `refuse` with `errno`;
    /// returns it with the handle to change its script.
    pub fn new(name: &str, journal: &Journal, refuse: Refuse, errno: i32) -> (Self, Script) {
        let script = Script {
            refuse: Arc::new(Mutex::new((refuse, errno))),
            calls: Arc::new(AtomicUsize::new(0)),
        };
        (
            Scripted {
                name: name.to_string(),
                journal: journal.clone(),
                script: script.clone(),
            },
            script,
        )
    }

    /// Adds a participant named `name` to `mem` and returns its script.
    pub fn add(
        mem: &GuestMemfd,
        name: &str,
        journal: &Journal,
        refuse: Refuse,
        errno: i32,
    ) -> Script {
        let (p, s) = Scripted::new(name, journal, refuse, errno);
        mem.add_participant(Box::new(p));
        s
    }
}

impl Participant for Scripted {
    fn name(&self) -> &str {
        &self.name
    }

    fn apply(&mut self, step: &Step) -> Result<(), StepError> {
        let n = self.script.calls.fetch_add(1, Ordering::SeqCst);
        let (refuse, errno) = *self.script.refuse.lock().unwrap_or_else(|e| e.into_inner());
        let refused = match refuse {
            Refuse::Never => false,
            Refuse::Kind(k) => Kind::of(step) == k,
            Refuse::Call(i) => i == n,
        };
        if refused {
            self.journal.push(&self.name, Call::Refused(*step));
            return Err(StepError {
                errno,
                offset: refusal_offset(step),
            });
        }
        self.journal.push(&self.name, Call::Apply(*step));
        Ok(())
    }

    fn undo(&mut self, step: &Step) {
        self.journal.push(&self.name, Call::Undo(*step));
    }
}

/// What a conversion listener heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// `prepare`.
    Prepare(Conversion),
    /// `commit`.
    Commit(Conversion),
    /// `abort`.
    Abort(Conversion),
}

/// A listener that records what it hears (shared log, with its name) and may veto.
#[derive(Debug)]
pub struct Recorder {
    name: String,
    log: Arc<Mutex<Vec<(String, Heard)>>>,
    veto: Mutex<Option<Veto>>,
}

/// What every [`Recorder`] of a test heard, in order.
pub type Hearing = Arc<Mutex<Vec<(String, Heard)>>>;

impl Recorder {
    /// Adds a listener named `name` to `mem`, logging to `log`; it vetoes once given a veto
    /// ([`Recorder::veto`]).
    pub fn add(mem: &GuestMemfd, name: &str, log: &Hearing) -> Arc<Recorder> {
        let r = Arc::new(Recorder {
            name: name.to_string(),
            log: log.clone(),
            veto: Mutex::new(None),
        });
        mem.add_listener(r.clone());
        r
    }

    /// Vetoes every conversion with `veto` from now on (`None`: accepts again).
    pub fn veto(&self, veto: Option<Veto>) {
        *self.veto.lock().unwrap_or_else(|e| e.into_inner()) = veto;
    }

    fn push(&self, h: Heard) {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((self.name.clone(), h));
    }
}

impl ConversionListener for Recorder {
    fn prepare(&self, conv: &Conversion) -> Result<(), Veto> {
        self.push(Heard::Prepare(*conv));
        match &*self.veto.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(v) => Err(v.clone()),
            None => Ok(()),
        }
    }

    fn commit(&self, conv: &Conversion) {
        self.push(Heard::Commit(*conv));
    }

    fn abort(&self, conv: &Conversion) {
        self.push(Heard::Abort(*conv));
    }
}

/// Everything heard so far, then forgotten.
pub fn take(log: &Hearing) -> Vec<(String, Heard)> {
    std::mem::take(&mut *log.lock().unwrap_or_else(|e| e.into_inner()))
}

/// What a participant believes about a file: its private pages, split huge pages (by first
/// byte) and poisoned pages.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mirror {
    /// Private base pages (indices).
    pub private: BTreeSet<u64>,
    /// Split huge pages (file offset of their first byte).
    pub split: BTreeSet<u64>,
    /// Poisoned base pages (indices).
    pub poisoned: BTreeSet<u64>,
}

fn page_set(r: ByteRange) -> impl Iterator<Item = u64> {
    r.start / PAGE..r.end / PAGE
}

impl Mirror {
    /// The file's attributes and poison now, with `split` (first bytes of split huge pages:
    /// the public API does not list them, the test knows them).
    pub fn of_file(mem: &GuestMemfd, split: &[u64]) -> Mirror {
        let private = mem
            .runs(0, mem.size())
            .expect("runs")
            .into_iter()
            .filter(|r| r.attr == Attr::Private)
            .flat_map(|r| r.offset / PAGE..(r.offset + r.len) / PAGE)
            .collect();
        Mirror {
            private,
            split: split.iter().copied().collect(),
            poisoned: mem
                .poisoned_pages()
                .expect("poisoned pages")
                .into_iter()
                .map(|o| o / PAGE)
                .collect(),
        }
    }

    fn step(&mut self, step: &Step, forward: bool) {
        let r = step.range();
        match (*step, forward) {
            (Step::Revoke(_), true) | (Step::Restore(_), false) => self.private.extend(page_set(r)),
            (Step::Restore(_), true) | (Step::Revoke(_), false) => {
                page_set(r).for_each(|p| {
                    self.private.remove(&p);
                });
            }
            (Step::Split(_), true) | (Step::Merge(_), false) => {
                self.split.insert(r.start);
            }
            (Step::Merge(_), true) | (Step::Split(_), false) => {
                self.split.remove(&r.start);
            }
            (Step::Poison(_), true) | (Step::Unpoison(_), false) => {
                self.poisoned.extend(page_set(r))
            }
            (Step::Unpoison(_), true) | (Step::Poison(_), false) => {
                page_set(r).for_each(|p| {
                    self.poisoned.remove(&p);
                });
            }
            // Writers held or let go: no state a participant keeps.
            (Step::Refresh(_) | Step::Freeze(_) | Step::Thaw(_), _) => {}
        }
    }

    /// This state after the participant received `calls` (refused calls change nothing).
    pub fn replay(&self, calls: &[Call]) -> Mirror {
        let mut m = self.clone();
        for c in calls {
            match c {
                Call::Apply(s) => m.step(s, true),
                Call::Undo(s) => m.step(s, false),
                Call::Refused(_) => {}
            }
        }
        m
    }
}

/// FNV-1a of `bytes`: a page's contents in a snapshot.
pub fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One page as every path sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSnap {
    /// Page index.
    pub page: u64,
    /// Digest of the page through the guest view, or the errno.
    pub guest: Result<u64, i32>,
    /// Digest of the page through `read_at`, or the errno.
    pub host: Result<u64, i32>,
    /// A read of the page's first and last byte through every host view that shows it.
    pub touches: Vec<(Touch, Touch)>,
}

/// Everything a failed change must leave as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Attribute runs of the whole file.
    pub runs: Vec<AttrRun>,
    /// Poisoned pages (byte offsets).
    pub poisoned: Vec<u64>,
    /// The pages looked at.
    pub pages: Vec<PageSnap>,
}

/// A byte pattern that differs per page and per byte, never zero on the first byte.
pub fn pattern(page: u64) -> Vec<u8> {
    let mut v: Vec<u8> = (0..PAGE)
        .map(|i| ((page.wrapping_mul(131) ^ i.wrapping_mul(7)) % 251) as u8 | 1)
        .collect();
    v[0] = u8::try_from(page % 200).unwrap_or(0) + 1;
    v
}

/// Writes [`pattern`] into every page of `list` through the guest view.
pub fn fill(mem: &GuestMemfd, list: &[u64]) {
    let guest = mem.guest().expect("guest view");
    for &p in list {
        guest.write(p * PAGE, &pattern(p)).expect("guest write");
    }
}

/// Reads a byte of `view` at `at` with the probe.
fn touch(view: &HostView, at: u64) -> Touch {
    let at = usize::try_from(at).expect("offset fits usize");
    assert!(at < view.len());
    // SAFETY: `at` lies inside the live view; the probe reports a fault instead of dying.
    unsafe { probe::read(view.as_ptr().wrapping_add(at)) }
}

/// Takes a snapshot of `list` (page indices) in `mem`, touching every view of `views` that
/// shows each page. Panics when a touch contradicts the attributes: a private or poisoned
/// page that does not fault as documented, or a shared one that does not read the guest's
/// byte.
#[track_caller]
pub fn snapshot(mem: &GuestMemfd, views: &[&HostView], list: &[u64]) -> Snapshot {
    let guest = mem.guest().expect("guest view");
    let mut buf = vec![0u8; usize::try_from(PAGE).expect("page")];
    let mut out = Vec::with_capacity(list.len());
    for &p in list {
        let off = p * PAGE;
        let g = guest.read(off, &mut buf).map(|()| digest(&buf));
        let first_last = (buf[0], buf[buf.len() - 1]);
        let g = g.map_err(|e| e.errno());
        let h = mem
            .read_at(off, &mut buf)
            .map(|()| digest(&buf))
            .map_err(|e| e.errno());
        let blocked = mem.attr(off).expect("attr") == Attr::Private
            || mem.is_poisoned(off).expect("poison record");
        let mut touches = Vec::new();
        for v in views {
            if off < v.offset() || off >= v.offset() + v.len() as u64 {
                continue;
            }
            let at = off - v.offset();
            let t = (touch(v, at), touch(v, at + PAGE - 1));
            for (t, at) in [(t.0, at), (t.1, at + PAGE - 1)] {
                if blocked {
                    assert!(
                        crate::touch::faults_as_documented(v, at, t),
                        "page {p}: blocked (private or poisoned) but a touch at view offset \
                         {at:#x} gave {t:?}, expected {:?}",
                        v.fault_at(usize::try_from(at).expect("usize"))
                    );
                }
            }
            if !blocked {
                assert_eq!(
                    t,
                    (Touch::Ok(first_last.0), Touch::Ok(first_last.1)),
                    "page {p}: shared but a view does not read the guest's bytes"
                );
            }
            touches.push(t);
        }
        if !blocked {
            assert_eq!(h, g, "page {p}: read_at and the guest view disagree");
        }
        out.push(PageSnap {
            page: p,
            guest: g,
            host: h,
            touches,
        });
    }
    Snapshot {
        runs: mem.runs(0, mem.size()).expect("runs"),
        poisoned: mem.poisoned_pages().expect("poisoned pages"),
        pages: out,
    }
}

/// A HugeTLB file's restructuring counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// [`Accounting::split_pages`].
    pub split_pages: u64,
    /// [`Accounting::waiting_to_merge`].
    pub waiting: u64,
    /// [`Accounting::piece_bytes`].
    pub piece_bytes: u64,
    /// [`Accounting::cached_piece_bytes`].
    pub cached: u64,
    /// [`Accounting::splits`].
    pub splits: u64,
    /// [`Accounting::merges`].
    pub merges: u64,
    /// [`Accounting::refused_splits`].
    pub refused: u64,
}

impl Counters {
    /// The counters now.
    pub fn of(a: &Accounting) -> Counters {
        Counters {
            split_pages: a.split_pages(),
            waiting: a.waiting_to_merge(),
            piece_bytes: a.piece_bytes(),
            cached: a.cached_piece_bytes(),
            splits: a.splits(),
            merges: a.merges(),
            refused: a.refused_splits(),
        }
    }
}

/// Shorthand for a journal entry.
pub fn at(who: &str, call: Call) -> (String, Call) {
    (who.to_string(), call)
}

/// The rig's listeners, in the order they were added (and hear every notice).
pub const LISTENERS: [&str; 3] = ["L1", "L2", "L3"];

/// What the listeners hear of a conversion `c` that none vetoes: each prepares, then each
/// hears `end` (`Heard::Commit` or `Heard::Abort`).
pub fn heard(c: Conversion, end: fn(Conversion) -> Heard) -> Vec<(String, Heard)> {
    let mut v: Vec<(String, Heard)> = LISTENERS
        .iter()
        .map(|l| (l.to_string(), Heard::Prepare(c)))
        .collect();
    v.extend(LISTENERS.iter().map(|l| (l.to_string(), end(c))));
    v
}

/// Every participant believes what the file says now (`split`: the huge pages split now), and
/// every undo in the journal came in reverse order.
#[track_caller]
pub fn beliefs_agree(rig: &Rig, from: &Mirror, split: &[u64]) {
    expect_undo_in_reverse(&rig.journal.all());
    let now = rig.mirror(split);
    for who in PARTICIPANTS {
        assert_eq!(rig.believed(from, who), now, "participant {who}");
    }
}

/// Asserts that `err` is the error a conversion gives when a participant refused `step` with
/// `errno`: `Busy` for `EAGAIN`, `Peer` otherwise, naming [`refusal_offset`].
#[track_caller]
pub fn expect_refusal(err: &gmem::ConvertError, step: &Step, errno: i32) {
    let offset = refusal_offset(step);
    match (err, errno) {
        (gmem::ConvertError::Busy { offset: o }, libc::EAGAIN) if *o == offset => {}
        (
            gmem::ConvertError::Peer {
                offset: o,
                errno: e,
            },
            _,
        ) if *o == offset && *e == errno => {}
        _ => panic!(
            "expected the refusal of {step:?} with errno {errno} at {offset:#x}, got {err:?}"
        ),
    }
    assert_eq!(err.errno(), errno, "errno of {err:?}");
    assert_eq!(err.error_offset(), Some(offset), "error offset of {err:?}");
}

/// Checks that every undo in `journal` undoes the most recent step applied (by the same
/// participant) and not yet undone: undos come in exactly the reverse order of the applies.
#[track_caller]
pub fn expect_undo_in_reverse(journal: &[(String, Call)]) {
    let mut stack: Vec<(&str, Step)> = Vec::new();
    for (i, (who, call)) in journal.iter().enumerate() {
        match call {
            Call::Apply(s) => stack.push((who, *s)),
            Call::Undo(s) => {
                let top = stack.pop();
                assert_eq!(
                    top,
                    Some((who.as_str(), *s)),
                    "call {i}: {who} undid {s:?}, but the last step applied and not undone \
                     was {top:?}; journal {journal:#?}"
                );
            }
            Call::Refused(_) => {}
        }
    }
}

/// Names of the three participants of a [`Rig`], in registration order.
pub const PARTICIPANTS: [&str; 3] = ["a", "b", "c"];

/// A file set up for a rollback case: its host views, three scripted participants (`a` and
/// `c` accept everything, `b` refuses as its script says), three recording listeners (`L1`,
/// `L2`, `L3`; `L2` is the one tests make veto), the pages snapshots look at and the huge pages
/// known to be split.
#[derive(Debug)]
pub struct Rig {
    /// The file.
    pub mem: GuestMemfd,
    /// Its host views.
    pub views: Vec<HostView>,
    /// Every call to `a`, `b` and `c`.
    pub journal: Journal,
    /// `b`'s script.
    pub b: Script,
    /// What the listeners heard.
    pub hearing: Hearing,
    /// The listener tests make veto.
    pub l2: Arc<Recorder>,
    /// Pages snapshots look at.
    pub list: Vec<u64>,
    /// First bytes of the huge pages split when the rig was made.
    pub split: Vec<u64>,
}

impl Rig {
    /// Adds the participants and listeners to `mem` (already set up) and returns the rig.
    pub fn new(mem: GuestMemfd, views: Vec<HostView>, list: Vec<u64>, split: Vec<u64>) -> Rig {
        let journal = Journal::new();
        let hearing = Hearing::default();
        let [l1, l2, l3] = LISTENERS;
        Recorder::add(&mem, l1, &hearing);
        let l2 = Recorder::add(&mem, l2, &hearing);
        Recorder::add(&mem, l3, &hearing);
        Scripted::add(&mem, "a", &journal, Refuse::Never, 0);
        let b = Scripted::add(&mem, "b", &journal, Refuse::Never, 0);
        Scripted::add(&mem, "c", &journal, Refuse::Never, 0);
        Rig {
            mem,
            views,
            journal,
            b,
            hearing,
            l2,
            list,
            split,
        }
    }

    /// A snapshot of the rig's pages through every view.
    #[track_caller]
    pub fn snapshot(&self) -> Snapshot {
        let views: Vec<&HostView> = self.views.iter().collect();
        snapshot(&self.mem, &views, &self.list)
    }

    /// The file's state as a participant should believe it, with `split`.
    pub fn mirror(&self, split: &[u64]) -> Mirror {
        Mirror::of_file(&self.mem, split)
    }

    /// What participant `who` believes after replaying its calls from `from`.
    pub fn believed(&self, from: &Mirror, who: &str) -> Mirror {
        from.replay(&self.journal.of(who))
    }

    /// What the listeners heard since last asked.
    pub fn heard(&self) -> Vec<(String, Heard)> {
        take(&self.hearing)
    }
}

/// A change a sweep makes.
pub type Op<'a> = &'a dyn Fn(&GuestMemfd) -> Result<(), gmem::ConvertError>;

/// Every call refused in turn: runs `op` once on a rig from `make` with nobody refusing
/// (recording the steps `b` receives), then once per step on a fresh rig with `b` refusing
/// exactly that call with `errno`, and checks:
///
/// - a refused revoke, restore or split (or the freeze before a split) fails the change with the refusal's errno and offset
///   ([`expect_refusal`]), leaves the snapshot, the listeners' outcome (abort) and every
///   participant's belief exactly as before, with every undo in reverse order; the same change
///   then succeeds once `b` accepts again;
/// - a refused refresh, poison or unpoison (notifications that cannot be refused) or merge
///   (or the freeze before it; retried later) does not fail the change; after [`GuestMemfd::merge_pending`] (for a
///   merge) the file is as after the reference run, and `a` and `c` believe what they did
///   there.
///
/// Returns the number of calls swept. `after_split` lists the huge pages split after the
/// reference run (to compare beliefs).
#[track_caller]
pub fn sweep(make: &dyn Fn() -> Rig, op: Op<'_>, errno: i32) -> usize {
    let rig = make();
    let split0 = rig.split.clone();
    let m0 = rig.mirror(&split0);
    let before = rig.snapshot();
    op(&rig.mem).expect("the reference run succeeds");
    let steps: Vec<Step> = rig
        .journal
        .of("b")
        .into_iter()
        .map(|c| match c {
            Call::Apply(s) => s,
            other => panic!("reference run: b got {other:?}"),
        })
        .collect();
    let success = rig.snapshot();
    let m1 = rig.believed(&m0, "a");
    for who in PARTICIPANTS {
        assert_eq!(rig.journal.of(who), rig.journal.of("a").to_vec(), "{who}");
    }
    assert!(!steps.is_empty(), "the change reached no participant");
    drop(rig);
    for (n, step) in steps.iter().enumerate() {
        let rig = make();
        assert_eq!(
            rig.snapshot(),
            before,
            "call {n}: the rig is not deterministic"
        );
        rig.b.set(Refuse::Call(n), errno);
        let res = op(&rig.mem);
        assert_eq!(
            rig.journal.of("b").get(n),
            Some(&Call::Refused(*step)),
            "call {n}: b's calls {:#?}",
            rig.journal.of("b")
        );
        let journal = rig.journal.all();
        expect_undo_in_reverse(&journal);
        // A refused freeze is a refusal of the split or merge it announces.
        let kind = match Kind::of(step) {
            Kind::Freeze => steps.get(n + 1).map_or(Kind::Freeze, Kind::of),
            k => k,
        };
        if kind.is_transactional() {
            let err = match res {
                Err(e) => e,
                Ok(()) => panic!("call {n}: refusing {step:?} did not fail the change"),
            };
            expect_refusal(&err, step, errno);
            assert_eq!(rig.snapshot(), before, "call {n} ({step:?}) refused");
            for who in PARTICIPANTS {
                assert_eq!(rig.believed(&m0, who), m0, "call {n} ({step:?}): {who}");
            }
            rig.journal.clear();
            rig.b.set(Refuse::Never, 0);
            op(&rig.mem).unwrap_or_else(|e| panic!("call {n}: the retry failed: {e}"));
            assert_eq!(rig.snapshot(), success, "call {n}: after the retry");
        } else {
            if let Err(e) = res {
                panic!("call {n}: refusing {step:?} failed the change: {e}");
            }
            if kind == Kind::Merge {
                assert_eq!(
                    rig.mem.merge_pending().expect("merge_pending"),
                    1,
                    "call {n}"
                );
            }
            assert_eq!(rig.snapshot(), success, "call {n} ({step:?}) refused");
            for who in ["a", "c"] {
                assert_eq!(rig.believed(&m0, who), m1, "call {n} ({step:?}): {who}");
            }
        }
    }
    steps.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undo_order_check_catches_a_wrong_order() {
        let r1 = Step::Revoke(pages(0, 1));
        let r2 = Step::Revoke(pages(1, 2));
        expect_undo_in_reverse(&[
            at("a", Call::Apply(r1)),
            at("b", Call::Apply(r1)),
            at("a", Call::Apply(r2)),
            at("b", Call::Refused(r2)),
            at("a", Call::Undo(r2)),
            at("b", Call::Undo(r1)),
            at("a", Call::Undo(r1)),
        ]);
        for wrong in [
            vec![
                at("a", Call::Apply(r1)),
                at("a", Call::Apply(r2)),
                at("a", Call::Undo(r1)),
            ],
            vec![
                at("a", Call::Apply(r1)),
                at("b", Call::Apply(r1)),
                at("a", Call::Undo(r1)),
            ],
            vec![at("a", Call::Undo(r1))],
        ] {
            let caught = std::panic::catch_unwind(|| expect_undo_in_reverse(&wrong));
            assert!(caught.is_err(), "not caught: {wrong:?}");
        }
    }

    #[test]
    fn mirror_replays_applies_and_undos() {
        let m0 = Mirror::default();
        let m = m0.replay(&[
            Call::Apply(Step::Revoke(pages(0, 2))),
            Call::Apply(Step::Split(pages(0, 512))),
            Call::Refused(Step::Poison(pages(3, 4))),
            Call::Apply(Step::Poison(pages(4, 5))),
            Call::Apply(Step::Refresh(pages(0, 8))),
        ]);
        assert_eq!(m.private, BTreeSet::from([0, 1]));
        assert_eq!(m.split, BTreeSet::from([0]));
        assert_eq!(m.poisoned, BTreeSet::from([4]));
        let back = m.replay(&[
            Call::Undo(Step::Poison(pages(4, 5))),
            Call::Undo(Step::Split(pages(0, 512))),
            Call::Undo(Step::Revoke(pages(0, 2))),
        ]);
        assert_eq!(back, m0);
        let merged = m.replay(&[
            Call::Apply(Step::Merge(pages(0, 512))),
            Call::Apply(Step::Restore(pages(1, 2))),
            Call::Apply(Step::Unpoison(pages(0, 8))),
        ]);
        assert_eq!(merged.private, BTreeSet::from([0]));
        assert!(merged.split.is_empty() && merged.poisoned.is_empty());
    }
}
