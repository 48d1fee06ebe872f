//! Escalated cases watched until a person releases the hold by hand
//! (`hand_watches`), and the fixes they recorded, for `holdclear rules
//! suggest`.
//!
//! An escalated case stays `escalated` (closed for intake and for the
//! one-open-case-per-order rule); a watch is a row beside it. It is still
//! watched while its row has `ended_at IS NULL` ([`WATCHED_CASE`]): a pruner
//! of closed cases must keep those.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::{Stream, StreamExt};
use uuid::Uuid;

use super::case_row::{CaseRow, case_columns, case_from};
use super::{Store, StoreError};
use crate::domain::{Case, Envelope, HeldOrderEvent};

/// How far before the latest escalation watched a round looks for new ones.
pub const ENROLL_MARGIN: Duration = Duration::from_secs(300);

/// SQL: the case `c` is escalated and still watched for a person's fix
/// (for whoever deletes closed cases: such a case is not closed yet).
pub const WATCHED_CASE: &str =
    "EXISTS (SELECT 1 FROM hand_watches w WHERE w.case_id = c.id AND w.ended_at IS NULL)";

/// An escalated case whose order is due for a look.
#[derive(Clone, Debug)]
pub struct HandWatch {
    /// The case (escalated).
    pub case: Case,
    /// Looks so far, this one included.
    pub looks: i32,
}

/// What a person did to an order, as the order read shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandFix {
    /// When the hold was released.
    pub released_at: DateTime<Utc>,
    /// The Smart Account the order now carries.
    pub smart_account_domain: Option<String>,
    /// Its Virtual Account.
    pub virtual_account_name: Option<String>,
}

/// How a watch ended without a fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchEnd {
    /// The order was closed or cancelled with the hold on.
    OrderClosed,
    /// The order can no longer be read (a permanent refusal).
    Unreadable,
}

impl WatchEnd {
    fn as_str(self) -> &'static str {
        match self {
            Self::OrderClosed => "order_closed",
            Self::Unreadable => "unreadable",
        }
    }
}

/// One hand fix with the event of its case (`holdclear rules suggest`).
#[derive(Clone, Debug)]
pub struct RecordedFix {
    /// The case.
    pub case_id: Uuid,
    /// The order's key.
    pub order_key: String,
    /// Why the case had escalated.
    pub escalation_reason: Option<String>,
    /// What the person did.
    pub fix: HandFix,
    /// The case's held-order event, or why it cannot be read.
    pub event: Result<HeldOrderEvent, String>,
}

impl Store {
    /// Starts watching (at most `limit` of) the cases escalated within
    /// `watch_for` that carry a sales order number and are not watched in
    /// their generation yet, oldest first; their first look is
    /// `first_look` after the escalation. An order that could not be read
    /// is not watched. Only escalations from a little before the latest
    /// one watched are looked for (a step commits within its lease, far
    /// less than [`ENROLL_MARGIN`]), so a round does not scan every case
    /// watched already.
    pub async fn enroll_hand_watches(
        &self,
        watch_for: Duration,
        first_look: Duration,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "INSERT INTO hand_watches (case_id, generation, escalated_at, next_look_at)
             SELECT c.id, c.generation, c.closed_at, c.closed_at + make_interval(secs => $2::float8)
             FROM cases c
             WHERE c.state = 'escalated'
               AND c.closed_at >= (
                   SELECT greatest(max(escalated_at) - make_interval(secs => $4::float8),
                                   now() - make_interval(secs => $1::float8))
                   FROM hand_watches)
               AND c.sales_order_number IS NOT NULL
               AND c.escalation_reason IS DISTINCT FROM 'ORDER_NOT_ACCESSIBLE'
               AND NOT EXISTS (SELECT 1 FROM hand_watches w
                               WHERE w.case_id = c.id AND w.generation = c.generation)
             ORDER BY c.closed_at LIMIT $3
             ON CONFLICT (case_id) DO UPDATE SET
                 generation = EXCLUDED.generation, escalated_at = EXCLUDED.escalated_at,
                 started_at = now(), next_look_at = EXCLUDED.next_look_at, looks = 0,
                 ended_at = NULL, outcome = NULL, detail = NULL, released_at = NULL,
                 smart_account_domain = NULL, virtual_account_name = NULL",
        )
        .bind(watch_for.as_secs_f64())
        .bind(first_look.as_secs_f64())
        .bind(limit)
        .bind(ENROLL_MARGIN.as_secs_f64())
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// Ends, of the `limit` watches due first, those that no longer apply:
    /// the case was re-opened (`cases retry`), a newer case of the order
    /// took over (a new hold), or it escalated longer than `watch_for` ago.
    /// (A watch that is not due yet is ended when it is.)
    pub async fn end_stale_hand_watches(
        &self,
        watch_for: Duration,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "WITH due AS (
                 SELECT case_id FROM hand_watches
                 WHERE ended_at IS NULL AND next_look_at <= now()
                 ORDER BY next_look_at LIMIT $2
             ),
             stale AS (
                 SELECT w.case_id,
                        CASE WHEN c.state <> 'escalated' OR c.generation <> w.generation THEN 'reopened'
                             WHEN c.closed_at < now() - make_interval(secs => $1::float8) THEN 'expired'
                             ELSE 'superseded' END AS outcome
                 FROM due JOIN hand_watches w ON w.case_id = due.case_id
                 JOIN cases c ON c.id = w.case_id
                 WHERE c.state <> 'escalated' OR c.generation <> w.generation
                       OR c.closed_at < now() - make_interval(secs => $1::float8)
                       OR EXISTS (SELECT 1 FROM cases n
                                  WHERE n.order_key = c.order_key AND n.created_at > c.created_at)
             )
             UPDATE hand_watches w SET ended_at = now(), outcome = s.outcome
             FROM stale s WHERE w.case_id = s.case_id",
        )
        .bind(watch_for.as_secs_f64())
        .bind(limit)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// Claims up to `limit` watches due for a look: each is due again
    /// `interval` later, so no other worker looks at it meanwhile.
    pub async fn claim_hand_watches(
        &self,
        interval: Duration,
        limit: i64,
    ) -> Result<Vec<HandWatch>, StoreError> {
        let rows = sqlx::query(concat!(
            "WITH due AS (
                 SELECT case_id FROM hand_watches
                 WHERE ended_at IS NULL AND next_look_at <= now()
                 ORDER BY next_look_at LIMIT $2 FOR UPDATE SKIP LOCKED
             ),
             claimed AS (
                 UPDATE hand_watches w SET next_look_at = now() + make_interval(secs => $1::float8), looks = w.looks + 1
                 FROM due WHERE w.case_id = due.case_id
                 RETURNING w.case_id, w.looks
             )
             SELECT claimed.looks, ",
            case_columns!(),
            " FROM claimed JOIN (",
            case_from!(),
            ") ON c.id = claimed.case_id"
        ))
        .bind(interval.as_secs_f64())
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                use sqlx::Row;
                let looks: i32 = row.try_get("looks")?;
                let case = CaseRow::read(row)?.decode()?.case;
                Ok(HandWatch { case, looks })
            })
            .collect()
    }

    /// The person released the hold: in one transaction, ends the watch
    /// with the fix, and writes the case's history line and its
    /// `order.hold_released` event. Fenced by the watch (still open, same
    /// generation), the case (still escalated) and the order (no newer
    /// case works it: that case's release is the order's): `false` when
    /// any changed, and nothing is written.
    pub async fn record_hand_release(
        &self,
        case: &Case,
        fix: &HandFix,
        event: &Envelope,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool().begin().await?;
        let ended = sqlx::query(
            "UPDATE hand_watches w SET ended_at = now(), outcome = 'released',
                    released_at = $3, smart_account_domain = $4, virtual_account_name = $5
             FROM cases c
             WHERE w.case_id = $1 AND w.generation = $2 AND w.ended_at IS NULL
               AND c.id = w.case_id AND c.state = 'escalated' AND c.generation = $2
               AND NOT EXISTS (SELECT 1 FROM cases n
                               WHERE n.order_key = c.order_key AND n.created_at > c.created_at)",
        )
        .bind(case.id)
        .bind(case.generation as i32)
        .bind(fix.released_at)
        .bind(&fix.smart_account_domain)
        .bind(&fix.virtual_account_name)
        .execute(&mut *tx)
        .await?;
        if ended.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO case_history (case_id, kind, state, detail)
             VALUES ($1, 'released_by_hand', 'escalated', jsonb_build_object(
                 'releasedAt', $2::timestamptz, 'smartAccountDomain', $3::text,
                 'virtualAccountName', $4::text)),
                    ($1, 'event', 'escalated', jsonb_build_object(
                 'routingKey', $5::text, 'envelopeId', $6::uuid))",
        )
        .bind(case.id)
        .bind(fix.released_at)
        .bind(&fix.smart_account_domain)
        .bind(&fix.virtual_account_name)
        .bind(event.routing_key)
        .bind(event.id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO outbox (envelope_id, case_id, routing_key, body)
             VALUES ($1, $2, $3, $4) ON CONFLICT (envelope_id) DO NOTHING",
        )
        .bind(event.id)
        .bind(case.id)
        .bind(event.routing_key)
        .bind(&event.body)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Ends the watch of `case` without a fix.
    pub async fn end_hand_watch(
        &self,
        case: &Case,
        end: WatchEnd,
        detail: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE hand_watches SET ended_at = now(), outcome = $3, detail = $4
             WHERE case_id = $1 AND generation = $2 AND ended_at IS NULL",
        )
        .bind(case.id)
        .bind(case.generation as i32)
        .bind(end.as_str())
        .bind(detail)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The hand fixes of the holds released since `since`, oldest first
    /// (the order shows the release to the second: then the older case),
    /// streamed, each with its case's event (or why it cannot be read).
    pub fn hand_fixes(
        &self,
        since: DateTime<Utc>,
    ) -> impl Stream<Item = Result<RecordedFix, StoreError>> + '_ {
        type Row = (
            Uuid,
            String,
            Option<String>,
            DateTime<Utc>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        sqlx::query_as::<_, Row>(
            "SELECT c.id, c.order_key, c.escalation_reason, w.released_at,
                    w.smart_account_domain, w.virtual_account_name, c.event::text
             FROM hand_watches w JOIN cases c ON c.id = w.case_id
             WHERE w.outcome = 'released' AND w.released_at >= $1
             ORDER BY w.released_at, c.created_at, c.id",
        )
        .bind(since)
        .fetch(self.pool())
        .map(|row| {
            let (case_id, order_key, escalation_reason, released_at, domain, va, event) = row?;
            let event = match event {
                Some(text) => serde_json::from_str::<HeldOrderEvent>(&text)
                    .map_err(|e| format!("cannot read the stored event: {e}")),
                None => Err("no stored event".to_owned()),
            };
            Ok(RecordedFix {
                case_id,
                order_key,
                escalation_reason,
                fix: HandFix {
                    released_at,
                    smart_account_domain: domain,
                    virtual_account_name: va,
                },
                event,
            })
        })
    }
}
