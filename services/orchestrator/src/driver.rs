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
//!
//! This file holds the run's state, its events and commits, and its start and end; the step
//! scheduler is in `driver/scheduler.rs`, a leaf step's attempt lifecycle in `driver/attempt.rs`,
//! WAIT in `driver/wait.rs`, and CONDITIONAL, PARALLEL and FOR_EACH in `driver/composite.rs`.

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

mod attempt;
mod composite;
mod scheduler;
mod wait;

use crate::eval::{self, Scope};
use crate::retry::Policy;
use crate::steps::{self, CallContext, StepError};
use crate::writer::{Durable, Failure, Tracker};

/// Signal name that requests cancellation (not a valid user signal name).
pub const CANCEL_SIGNAL: &str = "$cancel";

/// What the drivers of one engine share; the engine makes it, the drivers only use it, so
/// dependencies point one way: engine → driver → writer → hub.
pub struct Shared {
    /// Execution records.
    pub store: meshflow_execution::store::Store,
    /// Workflow definitions and transformation rules.
    pub rules: meshflow_workflow::store::Store,
    /// Registered webhooks.
    pub webhooks: meshflow_webhook::Store,
    /// The group-commit writer.
    pub writer: crate::writer::Writer,
    /// Leaf step environment.
    pub env: steps::Env,
    /// This replica's id.
    pub owner: String,
    /// Park threshold.
    pub park_after: Duration,
    /// FOR_EACH item limit.
    pub max_for_each_items: usize,
    /// Wakes the poller.
    pub kick: Notify,
}

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
    /// Set when a poll claimed the execution after [`Self::done`]: the engine looks at it again
    /// once this driver has left.
    pub recheck: std::sync::atomic::AtomicBool,
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
            recheck: std::sync::atomic::AtomicBool::new(false),
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

    /// The time, from the engine's clock.
    fn now(&self) -> DateTime<Utc> {
        self.shared.env.clock.now()
    }

    /// Waits until the engine's clock reads `at`.
    fn on_clock(&self, at: DateTime<Utc>) -> futures::future::BoxFuture<'static, ()> {
        self.shared.env.clock.sleep_until(at)
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
        if self.deadline.is_some_and(|d| d <= self.now()) {
            return Err(Halt::TimedOut);
        }
        let starting = self.lock().status;
        if starting != ExecutionStatus::Running {
            let now = self.now();
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
        let deadline = self.deadline.map(|d| self.on_clock(d));
        let timeout = async move {
            match deadline {
                Some(reached) => reached.await,
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
                        (t - self.now()).to_std().unwrap_or(Duration::ZERO) > self.shared.park_after
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
            let _ = self.shared.store.wake(&self.id, self.now()).await;
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
        let now = self.now();
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
