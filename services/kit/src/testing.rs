//! Test support: a fresh database per test. With `MESHFLOW_TEST_POSTGRES_URL` set (the test command
//! sets it to a throwaway cluster) each call creates a new PostgreSQL database on that server;
//! otherwise it is an in-memory SQLite database. Tests therefore run unchanged on both backends.

use sea_orm::{ConnectionTrait, Database};

/// Names the PostgreSQL server tests create their databases on.
pub const POSTGRES_ENV: &str = "MESHFLOW_TEST_POSTGRES_URL";

/// Whether tests run against PostgreSQL.
pub fn on_postgres() -> bool {
    std::env::var(POSTGRES_ENV).is_ok_and(|v| !v.is_empty())
}

/// A URL of a new, empty database.
pub async fn fresh_database_url() -> anyhow::Result<String> {
    let Ok(admin) = std::env::var(POSTGRES_ENV).map(|v| v.trim().to_string()) else {
        return Ok("sqlite::memory:".to_string());
    };
    if admin.is_empty() {
        return Ok("sqlite::memory:".to_string());
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
