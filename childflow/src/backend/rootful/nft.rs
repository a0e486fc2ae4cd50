//! The run's NAT and forwarding rules: one nftables table, `childflow_<runid>`, owned by
//! childflow's netlink socket.
//!
//! The table carries `NFT_TABLE_F_OWNER` (Linux 5.12): the kernel deletes it, with its
//! chains and rules, when the netlink socket that created it is closed, which happens when
//! [`NatTable`] is dropped *or when childflow dies in any way, SIGKILL included*. No cleanup
//! pass is needed. `nft -f` cannot make such a table (its socket closes when nft exits), so
//! the messages are built here, by hand, as `nft` itself would send them (libnftnl's
//! encoding; `include/uapi/linux/netfilter/nf_tables.h`). What the table holds, in `nft`
//! syntax:
//!
//! ```text
//! table inet childflow_<runid> {            # flags owner
//!     chain postrouting { type nat hook postrouting priority srcnat; policy accept;
//!         iifname "<host veth>" masquerade }
//!     chain forward { type filter hook forward priority filter; policy accept;
//!         iifname "<host veth>" accept
//!         oifname "<host veth>" accept }
//! }
//! ```
//! The forward accepts document intent and keep the run working when the host's own
//! forward chains are empty; a `drop` policy in another table still applies (nftables
//! evaluates every base chain), and then the host's policy wins, as it should.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// Why the NAT table could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The netfilter netlink socket could not be opened or used.
    #[error("failed to talk to nftables over netlink ({op})")]
    Socket {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel refused a message of the batch.
    #[error("nftables refused to create {what} of table {table}")]
    Refused {
        what: &'static str,
        table: String,
        #[source]
        source: io::Error,
    },
}

// Netlink and nfnetlink constants (linux/netlink.h, linux/netfilter/nfnetlink.h).
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 0x2;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_INET: u8 = 1;

// nf_tables.h.
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFT_TABLE_F_OWNER: u32 = 0x2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NF_ACCEPT: u32 = 1;
// netfilter.h: hooks and the priorities `nft` calls srcnat and filter.
const NF_INET_FORWARD: u32 = 2;
const NF_INET_POST_ROUTING: u32 = 4;
const NF_IP_PRI_NAT_SRC: i32 = 100;
const NF_IP_PRI_FILTER: i32 = 0;

/// A netlink message under construction: attributes are appended, nests are closed by
/// patching their length.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    /// `nlmsghdr` + `nfgenmsg` for nf_tables message `ty`.
    fn new(ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish()
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg { buf }
    }

    fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    fn str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.attr(ty, &data)
    }

    /// A 32-bit attribute: nf_tables wants them in network byte order.
    fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty, &v.to_be_bytes())
    }

    fn nest(&mut self, ty: u16, body: impl FnOnce(&mut Self)) -> &mut Self {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        body(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// One expression of a rule: its name and the attributes inside `NFTA_EXPR_DATA`.
enum Expr<'a> {
    /// Load the input or output interface name into register 1.
    Meta {
        key: u32,
    },
    /// Compare register 1 with `data`.
    CmpEq {
        data: &'a [u8],
    },
    Masquerade,
    Accept,
}

fn exprs(m: &mut Msg, list: &[Expr<'_>]) {
    m.nest(NFTA_RULE_EXPRESSIONS, |m| {
        for e in list {
            m.nest(NFTA_LIST_ELEM, |m| match e {
                Expr::Meta { key } => {
                    m.str(NFTA_EXPR_NAME, "meta").nest(NFTA_EXPR_DATA, |m| {
                        m.u32(NFTA_META_DREG, NFT_REG_1).u32(NFTA_META_KEY, *key);
                    });
                }
                Expr::CmpEq { data } => {
                    m.str(NFTA_EXPR_NAME, "cmp").nest(NFTA_EXPR_DATA, |m| {
                        m.u32(NFTA_CMP_SREG, NFT_REG_1).u32(NFTA_CMP_OP, NFT_CMP_EQ).nest(
                            NFTA_CMP_DATA,
                            |m| {
                                m.attr(NFTA_DATA_VALUE, data);
                            },
                        );
                    });
                }
                Expr::Masquerade => {
                    m.str(NFTA_EXPR_NAME, "masq");
                }
                Expr::Accept => {
                    m.str(NFTA_EXPR_NAME, "immediate").nest(NFTA_EXPR_DATA, |m| {
                        m.u32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT).nest(
                            NFTA_IMMEDIATE_DATA,
                            |m| {
                                m.nest(NFTA_DATA_VERDICT, |m| {
                                    m.u32(NFTA_VERDICT_CODE, NF_ACCEPT);
                                });
                            },
                        );
                    });
                }
            });
        }
    });
}

/// An interface name as `meta iifname` loads it: NUL-padded to IFNAMSIZ.
fn ifname_bytes(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let n = name.len().min(15);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

/// The batch creating the table for `table` around interface `iface`, one message per
/// element, each asking for an ack (`what` names it for errors). Pure, for the unit tests.
fn batch(table: &str, iface: &str) -> (Vec<u8>, Vec<(u32, &'static str)>) {
    let mut out = Vec::new();
    let mut acks = Vec::new();
    let mut seq = 1;
    let res = NFNL_SUBSYS_NFTABLES;
    out.extend(Msg::new(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, res).finish());
    let create = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE;
    let mut push = |what: &'static str, flags: u16, ty: u16, build: &dyn Fn(&mut Msg)| {
        seq += 1;
        let mut m = Msg::new(nft_type(ty), flags, seq, NFPROTO_INET, 0);
        build(&mut m);
        out.extend(m.finish());
        acks.push((seq, what));
    };
    push("the table", create | NLM_F_EXCL, NFT_MSG_NEWTABLE, &|m| {
        m.str(NFTA_TABLE_NAME, table).u32(NFTA_TABLE_FLAGS, NFT_TABLE_F_OWNER);
    });
    let chain = |name: &'static str, kind: &'static str, hook: u32, prio: i32| {
        move |m: &mut Msg| {
            m.str(NFTA_CHAIN_TABLE, table)
                .str(NFTA_CHAIN_NAME, name)
                .nest(NFTA_CHAIN_HOOK, |m| {
                    m.u32(NFTA_HOOK_HOOKNUM, hook).u32(NFTA_HOOK_PRIORITY, prio as u32);
                })
                .u32(NFTA_CHAIN_POLICY, NF_ACCEPT)
                .str(NFTA_CHAIN_TYPE, kind);
        }
    };
    push(
        "the postrouting chain",
        create,
        NFT_MSG_NEWCHAIN,
        &chain("postrouting", "nat", NF_INET_POST_ROUTING, NF_IP_PRI_NAT_SRC),
    );
    push(
        "the forward chain",
        create,
        NFT_MSG_NEWCHAIN,
        &chain("forward", "filter", NF_INET_FORWARD, NF_IP_PRI_FILTER),
    );
    let name = ifname_bytes(iface);
    let rule = |chain_name: &'static str, list: &[Expr<'_>], m: &mut Msg| {
        m.str(NFTA_RULE_TABLE, table).str(NFTA_RULE_CHAIN, chain_name);
        exprs(m, list);
    };
    let append = create | NLM_F_APPEND;
    push("the masquerade rule", append, NFT_MSG_NEWRULE, &|m| {
        rule(
            "postrouting",
            &[Expr::Meta { key: NFT_META_IIFNAME }, Expr::CmpEq { data: &name }, Expr::Masquerade],
            m,
        )
    });
    for key in [NFT_META_IIFNAME, NFT_META_OIFNAME] {
        push("a forward rule", append, NFT_MSG_NEWRULE, &|m| {
            rule("forward", &[Expr::Meta { key }, Expr::CmpEq { data: &name }, Expr::Accept], m)
        });
    }
    seq += 1;
    out.extend(Msg::new(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0, res).finish());
    (out, acks)
}

/// The run's nftables table. Dropping it (or the process dying) deletes it.
pub struct NatTable {
    name: String,
    /// The owning socket: the table lives exactly as long as it is open.
    _socket: OwnedFd,
}

impl AsRawFd for NatTable {
    /// The owning socket (the table lives while any duplicate of it is open).
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self._socket.as_raw_fd()
    }
}

impl NatTable {
    /// Creates `childflow_<run_id>` with masquerade and forward rules for `iface`.
    pub fn create(run_id: &str, iface: &str) -> Result<NatTable, NftError> {
        let name = format!("childflow_{run_id}");
        let sock_err = |op| move |source| NftError::Socket { op, source };
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(sock_err("socket")(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let (msg, acks) = batch(&name, iface);
        // SAFETY: a zeroed sockaddr_nl addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: valid buffer and address of the right length.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(sock_err("sendto")(io::Error::last_os_error()));
        }
        let mut pending: Vec<(u32, &'static str)> = acks;
        let mut buf = vec![0u8; 16384];
        while !pending.is_empty() {
            // SAFETY: reading into an owned buffer.
            let n =
                unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(sock_err("recv")(e));
            }
            for (seq, errno) in parse_acks(&buf[..n as usize]) {
                let Some(at) = pending.iter().position(|(s, _)| *s == seq) else { continue };
                let (_, what) = pending.remove(at);
                if errno != 0 {
                    return Err(NftError::Refused {
                        what,
                        table: name,
                        source: io::Error::from_raw_os_error(errno),
                    });
                }
            }
        }
        Ok(NatTable { name, _socket: socket })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// `(seq, errno)` of every `NLMSG_ERROR` (an ack when errno is 0) in a netlink datagram.
fn parse_acks(mut data: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    while data.len() >= 16 {
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
        if len < 16 || len > data.len() {
            break;
        }
        let ty = u16::from_ne_bytes(data[4..6].try_into().unwrap());
        if ty == NLMSG_ERROR && len >= 20 {
            let error = i32::from_ne_bytes(data[16..20].try_into().unwrap());
            // The echoed request header follows: its seq is the one to match.
            let seq = if len >= 36 {
                u32::from_ne_bytes(data[28..32].try_into().unwrap())
            } else {
                u32::from_ne_bytes(data[8..12].try_into().unwrap())
            };
            out.push((seq, -error));
        }
        data = &data[len.next_multiple_of(4).min(data.len())..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits a batch into `(type, flags, seq, payload after nfgenmsg)`.
    fn messages(mut data: &[u8]) -> Vec<(u16, u16, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(data[4..6].try_into().unwrap());
            let flags = u16::from_ne_bytes(data[6..8].try_into().unwrap());
            let seq = u32::from_ne_bytes(data[8..12].try_into().unwrap());
            out.push((ty, flags, seq, data[20..len].to_vec()));
            data = &data[len..];
        }
        out
    }

    #[test]
    fn a_batch_is_begin_table_chains_rules_end_with_an_ack_each() {
        let (bytes, acks) = batch("childflow_1a", "cf1ah");
        let msgs = messages(&bytes);
        let types: Vec<u16> = msgs.iter().map(|m| m.0).collect();
        assert_eq!(
            types,
            [
                NFNL_MSG_BATCH_BEGIN,
                nft_type(NFT_MSG_NEWTABLE),
                nft_type(NFT_MSG_NEWCHAIN),
                nft_type(NFT_MSG_NEWCHAIN),
                nft_type(NFT_MSG_NEWRULE),
                nft_type(NFT_MSG_NEWRULE),
                nft_type(NFT_MSG_NEWRULE),
                NFNL_MSG_BATCH_END,
            ]
        );
        let acked: Vec<u32> = acks.iter().map(|a| a.0).collect();
        assert_eq!(acked, [2, 3, 4, 5, 6, 7]);
        for (_, flags, seq, _) in &msgs[1..7] {
            assert!(flags & NLM_F_ACK != 0, "message {seq} asks for an ack");
        }
        // The table: name, then the owner flag in network byte order.
        let table = &msgs[1].3;
        assert_eq!(&table[..4], &[17, 0, NFTA_TABLE_NAME as u8, 0]);
        assert_eq!(&table[4..17], b"childflow_1a\0");
        assert_eq!(&table[20..28], &[8, 0, NFTA_TABLE_FLAGS as u8, 0, 0, 0, 0, 2]);
    }

    #[test]
    fn every_attribute_is_aligned_and_nests_add_up() {
        let (bytes, _) = batch("childflow_abc", "cfabch");
        for (_, _, seq, payload) in messages(&bytes) {
            assert!(payload.len().is_multiple_of(4), "message {seq} is padded");
            // Walk the top-level attributes: their padded lengths must tile the payload.
            let mut at = 0;
            while at < payload.len() {
                let len = u16::from_ne_bytes([payload[at], payload[at + 1]]) as usize;
                assert!(len >= 4, "attribute at {at} of message {seq}");
                at += len.next_multiple_of(4);
            }
            assert_eq!(at, payload.len(), "attributes of message {seq} tile it");
        }
    }

    #[test]
    fn ifname_is_nul_padded_to_ifnamsiz() {
        assert_eq!(&ifname_bytes("cf1h")[..5], b"cf1h\0");
        assert_eq!(ifname_bytes("cf1h")[15], 0);
    }

    #[test]
    fn acks_are_matched_by_the_echoed_sequence_number() {
        let mut dgram = Vec::new();
        for (seq, err) in [(2u32, 0i32), (3, -17)] {
            dgram.extend_from_slice(&36u32.to_ne_bytes());
            dgram.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            dgram.extend_from_slice(&0u16.to_ne_bytes());
            dgram.extend_from_slice(&seq.to_ne_bytes());
            dgram.extend_from_slice(&0u32.to_ne_bytes());
            dgram.extend_from_slice(&err.to_ne_bytes());
            // echoed header: len, type, flags, seq, pid
            dgram.extend_from_slice(&[0; 8]);
            dgram.extend_from_slice(&seq.to_ne_bytes());
            dgram.extend_from_slice(&[0; 4]);
        }
        assert_eq!(parse_acks(&dgram), [(2, 0), (3, 17)]);
    }
}
