//! The exchanges, queues and bindings of the event contract, declared so
//! that no RabbitMQ version drops a message on its own.
//!
//! | name | declared as |
//! |---|---|
//! | orders exchange | topic |
//! | held-order queue | quorum; `x-dead-letter-exchange`, `x-delivery-limit` (the setting), `x-dead-letter-strategy=at-least-once`, `x-overflow=reject-publish` |
//! | dead-letter exchange | fanout |
//! | dead-letter queue | quorum; on RabbitMQ 4.x also `x-delivery-limit=-1` |
//! | events exchange | topic, no arguments (as the contract's consumers declare it) |
//! | `<events>.unrouted` | fanout exchange, and a quorum queue bound to it (`x-max-length`, `x-overflow=reject-publish`; on 4.x `x-delivery-limit=-1`) |
//!
//! At-least-once dead lettering keeps a dead letter in the held queue until
//! the dead-letter queue confirmed it (RabbitMQ's default, at most once,
//! drops it if the DLX cannot take it at that moment); RabbitMQ requires
//! `reject-publish` for it. RabbitMQ 4.0 gave quorum queues a default
//! delivery limit of 20, counting every return (on 4.0–4.2 a channel closed
//! with unacknowledged messages too): browsing the DLQ (`holdclear dlq
//! list`) returns what it read, so without `-1` a dead letter would be
//! dropped after 20 looks. On 3.x `-1` would mean "over the limit on the
//! first return", so it is declared only when the broker says it is 4.x
//! ([`super::server`]).
//!
//! `<events>.unrouted` is the events exchange's alternate exchange: an event
//! no queue is bound for goes there and is kept, instead of coming back to
//! the relay. The link is a policy (`holdclear-events`, shipped in
//! `deploy/rabbitmq/definitions.json`), not an `alternate-exchange`
//! argument: consumers declare `holdclear.events` as the contract states it,
//! a plain durable topic exchange, and an argument would make every such
//! declaration fail with PRECONDITION_FAILED. The worker declares the
//! alternate exchange and its queue; without the policy they stay unused
//! and unroutable events come back to the outbox as before.
//!
//! Existing brokers: a queue or exchange cannot change its arguments, and a
//! declaration with other arguments fails with PRECONDITION_FAILED. When
//! one was created by an older holdclear (or an older definitions file), the
//! declaration is repeated with the arguments of then; if RabbitMQ accepts
//! that, the worker goes on with it and [`Outdated`] says what it lacks and
//! which policy gives it (docs/deployment.md, "Existing brokers").

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use super::error::{During, Operation};
use super::server::ServerVersion;
use super::{Broker, BrokerError};
use crate::config::Topology;

/// Longest the unrouted-events queue grows; past it, publishing there is
/// refused (the relay keeps the event and retries), nothing is dropped.
pub const UNROUTED_MAX_LENGTH: i64 = 100_000;

/// A queue or exchange that exists with the arguments of an older holdclear.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outdated {
    /// `queue` or `exchange`.
    pub kind: &'static str,
    /// Its name.
    pub name: String,
    /// What it lacks and what that means.
    pub lacks: &'static str,
    /// How to give it what it lacks without recreating it.
    pub fix: String,
}

/// What a declaration found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Declared {
    /// The broker, as it announced itself.
    pub server: Option<ServerVersion>,
    /// Queues and exchanges kept as they were, with what they lack.
    pub outdated: Vec<Outdated>,
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut args = FieldTable::default();
    for (k, v) in entries {
        args.insert(ShortString::from(*k), v.clone());
    }
    args
}

/// The arguments of the held-order queue: quorum, at-least-once dead
/// lettering to the DLX (with `reject-publish`, which it requires), and a
/// delivery limit against poison loops.
pub fn held_queue_arguments(topology: &Topology, delivery_limit: u32) -> FieldTable {
    let mut args = held_queue_arguments_before_0_2(topology, delivery_limit);
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    args.insert("x-overflow".into(), text("reject-publish"));
    args
}

/// What holdclear declared the held-order queue with before at-least-once
/// dead lettering (and what the definitions file of then declared).
fn held_queue_arguments_before_0_2(topology: &Topology, delivery_limit: u32) -> FieldTable {
    table(&[
        ("x-queue-type", text("quorum")),
        (
            "x-dead-letter-exchange",
            text(&topology.dead_letter_exchange),
        ),
        (
            "x-delivery-limit",
            AMQPValue::LongLongInt(i64::from(delivery_limit)),
        ),
    ])
}

/// The arguments of a queue that keeps what it holds until an operator acts
/// (the DLQ, the unrouted events): quorum, and on RabbitMQ 4.x no delivery
/// limit (-1) instead of the default 20.
pub fn keeping_queue_arguments(server: &ServerVersion) -> FieldTable {
    let mut args = table(&[("x-queue-type", text("quorum"))]);
    if server.has_default_delivery_limit() {
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(-1));
    }
    args
}

fn unrouted_queue_arguments(server: &ServerVersion) -> FieldTable {
    let mut args = keeping_queue_arguments(server);
    args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(UNROUTED_MAX_LENGTH),
    );
    args.insert("x-overflow".into(), text("reject-publish"));
    args
}

/// Declares every exchange, queue and binding of the contract on the broker
/// of `broker` (whose version it reads first, see [`Broker::server_version`]).
/// Idempotent; an exchange or queue an older holdclear declared is kept and
/// reported (each also as a WARN) in [`Declared::outdated`].
pub async fn declare_topology(
    broker: &Broker,
    conn: &Connection,
    topology: &Topology,
    delivery_limit: u32,
) -> Result<Declared, BrokerError> {
    let server = match broker.server_version().await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(
                broker = %broker.url(),
                error = %e,
                "Cannot read the broker's version; declaring queues as for RabbitMQ 3.x (no -1 delivery limit)."
            );
            ServerVersion::unknown()
        }
    };
    declare_topology_for(conn, topology, delivery_limit, &server).await
}

/// [`declare_topology`] for a broker known to be `server`.
pub async fn declare_topology_for(
    conn: &Connection,
    topology: &Topology,
    delivery_limit: u32,
    server: &ServerVersion,
) -> Result<Declared, BrokerError> {
    let mut d = Declarer {
        conn,
        channel: conn.create_channel().await?,
        outdated: Vec::new(),
    };
    let t = topology;
    let unrouted = t.unrouted_exchange();
    d.exchange(&t.orders_exchange, ExchangeKind::Topic).await?;
    d.exchange(&t.dead_letter_exchange, ExchangeKind::Fanout)
        .await?;
    d.exchange(&unrouted, ExchangeKind::Fanout).await?;
    d.exchange(&t.events_exchange, ExchangeKind::Topic).await?;
    declare_held_queue(&mut d, t, delivery_limit).await?;
    declare_keeping_queues(&mut d, t, server).await?;
    close_channel(&d.channel, "topology declared").await;
    for o in &d.outdated {
        tracing::warn!(
            kind = o.kind,
            name = %o.name,
            lacks = o.lacks,
            fix = %o.fix,
            "Kept as an older holdclear declared it; it works, but it lacks something (docs/deployment.md, Existing brokers)."
        );
    }
    Ok(Declared {
        server: Some(server.clone()),
        outdated: d.outdated,
    })
}

/// The held queue (kept as a pre-0.2 holdclear declared it, if so) and its
/// binding to the orders exchange.
async fn declare_held_queue(
    d: &mut Declarer<'_>,
    t: &Topology,
    delivery_limit: u32,
) -> Result<(), BrokerError> {
    d.queue(
        &t.held_queue,
        held_queue_arguments(t, delivery_limit),
        Some((
            held_queue_arguments_before_0_2(t, delivery_limit),
            Outdated {
                kind: "queue",
                name: t.held_queue.clone(),
                lacks: "at-least-once dead lettering (x-dead-letter-strategy, x-overflow=reject-publish): a dead letter the DLX cannot take at once is dropped",
                fix: "a policy on it with {\"dead-letter-strategy\": \"at-least-once\", \"overflow\": \"reject-publish\"} besides its delivery-limit (holdclear-order-held in deploy/rabbitmq/definitions.json)".into(),
            },
        )),
    )
    .await?;
    d.bind(&t.held_queue, &t.orders_exchange, &t.held_routing_key)
        .await
}

/// The queues that keep what lands in them (the dead-letter queue, the
/// unrouted events' queue; on RabbitMQ 4.x without a delivery limit, or
/// kept as an older holdclear declared them) and their bindings.
async fn declare_keeping_queues(
    d: &mut Declarer<'_>,
    t: &Topology,
    server: &ServerVersion,
) -> Result<(), BrokerError> {
    let unrouted = t.unrouted_exchange();
    let keeping_before = table(&[("x-queue-type", text("quorum"))]);
    let unlimited_fix = |name: &str| {
        format!(
            "on RabbitMQ 4.x, a policy on it with {{\"delivery-limit\": -1}} (rabbitmqctl set_policy {} '^{}$' '{{\"delivery-limit\": -1}}' --apply-to queues --priority 10), or recreate it empty",
            name.replace('.', "-"),
            name.replace('.', "\\.")
        )
    };
    let limit_lacks = "x-delivery-limit=-1: RabbitMQ 4.x gives it a delivery limit of 20, and a message handed back 20 times (each `holdclear dlq list` hands back what it read) is dropped";
    d.queue(
        &t.dead_letter_queue,
        keeping_queue_arguments(server),
        server.has_default_delivery_limit().then(|| {
            (
                keeping_before.clone(),
                Outdated {
                    kind: "queue",
                    name: t.dead_letter_queue.clone(),
                    lacks: limit_lacks,
                    fix: unlimited_fix(&t.dead_letter_queue),
                },
            )
        }),
    )
    .await?;
    d.bind(&t.dead_letter_queue, &t.dead_letter_exchange, "")
        .await?;
    d.queue(
        &unrouted,
        unrouted_queue_arguments(server),
        server.has_default_delivery_limit().then(|| {
            (
                unrouted_queue_arguments(&ServerVersion::unknown()),
                Outdated {
                    kind: "queue",
                    name: unrouted.clone(),
                    lacks: limit_lacks,
                    fix: unlimited_fix(&unrouted),
                },
            )
        }),
    )
    .await?;
    d.bind(&unrouted, &unrouted, "").await
}

/// Declares on one channel, and on a new one after a refusal (which closes it).
struct Declarer<'a> {
    conn: &'a Connection,
    channel: Channel,
    outdated: Vec<Outdated>,
}

impl Declarer<'_> {
    async fn fresh_channel(&mut self) -> Result<(), BrokerError> {
        self.channel = self.conn.create_channel().await?;
        Ok(())
    }

    /// Declares a durable exchange without arguments.
    async fn exchange(&mut self, name: &str, kind: ExchangeKind) -> Result<(), BrokerError> {
        self.channel
            .exchange_declare(name.into(), kind, durable_exchange(), FieldTable::default())
            .await
            .during(|| Operation::Declare {
                kind: "exchange",
                name: name.to_owned(),
            })
    }

    /// Declares a quorum queue; if it exists with the older arguments of
    /// `before`, accepts it as it is and records its [`Outdated`].
    async fn queue(
        &mut self,
        name: &str,
        args: FieldTable,
        before: Option<(FieldTable, Outdated)>,
    ) -> Result<(), BrokerError> {
        let op = || Operation::Declare {
            kind: "queue",
            name: name.to_owned(),
        };
        let first = self
            .channel
            .queue_declare(name.into(), durable_queue(), args)
            .await
            .during(op);
        match (first, before) {
            (Ok(_), _) => Ok(()),
            (Err(e), Some((args, outdated))) if e.reply_code() == Some(PRECONDITION_FAILED) => {
                self.fresh_channel().await?;
                self.channel
                    .queue_declare(name.into(), durable_queue(), args)
                    .await
                    .map_err(|_| e)?;
                self.outdated.push(outdated);
                Ok(())
            }
            (Err(e), _) => Err(e),
        }
    }

    async fn bind(&mut self, queue: &str, exchange: &str, key: &str) -> Result<(), BrokerError> {
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .during(|| Operation::Bind {
                queue: queue.to_owned(),
                exchange: exchange.to_owned(),
            })
    }
}

/// AMQP reply code of a declaration whose arguments differ from the existing one's.
const PRECONDITION_FAILED: u16 = 406;

/// Deletes every exchange and queue of `topology` (the demo's and the
/// benchmark's own, when they finish). Missing ones are fine.
pub async fn delete_topology(conn: &Connection, topology: &Topology) -> Result<(), BrokerError> {
    let unrouted = topology.unrouted_exchange();
    for queue in [
        topology.held_queue.as_str(),
        topology.dead_letter_queue.as_str(),
        unrouted.as_str(),
    ] {
        // A failed delete closes the channel, so each gets its own.
        let channel = conn.create_channel().await?;
        let _ = channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
        close_channel(&channel, "deleted").await;
    }
    for exchange in [
        topology.orders_exchange.as_str(),
        topology.dead_letter_exchange.as_str(),
        topology.events_exchange.as_str(),
        unrouted.as_str(),
    ] {
        let channel = conn.create_channel().await?;
        let _ = channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await;
        close_channel(&channel, "deleted").await;
    }
    Ok(())
}

/// A queue's state (message and consumer counts) from a passive declare; a
/// missing queue fails and closes `channel`.
pub(crate) async fn declare_passive(
    channel: &Channel,
    queue: &str,
) -> Result<lapin::Queue, BrokerError> {
    Ok(channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?)
}

/// Ready messages in `queue`, or `None` when it does not exist; on a
/// channel of its own, closed afterwards.
pub async fn ready_messages(conn: &Connection, queue: &str) -> Result<Option<u32>, BrokerError> {
    let channel = conn.create_channel().await?;
    match declare_passive(&channel, queue).await {
        Ok(q) => {
            close_channel(&channel, "looked").await;
            Ok(Some(q.message_count()))
        }
        Err(e) if e.reply_code() == Some(404) => Ok(None),
        Err(e) => Err(e.during(Operation::Inspect {
            queue: queue.to_owned(),
        })),
    }
}

/// How long a channel's close may take before it is left to the
/// connection's close (which also returns its unacknowledged messages).
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Closes a channel (returning its unacknowledged messages to their queue),
/// bounded by [`CLOSE_TIMEOUT`]: a close-ok that never comes must not hang a
/// command. A failed close is only logged: what the caller did is settled
/// by then, and the connection's close ends the channel anyway.
pub(crate) async fn close_channel(channel: &Channel, reason: &str) {
    if !channel.status().connected() {
        return;
    }
    match tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, reason.into())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(reason, error = %e, "Channel close failed; the connection's close ends it.");
        }
        Err(_) => {
            tracing::debug!(
                reason,
                "No close-ok for the channel in time; the connection's close ends it."
            );
        }
    }
}
