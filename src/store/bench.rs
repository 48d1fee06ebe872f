//! What `holdclear bench` asks of PostgreSQL besides the service's own
//! statements (which it calls as they are: [`Store::record_held`],
//! [`Store::claim_due`]): emptying the tables between runs, counting what
//! intake wrote, seeding a million watched cases set-based, making a few of
//! them due, and the plan of the claim. These live on [`BenchTables`], which
//! only `src/bench/` builds, never on the production [`Store`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;
use sqlx::types::Json;
use uuid::Uuid;

use sqlx::PgPool;

use super::{Store, StoreError};
use crate::domain::{
    AccountSelector, AccountType, Decision, Domain, HeldOrderEvent, ResolvedTarget, Target,
    VirtualAccountChoice,
};

/// Makes the `$1` open cases due last due a second ago.
const MAKE_DUE: &str = "UPDATE case_schedule SET due_at = now() - interval '1 second' \
     WHERE case_id IN (SELECT case_id FROM case_schedule ORDER BY due_at DESC LIMIT $1)";

/// Seeds cases `from..from + n` in state `watching`, each with its
/// schedule row (see [`BenchTables::seed_watching`]).
const SEED_WATCHING: &str = r#"
WITH c AS (
    INSERT INTO cases (id, order_key, sales_order_number, state, event_id, event, hold_reason,
                       held_at, watching_since, assigned_at, polls,
                       idempotency_key, assignment_id, created_at, updated_at,
                       rule_name, rules_hash, decision, target)
    SELECT gen_random_uuid(),
           'bench-w' || g,
           'bench-w' || g,
           'watching',
           'bench-watch-' || g,
           $3::jsonb,
           'NO_SMART_ACCOUNT',
           $4::timestamptz,
           $4::timestamptz,
           $4::timestamptz,
           1,
           'bench-key-' || g,
           'bench-assignment-' || g,
           $4::timestamptz,
           $4::timestamptz,
           $7::jsonb->>'rule',
           $7::jsonb->>'rules_hash',
           $7::jsonb,
           $8::jsonb
    FROM generate_series($1::bigint, $1::bigint + $2::bigint - 1) AS g
    RETURNING id
)
INSERT INTO case_schedule (case_id, due_at)
SELECT id, $4::timestamptz + make_interval(secs => $5::float8 + random() * $6::float8)
FROM c
"#;

/// The customer account of every seeded watched case.
const WATCHED_DOMAIN: &str = "acme.example";

/// The decision of every seeded watched case: a rule's customer account,
/// found by its domain, and that account's default Virtual Account.
fn watched_decision() -> Decision {
    let target = Target {
        account: AccountSelector::Domain(
            Domain::parse(WATCHED_DOMAIN).expect("a constant, valid domain"),
        ),
        account_type: AccountType::Customer,
        virtual_account: VirtualAccountChoice::AccountDefault,
    };
    Decision {
        rule: "bench".into(),
        rules_hash: "0".repeat(64),
        target,
        fallback: None,
    }
}

/// What [`watched_decision`] resolved to and was assigned.
fn watched_target() -> ResolvedTarget {
    ResolvedTarget {
        smart_account_domain: WATCHED_DOMAIN.into(),
        account_type: AccountType::Customer,
        virtual_account_name: Some("DEFAULT".into()),
        via_fallback: false,
    }
}

/// History lines of each seeded closed case (see [`SEED_CLOSED`]).
pub const CLOSED_HISTORY_PER_CASE: u64 = 6;

/// Seeds closed cases `from..from + n` (see [`BenchTables::seed_closed`]).
const SEED_CLOSED: &str = r#"
WITH c AS (
    INSERT INTO cases (id, order_key, sales_order_number, state, event_id, event, hold_reason,
                       held_at, assigned_at, polls, idempotency_key,
                       assignment_id, created_at, updated_at, released_at, closed_at)
    SELECT gen_random_uuid(), 'bench-c' || g, 'bench-c' || g, 'released',
           'bench-closed-' || g, $3::jsonb, 'NO_SMART_ACCOUNT', t, t, 1,
           'bench-key-c' || g, 'bench-assignment-c' || g,
           t, t + interval '1 hour', t + interval '1 hour', t + interval '1 hour'
    FROM generate_series($1::bigint, $1::bigint + $2::bigint - 1) AS g,
         LATERAL (SELECT now() - interval '800 days' + make_interval(secs => g::float8) AS t) AS x
    RETURNING id, event_id, closed_at
),
h AS (
    INSERT INTO case_history (case_id, at, kind, state)
    SELECT c.id, c.closed_at, k.kind, k.state
    FROM c, (VALUES ('opened', 'deciding'), ('decided', 'resolving'), ('call', 'resolving'),
                    ('assigned', 'watching'), ('call', 'watching'), ('released', 'released'))
            AS k (kind, state)
),
o AS (
    INSERT INTO outbox (envelope_id, case_id, routing_key, body, created_at, sent_at)
    SELECT gen_random_uuid(), c.id, 'order.hold_released', $3::jsonb, c.closed_at, c.closed_at
    FROM c
)
INSERT INTO inbox (event_id, case_id, received_at)
SELECT c.event_id, c.id, c.closed_at - interval '1 hour' FROM c
"#;

/// The reference write of section 2, as `INSERT … SELECT unnest(…)`: the
/// rows intake makes durable for new orders (inbox id and case), and
/// nothing else: no lookup of open or closed cases, no
/// conflict handling, no outcome per event.
const REFERENCE_UNNEST: &str = r#"
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                         $6::timestamptz[], $7::jsonb[])
         AS t(event_id, case_id, sales_order_number, web_order_id, hold_reason, held_at, event)
),
inbox_rows AS (
    INSERT INTO inbox (event_id, case_id) SELECT event_id, case_id FROM input
),
case_rows AS (
    INSERT INTO cases (id, order_key, sales_order_number, web_order_id, state, event_id,
                       event, hold_reason, held_at)
    SELECT case_id, coalesce(sales_order_number, 'web:' || web_order_id), sales_order_number,
           web_order_id, 'deciding', event_id, event, hold_reason, coalesce(held_at, now())
    FROM input
)
INSERT INTO case_schedule (case_id) SELECT case_id FROM input
"#;

/// The statements run per event or per step, whose plans must stay on the
/// indexes however the tables grew (see [`BenchTables::explain_generic`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hot {
    /// Intake's statement ([`Store::record_held`]).
    Intake,
    /// The claim's statement (the first half of [`Store::claim_due`]).
    Claim,
    /// The read of the claimed cases (its second half).
    ReadClaimed,
    /// The engine's step commit.
    CommitSteps,
    /// The outbox relay's take of unsent rows.
    OutboxTake,
    /// The outbox relay's look for the next unsent row's time.
    OutboxNextDue,
}

impl Hot {
    /// Every one of them.
    pub const ALL: [Hot; 6] = [
        Hot::Intake,
        Hot::Claim,
        Hot::ReadClaimed,
        Hot::CommitSteps,
        Hot::OutboxTake,
        Hot::OutboxNextDue,
    ];

    /// The statement.
    fn sql(self) -> &'static str {
        match self {
            Hot::Intake => super::intake::RECORD_HELD,
            Hot::Claim => super::cases::CLAIM_DUE,
            Hot::ReadClaimed => super::cases::CLAIMED,
            Hot::CommitSteps => super::cases::COMMIT_STEPS,
            Hot::OutboxTake => super::outbox::OUTBOX_TAKE,
            Hot::OutboxNextDue => super::outbox::OUTBOX_NEXT_DUE,
        }
    }
}

/// The number of parameters of `sql`: its highest `$n`.
fn parameters(sql: &str) -> usize {
    sql.split('$')
        .skip(1)
        .filter_map(|rest| {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            rest[..digits].parse().ok()
        })
        .max()
        .unwrap_or(0)
}

/// The text lines of an `EXPLAIN`'s rows.
fn plan_lines(rows: &[sqlx::postgres::PgRow]) -> Result<Vec<String>, StoreError> {
    rows.iter()
        .map(|r| r.try_get::<String, _>(0).map_err(StoreError::from))
        .collect()
}

/// How the reference write of section 2 sends its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReferenceWrite {
    /// One statement of arrays ([`REFERENCE_UNNEST`]).
    Unnest,
    /// `COPY … FROM STDIN` (text format) into each table, in one transaction.
    Copy,
}

impl ReferenceWrite {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unnest => "unnest",
            Self::Copy => "copy",
        }
    }
}

/// The benchmark's own database, for the statements only the benchmark
/// runs (`TRUNCATE` of every table among them).
#[derive(Clone, Debug)]
pub struct BenchTables {
    pool: PgPool,
}

impl BenchTables {
    /// The tables of the benchmark's store (its own database).
    pub fn new(store: &Store) -> Self {
        Self {
            pool: store.pool().clone(),
        }
    }

    /// Empties every table of the service (the benchmark's own database only),
    /// and with `CASCADE` every table whose rows point at a case.
    pub async fn truncate(&self) -> Result<(), StoreError> {
        sqlx::query("TRUNCATE inbox, outbox, case_history, case_schedule, cases CASCADE")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Event ids intake has recorded.
    pub async fn inbox_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM inbox")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Inserts `n` cases in state `watching`, numbered from `from`, whose
    /// next look falls at a random moment between `start` plus `offset` and
    /// `start` plus `offset + spread` seconds; each carries `event` (a valid
    /// held-order event, as intake would have stored it) and what the engine
    /// wrote on the way to watching (the decision, the resolved target, the
    /// assignment), so a claim reads cases the engine can step. One
    /// statement.
    pub async fn seed_watching(
        &self,
        from: i64,
        n: i64,
        event: &Value,
        start: DateTime<Utc>,
        offset: Duration,
        spread: Duration,
    ) -> Result<(), StoreError> {
        sqlx::query(SEED_WATCHING)
            .bind(from)
            .bind(n)
            .bind(event)
            .bind(start)
            .bind(offset.as_secs_f64())
            .bind(spread.as_secs_f64())
            .bind(Json(watched_decision()))
            .bind(Json(watched_target()))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Inserts `n` released cases, numbered from `from`, closed more than
    /// two years ago (past every default retention), each with
    /// [`CLOSED_HISTORY_PER_CASE`] history lines, its published event
    /// (`event` as the body) and its inbox id. One statement.
    pub async fn seed_closed(&self, from: i64, n: i64, event: &Value) -> Result<(), StoreError> {
        sqlx::query(SEED_CLOSED)
            .bind(from)
            .bind(n)
            .bind(event)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// `VACUUM ANALYZE` of every table intake, the engine and the pruner use.
    pub async fn vacuum_all(&self) -> Result<(), StoreError> {
        sqlx::query("VACUUM ANALYZE cases, case_schedule, case_history, outbox, inbox")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Refreshes the planner's statistics of the cases and their schedule
    /// (autovacuum would, a little later).
    pub async fn analyze(&self) -> Result<(), StoreError> {
        sqlx::query("VACUUM ANALYZE cases, case_schedule")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A checkpoint before a timed run, so that none started by an earlier
    /// section's writes lands in it. Best effort: a role that may not
    /// `CHECKPOINT` measures without it.
    pub async fn checkpoint(&self) {
        if let Err(e) = sqlx::query("CHECKPOINT").execute(&self.pool).await {
            tracing::debug!(error = %e, "No checkpoint before the timed run.");
        }
    }

    /// Makes the `n` open cases due last due now (they then wait a second
    /// past their time, as cases do between two claims).
    pub async fn make_due(&self, n: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(MAKE_DUE)
            .bind(n)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// The plan PostgreSQL picks for the engine's claim, as text lines.
    pub async fn explain_claim(&self, limit: i64) -> Result<Vec<String>, StoreError> {
        // A fixed prefix on a constant statement: nothing from outside.
        let sql = sqlx::AssertSqlSafe(format!("EXPLAIN {}", super::cases::CLAIM_DUE));
        self.plan(
            sqlx::query(sql)
                .bind("bench-explain")
                .bind(30.0f64)
                .bind(limit),
        )
        .await
    }

    /// The plan PostgreSQL picks for intake's statement on `events`
    /// ([`Store::record_held`]), as text lines.
    pub async fn explain_intake(
        &self,
        events: &[HeldOrderEvent],
    ) -> Result<Vec<String>, StoreError> {
        self.plan(super::intake::explain_query(events)).await
    }

    /// The generic plan PostgreSQL would cache for `statement` after its
    /// fifth run on a session (`plan_cache_mode = force_generic_plan`,
    /// `PREPARE`, `EXPLAIN EXECUTE`), as text lines. A generic plan is made
    /// once from the statistics of that moment and kept while the tables
    /// grow: one made on an empty table must still use the indexes.
    pub async fn explain_generic(&self, statement: Hot) -> Result<Vec<String>, StoreError> {
        let sql = statement.sql();
        let args = match parameters(sql) {
            0 => String::new(),
            n => format!("({})", vec!["NULL"; n].join(", ")),
        };
        // A session of its own, closed afterwards: the setting and the
        // prepared statement go with it. Constant statements: nothing from
        // outside.
        let mut conn = self.pool.acquire().await?;
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET plan_cache_mode = force_generic_plan; \
             PREPARE bench_generic AS {sql}; \
             EXPLAIN EXECUTE bench_generic{args}"
        )))
        .fetch_all(&mut *conn)
        .await;
        conn.close().await?;
        plan_lines(&rows?)
    }

    /// The lines an `EXPLAIN` query prints.
    async fn plan(
        &self,
        explain: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Vec<String>, StoreError> {
        plan_lines(&explain.fetch_all(&self.pool).await?)
    }

    /// Section 2's reference: makes `events` durable as new orders (each a
    /// new case and its inbox id) in one transaction,
    /// the cheapest way `how` can, checking nothing. Returns the events
    /// written.
    pub async fn write_reference(
        &self,
        how: ReferenceWrite,
        events: &[HeldOrderEvent],
    ) -> Result<u64, StoreError> {
        let now = Utc::now();
        let case_ids: Vec<Uuid> = events.iter().map(|_| Uuid::new_v4()).collect();
        let held_at: Vec<Option<DateTime<Utc>>> =
            events.iter().map(|e| e.data.held_at.or(e.time)).collect();
        let mut tx = self.pool.begin().await?;
        match how {
            ReferenceWrite::Unnest => {
                let order = |e: &HeldOrderEvent| e.data.order.clone();
                sqlx::query(REFERENCE_UNNEST)
                    .bind(events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>())
                    .bind(&case_ids)
                    .bind(
                        events
                            .iter()
                            .map(|e| order(e).sales_order_number.map(|s| s.to_string()))
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        events
                            .iter()
                            .map(|e| order(e).web_order_id.map(|w| w.to_string()))
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        events
                            .iter()
                            .map(|e| e.data.hold_reason.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(&held_at)
                    .bind(events.iter().map(Json).collect::<Vec<_>>())
                    .execute(&mut *tx)
                    .await?;
            }
            ReferenceWrite::Copy => {
                let rows = CopyRows::of(events, &case_ids, &held_at, now)?;
                for (statement, data) in [
                    ("COPY inbox (event_id, case_id) FROM STDIN", rows.inbox),
                    (
                        "COPY cases (id, order_key, sales_order_number, web_order_id, state, \
                         event_id, event, hold_reason, held_at) FROM STDIN",
                        rows.cases,
                    ),
                    ("COPY case_schedule (case_id) FROM STDIN", rows.schedule),
                ] {
                    let mut copy = tx.copy_in_raw(statement).await?;
                    copy.send(data).await?;
                    copy.finish().await?;
                }
            }
        }
        tx.commit().await?;
        Ok(events.len() as u64)
    }

    /// The server's version (`SHOW server_version`).
    pub async fn server_version(&self) -> Result<String, StoreError> {
        Ok(sqlx::query_scalar("SHOW server_version")
            .fetch_one(&self.pool)
            .await?)
    }
}

/// The reference's rows in `COPY`'s text format, one buffer per table.
struct CopyRows {
    inbox: Vec<u8>,
    cases: Vec<u8>,
    schedule: Vec<u8>,
}

impl CopyRows {
    fn of(
        events: &[HeldOrderEvent],
        case_ids: &[Uuid],
        held_at: &[Option<DateTime<Utc>>],
        now: DateTime<Utc>,
    ) -> Result<Self, StoreError> {
        use std::fmt::Write;
        let (mut inbox, mut cases, mut schedule) = (String::new(), String::new(), String::new());
        let now = now.to_rfc3339();
        for ((e, id), held) in events.iter().zip(case_ids).zip(held_at) {
            let event_id = copy_text(e.id.as_str());
            let held = held.map_or_else(|| now.clone(), |h| h.to_rfc3339());
            let so = e
                .data
                .order
                .sales_order_number
                .as_ref()
                .map(|s| s.to_string());
            let web = e.data.order.web_order_id.as_ref().map(|w| w.to_string());
            let key = e.data.order.key();
            let json = serde_json::to_string(e).map_err(|err| StoreError::Corrupt {
                table: "cases",
                detail: format!("event not serialisable: {err}"),
            })?;
            let opt = |v: Option<String>| v.map_or_else(|| "\\N".to_owned(), |v| copy_text(&v));
            // Writing to a String cannot fail.
            let _ = writeln!(inbox, "{event_id}\t{id}");
            let _ = writeln!(schedule, "{id}");
            let _ = writeln!(
                cases,
                "{id}\t{}\t{}\t{}\tdeciding\t{event_id}\t{}\t{}\t{held}",
                copy_text(&key),
                opt(so),
                opt(web),
                copy_text(&json),
                e.data.hold_reason.as_str(),
            );
        }
        Ok(Self {
            inbox: inbox.into_bytes(),
            cases: cases.into_bytes(),
            schedule: schedule.into_bytes(),
        })
    }
}

/// A value in `COPY`'s text format: backslash, tab and line breaks escaped.
fn copy_text(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 8);
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}
