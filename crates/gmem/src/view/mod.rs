//! The two ways memory is reached: host views (enforced) and the guest view (unrestricted).

pub mod guest;
pub mod host;
