//! The flow key and per-flow counters, as kept in the kernel's flow map and by the rootless
//! engine alike.
//!
//! A flow is always keyed from the command's point of view: `local` is the command tree's
//! side, `remote` the peer. Direction index [`DIR_OUT`] counts what the command sent,
//! [`DIR_IN`] what it received. Both backends fill [`FlowStats`] with the same rules, so the
//! flow table downstream never knows which backend produced a record.

/// IP protocol numbers we track (IANA "Assigned Internet Protocol Numbers").
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// Address family tags used in [`FlowKey::family`].
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Index into the per-direction arrays: traffic sent by the command tree.
pub const DIR_OUT: usize = 0;
/// Index into the per-direction arrays: traffic received by the command tree.
pub const DIR_IN: usize = 1;

/// The minor of the classid of the TC filter on each direction of the host end of the
/// run's veth: the one TC program reads it back (`__sk_buff.tc_classid`) to know which way
/// a packet goes. The host end's ingress carries what the command sends.
pub const TC_CLASSID_INGRESS: u16 = 1;
pub const TC_CLASSID_EGRESS: u16 = 2;

/// TCP header flag bits (RFC 9293 §3.1), as in the 13th byte of the header.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;
pub const TCP_ECE: u8 = 0x40;
pub const TCP_CWR: u8 = 0x80;

/// ICMP message types that form request/reply pairs (RFC 792, RFC 4443).
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;

/// The 5-tuple of a flow, oriented from the command tree's side.
///
/// For ICMP echo, `local_port` is the echo identifier and `remote_port` is
/// `type << 8 | code` of the request, so a request and its reply share one key. For other
/// ICMP messages `local_port` is 0 and `remote_port` is the message's own `type << 8 | code`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// The command's address, network byte order; IPv4 uses the first 4 bytes, rest zero.
    pub local_addr: [u8; 16],
    /// The peer's address, network byte order; IPv4 uses the first 4 bytes, rest zero.
    pub remote_addr: [u8; 16],
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
    /// IP protocol number (`PROTO_*`).
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    /// The ICMP key fields for a message of `icmp_type`/`code` with echo identifier `id`,
    /// as `(local_port, remote_port)`. Echo replies fold onto their request's key.
    pub const fn icmp_ports(family: u8, icmp_type: u8, code: u8, id: u16) -> (u16, u16) {
        let request = match (family, icmp_type) {
            (FAMILY_V4, ICMP_ECHO_REQUEST) | (FAMILY_V4, ICMP_ECHO_REPLY) => ICMP_ECHO_REQUEST,
            (FAMILY_V6, ICMPV6_ECHO_REQUEST) | (FAMILY_V6, ICMPV6_ECHO_REPLY) => {
                ICMPV6_ECHO_REQUEST
            }
            _ => return (0, ((icmp_type as u16) << 8) | code as u16),
        };
        (id, (request as u16) << 8)
    }
}

/// Zeek `history` letters we record, one bit each (Zeek's `conn.log` documentation).
/// Upper case when the originator sent it, lower case for the responder.
pub const HIST_SYN: u8 = 1 << 0; // S: SYN without ACK
pub const HIST_SYNACK: u8 = 1 << 1; // H: SYN with ACK
pub const HIST_ACK: u8 = 1 << 2; // A: a pure ACK
pub const HIST_DATA: u8 = 1 << 3; // D: a packet with payload
pub const HIST_FIN: u8 = 1 << 4; // F: FIN
pub const HIST_RST: u8 = 1 << 5; // R: RST
const HIST_LETTERS: [u8; 6] = *b"SHADFR";

/// The history bits one packet contributes, from its TCP flags and payload length.
/// For UDP and ICMP pass `flags = 0`; only `D` can apply.
///
/// Without a branch, on purpose: in the kernel programs every branch here split the
/// verifier's walk into one path per flag combination, each with its own constant `bits`,
/// and each path then walked the rest of the flow update on its own (~11 paths per IP
/// version; 5,434 → 5,125 instructions verified per TC program). The rules, which `tests::history_bits_rules`
/// checks against for every flag byte: `S` SYN without ACK, `H` SYN with ACK, `F` FIN,
/// `R` RST, `D` payload, else `A` an ACK without SYN/FIN/RST.
pub const fn history_bits(tcp_flags: u8, payload_len: u32) -> u8 {
    let f = tcp_flags as u32;
    let syn = (f >> 1) & 1; // TCP_SYN
    let ack = (f >> 4) & 1; // TCP_ACK
    let fin = f & 1; // TCP_FIN
    let rst = (f >> 2) & 1; // TCP_RST
    // 1 if payload_len != 0: for any nonzero x, x | -x has the top bit set.
    let data = ((payload_len | payload_len.wrapping_neg()) >> 31) & 1;
    let pure_ack = ack & ((syn | fin | rst) ^ 1) & (data ^ 1);
    let bits = (syn & (ack ^ 1)) // HIST_SYN, bit 0
        | (syn & ack) << 1 // HIST_SYNACK
        | pure_ack << 2 // HIST_ACK
        | data << 3 // HIST_DATA
        | fin << 4 // HIST_FIN
        | rst << 5; // HIST_RST
    bits as u8
}

/// Per-flow counters, kept in the kernel flow map and by the rootless engine.
///
/// Byte counts are IP-layer bytes (IP header and everything after it, what `ip.len` sums to
/// in a capture) and transport payload bytes (Zeek's `orig_bytes`/`resp_bytes`).
/// Timestamps are in the backend's monotonic clock (kernel: `bpf_ktime_get_ns`, i.e.
/// `CLOCK_MONOTONIC`); userspace converts them to wall-clock time once. The kernel reads
/// that clock precisely for `first_ns` and at most once per tick per CPU for `last_ns`
/// (`childflow-ebpf` `TickClock`): `last_ns` may lag the last packet by up to one tick.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowStats {
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub payload_bytes: [u64; 2],
    pub first_ns: u64,
    pub last_ns: u64,
    /// OR of every TCP flag byte seen, per direction.
    pub tcp_flags: [u8; 2],
    /// `DIR_OUT as u8` when the command sent the first packet, else `DIR_IN as u8`.
    pub initiator: u8,
    /// Number of valid bytes in `history`.
    pub history_len: u8,
    /// Zeek-style history string (ASCII), in order of first appearance.
    pub history: [u8; 16],
    /// `HIST_*` bits already recorded, per direction.
    pub history_seen: [u8; 2],
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowStats>() == 88);

/// [`FlowEntry::slot`] of a flow whose counters are in the entry itself.
pub const NO_SLOT: u32 = u32::MAX;

/// A flow's value in the kernel's flow map (`FLOWS` in childflow-ebpf): where its counters
/// are. Most flows have a slot of their own in the slot array (`SLOTS`), found from the
/// key by a hash and checked against the key the slot holds, so a packet finds its counters
/// without a hash map lookup; a flow whose slot was taken keeps its counters in `stats`
/// here (`slot` is [`NO_SLOT`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEntry {
    /// Index into the slot array, or [`NO_SLOT`].
    pub slot: u32,
    pub _pad: u32,
    /// The counters if `slot` is [`NO_SLOT`]; unused (zero) otherwise.
    pub stats: FlowStats,
}
const _: () = assert!(core::mem::size_of::<FlowEntry>() == 96);

/// One place of the kernel's slot array: the key of the flow it belongs to (all zero while
/// it belongs to none, or the flow is still being made) and that flow's counters, laid out
/// for the cache: a packet reads the key's line and writes only its own direction's line
/// ([`SlotDir`]), so the two CPUs of a bulk transfer (one sending, one receiving the ACKs)
/// never write a line the other reads. In a [`FlowStats`] both directions' counters share
/// lines: a slot laid out like one cost ~90 ns more per packet when two CPUs used one flow
/// at once (`--prog-run --pair`: 166/160 ns against 75 alone). [`FlowSlot::stats`] gives
/// the usual form. 256 bytes: four cache lines (the kernel's array starts on a page).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowSlot {
    pub key: FlowKey,
    pub first_ns: u64,
    /// As in [`FlowStats`].
    pub initiator: u8,
    /// As in [`FlowStats`].
    pub history_len: u8,
    pub _pad: [u8; 14],
    /// Per direction (`DIR_OUT`, `DIR_IN`).
    pub dirs: [SlotDir; 2],
    /// As in [`FlowStats`]: written only when a letter is new.
    pub history: [u8; 16],
    pub _pad2: [u64; 6],
}
const _: () = assert!(core::mem::size_of::<FlowSlot>() == 256);
const _: () = assert!(core::mem::offset_of!(FlowSlot, dirs) == 64);

/// One direction's counters in a [`FlowSlot`], on a cache line of their own.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SlotDir {
    pub packets: u64,
    pub bytes: u64,
    pub payload_bytes: u64,
    /// The last packet in this direction (the kernel's tick clock, as `FlowStats::last_ns`).
    pub last_ns: u64,
    pub tcp_flags: u8,
    /// `HIST_*` bits already recorded in this direction.
    pub history_seen: u8,
    pub _pad: [u8; 30],
}
const _: () = assert!(core::mem::size_of::<SlotDir>() == 64);

impl FlowSlot {
    /// The flow's counters as a [`FlowStats`]: `last_ns` is the later of the two
    /// directions'.
    pub fn stats(&self) -> FlowStats {
        let [o, i] = &self.dirs;
        FlowStats {
            packets: [o.packets, i.packets],
            bytes: [o.bytes, i.bytes],
            payload_bytes: [o.payload_bytes, i.payload_bytes],
            first_ns: self.first_ns,
            last_ns: if o.last_ns > i.last_ns { o.last_ns } else { i.last_ns },
            tcp_flags: [o.tcp_flags, i.tcp_flags],
            initiator: self.initiator,
            history_len: self.history_len,
            history: self.history,
            history_seen: [o.history_seen, i.history_seen],
            _pad: [0; 2],
        }
    }
}

impl FlowStats {
    /// A fresh record for a flow whose first packet went in direction `dir` at `now_ns`.
    pub const fn new(dir: usize, now_ns: u64) -> Self {
        FlowStats {
            packets: [0; 2],
            bytes: [0; 2],
            payload_bytes: [0; 2],
            first_ns: now_ns,
            last_ns: now_ns,
            tcp_flags: [0; 2],
            initiator: dir as u8,
            history_len: 0,
            history: [0; 16],
            history_seen: [0; 2],
            _pad: [0; 2],
        }
    }

    /// Counts one packet. The kernel does the counter part with atomic adds instead (two
    /// CPUs may see the same flow at once) and calls [`FlowStats::record_history`] itself.
    #[inline(always)]
    pub fn account(
        &mut self,
        dir: usize,
        ip_len: u32,
        payload_len: u32,
        tcp_flags: u8,
        now_ns: u64,
    ) {
        let d = dir & 1;
        self.packets[d] += 1;
        self.bytes[d] += ip_len as u64;
        self.payload_bytes[d] += payload_len as u64;
        self.tcp_flags[d] |= tcp_flags;
        if now_ns > self.last_ns {
            self.last_ns = now_ns;
        }
        self.record_history(dir, history_bits(tcp_flags, payload_len));
    }

    /// Appends the letters of `bits` not yet seen in direction `dir` to `history`.
    /// Written as a fixed, bounded loop with masked indexes so the eBPF verifier accepts it.
    #[inline(always)]
    pub fn record_history(&mut self, dir: usize, bits: u8) {
        let d = dir & 1;
        record_history(
            &mut self.history,
            &mut self.history_len,
            &mut self.history_seen[d],
            self.initiator,
            dir,
            bits,
        );
    }

    /// The history string as bytes (ASCII letters).
    pub fn history(&self) -> &[u8] {
        let len = (self.history_len as usize).min(self.history.len());
        &self.history[..len]
    }
}

/// [`FlowStats::record_history`] on the fields wherever they are (a [`FlowSlot`] keeps
/// them apart): appends the letters of `bits` not yet in `seen` (direction `dir`'s) to
/// `history`. `initiator` is 0 or 1 (a `DIR_*`).
///
/// Without a branch after the first (is any letter new?), on purpose: in the kernel
/// programs each branch of a step ("is this letter new and is there room?") was a state
/// the verifier pushed and walked again, at each of the three places the TC program
/// records history (`cargo xtask bench rootful --prog-run --verifier`: ~1,250 of
/// `cf_tc`'s 4,954 processed instructions). Each step writes its position whether it takes
/// the letter or not: the letter if it does, the byte that was there if it does not. (The
/// history never fills: each direction adds each of its six letters at most once, 12 in
/// all; the room check only keeps a corrupt length harmless.) A CPU recording a letter of
/// the other direction at the same time may lose it, as it may when both append at the
/// same length; a history is a summary, and its letters are never counted.
#[inline(always)]
pub fn record_history(
    history: &mut [u8; 16],
    history_len: &mut u8,
    seen: &mut u8,
    initiator: u8,
    dir: usize,
    bits: u8,
) {
    let new = bits & !*seen;
    if new == 0 {
        return;
    }
    *seen |= new;
    // Lower case for the responder's letters.
    let lower = ((dir as u8 ^ initiator) & 1) << 5;
    let mut i = 0;
    while i < HIST_LETTERS.len() {
        // `history_len` is read and written through memory each time (volatile): in the
        // kernel programs, kept in a register it is an exact index that differs with every
        // combination of letters taken so far, and the verifier walks each combination
        // separately; read from the map value it is just "some length".
        let len = &raw mut *history_len;
        // SAFETY: reading and writing a field exclusively borrowed.
        let len_now = unsafe { len.read_volatile() };
        // 1 if the letter is new and there is room (`len_now < 16`: the subtraction wraps).
        let room = ((len_now as u32).wrapping_sub(history.len() as u32) >> 31) as u8;
        let take = (new >> i) & 1 & room;
        let at = (len_now as usize) & 15;
        let old = history[at];
        history[at] = old ^ ((old ^ (HIST_LETTERS[i] | lower)) & 0u8.wrapping_sub(take));
        unsafe { len.write_volatile(len_now + take) };
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_bits_rules() {
        const _: () = assert!(
            HIST_SYN == 1 && HIST_SYNACK == 2 && HIST_ACK == 4 && HIST_DATA == 8,
            "history_bits hard-codes these positions"
        );
        const _: () = assert!(HIST_FIN == 16 && HIST_RST == 32);
        for flags in 0..=255u8 {
            for payload in [0, 1, 1460, 0x7fff_ffff, 0x8000_0000, u32::MAX] {
                let (syn, ack) = (flags & TCP_SYN != 0, flags & TCP_ACK != 0);
                let mut want = 0;
                if syn && !ack {
                    want |= HIST_SYN;
                }
                if syn && ack {
                    want |= HIST_SYNACK;
                }
                if flags & TCP_FIN != 0 {
                    want |= HIST_FIN;
                }
                if flags & TCP_RST != 0 {
                    want |= HIST_RST;
                }
                if payload > 0 {
                    want |= HIST_DATA;
                } else if ack && flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
                    want |= HIST_ACK;
                }
                assert_eq!(
                    history_bits(flags, payload),
                    want,
                    "flags {flags:#04x} payload {payload}"
                );
            }
        }
    }

    fn handshake_and_close() -> FlowStats {
        let mut s = FlowStats::new(DIR_OUT, 1);
        s.account(DIR_OUT, 60, 0, TCP_SYN, 1);
        s.account(DIR_IN, 60, 0, TCP_SYN | TCP_ACK, 2);
        s.account(DIR_OUT, 52, 0, TCP_ACK, 3);
        s.account(DIR_OUT, 152, 100, TCP_ACK | TCP_PSH, 4);
        s.account(DIR_IN, 1052, 1000, TCP_ACK | TCP_PSH, 5);
        s.account(DIR_OUT, 52, 0, TCP_ACK | TCP_FIN, 6);
        s.account(DIR_IN, 52, 0, TCP_ACK | TCP_FIN, 7);
        s
    }

    #[test]
    fn history_of_a_normal_connection_matches_zeek() {
        let s = handshake_and_close();
        assert_eq!(s.history(), b"ShADdFf");
        assert_eq!(s.packets, [4, 3]);
        assert_eq!(s.bytes, [316, 1164]);
        assert_eq!(s.payload_bytes, [100, 1000]);
        assert_eq!(s.last_ns, 7);
    }

    #[test]
    fn responder_letters_are_lower_case_even_when_remote_initiates() {
        let mut s = FlowStats::new(DIR_IN, 0);
        s.account(DIR_IN, 60, 0, TCP_SYN, 0);
        s.account(DIR_OUT, 40, 0, TCP_RST | TCP_ACK, 0);
        assert_eq!(s.history(), b"Sr");
    }

    #[test]
    fn history_never_overflows() {
        let mut s = FlowStats::new(DIR_OUT, 0);
        for flags in [TCP_SYN, TCP_SYN | TCP_ACK, TCP_ACK, TCP_FIN, TCP_RST] {
            s.account(DIR_OUT, 40, 1, flags, 0);
            s.account(DIR_IN, 40, 0, flags, 0);
        }
        assert!(s.history().len() <= 12);
    }

    #[test]
    fn a_slot_reads_back_as_the_stats_it_holds() {
        let s = handshake_and_close();
        let mut slot =
            FlowSlot { first_ns: s.first_ns, initiator: s.initiator, ..Default::default() };
        slot.history_len = s.history_len;
        slot.history = s.history;
        for d in [DIR_OUT, DIR_IN] {
            slot.dirs[d] = SlotDir {
                packets: s.packets[d],
                bytes: s.bytes[d],
                payload_bytes: s.payload_bytes[d],
                last_ns: if d == DIR_IN { s.last_ns } else { s.last_ns - 1 },
                tcp_flags: s.tcp_flags[d],
                history_seen: s.history_seen[d],
                _pad: [0; 30],
            };
        }
        assert_eq!(slot.stats(), s);
        slot.dirs[DIR_OUT].last_ns = s.last_ns + 5;
        assert_eq!(slot.stats().last_ns, s.last_ns + 5, "the later direction's last_ns");
    }

    #[test]
    fn icmp_echo_reply_shares_the_request_key() {
        let req = FlowKey::icmp_ports(FAMILY_V4, ICMP_ECHO_REQUEST, 0, 77);
        let rep = FlowKey::icmp_ports(FAMILY_V4, ICMP_ECHO_REPLY, 0, 77);
        assert_eq!(req, rep);
        assert_eq!(req, (77, 8 << 8));
        let v6 = FlowKey::icmp_ports(FAMILY_V6, ICMPV6_ECHO_REPLY, 0, 5);
        assert_eq!(v6, (5, 128 << 8));
        let unreach = FlowKey::icmp_ports(FAMILY_V4, 3, 3, 0);
        assert_eq!(unreach, (0, 3 << 8 | 3));
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    use core::fmt;
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    fn ip(family: u8, bytes: &[u8; 16]) -> IpAddr {
        if family == FAMILY_V4 {
            IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(*bytes))
        }
    }

    fn bytes(addr: IpAddr) -> [u8; 16] {
        let mut out = [0; 16];
        match addr {
            IpAddr::V4(a) => out[..4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => out = a.octets(),
        }
        out
    }

    impl FlowKey {
        /// A key for `proto` between the command's `local` and the peer's `remote`
        /// (both of one family; the family is taken from `local`).
        pub fn new(proto: u8, local: SocketAddr, remote: SocketAddr) -> Self {
            FlowKey {
                local_addr: bytes(local.ip()),
                remote_addr: bytes(remote.ip()),
                local_port: local.port(),
                remote_port: remote.port(),
                proto,
                family: if local.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 },
                _pad: [0; 2],
            }
        }

        pub fn local_ip(&self) -> IpAddr {
            ip(self.family, &self.local_addr)
        }

        pub fn remote_ip(&self) -> IpAddr {
            ip(self.family, &self.remote_addr)
        }

        pub fn local(&self) -> SocketAddr {
            SocketAddr::new(self.local_ip(), self.local_port)
        }

        pub fn remote(&self) -> SocketAddr {
            SocketAddr::new(self.remote_ip(), self.remote_port)
        }

        pub fn is_icmp(&self) -> bool {
            matches!(self.proto, PROTO_ICMP | PROTO_ICMPV6)
        }

        /// `tcp`, `udp`, `icmp`, `icmp6`, or the protocol number.
        pub fn proto_name(&self) -> ProtoName {
            ProtoName(self.proto)
        }
    }

    /// Displays an IP protocol number the way flow logs name it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ProtoName(pub u8);

    impl fmt::Display for ProtoName {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self.0 {
                PROTO_TCP => f.write_str("tcp"),
                PROTO_UDP => f.write_str("udp"),
                PROTO_ICMP => f.write_str("icmp"),
                PROTO_ICMPV6 => f.write_str("icmp6"),
                n => write!(f, "{n}"),
            }
        }
    }

    /// `tcp 10.0.2.100:40000 -> 198.18.0.1:80`; ICMP shows `id`, `type/code`.
    impl fmt::Display for FlowKey {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            if self.is_icmp() {
                write!(
                    f,
                    "{} {} -> {} type {}/{} id {}",
                    self.proto_name(),
                    self.local_ip(),
                    self.remote_ip(),
                    self.remote_port >> 8,
                    self.remote_port & 0xff,
                    self.local_port
                )
            } else {
                write!(f, "{} {} -> {}", self.proto_name(), self.local(), self.remote())
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::string::ToString;

        #[test]
        fn round_trips_socket_addresses_and_displays() {
            let local: SocketAddr = "10.0.2.100:40000".parse().unwrap();
            let remote: SocketAddr = "198.18.0.1:80".parse().unwrap();
            let key = FlowKey::new(PROTO_TCP, local, remote);
            assert_eq!(key.local(), local);
            assert_eq!(key.remote(), remote);
            assert_eq!(key.to_string(), "tcp 10.0.2.100:40000 -> 198.18.0.1:80");
            let v6 = FlowKey::new(
                PROTO_UDP,
                "[2001:db8::2]:5353".parse().unwrap(),
                "[2001:db8::1]:53".parse().unwrap(),
            );
            assert_eq!(v6.family, FAMILY_V6);
            assert_eq!(v6.to_string(), "udp [2001:db8::2]:5353 -> [2001:db8::1]:53");
        }
    }
}

#[cfg(feature = "user")]
pub use user::ProtoName;
