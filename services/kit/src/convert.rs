//! Conversions between protobuf well-known types and Rust/JSON values.

use chrono::{DateTime, Utc};
use meshflow_proto::pbjson_types::{self, ListValue, Struct, Timestamp, Value, value::Kind};
use std::time::Duration;

/// A chrono instant as a protobuf Timestamp.
pub fn timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// A protobuf Timestamp as a chrono instant, if it is in range.
pub fn from_timestamp(t: &Timestamp) -> Option<DateTime<Utc>> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return None;
    }
    DateTime::from_timestamp(t.seconds, t.nanos as u32)
}

/// A protobuf Duration as a std Duration; `None` when negative or malformed.
pub fn from_duration(d: &pbjson_types::Duration) -> Option<Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// A std Duration as a protobuf Duration (saturating at i64::MAX seconds).
pub fn duration(d: Duration) -> pbjson_types::Duration {
    pbjson_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// A protobuf Value as JSON. NaN and infinities (not representable in JSON) become null.
pub fn to_json(value: &Value) -> serde_json::Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => number(*n),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(list)) => {
            serde_json::Value::Array(list.values.iter().map(to_json).collect())
        }
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

/// A protobuf Struct as a JSON object.
pub fn struct_to_json(s: &Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), to_json(v)))
            .collect(),
    )
}

fn number(n: f64) -> serde_json::Value {
    // Integral values in the exactly-representable range stay integers, so CEL sees `int`.
    if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
        serde_json::Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, serde_json::Value::Number)
    }
}

/// JSON as a protobuf Value.
pub fn from_json(value: &serde_json::Value) -> Value {
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(from_json).collect(),
        }),
        serde_json::Value::Object(_) => Kind::StructValue(struct_from_json(value)),
    };
    Value { kind: Some(kind) }
}

/// A JSON object as a protobuf Struct (anything else gives an empty Struct).
pub fn struct_from_json(value: &serde_json::Value) -> Struct {
    match value {
        serde_json::Value::Object(map) => Struct {
            fields: map.iter().map(|(k, v)| (k.clone(), from_json(v))).collect(),
        },
        _ => Struct::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trips_through_value() {
        let doc = json!({"a": 1, "b": [true, null, "x", 2.5], "c": {"d": -3}});
        assert_eq!(to_json(&from_json(&doc)), doc);
    }

    #[test]
    fn non_finite_numbers_become_null() {
        let v = Value {
            kind: Some(Kind::NumberValue(f64::NAN)),
        };
        assert_eq!(to_json(&v), serde_json::Value::Null);
    }

    #[test]
    fn durations_and_timestamps_reject_malformed() {
        assert_eq!(
            from_duration(&pbjson_types::Duration {
                seconds: -1,
                nanos: 0
            }),
            None
        );
        assert_eq!(
            from_duration(&pbjson_types::Duration {
                seconds: 2,
                nanos: 5
            }),
            Some(Duration::new(2, 5))
        );
        assert_eq!(
            from_timestamp(&Timestamp {
                seconds: 0,
                nanos: -1
            }),
            None
        );
        let now = DateTime::from_timestamp(1_700_000_000, 123).expect("in range");
        assert_eq!(from_timestamp(&timestamp(now)), Some(now));
    }
}
