//! Expressions: CEL programs and `${ <cel> }` string templates.
//!
//! CEL is safe, side-effect free and always terminates. The `cel` crate has no type checker, so
//! definitions are checked statically here: an expression must parse, may only read variables that are
//! in scope where it is written, and every `steps.<id>` it reads is reported so validation can tell
//! whether that step is guaranteed to have run.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue};
use cel::{Context, Env, Program};

pub mod cost;
mod numbers;

/// The CEL environment: the standard library, the strings, lists and math extensions, and
/// arithmetic that mixes `int` and `double` as JSON numbers do ([`numbers`]).
pub fn env() -> Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        // The standard library with metered comprehensions; failing to declare them is a build
        // defect, caught by every test that evaluates.
        let mut env = cost::env().unwrap_or_else(|err| {
            tracing::error!(error = ?err, "cel cost bounds unavailable");
            Env::stdlib()
        });
        // The extensions are part of the crate; failing to add them is a build defect.
        for ext in [
            cel::extensions::strings,
            cel::extensions::lists,
            cel::extensions::math,
            numbers::extension,
        ] {
            if let Err(err) = env.add_extension(ext) {
                tracing::error!(error = ?err, "cel extension unavailable");
            }
        }
        Arc::new(env)
    })
    .clone()
}

/// A compiled CEL expression with what it reads.
#[derive(Debug)]
pub struct Compiled {
    /// The program, executable any number of times.
    pub program: Program,
    /// Root variables read (`input`, `steps`, ...), comprehension variables excluded.
    pub roots: BTreeSet<String>,
    /// Step ids read as `steps.<id>` or `steps["<id>"]`.
    pub steps: BTreeSet<String>,
    /// Whether `steps` is read in a way that names no particular step (`steps[x]`, `steps` alone).
    pub steps_dynamic: bool,
    /// The paths under `steps` the expression reads, each the longest run of fields and string
    /// keys after `steps` (`steps.get.output.body.price` reads `[get, output, body, price]`): a
    /// value holding just those paths, as far as they exist, evaluates as the whole would.
    pub steps_paths: Vec<Vec<String>>,
}

/// Parses a CEL expression and collects its references.
///
/// CEL's parser recurses once per level of nesting, and then so does evaluation: parsing runs on
/// a thread of its own with a stack no expression within `--max-expression-bytes` can exhaust,
/// and an expression nested deeper than `--max-expression-nesting` is refused
/// (`expression_too_costly`), so evaluating it stays within any thread's stack.
pub fn compile(source: &str) -> Result<Compiled, String> {
    if source.trim().is_empty() {
        return Err("is empty".to_string());
    }
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("cel-parse".into())
            .stack_size(PARSE_STACK_BYTES)
            .spawn_scoped(scope, || compile_here(source))
            .map_err(|e| format!("cannot parse now: {e}"))?
            .join()
            .map_err(|_| "cannot be parsed".to_string())?
    })
}

/// The stack of the parsing thread: reserved, not used, unless an expression nests deeply.
const PARSE_STACK_BYTES: usize = 256 << 20;

fn compile_here(source: &str) -> Result<Compiled, String> {
    let program = env()
        .compile(source)
        .map_err(|e| one_line(&e.to_string()))?;
    cost::check_depth(program.expression())?;
    let mut refs = Refs::default();
    refs.walk(program.expression(), &mut Vec::new());
    Ok(Compiled {
        program,
        roots: refs.roots,
        steps: refs.steps,
        steps_dynamic: refs.steps_dynamic,
        steps_paths: refs.steps_paths,
    })
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

#[derive(Default)]
struct Refs {
    roots: BTreeSet<String>,
    steps: BTreeSet<String>,
    steps_dynamic: bool,
    steps_paths: Vec<Vec<String>>,
}

/// The fields and string keys after the (unbound) `steps` that `e` selects, if it is such a run
/// (`steps` alone is the empty run).
fn steps_path(e: &IdedExpr, bound: &[String]) -> Option<Vec<String>> {
    match &e.expr {
        Expr::Ident(name) if name == "steps" && !bound.iter().any(|b| b == name) => {
            Some(Vec::new())
        }
        Expr::Select(sel) => {
            let mut path = steps_path(&sel.operand, bound)?;
            path.push(sel.field.clone());
            Some(path)
        }
        Expr::Call(call)
            if call.func_name == "_[_]" && call.target.is_none() && call.args.len() == 2 =>
        {
            let Expr::Literal(LiteralValue::String(key)) = &call.args[1].expr else {
                return None;
            };
            let mut path = steps_path(&call.args[0], bound)?;
            path.push(key.to_string());
            Some(path)
        }
        _ => None,
    }
}

impl Refs {
    fn walk(&mut self, e: &IdedExpr, bound: &mut Vec<String>) {
        if matches!(e.expr, Expr::Select(_) | Expr::Call(_))
            && let Some(path) = steps_path(e, bound)
            && let Some(id) = path.first()
        {
            self.roots.insert("steps".to_string());
            self.steps.insert(id.clone());
            self.steps_paths.push(path);
            return;
        }
        match &e.expr {
            Expr::Unspecified | Expr::Literal(_) => {}
            Expr::Ident(name) => {
                if !bound.iter().any(|b| b == name) {
                    if name == "steps" {
                        self.steps_dynamic = true;
                    }
                    self.roots.insert(name.clone());
                }
            }
            // Runs from `steps` were taken above: what is left selects from something else.
            Expr::Select(sel) => self.walk(&sel.operand, bound),
            Expr::Call(call) => {
                // `steps[x]` (with `x` not a string literal) may read any step; walking `steps`
                // itself below says so.
                if let Some(target) = &call.target {
                    self.walk(target, bound);
                }
                for arg in &call.args {
                    self.walk(arg, bound);
                }
            }
            Expr::Comprehension(c) => {
                self.walk(&c.iter_range, bound);
                self.walk(&c.accu_init, bound);
                let depth = bound.len();
                bound.push(c.iter_var.clone());
                if let Some(v2) = &c.iter_var2 {
                    bound.push(v2.clone());
                }
                bound.push(c.accu_var.clone());
                self.walk(&c.loop_cond, bound);
                self.walk(&c.loop_step, bound);
                self.walk(&c.result, bound);
                bound.truncate(depth);
            }
            Expr::List(list) => {
                for el in &list.elements {
                    self.walk(el, bound);
                }
            }
            Expr::Map(map) => {
                for entry in &map.entries {
                    self.walk_entry(&entry.expr, bound);
                }
            }
            Expr::Struct(s) => {
                for entry in &s.entries {
                    self.walk_entry(&entry.expr, bound);
                }
            }
        }
    }

    fn walk_entry(&mut self, entry: &EntryExpr, bound: &mut Vec<String>) {
        match entry {
            EntryExpr::StructField(f) => self.walk(&f.value, bound),
            EntryExpr::MapEntry(m) => {
                self.walk(&m.key, bound);
                self.walk(&m.value, bound);
            }
        }
    }
}

/// Identifiers CEL itself defines (type names), always in scope.
pub const BUILTIN_IDENTS: &[&str] = &[
    "int",
    "uint",
    "double",
    "bool",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
    "dyn",
];

/// Why evaluating an expression failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    /// The expression does not parse.
    #[error("does not compile: {0}")]
    Compile(String),
    /// Evaluation failed (missing key, wrong type, ...).
    #[error("{0}")]
    Runtime(String),
    /// The result has no JSON form (e.g. a function value).
    #[error("result is not JSON: {0}")]
    NotJson(String),
    /// The evaluation went past one of its bounds ([`cost`]).
    #[error("the expression is too costly: it would take {0}")]
    TooCostly(cost::Exceeded),
}

impl EvalError {
    /// The error code of a step this failed: `expression_too_costly` past a bound, else
    /// `expression`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooCostly(_) => "expression_too_costly",
            _ => "expression",
        }
    }
}

/// Evaluates a compiled program against variables given as JSON.
pub fn eval(
    program: &Program,
    vars: &[(&str, &serde_json::Value)],
) -> Result<serde_json::Value, EvalError> {
    let mut ctx = Context::with_env(env());
    for (name, value) in vars {
        ctx.add_variable_from_value(*name, to_cel(value));
    }
    let out = cost::metered(|| program.execute(&ctx))
        .map_err(EvalError::TooCostly)?
        .map_err(|e| EvalError::Runtime(e.to_string()))?;
    cost::check_result(&out).map_err(EvalError::TooCostly)?;
    out.json().map_err(|e| EvalError::NotJson(e.to_string()))
}

/// JSON as a CEL value: integers are `int` (or `double` beyond i64), as CEL users expect of JSON.
pub fn to_cel(value: &serde_json::Value) -> cel::Value {
    match value {
        serde_json::Value::Null => cel::Value::Null,
        serde_json::Value::Bool(b) => cel::Value::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => cel::Value::Int(i),
            None => cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        serde_json::Value::Array(items) => {
            cel::Value::List(Arc::new(items.iter().map(to_cel).collect()))
        }
        serde_json::Value::Object(map) => {
            let map: std::collections::HashMap<cel::objects::Key, cel::Value> = map
                .iter()
                .map(|(k, v)| (cel::objects::Key::String(Arc::new(k.clone())), to_cel(v)))
                .collect();
            cel::Value::Map(cel::objects::Map { map: Arc::new(map) })
        }
    }
}

/// Compiles and evaluates in one go.
pub fn eval_str(
    source: &str,
    vars: &[(&str, &serde_json::Value)],
) -> Result<serde_json::Value, EvalError> {
    let compiled = compile(source).map_err(EvalError::Compile)?;
    eval(&compiled.program, vars)
}

/// One piece of a template string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Literal text (`$${` already unescaped to `${`).
    Text(String),
    /// The CEL source inside `${ }`.
    Expr(String),
}

/// Splits a string into literal text and `${ <cel> }` expressions. `$${` writes a literal `${`.
/// Braces and string literals inside an expression are matched, so `${ {"a": "}"}.a }` is one expression.
pub fn parse_template(text: &str) -> Result<Vec<Segment>, String> {
    let mut segments = Vec::new();
    let mut literal = String::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if text[i..].starts_with("$${") {
            literal.push_str("${");
            i += 3;
        } else if text[i..].starts_with("${") {
            let start = i + 2;
            let end = expression_end(text, start)
                .ok_or_else(|| format!("`${{` at byte {i} is never closed"))?;
            if !literal.is_empty() {
                segments.push(Segment::Text(std::mem::take(&mut literal)));
            }
            let source = text[start..end].trim();
            if source.is_empty() {
                return Err(format!("empty `${{}}` at byte {i}"));
            }
            segments.push(Segment::Expr(source.to_string()));
            i = end + 1;
        } else {
            let ch = text[i..].chars().next().unwrap_or_default();
            literal.push(ch);
            i += ch.len_utf8().max(1);
        }
    }
    if !literal.is_empty() {
        segments.push(Segment::Text(literal));
    }
    Ok(segments)
}

/// Byte offset of the `}` closing an expression that starts at `start`.
fn expression_end(text: &str, start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (offset, ch) in text[start..].char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == q {
                quote = None;
            }
            continue;
        }
        match ch {
            '"' | '\'' => quote = Some(ch),
            '{' => depth += 1,
            '}' if depth == 0 => return Some(start + offset),
            '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// Whether a string holds any `${ }` expression.
pub fn is_template(text: &str) -> bool {
    text.contains("${")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn compiles_and_collects_step_references() {
        let c =
            compile("steps.score.output.body.score >= 70 && has(steps.lead.output) && input.x > 1")
                .expect("compiles");
        assert_eq!(
            c.steps.iter().map(String::as_str).collect::<Vec<_>>(),
            ["lead", "score"]
        );
        assert_eq!(
            c.roots.iter().map(String::as_str).collect::<Vec<_>>(),
            ["input", "steps"]
        );
        assert!(!c.steps_dynamic);

        let c = compile(r#"steps["my-step"].output.n + size(steps)"#).expect("compiles");
        assert!(c.steps.contains("my-step"));
        assert!(c.steps_dynamic);
    }

    #[test]
    fn the_paths_read_under_steps_are_the_longest_static_runs() {
        let paths = |source: &str| compile(source).expect("compiles").steps_paths;
        assert_eq!(
            paths(r#"steps.get.output.body.price * 2.0 + steps["my-step"].output["n"]"#),
            [
                vec!["get", "output", "body", "price"],
                vec!["my-step", "output", "n"]
            ]
        );
        // A run ends where an index is not a string literal, or where a call uses its value.
        assert_eq!(
            paths("steps.each.output[0].get.body.id + size(steps.get.output.body)"),
            [vec!["each", "output"], vec!["get", "output", "body"]]
        );
        // `has` reads the path it tests.
        assert_eq!(
            paths("has(steps.get.output.retry)"),
            [vec!["get", "output", "retry"]]
        );
        // A comprehension variable named `steps` is not the steps.
        let c = compile("[1].exists(steps, steps > 0) && steps.a.status == 'SUCCEEDED'")
            .expect("compiles");
        assert_eq!(c.steps_paths, [vec!["a", "status"]]);
        assert!(!c.steps_dynamic);
    }

    #[test]
    fn comprehension_variables_are_not_roots() {
        let c =
            compile("input.items.map(x, x.price * 2).exists(y, y > vars.limit)").expect("compiles");
        assert_eq!(
            c.roots.iter().map(String::as_str).collect::<Vec<_>>(),
            ["input", "vars"]
        );
    }

    #[test]
    fn parse_errors_are_reported_on_one_line() {
        let err = compile("1 +").expect_err("does not compile");
        assert!(!err.contains('\n'), "{err}");
        assert_eq!(compile("  ").expect_err("empty"), "is empty");
    }

    #[test]
    fn evaluates_over_json() {
        let input = json!({"price": 2, "items": [1, 2, 3]});
        assert_eq!(
            eval_str("input.price * 2", &[("input", &input)]),
            Ok(json!(4))
        );
        assert_eq!(
            eval_str("input.items.map(i, i * 10)", &[("input", &input)]),
            Ok(json!([10, 20, 30]))
        );
        assert_eq!(
            eval_str("{'a': input.price}", &[("input", &input)]),
            Ok(json!({"a": 2}))
        );
        assert_eq!(eval_str("'x'.upperAscii()", &[]), Ok(json!("X")));
        assert!(matches!(
            eval_str("input.nope", &[("input", &input)]),
            Err(EvalError::Runtime(_))
        ));
    }

    #[test]
    fn templates_split_text_and_expressions() {
        assert_eq!(
            parse_template("${vars.url}/leads/${ input.id }").expect("parses"),
            vec![
                Segment::Expr("vars.url".into()),
                Segment::Text("/leads/".into()),
                Segment::Expr("input.id".into())
            ]
        );
        assert_eq!(
            parse_template(r#"a ${ {"k": "}"}.k } b"#).expect("parses"),
            vec![
                Segment::Text("a ".into()),
                Segment::Expr(r#"{"k": "}"}.k"#.into()),
                Segment::Text(" b".into())
            ]
        );
        assert_eq!(
            parse_template("cost: $${x}").expect("parses"),
            vec![Segment::Text("cost: ${x}".into())]
        );
        assert_eq!(
            parse_template("héllo").expect("parses"),
            vec![Segment::Text("héllo".into())]
        );
        assert!(parse_template("${ input.x").is_err());
        assert!(parse_template("${}").is_err());
    }
}
