//! ICMP errors through host sockets: the hop limit the command gave its packets is applied to
//! the host socket, and the ICMP errors the host's kernel received for that socket are read
//! back with the address of the router that sent them, so the engine can pass them on to the
//! command as if the router had answered it directly (this is what makes `traceroute` and
//! `tracepath` work through the engine).
//!
//! With `IP_RECVERR` / `IPV6_RECVERR` set (ip(7), ipv6(7)), the kernel queues each ICMP
//! error for the socket on its error queue as a `sock_extended_err` (linux/errqueue.h) whose
//! `SO_EE_OFFENDER` is the ICMP message's source address; `recvmsg(MSG_ERRQUEUE)` reads it.
//! Without the option a UDP socket only ever reports "port unreachable" and only as an errno,
//! and time-exceeded is not reported at all (`__udp4_lib_err` in net/ipv4/udp.c: non-fatal
//! errors are dropped unless `recverr`). Unprivileged ICMP ("ping") sockets honour the same
//! options (`ping_err` in net/ipv4/ping.c).
//!
//! Reading the queue also clears the socket's pending error once the last ICMP entry is
//! gone (`sock_dequeue_err_skb` in net/core/skbuff.c), so a later `send` does not fail with
//! an error that was already passed on.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, BorrowedFd},
};

use super::packet::IcmpError;

/// `sock_extended_err.ee_origin` values (linux/errqueue.h).
const SO_EE_ORIGIN_ICMP: u8 = 2;
const SO_EE_ORIGIN_ICMP6: u8 = 3;
/// `struct sock_extended_err` is 16 bytes; the offender's sockaddr follows it.
const EE_LEN: usize = 16;

/// One ICMP error the host's kernel queued for a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedError {
    /// Who sent the ICMP message (a router on the path, or the destination itself).
    pub offender: Option<IpAddr>,
    /// The message's type and code, in the socket's family.
    pub error: IcmpError,
    /// The start of the payload of the datagram it was about, as this socket sent it (for
    /// a ping socket: the echo request's ICMP header, so its sequence number).
    pub payload: Vec<u8>,
}

fn setsockopt_int(fd: BorrowedFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: setsockopt(2) with a pointer to an int that lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Asks the kernel to queue ICMP errors for the socket (`v6`: an `AF_INET6` socket).
pub fn enable(fd: BorrowedFd, v6: bool) -> io::Result<()> {
    if v6 {
        setsockopt_int(fd, libc::SOL_IPV6, libc::IPV6_RECVERR, 1)
    } else {
        setsockopt_int(fd, libc::SOL_IP, libc::IP_RECVERR, 1)
    }
}

/// Sends the socket's next packets with TTL / hop limit `hops`.
pub fn set_hop_limit(fd: BorrowedFd, v6: bool, hops: u8) -> io::Result<()> {
    // IPv4 refuses a TTL of 0 (ip(7): 1..255); the command's kernel never sends one.
    let hops = i32::from(hops.max(1));
    if v6 {
        setsockopt_int(fd, libc::SOL_IPV6, libc::IPV6_UNICAST_HOPS, hops)
    } else {
        setsockopt_int(fd, libc::SOL_IP, libc::IP_TTL, hops)
    }
}

/// Sends the socket's next packets with the host's default TTL / hop limit again.
pub fn reset_hop_limit(fd: BorrowedFd, v6: bool) -> io::Result<()> {
    // -1: the default (ip(7) IP_TTL, ipv6(7) IPV6_UNICAST_HOPS).
    if v6 {
        setsockopt_int(fd, libc::SOL_IPV6, libc::IPV6_UNICAST_HOPS, -1)
    } else {
        setsockopt_int(fd, libc::SOL_IP, libc::IP_TTL, -1)
    }
}

/// Reads one entry of the socket's error queue without blocking. `Err(WouldBlock)` when the
/// queue is empty; `Ok(None)` for an entry that is not an ICMP error the command should see
/// (a local error such as `EMSGSIZE`, "fragmentation needed", "packet too big": the host
/// socket's own path MTU handling deals with those).
pub fn read_queued(fd: BorrowedFd) -> io::Result<Option<QueuedError>> {
    let mut payload = [0u8; 64];
    // u64 elements: cmsg headers need their natural alignment.
    let mut control = [0u64; 64];
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
    // SAFETY: an all-zero msghdr is valid (no name, no buffers) before the fields are set.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: recvmsg(2) into buffers that outlive the call and whose sizes msg states.
    let n =
        unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let payload = payload[..(n as usize).min(payload.len())].to_vec();
    // SAFETY: the CMSG_* walk stays within msg_controllen bytes of `control`, as the kernel
    // filled them; each data slice is bounded by its cmsg_len.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            let data_ptr = libc::CMSG_DATA(cmsg);
            let header = data_ptr.offset_from(cmsg.cast::<u8>()) as usize;
            let data = std::slice::from_raw_parts(data_ptr, c.cmsg_len.saturating_sub(header));
            let ours = (c.cmsg_level == libc::SOL_IP && c.cmsg_type == libc::IP_RECVERR)
                || (c.cmsg_level == libc::SOL_IPV6 && c.cmsg_type == libc::IPV6_RECVERR);
            if ours {
                return Ok(parse_extended_err(data).map(|(error, offender)| QueuedError {
                    offender,
                    error,
                    payload,
                }));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(None)
}

/// Parses a `sock_extended_err` and the offender address after it into the ICMP error the
/// command should get. Only errors that say "this destination cannot be reached this way"
/// are passed on: destination unreachable (except ICMPv4 "fragmentation needed") and time
/// exceeded. Packet too big and parameter problem carry data that refers to the host's
/// packet, not the command's.
fn parse_extended_err(data: &[u8]) -> Option<(IcmpError, Option<IpAddr>)> {
    let origin = *data.get(4)?;
    let (icmp_type, code) = (*data.get(5)?, *data.get(6)?);
    let keep = match origin {
        // RFC 792: 3 destination unreachable (code 4: fragmentation needed), 11 time exceeded.
        SO_EE_ORIGIN_ICMP => (icmp_type == 3 && code != 4) || icmp_type == 11,
        // RFC 4443: 1 destination unreachable, 3 time exceeded.
        SO_EE_ORIGIN_ICMP6 => icmp_type == 1 || icmp_type == 3,
        _ => false,
    };
    if !keep {
        return None;
    }
    let family = data.get(EE_LEN..EE_LEN + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let offender = match family.map(i32::from) {
        Some(libc::AF_INET) => {
            let a: [u8; 4] = data.get(EE_LEN + 4..EE_LEN + 8)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(a)))
        }
        Some(libc::AF_INET6) => {
            let a: [u8; 16] = data.get(EE_LEN + 8..EE_LEN + 24)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        }
        _ => None,
    };
    Some((IcmpError { icmp_type, code }, offender))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `sock_extended_err` as the kernel writes it, with an offender.
    fn ee(origin: u8, icmp_type: u8, code: u8, offender: IpAddr) -> Vec<u8> {
        let mut d = vec![0u8; EE_LEN];
        d[..4].copy_from_slice(&(libc::EHOSTUNREACH as u32).to_ne_bytes());
        d[4] = origin;
        d[5] = icmp_type;
        d[6] = code;
        match offender {
            IpAddr::V4(a) => {
                d.extend_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
                d.extend_from_slice(&[0, 0]);
                d.extend_from_slice(&a.octets());
                d.extend_from_slice(&[0; 8]);
            }
            IpAddr::V6(a) => {
                d.extend_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
                d.extend_from_slice(&[0; 6]);
                d.extend_from_slice(&a.octets());
                d.extend_from_slice(&[0; 4]);
            }
        }
        d
    }

    #[test]
    fn time_exceeded_names_the_router() {
        let router: IpAddr = "198.18.7.2".parse().unwrap();
        let (err, from) = parse_extended_err(&ee(SO_EE_ORIGIN_ICMP, 11, 0, router))
            .expect("time exceeded is passed on");
        assert_eq!(err, IcmpError::time_exceeded(true));
        assert_eq!(from, Some(router));
        let router6: IpAddr = "2001:db8:7::2".parse().unwrap();
        let (err, from) = parse_extended_err(&ee(SO_EE_ORIGIN_ICMP6, 3, 0, router6))
            .expect("hop limit exceeded is passed on");
        assert_eq!(err, IcmpError::time_exceeded(false));
        assert_eq!(from, Some(router6));
    }

    #[test]
    fn path_mtu_and_local_errors_stay_with_the_host() {
        let a: IpAddr = "198.18.7.2".parse().unwrap();
        assert_eq!(parse_extended_err(&ee(SO_EE_ORIGIN_ICMP, 3, 4, a)), None, "frag needed");
        assert_eq!(parse_extended_err(&ee(SO_EE_ORIGIN_ICMP6, 2, 0, a)), None, "too big");
        assert_eq!(parse_extended_err(&ee(1, 0, 0, a)), None, "SO_EE_ORIGIN_LOCAL");
        assert_eq!(parse_extended_err(&[0; 5]), None, "truncated");
        let (err, _) = parse_extended_err(&ee(SO_EE_ORIGIN_ICMP, 3, 3, a)).unwrap();
        assert_eq!(err, IcmpError { icmp_type: 3, code: 3 }, "port unreachable");
    }

    #[test]
    fn a_real_socket_reports_port_unreachable_with_its_offender() {
        // Loopback only: a UDP port nobody listens on answers with ICMP port unreachable.
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let target = closed.local_addr().unwrap();
        drop(closed);
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsFd::as_fd(&sock);
        enable(fd, false).expect("IP_RECVERR");
        set_hop_limit(fd, false, 5).expect("IP_TTL");
        sock.connect(target).unwrap();
        sock.send(b"probe").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let queued = loop {
            match read_queued(fd) {
                Ok(q) => break q,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "no error was queued");
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => panic!("reading the error queue failed: {e}"),
            }
        };
        let q = queued.expect("port unreachable is an ICMP error");
        assert_eq!(q.error, IcmpError { icmp_type: 3, code: 3 });
        assert_eq!(q.offender, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(q.payload, b"probe");
    }
}
