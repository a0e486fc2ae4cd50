//! `cargo xtask setup`: make this machine able to build and test childflow.
//!
//! Idempotent: each piece is checked first and only what is missing is changed, and every
//! change is reported. Targets a Debian 12 machine with rustup's stable Rust (README.md).
//! What each piece is for:
//! - `rustc-web cargo-web rust-web-src llvm-22-dev` and bpf-linker 0.13.0 (against LLVM 22):
//!   the eBPF toolchain recipe of DESIGN.md (rustup's toolchain has no `rust-src`);
//! - the network tools the tests drive or compare against (iproute2, nftables, tshark, iperf3,
//!   curl, socat, ping, openssl) and the peers the benches run (passt, slirp4netns, tcpdump);
//! - a non-root user, so the rootless backend is tested as the ordinary user it is for;
//! - `/dev/net/tun` open to users (mode 0666, as most distributions ship it) and ICMP echo
//!   sockets allowed for every group (`net.ipv4.ping_group_range`), both needed by the
//!   rootless backend.

use std::{fs, os::unix::fs::PermissionsExt, process::Command};

use anyhow::{Context, Result, bail};

/// Debian packages the build, tests and benches use.
const PACKAGES: &[&str] = &[
    // eBPF toolchain (DESIGN.md).
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    // Tests and benches.
    "iproute2",
    "nftables",
    "tshark",
    "iperf3",
    "passt",
    "slirp4netns",
    "tcpdump",
    "uidmap",
    "bpftool",
    "openssl",
    "curl",
    "jq",
    "procps",
    "socat",
    "iputils-ping",
    // The rootless traceroute tests (UDP, ICMP and TCP probes; tracepath).
    "traceroute",
    "iputils-tracepath",
    "tmux",
    "python3",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
/// The user the rootless tests run as.
pub const TEST_USER: &str = "childflow-test";
const TUN: &str = "/dev/net/tun";
const PING_RANGE: &str = "/proc/sys/net/ipv4/ping_group_range";
const PING_RANGE_ALL: &str = "0\t2147483647";

/// What is missing, as human-readable items.
fn missing() -> Vec<String> {
    let mut out = Vec::new();
    let pkgs = missing_packages();
    if !pkgs.is_empty() {
        out.push(format!("Debian packages: {}", pkgs.join(" ")));
    }
    if !bpf_linker_ok() {
        out.push(format!("bpf-linker {BPF_LINKER_VERSION} (built against LLVM 22)"));
    }
    if !user_exists(TEST_USER) {
        out.push(format!("test user {TEST_USER}"));
    }
    if !tun_open() {
        out.push(format!("{TUN} mode 0666"));
    }
    if !ping_open() {
        out.push("net.ipv4.ping_group_range = 0 2147483647".into());
    }
    out
}

/// For `cargo xtask run`: set up only if something is missing, silently otherwise.
pub fn ensure_quietly() -> Result<()> {
    if missing().is_empty() { Ok(()) } else { run(false) }
}

pub fn run(check_only: bool) -> Result<()> {
    let todo = missing();
    if todo.is_empty() {
        println!("setup: everything is in place");
        return Ok(());
    }
    if check_only {
        bail!("missing: {}\nfix: run `cargo xtask setup` as root", todo.join("; "));
    }
    if !nix_is_root() {
        bail!(
            "missing: {}\nthese need root: run `cargo xtask setup` as root (e.g. `sudo -E env \
             PATH=$PATH cargo xtask setup`), then run this command again",
            todo.join("; ")
        );
    }
    let pkgs = missing_packages();
    if !pkgs.is_empty() {
        println!("setup: installing Debian packages: {}", pkgs.join(" "));
        // Without a fresh index Debian 12 offers an older rustc-web than the recipe needs.
        crate::status(apt(&["update", "-q"])).context(
            "apt-get update failed: this machine needs access to the Debian package mirrors",
        )?;
        let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
        install.args(&pkgs);
        crate::status(install).context("installing the Debian packages failed")?;
    }
    if !bpf_linker_ok() {
        println!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
        );
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked"])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            // The target dir of this workspace must not be used (or locked) by the install.
            .env_remove("CARGO_TARGET_DIR");
        crate::status(cmd).context("installing bpf-linker failed (needs llvm-22-dev)")?;
        if !bpf_linker_ok() {
            bail!(
                "bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH \
                 (rustup's installer does this)"
            );
        }
    }
    if !user_exists(TEST_USER) {
        println!("setup: creating the test user {TEST_USER}");
        let mut cmd = Command::new("useradd");
        cmd.args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER]);
        crate::status(cmd)?;
    }
    if !tun_open() {
        println!("setup: opening {TUN} to users (chmod 0666)");
        fs::set_permissions(TUN, fs::Permissions::from_mode(0o666))
            .with_context(|| format!("failed to chmod {TUN}"))?;
    }
    if !ping_open() {
        println!("setup: allowing ICMP echo sockets for all groups (net.ipv4.ping_group_range)");
        fs::write(PING_RANGE, "0 2147483647\n")
            .with_context(|| format!("failed to write {PING_RANGE}"))?;
    }
    let left = missing();
    if !left.is_empty() {
        bail!("setup finished but still missing: {}", left.join("; "));
    }
    println!("setup: done");
    Ok(())
}

fn apt(args: &[&str]) -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !matches!(out, Ok(o) if o.status.success()
                && String::from_utf8_lossy(&o.stdout).ends_with("install ok installed"))
        })
        .collect()
}

fn bpf_linker_ok() -> bool {
    let out = Command::new("bpf-linker").arg("--version").output();
    matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
}

fn user_exists(name: &str) -> bool {
    Command::new("id").arg(name).output().map(|o| o.status.success()).unwrap_or(false)
}

fn tun_open() -> bool {
    fs::metadata(TUN).map(|m| m.permissions().mode() & 0o006 == 0o006).unwrap_or(false)
}

fn ping_open() -> bool {
    fs::read_to_string(PING_RANGE).map(|s| s.trim() == PING_RANGE_ALL).unwrap_or(false)
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
