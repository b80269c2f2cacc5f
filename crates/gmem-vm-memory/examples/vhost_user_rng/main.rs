//! A gmem-aware vhost-user virtio-rng backend process.
//!
//! `vhost_user_rng --socket PATH --peer-fd N [--peer-fd M ...]`: attaches to each gmem file
//! whose peer socket (`GuestMemfd::share_with_process`) it inherited as descriptor N, listens
//! on PATH, and serves one vhost-user frontend from `/dev/urandom`. Its memory is exactly the
//! attached files: a mem table naming any other descriptor is refused.

mod backend;

use std::os::fd::{FromRawFd, OwnedFd};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut socket = None;
    let mut peers = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => socket = args.next(),
            "--peer-fd" => peers.push(
                args.next()
                    .ok_or("--peer-fd needs a number")?
                    .parse::<i32>()?,
            ),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let socket = socket.ok_or("--socket PATH is required")?;
    let mut followers = Vec::new();
    for fd in peers {
        // SAFETY: the descriptor was inherited for this purpose (the command line names it)
        // and nothing else in this process owns it.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        followers.push(gmem::GuestMemfd::attach(sock)?);
    }
    let listener = std::os::unix::net::UnixListener::bind(&socket)?;
    let (stream, _) = listener.accept()?;
    backend::serve(stream, followers, std::fs::File::open("/dev/urandom")?);
    Ok(())
}
