//! How fast the flow table absorbs backend events, and how much memory live flows take.
//!
//! `cargo bench -p childflow --bench flow_table` (or `cargo xtask bench flows`).
//! Targets (issue "Flows"): at least 1M events/s on one core; 100,000 live flows in at most
//! 200 MiB. The memory figure is counted exactly by a counting global allocator and printed
//! before the timing runs.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use childflow::{
    event::{
        DnsAnswer, DnsData, DnsEvent, DnsTransport, Event, FlowKey, FlowPhase, FlowStats,
        FlowUpdate, ProcessEvent, ProcessInfo,
    },
    flow::{FlowTable, TableConfig},
};
use childflow_common::flow::{DIR_IN, DIR_OUT, PROTO_TCP, TCP_ACK, TCP_PSH, TCP_SYN};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

/// Counts the bytes currently allocated, so the memory of the table is measured, not guessed.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const T0: u64 = 1_700_000_000_000_000_000;

/// `n` distinct keys: local ports 1024.., remote addresses in 198.18.0.0/15.
fn keys(n: u32) -> Vec<FlowKey> {
    let local = std::net::Ipv4Addr::new(10, 0, 2, 100);
    (0..n)
        .map(|i| {
            let remote = std::net::Ipv4Addr::from(0xc612_0000 | (i / 60_000));
            FlowKey::new(
                PROTO_TCP,
                std::net::SocketAddr::new(local.into(), 1024 + (i % 60_000) as u16),
                std::net::SocketAddr::new(remote.into(), 443),
            )
        })
        .collect()
}

fn stats(packets: u64) -> FlowStats {
    let mut s = FlowStats::new(DIR_OUT, T0);
    s.account(DIR_OUT, 60, 0, TCP_SYN, T0);
    s.account(DIR_IN, 60, 0, TCP_SYN | TCP_ACK, T0 + 1);
    s.packets = [packets, packets];
    s.bytes = [packets * 1500, packets * 1500];
    s.tcp_flags = [TCP_SYN | TCP_ACK | TCP_PSH, TCP_SYN | TCP_ACK | TCP_PSH];
    s.last_ns = T0 + packets;
    s
}

fn update(key: FlowKey, packets: u64, phase: FlowPhase) -> Event {
    Event::Flow(FlowUpdate { key, stats: stats(packets), phase })
}

fn process(pid: u32) -> ProcessInfo {
    ProcessInfo {
        pid,
        uid: 1000,
        comm: "curl".into(),
        exe: Some("/usr/bin/curl".into()),
        cmdline: Some(vec!["curl".into(), "-s".into(), "https://www.example.test/".into()]),
    }
}

fn config(max_flows: usize) -> TableConfig {
    TableConfig { max_flows, update_interval: None, ..TableConfig::default() }
}

/// Prints the heap taken by 100,000 live flows, each with a resolved name and a process.
fn memory_of_100k_live_flows() {
    let keys = keys(100_000);
    let before = LIVE.load(Ordering::Relaxed);
    let mut table = FlowTable::new(config(100_000));
    for (i, k) in keys.iter().enumerate() {
        if i % 1000 == 0 {
            table.ingest(&Event::Dns(DnsEvent {
                ts: T0,
                server: "198.18.0.53:53".parse().unwrap(),
                transport: DnsTransport::Udp,
                id: 1,
                query: format!("host{i}.example.test"),
                qtype: 1,
                rcode: 0,
                answers: vec![DnsAnswer {
                    name: format!("host{i}.example.test"),
                    rtype: 1,
                    ttl: 60,
                    data: DnsData::Addr(k.remote_ip()),
                }],
            }));
        }
        table.ingest(&Event::Process(ProcessEvent {
            key: *k,
            process: process(1000 + i as u32 % 50),
        }));
        table.ingest(&update(*k, 10, FlowPhase::Start));
    }
    let after = LIVE.load(Ordering::Relaxed);
    assert_eq!(table.len(), 100_000);
    let mib = (after - before) as f64 / (1 << 20) as f64;
    println!(
        "memory: 100000 live flows (with process and DNS attribution) take {mib:.1} MiB of heap \
         ({:.0} bytes per flow); target <= 200 MiB",
        (after - before) as f64 / 100_000.0
    );
    drop(black_box(table));
}

fn bench(c: &mut Criterion) {
    memory_of_100k_live_flows();

    let mut group = c.benchmark_group("flow_table");
    group.measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));

    // Steady state: cumulative updates to 10,000 live flows (what a backend sends most).
    let live = keys(10_000);
    let events: Vec<Event> = live
        .iter()
        .enumerate()
        .map(|(i, k)| update(*k, 10 + i as u64, FlowPhase::Update))
        .collect();
    let mut table = FlowTable::new(config(100_000));
    for k in &live {
        table.ingest(&update(*k, 1, FlowPhase::Start));
    }
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("update_10k_live_flows", |b| {
        b.iter(|| {
            for e in &events {
                black_box(table.ingest(e));
            }
        })
    });

    // Whole lifecycles: start, 8 updates, end — new flows keep coming (Community ID hashing,
    // allocation and the end record included).
    let life: Vec<Event> = keys(1_000)
        .into_iter()
        .flat_map(|k| {
            std::iter::once(update(k, 1, FlowPhase::Start))
                .chain((2..10).map(move |n| update(k, n, FlowPhase::Update)))
                .chain(std::iter::once(update(
                    k,
                    10,
                    FlowPhase::End(childflow::event::CloseReason::Fin),
                )))
        })
        .collect();
    group.throughput(Throughput::Elements(life.len() as u64));
    group.bench_function("lifecycle_start_8_updates_end", |b| {
        let mut table = FlowTable::new(config(100_000));
        b.iter(|| {
            // Like the collector: take the table's output after every event.
            for e in &life {
                black_box(table.ingest(e));
                table.drain_output().for_each(|o| drop(black_box(o)));
            }
        })
    });

    // Worst case: every event is a new flow on a full table (a scan), so each one evicts.
    let scan: Vec<Event> =
        keys(20_000).into_iter().map(|k| update(k, 1, FlowPhase::Start)).collect();
    group.throughput(Throughput::Elements(scan.len() as u64));
    group.bench_function("new_flows_into_a_full_table", |b| {
        b.iter_batched_ref(
            || FlowTable::new(config(10_000)),
            |table| {
                for e in &scan {
                    black_box(table.ingest(e));
                    table.drain_output().for_each(|o| drop(black_box(o)));
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
