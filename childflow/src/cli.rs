//! Command-line arguments, and their validation into a [`Config`] before anything touches the
//! host (ripgrep's split: low-level `Args` straight from clap, high-level `Config` checked).

use std::{ffi::OsString, net::IpAddr, path::PathBuf, time::Duration};

use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};

const AFTER_HELP: &str = "\
EXIT STATUS:
    The command's own exit status; 128+N if it was killed by signal N.
    125  childflow itself failed (bad arguments, missing privileges or kernel features)
    126  the command was found but could not be executed
    127  the command was not found

EXAMPLES:
    childflow -- curl -sI https://example.com
    childflow --flow-log flows.jsonl --summary -- make test
    sudo childflow --root -c run.pcapng --tls-keylog -- ./installer.sh
    childflow report flows.jsonl --format markdown";

/// Run a command in a network namespace of its own and see everything it does on the network.
#[derive(Debug, Parser)]
#[command(
    name = "childflow",
    version = crate::VERSION,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Args {
    #[command(subcommand)]
    pub subcommand: Option<Command>,

    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands other than running a command.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Re-read a flow log written with --flow-log and print its summary.
    Report(ReportArgs),
    /// Open the live dashboard of a run started in another terminal.
    Attach(AttachArgs),
    /// List the live runs of this user that `attach` can open.
    Ps,
}

/// `childflow report`.
#[derive(Debug, ClapArgs)]
pub struct ReportArgs {
    /// The flow log (JSON Lines, as written by --flow-log) to read; `-` for stdin.
    pub flow_log: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    pub format: ReportFormat,
}

/// `childflow attach`.
#[derive(Debug, ClapArgs)]
pub struct AttachArgs {
    /// The run to attach to (its id or pid, from `childflow ps`); the newest if omitted.
    pub run: Option<String>,
}

/// Options for running a command.
#[derive(Debug, ClapArgs)]
pub struct RunArgs {
    /// Use the rootful backend: a veth pair and NAT set up by childflow, eBPF accounting and
    /// capture in the kernel. Needs root (e.g. through sudo); the command still runs as the
    /// invoking user.
    #[arg(long, help_heading = "Backend")]
    pub root: bool,

    /// The DNS resolver the command uses. Default: childflow's relay to the host's resolvers.
    #[arg(short = 'd', long, value_name = "IP", help_heading = "Backend")]
    pub dns: Option<IpAddr>,

    /// Rootless: let the command reach services on the host's loopback (through the
    /// gateway address). Off by default.
    #[arg(long, help_heading = "Backend")]
    pub allow_host_loopback: bool,

    /// Rootless: the MTU of the command's network interface.
    #[arg(long, value_name = "BYTES", default_value_t = 65520, help_heading = "Backend")]
    pub mtu: u32,

    /// Write a flow log to PATH (`-` for stdout), one record per finished flow.
    #[arg(long, value_name = "PATH", help_heading = "Flow log")]
    pub flow_log: Option<PathBuf>,

    /// Flow log format.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = FlowLogFormat::Jsonl, help_heading = "Flow log")]
    pub flow_log_format: FlowLogFormat,

    /// How often long-lived flows get an update record in the flow log (e.g. 5s, 500ms, 1m).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration, help_heading = "Flow log")]
    pub flow_update_interval: Duration,

    /// Seed of the Community ID flow hash.
    #[arg(long, value_name = "N", default_value_t = 0, help_heading = "Flow log")]
    pub community_id_seed: u16,

    /// At most this many live flows are tracked; older ones are evicted and counted.
    #[arg(long, value_name = "N", default_value_t = 100_000, help_heading = "Flow log")]
    pub max_flows: usize,

    /// Print a summary of the run to stderr when the command exits.
    #[arg(long, help_heading = "Summary")]
    pub summary: bool,

    /// Summary format (implies --summary).
    #[arg(long, value_enum, value_name = "FORMAT", help_heading = "Summary")]
    pub summary_format: Option<SummaryFormat>,

    /// Write every packet of the command tree to a pcapng file.
    #[arg(short = 'c', long, value_name = "PATH", help_heading = "Capture")]
    pub capture: Option<PathBuf>,

    /// Capture only packets matching EXPR, e.g. `tcp and port 443`, `not udp`,
    /// `host 198.18.0.1`, `net 2001:db8::/32`, `out` (see docs/capture.md).
    #[arg(long, value_name = "EXPR", requires = "capture", help_heading = "Capture")]
    pub capture_filter: Option<String>,

    /// Capture at most this many bytes of each packet.
    #[arg(long, value_name = "BYTES", default_value_t = 262_144, help_heading = "Capture")]
    pub snaplen: u32,

    /// Start a new capture file when the current one reaches SIZE (e.g. 100M, 1G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "capture", help_heading = "Capture")]
    pub capture_max_size: Option<u64>,

    /// With --capture-max-size: keep at most N files, overwriting the oldest (a ring).
    #[arg(long, value_name = "N", requires = "capture_max_size", help_heading = "Capture")]
    pub capture_files: Option<u32>,

    /// With --root: memory the kernel keeps captured packets in while the capture's writer
    /// catches up (rounded up to a power of two; 4M to 2G). More keeps a bulk capture from
    /// losing packets while the disk lags, at the cost of that memory and of start-up time
    /// (the kernel clears it).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "capture", help_heading = "Capture")]
    pub capture_buffer: Option<u64>,

    /// Give the command SSLKEYLOGFILE and embed its TLS secrets in the capture, so Wireshark
    /// decrypts its TLS without configuration.
    #[arg(long, requires = "capture", help_heading = "Capture")]
    pub tls_keylog: bool,

    /// Show a live dashboard of the command's flows (the command runs in a pane of it).
    #[arg(long, help_heading = "Live view")]
    pub tui: bool,

    /// With --tui: leave the dashboard as soon as the command exits.
    #[arg(long, requires = "tui", help_heading = "Live view")]
    pub tui_exit: bool,

    /// Stream live updates as JSON lines to PATH (`-` for stdout).
    #[arg(long, value_name = "PATH", help_heading = "Live view")]
    pub events: Option<PathBuf>,

    /// More diagnostics on stderr (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count, help_heading = "Diagnostics")]
    pub verbose: u8,

    /// The command to run, after `--`.
    #[arg(last = true, value_name = "COMMAND", required = true, num_args = 1..)]
    pub command: Vec<OsString>,
}

/// Flow log formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FlowLogFormat {
    /// JSON Lines, one record per line (docs/flow-log.md).
    Jsonl,
    /// Comma-separated values with a header row.
    Csv,
}

/// Summary formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SummaryFormat {
    Text,
    Json,
}

/// `report` output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Text,
    Markdown,
    Json,
}

/// Which backend runs the command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// User + net + mount namespaces, tap device, userspace TCP/IP engine.
    Rootless,
    /// veth + NAT + eBPF, needs root.
    Rootful,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Rootless => "rootless",
            Backend::Rootful => "rootful",
        })
    }
}

/// A validated run configuration: everything checked that can be checked without touching
/// the host.
#[derive(Debug, Clone)]
pub struct Config {
    pub backend: Backend,
    pub command: Vec<OsString>,
    pub dns: Option<IpAddr>,
    pub allow_host_loopback: bool,
    pub mtu: u32,
    pub flow_log: Option<PathBuf>,
    pub flow_log_format: FlowLogFormat,
    pub flow_update_interval: Duration,
    pub community_id_seed: u16,
    pub max_flows: usize,
    pub summary: Option<SummaryFormat>,
    pub capture: Option<CaptureConfig>,
    pub tui: bool,
    pub tui_exit: bool,
    pub events: Option<PathBuf>,
    pub verbose: u8,
    /// Extra environment for the command, set up by the run (e.g. `SSLKEYLOGFILE` for
    /// `--tls-keylog`); empty after validation.
    pub command_env: Vec<(OsString, OsString)>,
    /// Not an argument: the pty `--tui` gives the command as its terminal, set by
    /// `run` before the backend starts (see `sandbox::Spec::terminal`).
    pub terminal: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
}

/// Capture settings.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    pub path: PathBuf,
    pub filter: Option<String>,
    pub snaplen: u32,
    pub max_size: Option<u64>,
    pub files: Option<u32>,
    pub tls_keylog: bool,
    /// Bytes of the rootful backend's kernel packet ring (`--capture-buffer` rounded up to a
    /// power of two, else [`DEFAULT_CAPTURE_BUFFER`]); its capture tap holds about as much.
    pub buffer: u32,
}

/// The rootful backend's kernel packet ring when capturing, without `--capture-buffer`.
pub const DEFAULT_CAPTURE_BUFFER: u32 = 64 << 20;

/// `--capture-buffer` bounds: enough for a few of the largest records and the kernel's
/// batched wake-ups (one per MiB), and the largest ring a `u32` size allows.
const CAPTURE_BUFFER_MIN: u64 = 4 << 20;
const CAPTURE_BUFFER_MAX: u64 = 2 << 30;

/// Invalid arguments, said in terms of the flag to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--mtu` outside what Ethernet and the tap device allow.
    #[error("--mtu {0} is out of range: use a value from 1280 (the IPv6 minimum) to 65520")]
    Mtu(u32),
    /// `--snaplen` too small to hold any header.
    #[error("--snaplen {0} is too small: use at least 64 bytes (the default keeps whole packets)")]
    Snaplen(u32),
    /// `--max-flows 0`.
    #[error("--max-flows must be at least 1")]
    MaxFlows,
    /// `--flow-update-interval` below what makes sense.
    #[error("--flow-update-interval {0:?} is too short: use at least 100ms")]
    UpdateInterval(Duration),
    /// `--capture-files` of 0 or 1 with rotation.
    #[error("--capture-files {0} is too small: a ring needs at least 2 files")]
    CaptureFiles(u32),
    /// `--capture-max-size` too small to hold a packet.
    #[error("--capture-max-size {} is too small: use at least 64K", Size(*.0))]
    CaptureMaxSize(u64),
    /// `--capture-buffer` outside what the kernel's ring takes.
    #[error("--capture-buffer {} is out of range: use 4M to 2G", Size(*.0))]
    CaptureBuffer(u64),
    /// `--capture-buffer` only sizes the rootful backend's kernel ring.
    #[error(
        "--capture-buffer applies to --root only: the rootless backend holds the command's traffic back while the capture catches up, and loses no packet"
    )]
    CaptureBufferRootless,
    /// Two outputs would both write to stdout.
    #[error("{0} and {1} both write to stdout (`-`); send one of them to a file")]
    StdoutTwice(&'static str, &'static str),
    /// `--allow-host-loopback` only applies to the rootless engine.
    #[error(
        "--allow-host-loopback applies to the rootless backend only; with --root the host is reachable through the veth"
    )]
    LoopbackWithRoot,
    /// `--capture-filter` does not parse.
    #[error("invalid --capture-filter: {error}\n{}\n(see docs/capture.md for the filter language)", error.caret(expr))]
    CaptureFilter { expr: String, error: crate::capture::filter::FilterError },
    /// The command to run is empty.
    #[error("no command given: put it after `--`, e.g. `childflow -- curl https://example.com`")]
    NoCommand,
}

impl RunArgs {
    /// Checks the arguments and turns them into a [`Config`].
    pub fn into_config(self) -> Result<Config, ConfigError> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(ConfigError::NoCommand);
        }
        if !(1280..=65520).contains(&self.mtu) {
            return Err(ConfigError::Mtu(self.mtu));
        }
        if self.snaplen < 64 {
            return Err(ConfigError::Snaplen(self.snaplen));
        }
        if self.max_flows == 0 {
            return Err(ConfigError::MaxFlows);
        }
        if self.flow_update_interval < Duration::from_millis(100) {
            return Err(ConfigError::UpdateInterval(self.flow_update_interval));
        }
        if let Some(n) = self.capture_files
            && n < 2
        {
            return Err(ConfigError::CaptureFiles(n));
        }
        if let Some(size) = self.capture_max_size
            && size < 64 * 1024
        {
            return Err(ConfigError::CaptureMaxSize(size));
        }
        if let Some(size) = self.capture_buffer {
            if !self.root {
                return Err(ConfigError::CaptureBufferRootless);
            }
            if !(CAPTURE_BUFFER_MIN..=CAPTURE_BUFFER_MAX).contains(&size) {
                return Err(ConfigError::CaptureBuffer(size));
            }
        }
        if self.root && self.allow_host_loopback {
            return Err(ConfigError::LoopbackWithRoot);
        }
        let stdout = |p: &Option<PathBuf>| p.as_deref().is_some_and(|p| p.as_os_str() == "-");
        if stdout(&self.flow_log) && stdout(&self.events) {
            return Err(ConfigError::StdoutTwice("--flow-log", "--events"));
        }
        if stdout(&self.capture) && stdout(&self.flow_log) {
            return Err(ConfigError::StdoutTwice("--capture", "--flow-log"));
        }
        if stdout(&self.capture) && stdout(&self.events) {
            return Err(ConfigError::StdoutTwice("--capture", "--events"));
        }
        if let Some(expr) = &self.capture_filter
            && let Err(error) = crate::capture::filter::Filter::parse(expr)
        {
            return Err(ConfigError::CaptureFilter { expr: expr.clone(), error });
        }
        let summary = self.summary_format.or(self.summary.then_some(SummaryFormat::Text));
        let capture = self.capture.map(|path| CaptureConfig {
            path,
            filter: self.capture_filter,
            snaplen: self.snaplen,
            max_size: self.capture_max_size,
            files: self.capture_files,
            tls_keylog: self.tls_keylog,
            // In range (checked above), so the power of two is at most 2^31.
            buffer: self
                .capture_buffer
                .map_or(DEFAULT_CAPTURE_BUFFER, |b| b.next_power_of_two() as u32),
        });
        Ok(Config {
            backend: if self.root { Backend::Rootful } else { Backend::Rootless },
            command: self.command,
            dns: self.dns,
            allow_host_loopback: self.allow_host_loopback,
            mtu: self.mtu,
            flow_log: self.flow_log,
            flow_log_format: self.flow_log_format,
            flow_update_interval: self.flow_update_interval,
            community_id_seed: self.community_id_seed,
            max_flows: self.max_flows,
            summary,
            capture,
            tui: self.tui,
            tui_exit: self.tui_exit,
            events: self.events,
            verbose: self.verbose,
            command_env: Vec::new(),
            terminal: None,
        })
    }
}

/// Parses `500ms`, `5s`, `2m`, `1h` (a bare number means seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 =
        num.parse().map_err(|_| format!("`{s}` is not a duration; write e.g. 500ms, 5s or 2m"))?;
    let scale = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("unknown unit `{unit}` in `{s}`; use ms, s, m or h")),
    };
    Ok(Duration::from_secs_f64(value * scale))
}

/// Parses `4096`, `64K`, `100M`, `1G` (binary multiples; `KiB`/`MB` spellings accepted).
/// A size as [`parse_size`] reads it: in the largest unit it is a whole number of (`3M`),
/// else in bytes.
struct Size(u64);

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')]
            .into_iter()
            .find(|(shift, _)| self.0 != 0 && self.0.trailing_zeros() >= *shift);
        match unit {
            Some((shift, unit)) => write!(f, "{}{unit}", self.0 >> shift),
            None => write!(f, "{}", self.0),
        }
    }
}

/// Reads a size: a number with an optional unit K, M, G or T (powers of 1024; a trailing
/// `B` or `iB` is allowed), e.g. `64K`, `100MiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: u64 =
        num.parse().map_err(|_| format!("`{s}` is not a size; write e.g. 64K, 100M or 1G"))?;
    let shift = match unit.to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("unknown unit `{unit}` in `{s}`; use K, M, G or T")),
    };
    value.checked_mul(1 << shift).ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("childflow").chain(args.iter().copied()))
    }

    fn config(args: &[&str]) -> Result<Config, ConfigError> {
        parse(args).unwrap().run.into_config()
    }

    #[test]
    fn the_command_comes_after_double_dash_even_if_it_looks_like_a_subcommand() {
        let args = parse(&["--root", "--", "report", "-x"]).unwrap();
        assert!(args.subcommand.is_none());
        assert_eq!(args.run.command, ["report", "-x"]);
        assert!(args.run.root);
    }

    #[test]
    fn subcommands_parse_without_a_command() {
        let args = parse(&["report", "flows.jsonl", "--format", "markdown"]).unwrap();
        let Some(Command::Report(r)) = args.subcommand else { panic!("not report") };
        assert_eq!(r.format, ReportFormat::Markdown);
        assert!(matches!(parse(&["ps"]).unwrap().subcommand, Some(Command::Ps)));
    }

    #[test]
    fn a_run_without_a_command_is_an_error() {
        assert!(parse(&["--root"]).is_err());
    }

    #[test]
    fn bad_values_name_the_flag() {
        assert_eq!(config(&["--mtu", "100", "--", "true"]).unwrap_err(), ConfigError::Mtu(100));
        assert_eq!(
            config(&["--flow-log", "-", "--events", "-", "--", "true"]).unwrap_err(),
            ConfigError::StdoutTwice("--flow-log", "--events")
        );
        assert!(config(&["--mtu", "100", "--", "true"]).unwrap_err().to_string().contains("--mtu"));
        let err = config(&["-c", "x.pcapng", "--capture-filter", "tcp and prot 80", "--", "true"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("at column 9") && err.contains("          ^"), "{err}");
        let err = parse(&["--capture-filter", "tcp", "--", "true"]).unwrap_err();
        assert!(err.to_string().contains("--capture"), "{err}");
        let err = parse(&["--capture-buffer", "8M", "--", "true"]).unwrap_err();
        assert!(err.to_string().contains("--capture"), "{err}");
    }

    #[test]
    fn the_capture_buffer_sizes_the_rootful_ring_only() {
        let buffer = |args: &[&str]| {
            let mut all = vec!["--root", "-c", "x.pcapng"];
            all.extend_from_slice(args);
            all.extend_from_slice(&["--", "true"]);
            config(&all).map(|c| c.capture.unwrap().buffer)
        };
        assert_eq!(buffer(&[]), Ok(DEFAULT_CAPTURE_BUFFER));
        assert_eq!(buffer(&["--capture-buffer", "256M"]), Ok(256 << 20));
        // Rounded up to the power of two the kernel's ring needs.
        assert_eq!(buffer(&["--capture-buffer", "100M"]), Ok(128 << 20));
        assert_eq!(buffer(&["--capture-buffer", "2G"]), Ok(2 << 30));
        assert_eq!(buffer(&["--capture-buffer", "1M"]), Err(ConfigError::CaptureBuffer(1 << 20)));
        assert_eq!(buffer(&["--capture-buffer", "3G"]), Err(ConfigError::CaptureBuffer(3 << 30)));
        let rootless = config(&["-c", "x.pcapng", "--capture-buffer", "8M", "--", "true"]);
        assert_eq!(rootless.unwrap_err(), ConfigError::CaptureBufferRootless);
    }

    #[test]
    fn summary_format_implies_summary() {
        let c = config(&["--summary-format", "json", "--", "true"]).unwrap();
        assert_eq!(c.summary, Some(SummaryFormat::Json));
        assert_eq!(
            config(&["--summary", "--", "true"]).unwrap().summary,
            Some(SummaryFormat::Text)
        );
        assert_eq!(config(&["--", "true"]).unwrap().summary, None);
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("3 parsecs").is_err());
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("100MiB").unwrap(), 100 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert!(parse_size("1X").is_err());
        for size in ["64K", "3M", "2G", "1T", "1000", "0"] {
            assert_eq!(Size(parse_size(size).unwrap()).to_string(), size);
        }
        assert_eq!(Size(1536 << 10).to_string(), "1536K");
    }
}
