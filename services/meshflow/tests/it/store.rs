//! Group commit as each backend writes it (SQLite's own connection, PostgreSQL's single statement):
//! a commit whose writer no longer holds the execution's lease writes nothing, and the rest of its
//! batch still lands; metric increments are written with their commit and add up bucket by bucket.

use chrono::Utc;
use meshflow_execution::store::{
    Commit, CommitOutcome, ExecutionPatch, Head, Inserted, MetricsDelta, NewExecution, StepRow,
    Store,
};
use meshflow_kit::config::SqliteSynchronous;
use meshflow_proto::execution::v1 as epb;
use serde_json::json;

use crate::support;

fn new_execution(
    workflow_id: &str,
    owner: &str,
) -> meshflow_execution::store::entity::execution::Model {
    let now = Utc::now();
    NewExecution {
        id: meshflow_kit::id::new_id(),
        workflow_id: workflow_id.to_string(),
        workflow_version: 1,
        input: json!({}),
        variables: json!({}),
        request_id: None,
        deadline_at: None,
        now,
        lease: Some((owner.to_string(), now + chrono::Duration::seconds(60))),
    }
    .row()
}

async fn execution(store: &Store, workflow_id: &str, owner: &str) -> String {
    let inserted = store
        .insert_execution(
            new_execution(workflow_id, owner),
            10,
            Head {
                current_version: Some(1),
            },
        )
        .await
        .expect("insert");
    match inserted {
        Inserted::Created(row) => row.id,
        other => panic!("not created: {other:?}"),
    }
}

/// A store on a fresh database (PostgreSQL when the tests have one), with one workflow.
async fn fresh_store(
    name: &str,
) -> (
    sea_orm::DatabaseConnection,
    Store,
    meshflow_proto::workflow::v1::Workflow,
) {
    let url = meshflow_kit::testing::fresh_database_url()
        .await
        .expect("database");
    let db = meshflow_kit::db::connect_url(&url, SqliteSynchronous::Normal, 4)
        .await
        .expect("connect");
    let mut active = support::workflow(name);
    active.status = meshflow_proto::workflow::v1::WorkflowStatus::Active as i32;
    let workflow = meshflow_workflow::store::Store::new(db.clone())
        .create_workflow(&active, None)
        .await
        .expect("workflow");
    (db.clone(), Store::new(db), workflow)
}

fn commit(execution_id: &str, workflow_id: &str, owner: &str) -> Commit {
    let now = Utc::now();
    Commit {
        execution_id: execution_id.to_string(),
        workflow_id: workflow_id.to_string(),
        owner: owner.to_string(),
        patch: ExecutionPatch {
            status: Some(epb::ExecutionStatus::Running),
            variables: Some(json!({"seen": true})),
            start_time: Some(now),
            ..Default::default()
        },
        steps: vec![StepRow {
            id: meshflow_kit::id::new_id(),
            step_id: "fetch".into(),
            step_path: "fetch".into(),
            step_type: "STEP_TYPE_HTTP_REQUEST".into(),
            status: epb::StepStatus::Running,
            attempt: 1,
            input: None,
            output: None,
            error: None,
            logs: json!([]),
            start_time: Some(now),
            end_time: None,
            next_attempt_at: None,
        }],
        events: vec![epb::ExecutionEvent {
            execution_id: execution_id.to_string(),
            sequence: 1,
            r#type: epb::EventType::ExecutionStarted as i32,
            ..Default::default()
        }],
        consume_signal: None,
        metrics: vec![MetricsDelta {
            step_id: "fetch".into(),
            attempts: 1,
            completed: 1,
            ..Default::default()
        }],
    }
}

/// The metrics row of `step_id` in `workflow_id`, as stored now.
async fn metrics_row(
    store: &Store,
    workflow_id: &str,
    step_id: &str,
) -> meshflow_execution::store::entity::metrics::Model {
    store
        .metrics(workflow_id)
        .await
        .expect("metrics")
        .into_iter()
        .find(|m| m.step_id == step_id)
        .unwrap_or_else(|| panic!("no metrics row for {step_id}"))
}

/// The insert of an execution checks, in its own transaction, that the workflow is still what the
/// start read: ACTIVE, and at the version the start expects to be current. Otherwise nothing is
/// written.
#[tokio::test]
async fn an_insert_checks_the_workflow_head_in_its_own_transaction() {
    use sea_orm::{ConnectionTrait, EntityTrait, PaginatorTrait};
    let (db, store, workflow) = fresh_store("head").await;
    let id = &workflow.workflow_id;
    let insert = |head: Head| store.insert_execution(new_execution(id, "me"), 10, head);
    let stale = insert(Head {
        current_version: Some(2),
    })
    .await
    .expect("insert");
    assert!(matches!(stale, Inserted::Stale), "{stale:?}");
    let named = insert(Head {
        current_version: None,
    })
    .await
    .expect("insert");
    assert!(matches!(named, Inserted::Created(_)), "{named:?}");

    db.execute_unprepared("UPDATE workflows SET status = 'WORKFLOW_STATUS_INACTIVE'")
        .await
        .expect("deactivate");
    for current_version in [None, Some(1)] {
        let refused = insert(Head { current_version }).await.expect("insert");
        assert!(matches!(refused, Inserted::Stale), "{refused:?}");
    }
    let rows = meshflow_execution::store::entity::execution::Entity::find()
        .count(&db)
        .await
        .expect("count");
    assert_eq!(
        rows, 1,
        "only the start that matched the workflow wrote a row"
    );
}

/// A start reads its workflow's head, and a parking driver its pending signals, through the
/// store's point reads (on SQLite, a connection of their own): each sees what was committed just
/// before it, through any connection.
#[tokio::test]
async fn point_reads_see_every_commit_at_once() {
    use sea_orm::ConnectionTrait;
    let (db, store, workflow) = fresh_store("reads").await;
    let id = &workflow.workflow_id;
    let execution_id = execution(&store, id, "me").await;
    assert!(!store.has_pending_signal(&execution_id).await.expect("read"));
    store
        .add_signal(&execution_id, "go", json!(1), None, Utc::now())
        .await
        .expect("signal");
    assert!(store.has_pending_signal(&execution_id).await.expect("read"));
    let signal = store
        .pending_signal(&execution_id, "go")
        .await
        .expect("read")
        .expect("pending");
    let mut consume = commit(&execution_id, id, "me");
    consume.consume_signal = Some((signal.id, "wait".into()));
    store.commit(&mut [consume]).await.expect("commit");
    assert!(!store.has_pending_signal(&execution_id).await.expect("read"));

    use meshflow_proto::workflow::v1::WorkflowStatus;
    let head = |s: WorkflowStatus| Some((s, 1));
    assert_eq!(
        store.workflow_head(id).await.expect("head"),
        head(WorkflowStatus::Active)
    );
    db.execute_unprepared("UPDATE workflows SET status = 'WORKFLOW_STATUS_INACTIVE'")
        .await
        .expect("deactivate");
    assert_eq!(
        store.workflow_head(id).await.expect("head"),
        head(WorkflowStatus::Inactive)
    );
    assert_eq!(
        store
            .workflow_head(&meshflow_kit::id::new_id())
            .await
            .expect("head"),
        None
    );
}

#[tokio::test]
async fn a_commit_without_the_lease_writes_nothing_and_metrics_add_up_exactly() {
    let (_, store, workflow) = fresh_store("fenced").await;
    let taken = execution(&store, &workflow.workflow_id, "replica-a").await;
    let ours = execution(&store, &workflow.workflow_id, "replica-b").await;

    // replica-b writes to both: it holds only `ours`.
    let outcomes = store
        .commit(&mut [
            commit(&taken, &workflow.workflow_id, "replica-b"),
            commit(&ours, &workflow.workflow_id, "replica-b"),
        ])
        .await
        .expect("commit");
    assert_eq!(outcomes, [CommitOutcome::LeaseLost, CommitOutcome::Done]);

    let row = store.execution(&taken).await.expect("read").expect("row");
    assert_eq!(
        (row.status.as_str(), row.last_sequence, row.variables),
        ("EXECUTION_STATUS_PENDING", 0, json!({}))
    );
    assert!(
        store
            .events_after(&taken, 0, 10)
            .await
            .expect("events")
            .is_empty()
    );
    assert!(
        store
            .list_steps(&taken, None, None, 10)
            .await
            .expect("steps")
            .is_empty()
    );

    let row = store.execution(&ours).await.expect("read").expect("row");
    assert_eq!(
        (row.status.as_str(), row.last_sequence, row.variables),
        ("EXECUTION_STATUS_RUNNING", 1, json!({"seen": true}))
    );
    let events = store.events_after(&ours, 0, 10).await.expect("events");
    assert_eq!(events.len(), 1);
    let steps = store
        .list_steps(&ours, None, None, 10)
        .await
        .expect("steps");
    assert_eq!(
        steps.iter().map(|s| s.status.as_str()).collect::<Vec<_>>(),
        ["STEP_STATUS_RUNNING"]
    );
    // Only the fenced commit's increments count, written with it.
    let fetch = metrics_row(&store, &workflow.workflow_id, "fetch").await;
    assert_eq!((fetch.attempts, fetch.completed), (1, 1));

    // Increments add up.
    let mut again = commit(&ours, &workflow.workflow_id, "replica-b");
    again.events[0].sequence = 2;
    again.steps[0].attempt = 2;
    let outcomes = store.commit(&mut [again]).await.expect("commit");
    assert_eq!(outcomes, [CommitOutcome::Done]);
    let fetch = metrics_row(&store, &workflow.workflow_id, "fetch").await;
    assert_eq!((fetch.attempts, fetch.completed), (2, 2));

    // Several increments of one step in one commit, for a new row and an existing one.
    for (sequence, expected) in [(3, 1), (4, 2)] {
        let mut spread = commit(&ours, &workflow.workflow_id, "replica-b");
        spread.events[0].sequence = sequence;
        spread.steps.clear();
        spread.metrics = [3, 700, 4, 90_000]
            .into_iter()
            .map(|_| MetricsDelta {
                step_id: "spread".into(),
                completed: 1,
                ..Default::default()
            })
            .collect();
        let outcomes = store.commit(&mut [spread]).await.expect("commit");
        assert_eq!(outcomes, [CommitOutcome::Done]);
        let spread = metrics_row(&store, &workflow.workflow_id, "spread").await;
        assert_eq!(spread.completed, 4 * expected);
    }
}

/// A batch's metric increments count once each, and only those of executions whose lease held:
/// when each metric row has increments from one execution only, and when two executions add to the
/// same row. (PostgreSQL sums the first kind in the writer and the second in its statement.)
#[tokio::test]
async fn a_batch_counts_each_increment_once_and_only_those_whose_lease_held() {
    let (_, store, workflow) = fresh_store("batch-metrics").await;
    let w = &workflow.workflow_id;
    let first = execution(&store, w, "me").await;
    let second = execution(&store, w, "me").await;
    let elsewhere = execution(&store, w, "other").await;
    // `increments`: one per item.
    let with = |execution_id: &str, sequence: i64, step_id: &str, increments: &[i64]| {
        let mut c = commit(execution_id, w, "me");
        c.events[0].sequence = sequence;
        c.steps.clear();
        c.metrics = increments
            .iter()
            .map(|_| MetricsDelta {
                step_id: step_id.into(),
                attempts: 1,
                completed: 1,
                ..Default::default()
            })
            .collect();
        c
    };

    // Each row from one execution; the one whose lease another replica holds counts nothing.
    let outcomes = store
        .commit(&mut [
            with(&first, 1, "alone", &[3, 700]),
            with(&elsewhere, 1, "lost", &[3]),
            with(&first, 2, "alone", &[3]),
        ])
        .await
        .expect("commit");
    assert_eq!(
        outcomes,
        [
            CommitOutcome::Done,
            CommitOutcome::LeaseLost,
            CommitOutcome::Done
        ]
    );
    let alone = metrics_row(&store, w, "alone").await;
    assert_eq!((alone.attempts, alone.completed), (3, 3));
    assert!(
        store
            .metrics(w)
            .await
            .expect("metrics")
            .iter()
            .all(|m| m.step_id != "lost"),
        "no row for the fenced-out execution's increments"
    );

    // Two executions add to one row, a third (fenced out) to it as well.
    let outcomes = store
        .commit(&mut [
            with(&first, 3, "alone", &[3]),
            with(&second, 1, "alone", &[3, 90_000]),
            with(&elsewhere, 1, "alone", &[700]),
        ])
        .await
        .expect("commit");
    assert_eq!(
        outcomes,
        [
            CommitOutcome::Done,
            CommitOutcome::Done,
            CommitOutcome::LeaseLost
        ]
    );
    let alone = metrics_row(&store, w, "alone").await;
    assert_eq!((alone.attempts, alone.completed), (6, 6));
}

/// Metric rows changed by another connection (another replica or process, a deleted workflow)
/// between two commits: the second commit adds to what is stored, not to what its writer last
/// wrote, and creates a deleted row again.
#[tokio::test]
async fn a_commit_adds_to_metrics_another_connection_changed() {
    use sea_orm::ConnectionTrait;
    let (db, store, workflow) = fresh_store("metrics-shared").await;
    let ours = execution(&store, &workflow.workflow_id, "replica-a").await;
    // What another connection does before each commit, and the row after it.
    let steps = [
        (None, (1, 1)),
        (
            Some(
                "UPDATE orchestration_metrics SET completed = completed + 100, \
                 attempts = attempts + 100 WHERE step_id = 'fetch'",
            ),
            (102, 102),
        ),
        (
            Some("DELETE FROM orchestration_metrics WHERE step_id = 'fetch'"),
            (1, 1),
        ),
    ];
    for (sequence, (elsewhere, expected)) in (1..).zip(steps) {
        if let Some(sql) = elsewhere {
            db.execute_unprepared(sql).await.expect("elsewhere");
        }
        let mut c = commit(&ours, &workflow.workflow_id, "replica-a");
        c.events[0].sequence = sequence;
        c.steps[0].attempt = i32::try_from(sequence).expect("attempt");
        assert_eq!(
            store.commit(&mut [c]).await.expect("commit"),
            [CommitOutcome::Done]
        );
        let fetch = metrics_row(&store, &workflow.workflow_id, "fetch").await;
        assert_eq!(
            (fetch.completed, fetch.attempts),
            expected,
            "after {elsewhere:?}"
        );
    }
}

/// Reads every event after each sequence up to `last`, in pages of each size from 1 to 3 and
/// in one page, and checks that the pages join up into exactly the events after it: a page of
/// fewer events than asked for is the last.
async fn check_every_resumption(store: &Store, id: &str, all: &[epb::ExecutionEvent]) {
    let last = all.last().map_or(0, |e| e.sequence);
    for after in 0..=last {
        let expected: Vec<_> = all.iter().filter(|e| e.sequence > after).cloned().collect();
        for limit in [1, 2, 3, 100] {
            let mut read = Vec::new();
            let mut from = after;
            loop {
                let page = store.events_after(id, from, limit).await.expect("events");
                assert!(
                    page.len() as u64 <= limit,
                    "a page of {} for {limit}",
                    page.len()
                );
                let full = page.len() as u64 == limit;
                from = page.last().map_or(from, |e| e.sequence);
                read.extend(page);
                if !full {
                    break;
                }
            }
            assert_eq!(read, expected, "after {after}, pages of {limit}");
        }
    }
}

/// A group commit stores each execution's events in one row: its first event's sequence, type and
/// step path in the row's columns, and every event, in order, in its payload without the execution
/// and the time the row holds. Rows of single events, as they were stored before events were
/// grouped, read back alongside.
#[tokio::test]
async fn a_group_commit_stores_each_executions_events_in_one_row() {
    use sea_orm::{ConnectionTrait, Statement};

    let (db, store, workflow) = fresh_store("stored-events").await;
    let id = execution(&store, &workflow.workflow_id, "replica-a").await;
    let backend = db.get_database_backend();

    // A row of one event as stored before: a JSON object without its columns' fields.
    // In microseconds, as both backends store times.
    let earlier = chrono::SubsecRound::trunc_subsecs(Utc::now(), 6) - chrono::Duration::seconds(1);
    let sql = if backend == sea_orm::DatabaseBackend::Postgres {
        "INSERT INTO execution_events (execution_id, sequence, time, event_type, step_path, payload)
         VALUES ($1, 1, $2, 'EVENT_TYPE_EXECUTION_STARTED', NULL, $3)"
    } else {
        "INSERT INTO execution_events (execution_id, sequence, time, event_type, step_path, payload)
         VALUES (?, 1, ?, 'EVENT_TYPE_EXECUTION_STARTED', NULL, ?)"
    };
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        sql,
        [
            id.clone().into(),
            earlier.into(),
            json!({"executionStatus": "EXECUTION_STATUS_RUNNING"}).into(),
        ],
    ))
    .await
    .expect("single-event row");
    let started = epb::ExecutionEvent {
        execution_id: id.clone(),
        sequence: 1,
        r#type: epb::EventType::ExecutionStarted as i32,
        execution_status: epb::ExecutionStatus::Running as i32,
        time: Some(meshflow_kit::convert::timestamp(earlier)),
        ..Default::default()
    };
    let read = store.events_after(&id, 0, 10).await.expect("events");
    assert_eq!(read, std::slice::from_ref(&started));

    let event = |sequence: i64, r#type: epb::EventType, step_path: &str| epb::ExecutionEvent {
        execution_id: id.clone(),
        sequence,
        r#type: r#type as i32,
        step_id: "get".into(),
        step_path: step_path.into(),
        step_type: meshflow_proto::workflow::v1::StepType::HttpRequest as i32,
        attempt: 2,
        step_status: epb::StepStatus::Succeeded as i32,
        execution_status: epb::ExecutionStatus::Running as i32,
        output: Some(meshflow_kit::convert::from_json(
            &json!({"status": 200, "body": {"price": 1.5, "tags": ["a"]}}),
        )),
        ..Default::default()
    };
    // Two commits of the execution in one batch, then one in a batch of its own.
    let mut first = commit(&id, &workflow.workflow_id, "replica-a");
    first.events = vec![
        event(2, epb::EventType::StepSucceeded, "each[2].get"),
        event(3, epb::EventType::StepStarted, ""),
        event(4, epb::EventType::Log, "each[3].get"),
    ];
    let mut second = commit(&id, &workflow.workflow_id, "replica-a");
    second.events = vec![
        event(5, epb::EventType::StepSucceeded, "each[3].get"),
        event(6, epb::EventType::StepStarted, "each[4].get"),
    ];
    let mut batch = [first, second];
    let outcomes = store.commit(&mut batch).await.expect("commit");
    assert_eq!(outcomes, [CommitOutcome::Done, CommitOutcome::Done]);
    let mut third = [commit(&id, &workflow.workflow_id, "replica-a")];
    third[0].events = vec![event(7, epb::EventType::StepSucceeded, "each[4].get")];
    store.commit(&mut third).await.expect("commit");
    // Each commit stamped its time on the events it was given, and left the rest as it was.
    let mut all = vec![started];
    all.extend(batch.iter().chain(&third).flat_map(|c| c.events.clone()));
    assert!(all.iter().all(|e| e.time.is_some() && e.execution_id == id));
    assert_eq!(all[1].time, all[5].time);

    let rows = db
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT sequence, event_type, step_path, CAST(payload AS TEXT)
             FROM execution_events ORDER BY sequence",
        ))
        .await
        .expect("rows");
    let rows: Vec<(i64, String, Option<String>, serde_json::Value)> = rows
        .iter()
        .map(|r| {
            let text: String = r.try_get_by_index(3).expect("payload");
            (
                r.try_get_by_index(0).expect("sequence"),
                r.try_get_by_index(1).expect("type"),
                r.try_get_by_index(2).expect("path"),
                serde_json::from_str(&text).expect("json"),
            )
        })
        .collect();
    let columns: Vec<_> = rows
        .iter()
        .map(|(sequence, ty, path, _)| (*sequence, ty.as_str(), path.as_deref()))
        .collect();
    assert_eq!(
        columns,
        [
            (1, "EVENT_TYPE_EXECUTION_STARTED", None),
            (2, "EVENT_TYPE_STEP_SUCCEEDED", Some("each[2].get")),
            (7, "EVENT_TYPE_STEP_SUCCEEDED", Some("each[4].get")),
        ]
    );
    let grouped = rows[1].3.as_array().expect("an array of events");
    assert_eq!(grouped.len(), 5);
    for (stored, sequence) in grouped.iter().zip(2..) {
        for column in ["executionId", "time"] {
            assert!(stored.get(column).is_none(), "{column} in {stored}");
        }
        assert_eq!(stored["sequence"], json!(sequence.to_string()));
        assert_eq!(stored["output"]["body"]["tags"], json!(["a"]));
    }
    assert_eq!(grouped[1].get("stepPath"), None);
    assert_eq!(grouped[2]["stepPath"], json!("each[3].get"));

    check_every_resumption(&store, &id, &all).await;
}

/// Event rows of more executions than one statement writes (SQLite writes eight rows to a
/// statement) are all written, each with its own events.
#[tokio::test]
async fn a_group_commit_writes_event_rows_of_many_executions() {
    let (_, store, workflow) = fresh_store("event-rows").await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(execution(&store, &workflow.workflow_id, "replica-a").await);
    }
    let mut batch: Vec<Commit> = ids
        .iter()
        .map(|id| {
            let mut c = commit(id, &workflow.workflow_id, "replica-a");
            c.events = (1..=3)
                .map(|sequence| epb::ExecutionEvent {
                    execution_id: id.clone(),
                    sequence,
                    r#type: epb::EventType::Log as i32,
                    message: format!("{id} {sequence}"),
                    ..Default::default()
                })
                .collect();
            c
        })
        .collect();
    let outcomes = store.commit(&mut batch).await.expect("commit");
    assert!(outcomes.iter().all(|o| *o == CommitOutcome::Done));
    for c in &batch {
        let read = store
            .events_after(&c.execution_id, 0, 10)
            .await
            .expect("events");
        assert_eq!(read, c.events);
        check_every_resumption(&store, &c.execution_id, &c.events).await;
    }
}

/// A batch's events and attempt rows are written however many there are, each event with its own
/// step path (or none); a later row of an attempt
/// in the same batch updates the earlier one; nothing of an execution whose lease is lost is
/// written.
#[tokio::test]
async fn every_row_of_a_large_batch_is_written_once() {
    let (_, store, workflow) = fresh_store("many-events").await;
    let a = execution(&store, &workflow.workflow_id, "replica-a").await;
    let b = execution(&store, &workflow.workflow_id, "replica-a").await;
    let lost = execution(&store, &workflow.workflow_id, "replica-b").await;
    let events = |id: &str, n: i64| -> Vec<epb::ExecutionEvent> {
        (1..=n)
            .map(|sequence| epb::ExecutionEvent {
                execution_id: id.to_string(),
                sequence,
                r#type: epb::EventType::Log as i32,
                step_path: if sequence % 2 == 0 {
                    format!("each[{sequence}].get")
                } else {
                    String::new()
                },
                message: format!("event {sequence}"),
                ..Default::default()
            })
            .collect()
    };
    let mut batch = [
        commit(&a, &workflow.workflow_id, "replica-a"),
        commit(&lost, &workflow.workflow_id, "replica-a"),
        commit(&b, &workflow.workflow_id, "replica-a"),
        commit(&a, &workflow.workflow_id, "replica-a"),
    ];
    batch[0].events = events(&a, 13);
    batch[1].events = events(&lost, 5);
    batch[2].events = events(&b, 9);
    batch[3].events.clear();
    // Eleven attempts of `a`, then the end of the fourth in a later commit of the same batch.
    let template = batch[0].steps[0].clone();
    batch[0].steps = (1..=11)
        .map(|i| StepRow {
            id: meshflow_kit::id::new_id(),
            step_path: format!("each[{i}].get"),
            ..template.clone()
        })
        .collect();
    let mut ended = batch[0].steps[3].clone();
    ended.status = epb::StepStatus::Succeeded;
    ended.output = Some(json!({"n": 4}));
    ended.end_time = Some(Utc::now());
    batch[3].steps = vec![ended.clone()];
    let outcomes = store.commit(&mut batch).await.expect("commit");
    assert_eq!(
        outcomes,
        [
            CommitOutcome::Done,
            CommitOutcome::LeaseLost,
            CommitOutcome::Done,
            CommitOutcome::Done
        ]
    );
    let steps = store.list_steps(&a, None, None, 100).await.expect("steps");
    assert_eq!(steps.len(), 11);
    let running = steps
        .iter()
        .filter(|s| s.status == "STEP_STATUS_RUNNING")
        .count();
    assert_eq!(running, 10);
    let fourth = steps.iter().find(|s| s.id == ended.id).expect("fourth");
    assert_eq!(
        (fourth.status.as_str(), fourth.output.clone()),
        ("STEP_STATUS_SUCCEEDED", Some(json!({"n": 4})))
    );
    assert!(
        store
            .list_steps(&lost, None, None, 100)
            .await
            .expect("steps")
            .is_empty()
    );
    for (id, n) in [(&a, 13), (&b, 9)] {
        let read = store.events_after(id, 0, 100).await.expect("events");
        let expected: Vec<(i64, String, String)> = (1..=n)
            .map(|s| {
                let path = if s % 2 == 0 {
                    format!("each[{s}].get")
                } else {
                    String::new()
                };
                (s, path, format!("event {s}"))
            })
            .collect();
        assert_eq!(
            read.iter()
                .map(|e| (e.sequence, e.step_path.clone(), e.message.clone()))
                .collect::<Vec<_>>(),
            expected
        );
        assert!(
            read.iter()
                .all(|e| e.time.is_some() && e.time == read[0].time)
        );
    }
    assert!(
        store
            .events_after(&lost, 0, 100)
            .await
            .expect("events")
            .is_empty()
    );
}

/// On PostgreSQL every pooled connection (the writer's too) plans a statement once and keeps the
/// plan. One made while the executions table is empty must still find rows by key, not by reading
/// the table: kept as the table grows, a sequential scan would read every execution at every commit.
#[tokio::test]
async fn a_postgres_plan_made_on_an_empty_table_still_finds_executions_by_key() {
    use sea_orm::{ConnectionTrait, Statement, TransactionTrait};

    let url = meshflow_kit::testing::fresh_database_url()
        .await
        .expect("database");
    if !url.starts_with("postgres") {
        return;
    }
    let db = meshflow_kit::db::connect_url(&url, SqliteSynchronous::Normal, 4)
        .await
        .expect("connect");
    // One connection for the session-level statements below.
    let txn = db.begin().await.expect("begin");
    let backend = txn.get_database_backend();
    let run = |sql: &str| Statement::from_string(backend, sql.to_string());
    // The kept plan of the writer's fence shape: executions joined by id to the batch's arrays.
    let plan = |txn| async move {
        let prepare = "PREPARE fence(text[], text[]) AS UPDATE workflow_executions AS e \
             SET update_time = now() FROM UNNEST($1::text[], $2::text[]) AS v(id, owner) \
             WHERE e.id = v.id AND e.lease_owner = v.owner RETURNING e.id";
        ConnectionTrait::execute_raw(txn, run(prepare))
            .await
            .expect("prepare");
        let rows = ConnectionTrait::query_all_raw(txn, run("EXPLAIN EXECUTE fence(NULL, NULL)"))
            .await
            .expect("explain");
        ConnectionTrait::execute_raw(txn, run("DEALLOCATE fence"))
            .await
            .expect("deallocate");
        rows.iter()
            .map(|r| r.try_get_by_index::<String>(0).expect("line"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let ours = plan(&txn).await;
    assert!(
        ours.contains("workflow_executions_pkey") && !ours.contains("Seq Scan"),
        "{ours}"
    );
    // What the setting prevents: the same generic plan with sequential scans allowed reads the table.
    txn.execute_raw(run("SET LOCAL enable_seqscan = on"))
        .await
        .expect("set");
    let default = plan(&txn).await;
    assert!(
        default.contains("Seq Scan on workflow_executions"),
        "{default}"
    );
    txn.rollback().await.expect("rollback");
}

/// On PostgreSQL: a fresh store with two executions leased to `me`, the lower id first.
async fn two_leased(name: &str) -> (sea_orm::DatabaseConnection, Store, String, String, String) {
    let (db, store, workflow) = fresh_store(name).await;
    let lower = execution(&store, &workflow.workflow_id, "me").await;
    let higher = execution(&store, &workflow.workflow_id, "me").await;
    assert!(lower < higher);
    (db, store, workflow.workflow_id, lower, higher)
}

/// Locks an execution's row for the rest of the transaction.
fn for_update(id: &str) -> sea_orm::Statement {
    sea_orm::Statement::from_sql_and_values(
        sea_orm::DbBackend::Postgres,
        "SELECT id FROM workflow_executions WHERE id = $1 FOR UPDATE",
        [id.into()],
    )
}

/// A group commit of `me`'s commits to `ids`, in that order, running meanwhile.
fn commit_meanwhile(
    store: &Store,
    workflow_id: &str,
    ids: [&str; 2],
) -> tokio::task::JoinHandle<Result<Vec<CommitOutcome>, meshflow_execution::store::StoreError>> {
    let store = store.clone();
    let mut batch = ids.map(|id| commit(id, workflow_id, "me"));
    tokio::spawn(async move { store.commit(&mut batch).await })
}

/// Returns once a session of the database waits for a row lock.
async fn lock_waited(db: &sea_orm::DatabaseConnection) {
    use sea_orm::ConnectionTrait;
    loop {
        let row = db
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT COUNT(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            ))
            .await
            .expect("activity")
            .expect("row");
        if row.try_get_by_index::<i64>(0).expect("count") > 0 {
            return;
        }
        tokio::task::yield_now().await;
    }
}

/// A transaction that holds `id` locked and, in a deadlock, is the one cancelled (it checks for
/// deadlocks long before anything else does).
async fn holding(db: &sea_orm::DatabaseConnection, id: &str) -> sea_orm::DatabaseTransaction {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let txn = db.begin().await.expect("begin");
    txn.execute_unprepared("SET LOCAL deadlock_timeout = '10ms'")
        .await
        .expect("timeout");
    txn.query_one_raw(for_update(id)).await.expect("lock");
    txn
}

/// On PostgreSQL, the group commit and lease renewals lock executions in id order. Another
/// transaction holding the lower id makes them wait without their holding the higher one, which it
/// can then lock too; in any other order the two would deadlock (and that transaction would be
/// the one cancelled).
#[tokio::test]
async fn postgres_only_commits_and_renewals_lock_executions_in_id_order() {
    use sea_orm::ConnectionTrait;
    meshflow_kit::testing::require_postgres();
    let (db, store, workflow_id, lower, higher) = two_leased("ordered").await;

    // A commit listing the higher id first.
    let other = holding(&db, &lower).await;
    let batch = commit_meanwhile(&store, &workflow_id, [&higher, &lower]);
    lock_waited(&db).await;
    other
        .query_one_raw(for_update(&higher))
        .await
        .expect("the commit does not hold the higher id");
    other.commit().await.expect("commit");
    let outcomes = batch.await.expect("task").expect("commit");
    assert_eq!(outcomes, [CommitOutcome::Done, CommitOutcome::Done]);

    // A renewal listing the higher id first.
    let other = holding(&db, &lower).await;
    let renewal = {
        let store = store.clone();
        let ids = vec![higher.clone(), lower.clone()];
        tokio::spawn(async move {
            store
                .renew("me", &ids, Utc::now() + chrono::Duration::seconds(60))
                .await
        })
    };
    lock_waited(&db).await;
    other
        .query_one_raw(for_update(&higher))
        .await
        .expect("the renewal does not hold the higher id");
    other.commit().await.expect("commit");
    assert_eq!(renewal.await.expect("task").expect("renew"), 2);
}

/// On PostgreSQL, a group commit that PostgreSQL cancels to break a deadlock (with a transaction
/// that locks executions in another order) runs again and lands.
#[tokio::test]
async fn postgres_only_a_commit_chosen_as_a_deadlock_victim_runs_again() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    meshflow_kit::testing::require_postgres();
    let (db, store, workflow_id, lower, higher) = two_leased("victim").await;

    // This transaction checks for deadlocks after the commit does, so the commit is the victim.
    let other = db.begin().await.expect("begin");
    other
        .execute_unprepared("SET LOCAL deadlock_timeout = '60s'")
        .await
        .expect("timeout");
    other
        .query_one_raw(for_update(&higher))
        .await
        .expect("lock higher");
    let batch = commit_meanwhile(&store, &workflow_id, [&lower, &higher]);
    // The commit holds the lower id and waits for the higher: taking the lower closes a cycle.
    lock_waited(&db).await;
    other
        .query_one_raw(for_update(&lower))
        .await
        .expect("the commit gave way");
    other.commit().await.expect("commit");
    let outcomes = batch.await.expect("task").expect("the commit ran again");
    assert_eq!(outcomes, [CommitOutcome::Done, CommitOutcome::Done]);
    let row = store.execution(&lower).await.expect("read").expect("row");
    assert_eq!(row.last_sequence, 1);
}

/// On PostgreSQL, the writer keeps one connection of its own between commits (no pool pinging it
/// before and after each). When the server ends that connection, the commit that finds it gone
/// fails and writes nothing, and the next one opens a new connection and lands.
#[tokio::test]
async fn postgres_only_a_writer_whose_connection_the_server_ended_connects_again() {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    meshflow_kit::testing::require_postgres();
    let (db, store, workflow_id, lower, higher) = two_leased("reconnect").await;
    let mut first = [commit(&lower, &workflow_id, "me")];
    assert_eq!(
        store.commit(&mut first).await.expect("first commit"),
        [CommitOutcome::Done]
    );

    // The writer's session is the one whose last statement was a group commit.
    let ended = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE 'WITH fenced AS%'",
        ))
        .await
        .expect("terminate")
        .and_then(|row| row.try_get_by_index::<i64>(0).ok());
    assert_eq!(ended, Some(1), "one writer session");

    let mut lost = [commit(&higher, &workflow_id, "me")];
    store
        .commit(&mut lost)
        .await
        .expect_err("the ended connection fails its commit");
    let row = store.execution(&higher).await.expect("read").expect("row");
    assert_eq!(
        row.last_sequence, 0,
        "nothing of the failed commit was written"
    );

    let mut again = [commit(&higher, &workflow_id, "me")];
    assert_eq!(
        store
            .commit(&mut again)
            .await
            .expect("commit on a new connection"),
        [CommitOutcome::Done]
    );
    let row = store.execution(&higher).await.expect("read").expect("row");
    assert_eq!(row.last_sequence, 1);
}

/// A start counts the executions that are not terminal from each workflow's own metrics row,
/// through a partial index of those rows: not by reading the row of every step of every workflow.
#[tokio::test]
async fn a_start_counts_active_executions_from_workflow_rows_only() {
    use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};

    let (db, _store, _workflow) = fresh_store("admission-plan").await;
    let backend = db.get_database_backend();
    let sql = meshflow_execution::store::active_statement(backend);
    let txn = db.begin().await.expect("begin");
    let run = |sql: String| Statement::from_string(backend, sql);
    // Run it first: a SQLite connection explains with the schema it last read, which may predate
    // the migrations if the pool opened it before they ran.
    let count = txn
        .query_one_raw(run(sql.to_string()))
        .await
        .expect("count")
        .expect("row")
        .try_get_by_index::<i64>(0)
        .expect("value");
    assert_eq!(count, 0);
    let plan: Vec<String> = if backend == DbBackend::Postgres {
        // The table is tiny here: forbid what a large one would never choose.
        txn.execute_raw(run("SET LOCAL enable_seqscan = off".into()))
            .await
            .expect("set");
        txn.query_all_raw(run(format!("EXPLAIN {sql}")))
            .await
            .expect("explain")
            .iter()
            .map(|r| r.try_get_by_index::<String>(0).expect("line"))
            .collect()
    } else {
        txn.query_all_raw(run(format!("EXPLAIN QUERY PLAN {sql}")))
            .await
            .expect("explain")
            .iter()
            .map(|r| r.try_get_by_index::<String>(3).expect("detail"))
            .collect()
    };
    txn.rollback().await.expect("rollback");
    // PostgreSQL names the table on a line of its own ("Bitmap Heap Scan on ...").
    assert!(
        plan.iter()
            .any(|l| l.contains("idx_orchestration_metrics_workflow_rows"))
            && !plan
                .iter()
                .any(|l| l.contains("Seq Scan")
                    || l.trim_end().ends_with("SCAN orchestration_metrics")),
        "{plan:#?}"
    );
}

/// On SQLite a pooled connection that holds the write lock needs the runtime to take its results
/// before it can finish and release the lock. A start that finds the lock taken waits without
/// holding the runtime's thread: on this single-threaded runtime, waiting inside SQLite's busy
/// handler instead left the pooled transaction unable to commit until the start gave up.
#[tokio::test]
async fn a_start_waits_for_a_pooled_write_without_holding_the_runtime_thread() {
    use sea_orm::{ConnectionTrait, DbBackend, TransactionTrait};
    let (db, store, workflow) = fresh_store("busy").await;
    if db.get_database_backend() != DbBackend::Sqlite {
        return;
    }
    // A write, even of no row, takes the write lock until the transaction ends.
    let txn = db.begin().await.expect("begin");
    txn.execute_unprepared("UPDATE workflows SET revision = revision WHERE id = ''")
        .await
        .expect("write");
    let row = new_execution(&workflow.workflow_id, "me");
    let start = tokio::spawn(async move {
        store
            .insert_execution(
                row,
                10,
                Head {
                    current_version: None,
                },
            )
            .await
    });
    // The start runs now, finds the lock taken, and must let this task go on.
    tokio::task::yield_now().await;
    txn.commit().await.expect("commit");
    let inserted = start.await.expect("task").expect("insert");
    assert!(matches!(inserted, Inserted::Created(_)), "{inserted:?}");
}
