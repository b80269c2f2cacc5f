//! Real child processes for cross-process cases.
//!
//! A case that needs a second process re-executes the test binary
//! ([`std::env::current_exe`]) with `--exact <test name> --nocapture`, so the child runs the
//! very same test function. The environment tells that function it is the child:
//! [`ROLE_ENV`] names the role, [`PEER_FD_ENV`] the descriptor of the gmem peer socket (from
//! [`gmem::GuestMemfd::share_with_process`]) and [`CTL_FD_ENV`] a control socket on which
//! parent and child exchange one-line messages. Both descriptors are inherited: their
//! `FD_CLOEXEC` flag is cleared in the child between `fork` and `exec`, so no other process
//! the test binary starts meanwhile inherits them.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Environment variable naming the child's role.
pub const ROLE_ENV: &str = "GMEM_CONFORMANCE_ROLE";
/// Environment variable holding the inherited gmem peer socket's descriptor number.
pub const PEER_FD_ENV: &str = "GMEM_CONFORMANCE_PEER_FD";
/// Environment variable holding the inherited control socket's descriptor number.
pub const CTL_FD_ENV: &str = "GMEM_CONFORMANCE_CTL_FD";

/// How long either side waits for the other's next line before failing.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// One end of the line-based control channel.
#[derive(Debug)]
pub struct Channel {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Channel {
    fn new(stream: UnixStream) -> Self {
        stream
            .set_read_timeout(Some(LINE_TIMEOUT))
            .expect("set control socket timeout");
        let writer = stream.try_clone().expect("clone control socket");
        Channel {
            reader: BufReader::new(stream),
            writer,
        }
    }

    /// Sends one line.
    #[track_caller]
    pub fn send(&mut self, line: &str) {
        assert!(!line.contains('\n'), "control lines are single lines");
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to control socket");
    }

    /// Receives one line (without its newline); panics on timeout or end of stream.
    #[track_caller]
    pub fn recv(&mut self) -> String {
        self.try_recv().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Receives one line (without its newline), or says why none came.
    pub fn try_recv(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("control socket closed by the other process".to_string()),
            Ok(_) => Ok(line.trim_end_matches('\n').to_string()),
            Err(e) => Err(format!("reading the control socket: {e}")),
        }
    }
}

/// A child process running one role of a test, killed and reaped if dropped early.
#[derive(Debug)]
pub struct ChildProcess {
    child: Option<Child>,
    ctl: Channel,
}

/// Clears `FD_CLOEXEC` on `fd`. Runs in the child between `fork` and `exec`.
fn inherit(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor number is async-signal-safe and touches no memory.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl ChildProcess {
    /// Starts the test binary running only `test` in role `role`, handing it `peer` (the gmem
    /// peer socket) and a fresh control channel.
    pub fn spawn(test: &str, role: &str, peer: OwnedFd) -> ChildProcess {
        let (mine, theirs) = UnixStream::pair().expect("control socketpair");
        let exe = std::env::current_exe().expect("current_exe");
        let (peer_fd, ctl_fd) = (peer.as_raw_fd(), theirs.as_raw_fd());
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(ROLE_ENV, role)
            .env(PEER_FD_ENV, peer_fd.to_string())
            .env(CTL_FD_ENV, ctl_fd.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the hook only calls fcntl, which is async-signal-safe, on two descriptors
        // that stay open in the parent until `spawn` returns.
        unsafe {
            cmd.pre_exec(move || {
                inherit(peer_fd)?;
                inherit(ctl_fd)
            })
        };
        let child = cmd.spawn().expect("spawn child test process");
        // The parent's copies of the child's ends close here: only the child holds them now,
        // so its death is seen as end of stream.
        drop(peer);
        drop(theirs);
        ChildProcess {
            child: Some(child),
            ctl: Channel::new(mine),
        }
    }

    /// Sends one line to the child.
    #[track_caller]
    pub fn send(&mut self, line: &str) {
        self.ctl.send(line);
    }

    /// Receives one line from the child. If none comes (the child failed, exited or hung),
    /// stops the child and panics with its output.
    #[track_caller]
    pub fn recv(&mut self) -> String {
        match self.ctl.try_recv() {
            Ok(line) => line,
            Err(e) => {
                let output = self.stop();
                panic!("no answer from the child: {e}\n{output}")
            }
        }
    }

    /// Kills the child if it still runs, reaps it and returns its status and output.
    fn stop(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return "(child already reaped)".to_string();
        };
        let _ = child.kill();
        match child.wait_with_output() {
            Ok(out) => describe(&out),
            Err(e) => format!("(waiting for the child failed: {e})"),
        }
    }

    /// Waits for the child to exit and asserts that it succeeded; returns its output.
    #[track_caller]
    pub fn finish(mut self) -> String {
        let child = self.child.take().expect("child already reaped");
        let out = child.wait_with_output().expect("wait for child");
        let text = describe(&out);
        assert!(out.status.success(), "child failed: {text}");
        text
    }
}

fn describe(out: &std::process::Output) -> String {
    format!(
        "child {}\n--- child stdout ---\n{}\n--- child stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The case failed before the child finished: stop it so it does not linger.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The child's side: its role and the two inherited descriptors.
#[derive(Debug)]
pub struct ChildSide {
    /// The role named by the parent.
    pub role: String,
    /// The gmem peer socket, to pass to [`gmem::GuestMemfd::attach`].
    pub peer: OwnedFd,
    /// The child's end of the control channel.
    pub ctl: Channel,
}

fn inherited(var: &str) -> OwnedFd {
    let raw: RawFd = std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} is not set"))
        .parse()
        .unwrap_or_else(|_| panic!("{var} is not a descriptor number"));
    // SAFETY: fcntl(F_GETFD) on any number is harmless; it checks the descriptor is open.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    assert!(flags >= 0, "{var}={raw} is not an open descriptor");
    // SAFETY: the parent passed this descriptor to this process for this role alone, and
    // this function is the only place that adopts it (once per process, see `child_side`).
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// In a child started by [`ChildProcess::spawn`]: the role and descriptors it was given.
/// `None` in an ordinary test run. Each process adopts the descriptors at most once.
pub fn child_side() -> Option<ChildSide> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let role = std::env::var(ROLE_ENV).ok()?;
    assert!(
        !TAKEN.swap(true, Ordering::SeqCst),
        "the child's descriptors were already adopted"
    );
    let peer = inherited(PEER_FD_ENV);
    let ctl = Channel::new(UnixStream::from(inherited(CTL_FD_ENV)));
    Some(ChildSide { role, peer, ctl })
}
