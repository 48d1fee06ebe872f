//! The case engine's queries: claims and leases, step commits (case +
//! history + outbox in one transaction), and what `holdclear cases` shows.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::case_row::{
    CaseColumns, CaseRow, case_columns, case_from, case_input, case_set, corrupt, schedule_set,
};
use super::{Store, StoreError};
use crate::domain::{Case, CaseState, Envelope, HistoryEntry, SalesOrderNumber};

/// The claim of [`Store::claim_due`]: `$1` lease owner, `$2` lease in
/// seconds, `$3` most cases. It writes the narrow `case_schedule` rows
/// alone (only open cases have one) and reads the claimed cases by their
/// key. The rows it locked are updated by their `ctid` (stable while this
/// statement holds their lock), not found again through the primary key.
/// (The benchmark EXPLAINs this very statement.)
pub(super) const CLAIM_DUE: &str = "WITH due AS ( \
         SELECT ctid FROM case_schedule WHERE due_at <= now() \
         ORDER BY due_at LIMIT $3 FOR UPDATE SKIP LOCKED), \
     s AS ( \
         UPDATE case_schedule t SET lease_owner = $1, \
             lease_expires_at = now() + make_interval(secs => $2::float8), \
             due_at = now() + make_interval(secs => $2::float8) \
         FROM due WHERE t.ctid = due.ctid \
         RETURNING t.case_id) \
     SELECT case_id FROM s";

/// The claimed cases, read by a statement of their own after the claim:
/// the claim's own snapshot may predate a step another worker committed
/// while the claim waited to lock its schedule row (the row comes back due
/// from that commit), and the claimed case must be the committed one, not
/// the one before it. Once claimed, no other worker's commit passes the
/// fence, so this read is the case the claimer steps from.
pub(super) const CLAIMED: &str = concat!(
    "SELECT ",
    case_columns!(),
    " FROM case_schedule s JOIN cases c ON c.id = s.case_id \
     WHERE s.case_id = ANY($1) AND s.lease_owner = $2"
);

/// Step commits of several cases in one statement (one implicit
/// transaction, one round trip). Per case (`$1..$22`, arrays, one element
/// each, [`case_input!`]): the new columns, fenced by the lease owner of its
/// schedule row; case and schedule rows are locked in id order so that two
/// writers never wait on each other in a cycle. The schedule row of a case
/// left open gets its due time and lease; that of a closed case is deleted.
/// History (`$23..$27`) and outbox rows (`$28..$31`) carry their case id
/// and are written only for the cases whose fence held. Returns those
/// cases' ids.
pub(super) const COMMIT_STEPS: &str = concat!(
    "WITH input AS (SELECT * FROM ",
    case_input!(),
    "),
locked AS (
    -- Per case, its rows by key (a plan made on an empty table stays on
    -- the keys), in id order.
    SELECT x.*
    FROM (SELECT id, lease_owner FROM input ORDER BY id) i
    CROSS JOIN LATERAL (
        SELECT c.id
        FROM cases c
        JOIN case_schedule s ON s.case_id = c.id
        WHERE c.id = i.id AND s.lease_owner = i.lease_owner
        FOR UPDATE OF c, s) x
),
step AS (
    UPDATE cases c SET ",
    case_set!(),
    "FROM input i
    WHERE c.id = i.id AND c.id IN (SELECT id FROM locked)
    RETURNING c.id
),
scheduled AS (
    UPDATE case_schedule s SET ",
    schedule_set!(),
    "FROM input i
    WHERE s.case_id = i.id AND i.id IN (SELECT id FROM locked)
      AND i.state NOT IN ",
    terminal_states!(),
    "
),
unscheduled AS (
    -- The closed cases' ids first, once (an array), then their rows by key:
    -- joined to `input` directly, the delete compared every locked row
    -- with every input row.
    DELETE FROM case_schedule s
    WHERE s.case_id = ANY(ARRAY(
        SELECT i.id FROM input i
        WHERE i.id IN (SELECT id FROM locked) AND i.state IN ",
    terminal_states!(),
    "))
),
history AS (
    INSERT INTO case_history (case_id, at, kind, state, detail)
    SELECT h.case_id, h.at, h.kind, h.state, h.detail
    FROM unnest($23::uuid[], $24::timestamptz[], $25::text[], $26::text[], $27::jsonb[])
         WITH ORDINALITY AS h(case_id, at, kind, state, detail, n)
    WHERE h.case_id IN (SELECT id FROM step)
    ORDER BY h.n
),
events AS (
    -- The same transition written twice is one event (its id is stable).
    INSERT INTO outbox (envelope_id, case_id, routing_key, body)
    SELECT o.envelope_id, o.case_id, o.routing_key, o.body
    FROM unnest($28::uuid[], $29::uuid[], $30::text[], $31::jsonb[])
         WITH ORDINALITY AS o(envelope_id, case_id, routing_key, body, n)
    WHERE o.case_id IN (SELECT id FROM step)
    ORDER BY o.n
    ON CONFLICT (envelope_id) DO NOTHING
)
SELECT id FROM step"
);

/// A re-opened case ([`case_input!`] with one element), fenced by its
/// previous generation (`$23`) and escalated state; it is scheduled again,
/// due at its next action.
const COMMIT_RETRY: &str = concat!(
    "WITH i AS (SELECT * FROM ",
    case_input!(),
    "),
reopened AS (
    UPDATE cases c SET ",
    case_set!(),
    "FROM i WHERE c.id = i.id AND c.generation = $23 AND c.state = 'escalated'
    RETURNING c.id
)
INSERT INTO case_schedule (case_id, due_at)
SELECT r.id, coalesce(i.next_action_at, now()) FROM reopened r JOIN i ON i.id = r.id
ON CONFLICT (case_id) DO UPDATE
SET due_at = EXCLUDED.due_at, lease_owner = NULL, lease_expires_at = NULL"
);

/// One step's commit, for [`Store::commit_steps`].
#[derive(Clone, Copy, Debug)]
pub struct StepCommit<'a> {
    /// The lease token the step ran under (the fence).
    pub lease_owner: &'a str,
    /// The case after the step(s).
    pub case: &'a Case,
    /// History entries, in order.
    pub history: &'a [HistoryEntry],
    /// Events to write to the outbox.
    pub outbox: &'a [Envelope],
    /// Keep the lease for this long (the caller goes on), else give it back.
    pub hold: Option<Duration>,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// One case handed out by [`Store::claim_due`]: readable, or corrupt (the
/// id is enough to set it aside).
#[derive(Debug)]
pub struct Claimed {
    /// The case id.
    pub id: Uuid,
    /// The order key, for logs.
    pub order_key: String,
    /// The case, or why its row cannot be read.
    pub case: Result<Case, StoreError>,
}

/// A case with the bookkeeping columns `holdclear cases show` prints.
#[derive(Clone, Debug)]
pub struct CaseRecord {
    /// The case.
    pub case: Case,
    /// `cases.order_key`.
    pub order_key: String,
    /// The order's case this one was merged into, when it was.
    pub merged_into: Option<Uuid>,
    /// Who holds the lease, if anyone.
    pub lease_owner: Option<String>,
    /// Until when.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// When the case was opened.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// One line of `holdclear cases list`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)] // the columns, as stored
pub struct CaseSummary {
    pub id: Uuid,
    /// Sales order number, or `web:<id>`.
    pub order: String,
    pub state: String,
    /// Rule that decided it.
    pub rule: Option<String>,
    /// Resolved Smart Account domain.
    pub account: Option<String>,
    /// Escalation reason, when escalated.
    pub escalation_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Next step due (open cases only).
    pub next_action_at: Option<DateTime<Utc>>,
}

/// Which cases `holdclear cases list` shows.
#[derive(Clone, Debug, Default)]
pub struct CaseFilter {
    /// Only this state.
    pub state: Option<CaseState>,
    /// Only this order (sales order number, web order id or order key).
    pub order: Option<String>,
    /// At most this many, newest first.
    pub limit: u32,
}

/// One stored history line: the columns of `case_history`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)] // the columns, as stored
pub struct HistoryRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub kind: String,
    /// The case's state after this line.
    pub state: String,
    pub detail: Value,
}

impl HistoryRow {
    /// The line's particulars, compact: a call as `call args → result (ms)`.
    pub fn summary(&self) -> String {
        let d = &self.detail;
        if self.kind == "call" {
            let args = d.get("args").map(Value::to_string).unwrap_or_default();
            let result = d.get("result").map(Value::to_string).unwrap_or_default();
            let ms = d.get("ms").and_then(Value::as_u64).unwrap_or_default();
            let call = d.get("call").and_then(Value::as_str).unwrap_or("?");
            return format!("{call} {args} → {result} ({ms} ms)");
        }
        if self.kind == "shadow" {
            let rule = |side: &str| match d.get(side) {
                Some(Value::Null) | None => "no rule".to_owned(),
                Some(v) => format!("{:?}", v.get("rule").and_then(Value::as_str).unwrap_or("?")),
            };
            let hash = d.get("shadowHash").and_then(Value::as_str).unwrap_or("?");
            return format!(
                "shadow rules (sha256 {}…) would decide {}; the rules in force decided {}",
                hash.get(..12).unwrap_or(hash),
                rule("shadow"),
                rule("live")
            );
        }
        d.to_string()
    }
}

/// What [`Store::identify_order`] did with a sales order number the engine
/// learned for a case that did not know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// The case holds it now (or held it already).
    Recorded,
    /// Another case is the order's case (open, or closed after this case
    /// opened): this case was merged into it and is closed.
    Merged {
        /// The order's case.
        into: Uuid,
    },
    /// The case already holds another sales order number: the answers
    /// disagree about which order this is. Nothing written.
    Conflicting {
        /// The number the case holds.
        known: String,
    },
    /// The lease was lost: nothing written.
    LeaseLost,
}

/// The result of [`Store::commit_retry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryCommit {
    /// The case is open again.
    Reopened,
    /// Someone changed the case in between (another retry): nothing written.
    Changed,
    /// Another case of the order is open: nothing written.
    OtherOpen,
}

/// The order's case: the open one, else one that closed after this
/// case opened (it was working the same hold), else one that ended
/// after this case's hold was applied (released or escalated: that
/// hold is another case's).
async fn order_case(
    tx: &mut Transaction<'static, Postgres>,
    so: &str,
    id: Uuid,
    created_at: DateTime<Utc>,
    held_at: DateTime<Utc>,
) -> Result<Option<Uuid>, StoreError> {
    sqlx::query_scalar(concat!(
        "SELECT id FROM cases \
         WHERE order_key = $1 AND id <> $2 \
           AND (",
        open_case!(),
        " \
                OR (state <> 'merged' AND closed_at >= $3) \
                OR (state IN ('released', 'escalated') \
                    AND coalesce(released_at, closed_at) >= $4)) \
         ORDER BY (",
        open_case!(),
        ") DESC, created_at DESC \
         LIMIT 1 FOR UPDATE"
    ))
    .bind(so)
    .bind(id)
    .bind(created_at)
    .bind(held_at)
    .fetch_optional(&mut **tx)
    .await
    .map_err(Into::into)
}

/// Case `id` learns its sales order number (no other case works the order).
async fn record_identified(
    tx: &mut Transaction<'static, Postgres>,
    id: Uuid,
    so: &str,
    state: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE cases SET sales_order_number = $2, order_key = $2, updated_at = now() \
         WHERE id = $1",
    )
    .bind(id)
    .bind(so)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO case_history (case_id, kind, state, detail) \
         VALUES ($1, 'identified', $2, jsonb_build_object('salesOrderNumber', $3::text))",
    )
    .bind(id)
    .bind(state)
    .bind(so)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Case `id` is merged into `into`, the order's case, which learns its web
/// order id; a history line on both.
async fn merge(
    tx: &mut Transaction<'static, Postgres>,
    id: Uuid,
    into: Uuid,
    so: &str,
    web: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE cases SET state = 'merged', merged_into = $2, closed_at = now(), \
            updated_at = now() \
         WHERE id = $1",
    )
    .bind(id)
    .bind(into)
    .execute(&mut **tx)
    .await?;
    // Closed: no longer scheduled (its lease goes with the row).
    sqlx::query("DELETE FROM case_schedule WHERE case_id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    // Its web order id is free now: the order's case learns it, unless it
    // knows one already or another open case has it.
    let into_state: String = sqlx::query_scalar(
        "UPDATE cases o SET web_order_id = coalesce(o.web_order_id, $2), updated_at = now() \
         WHERE o.id = $1 \
         RETURNING o.state",
    )
    .bind(into)
    .bind(web)
    .fetch_one(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO case_history (case_id, kind, state, detail) \
         VALUES ($1, 'merged', 'merged', jsonb_strip_nulls(jsonb_build_object( \
                    'into', $3::uuid, 'salesOrderNumber', $4::text, 'webOrderId', $5::text))), \
                ($3, 'joined', $2, jsonb_strip_nulls(jsonb_build_object( \
                    'case', $1::uuid, 'salesOrderNumber', $4::text, 'webOrderId', $5::text)))",
    )
    .bind(id)
    .bind(&into_state)
    .bind(into)
    .bind(so)
    .bind(web)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Binds a history as the arrays `at`, `kind`, `state`, `detail`.
fn bind_history<'q>(
    q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    history: &[HistoryEntry],
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    let ats: Vec<DateTime<Utc>> = history.iter().map(|h| h.at).collect();
    let kinds: Vec<&'static str> = history.iter().map(|h| h.kind).collect();
    let states: Vec<&'static str> = history.iter().map(|h| h.state.as_str()).collect();
    let details: Vec<Value> = history.iter().map(|h| h.detail.clone()).collect();
    q.bind(ats).bind(kinds).bind(states).bind(details)
}

async fn insert_history(
    tx: &mut Transaction<'static, Postgres>,
    case_id: Uuid,
    history: &[HistoryEntry],
) -> Result<(), StoreError> {
    if history.is_empty() {
        return Ok(());
    }
    let q = sqlx::query(
        "INSERT INTO case_history (case_id, at, kind, state, detail) \
         SELECT $1, h.at, h.kind, h.state, h.detail \
         FROM unnest($2::timestamptz[], $3::text[], $4::text[], $5::jsonb[]) \
              WITH ORDINALITY AS h(at, kind, state, detail, n) ORDER BY h.n",
    )
    .bind(case_id);
    bind_history(q, history).execute(&mut **tx).await?;
    Ok(())
}

impl Store {
    /// Claims up to `limit` due open cases for `lease_owner`: each is leased
    /// for `lease` and pushed out of the due set for as long, so no other
    /// claimer gets it until the lease runs out (a dead worker's case is due
    /// again then). Uses `FOR UPDATE SKIP LOCKED`: concurrent claimers never
    /// get the same case.
    #[tracing::instrument(skip_all, fields(lease_owner = %lease_owner, limit = limit), err(level = "debug"))]
    pub async fn claim_due(
        &self,
        lease_owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Claimed>, StoreError> {
        let ids = self.claim_due_ids(lease_owner, lease, limit).await?;
        self.read_claimed(&ids, lease_owner).await
    }

    /// The first half of [`Store::claim_due`]: the claim itself, on the
    /// narrow schedule alone; the ids of the cases now leased to
    /// `lease_owner`.
    pub async fn claim_due_ids(
        &self,
        lease_owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Uuid>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Ok(sqlx::query_scalar(CLAIM_DUE)
            .bind(lease_owner)
            .bind(secs(lease))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    /// The second half of [`Store::claim_due`]: the cases of `ids` that
    /// `lease_owner` holds, read after the claim committed (see
    /// [`CLAIMED`]).
    pub async fn read_claimed(
        &self,
        ids: &[Uuid],
        lease_owner: &str,
    ) -> Result<Vec<Claimed>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(CLAIMED)
            .bind(ids)
            .bind(lease_owner)
            .fetch_all(&self.pool)
            .await?;
        let now = Utc::now();
        rows.iter()
            .map(|row| {
                Ok(Claimed {
                    id: row.try_get("id")?,
                    order_key: row.try_get("order_key")?,
                    // Claimed means due: the stored time is the lease's.
                    case: CaseRow::read(row).and_then(CaseRow::decode).map(|r| {
                        let mut c = r.case;
                        c.next_action_at = Some(now);
                        c
                    }),
                })
            })
            .collect()
    }

    /// Extends a lease that `lease_owner` still holds; `false` when it was lost.
    pub async fn renew_lease(
        &self,
        id: Uuid,
        lease_owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE case_schedule SET lease_expires_at = now() + make_interval(secs => $3::float8), \
                due_at = now() + make_interval(secs => $3::float8) \
             WHERE case_id = $1 AND lease_owner = $2",
        )
        .bind(id)
        .bind(lease_owner)
        .bind(secs(lease))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives a leased case back, due after `delay`; `false` when the lease was lost.
    pub async fn release_case(
        &self,
        id: Uuid,
        lease_owner: &str,
        delay: Duration,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE case_schedule SET due_at = now() + make_interval(secs => $3::float8), \
                lease_owner = NULL, lease_expires_at = NULL \
             WHERE case_id = $1 AND lease_owner = $2",
        )
        .bind(id)
        .bind(lease_owner)
        .bind(secs(delay))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// [`Store::commit_steps`] for one step: `Ok(false)` when the lease was
    /// lost and nothing was written.
    pub async fn commit_step(
        &self,
        lease_owner: &str,
        case: &Case,
        history: &[HistoryEntry],
        outbox: &[Envelope],
        hold: Option<Duration>,
    ) -> Result<bool, StoreError> {
        let step = StepCommit {
            lease_owner,
            case,
            history,
            outbox,
            hold,
        };
        Ok(self
            .commit_steps(&[step])
            .await?
            .first()
            .copied()
            .unwrap_or(false))
    }

    /// Commits the steps of several cases in one transaction: per case its
    /// new columns (fenced by its `lease_owner`), its history entries and its
    /// outbox rows. With `hold`, the lease is kept (and extended by `hold`)
    /// because the caller goes on with the next step; without, the lease is
    /// given back and the case is due at its `next_action_at`. Returns per
    /// step whether it was written (`false`: the lease was lost, nothing of
    /// that case was written). At most one step per case.
    #[tracing::instrument(skip_all, fields(steps = steps.len()), err(level = "debug"))]
    pub async fn commit_steps(&self, steps: &[StepCommit<'_>]) -> Result<Vec<bool>, StoreError> {
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let mut cases = CaseColumns::default();
        let (mut h_case, mut h_at, mut h_kind, mut h_state, mut h_detail) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut o_id, mut o_case, mut o_key, mut o_body) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for step in steps {
            let c = step.case;
            cases.push(c, Some(step.lease_owner), step.hold)?;
            for h in step.history {
                h_case.push(c.id);
                h_at.push(h.at);
                h_kind.push(h.kind);
                h_state.push(h.state.as_str());
                h_detail.push(&h.detail);
            }
            for e in step.outbox {
                o_id.push(e.id);
                o_case.push(c.id);
                o_key.push(e.routing_key);
                o_body.push(&e.body);
            }
        }
        let id = cases.ids().to_vec();
        let written: Vec<Uuid> = cases
            .bind(sqlx::query(COMMIT_STEPS))
            .bind(h_case)
            .bind(h_at)
            .bind(h_kind)
            .bind(h_state)
            .bind(h_detail)
            .bind(o_id)
            .bind(o_case)
            .bind(o_key)
            .bind(o_body)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?;
        Ok(id.iter().map(|i| written.contains(i)).collect())
    }

    /// Writes a re-opened case (`holdclear cases retry`), fenced by its
    /// previous generation and escalated state.
    #[tracing::instrument(skip_all, fields(case = %after.id, order = %after.order), err(level = "debug"))]
    pub async fn commit_retry(
        &self,
        before: &Case,
        after: &Case,
        history: &[HistoryEntry],
    ) -> Result<RetryCommit, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut case = CaseColumns::default();
        case.push(after, None, None)?;
        let q = case.bind(sqlx::query(COMMIT_RETRY)).bind(
            i32::try_from(before.generation).map_err(|_| corrupt("generation out of range"))?,
        );
        let done = match q.execute(&mut *tx).await {
            Ok(done) => done,
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Ok(RetryCommit::OtherOpen);
            }
            Err(e) => return Err(e.into()),
        };
        if done.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(RetryCommit::Changed);
        }
        insert_history(&mut tx, after.id, history).await?;
        tx.commit().await?;
        Ok(RetryCommit::Reopened)
    }

    /// Records the sales order number learned for case `id` (an order read by
    /// its web order id), fenced by the lease. When another case is that
    /// order's case (open; closed after this one opened; or ended after
    /// this one's hold was applied: it covered the same hold), this case is merged into it in the same transaction:
    /// closed as `merged` with `merged_into`, its web order id recorded on
    /// the order's case, a history line on both. The unique index of open
    /// order keys makes this safe against any concurrent writer.
    #[tracing::instrument(skip_all, fields(case = %id, sales_order_number = %sales_order_number), err(level = "debug"))]
    pub async fn identify_order(
        &self,
        id: Uuid,
        lease_owner: &str,
        sales_order_number: &SalesOrderNumber,
    ) -> Result<Identity, StoreError> {
        let mut races = 0;
        loop {
            match self
                .identify_order_once(id, lease_owner, sales_order_number)
                .await
            {
                Err(e) if e.is_race() && races < 3 => races += 1,
                result => return result,
            }
        }
    }

    async fn identify_order_once(
        &self,
        id: Uuid,
        lease_owner: &str,
        sales_order_number: &SalesOrderNumber,
    ) -> Result<Identity, StoreError> {
        let so = sales_order_number.as_str();
        let mut tx = self.pool.begin().await?;
        type Row = (
            Option<String>,
            Option<String>,
            DateTime<Utc>,
            DateTime<Utc>,
            String,
        );
        let row: Option<Row> = sqlx::query_as(concat!(
            "SELECT c.sales_order_number, c.web_order_id, c.created_at, c.held_at, c.state \
             FROM cases c JOIN case_schedule s ON s.case_id = c.id \
             WHERE c.id = $1 AND s.lease_owner = $2 \
               AND ",
            open_case!(c),
            " \
             FOR UPDATE OF c, s"
        ))
        .bind(id)
        .bind(lease_owner)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((known, web, created_at, held_at, state)) = row else {
            return Ok(Identity::LeaseLost);
        };
        match known {
            Some(k) if k == so => return Ok(Identity::Recorded),
            Some(k) => return Ok(Identity::Conflicting { known: k }),
            None => {}
        }
        let other = order_case(&mut tx, so, id, created_at, held_at).await?;
        let Some(into) = other else {
            record_identified(&mut tx, id, so, &state).await?;
            tx.commit().await?;
            return Ok(Identity::Recorded);
        };
        merge(&mut tx, id, into, so, web.as_deref()).await?;
        tx.commit().await?;
        Ok(Identity::Merged { into })
    }

    /// The earliest due time of the open cases (their schedule rows), if any.
    pub async fn next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(sqlx::query_scalar("SELECT min(due_at) FROM case_schedule")
            .fetch_one(&self.pool)
            .await?)
    }

    /// One case by id.
    pub async fn case_by_id(&self, id: Uuid) -> Result<Option<CaseRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            case_columns!(),
            " FROM ",
            case_from!(),
            " WHERE c.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(|row| CaseRow::read(row)?.decode())
        .transpose()
    }

    /// The newest case of an order, found by sales order number, web order id
    /// or order key (or one case by its id); a case merged into another
    /// comes last. A case's order key is its sales order number when it has
    /// one (`cases_order_key_is_identity`), so the key's index finds it by
    /// that number too; an arm on `sales_order_number` itself, which has no
    /// index, would make the plan read every case.
    pub async fn latest_case(&self, order: &str) -> Result<Option<CaseRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            case_columns!(),
            " FROM ",
            case_from!(),
            " WHERE c.order_key = $1 OR c.web_order_id = $1 \
                 OR c.id = $2 \
              ORDER BY c.state = 'merged', c.created_at DESC, c.id DESC LIMIT 1"
        ))
        .bind(order)
        .bind(Uuid::parse_str(order).ok())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(|row| CaseRow::read(row)?.decode())
        .transpose()
    }

    /// The open case of the order (by its key or its web order id) other
    /// than `except`, if there is one.
    pub async fn other_open_case(
        &self,
        order_key: &str,
        web_order_id: Option<&str>,
        except: Uuid,
    ) -> Result<Option<Uuid>, StoreError> {
        Ok(sqlx::query_scalar(concat!(
            "SELECT id FROM cases WHERE (order_key = $1 OR web_order_id = $3) AND id <> $2 \
             AND ",
            open_case!(),
            " LIMIT 1"
        ))
        .bind(order_key)
        .bind(except)
        .bind(web_order_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Cases for `holdclear cases list`, newest first.
    pub async fn list_cases(&self, filter: &CaseFilter) -> Result<Vec<CaseSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT c.id, c.order_key, c.state, c.rule_name, \
                    c.target->>'smart_account_domain' AS account, c.escalation_reason, \
                    c.created_at, c.updated_at, s.due_at AS next_action_at \
             FROM cases c LEFT JOIN case_schedule s ON s.case_id = c.id \
             WHERE ($1::text IS NULL OR c.state = $1) \
               AND ($2::text IS NULL OR c.order_key = $2 OR c.sales_order_number = $2 \
                    OR c.web_order_id = $2) \
             ORDER BY c.created_at DESC, c.id DESC LIMIT $3",
        )
        .bind(filter.state.map(|s| s.as_str()))
        .bind(filter.order.as_deref())
        .bind(i64::from(filter.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let state: String = row.try_get("state")?;
                let open = CaseState::parse(&state).is_some_and(|s| !s.is_terminal());
                let next: Option<DateTime<Utc>> = row.try_get("next_action_at")?;
                Ok(CaseSummary {
                    id: row.try_get("id")?,
                    order: row.try_get("order_key")?,
                    state,
                    rule: row.try_get("rule_name")?,
                    account: row.try_get("account")?,
                    escalation_reason: row.try_get("escalation_reason")?,
                    created_at: row.try_get("created_at")?,
                    updated_at: row.try_get("updated_at")?,
                    next_action_at: next.filter(|_| open),
                })
            })
            .collect()
    }

    /// A case's history, oldest first (at most `limit` lines). Its first
    /// line, `opened` (id 0), is read from the case row, which intake writes
    /// instead of a history row (older cases' `opened` rows are skipped).
    pub async fn case_history(&self, id: Uuid, limit: u32) -> Result<Vec<HistoryRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT 0::bigint AS id, created_at AS at, 'opened' AS kind, 'deciding' AS state, \
                    jsonb_build_object('eventId', event_id, 'heldAt', held_at) AS detail \
             FROM cases WHERE id = $1 \
             UNION ALL \
             SELECT id, at, kind, state, detail FROM case_history \
             WHERE case_id = $1 AND kind <> 'opened' \
             ORDER BY id LIMIT $2",
        )
        .bind(id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(HistoryRow {
                    id: row.try_get("id")?,
                    at: row.try_get("at")?,
                    kind: row.try_get("kind")?,
                    state: row.try_get("state")?,
                    detail: row.try_get("detail")?,
                })
            })
            .collect()
    }
}
