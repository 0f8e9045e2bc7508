//! Applying `target <- expression` assignments: shared by DATA_TRANSFORM steps and
//! TestTransformationRule, so a rule behaves the same in a test and in an execution.

use meshflow_proto::workflow::v1 as pb;
use serde_json::{Map, Value};

use crate::expr::{self, EvalError};

/// The assignment that failed and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// Index of the assignment.
    pub index: usize,
    /// Its target.
    pub target: String,
    /// The evaluation error.
    pub error: EvalError,
}

/// Applies assignments in order. Each sees `scope`, the current `vars` and the `output` built so far;
/// a `vars.<path>` target writes into `vars`, any other target into the output object.
pub fn apply(
    assignments: &[pb::Assignment],
    scope: &[(&str, &Value)],
    vars: &mut Value,
) -> Result<Value, Failure> {
    apply_with(assignments, vars, |source, vars, output| {
        let mut all: Vec<(&str, &Value)> = scope.to_vec();
        all.push(("vars", vars));
        all.push(("output", output));
        expr::eval_str(source, &all)
    })
}

/// [`apply`] with the caller's evaluator, called with (expression, current `vars`, `output` so far).
pub fn apply_with(
    assignments: &[pb::Assignment],
    vars: &mut Value,
    mut eval: impl FnMut(&str, &Value, &Value) -> Result<Value, EvalError>,
) -> Result<Value, Failure> {
    let mut output = Value::Object(Map::new());
    for (index, a) in assignments.iter().enumerate() {
        let value = eval(&a.expression, vars, &output).map_err(|error| Failure {
            index,
            target: a.target.clone(),
            error,
        })?;
        match a.target.strip_prefix("vars.") {
            Some(path) => set_path(vars, path, value),
            None => set_path(&mut output, &a.target, value),
        }
    }
    Ok(output)
}

/// Writes `value` at a dotted path, creating (or replacing non-object) intermediate objects.
pub fn set_path(root: &mut Value, path: &str, value: Value) {
    let mut node = root;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        if !node.is_object() {
            *node = Value::Object(Map::new());
        }
        let Value::Object(map) = node else { return };
        if parts.peek().is_none() {
            map.insert(part.to_string(), value);
            return;
        }
        node = map
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn assignment(target: &str, expression: &str) -> pb::Assignment {
        pb::Assignment {
            target: target.into(),
            expression: expression.into(),
        }
    }

    #[test]
    fn assignments_build_output_and_vars_in_order() {
        let input = json!({"price": 3});
        let mut vars = json!({"rate": 2});
        let out = apply(
            &[
                assignment("total", "input.price * vars.rate"),
                assignment("nested.double", "output.total * 2"),
                assignment("vars.seen", "output.nested.double > 10"),
                assignment("flag", "vars.seen"),
            ],
            &[("input", &input)],
            &mut vars,
        )
        .expect("applies");
        assert_eq!(
            out,
            json!({"total": 6, "nested": {"double": 12}, "flag": true})
        );
        assert_eq!(vars, json!({"rate": 2, "seen": true}));
    }

    #[test]
    fn the_failing_assignment_is_named() {
        let mut vars = json!({});
        let err = apply(
            &[assignment("a", "1"), assignment("b", "input.missing")],
            &[("input", &json!({}))],
            &mut vars,
        )
        .expect_err("fails");
        assert_eq!((err.index, err.target.as_str()), (1, "b"));
        assert!(matches!(err.error, EvalError::Runtime(_)));
    }
}
