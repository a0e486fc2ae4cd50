//! The hermetic test network and helpers every integration test uses.
//!
//! [`TestNet::new`] builds a small "internet" on this machine: an upstream network namespace
//! joined to the host namespace by a veth pair, with addresses in 198.18.0.0/15 and
//! 2001:db8::/32 and real servers inside it (HTTP, HTTPS with a test CA, DNS authoritative for
//! `example.test`, UDP and TCP echo, a DNS address that never answers). The host reaches it over
//! connected routes, so both the rootful NAT path and the rootless engine's host sockets do.
//! No test ever sends traffic anywhere else.
//!
//! Everything is owned by RAII guards: dropping the `TestNet` stops the servers, deletes the
//! namespace and the veth, and asserts that nothing of this net is left on the host.
//!
//! Tests that need what the machine lacks (root, a kernel feature) call [`skip`] with the
//! reason, which prints `SKIPPED` and is counted by the harness output, never as a pass of
//! the feature itself.

pub mod bin;
pub mod capture;
mod dns;
mod http;
pub mod net;

pub use bin::{childflow, childflow_as_test_user, tool};
pub use capture::{Dumpcap, http_payload, tshark_fields};
pub use net::{TestNet, leftovers};

/// The zone the test DNS server is authoritative for.
pub const ZONE: &str = "example.test";

/// Marks a test as skipped for `reason` (printed so the run shows it) when `cond` holds.
/// Returns `cond`, for `if skip(...) { return; }`.
pub fn skip(cond: bool, reason: &str) -> bool {
    if cond {
        eprintln!("SKIPPED: {reason}");
    }
    cond
}

/// Whether this process runs as root (most integration tests need it to build the net).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The deterministic content `/bytes/N` serves: byte `i` is `i % 251` (a prime, so no
/// power-of-two chunking lines up with the pattern).
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(data))
}

/// Hands `pattern(len)` to `each` in pieces of whole periods, so gigabytes of it never sit
/// in memory.
fn pattern_pieces(len: usize, mut each: impl FnMut(&[u8])) {
    let piece = pattern((251 * 4096).min(len));
    let mut left = len;
    while left > 0 {
        let take = left.min(piece.len());
        each(&piece[..take]);
        left -= take;
    }
}

/// Lowercase hex SHA-256 of `pattern(len)`, without building it.
pub fn pattern_sha256_hex(len: usize) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    pattern_pieces(len, |piece| hasher.update(piece));
    hex(&hasher.finalize())
}

/// Writes `pattern(len)` to `path`, without building it.
pub fn write_pattern(path: &std::path::Path, len: usize) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create the file"));
    pattern_pieces(len, |piece| f.write_all(piece).expect("write the pattern"));
    f.flush().expect("write the pattern");
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The addresses `traceroute -n` (or `tracepath -n`) printed for each hop, in hop order:
/// one entry per hop line, with every address on it (probes may be answered by several).
pub fn trace_hops(output: &str) -> Vec<Vec<std::net::IpAddr>> {
    let mut hops: Vec<(u32, Vec<std::net::IpAddr>)> = Vec::new();
    for line in output.lines() {
        let mut words = line.split_whitespace();
        // "1  198.18.5.2  0.1 ms" (traceroute) or " 1:  198.18.5.2  0.1ms" (tracepath).
        let Some(hop) = words.next().and_then(|w| w.trim_end_matches([':', '?']).parse().ok())
        else {
            continue;
        };
        let addrs: Vec<std::net::IpAddr> = words.filter_map(|w| w.parse().ok()).collect();
        if addrs.is_empty() {
            continue;
        }
        match hops.last_mut() {
            Some((n, list)) if *n == hop => {
                list.extend(addrs.into_iter().filter(|a| !list.contains(a)).collect::<Vec<_>>())
            }
            _ => hops.push((hop, addrs)),
        }
    }
    hops.into_iter().map(|(_, a)| a).collect()
}
