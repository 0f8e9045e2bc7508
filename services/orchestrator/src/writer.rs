//! The single writer: state changes of every execution go through one task that batches them into
//! one transaction (group commit). Once a commit is durable it publishes the commit's events to
//! watchers and reports the commit's number to its driver, which waits for that number before
//! anything that depends on the change.

use std::sync::Arc;

use meshflow_execution::store::{Commit, CommitOutcome, Store};
use tokio::sync::{mpsc, watch};

use crate::hub::Hub;

/// Most commits in one transaction.
const MAX_BATCH: usize = 512;

/// How far the commits of one driver, numbered 1, 2, 3, … in the order it queued them, are durable.
#[derive(Debug, Clone, Default)]
pub struct Durable {
    /// Every commit numbered up to this one is durable.
    pub upto: u64,
    /// Set once a commit of the driver was refused: none queued after it is written.
    pub failure: Option<Failure>,
}

/// Why a driver's commit was refused.
#[derive(Debug, Clone)]
pub enum Failure {
    /// Another replica holds the execution's lease.
    LeaseLost,
    /// The database failed.
    Storage(String),
}

/// Where the writer reports a driver's progress.
pub type Tracker = Arc<watch::Sender<Durable>>;

/// A queued commit's number and where to report it. One dropped before it was reported (the writer
/// stopped) reports a failure, so its driver never waits for nothing.
struct Waiter {
    number: u64,
    tracker: Tracker,
    reported: bool,
}

impl Waiter {
    fn done(mut self) {
        self.reported = true;
        let number = self.number;
        self.tracker.send_if_modified(|d| {
            let later = number > d.upto;
            if later {
                d.upto = number;
            }
            later
        });
    }

    fn refuse(mut self, failure: Failure) {
        self.reported = true;
        refuse(&self.tracker, failure);
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if !self.reported {
            refuse(&self.tracker, Failure::Storage("the writer stopped".into()));
        }
    }
}

/// A handle to the writer task.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<(Waiter, Commit)>,
}

impl Writer {
    /// Starts the writer task on `runtime`.
    pub fn spawn(store: Store, hub: Arc<Hub>, runtime: &tokio::runtime::Handle) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        runtime.spawn(run(store, hub, rx));
        Self { tx }
    }

    /// Queues commit number `number` of the driver that `tracker` reports on. Commits are written
    /// in the order they are queued, and once one commit of a driver is refused, every later one is
    /// too, so a driver that pipelines its commits never leaves a gap: a commit durable means every
    /// one before it is.
    pub fn submit(&self, number: u64, tracker: &Tracker, commit: Commit) {
        let waiter = Waiter {
            number,
            tracker: tracker.clone(),
            reported: false,
        };
        // A send to a stopped writer drops the waiter, which reports the failure.
        let _ = self.tx.send((waiter, commit));
    }
}

fn refuse(tracker: &Tracker, failure: Failure) {
    tracker.send_if_modified(|d| {
        let first = d.failure.is_none();
        if first {
            d.failure = Some(failure);
        }
        first
    });
}

async fn run(store: Store, hub: Arc<Hub>, mut rx: mpsc::UnboundedReceiver<(Waiter, Commit)>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let Some(first) = rx.recv().await else {
            return;
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // Refuse commits of drivers that already had one refused; the rest go in one transaction.
        let mut waiting = Vec::with_capacity(batch.len());
        let mut commits = Vec::with_capacity(batch.len());
        for (mut waiter, commit) in batch.drain(..) {
            if waiter.tracker.borrow().failure.is_none() {
                waiting.push(waiter);
                commits.push(commit);
            } else {
                // Its driver already heard of the failure.
                waiter.reported = true;
            }
        }
        if commits.is_empty() {
            continue;
        }
        let started = std::time::Instant::now();
        // The store stamps each event with the time of its group commit.
        let result = store.commit(&mut commits).await;
        tracing::debug!(
            commits = commits.len(),
            micros = started.elapsed().as_micros() as u64,
            "group commit"
        );
        match result {
            Ok(outcomes) => {
                // Watchers receive each live event with the time its commit returned.
                let commit_time = meshflow_kit::convert::timestamp(chrono::Utc::now());
                for ((waiter, commit), outcome) in waiting.into_iter().zip(commits).zip(outcomes) {
                    if outcome == CommitOutcome::Done {
                        hub.publish(&commit.execution_id, commit.events, commit_time);
                        waiter.done();
                    } else {
                        waiter.refuse(Failure::LeaseLost);
                    }
                }
            }
            Err(err) => {
                tracing::error!(error = %err, commits = commits.len(), "group commit failed");
                for waiter in waiting {
                    waiter.refuse(Failure::Storage(err.to_string()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(number: u64, tracker: &Tracker) -> Waiter {
        Waiter {
            number,
            tracker: tracker.clone(),
            reported: false,
        }
    }

    #[test]
    fn durability_only_moves_forward() {
        let tracker: Tracker = Arc::new(watch::channel(Durable::default()).0);
        waiter(3, &tracker).done();
        waiter(2, &tracker).done();
        assert_eq!(tracker.borrow().upto, 3);
        assert!(tracker.borrow().failure.is_none());
    }

    #[test]
    fn a_commit_the_writer_dropped_is_reported_as_failed() {
        let tracker: Tracker = Arc::new(watch::channel(Durable::default()).0);
        drop(waiter(1, &tracker));
        assert!(matches!(
            tracker.borrow().failure,
            Some(Failure::Storage(_))
        ));
        // The first failure stands.
        waiter(2, &tracker).refuse(Failure::LeaseLost);
        assert!(matches!(
            tracker.borrow().failure,
            Some(Failure::Storage(_))
        ));
    }
}
