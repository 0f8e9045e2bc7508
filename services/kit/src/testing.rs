//! Test support: a fresh database per test. With `MESHFLOW_TEST_POSTGRES_URL` set (the test command
//! sets it to a throwaway cluster) each call creates a new PostgreSQL database on that server;
//! otherwise it is a new SQLite file (WAL, as `meshflow serve` runs it) under
//! [`sqlite_test_dir`]. Tests therefore run unchanged on both backends.

use sea_orm::{ConnectionTrait, Database};

/// Names the PostgreSQL server tests create their databases on.
pub const POSTGRES_ENV: &str = "MESHFLOW_TEST_POSTGRES_URL";

/// Whether tests run against PostgreSQL.
pub fn on_postgres() -> bool {
    std::env::var(POSTGRES_ENV).is_ok_and(|v| !v.is_empty())
}

/// Where tests create their SQLite files (the test command removes it when it ends).
pub fn sqlite_test_dir() -> std::path::PathBuf {
    std::env::temp_dir().join("meshflow-test-databases")
}

fn fresh_sqlite_url() -> anyhow::Result<String> {
    let dir = sqlite_test_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}.sqlite", uuid::Uuid::now_v7().simple()));
    Ok(format!("sqlite://{}?mode=rwc", path.display()))
}

/// A URL of a new, empty database.
pub async fn fresh_database_url() -> anyhow::Result<String> {
    let admin = std::env::var(POSTGRES_ENV).unwrap_or_default();
    let admin = admin.trim().to_string();
    if admin.is_empty() {
        return fresh_sqlite_url();
    }
    let name = format!("meshflow_test_{}", uuid::Uuid::now_v7().simple());
    let db = Database::connect(admin.as_str()).await?;
    db.execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await?;
    db.close().await?;
    let (base, query) = match admin.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (admin.as_str(), String::new()),
    };
    let server = match base.rsplit_once('/') {
        Some((server, _db)) if server.contains("://") && !server.ends_with('/') => server,
        _ => base.trim_end_matches('/'),
    };
    Ok(format!("{server}/{name}{query}"))
}
