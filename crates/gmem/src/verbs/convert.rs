//! `convert`: in-place conversion between shared and private (rules in the engine's
//! conversion docs, summarised on [`GuestMemfd::convert`]).

use crate::engine::convert::ConvertError;
use crate::model::attr::Attr;

use super::GuestMemfd;

impl GuestMemfd {
    /// Converts `[offset, offset + len)` to `to`, in place.
    ///
    /// - `offset`/`len` page aligned, `len > 0`, no wrap, inside the file, else `EINVAL`;
    /// - a range already in `to`: success at once, nothing touched;
    /// - listeners may veto (`EAGAIN`);
    /// - to private: a page with a host user (a pin, a device slice, here or in a peer
    ///   process) fails the call with `EAGAIN` and `error_offset` = that page, changing
    ///   nothing; then every host mapping gmem handed out (in every process it coordinates)
    ///   stops reaching the range, and pages a kernel reference may hold move to fresh memory;
    /// - to shared: always possible;
    /// - atomic on base-page backings; HugeTLB converts one huge page at a time, a run of
    ///   whole huge pages (none split) at once ([`ConvertError::Partial`] says how far it
    ///   got); a huge page that must split is not split while a pin (here or in a peer
    ///   process) holds one of its pages: `EAGAIN` naming that page;
    /// - `EPERM` on a follower, once handed over, and in a forked child; a file frozen for a
    ///   hand-over makes the call wait.
    pub fn convert(&self, offset: u64, len: u64, to: Attr) -> Result<(), ConvertError> {
        let r = self.inner.page_range(offset, len)?;
        self.inner.convert(r, to)
    }
}
