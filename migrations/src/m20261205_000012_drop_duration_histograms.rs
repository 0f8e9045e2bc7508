//! Metrics rows no longer keep a histogram of durations: GetWorkflowMetrics reports exact
//! percentiles from the durations of the retained history, and nothing read the histogram since.
//! Dropping it takes its bucket-by-bucket sums out of every group commit.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum OrchestrationMetrics {
    Table,
    DurationHistogram,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(OrchestrationMetrics::Table)
                    .drop_column(OrchestrationMetrics::DurationHistogram)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(OrchestrationMetrics::Table)
                    .add_column(
                        ColumnDef::new(OrchestrationMetrics::DurationHistogram)
                            .json_binary()
                            .not_null()
                            .default(Expr::value("[]")),
                    )
                    .to_owned(),
            )
            .await
    }
}
