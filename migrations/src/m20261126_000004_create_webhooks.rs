//! Outbound webhooks: subscriptions, the durable outbox of events, and every delivery attempt.

use crate::index;
use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Webhooks {
    Table,
    Id,
    Name,
    Url,
    EventTypes,
    Secret,
    Status,
    DisabledReason,
    Headers,
    Description,
    Revision,
    FailingSince,
    RequestId,
    CreateTime,
    UpdateTime,
}

#[derive(DeriveIden)]
enum WebhookEvents {
    Table,
    Id,
    WebhookId,
    EventType,
    Payload,
    Status,
    AttemptCount,
    NextAttemptAt,
    CreateTime,
    UpdateTime,
}

#[derive(DeriveIden)]
enum WebhookDeliveryAttempts {
    Table,
    WebhookEventId,
    Attempt,
    Time,
    ResponseCode,
    LatencyMs,
    Error,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Webhooks::Table)
                    .col(string(Webhooks::Id).primary_key())
                    .col(string_uniq(Webhooks::Name))
                    .col(text(Webhooks::Url))
                    .col(json_binary(Webhooks::EventTypes))
                    .col(string(Webhooks::Secret))
                    .col(string(Webhooks::Status))
                    .col(text_null(Webhooks::DisabledReason))
                    .col(json_binary(Webhooks::Headers))
                    .col(text(Webhooks::Description))
                    .col(big_integer(Webhooks::Revision))
                    .col(timestamp_with_time_zone_null(Webhooks::FailingSince))
                    .col(string_null(Webhooks::RequestId).unique_key())
                    .col(timestamp_with_time_zone(Webhooks::CreateTime))
                    .col(timestamp_with_time_zone(Webhooks::UpdateTime))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "idx_webhooks_status",
                Webhooks::Table,
                [Webhooks::Status],
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(WebhookEvents::Table)
                    .col(string(WebhookEvents::Id).primary_key())
                    .col(string(WebhookEvents::WebhookId))
                    .col(string(WebhookEvents::EventType))
                    .col(json_binary(WebhookEvents::Payload))
                    .col(string(WebhookEvents::Status))
                    .col(integer(WebhookEvents::AttemptCount))
                    .col(timestamp_with_time_zone_null(WebhookEvents::NextAttemptAt))
                    .col(timestamp_with_time_zone(WebhookEvents::CreateTime))
                    .col(timestamp_with_time_zone(WebhookEvents::UpdateTime))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_webhook_events_webhook")
                            .from(WebhookEvents::Table, WebhookEvents::WebhookId)
                            .to(Webhooks::Table, Webhooks::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        for (name, columns) in [
            (
                "idx_webhook_events_webhook_id",
                vec![WebhookEvents::WebhookId, WebhookEvents::CreateTime],
            ),
            (
                "idx_webhook_events_due",
                vec![WebhookEvents::Status, WebhookEvents::NextAttemptAt],
            ),
            (
                "idx_webhook_events_event_type",
                vec![WebhookEvents::EventType],
            ),
        ] {
            manager
                .create_index(index(name, WebhookEvents::Table, columns))
                .await?;
        }

        manager
            .create_table(
                Table::create()
                    .table(WebhookDeliveryAttempts::Table)
                    .col(string(WebhookDeliveryAttempts::WebhookEventId))
                    .col(integer(WebhookDeliveryAttempts::Attempt))
                    .col(timestamp_with_time_zone(WebhookDeliveryAttempts::Time))
                    .col(integer_null(WebhookDeliveryAttempts::ResponseCode))
                    .col(big_integer_null(WebhookDeliveryAttempts::LatencyMs))
                    .col(text_null(WebhookDeliveryAttempts::Error))
                    .primary_key(
                        Index::create()
                            .col(WebhookDeliveryAttempts::WebhookEventId)
                            .col(WebhookDeliveryAttempts::Attempt),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_webhook_delivery_attempts_event")
                            .from(
                                WebhookDeliveryAttempts::Table,
                                WebhookDeliveryAttempts::WebhookEventId,
                            )
                            .to(WebhookEvents::Table, WebhookEvents::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(WebhookDeliveryAttempts::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table(WebhookEvents::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Webhooks::Table).to_owned())
            .await
    }
}
