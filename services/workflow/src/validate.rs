//! Definition validation (DESIGN §3): every problem of a workflow definition becomes one field
//! violation naming its exact path, e.g. `workflow.steps[2].http.url`.
//!
//! Checked: names and ids; unknown enum values; duplicate step ids (across every nesting level);
//! `depends_on` naming unknown steps or steps of another block; cycles (the cycle is named);
//! expressions that do not compile or read variables not in scope; `steps.<id>` references to steps
//! that are not guaranteed to have finished (an ancestor through `depends_on`, in this block or an
//! enclosing one); URLs, methods, headers; durations and numbers out of range; JSON Schemas that are
//! not schemas; cron schedules and time zones; and the configured limits (steps, nesting depth,
//! expression length, definition size).

use meshflow_kit::error::echo;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use meshflow_kit::convert::{from_duration, struct_to_json, to_json};
use meshflow_kit::{FieldPath, Limits, Violations};
use meshflow_proto::pbjson_types;
use meshflow_proto::workflow::v1 as pb;
use pb::step::Config;
use prost::Message;

use crate::expr::{self, Segment};
use crate::functions;

pub use meshflow_kit::name::{MAX_NAME_LEN, check_event_type, check_name};

/// Longest step or trigger id.
pub const MAX_ID_LEN: usize = 64;
/// Most tags on one resource.
pub const MAX_TAGS: usize = 32;
/// Longest description.
pub const MAX_DESCRIPTION_LEN: usize = 4096;
/// Most attempts a retry policy may ask for.
pub const MAX_ATTEMPTS: u32 = 10;
/// Longest single retry delay or Retry-After honoured.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(24 * 3600);
/// Longest HTTP attempt timeout.
pub const MAX_HTTP_TIMEOUT: Duration = Duration::from_secs(3600);
/// Highest FOR_EACH concurrency.
pub const MAX_FOR_EACH_CONCURRENCY: u32 = 1000;

const HTTP_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
/// Variables every expression may read.
const BASE_ROOTS: &[&str] = &["input", "vars", "steps", "execution", "workflow", "secrets"];

/// `[A-Za-z_][A-Za-z0-9_-]*`: step and trigger ids.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("is required".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "is {} characters; the limit is {MAX_ID_LEN}",
            id.len()
        ));
    }
    let first_ok = id
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "`{id}` must be letters, digits, `_` and `-`, starting with a letter or `_`"
        ));
    }
    Ok(())
}

/// Tags: non-empty, at most 63 characters, unique, at most 32.
pub fn check_tags(tags: &[String], path: &FieldPath, v: &mut Violations) {
    if tags.len() > MAX_TAGS {
        v.add(
            path,
            format!("has {} tags; the limit is {MAX_TAGS}", tags.len()),
        );
    }
    let mut seen = BTreeSet::new();
    for (i, tag) in tags.iter().enumerate() {
        if tag.trim().is_empty() {
            v.add(&path.index(i), "is empty");
        } else if tag.len() > MAX_NAME_LEN {
            v.add(
                &path.index(i),
                format!("is {} characters; the limit is {MAX_NAME_LEN}", tag.len()),
            );
        } else if !seen.insert(tag.as_str()) {
            v.add(&path.index(i), format!("duplicate tag `{tag}`"));
        }
    }
}

/// Checks a JSON Schema document; returns the problem if it is not a valid schema.
pub fn check_json_schema(schema: &serde_json::Value) -> Result<(), String> {
    jsonschema::validator_for(schema)
        .map(|_| ())
        .map_err(|e| format!("is not a valid JSON Schema: {e}"))
}

/// Checks a whole workflow definition; `root` is its path in the request (`workflow`).
pub fn workflow(w: &pb::Workflow, limits: &Limits, root: &FieldPath) -> Violations {
    let mut c = Checker {
        limits,
        v: Violations::new(),
        ids: HashMap::new(),
        total_steps: 0,
        step_refs: true,
    };
    c.workflow(w, root);
    c.v
}

/// Checks the assignments of a TransformationRule. A rule is used by many workflows, so the steps it
/// reads cannot be checked here; they are checked where a workflow uses it, and at run time.
pub fn assignments(list: &[pb::Assignment], limits: &Limits, path: &FieldPath) -> Violations {
    let mut c = Checker {
        limits,
        v: Violations::new(),
        ids: HashMap::new(),
        total_steps: 0,
        step_refs: false,
    };
    let scope = Scope {
        visible: BTreeSet::new(),
        in_for_each: true,
        current: None,
    };
    c.assignments(list, path, &scope);
    c.v
}

struct Checker<'a> {
    limits: &'a Limits,
    v: Violations,
    /// Every step id in the definition and where it is first defined.
    ids: HashMap<String, FieldPath>,
    total_steps: usize,
    /// Whether `steps.<id>` references are checked against the definition.
    step_refs: bool,
}

/// What an expression at some point of the definition may read.
#[derive(Clone)]
struct Scope {
    /// Step ids guaranteed to have finished.
    visible: BTreeSet<String>,
    /// Inside a FOR_EACH body: `item` and `index` are in scope.
    in_for_each: bool,
    /// The step the expression belongs to.
    current: Option<String>,
}

fn step_blocks(step: &pb::Step) -> Vec<(FieldPathPart, &[pb::Step])> {
    match &step.config {
        Some(Config::Conditional(c)) => {
            let mut blocks: Vec<(FieldPathPart, &[pb::Step])> = c
                .branches
                .iter()
                .enumerate()
                .map(|(i, b)| (FieldPathPart::Branch("conditional", i), b.steps.as_slice()))
                .collect();
            blocks.push((
                FieldPathPart::Field("conditional.otherwise"),
                c.otherwise.as_slice(),
            ));
            blocks
        }
        Some(Config::Parallel(p)) => p
            .branches
            .iter()
            .enumerate()
            .map(|(i, b)| (FieldPathPart::Branch("parallel", i), b.steps.as_slice()))
            .collect(),
        Some(Config::ForEach(f)) => {
            vec![(FieldPathPart::Field("for_each.steps"), f.steps.as_slice())]
        }
        _ => Vec::new(),
    }
}

/// Where a nested block sits under its step.
enum FieldPathPart {
    /// `<kind>.branches[i].steps`.
    Branch(&'static str, usize),
    /// A dotted field path.
    Field(&'static str),
}

impl FieldPathPart {
    fn apply(&self, step: &FieldPath) -> FieldPath {
        match self {
            Self::Branch(kind, i) => step.field(kind).field("branches").index(*i).field("steps"),
            Self::Field(dotted) => dotted.split('.').fold(step.clone(), |p, f| p.field(f)),
        }
    }
}

fn json_key_path(path: &FieldPath, key: &str) -> FieldPath {
    if check_id(key).is_ok() {
        path.field(key)
    } else {
        path.key(key)
    }
}

impl Checker<'_> {
    fn workflow(&mut self, w: &pb::Workflow, root: &FieldPath) {
        let size = w.encoded_len();
        if size > self.limits.max_definition_bytes {
            self.v.add(
                root,
                format!(
                    "definition is {size} bytes; the limit is {} bytes",
                    self.limits.max_definition_bytes
                ),
            );
            return;
        }
        if let Err(e) = check_name(&w.name) {
            self.v.add(&root.field("name"), e);
        }
        if w.description.len() > MAX_DESCRIPTION_LEN {
            self.v.add(
                &root.field("description"),
                format!("is longer than {MAX_DESCRIPTION_LEN} bytes"),
            );
        }
        if pb::WorkflowStatus::try_from(w.status).is_err() {
            self.v
                .add(&root.field("status"), format!("unknown value {}", w.status));
        }
        check_tags(&w.tags, &root.field("tags"), &mut self.v);
        if let Some(schema) = &w.input_schema
            && let Err(e) = check_json_schema(&struct_to_json(schema))
        {
            self.v.add(&root.field("input_schema"), e);
        }
        if let Some(vars) = &w.variables {
            for key in vars.fields.keys() {
                if key.is_empty() {
                    self.v
                        .add(&root.field("variables"), "has an empty variable name");
                }
            }
        }
        self.duration(
            w.timeout.as_ref(),
            &root.field("timeout"),
            self.limits.max_execution_duration,
        );
        if let Some(policy) = &w.default_retry_policy {
            self.retry_policy(policy, &root.field("default_retry_policy"));
        }
        self.triggers(&w.triggers, &root.field("triggers"));

        let steps_path = root.field("steps");
        if w.steps.is_empty() {
            self.v
                .add(&steps_path, "a workflow needs at least one step");
            return;
        }
        self.collect_ids(&w.steps, &steps_path, 1);
        if self.total_steps > self.limits.max_steps {
            self.v.add(
                &steps_path,
                format!(
                    "has {} steps (nested included); the limit is {}",
                    self.total_steps, self.limits.max_steps
                ),
            );
        }
        let scope = Scope {
            visible: BTreeSet::new(),
            in_for_each: false,
            current: None,
        };
        self.block(&w.steps, &steps_path, &scope);
    }

    /// First pass: global id uniqueness, step count and nesting depth.
    fn collect_ids(&mut self, steps: &[pb::Step], path: &FieldPath, depth: usize) {
        for (i, step) in steps.iter().enumerate() {
            self.total_steps += 1;
            let step_path = path.index(i);
            if !step.id.is_empty() {
                if let Some(first) = self.ids.get(&step.id) {
                    let first = first.clone();
                    self.v.add(
                        &step_path.field("id"),
                        format!("duplicate step id `{}` (first defined at {first})", step.id),
                    );
                } else {
                    self.ids.insert(step.id.clone(), step_path.clone());
                }
            }
            let blocks = step_blocks(step);
            if !blocks.is_empty() && depth >= self.limits.max_nesting_depth {
                self.v.add(
                    &step_path,
                    format!(
                        "nests steps {} levels deep; the limit is {}",
                        depth + 1,
                        self.limits.max_nesting_depth
                    ),
                );
                continue;
            }
            for (part, block) in blocks {
                self.collect_ids(block, &part.apply(&step_path), depth + 1);
            }
        }
    }

    /// Checks one block of steps: a DAG by `depends_on`, each step with what it may read.
    fn block(&mut self, steps: &[pb::Step], path: &FieldPath, outer: &Scope) {
        let index: HashMap<&str, usize> = steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        let mut edges: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
        for (i, step) in steps.iter().enumerate() {
            let dep_path = path.index(i).field("depends_on");
            let mut seen = BTreeSet::new();
            for (j, dep) in step.depends_on.iter().enumerate() {
                if !seen.insert(dep.as_str()) {
                    self.v.add(
                        &dep_path.index(j),
                        format!("`{}` is listed twice", echo(dep)),
                    );
                } else if dep == &step.id {
                    self.v.add(
                        &dep_path.index(j),
                        format!("step `{dep}` depends on itself"),
                    );
                } else if let Some(&k) = index.get(dep.as_str()) {
                    edges[i].push(k);
                } else if let Some(at) = self.ids.get(dep) {
                    self.v.add(
                        &dep_path.index(j),
                        format!("step `{dep}` is defined at {at}, not in this block; depends_on names steps of the same block"),
                    );
                } else {
                    self.v
                        .add(&dep_path.index(j), format!("unknown step `{dep}`"));
                }
            }
        }
        for cycle in cycles(&edges) {
            let names: Vec<&str> = cycle.iter().map(|&i| steps[i].id.as_str()).collect();
            let first = cycle[0];
            self.v.add(
                &path.index(first).field("depends_on"),
                format!("dependency cycle: {} -> {}", names.join(" -> "), names[0]),
            );
        }
        let ancestors = ancestors(&edges);
        for (i, step) in steps.iter().enumerate() {
            let mut scope = outer.clone();
            scope
                .visible
                .extend(ancestors[i].iter().map(|&k| steps[k].id.clone()));
            scope.current = Some(step.id.clone());
            self.step(step, &path.index(i), &scope);
        }
    }

    fn step(&mut self, step: &pb::Step, path: &FieldPath, scope: &Scope) {
        if let Err(e) = check_id(&step.id) {
            self.v.add(&path.field("id"), e);
        }
        if step.name.len() > MAX_NAME_LEN * 4 {
            self.v.add(&path.field("name"), "is longer than 252 bytes");
        }
        if let Some(policy) = &step.retry_policy {
            self.retry_policy(policy, &path.field("retry_policy"));
        }
        self.duration(
            step.timeout.as_ref(),
            &path.field("timeout"),
            self.limits.max_execution_duration,
        );
        if pb::OnError::try_from(step.on_error).is_err() {
            self.v.add(
                &path.field("on_error"),
                format!("unknown value {}", step.on_error),
            );
        }
        let Some(config) = &step.config else {
            self.v.add(
                path,
                "a step needs exactly one of http, transform, conditional, parallel, for_each, wait, webhook_call, function_call, validation",
            );
            return;
        };
        match config {
            Config::Http(h) => self.http(h, &path.field("http"), scope),
            Config::Transform(t) => self.transform(t, &path.field("transform"), scope),
            Config::Conditional(c) => self.conditional(c, path, scope),
            Config::Parallel(p) => self.parallel(p, path, scope),
            Config::ForEach(f) => self.for_each(f, path, scope),
            Config::Wait(w) => self.wait(w, &path.field("wait")),
            Config::WebhookCall(w) => self.webhook_call(w, &path.field("webhook_call"), scope),
            Config::FunctionCall(f) => self.function_call(f, &path.field("function_call"), scope),
            Config::Validation(v) => self.validation(v, &path.field("validation"), scope),
        }
    }

    fn http(&mut self, h: &pb::HttpRequestStep, path: &FieldPath, scope: &Scope) {
        if !HTTP_METHODS.contains(&h.method.as_str()) {
            let got = if h.method.is_empty() {
                "is required".to_string()
            } else {
                format!("`{}` is not supported", echo(&h.method))
            };
            self.v.add(
                &path.field("method"),
                format!("{got}; use one of {}", HTTP_METHODS.join(", ")),
            );
        }
        self.url(&h.url, &path.field("url"), scope);
        for (name, value) in &h.headers {
            let p = path.field("headers").key(name);
            if tonic::codegen::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                self.v
                    .add(&p, format!("`{}` is not a valid header name", echo(name)));
            }
            self.template(value, &p, scope, &[]);
        }
        for (name, value) in &h.query {
            let p = path.field("query").key(name);
            if name.is_empty() {
                self.v.add(&p, "query parameter name is empty");
            }
            self.template(value, &p, scope, &[]);
        }
        if let Some(body) = &h.body {
            self.value_templates(body, &path.field("body"), scope);
        }
        if let Some(t) = self.duration(h.timeout.as_ref(), &path.field("timeout"), MAX_HTTP_TIMEOUT)
            && t.is_zero()
            && h.timeout.is_some()
        {
            self.v.add(&path.field("timeout"), "must be positive");
        }
        if h.service_id.len() > 255 {
            self.v
                .add(&path.field("service_id"), "is longer than 255 bytes");
        }
        if !h.success_condition.is_empty() {
            self.expression(
                &h.success_condition,
                &path.field("success_condition"),
                scope,
                &["response"],
            );
        }
        for (name, e) in &h.extract {
            let p = path.field("extract").key(name);
            if check_id(name).is_err() {
                self.v
                    .add(&p, format!("`{}` is not a valid output name", echo(name)));
            }
            self.expression(e, &p, scope, &["response"]);
        }
    }

    fn url(&mut self, url: &str, path: &FieldPath, scope: &Scope) {
        if url.is_empty() {
            self.v.add(path, "is required");
            return;
        }
        if expr::is_template(url) {
            let segments = self.template(url, path, scope, &[]);
            // The literal start of the URL, if any, must already be a http(s) scheme.
            if let Some(Segment::Text(prefix)) = segments.first()
                && prefix.contains("://")
                && !(prefix.starts_with("http://") || prefix.starts_with("https://"))
            {
                self.v
                    .add(path, format!("`{}` must use http or https", echo(url)));
            }
            return;
        }
        match url::Url::parse(url) {
            Ok(u) if !matches!(u.scheme(), "http" | "https") => {
                self.v
                    .add(path, format!("`{}` must use http or https", echo(url)));
            }
            Ok(u) if u.host_str().is_none_or(str::is_empty) => {
                self.v.add(path, format!("`{}` has no host", echo(url)))
            }
            Ok(_) => {}
            Err(e) => self
                .v
                .add(path, format!("`{}` is not an absolute URL: {e}", echo(url))),
        }
    }

    fn transform(&mut self, t: &pb::DataTransformStep, path: &FieldPath, scope: &Scope) {
        match (t.assignments.is_empty(), t.rule_id.is_empty()) {
            (true, true) => self.v.add(path, "needs assignments or a rule_id"),
            (false, false) => self.v.add(
                &path.field("rule_id"),
                "give assignments or a rule_id, not both",
            ),
            (false, true) => self.assignments(&t.assignments, &path.field("assignments"), scope),
            (true, false) => {
                if !meshflow_kit::id::is_valid(&t.rule_id) {
                    self.v.add(
                        &path.field("rule_id"),
                        format!("`{}` is not a rule id", echo(&t.rule_id)),
                    );
                }
            }
        }
    }

    fn assignments(&mut self, list: &[pb::Assignment], path: &FieldPath, scope: &Scope) {
        if list.is_empty() {
            self.v.add(path, "needs at least one assignment");
        }
        for (i, a) in list.iter().enumerate() {
            let p = path.index(i);
            let target_ok = !a.target.is_empty()
                && a.target
                    .split('.')
                    .all(|part| check_id(part).is_ok() && !part.contains('-'));
            if !target_ok {
                self.v.add(
                    &p.field("target"),
                    format!(
                        "`{}` must be a dotted path of identifiers, e.g. `total` or `vars.total`",
                        a.target
                    ),
                );
            }
            self.expression(&a.expression, &p.field("expression"), scope, &["output"]);
        }
    }

    fn conditional(&mut self, c: &pb::ConditionalStep, path: &FieldPath, scope: &Scope) {
        let cpath = path.field("conditional");
        if c.branches.is_empty() {
            self.v
                .add(&cpath.field("branches"), "needs at least one branch");
        }
        for (i, b) in c.branches.iter().enumerate() {
            let bp = cpath.field("branches").index(i);
            self.expression(&b.condition, &bp.field("condition"), scope, &[]);
            self.nested(&b.steps, &bp.field("steps"), scope, scope.in_for_each);
        }
        self.nested(
            &c.otherwise,
            &cpath.field("otherwise"),
            scope,
            scope.in_for_each,
        );
    }

    fn parallel(&mut self, p: &pb::ParallelStep, path: &FieldPath, scope: &Scope) {
        let ppath = path.field("parallel");
        if p.branches.is_empty() {
            self.v
                .add(&ppath.field("branches"), "needs at least one branch");
        }
        let mut names = BTreeSet::new();
        for (i, b) in p.branches.iter().enumerate() {
            let bp = ppath.field("branches").index(i);
            if let Err(e) = check_id(&b.name) {
                self.v.add(&bp.field("name"), e);
            } else if !names.insert(b.name.as_str()) {
                self.v.add(
                    &bp.field("name"),
                    format!("duplicate branch name `{}`", b.name),
                );
            }
            if b.steps.is_empty() {
                self.v
                    .add(&bp.field("steps"), "a branch needs at least one step");
            }
            self.nested(&b.steps, &bp.field("steps"), scope, scope.in_for_each);
        }
    }

    fn for_each(&mut self, f: &pb::ForEachStep, path: &FieldPath, scope: &Scope) {
        let fpath = path.field("for_each");
        self.expression(&f.items, &fpath.field("items"), scope, &[]);
        if f.max_concurrency > MAX_FOR_EACH_CONCURRENCY {
            self.v.add(
                &fpath.field("max_concurrency"),
                format!(
                    "{} is above the limit of {MAX_FOR_EACH_CONCURRENCY}",
                    f.max_concurrency
                ),
            );
        }
        if f.steps.is_empty() {
            self.v.add(&fpath.field("steps"), "needs at least one step");
        }
        self.nested(&f.steps, &fpath.field("steps"), scope, true);
    }

    fn nested(&mut self, steps: &[pb::Step], path: &FieldPath, scope: &Scope, in_for_each: bool) {
        let inner = Scope {
            visible: scope.visible.clone(),
            in_for_each,
            current: None,
        };
        self.block(steps, path, &inner);
    }

    fn wait(&mut self, w: &pb::WaitStep, path: &FieldPath) {
        use pb::wait_step::Kind;
        match &w.kind {
            None => self.v.add(path, "needs one of duration, until, signal"),
            Some(Kind::Duration(d)) => {
                let p = path.field("duration");
                if let Some(d) = self.duration(Some(d), &p, self.limits.max_execution_duration)
                    && d.is_zero()
                {
                    self.v.add(&p, "must be positive");
                }
            }
            Some(Kind::Until(t)) => {
                if meshflow_kit::convert::from_timestamp(t).is_none() {
                    self.v.add(&path.field("until"), "is not a valid timestamp");
                }
            }
            Some(Kind::Signal(name)) => {
                if let Err(e) = check_id(name) {
                    self.v.add(&path.field("signal"), e);
                }
            }
        }
        if w.timeout.is_some() {
            if !matches!(w.kind, Some(Kind::Signal(_))) {
                self.v
                    .add(&path.field("timeout"), "only a signal wait has a timeout");
            } else {
                self.duration(
                    w.timeout.as_ref(),
                    &path.field("timeout"),
                    self.limits.max_execution_duration,
                );
            }
        }
    }

    fn webhook_call(&mut self, w: &pb::WebhookCallStep, path: &FieldPath, scope: &Scope) {
        match (w.webhook_id.is_empty(), w.url.is_empty()) {
            (true, true) => self.v.add(path, "needs a webhook_id or a url"),
            (false, false) => self
                .v
                .add(&path.field("url"), "give a webhook_id or a url, not both"),
            (true, false) => {
                self.url(&w.url, &path.field("url"), scope);
                if w.secret.is_empty() {
                    self.v.add(
                        &path.field("secret"),
                        "a url needs a signing secret, e.g. `${secrets.HOOK_SECRET}`",
                    );
                }
            }
            (false, true) => {
                if !w.secret.is_empty() {
                    self.v.add(
                        &path.field("secret"),
                        "a registered webhook signs with its own secret",
                    );
                }
            }
        }
        if !w.secret.is_empty() {
            self.template(&w.secret, &path.field("secret"), scope, &[]);
        }
        if let Err(e) = check_event_type(&w.event_type) {
            self.v.add(&path.field("event_type"), e);
        }
        if let Some(payload) = &w.payload {
            self.value_templates(payload, &path.field("payload"), scope);
        }
    }

    fn function_call(&mut self, f: &pb::FunctionCallStep, path: &FieldPath, scope: &Scope) {
        let args = f.arguments.as_ref().map(|s| &s.fields);
        match functions::lookup(&f.function) {
            None if f.function.is_empty() => self.v.add(&path.field("function"), "is required"),
            None => {
                let known: Vec<&str> = functions::BUILTINS.iter().map(|f| f.name).collect();
                self.v.add(
                    &path.field("function"),
                    format!(
                        "unknown function `{}`; built-ins are {}",
                        f.function,
                        known.join(", ")
                    ),
                );
            }
            Some(func) => {
                for param in func.params.iter().filter(|p| p.required) {
                    if !args.is_some_and(|a| a.contains_key(param.name)) {
                        self.v.add(
                            &path.field("arguments").field(param.name),
                            format!("`{}` needs argument `{}`", func.name, param.name),
                        );
                    }
                }
                for name in args.into_iter().flat_map(|a| a.keys()) {
                    if !func.params.iter().any(|p| p.name == name) {
                        self.v.add(
                            &json_key_path(&path.field("arguments"), name),
                            format!("`{}` takes no argument `{}`", func.name, echo(name)),
                        );
                    }
                }
            }
        }
        if let Some(args) = &f.arguments {
            for (k, value) in &args.fields {
                self.value_templates(value, &json_key_path(&path.field("arguments"), k), scope);
            }
        }
    }

    fn validation(&mut self, val: &pb::ValidationStep, path: &FieldPath, scope: &Scope) {
        if !val.value.is_empty() {
            self.expression(&val.value, &path.field("value"), scope, &[]);
        }
        if val.json_schema.is_none() && val.rules.is_empty() {
            self.v.add(path, "needs a json_schema, rules, or both");
        }
        if let Some(schema) = &val.json_schema
            && let Err(e) = check_json_schema(&struct_to_json(schema))
        {
            self.v.add(&path.field("json_schema"), e);
        }
        for (i, rule) in val.rules.iter().enumerate() {
            let p = path.field("rules").index(i);
            self.expression(&rule.expression, &p.field("expression"), scope, &["value"]);
            if rule.message.trim().is_empty() {
                self.v.add(&p.field("message"), "is required");
            }
        }
    }

    fn triggers(&mut self, triggers: &[pb::Trigger], path: &FieldPath) {
        use pb::trigger::Kind;
        let mut ids = BTreeSet::new();
        for (i, t) in triggers.iter().enumerate() {
            let p = path.index(i);
            if let Err(e) = check_id(&t.id) {
                self.v.add(&p.field("id"), e);
            } else if !ids.insert(t.id.as_str()) {
                self.v
                    .add(&p.field("id"), format!("duplicate trigger id `{}`", t.id));
            }
            match &t.kind {
                None => self.v.add(&p, "needs one of cron, webhook, event"),
                Some(Kind::Cron(c)) => {
                    if let Err(e) = c.schedule.parse::<croner::Cron>() {
                        self.v.add(
                            &p.field("cron").field("schedule"),
                            format!("`{}` is not a cron schedule: {e}", echo(&c.schedule)),
                        );
                    }
                    if !c.time_zone.is_empty() && c.time_zone.parse::<chrono_tz::Tz>().is_err() {
                        self.v.add(
                            &p.field("cron").field("time_zone"),
                            format!("`{}` is not an IANA time zone", echo(&c.time_zone)),
                        );
                    }
                }
                Some(Kind::Webhook(w)) => {
                    if let Err(e) = check_name(&w.path) {
                        self.v.add(&p.field("webhook").field("path"), e);
                    }
                    if w.secret.is_empty() {
                        self.v.add(
                            &p.field("webhook").field("secret"),
                            "is required, e.g. `${secrets.HOOK_SECRET}`",
                        );
                    }
                }
                Some(Kind::Event(e)) => {
                    if let Err(msg) = check_event_type(&e.event_type) {
                        self.v.add(&p.field("event").field("event_type"), msg);
                    }
                    if !e.filter.is_empty() {
                        let scope = Scope {
                            visible: BTreeSet::new(),
                            in_for_each: false,
                            current: None,
                        };
                        self.expression_with_roots(
                            &e.filter,
                            &p.field("event").field("filter"),
                            &scope,
                            &["event"],
                            false,
                        );
                    }
                }
            }
        }
    }

    fn retry_policy(&mut self, r: &pb::RetryPolicy, path: &FieldPath) {
        let strategy = pb::RetryStrategy::try_from(r.strategy);
        if strategy.is_err() {
            self.v.add(
                &path.field("strategy"),
                format!("unknown value {}", r.strategy),
            );
        }
        if r.max_attempts > MAX_ATTEMPTS {
            self.v.add(
                &path.field("max_attempts"),
                format!("{} is above the limit of {MAX_ATTEMPTS}", r.max_attempts),
            );
        }
        if strategy == Ok(pb::RetryStrategy::None) && r.max_attempts > 1 {
            self.v.add(
                &path.field("max_attempts"),
                "strategy NONE makes exactly one attempt",
            );
        }
        let initial = self.duration(
            r.initial_delay.as_ref(),
            &path.field("initial_delay"),
            MAX_RETRY_DELAY,
        );
        let max = self.duration(
            r.max_delay.as_ref(),
            &path.field("max_delay"),
            MAX_RETRY_DELAY,
        );
        if let (Some(i), Some(m)) = (initial, max)
            && !m.is_zero()
            && i > m
        {
            self.v.add(
                &path.field("max_delay"),
                "must not be shorter than initial_delay",
            );
        }
        if r.multiplier != 0.0
            && !(r.multiplier.is_finite() && (1.0..=100.0).contains(&r.multiplier))
        {
            self.v.add(
                &path.field("multiplier"),
                format!("{} is outside 1..=100", r.multiplier),
            );
        }
        if pb::RetryJitter::try_from(r.jitter).is_err() {
            self.v
                .add(&path.field("jitter"), format!("unknown value {}", r.jitter));
        }
        for (i, code) in r.retryable_status_codes.iter().enumerate() {
            if !(100..=599).contains(code) {
                self.v.add(
                    &path.field("retryable_status_codes").index(i),
                    format!("{code} is not an HTTP status"),
                );
            }
        }
        self.duration(
            r.max_retry_after.as_ref(),
            &path.field("max_retry_after"),
            MAX_RETRY_DELAY,
        );
    }

    /// A non-negative duration no longer than `max`.
    fn duration(
        &mut self,
        d: Option<&pbjson_types::Duration>,
        path: &FieldPath,
        max: Duration,
    ) -> Option<Duration> {
        let d = d?;
        match from_duration(d) {
            None => {
                self.v.add(path, "must be a non-negative duration");
                None
            }
            Some(value) if value > max => {
                self.v.add(
                    path,
                    format!(
                        "{}s is above the limit of {}s",
                        value.as_secs(),
                        max.as_secs()
                    ),
                );
                None
            }
            Some(value) => Some(value),
        }
    }

    /// Checks every string inside a JSON value as a template.
    fn value_templates(&mut self, value: &pbjson_types::Value, path: &FieldPath, scope: &Scope) {
        fn walk(c: &mut Checker<'_>, v: &serde_json::Value, path: &FieldPath, scope: &Scope) {
            match v {
                serde_json::Value::String(s) => {
                    c.template(s, path, scope, &[]);
                }
                serde_json::Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        walk(c, item, &path.index(i), scope);
                    }
                }
                serde_json::Value::Object(map) => {
                    for (k, item) in map {
                        walk(c, item, &json_key_path(path, k), scope);
                    }
                }
                _ => {}
            }
        }
        walk(self, &to_json(value), path, scope);
    }

    /// Checks a string that may hold `${ }` expressions; returns its segments.
    fn template(
        &mut self,
        text: &str,
        path: &FieldPath,
        scope: &Scope,
        extra: &[&str],
    ) -> Vec<Segment> {
        match expr::parse_template(text) {
            Err(e) => {
                self.v.add(path, e);
                Vec::new()
            }
            Ok(segments) => {
                for s in &segments {
                    if let Segment::Expr(source) = s {
                        self.expression(source, path, scope, extra);
                    }
                }
                segments
            }
        }
    }

    fn expression(&mut self, source: &str, path: &FieldPath, scope: &Scope, extra: &[&str]) {
        self.expression_with_roots(source, path, scope, extra, true);
    }

    fn expression_with_roots(
        &mut self,
        source: &str,
        path: &FieldPath,
        scope: &Scope,
        extra: &[&str],
        base: bool,
    ) {
        if source.len() > self.limits.max_expression_bytes {
            self.v.add(
                path,
                format!(
                    "expression is {} bytes; the limit is {}",
                    source.len(),
                    self.limits.max_expression_bytes
                ),
            );
            return;
        }
        let compiled = match expr::compile(source) {
            Ok(c) => c,
            Err(e) if e == "is empty" => {
                self.v.add(path, "expression is required");
                return;
            }
            Err(e) => {
                self.v
                    .add(path, format!("`{}` does not compile: {e}", echo(source)));
                return;
            }
        };
        let mut allowed: Vec<&str> = extra.to_vec();
        if base {
            allowed.extend_from_slice(BASE_ROOTS);
            if scope.in_for_each {
                allowed.extend_from_slice(&["item", "index"]);
            }
        }
        for root in &compiled.roots {
            if !allowed.contains(&root.as_str()) && !expr::BUILTIN_IDENTS.contains(&root.as_str()) {
                self.v.add(
                    path,
                    format!(
                        "`{root}` is not in scope here; in scope: {}",
                        allowed.join(", ")
                    ),
                );
            }
        }
        for id in compiled.steps.iter().filter(|_| self.step_refs) {
            if scope.visible.contains(id) {
                continue;
            }
            let why = if scope.current.as_deref() == Some(id.as_str()) {
                format!("a step cannot read its own result (`steps.{id}`)")
            } else if self.ids.contains_key(id) {
                format!(
                    "`steps.{id}` may not have run here: a step reads only steps it depends on (directly or through others) in its block or an enclosing one"
                )
            } else {
                format!("`steps.{id}` names an unknown step")
            };
            self.v.add(path, why);
        }
    }
}

/// `a.b.c` of lowercase letters, digits, `_` and `-`.
/// Every elementary cycle found by DFS, each reported once, as step indexes in order.
fn cycles(edges: &[Vec<usize>]) -> Vec<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        n: usize,
        edges: &[Vec<usize>],
        marks: &mut [Mark],
        stack: &mut Vec<usize>,
        out: &mut Vec<Vec<usize>>,
    ) {
        marks[n] = Mark::Active;
        stack.push(n);
        for &m in &edges[n] {
            match marks[m] {
                Mark::New => visit(m, edges, marks, stack, out),
                Mark::Active => {
                    // `m` is on the stack: the cycle is the stack from `m`, walked as dependencies.
                    if let Some(pos) = stack.iter().position(|&s| s == m) {
                        out.push(stack[pos..].to_vec());
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks[n] = Mark::Done;
    }
    let mut marks = vec![Mark::New; edges.len()];
    let mut out = Vec::new();
    for n in 0..edges.len() {
        if marks[n] == Mark::New {
            visit(n, edges, &mut marks, &mut Vec::new(), &mut out);
        }
    }
    out
}

/// For each node, every node reachable through its dependencies (cycle-safe).
fn ancestors(edges: &[Vec<usize>]) -> Vec<BTreeSet<usize>> {
    (0..edges.len())
        .map(|start| {
            let mut seen = BTreeSet::new();
            let mut todo: Vec<usize> = edges[start].clone();
            while let Some(n) = todo.pop() {
                if n != start && seen.insert(n) {
                    todo.extend(edges[n].iter().copied());
                }
            }
            seen
        })
        .collect()
}

#[cfg(test)]
mod tests;
