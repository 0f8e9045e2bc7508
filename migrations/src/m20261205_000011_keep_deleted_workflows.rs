//! Deleting a workflow keeps its history. A deleted workflow's row stays, marked with its
//! `delete_time`, so its versions, its executions (with their steps, events and signals) and its
//! metrics, which all refer to it, stay readable until retention removes them. Reads of workflows
//! skip marked rows; the deletion frees the name.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::timestamp_with_time_zone_null;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Workflows {
    Table,
    DeleteTime,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Workflows::Table)
                    .add_column(timestamp_with_time_zone_null(Workflows::DeleteTime))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Workflows::Table)
                    .drop_column(Workflows::DeleteTime)
                    .to_owned(),
            )
            .await
    }
}
