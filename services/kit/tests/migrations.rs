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

/// A connection to a fresh database (PostgreSQL when the tests have one), not migrated.
async fn fresh_unmigrated() -> sea_orm::DatabaseConnection {
    let url = meshflow_kit::testing::fresh_database_url()
        .await
        .expect("database");
    Database::connect(url.as_str()).await.expect("connect")
}

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
    let db = fresh_unmigrated().await;
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
async fn postgres_only_history_tables_are_light_to_write() {
    use sea_orm::ConnectionTrait;
    meshflow_kit::testing::require_postgres();
    let db = fresh_unmigrated().await;
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

/// Attempts are keyed by their place, not by their id; the change keeps every row, both ways (on
/// SQLite the table is rebuilt).
#[tokio::test]
async fn step_attempts_keep_their_rows_as_their_key_changes() {
    use sea_orm::ConnectionTrait;
    let db = fresh_unmigrated().await;
    let backend = db.get_database_backend();
    let run = async |sql: &str| {
        db.execute_unprepared(sql).await.expect(sql);
    };
    let rows = async || -> Vec<(String, i64)> {
        db.query_all_raw(sea_orm::Statement::from_string(
            backend,
            "SELECT id, attempt FROM step_executions ORDER BY id",
        ))
        .await
        .expect("select")
        .iter()
        .map(|r| {
            (
                r.try_get_by_index::<String>(0).expect("id"),
                i64::from(r.try_get_by_index::<i32>(1).expect("attempt")),
            )
        })
        .collect()
    };
    // Up to the migration before the change.
    Migrator::up(&db, Some(9)).await.expect("up");
    let now = "'2026-11-27T00:00:00+00:00'";
    run(&format!(
        "INSERT INTO workflows (id, name, description, status, current_version, triggers, \
         revision, create_time, update_time) VALUES ('w', 'w', '', 'WORKFLOW_STATUS_ACTIVE', 1, \
         '[]', 1, {now}, {now})"
    ))
    .await;
    run(&format!(
        "INSERT INTO workflow_versions (workflow_id, version, definition, create_time) \
         VALUES ('w', 1, '{{}}', {now})"
    ))
    .await;
    run(&format!(
        "INSERT INTO workflow_executions (id, workflow_id, workflow_version, status, input, \
         variables, last_sequence, create_time, update_time) VALUES ('e', 'w', 1, \
         'EXECUTION_STATUS_RUNNING', '{{}}', '{{}}', 0, {now}, {now})"
    ))
    .await;
    for (id, attempt) in [("a1", 1), ("a2", 2)] {
        run(&format!(
            "INSERT INTO step_executions (id, execution_id, step_id, step_path, step_type, \
             status, attempt, logs) VALUES ('{id}', 'e', 's', 's', 'STEP_TYPE_HTTP_REQUEST', \
             'STEP_STATUS_FAILED', {attempt}, '[]')"
        ))
        .await;
    }
    let expected = vec![("a1".to_string(), 1), ("a2".to_string(), 2)];

    Migrator::up(&db, Some(1)).await.expect("keyed by place");
    assert_eq!(rows().await, expected);
    // The place is the key: a second row for it is refused.
    let duplicate = "INSERT INTO step_executions (id, execution_id, step_id, step_path, \
        step_type, status, attempt, logs) VALUES ('a3', 'e', 's', 's', 'STEP_TYPE_HTTP_REQUEST', \
        'STEP_STATUS_FAILED', 2, '[]')";
    assert!(db.execute_unprepared(duplicate).await.is_err());

    Migrator::down(&db, Some(1)).await.expect("keyed by id");
    assert_eq!(rows().await, expected);
    assert!(db.execute_unprepared(duplicate).await.is_err());
    Migrator::up(&db, None).await.expect("up again");
    assert_eq!(rows().await, expected);
}
