//! childflow: run a command tree in a network namespace of its own and see, log, capture and
//! steer everything it does on the network.
//!
//! `main.rs` is thin: it parses [`cli::Args`], validates them into a [`cli::Config`] and hands
//! that to [`run::run`], which starts a backend, the collector and the sinks.

pub mod arena;
pub mod backend;
pub mod capture;
pub mod cli;
pub mod collector;
pub mod ebpf;
pub mod event;
pub mod exit;
pub mod flow;
pub mod report;
pub mod run;
pub mod sandbox;
pub mod sink;
pub mod summary;
pub mod tui;

/// `--version`: says whether the eBPF programs (and so `--root`) are built in.
#[cfg(feature = "ebpf")]
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (backends: rootless, rootful/eBPF)");
#[cfg(not(feature = "ebpf"))]
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (backends: rootless only; built without eBPF, --root unavailable)"
);
