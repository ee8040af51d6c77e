//! The `berth-vm` runtime's building blocks: the guest image ([`guest`]) and one VM with its
//! agent ([`machine`]). The agent itself is the `berth-agent` crate.

pub mod guest;
pub mod machine;
