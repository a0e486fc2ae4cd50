//! Which DNS names led the command to an address: learned from the answers the command
//! itself received ([`DnsEvent`]), looked up when a flow to that address starts.
//!
//! Invariants:
//! - Only answers the command got are used, so a flow's names are the ones *it* resolved,
//!   not what some reverse lookup would say.
//! - CNAME chains are followed from the question (RFC 1034 §3.6.2): for
//!   `www.example.test CNAME cdn.example.test`, `cdn.example.test A 198.18.0.10`, a flow to
//!   198.18.0.10 gets the query `www.example.test` and the names
//!   `[www.example.test, cdn.example.test]`.
//! - Bounded: at most `capacity` addresses are remembered; the oldest learned go first.

use std::{
    borrow::Cow,
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
};

use crate::event::{DnsData, DnsEvent};

/// RR type numbers (IANA "Resource Record (RR) TYPEs").
pub const RR_A: u16 = 1;
pub const RR_CNAME: u16 = 5;
pub const RR_AAAA: u16 = 28;

/// Names kept per address, so a host answering for many names cannot grow one entry forever.
const MAX_NAMES: usize = 8;
/// CNAME hops followed before giving up (loops, absurd chains).
const MAX_CHAIN: usize = 16;

/// What the command resolved to reach an address.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DnsAttribution {
    /// The most recent question whose answer contained the address.
    pub query: String,
    /// That question's RR type number (1 = A, 28 = AAAA).
    pub qtype: u16,
    /// Every name that resolved to the address during the run: the most recent question
    /// first, then its CNAME chain, then older questions. At most 8.
    pub names: Vec<String>,
}

/// Address → names, from the command's DNS answers.
#[derive(Debug)]
pub struct DnsNames {
    map: HashMap<IpAddr, Arc<DnsAttribution>>,
    order: VecDeque<IpAddr>,
    capacity: usize,
}

impl DnsNames {
    pub fn new(capacity: usize) -> Self {
        DnsNames { map: HashMap::new(), order: VecDeque::new(), capacity: capacity.max(1) }
    }

    /// Remembers the addresses in `event`'s answers under the question's name and CNAME
    /// chain.
    pub fn learn(&mut self, event: &DnsEvent) {
        for answer in &event.answers {
            let DnsData::Addr(addr) = answer.data else { continue };
            let names = chain_to(event, &answer.name);
            let merged = match self.map.get(&addr) {
                Some(old) => merge(names, &old.names),
                None => names,
            };
            let entry = Arc::new(DnsAttribution {
                query: event.query.clone(),
                qtype: event.qtype,
                names: merged,
            });
            if self.map.insert(addr, entry).is_none() {
                self.order.push_back(addr);
                while self.map.len() > self.capacity {
                    match self.order.pop_front() {
                        Some(oldest) => self.map.remove(&oldest),
                        None => break,
                    };
                }
            }
        }
    }

    /// What the command resolved to reach `addr`, if anything.
    pub fn lookup(&self, addr: IpAddr) -> Option<Arc<DnsAttribution>> {
        self.map.get(&addr).cloned()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The names from the question to `owner` along the CNAMEs in `event`'s answers. If `owner`
/// is not on the chain (an odd server), the question and `owner`.
fn chain_to(event: &DnsEvent, owner: &str) -> Vec<String> {
    let mut chain = vec![event.query.clone()];
    let mut at = event.query.as_str();
    for _ in 0..MAX_CHAIN {
        if at.eq_ignore_ascii_case(owner) {
            return chain;
        }
        let next = event.answers.iter().find_map(|a| match &a.data {
            DnsData::Name(target) if a.rtype == RR_CNAME && a.name.eq_ignore_ascii_case(at) => {
                Some(target.as_str())
            }
            _ => None,
        });
        match next {
            Some(target) if !chain.iter().any(|n| n.eq_ignore_ascii_case(target)) => {
                chain.push(target.to_string());
                at = target;
            }
            _ => break,
        }
    }
    if !chain.iter().any(|n| n.eq_ignore_ascii_case(owner)) {
        chain.truncate(1);
        chain.push(owner.to_string());
    }
    chain
}

/// `new` followed by the names of `old` it does not have, at most [`MAX_NAMES`].
fn merge(mut new: Vec<String>, old: &[String]) -> Vec<String> {
    for name in old {
        if !new.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            new.push(name.clone());
        }
    }
    new.truncate(MAX_NAMES);
    new
}

/// The mnemonic of an RR type (RFC 1035, RFC 3596, RFC 9460), or `TYPEnnn` (RFC 3597).
pub fn rr_type_name(rtype: u16) -> Cow<'static, str> {
    Cow::Borrowed(match rtype {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        64 => "SVCB",
        65 => "HTTPS",
        255 => "ANY",
        n => return Cow::Owned(format!("TYPE{n}")),
    })
}

/// The mnemonic of a response code (RFC 1035 §4.1.1, RFC 6895), or `RCODEnn`.
pub fn rcode_name(rcode: u16) -> Cow<'static, str> {
    Cow::Borrowed(match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        n => return Cow::Owned(format!("RCODE{n}")),
    })
}

#[cfg(test)]
pub(crate) mod fixtures {
    use crate::event::{DnsAnswer, DnsData, DnsEvent, DnsTransport};

    use super::{RR_A, RR_AAAA, RR_CNAME};

    pub fn answer(name: &str, data: DnsData) -> DnsAnswer {
        let rtype = match &data {
            DnsData::Addr(a) if a.is_ipv4() => RR_A,
            DnsData::Addr(_) => RR_AAAA,
            DnsData::Name(_) => RR_CNAME,
            DnsData::Other(_) => 16,
        };
        DnsAnswer { name: name.into(), rtype, ttl: 300, data }
    }

    /// A response to `query` (type A) with `answers`.
    pub fn dns_response(query: &str, answers: Vec<DnsAnswer>) -> DnsEvent {
        DnsEvent {
            ts: super::super::fixtures::T0,
            server: "198.18.0.53:53".parse().unwrap(),
            transport: DnsTransport::Udp,
            id: 0x1234,
            query: query.into(),
            qtype: RR_A,
            rcode: 0,
            answers,
        }
    }

    pub fn addr(s: &str) -> DnsData {
        DnsData::Addr(s.parse().expect("fixture address"))
    }

    pub fn cname(s: &str) -> DnsData {
        DnsData::Name(s.into())
    }
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};

    #[test]
    fn a_plain_answer_maps_the_address_to_the_question() {
        let mut names = DnsNames::new(16);
        names
            .learn(&dns_response("example.test", vec![answer("example.test", addr("198.18.0.1"))]));
        let got = names.lookup("198.18.0.1".parse().unwrap()).expect("learned");
        assert_eq!(got.query, "example.test");
        assert_eq!(got.qtype, RR_A);
        assert_eq!(got.names, ["example.test"]);
    }

    #[test]
    fn a_cname_chain_is_followed_from_the_question() {
        let mut names = DnsNames::new(16);
        names.learn(&dns_response(
            "www.example.test",
            vec![
                answer("www.example.test", cname("edge.example.test")),
                answer("edge.example.test", cname("cdn.example.test")),
                answer("cdn.example.test", addr("198.18.0.10")),
                answer("cdn.example.test", addr("2001:db8::10")),
            ],
        ));
        for a in ["198.18.0.10", "2001:db8::10"] {
            let got = names.lookup(a.parse().unwrap()).expect("learned");
            assert_eq!(got.query, "www.example.test");
            assert_eq!(got.names, ["www.example.test", "edge.example.test", "cdn.example.test"]);
        }
    }

    #[test]
    fn a_cname_loop_ends() {
        let mut names = DnsNames::new(16);
        names.learn(&dns_response(
            "a.test",
            vec![
                answer("a.test", cname("b.test")),
                answer("b.test", cname("a.test")),
                answer("c.test", addr("198.18.0.3")),
            ],
        ));
        let got = names.lookup("198.18.0.3".parse().unwrap()).expect("learned");
        assert_eq!(got.names, ["a.test", "c.test"]);
    }

    #[test]
    fn two_names_on_one_address_keep_both_newest_first() {
        let mut names = DnsNames::new(16);
        names.learn(&dns_response("one.test", vec![answer("one.test", addr("198.18.0.1"))]));
        names.learn(&dns_response("two.test", vec![answer("two.test", addr("198.18.0.1"))]));
        let got = names.lookup("198.18.0.1".parse().unwrap()).expect("learned");
        assert_eq!(got.query, "two.test");
        assert_eq!(got.names, ["two.test", "one.test"]);
    }

    #[test]
    fn the_oldest_address_goes_when_full() {
        let mut names = DnsNames::new(2);
        for (i, n) in ["a.test", "b.test", "c.test"].iter().enumerate() {
            names.learn(&dns_response(n, vec![answer(n, addr(&format!("198.18.0.{i}")))]));
        }
        assert_eq!(names.len(), 2);
        assert!(names.lookup("198.18.0.0".parse().unwrap()).is_none());
        assert!(names.lookup("198.18.0.2".parse().unwrap()).is_some());
    }

    #[test]
    fn type_and_rcode_names() {
        assert_eq!(rr_type_name(28), "AAAA");
        assert_eq!(rr_type_name(65), "HTTPS");
        assert_eq!(rr_type_name(999), "TYPE999");
        assert_eq!(rcode_name(3), "NXDOMAIN");
        assert_eq!(rcode_name(23), "RCODE23");
    }
}
