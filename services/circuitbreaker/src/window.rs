//! The time-based sliding window: the outcomes of the last `window`, in [`BUCKETS`] buckets of
//! `window / BUCKETS` each. A bucket is dropped whole once it has left the window, so the window
//! spans between `window − bucket` and `window` of history; twelve buckets of a 60 s window are
//! 5 s each.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Buckets per window.
pub const BUCKETS: i64 = 12;

/// Counts of one bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Start of the bucket, milliseconds since the epoch, a multiple of the bucket length.
    pub start: i64,
    /// Calls recorded.
    pub calls: i64,
    /// Failed calls.
    pub failed: i64,
    /// Slow calls.
    pub slow: i64,
}

/// Totals of a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Calls recorded.
    pub calls: i64,
    /// Failed calls.
    pub failed: i64,
    /// Slow calls.
    pub slow: i64,
}

/// The buckets of a window, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Length of a bucket in milliseconds.
    pub bucket_ms: i64,
    /// The buckets that may still be in the window, oldest first.
    pub buckets: Vec<Bucket>,
}

impl Window {
    /// An empty window of length `window`.
    pub fn new(window: Duration) -> Self {
        let ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        Self {
            bucket_ms: (ms / BUCKETS).max(1),
            buckets: Vec::new(),
        }
    }

    fn bucket_start(&self, at: DateTime<Utc>) -> i64 {
        let ms = at.timestamp_millis();
        ms - ms.rem_euclid(self.bucket_ms)
    }

    /// Whether the bucket starting at `start` is still in the window at `now`.
    fn live(&self, start: i64, now: DateTime<Utc>) -> bool {
        start > self.bucket_start(now) - BUCKETS * self.bucket_ms
    }

    /// Adds counts at `now`, dropping the buckets that have left the window.
    pub fn add(&mut self, now: DateTime<Utc>, calls: i64, failed: i64, slow: i64) {
        self.expire(now);
        let start = self.bucket_start(now);
        match self.buckets.iter_mut().find(|b| b.start == start) {
            Some(b) => {
                b.calls += calls;
                b.failed += failed;
                b.slow += slow;
            }
            None => {
                self.buckets.push(Bucket {
                    start,
                    calls,
                    failed,
                    slow,
                });
                self.buckets.sort_by_key(|b| b.start);
            }
        }
    }

    /// Adds another window's buckets (a replica's batch) that are still live at `now`.
    pub fn merge(&mut self, other: &Window, now: DateTime<Utc>) {
        for b in &other.buckets {
            if self.live(b.start, now) {
                let at = DateTime::<Utc>::from_timestamp_millis(b.start).unwrap_or(now);
                self.add(at, b.calls, b.failed, b.slow);
            }
        }
        self.expire(now);
    }

    /// Drops the buckets that have left the window at `now`.
    pub fn expire(&mut self, now: DateTime<Utc>) {
        let keep: Vec<Bucket> = self
            .buckets
            .iter()
            .copied()
            .filter(|b| self.live(b.start, now))
            .collect();
        self.buckets = keep;
    }

    /// The totals of the buckets in the window at `now`.
    pub fn totals(&self, now: DateTime<Utc>) -> Totals {
        self.buckets
            .iter()
            .filter(|b| self.live(b.start, now))
            .fold(Totals::default(), |t, b| Totals {
                calls: t.calls + b.calls,
                failed: t.failed + b.failed,
                slow: t.slow + b.slow,
            })
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.buckets.iter().all(|b| b.calls == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).expect("time")
    }

    #[test]
    fn buckets_leave_the_window_whole() {
        let mut w = Window::new(Duration::from_secs(60));
        assert_eq!(w.bucket_ms, 5_000);
        w.add(at(1_000), 1, 1, 0);
        w.add(at(4_999), 1, 0, 1);
        w.add(at(5_000), 1, 0, 0);
        assert_eq!(w.buckets.len(), 2);
        assert_eq!(
            w.totals(at(59_999)),
            Totals {
                calls: 3,
                failed: 1,
                slow: 1
            }
        );
        // The first bucket (0–5 s) leaves when the bucket of 60–65 s begins.
        assert_eq!(w.totals(at(60_000)).calls, 1);
        assert_eq!(w.totals(at(65_000)).calls, 0);
        w.add(at(70_000), 1, 1, 0);
        assert_eq!(w.buckets.len(), 1, "expired buckets are dropped");
    }

    #[test]
    fn merged_counts_keep_their_buckets() {
        let mut shared = Window::new(Duration::from_secs(60));
        shared.add(at(10_000), 2, 1, 0);
        let mut batch = Window::new(Duration::from_secs(60));
        batch.add(at(12_000), 3, 3, 0);
        batch.add(at(21_000), 1, 0, 0);
        shared.merge(&batch, at(21_500));
        assert_eq!(shared.buckets.len(), 2);
        assert_eq!(
            shared.totals(at(21_500)),
            Totals {
                calls: 6,
                failed: 4,
                slow: 0
            }
        );
    }
}
