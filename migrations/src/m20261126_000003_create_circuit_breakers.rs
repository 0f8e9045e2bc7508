//! Circuit breakers: one shared, compare-and-set row per downstream service.

use crate::index;
use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum CircuitBreakers {
    Table,
    ServiceId,
    Config,
    State,
    Generation,
    Version,
    StateEnteredAt,
    OpenUntil,
    ConsecutiveOpens,
    HalfOpenInFlight,
    HalfOpenSuccesses,
    HalfOpenFailures,
    Buckets,
    NotPermittedCalls,
    UpdateTime,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(CircuitBreakers::Table)
                    .col(string(CircuitBreakers::ServiceId).primary_key())
                    .col(json_binary(CircuitBreakers::Config))
                    .col(string(CircuitBreakers::State))
                    .col(big_integer(CircuitBreakers::Generation))
                    .col(big_integer(CircuitBreakers::Version))
                    .col(timestamp_with_time_zone(CircuitBreakers::StateEnteredAt))
                    .col(timestamp_with_time_zone_null(CircuitBreakers::OpenUntil))
                    .col(integer(CircuitBreakers::ConsecutiveOpens))
                    .col(integer(CircuitBreakers::HalfOpenInFlight))
                    .col(integer(CircuitBreakers::HalfOpenSuccesses))
                    .col(integer(CircuitBreakers::HalfOpenFailures))
                    .col(json_binary(CircuitBreakers::Buckets))
                    .col(big_integer(CircuitBreakers::NotPermittedCalls))
                    .col(timestamp_with_time_zone(CircuitBreakers::UpdateTime))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "idx_circuit_breakers_state",
                CircuitBreakers::Table,
                [CircuitBreakers::State],
            ))
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(CircuitBreakers::Table).to_owned())
            .await
    }
}
