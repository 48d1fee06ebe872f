//! Consuming the held-order queue: deliveries handed on as broker-neutral
//! values, acknowledged in runs, and a session rebuilt whenever the
//! connection or channel is lost.
//!
//! A *session* is one connection's consuming channel (with its prefetch and
//! the topology declared on it) plus a confirm-mode channel for dead
//! letters. [`Consumer::run`] opens one, forwards its deliveries, and when
//! it dies opens the next with backoff. Deliveries still in flight on a dead
//! session cannot be acknowledged any more; the broker delivers them again
//! on the next one, and the inbox makes that harmless.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures_util::StreamExt;
use futures_util::future::join_all;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::error::{During, Operation};
use super::{Broker, BrokerError, Publisher, declare_topology};
use crate::config::Topology;
use crate::ops::health::Health;
use crate::retry::Reconnect;

/// What the consumer needs besides the broker.
#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    /// Exchange and queue names; the held queue is consumed.
    pub topology: Topology,
    /// Unacknowledged deliveries the broker may send at once.
    pub prefetch: u16,
    /// `x-delivery-limit` of the held queue (for declaring it).
    pub delivery_limit: u32,
}

/// One consuming channel and its dead-letter publisher.
pub(crate) struct Session {
    id: u64,
    channel: Channel,
    pub(crate) publisher: Publisher,
    pub(crate) dead_letter_exchange: String,
    /// False once a delivery of this session was left unsettled: from then
    /// on an ack with `multiple` could take it along, so acks go one by one.
    multiple_ok: AtomicBool,
}

impl Session {
    fn is_open(&self) -> bool {
        self.channel.status().connected()
    }
}

/// One message from the held queue, without lapin types in its interface.
pub struct Delivery {
    body: Vec<u8>,
    tag: u64,
    redelivered: bool,
    exchange: String,
    routing_key: String,
    pub(crate) properties: BasicProperties,
    pub(crate) session: Arc<Session>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("session", &self.session.id)
            .field("tag", &self.tag)
            .field("redelivered", &self.redelivered)
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("message_id", &self.message_id())
            .field("bytes", &self.body.len())
            .finish()
    }
}

impl Delivery {
    fn new(d: lapin::message::Delivery, session: &Arc<Session>) -> Self {
        Self {
            body: d.data,
            tag: d.delivery_tag,
            redelivered: d.redelivered,
            exchange: d.exchange.to_string(),
            routing_key: d.routing_key.to_string(),
            properties: d.properties,
            session: Arc::clone(session),
        }
    }

    /// The message body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The delivery tag (per channel: a reconnect starts again at 1).
    pub fn tag(&self) -> u64 {
        self.tag
    }

    /// True when the broker delivered this message before (to us or another consumer).
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// The exchange the message was published to.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The routing key it was published with.
    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }

    /// The AMQP `message_id`, if the publisher set one.
    pub fn message_id(&self) -> Option<&str> {
        self.properties.message_id().as_ref().map(|m| m.as_str())
    }

    /// True while the channel it came on is open (it can still be acked).
    pub fn channel_open(&self) -> bool {
        self.session.is_open()
    }
}

/// How [`acknowledge`] went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Acknowledged {
    /// Deliveries acknowledged.
    pub acked: usize,
    /// Settled deliveries that could not be acknowledged because their
    /// channel is gone; the broker delivers them again.
    pub lost: usize,
    /// `basic.ack` frames sent.
    pub frames: usize,
}

/// Acknowledges the settled deliveries of a batch (`true` beside a delivery
/// means settled: committed or dead-lettered).
///
/// Precondition: the batch holds, per channel, every delivery received after
/// the previous batch, and every earlier delivery on that channel was settled
/// or left unsettled through this function. Then a channel whose deliveries
/// are all settled is acknowledged with one `basic.ack` (`multiple`) up to
/// its highest tag; otherwise only the settled ones are acked, one by one,
/// and that channel is never acked with `multiple` again.
pub async fn acknowledge(batch: &[(&Delivery, bool)]) -> Acknowledged {
    // Per session: its tags in the batch, each with whether it is settled.
    type Tags = Vec<(u64, bool)>;
    let mut per_session: HashMap<u64, (Arc<Session>, Tags)> = HashMap::new();
    for (d, settled) in batch {
        per_session
            .entry(d.session.id)
            .or_insert_with(|| (Arc::clone(&d.session), Vec::new()))
            .1
            .push((d.tag, *settled));
    }
    let mut report = Acknowledged::default();
    for (session, tags) in per_session.into_values() {
        let settled = tags.iter().filter(|(_, s)| *s).count();
        if settled == 0 {
            continue;
        }
        if !session.is_open() {
            report.lost += settled;
            continue;
        }
        let all = settled == tags.len();
        if all && session.multiple_ok.load(Ordering::Acquire) {
            let highest = tags.iter().map(|(t, _)| *t).max().unwrap_or_default();
            report.frames += 1;
            match session
                .channel
                .basic_ack(highest, BasicAckOptions { multiple: true })
                .await
            {
                Ok(()) => report.acked += settled,
                Err(e) => {
                    tracing::debug!(error = %e, "Cannot acknowledge: the channel is gone.");
                    report.lost += settled;
                }
            }
            continue;
        }
        if !all {
            session.multiple_ok.store(false, Ordering::Release);
        }
        let acks = tags.iter().filter(|(_, s)| *s).map(|(tag, _)| {
            session
                .channel
                .basic_ack(*tag, BasicAckOptions { multiple: false })
        });
        for result in join_all(acks).await {
            report.frames += 1;
            match result {
                Ok(()) => report.acked += 1,
                Err(_) => report.lost += 1,
            }
        }
    }
    report
}

/// The connection of a consumer that stopped on request, kept open so that
/// the deliveries it forwarded can still be acknowledged; close it once
/// intake is done.
pub struct Closing {
    conn: Connection,
    session: Arc<Session>,
}

impl Closing {
    /// Closes the session's channels, then the connection (cleanly, so
    /// that lapin does not close a channel of a closing connection).
    pub async fn close(self) {
        let text = "holdclear shutting down";
        for channel in [&self.session.channel, self.session.publisher.channel()] {
            if let Err(e) = channel.close(200, text.into()).await {
                tracing::debug!(error = %e, "RabbitMQ channel already closed.");
            }
        }
        if let Err(e) = self.conn.close(200, text.into()).await {
            tracing::debug!(error = %e, "RabbitMQ connection already closed.");
        }
    }
}

/// Why a session ended.
enum Ended {
    /// Shutdown was requested and the consumer drained.
    Stopped,
    /// The connection, channel or consumer was lost.
    Lost(String),
    /// Intake stopped taking deliveries.
    IntakeGone,
    /// The shutdown deadline passed while waiting.
    Aborted,
}

/// Consumes the held-order queue, reconnecting by itself.
pub struct Consumer {
    broker: Broker,
    settings: ConsumerSettings,
    health: Arc<Health>,
}

/// Role of the consumer's connection (appended to the broker name).
pub const ROLE: &str = "intake";

impl Consumer {
    /// A consumer of `settings.topology.held_queue` that reports whether it
    /// is connected to `health`.
    pub fn new(broker: Broker, settings: ConsumerSettings, health: Arc<Health>) -> Self {
        Self {
            broker,
            settings,
            health,
        }
    }

    /// Forwards deliveries to `intake` until `stop` fires, then cancels the
    /// consumer, forwards what the broker had already sent and returns the
    /// connection for closing. Lost connections and channels are rebuilt
    /// with backoff. `abort` (the shutdown deadline) ends every wait at once.
    /// Returns `None` when there is no connection to close.
    pub async fn run(
        self,
        intake: mpsc::Sender<Delivery>,
        stop: CancellationToken,
        abort: CancellationToken,
    ) -> Option<Closing> {
        static SESSIONS: AtomicU64 = AtomicU64::new(0);
        let mut delays = Reconnect::default();
        loop {
            let conn = match self.broker.connect_until(ROLE, &stop).await {
                Ok(conn) => conn,
                Err(_) => return None,
            };
            let id = SESSIONS.fetch_add(1, Ordering::Relaxed) + 1;
            // Why the session ended, and whether it could not start on a
            // live connection: the queue could not be declared or consumed
            // (arguments that differ from the existing queue's, missing
            // permissions), which an operator must fix.
            let (reason, setup_failed) = match self.open(&conn, id).await {
                Ok((session, consumer)) => {
                    self.health.set_broker(true);
                    delays.reset();
                    tracing::info!(
                        queue = %self.settings.topology.held_queue,
                        prefetch = self.settings.prefetch,
                        session = id,
                        "Consuming held orders."
                    );
                    let ended = self.pump(&session, consumer, &intake, &stop, &abort).await;
                    match ended {
                        Ended::Stopped | Ended::IntakeGone | Ended::Aborted => {
                            tracing::info!(
                                queue = %self.settings.topology.held_queue,
                                "Stopped consuming held orders."
                            );
                            return Some(Closing { conn, session });
                        }
                        Ended::Lost(reason) => (reason, false),
                    }
                }
                Err(e) => (e.to_string(), conn.status().connected()),
            };
            self.health.set_broker(false);
            let delay = delays.next_delay();
            let queue = &self.settings.topology.held_queue;
            let retry_in_ms = delay.as_millis() as u64;
            if setup_failed {
                tracing::error!(%queue, error = %reason, retry_in_ms, "Cannot consume the held-order queue; retrying.");
            } else {
                tracing::warn!(%queue, error = %reason, retry_in_ms, "Lost the held-order consumer; reconnecting.");
            }
            if conn.status().connected() {
                let _ = conn.close(200, "holdclear reconnecting".into()).await;
            }
            drop(conn);
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Opens a session: consuming channel with prefetch, topology, dead-letter
    /// publisher, consumer.
    async fn open(
        &self,
        conn: &Connection,
        id: u64,
    ) -> Result<(Arc<Session>, lapin::Consumer), BrokerError> {
        let topology = &self.settings.topology;
        declare_topology(&self.broker, conn, topology, self.settings.delivery_limit).await?;
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(self.settings.prefetch, BasicQosOptions::default())
            .await?;
        let publisher = Publisher::open(conn).await?;
        let consumer = channel
            .basic_consume(
                topology.held_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .during(|| Operation::Read {
                queue: topology.held_queue.clone(),
            })?;
        let session = Arc::new(Session {
            id,
            channel,
            publisher,
            dead_letter_exchange: topology.dead_letter_exchange.clone(),
            multiple_ok: AtomicBool::new(true),
        });
        Ok((session, consumer))
    }

    async fn pump(
        &self,
        session: &Arc<Session>,
        mut consumer: lapin::Consumer,
        intake: &mpsc::Sender<Delivery>,
        stop: &CancellationToken,
        abort: &CancellationToken,
    ) -> Ended {
        let mut stopping = false;
        loop {
            let next = tokio::select! {
                biased;
                () = abort.cancelled() => return Ended::Aborted,
                () = stop.cancelled(), if !stopping => {
                    stopping = true;
                    cancel(session, &consumer).await;
                    continue;
                }
                next = consumer.next() => next,
            };
            let delivery = match next {
                Some(Ok(d)) => Delivery::new(d, session),
                Some(Err(e)) if stopping => {
                    tracing::debug!(error = %e, "Channel ended while stopping.");
                    return Ended::Stopped;
                }
                Some(Err(e)) => return Ended::Lost(e.to_string()),
                None if stopping => return Ended::Stopped,
                None => return Ended::Lost("the broker cancelled the consumer".into()),
            };
            // Wait for room in intake; a stop meanwhile cancels the consumer.
            loop {
                tokio::select! {
                    biased;
                    () = abort.cancelled() => return Ended::Aborted,
                    () = stop.cancelled(), if !stopping => {
                        stopping = true;
                        cancel(session, &consumer).await;
                    }
                    permit = intake.reserve() => match permit {
                        Ok(permit) => {
                            permit.send(delivery);
                            break;
                        }
                        Err(_) => return Ended::IntakeGone,
                    },
                }
            }
        }
    }
}

/// Asks the broker to stop sending; deliveries it already sent still arrive.
async fn cancel(session: &Session, consumer: &lapin::Consumer) {
    if let Err(e) = session
        .channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await
    {
        tracing::debug!(error = %e, "Cannot cancel the consumer: the channel is gone.");
    }
}
