//! JSON Lines (<https://jsonlines.org>): one [`Record`] per line, flushed as it is written so
//! `tail -f flows.jsonl | jq` sees every record as soon as it exists.

use std::io::{self, Write};

use super::schema::RecordRef;

/// Writes records as JSON Lines to `W`.
pub struct JsonlWriter<W: Write> {
    out: W,
    line: Vec<u8>,
}

impl<W: Write> JsonlWriter<W> {
    pub fn new(out: W) -> Self {
        JsonlWriter { out, line: Vec::with_capacity(1024) }
    }

    /// Writes one record and its newline in one `write_all`, then flushes, so a reader never
    /// sees half a line unless the disk filled up in between.
    pub fn write(&mut self, record: RecordRef<'_>) -> io::Result<()> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, &record).map_err(io::Error::other)?;
        self.line.push(b'\n');
        self.out.write_all(&self.line)?;
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::schema::fixtures::sample_run;

    #[test]
    fn one_record_per_line() {
        let (dns, flows) = sample_run();
        let mut w = JsonlWriter::new(Vec::new());
        w.write(RecordRef::Dns(&dns[0])).unwrap();
        for f in &flows {
            w.write(RecordRef::Flow(f)).unwrap();
        }
        let text = String::from_utf8(w.into_inner()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + flows.len());
        assert!(lines[0].starts_with(r#"{"record":"dns","#), "{}", lines[0]);
        assert!(lines[1].starts_with(r#"{"record":"flow","event":"end","uid":1,"#), "{}", lines[1]);
        assert!(text.ends_with('\n'));
    }
}
