//! Live fan-out of committed events to watchers: a bounded broadcast channel per watched execution.
//! Publishing never waits; a watcher that falls behind loses live events and reads them back from
//! history instead, so a slow client never slows an execution.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use meshflow_proto::execution::v1::ExecutionEvent;
use tokio::sync::broadcast;

/// Live events buffered per execution before a watcher is considered lagging (it then reads the
/// rest from history). Every watched execution allocates and initialises all of them when its
/// first watcher subscribes.
const CAPACITY: usize = 256;

/// Per-execution broadcast channels, created when someone watches.
#[derive(Default)]
pub struct Hub {
    channels: Mutex<HashMap<String, broadcast::Sender<Arc<ExecutionEvent>>>>,
}

impl Hub {
    /// Receives events of `execution_id` committed from now on.
    pub fn subscribe(&self, execution_id: &str) -> broadcast::Receiver<Arc<ExecutionEvent>> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        channels
            .entry(execution_id.to_string())
            .or_insert_with(|| broadcast::channel(CAPACITY).0)
            .subscribe()
    }

    /// Publishes committed events; drops the channel once nobody listens.
    pub fn publish(&self, execution_id: &str, events: Vec<ExecutionEvent>) {
        if events.is_empty() {
            return;
        }
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(tx) = channels.get(execution_id) else {
            return;
        };
        for event in events {
            // No receiver left: forget the channel.
            if tx.send(Arc::new(event)).is_err() {
                channels.remove(execution_id);
                return;
            }
        }
    }

    /// Forgets channels without receivers.
    pub fn sweep(&self) {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        channels.retain(|_, tx| tx.receiver_count() > 0);
    }
}
