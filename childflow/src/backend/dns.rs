//! DNS pieces both backends share: reading the DNS responses the command receives into
//! [`DnsEvent`]s, delimiting DNS messages on a TCP stream, and reading the host's
//! resolv.conf(5).
//!
//! Messages are parsed with hickory-proto (RFC 1035 §4); a message that does not parse is
//! simply not reported (the command still gets it unchanged: childflow never rewrites DNS).

use std::net::{IpAddr, SocketAddr};

use hickory_proto::{
    op::{Message, MessageType},
    rr::RData,
};

use crate::event::{DnsAnswer, DnsData, DnsEvent, DnsTransport, UnixNanos};

/// Reads one DNS response (without TCP's length prefix) the command received from `server`
/// over `transport`. `None` for queries and for anything that does not parse.
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

fn trim_dot(mut s: String) -> String {
    if s.len() > 1 && s.ends_with('.') {
        s.pop();
    }
    s
}

/// Takes the next complete DNS message off the front of `stream`, the bytes of a DNS-over-TCP
/// connection (RFC 1035 §4.2.2, RFC 7766 §8: each message after a two-byte length), without
/// its length prefix. `None` until a whole message is there.
pub fn take_tcp_message(stream: &mut Vec<u8>) -> Option<Vec<u8>> {
    let len = usize::from(u16::from_be_bytes([*stream.first()?, *stream.get(1)?]));
    if stream.len() < 2 + len {
        return None;
    }
    let msg = stream[2..2 + len].to_vec();
    stream.drain(..2 + len);
    Some(msg)
}

/// The `nameserver` addresses of a resolv.conf(5) text. A scoped IPv6 address
/// (`fe80::1%eth0`) keeps only the address.
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            words.next()?.split('%').next()?.parse().ok()
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
        .map(|l| format!("{}\n", l.trim()))
        .collect()
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
        assert_eq!((ev.ts, ev.server, ev.transport), (5, server, DnsTransport::Udp));
        assert_eq!(ev.query, "example.test");
        assert_eq!((ev.qtype, ev.rcode, ev.id), (1, 0, 0x1234));
        assert_eq!(ev.answers.len(), 1);
        assert_eq!(ev.answers[0].name, "example.test");
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
        assert!(parse_response(&[1, 2, 3], server, DnsTransport::Udp, 0).is_none());
    }

    #[test]
    fn tcp_messages_are_taken_whole_and_in_order() {
        let mut stream = vec![0, 3, b'a', b'b', b'c', 0, 2, b'd'];
        assert_eq!(take_tcp_message(&mut stream).as_deref(), Some(&b"abc"[..]));
        assert_eq!(take_tcp_message(&mut stream), None, "the second is incomplete");
        stream.push(b'e');
        assert_eq!(take_tcp_message(&mut stream).as_deref(), Some(&b"de"[..]));
        assert!(stream.is_empty());
        assert_eq!(take_tcp_message(&mut vec![0]), None);
    }

    #[test]
    fn reads_resolv_conf() {
        let text =
            "# c\nsearch lan\nnameserver 198.18.0.53\nnameserver fe80::1%eth0\n options edns0\n";
        assert_eq!(
            nameservers(text),
            vec!["198.18.0.53".parse::<IpAddr>().unwrap(), "fe80::1".parse().unwrap()]
        );
        assert_eq!(kept_lines(text), "search lan\noptions edns0\n");
    }
}
