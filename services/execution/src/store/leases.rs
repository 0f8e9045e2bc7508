//! Leases: claiming executions that need work, renewing and taking leases, and taking back a
//! restarted server's own.

use super::*;

/// The statuses of executions that have not ended, as an SQL list.
pub(super) static UNFINISHED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    [
        pb::ExecutionStatus::Pending,
        pb::ExecutionStatus::Running,
        pb::ExecutionStatus::Waiting,
    ]
    .iter()
    .map(|s| format!("'{}'", s.as_str_name()))
    .collect::<Vec<_>>()
    .join(", ")
});

/// The condition under which `owner` may claim an execution at `now` (both placeholders): it has
/// not ended, and it is due (its wake-up has come, its lease free or `owner`'s) or abandoned (its
/// lease expired).
pub(super) fn claimable(owner: &str, now: &str) -> String {
    format!(
        "status IN ({}) AND (\
           (wake_at IS NOT NULL AND wake_at <= {now} AND (lease_owner IS NULL OR lease_owner = {owner})) \
           OR (lease_owner IS NOT NULL AND lease_expires_at < {now}))",
        *UNFINISHED
    )
}

/// [`Store::renew`] on PostgreSQL: locks the rows in id order first.
pub(super) const RENEW_POSTGRES: &str = "UPDATE workflow_executions SET lease_expires_at = $1
    WHERE id IN (SELECT id FROM workflow_executions WHERE id = ANY($3) AND lease_owner = $2
        ORDER BY id FOR UPDATE)";

impl Store {
    /// Ends the leases a server held before it restarted, so it takes those executions back at
    /// once: on SQLite every lease (one server drives a SQLite file, and it is starting), on
    /// PostgreSQL those of `owner` (this server's identity, when it is stable across restarts).
    /// Returns how many were ended.
    pub async fn reclaim_leases(&self, owner: &str) -> Result<u64, StoreError> {
        let statuses = &*UNFINISHED;
        let backend = self.db.get_database_backend();
        let (sql, values): (String, Vec<sea_orm::Value>) = if backend == DbBackend::Postgres {
            (
                format!(
                    "UPDATE workflow_executions SET lease_expires_at = $2 \
                     WHERE lease_owner = $1 AND status IN ({statuses})"
                ),
                vec![owner.into(), DateTime::<Utc>::UNIX_EPOCH.into()],
            )
        } else {
            (
                format!(
                    "UPDATE workflow_executions SET lease_expires_at = ?1 \
                     WHERE lease_owner IS NOT NULL AND status IN ({statuses})"
                ),
                vec![DateTime::<Utc>::UNIX_EPOCH.into()],
            )
        };
        Ok(self
            .db
            .execute_raw(Statement::from_sql_and_values(backend, sql, values))
            .await?
            .rows_affected())
    }

    /// Claims up to `limit` executions that need work, for `owner` until `until`: those due
    /// (`wake_at <= now`) whose lease is free or already `owner`'s, and those whose lease expired (a
    /// replica died while driving them). On PostgreSQL, rows another claimer has locked are skipped
    /// (`FOR UPDATE SKIP LOCKED`); SQLite serialises writers.
    pub async fn claim(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<String>, StoreError> {
        let backend = self.db.get_database_backend();
        if backend != DbBackend::Postgres {
            return self.claim_sqlite(owner, now, until, limit).await;
        }
        let sql = format!(
            "UPDATE workflow_executions SET lease_owner = $1, lease_expires_at = $2 WHERE id IN (\
               SELECT id FROM workflow_executions WHERE {} \
               ORDER BY id LIMIT {limit} FOR UPDATE SKIP LOCKED) RETURNING id",
            claimable("$1", "$3")
        );
        let values: Vec<sea_orm::Value> = vec![owner.into(), until.into(), now.into()];
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(backend, sql, values))
            .await?;
        rows.iter()
            .map(|r| r.try_get::<String>("", "id").map_err(StoreError::from))
            .collect()
    }

    /// [`Self::claim`] on SQLite: the due executions are found by a read, through the indexes of
    /// wake-up and lease expiry (named: without statistics SQLite preferred the status index), and
    /// only those are updated. A write takes the database's one write lock, and the group commit
    /// waits for it: the single statement held it while it read every unfinished execution through
    /// the status index (about 5 ms with 10,000 parked, against 0.01 ms for this read), at every
    /// poll, whether or not any was due.
    pub(super) async fn claim_sqlite(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<String>, StoreError> {
        let backend = DbBackend::Sqlite;
        // [`claimable`], one index per branch of its `OR`.
        let statuses = &*UNFINISHED;
        let due = format!(
            "SELECT id FROM workflow_executions INDEXED BY idx_workflow_executions_wake_at \
               WHERE wake_at <= ?2 AND status IN ({statuses}) \
               AND (lease_owner IS NULL OR lease_owner = ?1) \
             UNION SELECT id FROM workflow_executions INDEXED BY idx_workflow_executions_lease \
               WHERE lease_expires_at < ?2 AND lease_owner IS NOT NULL AND status IN ({statuses}) \
             ORDER BY id LIMIT {limit}"
        );
        let ids: Vec<String> = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                due,
                [owner.into(), now.into()],
            ))
            .await?
            .iter()
            .map(|r| r.try_get::<String>("", "id"))
            .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            return Ok(ids);
        }
        // The same conditions again, in the writing statement: another replica may have claimed
        // some of them since the read.
        let claim = format!(
            "UPDATE workflow_executions SET lease_owner = ?1, lease_expires_at = ?2 \
             WHERE id IN (SELECT value FROM json_each(?4)) AND {} RETURNING id",
            claimable("?1", "?3")
        );
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                claim,
                [
                    owner.into(),
                    until.into(),
                    now.into(),
                    json_text(&Value::from(ids))?.into(),
                ],
            ))
            .await?;
        rows.iter()
            .map(|r| r.try_get::<String>("", "id").map_err(StoreError::from))
            .collect()
    }

    /// Clears a wake-up that a running driver has been told about.
    pub async fn clear_wake(&self, execution_id: &str, owner: &str) -> Result<(), StoreError> {
        execution::Entity::update_many()
            .col_expr(
                execution::Column::WakeAt,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .filter(execution::Column::Id.eq(execution_id))
            .filter(execution::Column::LeaseOwner.eq(owner))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Extends until `until` the leases `owner` holds on `ids` (the executions it is driving).
    pub async fn renew(
        &self,
        owner: &str,
        ids: &[String],
        until: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let postgres = self.db.get_database_backend() == DbBackend::Postgres;
        let mut renewed = 0;
        for chunk in ids.chunks(500) {
            if postgres {
                // The rows are locked in id order, as the group commit locks them: locked in any
                // other order, a renewal and a commit could each hold a row the other waits for.
                let result = self
                    .db
                    .execute_raw(Statement::from_sql_and_values(
                        DbBackend::Postgres,
                        RENEW_POSTGRES,
                        [until.into(), owner.into(), chunk.to_vec().into()],
                    ))
                    .await?;
                renewed += result.rows_affected();
                continue;
            }
            let result = execution::Entity::update_many()
                .col_expr(execution::Column::LeaseExpiresAt, Expr::value(until))
                .filter(execution::Column::LeaseOwner.eq(owner))
                .filter(execution::Column::Id.is_in(chunk.iter().cloned()))
                .exec(&self.db)
                .await?;
            renewed += result.rows_affected;
        }
        Ok(renewed)
    }

    /// Takes the lease of one execution if it is free, expired, or already `owner`'s.
    pub async fn take_lease(
        &self,
        id: &str,
        owner: &str,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        use sea_orm::sea_query::Condition;
        let result = execution::Entity::update_many()
            .col_expr(execution::Column::LeaseOwner, Expr::value(owner))
            .col_expr(execution::Column::LeaseExpiresAt, Expr::value(until))
            .filter(execution::Column::Id.eq(id))
            .filter(
                Condition::any()
                    .add(execution::Column::LeaseOwner.is_null())
                    .add(execution::Column::LeaseOwner.eq(owner))
                    .add(execution::Column::LeaseExpiresAt.lt(self.clock.now())),
            )
            .exec(&self.db)
            .await?;
        Ok(result.rows_affected == 1)
    }
}
