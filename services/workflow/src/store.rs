//! Storage of workflows, their versions, templates and transformation rules (sea-orm; SQLite and
//! PostgreSQL alike). Definitions are stored as their proto3 JSON, which the contract keeps stable.
//! Every write that spans rows runs in one transaction; updates are compare-and-set on `revision`.

use chrono::Utc;
use meshflow_kit::convert::timestamp;
use meshflow_kit::db::{SelectUnique, is_unique_violation};
use meshflow_proto::workflow::v1 as pb;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, DatabaseConnection, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, QueryTrait, TransactionTrait,
};

use crate::error::Error;

pub mod entity;
pub mod head;

use entity::{rule, template, template_tag, version, workflow, workflow_tag};

/// Filters of [`Store::list_workflows`].
#[derive(Debug, Default, Clone)]
pub struct WorkflowFilter {
    /// Only this status (stored name), when set.
    pub status: Option<String>,
    /// Only workflows with this tag.
    pub tag: Option<String>,
    /// Only names containing this text.
    pub name_contains: Option<String>,
}

/// The executable part of a workflow, the content of one immutable version.
#[derive(Debug, Clone, PartialEq)]
pub struct Definition(pub pb::WorkflowVersion);

impl Definition {
    /// Takes the versioned fields of a workflow.
    pub fn of(w: &pb::Workflow) -> Self {
        Self(pb::WorkflowVersion {
            workflow_id: String::new(),
            version: 0,
            steps: w.steps.clone(),
            input_schema: w.input_schema.clone(),
            variables: w.variables.clone(),
            timeout: w.timeout,
            default_retry_policy: w.default_retry_policy.clone(),
            create_time: None,
        })
    }

    fn to_json(&self) -> Result<serde_json::Value, Error> {
        serde_json::to_value(&self.0)
            .map_err(|e| Error::Internal(format!("encoding a definition: {e}")))
    }

    fn from_row(row: version::Model) -> Result<pb::WorkflowVersion, Error> {
        let mut v: pb::WorkflowVersion = serde_json::from_value(row.definition).map_err(|e| {
            Error::Internal(format!(
                "decoding version {} of {}: {e}",
                row.version, row.workflow_id
            ))
        })?;
        v.workflow_id = row.workflow_id;
        v.version = row.version;
        v.create_time = Some(timestamp(row.create_time));
        Ok(v)
    }
}

pub use meshflow_kit::request::{etag, parse_etag};

/// A rename's error: a unique-constraint violation means another `kind` has the name already.
fn name_taken_or(err: DbErr, kind: &'static str, name: &str) -> Error {
    if is_unique_violation(&err) {
        Error::NameTaken {
            kind,
            name: name.to_string(),
        }
    } else {
        err.into()
    }
}

/// `LIKE` pattern matching `text` anywhere, with `%`, `_` and `\` escaped.
fn contains_pattern(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

/// Assembles the API form of a workflow from its rows.
fn assemble(
    row: workflow::Model,
    tags: Vec<String>,
    version: pb::WorkflowVersion,
) -> Result<pb::Workflow, Error> {
    let triggers: Vec<pb::Trigger> = serde_json::from_value(row.triggers)
        .map_err(|e| Error::Internal(format!("decoding triggers of {}: {e}", row.id)))?;
    let status =
        pb::WorkflowStatus::from_str_name(&row.status).unwrap_or(pb::WorkflowStatus::Unspecified);
    Ok(pb::Workflow {
        workflow_id: row.id,
        name: row.name,
        description: row.description,
        version: version.version,
        status: status as i32,
        steps: version.steps,
        input_schema: version.input_schema,
        variables: version.variables,
        timeout: version.timeout,
        default_retry_policy: version.default_retry_policy,
        triggers,
        tags,
        etag: etag(row.revision),
        create_time: Some(timestamp(row.create_time)),
        update_time: Some(timestamp(row.update_time)),
    })
}

/// What a workflow update writes.
pub struct WorkflowUpdate {
    /// The revision read before merging; the update fails with a stale etag if it changed.
    pub expected_revision: i64,
    /// The merged workflow (validated).
    pub workflow: pb::Workflow,
    /// Whether the executable definition changed (a new version is made).
    pub new_version: bool,
}

/// The workflow-definition store.
#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
}

impl Store {
    /// A store over a migrated database.
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// The connection.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    // ---------------------------------------------------------------- workflows

    /// The workflow created by `request_id`, if any.
    pub async fn workflow_by_request(
        &self,
        request_id: &str,
    ) -> Result<Option<pb::Workflow>, Error> {
        let row = workflow::Entity::find()
            .filter(workflow::Column::RequestId.eq(request_id))
            .filter(workflow::Column::DeleteTime.is_null())
            .unique(&self.db)
            .await?;
        match row {
            Some(row) => self.get_workflow(&row.id, 0).await.map(Some),
            None => Ok(None),
        }
    }

    /// Inserts a validated workflow at version 1.
    pub async fn create_workflow(
        &self,
        w: &pb::Workflow,
        request_id: Option<&str>,
    ) -> Result<pb::Workflow, Error> {
        let id = meshflow_kit::id::new_id();
        let now = Utc::now();
        let definition = Definition::of(w).to_json()?;
        let triggers =
            serde_json::to_value(&w.triggers).map_err(|e| Error::Internal(e.to_string()))?;
        let status = pb::WorkflowStatus::try_from(w.status)
            .ok()
            .filter(|s| *s != pb::WorkflowStatus::Unspecified)
            .unwrap_or(pb::WorkflowStatus::Draft);

        let txn = self.db.begin().await?;
        let inserted = workflow::Entity::insert(workflow::ActiveModel {
            id: Set(id.clone()),
            name: Set(w.name.clone()),
            description: Set(w.description.clone()),
            status: Set(status.as_str_name().to_string()),
            current_version: Set(1),
            triggers: Set(triggers),
            revision: Set(1),
            request_id: Set(request_id.map(str::to_string)),
            create_time: Set(now),
            update_time: Set(now),
            delete_time: Set(None),
        })
        .exec_without_returning(&txn)
        .await;
        if let Err(err) = inserted {
            drop(txn);
            if is_unique_violation(&err) {
                // Either the name is taken or a concurrent retry with the same request_id won the race.
                if let Some(rid) = request_id
                    && let Some(existing) = self.workflow_by_request(rid).await?
                {
                    return Ok(existing);
                }
                return Err(Error::NameTaken {
                    kind: "workflow",
                    name: w.name.clone(),
                });
            }
            return Err(err.into());
        }
        insert_tags(&txn, &id, &w.tags).await?;
        version::Entity::insert(version::ActiveModel {
            workflow_id: Set(id.clone()),
            version: Set(1),
            definition: Set(definition),
            create_time: Set(now),
        })
        .exec_without_returning(&txn)
        .await?;
        txn.commit().await?;
        self.get_workflow(&id, 0).await
    }

    /// Reads a workflow at its current version (`version == 0`) or a given one.
    pub async fn get_workflow(&self, id: &str, version_no: i64) -> Result<pb::Workflow, Error> {
        let row = workflow::Entity::find_by_id(id.to_string())
            .filter(workflow::Column::DeleteTime.is_null())
            .unique(&self.db)
            .await?
            .ok_or_else(|| Error::WorkflowNotFound(id.to_string()))?;
        let wanted = if version_no == 0 {
            row.current_version
        } else {
            version_no
        };
        let version_row = version::Entity::find_by_id((id.to_string(), wanted))
            .unique(&self.db)
            .await?
            .ok_or_else(|| Error::VersionNotFound {
                id: id.to_string(),
                version: version_no,
            })?;
        let tags = self
            .tags_of(&[id.to_string()])
            .await?
            .remove(id)
            .unwrap_or_default();
        assemble(row, tags, Definition::from_row(version_row)?)
    }

    async fn tags_of(
        &self,
        ids: &[String],
    ) -> Result<std::collections::HashMap<String, Vec<String>>, Error> {
        let rows = workflow_tag::Entity::find()
            .filter(workflow_tag::Column::WorkflowId.is_in(ids.iter().cloned()))
            .order_by_asc(workflow_tag::Column::Tag)
            .all(&self.db)
            .await?;
        let mut out: std::collections::HashMap<String, Vec<String>> =
            std::collections::HashMap::new();
        for r in rows {
            out.entry(r.workflow_id).or_default().push(r.tag);
        }
        Ok(out)
    }

    /// Lists workflows by name after `after` (exclusive), at most `limit`.
    pub async fn list_workflows(
        &self,
        filter: &WorkflowFilter,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<pb::Workflow>, Error> {
        let mut query = workflow::Entity::find()
            .filter(workflow::Column::DeleteTime.is_null())
            .order_by_asc(workflow::Column::Name)
            .limit(limit);
        if let Some(after) = after {
            query = query.filter(workflow::Column::Name.gt(after));
        }
        if let Some(status) = &filter.status {
            query = query.filter(workflow::Column::Status.eq(status.as_str()));
        }
        if let Some(text) = &filter.name_contains {
            query = query.filter(
                Expr::col(workflow::Column::Name)
                    .like(sea_orm::sea_query::LikeExpr::new(contains_pattern(text)).escape('\\')),
            );
        }
        if let Some(tag) = &filter.tag {
            let tagged = workflow_tag::Entity::find()
                .select_only()
                .column(workflow_tag::Column::WorkflowId)
                .filter(workflow_tag::Column::Tag.eq(tag.as_str()))
                .into_query();
            query = query.filter(workflow::Column::Id.in_subquery(tagged));
        }
        let rows = query.all(&self.db).await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let mut tags = self.tags_of(&ids).await?;
        let mut wanted = Condition::any();
        for r in &rows {
            wanted = wanted.add(
                Condition::all()
                    .add(version::Column::WorkflowId.eq(r.id.as_str()))
                    .add(version::Column::Version.eq(r.current_version)),
            );
        }
        let mut versions: std::collections::HashMap<String, version::Model> =
            version::Entity::find()
                .filter(wanted)
                .all(&self.db)
                .await?
                .into_iter()
                .map(|v| (v.workflow_id.clone(), v))
                .collect();
        rows.into_iter()
            .map(|row| {
                let v = versions.remove(&row.id).ok_or_else(|| {
                    Error::Internal(format!("workflow {} has no current version", row.id))
                })?;
                let t = tags.remove(&row.id).unwrap_or_default();
                assemble(row, t, Definition::from_row(v)?)
            })
            .collect()
    }

    /// Writes a merged, validated workflow if its revision is still `expected_revision`.
    pub async fn update_workflow(&self, update: WorkflowUpdate) -> Result<pb::Workflow, Error> {
        let w = &update.workflow;
        let id = w.workflow_id.clone();
        let now = Utc::now();
        let triggers =
            serde_json::to_value(&w.triggers).map_err(|e| Error::Internal(e.to_string()))?;
        let status = pb::WorkflowStatus::try_from(w.status).unwrap_or(pb::WorkflowStatus::Draft);
        let next_version = if update.new_version {
            w.version + 1
        } else {
            w.version
        };

        let txn = self.db.begin().await?;
        let result = workflow::Entity::update_many()
            .col_expr(workflow::Column::Name, Expr::value(w.name.clone()))
            .col_expr(
                workflow::Column::Description,
                Expr::value(w.description.clone()),
            )
            .col_expr(workflow::Column::Status, Expr::value(status.as_str_name()))
            .col_expr(workflow::Column::Triggers, Expr::value(triggers))
            .col_expr(workflow::Column::CurrentVersion, Expr::value(next_version))
            .col_expr(
                workflow::Column::Revision,
                Expr::value(update.expected_revision + 1),
            )
            .col_expr(workflow::Column::UpdateTime, Expr::value(now))
            .filter(workflow::Column::Id.eq(id.as_str()))
            .filter(workflow::Column::Revision.eq(update.expected_revision))
            .filter(workflow::Column::DeleteTime.is_null())
            .exec(&txn)
            .await
            .map_err(|err| name_taken_or(err, "workflow", &w.name))?;
        if result.rows_affected == 0 {
            return Err(Error::StaleEtag {
                kind: "workflow",
                id,
            });
        }
        workflow_tag::Entity::delete_many()
            .filter(workflow_tag::Column::WorkflowId.eq(id.as_str()))
            .exec(&txn)
            .await?;
        insert_tags(&txn, &id, &w.tags).await?;
        if update.new_version {
            version::Entity::insert(version::ActiveModel {
                workflow_id: Set(id.clone()),
                version: Set(next_version),
                definition: Set(Definition::of(w).to_json()?),
                create_time: Set(now),
            })
            .exec_without_returning(&txn)
            .await?;
        }
        txn.commit().await?;
        self.get_workflow(&id, 0).await
    }

    /// Deletes a workflow: it is no longer read, listed, updated or started, and its name is free,
    /// but its row stays, marked, so its versions, executions and metrics stay readable.
    /// `expected_revision` makes it conditional.
    pub async fn delete_workflow(
        &self,
        id: &str,
        expected_revision: Option<i64>,
    ) -> Result<(), Error> {
        let now = Utc::now();
        let mut delete = workflow::Entity::update_many()
            // Names are unique among all rows: a deleted workflow's becomes `~` and its id, which
            // no workflow name can be (names start with a letter), so the name is free again.
            .col_expr(workflow::Column::Name, Expr::value(format!("~{id}")))
            .col_expr(
                workflow::Column::RequestId,
                Expr::value(Option::<String>::None),
            )
            .col_expr(workflow::Column::DeleteTime, Expr::value(now))
            .col_expr(
                workflow::Column::Revision,
                Expr::col(workflow::Column::Revision).add(1),
            )
            .col_expr(workflow::Column::UpdateTime, Expr::value(now))
            .filter(workflow::Column::Id.eq(id))
            .filter(workflow::Column::DeleteTime.is_null());
        if let Some(revision) = expected_revision {
            delete = delete.filter(workflow::Column::Revision.eq(revision));
        }
        if delete.exec(&self.db).await?.rows_affected == 0 {
            let exists = workflow::Entity::find_by_id(id.to_string())
                .filter(workflow::Column::DeleteTime.is_null())
                .unique(&self.db)
                .await?
                .is_some();
            return Err(if exists {
                Error::StaleEtag {
                    kind: "workflow",
                    id: id.to_string(),
                }
            } else {
                Error::WorkflowNotFound(id.to_string())
            });
        }
        Ok(())
    }

    /// Whether a workflow exists or existed (deleted workflows keep their history): `None` when
    /// no workflow ever had this id, else whether it is deleted.
    pub async fn workflow_deleted(&self, id: &str) -> Result<Option<bool>, Error> {
        Ok(workflow::Entity::find_by_id(id.to_string())
            .unique(&self.db)
            .await?
            .map(|r| r.delete_time.is_some()))
    }

    /// The revision behind a workflow's etag.
    pub async fn workflow_revision(&self, id: &str) -> Result<i64, Error> {
        workflow::Entity::find_by_id(id.to_string())
            .filter(workflow::Column::DeleteTime.is_null())
            .unique(&self.db)
            .await?
            .map(|r| r.revision)
            .ok_or_else(|| Error::WorkflowNotFound(id.to_string()))
    }

    /// One immutable version of a workflow.
    pub async fn version(&self, id: &str, version_no: i64) -> Result<pb::WorkflowVersion, Error> {
        let row = version::Entity::find_by_id((id.to_string(), version_no))
            .unique(&self.db)
            .await?
            .ok_or_else(|| Error::VersionNotFound {
                id: id.to_string(),
                version: version_no,
            })?;
        Definition::from_row(row)
    }

    /// Versions of a workflow, newest first, below `before` (exclusive), at most `limit`.
    pub async fn list_versions(
        &self,
        id: &str,
        before: Option<i64>,
        limit: u64,
    ) -> Result<Vec<pb::WorkflowVersion>, Error> {
        self.workflow_revision(id).await?;
        let mut query = version::Entity::find()
            .filter(version::Column::WorkflowId.eq(id))
            .order_by_desc(version::Column::Version)
            .limit(limit);
        if let Some(before) = before {
            query = query.filter(version::Column::Version.lt(before));
        }
        query
            .all(&self.db)
            .await?
            .into_iter()
            .map(Definition::from_row)
            .collect()
    }

    // ---------------------------------------------------------------- templates

    /// Inserts a validated template; the same `request_id` returns the template it created.
    pub async fn create_template(
        &self,
        t: &pb::WorkflowTemplate,
        request_id: Option<&str>,
    ) -> Result<pb::WorkflowTemplate, Error> {
        if let Some(rid) = request_id
            && let Some(row) = template::Entity::find()
                .filter(template::Column::RequestId.eq(rid))
                .unique(&self.db)
                .await?
        {
            return self.get_template(&row.id).await;
        }
        let id = meshflow_kit::id::new_id();
        let txn = self.db.begin().await?;
        let inserted =
            template::Entity::insert(template::ActiveModel {
                id: Set(id.clone()),
                name: Set(t.name.clone()),
                description: Set(t.description.clone()),
                parameters: Set(serde_json::to_value(&t.parameters)
                    .map_err(|e| Error::Internal(e.to_string()))?),
                workflow: Set(serde_json::to_value(&t.workflow)
                    .map_err(|e| Error::Internal(e.to_string()))?),
                request_id: Set(request_id.map(str::to_string)),
                create_time: Set(Utc::now()),
            })
            .exec_without_returning(&txn)
            .await;
        match inserted {
            Err(err) if is_unique_violation(&err) => {
                drop(txn);
                if let Some(rid) = request_id
                    && let Some(row) = template::Entity::find()
                        .filter(template::Column::RequestId.eq(rid))
                        .unique(&self.db)
                        .await?
                {
                    return self.get_template(&row.id).await;
                }
                return Err(Error::NameTaken {
                    kind: "template",
                    name: t.name.clone(),
                });
            }
            other => {
                other?;
            }
        }
        if !t.tags.is_empty() {
            template_tag::Entity::insert_many(t.tags.iter().map(|tag| template_tag::ActiveModel {
                template_id: Set(id.clone()),
                tag: Set(tag.clone()),
            }))
            .exec_without_returning(&txn)
            .await?;
        }
        txn.commit().await?;
        self.get_template(&id).await
    }

    /// Reads a template.
    pub async fn get_template(&self, id: &str) -> Result<pb::WorkflowTemplate, Error> {
        let row = template::Entity::find_by_id(id.to_string())
            .unique(&self.db)
            .await?
            .ok_or_else(|| Error::TemplateNotFound(id.to_string()))?;
        let tags = template_tag::Entity::find()
            .filter(template_tag::Column::TemplateId.eq(id))
            .order_by_asc(template_tag::Column::Tag)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|t| t.tag)
            .collect();
        template_from_row(row, tags)
    }

    /// Lists templates by name after `after`, at most `limit`.
    pub async fn list_templates(
        &self,
        tag: Option<&str>,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<pb::WorkflowTemplate>, Error> {
        let mut query = template::Entity::find()
            .order_by_asc(template::Column::Name)
            .limit(limit);
        if let Some(after) = after {
            query = query.filter(template::Column::Name.gt(after));
        }
        if let Some(tag) = tag {
            let tagged = template_tag::Entity::find()
                .select_only()
                .column(template_tag::Column::TemplateId)
                .filter(template_tag::Column::Tag.eq(tag))
                .into_query();
            query = query.filter(template::Column::Id.in_subquery(tagged));
        }
        let rows = query.all(&self.db).await?;
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let mut tags: std::collections::HashMap<String, Vec<String>> =
            std::collections::HashMap::new();
        for t in template_tag::Entity::find()
            .filter(template_tag::Column::TemplateId.is_in(ids))
            .order_by_asc(template_tag::Column::Tag)
            .all(&self.db)
            .await?
        {
            tags.entry(t.template_id).or_default().push(t.tag);
        }
        rows.into_iter()
            .map(|row| {
                let t = tags.remove(&row.id).unwrap_or_default();
                template_from_row(row, t)
            })
            .collect()
    }

    /// Deletes a template.
    pub async fn delete_template(&self, id: &str) -> Result<(), Error> {
        if template::Entity::delete_by_id(id.to_string())
            .exec(&self.db)
            .await?
            .rows_affected
            == 0
        {
            return Err(Error::TemplateNotFound(id.to_string()));
        }
        Ok(())
    }

    // ---------------------------------------------------------------- transformation rules

    /// Inserts a validated rule; the same `request_id` returns the rule it created.
    pub async fn create_rule(
        &self,
        r: &pb::TransformationRule,
        request_id: Option<&str>,
    ) -> Result<pb::TransformationRule, Error> {
        if let Some(rid) = request_id
            && let Some(row) = rule::Entity::find()
                .filter(rule::Column::RequestId.eq(rid))
                .unique(&self.db)
                .await?
        {
            return rule_from_row(row);
        }
        let now = Utc::now();
        let id = meshflow_kit::id::new_id();
        let inserted = rule::Entity::insert(rule::ActiveModel {
            id: Set(id.clone()),
            name: Set(r.name.clone()),
            description: Set(r.description.clone()),
            assignments: Set(
                serde_json::to_value(&r.assignments).map_err(|e| Error::Internal(e.to_string()))?
            ),
            revision: Set(1),
            request_id: Set(request_id.map(str::to_string)),
            create_time: Set(now),
            update_time: Set(now),
        })
        .exec_without_returning(&self.db)
        .await;
        match inserted {
            Err(err) if is_unique_violation(&err) => {
                if let Some(rid) = request_id
                    && let Some(row) = rule::Entity::find()
                        .filter(rule::Column::RequestId.eq(rid))
                        .unique(&self.db)
                        .await?
                {
                    return rule_from_row(row);
                }
                Err(Error::NameTaken {
                    kind: "transformation rule",
                    name: r.name.clone(),
                })
            }
            Err(err) => Err(err.into()),
            Ok(_) => self.get_rule(&id).await,
        }
    }

    /// Reads a rule.
    pub async fn get_rule(&self, id: &str) -> Result<pb::TransformationRule, Error> {
        let row = rule::Entity::find_by_id(id.to_string())
            .unique(&self.db)
            .await?
            .ok_or_else(|| Error::RuleNotFound(id.to_string()))?;
        rule_from_row(row)
    }

    /// Which of `ids` name no rule.
    pub async fn missing_rules(&self, ids: &[String]) -> Result<Vec<String>, Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let found: std::collections::HashSet<String> = rule::Entity::find()
            .filter(rule::Column::Id.is_in(ids.iter().cloned()))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|r| r.id)
            .collect();
        Ok(ids
            .iter()
            .filter(|id| !found.contains(*id))
            .cloned()
            .collect())
    }

    /// Lists rules by name after `after`, at most `limit`.
    pub async fn list_rules(
        &self,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<pb::TransformationRule>, Error> {
        let mut query = rule::Entity::find()
            .order_by_asc(rule::Column::Name)
            .limit(limit);
        if let Some(after) = after {
            query = query.filter(rule::Column::Name.gt(after));
        }
        query
            .all(&self.db)
            .await?
            .into_iter()
            .map(rule_from_row)
            .collect()
    }

    /// Writes a merged, validated rule if its revision is still `expected_revision`.
    pub async fn update_rule(
        &self,
        r: &pb::TransformationRule,
        expected_revision: i64,
    ) -> Result<pb::TransformationRule, Error> {
        let result = rule::Entity::update_many()
            .col_expr(rule::Column::Name, Expr::value(r.name.clone()))
            .col_expr(
                rule::Column::Description,
                Expr::value(r.description.clone()),
            )
            .col_expr(
                rule::Column::Assignments,
                Expr::value(
                    serde_json::to_value(&r.assignments)
                        .map_err(|e| Error::Internal(e.to_string()))?,
                ),
            )
            .col_expr(rule::Column::Revision, Expr::value(expected_revision + 1))
            .col_expr(rule::Column::UpdateTime, Expr::value(Utc::now()))
            .filter(rule::Column::Id.eq(r.rule_id.as_str()))
            .filter(rule::Column::Revision.eq(expected_revision))
            .exec(&self.db)
            .await
            .map_err(|err| name_taken_or(err, "transformation rule", &r.name))?;
        if result.rows_affected == 0 {
            self.get_rule(&r.rule_id).await?;
            return Err(Error::StaleEtag {
                kind: "transformation rule",
                id: r.rule_id.clone(),
            });
        }
        self.get_rule(&r.rule_id).await
    }

    /// The revision behind a rule's etag.
    pub async fn rule_revision(&self, id: &str) -> Result<i64, Error> {
        rule::Entity::find_by_id(id.to_string())
            .unique(&self.db)
            .await?
            .map(|r| r.revision)
            .ok_or_else(|| Error::RuleNotFound(id.to_string()))
    }

    /// Deletes a rule; `expected_revision` makes it conditional.
    pub async fn delete_rule(&self, id: &str, expected_revision: Option<i64>) -> Result<(), Error> {
        let mut delete = rule::Entity::delete_many().filter(rule::Column::Id.eq(id));
        if let Some(revision) = expected_revision {
            delete = delete.filter(rule::Column::Revision.eq(revision));
        }
        if delete.exec(&self.db).await?.rows_affected == 0 {
            self.get_rule(id).await?;
            return Err(Error::StaleEtag {
                kind: "transformation rule",
                id: id.to_string(),
            });
        }
        Ok(())
    }
}

async fn insert_tags(
    txn: &sea_orm::DatabaseTransaction,
    id: &str,
    tags: &[String],
) -> Result<(), DbErr> {
    if tags.is_empty() {
        return Ok(());
    }
    workflow_tag::Entity::insert_many(tags.iter().map(|tag| workflow_tag::ActiveModel {
        workflow_id: Set(id.to_string()),
        tag: Set(tag.clone()),
    }))
    .exec_without_returning(txn)
    .await
    .map(|_| ())
}

fn template_from_row(
    row: template::Model,
    tags: Vec<String>,
) -> Result<pb::WorkflowTemplate, Error> {
    let parameters = serde_json::from_value(row.parameters)
        .map_err(|e| Error::Internal(format!("decoding parameters of template {}: {e}", row.id)))?;
    let workflow = serde_json::from_value(row.workflow)
        .map_err(|e| Error::Internal(format!("decoding workflow of template {}: {e}", row.id)))?;
    Ok(pb::WorkflowTemplate {
        template_id: row.id,
        name: row.name,
        description: row.description,
        parameters,
        workflow,
        tags,
        create_time: Some(timestamp(row.create_time)),
    })
}

fn rule_from_row(row: rule::Model) -> Result<pb::TransformationRule, Error> {
    let assignments = serde_json::from_value(row.assignments)
        .map_err(|e| Error::Internal(format!("decoding rule {}: {e}", row.id)))?;
    Ok(pb::TransformationRule {
        rule_id: row.id,
        name: row.name,
        description: row.description,
        assignments,
        etag: etag(row.revision),
        create_time: Some(timestamp(row.create_time)),
        update_time: Some(timestamp(row.update_time)),
    })
}
