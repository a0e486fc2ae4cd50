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
