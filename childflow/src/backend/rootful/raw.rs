//! `CHILDFLOW_RAW_EVENTS=PATH`: every event the backend emits, one JSON object per line.
//!
//! A debugging and testing aid (the integration tests read it to check accounting and
//! attribution before the flow log exists), not a stable format: the flow log is that.

use std::{
    ffi::OsStr,
    fs::File,
    io::{BufWriter, Write},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::event::{Event, FlowPhase};

pub struct RawEvents {
    out: BufWriter<File>,
}

impl RawEvents {
    pub fn create(path: &OsStr) -> Result<RawEvents> {
        let file = File::create(path)
            .with_context(|| format!("failed to create {}", path.to_string_lossy()))?;
        Ok(RawEvents { out: BufWriter::new(file) })
    }

    pub fn write(&mut self, ev: &Event) {
        let _ = serde_json::to_writer(&mut self.out, &to_json(ev));
        let _ = self.out.write_all(b"\n");
        // Flushed per event: a test may read the file while childflow is being killed.
        let _ = self.out.flush();
    }
}

fn to_json(ev: &Event) -> Value {
    match ev {
        Event::Flow(f) => {
            let (phase, reason) = match f.phase {
                FlowPhase::Start => ("start", Value::Null),
                FlowPhase::Update => ("update", Value::Null),
                FlowPhase::End(r) => ("end", serde_json::to_value(r).unwrap_or(Value::Null)),
            };
            json!({
                "type": "flow",
                "phase": phase,
                "reason": reason,
                "proto": f.key.proto,
                "key": f.key.to_string(),
                "local": f.key.local().to_string(),
                "remote": f.key.remote().to_string(),
                "packets": f.stats.packets,
                "bytes": f.stats.bytes,
                "payload_bytes": f.stats.payload_bytes,
                "first_ns": f.stats.first_ns,
                "last_ns": f.stats.last_ns,
                "history": String::from_utf8_lossy(f.stats.history()),
            })
        }
        Event::Process(p) => json!({
            "type": "process",
            "proto": p.key.proto,
            "key": p.key.to_string(),
            "local": p.key.local().to_string(),
            "remote": p.key.remote().to_string(),
            "process": p.process,
        }),
        Event::Dns(d) => json!({
            "type": "dns",
            "ts": d.ts,
            "server": d.server.to_string(),
            "transport": d.transport,
            "query": d.query,
            "qtype": d.qtype,
            "rcode": d.rcode,
            "answers": d.answers,
        }),
        Event::Packet(p) => json!({
            "type": "packet",
            "ts": p.ts,
            "direction": p.direction,
            "orig_len": p.orig_len,
            "cap_len": p.data.len(),
        }),
        Event::Drops(d) => json!({ "type": "drops", "source": d.source, "count": d.count }),
    }
}
