//! childflow's kernel programs, compiled for `bpfel-unknown-none` by `childflow/build.rs` and
//! embedded into the userspace binary.
//!
//! One file per program kind. Each program is a thin wrapper over a `try_*` function with
//! bounds-checked packet access (`bpf_skb_load_bytes` through `TcContext::load`).
//!
//! On the host target (`cargo clippy --workspace`) this compiles as an empty binary, so the
//! programs are linted like the rest of the workspace.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic adds on map values: see `tc::add`. Allowed by RUSTC_BOOTSTRAP in build.rs.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
// Map keys and values are passed by reference on purpose: by value they would be copied onto
// the 512-byte BPF stack first.
#![allow(clippy::needless_borrows_for_generic_args)]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

mod cgroup;
mod parse;
mod tc;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no reachable panic; this is never called.
    loop {}
}

/// The kernel refuses GPL-only helpers to programs under another licence.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
