//! The single writer: state changes of every execution go through one task that batches them into
//! one transaction (group commit), acknowledges each commit once it is durable, and only then
//! publishes its events to watchers. A driver never acts on a change before its acknowledgement.

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

/// A handle to the writer task.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<(u64, Tracker, Commit)>,
}

impl Writer {
    /// Starts the writer task.
    pub fn spawn(store: Store, hub: Arc<Hub>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, hub, rx));
        Self { tx }
    }

    /// Queues commit number `number` of the driver that `tracker` reports on. Commits are written
    /// in the order they are queued, and once one commit of a driver is refused, every later one is
    /// too, so a driver that pipelines its commits never leaves a gap: a commit durable means every
    /// one before it is.
    pub fn submit(&self, number: u64, tracker: &Tracker, commit: Commit) {
        if self.tx.send((number, tracker.clone(), commit)).is_err() {
            refuse(tracker, Failure::Storage("the writer has stopped".into()));
        }
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

async fn run(store: Store, hub: Arc<Hub>, mut rx: mpsc::UnboundedReceiver<(u64, Tracker, Commit)>) {
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
        for (number, tracker, commit) in batch.drain(..) {
            if tracker.borrow().failure.is_none() {
                waiting.push((number, tracker));
                commits.push(commit);
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
                for (((number, tracker), commit), outcome) in
                    waiting.into_iter().zip(commits).zip(outcomes)
                {
                    if outcome == CommitOutcome::Done {
                        hub.publish(&commit.execution_id, commit.events);
                        tracker.send_if_modified(|d| {
                            let later = number > d.upto;
                            if later {
                                d.upto = number;
                            }
                            later
                        });
                    } else {
                        refuse(&tracker, Failure::LeaseLost);
                    }
                }
            }
            Err(err) => {
                tracing::error!(error = %err, commits = commits.len(), "group commit failed");
                for (_, tracker) in waiting {
                    refuse(&tracker, Failure::Storage(err.to_string()));
                }
            }
        }
    }
}
