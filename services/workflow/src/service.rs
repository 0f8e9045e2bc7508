//! The behaviour of WorkflowService, WorkflowTemplateService and TransformationRuleService, free of
//! transport concerns: requests in, responses or [`Error`]s out.

use std::collections::BTreeSet;

use meshflow_kit::convert::{from_json, struct_to_json, to_json};
use meshflow_kit::{FieldPath, Limits, Violations, page, request};
use meshflow_proto::pbjson_types;
use meshflow_proto::workflow::v1 as pb;
use serde_json::Value;

use crate::error::Error;
use crate::expr::{self, Segment};
use crate::store::{self, Definition, Store, WorkflowFilter, WorkflowUpdate};
use crate::{transform, validate};

const DEFAULT_PAGE: u64 = 50;
const MAX_PAGE: u64 = 500;

/// The three workflow-domain services over one store.
#[derive(Clone)]
pub struct Service {
    store: Store,
    executions: std::sync::Arc<dyn crate::Executions>,
    limits: Limits,
}

fn check_request_id(request_id: &str, v: &mut Violations) -> Option<String> {
    request::request_id(request_id, v)
}

fn check_resource_id(field: &str, id: &str) -> Result<(), Error> {
    request::resource_id(field, id).map_err(|v| Error::Invalid(vec![v]))
}

fn expected_revision(etag: &str) -> Result<Option<i64>, Error> {
    request::expected_revision("etag", etag).map_err(|v| Error::Invalid(vec![v]))
}

/// A list request's page size and cursor, each bad one recorded in `v` (the request is refused
/// once, with every bad field).
fn paging<T: serde::de::DeserializeOwned>(
    page_size: i32,
    page_token: &str,
    v: &mut Violations,
) -> (u64, Option<T>) {
    let size = v.take(page::size(page_size, DEFAULT_PAGE, MAX_PAGE));
    let after = v.take(page::decode(page_token)).flatten();
    (size.unwrap_or(DEFAULT_PAGE), after)
}

/// `Ok` when nothing was recorded, else every violation.
fn checked(v: Violations) -> Result<(), Error> {
    v.into_result(()).map_err(Error::Invalid)
}

/// Fields of a mask: the request's paths, or all of `all` when empty.
fn mask_fields(
    mask: Option<&pbjson_types::FieldMask>,
    all: &[&'static str],
    output_only: &[&str],
) -> Result<BTreeSet<&'static str>, Error> {
    request::mask_fields(mask, all, output_only).map_err(Error::Invalid)
}

/// Every `transform.rule_id` in a definition, with its field path.
fn rule_refs(steps: &[pb::Step], path: &FieldPath, out: &mut Vec<(FieldPath, String)>) {
    use pb::step::Config;
    for (i, step) in steps.iter().enumerate() {
        let sp = path.index(i);
        match &step.config {
            Some(Config::Transform(t)) if !t.rule_id.is_empty() => {
                out.push((sp.field("transform").field("rule_id"), t.rule_id.clone()));
            }
            Some(Config::Conditional(c)) => {
                for (j, b) in c.branches.iter().enumerate() {
                    rule_refs(
                        &b.steps,
                        &sp.field("conditional")
                            .field("branches")
                            .index(j)
                            .field("steps"),
                        out,
                    );
                }
                rule_refs(
                    &c.otherwise,
                    &sp.field("conditional").field("otherwise"),
                    out,
                );
            }
            Some(Config::Parallel(p)) => {
                for (j, b) in p.branches.iter().enumerate() {
                    rule_refs(
                        &b.steps,
                        &sp.field("parallel")
                            .field("branches")
                            .index(j)
                            .field("steps"),
                        out,
                    );
                }
            }
            Some(Config::ForEach(f)) => {
                rule_refs(&f.steps, &sp.field("for_each").field("steps"), out)
            }
            _ => {}
        }
    }
}

/// Calls `f` on every DATA_TRANSFORM step of `steps`, nested ones included.
fn each_transform(steps: &mut [pb::Step], f: &mut impl FnMut(&mut pb::DataTransformStep)) {
    use pb::step::Config;
    for step in steps {
        match &mut step.config {
            Some(Config::Transform(t)) => f(t),
            Some(Config::Conditional(c)) => {
                for b in &mut c.branches {
                    each_transform(&mut b.steps, f);
                }
                each_transform(&mut c.otherwise, f);
            }
            Some(Config::Parallel(p)) => {
                for b in &mut p.branches {
                    each_transform(&mut b.steps, f);
                }
            }
            Some(Config::ForEach(e)) => each_transform(&mut e.steps, f),
            _ => {}
        }
    }
}

impl Service {
    /// Pins the rules a definition's steps name: each `transform.rule_id` gets the rule's current
    /// assignments as `pinned_assignments`, which the version's executions apply (DESIGN §4: a
    /// version captures everything it runs). Pins a client sent are discarded.
    async fn pin_rules(&self, steps: &mut [pb::Step]) -> Result<(), Error> {
        let mut ids = BTreeSet::new();
        each_transform(steps, &mut |t| {
            t.pinned_assignments.clear();
            if !t.rule_id.is_empty() {
                ids.insert(t.rule_id.clone());
            }
        });
        let mut rules = std::collections::HashMap::new();
        for id in ids {
            let rule = self.store.get_rule(&id).await?;
            rules.insert(id, rule.assignments);
        }
        each_transform(steps, &mut |t| {
            if let Some(assignments) = rules.get(&t.rule_id) {
                t.pinned_assignments = assignments.clone();
            }
        });
        Ok(())
    }

    /// The services over `store`, enforcing `limits`; `executions` tells and cancels a
    /// workflow's executions when it is deleted.
    pub fn new(
        store: Store,
        executions: std::sync::Arc<dyn crate::Executions>,
        limits: Limits,
    ) -> Self {
        Self {
            store,
            executions,
            limits,
        }
    }

    /// Every violation of a definition, including references to rules that do not exist.
    async fn definition_violations(
        &self,
        w: &pb::Workflow,
        root: &FieldPath,
    ) -> Result<Violations, Error> {
        let mut v = validate::workflow(w, &self.limits, root);
        let mut refs = Vec::new();
        rule_refs(&w.steps, &root.field("steps"), &mut refs);
        refs.retain(|(_, id)| meshflow_kit::id::is_valid(id));
        let ids: Vec<String> = refs.iter().map(|(_, id)| id.clone()).collect();
        let missing = self.store.missing_rules(&ids).await?;
        for (path, id) in refs.iter().filter(|(_, id)| missing.contains(id)) {
            v.add(path, format!("no transformation rule has id `{id}`"));
        }
        Ok(v)
    }

    // ---------------------------------------------------------------- WorkflowService

    /// CreateWorkflow.
    pub async fn create_workflow(
        &self,
        req: pb::CreateWorkflowRequest,
    ) -> Result<pb::Workflow, Error> {
        let mut v = Violations::new();
        let request_id = check_request_id(&req.request_id, &mut v);
        let Some(mut w) = req.workflow else {
            v.add(&FieldPath::root("workflow"), "is required");
            return Err(Error::Invalid(v.into_vec()));
        };
        if let Some(rid) = &request_id
            && v.is_empty()
            && let Some(existing) = self.store.workflow_by_request(rid).await?
        {
            return Ok(existing);
        }
        v.extend(
            self.definition_violations(&w, &FieldPath::root("workflow"))
                .await?
                .into_vec(),
        );
        if !v.is_empty() {
            return Err(Error::Invalid(v.into_vec()));
        }
        self.pin_rules(&mut w.steps).await?;
        self.store.create_workflow(&w, request_id.as_deref()).await
    }

    /// GetWorkflow.
    pub async fn get_workflow(&self, req: pb::GetWorkflowRequest) -> Result<pb::Workflow, Error> {
        check_resource_id("workflow_id", &req.workflow_id)?;
        if req.version < 0 {
            return Err(Error::invalid("version", "must not be negative"));
        }
        self.store.get_workflow(&req.workflow_id, req.version).await
    }

    /// ListWorkflows.
    pub async fn list_workflows(
        &self,
        req: pb::ListWorkflowsRequest,
    ) -> Result<pb::ListWorkflowsResponse, Error> {
        let mut v = Violations::new();
        let (size, after) = paging::<String>(req.page_size, &req.page_token, &mut v);
        let status = match pb::WorkflowStatus::try_from(req.status) {
            Ok(pb::WorkflowStatus::Unspecified) => None,
            Ok(s) => Some(s.as_str_name().to_string()),
            Err(_) => {
                v.add(
                    &FieldPath::root("status"),
                    format!("unknown value {}", req.status),
                );
                None
            }
        };
        checked(v)?;
        let filter = WorkflowFilter {
            status,
            tag: Some(req.tag).filter(|t| !t.is_empty()),
            name_contains: Some(req.name).filter(|n| !n.is_empty()),
        };
        let rows = self
            .store
            .list_workflows(&filter, after.as_deref(), size + 1)
            .await?;
        let (workflows, next_page_token) = page::finish(rows, size, |r| r.name.clone());
        Ok(pb::ListWorkflowsResponse {
            workflows,
            next_page_token,
        })
    }

    /// UpdateWorkflow.
    pub async fn update_workflow(
        &self,
        req: pb::UpdateWorkflowRequest,
    ) -> Result<pb::Workflow, Error> {
        const ALL: &[&str] = &[
            "name",
            "description",
            "status",
            "steps",
            "input_schema",
            "variables",
            "timeout",
            "default_retry_policy",
            "triggers",
            "tags",
        ];
        const OUTPUT_ONLY: &[&str] = &[
            "workflow_id",
            "version",
            "etag",
            "create_time",
            "update_time",
        ];
        let Some(patch) = req.workflow else {
            return Err(Error::invalid("workflow", "is required"));
        };
        check_resource_id("workflow.workflow_id", &patch.workflow_id)?;
        let fields = mask_fields(req.update_mask.as_ref(), ALL, OUTPUT_ONLY)?;
        let wanted = expected_revision(&patch.etag).map_err(|_| {
            Error::invalid("workflow.etag", "is not an etag returned by this service")
        })?;

        let current = self.store.get_workflow(&patch.workflow_id, 0).await?;
        let revision = store::parse_etag(&current.etag)
            .ok_or_else(|| Error::Internal("unparsable stored etag".into()))?;
        if wanted.is_some_and(|w| w != revision) {
            return Err(Error::StaleEtag {
                kind: "workflow",
                id: patch.workflow_id,
            });
        }
        let mut merged = current.clone();
        for f in &fields {
            match *f {
                "name" => merged.name = patch.name.clone(),
                "description" => merged.description = patch.description.clone(),
                "status" => merged.status = patch.status,
                "steps" => merged.steps = patch.steps.clone(),
                "input_schema" => merged.input_schema = patch.input_schema.clone(),
                "variables" => merged.variables = patch.variables.clone(),
                "timeout" => merged.timeout = patch.timeout,
                "default_retry_policy" => {
                    merged.default_retry_policy = patch.default_retry_policy.clone()
                }
                "triggers" => merged.triggers = patch.triggers.clone(),
                "tags" => merged.tags = patch.tags.clone(),
                _ => {}
            }
        }
        if fields.contains("status") && merged.status == pb::WorkflowStatus::Unspecified as i32 {
            return Err(Error::invalid(
                "workflow.status",
                "is required when updated",
            ));
        }
        let v = self
            .definition_violations(&merged, &FieldPath::root("workflow"))
            .await?;
        if !v.is_empty() {
            return Err(Error::Invalid(v.into_vec()));
        }
        if fields.contains("steps") {
            // Steps sent again pin the rules as they are now: a rule edited since the current
            // version makes a new version that applies the edit.
            self.pin_rules(&mut merged.steps).await?;
        }
        let new_version = Definition::of(&merged) != Definition::of(&current);
        self.store
            .update_workflow(WorkflowUpdate {
                expected_revision: revision,
                workflow: merged,
                new_version,
            })
            .await
    }

    /// DeleteWorkflow: refused while executions of the workflow have not ended, unless the
    /// request asks to cancel them. The workflow's versions, executions and metrics stay readable.
    pub async fn delete_workflow(&self, req: pb::DeleteWorkflowRequest) -> Result<(), Error> {
        check_resource_id("workflow_id", &req.workflow_id)?;
        let revision = expected_revision(&req.etag)?;
        let current = self.store.workflow_revision(&req.workflow_id).await?;
        if revision.is_some_and(|r| r != current) {
            return Err(Error::StaleEtag {
                kind: "workflow",
                id: req.workflow_id,
            });
        }
        let active = self
            .executions
            .active(&req.workflow_id)
            .await
            .map_err(Error::Executions)?;
        if !active.is_empty() && !req.cancel_executions {
            return Err(Error::HasActiveExecutions {
                id: req.workflow_id,
                executions: active,
            });
        }
        self.store
            .delete_workflow(&req.workflow_id, revision)
            .await?;
        // Cancel what had not ended, including what started while the delete was decided (no
        // start succeeds once the delete is committed).
        if req.cancel_executions {
            let active = self
                .executions
                .active(&req.workflow_id)
                .await
                .map_err(Error::Executions)?;
            self.executions
                .cancel(&active, "the workflow was deleted")
                .await
                .map_err(Error::Executions)?;
        }
        Ok(())
    }

    /// ValidateWorkflow: the violations of a definition, without saving it.
    pub async fn validate_workflow(
        &self,
        req: pb::ValidateWorkflowRequest,
    ) -> Result<pb::ValidateWorkflowResponse, Error> {
        let Some(w) = req.workflow else {
            return Err(Error::invalid("workflow", "is required"));
        };
        let violations: Vec<pb::Violation> = self
            .definition_violations(&w, &FieldPath::root("workflow"))
            .await?
            .into_vec()
            .into_iter()
            .map(|v| pb::Violation {
                field: v.field,
                description: v.description,
            })
            .collect();
        Ok(pb::ValidateWorkflowResponse {
            valid: violations.is_empty(),
            violations,
        })
    }

    /// ListWorkflowVersions.
    pub async fn list_versions(
        &self,
        req: pb::ListWorkflowVersionsRequest,
    ) -> Result<pb::ListWorkflowVersionsResponse, Error> {
        let mut v = Violations::new();
        v.take(request::resource_id("workflow_id", &req.workflow_id));
        let (size, before) = paging::<i64>(req.page_size, &req.page_token, &mut v);
        checked(v)?;
        let rows = self
            .store
            .list_versions(&req.workflow_id, before, size + 1)
            .await?;
        let (versions, next_page_token) = page::finish(rows, size, |r| r.version);
        Ok(pb::ListWorkflowVersionsResponse {
            versions,
            next_page_token,
        })
    }

    // ---------------------------------------------------------------- WorkflowTemplateService

    /// CreateWorkflowTemplate.
    pub async fn create_template(
        &self,
        req: pb::CreateWorkflowTemplateRequest,
    ) -> Result<pb::WorkflowTemplate, Error> {
        let mut v = Violations::new();
        let request_id = check_request_id(&req.request_id, &mut v);
        let Some(t) = req.template else {
            v.add(&FieldPath::root("template"), "is required");
            return Err(Error::Invalid(v.into_vec()));
        };
        let root = FieldPath::root("template");
        if let Err(e) = validate::check_name(&t.name) {
            v.add(&root.field("name"), e);
        }
        if t.description.len() > validate::MAX_DESCRIPTION_LEN {
            v.add(&root.field("description"), "is too long");
        }
        validate::check_tags(&t.tags, &root.field("tags"), &mut v);
        let mut names = BTreeSet::new();
        for (i, p) in t.parameters.iter().enumerate() {
            let pp = root.field("parameters").index(i);
            if let Err(e) = validate::check_id(&p.name) {
                v.add(&pp.field("name"), e);
            } else if !names.insert(p.name.as_str()) {
                v.add(
                    &pp.field("name"),
                    format!("duplicate parameter `{}`", p.name),
                );
            }
            match pb::ParameterType::try_from(p.r#type) {
                Ok(pb::ParameterType::Unspecified) => v.add(&pp.field("type"), "is required"),
                Err(_) => v.add(&pp.field("type"), format!("unknown value {}", p.r#type)),
                Ok(ty) => {
                    if let Some(default) = &p.default_value
                        && let Err(e) = check_param_type(ty, &to_json(default))
                    {
                        v.add(&pp.field("default_value"), e);
                    }
                }
            }
        }
        match t.workflow.as_ref().map(struct_to_json) {
            None => v.add(&root.field("workflow"), "is required"),
            Some(doc) => {
                for name in param_refs(&doc) {
                    if !names.contains(name.as_str()) {
                        v.add(
                            &root.field("workflow"),
                            format!("references `${{params.{name}}}`, which is not a parameter"),
                        );
                    }
                }
                let has_steps = doc
                    .get("steps")
                    .is_some_and(|s| s.as_array().is_some_and(|a| !a.is_empty()) || s.is_string());
                if !has_steps {
                    v.add(
                        &root.field("workflow").field("steps"),
                        "a workflow needs at least one step",
                    );
                }
            }
        }
        if !v.is_empty() {
            return Err(Error::Invalid(v.into_vec()));
        }
        self.store.create_template(&t, request_id.as_deref()).await
    }

    /// GetWorkflowTemplate.
    pub async fn get_template(
        &self,
        req: pb::GetWorkflowTemplateRequest,
    ) -> Result<pb::WorkflowTemplate, Error> {
        check_resource_id("template_id", &req.template_id)?;
        self.store.get_template(&req.template_id).await
    }

    /// ListWorkflowTemplates.
    pub async fn list_templates(
        &self,
        req: pb::ListWorkflowTemplatesRequest,
    ) -> Result<pb::ListWorkflowTemplatesResponse, Error> {
        let mut v = Violations::new();
        let (size, after) = paging::<String>(req.page_size, &req.page_token, &mut v);
        checked(v)?;
        let tag = Some(req.tag).filter(|t| !t.is_empty());
        let rows = self
            .store
            .list_templates(tag.as_deref(), after.as_deref(), size + 1)
            .await?;
        let (templates, next_page_token) = page::finish(rows, size, |r| r.name.clone());
        Ok(pb::ListWorkflowTemplatesResponse {
            templates,
            next_page_token,
        })
    }

    /// DeleteWorkflowTemplate.
    pub async fn delete_template(
        &self,
        req: pb::DeleteWorkflowTemplateRequest,
    ) -> Result<(), Error> {
        check_resource_id("template_id", &req.template_id)?;
        self.store.delete_template(&req.template_id).await
    }

    /// InstantiateWorkflowTemplate: typed parameters substituted, then created as a workflow.
    pub async fn instantiate(
        &self,
        req: pb::InstantiateWorkflowTemplateRequest,
    ) -> Result<pb::Workflow, Error> {
        check_resource_id("template_id", &req.template_id)?;
        let mut v = Violations::new();
        let request_id = check_request_id(&req.request_id, &mut v);
        if !req.workflow_name.is_empty()
            && let Err(e) = validate::check_name(&req.workflow_name)
        {
            v.add(&FieldPath::root("workflow_name"), e);
        }
        if let Some(rid) = &request_id
            && v.is_empty()
            && let Some(existing) = self.store.workflow_by_request(rid).await?
        {
            return Ok(existing);
        }
        let template = self.store.get_template(&req.template_id).await?;
        let given = req
            .parameters
            .as_ref()
            .map(struct_to_json)
            .unwrap_or_else(|| Value::Object(Default::default()));
        let given = given.as_object().cloned().unwrap_or_default();
        let ppath = FieldPath::root("parameters");
        let mut values = serde_json::Map::new();
        for p in &template.parameters {
            let value = given
                .get(&p.name)
                .cloned()
                .or_else(|| p.default_value.as_ref().map(to_json));
            match value {
                None if p.required => v.add(&ppath.field(&p.name), "is required"),
                None => {}
                Some(value) => {
                    let ty = pb::ParameterType::try_from(p.r#type)
                        .unwrap_or(pb::ParameterType::Unspecified);
                    if let Err(e) = check_param_type(ty, &value) {
                        v.add(&ppath.field(&p.name), e);
                    }
                    values.insert(p.name.clone(), value);
                }
            }
        }
        for name in given.keys() {
            if !template.parameters.iter().any(|p| &p.name == name) {
                v.add(
                    &ppath.field(name),
                    format!("is not a parameter of template `{}`", template.name),
                );
            }
        }
        if !v.is_empty() {
            return Err(Error::Invalid(v.into_vec()));
        }
        let doc = template
            .workflow
            .as_ref()
            .map(struct_to_json)
            .unwrap_or_default();
        let substituted = substitute(doc, &values);
        let mut w: pb::Workflow = serde_json::from_value(substituted).map_err(|e| {
            Error::invalid(
                "parameters",
                format!("the substituted workflow is not a valid definition: {e}"),
            )
        })?;
        if !req.workflow_name.is_empty() {
            w.name = req.workflow_name;
        }
        self.create_workflow(pb::CreateWorkflowRequest {
            workflow: Some(w),
            request_id: request_id.unwrap_or_default(),
        })
        .await
    }

    // ---------------------------------------------------------------- TransformationRuleService

    fn check_rule(
        &self,
        r: &pb::TransformationRule,
        root: &FieldPath,
        fields: &BTreeSet<&str>,
    ) -> Violations {
        let mut v = Violations::new();
        if fields.contains("name")
            && let Err(e) = validate::check_name(&r.name)
        {
            v.add(&root.field("name"), e);
        }
        if fields.contains("description") && r.description.len() > validate::MAX_DESCRIPTION_LEN {
            v.add(&root.field("description"), "is too long");
        }
        if fields.contains("assignments") {
            v.extend(
                validate::assignments(&r.assignments, &self.limits, &root.field("assignments"))
                    .into_vec(),
            );
        }
        v
    }

    /// CreateTransformationRule.
    pub async fn create_rule(
        &self,
        req: pb::CreateTransformationRuleRequest,
    ) -> Result<pb::TransformationRule, Error> {
        let mut v = Violations::new();
        let request_id = check_request_id(&req.request_id, &mut v);
        let Some(r) = req.rule else {
            v.add(&FieldPath::root("rule"), "is required");
            return Err(Error::Invalid(v.into_vec()));
        };
        let all = BTreeSet::from(["name", "description", "assignments"]);
        v.extend(
            self.check_rule(&r, &FieldPath::root("rule"), &all)
                .into_vec(),
        );
        if !v.is_empty() {
            return Err(Error::Invalid(v.into_vec()));
        }
        self.store.create_rule(&r, request_id.as_deref()).await
    }

    /// GetTransformationRule.
    pub async fn get_rule(
        &self,
        req: pb::GetTransformationRuleRequest,
    ) -> Result<pb::TransformationRule, Error> {
        check_resource_id("rule_id", &req.rule_id)?;
        self.store.get_rule(&req.rule_id).await
    }

    /// ListTransformationRules.
    pub async fn list_rules(
        &self,
        req: pb::ListTransformationRulesRequest,
    ) -> Result<pb::ListTransformationRulesResponse, Error> {
        let mut v = Violations::new();
        let (size, after) = paging::<String>(req.page_size, &req.page_token, &mut v);
        checked(v)?;
        let rows = self.store.list_rules(after.as_deref(), size + 1).await?;
        let (rules, next_page_token) = page::finish(rows, size, |r| r.name.clone());
        Ok(pb::ListTransformationRulesResponse {
            rules,
            next_page_token,
        })
    }

    /// UpdateTransformationRule.
    pub async fn update_rule(
        &self,
        req: pb::UpdateTransformationRuleRequest,
    ) -> Result<pb::TransformationRule, Error> {
        let Some(patch) = req.rule else {
            return Err(Error::invalid("rule", "is required"));
        };
        check_resource_id("rule.rule_id", &patch.rule_id)?;
        let fields = mask_fields(
            req.update_mask.as_ref(),
            &["name", "description", "assignments"],
            &["rule_id", "etag", "create_time", "update_time"],
        )?;
        let wanted = expected_revision(&patch.etag)
            .map_err(|_| Error::invalid("rule.etag", "is not an etag returned by this service"))?;
        let v = self.check_rule(&patch, &FieldPath::root("rule"), &fields);
        if !v.is_empty() {
            return Err(Error::Invalid(v.into_vec()));
        }
        let current = self.store.get_rule(&patch.rule_id).await?;
        let revision = store::parse_etag(&current.etag)
            .ok_or_else(|| Error::Internal("unparsable stored etag".into()))?;
        if wanted.is_some_and(|w| w != revision) {
            return Err(Error::StaleEtag {
                kind: "transformation rule",
                id: patch.rule_id,
            });
        }
        let mut merged = current;
        if fields.contains("name") {
            merged.name = patch.name;
        }
        if fields.contains("description") {
            merged.description = patch.description;
        }
        if fields.contains("assignments") {
            merged.assignments = patch.assignments;
        }
        self.store.update_rule(&merged, revision).await
    }

    /// DeleteTransformationRule.
    pub async fn delete_rule(&self, req: pb::DeleteTransformationRuleRequest) -> Result<(), Error> {
        check_resource_id("rule_id", &req.rule_id)?;
        let revision = expected_revision(&req.etag)?;
        self.store.delete_rule(&req.rule_id, revision).await
    }

    /// TestTransformationRule: evaluates a saved or unsaved rule against sample input.
    pub async fn test_rule(
        &self,
        req: pb::TestTransformationRuleRequest,
    ) -> Result<pb::TestTransformationRuleResponse, Error> {
        use pb::test_transformation_rule_request::Source;
        let rule = match req.source {
            None => return Err(Error::invalid("rule", "give a rule_id or a rule")),
            Some(Source::RuleId(id)) => {
                check_resource_id("rule_id", &id)?;
                self.store.get_rule(&id).await?
            }
            Some(Source::Rule(rule)) => {
                let v = validate::assignments(
                    &rule.assignments,
                    &self.limits,
                    &FieldPath::root("rule").field("assignments"),
                );
                if !v.is_empty() {
                    return Err(Error::Invalid(v.into_vec()));
                }
                rule
            }
        };
        let input = req.input.as_ref().map(to_json).unwrap_or(Value::Null);
        let steps = req
            .steps
            .as_ref()
            .map(struct_to_json)
            .unwrap_or_else(|| Value::Object(Default::default()));
        let mut vars = req
            .vars
            .as_ref()
            .map(struct_to_json)
            .unwrap_or_else(|| Value::Object(Default::default()));
        let empty = Value::Object(Default::default());
        let scope = [
            ("input", &input),
            ("steps", &steps),
            ("execution", &empty),
            ("workflow", &empty),
        ];
        Ok(
            match transform::apply(&rule.assignments, &scope, &mut vars) {
                Ok(output) => pb::TestTransformationRuleResponse {
                    output: Some(from_json(&output)),
                    error: None,
                },
                Err(failure) => pb::TestTransformationRuleResponse {
                    output: None,
                    error: Some(pb::TransformationError {
                        field: FieldPath::root("rule")
                            .field("assignments")
                            .index(failure.index)
                            .field("expression")
                            .to_string(),
                        target: failure.target,
                        message: failure.error.to_string(),
                    }),
                },
            },
        )
    }
}

/// Whether a JSON value has a parameter type.
fn check_param_type(ty: pb::ParameterType, value: &Value) -> Result<(), String> {
    use pb::ParameterType as T;
    let ok = match ty {
        T::Unspecified => true,
        T::String => value.is_string(),
        T::Number => value.is_number(),
        T::Integer => value.as_i64().is_some() || value.as_f64().is_some_and(|f| f.fract() == 0.0),
        T::Boolean => value.is_boolean(),
        T::Object => value.is_object(),
        T::Array => value.is_array(),
    };
    let name = ty
        .as_str_name()
        .trim_start_matches("PARAMETER_TYPE_")
        .to_lowercase();
    if ok {
        Ok(())
    } else {
        Err(format!("must be a {name}, got {value}"))
    }
}

/// `params.<name>` inside a template expression, if that is all it is.
fn param_name(source: &str) -> Option<&str> {
    let name = source.trim().strip_prefix("params.")?;
    validate::check_id(name).is_ok().then_some(name)
}

/// Names of every `${params.<name>}` in a JSON document.
fn param_refs(doc: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    fn walk(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::String(s) => {
                for seg in expr::parse_template(s).unwrap_or_default() {
                    if let Segment::Expr(src) = seg
                        && let Some(name) = param_name(&src)
                    {
                        out.insert(name.to_string());
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            Value::Object(map) => map.values().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    walk(doc, &mut out);
    out
}

/// Replaces `${params.<name>}` in every string. A string that is exactly one reference takes the
/// value itself (keeping its JSON type); inside text a value is written as text. Other `${ }`
/// expressions are kept for execution time.
fn substitute(doc: Value, values: &serde_json::Map<String, Value>) -> Value {
    match doc {
        Value::String(s) => {
            let Ok(segments) = expr::parse_template(&s) else {
                return Value::String(s);
            };
            if let [Segment::Expr(src)] = segments.as_slice()
                && let Some(value) = param_name(src).and_then(|n| values.get(n))
            {
                return value.clone();
            }
            let mut out = String::new();
            for seg in segments {
                match seg {
                    Segment::Text(t) => out.push_str(&t.replace("${", "$${")),
                    Segment::Expr(src) => match param_name(&src).and_then(|n| values.get(n)) {
                        Some(Value::String(text)) => out.push_str(&text.replace("${", "$${")),
                        Some(other) => out.push_str(&other.to_string()),
                        None => {
                            out.push_str("${");
                            out.push_str(&src);
                            out.push('}');
                        }
                    },
                }
            }
            Value::String(out)
        }
        Value::Array(items) => {
            Value::Array(items.into_iter().map(|i| substitute(i, values)).collect())
        }
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, substitute(v, values)))
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn substitution_keeps_types_and_other_expressions() {
        let values = json!({"n": 3, "url": "http://h", "flag": true})
            .as_object()
            .cloned()
            .expect("object");
        let doc = json!({"a": "${params.n}", "b": "${ params.url }/x/${input.id}", "c": ["${params.flag}", "n=${params.n}"],
            "d": "$${literal}", "e": "${params.unknown}"});
        assert_eq!(
            substitute(doc, &values),
            json!({"a": 3, "b": "http://h/x/${input.id}", "c": [true, "n=3"], "d": "$${literal}", "e": "${params.unknown}"})
        );
    }

    #[test]
    fn parameter_types() {
        use pb::ParameterType as T;
        assert!(check_param_type(T::Integer, &json!(3.0)).is_ok());
        assert!(check_param_type(T::Integer, &json!(3.5)).is_err());
        assert!(check_param_type(T::String, &json!(1)).is_err());
        assert_eq!(
            check_param_type(T::Boolean, &json!("x")),
            Err("must be a boolean, got \"x\"".to_string())
        );
    }
}
