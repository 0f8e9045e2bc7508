//! The engine: starts executions, claims the ones that need work (new, due, signalled, or abandoned
//! by a dead replica), drives each with a [`Run`], keeps leases alive, and streams events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use meshflow_execution::store::entity::execution;
use meshflow_execution::store::{Head, Inserted, NewExecution, Store as ExecStore};
use meshflow_kit::convert::{struct_to_json, to_json};
use meshflow_kit::{Violation, Violations, request};
use meshflow_proto::execution::v1 as epb;
use meshflow_proto::orchestrator::v1 as opb;
use meshflow_proto::workflow::v1 as wpb;
use serde_json::Value;
use tokio::sync::{Notify, mpsc};

use crate::driver::{CANCEL_SIGNAL, Halt, Run, Shared};
use crate::error::Error;
use crate::eval::Programs;
use crate::hub::{Hub, is_terminal_event};
use crate::steps::{self, Env};
use crate::writer::Writer;
use meshflow_kit::ssrf;

pub use crate::hub::Live;

/// An event as a watcher receives it: sent live, with the time the commit that wrote it returned;
/// read from history, without.
#[derive(Debug)]
pub struct Delivered {
    pub event: epb::ExecutionEvent,
    pub commit_time: Option<meshflow_proto::pbjson_types::Timestamp>,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// This replica's lease-holder id (unique per process).
    pub owner: String,
    /// How long a lease lasts without renewal; a dead replica's work is resumed after it.
    pub lease_ttl: Duration,
    /// How often due work is looked for (new work is picked up at once).
    pub poll_interval: Duration,
    /// A driver with nothing running parks when its next wake-up is further than this.
    pub park_after: Duration,
    /// Outbound address policy of HTTP and webhook steps.
    pub allow: Vec<ssrf::Cidr>,
    /// Definition and execution limits.
    pub limits: meshflow_kit::Limits,
    /// The time retries, waits, timeouts, leases and parking are scheduled by.
    pub clock: Arc<dyn meshflow_kit::clock::Clock>,
}

/// The orchestration engine of one replica.
pub struct Engine {
    /// The runtime of the engine's thread (see [`crate::thread`]): every task of the engine runs
    /// there.
    runtime: tokio::runtime::Handle,
    shared: Arc<Shared>,
    hub: Arc<Hub>,
    running: Mutex<HashMap<String, Arc<Run>>>,
    versions: crate::versions::Versions,
    config: Config,
}

/// Most reads of a workflow's head by one start, when each is outdated by its insert.
const HEAD_READS: usize = 3;

const WATCH_PAGE: u64 = 500;

fn active(status: &str) -> bool {
    epb::ExecutionStatus::from_str_name(status)
        .is_some_and(|s| !meshflow_execution::state::is_terminal(s))
}

impl Engine {
    /// Starts the engine's thread and its background tasks (writer, poller, lease renewal). Call
    /// inside the server's runtime: the engine stops when that runtime does.
    pub fn start(db: sea_orm::DatabaseConnection, config: Config) -> anyhow::Result<Arc<Self>> {
        let runtime = crate::thread::start()?;
        let store = ExecStore::with_clock(db.clone(), config.clock.clone());
        let hub = Arc::new(Hub::default());
        let policy = Arc::new(ssrf::Policy::new(config.allow.clone()));
        let env = Env {
            programs: Arc::new(Programs::default()),
            http: steps::http_client(policy.clone())?,
            ssrf: policy,
            max_output_bytes: config.limits.max_step_output_bytes,
            clock: config.clock.clone(),
        };
        let shared = Arc::new(Shared {
            store: store.clone(),
            rules: meshflow_workflow::store::Store::new(db.clone()),
            webhooks: meshflow_webhook::Store::new(db),
            writer: Writer::spawn(store, hub.clone(), &runtime),
            env,
            owner: config.owner.clone(),
            park_after: config.park_after,
            max_for_each_items: config.limits.max_for_each_items,
            kick: Notify::new(),
        });
        let engine = Arc::new(Self {
            runtime: runtime.clone(),
            shared,
            hub,
            running: Mutex::new(HashMap::new()),
            versions: crate::versions::Versions::new(crate::versions::DEFAULT_BUDGET_BYTES),
            config,
        });
        runtime.spawn(Self::poll_loop(Arc::downgrade(&engine)));
        runtime.spawn(Self::lease_loop(Arc::downgrade(&engine)));
        Ok(engine)
    }

    /// Execution records.
    pub fn store(&self) -> &ExecStore {
        &self.shared.store
    }

    async fn poll_loop(engine: std::sync::Weak<Self>) {
        if let Some(e) = engine.upgrade() {
            match e.shared.store.reclaim_leases(&e.config.owner).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    executions = n,
                    "taking back the executions leased before a restart"
                ),
                Err(err) => tracing::warn!(error = %err, "taking back leases failed"),
            }
        }
        loop {
            let Some(e) = engine.upgrade() else { return };
            if let Err(err) = e.poll_once().await {
                tracing::warn!(error = %err, "claiming executions failed");
            }
            let interval = e.config.poll_interval;
            let shared = e.shared.clone();
            drop(e);
            let _ = tokio::time::timeout(interval, shared.kick.notified()).await;
        }
    }

    async fn poll_once(self: &Arc<Self>) -> Result<(), Error> {
        loop {
            let now = self.clock().now();
            let until = now
                + chrono::Duration::from_std(self.config.lease_ttl)
                    .unwrap_or(chrono::Duration::seconds(15));
            let ids = self
                .shared
                .store
                .claim(&self.config.owner, now, until, 256)
                .await?;
            let n = ids.len();
            for id in ids {
                let run = self
                    .running
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&id)
                    .inspect(|run| {
                        // Marked under the lock its driver leaves `running` under: either the
                        // driver sees the mark, or a later claim finds it gone and drives anew.
                        if run.done.load(std::sync::atomic::Ordering::SeqCst) {
                            run.recheck.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                    })
                    .cloned();
                match run {
                    // Concluding: the engine re-drives it after it ends if it is due.
                    Some(run) if run.done.load(std::sync::atomic::Ordering::SeqCst) => {}
                    Some(run) => {
                        // Driven here already: tell it about signals and cancellation.
                        if let Ok(Some(sig)) =
                            self.shared.store.pending_signal(&id, CANCEL_SIGNAL).await
                        {
                            let _ = run
                                .cancel
                                .send(Some(sig.payload.as_str().unwrap_or_default().to_string()));
                        }
                        run.announce_signal();
                        self.shared
                            .store
                            .clear_wake(&id, &self.config.owner)
                            .await?;
                    }
                    None => self.spawn_driver(id, None),
                }
            }
            if n < 256 {
                break;
            }
        }
        self.reconcile_signals().await
    }

    /// Tells the drivers here about every unconsumed signal of their executions. A signal reaches a
    /// driver through its wake-up, which a commit of the driver racing with it (one that clears the
    /// wake-up as it resumes) can erase; this pass, on every poll, does not depend on the wake-up.
    async fn reconcile_signals(&self) -> Result<(), Error> {
        let signals = self.shared.store.signalled(&self.config.owner).await?;
        let mut told = std::collections::HashSet::new();
        for sig in signals {
            let Some(run) = self
                .running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&sig.execution_id)
                .cloned()
            else {
                continue;
            };
            if run.done.load(std::sync::atomic::Ordering::SeqCst) {
                continue;
            }
            if sig.name == CANCEL_SIGNAL {
                let reason = sig.payload.as_str().unwrap_or_default().to_string();
                run.cancel.send_if_modified(|current| {
                    let unset = current.is_none();
                    if unset {
                        *current = Some(reason);
                    }
                    unset
                });
            } else if told.insert(sig.execution_id.clone()) {
                run.announce_signal();
            }
        }
        Ok(())
    }

    async fn lease_loop(engine: std::sync::Weak<Self>) {
        loop {
            let Some(e) = engine.upgrade() else { return };
            let ttl = e.config.lease_ttl;
            let until = e.clock().now()
                + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(15));
            let ids: Vec<String> = e
                .running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .keys()
                .cloned()
                .collect();
            if let Err(err) = e.shared.store.renew(&e.config.owner, &ids, until).await {
                tracing::warn!(error = %err, "renewing leases failed");
            }
            e.hub.sweep();
            drop(e);
            tokio::time::sleep(ttl / 3).await;
        }
    }

    async fn version(
        &self,
        workflow_id: &str,
        version: i64,
    ) -> Result<Arc<wpb::WorkflowVersion>, Error> {
        if let Some(v) = self.versions.get(workflow_id, version) {
            return Ok(v);
        }
        let v = Arc::new(self.shared.rules.version(workflow_id, version).await?);
        self.versions.insert(v.clone());
        Ok(v)
    }

    /// The clock everything the engine schedules reads.
    fn clock(&self) -> &dyn meshflow_kit::clock::Clock {
        &*self.shared.env.clock
    }

    /// Drives an execution in a task of its own. `fresh` is the driver of an execution just created
    /// here, registered in `running` before its row was written: nothing to read back.
    fn spawn_driver(self: &Arc<Self>, id: String, fresh: Option<Arc<Run>>) {
        let engine = self.clone();
        self.runtime.spawn(async move {
            let mut fresh = fresh;
            // Drive again while the execution was claimed or woken during the previous drive's end.
            loop {
                match engine.drive(&id, fresh.take()).await {
                    Ok(true) => continue,
                    Ok(false) => return,
                    Err(err) => {
                        tracing::warn!(execution_id = %id, error = %err, "cannot drive execution");
                        return;
                    }
                }
            }
        });
    }

    /// Drives an execution once; returns whether it needs driving again at once.
    async fn drive(self: &Arc<Self>, id: &str, fresh: Option<Arc<Run>>) -> Result<bool, Error> {
        let run = match fresh {
            Some(run) => run,
            None => {
                let Some(row) = self.shared.store.execution(id).await? else {
                    return Ok(false);
                };
                if !active(&row.status) {
                    return Ok(false);
                }
                let attempts = self
                    .shared
                    .store
                    .list_steps(id, None, None, i64::MAX as u64)
                    .await?;
                let def = self.version(&row.workflow_id, row.workflow_version).await?;
                let run = Run::new(self.shared.clone(), &row, def, attempts, false);
                let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
                if running.contains_key(id) {
                    return Ok(false);
                }
                running.insert(id.to_string(), run.clone());
                run
            }
        };
        let halt = run.clone().drive().await;
        let recheck = {
            let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            running.remove(id);
            run.recheck.load(std::sync::atomic::Ordering::SeqCst)
        };
        match halt {
            Halt::LeaseLost => {
                tracing::info!(execution_id = %id, "lease lost; another replica drives it");
                Ok(false)
            }
            Halt::Storage(e) => {
                tracing::warn!(execution_id = %id, error = %e, "storage failed; the execution resumes when its lease expires");
                Ok(false)
            }
            _ if run.is_finished() || !recheck => Ok(false),
            _ => {
                // Claimed for this replica, or woken, while the driver was concluding: drive again
                // if it is due. (Only then: ten thousand executions parking at once must not each
                // read their row back.)
                let Some(row) = self.shared.store.execution(id).await? else {
                    return Ok(false);
                };
                let due = row.wake_at.is_some_and(|w| w <= self.clock().now());
                let ours = row.lease_owner.as_deref() == Some(self.config.owner.as_str());
                Ok(active(&row.status)
                    && due
                    && (ours || row.lease_owner.is_none())
                    && self.reclaim(id).await?)
            }
        }
    }

    /// Takes the lease of a due execution for this replica.
    async fn reclaim(&self, id: &str) -> Result<bool, Error> {
        let until = self.clock().now()
            + chrono::Duration::from_std(self.config.lease_ttl)
                .unwrap_or(chrono::Duration::seconds(15));
        Ok(self
            .shared
            .store
            .take_lease(id, &self.config.owner, until)
            .await?)
    }

    /// StartExecution: checks the input, persists the execution, starts driving it, returns at once.
    pub async fn start_execution(
        self: &Arc<Self>,
        req: opb::StartExecutionRequest,
    ) -> Result<execution::Model, Error> {
        Ok(self.start_watched(req, false).await?.0)
    }

    /// StartExecution, and with `watch` a subscription to the live events of the execution it
    /// created, taken before the execution runs (`None` when `request_id` named an existing one).
    pub async fn start_watched(
        self: &Arc<Self>,
        req: opb::StartExecutionRequest,
        watch: bool,
    ) -> Result<(execution::Model, Option<Live>), Error> {
        let mut v = Violations::new();
        v.take(request::resource_id("workflow_id", &req.workflow_id));
        if req.version < 0 {
            v.push(Violation::new("version", "must not be negative"));
        }
        let request_id = request::request_id(&req.request_id, &mut v);
        if !v.is_empty() {
            return Err(Error::Invalid(v.into_vec()));
        }
        if let Some(rid) = &request_id
            && let Some(existing) = self.shared.store.execution_by_request(rid).await?
        {
            return Ok((existing, None));
        }
        // The insert checks the head again in its own transaction, and a start whose head it
        // found outdated reads it again. Every start reads it, and keeps no copy: on a SQLite file
        // the read takes microseconds (the store's reader). A cached head, tried before the reader
        // existed, saved 0.17 ms per start but took the memory of 10,000 parked starts past
        // 100 MiB in some runs.
        for _ in 0..HEAD_READS {
            let (status, current) = self
                .shared
                .store
                .workflow_head(&req.workflow_id)
                .await?
                .ok_or_else(|| {
                    meshflow_workflow::Error::WorkflowNotFound(req.workflow_id.clone())
                })?;
            if status != wpb::WorkflowStatus::Active {
                return Err(Error::NotActive {
                    id: req.workflow_id.clone(),
                    status: status.as_str_name().to_string(),
                });
            }
            let head = Head {
                current_version: (req.version == 0).then_some(current),
            };
            if let Some(started) = self
                .insert_started(&req, request_id.clone(), head, watch)
                .await?
            {
                return Ok(started);
            }
        }
        Err(Error::WorkflowChanging(req.workflow_id.clone()))
    }

    /// Checks the input against the version the start runs (the requested one, or `head`'s current
    /// one), then inserts the execution, provided the workflow still matches `head`, and starts
    /// driving it. `None`: the workflow changed since `head` was read, and nothing was written.
    async fn insert_started(
        self: &Arc<Self>,
        req: &opb::StartExecutionRequest,
        request_id: Option<String>,
        head: Head,
        watch: bool,
    ) -> Result<Option<(execution::Model, Option<Live>)>, Error> {
        let version = head.current_version.unwrap_or(req.version);
        let def = self.version(&req.workflow_id, version).await?;
        let input = req
            .input
            .as_ref()
            .map(to_json)
            .unwrap_or(Value::Object(Default::default()));
        if let Some(schema) = &def.input_schema {
            let schema = struct_to_json(schema);
            let validator = self
                .shared
                .env
                .programs
                .schema(&schema)
                .map_err(|e| Error::Internal(format!("stored input schema: {e}")))?;
            let violations: Vec<Violation> = validator
                .iter_errors(&input)
                .map(|e| {
                    let at = e.instance_path().to_string();
                    let field = if at.is_empty() {
                        "input".to_string()
                    } else {
                        format!("input{}", at.replace('/', "."))
                    };
                    Violation::new(field, e.to_string())
                })
                .collect();
            if !violations.is_empty() {
                return Err(Error::Invalid(violations));
            }
        }
        let mut variables = def
            .variables
            .as_ref()
            .map(struct_to_json)
            .unwrap_or(Value::Object(Default::default()));
        if let (Value::Object(vars), Some(overrides)) = (&mut variables, req.variables.as_ref())
            && let Value::Object(o) = struct_to_json(overrides)
        {
            vars.extend(o);
        }
        let limits = &self.config.limits;
        let now = self.clock().now();
        let timeout = def
            .timeout
            .as_ref()
            .and_then(meshflow_kit::convert::from_duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(limits.max_execution_duration)
            .min(limits.max_execution_duration);
        let lease_until = now
            + chrono::Duration::from_std(self.config.lease_ttl)
                .unwrap_or(chrono::Duration::seconds(15));
        let row = NewExecution {
            id: meshflow_kit::id::new_id(),
            workflow_id: req.workflow_id.clone(),
            workflow_version: version,
            input,
            variables,
            request_id,
            deadline_at: Some(
                now + chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX),
            ),
            now,
            lease: Some((self.config.owner.clone(), lease_until)),
        }
        .row();
        // The driver is registered before the row exists, so a cancellation can only find the
        // execution once its driver can hear it; a watcher subscribed now misses no event.
        let id = row.id.clone();
        let run = Run::new(self.shared.clone(), &row, def, Vec::new(), true);
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), run.clone());
        let live = watch.then(|| self.hub.subscribe(&id));
        // The insert and what follows it are a task of their own, so a start whose caller goes
        // away meanwhile (a deadline, a reset stream) still ends with its execution driven, or
        // not written and forgotten: never written and left registered without a driver, its
        // lease renewed for nobody.
        let engine = self.clone();
        let max_active = limits.max_concurrent_executions as u64;
        let inserted = self
            .runtime
            .spawn(async move {
                let inserted = engine
                    .shared
                    .store
                    .insert_execution(row, max_active, head)
                    .await;
                if matches!(inserted, Ok(Inserted::Created(_))) {
                    engine.spawn_driver(id, Some(run));
                } else {
                    engine
                        .running
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&id);
                }
                inserted
            })
            .await
            .map_err(|e| Error::Internal(format!("the start task failed: {e}")))?;
        match inserted? {
            Inserted::Created(row) => Ok(Some((row, live))),
            Inserted::Existing(row) => Ok(Some((row, None))),
            Inserted::AtCapacity => Err(Error::TooManyExecutions(limits.max_concurrent_executions)),
            Inserted::Stale => Ok(None),
        }
    }

    /// The execution, if it exists.
    pub async fn get(&self, id: &str) -> Result<execution::Model, Error> {
        if let Err(v) = request::resource_id("execution_id", id) {
            return Err(Error::Invalid(vec![v]));
        }
        self.shared
            .store
            .execution(id)
            .await?
            .ok_or_else(|| Error::ExecutionNotFound(id.to_string()))
    }

    /// CancelExecution: records the request durably, tells the driver, and waits briefly for the end.
    pub async fn cancel(
        self: &Arc<Self>,
        id: &str,
        reason: &str,
    ) -> Result<execution::Model, Error> {
        let row = self.get(id).await?;
        if !active(&row.status) {
            return Err(Error::AlreadyEnded {
                id: id.to_string(),
                status: row.status,
            });
        }
        let mut events = self.hub.subscribe(id);
        self.shared
            .store
            .add_signal(
                id,
                CANCEL_SIGNAL,
                Value::String(reason.to_string()),
                Some(CANCEL_SIGNAL),
                self.clock().now(),
            )
            .await?;
        if let Some(run) = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
        {
            let _ = run.cancel.send(Some(reason.to_string()));
        }
        self.shared.kick.notify_one();
        // Wait for the terminal event (or give up after a few seconds and report the current state).
        // The subscription ends only if this fell far behind: the row read below tells the rest.
        let wait = async {
            while let Some(p) = events.recv().await {
                if is_terminal_event(&p.event) {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
        self.get(id).await
    }

    /// SignalExecution: stores the signal (once per request_id) and wakes the execution. A retry
    /// with the same request_id succeeds even when the execution has ended since.
    pub async fn signal(self: &Arc<Self>, req: opb::SignalExecutionRequest) -> Result<(), Error> {
        let mut v = Violations::new();
        v.take(request::resource_id("execution_id", &req.execution_id));
        if let Err(e) = meshflow_workflow::validate::check_id(&req.signal_name) {
            v.push(Violation::new("signal_name", e));
        }
        let request_id = request::request_id(&req.request_id, &mut v);
        // The payload becomes the output of the WAIT step it wakes.
        let payload = req.payload.as_ref().map(to_json).unwrap_or(Value::Null);
        let size = crate::driver::json_len(&payload);
        let limit = self.shared.env.max_output_bytes;
        if size > limit {
            v.push(Violation::new(
                "payload",
                format!("is {size} bytes as JSON; a step's output is limited to {limit}"),
            ));
        }
        if !v.is_empty() {
            return Err(Error::Invalid(v.into_vec()));
        }
        let row = self.get(&req.execution_id).await?;
        if let Some(rid) = &request_id
            && self.shared.store.signal_recorded(&row.id, rid).await?
        {
            return Ok(());
        }
        if !active(&row.status) {
            return Err(Error::AlreadyEnded {
                id: row.id,
                status: row.status,
            });
        }
        self.shared
            .store
            .add_signal(
                &row.id,
                &req.signal_name,
                payload,
                request_id.as_deref(),
                self.clock().now(),
            )
            .await?;
        if let Some(run) = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&row.id)
        {
            run.announce_signal();
        }
        self.shared.kick.notify_one();
        Ok(())
    }

    /// Streams events after `after`: history first, then live, without gap or duplicate, ending after
    /// the terminal event. A watcher that falls behind the live buffer reads history instead.
    ///
    /// `live`, a subscription taken before the execution ran (see [`Self::start_watched`]), has
    /// every event from the first: no history is read first. The stream is polled by the response
    /// itself, so a live event takes no extra hop between tasks on its way to the client.
    pub fn watch(
        self: &Arc<Self>,
        id: String,
        after: i64,
        live: Option<Live>,
    ) -> impl futures::Stream<Item = Result<Delivered, tonic::Status>> + Send + 'static {
        let from_start = live.is_some();
        let watch = Watch {
            live: live.unwrap_or_else(|| self.hub.subscribe(&id)),
            engine: self.clone(),
            id,
            last: after,
            backlog: std::collections::VecDeque::new(),
            more: false,
            started: from_start,
            ended: false,
        };
        futures::stream::unfold(watch, |mut w| async move {
            match w.next().await {
                Ok(Some(e)) => Some((Ok(e), w)),
                Ok(None) => None,
                Err(status) => {
                    w.ended = true;
                    Some((Err(status), w))
                }
            }
        })
    }
}

/// The state of one watcher.
struct Watch {
    engine: Arc<Engine>,
    id: String,
    live: Live,
    /// The last sequence sent.
    last: i64,
    /// History read but not yet sent.
    backlog: std::collections::VecDeque<epb::ExecutionEvent>,
    /// The last page of history read was full: there may be more.
    more: bool,
    /// Whether history up to the subscription was read (or needs no reading).
    started: bool,
    /// The terminal event (or an error) was sent.
    ended: bool,
}

impl Watch {
    /// The next event to send; `None` once the terminal one was sent.
    async fn next(&mut self) -> Result<Option<Delivered>, tonic::Status> {
        loop {
            if self.ended {
                return Ok(None);
            }
            if let Some(event) = self.backlog.pop_front() {
                return Ok(Some(self.sent(Delivered {
                    event,
                    commit_time: None,
                })));
            }
            if self.more {
                self.read_history().await?;
                continue;
            }
            if !self.started {
                self.started = true;
                if self.read_history().await? {
                    continue;
                }
                // A terminal execution whose history ended before `after`: nothing more will come.
                let row = self
                    .engine
                    .shared
                    .store
                    .execution(&self.id)
                    .await
                    .map_err(|e| meshflow_kit::error::storage(&e))?;
                if row.is_some_and(|r| !active(&r.status) && r.last_sequence <= self.last) {
                    return Ok(None);
                }
                continue;
            }
            // An event already received needs no timer: a commit's events arrive together.
            let received = match self.live.try_recv() {
                Ok(e) => Some(e),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => tokio::select! {
                    received = self.live.recv() => received,
                    // Events committed by another replica reach this one only through the database.
                    () = tokio::time::sleep(Duration::from_millis(500)) => {
                        self.read_history().await?;
                        continue;
                    }
                },
            };
            match received {
                Some(p) if p.event.sequence == self.last + 1 => {
                    return Ok(Some(self.sent(Delivered {
                        event: p.event,
                        commit_time: Some(p.commit_time),
                    })));
                }
                Some(p) if p.event.sequence <= self.last => {}
                // A gap: what is missing is in history.
                Some(_) => {
                    self.read_history().await?;
                }
                // This watcher fell behind and lost its channel: subscribe again, then read what
                // it missed.
                None => {
                    self.live = self.engine.hub.subscribe(&self.id);
                    self.read_history().await?;
                }
            }
        }
    }

    /// Records `d` as sent.
    fn sent(&mut self, d: Delivered) -> Delivered {
        self.last = d.event.sequence;
        self.ended = is_terminal_event(&d.event);
        d
    }

    /// Reads a page of history after the last event sent (and not yet queued) into the backlog;
    /// returns whether it found any.
    async fn read_history(&mut self) -> Result<bool, tonic::Status> {
        let after = self.backlog.back().map_or(self.last, |e| e.sequence);
        let events = self
            .engine
            .shared
            .store
            .events_after(&self.id, after, WATCH_PAGE)
            .await
            .map_err(|e| meshflow_kit::error::storage(&e))?;
        let found = !events.is_empty();
        self.more = events.len() as u64 == WATCH_PAGE;
        self.backlog.extend(events);
        Ok(found)
    }
}
