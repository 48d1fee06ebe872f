//! Intake's writes: a batch of validated held-order events becomes inbox
//! rows, cases and `held_again` history rows in one transaction. A new
//! case gets no history row: its row says when it was opened and by which
//! event, and [`Store::case_history`] shows that as its `opened` line.
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
use crate::domain::{HeldOrderEvent, OrderId};

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

/// Claims the event ids, opens one case per order without an open case,
/// records ids an open case did not know yet, and writes the history;
/// returns each input row's outcome by its position.
///
/// Each row carries its order group (`grp`: the events of the batch that
/// share a sales order number or a web order id, see [`groups`]) and the
/// group's ids. A group's case is the open case of its sales order number,
/// else of its web order id, else a new one named after the group's first
/// event. Only rows the inbox accepted (`fresh`) write anything. A fresh
/// row whose group neither had an open case nor got one (another
/// transaction opened it first) is reported as `unassigned`.
///
/// A group without an open case whose holds were all applied before the
/// order's last case ended (released, or escalated to a person) tells of
/// that case's hold: its events join that case (`held_again`) and start
/// nothing. A hold applied later is a new hold: a new case.
///
/// A joined case learns the group's ids it lacked, each only while no other
/// open case has it (the unique indexes of open cases decide; a case that
/// later learns a sales order number another case has is merged by the
/// engine, see `Store::identify_order`).
pub(super) const RECORD_HELD: &str = concat!(
    r#"
WITH input AS (
    SELECT *
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                $6::timestamptz[], $7::jsonb[], $8::uuid[])
         WITH ORDINALITY AS t(event_id, grp, sales_order_number, web_order_id,
                              hold_reason, held_at, event, new_case_id, ord)
),
firsts AS (
    SELECT DISTINCT ON (event_id) * FROM input ORDER BY event_id, ord
),
ids AS (
    SELECT DISTINCT sales_order_number, web_order_id FROM input
),
found AS (
    -- Every lookup has one plan whatever the statistics say (a table
    -- that grows faster than autovacuum analyses it must not be read
    -- whole, batch after batch): the open case of each id through the
    -- unique indexes of open cases, and each id's three most recent
    -- cases (not merged away) through an index in creation order (an
    -- order's cases follow one another, so its last ended case is among
    -- them).
    SELECT r.id FROM ids CROSS JOIN LATERAL (
        SELECT c.id FROM cases c WHERE c.order_key = ids.sales_order_number AND "#,
    open_case!(c),
    r#" LIMIT 1) r
    UNION
    SELECT r.id FROM ids CROSS JOIN LATERAL (
        SELECT c.id FROM cases c WHERE c.web_order_id = ids.web_order_id AND "#,
    open_case!(c),
    r#" LIMIT 1) r
    UNION
    SELECT r.id FROM ids CROSS JOIN LATERAL (
        SELECT c.id FROM cases c WHERE c.order_key = ids.sales_order_number AND c.state <> 'merged'
        ORDER BY c.created_at DESC LIMIT 3) r
    UNION
    SELECT r.id FROM ids CROSS JOIN LATERAL (
        SELECT c.id FROM cases c WHERE c.web_order_id = ids.web_order_id AND c.state <> 'merged'
        ORDER BY c.created_at DESC LIMIT 3) r
),
known AS (
    -- The batch's orders' cases, open and ended, locked: a case its
    -- engine is ending as this runs is read again once the engine has
    -- committed, and is then an ended case (its hold's events join it),
    -- never neither open nor ended.
    SELECT c.*
    FROM (SELECT id FROM found ORDER BY id) f -- locks in id order, as the engine's step commits take them
    CROSS JOIN LATERAL (
        SELECT c.id, c.order_key, c.sales_order_number, c.web_order_id, c.state,
               coalesce(c.released_at, c.closed_at) AS ended_at
        FROM cases c
        WHERE c.id = f.id AND c.state <> 'merged'
        FOR SHARE) c
),
open_cases AS (
    SELECT c.id, c.order_key, c.sales_order_number, c.web_order_id, c.state
    FROM known c
    WHERE "#,
    open_case!(c),
    r#"
),
closed_cases AS (
    SELECT c.id, c.order_key, c.web_order_id, c.state, c.ended_at
    FROM known c
    WHERE c.state IN ('released', 'escalated')
),
grps AS (
    SELECT DISTINCT ON (grp) grp, sales_order_number, web_order_id,
           max(coalesce(held_at, now())) OVER (PARTITION BY grp) AS held_at
    FROM input ORDER BY grp, ord
),
pairs AS (
    -- Each group's open cases, by either id: two equality joins (hashed),
    -- not one join on an OR, which compared every group with every case.
    SELECT g.grp, o.id, true AS by_sales_order_number
    FROM grps g JOIN open_cases o ON o.order_key = g.sales_order_number
    UNION ALL
    SELECT g.grp, o.id, false
    FROM grps g JOIN open_cases o ON o.web_order_id = g.web_order_id
),
matched AS (
    -- The open case of the group's sales order number, else of its web order id.
    SELECT DISTINCT ON (g.grp) g.grp, o.id, o.state,
           o.sales_order_number IS NULL AND g.sales_order_number IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM open_cases x
                               WHERE x.order_key = g.sales_order_number AND x.id <> o.id)
               AS learns_sales_order_number,
           o.web_order_id IS NULL AND g.web_order_id IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM open_cases x
                               WHERE x.web_order_id = g.web_order_id AND x.id <> o.id)
               AS learns_web_order_id,
           g.sales_order_number, g.web_order_id
    FROM pairs p
    JOIN grps g ON g.grp = p.grp
    JOIN open_cases o ON o.id = p.id
    ORDER BY g.grp, p.by_sales_order_number DESC, o.id
),
ended AS (
    -- Each group's ended cases, by either id (as `pairs`).
    SELECT g.grp, r.id, r.state, r.ended_at, g.held_at
    FROM grps g JOIN closed_cases r ON r.order_key = g.sales_order_number
    UNION ALL
    SELECT g.grp, r.id, r.state, r.ended_at, g.held_at
    FROM grps g JOIN closed_cases r ON r.web_order_id = g.web_order_id
),
stale AS (
    -- Groups without an open case whose holds were all applied before the
    -- order's last case ended (released, or escalated to a person): they
    -- tell of that case's hold, and join it (nothing to do).
    SELECT DISTINCT ON (e.grp) e.grp, e.id, e.state
    FROM ended e
    WHERE e.ended_at >= e.held_at
      AND e.grp NOT IN (SELECT grp FROM matched)
    ORDER BY e.grp, e.ended_at DESC
),
planned AS (
    SELECT f.*,
           coalesce(m.id, st.id) IS NOT NULL AS existing,
           coalesce(m.state, st.state) AS existing_state,
           coalesce(m.id, st.id,
                    first_value(f.new_case_id) OVER (PARTITION BY f.grp ORDER BY f.ord))
               AS case_id
    FROM firsts f
    LEFT JOIN matched m USING (grp)
    LEFT JOIN stale st USING (grp)
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
learned AS (
    UPDATE cases c
    SET sales_order_number = CASE WHEN m.learns_sales_order_number
                                  THEN m.sales_order_number ELSE c.sales_order_number END,
        order_key = CASE WHEN m.learns_sales_order_number
                         THEN m.sales_order_number ELSE c.order_key END,
        web_order_id = CASE WHEN m.learns_web_order_id
                            THEN m.web_order_id ELSE c.web_order_id END,
        updated_at = now()
    FROM matched m
    WHERE c.id = m.id
      AND (m.learns_sales_order_number OR m.learns_web_order_id)
      AND m.grp IN (SELECT grp FROM fresh)
    RETURNING c.id, m.learns_sales_order_number, m.learns_web_order_id
),
openers AS (
    SELECT DISTINCT ON (grp) * FROM fresh WHERE NOT existing ORDER BY grp, ord
),
opened AS (
    INSERT INTO cases (id, order_key, sales_order_number, web_order_id, state, event_id,
                       event, hold_reason, held_at)
    SELECT case_id, coalesce(sales_order_number, 'web:' || web_order_id), sales_order_number,
           web_order_id, 'deciding', event_id, event, hold_reason, coalesce(held_at, now())
    FROM openers
    ORDER BY grp
    ON CONFLICT DO NOTHING
    RETURNING id, event_id
),
scheduled AS (
    -- A new case is due now (the column's default).
    INSERT INTO case_schedule (case_id) SELECT id FROM opened
),
settled AS (
    SELECT f.ord, f.event_id, f.case_id, f.held_at, f.grp,
           (op.event_id IS NOT NULL) AS opens,
           coalesce(f.existing_state, 'deciding') AS state
    FROM fresh f
    LEFT JOIN opened op ON op.event_id = f.event_id
    WHERE f.existing OR f.case_id IN (SELECT id FROM opened)
),
history AS (
    INSERT INTO case_history (case_id, kind, state, detail)
    SELECT s.case_id,
           CASE WHEN s.opens THEN 'opened' ELSE 'held_again' END,
           s.state,
           jsonb_strip_nulls(jsonb_build_object(
               'eventId', s.event_id, 'heldAt', s.held_at,
               'learned', CASE WHEN l.id IS NOT NULL AND s.ord = (SELECT min(x.ord) FROM settled x WHERE x.grp = s.grp)
                               THEN jsonb_strip_nulls(jsonb_build_object(
                                   'salesOrderNumber', CASE WHEN l.learns_sales_order_number THEN m.sales_order_number END,
                                   'webOrderId', CASE WHEN l.learns_web_order_id THEN m.web_order_id END))
                          END))
    FROM settled s
    LEFT JOIN matched m ON m.grp = s.grp
    LEFT JOIN learned l ON l.id = m.id
    WHERE NOT s.opens -- the new case's row is its opened line
    ORDER BY s.ord
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
"#
);

/// Releases this transaction's inbox claims of events that found no case,
/// so that the next round can claim them again.
const RELEASE_CLAIMS: &str = "DELETE FROM inbox WHERE event_id = ANY($1::text[])";

impl Store {
    /// Records a batch of held-order events in one transaction: per event an
    /// inbox row, and a new case (`deciding`, due now; its row is its
    /// `opened` line), or a `held_again` history row on the order's open case;
    /// nothing for an event id seen before. The result has one entry per
    /// input event, in order.
    #[tracing::instrument(skip_all, fields(events = events.len()))]
    pub async fn record_held(
        &self,
        events: &[HeldOrderEvent],
    ) -> Result<Vec<Recorded>, StoreError> {
        let mut races = 0;
        loop {
            match self.record_held_once(events).await {
                // Another writer gave one of the batch's orders an id at the
                // same moment (or took its rows in another order): the next
                // try sees its commit.
                Err(e) if e.is_race() && races < MAX_ROUNDS => {
                    races += 1;
                    tracing::debug!(error = %e, "Intake raced another writer; writing the batch again.");
                }
                result => return result,
            }
        }
    }

    async fn record_held_once(
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

/// [`Store::record_held`]'s statement bound to `events`, prefixed with
/// `EXPLAIN`: it plans the statement and runs nothing (for the benchmark's
/// plan checks).
pub(super) fn explain_query(
    events: &[HeldOrderEvent],
) -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let positions: Vec<usize> = (0..events.len()).collect();
    // A fixed prefix on a constant statement: nothing from outside.
    let sql = sqlx::AssertSqlSafe(format!("EXPLAIN {RECORD_HELD}"));
    Batch::of(events, &positions).bind(sqlx::query(sql))
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
    grp: Vec<String>,
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
        let orders: Vec<&OrderId> = positions.iter().map(|&i| &events[i].data.order).collect();
        let groups = groups(&orders);
        let mut b = Batch {
            event_id: Vec::with_capacity(n),
            grp: Vec::with_capacity(n),
            sales_order_number: Vec::with_capacity(n),
            web_order_id: Vec::with_capacity(n),
            hold_reason: Vec::with_capacity(n),
            held_at: Vec::with_capacity(n),
            event: Vec::with_capacity(n),
            new_case_id: Vec::with_capacity(n),
        };
        for (k, &i) in positions.iter().enumerate() {
            let e = &events[i];
            let group = &groups[k];
            b.event_id.push(e.id.as_str());
            b.grp.push(group.key.clone());
            b.sales_order_number.push(group.sales_order_number);
            b.web_order_id.push(group.web_order_id);
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
            .bind(self.grp)
            .bind(self.sales_order_number)
            .bind(self.web_order_id)
            .bind(self.hold_reason)
            .bind(self.held_at)
            .bind(self.event)
            .bind(self.new_case_id)
    }
}

/// The order a batch row belongs to: rows that share a sales order number
/// or a web order id (directly or through other rows) are one order.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Group<'a> {
    /// The same for every row of the group (its first row's order key).
    key: String,
    /// The group's sales order number: the first one a row names.
    sales_order_number: Option<&'a str>,
    /// The group's web order id: the first one a row names.
    web_order_id: Option<&'a str>,
}

/// Groups the rows into orders (connected by a shared id), one entry per row.
fn groups<'a>(orders: &[&'a OrderId]) -> Vec<Group<'a>> {
    use std::collections::HashMap;
    // Union-find over row positions, joined through the ids they name.
    let mut parent: Vec<usize> = (0..orders.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut first_of: HashMap<(bool, &str), usize> = HashMap::new();
    for (i, order) in orders.iter().enumerate() {
        let ids = [
            order
                .sales_order_number
                .as_ref()
                .map(|s| (true, s.as_str())),
            order.web_order_id.as_ref().map(|w| (false, w.as_str())),
        ];
        for id in ids.into_iter().flatten() {
            let j = *first_of.entry(id).or_insert(i);
            let (a, b) = (root(&mut parent, i), root(&mut parent, j));
            // The earlier row stays the root: the group is named after it.
            if a != b {
                parent[a.max(b)] = a.min(b);
            }
        }
    }
    let roots: Vec<usize> = (0..orders.len()).map(|i| root(&mut parent, i)).collect();
    let mut ids: HashMap<usize, (Option<&'a str>, Option<&'a str>)> = HashMap::new();
    for (i, order) in orders.iter().enumerate() {
        let entry = ids.entry(roots[i]).or_default();
        if entry.0.is_none() {
            entry.0 = order.sales_order_number.as_ref().map(|s| s.as_str());
        }
        if entry.1.is_none() {
            entry.1 = order.web_order_id.as_ref().map(|w| w.as_str());
        }
    }
    roots
        .iter()
        .map(|r| {
            let (sales_order_number, web_order_id) = ids[r];
            Group {
                key: orders[*r].key(),
                sales_order_number,
                web_order_id,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(so: Option<&str>, web: Option<&str>) -> OrderId {
        OrderId::from_test(so, web)
    }

    #[test]
    fn rows_sharing_an_id_are_one_order() {
        // (sales order number, web order id) per row → (group of row, its ids)
        type Row = (Option<&'static str>, Option<&'static str>);
        type Want = (usize, Option<&'static str>, Option<&'static str>);
        let table: &[(&[Row], &[Want])] = &[
            (&[(Some("100"), None)], &[(0, Some("100"), None)]),
            (
                &[(None, Some("W1")), (Some("100"), Some("W1"))],
                &[(0, Some("100"), Some("W1")), (0, Some("100"), Some("W1"))],
            ),
            (
                // Joined only through the third row.
                &[
                    (Some("100"), None),
                    (None, Some("W1")),
                    (Some("100"), Some("W1")),
                ],
                &[(0, Some("100"), Some("W1")); 3],
            ),
            (
                &[(Some("100"), None), (Some("200"), None), (None, Some("W2"))],
                &[
                    (0, Some("100"), None),
                    (1, Some("200"), None),
                    (2, None, Some("W2")),
                ],
            ),
            (
                // A chain: W1–100, 100–W2 (the first web order id is the group's).
                &[
                    (None, Some("W1")),
                    (Some("100"), Some("W1")),
                    (Some("100"), Some("W2")),
                ],
                &[(0, Some("100"), Some("W1")); 3],
            ),
        ];
        for (rows, want) in table {
            let orders: Vec<OrderId> = rows.iter().map(|(s, w)| order(*s, *w)).collect();
            let refs: Vec<&OrderId> = orders.iter().collect();
            let got = groups(&refs);
            for (i, (g, (root, so, web))) in got.iter().zip(want.iter()).enumerate() {
                assert_eq!(g.key, orders[*root].key(), "{rows:?} row {i}");
                assert_eq!(
                    (g.sales_order_number, g.web_order_id),
                    (*so, *web),
                    "{rows:?} row {i}"
                );
            }
        }
    }
}
