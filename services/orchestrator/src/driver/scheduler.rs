//! The step scheduler: a block's steps run as their dependencies finish, independent ones at
//! once; a step already settled in the stored attempts returns its result without running.

use super::*;

impl Run {
    /// Runs a block (a DAG by `depends_on`), returning each step's outcome by id.
    pub(super) fn run_block(
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

    pub(super) fn memo(&self, path: &str) -> Option<step::Model> {
        self.lock().memo.get(path).cloned()
    }

    pub(super) async fn run_step(
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
                let now = self.now();
                let deadline = now
                    + chrono::Duration::from_std(remaining(limit, began, now))
                        .unwrap_or(chrono::Duration::MAX);
                let expired = self.on_clock(deadline);
                let finished = tokio::select! {
                    r = work => Ok(r),
                    () = expired => Err(()),
                };
                match finished {
                    Ok(r) => r,
                    Err(()) => {
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

    pub(super) async fn run_step_inner(
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
}
