//! A DNS server authoritative for `example.test`, over UDP and TCP (RFC 1035 §4.2).
//!
//! Records: `example.test` and `www.example.test` (a CNAME to it) → the server address;
//! `other.example.test` → the other address; A and AAAA for each. Other names in the zone
//! get NXDOMAIN, names outside it REFUSED. Every answered query is counted.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA, CNAME},
    },
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone)]
pub struct Zone {
    /// `example.test`, `other.example.test`.
    pub v4: [Ipv4Addr; 2],
    pub v6: [Ipv6Addr; 2],
}

const TTL: u32 = 60;

impl Zone {
    fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let request = Message::from_vec(query).ok()?;
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut response = Message::response(request.metadata.id, OpCode::Query);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.authoritative = true;
        let Some(q) = request.queries.first() else {
            response.metadata.response_code = ResponseCode::FormErr;
            return response.to_vec().ok();
        };
        response.add_query(q.clone());
        let zone = Name::from_ascii(crate::ZONE).unwrap();
        let name = q.name().to_lowercase();
        let mut target = name.clone();
        if !zone.zone_of(&name) {
            response.metadata.response_code = ResponseCode::Refused;
            return response.to_vec().ok();
        }
        let www = Name::from_ascii("www.example.test.").unwrap();
        if name.eq_ignore_root_case(&www) {
            target = Name::from_ascii("example.test.").unwrap();
            let rdata = RData::CNAME(CNAME(target.clone()));
            response.add_answer(Record::from_rdata(name.clone(), TTL, rdata));
        }
        let index = if target.eq_ignore_root_case(&Name::from_ascii("example.test.").unwrap()) {
            0
        } else if target.eq_ignore_root_case(&Name::from_ascii("other.example.test.").unwrap()) {
            1
        } else {
            response.metadata.response_code = ResponseCode::NXDomain;
            return response.to_vec().ok();
        };
        match q.query_type() {
            RecordType::A => {
                response.add_answer(Record::from_rdata(target, TTL, RData::A(A(self.v4[index]))));
            }
            RecordType::AAAA => {
                let rdata = RData::AAAA(AAAA(self.v6[index]));
                response.add_answer(Record::from_rdata(target, TTL, rdata));
            }
            _ => {}
        }
        response.to_vec().ok()
    }
}

pub async fn serve_udp(sock: tokio::net::UdpSocket, zone: Zone, count: Arc<AtomicU32>) {
    let mut buf = vec![0u8; 4096];
    while let Ok((len, from)) = sock.recv_from(&mut buf).await {
        if let Some(reply) = zone.answer(&buf[..len]) {
            count.fetch_add(1, Ordering::Relaxed);
            let _ = sock.send_to(&reply, from).await;
        }
    }
}

pub async fn serve_tcp(listener: tokio::net::TcpListener, zone: Zone, count: Arc<AtomicU32>) {
    while let Ok((mut stream, _)) = listener.accept().await {
        let zone = zone.clone();
        let count = count.clone();
        tokio::spawn(async move {
            // Each message is preceded by its two-byte length (RFC 1035 §4.2.2).
            loop {
                let Ok(len) = stream.read_u16().await else { return };
                let mut msg = vec![0u8; len as usize];
                if stream.read_exact(&mut msg).await.is_err() {
                    return;
                }
                let Some(reply) = zone.answer(&msg) else { return };
                count.fetch_add(1, Ordering::Relaxed);
                if stream.write_u16(reply.len() as u16).await.is_err()
                    || stream.write_all(&reply).await.is_err()
                {
                    return;
                }
            }
        });
    }
}
