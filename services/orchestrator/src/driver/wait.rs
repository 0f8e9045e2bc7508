//! WAIT steps: a duration, an absolute time or a named signal with a timeout, durable across
//! restarts.

use super::*;

impl Run {
    /// WAIT: a timer or a signal, with its deadline stored on the attempt so a restart keeps it.
    pub(super) async fn wait(
        &self,
        step: &pb::Step,
        w: &pb::WaitStep,
        path: &str,
    ) -> Result<Outcome, Halt> {
        use pb::wait_step::Kind;
        let memo = self
            .memo(path)
            .filter(|m| status_of(m) == StepStatus::Waiting);
        let (row_id, until) = match memo {
            Some(m) => (m.id, m.next_attempt_at),
            None => {
                let now = self.now();
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
                    let now = self.now();
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
                            ..Default::default()
                        });
                        vec![got, done]
                    })?;
                    return Ok(Outcome::Succeeded(sig.payload));
                }
                if until.is_some_and(|u| u <= self.now()) {
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
                        Some(u) => self.on_clock(u).await,
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
                let output =
                    json!({"waited_until": until.unwrap_or_else(|| self.now()).to_rfc3339()});
                self.succeeded(step, path, &row_id, started, None, output)
            }
        }
    }
}
