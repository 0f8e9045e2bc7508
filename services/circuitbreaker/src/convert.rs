//! Breakers and their configuration between the contract and the state machine: configurations are
//! range-checked field by field, zero fields take the defaults.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use meshflow_kit::convert::{duration, from_duration, timestamp};
use meshflow_kit::{FieldPath, Violations};
use meshflow_proto::circuitbreaker::v1 as pb;

use crate::machine::{Config, State, StatusRange, Transition};
use crate::store::Stored;

/// Fields of a configuration, as an update mask names them.
pub const CONFIG_FIELDS: &[&str] = &[
    "window",
    "minimum_calls",
    "failure_rate_threshold",
    "slow_call_rate_threshold",
    "slow_call_duration",
    "wait_in_open",
    "permitted_calls_in_half_open",
    "max_time_in_half_open",
    "open_backoff_multiplier",
    "max_wait_in_open",
    "failure_statuses",
];

/// Most status ranges of one configuration.
pub const MAX_STATUS_RANGES: usize = 32;

/// The contract's state of a machine state.
pub fn state(s: State) -> pb::CircuitBreakerState {
    match s {
        State::Closed => pb::CircuitBreakerState::Closed,
        State::Open => pb::CircuitBreakerState::Open,
        State::HalfOpen => pb::CircuitBreakerState::HalfOpen,
        State::ForcedOpen => pb::CircuitBreakerState::ForcedOpen,
        State::Disabled => pb::CircuitBreakerState::Disabled,
    }
}

/// The machine state of a contract state (`None` for UNSPECIFIED).
pub fn from_state(s: pb::CircuitBreakerState) -> Option<State> {
    Some(match s {
        pb::CircuitBreakerState::Unspecified => return None,
        pb::CircuitBreakerState::Closed => State::Closed,
        pb::CircuitBreakerState::Open => State::Open,
        pb::CircuitBreakerState::HalfOpen => State::HalfOpen,
        pb::CircuitBreakerState::ForcedOpen => State::ForcedOpen,
        pb::CircuitBreakerState::Disabled => State::Disabled,
    })
}

/// The contract's form of a configuration.
pub fn config(c: &Config) -> pb::CircuitBreakerConfig {
    pb::CircuitBreakerConfig {
        window: Some(duration(c.window)),
        minimum_calls: c.minimum_calls,
        failure_rate_threshold: c.failure_rate_threshold,
        slow_call_rate_threshold: c.slow_call_rate_threshold,
        slow_call_duration: Some(duration(c.slow_call_duration)),
        wait_in_open: Some(duration(c.wait_in_open)),
        permitted_calls_in_half_open: c.permitted_calls_in_half_open,
        max_time_in_half_open: Some(duration(c.max_time_in_half_open)),
        open_backoff_multiplier: c.open_backoff_multiplier,
        max_wait_in_open: Some(duration(c.max_wait_in_open)),
        failure_statuses: c
            .failure_statuses
            .iter()
            .map(|r| pb::StatusRange {
                first: i32::from(r.from),
                last: i32::from(r.to),
            })
            .collect(),
    }
}

/// The etag of a configuration: it names the configuration's content, so an update with it
/// succeeds only on the configuration it was read with, however many calls the breaker has
/// recorded since.
pub fn etag(c: &Config) -> String {
    // FNV-1a over the stored JSON: the same on every replica of one release.
    let json = serde_json::to_vec(c).unwrap_or_default();
    let hash = json.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("c{hash:016x}")
}

/// The contract's form of a stored breaker at `now`.
pub fn breaker(s: &Stored, now: DateTime<Utc>) -> pb::CircuitBreaker {
    let rates = s.breaker.rates(&s.config, now);
    pb::CircuitBreaker {
        service_id: s.service_id.clone(),
        state: state(s.breaker.state) as i32,
        config: Some(config(&s.config)),
        metrics: Some(pb::CircuitBreakerMetrics {
            calls: rates.calls,
            failed_calls: rates.failed,
            slow_calls: rates.slow,
            not_permitted_calls: s.breaker.not_permitted,
            failure_rate: rates.failure_rate,
            slow_call_rate: rates.slow_call_rate,
        }),
        generation: s.breaker.generation,
        state_enter_time: Some(timestamp(s.breaker.state_enter_time)),
        open_until: s.breaker.open_until.map(timestamp),
        consecutive_opens: s.breaker.consecutive_opens,
        etag: etag(&s.config),
    }
}

/// The contract's form of a transition of `service_id`.
pub fn transition(
    service_id: &str,
    t: &Transition,
    after: Option<pb::CircuitBreaker>,
) -> pb::CircuitBreakerTransition {
    pb::CircuitBreakerTransition {
        service_id: service_id.to_string(),
        from_state: state(t.from) as i32,
        to_state: state(t.to) as i32,
        reason: t.reason.as_str().to_string(),
        time: Some(timestamp(t.time)),
        circuit_breaker: after,
    }
}

/// A duration field within `[min, max]`; `None` (or zero) keeps `default`.
fn checked_duration(
    v: &mut Violations,
    path: &FieldPath,
    value: Option<&meshflow_proto::pbjson_types::Duration>,
    default: Duration,
    (min, max): (Duration, Duration),
) -> Duration {
    let Some(d) = value else { return default };
    if d.seconds == 0 && d.nanos == 0 {
        return default;
    }
    match from_duration(d) {
        Some(d) if d >= min && d <= max => d,
        _ => {
            v.add(
                path,
                format!("must be between {} and {}", human(min), human(max)),
            );
            default
        }
    }
}

fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// `base` with the `fields` of `c` applied (every field when `fields` is `None`), each checked;
/// violations are reported under `root`.
pub fn apply_config(
    base: &Config,
    c: &pb::CircuitBreakerConfig,
    fields: Option<&BTreeSet<&str>>,
    root: &FieldPath,
) -> Result<Config, Vec<meshflow_kit::Violation>> {
    let d = Config::default();
    let mut v = Violations::new();
    let mut out = base.clone();
    let on = |f: &str| fields.is_none_or(|set| set.contains(f));
    let path = |f: &str| root.field(f);
    if on("window") {
        out.window = checked_duration(
            &mut v,
            &path("window"),
            c.window.as_ref(),
            d.window,
            (Duration::from_secs(1), DAY),
        );
    }
    if on("minimum_calls") {
        out.minimum_calls = match c.minimum_calls {
            0 => d.minimum_calls,
            n if n > 1_000_000 => {
                v.add(&path("minimum_calls"), "must be at most 1000000");
                d.minimum_calls
            }
            n => n,
        };
    }
    for (field, value, default, target) in [
        (
            "failure_rate_threshold",
            c.failure_rate_threshold,
            d.failure_rate_threshold,
            &mut out.failure_rate_threshold,
        ),
        (
            "slow_call_rate_threshold",
            c.slow_call_rate_threshold,
            d.slow_call_rate_threshold,
            &mut out.slow_call_rate_threshold,
        ),
    ] {
        if !on(field) {
            continue;
        }
        *target = if value == 0.0 {
            default
        } else if value.is_finite() && value > 0.0 && value <= 100.0 {
            value
        } else {
            v.add(&path(field), "must be a percentage above 0 and at most 100");
            default
        };
    }
    if on("slow_call_duration") {
        out.slow_call_duration = checked_duration(
            &mut v,
            &path("slow_call_duration"),
            c.slow_call_duration.as_ref(),
            d.slow_call_duration,
            (Duration::from_millis(1), HOUR),
        );
    }
    if on("wait_in_open") {
        out.wait_in_open = checked_duration(
            &mut v,
            &path("wait_in_open"),
            c.wait_in_open.as_ref(),
            d.wait_in_open,
            (Duration::from_millis(10), DAY),
        );
    }
    if on("permitted_calls_in_half_open") {
        out.permitted_calls_in_half_open = match c.permitted_calls_in_half_open {
            0 => d.permitted_calls_in_half_open,
            n if n > 1000 => {
                v.add(
                    &path("permitted_calls_in_half_open"),
                    "must be at most 1000",
                );
                d.permitted_calls_in_half_open
            }
            n => n,
        };
    }
    if on("max_time_in_half_open") {
        out.max_time_in_half_open = checked_duration(
            &mut v,
            &path("max_time_in_half_open"),
            c.max_time_in_half_open.as_ref(),
            d.max_time_in_half_open,
            (Duration::from_millis(10), DAY),
        );
    }
    if on("open_backoff_multiplier") {
        let m = c.open_backoff_multiplier;
        out.open_backoff_multiplier = if m == 0.0 {
            d.open_backoff_multiplier
        } else if m.is_finite() && (1.0..=100.0).contains(&m) {
            m
        } else {
            v.add(
                &path("open_backoff_multiplier"),
                "must be between 1 and 100",
            );
            d.open_backoff_multiplier
        };
    }
    if on("max_wait_in_open") {
        out.max_wait_in_open = checked_duration(
            &mut v,
            &path("max_wait_in_open"),
            c.max_wait_in_open.as_ref(),
            d.max_wait_in_open,
            (Duration::from_millis(10), DAY),
        );
    }
    if out.max_wait_in_open < out.wait_in_open && (on("max_wait_in_open") || on("wait_in_open")) {
        v.add(
            &path("max_wait_in_open"),
            format!(
                "must be at least wait_in_open ({})",
                human(out.wait_in_open)
            ),
        );
    }
    if on("failure_statuses") {
        let p = path("failure_statuses");
        if c.failure_statuses.is_empty() {
            out.failure_statuses = d.failure_statuses.clone();
        } else if c.failure_statuses.len() > MAX_STATUS_RANGES {
            v.add(&p, format!("has more than {MAX_STATUS_RANGES} ranges"));
        } else {
            let mut ranges = Vec::new();
            for (i, r) in c.failure_statuses.iter().enumerate() {
                let last = if r.last == 0 { r.first } else { r.last };
                let status = |n: i32| u16::try_from(n).ok().filter(|s| (100..=599).contains(s));
                match (status(r.first), status(last)) {
                    (Some(from), Some(to)) if from <= to => ranges.push(StatusRange { from, to }),
                    (Some(_), Some(_)) => {
                        v.add(&p.index(i).field("last"), "must not be below first")
                    }
                    (None, _) => v.add(
                        &p.index(i).field("first"),
                        "must be an HTTP status, 100 to 599",
                    ),
                    (_, None) => v.add(
                        &p.index(i).field("last"),
                        "must be an HTTP status, 100 to 599",
                    ),
                }
            }
            out.failure_statuses = ranges;
        }
    }
    v.into_result(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: i64) -> Option<meshflow_proto::pbjson_types::Duration> {
        Some(meshflow_proto::pbjson_types::Duration {
            seconds: s,
            nanos: 0,
        })
    }

    #[test]
    fn zero_fields_take_the_defaults_and_round_trip() {
        let root = FieldPath::root("config");
        let c = apply_config(
            &Config::default(),
            &pb::CircuitBreakerConfig::default(),
            None,
            &root,
        )
        .expect("valid");
        assert_eq!(c, Config::default());
        let back = apply_config(&Config::default(), &config(&c), None, &root).expect("valid");
        assert_eq!(back, c);
    }

    #[test]
    fn every_bad_field_is_named() {
        let bad = pb::CircuitBreakerConfig {
            window: secs(-1),
            minimum_calls: 2_000_000,
            failure_rate_threshold: 101.0,
            slow_call_rate_threshold: f64::NAN,
            slow_call_duration: secs(7200),
            wait_in_open: secs(100),
            permitted_calls_in_half_open: 5000,
            max_time_in_half_open: secs(90_000),
            open_backoff_multiplier: 0.5,
            max_wait_in_open: secs(10),
            failure_statuses: vec![
                pb::StatusRange {
                    first: 500,
                    last: 499,
                },
                pb::StatusRange { first: 99, last: 0 },
                pb::StatusRange {
                    first: 500,
                    last: 600,
                },
            ],
        };
        let violations = apply_config(&Config::default(), &bad, None, &FieldPath::root("config"))
            .expect_err("invalid");
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "config.window",
                "config.minimum_calls",
                "config.failure_rate_threshold",
                "config.slow_call_rate_threshold",
                "config.slow_call_duration",
                "config.permitted_calls_in_half_open",
                "config.max_time_in_half_open",
                "config.open_backoff_multiplier",
                "config.max_wait_in_open",
                "config.failure_statuses[0].last",
                "config.failure_statuses[1].first",
                "config.failure_statuses[2].last",
            ]
        );
    }

    #[test]
    fn a_mask_changes_only_its_fields_and_etags_name_the_content() {
        let base = Config {
            minimum_calls: 7,
            ..Config::default()
        };
        let fields: BTreeSet<&str> = ["wait_in_open"].into();
        let c = apply_config(
            &base,
            &pb::CircuitBreakerConfig {
                wait_in_open: secs(9),
                minimum_calls: 99,
                ..Default::default()
            },
            Some(&fields),
            &FieldPath::root("config"),
        )
        .expect("valid");
        assert_eq!(
            (c.minimum_calls, c.wait_in_open),
            (7, Duration::from_secs(9))
        );
        assert_ne!(etag(&c), etag(&base));
        assert_eq!(etag(&base), etag(&base.clone()));
    }
}
