//! Stored rows as API messages.

use meshflow_kit::convert::{duration, from_json, struct_from_json, timestamp};
use meshflow_proto::execution::v1 as pb;
use meshflow_proto::workflow::v1::StepType;
use serde_json::Value;

use crate::store::entity::{execution, step};

fn error(v: &Value) -> pb::ExecutionError {
    pb::ExecutionError {
        code: v["code"].as_str().unwrap_or_default().to_string(),
        message: v["message"].as_str().unwrap_or_default().to_string(),
        step_path: v["stepPath"].as_str().unwrap_or_default().to_string(),
        details: v.get("details").map(from_json),
    }
}

/// An execution row as the API's Execution.
pub fn execution(row: &execution::Model) -> pb::Execution {
    let status = pb::ExecutionStatus::from_str_name(&row.status).unwrap_or_default();
    pb::Execution {
        execution_id: row.id.clone(),
        workflow_id: row.workflow_id.clone(),
        workflow_version: row.workflow_version,
        status: status as i32,
        input: Some(from_json(&row.input)),
        variables: Some(struct_from_json(&row.variables)),
        output: row.output.as_ref().map(from_json),
        error: row.error.as_ref().map(error),
        request_id: row.request_id.clone().unwrap_or_default(),
        last_sequence: row.last_sequence,
        create_time: Some(timestamp(row.create_time)),
        start_time: row.start_time.map(timestamp),
        end_time: row.end_time.map(timestamp),
        duration: match (row.start_time, row.end_time) {
            (Some(s), Some(e)) => (e - s).to_std().ok().map(duration),
            _ => None,
        },
    }
}

/// A step attempt row as the API's StepExecution.
pub fn step(row: &step::Model) -> pb::StepExecution {
    let logs = row
        .logs
        .as_array()
        .map(|lines| {
            lines
                .iter()
                .map(|l| pb::LogEntry {
                    time: l["time"]
                        .as_str()
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                        .map(|t| timestamp(t.with_timezone(&chrono::Utc))),
                    level: l["level"].as_str().unwrap_or_default().to_string(),
                    message: l["message"].as_str().unwrap_or_default().to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    pb::StepExecution {
        step_execution_id: row.id.clone(),
        execution_id: row.execution_id.clone(),
        step_id: row.step_id.clone(),
        step_path: row.step_path.clone(),
        step_type: StepType::from_str_name(&row.step_type).unwrap_or_default() as i32,
        status: pb::StepStatus::from_str_name(&row.status).unwrap_or_default() as i32,
        attempt: row.attempt.max(0) as u32,
        input: row.input.as_ref().map(from_json),
        output: row.output.as_ref().map(from_json),
        error: row.error.as_ref().map(error),
        start_time: row.start_time.map(timestamp),
        end_time: row.end_time.map(timestamp),
        duration: row
            .duration_ms
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| duration(std::time::Duration::from_millis(ms))),
        next_attempt_time: row.next_attempt_at.map(timestamp),
        logs,
    }
}
