//! Retry policy arithmetic (DESIGN §3, resilience.md B.2): which failures are retried and after
//! what delay. Pure functions of the policy, the retry number and a random source, so delays are
//! tested exactly; the engine persists the resulting `next_attempt_at` instead of sleeping on it.

use std::time::Duration;

use meshflow_proto::workflow::v1::{RetryJitter, RetryPolicy, RetryStrategy};

/// A policy with every default applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Growth of the delay.
    pub strategy: RetryStrategy,
    /// Attempts including the first.
    pub max_attempts: u32,
    /// Delay before the first retry.
    pub initial_delay: Duration,
    /// Cap on any delay.
    pub max_delay: Duration,
    /// EXPONENTIAL growth factor.
    pub multiplier: f64,
    /// Randomisation.
    pub jitter: RetryJitter,
    /// HTTP statuses retried; `None`: the HTTP semantics of [`retried_by_default`].
    pub retryable_status_codes: Option<Vec<u32>>,
    /// Longest Retry-After honoured; a longer one stops retrying.
    pub max_retry_after: Duration,
}

/// Whether a status is retried when a policy names none, by HTTP semantics: 408 Request Timeout,
/// 425 Too Early, 429 Too Many Requests, and every 5xx but 501 Not Implemented and 505 HTTP Version
/// Not Supported, which say the request can never succeed as sent.
pub fn retried_by_default(status: u16) -> bool {
    matches!(status, 408 | 425 | 429)
        || ((500..600).contains(&status) && !matches!(status, 501 | 505))
}

fn duration(d: Option<&meshflow_proto::pbjson_types::Duration>, default: Duration) -> Duration {
    d.and_then(meshflow_kit::convert::from_duration)
        .filter(|d| !d.is_zero())
        .unwrap_or(default)
}

impl Policy {
    /// The effective policy of a step: its own, else the workflow default, else the built-in default.
    pub fn resolve(step: Option<&RetryPolicy>, workflow: Option<&RetryPolicy>) -> Self {
        let p = step.or(workflow).cloned().unwrap_or_default();
        let strategy = match RetryStrategy::try_from(p.strategy) {
            Ok(RetryStrategy::Unspecified) | Err(_) => RetryStrategy::Exponential,
            Ok(s) => s,
        };
        let max_attempts = match strategy {
            RetryStrategy::None => 1,
            _ if p.max_attempts == 0 => 3,
            _ => p.max_attempts,
        };
        let jitter = match RetryJitter::try_from(p.jitter) {
            Ok(RetryJitter::Unspecified) | Err(_) if strategy == RetryStrategy::Exponential => {
                RetryJitter::Full
            }
            Ok(RetryJitter::Unspecified) | Err(_) => RetryJitter::None,
            Ok(j) => j,
        };
        Self {
            strategy,
            max_attempts,
            initial_delay: duration(p.initial_delay.as_ref(), Duration::from_secs(1)),
            max_delay: duration(p.max_delay.as_ref(), Duration::from_secs(60)),
            multiplier: if p.multiplier >= 1.0 {
                p.multiplier
            } else {
                2.0
            },
            jitter,
            retryable_status_codes: (!p.retryable_status_codes.is_empty())
                .then(|| p.retryable_status_codes.clone()),
            max_retry_after: duration(p.max_retry_after.as_ref(), Duration::from_secs(300)),
        }
    }

    /// The delay before attempt `failed_attempt + 1`, or `None` when no attempt is left.
    /// `random` yields uniform values in [0, 1). `retry_after` is the server's pushback, if any.
    pub fn next_delay(
        &self,
        failed_attempt: u32,
        retry_after: Option<Duration>,
        random: &mut dyn FnMut() -> f64,
    ) -> Option<Duration> {
        if failed_attempt >= self.max_attempts {
            return None;
        }
        if let Some(ra) = retry_after
            && ra > self.max_retry_after
        {
            return None;
        }
        let n = failed_attempt; // the n-th retry follows the n-th failure
        let base = match self.strategy {
            RetryStrategy::None | RetryStrategy::Unspecified => return None,
            RetryStrategy::Fixed => self.initial_delay,
            RetryStrategy::Linear => self.initial_delay.saturating_mul(n),
            RetryStrategy::Exponential => {
                let factor = self.multiplier.powi(n.saturating_sub(1).min(1000) as i32);
                let secs = self.initial_delay.as_secs_f64() * factor;
                if secs.is_finite() && secs < self.max_delay.as_secs_f64() {
                    Duration::from_secs_f64(secs)
                } else {
                    self.max_delay
                }
            }
        };
        let capped = base.min(self.max_delay);
        let jittered = match self.jitter {
            RetryJitter::Full => capped.mul_f64(random().clamp(0.0, 1.0)),
            RetryJitter::Equal => capped / 2 + (capped / 2).mul_f64(random().clamp(0.0, 1.0)),
            RetryJitter::None | RetryJitter::Unspecified => capped,
        };
        Some(match retry_after {
            Some(ra) => jittered.max(ra),
            None => jittered,
        })
    }

    /// Whether an HTTP status is retried.
    pub fn retries_status(&self, status: u16) -> bool {
        match &self.retryable_status_codes {
            Some(codes) => codes.contains(&u32::from(status)),
            None => retried_by_default(status),
        }
    }
}

/// Parses a `Retry-After` header: delay-seconds, or an HTTP date relative to `now`.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&chrono::Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(strategy: RetryStrategy, max_attempts: u32, jitter: RetryJitter) -> Policy {
        Policy {
            strategy,
            max_attempts,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
            multiplier: 2.0,
            jitter,
            retryable_status_codes: None,
            max_retry_after: Duration::from_secs(300),
        }
    }

    fn delays(p: &Policy, r: f64) -> Vec<Option<Duration>> {
        (1..=6).map(|n| p.next_delay(n, None, &mut || r)).collect()
    }

    const fn s(secs: u64) -> Option<Duration> {
        Some(Duration::from_secs(secs))
    }

    #[test]
    fn fixed_linear_exponential_exact_delays() {
        assert_eq!(
            delays(&policy(RetryStrategy::Fixed, 4, RetryJitter::None), 0.0),
            [s(1), s(1), s(1), None, None, None]
        );
        assert_eq!(
            delays(&policy(RetryStrategy::Linear, 5, RetryJitter::None), 0.0),
            [s(1), s(2), s(3), s(4), None, None]
        );
        // 1, 2, 4, 8, then capped at 10.
        assert_eq!(
            delays(
                &policy(RetryStrategy::Exponential, 7, RetryJitter::None),
                0.0
            ),
            [s(1), s(2), s(4), s(8), s(10), s(10)]
        );
        assert_eq!(
            delays(&policy(RetryStrategy::None, 1, RetryJitter::None), 0.0),
            [None; 6]
        );
    }

    #[test]
    fn max_attempts_counts_the_first_call() {
        let p = policy(RetryStrategy::Fixed, 3, RetryJitter::None);
        assert!(
            p.next_delay(1, None, &mut || 0.0).is_some(),
            "after attempt 1, attempt 2"
        );
        assert!(
            p.next_delay(2, None, &mut || 0.0).is_some(),
            "after attempt 2, attempt 3"
        );
        assert!(
            p.next_delay(3, None, &mut || 0.0).is_none(),
            "3 attempts in all"
        );
    }

    #[test]
    fn full_jitter_stays_within_zero_and_the_delay() {
        let p = policy(RetryStrategy::Exponential, 10, RetryJitter::Full);
        assert_eq!(p.next_delay(3, None, &mut || 0.0), s(0));
        assert_eq!(p.next_delay(3, None, &mut || 0.5), s(2));
        let top = p.next_delay(3, None, &mut || 0.999_999).expect("delay");
        assert!(
            top < Duration::from_secs(4) && top > Duration::from_millis(3999),
            "{top:?}"
        );
        let mut seq = [0.1, 0.9, 0.3].into_iter().cycle();
        for n in 1..10 {
            let d = p
                .next_delay(n, None, &mut || seq.next().unwrap_or(0.0))
                .expect("delay");
            assert!(d <= Duration::from_secs(10), "{n}: {d:?}");
        }
    }

    #[test]
    fn equal_jitter_keeps_half() {
        let p = policy(RetryStrategy::Exponential, 10, RetryJitter::Equal);
        assert_eq!(p.next_delay(3, None, &mut || 0.0), s(2));
        assert_eq!(p.next_delay(3, None, &mut || 0.5), s(3));
    }

    #[test]
    fn retry_after_is_honoured_within_limits() {
        let p = policy(RetryStrategy::Fixed, 5, RetryJitter::None);
        assert_eq!(
            p.next_delay(1, Some(Duration::from_secs(7)), &mut || 0.0),
            s(7)
        );
        assert_eq!(
            p.next_delay(1, Some(Duration::from_millis(10)), &mut || 0.0),
            s(1),
            "never shorter than the policy"
        );
        assert_eq!(
            p.next_delay(1, Some(Duration::from_secs(301)), &mut || 0.0),
            None,
            "too long: stop retrying"
        );
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .expect("time")
            .with_timezone(&chrono::Utc);
        assert_eq!(parse_retry_after("120", now), s(120));
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now),
            s(30)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn huge_exponents_saturate_at_the_cap() {
        let mut p = policy(RetryStrategy::Exponential, 10, RetryJitter::None);
        p.multiplier = 100.0;
        assert_eq!(p.next_delay(9, None, &mut || 0.0), s(10));
    }

    #[test]
    fn defaults_resolve() {
        let p = Policy::resolve(None, None);
        assert_eq!(
            (p.strategy, p.max_attempts, p.jitter),
            (RetryStrategy::Exponential, 3, RetryJitter::Full)
        );
        assert_eq!(
            (p.initial_delay, p.max_delay, p.multiplier),
            (Duration::from_secs(1), Duration::from_secs(60), 2.0)
        );
        let step = RetryPolicy {
            strategy: RetryStrategy::Fixed as i32,
            max_attempts: 5,
            ..Default::default()
        };
        let p = Policy::resolve(Some(&step), None);
        assert_eq!(
            (p.strategy, p.max_attempts, p.jitter),
            (RetryStrategy::Fixed, 5, RetryJitter::None)
        );
        assert!(p.retries_status(503) && !p.retries_status(404));
    }
}

#[cfg(test)]
mod status_tests {
    use super::*;

    #[test]
    fn default_statuses_follow_http_semantics() {
        let p = Policy::resolve(None, None);
        let retried: Vec<u16> = (100..600).filter(|s| p.retries_status(*s)).collect();
        let mut expected = vec![408, 425, 429, 500];
        expected.extend(502..505);
        expected.extend(506..600);
        assert_eq!(retried, expected);
    }

    #[test]
    fn a_policy_list_replaces_the_defaults() {
        let step = RetryPolicy {
            retryable_status_codes: vec![404, 501],
            ..Default::default()
        };
        let p = Policy::resolve(Some(&step), None);
        assert!(p.retries_status(404) && p.retries_status(501));
        assert!(!p.retries_status(503) && !p.retries_status(429));
    }
}
