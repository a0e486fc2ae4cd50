//! `CHILDFLOW_TRACE_STARTUP=1`: the rootful start-up's phases with their times, on stderr.
//!
//! Each [`phase!`] also goes to the debug log (`-vv`); with the variable set it is printed
//! as `childflow startup: +12.3 ms  <phase>  (unix <wall clock>)` (from the backend's
//! first phase), from whichever thread reaches it, so the critical path through
//! the overlapping threads (loader, verifiers, nft, netlink, tc) reads directly off the
//! list. It costs one `Instant` read per phase when off.

use std::{sync::OnceLock, time::Instant};

/// The first phase's time, and whether to print.
static START: OnceLock<(Instant, bool)> = OnceLock::new();

/// Records that the start-up reached `what`.
pub fn record(what: std::fmt::Arguments<'_>) {
    let (start, print) = *START.get_or_init(|| {
        let on = std::env::var_os("CHILDFLOW_TRACE_STARTUP").is_some_and(|v| v != "0");
        (Instant::now(), on)
    });
    if print {
        let elapsed = start.elapsed();
        let ms = elapsed.as_secs_f64() * 1e3;
        // The wall clock too, so a caller can place the phases between its own spawn and
        // wait (what lies outside the backend: exec, main, the collector's end, exit).
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        // One write per line: stderr is unbuffered, and `eprintln!` wrote each piece of the
        // format on its own, a system call (and a wake-up of whoever reads the pipe) each.
        let line = format!("childflow startup: {ms:>+7.1} ms  {what}  (unix {unix:.6})\n");
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }
    tracing::debug!("{what}");
}

/// `phase!("…", args)`: [`record`] with `format_args!`.
macro_rules! phase {
    ($($arg:tt)*) => {
        $crate::backend::rootful::startup::record(format_args!($($arg)*))
    };
}
pub(crate) use phase;
