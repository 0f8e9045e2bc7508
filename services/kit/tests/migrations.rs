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
