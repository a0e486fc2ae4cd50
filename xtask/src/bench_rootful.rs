//! `cargo xtask bench rootful`: the rootful backend's cost, side by side with its peers, in
//! one run on this machine.
//!
//! Topology (all names `cf…`, addresses in 198.18.0.0/15, removed at the end):
//! ```text
//!  upstream netns cfbenchup: cfbu1 198.18.250.2  (iperf3 -s)
//!        │ veth
//!  host: cfbh1 198.18.250.1 ── NAT ── baseline netns cfbenchb: cfbbc 10.78.0.2 (iperf3 -c)
//!                            └─ childflow --root -- iperf3 -c 198.18.250.2
//! ```
//! The baseline is what childflow builds minus the eBPF programs: a veth pair into a network
//! namespace and an nftables masquerade (made here with `ip`/`nft`, which a bench may use).
//! Rows, each the median of A/B pairs run alternately (so drift hits both sides alike):
//! - bulk TCP (iperf3, 3 s): baseline vs `childflow --root`, and baseline with
//!   `tcpdump -w /dev/null` on the baseline veth (the peer tool);
//! - 64-byte UDP packet rate (iperf3 -u -l 64 -b 0);
//! - per-packet cost of each program (`kernel.bpf_stats_enabled`, run_time_ns / run_cnt,
//!   read from `bpftool prog show` while childflow's programs are loaded);
//! - `childflow --root -- true` next to the rootless `childflow -- true`, median wall time
//!   of 20 runs each, and how long the rootful run's host state outlives its return.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

const PAIRS: usize = 5;
const SECONDS: &str = "3";
const UP_NS: &str = "cfbenchup";
const BASE_NS: &str = "cfbenchb";
const SERVER: &str = "198.18.250.2";
const TABLE: &str = "childflow_bench";

fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("failed to run {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The bench's network; dropping it removes everything it made.
struct Topology {
    server: Child,
}

impl Topology {
    fn new() -> Result<Topology> {
        teardown();
        for cmd in [
            "ip netns add cfbenchup",
            "ip netns add cfbenchb",
            "ip link add cfbh1 type veth peer name cfbu1 netns cfbenchup",
            "ip addr add 198.18.250.1/24 dev cfbh1",
            "ip link set cfbh1 up",
            "ip -n cfbenchup addr add 198.18.250.2/24 dev cfbu1",
            "ip -n cfbenchup link set cfbu1 up",
            "ip -n cfbenchup link set lo up",
            "ip link add cfbbh type veth peer name cfbbc netns cfbenchb",
            "ip addr add 10.78.0.1/30 dev cfbbh",
            "ip link set cfbbh up",
            "ip -n cfbenchb addr add 10.78.0.2/30 dev cfbbc",
            "ip -n cfbenchb link set cfbbc up",
            "ip -n cfbenchb link set lo up",
            "ip -n cfbenchb route add default via 10.78.0.1",
            "sysctl -qw net.ipv4.ip_forward=1",
        ] {
            sh(&cmd.split(' ').collect::<Vec<_>>())?;
        }
        sh(&["nft", "add", "table", "inet", TABLE])?;
        let chain = "{ type nat hook postrouting priority srcnat ; }";
        sh(&["nft", "add", "chain", "inet", TABLE, "post", chain])?;
        sh(&["nft", "add", "rule", "inet", TABLE, "post", "iifname", "cfbbh", "masquerade"])?;
        let server = Command::new("ip")
            .args(["netns", "exec", UP_NS, "iperf3", "-s", "-B", SERVER])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("failed to start iperf3 -s")?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(Topology { server })
    }
}

fn teardown() {
    let _ = Command::new("nft").args(["delete", "table", "inet", TABLE]).output();
    for ns in [UP_NS, BASE_NS] {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
    }
    for link in ["cfbh1", "cfbbh"] {
        let _ = Command::new("ip").args(["link", "del", link]).stderr(Stdio::null()).output();
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        teardown();
    }
}

/// iperf3 client arguments for bulk TCP or the 64-byte UDP packet rate.
fn iperf_args(udp: bool) -> Vec<&'static str> {
    let mut a = vec!["iperf3", "-c", SERVER, "-t", SECONDS, "-J"];
    if udp {
        a.extend(["-u", "-l", "64", "-b", "0"]);
    }
    a
}

/// (bits/s, packets/s) from iperf3's JSON: what the receiver got.
fn parse_iperf(json: &str, udp: bool) -> Result<(f64, f64)> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 -J output")?;
    let end = &v["end"];
    if udp {
        let s = &end["sum"];
        let secs = s["seconds"].as_f64().unwrap_or(1.0);
        let packets =
            s["packets"].as_f64().unwrap_or(0.0) - s["lost_packets"].as_f64().unwrap_or(0.0);
        Ok((s["bits_per_second"].as_f64().unwrap_or(0.0), packets / secs))
    } else {
        Ok((end["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0), 0.0))
    }
}

fn baseline(udp: bool) -> Result<(f64, f64)> {
    let mut a = vec!["ip", "netns", "exec", BASE_NS];
    a.extend(iperf_args(udp));
    parse_iperf(&sh(&a)?, udp)
}

fn with_childflow(bin: &str, udp: bool) -> Result<(f64, f64)> {
    let mut a = vec![bin, "--root", "--"];
    a.extend(iperf_args(udp));
    parse_iperf(&sh(&a)?, udp)
}

/// The baseline with `tcpdump -w` on its veth. It writes to /dev/null: gigabytes of pcap
/// on this disk would still be flushing during the next runs and slow them down (seen as a
/// 40% slower baseline before this), so this row is the capture cost without the disk.
fn with_tcpdump(udp: bool) -> Result<(f64, f64)> {
    let mut dump = Command::new("tcpdump")
        .args(["-i", "cfbbh", "-s", "0", "-B", "65536", "-w", "/dev/null"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("failed to start tcpdump")?;
    std::thread::sleep(Duration::from_millis(500));
    let r = baseline(udp);
    let _ = Command::new("kill").args(["-INT", &dump.id().to_string()]).status();
    let _ = dump.wait();
    r
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// ns per run of each of childflow's programs, measured over one bulk TCP run.
fn program_cost(bin: &str) -> Result<Vec<(String, f64, u64)>> {
    // bpftool here cannot name a program's owner (no `pids`): childflow's programs are the
    // `cf_*` ones that appear while it runs.
    let ids = || -> Result<Vec<(u64, serde_json::Value)>> {
        let progs: serde_json::Value =
            serde_json::from_str(&sh(&["bpftool", "prog", "show", "-j"])?)?;
        Ok(progs
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["name"].as_str().unwrap_or_default().starts_with("cf_"))
            .filter_map(|p| Some((p["id"].as_u64()?, p.clone())))
            .collect())
    };
    let before: Vec<u64> = ids()?.into_iter().map(|(id, _)| id).collect();
    sh(&["sysctl", "-qw", "kernel.bpf_stats_enabled=1"])?;
    let mut a = vec![bin, "--root", "--"];
    a.extend(iperf_args(false));
    let mut child = Command::new(a[0])
        .args(&a[1..])
        .stdout(Stdio::null())
        .spawn()
        .context("failed to start childflow")?;
    let mut last = Vec::new();
    while child.try_wait()?.is_none() {
        std::thread::sleep(Duration::from_millis(200));
        let Ok(now) = ids() else { continue };
        let mine: Vec<(String, f64, u64)> = now
            .into_iter()
            .filter(|(id, _)| !before.contains(id))
            .filter_map(|(_, p)| {
                let cnt = p["run_cnt"].as_u64()?;
                let ns = p["run_time_ns"].as_u64()?;
                let name = p["name"].as_str()?.to_owned();
                (cnt > 0).then(|| (name, ns as f64 / cnt as f64, cnt))
            })
            .collect();
        if !mine.is_empty() {
            last = mine;
        }
    }
    sh(&["sysctl", "-qw", "kernel.bpf_stats_enabled=0"])?;
    Ok(last)
}

pub fn run(bin: &str, startup_only: bool) -> Result<()> {
    if startup_only {
        return startup(bin);
    }
    let _topology = Topology::new()?;
    println!("rootful bench: {PAIRS} A/B pairs of {SECONDS} s iperf3 runs (medians)\n");
    for (udp, what) in [(false, "bulk TCP"), (true, "64-byte UDP")] {
        let (mut base, mut cf, mut dump) = (Vec::new(), Vec::new(), Vec::new());
        // ABBA order: drift during the run hits both sides alike.
        for i in 0..PAIRS {
            if i % 2 == 0 {
                base.push(baseline(udp)?);
                cf.push(with_childflow(bin, udp)?);
            } else {
                cf.push(with_childflow(bin, udp)?);
                base.push(baseline(udp)?);
            }
            dump.push(with_tcpdump(udp)?);
        }
        let pick =
            |v: &[(f64, f64)]| median(v.iter().map(|r| if udp { r.1 } else { r.0 }).collect());
        let (b, c, d) = (pick(&base), pick(&cf), pick(&dump));
        let unit = if udp { "kpps" } else { "Gbit/s" };
        let scale = if udp { 1e3 } else { 1e9 };
        println!("{what:<12} veth+NAT (no eBPF)        {:>9.2} {unit}", b / scale);
        println!(
            "{what:<12} childflow --root          {:>9.2} {unit}  ({:+.1}%)",
            c / scale,
            (c / b - 1.0) * 100.0
        );
        println!(
            "{what:<12} veth+NAT + tcpdump -w     {:>9.2} {unit}  ({:+.1}%)",
            d / scale,
            (d / b - 1.0) * 100.0
        );
    }
    println!();
    for (name, ns, cnt) in program_cost(bin)? {
        println!("per-packet cost {name:<16} {ns:>7.0} ns  ({cnt} runs)");
    }
    startup(bin)?;
    Ok(())
}

/// The start-up row: `childflow --root -- true` and the rootless `childflow -- true`, 20
/// runs each, alternating (drift hits both alike), medians; and how long after a rootful
/// run returns its host state (veth, nft table, cgroup) is gone, since the kernel's
/// teardown finishes behind it (see `childflow/src/backend/rootful/linger.rs`).
fn startup(bin: &str) -> Result<()> {
    const RUNS: usize = 20;
    let timed = |args: &[&str]| -> Result<(f64, u32)> {
        let started = Instant::now();
        let mut child = Command::new(bin)
            .args(args)
            .spawn()
            .with_context(|| format!("failed to start {bin}"))?;
        let pid = child.id();
        if !child.wait()?.success() {
            bail!("{bin} {} failed", args.join(" "));
        }
        Ok((started.elapsed().as_secs_f64() * 1e3, pid))
    };
    let host_state = |pid: u32| {
        let id = format!("{pid:x}");
        let tables = sh(&["nft", "list", "tables"]).unwrap_or_default();
        std::path::Path::new(&format!("/sys/class/net/cf{id}h")).exists()
            || tables.contains(&format!("childflow_{id}\n"))
            || std::path::Path::new(&format!("/sys/fs/cgroup/unified/childflow-{id}")).exists()
    };
    let (mut rootful, mut rootless, mut tails) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..RUNS {
        let (ms, pid) = if i % 2 == 0 {
            let r = timed(&["--root", "--", "true"])?;
            rootless.push(timed(&["--", "true"])?.0);
            r
        } else {
            rootless.push(timed(&["--", "true"])?.0);
            timed(&["--root", "--", "true"])?
        };
        rootful.push(ms);
        let returned = Instant::now();
        while host_state(pid) && returned.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(2));
        }
        tails.push(returned.elapsed().as_secs_f64() * 1e3);
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!("\nstart-up, {RUNS} runs each, alternating (load average {})", load.join(" "));
    println!(
        "childflow --root -- true   median {:>6.1} ms  (min {:.1} ms)",
        median(rootful.clone()),
        min(&rootful)
    );
    println!(
        "childflow -- true          median {:>6.1} ms  (min {:.1} ms)  (rootless)",
        median(rootless.clone()),
        min(&rootless)
    );
    println!(
        "rootful host state gone    median {:>6.1} ms after childflow returned (max {:.1} ms)",
        median(tails.clone()),
        tails.iter().copied().fold(0.0, f64::max)
    );
    Ok(())
}
