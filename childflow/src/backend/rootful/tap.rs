//! The capture tap: a tap device on the host that only childflow reads, where the TC
//! program puts clones of the large packets a capture wants whole (`PACKET_CLONED` in
//! childflow-common), instead of copying them into the packet ring.
//!
//! Why: copying a bulk transfer into the ring is a `memcpy` of every byte in the softirq
//! of the CPU that sends it, on the transfer's own critical path (bulk TCP over the veth:
//! about 125 ms of CPU per GB there, and the sender's own copies got slower beside it).
//! A clone shares the packet's memory; the bytes are copied once, by this reader's `read`
//! on its own CPU, into buffers of huge pages the capture writes to the disk as they are.
//! Measured on the development VM (2 vCPUs, bulk TCP to a namespace over the veth), a
//! mirror to a tap cost the transfer about 0–2% when the reader threw the bytes away, where
//! the ring copy cost 10–17%; with a writer behind it, about 10% against 25–30%.
//!
//! How a clone finds its metadata: the program pushes a VLAN tag on the packet, clones
//! it to the tap, pops the tag (hardware-accelerated metadata: no bytes move), then
//! writes a ring record without bytes carrying the same tag, the direction and the
//! kernel's timestamp. The tap has no qdisc, so the clone is in its queue (or refused, and
//! then the packet is copied into the ring after all) before the record is written: the
//! record read, its clone is in the tap or read ahead already ([`CaptureTap::take`]).
//! The tap writes the tag into the frame it hands out, after the MAC addresses; the
//! reader's scatter list puts those 4 bytes aside, so the frame lands in its buffer as
//! the packet was.
//!
//! The tap exists as long as its descriptor (not persistent): a run that dies leaves
//! nothing behind. It has no address, IPv6 off, and takes TCP's GSO packets as they are
//! (`TUNSETOFFLOAD`), so nothing is segmented or checksummed for it.

use std::{
    collections::{HashMap, VecDeque},
    ffi::CStr,
    fs::File,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use anyhow::{Context, Result, bail};
use childflow_common::event::CLONE_MAX;
use nix::errno::Errno;

use crate::backend::rootless::tap::{Sock, ifreq, set_flags};

/// Frames the tap holds for the reader at least: a few wake-ups' worth (see
/// `CLONE_WAKEUP` in childflow-ebpf).
const QUEUE_MIN: u32 = 128;
/// Bytes per frame of the queue: the clones of a bulk transfer averaged 28 KiB here (GSO
/// packets of up to [`CLONE_MAX`], and the shorter ones TCP sends when the window is
/// small).
const QUEUE_BYTES_PER_FRAME: u32 = 32 << 10;

/// The tap's queue for a packet ring of `ring_bytes`: about as much again as the ring
/// (`--capture-buffer` sizes both), 2048 clones for the default 64 MiB ring. The memory is
/// the packets' own (a clone holds its packet's pages until read), never allocated ahead,
/// and at most `CLONE_MAX` per frame.
pub fn queue_len(ring_bytes: u32) -> u32 {
    (ring_bytes / QUEUE_BYTES_PER_FRAME).max(QUEUE_MIN)
}

/// `struct virtio_net_hdr` (include/uapi/linux/virtio_net.h), ahead of every frame.
const VNET_HDR: usize = 10;
/// The frame's MAC addresses, before the tap's VLAN tag.
const MACS: usize = 12;
const VLAN_TAG: usize = 4;
/// `ETH_P_8021Q`, as the tap writes it.
const ETH_P_8021Q: [u8; 2] = [0x81, 0x00];

/// The capture tap, open for reading (non-blocking).
pub struct CaptureTap {
    file: File,
    ifindex: u32,
    /// Clones read before their records (another CPU's record came first), by tag, oldest
    /// first: a tag repeats once a CPU has cloned `1 << CLONE_SEQ_BITS` (childflow-common)
    /// more packets, and a CPU's clones and records come in the same order, so the oldest
    /// clone with a tag is the one of the oldest record with it.
    ahead: HashMap<u16, VecDeque<Vec<u8>>>,
}

impl CaptureTap {
    /// Creates tap `name` in this network namespace, up, with no queue discipline and a
    /// queue of `queue_len` frames ([`queue_len`]).
    pub fn create(name: &CStr, queue_len: u32) -> Result<CaptureTap> {
        // SAFETY: open(2) on a static path.
        let fd = unsafe {
            libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK)
        };
        if fd < 0 {
            bail!("cannot open /dev/net/tun for the capture tap: {}", Errno::last());
        }
        // SAFETY: fd was just returned by open(2).
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF takes a struct ifreq.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            bail!("cannot create the capture tap {name:?} (TUNSETIFF): {}", Errno::last());
        }
        let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
        // SAFETY: TUNSETOFFLOAD takes the flags as its integer argument.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, offloads as libc::c_ulong) }
            < 0
        {
            bail!("cannot set the capture tap's offloads (TUNSETOFFLOAD): {}", Errno::last());
        }
        // No address, no router solicitation, no MLD: nothing of the kernel's own goes out
        // of it. Best effort (IPv6 may be off on the host); untagged frames are skipped.
        let name_str = name.to_string_lossy();
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name_str}/disable_ipv6"), "1");
        let sock = Sock::new(libc::AF_INET).map_err(anyhow::Error::msg)?;
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_metric = queue_len.min(i32::MAX as u32) as i32;
        sock.ioctl(libc::SIOCSIFTXQLEN, &mut req, "cannot set the capture tap's queue length")
            .map_err(anyhow::Error::msg)?;
        set_flags(&sock, name, libc::IFF_UP).map_err(anyhow::Error::msg)?;
        let mut req = ifreq(name);
        sock.ioctl(libc::SIOCGIFINDEX, &mut req, "cannot read the capture tap's index")
            .map_err(anyhow::Error::msg)?;
        // SAFETY: ifru_ifindex is the member SIOCGIFINDEX filled in.
        let ifindex = unsafe { req.ifr_ifru.ifru_ifindex } as u32;
        crate::ebpf::set_noqueue(ifindex).context("the capture tap")?;
        Ok(CaptureTap { file, ifindex, ahead: HashMap::new() })
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The clone tagged `tag`: read ahead already, or read now (keeping the clones of
    /// other tags met on the way for their records). `None` if the tap has no such clone
    /// (which the order of clone and record rules out; the caller counts it lost).
    pub fn take(&mut self, tag: u16) -> Option<Vec<u8>> {
        if let Some(frame) = self.ahead.get_mut(&tag).and_then(VecDeque::pop_front) {
            return Some(frame);
        }
        loop {
            let (got, frame) = self.read_frame()?;
            if got == tag {
                return Some(frame);
            }
            self.ahead.entry(got).or_default().push_back(frame);
        }
    }

    /// Reads the next tagged frame: its tag, and the frame without the tag. `None` when the
    /// tap is empty (or failed, which is logged).
    fn read_frame(&mut self) -> Option<(u16, Vec<u8>)> {
        // CLONE_MAX is an arena slot: the buffer is in huge pages (`crate::arena`).
        let mut buf = crate::event::packet_buffer(CLONE_MAX as usize);
        let mut vnet = [0u8; VNET_HDR];
        let mut tag = [0u8; VLAN_TAG];
        loop {
            let spare = buf.spare_capacity_mut();
            if spare.len() < MACS + 64 {
                return None;
            }
            let base = spare.as_mut_ptr().cast::<u8>();
            let iov = [
                libc::iovec { iov_base: vnet.as_mut_ptr().cast(), iov_len: VNET_HDR },
                libc::iovec { iov_base: base.cast(), iov_len: MACS },
                libc::iovec { iov_base: tag.as_mut_ptr().cast(), iov_len: VLAN_TAG },
                // SAFETY: within the buffer's spare capacity (checked above).
                libc::iovec {
                    iov_base: unsafe { base.add(MACS) }.cast(),
                    iov_len: spare.len() - MACS,
                },
            ];
            // SAFETY: every iovec points at writable memory of its length.
            let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
            if n < 0 {
                let e = Errno::last();
                if e == Errno::EINTR {
                    continue;
                }
                if e != Errno::EAGAIN {
                    tracing::warn!("reading the capture tap failed: {e}");
                }
                crate::event::recycle_packet_bytes(buf);
                return None;
            }
            let n = n as usize;
            // A frame of the kernel's own (untagged), or a runt: not a clone.
            if n < VNET_HDR + MACS + VLAN_TAG || tag[..2] != ETH_P_8021Q {
                continue;
            }
            // SAFETY: `readv` wrote the first `n - VNET_HDR - VLAN_TAG` bytes of the spare
            // capacity (the MACs, then the rest of the frame right after them).
            unsafe { buf.set_len(n - VNET_HDR - VLAN_TAG) };
            return Some((u16::from_be_bytes([tag[2], tag[3]]), buf));
        }
    }

    /// Gives back the buffers of clones whose records never came (the run is over).
    pub fn finish(&mut self) {
        for frame in self.ahead.drain().flat_map(|(_, frames)| frames) {
            crate::event::recycle_packet_bytes(frame);
        }
    }
}

impl AsRawFd for CaptureTap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
