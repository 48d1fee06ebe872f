//! What operators do, once, for the CLI (`holdclear dlq`, `holdclear
//! cases`) and the console alike: replay dead letters (selection, dry-run
//! preview, rate, batches, resume, cancel) and act on dead letters and
//! cases (archive, claim, note; retry, close). Every action is an audited
//! operation in the store: who did what, when, and what came of it.
//!
//! - [`replay`]: the replay operation, from preview to report.
//! - [`actions`]: the one-shot actions on dead letters and cases.

pub mod actions;
pub mod replay;

use crate::broker::BrokerError;
use crate::store::StoreError;

/// Why an operation could not be done.
#[derive(Debug, thiserror::Error)]
pub enum OperationError {
    /// PostgreSQL failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// RabbitMQ failed: a replay stops there and can be resumed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// What the operator asked for cannot be done as asked (the message
    /// says why and what to do): a usage error in the CLI, 400 in the console.
    #[error("{0}")]
    Refused(String),
    /// The dead letter, case or operation named does not exist.
    #[error("{0}")]
    NotFound(String),
}

/// Who acts: a name for the audit trail, never empty.
pub fn operator_name(given: Option<&str>) -> String {
    given
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.chars().take(200).collect())
        .unwrap_or_else(|| "unknown".to_owned())
}
