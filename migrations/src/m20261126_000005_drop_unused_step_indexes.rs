//! Step attempts are read by execution (the unique `(execution_id, step_path, attempt)` index), never
//! by status or step id alone. Those two indexes only cost pages on every attempt written.

use crate::index;
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum StepExecutions {
    Table,
    StepId,
    Status,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for name in ["idx_step_executions_status", "idx_step_executions_step_id"] {
            manager
                .drop_index(
                    Index::drop()
                        .name(name)
                        .table(StepExecutions::Table)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(index(
                "idx_step_executions_status",
                StepExecutions::Table,
                [StepExecutions::Status],
            ))
            .await?;
        manager
            .create_index(index(
                "idx_step_executions_step_id",
                StepExecutions::Table,
                [StepExecutions::StepId],
            ))
            .await
    }
}
