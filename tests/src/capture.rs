//! An independent capture for tests to compare childflow's counts with: dumpcap (tshark's
//! capture engine), optionally inside another process's network namespace.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Stdio},
    time::Duration,
};

/// A running dumpcap; [`Dumpcap::stop`] ends it with SIGINT so it writes out everything.
pub struct Dumpcap(Child);

impl Dumpcap {
    /// Starts dumpcap on `iface` writing `file`, in the network namespace of `netns_of`
    /// (a pid) or in ours; returns once it is capturing.
    pub fn start(iface: &str, file: &Path, netns_of: Option<u32>) -> Dumpcap {
        let mut cmd = match netns_of {
            Some(pid) => {
                let mut c = crate::tool("nsenter");
                c.args(["-t", &pid.to_string(), "-n", "dumpcap"]);
                c
            }
            None => crate::tool("dumpcap"),
        };
        let mut child = cmd
            .args(["-i", iface, "-B", "64", "-q", "-w"])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while !line.contains("Capturing on") {
            line.clear();
            assert!(err.read_line(&mut line).unwrap() > 0, "dumpcap ended before capturing");
        }
        // dumpcap says so slightly before its socket sees packets.
        std::thread::sleep(Duration::from_millis(500));
        // Keep draining stderr so dumpcap never blocks on it.
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        Dumpcap(child)
    }

    /// Lets the last packets arrive, then stops the capture and waits for the file.
    pub fn stop(mut self) {
        std::thread::sleep(Duration::from_millis(300));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        self.0.wait().unwrap();
    }
}

/// `tshark -r file -n -Y filter -T fields -e ...`, one Vec per packet.
pub fn tshark_fields(file: &Path, filter: &str, fields: &[&str]) -> Vec<Vec<String>> {
    let mut cmd = crate::tool("tshark");
    cmd.arg("-r").arg(file).args(["-n", "-Y", filter, "-T", "fields"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "tshark: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

/// The bytes of the HTTP stream from port 80 a capture holds, each counted once: the union
/// of the segments' sequence ranges (per TCP stream). A retransmission adds nothing, also
/// one tshark calls out of order (on two CPUs, the veth can reorder a bulk transfer, and
/// the receiver's duplicate ACKs then make the sender resend).
pub fn http_payload(capture: &Path) -> u64 {
    let fields = ["tcp.stream", "tcp.seq", "tcp.len"];
    let mut ranges: Vec<(u64, u64, u64)> = tshark_fields(capture, "tcp.srcport == 80", &fields)
        .iter()
        .map(|l| {
            let n = |i: usize| l[i].parse::<u64>().unwrap();
            (n(0), n(1), n(1) + n(2))
        })
        .collect();
    ranges.sort_unstable();
    // (stream, the sequence number its segments so far reach).
    let (mut covered, mut reached) = (0, None::<(u64, u64)>);
    for (stream, start, end) in ranges {
        let from = match reached {
            Some((s, r)) if s == stream => start.max(r),
            _ => start,
        };
        covered += end.saturating_sub(from);
        reached = Some((stream, from.max(end)));
    }
    covered
}
