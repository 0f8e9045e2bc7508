//! Signals not yet consumed are looked up on every poll (a safety net for wake-ups a racing commit
//! erased). Consumed signals stay as history, so the lookup needs an index of the pending ones only.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ExecutionSignals {
    Table,
    ExecutionId,
    ConsumedBy,
}

const NAME: &str = "idx_execution_signals_pending";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name(NAME)
                    .table(ExecutionSignals::Table)
                    .col(ExecutionSignals::ExecutionId)
                    .and_where(Expr::col(ExecutionSignals::ConsumedBy).is_null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name(NAME)
                    .table(ExecutionSignals::Table)
                    .to_owned(),
            )
            .await
    }
}
