//! Rates and counter timelines, derived from successive [`Snapshot`]s.
//!
//! Snapshots carry cumulative counters only; this module keeps, per flow and for the whole
//! run, a bounded ring of `(time, bytes out, bytes in)` samples. The current rate is the
//! counter growth over the last [`RATE_WINDOW`] (so it does not jump with the snapshot
//! cadence), and the timeline is the per-interval rate between consecutive samples.
//!
//! Invariants: memory is bounded ([`FLOW_SAMPLES`] per flow, [`RUN_SAMPLES`] for the run);
//! a flow's ring is dropped when the flow leaves the snapshot; a snapshot older than the
//! last one observed is ignored, so a replayed or reordered snapshot never makes a negative
//! rate.

use std::collections::{HashMap, VecDeque};

use super::model::Snapshot;
use crate::event::UnixNanos;

/// Samples kept per flow (the detail view's timeline).
pub const FLOW_SAMPLES: usize = 64;
/// Samples kept for the whole run (the header's chart).
pub const RUN_SAMPLES: usize = 256;
/// The current rate is averaged over this much time.
pub const RATE_WINDOW: u64 = 1_000_000_000;

/// Bytes per second each way.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rate {
    pub out: f64,
    pub r#in: f64,
}

impl Rate {
    pub fn total(self) -> f64 {
        self.out + self.r#in
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sample {
    ts: UnixNanos,
    out: u64,
    r#in: u64,
}

/// A bounded ring of cumulative counter samples.
#[derive(Clone, Debug)]
pub struct Series {
    samples: VecDeque<Sample>,
    cap: usize,
}

impl Series {
    fn new(cap: usize, baseline: Sample) -> Self {
        let mut samples = VecDeque::with_capacity(cap.min(8));
        samples.push_back(baseline);
        Self { samples, cap }
    }

    fn push(&mut self, sample: Sample) {
        if self.samples.len() == self.cap {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// The growth over the last [`RATE_WINDOW`], in bytes per second.
    pub fn rate(&self) -> Rate {
        let Some(last) = self.samples.back() else { return Rate::default() };
        let since = last.ts.saturating_sub(RATE_WINDOW);
        // The newest sample at or before the window start, else the oldest we have.
        let first = self.samples.iter().rev().find(|s| s.ts <= since).or(self.samples.front());
        let Some(first) = first else { return Rate::default() };
        let dt = last.ts.saturating_sub(first.ts);
        if dt == 0 {
            return Rate::default();
        }
        let per_sec = |d: u64| d as f64 * 1e9 / dt as f64;
        Rate {
            out: per_sec(last.out.saturating_sub(first.out)),
            r#in: per_sec(last.r#in.saturating_sub(first.r#in)),
        }
    }

    /// The rate between each pair of consecutive samples, oldest first.
    pub fn timeline(&self) -> Vec<Rate> {
        let v: Vec<&Sample> = self.samples.iter().collect();
        v.windows(2)
            .map(|w| {
                let dt = w[1].ts.saturating_sub(w[0].ts).max(1) as f64;
                Rate {
                    out: w[1].out.saturating_sub(w[0].out) as f64 * 1e9 / dt,
                    r#in: w[1].r#in.saturating_sub(w[0].r#in) as f64 * 1e9 / dt,
                }
            })
            .collect()
    }
}

/// Rates and timelines of the run and of each flow in the latest snapshot.
#[derive(Clone, Debug, Default)]
pub struct History {
    last_ts: Option<UnixNanos>,
    run: Option<Series>,
    flows: HashMap<u64, Series>,
}

impl History {
    /// Takes in the counters of `snap`.
    pub fn observe(&mut self, snap: &Snapshot) {
        if self.last_ts.is_some_and(|t| snap.ts <= t) {
            return;
        }
        // A flow first seen now had zero bytes at the previous snapshot (or at its start).
        let baseline_ts = self.last_ts.unwrap_or(snap.run.started);
        self.last_ts = Some(snap.ts);
        let run_sample =
            Sample { ts: snap.ts, out: snap.totals.bytes_out, r#in: snap.totals.bytes_in };
        match &mut self.run {
            Some(series) => series.push(run_sample),
            None => {
                let start = Sample { ts: snap.run.started.min(snap.ts), out: 0, r#in: 0 };
                let mut series = Series::new(RUN_SAMPLES, start);
                series.push(run_sample);
                self.run = Some(series);
            }
        }
        let mut seen = HashMap::with_capacity(snap.flows.len());
        for flow in &snap.flows {
            let sample = Sample { ts: snap.ts, out: flow.bytes_out, r#in: flow.bytes_in };
            let series = match self.flows.remove(&flow.id) {
                Some(mut s) => {
                    s.push(sample);
                    s
                }
                None => {
                    let ts = baseline_ts.max(flow.first_seen.saturating_sub(1)).min(snap.ts - 1);
                    let mut s = Series::new(FLOW_SAMPLES, Sample { ts, out: 0, r#in: 0 });
                    s.push(sample);
                    s
                }
            };
            seen.insert(flow.id, series);
        }
        self.flows = seen;
    }

    /// The current rate of flow `id` (zero if unknown).
    pub fn rate(&self, id: u64) -> Rate {
        self.flows.get(&id).map(Series::rate).unwrap_or_default()
    }

    /// The flow's timeline, if it is in the latest snapshot.
    pub fn flow(&self, id: u64) -> Option<&Series> {
        self.flows.get(&id)
    }

    /// The whole run's series, once a snapshot was observed.
    pub fn run(&self) -> Option<&Series> {
        self.run.as_ref()
    }

    /// The whole run's current rate.
    pub fn run_rate(&self) -> Rate {
        self.run.as_ref().map(Series::rate).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tui::model::fixtures::*;

    #[test]
    fn a_flow_growing_steadily_has_that_rate() {
        let mut h = History::default();
        h.observe(&snapshot(2, vec![established_flow(1)]));
        h.observe(&snapshot(3, vec![grown(established_flow(1), 2)]));
        h.observe(&snapshot(4, vec![grown(established_flow(1), 3)]));
        let rate = h.rate(1);
        assert_eq!(rate.out, 1_000.0, "1000 bytes more out each second");
        assert_eq!(rate.r#in, 20_000.0);
        assert_eq!(h.run_rate(), rate, "the run is this one flow");
    }

    #[test]
    fn a_new_flow_counts_from_the_previous_snapshot() {
        let mut h = History::default();
        h.observe(&snapshot(2, vec![]));
        h.observe(&snapshot(4, vec![established_flow(1)]));
        assert_eq!(h.rate(1).out, 500.0, "1000 bytes over the 2 s since the last snapshot");
    }

    #[test]
    fn an_old_snapshot_is_ignored_and_gone_flows_are_forgotten() {
        let mut h = History::default();
        h.observe(&snapshot(3, vec![established_flow(1)]));
        h.observe(&snapshot(4, vec![grown(established_flow(1), 2)]));
        h.observe(&snapshot(2, vec![]));
        assert!(h.flow(1).is_some(), "the stale snapshot changed nothing");
        h.observe(&snapshot(5, vec![]));
        assert!(h.flow(1).is_none());
        assert_eq!(h.rate(1), Rate::default());
    }

    #[test]
    fn the_ring_is_bounded_and_the_timeline_has_one_rate_per_interval() {
        let mut h = History::default();
        for s in 1..=(FLOW_SAMPLES as u64 + 10) {
            h.observe(&snapshot(s, vec![grown(established_flow(1), s)]));
        }
        let timeline = h.flow(1).unwrap().timeline();
        assert_eq!(timeline.len(), FLOW_SAMPLES - 1);
        assert!(timeline.iter().all(|r| r.out == 1_000.0), "{timeline:?}");
    }
}
