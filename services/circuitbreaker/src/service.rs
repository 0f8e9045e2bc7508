//! The behaviour of CircuitBreakerService, free of transport concerns: requests in, responses or
//! [`Error`]s out.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use meshflow_kit::convert::from_duration;
use meshflow_kit::{FieldPath, Violation, Violations, page, request};
use meshflow_proto::circuitbreaker::v1 as pb;
use tokio::sync::broadcast;

use crate::convert::{self, CONFIG_FIELDS};
use crate::error::Error;
use crate::machine::{Config, Reason, State};
use crate::store::{Filter, Store, Stored};
use crate::watch::Hub;

const DEFAULT_PAGE: u64 = 50;
const MAX_PAGE: u64 = 500;
/// Longest service id.
pub const MAX_SERVICE_ID_LEN: usize = 255;

/// Checks a service id: required, at most 255 bytes, no whitespace or control characters.
pub fn check_service_id(field: &str, id: &str) -> Result<(), Violation> {
    let problem = if id.is_empty() {
        "is required"
    } else if id.len() > MAX_SERVICE_ID_LEN {
        "is longer than 255 bytes"
    } else if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        "must not contain whitespace or control characters"
    } else {
        return Ok(());
    };
    Err(Violation::new(field, problem))
}

/// A stream of WatchCircuitBreakers messages.
pub type WatchStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchCircuitBreakersResponse, tonic::Status>> + Send>>;

/// CircuitBreakerService over the shared store.
#[derive(Clone)]
pub struct Service {
    store: Store,
    hub: Arc<Hub>,
}

impl Service {
    /// The service over `store`, publishing transitions through `hub`.
    pub fn new(store: Store, hub: Arc<Hub>) -> Self {
        Self { store, hub }
    }

    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.store.clock().now()
    }

    fn reply(&self, stored: &Stored) -> pb::CircuitBreaker {
        convert::breaker(stored, self.now())
    }

    async fn existing(&self, service_id: &str) -> Result<Stored, Error> {
        check_service_id("service_id", service_id).map_err(|v| vec![v])?;
        self.store
            .get(service_id)
            .await?
            .ok_or_else(|| Error::NotFound(service_id.to_string()))
    }

    /// ListCircuitBreakers.
    pub async fn list(
        &self,
        req: pb::ListCircuitBreakersRequest,
    ) -> Result<pb::ListCircuitBreakersResponse, Error> {
        let mut v = Violations::new();
        let size = v.take(page::size(req.page_size, DEFAULT_PAGE, MAX_PAGE));
        let after = v.take(page::decode::<String>(&req.page_token));
        let state = match pb::CircuitBreakerState::try_from(req.state) {
            Ok(s) => convert::from_state(s),
            Err(_) => {
                v.push(Violation::new("state", "is not a CircuitBreakerState"));
                None
            }
        };
        let (Some(size), Some(after), true) = (size, after, v.is_empty()) else {
            return Err(Error::Invalid(v.into_vec()));
        };
        let filter = Filter {
            state,
            prefix: req.service_id_prefix,
            after,
        };
        let rows = self.store.list(&filter, size + 1).await?;
        let (rows, next_page_token) = page::finish(rows, size, |s| s.service_id.clone());
        Ok(pb::ListCircuitBreakersResponse {
            circuit_breakers: rows.iter().map(|s| self.reply(s)).collect(),
            next_page_token,
        })
    }

    /// GetCircuitBreaker.
    pub async fn get(
        &self,
        req: pb::GetCircuitBreakerRequest,
    ) -> Result<pb::CircuitBreaker, Error> {
        let stored = self.existing(&req.service_id).await?;
        Ok(self.reply(&stored))
    }

    /// UpdateCircuitBreakerConfig: the masked fields (every field without a mask; paths may be
    /// written with or without `config.`), only if `etag` still names the configuration. Creates
    /// the breaker when it does not exist. A new window length starts the window over.
    pub async fn update_config(
        &self,
        req: pb::UpdateCircuitBreakerConfigRequest,
    ) -> Result<pb::CircuitBreaker, Error> {
        let mut v = Violations::new();
        v.take(check_service_id("service_id", &req.service_id));
        let mut mask = req.update_mask.clone();
        if let Some(m) = mask.as_mut() {
            for p in &mut m.paths {
                if let Some(rest) = p.strip_prefix("config.") {
                    *p = rest.to_string();
                }
            }
        }
        let fields = match request::mask_fields(mask.as_ref(), CONFIG_FIELDS, &[]) {
            Ok(f) => Some(f),
            Err(violations) => {
                violations.into_iter().for_each(|x| v.push(x));
                None
            }
        };
        let Some(update) = req.config.as_ref() else {
            v.push(Violation::new("config", "is required"));
            return Err(Error::Invalid(v.into_vec()));
        };
        // Checked against the defaults first, so every bad field is reported at once.
        let root = FieldPath::root("config");
        if let Err(violations) =
            convert::apply_config(&Config::default(), update, fields.as_ref(), &root)
        {
            violations.into_iter().for_each(|x| v.push(x));
        }
        let Some(fields) = fields.filter(|_| v.is_empty()) else {
            return Err(Error::Invalid(v.into_vec()));
        };
        let etag = req.etag.clone();
        let (result, stored, transitions) = self
            .store
            .change(&req.service_id, &Config::default(), |b, config, _, _| {
                if !etag.is_empty() && etag != convert::etag(config) {
                    return Err(Error::StaleEtag(req.service_id.clone()));
                }
                let next = convert::apply_config(config, update, Some(&fields), &root)
                    .map_err(Error::Invalid)?;
                if next.window != config.window {
                    b.window = crate::window::Window::new(next.window);
                }
                *config = next;
                Ok(())
            })
            .await?;
        result?;
        self.announce(&transitions);
        Ok(self.reply(&stored))
    }

    fn announce(&self, transitions: &[crate::Transition]) {
        if !transitions.is_empty() {
            self.hub.announce();
        }
    }

    /// ResetCircuitBreaker: CLOSED, an empty window, a new generation.
    pub async fn reset(
        &self,
        req: pb::ResetCircuitBreakerRequest,
    ) -> Result<pb::CircuitBreaker, Error> {
        self.existing(&req.service_id).await?;
        self.move_to(&req.service_id, State::Closed, Reason::Reset)
            .await
    }

    /// ForceOpenCircuitBreaker: refuses every call until reset, or for `duration`.
    pub async fn force_open(
        &self,
        req: pb::ForceOpenCircuitBreakerRequest,
    ) -> Result<pb::CircuitBreaker, Error> {
        let mut v = Violations::new();
        v.take(check_service_id("service_id", &req.service_id));
        let duration = match req.duration.as_ref() {
            None => None,
            Some(d) if d.seconds == 0 && d.nanos == 0 => None,
            Some(d) => match from_duration(d) {
                Some(d) if d <= std::time::Duration::from_secs(366 * 86_400) => Some(d),
                _ => {
                    v.push(Violation::new(
                        "duration",
                        "must be positive and at most 366 days",
                    ));
                    None
                }
            },
        };
        if !v.is_empty() {
            return Err(Error::Invalid(v.into_vec()));
        }
        self.operate(&req.service_id, |b, c, now, ts| {
            ts.extend(b.force_open(c, duration, now));
        })
        .await
    }

    /// DisableCircuitBreaker: every call passes and nothing is recorded, until reset.
    pub async fn disable(
        &self,
        req: pb::DisableCircuitBreakerRequest,
    ) -> Result<pb::CircuitBreaker, Error> {
        check_service_id("service_id", &req.service_id).map_err(|v| vec![v])?;
        self.move_to(&req.service_id, State::Disabled, Reason::Disabled)
            .await
    }

    /// An operator's transition (legal from every state).
    async fn move_to(
        &self,
        service_id: &str,
        to: State,
        reason: Reason,
    ) -> Result<pb::CircuitBreaker, Error> {
        self.operate(service_id, |b, c, now, ts| {
            ts.extend(b.transition(c, to, reason, now).ok().flatten());
        })
        .await
    }

    async fn operate(
        &self,
        service_id: &str,
        op: impl FnMut(
            &mut crate::Breaker,
            &mut Config,
            chrono::DateTime<chrono::Utc>,
            &mut Vec<crate::Transition>,
        ),
    ) -> Result<pb::CircuitBreaker, Error> {
        let ((), stored, transitions) = self
            .store
            .change(service_id, &Config::default(), op)
            .await?;
        self.announce(&transitions);
        Ok(self.reply(&stored))
    }

    /// DeleteCircuitBreaker: the next call makes it again with the default configuration.
    pub async fn delete(&self, req: pb::DeleteCircuitBreakerRequest) -> Result<(), Error> {
        check_service_id("service_id", &req.service_id).map_err(|v| vec![v])?;
        if self.store.delete(&req.service_id).await? {
            Ok(())
        } else {
            Err(Error::NotFound(req.service_id))
        }
    }

    /// WatchCircuitBreakers: the current state of each matching breaker, then every transition of
    /// one, made on any replica. A watcher that falls behind gets the current states again.
    pub async fn watch(&self, req: pb::WatchCircuitBreakersRequest) -> Result<WatchStream, Error> {
        let mut v = Violations::new();
        for (i, id) in req.service_ids.iter().enumerate() {
            v.take(check_service_id(&format!("service_ids[{i}]"), id));
        }
        if !v.is_empty() {
            return Err(Error::Invalid(v.into_vec()));
        }
        let ids: BTreeSet<String> = req.service_ids.into_iter().collect();
        let prefix = req.service_id_prefix;
        let wanted =
            move |id: &str| (ids.is_empty() || ids.contains(id)) && id.starts_with(&prefix);
        let wanted = Arc::new(wanted);
        let receiver = self.hub.subscribe();
        let first = self.snapshot(wanted.as_ref()).await?;
        let state = (self.clone(), receiver, first, wanted);
        let stream =
            futures::stream::unfold(state, |(service, mut rx, mut queue, wanted)| async move {
                loop {
                    if let Some(message) = queue.pop() {
                        return Some((Ok(message), (service, rx, queue, wanted)));
                    }
                    match rx.recv().await {
                        Ok(t) if wanted(&t.service_id) => {
                            let message = pb::WatchCircuitBreakersResponse {
                                transition: Some((*t).clone()),
                                circuit_breaker: None,
                            };
                            return Some((Ok(message), (service, rx, queue, wanted)));
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            match service.snapshot(wanted.as_ref()).await {
                                Ok(s) => queue = s,
                                Err(e) => {
                                    return Some((Err(e.into()), (service, rx, queue, wanted)));
                                }
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            });
        Ok(Box::pin(stream))
    }

    /// The current state of every wanted breaker, as watch messages, last one first (popped in
    /// service id order).
    async fn snapshot(
        &self,
        wanted: &(dyn Fn(&str) -> bool + Send + Sync),
    ) -> Result<Vec<pb::WatchCircuitBreakersResponse>, Error> {
        let mut out = Vec::new();
        let mut filter = Filter::default();
        loop {
            let rows = self.store.list(&filter, MAX_PAGE).await?;
            let Some(last) = rows.last() else { break };
            filter.after = Some(last.service_id.clone());
            let full = rows.len() as u64 == MAX_PAGE;
            out.extend(rows.iter().filter(|s| wanted(&s.service_id)).map(|s| {
                pb::WatchCircuitBreakersResponse {
                    transition: None,
                    circuit_breaker: Some(self.reply(s)),
                }
            }));
            if !full {
                break;
            }
        }
        out.reverse();
        Ok(out)
    }
}
