//! The schema migrates up, down and up again, on SQLite and on PostgreSQL (see `testing`).

use meshflow_migrations::{Migrator, MigratorTrait};
use sea_orm::Database;
use sea_orm_migration::SchemaManager;

const TABLES: &[&str] = &[
    "workflows",
    "workflow_tags",
    "workflow_versions",
    "workflow_templates",
    "workflow_template_tags",
    "transformation_rules",
    "workflow_executions",
    "step_executions",
    "execution_events",
    "execution_signals",
    "orchestration_metrics",
    "circuit_breakers",
    "webhooks",
    "webhook_events",
    "webhook_delivery_attempts",
];

async fn present(manager: &SchemaManager<'_>) -> Vec<&'static str> {
    let mut out = Vec::new();
    for table in TABLES {
        if manager.has_table(*table).await.expect("has_table") {
            out.push(*table);
        }
    }
    out
}

#[tokio::test]
async fn migrations_run_up_down_and_up_again() {
    let url = meshflow_kit::testing::fresh_database_url()
        .await
        .expect("database");
    let db = Database::connect(url.as_str()).await.expect("connect");
    let manager = SchemaManager::new(&db);

    Migrator::up(&db, None).await.expect("up");
    assert_eq!(present(&manager).await, TABLES);
    assert_eq!(
        Migrator::get_pending_migrations(&db)
            .await
            .expect("pending")
            .len(),
        0
    );

    Migrator::down(&db, None).await.expect("down");
    assert_eq!(present(&manager).await, Vec::<&str>::new());

    Migrator::up(&db, None).await.expect("up again");
    assert_eq!(present(&manager).await, TABLES);
}

#[tokio::test]
async fn connecting_migrates_and_is_idempotent() {
    let url = meshflow_kit::testing::fresh_database_url()
        .await
        .expect("database");
    let synchronous = meshflow_kit::config::SqliteSynchronous::Normal;
    let db = meshflow_kit::db::connect_url(&url, synchronous, 4)
        .await
        .expect("first connect");
    let applied = Migrator::get_applied_migrations(&db)
        .await
        .expect("applied")
        .len();
    assert_eq!(applied, Migrator::migrations().len());
    // Connecting again to the same database applies nothing new.
    let again = meshflow_kit::db::connect_url(&url, synchronous, 4)
        .await
        .expect("second connect");
    assert_eq!(
        Migrator::get_applied_migrations(&again)
            .await
            .expect("applied")
            .len(),
        applied
    );
}

/// On PostgreSQL, attempts and events carry no foreign key (the group commit's fence stands for
/// it), their JSON is compressed with lz4 when the server has it, and event payloads are `json`;
/// reverting restores each.
#[tokio::test]
async fn postgres_history_tables_are_light_to_write() {
    use sea_orm::ConnectionTrait;
    if !meshflow_kit::testing::on_postgres() {
        return;
    }
    let url = meshflow_kit::testing::fresh_database_url()
        .await
        .expect("database");
    let db = Database::connect(url.as_str()).await.expect("connect");
    let scalar = async |sql: &str| -> String {
        db.query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            sql,
        ))
        .await
        .expect("query")
        .expect("row")
        .try_get_by_index(0)
        .expect("value")
    };
    let keys = "SELECT COUNT(*)::text FROM pg_constraint WHERE contype = 'f'
        AND conrelid IN ('step_executions'::regclass, 'execution_events'::regclass)";
    let compression = "SELECT string_agg(DISTINCT attcompression::text, ',') FROM pg_attribute
        WHERE attrelid IN ('step_executions'::regclass, 'execution_events'::regclass)
        AND attname IN ('input', 'output', 'payload')";
    let lz4 = "SELECT ('lz4' = ANY(enumvals))::text FROM pg_settings
        WHERE name = 'default_toast_compression'";

    let payload = "SELECT atttypid::regtype::text FROM pg_attribute
        WHERE attrelid = 'execution_events'::regclass AND attname = 'payload'";

    // Up to the payloads' migration (the eighth), so the steps down below revert the two in question.
    Migrator::up(&db, Some(8)).await.expect("up");
    assert_eq!(scalar(keys).await, "0");
    let expected = if scalar(lz4).await == "true" { "l" } else { "" };
    assert_eq!(scalar(compression).await, expected);
    assert_eq!(scalar(payload).await, "json");

    Migrator::down(&db, Some(1))
        .await
        .expect("payloads back to jsonb");
    assert_eq!(scalar(payload).await, "jsonb");
    assert_eq!(scalar(compression).await, expected);

    Migrator::down(&db, Some(1)).await.expect("keys back");
    assert_eq!(scalar(keys).await, "2");
    assert_eq!(scalar(compression).await, "");
}
