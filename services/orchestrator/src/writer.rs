//! The single writer: state changes of every execution go through one task that batches them into
//! one transaction (group commit), acknowledges each commit once it is durable, and only then
//! publishes its events to watchers. A driver never acts on a change before its acknowledgement.

use std::collections::HashSet;
use std::sync::Arc;

use meshflow_execution::store::{Commit, CommitOutcome, Store};
use tokio::sync::{mpsc, oneshot};

use crate::hub::Hub;

/// Most commits in one transaction.
const MAX_BATCH: usize = 512;

/// What a commit came to.
pub type Ack = Result<CommitOutcome, String>;

/// A handle to the writer task.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<(u64, Commit, oneshot::Sender<Ack>)>,
}

impl Writer {
    /// Starts the writer task.
    pub fn spawn(store: Store, hub: Arc<Hub>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, hub, rx));
        Self { tx }
    }

    /// Queues a commit of the driver `token`; the receiver resolves once it is durable (or refused).
    /// Commits are written in the order they are queued. Once one commit of a driver fails, every later
    /// one of that driver is refused, so a driver that pipelines its commits never leaves a gap.
    pub fn submit(&self, token: u64, commit: Commit) -> oneshot::Receiver<Ack> {
        let (ack, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError((_, _, ack))) = self.tx.send((token, commit, ack)) {
            let _ = ack.send(Err("the writer has stopped".into()));
        }
        rx
    }
}

async fn run(
    store: Store,
    hub: Arc<Hub>,
    mut rx: mpsc::UnboundedReceiver<(u64, Commit, oneshot::Sender<Ack>)>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut poisoned: HashSet<u64> = HashSet::new();
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
        // Refuse commits of drivers that already had one fail; the rest go in one transaction.
        let mut waiting = Vec::with_capacity(batch.len());
        let mut commits = Vec::with_capacity(batch.len());
        for (token, commit, ack) in batch.drain(..) {
            if poisoned.contains(&token) {
                let _ = ack.send(Err("an earlier change of this execution failed".into()));
            } else {
                waiting.push((token, ack));
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
                for (((token, ack), commit), outcome) in
                    waiting.into_iter().zip(commits).zip(outcomes)
                {
                    if outcome == CommitOutcome::Done {
                        hub.publish(&commit.execution_id, commit.events);
                    } else {
                        poisoned.insert(token);
                    }
                    let _ = ack.send(Ok(outcome));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, commits = commits.len(), "group commit failed");
                for (token, ack) in waiting {
                    poisoned.insert(token);
                    let _ = ack.send(Err(err.to_string()));
                }
            }
        }
        if poisoned.len() > 100_000 {
            poisoned.clear();
        }
    }
}
