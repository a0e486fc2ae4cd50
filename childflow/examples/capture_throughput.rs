//! Measures the pcapng writer on one core: synthetic packet events through
//! `Capture::packet`, flushed every 1024 packets as the collector does.
//!
//! `cargo run --release -p childflow --example capture_throughput -- [PACKETS] [PAYLOAD] [OUT] [FILTER]`
//! (defaults: 2,000,000 packets, 64-byte TCP payload, /tmp/childflow-bench.pcapng, no filter).

use std::{path::PathBuf, time::Instant};

use childflow::{
    capture::{Capture, CaptureSetup, Interface, PacketMeta},
    cli::CaptureConfig,
    event::{Direction, PacketEvent, ProcessInfo},
};
use etherparse::PacketBuilder;

fn frame(payload: usize, sport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 0, 2], [198, 19, 0, 10], 64)
        .tcp(sport, 443, 1, 65535)
        .ack(1);
    let mut out = Vec::with_capacity(b.size(payload));
    b.write(&mut out, &vec![0x42; payload]).expect("build frame");
    out
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let packets: u64 = args.first().map_or(2_000_000, |s| s.parse().expect("PACKETS"));
    let payload: usize = args.get(1).map_or(64, |s| s.parse().expect("PAYLOAD"));
    let out = PathBuf::from(args.get(2).map_or("/tmp/childflow-bench.pcapng", |s| s.as_str()));
    let filter = args.get(3).cloned();
    let config = CaptureConfig {
        path: out.clone(),
        filter,
        snaplen: 262_144,
        max_size: None,
        files: None,
        tls_keylog: false,
        buffer: childflow::cli::DEFAULT_CAPTURE_BUFFER,
    };
    let setup = CaptureSetup {
        interfaces: vec![Interface { name: "bench0".into(), description: "bench".into() }],
        ..CaptureSetup::default()
    };
    let mut capture = Capture::open(&config, setup).expect("open capture");
    let pool: Vec<PacketEvent> = (0..1024u16)
        .map(|i| {
            let data = frame(payload, 40000 + i % 64);
            PacketEvent {
                ts: 0,
                direction: if i % 2 == 0 { Direction::Out } else { Direction::In },
                orig_len: data.len() as u32,
                data: data.into(),
            }
        })
        .collect();
    let process = ProcessInfo { pid: 4242, uid: 1000, comm: "curl".into(), ..Default::default() };
    let start = Instant::now();
    let mut bytes = 0u64;
    for i in 0..packets {
        let mut event = pool[(i % 1024) as usize].clone();
        event.ts = 1_700_000_000_000_000_000 + i * 1000;
        bytes += event.data.len() as u64;
        let meta = PacketMeta {
            interface: 0,
            community_id: Some("1:LQU9qZlK+B5F3KDmev6m5PMibrg="),
            first_of_flow: i % 100 == 0,
            process: Some(&process),
        };
        capture.packet(&event, &meta).expect("packet");
        if i % 1024 == 1023 {
            capture.flush().expect("flush");
        }
    }
    let stats = capture.close(0).expect("close");
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{packets} packets of {} bytes in {secs:.3}s: {:.0} packets/s, {:.0} MB/s of packets, \
         {} written, {} bytes on disk",
        pool[0].data.len(),
        packets as f64 / secs,
        bytes as f64 / secs / 1e6,
        stats.written,
        stats.bytes
    );
}
