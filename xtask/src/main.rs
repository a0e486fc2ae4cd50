//! `cargo xtask`: the project's own set-up, test, run and bench commands.
//!
//! A newcomer types two commands (README.md): `cargo xtask run -- CMD...` and
//! `cargo xtask test`. Each first makes sure the machine has what it needs (`setup`), so the
//! same two commands work on a fresh Debian machine and in CI (`.ci/run`).

mod bench;
mod bench_capture;
mod bench_progrun;
mod bench_rootful;
mod bench_tcx;
mod floor;
mod leftovers;
mod probe;
mod setup;
mod verifier;

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  setup            install what building and testing need (Debian packages, bpf-linker,
                   a test user, /dev/net/tun for users); idempotent, says what it changed
  setup --check    only report what is missing
  test             setup, then fmt --check, clippy -D warnings, every test (unit and
                   integration, as root), then check that no host state of ours is left
  run -- CMD...    setup, build childflow (release) and run it on CMD
  leftovers        report netns/links/nft tables/cgroups/tc links/pins of ours left on the host
  bench KIND       run a benchmark side by side with its peers (docs/bench.md)
";

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<ExitCode> {
    let args: Vec<String> = env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprint!("{USAGE}");
        return Ok(ExitCode::from(2));
    };
    let rest = &args[1..];
    match cmd.as_str() {
        "setup" => {
            let check_only = rest.iter().any(|a| a == "--check");
            setup::run(check_only)?;
        }
        "test" => test(rest)?,
        "run" => return run(rest),
        "leftovers" => {
            let found = leftovers::scan();
            if !found.is_empty() {
                bail!("host state of ours is left over:\n  {}", found.join("\n  "));
            }
            println!("no host state of ours is left over");
        }
        "bench" => bench(rest)?,
        // The bench's own server and clients (not for people to run).
        "bench-probe" => probe::run(rest)?,
        "-h" | "--help" | "help" => print!("{USAGE}"),
        other => bail!("unknown xtask command `{other}`\n{USAGE}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent").to_path_buf()
}

/// `cargo` as the user's toolchain sees it (not the Debian one used for eBPF).
fn cargo() -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Runs `cmd`, failing with what it was if it does not exit 0.
pub fn status(mut cmd: Command) -> Result<()> {
    let what = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("failed to start {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

fn step(name: &str) {
    println!("\n==> {name}");
}

fn test(rest: &[String]) -> Result<()> {
    let started = std::time::Instant::now();
    step("setup");
    setup::run(false)?;
    let before = leftovers::scan();
    if !before.is_empty() {
        bail!(
            "host state of ours is already left over from an earlier run; remove it first \
             (the leftover check after the tests would blame this run):\n  {}",
            before.join("\n  ")
        );
    }

    step("cargo fmt --check");
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    status(fmt).context("code is not formatted: run `cargo fmt --all`")?;

    step("cargo clippy -D warnings");
    let mut clippy = cargo();
    clippy.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
    status(clippy)?;

    // The integration tests run the real binary: build it first, and tell them where it is.
    step("cargo build (the binary the integration tests run)");
    let mut build = cargo();
    build.args(["build", "--package", "childflow", "--bins"]);
    status(build)?;

    step("cargo test");
    let mut t = cargo();
    t.args(["test", "--workspace"]);
    t.args(rest);
    t.env("CHILDFLOW_BIN", root().join("target/debug/childflow"));
    let tested = status(t);

    step("leftover check");
    // A rootful run's kernel teardown finishes up to ~100 ms after childflow returns (see
    // childflow/src/backend/rootful/linger.rs); the guarantee is "gone within 2 s".
    let mut after = leftovers::scan();
    let since = std::time::Instant::now();
    while !after.is_empty() && since.elapsed() < std::time::Duration::from_secs(2) {
        std::thread::sleep(std::time::Duration::from_millis(50));
        after = leftovers::scan();
    }
    tested?;
    if !after.is_empty() {
        bail!("the tests left host state behind:\n  {}", after.join("\n  "));
    }
    println!("no host state of ours is left over");
    println!("\nall checks passed in {:.0?}", started.elapsed());
    Ok(())
}

fn run(rest: &[String]) -> Result<ExitCode> {
    let cmd_args = match rest.first().map(String::as_str) {
        Some("--") => &rest[1..],
        _ => rest,
    };
    setup::ensure_quietly()?;
    let mut build = cargo();
    build.args(["build", "--quiet", "--release", "--package", "childflow", "--bins"]);
    status(build)?;
    let bin = root().join("target/release/childflow");
    let st = Command::new(&bin)
        .args(cmd_args)
        .status()
        .with_context(|| format!("failed to start {}", bin.display()))?;
    // Pass childflow's exit code through (it is the command's own code).
    Ok(ExitCode::from(st.code().unwrap_or(1) as u8))
}

fn bench(rest: &[String]) -> Result<()> {
    const KINDS: &str = "rootless (host, childflow, pasta, slirp4netns side by side), \
                         rootful (--root vs veth+NAT without eBPF and tcpdump -w; \
                         `rootful --startup`: only the start-up row; `rootful --costs`: only the bpf_stats rows; \
                         `rootful --costs-ab OBJECT...`: bpf_stats of eBPF objects A/B on the baseline veth; \
                         `rootful --capture [--bin PATH]`: only the bulk TCP capture rows; \
                         `rootful --capture-rate [PPS]`: only the paced 64-byte capture rows (at PPS, default 250000); \
                         `rootful --tcx-floor [--expedited]`: the kernel's TCX attach cost; \
                         `rootful --prog-run [--pair] [OBJECT...]`: BPF_PROG_TEST_RUN per packet type), \
                         capture (childflow -c against tcpdump -w on the same traffic), \
                         flows (the flow table: events/s on one core, memory of 100,000 flows)";
    let Some(kind) = rest.first() else {
        bail!("usage: cargo xtask bench <kind>; kinds: {KINDS}");
    };
    match kind.as_str() {
        "rootless" => bench::rootless(&rest[1..]),
        "capture" => bench_capture::capture(&rest[1..]),
        "flows" => {
            // A criterion micro-benchmark; it prints the memory figure before the timings.
            let mut cmd = cargo();
            cmd.args(["bench", "--package", "childflow", "--bench", "flow_table", "--"]);
            cmd.args(&rest[1..]);
            status(cmd)
        }
        "rootful" => {
            setup::ensure_quietly()?;
            if rest.get(1).is_some_and(|a| a == "--tcx-floor") {
                return bench_tcx::run(rest.get(2).is_some_and(|a| a == "--expedited"));
            }
            if rest.get(1).is_some_and(|a| a == "--prog-run") {
                return bench_progrun::run(&rest[2..]);
            }
            if rest.get(1).is_some_and(|a| a == "--costs-ab") {
                return bench_rootful::run("", bench_rootful::Only::CostsAb(rest[2..].to_vec()));
            }
            if rest.get(1).is_some_and(|a| a == "--capture") {
                // `--capture [--bin PATH]`: only the bulk TCP capture rows, of any binary
                // (for A/B runs of two builds).
                let bin = match rest.get(2).map(String::as_str) {
                    Some("--bin") => PathBuf::from(rest.get(3).context("--bin needs a path")?),
                    _ => {
                        let mut build = cargo();
                        build.args(["build", "--quiet", "--release", "--package", "childflow"]);
                        build.arg("--bins");
                        status(build)?;
                        root().join("target/release/childflow")
                    }
                };
                return bench_rootful::capture_only(bin.to_str().context("binary path")?);
            }
            let mut build = cargo();
            build.args(["build", "--quiet", "--release", "--package", "childflow", "--bins"]);
            status(build)?;
            let bin = root().join("target/release/childflow");
            let only = match rest.get(1).map(String::as_str) {
                Some("--startup") => bench_rootful::Only::Startup,
                Some("--costs") => bench_rootful::Only::Costs,
                Some("--capture-rate") => bench_rootful::Only::CaptureRate(match rest.get(2) {
                    Some(pps) => pps.parse().context("--capture-rate PPS: a packet rate")?,
                    None => bench_rootful::CAPTURE_PPS,
                }),
                _ => bench_rootful::Only::All,
            };
            bench_rootful::run(bin.to_str().context("binary path is not UTF-8")?, only)
        }
        other => bail!("unknown benchmark `{other}`; kinds: {KINDS}"),
    }
}
