//! DNS: turning the answers the command receives into [`DnsEvent`]s, and finding the host's
//! resolvers for the relay.
//!
//! Messages are parsed with hickory-proto (RFC 1035 §4); a message that does not parse is
//! simply not reported (the command still gets it unchanged: the relay never rewrites DNS).

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use hickory_proto::{
    op::{Message, MessageType},
    rr::RData,
};

use crate::event::{DnsAnswer, DnsData, DnsEvent, DnsTransport, UnixNanos};

/// Environment variable that replaces the host's resolvers as the relay's upstream:
/// a comma-separated list of `IP` or `IP:PORT`. Meant for tests and for hosts whose
/// `/etc/resolv.conf` does not say what the host uses.
pub const UPSTREAM_ENV: &str = "CHILDFLOW_UPSTREAM_DNS";

/// Reads one DNS response. `None` for queries and for anything that does not parse.
pub fn parse_response(
    bytes: &[u8],
    server: SocketAddr,
    transport: DnsTransport,
    ts: UnixNanos,
) -> Option<DnsEvent> {
    let msg = Message::from_vec(bytes).ok()?;
    if msg.metadata.message_type != MessageType::Response {
        return None;
    }
    let query = msg.queries.first()?;
    let answers = msg
        .answers
        .iter()
        .map(|r| DnsAnswer {
            name: trim_dot(r.name.to_utf8()),
            rtype: u16::from(r.record_type()),
            ttl: r.ttl,
            data: match &r.data {
                RData::A(a) => DnsData::Addr(IpAddr::V4(a.0)),
                RData::AAAA(a) => DnsData::Addr(IpAddr::V6(a.0)),
                RData::CNAME(n) => DnsData::Name(trim_dot(n.0.to_utf8())),
                RData::PTR(n) => DnsData::Name(trim_dot(n.0.to_utf8())),
                RData::NS(n) => DnsData::Name(trim_dot(n.0.to_utf8())),
                other => DnsData::Other(other.to_string()),
            },
        })
        .collect();
    Some(DnsEvent {
        ts,
        server,
        transport,
        id: msg.metadata.id,
        query: trim_dot(query.name.to_utf8()),
        qtype: u16::from(query.query_type),
        rcode: u16::from(msg.metadata.response_code),
        answers,
    })
}

/// A SERVFAIL response (RFC 1035 §4.1.1, RCODE 2) to `query`, with its question: what a
/// recursive resolver answers when it could not reach any upstream.
pub fn servfail_for(query: &[u8]) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut r = Message::error_msg(
        q.metadata.id,
        q.metadata.op_code,
        hickory_proto::op::ResponseCode::ServFail,
    );
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.queries = q.queries;
    r.to_vec().ok()
}

/// The ID of a DNS message (its first two bytes), if it has one.
pub fn message_id(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(..2)?.try_into().ok()?))
}

/// Whether the TC (truncated) bit is set in a DNS message header (RFC 1035 §4.1.1).
pub fn is_truncated(bytes: &[u8]) -> bool {
    bytes.get(2).is_some_and(|b| b & 0x02 != 0)
}

fn trim_dot(mut s: String) -> String {
    if s.len() > 1 && s.ends_with('.') {
        s.pop();
    }
    s
}

/// The `nameserver` entries of a resolv.conf(5) text, on port 53.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            // A scoped IPv6 address (`fe80::1%eth0`) keeps only the address.
            let addr = words.next()?.split('%').next()?;
            Some(SocketAddr::new(addr.parse().ok()?, 53))
        })
        .collect()
}

/// The `search`, `domain` and `options` lines of the host's resolv.conf, which the
/// command's own resolv.conf keeps.
pub fn kept_lines(resolv_conf: &str) -> String {
    resolv_conf
        .lines()
        .filter(|l| {
            let first = l.split_whitespace().next().unwrap_or_default();
            matches!(first, "search" | "domain" | "options")
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Parses [`UPSTREAM_ENV`].
pub fn parse_upstream_list(s: &str) -> Result<Vec<SocketAddr>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(|w| {
            w.parse::<SocketAddr>()
                .or_else(|_| w.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| format!("{UPSTREAM_ENV}: `{w}` is not an IP or IP:PORT"))
        })
        .collect()
}

/// The resolvers the relay forwards to: [`UPSTREAM_ENV`] if set, else the host's
/// `/etc/resolv.conf` (read by childflow in the host's namespaces).
pub fn upstream_resolvers(host_resolv_conf: &Path) -> Result<Vec<SocketAddr>, String> {
    if let Ok(list) = std::env::var(UPSTREAM_ENV) {
        return parse_upstream_list(&list);
    }
    let text = std::fs::read_to_string(host_resolv_conf).unwrap_or_default();
    let servers = nameservers(&text);
    if servers.is_empty() {
        // resolv.conf(5): without nameserver lines the resolver uses the local host.
        return Ok(vec![SocketAddr::from(([127, 0, 0, 1], 53))]);
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{Name, RData, Record, RecordType, rdata::A},
    };

    fn answer_for(name: &str, addr: [u8; 4]) -> Vec<u8> {
        let mut msg = Message::response(0x1234, OpCode::Query);
        let name = Name::from_ascii(name).unwrap();
        msg.queries.push(Query::query(name.clone(), RecordType::A));
        msg.answers.push(Record::from_rdata(
            name,
            300,
            RData::A(A::from(std::net::Ipv4Addr::from(addr))),
        ));
        msg.to_vec().unwrap()
    }

    #[test]
    fn parses_an_a_answer() {
        let server: SocketAddr = "10.0.2.3:53".parse().unwrap();
        let ev = parse_response(
            &answer_for("example.test.", [198, 18, 0, 1]),
            server,
            DnsTransport::Udp,
            5,
        )
        .expect("a response parses");
        assert_eq!(ev.query, "example.test");
        assert_eq!(ev.qtype, 1);
        assert_eq!(ev.id, 0x1234);
        assert_eq!(ev.answers.len(), 1);
        assert_eq!(ev.answers[0].data, DnsData::Addr("198.18.0.1".parse().unwrap()));
        assert_eq!(ev.answers[0].ttl, 300);
    }

    #[test]
    fn queries_and_garbage_are_not_reported() {
        let server: SocketAddr = "10.0.2.3:53".parse().unwrap();
        let mut q = Message::query();
        q.metadata.message_type = MessageType::Query;
        q.queries.push(Query::query(Name::from_ascii("a.test.").unwrap(), RecordType::A));
        assert!(parse_response(&q.to_vec().unwrap(), server, DnsTransport::Udp, 0).is_none());
        assert!(parse_response(b"\x00\x01garbage", server, DnsTransport::Udp, 0).is_none());
    }

    #[test]
    fn servfail_keeps_the_id_and_question() {
        let mut q = Message::query();
        q.queries.push(Query::query(Name::from_ascii("a.test.").unwrap(), RecordType::AAAA));
        let bytes = q.to_vec().unwrap();
        let server: SocketAddr = "10.0.2.3:53".parse().unwrap();
        let ev = parse_response(&servfail_for(&bytes).unwrap(), server, DnsTransport::Udp, 0)
            .expect("a response");
        assert_eq!((ev.id, ev.rcode, ev.qtype), (q.metadata.id, 2, 28));
        assert_eq!(ev.query, "a.test");
    }

    #[test]
    fn reads_resolv_conf() {
        let text =
            "# c\nsearch lan\nnameserver 198.18.0.53\nnameserver fe80::1%eth0\noptions edns0\n";
        assert_eq!(
            nameservers(text),
            vec!["198.18.0.53:53".parse::<SocketAddr>().unwrap(), "[fe80::1]:53".parse().unwrap()]
        );
        assert_eq!(kept_lines(text), "search lan\noptions edns0\n");
        assert_eq!(
            parse_upstream_list("198.18.0.53, [2001:db8::53]:5353").unwrap(),
            vec![
                "198.18.0.53:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::53]:5353".parse().unwrap()
            ]
        );
        assert!(parse_upstream_list("nope").is_err());
    }
}
