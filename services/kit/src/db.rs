//! Database connection: SQLite (embedded, WAL) or PostgreSQL, migrated to the latest schema at start.

use std::time::Duration;

use meshflow_migrations::{Migrator, MigratorTrait};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous as Sync};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr};

use crate::config::{ServerConfig, SqliteSynchronous};

/// Connects to `config.database_url` and applies every pending migration.
pub async fn connect(config: &ServerConfig) -> Result<DatabaseConnection, DbErr> {
    connect_url(
        &config.database_url,
        config.sqlite_synchronous,
        config.database_max_connections,
    )
    .await
}

/// Connects to a URL and migrates.
pub async fn connect_url(
    url: &str,
    synchronous: SqliteSynchronous,
    max_connections: u32,
) -> Result<DatabaseConnection, DbErr> {
    let mut opts = ConnectOptions::new(url.to_string());
    opts.sqlx_logging(false)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(10));
    if url.starts_with("sqlite:") {
        let memory = url.contains(":memory:") || url.contains("mode=memory");
        let sync = match synchronous {
            SqliteSynchronous::Normal => Sync::Normal,
            SqliteSynchronous::Full => Sync::Full,
        };
        opts.map_sqlx_sqlite_opts(move |o| {
            let o = o
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(10))
                .synchronous(sync);
            if memory {
                o
            } else {
                o.journal_mode(SqliteJournalMode::Wal)
            }
        });
        if memory {
            // A new connection to `:memory:` is a new, empty database: one connection, never recycled.
            opts.max_connections(1)
                .min_connections(1)
                .max_lifetime(None)
                .idle_timeout(None);
        } else {
            // WAL: readers run beside the one writer; writes queue on the busy timeout.
            opts.max_connections(max_connections.clamp(1, 4))
                .min_connections(1);
        }
    } else {
        opts.max_connections(max_connections);
    }
    let db = Database::connect(opts).await?;
    Migrator::up(&db, None).await?;
    Ok(db)
}
