//! Time as a dependency. Everything the engine schedules — retries, WAIT deadlines, step and
//! workflow timeouts, leases, parking — reads the time and sleeps through one [`Clock`]: the
//! system's in a server, a [`ManualClock`] in tests, which advance it and see exactly what is due,
//! whatever the machine's load.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tokio::sync::watch;

/// A source of the current time that can also wait for a time to come.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;

    /// A future that completes once the clock reads `at` or later.
    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'static, ()>;

    /// Whether this is the system's time, which a database server may read for itself (PostgreSQL
    /// stamps a group commit's events at the last moment before it commits). A driven clock's
    /// times are written as it reads them.
    fn is_system(&self) -> bool {
        false
    }
}

/// The system's clock: `Utc::now()` and Tokio's timers.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'static, ()> {
        let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        Box::pin(tokio::time::sleep(wait))
    }

    fn is_system(&self) -> bool {
        true
    }
}

/// The system clock, shared.
pub fn system() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

/// The clock a server process runs by: the system's. In test builds (the `testing` feature, never
/// in the server binary) a test may drive a child process's clock instead: see
/// [`crate::testing::driven_clock`].
pub fn for_process() -> anyhow::Result<Arc<dyn Clock>> {
    #[cfg(feature = "testing")]
    if let Some(clock) = crate::testing::driven_clock()? {
        return Ok(clock);
    }
    Ok(system())
}

/// A clock that moves only when told to: sleepers wake when it is advanced past their time.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<DateTime<Utc>>,
    changed: watch::Sender<DateTime<Utc>>,
}

impl ManualClock {
    /// A clock reading `start`, to the microsecond: the finest time every database stores, so
    /// that a time scheduled from it reads back equal (PostgreSQL rounds finer times to the
    /// nearest microsecond, which can land after the clock's reading).
    pub fn new(start: DateTime<Utc>) -> Arc<Self> {
        use chrono::SubsecRound;
        let start = start.trunc_subsecs(6);
        Arc::new(Self {
            now: Mutex::new(start),
            changed: watch::channel(start).0,
        })
    }

    /// A clock reading the system's time now, from then on moved only by [`Self::advance`].
    pub fn starting_now() -> Arc<Self> {
        Self::new(Utc::now())
    }

    /// Moves the clock forward by `by` (to the microsecond), waking every sleeper whose time has
    /// come.
    pub fn advance(&self, by: Duration) {
        let by = Duration::from_micros(u64::try_from(by.as_micros()).unwrap_or(u64::MAX));
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now += chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        self.changed.send_replace(*now);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'static, ()> {
        let mut changed = self.changed.subscribe();
        Box::pin(async move {
            let _ = changed.wait_for(|now| *now >= at).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_wakes_sleepers_exactly_when_advanced_past_their_time() {
        let clock = ManualClock::new(DateTime::UNIX_EPOCH);
        let at = DateTime::UNIX_EPOCH + chrono::Duration::seconds(10);
        let sleeper = tokio::spawn(clock.sleep_until(at));
        clock.advance(Duration::from_secs(9));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished(), "not yet: the clock reads 9 s");
        clock.advance(Duration::from_secs(1));
        sleeper.await.expect("woke");
        assert_eq!(clock.now(), at);
        // A time already past completes at once.
        clock.sleep_until(DateTime::UNIX_EPOCH).await;
    }
}
