//! Signals: stored for an execution (user signals and cancellations), found and consumed by the
//! engine that drives it.

use super::*;

impl Store {
    /// Records a signal for an execution; a repeated `request_id` records nothing. Wakes the execution.
    pub async fn add_signal(
        &self,
        execution_id: &str,
        name: &str,
        payload: Value,
        request_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let txn = self.db.begin().await?;
        let inserted = signal::Entity::insert(signal::ActiveModel {
            id: Set(meshflow_kit::id::new_id()),
            execution_id: Set(execution_id.to_string()),
            name: Set(name.to_string()),
            payload: Set(payload),
            request_id: Set(request_id.map(str::to_string)),
            receive_time: Set(now),
            consumed_by: Set(None),
        })
        .exec_without_returning(&txn)
        .await;
        match inserted {
            Err(err) if meshflow_kit::db::is_unique_violation(&err) => {
                return Ok(false);
            }
            other => {
                other?;
            }
        }
        execution::Entity::update_many()
            .col_expr(execution::Column::WakeAt, Expr::value(now))
            .filter(execution::Column::Id.eq(execution_id))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(true)
    }

    /// Whether a signal with this `request_id` was already recorded for the execution.
    pub async fn signal_recorded(
        &self,
        execution_id: &str,
        request_id: &str,
    ) -> Result<bool, StoreError> {
        Ok(signal::Entity::find()
            .filter(signal::Column::ExecutionId.eq(execution_id))
            .filter(signal::Column::RequestId.eq(request_id))
            .unique(&self.db)
            .await?
            .is_some())
    }

    /// Whether any signal (a user signal or a cancellation) is waiting to be consumed.
    pub async fn has_pending_signal(&self, execution_id: &str) -> Result<bool, StoreError> {
        if let Some(reader) = self.sqlite_reader().await? {
            return reader.has_pending_signal(execution_id);
        }
        Ok(signal::Entity::find()
            .filter(signal::Column::ExecutionId.eq(execution_id))
            .filter(signal::Column::ConsumedBy.is_null())
            .one(&self.db)
            .await?
            .is_some())
    }

    /// The unconsumed signals of the executions `owner` holds the lease of, oldest first. Read from
    /// the index of pending signals, each checked against its execution's row.
    pub async fn signalled(&self, owner: &str) -> Result<Vec<signal::Model>, StoreError> {
        let backend = self.db.get_database_backend();
        let p = if backend == DbBackend::Postgres {
            "$1"
        } else {
            "?1"
        };
        let sql = format!(
            "SELECT s.* FROM execution_signals AS s \
             JOIN workflow_executions AS e ON e.id = s.execution_id \
             WHERE s.consumed_by IS NULL AND e.lease_owner = {p}"
        );
        // Sorted here: an ORDER BY would have SQLite walk every signal in id order instead.
        let mut signals = signal::Entity::find()
            .from_raw_sql(Statement::from_sql_and_values(backend, sql, [owner.into()]))
            .all(&self.db)
            .await?;
        signals.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(signals)
    }

    /// The oldest unconsumed signal of a name.
    pub async fn pending_signal(
        &self,
        execution_id: &str,
        name: &str,
    ) -> Result<Option<signal::Model>, StoreError> {
        Ok(signal::Entity::find()
            .filter(signal::Column::ExecutionId.eq(execution_id))
            .filter(signal::Column::Name.eq(name))
            .filter(signal::Column::ConsumedBy.is_null())
            .order_by_asc(signal::Column::Id)
            .one(&self.db)
            .await?)
    }

    /// Requests cancellation: wakes the execution so its driver sees it. The driver writes the outcome.
    pub async fn wake(&self, execution_id: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        execution::Entity::update_many()
            .col_expr(execution::Column::WakeAt, Expr::value(now))
            .filter(execution::Column::Id.eq(execution_id))
            .exec(&self.db)
            .await?;
        Ok(())
    }
}
