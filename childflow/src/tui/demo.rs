//! Synthetic events for testing the live views without a network: with
//! `CHILDFLOW_DEMO_EVENTS=1` in the environment, a run also "sees" a DNS lookup of
//! `example.test` and a 1 MiB HTTP download from it by `curl`, emitted into the real event
//! channel next to the backend's own events. Test-only; not documented for users.

use std::time::Duration;

use childflow_common::flow::{DIR_IN, DIR_OUT, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_SYN};

use super::launch::{Later, Launcher};
use crate::event::{
    CloseReason, DnsAnswer, DnsData, DnsEvent, DnsTransport, Emitter, Event, FlowKey, FlowPhase,
    FlowStats, FlowUpdate, ProcessEvent, ProcessInfo, now_unix_nanos,
};

/// The environment variable that turns the demo on.
pub const ENV: &str = "CHILDFLOW_DEMO_EVENTS";
/// The demo download's payload size.
pub const DOWNLOAD: u64 = 1 << 20;

/// Whether the demo was asked for.
pub fn enabled() -> bool {
    std::env::var_os(ENV).is_some_and(|v| v == "1")
}

/// Queues a thread that emits the demo's events over about a second.
pub fn start(emitter: Emitter, launcher: &mut Launcher) -> Later<()> {
    launcher.spawn("demo-events", move || run(&emitter))
}

fn process(key: FlowKey) -> Event {
    Event::Process(ProcessEvent {
        key,
        process: ProcessInfo { pid: 2, uid: 1000, comm: "curl".into(), exe: None, cmdline: None },
    })
}

fn run(emitter: &Emitter) {
    let t0 = now_unix_nanos();
    let server = "198.18.0.2".parse().unwrap();
    let dns_key = FlowKey::new(
        PROTO_UDP,
        "10.0.2.100:51000".parse().unwrap(),
        "198.18.0.2:53".parse().unwrap(),
    );
    let mut dns = FlowStats::new(DIR_OUT, t0);
    dns.account(DIR_OUT, 58, 30, 0, t0);
    dns.account(DIR_IN, 74, 46, 0, t0 + 1_000_000);
    emitter.emit(Event::Flow(FlowUpdate { key: dns_key, stats: dns, phase: FlowPhase::Start }));
    emitter.emit(process(dns_key));
    emitter.emit(Event::Dns(DnsEvent {
        ts: t0 + 1_000_000,
        server: "198.18.0.2:53".parse().unwrap(),
        transport: DnsTransport::Udp,
        id: 0x1234,
        query: "example.test".into(),
        qtype: 1,
        rcode: 0,
        answers: vec![DnsAnswer {
            name: "example.test".into(),
            rtype: 1,
            ttl: 300,
            data: DnsData::Addr(server),
        }],
    }));
    emitter.emit(Event::Flow(FlowUpdate {
        key: dns_key,
        stats: dns,
        phase: FlowPhase::End(CloseReason::IdleTimeout),
    }));

    let key = FlowKey::new(
        PROTO_TCP,
        "10.0.2.100:40000".parse().unwrap(),
        "198.18.0.2:80".parse().unwrap(),
    );
    let mut tcp = FlowStats::new(DIR_OUT, t0);
    tcp.account(DIR_OUT, 60, 0, TCP_SYN, t0);
    tcp.account(DIR_IN, 60, 0, TCP_SYN | TCP_ACK, t0);
    tcp.account(DIR_OUT, 130, 78, TCP_ACK, t0);
    emitter.emit(Event::Flow(FlowUpdate { key, stats: tcp, phase: FlowPhase::Start }));
    emitter.emit(process(key));
    const STEPS: u64 = 10;
    const SEGMENT: u64 = 16 * 1024;
    for step in 1..=STEPS {
        std::thread::sleep(Duration::from_millis(100));
        let now = now_unix_nanos();
        let target = DOWNLOAD * step / STEPS;
        while tcp.payload_bytes[DIR_IN] < target {
            let len = SEGMENT.min(target - tcp.payload_bytes[DIR_IN]);
            tcp.account(DIR_IN, (len + 52) as u32, len as u32, TCP_ACK, now);
            tcp.account(DIR_OUT, 52, 0, TCP_ACK, now);
        }
        emitter.emit(Event::Flow(FlowUpdate { key, stats: tcp, phase: FlowPhase::Update }));
    }
    let now = now_unix_nanos();
    tcp.account(DIR_OUT, 52, 0, TCP_FIN | TCP_ACK, now);
    tcp.account(DIR_IN, 52, 0, TCP_FIN | TCP_ACK, now);
    emitter.emit(Event::Flow(FlowUpdate {
        key,
        stats: tcp,
        phase: FlowPhase::End(CloseReason::Fin),
    }));
}
