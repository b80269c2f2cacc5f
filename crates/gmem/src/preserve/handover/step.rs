//! The steps of a hand-over, named for progress reports, logs and fault injection.

/// The steps of a hand-over, in order, as [`Options::on_step`](super::Options::on_step) reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// Old owner: every file frozen and the state written; nothing sent yet.
    Frozen,
    /// Old owner: `OFFER` sent with the descriptors.
    OfferSent,
    /// Old owner: `ACCEPT` read.
    AcceptReceived,
    /// Old owner: its accessors refused and `COMMIT` sent; the new owner owns once it reads it.
    CommitSent,
    /// Old owner: `DONE` read; the files are handed over.
    DoneReceived,
    /// Old owner: every mapping of the files revoked and `RELEASED` sent (the new owner's
    /// conversions to private wait for it).
    Released,
    /// New owner: `OFFER` and descriptors read.
    OfferReceived,
    /// New owner: the state verified and the files built, pins taken.
    Verified,
    /// New owner: `ACCEPT` sent.
    AcceptSent,
    /// New owner: `COMMIT` read; it owns the files.
    CommitReceived,
    /// New owner: `DONE` sent.
    DoneSent,
}

impl Step {
    /// Every step, old owner's first.
    pub const ALL: [Step; 11] = [
        Step::Frozen,
        Step::OfferSent,
        Step::AcceptReceived,
        Step::CommitSent,
        Step::DoneReceived,
        Step::Released,
        Step::OfferReceived,
        Step::Verified,
        Step::AcceptSent,
        Step::CommitReceived,
        Step::DoneSent,
    ];

    /// The step's name, as used in logs and by the fault-injection tests.
    pub fn name(self) -> &'static str {
        match self {
            Step::Frozen => "frozen",
            Step::OfferSent => "offer-sent",
            Step::AcceptReceived => "accept-received",
            Step::CommitSent => "commit-sent",
            Step::DoneReceived => "done-received",
            Step::Released => "released",
            Step::OfferReceived => "offer-received",
            Step::Verified => "verified",
            Step::AcceptSent => "accept-sent",
            Step::CommitReceived => "commit-received",
            Step::DoneSent => "done-sent",
        }
    }

    /// True for the old owner's steps (`Frozen` to `Released`), false for the new owner's.
    pub fn is_old_owners(self) -> bool {
        matches!(
            self,
            Step::Frozen
                | Step::OfferSent
                | Step::AcceptReceived
                | Step::CommitSent
                | Step::DoneReceived
                | Step::Released
        )
    }

    /// The step named `name`.
    pub fn from_name(name: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|s| s.name() == name)
    }
}
