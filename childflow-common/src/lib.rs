//! Types shared by childflow's kernel programs (`childflow-ebpf`) and its userspace.
//!
//! Everything here is `#[repr(C)]` with explicit padding and no `bool`, so the kernel and
//! userspace agree on every byte. Byte order is stated per field. Ring-buffer records start
//! with a `u32` kind tag ([`event`]); userspace decodes them with a pure function
//! (`event::decode`, behind the `user` feature) and never transmutes bytes into an enum.
#![no_std]

pub mod event;
pub mod filter;
pub mod flow;

#[cfg(feature = "user")]
extern crate std;
