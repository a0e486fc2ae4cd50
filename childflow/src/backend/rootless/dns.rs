//! DNS for the relay: finding the host's resolvers, and the few header reads and answers
//! (SERVFAIL) it makes itself. Parsing what the command receives is shared with the rootful
//! backend ([`crate::backend::dns`]).

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use hickory_proto::op::Message;

use crate::backend::dns::nameservers;

/// Environment variable that replaces the host's resolvers as the relay's upstream:
/// a comma-separated list of `IP` or `IP:PORT`. Meant for tests and for hosts whose
/// `/etc/resolv.conf` does not say what the host uses.
pub const UPSTREAM_ENV: &str = "CHILDFLOW_UPSTREAM_DNS";

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
    let servers: Vec<SocketAddr> =
        nameservers(&text).into_iter().map(|ip| SocketAddr::new(ip, 53)).collect();
    if servers.is_empty() {
        // resolv.conf(5): without nameserver lines the resolver uses the local host.
        return Ok(vec![SocketAddr::from(([127, 0, 0, 1], 53))]);
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{backend::dns::parse_response, event::DnsTransport};
    use hickory_proto::{
        op::Query,
        rr::{Name, RecordType},
    };

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
    fn reads_the_upstream_list() {
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
