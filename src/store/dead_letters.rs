//! Dead letters, their sightings, notes, and the operations (replays) on
//! them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{QueryBuilder, Row};
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::DeadLetterMessage;
use crate::domain::dead_letter::signature;

/// How [`Store::record_dead_letter`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordedDeadLetter {
    /// The dead letter's id.
    pub id: i64,
    /// True when this message was not stored before.
    pub new: bool,
    /// True when this was a new sighting (false: a redelivery of one already stored).
    pub sighted: bool,
}

/// One dead letter as lists show it.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetterSummary {
    /// Its id.
    pub id: i64,
    /// AMQP `message_id`.
    pub message_id: Option<String>,
    /// Reason code.
    pub code: String,
    /// One-line detail.
    pub detail: String,
    /// Its group.
    pub group: String,
    /// Sales order number, when the body names one.
    pub sales_order_number: Option<String>,
    /// Web order id, when the body names one.
    pub web_order_id: Option<String>,
    /// Event id, when the body names one.
    pub event_id: Option<String>,
    /// Where it came from.
    pub origin_exchange: Option<String>,
    /// Its routing key there.
    pub origin_routing_key: Option<String>,
    /// First stored.
    pub first_seen: DateTime<Utc>,
    /// Last seen in the queue.
    pub last_seen: DateTime<Utc>,
    /// How often it was seen.
    pub seen_count: i32,
    /// Body size in bytes.
    pub body_bytes: i64,
    /// Hidden from lists since.
    pub archived_at: Option<DateTime<Utc>>,
    /// Who claimed it.
    pub claimed_by: Option<String>,
    /// Last replayed.
    pub last_replayed_at: Option<DateTime<Utc>>,
}

/// One dead letter whole.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetterRecord {
    /// What lists show.
    #[serde(flatten)]
    pub summary: DeadLetterSummary,
    /// The body.
    #[serde(skip)]
    pub body: Vec<u8>,
    /// Properties, readable.
    pub properties: Value,
    /// Headers, readable.
    pub headers: Value,
    /// Properties as the broker library reads them back (replay).
    #[serde(skip)]
    pub raw_properties: Value,
}

/// One time a dead letter was seen.
#[derive(Clone, Debug, Serialize)]
pub struct Sighting {
    /// When it came from the dead-letter queue (again).
    pub seen_at: DateTime<Utc>,
    /// Its code then.
    pub code: String,
    /// Its detail then.
    pub detail: String,
    /// Its headers then.
    pub headers: Value,
}

/// An operator's note.
#[derive(Clone, Debug, Serialize)]
pub struct Note {
    /// When it was written.
    pub written_at: DateTime<Utc>,
    /// The operator who wrote it.
    pub operator: String,
    /// The note itself.
    pub text: String,
    /// A ticket reference.
    pub ticket: Option<String>,
}

/// Which dead letters a list, archive or replay takes.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct DeadLetterFilter {
    /// Only these ids (empty: any).
    pub ids: Vec<i64>,
    /// Only this code.
    pub code: Option<String>,
    /// Only this group.
    pub group: Option<String>,
    /// Only dead letters of this order (sales order number, web order id or event id).
    pub order: Option<String>,
    /// Last seen at or after.
    pub since: Option<DateTime<Utc>>,
    /// Last seen before.
    pub until: Option<DateTime<Utc>>,
    /// Detail, message id or body contains this text (case-insensitive).
    pub text: Option<String>,
    /// Archived ones too.
    pub include_archived: bool,
}

/// A group of dead letters: same code, same detail signature.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetterGroup {
    /// The group's key (what `--group` takes).
    pub group: String,
    /// The dead-letter code its members share.
    pub code: String,
    /// The detail with ids masked.
    pub signature: String,
    /// Dead letters (not archived).
    pub count: i64,
    /// First seen.
    pub first_seen: DateTime<Utc>,
    /// Last seen.
    pub last_seen: DateTime<Utc>,
    /// Sightings in the last hour.
    pub last_hour: i64,
    /// Sightings in the hour before.
    pub hour_before: i64,
    /// More in the last hour than in the hour before.
    pub growing: bool,
}

/// An operation: a replay, or one operator's action (audited).
#[derive(Clone, Debug, Serialize)]
pub struct Operation {
    /// Its id.
    pub id: Uuid,
    /// `replay`, `archive`, `claim`, `note`, `case retry`, `case close`, `case claim`, `case note`.
    pub kind: String,
    /// Who ran it.
    pub operator: String,
    /// What it selected, and its options.
    pub selection: Value,
    /// `running`, `interrupted`, `cancelled`, `done`.
    pub status: String,
    /// The case it acted on (case actions).
    pub case_id: Option<Uuid>,
    /// Someone asked it to stop.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// Started.
    pub created_at: DateTime<Utc>,
    /// Last progress.
    pub updated_at: DateTime<Utc>,
    /// When it ended; `None` while it runs, or if it was interrupted.
    pub finished_at: Option<DateTime<Utc>>,
}

/// What became of one item of an operation.
#[derive(Clone, Debug, Serialize)]
pub struct OperationItem {
    /// The dead letter.
    pub dead_letter_id: i64,
    /// Its order.
    pub order: Option<String>,
    /// Sent at (None: not yet).
    pub sent_at: Option<DateTime<Utc>>,
    /// Why it could not be sent.
    pub error: Option<String>,
    /// The case its event opened (or joined), when it was taken.
    pub case_id: Option<Uuid>,
    /// Seen again in the dead-letter queue after it was sent.
    pub failed_again: bool,
}

impl OperationItem {
    /// `became a case`, `failed again`, `send failed`, `pending` or `sent`.
    pub fn outcome(&self) -> &'static str {
        if self.failed_again {
            "failed again"
        } else if self.case_id.is_some() {
            "became a case"
        } else if self.error.is_some() {
            "send failed"
        } else if self.sent_at.is_none() {
            "not sent"
        } else {
            "pending"
        }
    }
}

const SUMMARY_COLUMNS: &str = "id, message_id, code, detail, group_key, sales_order_number, \
    web_order_id, event_id, origin_exchange, origin_routing_key, first_seen, last_seen, \
    seen_count, octet_length(body)::bigint AS body_bytes, archived_at, claimed_by, last_replayed_at";

fn summary(row: &sqlx::postgres::PgRow) -> Result<DeadLetterSummary, sqlx::Error> {
    Ok(DeadLetterSummary {
        id: row.try_get("id")?,
        message_id: row.try_get("message_id")?,
        code: row.try_get("code")?,
        detail: row.try_get("detail")?,
        group: row.try_get("group_key")?,
        sales_order_number: row.try_get("sales_order_number")?,
        web_order_id: row.try_get("web_order_id")?,
        event_id: row.try_get("event_id")?,
        origin_exchange: row.try_get("origin_exchange")?,
        origin_routing_key: row.try_get("origin_routing_key")?,
        first_seen: row.try_get("first_seen")?,
        last_seen: row.try_get("last_seen")?,
        seen_count: row.try_get("seen_count")?,
        body_bytes: row.try_get("body_bytes")?,
        archived_at: row.try_get("archived_at")?,
        claimed_by: row.try_get("claimed_by")?,
        last_replayed_at: row.try_get("last_replayed_at")?,
    })
}

fn push_filter(q: &mut QueryBuilder<sqlx::Postgres>, f: &DeadLetterFilter) {
    q.push(" WHERE true");
    if !f.include_archived {
        q.push(" AND archived_at IS NULL");
    }
    if !f.ids.is_empty() {
        q.push(" AND id = ANY(").push_bind(f.ids.clone()).push(")");
    }
    if let Some(code) = &f.code {
        q.push(" AND code = ").push_bind(code.to_uppercase());
    }
    if let Some(group) = &f.group {
        q.push(" AND group_key = ").push_bind(group.clone());
    }
    if let Some(order) = &f.order {
        q.push(" AND (sales_order_number = ")
            .push_bind(order.clone())
            .push(" OR web_order_id = ")
            .push_bind(order.clone())
            .push(" OR event_id = ")
            .push_bind(order.clone())
            .push(")");
    }
    if let Some(since) = f.since {
        q.push(" AND last_seen >= ").push_bind(since);
    }
    if let Some(until) = f.until {
        q.push(" AND last_seen < ").push_bind(until);
    }
    if let Some(text) = &f.text {
        let like = format!(
            "%{}%",
            text.replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        q.push(" AND (detail ILIKE ")
            .push_bind(like.clone())
            .push(" OR message_id ILIKE ")
            .push_bind(like.clone())
            .push(" OR encode(body, 'escape') ILIKE ")
            .push_bind(like)
            .push(")");
    }
}

impl Store {
    /// Stores a message taken from the dead-letter queue, in one
    /// transaction: a new dead letter, or one more sighting of the one
    /// with the same dedupe key. A redelivery of a sighting already stored
    /// (same headers) changes nothing. Safe with several ingesters at once.
    #[tracing::instrument(skip_all, fields(code = %msg.code), err)]
    pub async fn record_dead_letter(
        &self,
        msg: &DeadLetterMessage,
    ) -> Result<RecordedDeadLetter, StoreError> {
        let key = msg.dedupe_key();
        let ids = msg.order_ids();
        let sig = signature(&msg.detail);
        let group = msg.group();
        let sighting_key = msg.sighting_key();
        let mut tx = self.pool().begin().await?;
        let inserted: Option<i64> = sqlx::query_scalar(
            "INSERT INTO dead_letters (dedupe_key, message_id, body, properties, headers,
                raw_properties, code, detail, signature, group_key, origin_exchange,
                origin_routing_key, sales_order_number, web_order_id, event_id, failed_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
             ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
        )
        .bind(&key)
        .bind(&msg.message_id)
        .bind(&msg.body)
        .bind(&msg.properties)
        .bind(&msg.headers)
        .bind(&msg.raw_properties)
        .bind(&msg.code)
        .bind(&msg.detail)
        .bind(&sig)
        .bind(&group)
        .bind(&msg.origin_exchange)
        .bind(&msg.origin_routing_key)
        .bind(&ids.sales_order_number)
        .bind(&ids.web_order_id)
        .bind(&ids.event_id)
        .bind(msg.failed_at)
        .fetch_optional(&mut *tx)
        .await?;
        let (id, new) = match inserted {
            Some(id) => (id, true),
            None => (
                sqlx::query_scalar("SELECT id FROM dead_letters WHERE dedupe_key = $1 FOR UPDATE")
                    .bind(&key)
                    .fetch_one(&mut *tx)
                    .await?,
                false,
            ),
        };
        let sighted = sqlx::query(
            "INSERT INTO dead_letter_sightings (dead_letter_id, sighting_key, code, detail, headers)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(&sighting_key)
        .bind(&msg.code)
        .bind(&msg.detail)
        .bind(&msg.headers)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if sighted && !new {
            sqlx::query(
                "UPDATE dead_letters SET seen_count = seen_count + 1, last_seen = now(),
                    code = $2, detail = $3, signature = $4, group_key = $5, headers = $6,
                    failed_at = $7, archived_at = NULL
                 WHERE id = $1",
            )
            .bind(id)
            .bind(&msg.code)
            .bind(&msg.detail)
            .bind(&sig)
            .bind(&group)
            .bind(&msg.headers)
            .bind(msg.failed_at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(RecordedDeadLetter { id, new, sighted })
    }

    /// Dead letters matching `filter`, most recently seen first.
    pub async fn list_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<DeadLetterSummary>, StoreError> {
        let mut q = QueryBuilder::new(format!("SELECT {SUMMARY_COLUMNS} FROM dead_letters"));
        push_filter(&mut q, filter);
        q.push(" ORDER BY last_seen DESC, id DESC LIMIT ")
            .push_bind(limit)
            .push(" OFFSET ")
            .push_bind(offset);
        let rows = q.build().fetch_all(self.pool()).await?;
        Ok(rows.iter().map(summary).collect::<Result<_, _>>()?)
    }

    /// The ids of the dead letters matching `filter`, oldest first.
    pub async fn dead_letter_ids(&self, filter: &DeadLetterFilter) -> Result<Vec<i64>, StoreError> {
        let mut q = QueryBuilder::new("SELECT id FROM dead_letters");
        push_filter(&mut q, filter);
        q.push(" ORDER BY id");
        Ok(q.build_query_scalar().fetch_all(self.pool()).await?)
    }

    /// One dead letter whole.
    pub async fn dead_letter(&self, id: i64) -> Result<Option<DeadLetterRecord>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SUMMARY_COLUMNS}, body, properties, headers, raw_properties
             FROM dead_letters WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(DeadLetterRecord {
            summary: summary(&row)?,
            body: row.try_get("body")?,
            properties: row.try_get("properties")?,
            headers: row.try_get("headers")?,
            raw_properties: row.try_get("raw_properties")?,
        }))
    }

    /// Every sighting of a dead letter, oldest first.
    pub async fn dead_letter_sightings(&self, id: i64) -> Result<Vec<Sighting>, StoreError> {
        self.dead_letter_rows(
            "SELECT seen_at, code, detail, headers FROM dead_letter_sightings
             WHERE dead_letter_id = $1 ORDER BY seen_at, id",
            id,
            |r| {
                Ok(Sighting {
                    seen_at: r.try_get("seen_at")?,
                    code: r.try_get("code")?,
                    detail: r.try_get("detail")?,
                    headers: r.try_get("headers")?,
                })
            },
        )
        .await
    }

    /// The notes on a dead letter, oldest first.
    pub async fn dead_letter_notes(&self, id: i64) -> Result<Vec<Note>, StoreError> {
        self.dead_letter_rows(
            "SELECT written_at, operator, text, ticket FROM dead_letter_notes
             WHERE dead_letter_id = $1 ORDER BY written_at, id",
            id,
            |r| {
                Ok(Note {
                    written_at: r.try_get("written_at")?,
                    operator: r.try_get("operator")?,
                    text: r.try_get("text")?,
                    ticket: r.try_get("ticket")?,
                })
            },
        )
        .await
    }

    /// The rows `sql` selects for dead letter `id` (its `$1`), each read by `row`.
    async fn dead_letter_rows<T>(
        &self,
        sql: &'static str,
        id: i64,
        row: impl Fn(&PgRow) -> Result<T, sqlx::Error>,
    ) -> Result<Vec<T>, StoreError> {
        let rows = sqlx::query(sql).bind(id).fetch_all(self.pool()).await?;
        Ok(rows.iter().map(row).collect::<Result<_, _>>()?)
    }

    /// Groups of dead letters not archived, the busiest first.
    pub async fn dead_letter_groups(&self) -> Result<Vec<DeadLetterGroup>, StoreError> {
        let rows = sqlx::query(
            "SELECT d.group_key, min(d.code) AS code, min(d.signature) AS signature,
                    count(*) AS count, min(d.first_seen) AS first_seen,
                    max(d.last_seen) AS last_seen,
                    coalesce(sum(s.last_hour), 0)::bigint AS last_hour,
                    coalesce(sum(s.hour_before), 0)::bigint AS hour_before
             FROM dead_letters d
             LEFT JOIN LATERAL (
                 SELECT count(*) FILTER (WHERE seen_at >= now() - interval '1 hour') AS last_hour,
                        count(*) FILTER (WHERE seen_at < now() - interval '1 hour'
                                           AND seen_at >= now() - interval '2 hours') AS hour_before
                 FROM dead_letter_sightings WHERE dead_letter_id = d.id
                   AND seen_at >= now() - interval '2 hours'
             ) s ON true
             WHERE d.archived_at IS NULL
             GROUP BY d.group_key
             ORDER BY count(*) DESC, max(d.last_seen) DESC",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let last_hour: i64 = r.try_get("last_hour")?;
                let hour_before: i64 = r.try_get("hour_before")?;
                Ok::<_, sqlx::Error>(DeadLetterGroup {
                    group: r.try_get("group_key")?,
                    code: r.try_get("code")?,
                    signature: r.try_get("signature")?,
                    count: r.try_get("count")?,
                    first_seen: r.try_get("first_seen")?,
                    last_seen: r.try_get("last_seen")?,
                    last_hour,
                    hour_before,
                    growing: last_hour > hour_before,
                })
            })
            .collect::<Result<_, _>>()?)
    }

    /// Deletes dead letters for good; returns how many.
    pub async fn delete_dead_letters(&self, ids: &[i64]) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM dead_letters WHERE id = ANY($1)")
            .bind(ids)
            .execute(self.pool())
            .await?
            .rows_affected())
    }

    /// Archived dead letters archived before `before`, oldest first.
    pub async fn archived_before(
        &self,
        before: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM dead_letters WHERE archived_at < $1 ORDER BY archived_at LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    /// Count of dead letters not archived per code, and the age in seconds
    /// of the oldest one not archived, claimed or replayed.
    pub async fn dead_letter_gauges(&self) -> Result<(Vec<(String, i64)>, f64), StoreError> {
        // Every code ever stored, so that a code whose dead letters were
        // archived reads 0 rather than its last value.
        let rows = sqlx::query(
            "SELECT code, count(*) FILTER (WHERE archived_at IS NULL) AS n
             FROM dead_letters GROUP BY code",
        )
        .fetch_all(self.pool())
        .await?;
        let by_code = rows
            .iter()
            .map(|r| Ok::<_, sqlx::Error>((r.try_get("code")?, r.try_get("n")?)))
            .collect::<Result<_, _>>()?;
        let oldest: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM now() - min(first_seen))::float8 FROM dead_letters
             WHERE archived_at IS NULL AND claimed_by IS NULL
               AND (last_replayed_at IS NULL OR last_seen > last_replayed_at)",
        )
        .fetch_one(self.pool())
        .await?;
        Ok((by_code, oldest.unwrap_or(0.0)))
    }

    /// The `limit` largest groups of dead letters not archived: group key,
    /// code and count, largest first (for the per-group gauge, whose
    /// labels must stay few).
    pub async fn largest_dead_letter_groups(
        &self,
        limit: i64,
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT group_key, min(code), count(*) FROM dead_letters
             WHERE archived_at IS NULL GROUP BY group_key
             ORDER BY count(*) DESC, group_key LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    /// Starts an operation over `ids` (in this order).
    pub async fn create_operation(
        &self,
        kind: &str,
        operator: &str,
        selection: &Value,
        ids: &[i64],
    ) -> Result<Uuid, StoreError> {
        let id = Uuid::new_v4();
        let mut tx = self.pool().begin().await?;
        sqlx::query(
            "INSERT INTO operations (id, kind, operator, selection, status)
             VALUES ($1, $2, $3, $4, 'running')",
        )
        .bind(id)
        .bind(kind)
        .bind(operator)
        .bind(selection)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO operation_items (operation_id, dead_letter_id, position)
             SELECT $1, d, p::int FROM unnest($2::bigint[]) WITH ORDINALITY AS t(d, p)",
        )
        .bind(id)
        .bind(ids)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// The items of an operation not yet sent nor failed, in order.
    pub async fn operation_todo(&self, id: Uuid) -> Result<Vec<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT dead_letter_id FROM operation_items
             WHERE operation_id = $1 AND sent_at IS NULL AND error IS NULL ORDER BY position",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Records one item as sent (`error` None) or failed.
    pub async fn settle_operation_item(
        &self,
        operation: Uuid,
        dead_letter: i64,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query(
            "UPDATE operation_items SET sent_at = CASE WHEN $3::text IS NULL THEN now() END,
                 error = $3
             WHERE operation_id = $1 AND dead_letter_id = $2",
        )
        .bind(operation)
        .bind(dead_letter)
        .bind(error)
        .execute(&mut *tx)
        .await?;
        if error.is_none() {
            sqlx::query("UPDATE dead_letters SET last_replayed_at = now() WHERE id = $1")
                .bind(dead_letter)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE operations SET updated_at = now() WHERE id = $1")
            .bind(operation)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Sets an operation's status (`running`, `interrupted`, `cancelled`, `done`).
    pub async fn set_operation_status(&self, id: Uuid, status: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE operations SET status = $2, updated_at = now(),
                 finished_at = CASE WHEN $2 IN ('done', 'cancelled') THEN now() END
             WHERE id = $1",
        )
        .bind(id)
        .bind(status)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Operations, newest first.
    pub async fn operations(&self, limit: i64) -> Result<Vec<Operation>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, kind, operator, selection, status, case_id, cancel_requested_at,
                    created_at, updated_at, finished_at
             FROM operations ORDER BY created_at DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(operation).collect::<Result<_, _>>()?)
    }

    /// One operation.
    pub async fn operation(&self, id: Uuid) -> Result<Option<Operation>, StoreError> {
        let row = sqlx::query(
            "SELECT id, kind, operator, selection, status, case_id, cancel_requested_at,
                    created_at, updated_at, finished_at
             FROM operations WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().map(operation).transpose()?)
    }

    /// The items of an operation with what became of each: the case its
    /// event id opened (inbox), or a sighting after it was sent.
    pub async fn operation_items(&self, id: Uuid) -> Result<Vec<OperationItem>, StoreError> {
        let rows = sqlx::query(
            "SELECT i.dead_letter_id, coalesce(d.sales_order_number, d.web_order_id) AS order_id,
                    i.sent_at, i.error, ib.case_id,
                    EXISTS (SELECT 1 FROM dead_letter_sightings s
                            WHERE s.dead_letter_id = i.dead_letter_id
                              AND i.sent_at IS NOT NULL AND s.seen_at > i.sent_at) AS failed_again
             FROM operation_items i
             JOIN dead_letters d ON d.id = i.dead_letter_id
             LEFT JOIN inbox ib ON ib.event_id = d.event_id AND i.sent_at IS NOT NULL
             WHERE i.operation_id = $1 ORDER BY i.position",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                Ok::<_, sqlx::Error>(OperationItem {
                    dead_letter_id: r.try_get("dead_letter_id")?,
                    order: r.try_get("order_id")?,
                    sent_at: r.try_get("sent_at")?,
                    error: r.try_get("error")?,
                    case_id: r.try_get("case_id")?,
                    failed_again: r.try_get("failed_again")?,
                })
            })
            .collect::<Result<_, _>>()?)
    }
}

pub(super) fn operation(r: &sqlx::postgres::PgRow) -> Result<Operation, sqlx::Error> {
    Ok(Operation {
        id: r.try_get("id")?,
        kind: r.try_get("kind")?,
        operator: r.try_get("operator")?,
        selection: r.try_get("selection")?,
        status: r.try_get("status")?,
        case_id: r.try_get("case_id")?,
        cancel_requested_at: r.try_get("cancel_requested_at")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        finished_at: r.try_get("finished_at")?,
    })
}
