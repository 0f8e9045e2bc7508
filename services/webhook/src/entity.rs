//! The `webhooks` table (migration `m20261126_000004_create_webhooks`).

use sea_orm::entity::prelude::*;

/// One subscription.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "webhooks")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub name: String,
    pub url: String,
    /// JSON array of event types.
    #[sea_orm(column_type = "JsonBinary")]
    pub event_types: Json,
    pub secret: String,
    /// `WebhookStatus` name.
    pub status: String,
    pub disabled_reason: Option<String>,
    /// JSON object of extra request headers.
    #[sea_orm(column_type = "JsonBinary")]
    pub headers: Json,
    pub description: String,
    pub revision: i64,
    pub failing_since: Option<DateTimeUtc>,
    pub request_id: Option<String>,
    pub create_time: DateTimeUtc,
    pub update_time: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
