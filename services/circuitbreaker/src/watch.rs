//! Transitions for watchers on every replica. The history table is the source: this replica's own
//! transitions are announced as they are written, and a poll every interval reads those other
//! replicas wrote. Each is published once, with the breaker as read just after.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use meshflow_proto::circuitbreaker::v1 as pb;
use tokio::sync::{Notify, broadcast};

use crate::convert;
use crate::store::{Recorded, Store};

/// How far back each poll reads again: on PostgreSQL a transition may commit after one with a
/// larger id, so ids below the highest seen are read again (and skipped when already published).
const OVERLAP: i64 = 256;

/// Published transitions, fanned out to watchers.
pub struct Hub {
    store: Store,
    sender: broadcast::Sender<Arc<pb::CircuitBreakerTransition>>,
    /// Ids published recently (within [`OVERLAP`] of the highest).
    seen: Mutex<Seen>,
    kick: Arc<Notify>,
}

/// What was published: every id at or below `floor`, and `ids` above it.
#[derive(Default)]
struct Seen {
    floor: i64,
    ids: BTreeSet<i64>,
}

impl Hub {
    /// A hub over `store`, publishing from the transitions after the latest one now stored.
    pub async fn start(store: Store, poll: Duration) -> Result<Arc<Self>, crate::StoreError> {
        let highest = store.last_transition().await?;
        let hub = Arc::new(Self {
            store,
            sender: broadcast::channel(1024).0,
            seen: Mutex::new(Seen {
                floor: highest,
                ids: BTreeSet::new(),
            }),
            kick: Arc::new(Notify::new()),
        });
        tokio::spawn(Self::poll_loop(Arc::downgrade(&hub), poll));
        Ok(hub)
    }

    /// Every transition published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<pb::CircuitBreakerTransition>> {
        self.sender.subscribe()
    }

    /// Asks for a poll now: this replica just wrote transitions.
    pub fn announce(&self) {
        self.kick.notify_one();
    }

    async fn poll_loop(hub: std::sync::Weak<Self>, poll: Duration) {
        loop {
            let Some(h) = hub.upgrade() else { return };
            if let Err(err) = h.poll_once().await {
                tracing::warn!(error = %err, "reading circuit breaker transitions failed");
            }
            let kick = h.kick.clone();
            drop(h);
            let _ = tokio::time::timeout(poll, kick.notified()).await;
        }
    }

    async fn poll_once(&self) -> Result<(), crate::StoreError> {
        let from = self.lock().floor;
        let rows = self.store.transitions_after(from, 10_000).await?;
        let fresh: Vec<Recorded> = {
            let mut seen = self.lock();
            let fresh: Vec<Recorded> = rows
                .into_iter()
                .filter(|r| r.id > seen.floor && !seen.ids.contains(&r.id))
                .collect();
            seen.ids.extend(fresh.iter().map(|r| r.id));
            let highest = seen.ids.last().copied().unwrap_or(seen.floor);
            seen.floor = seen.floor.max(highest - OVERLAP);
            let floor = seen.floor;
            seen.ids = seen.ids.split_off(&(floor + 1));
            fresh
        };
        for r in fresh {
            let after = self.store.get(&r.service_id).await?;
            let now = self.store.clock().now();
            let message = convert::transition(
                &r.service_id,
                &r.transition,
                after.map(|s| convert::breaker(&s, now)),
            );
            let _ = self.sender.send(Arc::new(message));
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
