//! The shared store on a real database (a SQLite file, or PostgreSQL in the test command's
//! PostgreSQL pass): two handles on one database stand for two replicas.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use meshflow_circuitbreaker::machine::{Decision, Outcome, Reason};
use meshflow_circuitbreaker::{Config, State, Store};
use meshflow_kit::clock::{Clock, ManualClock};

const OK: Outcome = Outcome {
    failed: false,
    slow: false,
};
const FAIL: Outcome = Outcome {
    failed: true,
    slow: false,
};

/// Two stores (two connection pools, as two replicas have) on one fresh database, on one clock.
async fn replicas() -> (Store, Store, Arc<ManualClock>) {
    let url = meshflow_kit::testing::fresh_database_url()
        .await
        .expect("database");
    let clock = ManualClock::new(DateTime::<Utc>::from_timestamp(1_800_000_000, 0).expect("t"));
    let mut stores = Vec::new();
    for _ in 0..2 {
        let db =
            meshflow_kit::db::connect_url(&url, meshflow_kit::config::SqliteSynchronous::Normal, 8)
                .await
                .expect("connect");
        stores.push(Store::new(db, clock.clone()));
    }
    let b = stores.pop().expect("store");
    let a = stores.pop().expect("store");
    (a, b, clock)
}

fn config() -> Config {
    Config {
        minimum_calls: 4,
        permitted_calls_in_half_open: 3,
        wait_in_open: Duration::from_secs(5),
        ..Config::default()
    }
}

/// Acquires and reports `outcome` through `store`.
async fn call(store: &Store, config: &Config, outcome: Outcome) -> bool {
    let (decision, _, _) = store
        .change("svc", config, |b, c, now, ts| b.acquire(c, now, ts))
        .await
        .expect("acquire");
    let Decision::Permitted(permit) = decision else {
        return false;
    };
    store
        .change("svc", config, |b, c, now, ts| {
            ts.extend(b.record(c, permit, Some(outcome), now));
        })
        .await
        .expect("record");
    true
}

#[tokio::test]
async fn outcomes_from_every_replica_land_in_one_window_whatever_the_contention() {
    let (a, b, clock) = replicas().await;
    let c = Config {
        minimum_calls: 1_000,
        ..config()
    };
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let c = c.clone();
            tokio::spawn(async move { call(&store, &c, OK).await })
        })
        .collect();
    for t in futures::future::join_all(tasks).await {
        assert!(t.expect("task"), "CLOSED admits every call");
    }
    let stored = a
        .get("svc")
        .await
        .expect("get")
        .expect("created on first use");
    assert_eq!(
        stored.breaker.rates(&stored.config, clock.now()).calls,
        50,
        "every compare-and-set that lost ran again on the winner's state"
    );
    assert_eq!(
        stored.version,
        1 + 50,
        "a CLOSED breaker's permits change nothing; each outcome is one write"
    );
}

#[tokio::test]
async fn half_open_admits_exactly_the_permitted_probes_across_replicas() {
    let (a, b, clock) = replicas().await;
    let c = config();
    for _ in 0..4 {
        assert!(call(&a, &c, FAIL).await);
    }
    let opened = b.get("svc").await.expect("get").expect("breaker");
    assert_eq!(
        opened.breaker.state,
        State::Open,
        "seen by the other replica"
    );
    clock.advance(Duration::from_secs(5));
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let c = c.clone();
            tokio::spawn(async move {
                store
                    .change("svc", &c, |b, c, now, ts| b.acquire(c, now, ts))
                    .await
                    .expect("acquire")
                    .0
            })
        })
        .collect();
    let permitted = futures::future::join_all(tasks)
        .await
        .into_iter()
        .filter(|d| matches!(d.as_ref().expect("task"), Decision::Permitted(_)))
        .count();
    assert_eq!(permitted, 3);
    let history = a.transitions_after(0, 100).await.expect("history");
    let moves: Vec<(State, State, Reason)> = history
        .iter()
        .map(|r| (r.transition.from, r.transition.to, r.transition.reason))
        .collect();
    assert_eq!(
        moves,
        vec![
            (State::Closed, State::Open, Reason::FailureRateExceeded),
            (State::Open, State::HalfOpen, Reason::WaitInOpenElapsed),
        ],
        "each transition kept once, by the replica whose write won"
    );
}

#[tokio::test]
async fn a_deleted_breaker_comes_back_with_the_default_config_and_old_permits_count_for_nothing() {
    let (a, _b, clock) = replicas().await;
    let c = config();
    let (decision, _, _) = a
        .change("svc", &c, |b, c, now, ts| b.acquire(c, now, ts))
        .await
        .expect("acquire");
    let Decision::Permitted(old) = decision else {
        panic!("refused")
    };
    assert!(a.delete("svc").await.expect("delete"));
    assert!(a.get("svc").await.expect("get").is_none());
    clock.advance(Duration::from_millis(1));
    let (recorded, stored, _) = a
        .change("svc", &Config::default(), |b, c, now, _| {
            b.record(c, old, Some(FAIL), now);
            b.rates(c, now).calls
        })
        .await
        .expect("record");
    assert_eq!(recorded, 0, "a permit of the deleted breaker is stale");
    assert_eq!(stored.config, Config::default());
    assert!(!a.delete("other").await.expect("delete"));
}
