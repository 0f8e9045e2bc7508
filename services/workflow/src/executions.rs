//! What deleting a workflow needs to know of its executions, which the execution crate owns: the
//! binary passes an implementation over the execution records, so this crate never reads them.

/// The executions of workflows, as deleting a workflow sees them.
#[tonic::async_trait]
pub trait Executions: Send + Sync {
    /// The ids of the workflow's executions that have not ended, oldest first.
    async fn active(&self, workflow_id: &str) -> Result<Vec<String>, String>;

    /// Asks each execution to cancel with `reason`; the engine that drives it ends it as
    /// CANCELLED, as CancelExecution would.
    async fn cancel(&self, execution_ids: &[String], reason: &str) -> Result<(), String>;
}
