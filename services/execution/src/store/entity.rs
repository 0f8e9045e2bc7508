//! sea-orm entities of the execution tables (created by `meshflow-migrations`).

/// `workflow_executions`.
pub mod execution {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "workflow_executions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub workflow_id: String,
        pub workflow_version: i64,
        pub status: String,
        #[sea_orm(column_type = "JsonBinary")]
        pub input: Json,
        #[sea_orm(column_type = "JsonBinary")]
        pub variables: Json,
        #[sea_orm(column_type = "JsonBinary", nullable)]
        pub output: Option<Json>,
        #[sea_orm(column_type = "JsonBinary", nullable)]
        pub error: Option<Json>,
        pub request_id: Option<String>,
        pub last_sequence: i64,
        pub lease_owner: Option<String>,
        pub lease_expires_at: Option<DateTimeUtc>,
        pub wake_at: Option<DateTimeUtc>,
        pub deadline_at: Option<DateTimeUtc>,
        pub create_time: DateTimeUtc,
        pub start_time: Option<DateTimeUtc>,
        pub end_time: Option<DateTimeUtc>,
        pub update_time: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `step_executions`: one row per attempt of a step path, keyed by that place.
pub mod step {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "step_executions")]
    pub struct Model {
        /// Unique as generated (UUIDv7, so in start order), but not a key.
        pub id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub execution_id: String,
        pub step_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub step_path: String,
        pub step_type: String,
        pub status: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub attempt: i32,
        #[sea_orm(column_type = "JsonBinary", nullable)]
        pub input: Option<Json>,
        #[sea_orm(column_type = "JsonBinary", nullable)]
        pub output: Option<Json>,
        #[sea_orm(column_type = "JsonBinary", nullable)]
        pub error: Option<Json>,
        #[sea_orm(column_type = "JsonBinary")]
        pub logs: Json,
        pub start_time: Option<DateTimeUtc>,
        pub end_time: Option<DateTimeUtc>,
        pub duration_ms: Option<i64>,
        pub next_attempt_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `execution_events`: the append-only log, keyed by (execution, sequence).
pub mod event {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "execution_events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub execution_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub sequence: i64,
        pub time: DateTimeUtc,
        pub event_type: String,
        pub step_path: Option<String>,
        #[sea_orm(column_type = "JsonBinary")]
        pub payload: Json,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `execution_signals`: signals delivered to an execution, consumed by WAIT steps.
pub mod signal {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "execution_signals")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub execution_id: String,
        pub name: String,
        #[sea_orm(column_type = "JsonBinary")]
        pub payload: Json,
        pub request_id: Option<String>,
        pub receive_time: DateTimeUtc,
        pub consumed_by: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `orchestration_metrics`: aggregates per workflow (`step_id = ""`) and per step id.
pub mod metrics {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "orchestration_metrics")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub workflow_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub step_id: String,
        pub total: i64,
        pub active: i64,
        pub completed: i64,
        pub failed: i64,
        pub cancelled: i64,
        pub timed_out: i64,
        pub skipped: i64,
        pub attempts: i64,
        pub update_time: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
