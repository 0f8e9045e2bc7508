//! The `circuit_breakers` and `circuit_breaker_transitions` tables (migrations
//! `m20261126_000003_create_circuit_breakers` and `m20261205_000013_circuit_breaker_transitions`).

use sea_orm::entity::prelude::*;

/// One breaker: its state machine's fields, its config and window as JSON, and the version every
/// write compares and sets.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "circuit_breakers")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub service_id: String,
    /// [`crate::Config`] as JSON.
    #[sea_orm(column_type = "JsonBinary")]
    pub config: Json,
    /// [`crate::State`] name.
    pub state: String,
    pub generation: i64,
    pub version: i64,
    pub state_entered_at: DateTimeUtc,
    pub open_until: Option<DateTimeUtc>,
    pub consecutive_opens: i32,
    pub half_open_admitted: i32,
    pub half_open_successes: i32,
    pub half_open_failures: i32,
    pub half_open_slow_calls: i32,
    /// [`crate::window::Window`] as JSON.
    #[sea_orm(column_type = "JsonBinary")]
    pub buckets: Json,
    pub not_permitted_calls: i64,
    pub update_time: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

/// `circuit_breaker_transitions`: the history of every breaker's state changes.
pub mod transition {
    use sea_orm::entity::prelude::*;

    /// One state change, written with the compare-and-set that made it.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "circuit_breaker_transitions")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub service_id: String,
        pub from_state: String,
        pub to_state: String,
        pub reason: String,
        pub time: DateTimeUtc,
        /// The breaker's generation after the change.
        pub generation: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
