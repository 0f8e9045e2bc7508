//! The driver of one execution: runs the definition as async recursion, committing every state change
//! through the writer before acting on it.
//!
//! Resuming is replaying: the driver starts from the step attempts already stored. A step whose
//! latest attempt SUCCEEDED (or was SKIPPED, or FAILED for good) returns its stored result without
//! running; a step that was RUNNING when the process died is sent again as the same attempt, with the
//! same `Idempotency-Key`; a retry or WAIT resumes at its stored `next_attempt_at`. Conditions and
//! FOR_EACH items are stored on the composite step's attempt, so a replay takes the same path.
//!
//! When nothing is running and the earliest wake-up is far, the driver parks: it stores `wake_at`,
//! releases its lease and ends, leaving no task and no memory behind. The engine claims it again when
//! it is due, when a signal arrives, or after a restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use meshflow_execution::store::entity::step;
use meshflow_execution::store::{Commit, ExecutionPatch, MetricsDelta, StepRow};
use meshflow_kit::convert::{from_json, timestamp};
use meshflow_proto::execution::v1::{self as epb, EventType, ExecutionStatus, StepStatus};
use meshflow_proto::workflow::v1::{self as pb, StepType, step::Config};
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, watch};

use crate::engine::Shared;
use crate::eval::{self, Scope};
use crate::retry::Policy;
use crate::steps::{self, CallContext, StepError};
use crate::writer::{Durable, Failure, Tracker};

/// Signal name that requests cancellation (not a valid user signal name).
pub const CANCEL_SIGNAL: &str = "$cancel";

/// Why a driver stopped before the definition finished.
#[derive(Debug, Clone)]
pub enum Halt {
    /// A step failed with `on_error: FAIL`.
    Failed(Value),
    /// Cancelled by a client.
    Cancelled(String),
    /// The workflow timeout elapsed.
    TimedOut,
    /// Nothing to do until this time (`None`: until a signal).
    Parked(Option<DateTime<Utc>>),
    /// Another replica holds the lease now.
    LeaseLost,
    /// The database failed; the lease will expire and the execution will be resumed.
    Storage(String),
}

/// A step's result as its dependents see it.
#[derive(Debug, Clone)]
enum Outcome {
    Succeeded(Value),
    /// Failed with `on_error: CONTINUE`.
    Continued,
    Skipped,
}

impl Outcome {
    fn output(&self) -> Value {
        match self {
            Self::Succeeded(v) => v.clone(),
            _ => Value::Null,
        }
    }

    fn into_output(self) -> Value {
        match self {
            Self::Succeeded(v) => v,
            _ => Value::Null,
        }
    }

    fn status(&self) -> &'static str {
        match self {
            Self::Succeeded(_) => "SUCCEEDED",
            Self::Continued => "FAILED",
            Self::Skipped => "SKIPPED",
        }
    }
}

/// Results visible to a block: its own steps' and, through `outer`, its enclosing blocks'.
struct Frame {
    outer: Option<Arc<Frame>>,
    local: Mutex<Map<String, Value>>,
    item: Option<(Arc<Value>, i64)>,
    /// The driver's commit that made this frame's results so far durable: the commit that opened
    /// its block, then the latest that recorded a result in it. Whatever a step of the block can
    /// read is durable once this commit is.
    basis: std::sync::atomic::AtomicU64,
}

impl Frame {
    fn root() -> Arc<Self> {
        Arc::new(Self {
            outer: None,
            local: Mutex::new(Map::new()),
            item: None,
            basis: 0.into(),
        })
    }

    /// The frame of a block nested in `outer`, opened by the driver's commit `opened`.
    fn child(outer: &Arc<Frame>, item: Option<(Arc<Value>, i64)>, opened: u64) -> Arc<Self> {
        let item = item.or_else(|| outer.item.clone());
        Arc::new(Self {
            outer: Some(outer.clone()),
            local: Mutex::new(Map::new()),
            item,
            basis: opened.into(),
        })
    }

    /// The commit after which everything this frame and its enclosing frames hold is durable.
    fn basis(&self) -> u64 {
        let own = self.basis.load(std::sync::atomic::Ordering::Acquire);
        self.outer.as_ref().map_or(own, |o| own.max(o.basis()))
    }

    fn steps(&self) -> Map<String, Value> {
        let mut map = self.outer.as_ref().map(|o| o.steps()).unwrap_or_default();
        map.extend(
            self.local
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        );
        map
    }

    /// Records a step's outcome, queued with the driver's commit `commit` or earlier.
    fn record(&self, id: &str, outcome: &Outcome, commit: u64) {
        let v = json!({"output": outcome.output(), "status": outcome.status()});
        self.local
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_string(), v);
        self.basis
            .fetch_max(commit, std::sync::atomic::Ordering::AcqRel);
    }
}

impl eval::StepResults for Frame {
    fn all(&self) -> Value {
        Value::Object(self.steps())
    }

    fn with_step(&self, id: &str, f: &mut dyn FnMut(&Value)) {
        let local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        match local.get(id) {
            Some(result) => f(result),
            None => {
                drop(local);
                if let Some(outer) = &self.outer {
                    outer.with_step(id, f);
                }
            }
        }
    }
}

struct State {
    seq: i64,
    /// When the execution started running (for its duration).
    start_time: Option<DateTime<Utc>>,
    /// Replaced, not changed in place, so a scope made before a transform keeps what it saw.
    vars: Arc<Value>,
    status: ExecutionStatus,
    /// Latest stored attempt per step path, as loaded at start.
    memo: HashMap<String, step::Model>,
    /// When each step path first started, as loaded at start: a step's timeout counts from there,
    /// across restarts.
    first_start: HashMap<String, DateTime<Utc>>,
    /// Attempts not final yet (running, waiting, retry scheduled), by path.
    open: HashMap<String, StepRow>,
    /// Steps doing work (not waiting).
    busy: usize,
    /// Waiting steps and until when (`None`: a signal without timeout).
    waits: HashMap<String, Option<DateTime<Utc>>>,
    /// The number of the last commit queued (commits are numbered 1, 2, 3, … in queue order).
    queued: u64,
    /// The last commit that changed the variables.
    vars_changed: u64,
}

/// One execution being driven.
pub struct Run {
    shared: Arc<Shared>,
    /// Execution id.
    pub id: String,
    workflow_id: String,
    def: Arc<pb::WorkflowVersion>,
    input: Arc<Value>,
    /// `execution` and `workflow` as expressions see them.
    about: (Arc<Value>, Arc<Value>),
    deadline: Option<DateTime<Utc>>,
    state: Mutex<State>,
    /// Wakes the park monitor when `busy` or `waits` change.
    changed: Notify,
    /// Wakes every signal wait: see [`Self::announce_signal`].
    signalled: Notify,
    /// Set once a signal was announced to this driver.
    signal_announced: std::sync::atomic::AtomicBool,
    /// Set when a client cancels.
    pub cancel: watch::Sender<Option<String>>,
    /// Set once the definition stopped running (the driver is concluding): it takes no more wake-ups.
    pub done: std::sync::atomic::AtomicBool,
    /// Built before its execution was inserted: no cancellation can have been stored without
    /// reaching it through [`Self::cancel`].
    fresh: bool,
    /// How far this driver's commits are durable, as the writer reports it.
    durable: Tracker,
}

fn step_type(step: &pb::Step) -> StepType {
    match &step.config {
        Some(Config::Http(_)) => StepType::HttpRequest,
        Some(Config::Transform(_)) => StepType::DataTransform,
        Some(Config::Conditional(_)) => StepType::Conditional,
        Some(Config::Parallel(_)) => StepType::Parallel,
        Some(Config::ForEach(_)) => StepType::ForEach,
        Some(Config::Wait(_)) => StepType::Wait,
        Some(Config::WebhookCall(_)) => StepType::WebhookCall,
        Some(Config::FunctionCall(_)) => StepType::FunctionCall,
        Some(Config::Validation(_)) => StepType::Validation,
        None => StepType::Unspecified,
    }
}

fn status_of(row: &step::Model) -> StepStatus {
    StepStatus::from_str_name(&row.status).unwrap_or(StepStatus::Unspecified)
}

/// An attempt row being built.
fn row(id: &str, step: &pb::Step, path: &str, status: StepStatus, attempt: i32) -> StepRow {
    StepRow {
        id: id.to_string(),
        step_id: step.id.clone(),
        step_path: path.to_string(),
        step_type: step_type(step).as_str_name().to_string(),
        status,
        attempt,
        input: None,
        output: None,
        error: None,
        logs: Value::Array(Vec::new()),
        start_time: None,
        end_time: None,
        next_attempt_at: None,
    }
}

fn redacted(mut v: Value) -> Value {
    eval::redact(&mut v);
    v
}

/// Changes one commit carries, besides events.
#[derive(Default)]
struct Change {
    patch: ExecutionPatch,
    steps: Vec<StepRow>,
    consume_signal: Option<(String, String)>,
    metrics: Vec<MetricsDelta>,
}

impl Run {
    /// Prepares a driver from the stored execution and its attempts.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shared: Arc<Shared>,
        exec: &meshflow_execution::store::entity::execution::Model,
        def: Arc<pb::WorkflowVersion>,
        attempts: Vec<step::Model>,
        fresh: bool,
    ) -> Arc<Self> {
        let mut memo: HashMap<String, step::Model> = HashMap::new();
        let mut first_start: HashMap<String, DateTime<Utc>> = HashMap::new();
        for a in attempts {
            if let Some(t) = a.start_time {
                let first = first_start.entry(a.step_path.clone()).or_insert(t);
                *first = (*first).min(t);
            }
            match memo.get(&a.step_path) {
                Some(m) if m.attempt > a.attempt => {}
                _ => {
                    memo.insert(a.step_path.clone(), a);
                }
            }
        }
        let status =
            ExecutionStatus::from_str_name(&exec.status).unwrap_or(ExecutionStatus::Pending);
        Arc::new(Self {
            shared,
            id: exec.id.clone(),
            workflow_id: exec.workflow_id.clone(),
            def,
            input: Arc::new(exec.input.clone()),
            about: (
                Arc::new(
                    json!({"id": exec.id, "workflow_id": exec.workflow_id, "workflow_version": exec.workflow_version}),
                ),
                Arc::new(json!({"id": exec.workflow_id, "version": exec.workflow_version})),
            ),
            deadline: exec.deadline_at,
            state: Mutex::new(State {
                seq: exec.last_sequence,
                start_time: exec.start_time,
                vars: Arc::new(exec.variables.clone()),
                status,
                memo,
                first_start,
                open: HashMap::new(),
                busy: 0,
                waits: HashMap::new(),
                queued: 0,
                vars_changed: 0,
            }),
            changed: Notify::new(),
            signalled: Notify::new(),
            signal_announced: std::sync::atomic::AtomicBool::new(false),
            cancel: watch::channel(None).0,
            done: std::sync::atomic::AtomicBool::new(false),
            fresh,
            durable: Arc::new(watch::channel(Durable::default()).0),
        })
    }

    /// Tells the driver a signal of its execution was stored: every signal wait looks for its
    /// own, so waits on different names never take each other's wake-up.
    pub fn announce_signal(&self) {
        self.signal_announced
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.signalled.notify_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn event(&self, st: &mut State, ty: EventType) -> epb::ExecutionEvent {
        st.seq += 1;
        epb::ExecutionEvent {
            execution_id: self.id.clone(),
            sequence: st.seq,
            // Stamped by the writer with the time of the commit.
            time: None,
            r#type: ty as i32,
            execution_status: st.status as i32,
            ..Default::default()
        }
    }

    fn step_event(
        &self,
        st: &mut State,
        ty: EventType,
        step: &pb::Step,
        path: &str,
        attempt: i32,
        status: StepStatus,
    ) -> epb::ExecutionEvent {
        let mut e = self.event(st, ty);
        e.step_id = step.id.clone();
        e.step_path = path.to_string();
        e.step_type = step_type(step) as i32;
        e.attempt = attempt.max(0) as u32;
        e.step_status = status as i32;
        e
    }

    /// A pure step records its start in the same commit as its result.
    fn started_in_result(
        &self,
        st: &mut State,
        change: &mut Change,
        events: &mut Vec<epb::ExecutionEvent>,
        step: &pb::Step,
        path: &str,
        attempt: i32,
    ) {
        events.push(self.step_event(
            st,
            EventType::StepStarted,
            step,
            path,
            attempt,
            StepStatus::Running,
        ));
        change.metrics.push(MetricsDelta {
            step_id: step.id.clone(),
            attempts: 1,
            ..Default::default()
        });
    }

    /// Queues a commit and waits until it, and so every change queued before it, is durable. Used
    /// before anything outside the engine can depend on them (a terminal state, parking).
    async fn commit(
        &self,
        build: impl FnOnce(&Self, &mut State, &mut Change) -> Vec<epb::ExecutionEvent>,
    ) -> Result<(), Halt> {
        let number = self.queue(build)?;
        self.durable(number).await
    }

    /// Waits until commit `number` of this driver, and so every one before it, is durable.
    async fn durable(&self, number: u64) -> Result<(), Halt> {
        let verdict = |d: &Durable| -> Option<Result<(), Halt>> {
            if d.upto >= number {
                return Some(Ok(()));
            }
            d.failure.as_ref().map(|f| {
                Err(match f {
                    Failure::LeaseLost => Halt::LeaseLost,
                    Failure::Storage(e) => Halt::Storage(e.clone()),
                })
            })
        };
        if let Some(v) = verdict(&self.durable.borrow()) {
            return v;
        }
        let mut rx = self.durable.subscribe();
        // The sender lives as long as this driver: waiting cannot fail.
        match rx.wait_for(|d| verdict(d).is_some()).await {
            Ok(d) => verdict(&d).unwrap_or(Ok(())),
            Err(_) => Err(Halt::Storage("the writer stopped".into())),
        }
    }

    /// Queues a change without waiting and returns its number. Its events reach watchers only once
    /// it is committed; whatever must not happen before it is durable waits on [`Self::durable`].
    fn queue(
        &self,
        build: impl FnOnce(&Self, &mut State, &mut Change) -> Vec<epb::ExecutionEvent>,
    ) -> Result<u64, Halt> {
        let mut st = self.lock();
        let mut change = Change::default();
        let before = st.status;
        let events = build(self, &mut st, &mut change);
        // An execution counts as started, and active, with the commit that takes it out of PENDING
        // (even straight to an end). Counted as its row was inserted, every start of a workflow
        // would wait on that workflow's metrics row, locked by the start before it until that one's
        // commit was flushed; here the writer counts a batch of starts at once.
        if before == ExecutionStatus::Pending
            && change
                .patch
                .status
                .is_some_and(|to| to != ExecutionStatus::Pending)
        {
            change.metrics.insert(
                0,
                MetricsDelta {
                    total: 1,
                    active: 1,
                    ..Default::default()
                },
            );
        }
        if let Some(to) = change.patch.status
            && to != before
            && !meshflow_execution::state::execution_may(before, to)
        {
            tracing::error!(execution_id = %self.id, from = ?before, ?to, "illegal execution transition refused");
            st.status = before;
            return Err(Halt::Storage(format!(
                "illegal transition {before:?} -> {to:?}"
            )));
        }
        for s in &change.steps {
            if meshflow_execution::state::step_is_final(s.status) && s.next_attempt_at.is_none() {
                st.open.remove(&s.step_path);
            } else {
                st.open.insert(s.step_path.clone(), s.clone());
            }
        }
        // Numbered and submitted under the state lock: number order, sequence order and queue
        // order agree.
        st.queued += 1;
        let number = st.queued;
        if change.patch.variables.is_some() {
            st.vars_changed = number;
        }
        self.shared.writer.submit(
            number,
            &self.durable,
            Commit {
                execution_id: self.id.clone(),
                workflow_id: self.workflow_id.clone(),
                owner: self.shared.owner.clone(),
                patch: change.patch,
                steps: change.steps,
                events,
                consume_signal: change.consume_signal,
                metrics: change.metrics,
            },
        );
        Ok(number)
    }

    /// The number of the last commit queued.
    fn queued(&self) -> u64 {
        self.lock().queued
    }

    fn scope(&self, frame: &Arc<Frame>) -> Scope {
        let mut s = Scope {
            steps: Some(frame.clone()),
            ..Scope::default()
        };
        s.share("input", self.input.clone());
        s.share("vars", self.lock().vars.clone());
        s.share("execution", self.about.0.clone());
        s.share("workflow", self.about.1.clone());
        if let Some((item, index)) = &frame.item {
            s.share("item", item.clone());
            s.set("index", json!(index));
        }
        s
    }

    fn set_busy(&self, delta: isize) {
        {
            let mut st = self.lock();
            st.busy = st.busy.saturating_add_signed(delta);
        }
        self.changed.notify_one();
    }

    /// Whether the execution reached a terminal status.
    pub fn is_finished(&self) -> bool {
        meshflow_execution::state::is_terminal(self.lock().status)
    }

    /// Drives the execution until it ends or parks.
    pub async fn drive(self: Arc<Self>) -> Halt {
        let result = self.clone().drive_inner().await;
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        match result {
            Ok(outputs) => match self
                .finish(
                    ExecutionStatus::Completed,
                    Some(Value::Object(outputs)),
                    None,
                    "",
                )
                .await
            {
                Ok(()) => Halt::Parked(None),
                Err(h) => h,
            },
            Err(halt) => self.conclude(halt).await,
        }
    }

    async fn drive_inner(self: Arc<Self>) -> Result<Map<String, Value>, Halt> {
        // A cancellation requested while nobody drove the execution.
        if !self.fresh
            && let Some(sig) = self
                .shared
                .store
                .pending_signal(&self.id, CANCEL_SIGNAL)
                .await
                .map_err(|e| Halt::Storage(e.to_string()))?
        {
            let reason = sig.payload.as_str().unwrap_or_default().to_string();
            return Err(Halt::Cancelled(reason));
        }
        if self.deadline.is_some_and(|d| d <= Utc::now()) {
            return Err(Halt::TimedOut);
        }
        let starting = self.lock().status;
        if starting != ExecutionStatus::Running {
            let now = Utc::now();
            self.queue(|run, st, change| {
                st.status = ExecutionStatus::Running;
                change.patch.status = Some(ExecutionStatus::Running);
                change.patch.wake_at = Some(None);
                if starting == ExecutionStatus::Pending {
                    change.patch.start_time = Some(now);
                    st.start_time = Some(now);
                    let mut e = run.event(st, EventType::ExecutionStarted);
                    e.output = Some(from_json(&run.input));
                    vec![e]
                } else {
                    Vec::new()
                }
            })?;
        }

        let def = self.def.clone();
        let root = Frame::root();
        let body =
            self.clone()
                .run_block(Arc::from(def.steps.as_slice()), String::new(), root.clone());
        let mut cancel = self.cancel.subscribe();
        let deadline = self.deadline;
        let timeout = async move {
            match deadline {
                Some(d) => {
                    tokio::time::sleep((d - Utc::now()).to_std().unwrap_or(Duration::ZERO)).await
                }
                None => std::future::pending().await,
            }
        };
        let park = self.clone().park_monitor();
        tokio::select! {
            r = body => r.map(|outcomes| outcomes.into_iter().map(|(k, o)| (k, o.into_output())).collect()),
            reason = cancel.wait_for(Option::is_some) => {
                let reason = reason.map(|r| r.clone().unwrap_or_default()).unwrap_or_default();
                Err(Halt::Cancelled(reason))
            }
            () = timeout => Err(Halt::TimedOut),
            wake = park => Err(Halt::Parked(wake)),
        }
    }

    /// Resolves when nothing runs and the earliest wake-up is further than the park threshold.
    async fn park_monitor(self: Arc<Self>) -> Option<DateTime<Utc>> {
        loop {
            let (idle, earliest) = {
                let st = self.lock();
                let earliest = st.waits.values().filter_map(|w| *w).min();
                let forever = st.waits.values().any(Option::is_none);
                let far = match earliest {
                    Some(t) => {
                        (t - Utc::now()).to_std().unwrap_or(Duration::ZERO) > self.shared.park_after
                    }
                    None => forever,
                };
                (st.busy == 0 && !st.waits.is_empty() && far, earliest)
            };
            if idle {
                return earliest;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.changed.notified()).await;
        }
    }

    /// Writes the outcome of a halt; returns it.
    async fn conclude(&self, halt: Halt) -> Halt {
        let result = match &halt {
            Halt::Failed(error) => {
                self.finish(ExecutionStatus::Failed, None, Some(error.clone()), "")
                    .await
            }
            Halt::Cancelled(reason) => {
                self.finish(ExecutionStatus::Cancelled, None, None, reason)
                    .await
            }
            Halt::TimedOut => {
                let error = json!({"code": "timeout", "message": "the workflow timeout elapsed"});
                self.finish(ExecutionStatus::TimedOut, None, Some(error), "")
                    .await
            }
            Halt::Parked(wake) => self.park(*wake).await,
            Halt::LeaseLost | Halt::Storage(_) => Ok(()),
        };
        match result {
            Ok(()) => halt,
            Err(h) => h,
        }
    }

    async fn park(&self, wake: Option<DateTime<Utc>>) -> Result<(), Halt> {
        let wake = match (wake, self.deadline) {
            (Some(w), Some(d)) => Some(w.min(d)),
            (w, d) => w.or(d),
        };
        self.commit(|_, st, change| {
            st.status = ExecutionStatus::Waiting;
            change.patch.status = Some(ExecutionStatus::Waiting);
            change.patch.wake_at = Some(wake);
            change.patch.release_lease = true;
            Vec::new()
        })
        .await?;
        // A signal that arrived while parking must not be lost: wake at once.
        if self
            .shared
            .store
            .has_pending_signal(&self.id)
            .await
            .unwrap_or(true)
        {
            let _ = self.shared.store.wake(&self.id, Utc::now()).await;
            self.shared.kick.notify_one();
        }
        Ok(())
    }

    /// Terminal commit: closes open attempts as CANCELLED, writes the final event and metrics.
    async fn finish(
        &self,
        status: ExecutionStatus,
        output: Option<Value>,
        error: Option<Value>,
        reason: &str,
    ) -> Result<(), Halt> {
        let cancel_signal = if status == ExecutionStatus::Cancelled {
            self.shared
                .store
                .pending_signal(&self.id, CANCEL_SIGNAL)
                .await
                .ok()
                .flatten()
                .map(|s| (s.id, "execution".to_string()))
        } else {
            None
        };
        let started = self.lock().start_time;
        let now = Utc::now();
        let def = self.def.clone();
        self.commit(move |run, st, change| {
            let mut events = Vec::new();
            let mut open: Vec<StepRow> = st.open.values().cloned().collect();
            open.sort_by(|a, b| a.step_path.cmp(&b.step_path));
            for mut r in open {
                let step = find_step(&def.steps, &r.step_id)
                    .cloned()
                    .unwrap_or_default();
                if r.status != StepStatus::Failed {
                    r.status = StepStatus::Cancelled;
                    r.end_time = Some(now);
                }
                r.next_attempt_at = None;
                let mut e = run.step_event(
                    st,
                    EventType::StepCancelled,
                    &step,
                    &r.step_path,
                    r.attempt,
                    StepStatus::Cancelled,
                );
                e.reason = format!(
                    "execution {}",
                    status
                        .as_str_name()
                        .trim_start_matches("EXECUTION_STATUS_")
                        .to_lowercase()
                );
                events.push(e);
                change.steps.push(r);
            }
            st.status = status;
            let ty = match status {
                ExecutionStatus::Completed => EventType::ExecutionCompleted,
                ExecutionStatus::Failed => EventType::ExecutionFailed,
                ExecutionStatus::Cancelled => EventType::ExecutionCancelled,
                _ => EventType::ExecutionTimedOut,
            };
            let mut e = run.event(st, ty);
            e.reason = reason.to_string();
            if let Some(o) = &output {
                e.output = Some(from_json(o));
            }
            if let Some(err) = &error {
                e.error = Some(execution_error(err));
            }
            events.push(e);
            change.patch = ExecutionPatch {
                status: Some(status),
                variables: Some(Value::clone(&st.vars)),
                output: output.clone(),
                error: error.clone(),
                wake_at: Some(None),
                end_time: Some(now),
                release_lease: true,
                ..Default::default()
            };
            change.consume_signal = cancel_signal;
            let mut delta = MetricsDelta {
                active: -1,
                duration_ms: started.map(|s| (now - s).num_milliseconds()),
                ..Default::default()
            };
            match status {
                ExecutionStatus::Completed => delta.completed = 1,
                ExecutionStatus::Failed => delta.failed = 1,
                ExecutionStatus::Cancelled => delta.cancelled = 1,
                _ => delta.timed_out = 1,
            }
            change.metrics.push(delta);
            events
        })
        .await
    }

    /// Runs a block (a DAG by `depends_on`), returning each step's outcome by id.
    fn run_block(
        self: Arc<Self>,
        steps: Arc<[pb::Step]>,
        prefix: String,
        frame: Arc<Frame>,
    ) -> BoxFuture<'static, Result<Vec<(String, Outcome)>, Halt>> {
        Box::pin(async move {
            let index: HashMap<&str, usize> = steps
                .iter()
                .enumerate()
                .map(|(i, s)| (s.id.as_str(), i))
                .collect();
            let mut waiting_on: Vec<usize> = steps.iter().map(|s| s.depends_on.len()).collect();
            let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
            for (i, s) in steps.iter().enumerate() {
                for d in &s.depends_on {
                    if let Some(&j) = index.get(d.as_str()) {
                        dependents[j].push(i);
                    }
                }
            }
            let mut outcomes: Vec<Option<Outcome>> = vec![None; steps.len()];
            let mut running = FuturesUnordered::new();
            let launch = |i: usize| {
                let run = self.clone();
                let steps = steps.clone();
                let path = format!("{prefix}{}", steps[i].id);
                let frame = frame.clone();
                async move { (i, run.run_step(&steps[i], path, frame).await) }
            };
            for i in (0..steps.len()).filter(|&i| waiting_on[i] == 0) {
                running.push(launch(i));
            }
            while let Some((i, result)) = running.next().await {
                let outcome = result?;
                frame.record(&steps[i].id, &outcome, self.queued());
                outcomes[i] = Some(outcome);
                for &j in &dependents[i] {
                    waiting_on[j] -= 1;
                    if waiting_on[j] == 0 {
                        running.push(launch(j));
                    }
                }
            }
            Ok(steps
                .iter()
                .zip(outcomes)
                .filter_map(|(s, o)| o.map(|o| (s.id.clone(), o)))
                .collect())
        })
    }

    fn memo(&self, path: &str) -> Option<step::Model> {
        self.lock().memo.get(path).cloned()
    }

    async fn run_step(
        self: Arc<Self>,
        step: &pb::Step,
        path: String,
        frame: Arc<Frame>,
    ) -> Result<Outcome, Halt> {
        if let Some(m) = self.memo(&path) {
            match status_of(&m) {
                StepStatus::Succeeded => {
                    return Ok(Outcome::Succeeded(m.output.unwrap_or(Value::Null)));
                }
                StepStatus::Skipped => return Ok(Outcome::Skipped),
                StepStatus::Failed if m.next_attempt_at.is_none() => {
                    return self.failed(step, m.error.unwrap_or(Value::Null));
                }
                _ => {}
            }
        }
        let timeout = step
            .timeout
            .as_ref()
            .and_then(meshflow_kit::convert::from_duration)
            .filter(|d| !d.is_zero());
        let work = self.clone().run_step_inner(step, path.clone(), frame);
        match timeout {
            None => work.await,
            Some(limit) => {
                let began = self.lock().first_start.get(&path).copied();
                match tokio::time::timeout(remaining(limit, began, Utc::now()), work).await {
                    Ok(r) => r,
                    Err(_) => {
                        let err = StepError::fatal(
                            "timeout",
                            format!("step did not finish within {}ms", limit.as_millis()),
                        );
                        self.record_failure(step, &path, err).await
                    }
                }
            }
        }
    }

    async fn run_step_inner(
        self: Arc<Self>,
        step: &pb::Step,
        path: String,
        frame: Arc<Frame>,
    ) -> Result<Outcome, Halt> {
        match &step.config {
            Some(Config::Conditional(c)) => self.conditional(step, c, path, frame).await,
            Some(Config::Parallel(p)) => self.parallel(step, p, path, frame).await,
            Some(Config::ForEach(f)) => self.for_each(step, f, path, frame).await,
            Some(Config::Wait(w)) => {
                self.set_busy(1);
                let r = self.wait(step, w, &path).await;
                self.set_busy(-1);
                r
            }
            _ => {
                self.set_busy(1);
                let r = self.leaf(step, &path, &frame).await;
                self.set_busy(-1);
                r
            }
        }
    }

    /// A step failed for good: CONTINUE lets dependents run, FAIL fails the execution.
    fn failed(&self, step: &pb::Step, error: Value) -> Result<Outcome, Halt> {
        if step.on_error == pb::OnError::Continue as i32 {
            Ok(Outcome::Continued)
        } else {
            Err(Halt::Failed(error))
        }
    }

    /// Records a final failure of the open attempt of `path` (e.g. a step timeout).
    async fn record_failure(
        &self,
        step: &pb::Step,
        path: &str,
        err: StepError,
    ) -> Result<Outcome, Halt> {
        let error = err.to_json(path);
        let now = Utc::now();
        let open = self.lock().open.get(path).cloned();
        // An HTTP or webhook attempt cut short here counts now: attempts count when they end.
        let cut_short = open
            .as_ref()
            .is_some_and(|o| o.status == StepStatus::Running)
            && matches!(step.config, Some(Config::Http(_) | Config::WebhookCall(_)));
        let mut r = open.unwrap_or_else(|| {
            row(
                &meshflow_kit::id::new_id(),
                step,
                path,
                StepStatus::Failed,
                1,
            )
        });
        r.status = StepStatus::Failed;
        r.error = Some(error.clone());
        r.end_time = Some(now);
        r.next_attempt_at = None;
        let attempt = r.attempt;
        self.queue(|run, st, change| {
            let mut e = run.step_event(
                st,
                EventType::StepFailed,
                step,
                path,
                attempt,
                StepStatus::Failed,
            );
            e.error = Some(execution_error(&error));
            change.steps.push(r);
            change.metrics.push(MetricsDelta {
                step_id: step.id.clone(),
                attempts: i64::from(cut_short),
                failed: 1,
                ..Default::default()
            });
            vec![e]
        })?;
        self.failed(step, error)
    }

    /// Waits until `at`, registered as a wait so the execution can park.
    async fn sleep_until(&self, path: &str, at: DateTime<Utc>) {
        let delay = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        if delay.is_zero() {
            return;
        }
        {
            let mut st = self.lock();
            st.waits.insert(path.to_string(), Some(at));
            st.busy = st.busy.saturating_sub(1);
        }
        self.changed.notify_one();
        tokio::time::sleep(delay).await;
        {
            let mut st = self.lock();
            st.waits.remove(path);
            st.busy += 1;
        }
        self.changed.notify_one();
    }

    /// The span of one attempt of a leaf step, in the execution's trace, and the `traceparent` its
    /// requests carry: the span's own when spans are exported, else a stable one derived from the
    /// execution id, step path and attempt. A step that `sends` no request gets no `traceparent`
    /// unless its span has one.
    fn attempt_span(
        &self,
        step: &pb::Step,
        path: &str,
        attempt: i32,
        sends: bool,
    ) -> (tracing::Span, String) {
        let stable = || {
            if sends {
                traceparent(&self.id, path, attempt)
            } else {
                String::new()
            }
        };
        if !meshflow_kit::telemetry::exporting() {
            return (tracing::Span::none(), stable());
        }
        let span = tracing::info_span!(
            "step attempt",
            otel.name = %format!("step {path}"),
            execution_id = %self.id,
            workflow_id = %self.workflow_id,
            step_id = %step.id,
            step_path = %path,
            step_type = step_type(step).as_str_name(),
            attempt,
            otel.status_code = tracing::field::Empty,
            error.code = tracing::field::Empty,
        );
        // The parent is the execution's root (never exported itself): one trace per execution.
        let own = meshflow_kit::telemetry::continue_trace(&span, &traceparent(&self.id, "", 0));
        (span, own.unwrap_or_else(stable))
    }

    /// Leaf steps, with retries scheduled on stored `next_attempt_at`.
    async fn leaf(&self, step: &pb::Step, path: &str, frame: &Arc<Frame>) -> Result<Outcome, Halt> {
        let policy = Policy::resolve(
            step.retry_policy.as_ref(),
            self.def.default_retry_policy.as_ref(),
        );
        let external = matches!(step.config, Some(Config::Http(_) | Config::WebhookCall(_)));
        let (mut attempt, mut row_id, mut resume_at) = match self.memo(path) {
            Some(m) if status_of(&m) == StepStatus::Running => (m.attempt, m.id, None),
            Some(m) if status_of(&m) == StepStatus::Failed => {
                (m.attempt + 1, meshflow_kit::id::new_id(), m.next_attempt_at)
            }
            _ => (1, meshflow_kit::id::new_id(), None),
        };
        let idempotency_key = format!("{}/{}", self.id, path);
        loop {
            if let Some(at) = resume_at.take() {
                self.sleep_until(path, at).await;
            }
            let started = Utc::now();
            if external {
                let r = {
                    let mut r = row(&row_id, step, path, StepStatus::Running, attempt);
                    r.start_time = Some(started);
                    r
                };
                // The attempt is counted when it ends: one that a restart sends again counts once.
                self.queue(|run, st, change| {
                    change.steps.push(r);
                    vec![run.step_event(
                        st,
                        EventType::StepStarted,
                        step,
                        path,
                        attempt,
                        StepStatus::Running,
                    )]
                })?;
                // The request goes out once everything it is made from is durable: the results
                // and variables its step can read. Not its own start: a restart sends a request
                // whose start was lost again with the same Idempotency-Key, as it does one whose
                // result was lost. So the start commits while the request is in flight.
                let made_from = frame.basis().max(self.lock().vars_changed);
                self.durable(made_from).await?;
            }
            let scope = self.scope(frame);
            let (span, traceparent) = self.attempt_span(step, path, attempt, external);
            let call = CallContext {
                idempotency_key: &idempotency_key,
                traceparent: &traceparent,
            };
            let mut vars_after = None;
            let mut logs: Vec<(String, String)> = Vec::new();
            let (input, result) = match &step.config {
                Some(Config::Http(h)) => {
                    steps::http(&self.shared.env, h, &scope, &call, &policy).await
                }
                Some(Config::WebhookCall(w)) => {
                    steps::webhook_call(
                        &self.shared.env,
                        &self.shared.webhooks,
                        w,
                        &scope,
                        &idempotency_key,
                        &call,
                        &policy,
                    )
                    .await
                }
                Some(Config::Transform(t)) => {
                    let assignments = if t.rule_id.is_empty() {
                        Ok(t.assignments.clone())
                    } else if !t.pinned_assignments.is_empty() {
                        Ok(t.pinned_assignments.clone())
                    } else {
                        // A version made before rules were pinned reads the rule as it is now.
                        self.shared
                            .rules
                            .get_rule(&t.rule_id)
                            .await
                            .map(|r| r.assignments)
                            .map_err(|e| StepError::fatal("rule", e.to_string()))
                    };
                    let mut vars = Value::clone(&self.lock().vars);
                    let r = assignments.and_then(|a| {
                        steps::transform(&self.shared.env.programs, &a, &scope, &mut vars)
                    });
                    if r.is_ok() {
                        vars_after = Some(vars);
                    }
                    (Value::Null, r)
                }
                Some(Config::FunctionCall(f)) => {
                    match steps::function_call(&self.shared.env, f, &scope) {
                        Ok((out, l)) => {
                            logs = l;
                            (Value::Null, Ok(out))
                        }
                        Err(e) => (Value::Null, Err(e)),
                    }
                }
                Some(Config::Validation(v)) => {
                    (Value::Null, steps::validation(&self.shared.env, v, &scope))
                }
                _ => (
                    Value::Null,
                    Err(StepError::fatal(
                        "unsupported",
                        "step has no runnable config",
                    )),
                ),
            };
            let result = result.and_then(|out| {
                let size = json_len(&out);
                if size > self.shared.env.max_output_bytes {
                    Err(StepError::fatal(
                        "output_too_large",
                        format!(
                            "output is {size} bytes; the limit is {}",
                            self.shared.env.max_output_bytes
                        ),
                    ))
                } else {
                    Ok(out)
                }
            });
            let ended = Utc::now();
            if let Err(e) = &result {
                span.record("otel.status_code", "ERROR");
                span.record("error.code", e.code);
            }
            drop(span);
            let mut r = row(&row_id, step, path, StepStatus::Running, attempt);
            r.start_time = Some(started);
            r.end_time = Some(ended);
            r.input = Some(redacted(input)).filter(|v| !v.is_null());
            r.logs = Value::Array(logs.iter().map(|(level, msg)| json!({"time": ended.to_rfc3339(), "level": level, "message": msg})).collect());
            let duration_ms = (ended - started).num_milliseconds();
            match result {
                Ok(output) => {
                    let output = redacted(output);
                    r.status = StepStatus::Succeeded;
                    r.output = Some(output.clone());
                    self.queue(|run, st, change| {
                        let mut events = Vec::new();
                        if !external {
                            run.started_in_result(st, change, &mut events, step, path, attempt);
                        }
                        for (level, msg) in &logs {
                            let mut e = run.step_event(
                                st,
                                EventType::Log,
                                step,
                                path,
                                attempt,
                                StepStatus::Running,
                            );
                            e.message = msg.clone();
                            e.reason = level.clone();
                            events.push(e);
                        }
                        if let Some(vars) = vars_after {
                            // Secrets never reach storage; later steps see what a replay would see.
                            let vars = redacted(vars);
                            change.patch.variables = Some(vars.clone());
                            st.vars = Arc::new(vars);
                        }
                        let mut e = run.step_event(
                            st,
                            EventType::StepSucceeded,
                            step,
                            path,
                            attempt,
                            StepStatus::Succeeded,
                        );
                        e.output = Some(from_json(&output));
                        events.push(e);
                        change.steps.push(r);
                        change.metrics.push(MetricsDelta {
                            step_id: step.id.clone(),
                            attempts: i64::from(external),
                            completed: 1,
                            duration_ms: Some(duration_ms),
                            ..Default::default()
                        });
                        events
                    })?;
                    return Ok(Outcome::Succeeded(output));
                }
                Err(err) => {
                    let error = err.to_json(path);
                    r.status = StepStatus::Failed;
                    r.error = Some(error.clone());
                    let delay = if err.retryable {
                        policy.next_delay(attempt as u32, err.retry_after, &mut fastrand::f64)
                    } else {
                        None
                    };
                    let next = delay.map(|d| {
                        ended + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
                    });
                    r.next_attempt_at = next;
                    let scheduled = self.queue(|run, st, change| {
                        let mut events = Vec::new();
                        if !external {
                            run.started_in_result(st, change, &mut events, step, path, attempt);
                        }
                        let ty = if next.is_some() {
                            EventType::StepRetryScheduled
                        } else {
                            EventType::StepFailed
                        };
                        let status = if next.is_some() {
                            StepStatus::Waiting
                        } else {
                            StepStatus::Failed
                        };
                        let mut e = run.step_event(st, ty, step, path, attempt, status);
                        e.error = Some(execution_error(&error));
                        e.next_attempt_time = next.map(timestamp);
                        events.push(e);
                        change.steps.push(r);
                        if external || next.is_none() {
                            change.metrics.push(MetricsDelta {
                                step_id: step.id.clone(),
                                attempts: i64::from(external),
                                failed: i64::from(next.is_none()),
                                duration_ms: next.is_none().then_some(duration_ms),
                                ..Default::default()
                            });
                        }
                        events
                    })?;
                    match next {
                        Some(at) => {
                            // The schedule is durable before the backoff begins.
                            self.durable(scheduled).await?;
                            attempt += 1;
                            row_id = meshflow_kit::id::new_id();
                            resume_at = Some(at);
                        }
                        None => return self.failed(step, error),
                    }
                }
            }
        }
    }

    /// WAIT: a timer or a signal, with its deadline stored on the attempt so a restart keeps it.
    async fn wait(&self, step: &pb::Step, w: &pb::WaitStep, path: &str) -> Result<Outcome, Halt> {
        use pb::wait_step::Kind;
        let memo = self
            .memo(path)
            .filter(|m| status_of(m) == StepStatus::Waiting);
        let (row_id, until) = match memo {
            Some(m) => (m.id, m.next_attempt_at),
            None => {
                let now = Utc::now();
                let until = match &w.kind {
                    Some(Kind::Duration(d)) => meshflow_kit::convert::from_duration(d).map(|d| {
                        now + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
                    }),
                    Some(Kind::Until(t)) => meshflow_kit::convert::from_timestamp(t),
                    Some(Kind::Signal(_)) => w
                        .timeout
                        .as_ref()
                        .and_then(meshflow_kit::convert::from_duration)
                        .filter(|d| !d.is_zero())
                        .map(|d| {
                            now + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
                        }),
                    None => Some(now),
                };
                let id = meshflow_kit::id::new_id();
                let mut r = row(&id, step, path, StepStatus::Waiting, 1);
                r.start_time = Some(now);
                r.next_attempt_at = until;
                let reason = match &w.kind {
                    Some(Kind::Signal(name)) => format!("signal:{name}"),
                    _ => "timer".to_string(),
                };
                self.queue(|run, st, change| {
                    let mut e = run.step_event(
                        st,
                        EventType::StepWaiting,
                        step,
                        path,
                        1,
                        StepStatus::Waiting,
                    );
                    e.reason = reason;
                    e.next_attempt_time = until.map(timestamp);
                    change.steps.push(r);
                    change.metrics.push(MetricsDelta {
                        step_id: step.id.clone(),
                        attempts: 1,
                        ..Default::default()
                    });
                    vec![e]
                })?;
                (id, until)
            }
        };
        let started = self
            .memo(path)
            .and_then(|m| m.start_time)
            .unwrap_or_else(Utc::now);
        // The driver of a new execution (which has no stored attempt to resume) has no signal to
        // look for until one is announced: it is registered before its execution is written, so
        // every signal sent here is announced to it, and every poll announces those sent to other
        // replicas. Once woken, it always looks.
        let mut unannounced = self.fresh;
        match &w.kind {
            Some(Kind::Signal(name)) => loop {
                // Listening before looking: a signal announced after the look wakes this wait.
                let announcement = self.signalled.notified();
                tokio::pin!(announcement);
                announcement.as_mut().enable();
                let look = !unannounced
                    || self
                        .signal_announced
                        .load(std::sync::atomic::Ordering::SeqCst);
                unannounced = false;
                let pending = if look {
                    self.shared
                        .store
                        .pending_signal(&self.id, name)
                        .await
                        .map_err(|e| Halt::Storage(e.to_string()))?
                } else {
                    None
                };
                if let Some(sig) = pending {
                    let now = Utc::now();
                    let mut r = row(&row_id, step, path, StepStatus::Succeeded, 1);
                    r.start_time = Some(started);
                    r.end_time = Some(now);
                    r.output = Some(sig.payload.clone());
                    let name = name.clone();
                    self.queue(|run, st, change| {
                        let mut got = run.step_event(
                            st,
                            EventType::SignalReceived,
                            step,
                            path,
                            1,
                            StepStatus::Waiting,
                        );
                        got.reason = name;
                        got.output = Some(from_json(&sig.payload));
                        let mut done = run.step_event(
                            st,
                            EventType::StepSucceeded,
                            step,
                            path,
                            1,
                            StepStatus::Succeeded,
                        );
                        done.output = Some(from_json(&sig.payload));
                        change.steps.push(r);
                        change.consume_signal = Some((sig.id.clone(), path.to_string()));
                        change.metrics.push(MetricsDelta {
                            step_id: step.id.clone(),
                            completed: 1,
                            duration_ms: Some((now - started).num_milliseconds()),
                            ..Default::default()
                        });
                        vec![got, done]
                    })?;
                    return Ok(Outcome::Succeeded(sig.payload));
                }
                if until.is_some_and(|u| u <= Utc::now()) {
                    let err =
                        StepError::fatal("timeout", format!("no `{name}` signal arrived in time"));
                    return self.record_failure(step, path, err).await;
                }
                {
                    let mut st = self.lock();
                    st.waits.insert(path.to_string(), until);
                    st.busy = st.busy.saturating_sub(1);
                }
                self.changed.notify_one();
                let deadline = async {
                    match until {
                        Some(u) => {
                            tokio::time::sleep((u - Utc::now()).to_std().unwrap_or(Duration::ZERO))
                                .await
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = announcement => {}
                    () = deadline => {}
                }
                {
                    let mut st = self.lock();
                    st.waits.remove(path);
                    st.busy += 1;
                }
                self.changed.notify_one();
            },
            _ => {
                if let Some(at) = until {
                    self.sleep_until(path, at).await;
                }
                let output = json!({"waited_until": until.unwrap_or_else(Utc::now).to_rfc3339()});
                self.succeeded(step, path, &row_id, started, None, output)
            }
        }
    }

    /// Opens (or resumes) the attempt of a composite step; returns its id and stored decision.
    async fn open_composite(
        &self,
        step: &pb::Step,
        path: &str,
        decide: impl FnOnce() -> Result<Value, StepError>,
    ) -> Result<Result<(String, Value), StepError>, Halt> {
        if let Some(m) = self
            .memo(path)
            .filter(|m| status_of(m) == StepStatus::Running)
        {
            return Ok(Ok((m.id, m.input.unwrap_or(Value::Null))));
        }
        let decision = match decide() {
            Ok(d) => d,
            Err(e) => return Ok(Err(e)),
        };
        let id = meshflow_kit::id::new_id();
        let mut r = row(&id, step, path, StepStatus::Running, 1);
        r.start_time = Some(Utc::now());
        r.input = Some(decision.clone());
        self.queue(|run, st, change| {
            change.steps.push(r);
            change.metrics.push(MetricsDelta {
                step_id: step.id.clone(),
                attempts: 1,
                ..Default::default()
            });
            vec![run.step_event(
                st,
                EventType::StepStarted,
                step,
                path,
                1,
                StepStatus::Running,
            )]
        })?;
        Ok(Ok((id, decision)))
    }

    async fn close_composite(
        &self,
        step: &pb::Step,
        path: &str,
        row_id: &str,
        decision: Value,
        output: Value,
    ) -> Result<Outcome, Halt> {
        let now = Utc::now();
        let open_start = self.lock().open.get(path).and_then(|r| r.start_time);
        let started = open_start
            .or_else(|| self.memo(path).and_then(|m| m.start_time))
            .unwrap_or(now);
        self.succeeded(step, path, row_id, started, Some(decision), output)
    }

    /// Queues the success of a single-attempt step (WAIT, composite): its attempt row, STEP_SUCCEEDED
    /// with the output, and its metrics.
    fn succeeded(
        &self,
        step: &pb::Step,
        path: &str,
        row_id: &str,
        started: DateTime<Utc>,
        input: Option<Value>,
        output: Value,
    ) -> Result<Outcome, Halt> {
        let now = Utc::now();
        let mut r = row(row_id, step, path, StepStatus::Succeeded, 1);
        r.start_time = Some(started);
        r.end_time = Some(now);
        r.input = input;
        r.output = Some(output.clone());
        self.queue(|run, st, change| {
            let mut e = run.step_event(
                st,
                EventType::StepSucceeded,
                step,
                path,
                1,
                StepStatus::Succeeded,
            );
            e.output = Some(from_json(&output));
            change.steps.push(r);
            change.metrics.push(MetricsDelta {
                step_id: step.id.clone(),
                completed: 1,
                duration_ms: Some((now - started).num_milliseconds()),
                ..Default::default()
            });
            vec![e]
        })?;
        Ok(Outcome::Succeeded(output))
    }

    /// Marks every step of blocks not taken as SKIPPED (once; replays find them stored).
    async fn skip_all(&self, blocks: &[(&[pb::Step], String)]) -> Result<(), Halt> {
        let mut rows = Vec::new();
        fn collect(steps: &[pb::Step], prefix: &str, out: &mut Vec<(pb::Step, String)>) {
            for s in steps {
                let path = format!("{prefix}{}", s.id);
                out.push((s.clone(), path));
            }
        }
        for (steps, prefix) in blocks {
            collect(steps, prefix, &mut rows);
        }
        let rows: Vec<(pb::Step, String)> = rows
            .into_iter()
            .filter(|(_, p)| self.memo(p).is_none())
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        self.queue(|run, st, change| {
            let mut events = Vec::new();
            for (step, path) in &rows {
                events.push(run.step_event(
                    st,
                    EventType::StepSkipped,
                    step,
                    path,
                    0,
                    StepStatus::Skipped,
                ));
                change.steps.push(row(
                    &meshflow_kit::id::new_id(),
                    step,
                    path,
                    StepStatus::Skipped,
                    0,
                ));
                change.metrics.push(MetricsDelta {
                    step_id: step.id.clone(),
                    skipped: 1,
                    ..Default::default()
                });
            }
            events
        })?;
        Ok(())
    }

    async fn conditional(
        self: Arc<Self>,
        step: &pb::Step,
        c: &pb::ConditionalStep,
        path: String,
        frame: Arc<Frame>,
    ) -> Result<Outcome, Halt> {
        let scope = self.scope(&frame);
        let programs = self.shared.env.programs.clone();
        let opened = self
            .open_composite(step, &path, || {
                for (i, b) in c.branches.iter().enumerate() {
                    if eval::eval_bool(&programs, &b.condition, &scope)? {
                        return Ok(json!({"branch": i}));
                    }
                }
                Ok(json!({"branch": "otherwise"}))
            })
            .await?;
        let (row_id, decision) = match opened {
            Ok(x) => x,
            Err(e) => return self.record_failure(step, &path, e).await,
        };
        // The block's steps read what was durable once the composite opened.
        let opened = self.queued();
        let taken = decision["branch"].as_u64().map(|i| i as usize);
        let prefix = format!("{path}/");
        let mut not_taken: Vec<(&[pb::Step], String)> = Vec::new();
        for (i, b) in c.branches.iter().enumerate() {
            if Some(i) != taken {
                not_taken.push((&b.steps, prefix.clone()));
            }
        }
        if taken.is_some() {
            not_taken.push((&c.otherwise, prefix.clone()));
        }
        self.skip_all(&not_taken).await?;
        let body: &[pb::Step] = match taken {
            Some(i) => c
                .branches
                .get(i)
                .map(|b| b.steps.as_slice())
                .unwrap_or_default(),
            None => &c.otherwise,
        };
        let outcomes = self
            .clone()
            .run_block(Arc::from(body), prefix, Frame::child(&frame, None, opened))
            .await?;
        let outputs: Map<String, Value> = outcomes
            .into_iter()
            .map(|(k, o)| (k, o.into_output()))
            .collect();
        let output = json!({"branch": decision["branch"], "steps": outputs});
        self.close_composite(step, &path, &row_id, decision, output)
            .await
    }

    async fn parallel(
        self: Arc<Self>,
        step: &pb::Step,
        p: &pb::ParallelStep,
        path: String,
        frame: Arc<Frame>,
    ) -> Result<Outcome, Halt> {
        let opened = self
            .open_composite(step, &path, || Ok(json!({"branches": p.branches.len()})))
            .await?;
        let (row_id, decision) = match opened {
            Ok(x) => x,
            Err(e) => return self.record_failure(step, &path, e).await,
        };
        // The block's steps read what was durable once the composite opened.
        let opened = self.queued();
        let limit = if p.max_concurrency == 0 {
            p.branches.len()
        } else {
            p.max_concurrency as usize
        }
        .max(1);
        let mut queue = p
            .branches
            .iter()
            .enumerate()
            .collect::<Vec<_>>()
            .into_iter();
        let mut running = FuturesUnordered::new();
        let mut outputs = Map::new();
        let mut first_error: Option<Value> = None;
        let launch = |(i, b): (usize, &pb::ParallelBranch)| {
            let run = self.clone();
            let steps = Arc::from(b.steps.as_slice());
            let name = b.name.clone();
            let prefix = format!("{path}[{name}]/");
            let frame = Frame::child(&frame, None, opened);
            async move { (i, name, run.run_block(steps, prefix, frame).await) }
        };
        for b in queue.by_ref().take(limit) {
            running.push(launch(b));
        }
        while let Some((_, name, result)) = running.next().await {
            match result {
                Ok(outcomes) => {
                    let o: Map<String, Value> = outcomes
                        .into_iter()
                        .map(|(k, o)| (k, o.into_output()))
                        .collect();
                    outputs.insert(name, Value::Object(o));
                }
                Err(Halt::Failed(e)) => {
                    if p.fail_fast {
                        drop(running);
                        return self.composite_failed(step, &path, e).await;
                    }
                    first_error.get_or_insert(e);
                }
                Err(other) => return Err(other),
            }
            if let Some(b) = queue.next() {
                running.push(launch(b));
            }
        }
        if let Some(e) = first_error {
            return self.composite_failed(step, &path, e).await;
        }
        self.close_composite(step, &path, &row_id, decision, Value::Object(outputs))
            .await
    }

    async fn for_each(
        self: Arc<Self>,
        step: &pb::Step,
        f: &pb::ForEachStep,
        path: String,
        frame: Arc<Frame>,
    ) -> Result<Outcome, Halt> {
        let scope = self.scope(&frame);
        let programs = self.shared.env.programs.clone();
        let max_items = self.shared.max_for_each_items;
        let opened = self
            .open_composite(step, &path, || {
                match eval::eval(&programs, &f.items, &scope)? {
                    Value::Array(items) if items.len() > max_items => Err(StepError::fatal(
                        "too_many_items",
                        format!(
                            "`{}` gave {} items; the limit is {max_items}",
                            f.items,
                            items.len()
                        ),
                    )),
                    Value::Array(items) => Ok(json!({"items": items})),
                    other => Err(StepError::fatal(
                        "expression",
                        format!("`{}` must give a list, got {other}", f.items),
                    )),
                }
            })
            .await?;
        let (row_id, decision) = match opened {
            Ok(x) => x,
            Err(e) => return self.record_failure(step, &path, e).await,
        };
        // The block's steps read what was durable once the composite opened.
        let opened = self.queued();
        let items: Vec<Value> = decision["items"].as_array().cloned().unwrap_or_default();
        let limit = (f.max_concurrency.max(1) as usize).min(items.len().max(1));
        let mut results: Vec<Value> = vec![Value::Null; items.len()];
        let mut queue = items
            .iter()
            .cloned()
            .enumerate()
            .collect::<Vec<_>>()
            .into_iter();
        let mut running = FuturesUnordered::new();
        // Every item's block runs the same steps: one copy serves them all.
        let steps: Arc<[pb::Step]> = Arc::from(f.steps.as_slice());
        let launch = |(i, item): (usize, Value)| {
            let run = self.clone();
            let steps = steps.clone();
            let prefix = format!("{path}[{i}]/");
            let frame = Frame::child(&frame, Some((Arc::new(item), i as i64)), opened);
            async move { (i, run.run_block(steps, prefix, frame).await) }
        };
        for x in queue.by_ref().take(limit) {
            running.push(launch(x));
        }
        while let Some((i, result)) = running.next().await {
            match result {
                Ok(outcomes) => {
                    results[i] = Value::Object(
                        outcomes
                            .into_iter()
                            .map(|(k, o)| (k, o.into_output()))
                            .collect(),
                    );
                }
                Err(Halt::Failed(e)) => {
                    drop(running);
                    return self.composite_failed(step, &path, e).await;
                }
                Err(other) => return Err(other),
            }
            if let Some(x) = queue.next() {
                running.push(launch(x));
            }
        }
        self.close_composite(
            step,
            &path,
            &row_id,
            json!({"items": items.len()}),
            Value::Array(results),
        )
        .await
    }

    /// A composite step fails because a nested step failed.
    async fn composite_failed(
        &self,
        step: &pb::Step,
        path: &str,
        nested: Value,
    ) -> Result<Outcome, Halt> {
        let message = nested["message"]
            .as_str()
            .unwrap_or("a nested step failed")
            .to_string();
        let nested_path = nested["stepPath"].as_str().unwrap_or_default().to_string();
        let err = StepError {
            code: "nested_failure",
            message: format!("{nested_path}: {message}"),
            details: json!({"cause": nested}),
            retryable: false,
            retry_after: None,
        };
        self.record_failure(step, path, err).await
    }
}

/// What is left of a step's `limit` at `now` when it first started at `began` (`None`: it starts
/// now). A step that started before a restart keeps its deadline.
fn remaining(limit: Duration, began: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Duration {
    match began {
        Some(t) => limit.saturating_sub((now - t).to_std().unwrap_or(Duration::ZERO)),
        None => limit,
    }
}

/// Finds a step by id anywhere in a definition.
fn find_step<'a>(steps: &'a [pb::Step], id: &str) -> Option<&'a pb::Step> {
    for s in steps {
        if s.id == id {
            return Some(s);
        }
        let nested: Vec<&'a [pb::Step]> = match &s.config {
            Some(Config::Conditional(c)) => c
                .branches
                .iter()
                .map(|b| b.steps.as_slice())
                .chain([c.otherwise.as_slice()])
                .collect(),
            Some(Config::Parallel(p)) => p.branches.iter().map(|b| b.steps.as_slice()).collect(),
            Some(Config::ForEach(f)) => vec![f.steps.as_slice()],
            _ => Vec::new(),
        };
        for block in nested {
            if let Some(found) = find_step(block, id) {
                return Some(found);
            }
        }
    }
    None
}

/// An `ExecutionError` from its stored JSON.
pub fn execution_error(v: &Value) -> epb::ExecutionError {
    epb::ExecutionError {
        code: v["code"].as_str().unwrap_or_default().to_string(),
        message: v["message"].as_str().unwrap_or_default().to_string(),
        step_path: v["stepPath"].as_str().unwrap_or_default().to_string(),
        details: v.get("details").map(from_json),
    }
}

/// A W3C `traceparent`: one trace per execution (its id without dashes), a span per attempt.
pub fn traceparent(execution_id: &str, path: &str, attempt: i32) -> String {
    use sha2::Digest;
    let trace: String = execution_id.chars().filter(|c| *c != '-').collect();
    let digest = sha2::Sha256::digest(format!("{path}#{attempt}").as_bytes());
    let span = crate::steps::hex(&digest[..8]);
    format!("00-{trace:0>32}-{span}-01")
}

/// The length of `value` as JSON text, counted without building the text.
pub(crate) fn json_len(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a `Value` to a writer that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_is_measured_as_the_json_it_is_stored_as() {
        for value in [
            json!(null),
            json!({"body": {"id": 7, "price": 10.5, "ok": true}, "headers": {"a": "é\n"}}),
            Value::from(vec!["x"; 1000]),
        ] {
            let text = serde_json::to_string(&value).expect("json");
            assert_eq!(json_len(&value), text.len());
        }
    }

    #[test]
    fn a_step_timeout_counts_from_the_first_start() {
        let now = Utc::now();
        let limit = Duration::from_secs(10);
        assert_eq!(remaining(limit, None, now), limit);
        let began = now - chrono::Duration::seconds(4);
        assert_eq!(remaining(limit, Some(began), now), Duration::from_secs(6));
        let long_ago = now - chrono::Duration::seconds(60);
        assert_eq!(remaining(limit, Some(long_ago), now), Duration::ZERO);
        // A clock that went backwards leaves the whole limit.
        let ahead = now + chrono::Duration::seconds(5);
        assert_eq!(remaining(limit, Some(ahead), now), limit);
    }

    #[test]
    fn traceparent_is_w3c_shaped_and_stable() {
        let t = traceparent("01912345-6789-7abc-8def-0123456789ab", "fetch", 1);
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "01")
        );
        assert_eq!(parts[1], "0191234567897abc8def0123456789ab");
        assert_eq!(
            t,
            traceparent("01912345-6789-7abc-8def-0123456789ab", "fetch", 1)
        );
        assert_ne!(
            t,
            traceparent("01912345-6789-7abc-8def-0123456789ab", "fetch", 2)
        );
    }
}
