//! Prometheus metrics: the `metrics` facade everywhere, one exporter here.
//!
//! Counters and histograms are recorded where things happen (intake, engine,
//! relay, commerce client). Gauges that describe the store (cases by state,
//! outbox backlog and age, oldest open hold) are read from PostgreSQL when
//! `/metrics` is scraped, so every replica reports the same truth.

use std::collections::BTreeSet;
use std::sync::{Mutex, OnceLock, PoisonError};

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::domain::CaseState;
use crate::store::Store;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns its handle.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let latency = [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)?
        .set_buckets_for_metric(
            Matcher::Full("holdclear_intake_batch_size".into()),
            &[1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full("holdclear_engine_commit_batch_size".into()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
        )?
        .install_recorder()
        .or_else(|e| HANDLE.get().cloned().ok_or(e))?;
    let handle = HANDLE.get_or_init(|| handle).clone();
    describe();
    Ok(handle)
}

fn describe() {
    describe_counter!(
        "holdclear_events_consumed_total",
        "Held-order deliveries taken from the queue, by outcome."
    );
    describe_counter!(
        "holdclear_dead_letters_total",
        "Messages sent to the dead-letter queue, by error code."
    );
    describe_histogram!(
        "holdclear_intake_batch_size",
        "Deliveries written per intake transaction."
    );
    describe_histogram!(
        "holdclear_engine_commit_batch_size",
        "Case steps written per engine commit statement."
    );
    describe_counter!(
        "holdclear_commerce_calls_total",
        "Calls to the commerce API, by endpoint and outcome."
    );
    describe_histogram!(
        "holdclear_commerce_call_seconds",
        Unit::Seconds,
        "Latency of commerce API calls, by endpoint."
    );
    describe_counter!(
        "holdclear_retries_total",
        "Transient failures that rescheduled a case, by state."
    );
    describe_counter!(
        "holdclear_escalations_total",
        "Escalation events emitted, by reason and level."
    );
    describe_counter!(
        "holdclear_cases_stepped_total",
        "Case steps committed, by state and outcome."
    );
    describe_counter!(
        "holdclear_rule_decisions_total",
        "Cases a rule decided, by rule name (`holdclear rules stats` for a window)."
    );
    describe_counter!(
        "holdclear_hand_fixes_total",
        "Escalated orders whose hold a person released by hand (seen by the escalated watch)."
    );
    describe_counter!(
        "holdclear_events_published_total",
        "Events confirmed by the broker, by routing key."
    );
    describe_counter!(
        "holdclear_outbox_publish_failures_total",
        "Outbox publishes that were nacked, returned or lost."
    );
    describe_gauge!(
        "holdclear_events_unrouted",
        "Events no queue was bound for, kept in the events exchange's unrouted queue."
    );
    describe_gauge!("holdclear_cases", "Cases in the store, by state.");
    describe_gauge!(
        "holdclear_outbox_backlog",
        "Events written but not yet published."
    );
    describe_gauge!(
        "holdclear_outbox_oldest_unsent_seconds",
        Unit::Seconds,
        "Age of the oldest unpublished event."
    );
    describe_gauge!(
        "holdclear_oldest_open_hold_seconds",
        Unit::Seconds,
        "Age of the oldest hold still being worked."
    );
    describe_gauge!(
        "holdclear_dead_letters",
        "Dead letters kept in PostgreSQL and not archived, by code."
    );
    describe_gauge!(
        "holdclear_dead_letter_group",
        "Dead letters not archived in each of the 20 largest groups (code, group key); a group that left them reads 0."
    );
    describe_gauge!(
        "holdclear_dead_letter_oldest_unhandled_seconds",
        Unit::Seconds,
        "Age of the oldest dead letter nobody archived, claimed or replayed."
    );
    describe_counter!(
        "holdclear_dead_letters_ingested_total",
        "Messages of the dead-letter queue stored (new or seen again), by code."
    );
    describe_counter!(
        "holdclear_prune_deleted_total",
        "Rows the pruner deleted past their retention, by table (rows that went with them not counted)."
    );
    describe_gauge!(
        "holdclear_prune_last_success_timestamp_seconds",
        Unit::Seconds,
        "When a pruning pass (any worker's) last finished without an error, as a Unix time."
    );
    describe_gauge!(
        "holdclear_table_rows",
        "Rows per table, as PostgreSQL estimates them (pg_class.reltuples)."
    );
    describe_gauge!(
        "holdclear_ready",
        "1 when the database and the broker are reachable."
    );
}

/// Sets the per-group gauge for `groups`, and 0 for every group reported
/// before that is no longer among them (a gauge keeps its last value).
fn report_groups(groups: &[(String, String, i64)]) {
    static REPORTED: Mutex<BTreeSet<(String, String)>> = Mutex::new(BTreeSet::new());
    let mut reported = REPORTED.lock().unwrap_or_else(PoisonError::into_inner);
    let now: BTreeSet<(String, String)> = groups
        .iter()
        .map(|(group, code, _)| (group.clone(), code.clone()))
        .collect();
    for (group, code) in reported.difference(&now) {
        gauge!("holdclear_dead_letter_group", "code" => code.clone(), "group" => group.clone())
            .set(0.0);
    }
    for (group, code, n) in groups {
        gauge!("holdclear_dead_letter_group", "code" => code.clone(), "group" => group.clone())
            .set(*n as f64);
    }
    reported.extend(now);
}

/// Refreshes the store gauges, then renders the Prometheus text.
pub async fn render(handle: &PrometheusHandle, store: &Store) -> String {
    match store.ops_snapshot().await {
        Ok(s) => {
            for state in CaseState::ALL {
                let n = s
                    .cases_by_state
                    .iter()
                    .find(|(name, _)| name == state.as_str())
                    .map_or(0, |(_, n)| *n);
                gauge!("holdclear_cases", "state" => state.as_str()).set(n as f64);
            }
            gauge!("holdclear_outbox_backlog").set(s.outbox_backlog as f64);
            gauge!("holdclear_outbox_oldest_unsent_seconds").set(s.outbox_oldest_seconds);
            gauge!("holdclear_oldest_open_hold_seconds").set(s.oldest_open_hold_seconds);
            for (code, n) in &s.dead_letters_by_code {
                gauge!("holdclear_dead_letters", "code" => code.clone()).set(*n as f64);
            }
            gauge!("holdclear_dead_letter_oldest_unhandled_seconds")
                .set(s.oldest_unhandled_dead_letter_seconds);
            report_groups(&s.dead_letter_groups);
            for (table, n) in &s.table_rows {
                gauge!("holdclear_table_rows", "table" => table.clone()).set(*n as f64);
            }
            if let Some(at) = s.last_prune_pass {
                gauge!("holdclear_prune_last_success_timestamp_seconds")
                    .set(at.timestamp_millis() as f64 / 1000.0);
            }
        }
        Err(e) => tracing::warn!(error = %e, "Cannot read the store for /metrics."),
    }
    handle.render()
}
