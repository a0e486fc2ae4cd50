//! The two backends. Each starts the command in its sandbox, emits [`crate::event::Event`]s
//! for what the command does on the network, and returns the command's exit status.

pub mod dns;
pub mod rootful;
pub mod rootless;
