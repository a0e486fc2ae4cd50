//! The capture filter in table form, as the TC programs read it from their one-entry
//! `FILTER` array map: a postfix program of at most [`MAX_INSNS`] fixed-size [`Insn`]s.
//!
//! Userspace (`childflow::capture::filter`) parses `--capture-filter` and compiles it into
//! these rows; the kernel evaluates them left to right on a stack of booleans kept in the
//! bits of a `u64`, in a loop bounded by [`MAX_INSNS`], so the verifier sees a fixed bound.
//!
//! Invariants: a [`Program`] with `len == 0` matches every packet (no filter); the rows
//! past `len` are ignored; a malformed program (stack underflow, more than 64 values, or an
//! unknown opcode) matches nothing, on both sides.

/// The most instructions a compiled filter may have: what a kernel program evaluates in one
/// bounded loop with a 64-deep bit stack.
pub const MAX_INSNS: usize = 64;

/// Instruction opcodes ([`Insn::op`]).
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

/// Predicate kinds of an [`op::PRED`] instruction ([`Insn::field`]).
pub mod field {
    /// `arg` is the direction index (`DIR_OUT`/`DIR_IN`).
    pub const DIRECTION: u8 = 0;
    /// `arg` is the IP family (4 or 6); true for any protocol of that family.
    pub const FAMILY: u8 = 1;
    /// `arg` is the family (0: either), `proto` the IP protocol number.
    pub const PROTO: u8 = 2;
    /// `arg` is the family, `prefix`/`addr` the network, `side` which address.
    pub const NET: u8 = 3;
    /// `proto` is the transport (0 = TCP or UDP), `lo..=hi` the ports, `side` which port.
    pub const PORT: u8 = 4;
}

/// [`Insn::side`]: the source address or port.
pub const SIDE_SRC: u8 = 1;
/// [`Insn::side`]: the destination address or port.
pub const SIDE_DST: u8 = 2;
/// [`Insn::side`]: either.
pub const SIDE_ANY: u8 = SIDE_SRC | SIDE_DST;

/// One row of the filter table: fixed size, no pointers, no `bool`.
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
const _: () = assert!(core::mem::size_of::<Insn>() == 28);
const _: () = assert!(core::mem::align_of::<Insn>() == 2);

/// The value of the kernel's `FILTER` map: `len` rows of `insns` are the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Program {
    /// How many rows of `insns` are used; 0 means no filter (everything matches).
    pub len: u32,
    pub insns: [Insn; MAX_INSNS],
}
const _: () = assert!(core::mem::size_of::<Program>() == 4 + 28 * MAX_INSNS);

impl Program {
    /// No filter: matches every packet. Also what a fresh (zeroed) map entry holds.
    pub const EMPTY: Program = Program {
        len: 0,
        insns: [Insn {
            op: 0,
            field: 0,
            side: 0,
            arg: 0,
            proto: 0,
            prefix: 0,
            lo: 0,
            hi: 0,
            _pad: [0; 2],
            addr: [0; 16],
        }; MAX_INSNS],
    };

    /// The program of `insns`, or `None` if there are more than [`MAX_INSNS`].
    pub fn from_insns(insns: &[Insn]) -> Option<Program> {
        if insns.len() > MAX_INSNS {
            return None;
        }
        let mut p = Program::EMPTY;
        p.insns[..insns.len()].copy_from_slice(insns);
        p.len = insns.len() as u32;
        Some(p)
    }

    /// The rows in use.
    pub fn insns(&self) -> &[Insn] {
        &self.insns[..(self.len as usize).min(MAX_INSNS)]
    }
}

impl Default for Program {
    fn default() -> Self {
        Program::EMPTY
    }
}

#[cfg(feature = "user")]
// SAFETY: plain #[repr(C)] data with explicit padding; any bit pattern is valid.
unsafe impl aya::Pod for Program {}
