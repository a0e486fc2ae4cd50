//! Builds the kernel programs in `childflow-ebpf/` and leaves the object in `OUT_DIR`, where
//! `src/ebpf/mod.rs` embeds it with `include_bytes_aligned!`.
//!
//! Why not `aya-build`: it drives the eBPF build through `rustup run <toolchain>`, but the
//! rustup toolchains on our machines have no `rust-src` and none can be fetched. The
//! verified recipe (DESIGN.md) uses Debian's `rustc-web` (a 1.96 compiler with its library
//! source in `/usr/lib/rustlib/src/rust`) with `RUSTC_BOOTSTRAP=1` and `-Z build-std=core`,
//! linked by `bpf-linker`. This script runs exactly that, for the eBPF crate only, in a
//! target directory of its own (cargo would otherwise wait on its own lock).
//!
//! Without the `ebpf` feature nothing is built and the binary is rootless-only.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// Where `cargo xtask setup` (apt: rustc-web cargo-web rust-web-src) puts the compiler.
const DEFAULT_BPF_RUSTC: &str = "/usr/bin/rustc";
const DEFAULT_BPF_CARGO: &str = "/usr/bin/cargo";
const FIX: &str = "run `cargo xtask setup` to install it (or build a rootless-only binary \
                   with `cargo build --no-default-features`)";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    for path in ["childflow-ebpf/src", "childflow-ebpf/Cargo.toml", "childflow-common/src"] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
    println!("cargo:rerun-if-env-changed=CHILDFLOW_BPF_RUSTC");
    println!("cargo:rerun-if-env-changed=CHILDFLOW_BPF_CARGO");
    if env::var_os("CARGO_FEATURE_EBPF").is_none() {
        return;
    }

    let rustc = PathBuf::from(env::var("CHILDFLOW_BPF_RUSTC").unwrap_or(DEFAULT_BPF_RUSTC.into()));
    let cargo = PathBuf::from(env::var("CHILDFLOW_BPF_CARGO").unwrap_or(DEFAULT_BPF_CARGO.into()));
    require(&rustc, "the eBPF compiler (Debian package rustc-web)");
    require(&cargo, "cargo for the eBPF compiler (Debian package cargo-web)");
    require(
        Path::new("/usr/lib/rustlib/src/rust/library/core"),
        "the Rust library source for build-std (Debian package rust-web-src)",
    );
    if which("bpf-linker").is_none() {
        fail(
            "bpf-linker is not on PATH (cargo install bpf-linker --version 0.13.0 built against llvm-22)",
        );
    }

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let target_dir = out_dir.join("ebpf-target");
    let target = if env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() == Ok("big") {
        "bpfeb-unknown-none"
    } else {
        "bpfel-unknown-none"
    };
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap();
    // Flags cargo would pass through CARGO_ENCODED_RUSTFLAGS, separated by 0x1f:
    // the arch aya-ebpf compiles helpers for, BTF debug info for the loader.
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .join("\x1f");

    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root)
        .args(["build", "--package", "childflow-ebpf", "--bins", "--release", "--target", target])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC", &rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // The outer build's compiler, wrappers and flags must not leak into the eBPF build.
    for key in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTDOC",
        "CARGO",
    ] {
        cmd.env_remove(key);
    }
    let status =
        cmd.status().unwrap_or_else(|e| fail(&format!("cannot run {}: {e}", cargo.display())));
    if !status.success() {
        fail(&format!("building childflow-ebpf failed ({status}); see the compiler output above"));
    }
    let object = target_dir.join(target).join("release").join("childflow");
    let full = out_dir.join("childflow.full.bpf.o");
    std::fs::copy(&object, &full)
        .unwrap_or_else(|e| fail(&format!("cannot copy {}: {e}", object.display())));
    embed_stripped(&full, &out_dir.join("childflow.bpf.o"));
}

/// Writes the object childflow embeds (`embedded`): `full` without its DWARF.
///
/// The programs do not need it (they read only UAPI context fields: no CO-RE relocation),
/// and it cost every start-up: aya parses every section of the object with its relocations
/// (the DWARF sections hold ~11,000 of them). Without it the loader's parse, BTF load and
/// map creation took 2.10 ms instead of 2.34 (median, `cargo xtask bench rootful --prog-run
/// --verifier`). The BTF stays: it marks the programs' cold paths as global functions,
/// which the verifier checks once each (see `cf_parse_slow` in childflow-ebpf's tc.rs);
/// without it they would be static subprograms. What is lost: source lines in
/// `bpftool prog dump`; the full object stays next to it (`childflow.full.bpf.o`).
///
/// With no `llvm-objcopy` (package llvm-22, which `llvm-22-dev` pulls in), the full object is
/// embedded, with a warning.
fn embed_stripped(full: &Path, embedded: &Path) {
    println!("cargo:rerun-if-env-changed=CHILDFLOW_BPF_OBJCOPY");
    let objcopy = env::var_os("CHILDFLOW_BPF_OBJCOPY")
        .map(PathBuf::from)
        .or_else(|| {
            Some(PathBuf::from("/usr/lib/llvm-22/bin/llvm-objcopy")).filter(|p| p.is_file())
        })
        .or_else(|| which("llvm-objcopy-22"))
        .or_else(|| which("llvm-objcopy"));
    let stripped = objcopy.is_some_and(|objcopy| {
        Command::new(objcopy)
            .arg("--strip-debug")
            .arg(full)
            .arg(embedded)
            .status()
            .is_ok_and(|s| s.success())
    });
    if !stripped {
        println!(
            "cargo:warning=llvm-objcopy not found or failed: embedding the eBPF object with its \
             debug information (slower start-up; `cargo xtask setup` installs it)"
        );
        std::fs::copy(full, embedded)
            .unwrap_or_else(|e| fail(&format!("cannot copy {}: {e}", full.display())));
    }
}

fn require(path: &Path, what: &str) {
    if !path.exists() {
        fail(&format!("{what} is missing: {} does not exist", path.display()));
    }
}

fn which(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    let home_bin = env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"));
    env::split_paths(&path).chain(home_bin).map(|dir| dir.join(program)).find(|p| p.is_file())
}

fn fail(msg: &str) -> ! {
    eprintln!("error: cannot build childflow's eBPF programs: {msg}\n  fix: {FIX}");
    panic!("cannot build childflow's eBPF programs: {msg}; fix: {FIX}");
}
