//! One-shot actions, each an audited operation: on dead letters (archive,
//! claim, note) and on cases (retry after the cause was fixed, close as
//! handled by hand with a note, claim, note with a ticket reference).

use serde_json::json;
use uuid::Uuid;

use super::OperationError;
use crate::domain::Case;
use crate::engine::{EngineError, retry_case};
use crate::store::{Audited, Closed, DeadLetterFilter, Store};

/// Longest note or ticket reference kept.
pub const MAX_NOTE: usize = 4000;

fn bounded(what: &str, text: &str) -> Result<String, OperationError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(OperationError::Refused(format!("the {what} is empty")));
    }
    if text.len() > MAX_NOTE {
        return Err(OperationError::Refused(format!(
            "the {what} is longer than {MAX_NOTE} bytes"
        )));
    }
    Ok(text.to_owned())
}

fn ticket(raw: Option<&str>) -> Result<Option<String>, OperationError> {
    raw.map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| bounded("ticket reference", t))
        .transpose()
}

/// The dead letters named by id, or every one of a group (not both).
pub async fn chosen(
    store: &Store,
    ids: Vec<i64>,
    group: Option<String>,
) -> Result<Vec<i64>, OperationError> {
    match (ids.is_empty(), group) {
        (false, None) => Ok(ids),
        (true, Some(group)) => Ok(store
            .dead_letter_ids(&DeadLetterFilter {
                group: Some(group),
                ..DeadLetterFilter::default()
            })
            .await?),
        _ => Err(OperationError::Refused(
            "give dead letter IDs or a group (not both)".into(),
        )),
    }
}

/// Archives dead letters.
pub async fn archive(
    store: &Store,
    operator: &str,
    ids: &[i64],
) -> Result<Audited, OperationError> {
    Ok(store.archive_dead_letters(ids, operator).await?)
}

/// Claims dead letters for `operator`.
pub async fn claim(store: &Store, operator: &str, ids: &[i64]) -> Result<Audited, OperationError> {
    Ok(store.claim_dead_letters(ids, operator).await?)
}

/// Adds a note (and a ticket reference) to a dead letter.
pub async fn note(
    store: &Store,
    operator: &str,
    id: i64,
    text: &str,
    ticket_ref: Option<&str>,
) -> Result<Audited, OperationError> {
    let text = bounded("note", text)?;
    let ticket_ref = ticket(ticket_ref)?;
    store
        .note_dead_letter(id, operator, &text, ticket_ref.as_deref())
        .await?
        .ok_or_else(|| OperationError::NotFound(format!("no dead letter {id}")))
}

/// Re-opens the escalated case of `order` (an order id or a case id) so
/// that the engine takes it again; recorded as `case retry`.
pub async fn retry(
    store: &Store,
    operator: &str,
    order: &str,
) -> Result<(Case, Uuid), OperationError> {
    let case = retry_case(store, order).await.map_err(|e| match e {
        EngineError::Store(e) => OperationError::Store(e),
        EngineError::NoCase(_) => OperationError::NotFound(e.to_string()),
        e => OperationError::Refused(e.to_string()),
    })?;
    let operation = store
        .record_operation(
            "case retry",
            operator,
            &json!({"order": order, "state": case.state().as_str(), "generation": case.generation}),
            Some(case.id),
        )
        .await?;
    Ok((case, operation))
}

/// The id of the latest case of `order` (an order id or a case id).
pub async fn case_id(store: &Store, order: &str) -> Result<Uuid, OperationError> {
    Ok(store
        .latest_case(order)
        .await?
        .ok_or_else(|| OperationError::NotFound(format!("no case for order {order}")))?
        .case
        .id)
}

/// Closes an escalated case as handled by hand, with a note.
pub async fn close(
    store: &Store,
    operator: &str,
    case: Uuid,
    text: &str,
    ticket_ref: Option<&str>,
) -> Result<Audited, OperationError> {
    let text = bounded("note", text)?;
    let ticket_ref = ticket(ticket_ref)?;
    match store
        .close_case(case, operator, &text, ticket_ref.as_deref())
        .await?
    {
        Closed::Closed(a) => Ok(a),
        Closed::NoCase => Err(OperationError::NotFound(format!("no case {case}"))),
        Closed::NotEscalated => Err(OperationError::Refused(format!(
            "case {case} is not escalated: only an escalated case is closed by hand"
        ))),
    }
}

/// Claims a case for `operator`.
pub async fn claim_case(
    store: &Store,
    operator: &str,
    case: Uuid,
) -> Result<Audited, OperationError> {
    store
        .claim_case(case, operator)
        .await?
        .ok_or_else(|| OperationError::NotFound(format!("no case {case}")))
}

/// Adds a note (and a ticket reference) to a case.
pub async fn note_case(
    store: &Store,
    operator: &str,
    case: Uuid,
    text: &str,
    ticket_ref: Option<&str>,
) -> Result<Audited, OperationError> {
    let text = bounded("note", text)?;
    let ticket_ref = ticket(ticket_ref)?;
    store
        .note_case(case, operator, &text, ticket_ref.as_deref())
        .await?
        .ok_or_else(|| OperationError::NotFound(format!("no case {case}")))
}
