//! The held orders of a run: valid `order.held` events for the simulator's
//! Acme account (the shipped rules release them), numbered so that an
//! arriving event finds its order, and published in windows of confirms.

use chrono::{DateTime, Utc};
use serde_json::json;

use super::BenchError;
use crate::broker::{OutgoingMessage, Publisher};
use crate::config::Topology;
use crate::domain::HeldOrderEvent;

/// Messages per `publish_all` window when preloading (the confirms of one
/// window are awaited together).
pub const PRELOAD_WINDOW: usize = 1_000;

/// The body of held order `number` of a run: `heldAt` is the time it is
/// published, which the end-to-end section measures latency from.
pub fn held_body(run: &str, number: u64, held_at: DateTime<Utc>) -> Vec<u8> {
    json!({
        "specversion": "1.0",
        "type": "commerce.order.held.v1",
        "source": "/commerce/orders",
        "id": format!("bench-{run}-{number}"),
        "time": held_at.to_rfc3339(),
        "datacontenttype": "application/json",
        "data": {
            "salesOrderNumber": number.to_string(),
            "holdReason": "NO_SMART_ACCOUNT",
            "heldAt": held_at.to_rfc3339(),
            "orderType": "STANDARD",
            "endCustomer": {"name": "Acme Corp", "country": "US", "email": "it-admin@acme.com"},
            "lines": [{"lineNumber": "1.1", "sku": "C9300-48P-E", "productFamily": "C9300"}],
        },
    })
    .to_string()
    .into_bytes()
}

/// The message carrying `body` for order `number`.
pub fn message(topology: &Topology, run: &str, number: u64, body: Vec<u8>) -> OutgoingMessage {
    OutgoingMessage {
        routing_key: topology.held_routing_key.clone(),
        message_id: format!("bench-{run}-{number}"),
        content_type: "application/cloudevents+json".into(),
        body,
        timestamp: Some(Utc::now().timestamp().max(0) as u64),
        headers: vec![],
    }
}

/// The event as the worker decodes it (for running intake's statement directly).
pub fn decoded(body: &[u8]) -> Result<HeldOrderEvent, BenchError> {
    HeldOrderEvent::decode(body, usize::MAX).map_err(|e| BenchError::BadEvent(e.detail))
}

/// Publishes `msgs` on `exchange` in windows of [`PRELOAD_WINDOW`],
/// waiting for each window's confirms; fails on the first refused message.
pub async fn publish_windowed(
    publisher: &Publisher,
    exchange: &str,
    msgs: &[OutgoingMessage],
) -> Result<(), BenchError> {
    for window in msgs.chunks(PRELOAD_WINDOW) {
        for r in publisher.publish_all(exchange, window).await {
            r?;
        }
    }
    Ok(())
}

/// Publishes orders `first..first + n` of `run` (bodies made a window at a
/// time, so memory stays flat), telling `progress` after each window.
pub async fn preload(
    publisher: &Publisher,
    topology: &Topology,
    run: &str,
    first: u64,
    n: u64,
    progress: &dyn Fn(u64),
) -> Result<(), BenchError> {
    let mut done = 0u64;
    while done < n {
        let take = (n - done).min(PRELOAD_WINDOW as u64);
        let now = Utc::now();
        let msgs: Vec<OutgoingMessage> = (first + done..first + done + take)
            .map(|number| message(topology, run, number, held_body(run, number, now)))
            .collect();
        publish_windowed(publisher, &topology.orders_exchange, &msgs).await?;
        done += take;
        progress(done);
    }
    Ok(())
}
