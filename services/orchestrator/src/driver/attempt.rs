//! The attempt lifecycle of a leaf step: start, run, succeed or fail, and a failure's retry
//! scheduled (a stored `next_attempt_at`, slept until) or its end.

use super::*;

impl Run {
    /// A step failed for good: CONTINUE lets dependents run, FAIL fails the execution.
    pub(super) fn failed(&self, step: &pb::Step, error: Value) -> Result<Outcome, Halt> {
        if step.on_error == pb::OnError::Continue as i32 {
            Ok(Outcome::Continued)
        } else {
            Err(Halt::Failed(error))
        }
    }

    /// Records a final failure of the open attempt of `path` (e.g. a step timeout).
    pub(super) async fn record_failure(
        &self,
        step: &pb::Step,
        path: &str,
        err: StepError,
    ) -> Result<Outcome, Halt> {
        let error = err.to_json(path);
        let now = self.now();
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
    pub(super) async fn sleep_until(&self, path: &str, at: DateTime<Utc>) {
        let delay = (at - self.now()).to_std().unwrap_or(Duration::ZERO);
        if delay.is_zero() {
            return;
        }
        {
            let mut st = self.lock();
            st.waits.insert(path.to_string(), Some(at));
            st.busy = st.busy.saturating_sub(1);
        }
        self.changed.notify_one();
        self.on_clock(at).await;
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
    pub(super) fn attempt_span(
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
    pub(super) async fn leaf(
        &self,
        step: &pb::Step,
        path: &str,
        frame: &Arc<Frame>,
    ) -> Result<Outcome, Halt> {
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
            let started = self.now();
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
            let ended = self.now();
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
}
