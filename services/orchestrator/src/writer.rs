//! The single writer: state changes of every execution go through one task that batches them into
//! one transaction (group commit), acknowledges each commit once it is durable, and only then
//! publishes its events to watchers. A driver never acts on a change before its acknowledgement.

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
    tx: mpsc::UnboundedSender<(Commit, oneshot::Sender<Ack>)>,
}

impl Writer {
    /// Starts the writer task.
    pub fn spawn(store: Store, hub: Arc<Hub>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, hub, rx));
        Self { tx }
    }

    /// Queues a commit; the receiver resolves once it is durable (or refused).
    /// Commits queued by one task are written in the order they were queued.
    pub fn submit(&self, commit: Commit) -> oneshot::Receiver<Ack> {
        let (ack, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError((_, ack))) = self.tx.send((commit, ack)) {
            let _ = ack.send(Err("the writer has stopped".into()));
        }
        rx
    }
}

async fn run(
    store: Store,
    hub: Arc<Hub>,
    mut rx: mpsc::UnboundedReceiver<(Commit, oneshot::Sender<Ack>)>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let commits: Vec<Commit> = batch.iter().map(|(c, _)| c.clone()).collect();
        match store.commit(&commits).await {
            Ok(outcomes) => {
                for ((commit, ack), outcome) in batch.drain(..).zip(outcomes) {
                    if outcome == CommitOutcome::Done {
                        hub.publish(&commit.execution_id, commit.events);
                    }
                    let _ = ack.send(Ok(outcome));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, commits = batch.len(), "group commit failed");
                for (_, ack) in batch.drain(..) {
                    let _ = ack.send(Err(err.to_string()));
                }
            }
        }
    }
}
