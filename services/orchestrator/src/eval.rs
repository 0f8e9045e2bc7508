//! Run-time evaluation: CEL programs compiled once per source text, `${ }` templates resolved over an
//! execution's scope, `secrets.NAME` read from `MESHFLOW_SECRET_<NAME>` at call time, and redaction
//! of secret values from everything stored or sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use meshflow_workflow::expr::{self, EvalError, Segment};
use serde_json::{Map, Value};

/// Environment prefix of secrets: `secrets.CRM_TOKEN` is `MESHFLOW_SECRET_CRM_TOKEN`.
pub const SECRET_PREFIX: &str = "MESHFLOW_SECRET_";

/// Compiled programs by source text, and compiled JSON Schemas by their JSON text, shared by every
/// execution.
#[derive(Default)]
pub struct Programs {
    programs: Cache<expr::Compiled>,
    schemas: Cache<jsonschema::Validator>,
}

/// Compiled forms by their source text; starts over past [`CACHE_LIMIT`] entries.
struct Cache<T>(Mutex<HashMap<String, Arc<T>>>);

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

/// Most entries of a cache before it starts over.
const CACHE_LIMIT: usize = 100_000;

impl<T> Cache<T> {
    /// The compiled form of `source`, compiled by `compile` unless cached.
    fn get<E>(&self, source: &str, compile: impl FnOnce() -> Result<T, E>) -> Result<Arc<T>, E> {
        if let Some(c) = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(source)
        {
            return Ok(c.clone());
        }
        let compiled = Arc::new(compile()?);
        let mut cache = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() > CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(source.to_string(), compiled.clone());
        Ok(compiled)
    }
}

impl Programs {
    /// The compiled program of `source`.
    pub fn get(&self, source: &str) -> Result<Arc<expr::Compiled>, EvalError> {
        self.programs
            .get(source, || expr::compile(source).map_err(EvalError::Compile))
    }

    /// The compiled validator of a JSON Schema (an input schema, a VALIDATION step's schema).
    pub fn schema(&self, schema: &Value) -> Result<Arc<jsonschema::Validator>, String> {
        self.schemas.get(&schema.to_string(), || {
            jsonschema::validator_for(schema).map_err(|e| e.to_string())
        })
    }
}

/// The variables an expression sees.
#[derive(Clone, Default)]
pub struct Scope {
    /// Named values: `input`, `vars`, `execution`, `workflow`, `item`, `index`, ... Shared, not
    /// copied: a scope is made for every step, and an expression reads few of them, if any.
    pub vars: Vec<(&'static str, Arc<Value>)>,
    /// Step results, materialised per expression with only the steps it reads.
    pub steps: Option<Arc<dyn StepResults>>,
}

/// Where an expression's `steps` come from.
pub trait StepResults: Send + Sync {
    /// `{id: {output, status}}` for every visible step.
    fn all(&self) -> Value;
    /// Calls `f` with the result (`{output, status}`) of step `id`, if it is visible.
    fn with_step(&self, id: &str, f: &mut dyn FnMut(&Value));
}

impl Scope {
    /// The `steps` value an expression reads: only the paths it names, unless it indexes `steps`
    /// dynamically. A step's output can be a large response body of which an expression reads one
    /// field; converting all of it for CEL would cost more than the evaluation.
    pub fn steps_for(&self, compiled: &expr::Compiled) -> Value {
        match &self.steps {
            Some(source) if compiled.steps_dynamic => source.all(),
            Some(source) => project(source.as_ref(), &compiled.steps_paths),
            None => Value::Object(Map::new()),
        }
    }
}

/// `{id: …}` with, of each path's step result, that path as far as it exists.
pub fn project(source: &dyn StepResults, paths: &[Vec<String>]) -> Value {
    let mut ids: Vec<&str> = paths
        .iter()
        .filter_map(|p| p.first())
        .map(String::as_str)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut out = Map::new();
    for id in ids {
        let tails: Vec<&[String]> = paths
            .iter()
            .filter(|p| p.first().is_some_and(|first| first == id))
            .map(|p| &p[1..])
            .collect();
        source.with_step(id, &mut |result| {
            out.insert(id.to_string(), project_value(result, &tails));
        });
    }
    Value::Object(out)
}

/// `value` cut down to `tails`: a tail that ends here, or a value that is not an object, keeps the
/// value whole; an object keeps the keys the tails go on through (those it has), each cut down in
/// turn. A key it lacks stays missing, so reading it fails, and `has` answers, as on the whole.
fn project_value(value: &Value, tails: &[&[String]]) -> Value {
    let Value::Object(map) = value else {
        return value.clone();
    };
    if tails.iter().any(|t| t.is_empty()) {
        return value.clone();
    }
    let mut out = Map::new();
    for (i, tail) in tails.iter().enumerate() {
        let key = &tail[0];
        // Each key once, with every tail through it.
        if tails[..i].iter().any(|t| &t[0] == key) {
            continue;
        }
        if let Some(child) = map.get(key) {
            let deeper: Vec<&[String]> = tails
                .iter()
                .filter(|t| &t[0] == key)
                .map(|t| &t[1..])
                .collect();
            out.insert(key.clone(), project_value(child, &deeper));
        }
    }
    Value::Object(out)
}

impl Scope {
    /// Adds or replaces a variable.
    pub fn set(&mut self, name: &'static str, value: Value) {
        self.share(name, Arc::new(value));
    }

    /// Adds or replaces a variable with a value shared with its owner.
    pub fn share(&mut self, name: &'static str, value: Arc<Value>) {
        match self.vars.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.vars.push((name, value)),
        }
    }
}

/// The server's secrets (`MESHFLOW_SECRET_<NAME>`), by name, read once: a process's environment
/// does not change under it.
static SECRETS: std::sync::LazyLock<Vec<(String, String)>> = std::sync::LazyLock::new(|| {
    std::env::vars()
        .filter_map(|(k, v)| {
            k.strip_prefix(SECRET_PREFIX)
                .map(|name| (name.to_string(), v))
        })
        .collect()
});

/// Secrets from the environment, by name.
pub fn secrets() -> Value {
    Value::Object(
        SECRETS
            .iter()
            .map(|(name, v)| (name.clone(), Value::String(v.clone())))
            .collect(),
    )
}

/// Evaluates one expression.
pub fn eval(programs: &Programs, source: &str, scope: &Scope) -> Result<Value, EvalError> {
    eval_with(programs, source, scope, &[])
}

/// [`eval`] with extra variables that take precedence over the scope's (e.g. `vars` and `output`
/// inside a transform).
pub fn eval_with(
    programs: &Programs,
    source: &str,
    scope: &Scope,
    extra: &[(&'static str, &Value)],
) -> Result<Value, EvalError> {
    let compiled = programs.get(source)?;
    let reads = |name: &str| compiled.roots.contains(name);
    // Only the variables the expression reads are converted for CEL.
    let mut vars: Vec<(&str, &Value)> = extra
        .iter()
        .filter(|(k, _)| reads(k))
        .map(|(k, v)| (*k, *v))
        .collect();
    vars.extend(
        scope
            .vars
            .iter()
            .filter(|(k, _)| reads(k) && !extra.iter().any(|(e, _)| e == k))
            .map(|(k, v)| (*k, &**v)),
    );
    let steps_value;
    if reads("steps") && !vars.iter().any(|(k, _)| *k == "steps") {
        steps_value = scope.steps_for(&compiled);
        vars.push(("steps", &steps_value));
    }
    let secrets_value;
    if reads("secrets") {
        secrets_value = secrets();
        vars.push(("secrets", &secrets_value));
    }
    expr::eval(&compiled.program, &vars)
}

/// Evaluates an expression that must be a boolean.
pub fn eval_bool(programs: &Programs, source: &str, scope: &Scope) -> Result<bool, EvalError> {
    eval_bool_with(programs, source, scope, &[])
}

/// [`eval_bool`] with extra variables, as [`eval_with`].
pub fn eval_bool_with(
    programs: &Programs,
    source: &str,
    scope: &Scope,
    extra: &[(&'static str, &Value)],
) -> Result<bool, EvalError> {
    match eval_with(programs, source, scope, extra)? {
        Value::Bool(b) => Ok(b),
        other => Err(EvalError::Runtime(format!(
            "`{source}` must be true or false, got {other}"
        ))),
    }
}

/// Resolves one template string: exactly one `${ }` keeps the value's JSON type; otherwise the
/// values are written into the text.
pub fn resolve_str(programs: &Programs, text: &str, scope: &Scope) -> Result<Value, EvalError> {
    if !expr::is_template(text) {
        return Ok(Value::String(text.to_string()));
    }
    let segments = expr::parse_template(text).map_err(EvalError::Compile)?;
    if let [Segment::Expr(source)] = segments.as_slice() {
        return eval(programs, source, scope);
    }
    let mut out = String::new();
    for seg in segments {
        match seg {
            Segment::Text(t) => out.push_str(&t),
            Segment::Expr(source) => out.push_str(&text_of(&eval(programs, &source, scope)?)),
        }
    }
    Ok(Value::String(out))
}

/// A value written into text: strings as they are, null as nothing, integral numbers without a
/// fraction (`12`, not `12.0`), anything else as JSON.
pub fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9.0e15 => {
                format!("{}", f as i64)
            }
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// Resolves a template string that must produce text.
pub fn resolve_text(programs: &Programs, text: &str, scope: &Scope) -> Result<String, EvalError> {
    Ok(text_of(&resolve_str(programs, text, scope)?))
}

/// Resolves every string inside a JSON value.
pub fn resolve_value(
    programs: &Programs,
    value: &Value,
    scope: &Scope,
) -> Result<Value, EvalError> {
    Ok(match value {
        Value::String(s) => resolve_str(programs, s, scope)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|i| resolve_value(programs, i, scope))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), resolve_value(programs, v, scope)?)))
                .collect::<Result<_, EvalError>>()?,
        ),
        other => other.clone(),
    })
}

/// Replaces every secret value (of 4 characters or more) inside strings with `[REDACTED]`.
pub fn redact(value: &mut Value) {
    if SECRETS.iter().any(|(_, v)| v.len() >= 4) {
        redact_with(value, &SECRETS);
    }
}

/// Redacts text.
pub fn redact_text(text: &str) -> String {
    let mut v = Value::String(text.to_string());
    redact(&mut v);
    match v {
        Value::String(s) => s,
        _ => String::new(),
    }
}

fn redact_with(value: &mut Value, secrets: &[(String, String)]) {
    match value {
        Value::String(s) => {
            for (_, secret) in secrets {
                if secret.len() >= 4 && s.contains(secret.as_str()) {
                    *s = s.replace(secret.as_str(), "[REDACTED]");
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| redact_with(i, secrets)),
        Value::Object(map) => map.values_mut().for_each(|v| redact_with(v, secrets)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_schema_is_compiled_once_and_still_judges_every_value() {
        let programs = Programs::default();
        let schema = json!({"type": "object", "required": ["id"]});
        let first = programs.schema(&schema).expect("compiles");
        let again = programs.schema(&schema).expect("cached");
        assert!(Arc::ptr_eq(&first, &again));
        assert!(again.is_valid(&json!({"id": 1})));
        assert!(!again.is_valid(&json!({})));
        let other = programs
            .schema(&json!({"type": "string"}))
            .expect("compiles");
        assert!(!Arc::ptr_eq(&first, &other));
        assert!(programs.schema(&json!({"type": 7})).is_err());
    }

    fn scope() -> Scope {
        let mut s = Scope::default();
        s.set("input", json!({"id": 7, "name": "x"}));
        s.set("vars", json!({"base": "http://h"}));
        s
    }

    /// Step results held in one JSON object.
    struct Results(Value);

    impl StepResults for Results {
        fn all(&self) -> Value {
            self.0.clone()
        }
        fn with_step(&self, id: &str, f: &mut dyn FnMut(&Value)) {
            if let Some(v) = self.0.get(id) {
                f(v);
            }
        }
    }

    #[test]
    fn an_expression_reads_the_same_from_its_paths_as_from_every_result() {
        let results = json!({
            "get": {"status": "SUCCEEDED", "output": {"status": 200,
                "headers": {"content-type": "application/json"},
                "body": {"price": 1.5, "tags": ["a", "b"], "nested": {"k": null}}}},
            "note": {"status": "SUCCEEDED", "output": "text"},
            "other": {"status": "SKIPPED", "output": null}});
        let projected = Scope {
            steps: Some(Arc::new(Results(results.clone()))),
            ..Scope::default()
        };
        let p = Programs::default();
        let cases = [
            "steps.get.output.body.price * 2.0",
            "steps.get.output.body.tags.size() + size(steps.get.output.headers)",
            "has(steps.get.output.body.missing) || has(steps.get.output.body.nested.k)",
            r#"steps["get"].output["body"].tags[1] + steps.note.output"#,
            "steps.get.output.body == {'price': 1.5, 'tags': ['a', 'b'], 'nested': {'k': null}}",
            "steps.get.output.body.price + steps.get.output.status",
            "steps.other.status == 'SKIPPED' && steps.other.output == null",
            "steps.get.output.body.absent",
            "steps.note.output.field",
            "steps.nobody.output",
        ];
        for source in cases {
            let compiled = p.get(source).expect("compiles");
            assert!(!compiled.steps_dynamic, "{source}");
            let whole = expr::eval(&compiled.program, &[("steps", &results)]);
            assert_eq!(eval(&p, source, &projected), whole, "{source}");
        }
        // Only what the expression names is converted.
        let compiled = p.get("steps.get.output.body.price").expect("compiles");
        assert_eq!(
            projected.steps_for(&compiled),
            json!({"get": {"output": {"body": {"price": 1.5}}}})
        );
    }

    #[test]
    fn templates_keep_types_or_interpolate() {
        let p = Programs::default();
        assert_eq!(resolve_str(&p, "${input.id}", &scope()), Ok(json!(7)));
        assert_eq!(
            resolve_str(&p, "${vars.base}/items/${input.id}", &scope()),
            Ok(json!("http://h/items/7"))
        );
        assert_eq!(resolve_str(&p, "plain", &scope()), Ok(json!("plain")));
        assert_eq!(
            resolve_value(
                &p,
                &json!({"a": ["${input.name}", 1], "b": "${input}"}),
                &scope()
            ),
            Ok(json!({"a": ["x", 1], "b": {"id": 7, "name": "x"}}))
        );
        assert!(matches!(
            resolve_str(&p, "${input.nope}", &scope()),
            Err(EvalError::Runtime(_))
        ));
        assert_eq!(eval_bool(&p, "input.id > 3", &scope()), Ok(true));
        assert!(eval_bool(&p, "input.id", &scope()).is_err());
    }

    #[test]
    fn redaction_replaces_secret_values() {
        let mut v = json!({"h": "Bearer s3cr3t-value", "n": ["s3cr3t-value"], "k": 1});
        redact_with(&mut v, &[("TOKEN".into(), "s3cr3t-value".into())]);
        assert_eq!(
            v,
            json!({"h": "Bearer [REDACTED]", "n": ["[REDACTED]"], "k": 1})
        );
    }
}
