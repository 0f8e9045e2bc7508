//! Test support: a fresh database per test. With `MESHFLOW_TEST_POSTGRES_URL` set (the test command
//! sets it to a throwaway cluster) each call creates a new PostgreSQL database on that server;
//! otherwise it is a new SQLite file (WAL, as `meshflow serve` runs it) under
//! [`sqlite_test_dir`]. Tests therefore run unchanged on both backends.
//!
//! A PostgreSQL database is named after the test process that made it. The first database a test
//! process makes drops those of processes that have exited, so a long-lived cluster does not fill up.

use std::sync::atomic::{AtomicBool, Ordering};

use sea_orm::{ConnectionTrait, Database, DatabaseConnection};

const PREFIX: &str = "meshflow_test_";

/// Names the PostgreSQL server tests create their databases on.
pub const POSTGRES_ENV: &str = "MESHFLOW_TEST_POSTGRES_URL";

/// Whether tests run against PostgreSQL.
pub fn on_postgres() -> bool {
    std::env::var(POSTGRES_ENV).is_ok_and(|v| !v.is_empty())
}

/// Fails a PostgreSQL-only test run without PostgreSQL. Such tests are named `postgres_only_…`;
/// the test command leaves them out of the SQLite pass, so none reports a pass it did not earn.
#[track_caller]
pub fn require_postgres() {
    assert!(
        on_postgres(),
        "a PostgreSQL-only test: set {POSTGRES_ENV} (the test command runs it in its PostgreSQL pass)"
    );
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
    let name = format!(
        "{PREFIX}{}_{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    );
    let db = Database::connect(admin.as_str()).await?;
    static SWEPT: AtomicBool = AtomicBool::new(false);
    if !SWEPT.swap(true, Ordering::Relaxed) {
        drop_orphans(&db).await;
    }
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

/// The process id a test database's name carries, if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split_once('_')?.0.parse().ok()
}

/// Drops the test databases of test processes that have exited. Where `/proc` does not tell, none.
async fn drop_orphans(db: &DatabaseConnection) {
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    let sql = format!("SELECT datname FROM pg_database WHERE datname LIKE '{PREFIX}%'");
    let Ok(rows) = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            sql,
        ))
        .await
    else {
        return;
    };
    for row in rows {
        let Ok(name) = row.try_get::<String>("", "datname") else {
            continue;
        };
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if !std::path::Path::new("/proc").join(pid.to_string()).exists() {
            // Another process may be dropping it too: either way it goes.
            let _ = db
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }
}

/// Starts a child `meshflow serve` on a clock its test drives: the time to start at, RFC 3339.
pub const CLOCK_ENV: &str = "MESHFLOW_TEST_CLOCK";

/// The clock of a process whose test drives it, when [`CLOCK_ENV`] is set: it starts at that time
/// and moves only by the lines its test writes to the process's standard input, each
/// `advance DURATION` (`1s`, `250ms`). Processes started one after another on one database (a
/// restart after `kill -9`) each start where the test says, so time spans the restart exactly.
pub fn driven_clock() -> anyhow::Result<Option<std::sync::Arc<dyn crate::clock::Clock>>> {
    let Ok(start) = std::env::var(CLOCK_ENV) else {
        return Ok(None);
    };
    let start = chrono::DateTime::parse_from_rfc3339(&start)
        .map_err(|e| anyhow::anyhow!("{CLOCK_ENV}: {e}"))?
        .with_timezone(&chrono::Utc);
    let clock = crate::clock::ManualClock::new(start);
    let driven = clock.clone();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            match advance_by(&line) {
                Some(by) => driven.advance(by),
                None => tracing::error!(line, "not a clock command"),
            }
        }
    });
    Ok(Some(clock))
}

/// The duration of an `advance DURATION` line.
fn advance_by(line: &str) -> Option<std::time::Duration> {
    let by = line.trim().strip_prefix("advance ")?;
    crate::config::parse_duration(by.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_commands_name_a_duration() {
        assert_eq!(
            advance_by("advance 1500ms\n"),
            Some(std::time::Duration::from_millis(1500))
        );
        assert_eq!(
            advance_by("advance 2s"),
            Some(std::time::Duration::from_secs(2))
        );
        assert_eq!(advance_by("rewind 2s"), None);
        assert_eq!(advance_by("advance soon"), None);
    }

    #[test]
    fn database_names_carry_their_process() {
        assert_eq!(owner_pid("meshflow_test_4242_0190abcd"), Some(4242));
        assert_eq!(owner_pid("meshflow_test_0190abcd"), None);
        assert_eq!(owner_pid("postgres"), None);
    }
}
