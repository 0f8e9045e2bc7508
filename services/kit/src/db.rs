//! Database connection: SQLite (embedded, WAL) or PostgreSQL, migrated to the latest schema at start.

use std::time::Duration;

use meshflow_migrations::{Migrator, MigratorTrait};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous as Sync};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr};

use crate::config::{ServerConfig, SqliteSynchronous};

/// How long a pooled SQLite connection waits for a competing writer.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A pooled connection idle for this long is pinged before it is handed out, and one in use more
/// recently is not. sqlx pings on every checkout by default: a round trip to the server (on SQLite,
/// to the connection's worker thread) before every statement or transaction, for the rare
/// connection the server dropped while it sat idle. Under load every connection is in use far more
/// often than this, so none is pinged; after a quiet second, one the server dropped (a restart, a
/// failover) is found by the ping and replaced before a request uses it.
pub const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

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
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire_if_idle_for(PING_IF_IDLE_FOR);
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
                .busy_timeout(BUSY_TIMEOUT)
                .synchronous(sync);
            if memory {
                o
            } else {
                // Checkpoints run in the background (see `checkpoint_in_background`), never in
                // the commit that happens to cross the WAL's size threshold. Pooled connections
                // serve reads by key and short writes, and in WAL mode a connection's page cache
                // starts over whenever another one has committed: each keeps 256 KiB, not
                // SQLite's default 2 MiB (with 10,000 executions parked, about 11 MiB less).
                o.journal_mode(SqliteJournalMode::Wal)
                    .pragma("wal_autocheckpoint", "0")
                    .pragma("cache_size", "-256")
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
        // at every execution (a custom plan per bind cost more than running most of them). A plan
        // is made at a statement's first use and kept, often while its tables are still small, where
        // a sequential scan looks cheapest; kept as the tables grow, it would read every row at every
        // execution. With sequential scans priced out, plans use the indexes every statement has.
        opts.max_connections(max_connections)
            .map_sqlx_postgres_opts(|o| {
                o.options([
                    ("plan_cache_mode", "force_generic_plan"),
                    ("enable_seqscan", "off"),
                ])
            });
    }
    let db = Database::connect(opts).await?;
    Migrator::up(&db, None).await?;
    if sqlite && !memory {
        checkpoint_in_background(db.clone());
    }
    Ok(db)
}

/// How often the WAL of a SQLite file is copied back into the database. A checkpoint's writes and
/// fsync slow the commits beside it a little; once a second keeps that off most commits' latency.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// The most the WAL holds (bytes) before a checkpoint makes it start over, stalling commits for a
/// moment. The file keeps its size, so commits after a restart overwrite blocks it already has.
const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// Copies the WAL back into the database file every [`CHECKPOINT_EVERY`], on a pooled connection,
/// until the pool closes, and keeps the WAL file from growing without end.
///
/// Passive checkpoints copy the WAL without blocking a writer or a reader, so commits keep their
/// latency. But SQLite starts the WAL over only once it is wholly copied, and under a steady stream
/// of commits a passive pass never catches up with the last frame: on its own the WAL would grow
/// for as long as the load lasts, every commit appending to fresh blocks of an ever larger file.
/// So passes repeat while they gain on the writers, and once the WAL holds more than
/// [`WAL_SIZE_LIMIT`], a restart checkpoint copies the last few frames while holding the write lock
/// (a stall of about two fsyncs), after which the next commit starts the WAL over. It runs
/// without a busy timeout: waiting on a reader while holding the write lock would stall every
/// commit, so a busy restart gives up at once and is tried again a moment later. SQLite's automatic
/// checkpoint would instead copy the whole WAL inside whichever commit crosses its threshold.
fn checkpoint_in_background(db: DatabaseConnection) {
    tokio::spawn(async move {
        let pool = db.get_sqlite_connection_pool().clone();
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if pool.is_closed() {
                return;
            }
            match checkpoint(&pool, WAL_SIZE_LIMIT).await {
                Ok(restarted) => tracing::trace!(restarted, "WAL checkpointed"),
                Err(err) => tracing::debug!(error = %err, "WAL checkpoint skipped"),
            }
        }
    });
}

/// Passive passes repeat until fewer than this many frames were added since the one before.
const CAUGHT_UP: i64 = 256;

/// Passive passes per round, at most.
const PASSIVE_PASSES: usize = 6;

/// Tries of a restart checkpoint per round.
const RESTART_TRIES: usize = 10;

/// One round of [`checkpoint_in_background`]; the WAL starts over once it holds more than `limit`
/// bytes. Returns whether a restart checkpoint got through, after which the next commit starts the
/// WAL over.
async fn checkpoint(
    pool: &sea_orm::sqlx::SqlitePool,
    limit: i64,
) -> Result<bool, sea_orm::sqlx::Error> {
    use sea_orm::sqlx::{Row, SqliteConnection, query};
    /// Runs a checkpoint: whether it was blocked, and the frames in the WAL.
    async fn run(
        conn: &mut SqliteConnection,
        sql: &'static str,
    ) -> Result<(bool, i64), sea_orm::sqlx::Error> {
        let row = query(sql).fetch_one(conn).await?;
        Ok((row.try_get::<i64, _>(0)? != 0, row.try_get(1)?))
    }
    let mut conn = pool.acquire().await?;
    let mut frames = 0;
    for _ in 0..PASSIVE_PASSES {
        let (_, log) = run(&mut conn, "PRAGMA wal_checkpoint(PASSIVE)").await?;
        let added = log - frames;
        frames = log;
        if added < CAUGHT_UP {
            break;
        }
    }
    let page: i64 = query("PRAGMA page_size")
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?;
    if frames.saturating_mul(page) <= limit {
        return Ok(false);
    }
    // A passive pass that ends behind the writers leaves the database file unsynced, and the
    // restart would sync all it copied while holding the write lock: sync it first, then catch up.
    let path = pool.connect_options().get_filename().to_path_buf();
    let synced = tokio::task::spawn_blocking(move || std::fs::File::open(path)?.sync_data()).await;
    if let Ok(Err(err)) | Err(err) = synced.map_err(std::io::Error::other) {
        tracing::debug!(error = %err, "database file not synced before the WAL restart");
    }
    run(&mut conn, "PRAGMA wal_checkpoint(PASSIVE)").await?;
    query("PRAGMA busy_timeout = 0").execute(&mut *conn).await?;
    let mut result = Ok(false);
    for _ in 0..RESTART_TRIES {
        match run(&mut conn, "PRAGMA wal_checkpoint(RESTART)").await {
            Ok((false, _)) => {
                result = Ok(true);
                break;
            }
            Ok((true, _)) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(err) => {
                result = Err(err);
                break;
            }
        }
    }
    let restore = format!("PRAGMA busy_timeout = {}", BUSY_TIMEOUT.as_millis());
    if let Err(err) = query(sea_orm::sqlx::AssertSqlSafe(restore))
        .execute(&mut *conn)
        .await
    {
        // Never hand the pool a connection that gives up at once.
        conn.detach();
        return Err(err);
    }
    result
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

/// Whether a write failed on a unique constraint (a name, an id or a `request_id` taken).
pub fn is_unique_violation(err: &DbErr) -> bool {
    matches!(
        err.sql_err(),
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use sea_orm::sqlx::query;

    use super::*;

    /// The WAL header's checkpoint sequence number: it grows each time the WAL starts over.
    fn wal_generation(wal: &std::path::Path) -> anyhow::Result<u32> {
        use std::io::Read;
        let mut header = [0u8; 16];
        std::fs::File::open(wal)?.read_exact(&mut header)?;
        Ok(u32::from_be_bytes([
            header[12], header[13], header[14], header[15],
        ]))
    }

    #[tokio::test]
    async fn a_wal_over_its_limit_starts_over_while_commits_continue() -> anyhow::Result<()> {
        let dir = crate::testing::sqlite_test_dir();
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.sqlite", uuid::Uuid::now_v7().simple()));
        let wal = path.with_extension("sqlite-wal");
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let db = connect_url(&url, SqliteSynchronous::Normal, 4).await?;
        db.execute_unprepared("CREATE TABLE filler (id INTEGER PRIMARY KEY, body BLOB)")
            .await?;
        let pool = db.get_sqlite_connection_pool().clone();

        // Commits without pause, as a loaded server does, until the test ends.
        let stop = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(AtomicU64::new(0));
        let writer = tokio::spawn({
            let (pool, stop, commits) = (pool.clone(), stop.clone(), commits.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    query("INSERT INTO filler (body) VALUES (zeroblob(2000))")
                        .execute(&pool)
                        .await?;
                    commits.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            }
        });
        while commits.load(Ordering::Relaxed) < 2000 {
            tokio::task::yield_now().await;
        }
        let generation = wal_generation(&wal)?;

        // A WAL far over a one-byte limit is started over: a restart checkpoint gets through, and
        // the next commit writes the WAL from its start, under a new header. A busy write lock or
        // reader makes the restart give up at once (a loaded machine may take a few rounds, as the
        // background loop takes a few seconds); passive passes alone never start the WAL over
        // while commits keep coming.
        let mut started_over = false;
        for _ in 0..50 {
            checkpoint(&pool, 1).await?;
            let deadline = commits.load(Ordering::Relaxed) + 500;
            while wal_generation(&wal)? == generation && commits.load(Ordering::Relaxed) < deadline
            {
                tokio::task::yield_now().await;
            }
            if wal_generation(&wal)? > generation {
                started_over = true;
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.await??;
        assert!(started_over, "the WAL never started over");

        // The connection the checkpoint used waits for writers again, like every other.
        let conns = futures::future::try_join_all((0..4).map(|_| pool.acquire())).await?;
        for mut conn in conns {
            let row = query("PRAGMA busy_timeout").fetch_one(&mut *conn).await?;
            let timeout: i64 = sea_orm::sqlx::Row::try_get(&row, 0)?;
            assert_eq!(timeout, BUSY_TIMEOUT.as_millis() as i64);
        }
        db.close().await?;
        std::fs::remove_file(path)?;
        Ok(())
    }
}
