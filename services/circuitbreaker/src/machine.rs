//! The breaker state machine: pure functions of (breaker, config, now, event), no I/O, no clock of
//! its own. The store persists a [`Breaker`] and shares it between replicas; everything it decides
//! is decided here.
//!
//! States and transitions (`→` automatic, `⇒` operator):
//!
//! ```text
//! CLOSED ──failure or slow-call rate ≥ threshold──→ OPEN ──open_until reached──→ HALF_OPEN
//! HALF_OPEN ──every probe reported, rates below──→ CLOSED
//! HALF_OPEN ──every probe reported, a rate at or above; or max_time_in_half_open──→ OPEN
//! any ⇒ FORCED_OPEN (until reset, or for a duration, then → HALF_OPEN)
//! any ⇒ DISABLED (until reset)      any ⇒ CLOSED by reset
//! ```
//!
//! Every transition bumps the generation: a permit carries the generation it was given in, and an
//! outcome reported with an older one counts for nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::window::Window;

/// The state of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// Calls pass; their outcomes fill the window.
    Closed,
    /// Calls are refused until `open_until`.
    Open,
    /// A few probe calls pass; their outcomes decide.
    HalfOpen,
    /// Refused by an operator, until reset or `open_until`.
    ForcedOpen,
    /// Every call passes and nothing is recorded, until reset.
    Disabled,
}

impl State {
    /// The name used in transitions' reasons and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "CLOSED",
            State::Open => "OPEN",
            State::HalfOpen => "HALF_OPEN",
            State::ForcedOpen => "FORCED_OPEN",
            State::Disabled => "DISABLED",
        }
    }

    /// The state stored as `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "CLOSED" => State::Closed,
            "OPEN" => State::Open,
            "HALF_OPEN" => State::HalfOpen,
            "FORCED_OPEN" => State::ForcedOpen,
            "DISABLED" => State::Disabled,
            _ => return None,
        })
    }
}

/// An inclusive range of HTTP statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRange {
    /// First status of the range.
    pub from: u16,
    /// Last status of the range.
    pub to: u16,
}

impl StatusRange {
    fn contains(self, status: u16) -> bool {
        (self.from..=self.to).contains(&status)
    }
}

/// A breaker's configuration; [`Config::default`] holds the documented defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Length of the time-based sliding window.
    #[serde(with = "millis")]
    pub window: Duration,
    /// Calls in the window before a rate counts.
    pub minimum_calls: u32,
    /// Trip when the failure percentage is at least this.
    pub failure_rate_threshold: f64,
    /// Trip when the slow-call percentage is at least this (100: only when every call is slow).
    pub slow_call_rate_threshold: f64,
    /// A call that takes at least this long is slow.
    #[serde(with = "millis")]
    pub slow_call_duration: Duration,
    /// Time spent OPEN before probing, the first time.
    #[serde(with = "millis")]
    pub wait_in_open: Duration,
    /// Each consecutive opening (without closing in between) waits this many times longer.
    pub open_backoff_multiplier: f64,
    /// The longest wait in OPEN, whatever the backoff.
    #[serde(with = "millis")]
    pub max_wait_in_open: Duration,
    /// Probe calls admitted in HALF_OPEN, across every replica.
    pub permitted_calls_in_half_open: u32,
    /// Longest time in HALF_OPEN before going back to OPEN.
    #[serde(with = "millis")]
    pub max_time_in_half_open: Duration,
    /// Statuses that count as failures (transport errors and timeouts always do).
    pub failure_statuses: Vec<StatusRange>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            minimum_calls: 10,
            failure_rate_threshold: 50.0,
            slow_call_rate_threshold: 100.0,
            slow_call_duration: Duration::from_secs(30),
            wait_in_open: Duration::from_secs(30),
            open_backoff_multiplier: 1.0,
            max_wait_in_open: Duration::from_secs(300),
            permitted_calls_in_half_open: 3,
            max_time_in_half_open: Duration::from_secs(60),
            failure_statuses: vec![
                StatusRange { from: 429, to: 429 },
                StatusRange { from: 500, to: 599 },
            ],
        }
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

impl Config {
    /// How long the `n`th consecutive opening lasts: `wait_in_open × multiplier^(n−1)`, capped.
    pub fn open_wait(&self, n: u32) -> Duration {
        let base = self.wait_in_open.as_secs_f64();
        let exponent = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        let wait = base * self.open_backoff_multiplier.max(1.0).powi(exponent);
        let cap = self.max_wait_in_open.max(self.wait_in_open);
        if wait.is_finite() && wait < cap.as_secs_f64() {
            Duration::from_secs_f64(wait)
        } else {
            cap
        }
    }

    /// Whether an HTTP status counts as a failure.
    pub fn is_failure_status(&self, status: u16) -> bool {
        self.failure_statuses.iter().any(|r| r.contains(status))
    }
}

/// How a call ended, as the breaker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// An HTTP answer with this status.
    Answered(u16),
    /// No answer: connection refused or reset, DNS, TLS.
    TransportError,
    /// No answer in time.
    TimedOut,
    /// The caller gave up (a cancelled execution, a shutdown): it says nothing of the service.
    Cancelled,
}

/// What a call's outcome counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// A failure.
    pub failed: bool,
    /// Slower than `slow_call_duration`.
    pub slow: bool,
}

impl Outcome {
    /// The outcome of `call`, which took `took`; `None` for a call that records nothing.
    pub fn of(config: &Config, call: Call, took: Duration) -> Option<Self> {
        let failed = match call {
            Call::Answered(status) => config.is_failure_status(status),
            Call::TransportError | Call::TimedOut => true,
            Call::Cancelled => return None,
        };
        Some(Self {
            failed,
            slow: took >= config.slow_call_duration,
        })
    }
}

/// A permission to call, given in one generation of the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permit {
    /// The generation it was given in.
    pub generation: i64,
    /// A HALF_OPEN probe: it holds one of the permitted slots until it reports.
    pub probe: bool,
    /// Whether its outcome is recorded (not while DISABLED).
    pub recorded: bool,
}

/// The breaker's answer to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Call.
    Permitted(Permit),
    /// Do not call. `retry_at`: when the breaker may admit calls again (`None`: not known yet,
    /// the probes have not all reported, or an operator holds it open until reset).
    Refused {
        /// The state that refused.
        state: State,
        /// When to ask again.
        retry_at: Option<DateTime<Utc>>,
    },
}

/// Why a breaker changed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The failure rate reached its threshold.
    FailureRateExceeded,
    /// The slow-call rate reached its threshold.
    SlowCallRateExceeded,
    /// `open_until` came: probing starts.
    WaitInOpenElapsed,
    /// The probes reported rates below the thresholds.
    ProbesSucceeded,
    /// The probes reported a rate at or above a threshold.
    ProbesFailed,
    /// HALF_OPEN lasted `max_time_in_half_open` without a verdict.
    HalfOpenTimedOut,
    /// An operator reset it.
    Reset,
    /// An operator forced it open.
    ForcedOpen,
    /// An operator disabled it.
    Disabled,
}

impl Reason {
    /// The reason as transitions report it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::FailureRateExceeded => "failure_rate_exceeded",
            Reason::SlowCallRateExceeded => "slow_call_rate_exceeded",
            Reason::WaitInOpenElapsed => "wait_in_open_elapsed",
            Reason::ProbesSucceeded => "probes_succeeded",
            Reason::ProbesFailed => "probes_failed",
            Reason::HalfOpenTimedOut => "half_open_timed_out",
            Reason::Reset => "reset",
            Reason::ForcedOpen => "forced_open",
            Reason::Disabled => "disabled",
        }
    }

    /// The reason named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        [
            Reason::FailureRateExceeded,
            Reason::SlowCallRateExceeded,
            Reason::WaitInOpenElapsed,
            Reason::ProbesSucceeded,
            Reason::ProbesFailed,
            Reason::HalfOpenTimedOut,
            Reason::Reset,
            Reason::ForcedOpen,
            Reason::Disabled,
        ]
        .into_iter()
        .find(|r| r.as_str() == name)
    }
}

/// A change of state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// State before.
    pub from: State,
    /// State after.
    pub to: State,
    /// Why.
    pub reason: Reason,
    /// When.
    pub time: DateTime<Utc>,
}

/// A transition the state machine does not make (CLOSED → HALF_OPEN, OPEN → CLOSED without a
/// reset, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a circuit breaker does not go from {} to {} ({})", from.as_str(), to.as_str(), reason.as_str())]
pub struct IllegalTransition {
    /// State it was in.
    pub from: State,
    /// State asked for.
    pub to: State,
    /// Why it was asked for.
    pub reason: Reason,
}

/// Whether the machine goes from `from` to `to` for `reason`. Operators may force open, disable
/// or reset from any state; the automatic transitions follow the diagram above.
pub fn legal(from: State, to: State, reason: Reason) -> bool {
    use State::*;
    match reason {
        Reason::Reset => to == Closed,
        Reason::ForcedOpen => to == ForcedOpen,
        Reason::Disabled => to == Disabled,
        Reason::FailureRateExceeded | Reason::SlowCallRateExceeded => from == Closed && to == Open,
        Reason::WaitInOpenElapsed => matches!(from, Open | ForcedOpen) && to == HalfOpen,
        Reason::ProbesSucceeded => from == HalfOpen && to == Closed,
        Reason::ProbesFailed | Reason::HalfOpenTimedOut => from == HalfOpen && to == Open,
    }
}

/// The probes of the current HALF_OPEN state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probes {
    /// Admitted (in flight or reported).
    pub admitted: u32,
    /// Reported successes.
    pub succeeded: u32,
    /// Reported failures.
    pub failed: u32,
    /// Reported slow calls.
    pub slow: u32,
}

/// A breaker: its state and window. The store keeps one per service and a version beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Breaker {
    /// The state.
    pub state: State,
    /// Bumped on every transition.
    pub generation: i64,
    /// When the state was entered.
    pub state_enter_time: DateTime<Utc>,
    /// While OPEN (or FORCED_OPEN for a duration): when probing may start.
    pub open_until: Option<DateTime<Utc>>,
    /// Times opened without closing in between.
    pub consecutive_opens: u32,
    /// The probes of HALF_OPEN.
    pub probes: Probes,
    /// The outcomes of CLOSED.
    pub window: Window,
    /// Calls refused since the window last started over.
    pub not_permitted: i64,
}

/// The rates of a window or of the probes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    /// Calls counted.
    pub calls: i64,
    /// Failed calls.
    pub failed: i64,
    /// Slow calls.
    pub slow: i64,
    /// Failure percentage; −1 below `minimum_calls`.
    pub failure_rate: f64,
    /// Slow-call percentage; −1 below `minimum_calls`.
    pub slow_call_rate: f64,
}

impl Rates {
    fn of(calls: i64, failed: i64, slow: i64, minimum: i64) -> Self {
        let rate = |n: i64| {
            if calls < minimum.max(1) {
                -1.0
            } else {
                n as f64 * 100.0 / calls as f64
            }
        };
        Self {
            calls,
            failed,
            slow,
            failure_rate: rate(failed),
            slow_call_rate: rate(slow),
        }
    }

    /// Why these rates trip the breaker, if they do.
    fn trips(&self, config: &Config) -> Option<Reason> {
        if self.failure_rate >= 0.0 && self.failure_rate >= config.failure_rate_threshold {
            Some(Reason::FailureRateExceeded)
        } else if self.slow_call_rate >= 0.0
            && self.slow_call_rate >= config.slow_call_rate_threshold
        {
            Some(Reason::SlowCallRateExceeded)
        } else {
            None
        }
    }
}

impl Breaker {
    /// A new breaker, CLOSED with an empty window. Its first generation is the time, in
    /// microseconds: a breaker deleted and made again never reuses a generation the old one gave
    /// permits in.
    pub fn new(config: &Config, now: DateTime<Utc>) -> Self {
        Self {
            state: State::Closed,
            generation: now.timestamp_micros(),
            state_enter_time: now,
            open_until: None,
            consecutive_opens: 0,
            probes: Probes::default(),
            window: Window::new(config.window),
            not_permitted: 0,
        }
    }

    /// The window's counts and rates at `now`.
    pub fn rates(&self, config: &Config, now: DateTime<Utc>) -> Rates {
        let t = self.window.totals(now);
        Rates::of(t.calls, t.failed, t.slow, i64::from(config.minimum_calls))
    }

    /// Moves to `to`, bumping the generation; `X → X` changes nothing and reports nothing.
    pub fn transition(
        &mut self,
        config: &Config,
        to: State,
        reason: Reason,
        now: DateTime<Utc>,
    ) -> Result<Option<Transition>, IllegalTransition> {
        let from = self.state;
        if from == to && reason != Reason::Reset {
            return Ok(None);
        }
        if !legal(from, to, reason) {
            return Err(IllegalTransition { from, to, reason });
        }
        self.state = to;
        self.generation += 1;
        self.state_enter_time = now;
        self.probes = Probes::default();
        self.open_until = None;
        match to {
            State::Open => {
                self.consecutive_opens = self.consecutive_opens.saturating_add(1);
                let wait = config.open_wait(self.consecutive_opens);
                self.open_until = Some(now + chrono::Duration::from_std(wait).unwrap_or_default());
            }
            State::Closed => {
                self.consecutive_opens = 0;
                self.window = Window::new(config.window);
                self.not_permitted = 0;
            }
            State::HalfOpen | State::ForcedOpen | State::Disabled => {}
        }
        if from == to {
            // A reset of a CLOSED breaker: the window starts over, nothing to report.
            return Ok(None);
        }
        Ok(Some(Transition {
            from,
            to,
            reason,
            time: now,
        }))
    }

    /// Forces the breaker open, until reset (`None`) or for `duration`, after which it probes.
    pub fn force_open(
        &mut self,
        config: &Config,
        duration: Option<Duration>,
        now: DateTime<Utc>,
    ) -> Option<Transition> {
        let transition = if self.state == State::ForcedOpen {
            None
        } else {
            self.transition(config, State::ForcedOpen, Reason::ForcedOpen, now)
                .ok()
                .flatten()
        };
        self.open_until = duration.map(|d| now + chrono::Duration::from_std(d).unwrap_or_default());
        transition
    }

    /// Asks whether a call may go now; moves OPEN (or a timed FORCED_OPEN) to HALF_OPEN once its
    /// time has come, and HALF_OPEN back to OPEN once it has lasted too long. The transitions it
    /// made are pushed onto `transitions`.
    pub fn acquire(
        &mut self,
        config: &Config,
        now: DateTime<Utc>,
        transitions: &mut Vec<Transition>,
    ) -> Decision {
        self.advance(config, now, transitions);
        let permit = |probe, recorded| {
            Decision::Permitted(Permit {
                generation: self.generation,
                probe,
                recorded,
            })
        };
        match self.state {
            State::Closed => permit(false, true),
            State::Disabled => permit(false, false),
            State::HalfOpen if self.probes.admitted < config.permitted_calls_in_half_open => {
                self.probes.admitted += 1;
                Decision::Permitted(Permit {
                    generation: self.generation,
                    probe: true,
                    recorded: true,
                })
            }
            state => {
                self.not_permitted += 1;
                Decision::Refused {
                    state,
                    retry_at: self.retry_at(config),
                }
            }
        }
    }

    /// When a refused call may ask again: `open_until` while OPEN; while HALF_OPEN with every
    /// probe out, the moment HALF_OPEN gives up (the verdict comes sooner, and wakes the waiters).
    pub fn retry_at(&self, config: &Config) -> Option<DateTime<Utc>> {
        match self.state {
            State::Open | State::ForcedOpen => self.open_until,
            State::HalfOpen => Some(
                self.state_enter_time
                    + chrono::Duration::from_std(config.max_time_in_half_open).unwrap_or_default(),
            ),
            State::Closed | State::Disabled => None,
        }
    }

    /// The transitions time alone makes at `now`.
    pub fn advance(
        &mut self,
        config: &Config,
        now: DateTime<Utc>,
        transitions: &mut Vec<Transition>,
    ) {
        let mut push = |t: Result<Option<Transition>, IllegalTransition>| {
            if let Ok(Some(t)) = t {
                transitions.push(t);
            }
        };
        if matches!(self.state, State::Open | State::ForcedOpen)
            && self.open_until.is_some_and(|until| now >= until)
        {
            push(self.transition(config, State::HalfOpen, Reason::WaitInOpenElapsed, now));
        }
        if self.state == State::HalfOpen
            && now - self.state_enter_time
                >= chrono::Duration::from_std(config.max_time_in_half_open).unwrap_or_default()
        {
            push(self.transition(config, State::Open, Reason::HalfOpenTimedOut, now));
        }
    }

    /// Records the outcome of a permitted call (`None`: it was cancelled or is not to be counted,
    /// and a probe gives its slot back). Outcomes of an older generation count for nothing.
    pub fn record(
        &mut self,
        config: &Config,
        permit: Permit,
        outcome: Option<Outcome>,
        now: DateTime<Utc>,
    ) -> Option<Transition> {
        if permit.generation != self.generation || !permit.recorded {
            return None;
        }
        match (self.state, outcome) {
            (State::HalfOpen, None) if permit.probe => {
                self.probes.admitted = self.probes.admitted.saturating_sub(1);
                None
            }
            (State::HalfOpen, Some(o)) if permit.probe => {
                if o.failed {
                    self.probes.failed += 1;
                } else {
                    self.probes.succeeded += 1;
                }
                if o.slow {
                    self.probes.slow += 1;
                }
                let reported = self.probes.succeeded + self.probes.failed;
                if reported < config.permitted_calls_in_half_open {
                    return None;
                }
                let p = self.probes;
                let rates = Rates::of(
                    i64::from(reported),
                    i64::from(p.failed),
                    i64::from(p.slow),
                    0,
                );
                let (to, reason) = match rates.trips(config) {
                    Some(_) => (State::Open, Reason::ProbesFailed),
                    None => (State::Closed, Reason::ProbesSucceeded),
                };
                self.transition(config, to, reason, now).ok().flatten()
            }
            (State::Closed, Some(o)) => {
                self.window
                    .add(now, 1, i64::from(o.failed), i64::from(o.slow));
                self.evaluate(config, now)
            }
            _ => None,
        }
    }

    /// Adds counts recorded elsewhere (another replica's batch) to the window and evaluates.
    pub fn evaluate(&mut self, config: &Config, now: DateTime<Utc>) -> Option<Transition> {
        if self.state != State::Closed {
            return None;
        }
        let reason = self.rates(config, now).trips(config)?;
        self.transition(config, State::Open, reason, now)
            .ok()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// resilience4j's state-machine test settings: 50 % failures, four probes, slow calls of 4 s
    /// at 50 %, a 20 s window with at least 4 calls, 5 s open, 1 s of half-open at most.
    fn config() -> Config {
        Config {
            window: Duration::from_secs(20),
            minimum_calls: 4,
            failure_rate_threshold: 50.0,
            slow_call_rate_threshold: 50.0,
            slow_call_duration: Duration::from_secs(4),
            wait_in_open: Duration::from_secs(5),
            permitted_calls_in_half_open: 4,
            max_time_in_half_open: Duration::from_secs(1),
            ..Config::default()
        }
    }

    fn t(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_800_000_000_000 + ms).expect("time")
    }

    const OK: Outcome = Outcome {
        failed: false,
        slow: false,
    };
    const FAIL: Outcome = Outcome {
        failed: true,
        slow: false,
    };
    const SLOW: Outcome = Outcome {
        failed: false,
        slow: true,
    };

    /// Acquires a permit at `now` and reports `outcome`; returns the transitions.
    fn call(b: &mut Breaker, c: &Config, now: DateTime<Utc>, outcome: Outcome) -> Vec<Transition> {
        let mut ts = Vec::new();
        match b.acquire(c, now, &mut ts) {
            Decision::Permitted(p) => ts.extend(b.record(c, p, Some(outcome), now)),
            refused => panic!("refused: {refused:?}"),
        }
        ts
    }

    fn permit(b: &mut Breaker, c: &Config, now: DateTime<Utc>) -> Permit {
        match b.acquire(c, now, &mut Vec::new()) {
            Decision::Permitted(p) => p,
            refused => panic!("refused: {refused:?}"),
        }
    }

    fn opened(c: &Config) -> Breaker {
        let mut b = Breaker::new(c, t(0));
        for _ in 0..4 {
            call(&mut b, c, t(0), FAIL);
        }
        assert_eq!(b.state, State::Open);
        b
    }

    #[test]
    fn below_minimum_calls_every_failure_leaves_it_closed() {
        let c = config();
        let mut b = Breaker::new(&c, t(0));
        for _ in 0..3 {
            assert!(call(&mut b, &c, t(0), FAIL).is_empty());
        }
        assert_eq!(b.state, State::Closed);
        assert_eq!(b.rates(&c, t(0)).failure_rate, -1.0);
    }

    #[test]
    fn a_failure_rate_at_the_threshold_opens_it() {
        let c = config();
        let mut b = Breaker::new(&c, t(0));
        call(&mut b, &c, t(0), OK);
        call(&mut b, &c, t(0), FAIL);
        call(&mut b, &c, t(0), OK);
        let ts = call(&mut b, &c, t(0), FAIL);
        assert_eq!(b.state, State::Open, "2 of 4 is 50 %: at the threshold");
        assert_eq!(
            ts,
            vec![Transition {
                from: State::Closed,
                to: State::Open,
                reason: Reason::FailureRateExceeded,
                time: t(0)
            }]
        );
        assert_eq!(b.open_until, Some(t(5_000)));
        assert_eq!(b.consecutive_opens, 1);
    }

    #[test]
    fn a_slow_call_rate_at_the_threshold_opens_it_whatever_the_failures() {
        let c = config();
        let mut b = Breaker::new(&c, t(0));
        call(&mut b, &c, t(0), OK);
        call(&mut b, &c, t(0), SLOW);
        call(&mut b, &c, t(0), OK);
        let ts = call(&mut b, &c, t(0), SLOW);
        assert_eq!(ts[0].reason, Reason::SlowCallRateExceeded);
        assert_eq!(b.state, State::Open);
        assert_eq!(
            Outcome::of(&c, Call::Answered(200), Duration::from_secs(4)),
            Some(SLOW),
            "a call of exactly slow_call_duration is slow"
        );
    }

    #[test]
    fn old_outcomes_leave_the_window() {
        let c = config();
        let mut b = Breaker::new(&c, t(0));
        for _ in 0..3 {
            call(&mut b, &c, t(0), FAIL);
        }
        // 25 s later the three failures are out of the 20 s window: one more is 1 of 1.
        call(&mut b, &c, t(25_000), FAIL);
        assert_eq!(b.state, State::Closed);
        assert_eq!(b.rates(&c, t(25_000)).calls, 1);
    }

    #[test]
    fn open_refuses_until_open_until_and_counts_the_refusals() {
        let c = config();
        let mut b = opened(&c);
        for ms in [0, 4_999] {
            assert_eq!(
                b.acquire(&c, t(ms), &mut Vec::new()),
                Decision::Refused {
                    state: State::Open,
                    retry_at: Some(t(5_000))
                }
            );
        }
        assert_eq!(b.not_permitted, 2);
    }

    #[test]
    fn half_open_begins_lazily_at_open_until_and_admits_exactly_the_permitted_probes() {
        let c = config();
        let mut b = opened(&c);
        let mut ts = Vec::new();
        let mut admitted = 0;
        for _ in 0..10 {
            if let Decision::Permitted(p) = b.acquire(&c, t(5_000), &mut ts) {
                assert!(p.probe);
                admitted += 1;
            }
        }
        assert_eq!(admitted, 4);
        assert_eq!(
            ts,
            vec![Transition {
                from: State::Open,
                to: State::HalfOpen,
                reason: Reason::WaitInOpenElapsed,
                time: t(5_000)
            }],
            "one transition, made by the first call at open_until"
        );
        assert_eq!(
            b.acquire(&c, t(5_000), &mut ts),
            Decision::Refused {
                state: State::HalfOpen,
                retry_at: Some(t(6_000))
            },
            "the rest wait for the verdict, at most until half-open gives up"
        );
    }

    #[test]
    fn probes_that_succeed_close_it_with_an_empty_window() {
        let c = config();
        let mut b = opened(&c);
        let probes: Vec<Permit> = (0..4).map(|_| permit(&mut b, &c, t(5_000))).collect();
        let mut ts = Vec::new();
        for p in &probes[..3] {
            ts.extend(b.record(&c, *p, Some(OK), t(5_100)));
        }
        assert!(ts.is_empty(), "no verdict before every probe reports");
        ts.extend(b.record(&c, probes[3], Some(FAIL), t(5_200)));
        assert_eq!(b.state, State::Closed, "1 of 4 is below 50 %");
        assert_eq!(ts[0].reason, Reason::ProbesSucceeded);
        assert!(b.window.is_empty());
        assert_eq!(b.consecutive_opens, 0);
        assert_eq!(b.rates(&c, t(5_200)).failure_rate, -1.0);
    }

    #[test]
    fn probes_that_fail_open_it_again_for_longer_up_to_the_cap() {
        let c = Config {
            open_backoff_multiplier: 2.0,
            max_wait_in_open: Duration::from_secs(15),
            ..config()
        };
        let mut b = opened(&c);
        assert_eq!(b.open_until, Some(t(5_000)));
        let probes: Vec<Permit> = (0..4).map(|_| permit(&mut b, &c, t(5_000))).collect();
        let mut ts = Vec::new();
        for (i, p) in probes.iter().enumerate() {
            let outcome = if i < 2 { FAIL } else { OK };
            ts.extend(b.record(&c, *p, Some(outcome), t(5_500)));
        }
        assert_eq!(ts[0].reason, Reason::ProbesFailed);
        assert_eq!(b.state, State::Open);
        assert_eq!(b.consecutive_opens, 2);
        assert_eq!(b.open_until, Some(t(5_500 + 10_000)), "5 s × 2");
        // Third opening: 20 s, capped at 15 s.
        let p = permit(&mut b, &c, t(15_500));
        for _ in 0..3 {
            permit(&mut b, &c, t(15_500));
        }
        b.record(&c, p, Some(FAIL), t(15_600));
        assert_eq!(b.state, State::HalfOpen, "three probes still out");
        assert_eq!(c.open_wait(3), Duration::from_secs(15));
        assert_eq!(c.open_wait(40), Duration::from_secs(15), "no overflow");
    }

    #[test]
    fn half_open_without_a_verdict_in_time_opens_again() {
        let c = config();
        let mut b = opened(&c);
        let _probe = permit(&mut b, &c, t(5_000));
        let mut ts = Vec::new();
        assert!(matches!(
            b.acquire(&c, t(6_000), &mut ts),
            Decision::Refused {
                state: State::Open,
                ..
            }
        ));
        assert_eq!(ts[0].reason, Reason::HalfOpenTimedOut);
        assert_eq!(b.open_until, Some(t(11_000)));
    }

    #[test]
    fn an_outcome_of_an_older_generation_counts_for_nothing() {
        let c = config();
        let mut b = Breaker::new(&c, t(0));
        let before = permit(&mut b, &c, t(0));
        b.transition(&c, State::Closed, Reason::Reset, t(1))
            .expect("reset");
        assert_ne!(before.generation, b.generation);
        assert_eq!(b.record(&c, before, Some(FAIL), t(2)), None);
        assert_eq!(b.rates(&c, t(2)).calls, 0);
        // A probe of a half-open state that has since ended neither counts nor frees a slot.
        let mut b = opened(&c);
        let probe = permit(&mut b, &c, t(5_000));
        b.acquire(&c, t(6_000), &mut Vec::new());
        assert_eq!(b.state, State::Open);
        assert_eq!(b.record(&c, probe, Some(OK), t(6_001)), None);
        assert_eq!(b.probes, Probes::default());
    }

    #[test]
    fn a_cancelled_probe_gives_its_slot_back_and_records_nothing() {
        let c = config();
        let mut b = opened(&c);
        let probes: Vec<Permit> = (0..4).map(|_| permit(&mut b, &c, t(5_000))).collect();
        assert!(matches!(
            b.acquire(&c, t(5_000), &mut Vec::new()),
            Decision::Refused { .. }
        ));
        assert_eq!(
            Outcome::of(&c, Call::Cancelled, Duration::ZERO),
            None,
            "a cancelled call says nothing of the service"
        );
        b.record(&c, probes[0], None, t(5_001));
        assert_eq!(b.probes.admitted, 3);
        assert!(matches!(
            b.acquire(&c, t(5_001), &mut Vec::new()),
            Decision::Permitted(Permit { probe: true, .. })
        ));
    }

    #[test]
    fn operators_reset_force_open_and_disable() {
        let c = config();
        // Reset: CLOSED, empty window, a new generation.
        let mut b = opened(&c);
        let generation = b.generation;
        let t1 = b
            .transition(&c, State::Closed, Reason::Reset, t(1_000))
            .expect("reset");
        assert_eq!(
            t1.map(|t| (t.from, t.to)),
            Some((State::Open, State::Closed))
        );
        assert!(b.window.is_empty());
        assert!(b.generation > generation);
        assert!(matches!(
            b.acquire(&c, t(1_000), &mut Vec::new()),
            Decision::Permitted(_)
        ));

        // Force open until reset: refuses with no time to come back.
        let t2 = b.force_open(&c, None, t(2_000));
        assert_eq!(t2.map(|t| t.to), Some(State::ForcedOpen));
        assert_eq!(
            b.acquire(&c, t(999_000), &mut Vec::new()),
            Decision::Refused {
                state: State::ForcedOpen,
                retry_at: None
            }
        );
        // For a duration: then it probes.
        assert_eq!(
            b.force_open(&c, Some(Duration::from_secs(3)), t(3_000)),
            None
        );
        assert!(matches!(
            b.acquire(&c, t(5_999), &mut Vec::new()),
            Decision::Refused { .. }
        ));
        assert!(matches!(
            b.acquire(&c, t(6_000), &mut Vec::new()),
            Decision::Permitted(Permit { probe: true, .. })
        ));

        // Disabled: every call passes, nothing is recorded.
        let t3 = b
            .transition(&c, State::Disabled, Reason::Disabled, t(7_000))
            .expect("disable");
        assert_eq!(t3.map(|t| t.to), Some(State::Disabled));
        for _ in 0..20 {
            assert!(call(&mut b, &c, t(7_000), FAIL).is_empty());
        }
        assert_eq!(b.state, State::Disabled);
        assert_eq!(b.rates(&c, t(7_000)).calls, 0);
    }

    #[test]
    fn illegal_transitions_are_refused() {
        let c = config();
        let mut b = Breaker::new(&c, t(0));
        assert_eq!(
            b.transition(&c, State::HalfOpen, Reason::WaitInOpenElapsed, t(0)),
            Err(IllegalTransition {
                from: State::Closed,
                to: State::HalfOpen,
                reason: Reason::WaitInOpenElapsed
            })
        );
        let mut b = opened(&c);
        assert!(
            b.transition(&c, State::Closed, Reason::ProbesSucceeded, t(0))
                .is_err(),
            "OPEN closes only through probes or a reset"
        );
        assert_eq!(b.state, State::Open);
    }

    #[test]
    fn each_transition_is_reported_once() {
        let c = config();
        let mut b = opened(&c);
        let generation = b.generation;
        assert_eq!(
            b.transition(&c, State::Open, Reason::FailureRateExceeded, t(1)),
            Ok(None)
        );
        assert_eq!(b.generation, generation, "X → X is no transition");
        let mut ts = Vec::new();
        for _ in 0..3 {
            b.acquire(&c, t(5_000), &mut ts);
        }
        assert_eq!(ts.len(), 1);
        assert_eq!(
            b.force_open(&c, None, t(5_001)).map(|t| t.to),
            Some(State::ForcedOpen)
        );
        assert_eq!(b.force_open(&c, None, t(5_002)), None);
    }

    #[test]
    fn failures_are_transport_errors_timeouts_and_the_configured_statuses() {
        let c = Config::default();
        let failed = |call| Outcome::of(&c, call, Duration::ZERO).map(|o| o.failed);
        assert_eq!(failed(Call::TransportError), Some(true));
        assert_eq!(failed(Call::TimedOut), Some(true));
        for status in [429, 500, 503, 599] {
            assert_eq!(failed(Call::Answered(status)), Some(true), "{status}");
        }
        for status in [200, 204, 301, 400, 404, 409, 428] {
            assert_eq!(failed(Call::Answered(status)), Some(false), "{status}");
        }
        let only_503 = Config {
            failure_statuses: vec![StatusRange { from: 503, to: 503 }],
            ..Config::default()
        };
        assert!(!only_503.is_failure_status(500));
        assert!(only_503.is_failure_status(503));
    }
}
