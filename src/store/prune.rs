//! Retention: the pruner's statements. Each table's rule is written once,
//! as an SQL predicate that both the slice `DELETE` and the dry run's
//! count use, so `holdclear prune --dry-run` counts what a pass deletes.
//!
//! A pass runs on a [`PruneSession`]: a connection of its own (outside the
//! pool) holding PostgreSQL's advisory lock [`PRUNE_LOCK`] for as long as
//! it lives, so one worker of the deployment prunes at a time; a worker
//! that dies mid-pass closes the connection and the lock goes with it.

use chrono::{DateTime, Utc};

use super::session_lock::SessionLock;
use super::{Store, StoreError};

/// The advisory lock key of the pruner ("holdprun" in ASCII).
pub const PRUNE_LOCK: i64 = 0x686f_6c64_7072_756e;

/// A table the pruner keeps small, in the order a pass prunes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PruneTable {
    /// Published events' rows.
    Outbox,
    /// Event ids already taken.
    Inbox,
    /// Closed cases (their history and outbox rows go with them).
    Cases,
    /// Archived and replayed dead letters (their sightings and notes go
    /// with them).
    DeadLetters,
}

impl PruneTable {
    /// Every table, in the order of a pass.
    pub const ALL: [PruneTable; 4] = [
        PruneTable::Outbox,
        PruneTable::Inbox,
        PruneTable::Cases,
        PruneTable::DeadLetters,
    ];

    /// The table's name in PostgreSQL (and the metrics' `table` label).
    pub fn as_str(self) -> &'static str {
        match self {
            PruneTable::Outbox => "outbox",
            PruneTable::Inbox => "inbox",
            PruneTable::Cases => "cases",
            PruneTable::DeadLetters => "dead_letters",
        }
    }
}

/// The tables whose size `/metrics` reports (estimated, from `pg_class`).
pub const SIZED_TABLES: [&str; 6] = [
    "cases",
    "case_history",
    "outbox",
    "inbox",
    "dead_letters",
    "dead_letter_sightings",
];

/// The cut-offs of one pass: a row older than its table's is deleted;
/// `None` keeps the table's rows for ever.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cutoffs {
    /// Outbox rows sent before this.
    pub outbox: Option<DateTime<Utc>>,
    /// Inbox ids received before this.
    pub inbox: Option<DateTime<Utc>>,
    /// Released and merged cases closed before this.
    pub cases: Option<DateTime<Utc>>,
    /// Escalated cases last changed before this.
    pub escalated_cases: Option<DateTime<Utc>>,
    /// Dead letters archived, or replayed and not seen since, before this.
    pub dead_letters: Option<DateTime<Utc>>,
}

impl Cutoffs {
    /// Whether a pass deletes anything from `table`.
    pub fn prunes(&self, table: PruneTable) -> bool {
        match table {
            PruneTable::Outbox => self.outbox.is_some(),
            PruneTable::Inbox => self.inbox.is_some(),
            PruneTable::Cases => self.cases.is_some() || self.escalated_cases.is_some(),
            PruneTable::DeadLetters => self.dead_letters.is_some(),
        }
    }
}

/// Published rows sent before `$1`; an unsent row never.
const OUTBOX_RULE: &str = "FROM outbox WHERE sent_at < $1";

/// Ids received before `$1`.
const INBOX_RULE: &str = "FROM inbox WHERE received_at < $1";

/// Closed cases past their retention: released and merged ones closed
/// before `$1`, escalated ones last changed before `$2` (an operator's
/// `cases retry` reopens one, and an open case is never taken). Never a
/// case with an event not yet published (it would go with the case), a
/// case another case was merged into (the merged one goes first), or a
/// merged case whose order's case is still open (`cases show` of the order
/// still tells the story), nor an escalated case still watched for a
/// person's fix (`store::hand_fixes::WATCHED_CASE`).
const CASES_RULE: &str = "FROM cases c \
     WHERE c.state IN ('released', 'escalated', 'merged') \
       AND ((c.state <> 'escalated' AND c.closed_at < $1) \
         OR (c.state = 'escalated' AND c.closed_at < $2 AND c.updated_at < $2)) \
       AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.case_id = c.id AND o.sent_at IS NULL) \
       AND NOT EXISTS (SELECT 1 FROM hand_watches w WHERE w.case_id = c.id AND w.ended_at IS NULL) \
       AND NOT EXISTS (SELECT 1 FROM cases m WHERE m.merged_into = c.id) \
       AND NOT EXISTS (SELECT 1 FROM cases k WHERE k.id = c.merged_into \
                       AND k.state NOT IN ('released', 'escalated', 'merged'))";

/// Archived before `$1`, or replayed before `$1` and not seen since; a
/// dead letter nobody handled never (#15).
const DEAD_LETTERS_RULE: &str = "FROM dead_letters \
     WHERE archived_at < $1 OR (last_replayed_at < $1 AND last_seen < last_replayed_at)";

/// What a dry run counts: each table's rows a pass would delete, and what
/// goes with them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prunable {
    /// `(table, rows)` in the order of a pass; the rows that go with a
    /// table's (cascade) follow it, named `case_history` and
    /// `dead_letter_sightings`.
    pub rows: Vec<(&'static str, i64)>,
}

/// A session holding the pruner's advisory lock (see the module's doc).
/// Dropped, its connection closes and the lock is released.
pub struct PruneSession {
    lock: SessionLock,
}

impl Store {
    /// The pruner's session, or `None` when another worker holds the lock.
    pub async fn try_prune_session(&self) -> Result<Option<PruneSession>, StoreError> {
        Ok(SessionLock::try_acquire(self.pool(), PRUNE_LOCK)
            .await?
            .map(|lock| PruneSession { lock }))
    }

    /// What a pass with `cutoffs` would delete now, per table (a table
    /// kept for ever counts 0). Exact counts: on a large backlog this
    /// reads it all, so the statement has no time limit of its own.
    pub async fn prunable(&self, cutoffs: &Cutoffs) -> Result<Prunable, StoreError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("SET LOCAL statement_timeout = 0")
            .execute(&mut *tx)
            .await?;
        let count =
            |sql: String| sqlx::query_scalar::<sqlx::Postgres, i64>(sqlx::AssertSqlSafe(sql));
        let mut rows = Vec::new();
        rows.push((
            "outbox",
            count(format!("SELECT count(*) {OUTBOX_RULE}"))
                .bind(cutoffs.outbox)
                .fetch_one(&mut *tx)
                .await?,
        ));
        rows.push((
            "inbox",
            count(format!("SELECT count(*) {INBOX_RULE}"))
                .bind(cutoffs.inbox)
                .fetch_one(&mut *tx)
                .await?,
        ));
        let (cases, history): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "WITH doomed AS (SELECT c.id {CASES_RULE}) \
             SELECT (SELECT count(*) FROM doomed), \
                    (SELECT count(*) FROM case_history h WHERE h.case_id IN (SELECT id FROM doomed))"
        )))
        .bind(cutoffs.cases)
        .bind(cutoffs.escalated_cases)
        .fetch_one(&mut *tx)
        .await?;
        rows.push(("cases", cases));
        rows.push(("case_history", history));
        let (letters, sightings): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "WITH doomed AS (SELECT id {DEAD_LETTERS_RULE}) \
             SELECT (SELECT count(*) FROM doomed), \
                    (SELECT count(*) FROM dead_letter_sightings s \
                     WHERE s.dead_letter_id IN (SELECT id FROM doomed))"
        )))
        .bind(cutoffs.dead_letters)
        .fetch_one(&mut *tx)
        .await?;
        rows.push(("dead_letters", letters));
        rows.push(("dead_letter_sightings", sightings));
        tx.commit().await?;
        Ok(Prunable { rows })
    }

    /// Records a finished pass: when, by whom, what it deleted.
    pub async fn record_prune_pass(
        &self,
        worker: &str,
        deleted: &[(PruneTable, u64)],
    ) -> Result<(), StoreError> {
        let deleted: serde_json::Map<String, serde_json::Value> = deleted
            .iter()
            .map(|(t, n)| (t.as_str().to_owned(), (*n).into()))
            .collect();
        sqlx::query(
            "INSERT INTO prune_passes (finished_at, worker, deleted) VALUES (now(), $1, $2) \
             ON CONFLICT (singleton) DO UPDATE \
             SET finished_at = excluded.finished_at, worker = excluded.worker, \
                 deleted = excluded.deleted",
        )
        .bind(worker)
        .bind(serde_json::Value::Object(deleted))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// When the last pass finished without an error, if one ever did.
    pub async fn last_prune_pass(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT finished_at FROM prune_passes WHERE singleton")
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Rows per table of [`SIZED_TABLES`], as PostgreSQL estimates them
    /// (`pg_class.reltuples`, kept by autovacuum and `ANALYZE`; 0 before
    /// the first).
    pub async fn table_row_estimates(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT t, greatest(c.reltuples, 0)::bigint \
             FROM unnest($1::text[]) WITH ORDINALITY AS u (t, n) \
             JOIN pg_class c ON c.oid = to_regclass(u.t) ORDER BY u.n",
        )
        .bind(&SIZED_TABLES[..])
        .fetch_all(self.pool())
        .await?)
    }
}

impl PruneSession {
    /// Deletes at most `limit` rows of `table` past its cut-off, oldest
    /// first, in one short statement (its own transaction); rows another
    /// transaction holds are skipped, never waited for. Returns how many
    /// rows of `table` it deleted (not counting those that went with
    /// them). A table kept for ever deletes nothing.
    pub async fn delete_slice(
        &mut self,
        table: PruneTable,
        cutoffs: &Cutoffs,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let (sql, cutoff) = match table {
            PruneTable::Outbox => (
                format!("SELECT id {OUTBOX_RULE} ORDER BY sent_at"),
                cutoffs.outbox,
            ),
            PruneTable::Inbox => (
                format!("SELECT event_id {INBOX_RULE} ORDER BY received_at"),
                cutoffs.inbox,
            ),
            PruneTable::DeadLetters => (
                format!("SELECT id {DEAD_LETTERS_RULE}"),
                cutoffs.dead_letters,
            ),
            PruneTable::Cases => return self.delete_cases(cutoffs, limit).await,
        };
        let key = if table == PruneTable::Inbox {
            "event_id"
        } else {
            "id"
        };
        let name = table.as_str();
        Ok(sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {name} WHERE {key} IN ({sql} LIMIT $2 FOR UPDATE SKIP LOCKED)"
        )))
        .bind(cutoff)
        .bind(limit)
        .execute(self.lock.conn())
        .await?
        .rows_affected())
    }

    async fn delete_cases(&mut self, cutoffs: &Cutoffs, limit: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM cases WHERE id IN ( \
                 SELECT c.id {CASES_RULE} \
                 ORDER BY c.closed_at LIMIT $3 FOR UPDATE OF c SKIP LOCKED)"
        )))
        .bind(cutoffs.cases)
        .bind(cutoffs.escalated_cases)
        .bind(limit)
        .execute(self.lock.conn())
        .await?
        .rows_affected())
    }

    /// Releases the lock and closes the session.
    pub async fn release(self) -> Result<(), StoreError> {
        self.lock.release().await
    }
}
