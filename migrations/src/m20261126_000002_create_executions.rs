//! Execution records: executions, step attempts, the event log, signals and per-workflow metrics.

use crate::index;
use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum WorkflowVersions {
    Table,
    WorkflowId,
    Version,
}

#[derive(DeriveIden)]
enum Workflows {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum WorkflowExecutions {
    Table,
    Id,
    WorkflowId,
    WorkflowVersion,
    Status,
    Input,
    Variables,
    Output,
    Error,
    RequestId,
    LastSequence,
    LeaseOwner,
    LeaseExpiresAt,
    WakeAt,
    DeadlineAt,
    CreateTime,
    StartTime,
    EndTime,
    UpdateTime,
}

#[derive(DeriveIden)]
enum StepExecutions {
    Table,
    Id,
    ExecutionId,
    StepId,
    StepPath,
    StepType,
    Status,
    Attempt,
    Input,
    Output,
    Error,
    Logs,
    StartTime,
    EndTime,
    DurationMs,
    NextAttemptAt,
}

#[derive(DeriveIden)]
enum ExecutionEvents {
    Table,
    ExecutionId,
    Sequence,
    Time,
    EventType,
    StepPath,
    Payload,
}

#[derive(DeriveIden)]
enum ExecutionSignals {
    Table,
    Id,
    ExecutionId,
    Name,
    Payload,
    RequestId,
    ReceiveTime,
    ConsumedBy,
}

#[derive(DeriveIden)]
enum OrchestrationMetrics {
    Table,
    WorkflowId,
    StepId,
    Total,
    Active,
    Completed,
    Failed,
    Cancelled,
    TimedOut,
    Skipped,
    Attempts,
    DurationHistogram,
    UpdateTime,
}

fn cascade_to_execution(name: &str, from: impl IntoIden) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .name(name)
        .from_tbl(from.into_iden())
        .from_col(Alias::new("execution_id"))
        .to(WorkflowExecutions::Table, WorkflowExecutions::Id)
        .on_delete(ForeignKeyAction::Cascade)
        .to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(WorkflowExecutions::Table)
                    .col(string(WorkflowExecutions::Id).primary_key())
                    .col(string(WorkflowExecutions::WorkflowId))
                    .col(big_integer(WorkflowExecutions::WorkflowVersion))
                    .col(string(WorkflowExecutions::Status))
                    .col(json_binary(WorkflowExecutions::Input))
                    .col(json_binary(WorkflowExecutions::Variables))
                    .col(json_binary_null(WorkflowExecutions::Output))
                    .col(json_binary_null(WorkflowExecutions::Error))
                    .col(string_null(WorkflowExecutions::RequestId).unique_key())
                    .col(big_integer(WorkflowExecutions::LastSequence))
                    .col(string_null(WorkflowExecutions::LeaseOwner))
                    .col(timestamp_with_time_zone_null(
                        WorkflowExecutions::LeaseExpiresAt,
                    ))
                    .col(timestamp_with_time_zone_null(WorkflowExecutions::WakeAt))
                    .col(timestamp_with_time_zone_null(
                        WorkflowExecutions::DeadlineAt,
                    ))
                    .col(timestamp_with_time_zone(WorkflowExecutions::CreateTime))
                    .col(timestamp_with_time_zone_null(WorkflowExecutions::StartTime))
                    .col(timestamp_with_time_zone_null(WorkflowExecutions::EndTime))
                    .col(timestamp_with_time_zone(WorkflowExecutions::UpdateTime))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_workflow_executions_version")
                            .from(
                                WorkflowExecutions::Table,
                                (
                                    WorkflowExecutions::WorkflowId,
                                    WorkflowExecutions::WorkflowVersion,
                                ),
                            )
                            .to(
                                WorkflowVersions::Table,
                                (WorkflowVersions::WorkflowId, WorkflowVersions::Version),
                            )
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        for (name, columns) in [
            (
                "idx_workflow_executions_workflow_id",
                vec![
                    WorkflowExecutions::WorkflowId,
                    WorkflowExecutions::CreateTime,
                ],
            ),
            (
                "idx_workflow_executions_status",
                vec![WorkflowExecutions::Status],
            ),
            (
                "idx_workflow_executions_create_time",
                vec![WorkflowExecutions::CreateTime],
            ),
            (
                "idx_workflow_executions_wake_at",
                vec![WorkflowExecutions::WakeAt],
            ),
            (
                "idx_workflow_executions_lease",
                vec![WorkflowExecutions::LeaseExpiresAt],
            ),
        ] {
            manager
                .create_index(index(name, WorkflowExecutions::Table, columns))
                .await?;
        }

        manager
            .create_table(
                Table::create()
                    .table(StepExecutions::Table)
                    .col(string(StepExecutions::Id).primary_key())
                    .col(string(StepExecutions::ExecutionId))
                    .col(string(StepExecutions::StepId))
                    .col(string(StepExecutions::StepPath))
                    .col(string(StepExecutions::StepType))
                    .col(string(StepExecutions::Status))
                    .col(integer(StepExecutions::Attempt))
                    .col(json_binary_null(StepExecutions::Input))
                    .col(json_binary_null(StepExecutions::Output))
                    .col(json_binary_null(StepExecutions::Error))
                    .col(json_binary(StepExecutions::Logs))
                    .col(timestamp_with_time_zone_null(StepExecutions::StartTime))
                    .col(timestamp_with_time_zone_null(StepExecutions::EndTime))
                    .col(big_integer_null(StepExecutions::DurationMs))
                    .col(timestamp_with_time_zone_null(StepExecutions::NextAttemptAt))
                    .foreign_key(&mut cascade_to_execution(
                        "fk_step_executions_execution",
                        StepExecutions::Table,
                    ))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                index(
                    "uq_step_executions_attempt",
                    StepExecutions::Table,
                    [
                        StepExecutions::ExecutionId,
                        StepExecutions::StepPath,
                        StepExecutions::Attempt,
                    ],
                )
                .unique()
                .to_owned(),
            )
            .await?;
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
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(ExecutionEvents::Table)
                    .col(string(ExecutionEvents::ExecutionId))
                    .col(big_integer(ExecutionEvents::Sequence))
                    .col(timestamp_with_time_zone(ExecutionEvents::Time))
                    .col(string(ExecutionEvents::EventType))
                    .col(string_null(ExecutionEvents::StepPath))
                    .col(json_binary(ExecutionEvents::Payload))
                    .primary_key(
                        Index::create()
                            .col(ExecutionEvents::ExecutionId)
                            .col(ExecutionEvents::Sequence),
                    )
                    .foreign_key(&mut cascade_to_execution(
                        "fk_execution_events_execution",
                        ExecutionEvents::Table,
                    ))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(ExecutionSignals::Table)
                    .col(string(ExecutionSignals::Id).primary_key())
                    .col(string(ExecutionSignals::ExecutionId))
                    .col(string(ExecutionSignals::Name))
                    .col(json_binary(ExecutionSignals::Payload))
                    .col(string_null(ExecutionSignals::RequestId))
                    .col(timestamp_with_time_zone(ExecutionSignals::ReceiveTime))
                    .col(string_null(ExecutionSignals::ConsumedBy))
                    .foreign_key(&mut cascade_to_execution(
                        "fk_execution_signals_execution",
                        ExecutionSignals::Table,
                    ))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                index(
                    "uq_execution_signals_request",
                    ExecutionSignals::Table,
                    [ExecutionSignals::ExecutionId, ExecutionSignals::RequestId],
                )
                .unique()
                .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "idx_execution_signals_name",
                ExecutionSignals::Table,
                [ExecutionSignals::ExecutionId, ExecutionSignals::Name],
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(OrchestrationMetrics::Table)
                    .col(string(OrchestrationMetrics::WorkflowId))
                    .col(string(OrchestrationMetrics::StepId))
                    .col(big_integer(OrchestrationMetrics::Total))
                    .col(big_integer(OrchestrationMetrics::Active))
                    .col(big_integer(OrchestrationMetrics::Completed))
                    .col(big_integer(OrchestrationMetrics::Failed))
                    .col(big_integer(OrchestrationMetrics::Cancelled))
                    .col(big_integer(OrchestrationMetrics::TimedOut))
                    .col(big_integer(OrchestrationMetrics::Skipped))
                    .col(big_integer(OrchestrationMetrics::Attempts))
                    .col(json_binary(OrchestrationMetrics::DurationHistogram))
                    .col(timestamp_with_time_zone(OrchestrationMetrics::UpdateTime))
                    .primary_key(
                        Index::create()
                            .col(OrchestrationMetrics::WorkflowId)
                            .col(OrchestrationMetrics::StepId),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_orchestration_metrics_workflow")
                            .from(
                                OrchestrationMetrics::Table,
                                OrchestrationMetrics::WorkflowId,
                            )
                            .to(Workflows::Table, Workflows::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(OrchestrationMetrics::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(ExecutionSignals::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(ExecutionEvents::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(StepExecutions::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(WorkflowExecutions::Table).to_owned())
            .await?;
        Ok(())
    }
}
