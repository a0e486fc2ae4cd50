//! The run's link to the host: a veth pair, its addresses and routes, set up over netlink
//! (rtnetlink), and the forwarding sysctls.
//!
//! ```text
//!  host netns                                   child netns (the command's)
//!  cf<id>h  10.77.a.b+1/30  fd77:6366:0:i::1/64 ── cf<id>c 10.77.a.b+2/30  fd77:6366:0:i::2/64
//!                                                  default via 10.77.a.b+1 / fd77:6366:0:i::1
//! ```
//! The veth is created in the host namespace with its peer directly in the child's network
//! namespace (`IFLA_NET_NS_PID` of the sandbox's init), so the child end never appears on the
//! host. The child end dies with the child namespace, and a veth pair dies as a whole: once
//! the command tree is gone (SIGKILL of childflow included, see the sandbox's PDEATHSIG),
//! the kernel removes the host end too, with no cleanup pass.
//!
//! Subnet `i` (one /30 and one /64 per run) starts from the run's pid and skips subnets an
//! address of the host already uses, so concurrent runs do not collide.
//!
//! Forwarding (host state, by design not restored): the host end gets
//! `net.ipv4.conf.<veth>.forwarding=1`; replies come back through whatever uplink the host
//! uses, which must forward too, so the global `net.ipv4.ip_forward` and
//! `net.ipv6.conf.all.forwarding` are switched on when they are off, as Docker, Podman and
//! LXC do. They are left on when the run ends: restoring them would race with other runs
//! and tools that need them. Note that on a host that configures IPv6 from router
//! advertisements, `all.forwarding=1` stops interfaces with `accept_ra=1` from accepting
//! them (set `accept_ra=2` there).

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
};

use futures_util::TryStreamExt;
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags},
    link::{InfoData, InfoVeth, LinkAttribute},
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// Why the run's network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A netlink request failed.
    #[error("failed to {op}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// A netlink socket could not be opened (in the host or the child namespace).
    #[error("failed to open a netlink socket {place}")]
    Socket {
        place: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A sysctl could not be read or written.
    #[error("failed to set {path} (forwarding for the run's traffic)")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Every subnet of 10.77.0.0/16 is in use on the host.
    #[error("no free subnet in 10.77.0.0/16 for the run's veth (16384 runs alive?)")]
    NoSubnet,
}

/// Number of /30 subnets in 10.77.0.0/16.
const SUBNETS: u32 = 1 << 14;

/// The addresses of one run's veth pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addressing {
    pub host_if: String,
    pub child_if: String,
    pub host_v4: Ipv4Addr,
    pub child_v4: Ipv4Addr,
    pub host_v6: Ipv6Addr,
    pub child_v6: Ipv6Addr,
}

impl Addressing {
    /// The names for run `run_id` (at most 12 characters, so names fit IFNAMSIZ) and
    /// subnet number `index` (< 16384).
    pub fn new(run_id: &str, index: u32) -> Addressing {
        debug_assert!(run_id.len() <= 12 && index < SUBNETS);
        let base = u32::from(Ipv4Addr::new(10, 77, 0, 0)) + (index % SUBNETS) * 4;
        let v6 = |host: u16| Ipv6Addr::new(0xfd77, 0x6366, 0, index as u16, 0, 0, 0, host);
        Addressing {
            host_if: format!("cf{run_id}h"),
            child_if: format!("cf{run_id}c"),
            host_v4: Ipv4Addr::from(base + 1),
            child_v4: Ipv4Addr::from(base + 2),
            host_v6: v6(1),
            child_v6: v6(2),
        }
    }

    /// The first subnet from `start` on whose host address is not in `used`.
    pub fn pick(run_id: &str, start: u32, used: &[IpAddr]) -> Result<Addressing, NetError> {
        (0..SUBNETS)
            .map(|i| Addressing::new(run_id, (start + i) % SUBNETS))
            .find(|a| {
                !used.iter().any(|u| {
                    *u == IpAddr::V4(a.host_v4)
                        || *u == IpAddr::V4(a.child_v4)
                        || *u == IpAddr::V6(a.host_v6)
                })
            })
            .ok_or(NetError::NoSubnet)
    }
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let op = op.into();
    move |source| NetError::Netlink { op, source }
}

/// A netlink handle on the host's namespace (the caller's).
pub fn host_handle() -> Result<Handle, NetError> {
    let (conn, handle, _) = rtnetlink::new_connection()
        .map_err(|source| NetError::Socket { place: "on the host", source })?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A netlink handle whose socket lives in the network namespace of process `pid`.
///
/// A netlink socket belongs to the namespace it was created in, so it is created on a
/// short-lived thread that first joins that namespace; the calling thread stays put.
pub fn netns_handle(pid: i32) -> Result<Handle, NetError> {
    let place = "in the command's network namespace";
    let ns = File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|source| NetError::Socket { place, source })?;
    let runtime = tokio::runtime::Handle::current();
    let (conn, handle, _) = std::thread::scope(|s| {
        s.spawn(|| {
            let _enter = runtime.enter();
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            rtnetlink::new_connection()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("netlink thread panicked")))
    })
    .map_err(|source| NetError::Socket { place, source })?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Every address configured on the host now.
pub async fn host_addresses(host: &Handle) -> Result<Vec<IpAddr>, NetError> {
    let mut out = Vec::new();
    let mut stream = host.address().get().execute();
    while let Some(msg) = stream.try_next().await.map_err(nl("list the host's addresses"))? {
        for attr in msg.attributes {
            if let AddressAttribute::Address(a) = attr {
                out.push(a);
            }
        }
    }
    Ok(out)
}

async fn link_index(handle: &Handle, name: &str) -> Result<u32, NetError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await.map_err(nl(format!("find link {name}")))? {
        Some(link) => Ok(link.header.index),
        None => Err(NetError::Netlink {
            op: format!("find link {name}"),
            source: rtnetlink::Error::RequestFailed,
        }),
    }
}

async fn add_address(
    handle: &Handle,
    index: u32,
    ifname: &str,
    addr: IpAddr,
    prefix: u8,
) -> Result<(), NetError> {
    let mut req = handle.address().add(index, addr, prefix);
    if addr.is_ipv6() {
        // No duplicate address detection: the link has exactly two ends, both ours, and DAD
        // would leave the address unusable for a second or more.
        let msg = req.message_mut();
        msg.header.flags |= AddressHeaderFlags::Nodad;
        msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    req.execute().await.map_err(nl(format!("add address {addr}/{prefix} to {ifname}")))
}

/// The veth pair, configured on both ends. Creating it needs the child's namespace to exist
/// (the sandbox's init, `child_pid`). Returns the host end's interface index.
pub async fn create(
    host: &Handle,
    child: &Handle,
    a: &Addressing,
    child_pid: i32,
) -> Result<u32, NetError> {
    // One queue each way, asked for explicitly: by default a veth gets a queue per possible
    // CPU and `veth_init_queues` then cuts the real count to one on the registered device,
    // which waits for an expedited grace period under RTNL (`netif_set_real_num_tx_queues`
    // → `synchronize_net`; drivers/net/veth.c), once per end: 3-24 ms of the start-up here.
    // The veth ends up with one real queue either way.
    fn one_queue<T>(b: LinkMessageBuilder<T>) -> LinkMessageBuilder<T> {
        b.append_extra_attribute(LinkAttribute::NumTxQueues(1))
            .append_extra_attribute(LinkAttribute::NumRxQueues(1))
    }
    let peer = one_queue(
        LinkMessageBuilder::<LinkUnspec>::new()
            .name(a.child_if.clone())
            .setns_by_pid(child_pid as u32),
    )
    .build();
    let veth = one_queue(
        LinkVeth::new(&a.host_if, &a.child_if).set_info_data(InfoData::Veth(InfoVeth::Peer(peer))),
    )
    .build();
    host.link().add(veth).execute().await.map_err(nl(format!(
        "create veth {} (peer {} in the command's namespace)",
        a.host_if, a.child_if
    )))?;

    let v6 = ipv6_enabled();
    let hidx = link_index(host, &a.host_if).await?;
    add_address(host, hidx, &a.host_if, a.host_v4.into(), 30).await?;
    if v6 {
        add_address(host, hidx, &a.host_if, a.host_v6.into(), 64).await?;
    }
    host.link()
        .set(LinkUnspec::new_with_index(hidx).up().build())
        .execute()
        .await
        .map_err(nl(format!("bring up {}", a.host_if)))?;

    let lo = link_index(child, "lo").await?;
    child
        .link()
        .set(LinkUnspec::new_with_index(lo).up().build())
        .execute()
        .await
        .map_err(nl("bring up lo in the command's namespace"))?;
    let cidx = link_index(child, &a.child_if).await?;
    add_address(child, cidx, &a.child_if, a.child_v4.into(), 30).await?;
    if v6 {
        add_address(child, cidx, &a.child_if, a.child_v6.into(), 64).await?;
    }
    child
        .link()
        .set(LinkUnspec::new_with_index(cidx).up().build())
        .execute()
        .await
        .map_err(nl(format!("bring up {}", a.child_if)))?;
    let v4 =
        RouteMessageBuilder::<Ipv4Addr>::new().gateway(a.host_v4).output_interface(cidx).build();
    child.route().add(v4).execute().await.map_err(nl("add the command's IPv4 default route"))?;
    if v6 {
        let route = RouteMessageBuilder::<Ipv6Addr>::new()
            .gateway(a.host_v6)
            .output_interface(cidx)
            .build();
        child
            .route()
            .add(route)
            .execute()
            .await
            .map_err(nl("add the command's IPv6 default route"))?;
    }
    Ok(hidx)
}

/// Whether the host has IPv6 at all (`ipv6.disable=1` removes `/proc/sys/net/ipv6`).
/// Without it the command gets IPv4 only.
pub fn ipv6_enabled() -> bool {
    std::path::Path::new("/proc/sys/net/ipv6").exists()
}

/// Turns forwarding on for the run (see the module doc for what is global and why).
pub fn enable_forwarding(host_if: &str) -> Result<(), NetError> {
    let mut paths = vec![
        format!("/proc/sys/net/ipv4/conf/{host_if}/forwarding"),
        "/proc/sys/net/ipv4/ip_forward".to_owned(),
    ];
    if ipv6_enabled() {
        paths.push("/proc/sys/net/ipv6/conf/all/forwarding".to_owned());
    }
    for path in paths {
        let current = std::fs::read_to_string(&path)
            .map_err(|source| NetError::Sysctl { path: path.clone(), source })?;
        if current.trim() != "1" {
            tracing::info!("setting {path} to 1 (left on after the run)");
            std::fs::write(&path, "1").map_err(|source| NetError::Sysctl { path, source })?;
        }
    }
    Ok(())
}

/// Takes the host end (interface `index`, named `name`) down: nothing crosses the pair any
/// more, and when this returns, no packet is in flight through it (`dev_close` waits for
/// them with `synchronize_net`).
pub async fn set_down(host: &Handle, index: u32, name: &str) -> Result<(), NetError> {
    host.link()
        .set(LinkUnspec::new_with_index(index).down().build())
        .execute()
        .await
        .map_err(nl(format!("take {name} down")))
}

/// Deletes the host end (and so the pair) now, instead of when the child namespace goes.
pub async fn delete(host: &Handle, host_if: &str) -> Result<(), NetError> {
    let index = link_index(host, host_if).await?;
    host.link().del(index).execute().await.map_err(nl(format!("delete {host_if}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz_and_addresses_follow_the_index() {
        let a = Addressing::new("3fffff", 5);
        assert_eq!(a.host_if, "cf3fffffh");
        assert!(a.host_if.len() <= 15);
        assert_eq!(a.host_v4, Ipv4Addr::new(10, 77, 0, 21));
        assert_eq!(a.child_v4, Ipv4Addr::new(10, 77, 0, 22));
        assert_eq!(a.child_v6, "fd77:6366:0:5::2".parse::<Ipv6Addr>().unwrap());
        let last = Addressing::new("1", SUBNETS - 1);
        assert_eq!(last.child_v4, Ipv4Addr::new(10, 77, 255, 254));
    }

    #[test]
    fn pick_skips_subnets_in_use_and_wraps() {
        let used = [IpAddr::V4(Ipv4Addr::new(10, 77, 255, 253))];
        let a = Addressing::pick("1", SUBNETS - 1, &used).unwrap();
        assert_eq!(a.host_v4, Ipv4Addr::new(10, 77, 0, 1));
    }
}
