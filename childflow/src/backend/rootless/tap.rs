//! The command's network interface: creating `tap0` inside the new network namespace and
//! giving it addresses and default routes, with plain ioctls (netdevice(7), route(4); no
//! `ip` binary, no netlink dependency for the few calls this needs).
//!
//! Runs in the sandbox's `init`, after the fork, as root of the new user namespace: it
//! allocates little and reports failures as strings naming the call and the fix.

use std::{
    ffi::CStr,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use nix::errno::Errno;

use super::engine::Addressing;

/// The interface name the command sees.
pub const TAP_NAME: &CStr = c"tap0";

/// Queue length of tap0: frames the command's kernel may queue before the engine reads
/// them. Deeper than the default 500 so a burst at a 64 KiB MTU is never dropped (a drop
/// costs smoltcp's 1 s minimum retransmission timeout).
const TX_QUEUE_LEN: i32 = 10_000;

pub(crate) fn ifreq(name: &CStr) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.to_bytes()) {
        *dst = *src as libc::c_char;
    }
    req
}

pub(crate) struct Sock(OwnedFd);

impl Sock {
    pub(crate) fn new(family: libc::c_int) -> Result<Sock, String> {
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(format!("socket: {}", Errno::last()));
        }
        // SAFETY: fd was just returned by socket(2).
        Ok(Sock(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(crate) fn ioctl<T>(&self, req: libc::Ioctl, arg: &mut T, what: &str) -> Result<(), String> {
        // SAFETY: each caller passes the argument type the request expects.
        if unsafe { libc::ioctl(self.0.as_raw_fd(), req, arg as *mut T) } < 0 {
            return Err(format!("{what}: {}", Errno::last()));
        }
        Ok(())
    }
}

pub(crate) fn set_flags(sock: &Sock, name: &CStr, flags: libc::c_int) -> Result<(), String> {
    let mut req = ifreq(name);
    sock.ioctl(libc::SIOCGIFFLAGS, &mut req, "cannot read interface flags")?;
    // SAFETY: ifru_flags is the member SIOCGIFFLAGS filled in.
    unsafe { req.ifr_ifru.ifru_flags |= flags as libc::c_short };
    sock.ioctl(libc::SIOCSIFFLAGS, &mut req, "cannot bring the interface up")
}

fn sockaddr_v4(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux; reinterpreting the
    // bytes is how these ioctls take addresses.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// `struct rtentry` from <net/route.h> (glibc; the libc crate only has the musl one).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_tos: libc::c_uchar,
    rt_class: libc::c_uchar,
    rt_pad4: [libc::c_short; 3],
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// `struct in6_rtmsg` from <linux/ipv6_route.h> (the libc crate's fields are private).
#[repr(C)]
struct In6RtMsg {
    rtmsg_dst: libc::in6_addr,
    rtmsg_src: libc::in6_addr,
    rtmsg_gateway: libc::in6_addr,
    rtmsg_type: u32,
    rtmsg_dst_len: u16,
    rtmsg_src_len: u16,
    rtmsg_metric: u32,
    rtmsg_info: libc::c_ulong,
    rtmsg_flags: u32,
    rtmsg_ifindex: libc::c_int,
}

/// Best effort: IPv6 keeps working without it, only with a slower start (DAD).
fn write_sysctl(path: &str, value: &str) {
    let _ = std::fs::write(path, value);
}

/// Brings `lo` up.
pub fn bring_up_loopback() -> Result<(), String> {
    let sock = Sock::new(libc::AF_INET)?;
    set_flags(&sock, c"lo", libc::IFF_UP | libc::IFF_RUNNING).map_err(|e| format!("lo: {e}"))
}

/// Creates and configures `tap0` in the current network namespace; returns its descriptor.
pub fn create(net: &Addressing, mtu: u32) -> Result<OwnedFd, String> {
    // SAFETY: open(2) on a static path.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = Errno::last();
        let fix = match e {
            Errno::EACCES | Errno::EPERM => {
                ": the device is not open to ordinary users on this host; allow it with \
                 `sudo chmod 0666 /dev/net/tun` (most distributions ship it that way)"
            }
            Errno::ENOENT | Errno::ENODEV | Errno::ENXIO => {
                ": the tun driver is missing; load it with `sudo modprobe tun`"
            }
            _ => "",
        };
        return Err(format!("cannot open /dev/net/tun: {e}{fix}"));
    }
    // SAFETY: fd was just returned by open(2).
    let tap = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq(TAP_NAME);
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF takes a struct ifreq.
    if unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(format!("cannot create {TAP_NAME:?} (TUNSETIFF): {}", Errno::last()));
    }
    // Persistent: closing the descriptor at the end then only detaches it, instead of
    // unregistering the device there and then, which waits for RCU grace periods (~20 ms,
    // most of a short run). The device goes with the namespace, which the kernel tears down
    // in the background once the command's processes are gone. Best effort.
    // SAFETY: TUNSETPERSIST takes an integer flag.
    unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };

    // IPv6 duplicate address detection would keep the address tentative (unusable) for
    // about a second; there is nobody else on this link.
    write_sysctl("/proc/sys/net/ipv6/conf/tap0/accept_dad", "0");
    write_sysctl("/proc/sys/net/ipv6/conf/tap0/dad_transmits", "0");
    write_sysctl("/proc/sys/net/ipv6/conf/tap0/router_solicitations", "0");

    // ICMP echo sockets are allowed per network namespace, and a new one allows no group:
    // let the command's own group use them, so `ping` works without privileges (icmp(7)).
    // SAFETY: getgid cannot fail.
    let gid = unsafe { libc::getgid() };
    write_sysctl("/proc/sys/net/ipv4/ping_group_range", &format!("{gid} {gid}"));

    let sock = Sock::new(libc::AF_INET)?;
    let mut req = ifreq(TAP_NAME);
    req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    sock.ioctl(libc::SIOCSIFMTU, &mut req, "cannot set the MTU of tap0")?;
    let mut req = ifreq(TAP_NAME);
    req.ifr_ifru.ifru_metric = TX_QUEUE_LEN;
    // Best effort: the default queue works, only with more risk of drops under load.
    let _ = sock.ioctl(libc::SIOCSIFTXQLEN, &mut req, "txqueuelen");

    let mut req = ifreq(TAP_NAME);
    req.ifr_ifru.ifru_addr = sockaddr_v4(net.child_v4);
    sock.ioctl(libc::SIOCSIFADDR, &mut req, "cannot set the IPv4 address of tap0")?;
    let mut req = ifreq(TAP_NAME);
    let mask = u32::MAX.checked_shl(32 - u32::from(net.prefix_v4)).unwrap_or(0);
    req.ifr_ifru.ifru_netmask = sockaddr_v4(Ipv4Addr::from(mask));
    sock.ioctl(libc::SIOCSIFNETMASK, &mut req, "cannot set the IPv4 netmask of tap0")?;
    set_flags(&sock, TAP_NAME, libc::IFF_UP | libc::IFF_RUNNING)?;

    let mut route = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr_v4(net.gateway_v4),
        rt_genmask: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_tos: 0,
        rt_class: 0,
        rt_pad4: [0; 3],
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    sock.ioctl(libc::SIOCADDRT, &mut route, "cannot add the IPv4 default route")?;

    configure_v6(net)?;
    Ok(tap)
}

fn configure_v6(net: &Addressing) -> Result<(), String> {
    let sock = match Sock::new(libc::AF_INET6) {
        Ok(s) => s,
        // A kernel without IPv6: the command gets IPv4 only.
        Err(_) => return Ok(()),
    };
    // SAFETY: if_nametoindex on a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(TAP_NAME.as_ptr()) } as libc::c_int;
    let in6 = |a: Ipv6Addr| libc::in6_addr { s6_addr: a.octets() };
    let mut req = libc::in6_ifreq {
        ifr6_addr: in6(net.child_v6),
        ifr6_prefixlen: u32::from(net.prefix_v6),
        ifr6_ifindex: ifindex,
    };
    if let Err(e) = sock.ioctl(libc::SIOCSIFADDR, &mut req, "cannot set the IPv6 address of tap0") {
        // IPv6 disabled by sysctl: IPv4 only.
        if std::fs::read_to_string("/proc/sys/net/ipv6/conf/tap0/disable_ipv6")
            .is_ok_and(|v| v.trim() == "1")
        {
            return Ok(());
        }
        return Err(e);
    }
    let mut route = In6RtMsg {
        rtmsg_dst: in6(Ipv6Addr::UNSPECIFIED),
        rtmsg_src: in6(Ipv6Addr::UNSPECIFIED),
        rtmsg_gateway: in6(net.gateway_v6),
        rtmsg_type: 0,
        rtmsg_dst_len: 0,
        rtmsg_src_len: 0,
        rtmsg_metric: 1,
        rtmsg_info: 0,
        rtmsg_flags: (libc::RTF_UP | libc::RTF_GATEWAY) as u32,
        rtmsg_ifindex: ifindex,
    };
    sock.ioctl(libc::SIOCADDRT, &mut route, "cannot add the IPv6 default route")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtentry_matches_the_kernel_layout() {
        // struct rtentry is 120 bytes on 64-bit Linux (include/uapi/linux/route.h).
        #[cfg(target_pointer_width = "64")]
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
        // struct in6_rtmsg is 80 bytes on 64-bit Linux.
        #[cfg(target_pointer_width = "64")]
        assert_eq!(std::mem::size_of::<In6RtMsg>(), 80);
    }
}
