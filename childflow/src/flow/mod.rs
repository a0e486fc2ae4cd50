//! The flow model: one conversation of the command tree, aggregated from backend [`Event`]s.
//!
//! This module owns what a [`Flow`] *is* — its identity ([`FlowKey`], run-unique `uid`,
//! [Community ID]), its counters, the Zeek-style `conn_state`/`history`, and what we know of
//! who opened it (process) and which DNS names led to its peer. [`table::FlowTable`] owns the
//! set of live flows and decides when they end.
//!
//! Invariants:
//! - Orientation: the key is always from the command's side (`local` is the command). The
//!   originator ("orig" in Zeek terms) is whichever side sent the first packet
//!   ([`FlowStats::initiator`]); `orig_*`/`resp_*` accessors translate between the two.
//! - Counters are cumulative copies of what the backend reported; nothing here adds deltas.
//! - Derived values (`conn_state`, `tcp_state`, flag strings) are pure functions of the
//!   counters, so an update record and the end record of a flow never disagree.
//!
//! [Community ID]: https://github.com/corelight/community-id-spec
//! [`Event`]: crate::event::Event

pub mod community_id;
pub mod dns;
pub mod packet;
pub mod table;

use std::{fmt, sync::Arc};

use childflow_common::flow::{
    DIR_IN, DIR_OUT, HIST_SYN, HIST_SYNACK, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    TCP_ACK, TCP_CWR, TCP_ECE, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, TCP_URG,
};

pub use self::{
    dns::DnsAttribution,
    table::{FlowTable, IdleTimeouts, Output, PacketFlow, TableConfig, TableSnapshot, TableStats},
};
pub use crate::event::{CloseReason, FlowKey, FlowStats, ProcessInfo, UnixNanos};

/// What the policy engine decided about a flow. Placeholder: the policy issue fills it in;
/// until then every flow's verdict is `None` ("no policy applied").
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyVerdict {
    /// `allow` or `deny`.
    pub action: PolicyAction,
    /// The rule that matched, as the user wrote it.
    pub rule: Option<String>,
}

/// A policy decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// One flow of the command tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Unique within a run, in order of first sighting; the same in a flow's update and end
    /// records (Zeek's `uid` plays this role).
    pub uid: u64,
    pub key: FlowKey,
    /// Community ID v1 of the key (`1:` + base64 of a SHA-1).
    pub community_id: Arc<str>,
    /// Cumulative counters, as last reported by the backend (minus what an earlier
    /// incarnation of the key already accounted for, see [`table`]).
    pub stats: FlowStats,
    /// Set once the flow ended.
    pub close_reason: Option<CloseReason>,
    /// The DNS names the peer's address was learned from, if the command resolved it.
    pub dns: Option<Arc<DnsAttribution>>,
    /// The process that opened the flow, if the backend knows it.
    pub process: Option<Arc<ProcessInfo>>,
    /// Policy decision; `None` until the policy engine exists.
    pub policy: Option<PolicyVerdict>,
}

impl Flow {
    /// The direction index of the originator (the side that sent the first packet).
    pub fn orig_dir(&self) -> usize {
        if self.stats.initiator as usize == DIR_IN { DIR_IN } else { DIR_OUT }
    }

    /// The direction index of the responder.
    pub fn resp_dir(&self) -> usize {
        self.orig_dir() ^ 1
    }

    /// Whether the command tree originated the flow (Zeek's `local_orig`).
    pub fn local_orig(&self) -> bool {
        self.orig_dir() == DIR_OUT
    }

    /// Seconds between the first and the last packet.
    pub fn duration_secs(&self) -> f64 {
        self.stats.last_ns.saturating_sub(self.stats.first_ns) as f64 / 1e9
    }

    /// Zeek's `conn_state` for this flow's counters.
    pub fn conn_state(&self) -> ConnState {
        ConnState::of(&self.stats, self.key.proto)
    }

    /// A coarse TCP state for live views, `None` for other protocols.
    pub fn tcp_state(&self) -> Option<TcpState> {
        (self.key.proto == PROTO_TCP).then(|| TcpState::of(&self.stats))
    }

    /// The history string (ASCII, Zeek letters; upper case = originator).
    pub fn history(&self) -> &str {
        std::str::from_utf8(self.stats.history()).unwrap_or("")
    }

    /// Whether the TCP flow has been closed by FIN from both sides or by a RST.
    pub fn tcp_closed(&self) -> Option<CloseReason> {
        if self.key.proto != PROTO_TCP {
            return None;
        }
        let f = self.stats.tcp_flags;
        if (f[0] | f[1]) & TCP_RST != 0 {
            Some(CloseReason::Rst)
        } else if f[0] & TCP_FIN != 0 && f[1] & TCP_FIN != 0 {
            Some(CloseReason::Fin)
        } else {
            None
        }
    }
}

/// Zeek's `conn_state` values (Zeek `base/protocols/conn/main.zeek`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ConnState {
    /// Connection attempt seen, no reply.
    S0,
    /// Connection established, not terminated.
    S1,
    /// Normal establishment and termination (for UDP/ICMP: both sides sent).
    SF,
    /// Connection attempt rejected.
    REJ,
    /// Established, close attempt by the originator seen (no reply from the responder).
    S2,
    /// Established, close attempt by the responder seen (no reply from the originator).
    S3,
    /// Established, the originator aborted (sent a RST).
    RSTO,
    /// Established, the responder aborted.
    RSTR,
    /// The originator sent a SYN then a RST; no SYN-ACK from the responder.
    RSTOS0,
    /// The responder sent a SYN-ACK then a RST; no SYN from the originator.
    RSTRH,
    /// The originator sent a SYN then a FIN; no SYN-ACK from the responder (half open).
    SH,
    /// The responder sent a SYN-ACK then a FIN; no SYN from the originator
    /// (for UDP/ICMP: only the responder sent).
    SHR,
    /// No SYN seen, just midstream traffic.
    OTH,
}

impl ConnState {
    /// Classifies a flow's counters the way Zeek's `conn.log` does. `stats.tcp_flags` is the
    /// OR of every flag per direction; which side reset first comes from the history order.
    pub fn of(stats: &FlowStats, proto: u8) -> ConnState {
        let mut orig = if stats.initiator as usize == DIR_IN { DIR_IN } else { DIR_OUT };
        let seen = stats.history_seen;
        let (syn, synack) = (HIST_SYN, HIST_SYNACK);
        if proto == PROTO_TCP && seen[orig] & (syn | synack) == synack && seen[orig ^ 1] & syn == 0
        {
            // The first packet seen was a SYN-ACK: its sender is the responder of a
            // handshake whose SYN we missed (Zeek flips the roles the same way).
            orig ^= 1;
        }
        let resp = orig ^ 1;
        if proto != PROTO_TCP {
            return match (stats.packets[orig] > 0, stats.packets[resp] > 0) {
                (true, true) => ConnState::SF,
                (true, false) => ConnState::S0,
                (false, true) => ConnState::SHR,
                (false, false) => ConnState::OTH,
            };
        }
        let (o, r) = (stats.tcp_flags[orig], stats.tcp_flags[resp]);
        let orig_syn = seen[orig] & HIST_SYN != 0;
        let resp_syn = seen[resp] & (HIST_SYN | HIST_SYNACK) != 0;
        match (orig_syn, resp_syn) {
            (true, false) => {
                if o & TCP_RST != 0 {
                    ConnState::RSTOS0
                } else if r & TCP_RST != 0 {
                    ConnState::REJ
                } else if o & TCP_FIN != 0 {
                    ConnState::SH
                } else if stats.packets[resp] == 0 {
                    ConnState::S0
                } else {
                    ConnState::OTH
                }
            }
            (false, true) => {
                if r & TCP_RST != 0 {
                    ConnState::RSTRH
                } else if r & TCP_FIN != 0 {
                    ConnState::SHR
                } else {
                    ConnState::OTH
                }
            }
            (false, false) => ConnState::OTH,
            (true, true) => match first_reset(stats.history()) {
                Some(true) => ConnState::RSTO,
                Some(false) => ConnState::RSTR,
                None => match (o & TCP_FIN != 0, r & TCP_FIN != 0) {
                    (true, true) => ConnState::SF,
                    (true, false) => ConnState::S2,
                    (false, true) => ConnState::S3,
                    (false, false) => ConnState::S1,
                },
            },
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::S0 => "S0",
            ConnState::S1 => "S1",
            ConnState::SF => "SF",
            ConnState::REJ => "REJ",
            ConnState::S2 => "S2",
            ConnState::S3 => "S3",
            ConnState::RSTO => "RSTO",
            ConnState::RSTR => "RSTR",
            ConnState::RSTOS0 => "RSTOS0",
            ConnState::RSTRH => "RSTRH",
            ConnState::SH => "SH",
            ConnState::SHR => "SHR",
            ConnState::OTH => "OTH",
        }
    }
}

impl fmt::Display for ConnState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `Some(true)` if the originator reset first, `Some(false)` the responder, `None` neither.
fn first_reset(history: &[u8]) -> Option<bool> {
    history.iter().find_map(|&c| match c {
        b'R' => Some(true),
        b'r' => Some(false),
        _ => None,
    })
}

/// A coarse TCP connection state for live views (RFC 9293 §3.3.2 names where they apply).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcpState {
    /// SYN sent, no SYN-ACK yet.
    SynSent,
    /// Both SYNs seen, no FIN or RST.
    Established,
    /// One side sent FIN.
    Closing,
    /// Both sides sent FIN.
    Closed,
    /// A RST was seen.
    Reset,
    /// Picked up midstream (no handshake seen).
    Midstream,
}

impl TcpState {
    pub fn of(stats: &FlowStats) -> TcpState {
        let (a, b) = (stats.tcp_flags[0], stats.tcp_flags[1]);
        if (a | b) & TCP_RST != 0 {
            TcpState::Reset
        } else if a & TCP_FIN != 0 && b & TCP_FIN != 0 {
            TcpState::Closed
        } else if (a | b) & TCP_FIN != 0 {
            TcpState::Closing
        } else if a & TCP_SYN != 0 && b & TCP_SYN != 0 {
            TcpState::Established
        } else if (a | b) & TCP_SYN != 0 {
            TcpState::SynSent
        } else {
            TcpState::Midstream
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TcpState::SynSent => "syn_sent",
            TcpState::Established => "established",
            TcpState::Closing => "closing",
            TcpState::Closed => "closed",
            TcpState::Reset => "reset",
            TcpState::Midstream => "midstream",
        }
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The TCP flags in `bits` as letters, in header order from CWR down to FIN, the way nfdump
/// and Wireshark abbreviate them: `C E U A P R S F`. Empty for none.
pub fn tcp_flag_letters(bits: u8) -> String {
    const LETTERS: [(u8, char); 8] = [
        (TCP_CWR, 'C'),
        (TCP_ECE, 'E'),
        (TCP_URG, 'U'),
        (TCP_ACK, 'A'),
        (TCP_PSH, 'P'),
        (TCP_RST, 'R'),
        (TCP_SYN, 'S'),
        (TCP_FIN, 'F'),
    ];
    LETTERS.iter().filter(|(bit, _)| bits & bit != 0).map(|&(_, c)| c).collect()
}

/// Whether the protocol is one of the ICMP families (ports hold type/code and identifier).
pub fn is_icmp(proto: u8) -> bool {
    matches!(proto, PROTO_ICMP | PROTO_ICMPV6)
}

/// Whether the protocol has ports.
pub fn has_ports(proto: u8) -> bool {
    matches!(proto, PROTO_TCP | PROTO_UDP)
}

/// Fixture builders shared by the flow, sink, summary and report tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use childflow_common::flow::{DIR_IN, DIR_OUT, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN};
    use childflow_common::flow::{TCP_PSH, TCP_RST, TCP_SYN};

    use crate::event::{Event, FlowKey, FlowPhase, FlowStats, FlowUpdate};

    /// 2020-09-13T12:26:40Z, a round number of nanoseconds for readable expectations.
    pub const T0: u64 = 1_600_000_000_000_000_000;
    pub const MS: u64 = 1_000_000;

    pub fn tcp_key(local_port: u16, remote: &str) -> FlowKey {
        FlowKey::new(
            PROTO_TCP,
            format!("10.0.2.100:{local_port}").parse().unwrap(),
            remote.parse().expect("fixture remote address"),
        )
    }

    pub fn udp_key(local_port: u16, remote: &str) -> FlowKey {
        FlowKey::new(
            PROTO_UDP,
            format!("10.0.2.100:{local_port}").parse().unwrap(),
            remote.parse().expect("fixture remote address"),
        )
    }

    /// The counters of a TCP handshake, one request of 100 bytes and a 1000-byte answer,
    /// without the close: `ShADd`, state S1.
    pub fn established_stats(t0: u64) -> FlowStats {
        let mut s = FlowStats::new(DIR_OUT, t0);
        s.account(DIR_OUT, 60, 0, TCP_SYN, t0);
        s.account(DIR_IN, 60, 0, TCP_SYN | TCP_ACK, t0 + MS);
        s.account(DIR_OUT, 52, 0, TCP_ACK, t0 + 2 * MS);
        s.account(DIR_OUT, 152, 100, TCP_ACK | TCP_PSH, t0 + 3 * MS);
        s.account(DIR_IN, 1052, 1000, TCP_ACK | TCP_PSH, t0 + 4 * MS);
        s
    }

    /// [`established_stats`] then FIN from both sides: `ShADdFf`, state SF.
    pub fn closed_stats(t0: u64) -> FlowStats {
        let mut s = established_stats(t0);
        s.account(DIR_OUT, 52, 0, TCP_ACK | TCP_FIN, t0 + 5 * MS);
        s.account(DIR_IN, 52, 0, TCP_ACK | TCP_FIN, t0 + 6 * MS);
        s
    }

    /// A SYN answered by a RST: `Sr`, state REJ.
    pub fn rejected_stats(t0: u64) -> FlowStats {
        let mut s = FlowStats::new(DIR_OUT, t0);
        s.account(DIR_OUT, 60, 0, TCP_SYN, t0);
        s.account(DIR_IN, 40, 0, TCP_RST | TCP_ACK, t0 + MS);
        s
    }

    /// One UDP datagram each way (a DNS-like exchange).
    pub fn udp_exchange_stats(t0: u64) -> FlowStats {
        let mut s = FlowStats::new(DIR_OUT, t0);
        s.account(DIR_OUT, 60, 32, 0, t0);
        s.account(DIR_IN, 120, 92, 0, t0 + MS);
        s
    }

    pub fn flow_event(key: FlowKey, stats: FlowStats, phase: FlowPhase) -> Event {
        Event::Flow(FlowUpdate { key, stats, phase })
    }

    /// A live, established TCP flow to 198.18.0.1:80, as its start event.
    pub fn established_flow() -> Event {
        flow_event(tcp_key(40000, "198.18.0.1:80"), established_stats(T0), FlowPhase::Start)
    }
}

#[cfg(test)]
mod tests {
    use childflow_common::flow::{PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST};
    use childflow_common::flow::{TCP_SYN, history_bits};

    use super::{fixtures::*, *};

    fn conn_state(stats: &FlowStats) -> ConnState {
        ConnState::of(stats, PROTO_TCP)
    }

    #[test]
    fn conn_state_of_a_normal_connection_is_sf_then_s1_while_open() {
        assert_eq!(conn_state(&established_stats(T0)), ConnState::S1);
        assert_eq!(conn_state(&closed_stats(T0)), ConnState::SF);
    }

    #[test]
    fn conn_state_of_an_unanswered_syn_is_s0() {
        let mut s = FlowStats::new(DIR_OUT, T0);
        s.account(DIR_OUT, 60, 0, TCP_SYN, T0);
        assert_eq!(conn_state(&s), ConnState::S0);
        s.account(DIR_OUT, 40, 0, TCP_RST, T0);
        assert_eq!(conn_state(&s), ConnState::RSTOS0);
    }

    #[test]
    fn conn_state_of_a_refused_connection_is_rej() {
        let s = rejected_stats(T0);
        assert_eq!(conn_state(&s), ConnState::REJ);
        assert_eq!(s.history(), b"Sr");
    }

    #[test]
    fn conn_state_names_who_reset_first() {
        let mut s = established_stats(T0);
        s.account(DIR_IN, 40, 0, TCP_RST, T0 + 10 * MS);
        s.account(DIR_OUT, 40, 0, TCP_RST, T0 + 11 * MS);
        assert_eq!(conn_state(&s), ConnState::RSTR);
        let mut s = established_stats(T0);
        s.account(DIR_OUT, 40, 0, TCP_RST, T0 + 10 * MS);
        assert_eq!(conn_state(&s), ConnState::RSTO);
    }

    #[test]
    fn conn_state_of_half_closes() {
        let mut s = established_stats(T0);
        s.account(DIR_OUT, 52, 0, TCP_FIN | TCP_ACK, T0 + 10 * MS);
        assert_eq!(conn_state(&s), ConnState::S2);
        let mut s = established_stats(T0);
        s.account(DIR_IN, 52, 0, TCP_FIN | TCP_ACK, T0 + 10 * MS);
        assert_eq!(conn_state(&s), ConnState::S3);
        let mut s = FlowStats::new(DIR_OUT, T0);
        s.account(DIR_OUT, 60, 0, TCP_SYN, T0);
        s.account(DIR_OUT, 60, 0, TCP_FIN, T0);
        assert_eq!(conn_state(&s), ConnState::SH);
    }

    #[test]
    fn conn_state_of_midstream_traffic_is_oth() {
        let mut s = FlowStats::new(DIR_OUT, T0);
        s.account(DIR_OUT, 52, 10, TCP_ACK, T0);
        s.account(DIR_IN, 52, 10, TCP_ACK, T0);
        assert_eq!(conn_state(&s), ConnState::OTH);
        let mut s = FlowStats::new(DIR_IN, T0);
        s.account(DIR_IN, 60, 0, TCP_SYN | TCP_ACK, T0);
        s.account(DIR_IN, 60, 0, TCP_RST, T0);
        assert_eq!(conn_state(&s), ConnState::RSTRH);
    }

    #[test]
    fn conn_state_of_a_flow_the_peer_opened_uses_the_peer_as_originator() {
        let mut s = FlowStats::new(DIR_IN, T0);
        s.account(DIR_IN, 60, 0, TCP_SYN, T0);
        s.account(DIR_OUT, 60, 0, TCP_SYN | TCP_ACK, T0);
        assert_eq!(conn_state(&s), ConnState::S1);
        assert_eq!(s.history(), b"Sh");
    }

    #[test]
    fn conn_state_of_udp_and_icmp_follows_replies() {
        assert_eq!(ConnState::of(&udp_exchange_stats(T0), PROTO_UDP), ConnState::SF);
        let mut s = FlowStats::new(DIR_OUT, T0);
        s.account(DIR_OUT, 84, 56, 0, T0);
        assert_eq!(ConnState::of(&s, PROTO_ICMP), ConnState::S0);
    }

    #[test]
    fn tcp_state_and_flag_letters() {
        assert_eq!(TcpState::of(&established_stats(T0)), TcpState::Established);
        assert_eq!(TcpState::of(&closed_stats(T0)), TcpState::Closed);
        assert_eq!(TcpState::of(&rejected_stats(T0)), TcpState::Reset);
        assert_eq!(tcp_flag_letters(TCP_SYN | TCP_ACK | TCP_FIN), "ASF");
        assert_eq!(tcp_flag_letters(0), "");
        assert_eq!(history_bits(TCP_ACK, 0), childflow_common::flow::HIST_ACK);
    }
}
