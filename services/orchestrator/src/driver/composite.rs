//! Composite steps: CONDITIONAL, PARALLEL and FOR_EACH open a block of nested steps, record what
//! a replay must repeat (the branch taken, the items), and close with the block's outputs.

use super::*;

impl Run {
    /// Opens (or resumes) the attempt of a composite step; returns its id and stored decision.
    pub(super) async fn open_composite(
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
        r.start_time = Some(self.now());
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

    pub(super) async fn close_composite(
        &self,
        step: &pb::Step,
        path: &str,
        row_id: &str,
        decision: Value,
        output: Value,
    ) -> Result<Outcome, Halt> {
        let now = self.now();
        let open_start = self.lock().open.get(path).and_then(|r| r.start_time);
        let started = open_start
            .or_else(|| self.memo(path).and_then(|m| m.start_time))
            .unwrap_or(now);
        self.succeeded(step, path, row_id, started, Some(decision), output)
    }

    /// Queues the success of a single-attempt step (WAIT, composite): its attempt row, STEP_SUCCEEDED
    /// with the output, and its metrics.
    pub(super) fn succeeded(
        &self,
        step: &pb::Step,
        path: &str,
        row_id: &str,
        started: DateTime<Utc>,
        input: Option<Value>,
        output: Value,
    ) -> Result<Outcome, Halt> {
        let now = self.now();
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
                ..Default::default()
            });
            vec![e]
        })?;
        Ok(Outcome::Succeeded(output))
    }

    /// Marks every step of blocks not taken as SKIPPED (once; replays find them stored).
    pub(super) async fn skip_all(&self, blocks: &[(&[pb::Step], String)]) -> Result<(), Halt> {
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

    pub(super) async fn conditional(
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

    pub(super) async fn parallel(
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

    pub(super) async fn for_each(
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
    pub(super) async fn composite_failed(
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
