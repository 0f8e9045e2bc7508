//! Webhook events and their delivery attempts: every attempt is kept, with its time, status code
//! (none when no response arrived), latency and a response excerpt or error.

use std::collections::HashMap;

use chrono::{DateTime, SubsecRound, Utc};
use meshflow_kit::convert::{duration, from_json, timestamp};
use meshflow_kit::db::SelectUnique;
use meshflow_proto::webhook::v1 as pb;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, TransactionTrait};
use serde_json::Value;

use super::Store;
use crate::delivery::Attempt;
use crate::entity::{attempt, event};
use crate::error::Error;

/// Filters of [`Store::list_events`].
#[derive(Debug, Default, Clone)]
pub struct EventFilter {
    /// Only events of this webhook.
    pub webhook_id: Option<String>,
    /// Only events in this status.
    pub status: Option<pb::DeliveryStatus>,
}

fn attempt_from_row(row: attempt::Model) -> pb::DeliveryAttempt {
    pb::DeliveryAttempt {
        attempt: u32::try_from(row.attempt).unwrap_or_default(),
        time: Some(timestamp(row.time)),
        response_code: row
            .response_code
            .and_then(|c| u32::try_from(c).ok())
            .unwrap_or(0),
        latency: row
            .latency_ms
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| duration(std::time::Duration::from_millis(ms))),
        error: row.error.unwrap_or_default(),
    }
}

fn event_from_row(row: event::Model, attempts: Vec<attempt::Model>) -> pb::WebhookEvent {
    let status =
        pb::DeliveryStatus::from_str_name(&row.status).unwrap_or(pb::DeliveryStatus::Unspecified);
    pb::WebhookEvent {
        webhook_event_id: row.id,
        webhook_id: row.webhook_id,
        event_type: row.event_type,
        payload: Some(from_json(&row.payload)),
        status: status as i32,
        attempts: attempts.into_iter().map(attempt_from_row).collect(),
        next_attempt_time: row.next_attempt_at.map(timestamp),
        create_time: Some(timestamp(row.create_time)),
    }
}

/// The row of an attempt.
fn attempt_row(event_id: &str, number: i32, a: &Attempt) -> attempt::Model {
    let (response_code, error) = match &a.result {
        Ok(r) => (Some(i32::from(r.status)), Some(r.excerpt.clone())),
        Err(f) => (None, Some(f.to_string())),
    };
    attempt::Model {
        webhook_event_id: event_id.to_string(),
        attempt: number,
        // To the microsecond, the finest time every backend stores: the attempt answered is the
        // attempt read back.
        time: a.time.trunc_subsecs(6),
        response_code,
        latency_ms: Some(i64::try_from(a.latency.as_millis()).unwrap_or(i64::MAX)),
        error: error.filter(|e| !e.is_empty()),
    }
}

impl Store {
    /// Records a new event for a webhook, before its first attempt.
    pub async fn record_event(
        &self,
        webhook_id: &str,
        event_type: &str,
        payload: &Value,
        now: DateTime<Utc>,
    ) -> Result<event::Model, Error> {
        let row = event::Model {
            id: meshflow_kit::id::new_id(),
            webhook_id: webhook_id.to_string(),
            event_type: event_type.to_string(),
            payload: payload.clone(),
            status: pb::DeliveryStatus::Pending.as_str_name().to_string(),
            attempt_count: 0,
            next_attempt_at: None,
            create_time: now,
            update_time: now,
        };
        event::Entity::insert(event::ActiveModel::from(row.clone()))
            .exec_without_returning(&self.db)
            .await?;
        Ok(row)
    }

    /// Keeps an attempt of an event and sets the event's status from it: SUCCEEDED when the
    /// endpoint took it, FAILED otherwise (no further attempt is scheduled here). Returns the
    /// attempt as stored.
    pub async fn record_attempt(
        &self,
        event_id: &str,
        a: &Attempt,
    ) -> Result<pb::DeliveryAttempt, Error> {
        let txn = self.db.begin().await?;
        let current = event::Entity::find_by_id(event_id.to_string())
            .unique(&txn)
            .await?
            .ok_or_else(|| Error::EventNotFound(event_id.to_string()))?;
        let number = current.attempt_count + 1;
        let row = attempt_row(event_id, number, a);
        attempt::Entity::insert(attempt::ActiveModel::from(row.clone()))
            .exec_without_returning(&txn)
            .await?;
        let status = if a.accepted() {
            pb::DeliveryStatus::Succeeded
        } else {
            pb::DeliveryStatus::Failed
        };
        event::Entity::update_many()
            .col_expr(event::Column::AttemptCount, Expr::value(number))
            .col_expr(event::Column::Status, Expr::value(status.as_str_name()))
            .col_expr(
                event::Column::NextAttemptAt,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .col_expr(event::Column::UpdateTime, Expr::value(a.time))
            .filter(event::Column::Id.eq(event_id))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(attempt_from_row(row))
    }

    /// The ids of a webhook's events that wait to be delivered (PENDING or RETRYING), oldest first.
    pub async fn undelivered(&self, webhook_id: &str) -> Result<Vec<String>, Error> {
        let waiting =
            [pb::DeliveryStatus::Pending, pb::DeliveryStatus::Retrying].map(|s| s.as_str_name());
        Ok(event::Entity::find()
            .select_only()
            .column(event::Column::Id)
            .filter(event::Column::WebhookId.eq(webhook_id))
            .filter(event::Column::Status.is_in(waiting))
            .order_by_asc(event::Column::Id)
            .into_tuple()
            .all(&self.db)
            .await?)
    }

    /// An event's row, if any.
    pub async fn event_row(&self, id: &str) -> Result<Option<event::Model>, Error> {
        Ok(event::Entity::find_by_id(id.to_string())
            .unique(&self.db)
            .await?)
    }

    /// An event with every attempt.
    pub async fn event(&self, id: &str) -> Result<pb::WebhookEvent, Error> {
        let row = self
            .event_row(id)
            .await?
            .ok_or_else(|| Error::EventNotFound(id.to_string()))?;
        let attempts = attempt::Entity::find()
            .filter(attempt::Column::WebhookEventId.eq(id))
            .order_by_asc(attempt::Column::Attempt)
            .all(&self.db)
            .await?;
        Ok(event_from_row(row, attempts))
    }

    /// Events newest first, before the cursor id, at most `limit`, with their attempts.
    pub async fn list_events(
        &self,
        filter: &EventFilter,
        before: Option<&str>,
        limit: u64,
    ) -> Result<Vec<pb::WebhookEvent>, Error> {
        let mut query = event::Entity::find()
            .order_by_desc(event::Column::Id)
            .limit(limit);
        if let Some(before) = before {
            query = query.filter(event::Column::Id.lt(before));
        }
        if let Some(w) = &filter.webhook_id {
            query = query.filter(event::Column::WebhookId.eq(w.as_str()));
        }
        if let Some(s) = filter.status {
            query = query.filter(event::Column::Status.eq(s.as_str_name()));
        }
        let rows = query.all(&self.db).await?;
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let mut attempts: HashMap<String, Vec<attempt::Model>> = HashMap::new();
        if !ids.is_empty() {
            for a in attempt::Entity::find()
                .filter(attempt::Column::WebhookEventId.is_in(ids))
                .order_by_asc(attempt::Column::Attempt)
                .all(&self.db)
                .await?
            {
                attempts
                    .entry(a.webhook_event_id.clone())
                    .or_default()
                    .push(a);
            }
        }
        Ok(rows
            .into_iter()
            .map(|row| {
                let mine = attempts.remove(&row.id).unwrap_or_default();
                event_from_row(row, mine)
            })
            .collect())
    }
}

/// The `data` of a `webhook.test` event.
pub fn test_payload(webhook_id: &str) -> Value {
    serde_json::json!({"webhookId": webhook_id, "test": true})
}

/// The event type TestWebhook sends.
pub const TEST_EVENT_TYPE: &str = "webhook.test";
