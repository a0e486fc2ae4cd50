//! The flow log's records, version [`SCHEMA_VERSION`]: what `--flow-log` writes and
//! `childflow report` reads back. Documented field by field in `docs/flow-log.md`; a change
//! to a name or meaning here is a new schema version.
//!
//! Names follow Zeek's `conn.log`/`dns.log` where Zeek has the field (`uid`, `ts`, `id.orig_h`,
//! `orig_ip_bytes`, `conn_state`, `history`, `qtype_name`, ...) and the Community ID
//! specification for `community_id`. Timestamps are UNIX epoch seconds as JSON numbers with
//! microsecond precision, durations are seconds, like Zeek's JSON output.
//!
//! "orig" is the side that sent the first packet; `local_orig` says whether that was the
//! command. [`FlowRecord::sent`]/[`FlowRecord::received`] give the command's view.

use std::{collections::BTreeMap, net::IpAddr};

use childflow_common::flow::ProtoName;

use crate::{
    event::{CloseReason, DnsData, DnsEvent, DnsTransport, ProcessInfo, UnixNanos},
    flow::{
        ConnState, Flow, PolicyVerdict,
        dns::{rcode_name, rr_type_name},
        is_icmp, tcp_flag_letters,
    },
};

/// Identifies the log format in the header record.
pub const SCHEMA_NAME: &str = "childflow.flow-log";
/// Bumped whenever a field changes name or meaning.
pub const SCHEMA_VERSION: u32 = 1;

/// One line of a JSONL flow log.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    Header(HeaderRecord),
    Flow(Box<FlowRecord>),
    Dns(DnsRecord),
    Run(RunRecord),
    /// A record kind from a newer childflow; readers skip it.
    #[serde(other, skip_serializing)]
    Unknown,
}

/// A borrowed [`Record`], for writing without copying; serializes exactly like it.
#[derive(Clone, Copy, Debug, serde::Serialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum RecordRef<'a> {
    Header(&'a HeaderRecord),
    Flow(&'a FlowRecord),
    Dns(&'a DnsRecord),
    Run(&'a RunRecord),
}

/// The first line: what wrote the log.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeaderRecord {
    /// Always [`SCHEMA_NAME`].
    pub schema: String,
    /// [`SCHEMA_VERSION`] of the writer.
    pub version: u32,
    /// childflow's version string.
    pub childflow: String,
    pub command: Vec<String>,
    pub backend: String,
    /// When childflow started the command.
    pub ts: f64,
}

/// Whether a flow record is a snapshot of a live flow or its final state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowRecordKind {
    /// A periodic snapshot (`--flow-update-interval`); counters are cumulative.
    Update,
    /// The flow ended; exactly one per `uid`.
    End,
}

/// The connection 4-tuple, Zeek's `conn_id`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnId {
    pub orig_h: IpAddr,
    /// The originator's port; for ICMP the message type (Zeek's convention).
    pub orig_p: u16,
    pub resp_h: IpAddr,
    /// The responder's port; for ICMP the message code.
    pub resp_p: u16,
}

/// The DNS names that led the command to the flow's peer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowDns {
    pub query: String,
    pub qtype: u16,
    pub qtype_name: String,
    pub names: Vec<String>,
}

/// One flow, at its end or as a periodic update.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FlowRecord {
    pub event: FlowRecordKind,
    /// Unique within the run; shared by a flow's update and end records.
    pub uid: u64,
    /// First packet.
    pub ts: f64,
    /// Last packet.
    pub last_ts: f64,
    pub duration: f64,
    /// `tcp`, `udp`, `icmp`, `icmp6`, or the protocol number.
    pub proto: String,
    pub id: ConnId,
    /// Whether the command tree sent the first packet.
    pub local_orig: bool,
    /// ICMP echo identifier; `null` for other protocols.
    pub icmp_id: Option<u16>,
    pub orig_pkts: u64,
    /// IP-layer bytes (headers included) the originator sent.
    pub orig_ip_bytes: u64,
    /// Transport payload bytes the originator sent.
    pub orig_bytes: u64,
    pub resp_pkts: u64,
    pub resp_ip_bytes: u64,
    pub resp_bytes: u64,
    pub conn_state: ConnState,
    pub history: String,
    /// TCP only: `syn_sent`, `established`, `closing`, `closed`, `reset`, `midstream`.
    pub tcp_state: Option<String>,
    /// TCP only: every flag the originator sent, as letters (`CEUAPRSF`).
    pub orig_flags: Option<String>,
    pub resp_flags: Option<String>,
    /// Why the flow ended; `null` in update records.
    pub close_reason: Option<CloseReason>,
    pub community_id: String,
    pub dns: Option<FlowDns>,
    pub process: Option<ProcessInfo>,
    /// Reserved for the policy engine; `null` when no policy applied.
    pub policy: Option<PolicyVerdict>,
}

/// Nanoseconds since the epoch as epoch seconds, rounded to microseconds.
pub fn epoch_secs(ns: UnixNanos) -> f64 {
    (ns / 1_000) as f64 / 1e6
}

/// Seconds, rounded to microseconds.
fn secs(ns: u64) -> f64 {
    (ns / 1_000) as f64 / 1e6
}

impl FlowRecord {
    pub fn from_flow(flow: &Flow, event: FlowRecordKind) -> Self {
        let key = &flow.key;
        let (o, r) = (flow.orig_dir(), flow.resp_dir());
        let s = &flow.stats;
        let (local, remote) = (key.local_ip(), key.remote_ip());
        let icmp = is_icmp(key.proto);
        let id = if icmp {
            let (h_o, h_r) = if flow.local_orig() { (local, remote) } else { (remote, local) };
            ConnId {
                orig_h: h_o,
                orig_p: key.remote_port >> 8,
                resp_h: h_r,
                resp_p: key.remote_port & 0xff,
            }
        } else if flow.local_orig() {
            ConnId {
                orig_h: local,
                orig_p: key.local_port,
                resp_h: remote,
                resp_p: key.remote_port,
            }
        } else {
            ConnId {
                orig_h: remote,
                orig_p: key.remote_port,
                resp_h: local,
                resp_p: key.local_port,
            }
        };
        let tcp = flow.tcp_state();
        FlowRecord {
            event,
            uid: flow.uid,
            ts: epoch_secs(s.first_ns),
            last_ts: epoch_secs(s.last_ns),
            duration: secs(s.last_ns.saturating_sub(s.first_ns)),
            proto: ProtoName(key.proto).to_string(),
            id,
            local_orig: flow.local_orig(),
            icmp_id: icmp.then_some(key.local_port),
            orig_pkts: s.packets[o],
            orig_ip_bytes: s.bytes[o],
            orig_bytes: s.payload_bytes[o],
            resp_pkts: s.packets[r],
            resp_ip_bytes: s.bytes[r],
            resp_bytes: s.payload_bytes[r],
            conn_state: flow.conn_state(),
            history: flow.history().to_string(),
            tcp_state: tcp.map(|t| t.as_str().to_string()),
            orig_flags: tcp.map(|_| tcp_flag_letters(s.tcp_flags[o])),
            resp_flags: tcp.map(|_| tcp_flag_letters(s.tcp_flags[r])),
            close_reason: flow.close_reason,
            community_id: flow.community_id.to_string(),
            dns: flow.dns.as_deref().map(|d| FlowDns {
                query: d.query.clone(),
                qtype: d.qtype,
                qtype_name: rr_type_name(d.qtype).into_owned(),
                names: d.names.clone(),
            }),
            process: flow.process.as_deref().cloned(),
            policy: flow.policy.clone(),
        }
    }

    /// The peer's address (the side that is not the command).
    pub fn remote_h(&self) -> IpAddr {
        if self.local_orig { self.id.resp_h } else { self.id.orig_h }
    }

    /// The peer's port (ICMP: the message code, as in `id`).
    pub fn remote_p(&self) -> u16 {
        if self.local_orig { self.id.resp_p } else { self.id.orig_p }
    }

    /// `(packets, ip_bytes, payload_bytes)` the command sent.
    pub fn sent(&self) -> (u64, u64, u64) {
        if self.local_orig {
            (self.orig_pkts, self.orig_ip_bytes, self.orig_bytes)
        } else {
            (self.resp_pkts, self.resp_ip_bytes, self.resp_bytes)
        }
    }

    /// `(packets, ip_bytes, payload_bytes)` the command received.
    pub fn received(&self) -> (u64, u64, u64) {
        if self.local_orig {
            (self.resp_pkts, self.resp_ip_bytes, self.resp_bytes)
        } else {
            (self.orig_pkts, self.orig_ip_bytes, self.orig_bytes)
        }
    }
}

/// One answer of a [`DnsRecord`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DnsAnswerRecord {
    pub name: String,
    /// RR type mnemonic (`A`, `AAAA`, `CNAME`, `TYPE65534`).
    #[serde(rename = "type")]
    pub rtype: String,
    pub ttl: u32,
    /// Presentation format: an address, a name, or the record's text.
    pub data: String,
}

/// A DNS response the command received (Zeek `dns.log` names).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DnsRecord {
    pub ts: f64,
    /// The resolver that answered.
    pub server_h: IpAddr,
    pub server_p: u16,
    /// `udp` or `tcp`.
    pub proto: DnsTransport,
    pub trans_id: u16,
    pub query: String,
    pub qtype: u16,
    pub qtype_name: String,
    pub rcode: u16,
    pub rcode_name: String,
    pub answers: Vec<DnsAnswerRecord>,
}

impl DnsRecord {
    pub fn from_event(e: &DnsEvent) -> Self {
        DnsRecord {
            ts: epoch_secs(e.ts),
            server_h: e.server.ip(),
            server_p: e.server.port(),
            proto: e.transport,
            trans_id: e.id,
            query: e.query.clone(),
            qtype: e.qtype,
            qtype_name: rr_type_name(e.qtype).into_owned(),
            rcode: e.rcode,
            rcode_name: rcode_name(e.rcode).into_owned(),
            answers: e
                .answers
                .iter()
                .map(|a| DnsAnswerRecord {
                    name: a.name.clone(),
                    rtype: rr_type_name(a.rtype).into_owned(),
                    ttl: a.ttl,
                    data: match &a.data {
                        DnsData::Addr(ip) => ip.to_string(),
                        DnsData::Name(n) | DnsData::Other(n) => n.clone(),
                    },
                })
                .collect(),
        }
    }
}

/// Packets and bytes each way, from the command's point of view.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    pub flows: u64,
    pub sent_pkts: u64,
    /// IP-layer bytes.
    pub sent_ip_bytes: u64,
    /// Transport payload bytes.
    pub sent_bytes: u64,
    pub recv_pkts: u64,
    pub recv_ip_bytes: u64,
    pub recv_bytes: u64,
}

impl Totals {
    pub fn add(&mut self, f: &FlowRecord) {
        let (sp, sib, sb) = f.sent();
        let (rp, rib, rb) = f.received();
        self.flows += 1;
        self.sent_pkts += sp;
        self.sent_ip_bytes += sib;
        self.sent_bytes += sb;
        self.recv_pkts += rp;
        self.recv_ip_bytes += rib;
        self.recv_bytes += rb;
    }
}

/// The last line: how the run went.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunRecord {
    pub command: Vec<String>,
    pub backend: String,
    /// The command's exit code (128+N if killed by signal N); `null` if it never ran.
    pub exit_code: Option<i32>,
    /// How the command ended, in words (`exit code 0`, `killed by signal 9 (SIGKILL)`).
    pub status: String,
    /// childflow's own failure, if any.
    pub error: Option<String>,
    pub ts: f64,
    pub end_ts: f64,
    pub duration: f64,
    pub totals: Totals,
    /// Events lost, per source (`event queue` is the backend-to-collector channel).
    pub drops: BTreeMap<String, u64>,
    /// Flows ended early because the table was full (`--max-flows`).
    pub evictions: u64,
}

impl RunRecord {
    pub fn duration_from(start: UnixNanos, end: UnixNanos) -> f64 {
        secs(end.saturating_sub(start))
    }
}

/// Fixture builders for sink, summary and report tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use crate::event::{Event, FlowPhase, ProcessEvent};
    use crate::flow::{
        FlowTable, Output, TableConfig,
        dns::fixtures::{addr, answer, cname, dns_response},
        fixtures::*,
    };

    /// The records of a small run: a resolved HTTP fetch (closed), a refused connection,
    /// a UDP exchange, in the order the table ends them.
    pub fn sample_run() -> (Vec<DnsRecord>, Vec<FlowRecord>) {
        let mut t = FlowTable::new(TableConfig::default());
        let dns = dns_response(
            "www.example.test",
            vec![
                answer("www.example.test", cname("example.test")),
                answer("example.test", addr("198.18.0.1")),
            ],
        );
        t.ingest(&Event::Dns(dns.clone()));
        let http = tcp_key(40000, "198.18.0.1:80");
        t.ingest(&Event::Process(ProcessEvent {
            key: http,
            process: ProcessInfo {
                pid: 42,
                uid: 1000,
                comm: "curl".into(),
                exe: Some("/usr/bin/curl".into()),
                cmdline: Some(vec!["curl".into(), "-s".into(), "http://www.example.test/".into()]),
            },
        }));
        t.ingest(&flow_event(http, closed_stats(T0), FlowPhase::End(CloseReason::Fin)));
        let refused = tcp_key(40001, "198.18.0.2:81");
        t.ingest(&flow_event(refused, rejected_stats(T0), FlowPhase::End(CloseReason::Rst)));
        let udp = udp_key(5000, "198.18.0.7:7");
        t.ingest(&flow_event(udp, udp_exchange_stats(T0), FlowPhase::Start));
        t.finish();
        let flows = t
            .drain_output()
            .map(|o| match o {
                Output::End(f) => FlowRecord::from_flow(&f, FlowRecordKind::End),
                Output::Update(f) => FlowRecord::from_flow(&f, FlowRecordKind::Update),
            })
            .collect();
        (vec![DnsRecord::from_event(&dns)], flows)
    }

    pub fn run_record(flows: &[FlowRecord]) -> RunRecord {
        let mut totals = Totals::default();
        flows.iter().filter(|f| f.event == FlowRecordKind::End).for_each(|f| totals.add(f));
        RunRecord {
            command: vec!["curl".into(), "-s".into(), "http://www.example.test/".into()],
            backend: "rootless".into(),
            exit_code: Some(0),
            status: "exit code 0".into(),
            error: None,
            ts: epoch_secs(T0),
            end_ts: epoch_secs(T0 + 2_000 * MS),
            duration: 2.0,
            totals,
            drops: BTreeMap::from([("event queue".to_string(), 0)]),
            evictions: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};

    #[test]
    fn a_flow_record_uses_zeek_names_and_the_commands_orientation() {
        let (_, flows) = sample_run();
        let http = &flows[0];
        let v = serde_json::to_value(http).unwrap();
        assert_eq!(v["id"]["orig_h"], "10.0.2.100");
        assert_eq!(v["id"]["resp_p"], 80);
        assert_eq!(v["conn_state"], "SF");
        assert_eq!(v["history"], "ShADdFf");
        assert_eq!(v["orig_ip_bytes"], 316);
        assert_eq!(v["resp_bytes"], 1000);
        assert_eq!(v["close_reason"], "fin");
        assert_eq!(v["orig_flags"], "APSF");
        assert_eq!(v["dns"]["query"], "www.example.test");
        assert_eq!(v["dns"]["qtype_name"], "A");
        assert_eq!(v["process"]["comm"], "curl");
        assert_eq!(v["policy"], serde_json::Value::Null);
        assert_eq!(v["ts"].as_f64().unwrap(), 1_600_000_000.0);
        assert_eq!(v["duration"].as_f64().unwrap(), 0.006);
        assert_eq!(http.sent(), (4, 316, 100));
        assert_eq!(http.remote_h().to_string(), "198.18.0.1");
    }

    #[test]
    fn records_round_trip_through_json() {
        let (dns, flows) = sample_run();
        let run = run_record(&flows);
        let mut all = vec![Record::Dns(dns[0].clone())];
        all.extend(flows.into_iter().map(|f| Record::Flow(Box::new(f))));
        all.push(Record::Run(run));
        for r in all {
            let line = serde_json::to_string(&r).unwrap();
            let back: Record =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(back, r);
        }
    }

    #[test]
    fn unknown_record_kinds_from_newer_writers_are_recognised() {
        let r: Record = serde_json::from_str(r#"{"record":"ipfix_template","x":1}"#).unwrap();
        assert_eq!(r, Record::Unknown);
    }

    #[test]
    fn icmp_flows_put_type_and_code_in_the_ports() {
        use crate::event::{FlowKey, FlowPhase};
        use crate::flow::{FlowTable, TableConfig, fixtures::*};
        use childflow_common::flow::{FAMILY_V4, ICMP_ECHO_REQUEST, PROTO_ICMP};
        let (id, tc) = FlowKey::icmp_ports(FAMILY_V4, ICMP_ECHO_REQUEST, 0, 99);
        let key = FlowKey::new(
            PROTO_ICMP,
            format!("10.0.2.100:{id}").parse().unwrap(),
            format!("198.18.0.1:{tc}").parse().unwrap(),
        );
        let mut t = FlowTable::new(TableConfig::default());
        let flow = t.ingest(&flow_event(key, udp_exchange_stats(T0), FlowPhase::Start)).unwrap();
        let r = FlowRecord::from_flow(flow, FlowRecordKind::Update);
        assert_eq!(
            (r.proto.as_str(), r.id.orig_p, r.id.resp_p, r.icmp_id),
            ("icmp", 8, 0, Some(99))
        );
        assert_eq!(r.tcp_state, None);
    }
}
