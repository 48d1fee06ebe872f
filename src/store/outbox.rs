//! The outbox: events written with their state change, taken by the relay
//! under a row lock, marked sent once the broker confirmed them.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::{Store, StoreError};

/// One unsent event.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRow {
    /// Position: events are published in this order.
    pub id: i64,
    /// The CloudEvents id (AMQP `message_id`).
    pub envelope_id: Uuid,
    /// The case that emitted it.
    pub case_id: Uuid,
    /// Routing key on the events exchange.
    pub routing_key: String,
    /// The CloudEvents envelope, published as the message body.
    pub body: Value,
    /// When it was written.
    pub created_at: DateTime<Utc>,
    /// Failed publishing attempts so far.
    pub attempts: i32,
    /// When it was confirmed by the broker.
    pub sent_at: Option<DateTime<Utc>>,
    /// The last publishing failure.
    pub last_error: Option<String>,
}

/// A row that could not be published this time.
#[derive(Clone, Debug)]
pub struct OutboxFailure {
    /// The id of the row that was not published.
    pub id: i64,
    /// Why, one line.
    pub error: String,
    /// When to try it again.
    pub retry_in: Duration,
}

/// Unsent rows locked by one relay until [`OutboxBatch::settle`]; other
/// relays skip them.
#[derive(Debug)]
pub struct OutboxBatch {
    tx: Transaction<'static, Postgres>,
    rows: Vec<OutboxRow>,
}

fn outbox_row(row: &PgRow) -> Result<OutboxRow, StoreError> {
    Ok(OutboxRow {
        id: row.try_get("id")?,
        envelope_id: row.try_get("envelope_id")?,
        case_id: row.try_get("case_id")?,
        routing_key: row.try_get("routing_key")?,
        body: row.try_get("body")?,
        created_at: row.try_get("created_at")?,
        attempts: row.try_get("attempts")?,
        sent_at: row.try_get("sent_at")?,
        last_error: row.try_get("last_error")?,
    })
}

/// Up to `$1` unsent rows that are due, oldest first, locked, skipping rows
/// another relay holds.
pub(super) const OUTBOX_TAKE: &str = "SELECT id, envelope_id, case_id, routing_key, body, \
         created_at, attempts, sent_at, last_error \
     FROM outbox WHERE sent_at IS NULL AND next_attempt_at <= now() \
     ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED";

/// When the next unsent row is due.
pub(super) const OUTBOX_NEXT_DUE: &str =
    "SELECT min(next_attempt_at) FROM outbox WHERE sent_at IS NULL";

impl OutboxBatch {
    /// The rows, in id order.
    pub fn rows(&self) -> &[OutboxRow] {
        &self.rows
    }

    /// Marks `sent` rows sent and records `failed` ones (attempts + 1, the
    /// error, the next try), then commits and releases the locks.
    pub async fn settle(
        mut self,
        sent: &[i64],
        failed: &[OutboxFailure],
    ) -> Result<(), StoreError> {
        if !sent.is_empty() {
            sqlx::query("UPDATE outbox SET sent_at = now() WHERE id = ANY($1)")
                .bind(sent)
                .execute(&mut *self.tx)
                .await?;
        }
        if !failed.is_empty() {
            let ids: Vec<i64> = failed.iter().map(|f| f.id).collect();
            let errors: Vec<String> = failed.iter().map(|f| f.error.clone()).collect();
            let delays: Vec<f64> = failed.iter().map(|f| f.retry_in.as_secs_f64()).collect();
            sqlx::query(
                "UPDATE outbox o SET attempts = o.attempts + 1, last_error = f.error, \
                    next_attempt_at = now() + make_interval(secs => f.delay) \
                 FROM unnest($1::bigint[], $2::text[], $3::float8[]) AS f(id, error, delay) \
                 WHERE o.id = f.id",
            )
            .bind(ids)
            .bind(errors)
            .bind(delays)
            .execute(&mut *self.tx)
            .await?;
        }
        self.tx.commit().await?;
        Ok(())
    }
}

impl Store {
    /// Locks up to `limit` unsent rows that are due, oldest first, skipping
    /// rows another relay holds.
    #[tracing::instrument(skip_all, fields(limit = limit), err(level = "debug"))]
    pub async fn outbox_take(&self, limit: usize) -> Result<OutboxBatch, StoreError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(OUTBOX_TAKE)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
        let rows = rows.iter().map(outbox_row).collect::<Result<_, _>>()?;
        Ok(OutboxBatch { tx, rows })
    }

    /// When the next unsent row is due, if there is one.
    pub async fn outbox_next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(sqlx::query_scalar(OUTBOX_NEXT_DUE)
            .fetch_one(&self.pool)
            .await?)
    }

    /// The events of a case, sent or not, in order (at most 1000).
    pub async fn outbox_of_case(&self, case_id: Uuid) -> Result<Vec<OutboxRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, envelope_id, case_id, routing_key, body, created_at, attempts, sent_at, \
                    last_error \
             FROM outbox WHERE case_id = $1 ORDER BY id LIMIT 1000",
        )
        .bind(case_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(outbox_row).collect()
    }
}
