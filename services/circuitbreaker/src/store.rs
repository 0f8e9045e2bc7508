//! The breakers in the database, shared by every replica. A change reads a breaker, runs the state
//! machine on it, and writes it back only if its version is still the one read
//! (compare-and-set); when another replica wrote first, it reads again and runs again, so every
//! change is decided on the latest state. The transitions a change makes are written in the same
//! transaction as the breaker.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use meshflow_kit::clock::Clock;
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, TransactionTrait,
};

use crate::entity::{self, transition};
use crate::machine::{Breaker, Config, Probes, Reason, State, Transition};
use crate::window::Window;

/// What can go wrong reading or writing breakers.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),
    /// A stored value is not what this version writes.
    #[error("circuit breaker {service_id}: {message}")]
    Corrupt {
        /// The breaker.
        service_id: String,
        /// What is wrong.
        message: String,
    },
    /// Other replicas kept changing the breaker: no write got through.
    #[error("circuit breaker {0} changed {ATTEMPTS} times while it was being changed")]
    Contended(String),
}

/// Reads and writes a change may take before giving up under contention.
const ATTEMPTS: usize = 64;

/// A breaker as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The downstream service it guards.
    pub service_id: String,
    /// Its state and window.
    pub breaker: Breaker,
    /// Its configuration.
    pub config: Config,
    /// The version the next write compares with.
    pub version: i64,
    /// When it was last written.
    pub update_time: DateTime<Utc>,
}

/// A transition as the history keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// Position in the history: later transitions have larger ids.
    pub id: i64,
    /// The breaker.
    pub service_id: String,
    /// The change.
    pub transition: Transition,
    /// The breaker's generation after it.
    pub generation: i64,
}

/// Filters of [`Store::list`].
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only breakers in this state.
    pub state: Option<State>,
    /// Only breakers whose service id starts with this.
    pub prefix: String,
    /// Only breakers after this service id (paging).
    pub after: Option<String>,
}

/// The breakers' tables.
#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
    clock: Arc<dyn Clock>,
}

fn corrupt(service_id: &str, message: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        service_id: service_id.to_string(),
        message: message.to_string(),
    }
}

fn count(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

fn column(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn from_row(row: entity::Model) -> Result<Stored, StoreError> {
    let id = row.service_id.as_str();
    let state = State::parse(&row.state).ok_or_else(|| corrupt(id, "unknown state"))?;
    let config: Config = serde_json::from_value(row.config).map_err(|e| corrupt(id, e))?;
    let window: Window = serde_json::from_value(row.buckets).map_err(|e| corrupt(id, e))?;
    Ok(Stored {
        breaker: Breaker {
            state,
            generation: row.generation,
            state_enter_time: row.state_entered_at,
            open_until: row.open_until,
            consecutive_opens: count(row.consecutive_opens),
            probes: Probes {
                admitted: count(row.half_open_admitted),
                succeeded: count(row.half_open_successes),
                failed: count(row.half_open_failures),
                slow: count(row.half_open_slow_calls),
            },
            window,
            not_permitted: row.not_permitted_calls,
        },
        config,
        version: row.version,
        update_time: row.update_time,
        service_id: row.service_id,
    })
}

fn to_row(
    service_id: &str,
    b: &Breaker,
    config: &Config,
    version: i64,
    now: DateTime<Utc>,
) -> Result<entity::ActiveModel, StoreError> {
    let json = |v: serde_json::Result<serde_json::Value>| v.map_err(|e| corrupt(service_id, e));
    Ok(entity::ActiveModel {
        service_id: Set(service_id.to_string()),
        config: Set(json(serde_json::to_value(config))?),
        state: Set(b.state.as_str().to_string()),
        generation: Set(b.generation),
        version: Set(version),
        state_entered_at: Set(b.state_enter_time),
        open_until: Set(b.open_until),
        consecutive_opens: Set(column(b.consecutive_opens)),
        half_open_admitted: Set(column(b.probes.admitted)),
        half_open_successes: Set(column(b.probes.succeeded)),
        half_open_failures: Set(column(b.probes.failed)),
        half_open_slow_calls: Set(column(b.probes.slow)),
        buckets: Set(json(serde_json::to_value(&b.window))?),
        not_permitted_calls: Set(b.not_permitted),
        update_time: Set(now),
    })
}

impl Store {
    /// The store over a migrated database, reading the time from `clock`.
    pub fn new(db: DatabaseConnection, clock: Arc<dyn Clock>) -> Self {
        Self { db, clock }
    }

    /// The clock breakers are judged by.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The breaker, if it exists.
    pub async fn get(&self, service_id: &str) -> Result<Option<Stored>, StoreError> {
        entity::Entity::find_by_id(service_id)
            .one(&self.db)
            .await?
            .map(from_row)
            .transpose()
    }

    /// Breakers by service id, at most `limit`.
    pub async fn list(&self, filter: &Filter, limit: u64) -> Result<Vec<Stored>, StoreError> {
        let mut query = entity::Entity::find().order_by_asc(entity::Column::ServiceId);
        if let Some(state) = filter.state {
            query = query.filter(entity::Column::State.eq(state.as_str()));
        }
        if !filter.prefix.is_empty() {
            query = query.filter(entity::Column::ServiceId.starts_with(&filter.prefix));
        }
        if let Some(after) = &filter.after {
            query = query.filter(entity::Column::ServiceId.gt(after.as_str()));
        }
        query
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(from_row)
            .collect()
    }

    /// Creates the breaker with `config` unless it exists.
    async fn create(&self, service_id: &str, config: &Config) -> Result<(), StoreError> {
        let now = self.clock.now();
        let row = to_row(service_id, &Breaker::new(config, now), config, 1, now)?;
        entity::Entity::insert(row)
            .on_conflict(
                OnConflict::column(entity::Column::ServiceId)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await?;
        Ok(())
    }

    /// Runs `change` on the latest state of the breaker (created with `config` if missing) and
    /// stores what it did, compare-and-set: if another replica wrote in between, it runs again on
    /// what that one wrote. `change` gets the breaker, its config and the time, and pushes the
    /// transitions it made. Returns its result, the breaker as stored, and the transitions.
    pub async fn change<R>(
        &self,
        service_id: &str,
        config: &Config,
        mut change: impl FnMut(&mut Breaker, &mut Config, DateTime<Utc>, &mut Vec<Transition>) -> R,
    ) -> Result<(R, Stored, Vec<Transition>), StoreError> {
        for _ in 0..ATTEMPTS {
            let stored = match self.get(service_id).await? {
                Some(s) => s,
                None => {
                    self.create(service_id, config).await?;
                    continue;
                }
            };
            let now = self.clock.now();
            let mut breaker = stored.breaker.clone();
            let mut config = stored.config.clone();
            let mut transitions = Vec::new();
            let result = change(&mut breaker, &mut config, now, &mut transitions);
            if breaker == stored.breaker && config == stored.config {
                return Ok((result, stored, transitions));
            }
            let version = stored.version + 1;
            let row = to_row(service_id, &breaker, &config, version, now)?;
            let txn = self.db.begin().await?;
            let written = entity::Entity::update_many()
                .set(row)
                .filter(entity::Column::ServiceId.eq(service_id))
                .filter(entity::Column::Version.eq(stored.version))
                .exec(&txn)
                .await?
                .rows_affected;
            if written == 0 {
                txn.rollback().await?;
                continue;
            }
            record(&txn, service_id, &transitions, breaker.generation).await?;
            txn.commit().await?;
            let stored = Stored {
                service_id: service_id.to_string(),
                breaker,
                config,
                version,
                update_time: now,
            };
            return Ok((result, stored, transitions));
        }
        Err(StoreError::Contended(service_id.to_string()))
    }

    /// Deletes the breaker; whether it existed. Its permits become stale: a breaker made anew
    /// starts a generation later than any the deleted one reached.
    pub async fn delete(&self, service_id: &str) -> Result<bool, StoreError> {
        let deleted = entity::Entity::delete_by_id(service_id)
            .exec(&self.db)
            .await?
            .rows_affected;
        Ok(deleted > 0)
    }

    /// Transitions after `after` (a [`Recorded::id`]), oldest first, at most `limit`.
    pub async fn transitions_after(
        &self,
        after: i64,
        limit: u64,
    ) -> Result<Vec<Recorded>, StoreError> {
        transition::Entity::find()
            .filter(transition::Column::Id.gt(after))
            .order_by_asc(transition::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|row| {
                let id = row.service_id.as_str();
                let state = |s: &str| State::parse(s).ok_or_else(|| corrupt(id, "unknown state"));
                Ok(Recorded {
                    id: row.id,
                    transition: Transition {
                        from: state(&row.from_state)?,
                        to: state(&row.to_state)?,
                        reason: Reason::parse(&row.reason)
                            .ok_or_else(|| corrupt(id, "unknown reason"))?,
                        time: row.time,
                    },
                    generation: row.generation,
                    service_id: row.service_id,
                })
            })
            .collect()
    }

    /// The id of the latest transition (0 when there is none): a watcher starts after it.
    pub async fn last_transition(&self) -> Result<i64, StoreError> {
        Ok(transition::Entity::find()
            .order_by_desc(transition::Column::Id)
            .one(&self.db)
            .await?
            .map_or(0, |t| t.id))
    }
}

/// Writes the history rows of `transitions`.
async fn record(
    db: &impl ConnectionTrait,
    service_id: &str,
    transitions: &[Transition],
    generation: i64,
) -> Result<(), StoreError> {
    if transitions.is_empty() {
        return Ok(());
    }
    let rows = transitions.iter().map(|t| transition::ActiveModel {
        service_id: Set(service_id.to_string()),
        from_state: Set(t.from.as_str().to_string()),
        to_state: Set(t.to.as_str().to_string()),
        reason: Set(t.reason.as_str().to_string()),
        time: Set(t.time),
        generation: Set(generation),
        ..Default::default()
    });
    transition::Entity::insert_many(rows)
        .exec_without_returning(db)
        .await?;
    Ok(())
}
