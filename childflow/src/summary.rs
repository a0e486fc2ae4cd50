//! The run summary: `--summary` at exit and `childflow report` offline compute it the same
//! way, from the same flow log records ([`crate::sink::schema`]), so both always agree.
//!
//! Only end records count towards totals (an update record is a snapshot of a flow that
//! also gets an end record). A log cut short (childflow killed with SIGKILL) can hold flows
//! with updates but no end: [`SummaryBuilder::finish`] counts their last update and says how
//! many there were in `incomplete_flows`.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::IpAddr,
};

use crate::sink::schema::{DnsRecord, FlowRecord, FlowRecordKind, RunRecord, Totals};

/// Rows shown in the "top" tables.
const TOP: usize = 10;

/// Traffic of one protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProtoRow {
    pub proto: String,
    pub flows: u64,
    pub sent_ip_bytes: u64,
    pub recv_ip_bytes: u64,
}

/// Traffic to one peer address.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DestinationRow {
    pub addr: String,
    /// DNS names the command resolved to reach it.
    pub names: Vec<String>,
    /// Peer ports (ICMP: codes), ascending, at most 8.
    pub ports: Vec<u16>,
    pub protos: Vec<String>,
    pub flows: u64,
    pub sent_ip_bytes: u64,
    pub recv_ip_bytes: u64,
}

/// One name the command resolved.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DnsNameRow {
    pub name: String,
    /// Query types asked (`A`, `AAAA`, ...).
    pub qtypes: Vec<String>,
    pub queries: u64,
    /// Responses that were not NOERROR.
    pub failures: u64,
    /// Flows to addresses this name resolved to, and their bytes both ways.
    pub flows: u64,
    pub ip_bytes: u64,
}

/// One process of the command tree.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessRow {
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub flows: u64,
    pub sent_ip_bytes: u64,
    pub recv_ip_bytes: u64,
}

/// Everything `--summary` and `report` show.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub command: Vec<String>,
    pub backend: String,
    pub exit_code: Option<i32>,
    pub status: String,
    pub error: Option<String>,
    pub ts: f64,
    pub duration: f64,
    pub totals: Totals,
    pub by_proto: Vec<ProtoRow>,
    /// By bytes both ways, largest first, at most 10.
    pub top_destinations: Vec<DestinationRow>,
    /// By queries, then bytes, at most 10.
    pub top_dns_names: Vec<DnsNameRow>,
    /// Processes with flows, by bytes; flows without a known process are not listed.
    pub processes: Vec<ProcessRow>,
    pub drops: BTreeMap<String, u64>,
    pub evictions: u64,
    /// Flows with update records but no end record (a log cut short).
    pub incomplete_flows: u64,
}

/// Accumulates records into a [`Summary`].
#[derive(Default)]
pub struct SummaryBuilder {
    totals: Totals,
    protos: BTreeMap<String, ProtoRow>,
    dests: HashMap<IpAddr, DestinationRow>,
    dns: HashMap<String, DnsNameRow>,
    procs: HashMap<(u32, String), ProcessRow>,
    /// Last update of flows without an end record yet.
    open: HashMap<u64, FlowRecord>,
}

impl SummaryBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a flow record; updates only count if their flow never ends in the log.
    pub fn add_flow(&mut self, f: &FlowRecord) {
        match f.event {
            FlowRecordKind::Update => {
                self.open.insert(f.uid, f.clone());
            }
            FlowRecordKind::End => {
                self.open.remove(&f.uid);
                self.count(f);
            }
        }
    }

    fn count(&mut self, f: &FlowRecord) {
        self.totals.add(f);
        let (_, sent, _) = f.sent();
        let (_, recv, _) = f.received();
        let p = self.protos.entry(f.proto.clone()).or_default();
        p.proto.clone_from(&f.proto);
        p.flows += 1;
        p.sent_ip_bytes += sent;
        p.recv_ip_bytes += recv;

        let d = self.dests.entry(f.remote_h()).or_default();
        d.flows += 1;
        d.sent_ip_bytes += sent;
        d.recv_ip_bytes += recv;
        let port = f.remote_p();
        if !d.ports.contains(&port) && d.ports.len() < 8 {
            d.ports.push(port);
            d.ports.sort_unstable();
        }
        if !d.protos.contains(&f.proto) {
            d.protos.push(f.proto.clone());
        }
        if let Some(dns) = &f.dns {
            for n in &dns.names {
                if !d.names.iter().any(|m| m.eq_ignore_ascii_case(n)) {
                    d.names.push(n.clone());
                }
            }
            let row = self.dns_row(&dns.query);
            row.flows += 1;
            row.ip_bytes += sent + recv;
        }
        if let Some(proc) = &f.process {
            let row = self.procs.entry((proc.pid, proc.comm.clone())).or_default();
            row.pid = proc.pid;
            row.comm.clone_from(&proc.comm);
            if row.exe.is_none() {
                row.exe.clone_from(&proc.exe);
            }
            row.flows += 1;
            row.sent_ip_bytes += sent;
            row.recv_ip_bytes += recv;
        }
    }

    fn dns_row(&mut self, name: &str) -> &mut DnsNameRow {
        let row = self.dns.entry(name.to_ascii_lowercase()).or_default();
        if row.name.is_empty() {
            row.name = name.to_string();
        }
        row
    }

    /// Adds a DNS response record.
    pub fn add_dns(&mut self, d: &DnsRecord) {
        let row = self.dns_row(&d.query);
        row.queries += 1;
        if d.rcode != 0 {
            row.failures += 1;
        }
        if !row.qtypes.contains(&d.qtype_name) {
            row.qtypes.push(d.qtype_name.clone());
        }
    }

    /// The totals of the end records so far.
    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    /// The summary, with the run's facts from `run` (its `totals` are ignored: they are
    /// recomputed from the flows, so a report of a cut-short log is still consistent).
    pub fn finish(mut self, run: &RunRecord) -> Summary {
        let open: Vec<FlowRecord> = self.open.drain().map(|(_, f)| f).collect();
        let incomplete_flows = open.len() as u64;
        for f in &open {
            self.count(f);
        }
        let mut dests: Vec<(IpAddr, DestinationRow)> = self.dests.into_iter().collect();
        dests.sort_by(|(a_ip, a), (b_ip, b)| {
            (b.sent_ip_bytes + b.recv_ip_bytes)
                .cmp(&(a.sent_ip_bytes + a.recv_ip_bytes))
                .then(a_ip.cmp(b_ip))
        });
        let top_destinations = dests
            .into_iter()
            .take(TOP)
            .map(|(ip, mut row)| {
                row.addr = ip.to_string();
                row
            })
            .collect();
        let mut dns: Vec<DnsNameRow> = self.dns.into_values().collect();
        dns.sort_by(|a, b| {
            b.queries.cmp(&a.queries).then(b.ip_bytes.cmp(&a.ip_bytes)).then(a.name.cmp(&b.name))
        });
        dns.truncate(TOP);
        let mut processes: Vec<ProcessRow> = self.procs.into_values().collect();
        processes.sort_by(|a, b| {
            (b.sent_ip_bytes + b.recv_ip_bytes)
                .cmp(&(a.sent_ip_bytes + a.recv_ip_bytes))
                .then(a.pid.cmp(&b.pid))
        });
        processes.truncate(2 * TOP);
        Summary {
            command: run.command.clone(),
            backend: run.backend.clone(),
            exit_code: run.exit_code,
            status: run.status.clone(),
            error: run.error.clone(),
            ts: run.ts,
            duration: run.duration,
            totals: self.totals,
            by_proto: self.protos.into_values().collect(),
            top_destinations,
            top_dns_names: dns,
            processes,
            drops: run.drops.clone(),
            evictions: run.evictions,
            incomplete_flows,
        }
    }
}

/// `1.5 KiB`, `312 B`, `4.2 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Markdown table cells must not contain a bare `|`.
fn md(s: &str) -> String {
    s.replace('|', "\\|")
}

impl Summary {
    fn drops_line(&self) -> String {
        let lost: Vec<String> =
            self.drops.iter().filter(|(_, n)| **n > 0).map(|(s, n)| format!("{s}: {n}")).collect();
        let drops = if lost.is_empty() { "none".to_string() } else { lost.join(", ") };
        format!("drops: {drops}; evictions (--max-flows): {}", self.evictions)
    }

    fn headline(&self) -> String {
        format!(
            "{} ({}): {} after {:.2} s",
            self.command.join(" "),
            self.backend,
            self.status,
            self.duration
        )
    }

    /// Plain text for a terminal.
    pub fn to_text(&self) -> String {
        let t = &self.totals;
        let mut s = String::new();
        let _ = writeln!(s, "childflow summary: {}", self.headline());
        if let Some(e) = &self.error {
            let _ = writeln!(s, "  error: {e}");
        }
        let _ = writeln!(
            s,
            "  {}: sent {} in {}, received {} in {}",
            plural(t.flows, "flow", "flows"),
            human_bytes(t.sent_ip_bytes),
            plural(t.sent_pkts, "packet", "packets"),
            human_bytes(t.recv_ip_bytes),
            plural(t.recv_pkts, "packet", "packets"),
        );
        if !self.by_proto.is_empty() {
            let protos: Vec<String> = self
                .by_proto
                .iter()
                .map(|p| {
                    format!(
                        "{} {} ({} / {})",
                        p.proto,
                        p.flows,
                        human_bytes(p.sent_ip_bytes),
                        human_bytes(p.recv_ip_bytes)
                    )
                })
                .collect();
            let _ = writeln!(s, "  by protocol (flows, sent / received): {}", protos.join(", "));
        }
        if !self.top_destinations.is_empty() {
            let _ = writeln!(s, "  top destinations by bytes:");
            for d in &self.top_destinations {
                let names = if d.names.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", d.names.join(", "))
                };
                let ports: Vec<String> = d.ports.iter().map(u16::to_string).collect();
                let _ = writeln!(
                    s,
                    "    {}{} {} port {}: {}, sent {}, received {}",
                    d.addr,
                    names,
                    d.protos.join("/"),
                    ports.join(","),
                    plural(d.flows, "flow", "flows"),
                    human_bytes(d.sent_ip_bytes),
                    human_bytes(d.recv_ip_bytes)
                );
            }
        }
        if !self.top_dns_names.is_empty() {
            let _ = writeln!(s, "  top DNS names:");
            for n in &self.top_dns_names {
                let failed = if n.failures > 0 {
                    format!(" ({} failed)", n.failures)
                } else {
                    String::new()
                };
                let _ = writeln!(
                    s,
                    "    {} {}: {}{}, {}, {}",
                    n.name,
                    n.qtypes.join("/"),
                    plural(n.queries, "query", "queries"),
                    failed,
                    plural(n.flows, "flow", "flows"),
                    human_bytes(n.ip_bytes)
                );
            }
        }
        if !self.processes.is_empty() {
            let _ = writeln!(s, "  processes:");
            for p in &self.processes {
                let _ = writeln!(
                    s,
                    "    {} {}: {}, sent {}, received {}",
                    p.pid,
                    p.comm,
                    plural(p.flows, "flow", "flows"),
                    human_bytes(p.sent_ip_bytes),
                    human_bytes(p.recv_ip_bytes)
                );
            }
        }
        if self.incomplete_flows > 0 {
            let _ = writeln!(
                s,
                "  {} had no end record (log cut short); their last update is counted",
                plural(self.incomplete_flows, "flow", "flows")
            );
        }
        let _ = writeln!(s, "  {}", self.drops_line());
        s
    }

    /// GitHub-flavoured Markdown, for pasting into an issue or a CI job summary.
    pub fn to_markdown(&self) -> String {
        let t = &self.totals;
        let mut s = String::new();
        let _ = writeln!(s, "## childflow run: `{}`\n", self.command.join(" ").replace('`', "'"));
        let _ = writeln!(
            s,
            "{} backend, {} after {:.2} s.\n",
            self.backend, self.status, self.duration
        );
        if let Some(e) = &self.error {
            let _ = writeln!(s, "**Error:** {e}\n");
        }
        let _ = writeln!(s, "| | flows | packets | bytes (IP) | payload |");
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        let _ = writeln!(
            s,
            "| sent | {} | {} | {} | {} |",
            t.flows, t.sent_pkts, t.sent_ip_bytes, t.sent_bytes
        );
        let _ = writeln!(
            s,
            "| received | | {} | {} | {} |\n",
            t.recv_pkts, t.recv_ip_bytes, t.recv_bytes
        );
        if !self.by_proto.is_empty() {
            let _ = writeln!(s, "### By protocol\n\n| protocol | flows | sent | received |");
            let _ = writeln!(s, "|---|---:|---:|---:|");
            for p in &self.by_proto {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} |",
                    p.proto, p.flows, p.sent_ip_bytes, p.recv_ip_bytes
                );
            }
            s.push('\n');
        }
        if !self.top_destinations.is_empty() {
            let _ = writeln!(
                s,
                "### Top destinations\n\n| address | names | ports | flows | sent | received |"
            );
            let _ = writeln!(s, "|---|---|---|---:|---:|---:|");
            for d in &self.top_destinations {
                let ports: Vec<String> = d.ports.iter().map(u16::to_string).collect();
                let _ = writeln!(
                    s,
                    "| {} | {} | {} {} | {} | {} | {} |",
                    d.addr,
                    md(&d.names.join(", ")),
                    d.protos.join("/"),
                    ports.join(","),
                    d.flows,
                    d.sent_ip_bytes,
                    d.recv_ip_bytes
                );
            }
            s.push('\n');
        }
        if !self.top_dns_names.is_empty() {
            let _ = writeln!(
                s,
                "### Top DNS names\n\n| name | types | queries | failed | flows | bytes |"
            );
            let _ = writeln!(s, "|---|---|---:|---:|---:|---:|");
            for n in &self.top_dns_names {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    md(&n.name),
                    n.qtypes.join("/"),
                    n.queries,
                    n.failures,
                    n.flows,
                    n.ip_bytes
                );
            }
            s.push('\n');
        }
        if !self.processes.is_empty() {
            let _ = writeln!(s, "### Processes\n\n| pid | command | flows | sent | received |");
            let _ = writeln!(s, "|---:|---|---:|---:|---:|");
            for p in &self.processes {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} |",
                    p.pid,
                    md(&p.comm),
                    p.flows,
                    p.sent_ip_bytes,
                    p.recv_ip_bytes
                );
            }
            s.push('\n');
        }
        if self.incomplete_flows > 0 {
            let _ = writeln!(
                s,
                "{} had no end record (log cut short); their last update is counted.\n",
                plural(self.incomplete_flows, "flow", "flows")
            );
        }
        let _ = writeln!(s, "{}", self.drops_line().replace("--max-flows", "`--max-flows`"));
        s
    }

    /// Pretty-printed JSON.
    pub fn to_json(&self) -> String {
        let mut s =
            serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::schema::fixtures::{run_record, sample_run};

    fn sample_summary() -> Summary {
        let (dns, flows) = sample_run();
        let mut b = SummaryBuilder::new();
        dns.iter().for_each(|d| b.add_dns(d));
        flows.iter().for_each(|f| b.add_flow(f));
        b.finish(&run_record(&flows))
    }

    #[test]
    fn totals_each_way_and_by_protocol() {
        let s = sample_summary();
        assert_eq!(s.totals.flows, 3);
        assert_eq!(s.totals.sent_pkts, 4 + 1 + 1);
        assert_eq!(s.totals.sent_ip_bytes, 316 + 60 + 60);
        assert_eq!(s.totals.recv_ip_bytes, (60 + 1052 + 52) + 40 + 120);
        let protos: Vec<(&str, u64)> =
            s.by_proto.iter().map(|p| (p.proto.as_str(), p.flows)).collect();
        assert_eq!(protos, [("tcp", 2), ("udp", 1)]);
    }

    #[test]
    fn top_destinations_are_by_bytes_with_their_names() {
        let s = sample_summary();
        let d = &s.top_destinations[0];
        assert_eq!(d.addr, "198.18.0.1");
        assert_eq!(d.names, ["www.example.test", "example.test"]);
        assert_eq!(d.ports, [80]);
        assert_eq!(s.top_destinations.len(), 3);
    }

    #[test]
    fn dns_names_and_processes() {
        let s = sample_summary();
        let n = &s.top_dns_names[0];
        assert_eq!((n.name.as_str(), n.queries, n.flows), ("www.example.test", 1, 1));
        assert_eq!(n.qtypes, ["A"]);
        assert_eq!(s.processes.len(), 1);
        assert_eq!((s.processes[0].pid, s.processes[0].comm.as_str()), (42, "curl"));
    }

    #[test]
    fn a_flow_with_only_updates_is_counted_once_and_flagged() {
        let (_, flows) = sample_run();
        let mut update = flows[2].clone();
        update.event = FlowRecordKind::Update;
        update.uid = 99;
        let mut b = SummaryBuilder::new();
        b.add_flow(&update);
        b.add_flow(&update);
        b.add_flow(&flows[0]);
        let s = b.finish(&run_record(&flows));
        assert_eq!(s.totals.flows, 2);
        assert_eq!(s.incomplete_flows, 1);
        assert!(s.to_text().contains("1 flow had no end record"), "{}", s.to_text());
    }

    #[test]
    fn renders_text_markdown_and_json() {
        let s = sample_summary();
        let text = s.to_text();
        assert!(text.starts_with("childflow summary: curl -s http://www.example.test/ (rootless): exit code 0 after 2.00 s\n"), "{text}");
        assert!(
            text.contains("3 flows: sent 436 B in 6 packets, received 1.3 KiB in 5 packets"),
            "{text}"
        );
        assert!(
            text.contains("198.18.0.1 (www.example.test, example.test) tcp port 80: 1 flow"),
            "{text}"
        );
        assert!(text.contains("drops: none; evictions (--max-flows): 0"), "{text}");
        let md = s.to_markdown();
        assert!(
            md.contains(
                "| 198.18.0.1 | www.example.test, example.test | tcp 80 | 1 | 316 | 1164 |"
            ),
            "{md}"
        );
        let back: Summary = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }
}
