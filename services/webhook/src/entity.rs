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

/// `webhook_events`: an event to deliver to one webhook.
pub mod event {
    use sea_orm::entity::prelude::*;

    /// One event for one webhook; its id is the `webhook-id` of every attempt.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "webhook_events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub webhook_id: String,
        pub event_type: String,
        /// The event's `data`.
        #[sea_orm(column_type = "JsonBinary")]
        pub payload: Json,
        /// `DeliveryStatus` name.
        pub status: String,
        pub attempt_count: i32,
        pub next_attempt_at: Option<DateTimeUtc>,
        pub create_time: DateTimeUtc,
        pub update_time: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `webhook_delivery_attempts`: every attempt of an event, kept.
pub mod attempt {
    use sea_orm::entity::prelude::*;

    /// One attempt.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "webhook_delivery_attempts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub webhook_event_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub attempt: i32,
        pub time: DateTimeUtc,
        /// HTTP status; `None` when no response arrived.
        pub response_code: Option<i32>,
        pub latency_ms: Option<i64>,
        /// The transport error, or the response's excerpt.
        pub error: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
