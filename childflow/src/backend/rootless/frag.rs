//! IP fragmentation at the tap: reassembling what the command sends in fragments, and
//! fragmenting what the engine sends it that does not fit the tap's MTU.
//!
//! The command's kernel fragments a datagram larger than the tap's MTU (a 4,000-byte UDP
//! datagram with MTU 1500 leaves as three frames). The engine relays datagrams, not packets,
//! so it puts them back together first: IPv4 per RFC 791 §3.2 (fragments of one datagram
//! share source, destination, protocol and identification), IPv6 per RFC 8200 §4.5 (the
//! Fragment header; source, destination and identification). Replies are cut the same way
//! on their way to the command, which reassembles them.
//!
//! Invariants: memory is bounded ([`MAX_DATAGRAMS`] in progress, [`MAX_HELD`] bytes); a
//! datagram not complete within [`REASSEMBLY_TIMEOUT`] is dropped (RFC 8200 §4.5: 60 s);
//! overlapping fragments drop their datagram (RFC 5722, and what Linux does for IPv4 too),
//! and so does a non-final fragment whose length is not a multiple of 8. Nothing here
//! panics on bytes from the command.

use std::{collections::HashMap, net::IpAddr};

use smoltcp::time::{Duration, Instant};

use super::packet::{ETH_HEADER_LEN, ETHERTYPE_IPV4, Headers, ethertype, ipv6_chain};

/// Datagrams being reassembled at once; a fragment of one more is dropped.
const MAX_DATAGRAMS: usize = 64;
/// Bytes held in incomplete datagrams; a fragment beyond it is dropped.
const MAX_HELD: usize = 4 << 20;
/// How long the fragments of one datagram may take to arrive.
pub const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest IP payload either family can describe without jumbograms.
const MAX_IP_PAYLOAD: usize = 65_535;
const IPV6_HEADER_LEN: usize = 40;
const IPV6_FRAGMENT_HEADER: u8 = 44;
const IPV6_FRAGMENT_HEADER_LEN: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct DatagramKey {
    src: IpAddr,
    dst: IpAddr,
    /// IPv4's protocol (part of the identity there); 0 for IPv6.
    proto: u8,
    ident: u32,
}

/// One fragment's place in its datagram.
struct Piece {
    /// Offset of the fragment's data in the frame.
    data_at: usize,
    /// Offset of the data within the datagram's fragmentable part.
    offset: usize,
    len: usize,
    more: bool,
    /// The frame up to the start of what is fragmented: Ethernet, IP header, and for IPv6
    /// the extension headers before the Fragment header.
    header_len: usize,
    /// IPv6: where the Next Header byte naming the Fragment header is, and what it must
    /// name once the Fragment header is gone.
    v6_next: Option<(usize, u8)>,
}

struct Datagram {
    started: Instant,
    /// The first fragment's headers (only it has the transport header in its data).
    header: Option<Vec<u8>>,
    v6_next: Option<(usize, u8)>,
    /// The fragmentable part, as received so far.
    data: Vec<u8>,
    /// Ranges received, `[start, end)`.
    have: Vec<(usize, usize)>,
    /// The fragmentable part's length, once the last fragment came.
    total: Option<usize>,
    /// Each fragment's header bytes (IP length minus data), for accounting.
    header_bytes: Vec<u32>,
}

/// A datagram put back together.
pub struct Reassembled {
    /// The whole datagram as one unfragmented frame.
    pub frame: Vec<u8>,
    /// The header bytes (IP length minus data) of each fragment but one: each fragment is a
    /// packet of its own on the wire, and adds its headers to the datagram's length.
    pub extra_headers: Vec<u32>,
}

/// Fragments in flight from the command.
#[derive(Default)]
pub struct Reassembler {
    pending: HashMap<DatagramKey, Datagram>,
    held: usize,
}

impl Reassembler {
    /// Takes one fragment (a frame whose headers `h` say [`Headers::fragment`]); returns
    /// the datagram once its last missing piece arrived.
    pub fn push(&mut self, frame: &[u8], h: &Headers, now: Instant) -> Option<Reassembled> {
        let (key, piece) = locate(frame, h)?;
        if !self.pending.contains_key(&key)
            && (self.pending.len() >= MAX_DATAGRAMS || self.held >= MAX_HELD)
        {
            self.expire(now);
            if self.pending.len() >= MAX_DATAGRAMS || self.held >= MAX_HELD {
                tracing::debug!("dropping a fragment from {}: too many in reassembly", h.src);
                return None;
            }
        }
        let end = piece.offset + piece.len;
        let bad_length = piece.more && piece.len % 8 != 0;
        let d = self.pending.entry(key).or_insert_with(|| Datagram {
            started: now,
            header: None,
            v6_next: None,
            data: Vec::new(),
            have: Vec::new(),
            total: None,
            header_bytes: Vec::new(),
        });
        let overlaps = d.have.iter().any(|&(s, e)| piece.offset < e && s < end);
        let past_end = d.total.is_some_and(|t| end > t) || (!piece.more && d.data.len() > end);
        let header_len = piece.header_len - ETH_HEADER_LEN;
        if overlaps || bad_length || past_end || end + header_len > MAX_IP_PAYLOAD + 40 {
            tracing::debug!("dropping a datagram from {}: malformed fragments", h.src);
            self.drop_datagram(&key);
            return None;
        }
        if d.data.len() < end {
            self.held += end - d.data.len();
            d.data.resize(end, 0);
        }
        d.data[piece.offset..end]
            .copy_from_slice(frame.get(piece.data_at..piece.data_at + piece.len)?);
        d.have.push((piece.offset, end));
        d.header_bytes.push(h.ip_len - piece.len as u32);
        if !piece.more {
            d.total = Some(end);
        }
        if piece.offset == 0 {
            d.header = Some(frame[..piece.header_len].to_vec());
            d.v6_next = piece.v6_next;
        }
        let total = d.total?;
        let received: usize = d.have.iter().map(|(s, e)| e - s).sum();
        if received != total || d.header.is_none() {
            return None;
        }
        let d = self.take(&key)?;
        let header = d.header?;
        let frame = whole_frame(header, d.v6_next, &d.data)?;
        let wire: usize = d.header_bytes.iter().map(|&b| b as usize).sum::<usize>() + total;
        let extra_headers =
            extra_header_bytes(wire, frame.len() - ETH_HEADER_LEN, d.header_bytes.len());
        Some(Reassembled { frame, extra_headers })
    }

    /// Drops datagrams whose fragments took longer than [`REASSEMBLY_TIMEOUT`].
    pub fn expire(&mut self, now: Instant) {
        let old: Vec<DatagramKey> = self
            .pending
            .iter()
            .filter(|(_, d)| now >= d.started + REASSEMBLY_TIMEOUT)
            .map(|(k, _)| *k)
            .collect();
        for key in old {
            tracing::debug!("dropping an incomplete datagram from {}", key.src);
            self.drop_datagram(&key);
        }
    }

    /// Datagrams in reassembly (for tests and diagnostics).
    pub fn in_progress(&self) -> usize {
        self.pending.len()
    }

    fn take(&mut self, key: &DatagramKey) -> Option<Datagram> {
        let d = self.pending.remove(key)?;
        self.held -= d.data.len();
        Some(d)
    }

    fn drop_datagram(&mut self, key: &DatagramKey) {
        let _ = self.take(key);
    }
}

/// Where fragment `frame` belongs and what it carries.
fn locate(frame: &[u8], h: &Headers) -> Option<(DatagramKey, Piece)> {
    let ip = h.ip_offset;
    let end = ip + h.ip_len as usize;
    if ethertype(frame)? == ETHERTYPE_IPV4 {
        let field = u16::from_be_bytes([*frame.get(ip + 6)?, *frame.get(ip + 7)?]);
        let ident = u16::from_be_bytes([*frame.get(ip + 4)?, *frame.get(ip + 5)?]);
        let key = DatagramKey { src: h.src, dst: h.dst, proto: h.proto, ident: u32::from(ident) };
        let piece = Piece {
            data_at: h.l4_offset,
            offset: usize::from(field & 0x1fff) * 8,
            len: end.checked_sub(h.l4_offset)?,
            more: field & 0x2000 != 0,
            header_len: h.l4_offset,
            v6_next: None,
        };
        Some((key, piece))
    } else {
        let frag = ipv6_chain(frame, ip, end)?.fragment?;
        let data_at = frag.header_offset + IPV6_FRAGMENT_HEADER_LEN;
        let key = DatagramKey { src: h.src, dst: h.dst, proto: 0, ident: frag.ident };
        // In the whole datagram the Fragment header goes: the byte that named it names
        // what the Fragment header's own Next Header does.
        let next = *frame.get(frag.header_offset)?;
        let piece = Piece {
            data_at,
            offset: frag.offset,
            len: end.checked_sub(data_at)?,
            more: frag.more,
            header_len: frag.header_offset,
            v6_next: Some((frag.named_at, next)),
        };
        Some((key, piece))
    }
}

/// What `fragments - 1` packets add to a datagram of `whole` IP bytes for `wire` IP bytes
/// in all: each fragment's headers (the IPv6 Fragment header of the first one included,
/// which the whole datagram does not have), one entry per extra packet.
pub fn extra_header_bytes(wire: usize, whole: usize, fragments: usize) -> Vec<u32> {
    let extra = fragments.saturating_sub(1);
    if extra == 0 {
        return Vec::new();
    }
    let surplus = wire.saturating_sub(whole);
    let each = surplus / extra;
    let mut out = vec![each as u32; extra];
    out[0] += (surplus - each * extra) as u32;
    out
}

/// The reassembled frame: the first fragment's headers with the lengths (and for IPv6 the
/// Next Header that named the Fragment header) set for the whole, then the data.
fn whole_frame(mut header: Vec<u8>, v6_next: Option<(usize, u8)>, data: &[u8]) -> Option<Vec<u8>> {
    let ip = ETH_HEADER_LEN;
    match v6_next {
        None => {
            let ihl = header.len() - ip;
            let total = u16::try_from(ihl + data.len()).ok()?;
            header[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
            // Flags (DF kept) and offset: a whole datagram.
            header[ip + 6] &= 0x40;
            header[ip + 7] = 0;
            set_ipv4_checksum(&mut header[ip..]);
        }
        Some((at, next)) => {
            *header.get_mut(at)? = next;
            let payload = u16::try_from(header.len() - ip - IPV6_HEADER_LEN + data.len()).ok()?;
            header[ip + 4..ip + 6].copy_from_slice(&payload.to_be_bytes());
        }
    }
    header.extend_from_slice(data);
    Some(header)
}

/// Writes the IPv4 header checksum (RFC 791) of `ip`, the header alone.
fn set_ipv4_checksum(ip: &mut [u8]) {
    ip[10] = 0;
    ip[11] = 0;
    let mut sum: u32 = ip.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// Cuts `frame` (one whole IP packet the engine built, with no extension headers) into
/// frames whose IP packets fit `mtu`. `ident` identifies the datagram among the command's
/// reassemblies; the caller never reuses it while such a datagram could be in flight.
pub fn fragment(frame: &[u8], mtu: usize, ident: u32) -> Vec<Vec<u8>> {
    let ip = ETH_HEADER_LEN;
    let mut out = Vec::new();
    if ethertype(frame) == Some(ETHERTYPE_IPV4) {
        let ihl = usize::from(frame[ip] & 0x0f) * 4;
        let data = &frame[ip + ihl..];
        let chunk = (mtu.saturating_sub(ihl) & !7).max(8);
        for (i, piece) in data.chunks(chunk).enumerate() {
            let offset = i * chunk;
            let more = offset + piece.len() < data.len();
            let mut f = frame[..ip + ihl].to_vec();
            f[ip + 2..ip + 4].copy_from_slice(&((ihl + piece.len()) as u16).to_be_bytes());
            f[ip + 4..ip + 6].copy_from_slice(&(ident as u16).to_be_bytes());
            let field = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
            f[ip + 6..ip + 8].copy_from_slice(&field.to_be_bytes());
            set_ipv4_checksum(&mut f[ip..ip + ihl]);
            f.extend_from_slice(piece);
            out.push(f);
        }
    } else {
        let next = frame[ip + 6];
        let data = &frame[ip + IPV6_HEADER_LEN..];
        let chunk = (mtu.saturating_sub(IPV6_HEADER_LEN + IPV6_FRAGMENT_HEADER_LEN) & !7).max(8);
        for (i, piece) in data.chunks(chunk).enumerate() {
            let offset = i * chunk;
            let more = offset + piece.len() < data.len();
            let mut f = frame[..ip + IPV6_HEADER_LEN].to_vec();
            f[ip + 6] = IPV6_FRAGMENT_HEADER;
            let payload = (IPV6_FRAGMENT_HEADER_LEN + piece.len()) as u16;
            f[ip + 4..ip + 6].copy_from_slice(&payload.to_be_bytes());
            let field = offset as u16 | u16::from(more);
            f.extend_from_slice(&[next, 0]);
            f.extend_from_slice(&field.to_be_bytes());
            f.extend_from_slice(&ident.to_be_bytes());
            f.extend_from_slice(piece);
            out.push(f);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::rootless::packet::{self, tests::udp_from_child};
    use childflow_common::flow::PROTO_UDP;

    fn t(ms: i64) -> Instant {
        Instant::from_millis(ms)
    }

    fn datagram(v6: bool, len: usize) -> Vec<u8> {
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        if v6 {
            udp_from_child("[fd00:cf::100]:5000", "[2001:db8::2]:7", &payload)
        } else {
            udp_from_child("10.0.2.100:5000", "198.18.0.2:7", &payload)
        }
    }

    fn reassemble(r: &mut Reassembler, frags: &[Vec<u8>]) -> Option<Reassembled> {
        let mut done = None;
        for f in frags {
            let h = packet::parse(f).expect("a fragment parses");
            assert!(h.fragment, "is a fragment");
            assert!(h.ip_len as usize <= 1500, "fits the MTU");
            if let Some(r) = r.push(f, &h, t(0)) {
                assert!(done.is_none(), "completed once");
                done = Some(r);
            }
        }
        done
    }

    #[test]
    fn fragments_reassemble_to_the_original_in_any_order() {
        for v6 in [false, true] {
            for len in [1473, 4000, 20_000, 65_000] {
                let whole = datagram(v6, len);
                let mut frags = fragment(&whole, 1500, 7);
                assert!(frags.len() > 1);
                let mut r = Reassembler::default();
                // The same datagram, but for IPv4's identification, flags and checksum.
                let same = |a: &[u8]| if v6 { a.to_vec() } else { [&a[..18], &a[26..]].concat() };
                let back = reassemble(&mut r, &frags).expect("complete");
                assert_eq!(same(&back.frame), same(&whole), "v6 {v6} len {len} in order");
                assert_eq!(back.extra_headers.len(), frags.len() - 1);
                let wire: usize = frags.iter().map(|f| f.len() - ETH_HEADER_LEN).sum();
                let counted: usize = back.extra_headers.iter().map(|&b| b as usize).sum();
                assert_eq!(whole.len() - ETH_HEADER_LEN + counted, wire, "bytes as on the wire");
                frags.reverse();
                let back = reassemble(&mut r, &frags).expect("complete");
                assert_eq!(same(&back.frame), same(&whole), "v6 {v6} len {len} reversed");
                assert_eq!(r.in_progress(), 0);
                let h = packet::parse(&back.frame).unwrap();
                assert_eq!((h.proto, h.payload_len as usize), (PROTO_UDP, len));
            }
        }
    }

    #[test]
    fn overlapping_or_missing_fragments_never_complete() {
        for v6 in [false, true] {
            let frags = fragment(&datagram(v6, 4000), 1500, 9);
            let mut r = Reassembler::default();
            assert!(reassemble(&mut r, &frags[..2]).is_none(), "one missing");
            assert_eq!(r.in_progress(), 1);
            r.expire(t(59_000));
            assert_eq!(r.in_progress(), 1, "not yet timed out");
            r.expire(t(60_000));
            assert_eq!(r.in_progress(), 0, "timed out");
            let twice = [frags[0].clone(), frags[1].clone(), frags[1].clone(), frags[2].clone()];
            assert!(reassemble(&mut r, &twice).is_none(), "an overlap drops the datagram");
        }
    }

    #[test]
    fn memory_is_bounded() {
        let mut r = Reassembler::default();
        for ident in 0..(MAX_DATAGRAMS as u32 + 10) {
            let frags = fragment(&datagram(false, 4000), 1500, ident);
            let h = packet::parse(&frags[0]).unwrap();
            let _ = r.push(&frags[0], &h, t(0));
        }
        assert_eq!(r.in_progress(), MAX_DATAGRAMS);
    }
}
