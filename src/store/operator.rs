//! Operators' actions, each written with its audit row in one transaction:
//! claims, notes and archives of dead letters; claims, notes and closes of
//! cases (a case retry is the engine's `commit_retry`, audited by
//! [`Store::record_operation`]); cancelling a replay.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::{Store, StoreError};

/// An action that was recorded, with the operation that audits it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Audited {
    /// The operation's id.
    pub operation: Uuid,
    /// Rows the action changed.
    pub changed: u64,
}

/// What [`Store::close_case`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// Closed as handled by hand.
    Closed(Audited),
    /// No such case.
    NoCase,
    /// Only an escalated case is closed by hand; this one is not.
    NotEscalated,
}

/// An operator's note on a case.
#[derive(Clone, Debug, Serialize)]
pub struct CaseNote {
    /// When.
    pub written_at: DateTime<Utc>,
    /// Who.
    pub operator: String,
    /// What.
    pub text: String,
    /// A ticket reference.
    pub ticket: Option<String>,
}

/// Writes the operation that audits one action, finished, in `tx`.
async fn audit(
    tx: &mut Transaction<'static, Postgres>,
    kind: &str,
    operator: &str,
    selection: &Value,
    case_id: Option<Uuid>,
    dead_letters: &[i64],
) -> Result<Uuid, StoreError> {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO operations (id, kind, operator, selection, status, case_id, finished_at)
         VALUES ($1, $2, $3, $4, 'done', $5, now())",
    )
    .bind(id)
    .bind(kind)
    .bind(operator)
    .bind(selection)
    .bind(case_id)
    .execute(&mut **tx)
    .await?;
    if !dead_letters.is_empty() {
        sqlx::query(
            "INSERT INTO operation_items (operation_id, dead_letter_id, position)
             SELECT $1, x.id, t.p::int FROM unnest($2::bigint[]) WITH ORDINALITY AS t(dl, p)
             JOIN dead_letters x ON x.id = t.dl",
        )
        .bind(id)
        .bind(dead_letters)
        .execute(&mut **tx)
        .await?;
    }
    Ok(id)
}

impl Store {
    /// Records an action done elsewhere (a case retry) as a finished operation.
    pub async fn record_operation(
        &self,
        kind: &str,
        operator: &str,
        selection: &Value,
        case_id: Option<Uuid>,
    ) -> Result<Uuid, StoreError> {
        let mut tx = self.pool().begin().await?;
        let id = audit(&mut tx, kind, operator, selection, case_id, &[]).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Hides dead letters from lists (they stay stored), audited as an
    /// `archive` operation.
    pub async fn archive_dead_letters(
        &self,
        ids: &[i64],
        operator: &str,
    ) -> Result<Audited, StoreError> {
        let mut tx = self.pool().begin().await?;
        let changed = sqlx::query(
            "UPDATE dead_letters SET archived_at = now() WHERE id = ANY($1) AND archived_at IS NULL",
        )
        .bind(ids)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let operation = audit(
            &mut tx,
            "archive",
            operator,
            &json!({"ids": ids}),
            None,
            ids,
        )
        .await?;
        tx.commit().await?;
        Ok(Audited { operation, changed })
    }

    /// Marks dead letters as taken by `operator`, audited as a `claim`.
    pub async fn claim_dead_letters(
        &self,
        ids: &[i64],
        operator: &str,
    ) -> Result<Audited, StoreError> {
        let mut tx = self.pool().begin().await?;
        let changed = sqlx::query(
            "UPDATE dead_letters SET claimed_by = $2, claimed_at = now() WHERE id = ANY($1)",
        )
        .bind(ids)
        .bind(operator)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let operation = audit(&mut tx, "claim", operator, &json!({"ids": ids}), None, ids).await?;
        tx.commit().await?;
        Ok(Audited { operation, changed })
    }

    /// Adds a note to a dead letter, audited as a `note`; `None` when there
    /// is no such dead letter.
    pub async fn note_dead_letter(
        &self,
        id: i64,
        operator: &str,
        text: &str,
        ticket: Option<&str>,
    ) -> Result<Option<Audited>, StoreError> {
        let mut tx = self.pool().begin().await?;
        let changed = sqlx::query(
            "INSERT INTO dead_letter_notes (dead_letter_id, operator, text, ticket)
             SELECT id, $2, $3, $4 FROM dead_letters WHERE id = $1",
        )
        .bind(id)
        .bind(operator)
        .bind(text)
        .bind(ticket)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            return Ok(None);
        }
        let selection = json!({"ids": [id], "text": text, "ticket": ticket});
        let operation = audit(&mut tx, "note", operator, &selection, None, &[id]).await?;
        tx.commit().await?;
        Ok(Some(Audited { operation, changed }))
    }

    /// Marks a case as taken by `operator`, audited as `case claim`; `None`
    /// when there is no such case.
    pub async fn claim_case(
        &self,
        case_id: Uuid,
        operator: &str,
    ) -> Result<Option<Audited>, StoreError> {
        let mut tx = self.pool().begin().await?;
        let changed =
            sqlx::query("UPDATE cases SET claimed_by = $2, claimed_at = now() WHERE id = $1")
                .bind(case_id)
                .bind(operator)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if changed == 0 {
            return Ok(None);
        }
        let operation = audit(
            &mut tx,
            "case claim",
            operator,
            &json!({}),
            Some(case_id),
            &[],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(Audited { operation, changed }))
    }

    /// Adds a note (and a ticket reference) to a case, audited as `case
    /// note`; `None` when there is no such case.
    pub async fn note_case(
        &self,
        case_id: Uuid,
        operator: &str,
        text: &str,
        ticket: Option<&str>,
    ) -> Result<Option<Audited>, StoreError> {
        let mut tx = self.pool().begin().await?;
        let changed = sqlx::query(
            "INSERT INTO case_notes (case_id, operator, text, ticket)
             SELECT id, $2, $3, $4 FROM cases WHERE id = $1",
        )
        .bind(case_id)
        .bind(operator)
        .bind(text)
        .bind(ticket)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            return Ok(None);
        }
        let selection = json!({"text": text, "ticket": ticket});
        let operation = audit(
            &mut tx,
            "case note",
            operator,
            &selection,
            Some(case_id),
            &[],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(Audited { operation, changed }))
    }

    /// Closes an escalated case as handled by hand: its note, a history
    /// line `closed` naming the operator, and the `case close` operation,
    /// in one transaction. The case stays escalated (no event: fulfilment
    /// learns of the release from the order itself); the escalation lists
    /// no longer show it.
    pub async fn close_case(
        &self,
        case_id: Uuid,
        operator: &str,
        note: &str,
        ticket: Option<&str>,
    ) -> Result<Closed, StoreError> {
        let mut tx = self.pool().begin().await?;
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM cases WHERE id = $1 FOR UPDATE")
                .bind(case_id)
                .fetch_optional(&mut *tx)
                .await?;
        match state.as_deref() {
            None => return Ok(Closed::NoCase),
            Some("escalated") => {}
            Some(_) => return Ok(Closed::NotEscalated),
        }
        sqlx::query(
            "UPDATE cases SET handled_at = now(), handled_by = $2, updated_at = now() WHERE id = $1",
        )
        .bind(case_id)
        .bind(operator)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO case_notes (case_id, operator, text, ticket) VALUES ($1, $2, $3, $4)",
        )
        .bind(case_id)
        .bind(operator)
        .bind(note)
        .bind(ticket)
        .execute(&mut *tx)
        .await?;
        let detail = json!({"by": operator, "note": note, "ticket": ticket});
        sqlx::query(
            "INSERT INTO case_history (case_id, kind, state, detail)
             VALUES ($1, 'closed', 'escalated', $2)",
        )
        .bind(case_id)
        .bind(&detail)
        .execute(&mut *tx)
        .await?;
        let operation = audit(&mut tx, "case close", operator, &detail, Some(case_id), &[]).await?;
        tx.commit().await?;
        Ok(Closed::Closed(Audited {
            operation,
            changed: 1,
        }))
    }

    /// The notes on a case, oldest first.
    pub async fn case_notes(&self, case_id: Uuid) -> Result<Vec<CaseNote>, StoreError> {
        let rows = sqlx::query(
            "SELECT written_at, operator, text, ticket FROM case_notes
             WHERE case_id = $1 ORDER BY id LIMIT 1000",
        )
        .bind(case_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                Ok::<_, sqlx::Error>(CaseNote {
                    written_at: r.try_get("written_at")?,
                    operator: r.try_get("operator")?,
                    text: r.try_get("text")?,
                    ticket: r.try_get("ticket")?,
                })
            })
            .collect::<Result<_, _>>()?)
    }

    /// Asks a replay to stop: the process running it stops before its next
    /// message; one that runs nowhere (interrupted) is cancelled at once.
    /// False when there is no such operation or it has ended.
    pub async fn request_cancel(&self, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE operations SET cancel_requested_at = now(), updated_at = now(),
                 status = CASE WHEN status = 'interrupted' THEN 'cancelled' ELSE status END,
                 finished_at = CASE WHEN status = 'interrupted' THEN now() END
             WHERE id = $1 AND status IN ('running', 'interrupted')",
        )
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Whether someone asked the operation to stop.
    pub async fn cancel_requested(&self, id: Uuid) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT cancel_requested_at IS NOT NULL FROM operations WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await?
        .unwrap_or(false))
    }
}
