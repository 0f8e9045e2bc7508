//! Storage of webhook subscriptions (sea-orm; SQLite and PostgreSQL alike). Updates are
//! compare-and-set on `revision`; names and `request_id`s are unique.

use std::collections::BTreeMap;

use chrono::Utc;
use meshflow_kit::convert::timestamp;
use meshflow_kit::db::{SelectUnique, is_unique_violation};
use meshflow_kit::request::etag;
use meshflow_proto::webhook::v1 as pb;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};

use crate::entity::{self as webhook, Model};

mod events;

use crate::error::Error;
pub use events::{EventFilter, TEST_EVENT_TYPE, test_payload};

/// Event type that subscribes to every event.
pub const ALL_EVENTS: &str = "*";

/// A registered destination, as a delivery needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Its id.
    pub webhook_id: String,
    /// Its name.
    pub name: String,
    /// Where deliveries are POSTed.
    pub url: String,
    /// The `whsec_` signing secret.
    pub secret: String,
    /// Extra request headers.
    pub headers: BTreeMap<String, String>,
    /// Event types it receives; `*` is all.
    pub event_types: Vec<String>,
    /// Whether it receives deliveries.
    pub status: pb::WebhookStatus,
    /// Why it was disabled.
    pub disabled_reason: String,
}

impl Endpoint {
    /// Whether it receives events of `event_type`.
    pub fn subscribes_to(&self, event_type: &str) -> bool {
        subscribed(&self.event_types, event_type)
    }
}

fn subscribed(event_types: &[String], event_type: &str) -> bool {
    event_types
        .iter()
        .any(|t| t == ALL_EVENTS || t == event_type)
}

/// The webhook store.
#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
}

fn json<T: serde::Serialize>(value: &T) -> Result<serde_json::Value, Error> {
    serde_json::to_value(value).map_err(|e| Error::Internal(format!("encoding a webhook: {e}")))
}

fn status_of(row: &Model) -> pb::WebhookStatus {
    pb::WebhookStatus::from_str_name(&row.status).unwrap_or(pb::WebhookStatus::Active)
}

/// The stored status of a request's: unset means ACTIVE.
fn stored_status(status: i32) -> pb::WebhookStatus {
    match pb::WebhookStatus::try_from(status) {
        Ok(pb::WebhookStatus::Disabled) => pb::WebhookStatus::Disabled,
        _ => pb::WebhookStatus::Active,
    }
}

/// The API form of a row; the secret is left out unless `with_secret`.
fn from_row(row: Model, with_secret: bool) -> Result<pb::Webhook, Error> {
    let decode = |what: &str, e: serde_json::Error| {
        Error::Internal(format!("decoding the {what} of webhook {}: {e}", row.id))
    };
    let event_types: Vec<String> =
        serde_json::from_value(row.event_types.clone()).map_err(|e| decode("event types", e))?;
    let headers = serde_json::from_value(row.headers.clone()).map_err(|e| decode("headers", e))?;
    let status = status_of(&row);
    Ok(pb::Webhook {
        webhook_id: row.id,
        name: row.name,
        url: row.url,
        event_types,
        secret: if with_secret {
            row.secret
        } else {
            String::new()
        },
        status: status as i32,
        disabled_reason: row.disabled_reason.unwrap_or_default(),
        headers,
        description: row.description,
        etag: etag(row.revision),
        create_time: Some(timestamp(row.create_time)),
        update_time: Some(timestamp(row.update_time)),
    })
}

fn disabled_reason(w: &pb::Webhook) -> Option<String> {
    (stored_status(w.status) == pb::WebhookStatus::Disabled).then(|| {
        if w.disabled_reason.is_empty() {
            "disabled by an operator".to_string()
        } else {
            w.disabled_reason.clone()
        }
    })
}

impl Store {
    /// A store over a migrated database.
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    async fn by_request(&self, request_id: &str) -> Result<Option<Model>, Error> {
        Ok(webhook::Entity::find()
            .filter(webhook::Column::RequestId.eq(request_id))
            .unique(&self.db)
            .await?)
    }

    async fn row(&self, id: &str) -> Result<Model, Error> {
        webhook::Entity::find_by_id(id.to_string())
            .unique(&self.db)
            .await?
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// Inserts a validated webhook whose secret is set. The same `request_id` returns the webhook
    /// it created, with its secret.
    pub async fn create(
        &self,
        w: &pb::Webhook,
        request_id: Option<&str>,
    ) -> Result<pb::Webhook, Error> {
        if let Some(rid) = request_id
            && let Some(row) = self.by_request(rid).await?
        {
            return from_row(row, true);
        }
        let now = Utc::now();
        let id = meshflow_kit::id::new_id();
        let inserted = webhook::Entity::insert(webhook::ActiveModel {
            id: Set(id.clone()),
            name: Set(w.name.clone()),
            url: Set(w.url.clone()),
            event_types: Set(json(&w.event_types)?),
            secret: Set(w.secret.clone()),
            status: Set(stored_status(w.status).as_str_name().to_string()),
            disabled_reason: Set(disabled_reason(w)),
            headers: Set(json(&w.headers)?),
            description: Set(w.description.clone()),
            revision: Set(1),
            failing_since: Set(None),
            request_id: Set(request_id.map(str::to_string)),
            create_time: Set(now),
            update_time: Set(now),
        })
        .exec_without_returning(&self.db)
        .await;
        match inserted {
            Err(err) if is_unique_violation(&err) => {
                // A concurrent create with the same request_id won the race: return its webhook.
                if let Some(rid) = request_id
                    && let Some(row) = self.by_request(rid).await?
                {
                    return from_row(row, true);
                }
                Err(Error::NameTaken(w.name.clone()))
            }
            Err(err) => Err(err.into()),
            Ok(_) => from_row(self.row(&id).await?, true),
        }
    }

    /// Reads a webhook, without its secret.
    pub async fn get(&self, id: &str) -> Result<pb::Webhook, Error> {
        from_row(self.row(id).await?, false)
    }

    /// Lists webhooks by name after `after`, at most `limit`; with `event_type`, only those that
    /// receive it.
    pub async fn list(
        &self,
        after: Option<&str>,
        limit: u64,
        event_type: Option<&str>,
    ) -> Result<Vec<pb::Webhook>, Error> {
        // Subscriptions are few and their event types a JSON array: filter here, reading on in
        // batches until the page is full.
        let mut out = Vec::new();
        let mut cursor = after.map(str::to_string);
        loop {
            let mut query = webhook::Entity::find()
                .order_by_asc(webhook::Column::Name)
                .limit(limit);
            if let Some(after) = &cursor {
                query = query.filter(webhook::Column::Name.gt(after.as_str()));
            }
            let rows = query.all(&self.db).await?;
            let exhausted = (rows.len() as u64) < limit;
            cursor = rows.last().map(|r| r.name.clone());
            for row in rows {
                let w = from_row(row, false)?;
                if event_type.is_none_or(|t| subscribed(&w.event_types, t)) {
                    out.push(w);
                    if out.len() as u64 == limit {
                        return Ok(out);
                    }
                }
            }
            if exhausted || event_type.is_none() {
                return Ok(out);
            }
        }
    }

    /// Writes a merged, validated webhook if its revision is still `expected_revision`. The
    /// secret is written only when `new_secret` is set; `status_set` says the request set the
    /// status, which starts the endpoint's failure streak over.
    pub async fn update(
        &self,
        w: &pb::Webhook,
        expected_revision: i64,
        new_secret: bool,
        status_set: bool,
    ) -> Result<pb::Webhook, Error> {
        let mut update = webhook::Entity::update_many()
            .col_expr(webhook::Column::Name, Expr::value(w.name.clone()))
            .col_expr(webhook::Column::Url, Expr::value(w.url.clone()))
            .col_expr(
                webhook::Column::EventTypes,
                Expr::value(json(&w.event_types)?),
            )
            .col_expr(
                webhook::Column::Status,
                Expr::value(stored_status(w.status).as_str_name()),
            )
            .col_expr(
                webhook::Column::DisabledReason,
                Expr::value(disabled_reason(w)),
            )
            .col_expr(webhook::Column::Headers, Expr::value(json(&w.headers)?))
            .col_expr(
                webhook::Column::Description,
                Expr::value(w.description.clone()),
            )
            .col_expr(
                webhook::Column::Revision,
                Expr::value(expected_revision + 1),
            )
            .col_expr(webhook::Column::UpdateTime, Expr::value(Utc::now()));
        if status_set {
            // Set by an operator: failures so far no longer count toward disabling it.
            update = update.col_expr(
                webhook::Column::FailingSince,
                Expr::value(Option::<chrono::DateTime<Utc>>::None),
            );
        }
        if new_secret {
            update = update.col_expr(webhook::Column::Secret, Expr::value(w.secret.clone()));
        }
        let result = update
            .filter(webhook::Column::Id.eq(w.webhook_id.as_str()))
            .filter(webhook::Column::Revision.eq(expected_revision))
            .exec(&self.db)
            .await
            .map_err(|err| {
                if is_unique_violation(&err) {
                    Error::NameTaken(w.name.clone())
                } else {
                    err.into()
                }
            })?;
        if result.rows_affected == 0 {
            self.row(&w.webhook_id).await?;
            return Err(Error::StaleEtag(w.webhook_id.clone()));
        }
        self.get(&w.webhook_id).await
    }

    /// Deletes a webhook; its deliveries go with it.
    pub async fn delete(&self, id: &str) -> Result<(), Error> {
        let deleted = webhook::Entity::delete_by_id(id.to_string())
            .exec(&self.db)
            .await?;
        if deleted.rows_affected == 0 {
            return Err(Error::NotFound(id.to_string()));
        }
        Ok(())
    }

    /// The endpoint a delivery goes to, by webhook id or by name; `None` when none matches.
    pub async fn endpoint(&self, id_or_name: &str) -> Result<Option<Endpoint>, Error> {
        let column = if meshflow_kit::id::is_valid(id_or_name) {
            webhook::Column::Id
        } else {
            webhook::Column::Name
        };
        let Some(row) = webhook::Entity::find()
            .filter(column.eq(id_or_name))
            .unique(&self.db)
            .await?
        else {
            return Ok(None);
        };
        let w = from_row(row, true)?;
        Ok(Some(Endpoint {
            status: pb::WebhookStatus::try_from(w.status).unwrap_or(pb::WebhookStatus::Active),
            webhook_id: w.webhook_id,
            name: w.name,
            url: w.url,
            secret: w.secret,
            headers: w.headers.into_iter().collect(),
            event_types: w.event_types,
            disabled_reason: w.disabled_reason,
        }))
    }
}
