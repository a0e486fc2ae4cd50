//! `cargo xtask bench capture`: what `childflow -c` costs the rootless backend, next to
//! `tcpdump -w` capturing the same traffic, in one invocation.
//!
//! The destination is an iperf3 server in a namespace of its own (`cfbenchcap`, veth
//! `cfbcap0`/`cfbcap1`, 198.18.250.0/24 from the benchmarking range of RFC 2544), set up by
//! the rootless benchmark's [`Destination`]. Every run is `childflow -- sh -c 'sleep 1;
//! iperf3 …'` as the bench user, so the command runs in childflow's namespace:
//! - `childflow`: no capture (the baseline the others are compared with);
//! - `childflow -c`: childflow writes every frame at the tap to a pcapng file;
//! - `tcpdump -w`: no childflow capture; `tcpdump -w` runs in the command's namespace
//!   (`nsenter --net`) on the same tap device, so it sees the frames `-c` sees, plus those
//!   the kernel drops at the tap when the engine reads too slowly (the kernel hands frames
//!   to packet sockets before the tap's queue). The one-second sleep lets it attach before
//!   iperf3 starts;
//! - `floor: write` (TCP): no capture, and a thread of the bench writing as many bytes as
//!   the transfer moved to a file beside it ([`crate::floor`]): the least a capture of it
//!   writes, with the frames in memory already as the engine has them (while its writes
//!   keep up: how far they fell behind is printed when they did not).
//!
//! Before and after the rounds it measures what the capture directory takes
//! ([`floor::write_rate`]) and prints, per TCP workload, the cost that rate forces on any
//! capture that keeps every byte, when it is slower than the uncaptured transfer.
//!
//! Three workloads: one bulk TCP flow from the command (iperf3 default, MTU 65520 unless
//! `--mtu`), the same to the command (`iperf3 -R`: the engine makes those frames, and hands
//! the large ones to the capture after writing them to the tap), and many small UDP
//! datagrams (`iperf3 -u -l 64 -b 0`, the packets/s stress). Reported per run:
//! iperf3's throughput, its cost against the baseline, packets written (counted in the file
//! by `capinfos`), packets/s written, and drops (childflow's `--summary-format json`
//! drop counters; tcpdump's "dropped by kernel"), and the tap's own drops (frames the
//! kernel dropped because the engine read too slowly: lost before any capture point). Files
//! are deleted after counting. The rows alternate for `--rounds` rounds and each shows its
//! median run, since one run on a shared machine says little; the cost column is the
//! median of the per-round ratios to the first row (a round's runs are close in time, so
//! a change of load hits both sides of each pair).
//! Needs root (the namespace, veth and nsenter); everything is removed on exit.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    bench::{BenchNet, Destination, children_of, comm, lookup_user, prepare},
    floor::{self, DiskRate, Floor},
};

const NET: BenchNet = BenchNet {
    netns: "cfbenchcap",
    host_if: "cfbcap0",
    peer_if: "cfbcap1",
    host_addr: "198.18.250.1",
    server: "198.18.250.2",
};

/// What the command prints on stderr once iperf3 is done.
const DONE: &str = "cf-bench-traffic-done";

/// The tap device in the command's namespace (`childflow/src/backend/rootless/tap.rs`).
const TAP: &str = "tap0";

struct Options {
    seconds: u32,
    mtu: u32,
    udp_len: u32,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    keep: bool,
    /// `tcp` or `udp` only.
    only: Option<String>,
    /// Runs of each row, interleaved; the row shown is the median one.
    rounds: usize,
    /// Where the capture files go (default: a temporary directory); e.g. a tmpfs to take
    /// the disk out of the measurement.
    dir: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        seconds: 3,
        mtu: 65520,
        udp_len: 64,
        bin: crate::root().join("target/release/childflow"),
        user: lookup_user(crate::bench::BENCH_USER),
        keep: false,
        only: None,
        rounds: 3,
        dir: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--time" => o.seconds = value()?.parse().context("--time SECONDS")?,
            "--mtu" => o.mtu = value()?.parse().context("--mtu BYTES")?,
            "--udp-len" => o.udp_len = value()?.parse().context("--udp-len BYTES")?,
            "--bin" => o.bin = PathBuf::from(value()?),
            "--user" => {
                let name = value()?;
                o.user = Some(lookup_user(name).with_context(|| format!("no user {name}"))?);
            }
            "--keep" => o.keep = true,
            "--dir" => o.dir = Some(PathBuf::from(value()?)),
            "--only" => o.only = Some(value()?.clone()),
            "--rounds" => o.rounds = value()?.parse::<usize>().context("--rounds N")?.max(1),
            "-h" | "--help" => {
                println!(
                    "usage: cargo xtask bench capture [--time SECONDS (3)] [--mtu BYTES (65520)] \
                     [--udp-len BYTES (64)] [--bin PATH] [--user NAME (default childflow-test)] \
                     [--keep (leave the capture files)] [--only tcp|tcp-down|udp] [--rounds N (3)] \
                     [--dir PATH (for the capture files)]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown option {other} (see --help)"),
        }
    }
    Ok(o)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Capture {
    None,
    Childflow,
    Tcpdump,
    /// No capture, beside a [`Floor`] writing every byte the transfer moves to a file
    /// (TCP only): the least a capture of it writes, for a backend that holds the frames
    /// in its memory already.
    Floor,
}

impl Capture {
    fn name(self) -> &'static str {
        match self {
            Capture::None => "childflow",
            Capture::Childflow => "childflow -c",
            Capture::Tcpdump => "tcpdump -w",
            Capture::Floor => "floor: write",
        }
    }

    /// Whether this row runs for `workload`: the floor only for TCP (a bulk transfer).
    fn runs_for(self, workload: Workload) -> bool {
        self != Capture::Floor || workload.is_tcp()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// Bulk TCP from the command (the engine takes the command's frames).
    Tcp,
    /// Bulk TCP to the command (`iperf3 -R`: the engine makes the frames).
    TcpDown,
    Udp,
}

impl Workload {
    const ALL: [Workload; 3] = [Workload::Tcp, Workload::TcpDown, Workload::Udp];

    /// Its name for `--only` and the capture files.
    fn tag(self) -> &'static str {
        match self {
            Workload::Tcp => "tcp",
            Workload::TcpDown => "tcp-down",
            Workload::Udp => "udp",
        }
    }

    fn is_tcp(self) -> bool {
        self != Workload::Udp
    }
}

/// What one run measured.
#[derive(Default)]
struct Measured {
    /// iperf3's received throughput (TCP) or sent rate (UDP), Gbit/s.
    gbit: f64,
    /// Datagrams iperf3 sent (UDP), per second.
    sent_pps: f64,
    /// IP packets through the engine, both ways (childflow's summary totals).
    engine_packets: u64,
    /// Frames the kernel dropped at the tap because the engine did not read them in time
    /// (`tap0` transmit drops in the command's namespace): lost before any capture point.
    tap_drops: u64,
    /// Packets in the capture file, and the capture's own count of drops.
    written: Option<u64>,
    drops: Option<u64>,
    /// Seconds the capture was running (for packets/s): iperf3's duration.
    seconds: f64,
    /// CPU seconds (user + system) of childflow and the command tree, plus tcpdump's in
    /// its row: what the run cost the machine, whatever else ran on it.
    cpu: f64,
    /// The floor's row: the share of the transfer's bytes its writes had not caught up
    /// with at the end ([`Floor::stop`]).
    floor_behind: Option<f64>,
}

impl Measured {
    /// CPU seconds per gigabyte iperf3 moved (TCP): the cost of capturing measured in CPU,
    /// which other load on a shared machine does not move as much as throughput.
    fn cpu_per_gb(&self) -> Option<f64> {
        let gb = self.gbit * self.seconds / 8.0;
        (gb > 0.0 && self.cpu > 0.0).then(|| self.cpu / gb)
    }
}

/// Waits for `child` and returns its status with the CPU seconds it and every descendant it
/// reaped used (wait4(2)'s rusage), which std's `wait` does not give.
fn wait_with_cpu(child: &mut Child) -> Result<(std::process::ExitStatus, f64)> {
    use std::os::unix::process::ExitStatusExt;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4(2) on our own unreaped child, into valid out-pointers.
        let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
        if r >= 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).context("wait4 failed");
        }
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((std::process::ExitStatus::from_raw(status), secs(usage.ru_utime) + secs(usage.ru_stime)))
}

/// `childflow [-c FILE] --summary-format json -- sh -c 'sleep 1; iperf3 ...'` as the bench
/// user, killed if it overruns.
fn childflow(o: &Options, workload: Workload, capture: Option<&Path>) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", &(o.seconds + 60).to_string()]).arg(&o.bin).current_dir("/");
    if let Some((uid, gid)) = o.user {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(gid).env("HOME", "/");
    }
    cmd.args(["--mtu", &o.mtu.to_string(), "--summary-format", "json"]);
    if let Some(file) = capture {
        cmd.arg("-c").arg(file);
    }
    let mut iperf = format!("iperf3 -c {} -J -t {}", NET.server, o.seconds);
    match workload {
        Workload::Tcp => {}
        Workload::TcpDown => iperf += " -R",
        Workload::Udp => iperf += &format!(" -u -b 0 -l {}", o.udp_len),
    }
    // The sleeps let tcpdump attach before the traffic starts, and the bench read the tap's
    // counters and stop tcpdump after it ended (the command says when on stderr).
    let script = format!("sleep 1; {iperf}; s=$?; echo {DONE} >&2; sleep 1; exit $s");
    cmd.args(["--", "sh", "-c", &script]);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// The command's shell, once childflow has started it in its namespace (the one to join).
fn find_command(root: u32) -> Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(p) = children_of(root).into_iter().find(|&p| comm(p) == "sh") {
            return Ok(p);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("the command did not start under childflow within 10 s")
}

/// Starts `tcpdump -w` on the tap in the namespace of `pid`.
fn start_tcpdump(pid: u32, file: &Path) -> Result<Child> {
    let child = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["tcpdump", "-i", TAP, "-s", "0", "-n", "-w"])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("failed to start tcpdump (Debian package tcpdump) through nsenter")?;
    Ok(child)
}

/// Stops tcpdump and returns (packets captured, packets dropped by the kernel).
pub(crate) fn stop_tcpdump(child: Child) -> Result<(u64, u64)> {
    stop_tcpdump_cpu(child).map(|(captured, dropped, _)| (captured, dropped))
}

/// [`stop_tcpdump`], also returning the CPU seconds tcpdump used.
fn stop_tcpdump_cpu(mut child: Child) -> Result<(u64, u64, f64)> {
    // SAFETY: kill(2) on a child we started and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err)?;
    }
    let (_, cpu) = wait_with_cpu(&mut child)?;
    let count = |what: &str| {
        err.lines()
            .find(|l| l.contains(what))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("tcpdump printed no \"{what}\" line: {err}"))
    };
    Ok((count("packets captured")?, count("dropped by kernel")?, cpu))
}

/// Transmit drops of the tap (frames for the engine the kernel dropped), as seen from the
/// namespace of `pid`.
fn tap_drops(pid: u32) -> Result<u64> {
    let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
        .context("failed to read the command's /proc/PID/net/dev")?;
    let line = dev
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{TAP}:")))
        .with_context(|| format!("no {TAP} in the command's namespace"))?;
    // After "tap0:": 8 receive counters, then transmit bytes, packets, errs, drop.
    let fields: Vec<&str> = line.split(':').nth(1).unwrap_or("").split_whitespace().collect();
    fields.get(11).and_then(|v| v.parse().ok()).with_context(|| format!("odd line {line:?}"))
}

/// Packets in a pcap or pcapng file, as capinfos counts them.
pub(crate) fn count_packets(file: &Path) -> Result<u64> {
    let out = Command::new("capinfos")
        .args(["-T", "-r", "-M", "-c"])
        .arg(file)
        .output()
        .context("failed to run capinfos (Debian package wireshark-common)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split('\t')
        .nth(1)
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("capinfos printed {text:?} for {}", file.display()))
}

/// What [`observe`] saw: the tap's drops, tcpdump's (captured, dropped, CPU seconds), and
/// the thread reading childflow's stderr.
type Observed = (u64, Option<(u64, u64, f64)>, std::thread::JoinHandle<String>);

/// While childflow runs: finds the command, starts tcpdump if asked, waits for the traffic
/// to end, then reads the tap's drops and stops tcpdump. Returns those and childflow's
/// stderr (read on a thread, so a chatty childflow never blocks on the pipe).
fn observe(
    o: &Options,
    child: &mut Child,
    file: Option<&Path>,
    capture: Capture,
) -> Result<Observed> {
    use std::io::{BufRead, BufReader};
    let stderr = child.stderr.take().context("no stderr")?;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.trim() == DONE {
                let _ = done_tx.send(());
            } else {
                all.push_str(&line);
                all.push('\n');
            }
        }
        all
    });
    let pid = find_command(child.id())?;
    let tcpdump = match (capture, file) {
        (Capture::Tcpdump, Some(f)) => Some(start_tcpdump(pid, f)?),
        _ => None,
    };
    let waited = done_rx.recv_timeout(Duration::from_secs(u64::from(o.seconds) + 30));
    let drops = tap_drops(pid);
    let counts = tcpdump.map(stop_tcpdump_cpu).transpose();
    if waited.is_err() {
        bail!("the traffic did not end in time");
    }
    Ok((drops?, counts?, reader))
}

/// The JSON summary childflow printed on stderr (after any log lines).
fn summary_of(err: &str) -> Result<serde_json::Value> {
    err.match_indices('{')
        .filter(|(at, _)| *at == 0 || err.as_bytes()[at - 1] == b'\n')
        .find_map(|(at, _)| {
            let mut values =
                serde_json::Deserializer::from_str(&err[at..]).into_iter::<serde_json::Value>();
            values.next()?.ok().filter(|v| v.get("drops").is_some())
        })
        .with_context(|| format!("childflow printed no JSON summary: {err}"))
}

/// One run of `workload` with `capture`, files in `dir`.
fn run(o: &Options, dir: &Path, workload: Workload, capture: Capture) -> Result<Measured> {
    let tag = workload.tag();
    let file = match capture {
        Capture::None => None,
        Capture::Childflow => Some(dir.join(format!("{tag}-childflow.pcapng"))),
        Capture::Tcpdump => Some(dir.join(format!("{tag}-tcpdump.pcap"))),
        Capture::Floor => None,
    };
    let floor = match capture {
        Capture::Floor => {
            Some(Floor::start(NET.host_if, false, Some(&dir.join(format!("{tag}-floor"))))?)
        }
        _ => None,
    };
    let cf_file = if capture == Capture::Childflow { file.as_deref() } else { None };
    let mut child = childflow(o, workload, cf_file)
        .spawn()
        .with_context(|| format!("failed to run {}", o.bin.display()))?;
    let observed = observe(o, &mut child, file.as_deref(), capture);
    if observed.is_err() {
        let _ = child.kill();
    }
    let mut json = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut json)?;
    }
    let (status, cpu) = wait_with_cpu(&mut child)?;
    let floor_behind = floor.map(Floor::stop).transpose()?.flatten();
    let (tap_drops, tcpdump_counts, reader) = observed?;
    let err = reader.join().unwrap_or_default();
    if !status.success() {
        bail!("{} ({tag}) failed ({status}): {}", capture.name(), err.trim());
    }
    let v: serde_json::Value =
        serde_json::from_str(&json).with_context(|| format!("iperf3 printed no JSON: {json}"))?;
    let mut m = Measured { tap_drops, cpu, floor_behind, ..Measured::default() };
    let end = &v["end"];
    match workload {
        Workload::Tcp | Workload::TcpDown => {
            m.gbit = end["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9;
            m.seconds = end["sum_received"]["seconds"].as_f64().unwrap_or(0.0);
        }
        Workload::Udp => {
            let sent = &end["sum_sent"];
            m.gbit = sent["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9;
            m.seconds = sent["seconds"].as_f64().unwrap_or(0.0);
            let packets = sent["packets"].as_f64().unwrap_or(0.0);
            m.sent_pps = if m.seconds > 0.0 { packets / m.seconds } else { 0.0 };
        }
    }
    let summary = summary_of(&err)?;
    let totals = &summary["totals"];
    m.engine_packets =
        totals["sent_pkts"].as_u64().unwrap_or(0) + totals["recv_pkts"].as_u64().unwrap_or(0);
    match capture {
        Capture::None | Capture::Floor => {}
        Capture::Childflow => {
            let drops = summary["drops"].as_object().map(|d| d.values().filter_map(|n| n.as_u64()));
            m.drops = Some(drops.map(Iterator::sum).unwrap_or(0));
        }
        Capture::Tcpdump => {
            let (_, dropped, tcpdump_cpu) = tcpdump_counts.context("tcpdump did not run")?;
            m.drops = Some(dropped);
            m.cpu += tcpdump_cpu;
        }
    }
    if let Some(f) = &file {
        m.written = Some(count_packets(f)?);
        if !o.keep {
            let _ = std::fs::remove_file(f);
        }
    }
    Ok(m)
}

/// `cargo xtask bench capture [OPTIONS]`.
pub fn capture(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    // The bench user writes its captures into a directory of its own.
    let (copy, bin) = prepare(&o.bin)?;
    let files = o.dir.as_deref().unwrap_or(&copy).join("childflow-bench-captures");
    std::fs::create_dir_all(&files)?;
    if let Some((uid, gid)) = o.user {
        std::os::unix::fs::chown(&files, Some(uid), Some(gid))
            .context("failed to hand the capture directory to the bench user")?;
    }
    let o = Options { bin, ..o };
    let result = bench_all(&o, &files);
    if o.keep {
        println!("capture files kept in {}", files.display());
    } else {
        let _ = std::fs::remove_dir_all(&files);
    }
    // Kept files without --dir live in the temporary directory: keep that too.
    if !(o.keep && o.dir.is_none()) {
        let _ = std::fs::remove_dir_all(&copy);
    }
    result
}

fn bench_all(o: &Options, dir: &Path) -> Result<()> {
    let _dest = Destination::new(&NET, None)?;
    println!(
        "rootless backend, iperf3 to {} for {} s per run, MTU {}; UDP datagrams of {} bytes; \
         median of {} rounds",
        NET.server, o.seconds, o.mtu, o.udp_len, o.rounds
    );
    // What the capture directory takes, before and after the rounds (a shared disk's rate
    // moves): the bound under a whole capture's cost of a transfer faster than that.
    let before = floor::write_rate(dir, 2.0)?;
    // On a shared machine one run says little: the rows alternate, round after round, and
    // each row shows its median run (its cost: the median of its per-round ratios).
    let mut results = Vec::new();
    for workload in Workload::ALL {
        let tag = workload.tag();
        if o.only.as_deref().is_some_and(|only| only != tag) {
            continue;
        }
        // Per round, each row's run (none for a row that failed, or does not run here).
        let mut rounds: Vec<[Option<Measured>; CAPTURES.len()]> = Vec::new();
        let mut errors: [Option<anyhow::Error>; CAPTURES.len()] = Default::default();
        let primary = |m: &Measured| match workload {
            Workload::Tcp | Workload::TcpDown => m.gbit,
            Workload::Udp => per_sec(m.engine_packets, m).unwrap_or(0.0),
        };
        for round in 1..=o.rounds {
            let mut runs: [Option<Measured>; CAPTURES.len()] = Default::default();
            for (i, capture) in CAPTURES.into_iter().enumerate() {
                if !capture.runs_for(workload) {
                    continue;
                }
                let what = match workload {
                    Workload::Tcp => "bulk TCP",
                    Workload::TcpDown => "bulk TCP down",
                    Workload::Udp => "small UDP",
                };
                eprintln!("bench: {what}, {} (round {round}/{}) ...", capture.name(), o.rounds);
                match run(o, dir, workload, capture) {
                    Ok(m) => runs[i] = Some(m),
                    Err(e) => {
                        eprintln!("{what}, {}: {e:#}", capture.name());
                        errors[i] = Some(e);
                    }
                }
            }
            rounds.push(runs);
        }
        // A row's cost: the median of its per-round ratios to the first row (the runs of a
        // round are close in time, so a change of load hits both sides of each pair).
        let costs: [Option<f64>; CAPTURES.len()] = std::array::from_fn(|i| {
            let mut ratios: Vec<f64> = rounds
                .iter()
                .filter_map(|r| {
                    let base = primary(r[0].as_ref()?);
                    let row = primary(r[i].as_ref()?);
                    (base > 0.0).then(|| row / base - 1.0)
                })
                .collect();
            ratios.sort_by(f64::total_cmp);
            (i > 0 && !ratios.is_empty()).then(|| ratios[ratios.len() / 2])
        });
        for (i, (capture, err)) in CAPTURES.into_iter().zip(errors).enumerate() {
            if !capture.runs_for(workload) {
                continue;
            }
            let mut ms: Vec<Measured> = rounds.iter_mut().filter_map(|r| r[i].take()).collect();
            let behind = ms.iter().filter_map(|m| m.floor_behind).reduce(f64::max);
            ms.sort_by(|a, b| primary(a).total_cmp(&primary(b)));
            let n = ms.len();
            let median = (n > 0).then(|| ms.swap_remove(n / 2));
            let r = median.ok_or_else(|| err.unwrap_or_else(|| anyhow::anyhow!("no run")));
            let row = r.map(|median| Row { median, cost: costs[i], behind });
            results.push((workload, capture, row));
        }
    }
    let disk = DiskRate { before, after: floor::write_rate(dir, 2.0)? };
    print_tables(&results, dir, &disk);
    Ok(())
}

const CAPTURES: [Capture; 4] =
    [Capture::None, Capture::Childflow, Capture::Tcpdump, Capture::Floor];

/// A row of a workload's table, from its runs of every round.
struct Row {
    median: Measured,
    /// Against the first row: the median of the per-round ratios.
    cost: Option<f64>,
    /// The floor's row: the most its writes fell behind in any round.
    behind: Option<f64>,
}

type Results = [(Workload, Capture, Result<Row>)];

/// Per second of iperf3's run.
fn per_sec(n: u64, m: &Measured) -> Option<f64> {
    (m.seconds > 0.0).then(|| n as f64 / m.seconds)
}

fn kilo(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{:.0}k", v / 1e3))
}

/// `disk`: what the capture directory `dir` took before and after the rounds.
fn print_tables(results: &Results, dir: &Path, disk: &DiskRate) {
    let get = |w: Workload, c: Capture| {
        let row = results.iter().find(|(rw, rc, _)| *rw == w && *rc == c);
        row.and_then(|(_, _, r)| r.as_ref().ok())
    };
    let median_run = |w: Workload, c: Capture| get(w, c).map(|row| &row.median);
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for workload in Workload::ALL {
        if !results.iter().any(|(w, _, _)| *w == workload) {
            continue;
        }
        let base = median_run(workload, Capture::None);
        let tcpdump = median_run(workload, Capture::Tcpdump);
        let (title, rate) = match workload {
            Workload::Tcp => ("bulk TCP (one flow, command → server)", "Gbit/s"),
            Workload::TcpDown => ("bulk TCP (one flow, server → command, iperf3 -R)", "Gbit/s"),
            Workload::Udp => ("small UDP (iperf3 -u -b 0)", "sent pkt/s"),
        };
        println!("\n{title}");
        println!(
            "{:<13} {:>10} {:>7} {:>8} {:>7} {:>11} {:>9} {:>9} {:>10} {:>7} {:>10}",
            "",
            rate,
            "cost",
            "CPU s/GB",
            "CPU +",
            "engine pkt/s",
            "tap drop",
            "written",
            "written/s",
            "drops",
            "vs tcpdump"
        );
        for capture in CAPTURES {
            if !capture.runs_for(workload) {
                continue;
            }
            let Some(Row { median: m, cost, .. }) = get(workload, capture) else {
                println!("{:<13} failed", capture.name());
                continue;
            };
            let shown = match workload {
                Workload::Tcp | Workload::TcpDown => format!("{:.2}", m.gbit),
                Workload::Udp => kilo(Some(m.sent_pps)),
            };
            let cost = cost.map_or("-".to_string(), |c| format!("{:+.1}%", c * 100.0));
            let cpu_gb = |m: &Measured| m.cpu_per_gb().filter(|_| workload.is_tcp());
            let cpu_cost = match (capture, cpu_gb(m), base.and_then(cpu_gb)) {
                (Capture::None, _, _) => "-".to_string(),
                (_, Some(a), Some(b)) => format!("{:+.1}%", (a / b - 1.0) * 100.0),
                _ => "-".into(),
            };
            let written_ps = |m: &Measured| m.written.and_then(|n| per_sec(n, m));
            // Packets written per second, relative to tcpdump's on the same traffic.
            let ratio = match (capture, written_ps(m), tcpdump.and_then(written_ps)) {
                (Capture::Childflow, Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            println!(
                "{:<13} {:>10} {:>7} {:>8} {:>7} {:>11} {:>9} {:>9} {:>10} {:>7} {:>10}",
                capture.name(),
                shown,
                cost,
                cpu_gb(m).map_or("-".into(), |v| format!("{v:.3}")),
                cpu_cost,
                kilo(per_sec(m.engine_packets, m)),
                m.tap_drops,
                opt(m.written),
                kilo(written_ps(m)),
                opt(m.drops),
                ratio
            );
        }
        if let (true, Some(base)) = (workload.is_tcp(), base) {
            println!("{}", disk.describe(dir, base.gbit));
        }
        let floor = get(workload, Capture::Floor);
        let behind = floor.and_then(|row| row.behind);
        let childflow = get(workload, Capture::Childflow).and_then(|row| row.cost);
        if let (Some(capture), Some(least), Some(base)) =
            (childflow, floor.and_then(|row| row.cost), base.filter(|_| workload.is_tcp()))
        {
            let bound = disk.bound(base.gbit);
            println!("{}", floor::verdict(capture, Capture::Floor.name(), least, behind, bound));
        }
        if let Some(behind) = behind.filter(|_| floor::fell_behind(behind)) {
            println!(
                "floor: write fell up to {:.0}% of the bytes behind the transfer (worst round): \
                 the disk took them slower than\nthe transfer moved them, so that row is no \
                 floor (a capture that keeps every packet slows the transfer instead)",
                behind * 100.0
            );
        }
    }
    println!(
        "\ncost: against the first row, the median of the per-round ratios (TCP: throughput; \
         UDP: packets through the engine);\nthe other columns are each row's median run. \
         CPU s/GB (TCP): CPU seconds of childflow, the command tree and tcpdump\nper GB iperf3 \
         moved; CPU +: that against the first row (less moved by other load than throughput).\n\
         tap drop: frames the kernel dropped because the engine read the tap too slowly (before \
         any capture point).\ndrops: childflow's capture drops / tcpdump's \"dropped by kernel\".\n\
         floor: write: no capture, and a thread writing as many bytes as the transfer moved to \
         a file beside it (O_DIRECT on a disk),\nnothing else: a floor under any capture's cost."
    );
}
