//! Replaying stored dead letters as an operation: choose them (those whose
//! cause is the message itself only when forced), preview (how many, which
//! orders), start, send at a rate in batches, stop on ctrl-c, a broken
//! connection or a cancel request (from any process: the request is in the
//! store), resume, and report what became of each message.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::OperationError;
use crate::broker::replay::{Replayer, SendError};
use crate::broker::{Broker, BrokerError};
use crate::config::AmqpSettings;
use crate::domain::dead_letter::cause_is_in_message;
use crate::store::{DeadLetterFilter, DeadLetterSummary, Operation, OperationItem, Store};

/// Most dead letters one replay takes.
pub const MAX_SELECTION: i64 = 100_000;
/// How often a running replay looks for a cancel request, at most.
const CANCEL_CHECK: Duration = Duration::from_secs(1);

/// The options of a replay, kept in the operation's selection for a resume.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplayOptions {
    /// Which dead letters.
    pub filter: DeadLetterFilter,
    /// Messages per second, at most.
    pub rate: f64,
    /// Messages per batch (progress is reported after each).
    pub batch: usize,
    /// Also those whose cause is the message itself.
    pub force: bool,
    /// Also those that came from this exchange.
    pub to_exchange: Option<String>,
}

impl ReplayOptions {
    /// Refuses a rate that is not positive and a selection that names nothing.
    pub fn check(&self, all: bool) -> Result<(), OperationError> {
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            return Err(OperationError::Refused(
                "the rate must be greater than 0".into(),
            ));
        }
        if self.batch == 0 {
            return Err(OperationError::Refused(
                "the batch must be at least 1".into(),
            ));
        }
        let f = &self.filter;
        let names_some = !f.ids.is_empty()
            || f.code.is_some()
            || f.group.is_some()
            || f.order.is_some()
            || f.since.is_some()
            || f.until.is_some()
            || f.text.is_some();
        if !names_some && !all {
            return Err(OperationError::Refused(
                "say which dead letters to replay: IDs, --group, --code, --order, --text, --since/--until or --all"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// What a replay would send: the dry run, and the start of a real one.
#[derive(Clone, Debug, Serialize)]
pub struct Preview {
    /// The dead letters it sends, oldest first.
    pub chosen: Vec<i64>,
    /// Those refused: their cause is the message itself (not forced).
    pub refused: Vec<DeadLetterSummary>,
    /// The orders of the chosen ones, when their bodies name one.
    pub orders: Vec<String>,
}

/// Chooses the dead letters `options` select.
pub async fn preview(store: &Store, options: &ReplayOptions) -> Result<Preview, OperationError> {
    let mut rows = store
        .list_dead_letters(&options.filter, MAX_SELECTION, 0)
        .await?;
    rows.sort_by_key(|l| l.id);
    let mut p = Preview {
        chosen: Vec::new(),
        refused: Vec::new(),
        orders: Vec::new(),
    };
    for l in rows {
        if cause_is_in_message(&l.code) && !options.force {
            p.refused.push(l);
            continue;
        }
        if let Some(o) = l.sales_order_number.clone().or(l.web_order_id.clone()) {
            p.orders.push(o);
        }
        p.chosen.push(l.id);
    }
    Ok(p)
}

/// Starts the operation over the chosen dead letters (status `running`).
pub async fn start(
    store: &Store,
    operator: &str,
    options: &ReplayOptions,
    preview: &Preview,
) -> Result<Uuid, OperationError> {
    let selection = serde_json::to_value(options)
        .map_err(|e| OperationError::Refused(format!("the options do not serialise: {e}")))?;
    Ok(store
        .create_operation("replay", operator, &selection, &preview.chosen)
        .await?)
}

/// The options of an operation to resume; `None` when it is done or cancelled.
pub async fn resume(store: &Store, id: Uuid) -> Result<Option<ReplayOptions>, OperationError> {
    let op = store
        .operation(id)
        .await?
        .ok_or_else(|| OperationError::NotFound(format!("no operation {id}")))?;
    if op.kind != "replay" {
        return Err(OperationError::Refused(format!(
            "operation {id} is a {}, not a replay",
            op.kind
        )));
    }
    if matches!(op.status.as_str(), "done" | "cancelled") {
        return Ok(None);
    }
    let options: ReplayOptions = serde_json::from_value(op.selection).map_err(|e| {
        OperationError::Refused(format!("operation {id} has no replay options: {e}"))
    })?;
    store.set_operation_status(id, "running").await?;
    Ok(Some(options))
}

/// How a run of a replay ended (the operation's status says the same).
#[derive(Debug)]
pub enum Ending {
    /// Every item was sent or failed: `done`.
    Done,
    /// Stopped by the caller (ctrl-c, shutdown): `interrupted`, resumable.
    Interrupted,
    /// Stopped on a cancel request: `cancelled`.
    Cancelled,
    /// The connection broke: `interrupted`, resumable.
    Broken(BrokerError),
}

/// Where a replay sends and how.
pub struct Run<'a> {
    /// The store.
    pub store: &'a Store,
    /// RabbitMQ and the topology (the orders exchange replays go to).
    pub amqp: &'a AmqpSettings,
    /// The operation.
    pub operation: Uuid,
    /// Its options.
    pub options: &'a ReplayOptions,
    /// Stops the run between two messages (status `interrupted`).
    pub stop: CancellationToken,
}

impl Run<'_> {
    /// Sends what is left of the operation, `on_batch(n)` after each batch,
    /// and sets its status. Refused while another process runs the same
    /// operation (a resume beside a run still going would send each
    /// remaining message twice); a run that died holds nothing.
    pub async fn execute(&self, on_batch: impl FnMut(usize)) -> Result<Ending, OperationError> {
        let Some(lock) = self.store.try_lock_operation(self.operation).await? else {
            return Err(OperationError::Refused(format!(
                "operation {} is being run by another process; wait for it to end, or cancel it on the console's operations page",
                self.operation
            )));
        };
        let ending = self.execute_locked(on_batch).await;
        if let Err(e) = lock.release().await {
            tracing::warn!(error = %e, "Could not release the replay's lock; it goes with the connection.");
        }
        ending
    }

    async fn execute_locked(
        &self,
        mut on_batch: impl FnMut(usize),
    ) -> Result<Ending, OperationError> {
        let todo = self.store.operation_todo(self.operation).await?;
        let broker = Broker::from_settings(self.amqp, "holdclear-replay");
        let mut replayer = match Replayer::open(&broker, self.amqp.confirm_timeout).await {
            Ok(r) => r,
            Err(e) => return self.end(Ending::Broken(e)).await,
        };
        let ending = self.send_all(&mut replayer, &todo, &mut on_batch).await;
        replayer.close().await;
        self.end(ending?).await
    }

    async fn send_all(
        &self,
        replayer: &mut Replayer,
        todo: &[i64],
        on_batch: &mut impl FnMut(usize),
    ) -> Result<Ending, OperationError> {
        let pause = Duration::from_secs_f64(1.0 / self.options.rate);
        let mut next_slot = Instant::now();
        let mut last_check: Option<Instant> = None;
        for (n, batch) in todo.chunks(self.options.batch.max(1)).enumerate() {
            for &id in batch {
                tokio::select! {
                    () = tokio::time::sleep_until(next_slot) => {}
                    () = self.stop.cancelled() => return Ok(Ending::Interrupted),
                }
                if last_check.is_none_or(|t| t.elapsed() >= CANCEL_CHECK) {
                    last_check = Some(Instant::now());
                    if self.store.cancel_requested(self.operation).await? {
                        return Ok(Ending::Cancelled);
                    }
                }
                next_slot = Instant::now() + pause;
                if let Err(e) = self.send_one(replayer, id).await? {
                    return Ok(Ending::Broken(e));
                }
            }
            on_batch(n + 1);
        }
        Ok(Ending::Done)
    }

    /// Sends one dead letter and settles its item; `Err` inside when the
    /// connection broke (the item stays to do).
    async fn send_one(
        &self,
        replayer: &mut Replayer,
        id: i64,
    ) -> Result<Result<(), BrokerError>, OperationError> {
        let (store, op) = (self.store, self.operation);
        let Some(l) = store.dead_letter(id).await? else {
            store
                .settle_operation_item(op, id, Some("the dead letter was purged"))
                .await?;
            return Ok(Ok(()));
        };
        let topology = &self.amqp.topology;
        let orders = &topology.orders_exchange;
        // Only to the configured orders exchange, or to the one the
        // operator named.
        let exchange = match &l.summary.origin_exchange {
            Some(origin)
                if origin == orders
                    || self.options.to_exchange.as_deref() == Some(origin.as_str()) =>
            {
                origin.clone()
            }
            origin => {
                let origin = origin.as_deref().unwrap_or("");
                let reason = format!(
                    "it came from exchange '{origin}', not the configured orders exchange '{orders}'; replay it with --to-exchange {origin}"
                );
                store.settle_operation_item(op, id, Some(&reason)).await?;
                return Ok(Ok(()));
            }
        };
        let routing_key = l
            .summary
            .origin_routing_key
            .clone()
            .unwrap_or_else(|| topology.held_routing_key.clone());
        match replayer
            .send(&exchange, &routing_key, &l.body, &l.raw_properties)
            .await
        {
            Ok(()) => store.settle_operation_item(op, id, None).await?,
            Err(SendError::Broker(e)) => return Ok(Err(e)),
            Err(e) => {
                store
                    .settle_operation_item(op, id, Some(&e.to_string()))
                    .await?
            }
        }
        Ok(Ok(()))
    }

    async fn end(&self, ending: Ending) -> Result<Ending, OperationError> {
        let status = match &ending {
            Ending::Done => "done",
            Ending::Cancelled => "cancelled",
            Ending::Interrupted | Ending::Broken(_) => "interrupted",
        };
        self.store
            .set_operation_status(self.operation, status)
            .await?;
        Ok(ending)
    }
}

/// Asks a replay to stop (see [`Store::request_cancel`]).
pub async fn cancel(store: &Store, id: Uuid) -> Result<(), OperationError> {
    if store.request_cancel(id).await? {
        return Ok(());
    }
    match store.operation(id).await? {
        None => Err(OperationError::NotFound(format!("no operation {id}"))),
        Some(op) => Err(OperationError::Refused(format!(
            "operation {id} is {}: nothing to cancel",
            op.status
        ))),
    }
}

/// What became of an operation's items, counted.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Sent (confirmed by the broker).
    pub sent: usize,
    /// Sent, and its event opened or joined a case.
    pub became_cases: usize,
    /// Sent, and seen again in the dead-letter queue.
    pub failed_again: usize,
    /// Sent, outcome not known yet.
    pub pending: usize,
    /// Could not be sent.
    pub send_failed: usize,
    /// Not sent yet.
    pub not_sent: usize,
}

/// An operation, its items and their summary.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The operation.
    pub operation: Operation,
    /// Its items, in order.
    pub items: Vec<OperationItem>,
    /// Counted.
    pub summary: Summary,
}

/// The report of operation `id`.
pub async fn report(store: &Store, id: Uuid) -> Result<Report, OperationError> {
    let operation = store
        .operation(id)
        .await?
        .ok_or_else(|| OperationError::NotFound(format!("no operation {id}")))?;
    let items = store.operation_items(id).await?;
    let count = |what: &str| items.iter().filter(|i| i.outcome() == what).count();
    let summary = Summary {
        sent: items.iter().filter(|i| i.sent_at.is_some()).count(),
        became_cases: count("became a case"),
        failed_again: count("failed again"),
        pending: count("pending"),
        send_failed: count("send failed"),
        not_sent: count("not sent"),
    };
    Ok(Report {
        operation,
        items,
        summary,
    })
}
