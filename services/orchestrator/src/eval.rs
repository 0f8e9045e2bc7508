//! Run-time evaluation: CEL programs compiled once per source text, `${ }` templates resolved over an
//! execution's scope, `secrets.NAME` read from `MESHFLOW_SECRET_<NAME>` at call time, and redaction
//! of secret values from everything stored or sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use meshflow_workflow::expr::{self, EvalError, Segment};
use serde_json::{Map, Value};

/// Environment prefix of secrets: `secrets.CRM_TOKEN` is `MESHFLOW_SECRET_CRM_TOKEN`.
pub const SECRET_PREFIX: &str = "MESHFLOW_SECRET_";

/// Compiled programs by source text, shared by every execution.
#[derive(Default)]
pub struct Programs {
    cache: Mutex<HashMap<String, Arc<expr::Compiled>>>,
}

impl Programs {
    /// The compiled program of `source`.
    pub fn get(&self, source: &str) -> Result<Arc<expr::Compiled>, EvalError> {
        if let Some(p) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(source)
        {
            return Ok(p.clone());
        }
        let compiled = Arc::new(expr::compile(source).map_err(EvalError::Compile)?);
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() > 100_000 {
            cache.clear();
        }
        cache.insert(source.to_string(), compiled.clone());
        Ok(compiled)
    }
}

/// The variables an expression sees.
#[derive(Clone, Default)]
pub struct Scope {
    /// Named values: `input`, `vars`, `execution`, `workflow`, `item`, `index`, `response`, ...
    pub vars: Vec<(&'static str, Value)>,
    /// Step results, materialised per expression with only the steps it reads.
    pub steps: Option<Arc<dyn StepResults>>,
}

/// Where an expression's `steps` come from.
pub trait StepResults: Send + Sync {
    /// `{id: {output, status}}` for these step ids, or for every visible step when `ids` is `None`.
    fn select(&self, ids: Option<&std::collections::BTreeSet<String>>) -> Value;
}

impl Scope {
    /// The `steps` value an expression reads (only its step ids, unless it indexes dynamically).
    pub fn steps_for(&self, compiled: &expr::Compiled) -> Value {
        match &self.steps {
            Some(source) => source.select((!compiled.steps_dynamic).then_some(&compiled.steps)),
            None => Value::Object(Map::new()),
        }
    }
}

impl Scope {
    /// Adds or replaces a variable.
    pub fn set(&mut self, name: &'static str, value: Value) {
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
            .map(|(k, v)| (*k, v)),
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
    match eval(programs, source, scope)? {
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

    fn scope() -> Scope {
        let mut s = Scope::default();
        s.set("input", json!({"id": 7, "name": "x"}));
        s.set("vars", json!({"base": "http://h"}));
        s
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
