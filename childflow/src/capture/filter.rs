//! The capture filter language of `--capture-filter`: parsed into an [`Expr`] tree, evaluated
//! on a packet's parsed [`Fields`], and flattened into a fixed-size postfix [`Program`] (a
//! table of [`Insn`]s) that a kernel program can run in a bounded loop.
//!
//! The language (documented for users in `docs/capture.md`) is a small subset of pcap-filter
//! with the same spelling where it overlaps:
//!
//! ```text
//! expr    = and { ("or" | "||") and }
//! and     = unary { ("and" | "&&") unary }
//! unary   = ("not" | "!") unary | "(" expr ")" | term
//! term    = "inbound" | "outbound" | "in" | "out"
//!         | "ip" | "ip6" | "icmp" | "icmp6"
//!         | ("tcp" | "udp") [ [side] ("port" PORT | "portrange" RANGE) ]
//!         | [side] ("host" ADDR | "net" CIDR | "port" PORT | "portrange" RANGE)
//! side    = "src" | "dst"
//! ```
//!
//! `and` binds tighter than `or`; `not` tighter than both. Directions are the command's:
//! `out` is what the command sent. Addresses are literals (IPv4 or IPv6), never names: the
//! filter must mean the same thing however DNS answers.
//!
//! Invariants: [`Filter::parse`] either returns a tree whose [`Program`] fits
//! [`MAX_INSNS`], or an error naming the column and what was expected there;
//! [`Program::eval`] and [`Expr::eval`] agree on every packet (tested); nothing here panics
//! on any input.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use childflow_common::flow::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

use crate::event::Direction;

/// The most instructions a compiled filter may have: what a kernel program can evaluate in
/// one bounded loop with a 64-deep bit stack.
pub const MAX_INSNS: usize = 64;

/// Which address or port of a packet a term looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
    /// Either the source or the destination.
    Any,
}

/// A protocol term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// IPv4, any protocol.
    Ip,
    /// IPv6, any protocol.
    Ip6,
    Tcp,
    Udp,
    /// ICMP over IPv4.
    Icmp,
    /// ICMPv6.
    Icmp6,
}

/// One test on a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pred {
    Direction(Direction),
    Proto(Proto),
    /// The address (`side`) is in `addr/prefix` (a host is a full-length prefix).
    Net {
        side: Side,
        addr: IpAddr,
        prefix: u8,
    },
    /// A TCP or UDP port (`side`) is in `lo..=hi`; `proto` narrows it to one of the two.
    Port {
        side: Side,
        proto: Option<Proto>,
        lo: u16,
        hi: u16,
    },
}

/// A parsed filter expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    Pred(Pred),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

/// A filter expression that did not parse: where, what was expected, what was there.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("at column {column}: expected {expected}, found {found}")]
pub struct FilterError {
    /// 1-based column (in characters) of the offending token.
    pub column: usize,
    pub expected: String,
    pub found: String,
}

impl FilterError {
    /// The expression with a caret under the offending token, for a terminal.
    pub fn caret(&self, input: &str) -> String {
        format!("  {input}\n  {}^", " ".repeat(self.column.saturating_sub(1)))
    }
}

/// A parsed, compiled capture filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub expr: Expr,
    pub program: Program,
}

impl Filter {
    /// Parses `input`; see the module doc for the grammar.
    pub fn parse(input: &str) -> Result<Filter, FilterError> {
        let tokens = lex(input);
        let mut p = Parser { input, tokens, at: 0 };
        let expr = p.expr()?;
        if let Some(tok) = p.peek() {
            let expected = if tok.text == ")" {
                "the end of the filter (this `)` has no matching `(`)"
            } else {
                "`and`, `or` or the end of the filter"
            };
            return Err(p.error_at(p.at, expected));
        }
        let program = Program::compile(&expr);
        if program.insns.len() > MAX_INSNS {
            return Err(FilterError {
                column: 1,
                expected: format!("a filter of at most {MAX_INSNS} terms and operators"),
                found: format!("{} of them", program.insns.len()),
            });
        }
        Ok(Filter { expr, program })
    }

    /// Whether the packet whose fields are `f` is captured.
    pub fn matches(&self, f: &Fields) -> bool {
        self.expr.eval(f)
    }
}

/// What the filter looks at in a packet, parsed once per packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fields {
    pub direction: Direction,
    /// Source and destination address; `None` for non-IP frames (e.g. ARP).
    pub addrs: Option<(IpAddr, IpAddr)>,
    /// IP protocol number of the transport (after IPv6 extension headers); 0 if none.
    pub proto: u8,
    /// TCP/UDP source and destination port, when the transport header is there (not in
    /// non-first fragments or cut packets).
    pub ports: Option<(u16, u16)>,
}

impl Fields {
    /// Parses an Ethernet frame (possibly cut to a snap length) with etherparse's lax
    /// slicer, which keeps what it could parse of truncated packets.
    pub fn from_ethernet(frame: &[u8], direction: Direction) -> Fields {
        let mut f = Fields { direction, addrs: None, proto: 0, ports: None };
        let Ok(packet) = etherparse::LaxSlicedPacket::from_ethernet(frame) else { return f };
        let (payload, first_fragment) = match &packet.net {
            Some(etherparse::LaxNetSlice::Ipv4(ip)) => {
                let h = ip.header();
                f.addrs = Some((h.source_addr().into(), h.destination_addr().into()));
                (ip.payload(), h.fragments_offset().value() == 0)
            }
            Some(etherparse::LaxNetSlice::Ipv6(ip)) => {
                let h = ip.header();
                f.addrs = Some((h.source_addr().into(), h.destination_addr().into()));
                (ip.payload(), !ip.is_payload_fragmented())
            }
            _ => return f,
        };
        f.proto = payload.ip_number.0;
        if matches!(f.proto, PROTO_TCP | PROTO_UDP)
            && first_fragment
            && let [a, b, c, d, ..] = *payload.payload
        {
            f.ports = Some((u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d])));
        }
        f
    }

    fn is_v4(&self) -> bool {
        matches!(self.addrs, Some((IpAddr::V4(_), _)))
    }

    fn is_v6(&self) -> bool {
        matches!(self.addrs, Some((IpAddr::V6(_), _)))
    }
}

impl Pred {
    fn eval(&self, f: &Fields) -> bool {
        match *self {
            Pred::Direction(d) => f.direction == d,
            Pred::Proto(p) => proto_matches(p, f),
            Pred::Net { side, addr, prefix } => {
                let Some((src, dst)) = f.addrs else { return false };
                let hit = |a: IpAddr| in_net(a, addr, prefix);
                match side {
                    Side::Src => hit(src),
                    Side::Dst => hit(dst),
                    Side::Any => hit(src) || hit(dst),
                }
            }
            Pred::Port { side, proto, lo, hi } => {
                let transport = match proto {
                    Some(p) => proto_matches(p, f),
                    None => matches!(f.proto, PROTO_TCP | PROTO_UDP),
                };
                let Some((sp, dp)) = f.ports.filter(|_| transport) else { return false };
                let hit = |p: u16| (lo..=hi).contains(&p);
                match side {
                    Side::Src => hit(sp),
                    Side::Dst => hit(dp),
                    Side::Any => hit(sp) || hit(dp),
                }
            }
        }
    }
}

fn proto_matches(p: Proto, f: &Fields) -> bool {
    match p {
        Proto::Ip => f.is_v4(),
        Proto::Ip6 => f.is_v6(),
        Proto::Tcp => f.addrs.is_some() && f.proto == PROTO_TCP,
        Proto::Udp => f.addrs.is_some() && f.proto == PROTO_UDP,
        Proto::Icmp => f.is_v4() && f.proto == PROTO_ICMP,
        Proto::Icmp6 => f.is_v6() && f.proto == PROTO_ICMPV6,
    }
}

/// Whether `a` is in `net/prefix` (same family only).
fn in_net(a: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (a, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

impl Expr {
    /// Evaluates the tree on `f`, short-circuiting.
    pub fn eval(&self, f: &Fields) -> bool {
        match self {
            Expr::Pred(p) => p.eval(f),
            Expr::Not(e) => !e.eval(f),
            Expr::And(a, b) => a.eval(f) && b.eval(f),
            Expr::Or(a, b) => a.eval(f) || b.eval(f),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The table form.

/// Instruction opcodes of a [`Program`].
pub mod op {
    /// Push the result of the instruction's predicate.
    pub const PRED: u8 = 0;
    /// Pop one, push its negation.
    pub const NOT: u8 = 1;
    /// Pop two, push their conjunction.
    pub const AND: u8 = 2;
    /// Pop two, push their disjunction.
    pub const OR: u8 = 3;
}

/// Predicate kinds of an [`op::PRED`] instruction.
pub mod field {
    /// `arg` is the direction index (`DIR_OUT`/`DIR_IN`).
    pub const DIRECTION: u8 = 0;
    /// `arg` is the IP family (4 or 6); true for any protocol of that family.
    pub const FAMILY: u8 = 1;
    /// `arg` is the family, `proto` the IP protocol number.
    pub const PROTO: u8 = 2;
    /// `arg` is the family, `prefix`/`addr` the network, `side` which address.
    pub const NET: u8 = 3;
    /// `proto` is the transport (0 = TCP or UDP), `lo..=hi` the ports, `side` which port.
    pub const PORT: u8 = 4;
}

/// `side` values of an instruction.
pub const SIDE_SRC: u8 = 1;
pub const SIDE_DST: u8 = 2;
pub const SIDE_ANY: u8 = SIDE_SRC | SIDE_DST;

/// One row of the filter table: fixed size, no pointers, laid out for a kernel map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Insn {
    /// `op::*`.
    pub op: u8,
    /// `field::*` (for `op::PRED`).
    pub field: u8,
    /// `SIDE_*`.
    pub side: u8,
    pub arg: u8,
    pub proto: u8,
    pub prefix: u8,
    /// Host byte order.
    pub lo: u16,
    /// Host byte order.
    pub hi: u16,
    pub _pad: [u8; 2],
    /// Network byte order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<Insn>() == 28);

/// A filter in postfix form: evaluate left to right on a stack of booleans.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Program {
    pub insns: Vec<Insn>,
}

impl Program {
    /// Flattens `expr` into postfix instructions.
    pub fn compile(expr: &Expr) -> Program {
        let mut insns = Vec::new();
        emit(expr, &mut insns);
        Program { insns }
    }

    /// Runs the program on `f` the way the kernel side would: no recursion, a 64-bit stack.
    /// A malformed program (stack underflow or overflow) matches nothing.
    pub fn eval(&self, f: &Fields) -> bool {
        let mut stack: u64 = 0;
        let mut depth: u32 = 0;
        for insn in self.insns.iter().take(MAX_INSNS) {
            let (pop, value) = match insn.op {
                op::PRED => (0, insn_pred(insn, f)),
                op::NOT if depth >= 1 => (1, stack & 1 == 0),
                op::AND if depth >= 2 => (2, stack & 0b11 == 0b11),
                op::OR if depth >= 2 => (2, stack & 0b11 != 0),
                _ => return false,
            };
            stack >>= pop;
            depth -= pop;
            if depth == 64 {
                return false;
            }
            stack = (stack << 1) | u64::from(value);
            depth += 1;
        }
        depth == 1 && stack & 1 == 1
    }
}

fn side_code(side: Side) -> u8 {
    match side {
        Side::Src => SIDE_SRC,
        Side::Dst => SIDE_DST,
        Side::Any => SIDE_ANY,
    }
}

fn emit(expr: &Expr, out: &mut Vec<Insn>) {
    match expr {
        Expr::Pred(p) => out.push(pred_insn(p)),
        Expr::Not(e) => {
            emit(e, out);
            out.push(Insn { op: op::NOT, ..Insn::default() });
        }
        Expr::And(a, b) | Expr::Or(a, b) => {
            emit(a, out);
            emit(b, out);
            let code = if matches!(expr, Expr::And(..)) { op::AND } else { op::OR };
            out.push(Insn { op: code, ..Insn::default() });
        }
    }
}

fn pred_insn(p: &Pred) -> Insn {
    let base = Insn { op: op::PRED, ..Insn::default() };
    match *p {
        Pred::Direction(d) => Insn { field: field::DIRECTION, arg: d.index() as u8, ..base },
        Pred::Proto(Proto::Ip) => Insn { field: field::FAMILY, arg: 4, ..base },
        Pred::Proto(Proto::Ip6) => Insn { field: field::FAMILY, arg: 6, ..base },
        Pred::Proto(p) => {
            let (arg, proto) = proto_numbers(p);
            Insn { field: field::PROTO, arg, proto, ..base }
        }
        Pred::Net { side, addr, prefix } => {
            let mut bytes = [0u8; 16];
            let arg = match addr {
                IpAddr::V4(a) => {
                    bytes[..4].copy_from_slice(&a.octets());
                    4
                }
                IpAddr::V6(a) => {
                    bytes = a.octets();
                    6
                }
            };
            Insn { field: field::NET, side: side_code(side), arg, prefix, addr: bytes, ..base }
        }
        Pred::Port { side, proto, lo, hi } => Insn {
            field: field::PORT,
            side: side_code(side),
            proto: proto.map_or(0, |p| proto_numbers(p).1),
            lo,
            hi,
            ..base
        },
    }
}

/// (family, IP protocol number) of a transport term; TCP/UDP have family 0 (either).
fn proto_numbers(p: Proto) -> (u8, u8) {
    match p {
        Proto::Tcp => (0, PROTO_TCP),
        Proto::Udp => (0, PROTO_UDP),
        Proto::Icmp => (4, PROTO_ICMP),
        Proto::Icmp6 => (6, PROTO_ICMPV6),
        Proto::Ip => (4, 0),
        Proto::Ip6 => (6, 0),
    }
}

fn insn_pred(insn: &Insn, f: &Fields) -> bool {
    let family = match f.addrs {
        Some((IpAddr::V4(_), _)) => 4,
        Some((IpAddr::V6(_), _)) => 6,
        None => 0,
    };
    let sides = |hit: &dyn Fn(usize) -> bool| {
        (insn.side & SIDE_SRC != 0 && hit(0)) || (insn.side & SIDE_DST != 0 && hit(1))
    };
    match insn.field {
        field::DIRECTION => f.direction.index() == usize::from(insn.arg),
        field::FAMILY => family != 0 && family == insn.arg,
        field::PROTO => {
            family != 0 && (insn.arg == 0 || insn.arg == family) && f.proto == insn.proto
        }
        field::NET => {
            let Some((src, dst)) = f.addrs else { return false };
            let net = if insn.arg == 4 {
                IpAddr::V4(Ipv4Addr::new(insn.addr[0], insn.addr[1], insn.addr[2], insn.addr[3]))
            } else {
                IpAddr::V6(Ipv6Addr::from(insn.addr))
            };
            sides(&|i| in_net(if i == 0 { src } else { dst }, net, insn.prefix))
        }
        field::PORT => {
            let transport = match insn.proto {
                0 => matches!(f.proto, PROTO_TCP | PROTO_UDP),
                p => f.proto == p,
            };
            let Some((sp, dp)) = f.ports.filter(|_| transport && family != 0) else {
                return false;
            };
            sides(&|i| (insn.lo..=insn.hi).contains(if i == 0 { &sp } else { &dp }))
        }
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------
// Lexing and parsing.

#[derive(Clone, Copy, Debug)]
struct Token<'a> {
    text: &'a str,
    /// Byte offset in the input.
    at: usize,
}

/// Splits `input` into words and the punctuation `( ) ! && ||`. A word runs up to
/// whitespace or punctuation, so addresses (`2001:db8::/32`) and ranges (`1-1023`) stay whole.
fn lex(input: &str) -> Vec<Token<'_>> {
    let mut tokens = Vec::new();
    let mut i = 0;
    let bytes = input.as_bytes();
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let len = match c {
            b'(' | b')' => 1,
            b'!' => 1,
            b'&' | b'|' if bytes.get(i + 1) == Some(&c) => 2,
            b'&' | b'|' => 1,
            _ => {
                let end = input[i..]
                    .find(|ch: char| ch.is_whitespace() || "()!&|".contains(ch))
                    .map_or(input.len(), |n| i + n);
                end - i
            }
        };
        tokens.push(Token { text: &input[i..i + len], at: i });
        i += len;
    }
    tokens
}

struct Parser<'a> {
    input: &'a str,
    tokens: Vec<Token<'a>>,
    at: usize,
}

const TERMS: &str = "a filter term (tcp, udp, icmp, icmp6, ip, ip6, host ADDR, net CIDR, \
                     port N, portrange N-M, src/dst ..., in, out, not, `(`)";

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<Token<'a>> {
        self.tokens.get(self.at).copied()
    }

    fn peek_is(&self, words: &[&str]) -> bool {
        self.peek().is_some_and(|t| words.iter().any(|w| t.text.eq_ignore_ascii_case(w)))
    }

    fn next(&mut self) -> Option<Token<'a>> {
        let t = self.peek();
        self.at += usize::from(t.is_some());
        t
    }

    fn error_at(&self, index: usize, expected: impl Into<String>) -> FilterError {
        let (column, found) = match self.tokens.get(index) {
            Some(t) => (self.input[..t.at].chars().count() + 1, format!("`{}`", t.text)),
            None => (self.input.chars().count() + 1, "the end of the filter".to_string()),
        };
        FilterError { column, expected: expected.into(), found }
    }

    fn expr(&mut self) -> Result<Expr, FilterError> {
        let mut left = self.and()?;
        while self.peek_is(&["or", "||"]) {
            self.next();
            let right = self.and()?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, FilterError> {
        let mut left = self.unary()?;
        while self.peek_is(&["and", "&&"]) {
            self.next();
            let right = self.unary()?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, FilterError> {
        if self.peek_is(&["not", "!"]) {
            self.next();
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.peek_is(&["("]) {
            let open = self.at;
            self.next();
            let inner = self.expr()?;
            if !self.peek_is(&[")"]) {
                let mut err = self.error_at(self.at, "`)` or `and`/`or`");
                if self.peek().is_none() {
                    err.expected = format!(
                        "`)` to close the `(` at column {}",
                        self.error_at(open, "").column
                    );
                }
                return Err(err);
            }
            self.next();
            return Ok(inner);
        }
        self.term()
    }

    fn term(&mut self) -> Result<Expr, FilterError> {
        let start = self.at;
        let Some(tok) = self.next() else { return Err(self.error_at(start, TERMS)) };
        let word = tok.text.to_ascii_lowercase();
        let pred = |p| Ok(Expr::Pred(p));
        match word.as_str() {
            "in" | "inbound" => pred(Pred::Direction(Direction::In)),
            "out" | "outbound" => pred(Pred::Direction(Direction::Out)),
            "ip" => pred(Pred::Proto(Proto::Ip)),
            "ip6" => pred(Pred::Proto(Proto::Ip6)),
            "icmp" => pred(Pred::Proto(Proto::Icmp)),
            "icmp6" => pred(Pred::Proto(Proto::Icmp6)),
            "tcp" | "udp" => {
                let proto = if word == "tcp" { Proto::Tcp } else { Proto::Udp };
                // `tcp port 443`, `udp dst port 53`: a transport qualifier on a port term.
                let qualified = self.peek_is(&["port", "portrange"])
                    || (self.peek_is(&["src", "dst"])
                        && self.tokens.get(self.at + 1).is_some_and(|t| {
                            ["port", "portrange"].iter().any(|w| t.text.eq_ignore_ascii_case(w))
                        }));
                if qualified {
                    let side = self.side();
                    self.port(side, Some(proto))
                } else {
                    pred(Pred::Proto(proto))
                }
            }
            "src" | "dst" => {
                self.at = start;
                let side = self.side();
                if !self.peek_is(&["host", "net", "port", "portrange"]) {
                    return Err(self.error_at(
                        self.at,
                        format!("`host`, `net`, `port` or `portrange` after `{word}`"),
                    ));
                }
                self.qualified(side)
            }
            "host" | "net" | "port" | "portrange" => {
                self.at = start;
                self.qualified(Side::Any)
            }
            "and" | "or" | "&&" | "||" | ")" => Err(self.error_at(start, TERMS)),
            _ => {
                let mut expected = TERMS.to_string();
                if tok.text.parse::<IpAddr>().is_ok() {
                    expected = format!("`host {}` (an address needs `host`)", tok.text);
                } else if tok.text.parse::<u16>().is_ok() {
                    expected = format!("`port {}` (a number needs `port`)", tok.text);
                }
                Err(self.error_at(start, expected))
            }
        }
    }

    fn side(&mut self) -> Side {
        if self.peek_is(&["src"]) {
            self.next();
            Side::Src
        } else if self.peek_is(&["dst"]) {
            self.next();
            Side::Dst
        } else {
            Side::Any
        }
    }

    /// `host ADDR`, `net CIDR`, `port N`, `portrange N-M` after an optional side.
    fn qualified(&mut self, side: Side) -> Result<Expr, FilterError> {
        if self.peek_is(&["port", "portrange"]) {
            return self.port(side, None);
        }
        let kw = self.next().map(|t| t.text.to_ascii_lowercase()).unwrap_or_default();
        let at = self.at;
        let Some(tok) = self.next() else {
            let what = if kw == "host" { "an IPv4 or IPv6 address" } else { "a CIDR network" };
            return Err(self.error_at(at, format!("{what} after `{kw}`")));
        };
        if kw == "host" {
            let addr: IpAddr = tok.text.parse().map_err(|_| {
                self.error_at(at, "an IPv4 or IPv6 address after `host` (names are not resolved)")
            })?;
            let prefix = if addr.is_ipv4() { 32 } else { 128 };
            return Ok(Expr::Pred(Pred::Net { side, addr, prefix }));
        }
        let (addr, prefix) = parse_cidr(tok.text).map_err(|e| self.error_at(at, e))?;
        Ok(Expr::Pred(Pred::Net { side, addr, prefix }))
    }

    fn port(&mut self, side: Side, proto: Option<Proto>) -> Result<Expr, FilterError> {
        let range = self.next().is_some_and(|t| t.text.eq_ignore_ascii_case("portrange"));
        let at = self.at;
        let expected = if range {
            "a port range N-M after `portrange` (e.g. 1024-65535)"
        } else {
            "a port number (0-65535) after `port`"
        };
        let Some(tok) = self.next() else { return Err(self.error_at(at, expected)) };
        let bounds = if range {
            tok.text.split_once('-').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        } else {
            tok.text.parse::<u16>().ok().map(|p| (p, p))
        };
        match bounds {
            Some((lo, hi)) if lo <= hi => Ok(Expr::Pred(Pred::Port { side, proto, lo, hi })),
            Some(_) => {
                Err(self.error_at(at, "a port range whose first port is not above the last"))
            }
            None => Err(self.error_at(at, expected)),
        }
    }
}

/// `198.18.0.0/15`, `2001:db8::/32`, or a bare address (a host).
fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let expected = "a network like 198.18.0.0/15 or 2001:db8::/32 after `net`";
    let (addr, len) = text.split_once('/').unwrap_or((text, ""));
    let addr: IpAddr = addr.parse().map_err(|_| expected.to_string())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = if len.is_empty() { max } else { len.parse::<u8>().map_err(|_| expected)? };
    if prefix > max {
        return Err(format!("a prefix length of at most {max} for this address"));
    }
    let network = match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    };
    if network != addr {
        return Err(format!("a network with no host bits set (did you mean {network}/{prefix}?)"));
    }
    Ok((addr, prefix))
}

impl fmt::Display for Expr {
    /// Prints the expression back in the filter language, fully parenthesized.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Pred(p) => write!(f, "{p}"),
            Expr::Not(e) => write!(f, "not {e}"),
            Expr::And(a, b) => write!(f, "({a} and {b})"),
            Expr::Or(a, b) => write!(f, "({a} or {b})"),
        }
    }
}

impl fmt::Display for Pred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |s: Side| match s {
            Side::Src => "src ",
            Side::Dst => "dst ",
            Side::Any => "",
        };
        match self {
            Pred::Direction(Direction::In) => f.write_str("in"),
            Pred::Direction(Direction::Out) => f.write_str("out"),
            Pred::Proto(p) => f.write_str(proto_name(*p)),
            Pred::Net { side: s, addr, prefix } => {
                if u32::from(*prefix) == if addr.is_ipv4() { 32 } else { 128 } {
                    write!(f, "{}host {addr}", side(*s))
                } else {
                    write!(f, "{}net {addr}/{prefix}", side(*s))
                }
            }
            Pred::Port { side: s, proto, lo, hi } => {
                if let Some(p) = proto {
                    write!(f, "{} ", proto_name(*p))?;
                }
                if lo == hi {
                    write!(f, "{}port {lo}", side(*s))
                } else {
                    write!(f, "{}portrange {lo}-{hi}", side(*s))
                }
            }
        }
    }
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Ip => "ip",
        Proto::Ip6 => "ip6",
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Icmp => "icmp",
        Proto::Icmp6 => "icmp6",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use etherparse::PacketBuilder;

    use super::*;

    const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn v4(s: &str) -> [u8; 4] {
        s.parse::<Ipv4Addr>().expect("test IPv4 address").octets()
    }

    fn v6(s: &str) -> [u8; 16] {
        s.parse::<Ipv6Addr>().expect("test IPv6 address").octets()
    }

    /// An Ethernet/IPv4/TCP frame with `payload`.
    pub(crate) fn tcp4(src: &str, sport: u16, dst: &str, dport: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(v4(src), v4(dst), 64)
            .tcp(sport, dport, 1000, 65535)
            .ack(1);
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).expect("building a TCP/IPv4 test frame");
        out
    }

    /// An Ethernet/IPv4/UDP frame.
    pub(crate) fn udp4(src: &str, sport: u16, dst: &str, dport: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(v4(src), v4(dst), 64).udp(sport, dport);
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).expect("building a UDP/IPv4 test frame");
        out
    }

    /// An Ethernet/IPv6/UDP frame.
    pub(crate) fn udp6(src: &str, sport: u16, dst: &str, dport: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv6(v6(src), v6(dst), 64).udp(sport, dport);
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).expect("building a UDP/IPv6 test frame");
        out
    }

    /// An Ethernet/IPv6/TCP frame.
    pub(crate) fn tcp6(src: &str, sport: u16, dst: &str, dport: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6(v6(src), v6(dst), 64)
            .tcp(sport, dport, 1, 65535)
            .syn();
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).expect("building a TCP/IPv6 test frame");
        out
    }

    /// An Ethernet/IPv4 ICMP echo request.
    pub(crate) fn ping4(src: &str, dst: &str, seq: u16) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(v4(src), v4(dst), 64)
            .icmpv4_echo_request(0x77, seq);
        let mut out = Vec::new();
        b.write(&mut out, b"ping").expect("building an ICMP test frame");
        out
    }

    /// An Ethernet/IPv6 ICMPv6 echo request.
    pub(crate) fn ping6(src: &str, dst: &str, seq: u16) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6(v6(src), v6(dst), 64)
            .icmpv6_echo_request(0x77, seq);
        let mut out = Vec::new();
        b.write(&mut out, b"ping").expect("building an ICMPv6 test frame");
        out
    }

    /// An ARP-typed frame (not IP at all).
    fn arp() -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&MAC_A);
        f.extend_from_slice(&[0x08, 0x06]);
        f.extend_from_slice(&[0; 28]);
        f
    }

    fn out(frame: &[u8]) -> Fields {
        Fields::from_ethernet(frame, Direction::Out)
    }

    fn inb(frame: &[u8]) -> Fields {
        Fields::from_ethernet(frame, Direction::In)
    }

    fn filter(s: &str) -> Filter {
        Filter::parse(s).unwrap_or_else(|e| panic!("`{s}` should parse: {e}"))
    }

    fn err(s: &str) -> FilterError {
        match Filter::parse(s) {
            Ok(f) => panic!("`{s}` should not parse, got {}", f.expr),
            Err(e) => e,
        }
    }

    /// A mixed bag of packets every filter test runs on, both ways.
    fn corpus() -> Vec<Fields> {
        let frames = [
            tcp4("198.18.0.2", 40000, "198.19.0.10", 443, b"hello"),
            tcp4("198.19.0.10", 80, "198.18.0.2", 40001, b""),
            udp4("198.18.0.2", 5353, "198.19.0.53", 53, b"q"),
            udp6("2001:db8::2", 40002, "2001:db8:1::53", 53, b"q"),
            tcp6("2001:db8::2", 40003, "2001:db8:1::80", 8080, b""),
            ping4("198.18.0.2", "198.19.0.1", 1),
            ping6("2001:db8::2", "2001:db8:1::1", 1),
            arp(),
        ];
        frames.iter().flat_map(|f| [out(f), inb(f)]).collect()
    }

    #[test]
    fn fields_are_parsed_from_ethernet_frames() {
        let f = out(&tcp4("198.18.0.2", 40000, "198.19.0.10", 443, b"x"));
        assert_eq!(f.proto, PROTO_TCP);
        assert_eq!(f.ports, Some((40000, 443)));
        assert_eq!(f.addrs.unwrap().1, "198.19.0.10".parse::<IpAddr>().unwrap());
        let f = inb(&udp6("2001:db8::2", 1, "2001:db8::3", 53, b"x"));
        assert_eq!((f.proto, f.ports), (PROTO_UDP, Some((1, 53))));
        assert_eq!(out(&arp()).addrs, None);
    }

    #[test]
    fn a_frame_cut_inside_the_ip_header_has_no_addresses_and_matches_no_host() {
        let frame = tcp4("198.18.0.2", 40000, "198.19.0.10", 443, b"x");
        let f = out(&frame[..20]);
        assert!(!filter("host 198.18.0.2").matches(&f));
        assert!(filter("not tcp").matches(&f));
    }

    #[test]
    fn a_frame_cut_after_the_ports_still_matches_ports() {
        let frame = tcp4("198.18.0.2", 40000, "198.19.0.10", 443, &[0; 100]);
        let f = out(&frame[..14 + 20 + 4]);
        assert!(filter("tcp port 443").matches(&f), "{f:?}");
    }

    #[test]
    fn terms_match_what_they_say() {
        let https = out(&tcp4("198.18.0.2", 40000, "198.19.0.10", 443, b"x"));
        let dns6 = inb(&udp6("2001:db8::2", 40002, "2001:db8:1::53", 53, b"q"));
        let ping = out(&ping4("198.18.0.2", "198.19.0.1", 1));
        let ping6 = out(&ping6("2001:db8::2", "2001:db8:1::1", 1));
        let cases: &[(&str, &Fields, bool)] = &[
            ("tcp", &https, true),
            ("udp", &https, false),
            ("ip", &https, true),
            ("ip6", &https, false),
            ("ip6", &dns6, true),
            ("icmp", &ping, true),
            ("icmp", &ping6, false),
            ("icmp6", &ping6, true),
            ("out", &https, true),
            ("outbound", &dns6, false),
            ("in", &dns6, true),
            ("port 443", &https, true),
            ("port 40000", &https, true),
            ("src port 443", &https, false),
            ("dst port 443", &https, true),
            ("udp port 443", &https, false),
            ("tcp dst port 443", &https, true),
            ("portrange 400-500", &https, true),
            ("portrange 1-52", &dns6, false),
            ("port 53", &dns6, true),
            ("port 53", &ping, false),
            ("host 198.19.0.10", &https, true),
            ("src host 198.19.0.10", &https, false),
            ("dst host 198.19.0.10", &https, true),
            ("host 2001:db8:1::53", &dns6, true),
            ("host 2001:db8:1::53", &https, false),
            ("net 198.18.0.0/15", &https, true),
            ("net 198.18.0.0/16", &ping, true),
            ("dst net 198.18.0.0/16", &ping, false),
            ("net 2001:db8::/32", &dns6, true),
            ("net 2001:db8::/32", &https, false),
            ("net 0.0.0.0/0", &https, true),
        ];
        for (expr, fields, want) in cases {
            assert_eq!(filter(expr).matches(fields), *want, "`{expr}` on {fields:?}");
        }
    }

    #[test]
    fn operators_have_pcap_precedence() {
        let f = filter("udp or tcp and port 443");
        assert_eq!(f.expr.to_string(), "(udp or (tcp and port 443))");
        let f = filter("not tcp and port 53");
        assert_eq!(f.expr.to_string(), "(not tcp and port 53)");
        let f = filter("!(tcp || udp) && out");
        assert_eq!(f.expr.to_string(), "(not (tcp or udp) and out)");
        let f = filter("TCP AND DST PORT 80");
        assert_eq!(f.expr.to_string(), "(tcp and dst port 80)");
        let ping = out(&ping4("198.18.0.2", "198.19.0.1", 1));
        assert!(filter("not (tcp or udp) and out").matches(&ping));
        assert!(!filter("not (tcp or udp) and in").matches(&ping));
    }

    #[test]
    fn errors_say_where_and_what_was_expected() {
        let e = err("tcp and prot 80");
        assert_eq!(e.column, 9);
        assert!(e.expected.starts_with("a filter term"), "{e}");
        assert_eq!(e.found, "`prot`");
        assert_eq!(e.caret("tcp and prot 80"), "  tcp and prot 80\n          ^");

        let e = err("port https");
        assert_eq!((e.column, e.found.as_str()), (6, "`https`"));
        assert!(e.expected.contains("port number"), "{e}");

        let e = err("(tcp or udp");
        assert_eq!(e.column, 12);
        assert_eq!(e.found, "the end of the filter");
        assert!(e.expected.contains("`(` at column 1"), "{e}");

        let e = err("tcp)");
        assert!(e.expected.contains("no matching"), "{e}");

        let e = err("net 198.18.0.1/15");
        assert!(e.expected.contains("198.18.0.0/15"), "{e}");

        let e = err("host example.test");
        assert!(e.expected.contains("not resolved"), "{e}");

        let e = err("198.18.0.1");
        assert!(e.expected.contains("host 198.18.0.1"), "{e}");

        let e = err("tcp udp");
        assert_eq!(e.column, 5);
        assert!(e.expected.contains("`and`, `or`"), "{e}");

        let e = err("src tcp");
        assert!(e.expected.contains("after `src`"), "{e}");

        let e = err("portrange 9-1");
        assert!(e.expected.contains("not above"), "{e}");

        let e = err("");
        assert_eq!((e.column, e.found.as_str()), (1, "the end of the filter"));

        let e = err("tcp and");
        assert_eq!(e.column, 8);

        let e = err("net 2001:db8::/129");
        assert!(e.expected.contains("at most 128"), "{e}");
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let e = err("tcp and é");
        assert_eq!(e.column, 9);
    }

    #[test]
    fn too_long_filters_are_refused() {
        let long = vec!["tcp"; 40].join(" or ");
        let e = err(&long);
        assert!(e.expected.contains("at most 64"), "{e}");
    }

    #[test]
    fn the_table_form_agrees_with_the_tree_on_every_packet() {
        let exprs = [
            "tcp",
            "not tcp",
            "udp or tcp and port 443",
            "not (tcp or udp) and out",
            "ip6 and udp dst port 53",
            "src net 198.18.0.0/15 and not dst portrange 1-1023",
            "host 2001:db8:1::53 or host 198.19.0.10",
            "icmp or icmp6",
            "in and (tcp src port 80 or udp)",
            "ip and not ip6 and not icmp",
            "net 0.0.0.0/0 or net ::/0",
            "port 53 and not port 5353",
        ];
        for expr in exprs {
            let f = filter(expr);
            for fields in corpus() {
                assert_eq!(
                    f.program.eval(&fields),
                    f.expr.eval(&fields),
                    "`{expr}` on {fields:?}: table {:?}",
                    f.program
                );
            }
        }
    }

    #[test]
    fn a_malformed_program_matches_nothing() {
        let f = out(&tcp4("198.18.0.2", 1, "198.19.0.1", 2, b""));
        let and_alone = Program { insns: vec![Insn { op: op::AND, ..Insn::default() }] };
        assert!(!and_alone.eval(&f));
        let two = Program::compile(&filter("tcp").expr);
        let two = Program { insns: [two.insns.clone(), two.insns].concat() };
        assert!(!two.eval(&f), "two values left on the stack");
    }
}
