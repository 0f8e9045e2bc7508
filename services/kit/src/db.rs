//! Database connection: SQLite (embedded, WAL) or PostgreSQL, migrated to the latest schema at start.

use std::time::Duration;

use meshflow_migrations::{Migrator, MigratorTrait};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous as Sync};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr};

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
    let sqlite = url.starts_with("sqlite:");
    let memory = sqlite && (url.contains(":memory:") || url.contains("mode=memory"));
    if sqlite {
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
                // Checkpoints run in the background (see `checkpoint_in_background`), never in
                // the commit that happens to cross the WAL's size threshold.
                o.journal_mode(SqliteJournalMode::Wal)
                    .pragma("wal_autocheckpoint", "0")
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
        // Every statement here is a short lookup or write by key: plan it once per connection, not
        // at every execution (a custom plan per bind cost more than running most of them).
        opts.max_connections(max_connections)
            .map_sqlx_postgres_opts(|o| o.options([("plan_cache_mode", "force_generic_plan")]));
    }
    let db = Database::connect(opts).await?;
    Migrator::up(&db, None).await?;
    if sqlite && !memory {
        checkpoint_in_background(db.clone());
    }
    Ok(db)
}

/// How often the WAL of a SQLite file is copied back into the database. A checkpoint's writes and
/// fsync slow the commits beside it a little; once a second keeps that off most commits' latency
/// while the WAL stays a second of writes long.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Copies the WAL back into the database file every [`CHECKPOINT_EVERY`], on a pooled connection,
/// until the pool closes. A passive checkpoint never blocks a writer or a reader, so commits keep
/// their latency; SQLite's automatic checkpoint would instead run inside whichever commit crosses
/// the threshold and stall it for milliseconds.
fn checkpoint_in_background(db: DatabaseConnection) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if db.get_sqlite_connection_pool().is_closed() {
                return;
            }
            if let Err(err) = db
                .execute_unprepared("PRAGMA wal_checkpoint(PASSIVE)")
                .await
            {
                tracing::debug!(error = %err, "WAL checkpoint skipped");
            }
        }
    });
}

/// Lookups by a unique key.
///
/// [`sea_orm::Select::one`] binds its `LIMIT 1` as a parameter, and SQLite plans a statement whose
/// `LIMIT` is a bound parameter anew every time it runs: the value feeds its planner. A unique key
/// matches one row at most, so [`SelectUnique::unique`] reads without a limit, and the connection's
/// prepared statement is reused as it is.
pub trait SelectUnique<E: sea_orm::EntityTrait> {
    /// The row the query's unique key matches, if any.
    fn unique<C: ConnectionTrait>(
        self,
        db: &C,
    ) -> impl Future<Output = Result<Option<E::Model>, DbErr>> + Send;
}

impl<E: sea_orm::EntityTrait> SelectUnique<E> for sea_orm::Select<E> {
    fn unique<C: ConnectionTrait>(
        self,
        db: &C,
    ) -> impl Future<Output = Result<Option<E::Model>, DbErr>> + Send {
        let query = self.all(db);
        async move { Ok(query.await?.pop()) }
    }
}
