//! Circuit breakers in use: a breaker's half-open count is of the probes admitted (in flight or
//! reported), slow probes are counted, and every transition is kept as a history row, in the
//! transaction of the compare-and-set that made it, for watchers on every replica.

use crate::index;
use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum CircuitBreakers {
    Table,
    HalfOpenInFlight,
    HalfOpenAdmitted,
    HalfOpenSlowCalls,
}

#[derive(DeriveIden)]
enum CircuitBreakerTransitions {
    Table,
    Id,
    ServiceId,
    FromState,
    ToState,
    Reason,
    Time,
    Generation,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(CircuitBreakers::Table)
                    .rename_column(
                        CircuitBreakers::HalfOpenInFlight,
                        CircuitBreakers::HalfOpenAdmitted,
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(CircuitBreakers::Table)
                    .add_column(integer(CircuitBreakers::HalfOpenSlowCalls).default(0))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(CircuitBreakerTransitions::Table)
                    .col(
                        big_integer(CircuitBreakerTransitions::Id)
                            .primary_key()
                            .auto_increment(),
                    )
                    .col(string(CircuitBreakerTransitions::ServiceId))
                    .col(string(CircuitBreakerTransitions::FromState))
                    .col(string(CircuitBreakerTransitions::ToState))
                    .col(string(CircuitBreakerTransitions::Reason))
                    .col(timestamp_with_time_zone(CircuitBreakerTransitions::Time))
                    .col(big_integer(CircuitBreakerTransitions::Generation))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "idx_circuit_breaker_transitions_service",
                CircuitBreakerTransitions::Table,
                [
                    CircuitBreakerTransitions::ServiceId,
                    CircuitBreakerTransitions::Id,
                ],
            ))
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(CircuitBreakerTransitions::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(CircuitBreakers::Table)
                    .drop_column(CircuitBreakers::HalfOpenSlowCalls)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(CircuitBreakers::Table)
                    .rename_column(
                        CircuitBreakers::HalfOpenAdmitted,
                        CircuitBreakers::HalfOpenInFlight,
                    )
                    .to_owned(),
            )
            .await
    }
}
