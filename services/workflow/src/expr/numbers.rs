//! Arithmetic on numbers as JSON has them. JSON has one number type; CEL has `int`, `uint` and
//! `double` and refuses to mix them, so `price * 2` would work when a response says `"price": 3`
//! and fail when it says `1.5`. The parser rewrites every `+ - * / %` into a call of the functions
//! here, which do what CEL does when both sides have one type and promote a mix to `double`:
//!
//! - `int` with `int` stays `int` (overflow is an error, as in CEL), except that a division that
//!   is not exact gives the `double` quotient (`7 / 2` is `3.5`, `6 / 2` is `3`);
//! - `uint` with `int` is computed as `int` when the `uint` fits, as `double` otherwise;
//! - anything with a `double` is a `double`, `%` included (the remainder of truncated division);
//! - every other operand (strings, lists, durations, timestamps, …) is left to CEL's own operator.
//!
//! Comparison and equality need nothing: CEL already compares numbers across types.

use cel::common::ast::{CallExpr, Expr, IdedExpr, operators};
use cel::common::types::{CelDouble, CelInt, CelList, CelString, CelUInt, DYN_TYPE};
use cel::common::value::{CowVal, Val};
use cel::parser::{Macro, MacroExprHelper};
use cel::{DeclarationError, Env, ExecutionError, ParseError};

/// One number as the arithmetic here sees it.
#[derive(Clone, Copy)]
enum Num {
    Int(i64),
    Double(f64),
}

fn num(v: &CowVal<'_, '_>) -> Option<Num> {
    if let Some(i) = v.downcast_ref::<CelInt>() {
        return Some(Num::Int(*i.inner()));
    }
    if let Some(u) = v.downcast_ref::<CelUInt>() {
        let u = *u.inner();
        return Some(i64::try_from(u).map_or(Num::Double(u as f64), Num::Int));
    }
    v.downcast_ref::<CelDouble>()
        .map(|d| Num::Double(*d.inner()))
}

fn as_f64(n: Num) -> f64 {
    match n {
        Num::Int(i) => i as f64,
        Num::Double(d) => d,
    }
}

#[derive(Clone, Copy)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

impl Op {
    const ALL: [(Op, &'static str, &'static str); 5] = [
        (Op::Add, operators::ADD, "@json_add"),
        (Op::Sub, operators::SUBSTRACT, "@json_sub"),
        (Op::Mul, operators::MULTIPLY, "@json_mul"),
        (Op::Div, operators::DIVIDE, "@json_div"),
        (Op::Rem, operators::MODULO, "@json_rem"),
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Sub => "sub",
            Op::Mul => "mul",
            Op::Div => "div",
            Op::Rem => "rem",
        }
    }

    fn ints(self, l: i64, r: i64) -> Result<Num, ExecutionError> {
        let overflow = || ExecutionError::Overflow(self.name(), l.into(), r.into());
        Ok(Num::Int(match self {
            Op::Add => l.checked_add(r).ok_or_else(overflow)?,
            Op::Sub => l.checked_sub(r).ok_or_else(overflow)?,
            Op::Mul => l.checked_mul(r).ok_or_else(overflow)?,
            Op::Div if r == 0 => return Err(ExecutionError::DivisionByZero(l.into())),
            Op::Div if l.checked_rem(r) == Some(0) => l.checked_div(r).ok_or_else(overflow)?,
            Op::Div => return Ok(Num::Double(l as f64 / r as f64)),
            Op::Rem if r == 0 => return Err(ExecutionError::RemainderByZero(l.into())),
            Op::Rem => l.checked_rem(r).ok_or_else(overflow)?,
        }))
    }

    fn doubles(self, l: f64, r: f64) -> f64 {
        match self {
            Op::Add => l + r,
            Op::Sub => l - r,
            Op::Mul => l * r,
            Op::Div => l / r,
            Op::Rem => l % r,
        }
    }

    /// CEL's own operator, for what is not a pair of numbers; a string or list `+` builds is
    /// checked against the expression's bounds ([`super::cost`]) first.
    fn cel<'b, 'v>(
        self,
        l: &CowVal<'b, 'v>,
        r: &CowVal<'b, 'v>,
    ) -> Result<Box<dyn Val + 'v>, ExecutionError> {
        if let Op::Add = self {
            if let (Some(a), Some(b)) =
                (l.downcast_ref::<CelString>(), r.downcast_ref::<CelString>())
            {
                let bytes = a.inner().len() + b.inner().len();
                super::cost::check_string(bytes)?;
                super::cost::charge(super::cost::string_units(bytes))?;
            }
            if let (Some(a), Some(b)) = (l.downcast_ref::<CelList>(), r.downcast_ref::<CelList>()) {
                let items = a.inner().len() + b.inner().len();
                super::cost::check_list(items)?;
                super::cost::charge(items)?;
            }
        }
        let (l, r): (&dyn Val, &dyn Val) = (l.as_ref(), r.as_ref());
        let unsupported = || {
            ExecutionError::UnsupportedBinaryOperator(
                self.name(),
                cel::Value::try_from(l).unwrap_or(cel::Value::Null),
                cel::Value::try_from(r).unwrap_or(cel::Value::Null),
            )
        };
        let out = match self {
            Op::Add => l.as_adder().ok_or_else(unsupported)?.add(r)?,
            Op::Sub => l.as_subtractor().ok_or_else(unsupported)?.sub(r)?,
            Op::Mul => l.as_multiplier().ok_or_else(unsupported)?.mul(r)?,
            Op::Div => l.as_divider().ok_or_else(unsupported)?.div(r)?,
            Op::Rem => l.as_modder().ok_or_else(unsupported)?.modulo(r)?,
        };
        Ok(out.into_owned())
    }

    fn apply<'b, 'v>(self, args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
        let [l, r] = <[CowVal<'b, 'v>; 2]>::try_from(args).map_err(|args| {
            ExecutionError::function_error(self.name(), format!("{} arguments", args.len()))
        })?;
        let result = match (num(&l), num(&r)) {
            (Some(Num::Int(a)), Some(Num::Int(b))) => self.ints(a, b)?,
            (Some(a), Some(b)) => Num::Double(self.doubles(as_f64(a), as_f64(b))),
            _ => return Ok(CowVal::Owned(self.cel(&l, &r)?)),
        };
        Ok(match result {
            Num::Int(i) => CowVal::owned(CelInt::from(i)),
            Num::Double(d) => CowVal::owned(CelDouble::from(d)),
        })
    }
}

fn add<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    Op::Add.apply(args)
}
fn sub<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    Op::Sub.apply(args)
}
fn mul<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    Op::Mul.apply(args)
}
fn div<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    Op::Div.apply(args)
}
fn rem<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    Op::Rem.apply(args)
}

/// Rewrites `a <op> b` into a call of the function of that operator.
fn rewrite(
    function: &'static str,
) -> impl Fn(
    &mut MacroExprHelper<'_>,
    &mut Option<IdedExpr>,
    &mut Vec<IdedExpr>,
) -> Result<Option<IdedExpr>, ParseError>
+ Send
+ Sync
+ 'static {
    move |helper, _target, args| {
        let args = std::mem::take(args);
        Ok(Some(helper.next_expr(Expr::Call(CallExpr {
            func_name: function.to_string(),
            target: None,
            args,
        }))))
    }
}

/// Adds the functions and the operator rewrites to `env`.
pub fn extension(env: &mut Env) -> Result<(), DeclarationError> {
    let functions: [cel::common::functions::Function; 5] = [add, sub, mul, div, rem];
    for ((_, operator, function), f) in Op::ALL.into_iter().zip(functions) {
        env.add_overload(function, function, vec![DYN_TYPE, DYN_TYPE], f)?;
        env.add_macro(Macro::global(operator, 2, rewrite(function)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use crate::expr::eval_str;

    fn eval(source: &str, x: Value) -> Result<Value, String> {
        eval_str(source, &[("x", &x)]).map_err(|e| e.to_string())
    }

    #[test]
    fn json_numbers_mix_whatever_their_value() {
        assert_eq!(eval("x * 2", json!(1.5)), Ok(json!(3.0)));
        assert_eq!(eval("x * 2", json!(3)), Ok(json!(6)));
        assert_eq!(eval("2 * x", json!(1.5)), Ok(json!(3.0)));
        assert_eq!(eval("x + 1", json!(0.5)), Ok(json!(1.5)));
        assert_eq!(eval("1 - x", json!(0.25)), Ok(json!(0.75)));
        assert_eq!(eval("x % 2", json!(5.5)), Ok(json!(1.5)));
        assert_eq!(eval("x * 2 > 2", json!(1.5)), Ok(json!(true)));
        assert_eq!(eval("x == 3", json!(3.0)), Ok(json!(true)));
        assert_eq!(eval("x.a * x.b", json!({"a": 2, "b": 0.5})), Ok(json!(1.0)));
    }

    #[test]
    fn the_table_of_docs_functions_md_holds() {
        for (source, whole, fraction) in [
            ("price * 2", json!(6), json!(3.0)),
            ("price + 0.5", json!(3.5), json!(2.0)),
            ("price / 2", json!(1.5), json!(0.75)),
            ("price > 2", json!(true), json!(false)),
        ] {
            let at =
                |price: Value| eval_str(source, &[("price", &price)]).map_err(|e| e.to_string());
            assert_eq!(at(json!(3)), Ok(whole), "{source} at 3");
            assert_eq!(at(json!(1.5)), Ok(fraction), "{source} at 1.5");
        }
    }

    #[test]
    fn division_is_exact() {
        assert_eq!(eval("x / 2", json!(7)), Ok(json!(3.5)));
        assert_eq!(eval("x / 2", json!(6)), Ok(json!(3)));
        assert_eq!(eval("x / 4.0", json!(1)), Ok(json!(0.25)));
        assert!(eval("x / 0", json!(1)).is_err());
        assert!(eval("x % 0", json!(1)).is_err());
    }

    #[test]
    fn everything_else_is_cel_as_before() {
        assert_eq!(eval("'a' + x", json!("b")), Ok(json!("ab")));
        assert_eq!(eval("[1] + x", json!([2])), Ok(json!([1, 2])));
        assert_eq!(
            eval("x + 1", json!(i64::MAX)).map_err(|e| e.contains("verflow")),
            Err(true)
        );
        assert!(eval("x + 1", json!("a")).is_err());
        assert!(eval("x * 2", json!(true)).is_err());
        assert_eq!(
            eval(
                "string(timestamp(x) + duration('1h'))",
                json!("2026-01-01T00:00:00Z")
            ),
            Ok(json!("2026-01-01T01:00:00Z"))
        );
        assert_eq!(eval("-x + 1", json!(2)), Ok(json!(-1)));
        assert_eq!(
            eval("x.map(i, i * 1.5)", json!([1, 2])),
            Ok(json!([1.5, 3.0]))
        );
    }
}
