//! Escalated cases watched slowly until a person releases the hold by hand
//! (`HOLDCLEAR_ESCALATED_WATCH_INTERVAL`; off by default).
//!
//! An escalated case is closed: intake opens a new case for a new held
//! event of its order, and `cases retry` may re-open it. Beside it, a watch
//! (a `hand_watches` row) looks at the order once per interval, for at most
//! `HOLDCLEAR_ESCALATED_WATCH_FOR` after the escalation:
//!
//! - hold released (a person assigned an account in the portal): one
//!   transaction ends the watch with the account and Virtual Account the
//!   order now shows, writes a `released_by_hand` history line and emits
//!   `order.hold_released` (`rule` null; the escalation event was emitted
//!   before and is not repeated). The case stays `escalated`;
//! - order `CLOSED`/`CANCELLED` with the hold on, or a permanent refusal
//!   to read it: the watch ends;
//! - a transient failure or the hold still on: the next look, an interval
//!   later;
//! - a newer case of the order (a new hold: that case works the order
//!   now), a re-opened case, or the watch time over: the watch ends
//!   without a look. A release is recorded only while no newer case of the
//!   order exists (checked in its transaction), so an order never has two
//!   cases emitting its release. (The same hold announced again joins the
//!   escalated case as `held_again`, as for any closed case; the watch goes
//!   on.)
//!
//! Bounded: one look per case per interval, at most [`LOOKS_PER_ROUND`] per
//! round, through the same commerce client as the engine (its rate limit
//! is shared). Several workers share the watches: a claim pushes a watch's
//! next look an interval on, so only one worker looks.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::commerce::{CommerceApi, CommerceError, Order};
use crate::config::EscalatedWatch;
use crate::domain::OutboundEvent;
use crate::store::{HandFix, HandWatch, Store, StoreError, WatchEnd};

/// Looks at most per round (a round runs every interval, at most every 30 s).
pub const LOOKS_PER_ROUND: i64 = 32;

/// Cases newly escalated taken into watch per round, at most.
const ENROLL_PER_ROUND: i64 = 256;

/// The longest one look waits for the commerce API.
const LOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// Watches escalated orders for a person's fix.
pub struct HandWatcher {
    store: Store,
    commerce: Arc<dyn CommerceApi>,
    settings: EscalatedWatch,
    relay_wake: Arc<Notify>,
}

impl HandWatcher {
    /// A watcher over `store`'s escalated cases; notifies `relay_wake` when
    /// it wrote an event.
    pub fn new(
        store: Store,
        commerce: Arc<dyn CommerceApi>,
        settings: EscalatedWatch,
        relay_wake: Arc<Notify>,
    ) -> Self {
        Self {
            store,
            commerce,
            settings,
            relay_wake,
        }
    }

    /// Rounds until `cancel`; a database error is logged and the round
    /// tried again later.
    pub async fn run(self, cancel: CancellationToken) {
        let every = self.settings.interval.min(Duration::from_secs(30));
        loop {
            if let Err(e) = self.round().await {
                tracing::warn!(error = %e, "Cannot watch the escalated cases now; trying again later.");
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Takes new escalations into watch, ends the stale watches, and looks
    /// at the orders due.
    async fn round(&self) -> Result<(), StoreError> {
        let s = &self.settings;
        self.store
            .enroll_hand_watches(s.watch_for, s.interval, ENROLL_PER_ROUND)
            .await?;
        (self.store)
            .end_stale_hand_watches(s.watch_for, 4 * LOOKS_PER_ROUND)
            .await?;
        let due = (self.store)
            .claim_hand_watches(s.interval, LOOKS_PER_ROUND)
            .await?;
        for watch in due {
            self.look(&watch).await?;
        }
        Ok(())
    }

    async fn look(&self, watch: &HandWatch) -> Result<(), StoreError> {
        let case = &watch.case;
        let read = tokio::time::timeout(LOOK_TIMEOUT, self.commerce.order(&case.order)).await;
        let order = match read {
            Ok(Ok(order)) => order,
            Ok(Err(CommerceError::Permanent { code, detail })) => {
                let detail = format!("read_order: {code}: {detail}");
                tracing::info!(order = %case.subject(), detail = %detail, "Escalated order can no longer be read; no longer watched.");
                return (self.store)
                    .end_hand_watch(case, WatchEnd::Unreadable, &detail)
                    .await;
            }
            Ok(Err(e)) => {
                tracing::debug!(order = %case.subject(), error = %e, "Escalated order not read now; looked at again later.");
                return Ok(());
            }
            Err(_) => return Ok(()),
        };
        if order.smart_account_hold_released() {
            return self.released(watch, &order).await;
        }
        if matches!(order.status.as_str(), "CLOSED" | "CANCELLED") {
            let detail = format!("the order is {} with the hold on", order.status);
            return (self.store)
                .end_hand_watch(case, WatchEnd::OrderClosed, &detail)
                .await;
        }
        tracing::debug!(order = %case.subject(), looks = watch.looks, "Escalated order still held.");
        Ok(())
    }

    /// The person released the hold: the fix recorded, `order.hold_released` emitted.
    async fn released(&self, watch: &HandWatch, order: &Order) -> Result<(), StoreError> {
        let case = &watch.case;
        let now = Utc::now();
        let released_at = order.smart_account_hold_released_at().unwrap_or(now);
        let fix = HandFix {
            released_at,
            smart_account_domain: order.smart_account_domain.clone(),
            virtual_account_name: order.virtual_account_name.clone(),
        };
        let event = OutboundEvent::HoldReleased {
            released_at,
            held_seconds: case.held_seconds(released_at),
            smart_account_domain: fix.smart_account_domain.clone(),
            rule: None,
            other_holds: order.other_holds(),
        };
        let envelope = event.envelope(case.id, case.generation, &case.order, now);
        if self
            .store
            .record_hand_release(case, &fix, &envelope)
            .await?
        {
            metrics::counter!("holdclear_hand_fixes_total").increment(1);
            tracing::info!(
                order = %case.subject(),
                account = fix.smart_account_domain.as_deref().unwrap_or("-"),
                virtual_account = fix.virtual_account_name.as_deref().unwrap_or("-"),
                "Escalated order released by hand; the fix is recorded."
            );
            self.relay_wake.notify_one();
        }
        Ok(())
    }
}
