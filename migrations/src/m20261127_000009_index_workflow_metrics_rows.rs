//! Every start counts the executions that are not terminal against the concurrency limit, summing
//! the `active` counter of each workflow's own metrics row (`step_id = ''`). Without an index the
//! sum read every row of the table, one per step of every workflow besides the workflow's own; this
//! partial index holds the workflow rows only. Its columns are never updated (a commit sets the
//! counters), so writing a metrics row never writes the index.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum OrchestrationMetrics {
    Table,
    WorkflowId,
    StepId,
}

const NAME: &str = "idx_orchestration_metrics_workflow_rows";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name(NAME)
                    .table(OrchestrationMetrics::Table)
                    .col(OrchestrationMetrics::WorkflowId)
                    .and_where(Expr::col(OrchestrationMetrics::StepId).eq(""))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name(NAME)
                    .table(OrchestrationMetrics::Table)
                    .to_owned(),
            )
            .await
    }
}
