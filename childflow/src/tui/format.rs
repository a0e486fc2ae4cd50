//! Compact, fixed-width renderings of sizes, rates and durations for narrow table columns.

/// `999B`, `1.2K`, `34K`, `1.5M`, `12G`: at most 5 characters, binary multiples.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if v < 9.95 { format!("{v:.1}{}", UNITS[unit]) } else { format!("{:.0}{}", v, UNITS[unit]) }
}

/// A rate in bytes per second, `0` when idle: `512B/s`, `1.2K/s`.
pub fn rate(bytes_per_sec: f64) -> String {
    if bytes_per_sec < 0.5 {
        "0".into()
    } else {
        format!("{}/s", bytes(bytes_per_sec.round() as u64))
    }
}

/// A duration in nanoseconds: `0s`, `42s`, `3m05s`, `2h07m`, `3d04h`.
pub fn duration(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// A clock reading for the elapsed time in the header: `00:42`, `1:02:03`.
pub fn clock(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    if s < 3600 {
        format!("{:02}:{:02}", s / 60, s % 60)
    } else {
        format!("{}:{:02}:{:02}", s / 3600, (s % 3600) / 60, s % 60)
    }
}

/// `n` with thousands separators: `1,234,567`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_fit_five_columns() {
        assert_eq!(bytes(0), "0B");
        assert_eq!(bytes(1023), "1023B");
        assert_eq!(bytes(1024), "1.0K");
        assert_eq!(bytes(1536), "1.5K");
        assert_eq!(bytes(10 * 1024), "10K");
        assert_eq!(bytes(1023 * 1024), "1023K");
        assert_eq!(bytes(5 << 30), "5.0G");
        assert_eq!(rate(0.2), "0");
        assert_eq!(rate(2048.0), "2.0K/s");
    }

    #[test]
    fn durations_and_counts() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(185_000_000_000), "3m05s");
        assert_eq!(duration(7_620_000_000_000), "2h07m");
        assert_eq!(clock(42_000_000_000), "00:42");
        assert_eq!(clock(3_723_000_000_000), "1:02:03");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(count(999), "999");
    }
}
