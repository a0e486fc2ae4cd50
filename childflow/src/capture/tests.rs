//! Captures of synthetic frames, read back with the real `tshark` and `capinfos`.

use std::{
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use super::{filter::tests as frames, *};
use crate::event::{DnsAnswer, DnsTransport};

const T0: u64 = 1_700_000_000_123_456_789;

fn config(path: &Path) -> CaptureConfig {
    CaptureConfig {
        path: path.to_path_buf(),
        filter: None,
        snaplen: 262_144,
        max_size: None,
        files: None,
        tls_keylog: false,
        buffer: crate::cli::DEFAULT_CAPTURE_BUFFER,
    }
}

fn setup(keylog_parent: &Path) -> CaptureSetup {
    CaptureSetup {
        interfaces: vec![Interface {
            name: "tap0".into(),
            description: "childflow rootless: the command's tap; in = received by the command"
                .into(),
        }],
        command: Some("curl -sI https://example.test".into()),
        keylog_owner: None,
        keylog_parent: Some(keylog_parent.to_path_buf()),
    }
}

fn open(config: &CaptureConfig, dir: &Path) -> Capture {
    Capture::open(config, setup(dir)).unwrap_or_else(|e| panic!("open capture: {}", chain(&e)))
}

fn packet(frame: Vec<u8>, direction: Direction, n: u64) -> PacketEvent {
    PacketEvent { ts: T0 + n * 1_000, direction, orig_len: frame.len() as u32, data: frame.into() }
}

fn curl() -> ProcessInfo {
    ProcessInfo { pid: 4242, uid: 1000, comm: "curl".into(), ..ProcessInfo::default() }
}

fn dns(query: &str, addrs: &[&str]) -> DnsEvent {
    DnsEvent {
        ts: T0,
        server: "198.18.0.1:53".parse().expect("server address"),
        transport: DnsTransport::Udp,
        id: 1,
        query: query.into(),
        qtype: 1,
        rcode: 0,
        answers: addrs
            .iter()
            .map(|a| DnsAnswer {
                name: query.into(),
                rtype: 1,
                ttl: 60,
                data: DnsData::Addr(a.parse::<IpAddr>().expect("answer address")),
            })
            .collect(),
    }
}

/// Runs a Wireshark tool and returns its stdout; fails the test on a non-zero exit or on
/// anything printed to stderr (tshark and capinfos report file problems there).
fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .env("HOME", std::env::temp_dir()) // no personal Wireshark profile
        .output()
        .unwrap_or_else(|e| panic!("run {program} (apt-get install tshark): {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr: Vec<&str> =
        stderr.lines().filter(|l| !l.contains("Running as user \"root\"")).collect();
    assert!(
        out.status.success() && stderr.is_empty(),
        "{program} {args:?} failed ({}):\n{}",
        out.status,
        stderr.join("\n")
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tshark_fields(path: &Path, extra: &[&str], fields: &[&str]) -> Vec<String> {
    let mut args =
        vec!["-r", path.to_str().expect("utf-8 path"), "-T", "fields", "-E", "separator=|"];
    args.extend_from_slice(extra);
    for f in fields {
        args.extend_from_slice(&["-e", f]);
    }
    tool("tshark", &args).lines().map(str::to_string).collect()
}

/// capinfos' report with runs of whitespace collapsed to one space.
fn capinfos(path: &Path) -> String {
    let out = tool("capinfos", &["-M", path.to_str().expect("utf-8 path")]);
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One of everything: TCP and UDP over IPv4 and IPv6, ICMP and ICMPv6, both directions.
fn mixed_traffic() -> Vec<PacketEvent> {
    use Direction::{In, Out};
    vec![
        packet(frames::tcp4("198.18.0.2", 40000, "198.19.0.10", 443, b"hello"), Out, 0),
        packet(frames::tcp4("198.19.0.10", 443, "198.18.0.2", 40000, b"world"), In, 1),
        packet(frames::udp6("2001:db8::2", 40002, "2001:db8:1::53", 53, b"query"), Out, 2),
        packet(frames::udp6("2001:db8:1::53", 53, "2001:db8::2", 40002, b"answer"), In, 3),
        packet(frames::ping4("198.18.0.2", "198.19.0.1", 1), Out, 4),
        packet(frames::ping6("2001:db8::2", "2001:db8:1::1", 1), Out, 5),
        packet(frames::tcp6("2001:db8::2", 40003, "2001:db8:1::80", 8080, b""), Out, 6),
    ]
}

#[test]
fn tshark_reads_directions_comments_process_and_names() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("run.pcapng");
    let mut cap = open(&config(&path), tmp.path());
    cap.names(&dns("example.test", &["198.19.0.10", "2001:db8:1::80"]));
    let proc_ = curl();
    for (i, pkt) in mixed_traffic().iter().enumerate() {
        let meta = PacketMeta {
            interface: 0,
            community_id: Some("1:LQU9qZlK+B5F3KDmev6m5PMibrg="),
            first_of_flow: i == 0,
            process: (i < 2).then_some(&proc_),
        };
        cap.packet(pkt, &meta).expect("write packet");
    }
    let stats = cap.close(3).expect("close capture");
    assert_eq!((stats.received, stats.written, stats.dropped), (7, 7, 3));
    assert_eq!(stats.files, std::slice::from_ref(&path));

    let info = capinfos(&path);
    for want in [
        "Number of packets: 7",
        "File encapsulation: ether",
        "Time precision = nanoseconds (9)",
        "Name = tap0",
        "Capture application: childflow",
        "Capture comment: command: curl -sI https://example.test",
        "Number of resolved IPv4 addresses in file: 1",
        "Number of resolved IPv6 addresses in file: 1",
        "Number of stat entries = 1",
    ] {
        assert!(info.contains(want), "capinfos lacks `{want}`:\n{info}");
    }

    let rows = tshark_fields(
        &path,
        &[],
        &[
            "frame.packet_flags_direction",
            "frame.comment",
            "ip.proto",
            "ipv6.nxt",
            "frame.time_epoch",
        ],
    );
    eprintln!("{}", rows.join("\n"));
    assert_eq!(rows.len(), 7);
    assert!(rows[0].starts_with("0x00000002|process curl (pid 4242, uid 1000),community_id 1:LQU9qZlK+B5F3KDmev6m5PMibrg=|6||1700000000.123456789"), "{}", rows[0]);
    assert!(rows[1].starts_with("0x00000001|process curl (pid 4242, uid 1000)|6|"), "{}", rows[1]);
    assert!(rows[2].starts_with("0x00000002||"), "{}", rows[2]);
    assert!(rows[3].starts_with("0x00000001||"), "{}", rows[3]);

    let names = tshark_fields(&path, &["-N", "n"], &["ip.dst_host", "ipv6.dst_host"]);
    eprintln!("{}", names.join("\n"));
    assert_eq!(names[0], "example.test|");
    assert_eq!(names[6], "|example.test");
}

/// The blocks of a capture file, as (type, body) pairs.
fn read_blocks(path: &Path) -> Vec<(u32, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let blocks: Vec<_> = pcapng::blocks(&bytes).map(|b| (b.block_type, b.body.to_vec())).collect();
    let total: usize = blocks.iter().map(|(_, b)| b.len() + 12).sum();
    assert_eq!(total, bytes.len(), "{} ends in a partial block", path.display());
    blocks
}

fn isb_option(body: &[u8], code: u16) -> u64 {
    pcapng::options(&body[12..])
        .find(|(c, _)| *c == code)
        .map(|(_, v)| u64::from_ne_bytes(v.try_into().expect("8-byte ISB counter")))
        .unwrap_or_else(|| panic!("ISB option {code} missing"))
}

#[test]
fn process_ids_go_into_epb_processid_threadid() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("pid.pcapng");
    let mut cap = open(&config(&path), tmp.path());
    let proc_ = curl();
    let meta = PacketMeta { process: Some(&proc_), ..PacketMeta::default() };
    cap.packet(&mixed_traffic()[0], &meta).expect("write packet");
    cap.close(0).expect("close");
    let blocks = read_blocks(&path);
    let (_, epb) = blocks.iter().find(|(t, _)| *t == pcapng::BLOCK_EPB).expect("an EPB");
    let caplen = u32::from_ne_bytes(epb[12..16].try_into().unwrap()) as usize;
    let opts: Vec<_> = pcapng::options(&epb[20 + caplen.next_multiple_of(4)..]).collect();
    let pidtid = opts.iter().find(|(c, _)| *c == pcapng::opt::EPB_PROCESSID_THREADID);
    let mut want = 4242u32.to_ne_bytes().to_vec();
    want.extend_from_slice(&0u32.to_ne_bytes());
    assert_eq!(pidtid.map(|(_, v)| v.to_vec()), Some(want));
}

#[test]
fn the_filter_and_snap_length_apply_and_the_isb_counts_them() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("dns.pcapng");
    let mut cfg = config(&path);
    cfg.filter = Some("udp port 53".into());
    cfg.snaplen = 64;
    let mut cap = open(&cfg, tmp.path());
    let traffic = mixed_traffic();
    for pkt in &traffic {
        cap.packet(pkt, &PacketMeta::default()).expect("write packet");
    }
    let stats = cap.close(5).expect("close capture");
    assert_eq!((stats.received, stats.filtered_out, stats.written), (7, 5, 2));

    let rows = tshark_fields(&path, &[], &["udp.dstport", "frame.cap_len", "frame.len"]);
    let want_len = traffic[2].data.len();
    assert_eq!(rows, [format!("53|64|{want_len}"), format!("40002|64|{}", want_len + 1)]);
    let info = capinfos(&path);
    assert!(info.contains("Capture length = 64"), "{info}");

    let blocks = read_blocks(&path);
    let (_, isb) = blocks.iter().find(|(t, _)| *t == pcapng::BLOCK_ISB).expect("an ISB");
    assert_eq!(isb_option(isb, pcapng::opt::ISB_IFRECV), 7);
    assert_eq!(isb_option(isb, pcapng::opt::ISB_IFDROP), 5);
    assert_eq!(isb_option(isb, pcapng::opt::ISB_FILTERACCEPT), 2);
    assert_eq!(isb_option(isb, pcapng::opt::ISB_USRDELIV), 2);
    let (_, idb) = blocks.iter().find(|(t, _)| *t == pcapng::BLOCK_IDB).expect("an IDB");
    let comment = pcapng::options(&idb[8..]).find(|(c, _)| *c == pcapng::opt::COMMENT);
    assert_eq!(comment.map(|(_, v)| v), Some(&b"capture filter: udp port 53"[..]));
}

#[test]
fn packets_the_backend_filtered_count_as_filtered_out_and_are_not_written() {
    // The rootless engine runs the filter itself and reports a rejected frame without its
    // bytes (`PacketEvent::data` empty, `orig_len` kept).
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("backend-filtered.pcapng");
    let mut cfg = config(&path);
    cfg.filter = Some("not udp".into());
    let mut cap = open(&cfg, tmp.path());
    let traffic = mixed_traffic();
    let mut rejected = traffic[0].clone();
    rejected.data = Default::default();
    cap.packet(&rejected, &PacketMeta::default()).expect("count a filtered packet");
    cap.packet(&traffic[1], &PacketMeta::default()).expect("write packet");
    let stats = cap.close(0).expect("close capture");
    assert_eq!((stats.received, stats.filtered_out, stats.written), (2, 1, 1));
    let blocks = read_blocks(&path);
    let (_, isb) = blocks.iter().find(|(t, _)| *t == pcapng::BLOCK_ISB).expect("an ISB");
    assert_eq!(isb_option(isb, pcapng::opt::ISB_IFRECV), 2);
    assert_eq!(isb_option(isb, pcapng::opt::ISB_FILTERACCEPT), 1);
}

#[test]
fn a_bad_filter_fails_to_open_with_its_column() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut cfg = config(&tmp.path().join("x.pcapng"));
    cfg.filter = Some("tcp and prot 80".into());
    let Err(err) = Capture::open(&cfg, setup(tmp.path())) else { panic!("opened") };
    let text = chain(&err);
    assert!(text.contains("invalid --capture-filter `tcp and prot 80`: at column 9"), "{text}");
    assert!(!tmp.path().join("x.pcapng").exists(), "a file was created for a bad filter");
}

#[test]
fn key_log_lines_go_into_a_dsb_ahead_of_the_packets_buffered_with_them() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("tls.pcapng");
    let mut cfg = config(&path);
    cfg.tls_keylog = true;
    let mut cap = open(&cfg, tmp.path());
    cap.keylog_hold = std::time::Duration::ZERO;
    let keylog = cap.keylog_path().expect("a key log path").to_path_buf();
    let traffic = mixed_traffic();
    cap.packet(&traffic[0], &PacketMeta::default()).expect("write packet");
    cap.flush().expect("flush");
    let line = format!("CLIENT_RANDOM {} {}\n", "ab".repeat(32), "cd".repeat(48));
    std::fs::write(&keylog, &line).expect("write key log");
    cap.packet(&traffic[1], &PacketMeta::default()).expect("write packet");
    cap.flush().expect("flush");
    let stats = cap.close(0).expect("close");
    assert_eq!(stats.secrets, 1);
    assert!(!keylog.exists(), "the key log outlived the capture");

    let types: Vec<u32> = read_blocks(&path).iter().map(|(t, _)| *t).collect();
    use pcapng::*;
    assert_eq!(
        types,
        [BLOCK_SHB, BLOCK_IDB, BLOCK_EPB, BLOCK_DSB, BLOCK_EPB, BLOCK_ISB],
        "the DSB must come before the packet flushed after it"
    );
    let blocks = read_blocks(&path);
    assert_eq!(&blocks[3].1[8..8 + line.len()], line.as_bytes());
    capinfos(&path);
    assert_eq!(tshark_fields(&path, &[], &["frame.number"]).len(), 2);
}

#[test]
fn with_a_key_log_packets_wait_for_secrets_logged_after_they_arrived() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("hold.pcapng");
    let mut cfg = config(&path);
    cfg.tls_keylog = true;
    let mut cap = open(&cfg, tmp.path());
    cap.keylog_hold = std::time::Duration::from_millis(300);
    let keylog = cap.keylog_path().expect("a key log path").to_path_buf();
    let traffic = mixed_traffic();
    let types = |path: &Path| -> Vec<u32> {
        let bytes = std::fs::read(path).expect("read capture");
        pcapng::blocks(&bytes).map(|b| b.block_type).collect()
    };
    use pcapng::*;
    // The server's encrypted first flight arrives; the client logs its secrets just after.
    cap.packet(&traffic[1], &PacketMeta::default()).expect("write packet");
    cap.flush().expect("flush");
    assert_eq!(types(&path), [BLOCK_SHB, BLOCK_IDB], "the packet is held");
    std::fs::write(&keylog, "SERVER_HANDSHAKE_TRAFFIC_SECRET 01 02\n").expect("write key log");
    cap.flush().expect("flush");
    assert_eq!(types(&path), [BLOCK_SHB, BLOCK_IDB, BLOCK_DSB], "secrets go out at once");
    // More secrets of the same handshake a moment later still precede the held packet.
    let mut log = std::fs::OpenOptions::new().append(true).open(&keylog).expect("key log");
    log.write_all(b"CLIENT_HANDSHAKE_TRAFFIC_SECRET 01 03\n").expect("append to key log");
    cap.flush().expect("flush");
    assert_eq!(types(&path), [BLOCK_SHB, BLOCK_IDB, BLOCK_DSB, BLOCK_DSB]);
    // Once it has waited the hold, the packet is written.
    std::thread::sleep(std::time::Duration::from_millis(350));
    cap.flush().expect("flush");
    assert_eq!(types(&path), [BLOCK_SHB, BLOCK_IDB, BLOCK_DSB, BLOCK_DSB, BLOCK_EPB]);
    cap.packet(&traffic[0], &PacketMeta::default()).expect("write packet");
    cap.flush().expect("flush");
    assert_eq!(types(&path).len(), 5, "the next packet is held in turn");
    let stats = cap.close(0).expect("close");
    assert_eq!((stats.written, stats.secrets), (2, 2));
    assert_eq!(types(&path)[5..], [BLOCK_EPB, BLOCK_ISB], "close writes what is held");
    capinfos(&path);
}

#[test]
fn rotation_keeps_a_ring_of_self_contained_files() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let base = tmp.path().join("ring.pcapng");
    let mut cfg = config(&base);
    cfg.max_size = Some(64 * 1024);
    cfg.files = Some(3);
    cfg.tls_keylog = true;
    let mut cap = open(&cfg, tmp.path());
    std::fs::write(cap.keylog_path().expect("key log"), "CLIENT_RANDOM 01 02\n")
        .expect("write key log");
    cap.names(&dns("example.test", &["198.19.0.10"]));
    let payload = [0x5a; 1000];
    for i in 0..400u64 {
        let frame = frames::tcp4("198.18.0.2", 40000, "198.19.0.10", 443, &payload);
        cap.packet(&packet(frame, Direction::Out, i), &PacketMeta::default()).expect("packet");
        if i % 10 == 0 {
            cap.flush().expect("flush");
        }
    }
    let stats = cap.close(0).expect("close");
    let names: Vec<String> =
        stats.files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    let last = names.last().expect("some files").clone();
    let n: u32 = last["ring_".len().."ring_".len() + 5].parse().expect("numbered file");
    assert!(n >= 6, "400 KB in 64 KiB files: {names:?}");
    assert_eq!(
        names,
        (n - 2..=n).map(|i| format!("ring_{i:05}.pcapng")).collect::<Vec<_>>(),
        "only the newest 3 files are kept"
    );
    let mut left: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("list dir")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".pcapng"))
        .collect();
    left.sort();
    assert_eq!(left, names);
    for file in &stats.files {
        let size = std::fs::metadata(file).expect("stat").len();
        assert!(size <= 64 * 1024 + 2048, "{} is {size} bytes", file.display());
        let info = capinfos(file);
        assert!(info.contains("Number of resolved IPv4 addresses in file: 1"), "{info}");
        let types: Vec<u32> = read_blocks(file).iter().map(|(t, _)| *t).collect();
        assert_eq!(
            &types[..4],
            [pcapng::BLOCK_SHB, pcapng::BLOCK_IDB, pcapng::BLOCK_NRB, pcapng::BLOCK_DSB]
        );
        assert_eq!(types.last(), Some(&pcapng::BLOCK_ISB));
    }
}

/// Set in the environment of the test binary re-run as the writer that gets killed.
const KILL_HELPER: &str = "CHILDFLOW_CAPTURE_KILL_HELPER";

/// Not a test on its own: the writer process of
/// `a_killed_writer_leaves_a_file_readable_up_to_its_last_flush`.
#[test]
fn kill_helper_writes_until_killed() {
    let Some(path) = std::env::var_os(KILL_HELPER) else { return };
    let path = PathBuf::from(path);
    let dir = path.parent().expect("capture dir").to_path_buf();
    let mut cap = open(&config(&path), &dir);
    let proc_ = curl();
    let traffic = mixed_traffic();
    let payload = vec![0x5a; 40_000];
    for i in 0u64.. {
        let pkt = &traffic[(i % traffic.len() as u64) as usize];
        let meta = PacketMeta { process: Some(&proc_), ..PacketMeta::default() };
        cap.packet(pkt, &meta).expect("write packet");
        if i % 10 == 0 {
            // Also large packets, written from their buffers to a file on a disk.
            let frame = frames::udp4("198.18.0.2", 5000, "198.19.0.9", 9, &payload);
            let mut large = packet(frame, Direction::Out, i);
            cap.take_packet(&mut large, &meta).expect("write a large packet");
        }
        if i % 100 == 99 {
            cap.flush().expect("flush");
            println!("flushed {}", i + 1);
        }
    }
}

#[test]
fn a_killed_writer_leaves_a_file_readable_up_to_its_last_flush() {
    use std::io::{BufRead, BufReader};
    // On the disk (target/), so that the file is written with O_DIRECT.
    let tmp = disk_dir("killed");
    let path = tmp.path().join("killed.pcapng");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "capture::tests::kill_helper_writes_until_killed", "--nocapture"])
        .env(KILL_HELPER, &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the writer process");
    let stdout = child.stdout.take().expect("writer stdout");
    let mut flushed = 0u64;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read writer output");
        if let Some(n) = line.strip_prefix("flushed ") {
            flushed = n.parse().expect("flushed count");
            if flushed >= 20_000 {
                // SIGKILL: no destructor, no close; whatever was flushed is all there is.
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .expect("kill the writer");
                break;
            }
        }
    }
    let status = child.wait().expect("reap the writer");
    assert!(!status.success(), "the writer was not killed: {status}");
    assert!(flushed >= 20_000, "the writer stopped early at {flushed}");

    let bytes = std::fs::read(&path).expect("read the capture");
    let whole: usize = pcapng::blocks(&bytes).map(|b| b.body.len() + 12).sum();
    let packets = pcapng::blocks(&bytes).filter(|b| b.block_type == pcapng::BLOCK_EPB).count();
    assert!(packets as u64 >= flushed, "{packets} packets on disk, {flushed} were flushed");
    if whole == bytes.len() {
        // Killed between writes (the usual case): the file reads without a complaint.
        let info = capinfos(&path);
        assert!(info.contains(&format!("Number of packets: {packets}")), "{info}");
    } else {
        // Killed inside a write: everything before the cut block still reads.
        std::fs::write(&path, &bytes[..whole]).expect("cut the partial block");
        capinfos(&path);
    }
}

/// A small tmpfs mounted over a directory, unmounted on drop.
struct TmpfsGuard(PathBuf);

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_full_disk_stops_the_capture_with_a_clear_error_and_leaves_a_readable_file() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("small");
    std::fs::create_dir(&dir).expect("mount point");
    nix::mount::mount(
        Some("tmpfs"),
        &dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some("size=128k"),
    )
    .expect("mount a 128k tmpfs");
    let _guard = TmpfsGuard(dir.clone());
    let path = dir.join("full.pcapng");
    let mut cap = open(&config(&path), tmp.path());
    let payload = [7u8; 1400];
    let mut errors = Vec::new();
    for i in 0..1000u64 {
        let frame = frames::udp4("198.18.0.2", 5000, "198.19.0.9", 9, &payload);
        if let Err(e) = cap.packet(&packet(frame, Direction::Out, i), &PacketMeta::default()) {
            errors.push(chain(&e));
        }
        if i % 10 == 9
            && let Err(e) = cap.flush()
        {
            errors.push(chain(&e));
        }
    }
    assert_eq!(errors.len(), 1, "the error is reported once: {errors:?}");
    assert!(errors[0].contains(&format!("failed to write capture file {}", path.display())));
    assert!(errors[0].contains("No space left on device"), "{}", errors[0]);
    let stats = cap.close(0).expect("close after the error is quiet");
    assert!(stats.error.as_deref().is_some_and(|e| e.contains("No space left")), "{stats:?}");
    assert_eq!(stats.received, 1000);
    assert!(stats.lost_after_error > 900, "{stats:?}");
    capinfos(&path);
}

/// Kills and reaps a child process on drop.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An `AF_PACKET` socket on `lo` of the calling thread's network namespace: a stand-in
/// backend that yields the frames of loopback traffic.
struct LoopbackTap(std::os::fd::OwnedFd);

impl LoopbackTap {
    fn open() -> LoopbackTap {
        use std::os::fd::FromRawFd;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket/bind/setsockopt calls on a fresh fd with zeroed structs.
        unsafe {
            let fd =
                libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto.into());
            assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
            let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = libc::if_nametoindex(c"lo".as_ptr()) as i32;
            let rc = libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(rc, 0, "bind AF_PACKET to lo: {}", io::Error::last_os_error());
            let tv = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            LoopbackTap(fd)
        }
    }

    /// The next frame seen arriving on `lo` (each loopback packet also shows up once as
    /// outgoing; those copies are skipped, as libpcap does), or `None` after 50 ms.
    fn next(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65_536];
        loop {
            // SAFETY: recvfrom into buffers we own, with their true sizes.
            let (n, pkttype) = unsafe {
                let mut from: libc::sockaddr_ll = std::mem::zeroed();
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                let n = libc::recvfrom(
                    std::os::fd::AsRawFd::as_raw_fd(&self.0),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut from).cast(),
                    &mut len,
                );
                (n, from.sll_pkttype)
            };
            if n < 0 {
                return None;
            }
            if pkttype != libc::PACKET_OUTGOING {
                buf.truncate(n as usize);
                return Some(buf);
            }
        }
    }
}

/// Runs `program` to completion, failing the test if it fails.
fn run_ok(program: &str, args: &[&str]) {
    let out =
        Command::new(program).args(args).output().unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn tshark_decrypts_tls_with_the_embedded_key_log() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: a private network namespace and AF_PACKET need root");
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().to_path_buf();
    // Everything runs on one thread that moved into a fresh network namespace (only this
    // thread and the processes it starts are in it; it disappears with them).
    std::thread::spawn(move || tls_in_private_netns(&dir))
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

fn tls_in_private_netns(dir: &Path) {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare a network namespace");
    run_ok("ip", &["link", "set", "lo", "up"]);
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let (cert, key) = (cert.to_str().expect("utf-8"), key.to_str().expect("utf-8"));
    run_ok(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=example.test",
            "-days",
            "1",
            "-keyout",
            key,
            "-out",
            cert,
        ],
    );
    let tap = LoopbackTap::open();
    let _server = ChildGuard(
        Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept", "127.0.0.1:443", "-cert", cert])
            .args(["-key", key])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start openssl s_server"),
    );
    let listening = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        std::net::TcpStream::connect("127.0.0.1:443").is_ok()
    });
    assert!(listening, "openssl s_server did not start");
    while tap.next().is_some() {} // the probe connections are not part of the capture

    let path = dir.join("tls.pcapng");
    let mut cfg = config(&path);
    cfg.tls_keylog = true;
    let mut cap = open(&cfg, dir);
    let keylog = cap.keylog_path().expect("key log").to_path_buf();
    let mut client = ChildGuard(
        Command::new("curl")
            .args(["-sk", "--http1.1", "--max-time", "10", "-o", "/dev/null"])
            .arg("https://127.0.0.1:443/childflow-secret-path")
            .env("SSLKEYLOGFILE", &keylog)
            .spawn()
            .expect("start curl"),
    );
    // The collector's loop: take what arrived, then flush (which reads the key log first).
    let mut quiet_after_exit = 0;
    while quiet_after_exit < 3 {
        let mut got = false;
        while let Some(frame) = tap.next() {
            got = true;
            let to_server = frame.len() > 38 && frame[36..38] == 443u16.to_be_bytes();
            let direction = if to_server { Direction::Out } else { Direction::In };
            let event = PacketEvent {
                ts: now_unix_nanos(),
                direction,
                orig_len: frame.len() as u32,
                data: frame.into(),
            };
            cap.packet(&event, &PacketMeta::default()).expect("write packet");
            if event.ts.is_multiple_of(4) {
                break; // vary batch boundaries
            }
        }
        cap.flush().expect("flush");
        let exited = client.0.try_wait().expect("poll curl").is_some();
        if exited && !got {
            quiet_after_exit += 1;
        }
    }
    let status = client.0.wait().expect("reap curl");
    assert!(status.success(), "curl failed: {status}");
    let stats = cap.close(0).expect("close");
    assert!(stats.secrets >= 2, "no TLS secrets were embedded: {stats:?}");

    capinfos(&path);
    let uris = tshark_fields(&path, &["-Y", "http.request"], &["http.request.uri"]);
    assert_eq!(uris, ["/childflow-secret-path"], "tshark did not decrypt the request");
    let no_keys = path.with_file_name("plain.pcapng");
    run_ok(
        "editcap",
        &["--discard-all-secrets", path.to_str().unwrap(), no_keys.to_str().unwrap()],
    );
    let plain = tshark_fields(&no_keys, &["-Y", "http.request"], &["http.request.uri"]);
    assert!(plain.is_empty(), "decrypted without the secrets? {plain:?}");
}

/// After a write that ran out of space part-way, the file keeps the whole blocks that got
/// out and loses only the block that was cut (and what followed), so readers see every
/// packet that fit.
#[test]
fn a_cut_write_keeps_the_whole_blocks_before_it() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("cut.pcapng");
    let mut bytes = Vec::new();
    pcapng::section_header(&mut bytes, &section_info(None));
    let header = bytes.len() as u64;
    let options = PacketOptions { flags: pcapng::EPB_FLAG_INBOUND, process: None, comments: &[] };
    for n in 0..3u64 {
        pcapng::enhanced_packet(&mut bytes, 0, T0 + n, &[0x55; 100], 100, &options);
    }
    let whole = bytes.len();
    pcapng::enhanced_packet(&mut bytes, 0, T0 + 3, &[0x55; 100], 100, &options);
    bytes.truncate(whole + 40);
    std::fs::write(&path, &bytes).expect("write the cut file");
    let out = Output::Plain(File::open(&path).expect("open the cut file"));
    let (kept, packets) = out.keep_whole_blocks(&path, header).expect("cut back");
    assert_eq!((header + kept, packets), (whole as u64, 3));
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), whole as u64);
}

/// Large packets to a plain file (tmpfs) are written around the buffer with `writev`
/// instead of copied into it: the file holds the same blocks, in order, with every byte
/// of every packet, and tshark reads them.
#[test]
fn large_packets_gathered_into_a_plain_file_read_back_whole() {
    let tmp = tempfile::tempdir_in("/dev/shm").expect("temp dir on tmpfs");
    let path = tmp.path().join("gather.pcapng");
    let mut cap = open(&config(&path), tmp.path());
    let proc_ = curl();
    let mut sent = Vec::new();
    for i in 0..40u64 {
        // Small and large packets interleaved, large ones above GATHER_MIN.
        let len = if i % 3 == 0 { 100 } else { GATHER_MIN + 1 + i as usize };
        let payload: Vec<u8> = (0..len).map(|b| (b as u64 + i) as u8).collect();
        let frame = frames::udp4("198.18.0.2", 40000, "198.19.0.10", 9000, &payload);
        let pkt = packet(frame, Direction::Out, i);
        let meta = PacketMeta { process: Some(&proc_), ..PacketMeta::default() };
        cap.packet(&pkt, &meta).expect("write packet");
        sent.push(pkt.data);
    }
    let stats = cap.close(0).expect("close capture");
    assert_eq!(stats.written, 40);
    let epbs: Vec<Vec<u8>> = read_blocks(&path)
        .into_iter()
        .filter(|(t, _)| *t == pcapng::BLOCK_EPB)
        .map(|(_, body)| {
            let len = u32::from_ne_bytes(body[12..16].try_into().expect("captured length"));
            body[20..20 + len as usize].to_vec()
        })
        .collect();
    assert_eq!(epbs, sent);
    assert!(capinfos(&path).contains("Number of packets: 40"), "{}", capinfos(&path));
    let lens = tshark_fields(&path, &[], &["frame.len"]);
    assert_eq!(lens.len(), 40);
}

/// A scratch directory on the disk the tests build on (target/), where capture files are
/// written with `O_DIRECT` (the system temp dir may be a tmpfs).
fn disk_dir(name: &str) -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    tempfile::Builder::new()
        .prefix(&format!("cf-capture-{name}-"))
        .tempdir_in(base)
        .expect("create the scratch directory")
}

/// The packets of a classic pcap file (what `editcap -F pcap` writes), in order.
fn pcap_packets(bytes: &[u8]) -> Vec<Vec<u8>> {
    let u32_at = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("u32"));
    assert!(matches!(u32_at(0), 0xa1b2_c3d4 | 0xa1b2_3c4d), "native-order pcap magic");
    let (mut at, mut out) = (24, Vec::new());
    while at + 16 <= bytes.len() {
        let len = u32_at(at + 8) as usize;
        out.push(bytes[at + 16..at + 16 + len].to_vec());
        at += 16 + len;
    }
    out
}

/// Large packets handed over with their buffers ([`Capture::take_packet`]) go to a file on
/// a disk from those buffers, behind padding blocks, between small ones that are copied,
/// with their comments: the file reads without a warning, has one frame per packet, and
/// every byte of every packet comes back, both from our block parser and through
/// Wireshark's reader (`editcap` to a classic pcap).
#[test]
fn large_packets_written_from_their_buffers_read_back_whole() {
    let tmp = disk_dir("zero-copy");
    let path = tmp.path().join("direct.pcapng");
    let mut cap = open(&config(&path), tmp.path());
    let direct = cap.is_direct();
    let proc_ = curl();
    let mut sent = Vec::new();
    for i in 0..300u64 {
        let len = match i % 4 {
            0 => 40,
            1 => direct::ZERO_COPY_MIN + i as usize * 131,
            _ => 64_000 + i as usize % 1000,
        };
        let payload: Vec<u8> = (0..len).map(|b| (b as u64 * 13 + i) as u8).collect();
        let mut pkt = packet(
            frames::tcp4("198.18.0.2", 40000, "198.19.0.10", 443, &payload),
            Direction::Out,
            i,
        );
        sent.push(pkt.data.clone());
        let meta = PacketMeta {
            interface: 0,
            community_id: Some("1:LQU9qZlK+B5F3KDmev6m5PMibrg="),
            first_of_flow: i % 50 == 1,
            process: (i % 3 == 0).then_some(&proc_),
        };
        cap.take_packet(&mut pkt, &meta).expect("write packet");
        if i % 40 == 39 {
            cap.flush().expect("flush");
        }
    }
    let stats = cap.close(0).expect("close capture");
    assert_eq!((stats.received, stats.written), (300, 300));

    let blocks = read_blocks(&path);
    let padding = blocks.iter().filter(|(t, _)| *t == pcapng::BLOCK_PADDING).count();
    if direct {
        assert!(padding > 100, "only {padding} packets went out from their buffers");
    } else {
        eprintln!("the file system under target/ refuses O_DIRECT: packets were copied");
    }
    let epbs: Vec<Vec<u8>> = blocks
        .iter()
        .filter(|(t, _)| *t == pcapng::BLOCK_EPB)
        .map(|(_, body)| {
            let len = u32::from_ne_bytes(body[12..16].try_into().expect("captured length"));
            body[20..20 + len as usize].to_vec()
        })
        .collect();
    assert!(epbs == sent, "the packets in the file differ from those sent");

    let info = capinfos(&path);
    assert!(info.contains("Number of packets: 300"), "{info}");
    let comments = tshark_fields(&path, &[], &["frame.comment"]);
    assert_eq!(comments.len(), 300);
    assert!(comments[1].contains("community_id 1:LQU9"), "{}", comments[1]);
    assert!(comments[3].contains("process curl (pid 4242"), "{}", comments[3]);
    let pcap = tmp.path().join("direct.pcap");
    tool("editcap", &["-F", "pcap", path.to_str().expect("utf-8"), pcap.to_str().expect("utf-8")]);
    let through_wireshark = pcap_packets(&std::fs::read(&pcap).expect("read the pcap"));
    assert!(through_wireshark == sent, "Wireshark reads other bytes than were sent");
}

/// Unmounts and detaches a loop-mounted file system on drop.
struct LoopMount {
    dir: PathBuf,
    device: String,
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// A full disk while large packets are written from their buffers by the writer thread
/// (a small ext4 on a loop device, so the file is written with `O_DIRECT`): the error is
/// reported once, the file keeps the whole blocks that got out and reads without a
/// warning, and every packet is either in it or counted as lost.
#[test]
fn a_full_disk_under_direct_writes_keeps_what_fit() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: a loop device needs root");
        return;
    }
    let tmp = disk_dir("full-direct");
    let image = tmp.path().join("fs.img");
    std::fs::File::create(&image).and_then(|f| f.set_len(8 << 20)).expect("image file");
    run_ok("mkfs.ext4", &["-q", "-F", "-b", "4096", image.to_str().expect("utf-8")]);
    let out = Command::new("losetup")
        .args(["--find", "--show", "--direct-io=on", image.to_str().expect("utf-8")])
        .output()
        .expect("run losetup");
    assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
    let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dir = tmp.path().join("mnt");
    std::fs::create_dir(&dir).expect("mount point");
    let guard = LoopMount { dir: dir.clone(), device: device.clone() };
    nix::mount::mount(
        Some(device.as_str()),
        &dir,
        Some("ext4"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount the loop ext4");
    let path = dir.join("full.pcapng");
    let mut cap = open(&config(&path), tmp.path());
    assert!(cap.is_direct(), "a file on ext4 is written with O_DIRECT");
    let mut errors = Vec::new();
    for i in 0..400u64 {
        let len = if i % 5 == 0 { 100 } else { 60_000 };
        let frame = frames::udp4("198.18.0.2", 5000, "198.19.0.9", 9, &vec![i as u8; len]);
        let mut pkt = packet(frame, Direction::Out, i);
        if let Err(e) = cap.take_packet(&mut pkt, &PacketMeta::default()) {
            errors.push(chain(&e));
        }
        if i % 10 == 9
            && let Err(e) = cap.flush()
        {
            errors.push(chain(&e));
        }
    }
    assert_eq!(errors.len(), 1, "the error is reported once: {errors:?}");
    assert!(errors[0].contains("No space left on device"), "{}", errors[0]);
    let stats = cap.close(0).expect("close after the error is quiet");
    let on_disk = read_blocks(&path).iter().filter(|(t, _)| *t == pcapng::BLOCK_EPB).count();
    assert!(on_disk > 50, "only {on_disk} packets fit");
    assert_eq!(on_disk as u64 + stats.lost_after_error, 400, "{stats:?}");
    assert!(capinfos(&path).contains(&format!("Number of packets: {on_disk}")));
    drop(guard);
}
