//! Live fan-out of committed events to watchers: a bounded channel per watcher of an execution.
//! Publishing never waits; a watcher that falls behind loses its channel and reads the rest from
//! history instead, so a slow client never slows an execution.
//!
//! A channel per watcher, rather than one broadcast ring per execution, lets the last watcher of an
//! execution take the published events themselves: the usual single watcher receives each event
//! without a copy, and an event leaves memory once sent, where a ring keeps it until overwritten.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use meshflow_proto::execution::v1::{EventType, ExecutionEvent};
use meshflow_proto::pbjson_types::Timestamp;
use tokio::sync::mpsc;

/// Live events buffered per watcher before it is considered lagging (it then reads the rest from
/// history). A channel allocates its slots in blocks as they fill, not all at once.
const CAPACITY: usize = 256;

/// A subscription to the live events of one execution. It ends (`recv` gives `None`) when the
/// watcher fell [`CAPACITY`] events behind: what it missed is in history, and a new subscription
/// taken before reading history misses nothing after it.
pub type Live = mpsc::Receiver<Published>;

/// An event as published: once the commit that wrote it returned.
#[derive(Debug, Clone)]
pub struct Published {
    pub event: ExecutionEvent,
    /// When that commit returned.
    pub commit_time: Timestamp,
}

/// The watchers of each watched execution.
#[derive(Default)]
pub struct Hub {
    channels: Mutex<HashMap<String, Vec<mpsc::Sender<Published>>>>,
}

impl Hub {
    /// Receives events of `execution_id` committed from now on.
    pub fn subscribe(&self, execution_id: &str) -> Live {
        let (tx, rx) = mpsc::channel(CAPACITY);
        self.channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(execution_id.to_string())
            .or_default()
            .push(tx);
        rx
    }

    /// Publishes committed events, in order, to every watcher of `execution_id`. A watcher whose
    /// channel is full or gone is dropped. After the execution's terminal event every watcher is
    /// dropped: each still receives what was sent to it, then its channel ends. Kept until the next
    /// sweep instead, the channels of finished executions held their buffers for seconds, tens of
    /// megabytes under load.
    pub fn publish(&self, execution_id: &str, events: Vec<ExecutionEvent>, commit_time: Timestamp) {
        let Some(last) = events.last() else {
            return;
        };
        let finished = is_terminal_event(last);
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(watchers) = channels.get_mut(execution_id) else {
            return;
        };
        // Every watcher but the last gets copies; the last takes the events.
        let published = |event| Published { event, commit_time };
        let last = watchers.pop();
        watchers.retain(|tx| {
            events
                .iter()
                .all(|e| tx.try_send(published(e.clone())).is_ok())
        });
        if let Some(tx) = last
            && events
                .into_iter()
                .all(|e| tx.try_send(published(e)).is_ok())
        {
            watchers.push(tx);
        }
        if finished || watchers.is_empty() {
            channels.remove(execution_id);
        }
    }

    /// Forgets watchers that are gone.
    pub fn sweep(&self) {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        channels.retain(|_, watchers| {
            watchers.retain(|tx| !tx.is_closed());
            !watchers.is_empty()
        });
    }
}

/// Whether an event ends its execution's stream.
pub(crate) fn is_terminal_event(e: &ExecutionEvent) -> bool {
    matches!(
        EventType::try_from(e.r#type),
        Ok(EventType::ExecutionCompleted
            | EventType::ExecutionFailed
            | EventType::ExecutionCancelled
            | EventType::ExecutionTimedOut)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: i64) -> ExecutionEvent {
        ExecutionEvent {
            sequence,
            ..Default::default()
        }
    }

    fn drain(live: &mut Live) -> Vec<i64> {
        std::iter::from_fn(|| live.try_recv().ok())
            .map(|p| p.event.sequence)
            .collect()
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp { seconds, nanos: 0 }
    }

    #[test]
    fn every_watcher_receives_every_event_in_order() {
        let hub = Hub::default();
        let mut a = hub.subscribe("x");
        let mut b = hub.subscribe("x");
        let mut other = hub.subscribe("y");
        hub.publish("x", vec![event(1), event(2)], at(1));
        hub.publish("x", vec![event(3)], at(2));
        assert_eq!(drain(&mut a), [1, 2, 3]);
        assert_eq!(drain(&mut other), Vec::<i64>::new());
        // Each event carries the time its commit returned.
        let received: Vec<_> = std::iter::from_fn(|| b.try_recv().ok())
            .map(|p| (p.event.sequence, p.commit_time.seconds))
            .collect();
        assert_eq!(received, [(1, 1), (2, 1), (3, 2)]);
    }

    #[test]
    fn a_watcher_that_falls_behind_is_dropped_and_the_others_keep_receiving() {
        let hub = Hub::default();
        let mut slow = hub.subscribe("x");
        let mut fast = hub.subscribe("x");
        let mut sent = 0;
        while sent < CAPACITY as i64 + 5 {
            sent += 1;
            hub.publish("x", vec![event(sent)], at(1));
            assert_eq!(drain(&mut fast), [sent]);
        }
        // The slow one kept what fitted, then its channel ended.
        let kept = drain(&mut slow);
        assert_eq!(kept, (1..=CAPACITY as i64).collect::<Vec<_>>());
        assert!(matches!(
            slow.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        hub.publish("x", vec![event(sent + 1)], at(1));
        assert_eq!(drain(&mut fast), [sent + 1]);
    }

    #[test]
    fn an_executions_watchers_are_forgotten_once_its_terminal_event_is_published() {
        let hub = Hub::default();
        let mut a = hub.subscribe("x");
        let mut b = hub.subscribe("x");
        let terminal = ExecutionEvent {
            sequence: 2,
            r#type: EventType::ExecutionCompleted as i32,
            ..Default::default()
        };
        hub.publish("x", vec![event(1)], at(1));
        assert_eq!(hub.channels.lock().expect("lock").len(), 1);
        hub.publish("x", vec![terminal], at(1));
        assert!(hub.channels.lock().expect("lock").is_empty());
        // Each watcher still receives every event, then its channel ends.
        for live in [&mut a, &mut b] {
            assert_eq!(drain(live), [1, 2]);
            assert!(matches!(
                live.try_recv(),
                Err(mpsc::error::TryRecvError::Disconnected)
            ));
        }
    }

    #[test]
    fn an_execution_without_watchers_is_forgotten() {
        let hub = Hub::default();
        let live = hub.subscribe("x");
        drop(live);
        hub.publish("x", vec![event(1)], at(1));
        assert!(hub.channels.lock().expect("lock").is_empty());
        let kept = hub.subscribe("y");
        let gone = hub.subscribe("z");
        drop(gone);
        hub.sweep();
        assert_eq!(
            hub.channels
                .lock()
                .expect("lock")
                .keys()
                .collect::<Vec<_>>(),
            ["y"]
        );
        drop(kept);
    }
}
