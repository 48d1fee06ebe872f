//! Intake's writes: a batch of validated held-order events becomes inbox
//! rows, cases and `opened` / `held_again` history rows in one transaction.
//!
//! The batch is written set-based: one statement (arrays through `unnest`,
//! data-modifying CTEs with `ON CONFLICT DO NOTHING … RETURNING`) claims the
//! event ids in the inbox, opens at most one case per order and writes the
//! history, whatever the batch size. Duplicates of an event id and several
//! events of one order within the batch are resolved by the statement itself.
//!
//! Concurrent writers (several workers) are safe: the inbox's primary key
//! decides which transaction owns an event id, and the unique index of open
//! cases decides which one opens an order's case. The loser of an opening
//! race sees no case for its events in the statement's snapshot; it releases
//! their inbox claims and writes them again with a fresh snapshot, where they
//! join the winner's case as `held_again`.

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::types::Json;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::HeldOrderEvent;

/// What one event of a batch became.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The event opened a new case (state `deciding`).
    Opened {
        /// The new case.
        case_id: Uuid,
    },
    /// The order already had an open case (or an earlier event of the same
    /// batch opened one): a `held_again` history row was added to it.
    HeldAgain {
        /// The open case of the order.
        case_id: Uuid,
    },
    /// The event id was seen before (in the inbox, or earlier in the batch):
    /// nothing was written.
    Duplicate,
}

/// Rounds of the statement for events that lost an opening race to another
/// writer; each round sees the cases committed before it.
const MAX_ROUNDS: usize = 5;

/// Claims the event ids, opens one case per order without an open case and
/// writes the history; returns each input row's outcome by its position.
///
/// `case_id` of a row is where its event goes: the order's open case, else a
/// new one named after the order's first event of the batch. Only rows the
/// inbox accepted (`fresh`) write anything. A fresh row whose order neither
/// had an open case nor got one (another transaction opened it first) is
/// reported as `unassigned`.
const RECORD_HELD: &str = r#"
WITH input AS (
    SELECT *
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                $6::timestamptz[], $7::jsonb[], $8::uuid[])
         WITH ORDINALITY AS t(event_id, order_key, sales_order_number, web_order_id,
                              hold_reason, held_at, event, new_case_id, ord)
),
firsts AS (
    SELECT DISTINCT ON (event_id) * FROM input ORDER BY event_id, ord
),
open_cases AS (
    SELECT c.id, c.order_key, c.state
    FROM cases c
    WHERE c.order_key = ANY($2::text[])
      AND c.state NOT IN ('released', 'escalated')
    ORDER BY c.id -- locks in id order, as the engine's step commits take them
    FOR SHARE
),
planned AS (
    SELECT f.*,
           o.id IS NOT NULL AS existing,
           o.state AS existing_state,
           coalesce(o.id, first_value(f.new_case_id) OVER (PARTITION BY f.order_key ORDER BY f.ord))
               AS case_id
    FROM firsts f
    LEFT JOIN open_cases o USING (order_key)
),
claimed AS (
    INSERT INTO inbox (event_id, case_id)
    SELECT event_id, case_id FROM planned ORDER BY event_id
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
),
fresh AS (
    SELECT p.* FROM planned p JOIN claimed USING (event_id)
),
openers AS (
    SELECT DISTINCT ON (order_key) * FROM fresh WHERE NOT existing ORDER BY order_key, ord
),
opened AS (
    INSERT INTO cases (id, order_key, sales_order_number, web_order_id, state, event_id,
                       event, hold_reason, held_at, next_action_at)
    SELECT case_id, order_key, sales_order_number, web_order_id, 'deciding', event_id,
           event, hold_reason, coalesce(held_at, now()), now()
    FROM openers
    ORDER BY order_key
    ON CONFLICT (order_key) WHERE state NOT IN ('released', 'escalated') DO NOTHING
    RETURNING id, event_id
),
settled AS (
    SELECT f.ord, f.event_id, f.case_id, f.held_at,
           (op.event_id IS NOT NULL) AS opens,
           coalesce(f.existing_state, 'deciding') AS state
    FROM fresh f
    LEFT JOIN opened op ON op.event_id = f.event_id
    WHERE f.existing OR f.case_id IN (SELECT id FROM opened)
),
history AS (
    INSERT INTO case_history (case_id, kind, state, detail)
    SELECT case_id,
           CASE WHEN opens THEN 'opened' ELSE 'held_again' END,
           state,
           jsonb_strip_nulls(jsonb_build_object('eventId', event_id, 'heldAt', held_at))
    FROM settled
    ORDER BY ord
)
SELECT i.ord,
       s.case_id,
       CASE WHEN s.opens THEN 'opened'
            WHEN s.ord IS NOT NULL THEN 'held_again'
            WHEN f.ord IS NOT NULL THEN 'unassigned'
            ELSE 'duplicate' END AS outcome
FROM input i
LEFT JOIN fresh f ON f.ord = i.ord
LEFT JOIN settled s ON s.ord = i.ord
ORDER BY i.ord
"#;

/// Releases this transaction's inbox claims of events that found no case,
/// so that the next round can claim them again.
const RELEASE_CLAIMS: &str = "DELETE FROM inbox WHERE event_id = ANY($1::text[])";

impl Store {
    /// Records a batch of held-order events in one transaction: per event an
    /// inbox row, and a new case (`deciding`, due now) with an `opened`
    /// history row, or a `held_again` history row on the order's open case;
    /// nothing for an event id seen before. The result has one entry per
    /// input event, in order.
    #[tracing::instrument(skip_all, fields(events = events.len()))]
    pub async fn record_held(
        &self,
        events: &[HeldOrderEvent],
    ) -> Result<Vec<Recorded>, StoreError> {
        let mut outcomes: Vec<Option<Recorded>> = vec![None; events.len()];
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        // Positions (into `events`) still to be written.
        let mut pending: Vec<usize> = (0..events.len()).collect();
        for _ in 0..MAX_ROUNDS {
            let rows = Batch::of(events, &pending)
                .bind(sqlx::query(RECORD_HELD))
                .fetch_all(&mut *tx)
                .await?;
            let mut unassigned = Vec::new();
            for row in rows {
                let ord: i64 = row.try_get("ord")?;
                let outcome: String = row.try_get("outcome")?;
                let case_id: Option<Uuid> = row.try_get("case_id")?;
                let at = usize::try_from(ord - 1)
                    .ok()
                    .and_then(|i| pending.get(i).copied())
                    .ok_or_else(|| corrupt(format!("row number {ord} out of range")))?;
                outcomes[at] = Some(match (outcome.as_str(), case_id) {
                    ("opened", Some(case_id)) => Recorded::Opened { case_id },
                    ("held_again", Some(case_id)) => Recorded::HeldAgain { case_id },
                    ("duplicate", _) => Recorded::Duplicate,
                    ("unassigned", _) => {
                        unassigned.push(at);
                        continue;
                    }
                    (other, _) => return Err(corrupt(format!("unexpected outcome {other:?}"))),
                });
            }
            if unassigned.is_empty() {
                tx.commit().await?;
                return outcomes
                    .into_iter()
                    .map(|o| o.ok_or_else(|| corrupt("an event got no outcome".into())))
                    .collect();
            }
            tracing::debug!(
                events = unassigned.len(),
                "Another writer opened cases for these orders first; writing them again."
            );
            let ids: Vec<&str> = unassigned.iter().map(|&i| events[i].id.as_str()).collect();
            sqlx::query(RELEASE_CLAIMS)
                .bind(ids)
                .execute(&mut *tx)
                .await?;
            pending = unassigned;
        }
        Err(corrupt(format!(
            "{} events found no case after {MAX_ROUNDS} rounds",
            pending.len()
        )))
    }
}

fn corrupt(detail: String) -> StoreError {
    StoreError::Corrupt {
        table: "cases",
        detail,
    }
}

/// The statement's parameter arrays, one element per event.
struct Batch<'a> {
    event_id: Vec<&'a str>,
    order_key: Vec<String>,
    sales_order_number: Vec<Option<&'a str>>,
    web_order_id: Vec<Option<&'a str>>,
    hold_reason: Vec<&'static str>,
    held_at: Vec<Option<DateTime<Utc>>>,
    event: Vec<Json<&'a HeldOrderEvent>>,
    new_case_id: Vec<Uuid>,
}

impl<'a> Batch<'a> {
    fn of(events: &'a [HeldOrderEvent], positions: &[usize]) -> Self {
        let n = positions.len();
        let mut b = Batch {
            event_id: Vec::with_capacity(n),
            order_key: Vec::with_capacity(n),
            sales_order_number: Vec::with_capacity(n),
            web_order_id: Vec::with_capacity(n),
            hold_reason: Vec::with_capacity(n),
            held_at: Vec::with_capacity(n),
            event: Vec::with_capacity(n),
            new_case_id: Vec::with_capacity(n),
        };
        for &i in positions {
            let e = &events[i];
            let order = &e.data.order;
            b.event_id.push(e.id.as_str());
            b.order_key.push(order.key());
            b.sales_order_number
                .push(order.sales_order_number.as_ref().map(|s| s.as_str()));
            b.web_order_id
                .push(order.web_order_id.as_ref().map(|w| w.as_str()));
            b.hold_reason.push(e.data.hold_reason.as_str());
            // The hold's own time, else the envelope's; the database's now() otherwise.
            b.held_at.push(e.data.held_at.or(e.time));
            b.event.push(Json(e));
            b.new_case_id.push(Uuid::new_v4());
        }
        b
    }

    fn bind(
        self,
        q: sqlx::query::Query<'a, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'a, sqlx::Postgres, sqlx::postgres::PgArguments> {
        q.bind(self.event_id)
            .bind(self.order_key)
            .bind(self.sales_order_number)
            .bind(self.web_order_id)
            .bind(self.hold_reason)
            .bind(self.held_at)
            .bind(self.event)
            .bind(self.new_case_id)
    }
}
