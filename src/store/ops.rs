//! What operators see of the store at a glance: counts and ages for `/metrics`.

use super::{Store, StoreError};

/// A snapshot of the store for gauges.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OpsSnapshot {
    /// Cases per state (stored spelling).
    pub cases_by_state: Vec<(String, i64)>,
    /// Outbox rows not yet published.
    pub outbox_backlog: i64,
    /// Age of the oldest unpublished outbox row, in seconds (0 when none).
    pub outbox_oldest_seconds: f64,
    /// Age of the oldest hold still being worked, in seconds (0 when none).
    pub oldest_open_hold_seconds: f64,
    /// Dead letters not archived, per code.
    pub dead_letters_by_code: Vec<(String, i64)>,
    /// Age of the oldest dead letter nobody handled (not archived,
    /// claimed or replayed since it was last seen), in seconds (0 when none).
    pub oldest_unhandled_dead_letter_seconds: f64,
    /// The largest groups of dead letters not archived: group key, code, count.
    pub dead_letter_groups: Vec<(String, String, i64)>,
    /// Rows per table, estimated ([`Store::table_row_estimates`]).
    pub table_rows: Vec<(String, i64)>,
    /// When the pruner last finished a pass without an error.
    pub last_prune_pass: Option<chrono::DateTime<chrono::Utc>>,
}

/// How many dead-letter groups `/metrics` reports one by one.
pub const DEAD_LETTER_GROUPS_REPORTED: i64 = 20;

impl Store {
    /// Counts and ages for the gauges of `/metrics`.
    pub async fn ops_snapshot(&self) -> Result<OpsSnapshot, StoreError> {
        let cases_by_state: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM cases GROUP BY state ORDER BY state")
                .fetch_all(self.pool())
                .await?;
        let (outbox_backlog, outbox_oldest_seconds): (i64, f64) = sqlx::query_as(
            "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at))::float8, 0)
             FROM outbox WHERE sent_at IS NULL",
        )
        .fetch_one(self.pool())
        .await?;
        let oldest_open_hold_seconds: f64 = sqlx::query_scalar(concat!(
            "SELECT coalesce(extract(epoch FROM now() - min(held_at))::float8, 0)
             FROM cases WHERE ",
            open_case!()
        ))
        .fetch_one(self.pool())
        .await?;
        let (dead_letters_by_code, oldest_unhandled_dead_letter_seconds) =
            self.dead_letter_gauges().await?;
        let dead_letter_groups = self
            .largest_dead_letter_groups(DEAD_LETTER_GROUPS_REPORTED)
            .await?;
        let table_rows = self.table_row_estimates().await?;
        let last_prune_pass = self.last_prune_pass().await?;
        Ok(OpsSnapshot {
            cases_by_state,
            outbox_backlog,
            outbox_oldest_seconds,
            oldest_open_hold_seconds,
            dead_letters_by_code,
            oldest_unhandled_dead_letter_seconds,
            dead_letter_groups,
            table_rows,
            last_prune_pass,
        })
    }
}
