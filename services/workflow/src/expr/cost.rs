//! The cost of an expression is bounded, so no definition can hang the engine's thread or take
//! its memory. CEL always terminates, but `lists.range(100000).map(x, lists.range(100000))`
//! terminates after ten billion steps, and `s.replace('', s)` builds a string the square of `s`.
//! Every evaluation runs against a budget ([`metered`]):
//!
//! - **nesting**: an expression tree may be at most `max_nesting` levels deep (evaluation recurses
//!   once per level); the parser, which recurses too, runs on a thread with a large stack;
//! - **work**: every comprehension (`all`, `exists`, `exists_one`, `map`, `filter`) charges the
//!   size of what it iterates, nested ones each time they run, and every list or string built
//!   charges its items (a KiB of string counting as one), against `max_iterations` units per
//!   evaluation. The macros here expand exactly as CEL's own do, with the range wrapped in
//!   `@iterate`, which charges it;
//! - **sizes**: a string an evaluation builds (`+`, `replace`, `join`) may hold `max_string_bytes`,
//!   a list it builds (`+`, `lists.range`) `max_list_items` items, and its result must fit the
//!   same bounds before it is turned into JSON.
//!
//! Exceeding one fails with `expression_too_costly` ([`super::EvalError::TooCostly`]).

use std::cell::Cell;
use std::sync::RwLock;

use cel::common::ast::{
    CallExpr, ComprehensionExpr, Expr, IdedExpr, ListExpr, LiteralValue, operators,
};
use cel::common::types::{CelInt, CelList, CelMap, CelString, DYN_TYPE};
use cel::common::value::{CowVal, Val};
use cel::parser::{Macro, MacroExprHelper};
use cel::{DeclarationError, Env, ExecutionError, ParseError};

/// The bounds on one evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deepest an expression tree may be.
    pub max_nesting: usize,
    /// Work units per evaluation: one per comprehension iteration, per item of a list built,
    /// per KiB of a string built.
    pub max_iterations: u64,
    /// Bytes of a string an evaluation builds or returns.
    pub max_string_bytes: usize,
    /// Items of a list an evaluation builds or returns.
    pub max_list_items: usize,
}

impl Limits {
    /// The bounds when none are configured (the server's flags have the same defaults).
    pub const DEFAULT: Limits = Limits {
        max_nesting: 32,
        max_iterations: 100_000,
        max_string_bytes: 1024 * 1024,
        max_list_items: 100_000,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

static LIMITS: RwLock<Limits> = RwLock::new(Limits::DEFAULT);

/// Sets the bounds of every evaluation in this process (from the server's configuration).
pub fn set_limits(limits: Limits) {
    *LIMITS
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = limits;
}

/// The bounds in force.
pub fn limits() -> Limits {
    *LIMITS
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What is left of the evaluation running on this thread, and what it exceeded.
#[derive(Clone, Copy)]
struct Budget {
    limits: Limits,
    iterations_left: u64,
    exceeded: Option<Exceeded>,
}

/// Which bound an evaluation went past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// Comprehension iterations.
    Iterations(u64),
    /// A string's bytes.
    StringBytes(usize),
    /// A list's items.
    ListItems(usize),
}

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Iterations(max) => write!(
                f,
                "more than {max} units of work (comprehension iterations, list items and KiB \
                 of strings built)"
            ),
            Self::StringBytes(max) => write!(f, "a string longer than {max} bytes"),
            Self::ListItems(max) => write!(f, "a list of more than {max} items"),
        }
    }
}

thread_local! {
    static BUDGET: Cell<Option<Budget>> = const { Cell::new(None) };
}

/// Runs an evaluation against the bounds in force (or, inside another metered evaluation,
/// against what is left of its budget); `Err` names the bound it went past.
pub fn metered<T>(evaluate: impl FnOnce() -> T) -> Result<T, Exceeded> {
    if BUDGET.get().is_none() {
        return metered_with(limits(), evaluate);
    }
    let out = evaluate();
    match BUDGET.get().and_then(|b| b.exceeded) {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// [`metered`] with given bounds.
pub fn metered_with<T>(limits: Limits, evaluate: impl FnOnce() -> T) -> Result<T, Exceeded> {
    let outer = BUDGET.replace(Some(Budget {
        limits,
        iterations_left: limits.max_iterations,
        exceeded: None,
    }));
    let out = evaluate();
    let done = BUDGET.replace(outer);
    match done.and_then(|b| b.exceeded) {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// The bounds of the evaluation running here (the configured ones outside any).
fn current() -> Limits {
    BUDGET.get().map_or_else(limits, |b| b.limits)
}

/// Records a bound gone past and returns the error that stops the evaluation.
fn exceeded(e: Exceeded) -> ExecutionError {
    if let Some(mut b) = BUDGET.get() {
        b.exceeded.get_or_insert(e);
        BUDGET.set(Some(b));
    }
    ExecutionError::function_error("expression_too_costly", e.to_string())
}

/// Fails when a string of `bytes` would be past the bound.
pub(crate) fn check_string(bytes: usize) -> Result<(), ExecutionError> {
    let max = current().max_string_bytes;
    if bytes > max {
        return Err(exceeded(Exceeded::StringBytes(max)));
    }
    Ok(())
}

/// Fails when a list of `items` would be past the bound.
pub(crate) fn check_list(items: usize) -> Result<(), ExecutionError> {
    let max = current().max_list_items;
    if items > max {
        return Err(exceeded(Exceeded::ListItems(max)));
    }
    Ok(())
}

/// Checks a result against the size bounds before it is turned into JSON: every string, and
/// every list, within them (a list of one shared large string counts each time it appears).
pub fn check_result(value: &cel::Value) -> Result<(), Exceeded> {
    let limits = current();
    let mut bytes = 0usize;
    let mut items = 0usize;
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        match v {
            cel::Value::String(s) => bytes += s.len(),
            cel::Value::Bytes(b) => bytes += b.len(),
            cel::Value::List(l) => {
                items += l.len();
                stack.extend(l.iter());
            }
            cel::Value::Map(m) => {
                items += m.map.len();
                for (k, v) in m.map.iter() {
                    if let cel::objects::Key::String(s) = k {
                        bytes += s.len();
                    }
                    stack.push(v);
                }
            }
            _ => {}
        }
        if bytes > limits.max_string_bytes {
            return Err(Exceeded::StringBytes(limits.max_string_bytes));
        }
        if items > limits.max_list_items {
            return Err(Exceeded::ListItems(limits.max_list_items));
        }
    }
    Ok(())
}

/// Fails when an expression nests deeper than the bound: evaluation recurses once per level.
pub fn check_depth(e: &IdedExpr) -> Result<(), String> {
    let max = limits().max_nesting;
    let depth = depth(e);
    if depth > max {
        return Err(format!(
            "expression_too_costly: nests {depth} levels deep; the limit is {max}"
        ));
    }
    Ok(())
}

/// Levels of an expression tree (a leaf is one). Comprehensions count their own level.
fn depth(e: &IdedExpr) -> usize {
    let below = match &e.expr {
        Expr::Unspecified | Expr::Literal(_) | Expr::Ident(_) => 0,
        Expr::Select(s) => depth(&s.operand),
        Expr::Call(c) => c
            .target
            .iter()
            .map(|t| depth(t))
            .chain(c.args.iter().map(depth))
            .max()
            .unwrap_or(0),
        Expr::List(l) => l.elements.iter().map(depth).max().unwrap_or(0),
        Expr::Map(m) => m
            .entries
            .iter()
            .map(|entry| entry_depth(&entry.expr))
            .max()
            .unwrap_or(0),
        Expr::Struct(s) => s
            .entries
            .iter()
            .map(|entry| entry_depth(&entry.expr))
            .max()
            .unwrap_or(0),
        Expr::Comprehension(c) => [
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ]
        .into_iter()
        .map(depth)
        .max()
        .unwrap_or(0),
    };
    below + 1
}

fn entry_depth(entry: &cel::common::ast::EntryExpr) -> usize {
    match entry {
        cel::common::ast::EntryExpr::StructField(f) => depth(&f.value),
        cel::common::ast::EntryExpr::MapEntry(m) => depth(&m.key).max(depth(&m.value)),
    }
}

/// The size of what a comprehension iterates.
fn range_len(v: &CowVal<'_, '_>) -> Option<usize> {
    if let Some(l) = v.downcast_ref::<CelList>() {
        return Some(l.inner().len());
    }
    v.downcast_ref::<CelMap>().map(|m| m.inner().len())
}

/// Charges `units` of work to the evaluation running here: one per comprehension iteration, per
/// item of a list built, and per KiB of a string built.
pub(crate) fn charge(units: usize) -> Result<(), ExecutionError> {
    if let Some(mut b) = BUDGET.get() {
        let units = units as u64;
        if units > b.iterations_left {
            return Err(exceeded(Exceeded::Iterations(b.limits.max_iterations)));
        }
        b.iterations_left -= units;
        BUDGET.set(Some(b));
    }
    Ok(())
}

/// The work units of building a string of `bytes`.
pub(crate) fn string_units(bytes: usize) -> usize {
    bytes / 1024
}

/// `@iterate(range)`: charges the range's size and returns it unchanged.
fn iterate<'b, 'v>(mut args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let range = args
        .pop()
        .ok_or_else(|| ExecutionError::function_error("@iterate", "no range"))?;
    charge(range_len(&range).unwrap_or(0))?;
    Ok(range)
}

/// `@range(n)`: `lists.range(n)`, bounded.
fn range<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let n = args
        .first()
        .and_then(|a| a.downcast_ref::<CelInt>())
        .map(|i| *i.inner())
        .ok_or_else(|| ExecutionError::function_error("lists.range", "needs an int"))?;
    if n < 0 {
        return Err(ExecutionError::function_error(
            "lists.range",
            format!("size must be non-negative, got {n}"),
        ));
    }
    let n_items = usize::try_from(n).unwrap_or(usize::MAX);
    check_list(n_items)?;
    charge(n_items)?;
    let items: Vec<Box<dyn Val>> = (0..n)
        .map(|i| Box::new(CelInt::from(i)) as Box<dyn Val>)
        .collect();
    Ok(CowVal::owned(CelList::from(items)))
}

fn text<'a>(v: &'a CowVal<'_, '_>, function: &str) -> Result<&'a str, ExecutionError> {
    v.downcast_ref::<CelString>()
        .map(CelString::inner)
        .ok_or_else(|| ExecutionError::function_error(function, "needs strings"))
}

/// `@replace(s, from, to[, n])`: `s.replace(from, to[, n])`, its result's size checked before
/// it is built.
fn replace<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let (s, from, to) = match &args[..] {
        [s, from, to] | [s, from, to, _] => (
            text(s, "replace")?,
            text(from, "replace")?,
            text(to, "replace")?,
        ),
        _ => {
            return Err(ExecutionError::function_error(
                "replace",
                "needs 2 or 3 arguments",
            ));
        }
    };
    let limit = match args.get(3) {
        Some(n) => {
            let n = n
                .downcast_ref::<CelInt>()
                .map(|i| *i.inner())
                .ok_or_else(|| ExecutionError::function_error("replace", "count must be an int"))?;
            usize::try_from(n).ok()
        }
        None => None,
    };
    // An empty `from` matches between every character and at both ends.
    let matches = if from.is_empty() {
        s.chars().count() + 1
    } else {
        s.matches(from).count()
    };
    let replaced = limit.map_or(matches, |l| l.min(matches));
    let size = s.len() - replaced * from.len() + replaced * to.len();
    check_string(size)?;
    charge(string_units(size))?;
    let out = match limit {
        Some(l) => s.replacen(from, to, l),
        None => s.replace(from, to),
    };
    Ok(CowVal::owned(CelString::from(out)))
}

/// `@join(list[, separator])`: `list.join(separator)`, its result's size checked before it is
/// built.
fn join<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let items = args
        .first()
        .and_then(|l| l.downcast_ref::<CelList>())
        .ok_or_else(|| ExecutionError::function_error("join", "needs a list"))?;
    let separator = match args.get(1) {
        Some(s) => text(s, "join")?,
        None => "",
    };
    let mut parts = Vec::with_capacity(items.inner().len());
    let mut size = separator.len() * items.inner().len().saturating_sub(1);
    for item in items.inner() {
        let s = item
            .downcast_ref::<CelString>()
            .ok_or_else(|| ExecutionError::function_error("join", "needs a list of strings"))?;
        size += s.inner().len();
        parts.push(s.inner());
    }
    check_string(size)?;
    charge(items.inner().len() + string_units(size))?;
    Ok(CowVal::owned(CelString::from(parts.join(separator))))
}

// ---------------------------------------------------------------- the comprehension macros

fn call(helper: &mut MacroExprHelper<'_>, function: &str, args: Vec<IdedExpr>) -> IdedExpr {
    helper.next_expr(Expr::Call(CallExpr {
        func_name: function.to_string(),
        target: None,
        args,
    }))
}

fn ident(helper: &mut MacroExprHelper<'_>, name: &str) -> IdedExpr {
    helper.next_expr(Expr::Ident(name.to_string()))
}

fn literal(helper: &mut MacroExprHelper<'_>, value: LiteralValue) -> IdedExpr {
    helper.next_expr(Expr::Literal(value))
}

const ACCU: &str = "@result";

/// How each macro folds: its initial accumulator, loop condition, step (from the accumulator,
/// the iteration variable's name and the arguments) and result.
#[derive(Clone, Copy)]
enum Fold {
    All,
    Exists,
    ExistsOne,
    Map,
    MapFiltered,
    Filter,
}

impl Fold {
    fn expand(
        self,
        helper: &mut MacroExprHelper<'_>,
        target: &mut Option<IdedExpr>,
        args: &mut Vec<IdedExpr>,
    ) -> Result<Option<IdedExpr>, ParseError> {
        let Some(range) = target.take() else {
            return Ok(None);
        };
        let mut args = std::mem::take(args).into_iter();
        let var_expr = args
            .next()
            .ok_or_else(|| helper.new_error(range.id, "needs a variable"))?;
        let Expr::Ident(var) = var_expr.expr else {
            return Err(helper.new_error(var_expr.id, "argument must be a simple name"));
        };
        let rest: Vec<IdedExpr> = args.collect();
        let accu = || Expr::Ident(ACCU.to_string());
        let (init, condition, step, result) = match (self, &rest[..]) {
            (Fold::All, [p]) => {
                let init = literal(helper, LiteralValue::Boolean(true.into()));
                let a = helper.next_expr(accu());
                let cond = call(helper, operators::NOT_STRICTLY_FALSE, vec![a]);
                let a = helper.next_expr(accu());
                let step = call(helper, operators::LOGICAL_AND, vec![a, p.clone()]);
                (init, cond, step, helper.next_expr(accu()))
            }
            (Fold::Exists, [p]) => {
                let init = literal(helper, LiteralValue::Boolean(false.into()));
                let a = helper.next_expr(accu());
                let not = call(helper, operators::LOGICAL_NOT, vec![a]);
                let cond = call(helper, operators::NOT_STRICTLY_FALSE, vec![not]);
                let a = helper.next_expr(accu());
                let step = call(helper, operators::LOGICAL_OR, vec![a, p.clone()]);
                (init, cond, step, helper.next_expr(accu()))
            }
            (Fold::ExistsOne, [p]) => {
                let init = literal(helper, LiteralValue::Int(0.into()));
                let cond = literal(helper, LiteralValue::Boolean(true.into()));
                let a = helper.next_expr(accu());
                let one = literal(helper, LiteralValue::Int(1.into()));
                let plus = call(helper, operators::ADD, vec![a, one]);
                let a = helper.next_expr(accu());
                let step = call(helper, operators::CONDITIONAL, vec![p.clone(), plus, a]);
                let a = helper.next_expr(accu());
                let one = literal(helper, LiteralValue::Int(1.into()));
                let result = call(helper, operators::EQUALS, vec![a, one]);
                (init, cond, step, result)
            }
            (Fold::Map | Fold::MapFiltered | Fold::Filter, _) => {
                let (filter, element) = match (self, &rest[..]) {
                    (Fold::Map, [f]) => (None, f.clone()),
                    (Fold::MapFiltered, [p, f]) => (Some(p.clone()), f.clone()),
                    (Fold::Filter, [p]) => (Some(p.clone()), ident(helper, &var)),
                    _ => return Err(helper.new_error(range.id, "wrong number of arguments")),
                };
                let init = helper.next_expr(Expr::List(ListExpr::default()));
                let cond = literal(helper, LiteralValue::Boolean(true.into()));
                let one = helper.next_expr(Expr::List(ListExpr {
                    elements: vec![element],
                    optional_indices: vec![],
                }));
                let a = helper.next_expr(accu());
                let appended = call(helper, operators::ADD, vec![a, one]);
                let step = match filter {
                    Some(p) => {
                        let a = helper.next_expr(accu());
                        call(helper, operators::CONDITIONAL, vec![p, appended, a])
                    }
                    None => appended,
                };
                (init, cond, step, helper.next_expr(accu()))
            }
            _ => return Err(helper.new_error(range.id, "wrong number of arguments")),
        };
        let charged = call(helper, "@iterate", vec![range]);
        Ok(Some(helper.next_expr(Expr::Comprehension(Box::new(
            ComprehensionExpr {
                iter_range: charged,
                iter_var: var,
                iter_var2: None,
                accu_var: ACCU.to_string(),
                accu_init: init,
                loop_cond: condition,
                loop_step: step,
                result,
            },
        )))))
    }
}

/// `has(e.f)`: a field test.
fn has(
    helper: &mut MacroExprHelper<'_>,
    _target: &mut Option<IdedExpr>,
    args: &mut Vec<IdedExpr>,
) -> Result<Option<IdedExpr>, ParseError> {
    let Some(arg) = args.pop() else {
        return Ok(None);
    };
    match arg.expr {
        Expr::Select(mut select) => {
            select.test = true;
            Ok(Some(helper.next_expr(Expr::Select(select))))
        }
        _ => Err(helper.new_error(arg.id, "invalid argument to has() macro")),
    }
}

/// A receiver macro that rewrites `target.f(args)` into `function(target, args)`, or only on
/// the `namespace` target (`lists.range(n)`), dropping it.
fn rewrite(
    function: &'static str,
    namespace: Option<&'static str>,
) -> impl Fn(
    &mut MacroExprHelper<'_>,
    &mut Option<IdedExpr>,
    &mut Vec<IdedExpr>,
) -> Result<Option<IdedExpr>, ParseError>
+ Send
+ Sync
+ 'static {
    move |helper, target, args| {
        let on_namespace = matches!(
            (namespace, target.as_ref().map(|t| &t.expr)),
            (Some(ns), Some(Expr::Ident(name))) if name == ns
        );
        if namespace.is_some() != on_namespace {
            return Ok(None);
        }
        let mut all = Vec::with_capacity(args.len() + 1);
        if namespace.is_none() {
            all.extend(target.take());
        }
        all.append(args);
        Ok(Some(call(helper, function, all)))
    }
}

/// The standard library with metered comprehensions and size-checked builders: CEL's `has`,
/// `all`, `exists`, `exists_one` (`existsOne`), `map` (two and three arguments) and `filter`, and
/// the checked forms of `lists.range`, `replace` and `join`.
pub fn env() -> Result<Env, DeclarationError> {
    let mut env = Env::default().with_stdlib();
    env.add_macro(Macro::global(operators::HAS, 1, has))?;
    for (name, arity, fold) in [
        (operators::ALL, 2, Fold::All),
        (operators::EXISTS, 2, Fold::Exists),
        (operators::EXISTS_ONE, 2, Fold::ExistsOne),
        ("existsOne", 2, Fold::ExistsOne),
        (operators::MAP, 2, Fold::Map),
        (operators::MAP, 3, Fold::MapFiltered),
        (operators::FILTER, 2, Fold::Filter),
    ] {
        env.add_macro(Macro::receiver(name, arity, move |h, t, a| {
            fold.expand(h, t, a)
        }))?;
    }
    let functions: [(&str, cel::common::functions::Function, &[usize]); 4] = [
        ("@iterate", iterate, &[1]),
        ("@range", range, &[1]),
        ("@replace", replace, &[3, 4]),
        ("@join", join, &[1, 2]),
    ];
    for (name, f, arities) in functions {
        for &arity in arities {
            env.add_overload(
                name,
                &format!("{name}_{arity}"),
                (0..arity).map(|_| DYN_TYPE).collect(),
                f,
            )?;
        }
    }
    env.add_macro(Macro::receiver(
        "range",
        1,
        rewrite("@range", Some("lists")),
    ))?;
    for arity in [2, 3] {
        env.add_macro(Macro::receiver("replace", arity, rewrite("@replace", None)))?;
    }
    for arity in [0, 1] {
        env.add_macro(Macro::receiver("join", arity, rewrite("@join", None)))?;
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::expr::{EvalError, compile, eval};

    fn run(source: &str, x: Value) -> Result<Value, EvalError> {
        let compiled = compile(source).map_err(EvalError::Compile)?;
        eval(&compiled.program, &[("x", &x)])
    }

    fn too_costly(source: &str, x: Value) -> Exceeded {
        match run(source, x) {
            Err(EvalError::TooCostly(e)) => e,
            other => panic!("{source}: {other:?}"),
        }
    }

    #[test]
    fn the_macros_behave_as_cels_own() {
        let x = json!([1, 2, 3]);
        assert_eq!(run("x.all(i, i > 0)", x.clone()), Ok(json!(true)));
        assert_eq!(run("x.exists(i, i > 2)", x.clone()), Ok(json!(true)));
        assert_eq!(run("x.exists_one(i, i > 1)", x.clone()), Ok(json!(false)));
        assert_eq!(run("x.existsOne(i, i == 2)", x.clone()), Ok(json!(true)));
        assert_eq!(run("x.map(i, i * 2)", x.clone()), Ok(json!([2, 4, 6])));
        assert_eq!(
            run("x.map(i, i > 1, i * 10)", x.clone()),
            Ok(json!([20, 30]))
        );
        assert_eq!(run("x.filter(i, i != 2)", x.clone()), Ok(json!([1, 3])));
        assert_eq!(run("{'a': 1}.all(k, k == 'a')", x.clone()), Ok(json!(true)));
        assert_eq!(run("has(x.a)", json!({"a": 1})), Ok(json!(true)));
        assert_eq!(run("has(x.b)", json!({"a": 1})), Ok(json!(false)));
        assert_eq!(run("x.sortBy(i, -i)", x.clone()), Ok(json!([3, 2, 1])));
        assert_eq!(run("lists.range(3)", x.clone()), Ok(json!([0, 1, 2])));
        assert_eq!(
            run("'a-b-c'.replace('-', '+')", x.clone()),
            Ok(json!("a+b+c"))
        );
        assert_eq!(
            run("'a-b-c'.replace('-', '', 1)", x.clone()),
            Ok(json!("ab-c"))
        );
        assert_eq!(run("['a', 'b'].join('/')", x.clone()), Ok(json!("a/b")));
        assert_eq!(run("['a', 'b'].join()", x.clone()), Ok(json!("ab")));
        assert!(
            compile("x.map(1, 2)").is_err(),
            "the variable must be a name"
        );
    }

    #[test]
    fn comprehensions_are_charged_nested_ones_each_time() {
        let limits = Limits {
            max_iterations: 100,
            ..Limits::default()
        };
        let program = compile("x.map(i, x.map(j, i * j))")
            .expect("compiles")
            .program;
        let ten = json!((0..10).collect::<Vec<i32>>());
        // 10 outer iterations and 10 × 10 inner ones: 110, past 100.
        let past = metered_with(limits, || eval(&program, &[("x", &ten)]));
        assert!(matches!(past, Err(Exceeded::Iterations(100))), "{past:?}");
        let nine = json!((0..9).collect::<Vec<i32>>());
        // 9 + 81 = 90.
        assert!(matches!(
            metered_with(limits, || eval(&program, &[("x", &nine)])),
            Ok(Ok(_))
        ));
        // The default bounds stop the classic blow-up at once.
        assert_eq!(
            too_costly(
                "lists.range(100000).map(i, lists.range(100000).size())",
                json!(null)
            ),
            Exceeded::Iterations(100_000)
        );
    }

    #[test]
    fn built_strings_and_lists_are_bounded() {
        let big = json!("x".repeat(600 * 1024));
        assert_eq!(
            too_costly("x + x", big.clone()),
            Exceeded::StringBytes(1024 * 1024)
        );
        assert_eq!(
            too_costly("x.replace('x', 'xx')", big.clone()),
            Exceeded::StringBytes(1024 * 1024)
        );
        assert_eq!(
            too_costly("'ab'.replace('', x)", big.clone()),
            Exceeded::StringBytes(1024 * 1024)
        );
        assert_eq!(
            too_costly("[x, x].join(',')", big.clone()),
            Exceeded::StringBytes(1024 * 1024)
        );
        assert_eq!(
            too_costly("lists.range(100001)", json!(null)),
            Exceeded::ListItems(100_000)
        );
        assert_eq!(
            too_costly("x + x", json!(vec![0; 60_000])),
            Exceeded::ListItems(100_000)
        );
        // A result that shares one large string many times is measured as the JSON it becomes.
        assert_eq!(
            too_costly("lists.range(3).map(i, x)", big),
            Exceeded::StringBytes(1024 * 1024)
        );
    }

    #[test]
    fn deep_expressions_are_refused_and_parsing_them_never_overflows() {
        // Calls, member chains, long sums and lists nest the tree; parentheses only group (and
        // the parser collapses repeated `!` and `-`), and make the parser recurse, which past its own bound (96) refuses them itself,
        // on its large stack.
        assert!(compile(&format!("{}1{}", "(".repeat(40), ")".repeat(40))).is_ok());
        for deep in [
            format!("{}1{}", "int(".repeat(40), ")".repeat(40)),
            format!("x{}", ".a".repeat(40)),
            format!("1{}", " + 1".repeat(40)),
            format!("{}1{}", "[".repeat(40), "]".repeat(40)),
        ] {
            let err = compile(&deep)
                .map(|_| ())
                .expect_err(&deep[..deep.len().min(12)]);
            assert!(err.contains("expression_too_costly"), "{err}");
        }
        for deeper in [
            format!("{}1{}", "(".repeat(2000), ")".repeat(2000)),
            format!("{}1{}", "int(".repeat(1000), ")".repeat(1000)),
            format!("x{}", ".a".repeat(2000)),
        ] {
            assert!(compile(&deeper).is_err());
        }
        assert!(compile(&format!("{}1{}", "(".repeat(10), ")".repeat(10))).is_ok());
        assert!(
            compile(&format!("'{}'", "(".repeat(100))).is_ok(),
            "strings aside"
        );
    }

    #[test]
    fn an_expression_at_the_depth_limit_evaluates_on_a_small_stack() {
        // The deepest sum the default limit admits, evaluated on a 2 MiB thread as the engine's.
        let max = Limits::default().max_nesting;
        let source = format!("1{}", " + 1".repeat(max - 2));
        let compiled = compile(&source).expect("within the limit");
        let out = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || eval(&compiled.program, &[]))
            .expect("thread")
            .join()
            .expect("no overflow");
        assert_eq!(out, Ok(json!(max - 1)));
    }
}
