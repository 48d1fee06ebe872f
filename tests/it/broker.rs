//! The broker layer against the real RabbitMQ: topology and confirmed publishing.

use holdclear::broker::{Broker, OutgoingMessage, PublishError, Publisher, declare_topology};
use holdclear::config::SecretUrl;
use lapin::options::{ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use std::time::Duration;

use crate::support::{amqp_url, topology, unique, wait_for};

fn message(n: u32) -> OutgoingMessage {
    OutgoingMessage {
        routing_key: "order.hold_released".into(),
        message_id: format!("m-{n}"),
        content_type: "application/cloudevents+json".into(),
        body: format!("{{\"n\":{n}}}").into_bytes(),
        timestamp: Some(1_700_000_000),
        headers: vec![],
    }
}

#[tokio::test]
async fn topology_is_idempotent_and_unroutable_messages_are_returned() {
    let prefix = unique("broker");
    let topo = topology(&prefix);
    let broker = Broker::new(
        SecretUrl::parse("amqp", &amqp_url()).unwrap(),
        prefix.clone(),
    );
    let conn = broker.connect("test").await.unwrap();
    let publisher = Publisher::open(&conn).await.unwrap();
    let first = declare_topology(&broker, &conn, &topo, 20).await.unwrap();
    // A second declaration with the same arguments is accepted.
    let second = declare_topology(&broker, &conn, &topo, 20).await.unwrap();
    assert!(first.outdated.is_empty() && second.outdated.is_empty());

    // Nothing is bound for this key on the orders exchange (which has no
    // alternate exchange): mandatory returns it.
    let err = publisher
        .publish(&topo.orders_exchange, &message(0))
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Returned(_)), "{err:?}");

    let ch = conn.create_channel().await.unwrap();
    let q = format!("{prefix}.watch");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        q.as_str().into(),
        topo.events_exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let msgs: Vec<_> = (1..=50).map(message).collect();
    let results = publisher.publish_all(&topo.events_exchange, &msgs).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let depth = ch
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count();
    assert_eq!(depth, 50);
    let unrouted = holdclear::broker::ready_messages(&conn, &topo.unrouted_queue())
        .await
        .unwrap();
    assert_eq!(
        unrouted,
        Some(0),
        "routed events do not reach the alternate exchange"
    );

    holdclear::broker::delete_topology(&conn, &topo)
        .await
        .unwrap();
    holdclear::broker::close(&conn).await;
}

// ---- the relay's channels ------------------------------------------------------

/// Writes one escalation event for a fresh case through a real step commit.
async fn outbox_row(store: &holdclear::store::Store, order: &str) -> uuid::Uuid {
    outbox_rows(store, order, 1).await
}

/// Writes `n` escalation events (distinct ids) for a fresh case through one
/// real step commit.
async fn outbox_rows(store: &holdclear::store::Store, order: &str, n: u32) -> uuid::Uuid {
    let body = serde_json::json!({
        "specversion": "1.0", "type": "commerce.order.held.v1", "source": "/t",
        "id": uuid::Uuid::new_v4().to_string(),
        "data": {"salesOrderNumber": order, "holdReason": "NO_SMART_ACCOUNT"}
    });
    let event =
        holdclear::domain::HeldOrderEvent::decode(&serde_json::to_vec(&body).unwrap(), 256 * 1024)
            .expect("a valid held-order event");
    crate::support::store::escalated_with_events(store, &event, n)
        .await
        .0
}

/// Open channels of the connections whose client-given name contains `needle`.
fn channels_of(needle: &str) -> Vec<u32> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "client_properties", "channels"])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.rsplit('\t').next()?.trim().parse().ok())
        .collect()
}

/// A window whose confirms do not come in time counts as lost, and the relay
/// opens a new publishing channel after a pause. The channel it gave up on is
/// closed at once (bounded), not left open through the pause with its
/// unconfirmed messages: while the relay waits, its connection has no
/// channel at all.
#[sqlx::test]
async fn the_relay_closes_the_channel_whose_confirms_timed_out(pool: sqlx::PgPool) {
    use holdclear::outbox::{Relay, RelaySettings};
    let store = holdclear::store::Store::from_pool(pool.clone());
    let prefix = unique("relay-timeout");
    let topo = topology(&prefix);
    let url = SecretUrl::parse("amqp", &amqp_url()).unwrap();
    let conn = Broker::new(url.clone(), prefix.clone())
        .connect("setup")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        topo.events_exchange.as_str().into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    // A full window (the relay's batch of 100): its confirms cannot all
    // arrive within zero seconds, so every round loses its channel.
    let case = outbox_rows(&store, "7001", 100).await;

    let relay_name = format!("{prefix}-relay");
    let relay = Relay::new(
        store.clone(),
        Broker::new(url, relay_name.clone()),
        topo.clone(),
        std::sync::Arc::new(tokio::sync::Notify::new()),
    )
    .with_settings(RelaySettings {
        idle_poll: Duration::from_millis(20),
        confirm_timeout: Duration::ZERO,
        retry: holdclear::config::RetrySettings {
            initial: Duration::from_millis(20),
            max_interval: Duration::from_millis(50),
            max_elapsed: Duration::MAX,
            multiplier: 2.0,
            randomization: 0.0,
        },
        ..RelaySettings::default()
    });
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(relay.run(cancel.clone()));
    // After four lost rounds the pauses between rounds last seconds.
    wait_for(
        Duration::from_secs(30),
        "four rounds without confirms",
        || async {
            let rows = store.outbox_of_case(case).await.unwrap();
            rows.iter().all(|r| r.attempts >= 4).then_some(())
        },
    )
    .await;
    let mut seen = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let channels = channels_of(&relay_name);
            assert!(
                channels.len() <= 1,
                "the relay's one connection: {channels:?}"
            );
            assert!(
                channels.iter().all(|n| *n <= 1),
                "one publishing channel at a time: {channels:?}"
            );
            seen.extend(channels.iter().copied());
            if channels == [0] {
                break;
            }
            // rabbitmqctl blocks; let the timer run between two looks.
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the relay's connection kept a channel open through every pause: {seen:?}"
    );

    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the relay stops")
        .unwrap();
    ch.exchange_delete(
        topo.events_exchange.as_str().into(),
        ExchangeDeleteOptions::default(),
    )
    .await
    .unwrap();
    holdclear::broker::close(&conn).await;
}

// ---- what the topology declares ------------------------------------------------

/// The arguments RabbitMQ holds for `queue` in `vhost` (via rabbitmqctl).
fn queue_arguments(vhost: &str, queue: &str) -> serde_json::Map<String, serde_json::Value> {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "-p",
            vhost,
            "name",
            "arguments",
            "--formatter",
            "json",
        ])
        .output()
        .expect("rabbitmqctl runs");
    let all: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("rabbitmqctl prints JSON");
    let q = all
        .iter()
        .find(|q| q["name"] == queue)
        .unwrap_or_else(|| panic!("queue {queue} exists"));
    q["arguments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a[0].as_str().unwrap().to_owned(), a[2].clone()))
        .collect()
}

/// The held-order queue dead-letters at least once: a dead letter stays in
/// it until the DLQ has confirmed it (RabbitMQ's default, at most once,
/// drops it when the DLX cannot take it), which needs `reject-publish`.
#[tokio::test]
async fn the_held_queue_dead_letters_at_least_once() {
    let prefix = unique("topology-args");
    let topo = topology(&prefix);
    let broker = Broker::new(SecretUrl::parse("amqp", &amqp_url()).unwrap(), prefix);
    let conn = broker.connect("test").await.unwrap();
    declare_topology(&broker, &conn, &topo, 7).await.unwrap();
    let held = queue_arguments("/", &topo.held_queue);
    let want = serde_json::json!({
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": topo.dead_letter_exchange,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": 7,
    });
    assert_eq!(serde_json::Value::Object(held), want);
    holdclear::broker::delete_topology(&conn, &topo)
        .await
        .unwrap();
    holdclear::broker::close(&conn).await;
}

/// A policy on vhost `/` for one test's exchange or queue; cleared when dropped.
struct Policy(String);

impl Policy {
    /// `holdclear-events` of deploy/rabbitmq/definitions.json, for `topo`'s
    /// events exchange.
    fn alternate_exchange(topo: &holdclear::config::Topology) -> Self {
        let name = unique("hc-test-ae");
        let pattern = format!("^{}$", topo.events_exchange.replace('.', "\\."));
        let definition =
            serde_json::json!({ "alternate-exchange": topo.unrouted_exchange() }).to_string();
        let out = std::process::Command::new("rabbitmqctl")
            .args([
                "-q",
                "set_policy",
                &name,
                &pattern,
                &definition,
                "--apply-to",
                "exchanges",
                "--priority",
                "10",
            ])
            .output()
            .expect("rabbitmqctl runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(name)
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "clear_policy", &self.0])
            .output();
    }
}

/// An event nobody subscribed to is not returned to the relay (which would
/// retry it forever): with the shipped policy, the events exchange's
/// alternate exchange takes it to `<events exchange>.unrouted`, which the
/// worker declares, and the broker keeps it. The events exchange itself has
/// no arguments: a consumer declaring it as the contract states is accepted.
#[tokio::test]
async fn events_nobody_subscribed_to_are_kept_by_the_broker() {
    let prefix = unique("topology-ae");
    let topo = topology(&prefix);
    let _policy = Policy::alternate_exchange(&topo);
    let broker = Broker::new(SecretUrl::parse("amqp", &amqp_url()).unwrap(), prefix);
    let conn = broker.connect("test").await.unwrap();
    let publisher = Publisher::open(&conn).await.unwrap();
    declare_topology(&broker, &conn, &topo, 20).await.unwrap();
    let consumer = conn.create_channel().await.unwrap();
    consumer
        .exchange_declare(
            topo.events_exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("a consumer's plain declaration of the events exchange");
    publisher
        .publish(&topo.events_exchange, &message(1))
        .await
        .expect("accepted: routed to the alternate exchange");
    let unrouted = format!("{}.unrouted", topo.events_exchange);
    let ch = conn.create_channel().await.unwrap();
    let got = wait_for(Duration::from_secs(10), "the unrouted event", || async {
        ch.basic_get(
            unrouted.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    })
    .await;
    assert_eq!(got.delivery.routing_key.as_str(), "order.hold_released");
    holdclear::broker::delete_topology(&conn, &topo)
        .await
        .unwrap();
    holdclear::broker::close(&conn).await;
}

/// The broker's own version, as `rabbitmqctl` reports it.
fn rabbitmqctl_version() -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "version"])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The probe reads the version the broker announces; the queues that keep
/// messages until an operator acts (the DLQ, the unrouted events) get
/// `x-delivery-limit = -1` on RabbitMQ 4.x only (declared here as if this
/// broker were 4.1: the arguments are stored as given) and none on 3.x,
/// where -1 would dead-letter on the first return.
#[tokio::test]
async fn queues_that_keep_messages_have_no_delivery_limit_on_any_version() {
    use holdclear::broker::{ServerVersion, declare_topology_for};
    let url = SecretUrl::parse("amqp", &amqp_url()).unwrap();
    let server = holdclear::broker::server::probe(&url, None).await.unwrap();
    assert_eq!(server.product, "RabbitMQ");
    assert_eq!(server.version, rabbitmqctl_version());

    for (version, limit) in [
        (server.clone(), None),
        (ServerVersion::new("RabbitMQ", "4.1.4"), Some(-1)),
    ] {
        let prefix = unique("topology-keep");
        let topo = topology(&prefix);
        let broker = Broker::new(url.clone(), prefix);
        let conn = broker.connect("test").await.unwrap();
        let declared = declare_topology_for(&conn, &topo, 20, &version)
            .await
            .unwrap();
        assert!(declared.outdated.is_empty(), "{declared:?}");
        for queue in [topo.dead_letter_queue.clone(), topo.unrouted_queue()] {
            let args = queue_arguments("/", &queue);
            assert_eq!(
                args.get("x-delivery-limit")
                    .and_then(serde_json::Value::as_i64),
                limit,
                "{version}: {queue}: {args:?}"
            );
            assert_eq!(args["x-queue-type"], "quorum");
        }
        let held = queue_arguments("/", &topo.held_queue);
        assert_eq!(held["x-delivery-limit"], 20, "{version}");
        holdclear::broker::delete_topology(&conn, &topo)
            .await
            .unwrap();
        holdclear::broker::close(&conn).await;
    }
}

/// A broker set up by an older holdclear: the held queue without
/// at-least-once dead lettering (and, on 4.x, the DLQ and the unrouted
/// queue without -1). Declaring them again would fail with
/// PRECONDITION_FAILED; they are kept, reported with the policy that fixes
/// each, and the worker consumes as before.
#[sqlx::test]
async fn an_existing_broker_with_older_arguments_keeps_working(pool: sqlx::PgPool) {
    use holdclear::broker::{ServerVersion, declare_topology_for};
    let prefix = unique("topology-old");
    let topo = topology(&prefix);
    let url = SecretUrl::parse("amqp", &amqp_url()).unwrap();
    let broker = Broker::new(url, prefix.clone());
    let conn = broker.connect("test").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    // What holdclear declared before this change.
    let old = |entries: &[(&str, AMQPValue)]| {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert((*k).into(), v.clone());
        }
        t
    };
    let text = |s: &str| AMQPValue::LongString(s.into());
    ch.exchange_declare(
        topo.events_exchange.as_str().into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    for (queue, args) in [
        (
            &topo.held_queue,
            old(&[
                ("x-queue-type", text("quorum")),
                ("x-dead-letter-exchange", text(&topo.dead_letter_exchange)),
                ("x-delivery-limit", AMQPValue::LongLongInt(20)),
            ]),
        ),
        (
            &topo.dead_letter_queue,
            old(&[("x-queue-type", text("quorum"))]),
        ),
    ] {
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    }

    let names = |d: &holdclear::broker::Declared| -> Vec<String> {
        d.outdated.iter().map(|o| o.name.clone()).collect()
    };
    // This broker (3.x): the DLQ is as it should be there.
    let here = declare_topology(&broker, &conn, &topo, 20)
        .await
        .expect("kept, not refused");
    assert_eq!(names(&here), std::slice::from_ref(&topo.held_queue));
    assert!(here.outdated[0].fix.contains("at-least-once"));
    // The same broker after an upgrade to 4.x: the queues that keep
    // messages lack their -1 too.
    let on_4 = declare_topology_for(&conn, &topo, 20, &ServerVersion::new("RabbitMQ", "4.2.0"))
        .await
        .expect("kept, not refused");
    assert_eq!(
        names(&on_4),
        [
            topo.held_queue.clone(),
            topo.dead_letter_queue.clone(),
            topo.unrouted_queue()
        ]
    );
    assert!(on_4.outdated[1].fix.contains("\"delivery-limit\": -1"));

    // `holdclear run` on that broker: ready, and it takes held orders.
    let worker = crate::support::worker::start(crate::support::settings(
        &crate::support::database_url(&pool).await,
        &prefix,
        &[],
    ))
    .await;
    wait_for(Duration::from_secs(30), "/readyz to answer 200", || async {
        (crate::support::worker::http_get(worker.http_addr, "/readyz")
            .await
            .0
            == 200)
            .then_some(())
    })
    .await;
    let publisher = Publisher::open(&conn).await.unwrap();
    let event = crate::support::broker::held_event(&format!("{prefix}-1"), "7100001");
    publisher
        .publish(
            &topo.orders_exchange,
            &crate::support::broker::message(&event),
        )
        .await
        .unwrap();
    wait_for(Duration::from_secs(30), "the case", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM cases")
            .fetch_one(&pool)
            .await
            .ok()?;
        (n == 1).then_some(())
    })
    .await;
    worker.shutdown().await.unwrap();
    holdclear::broker::delete_topology(&conn, &topo)
        .await
        .unwrap();
    holdclear::broker::close(&conn).await;
}

/// The relay publishes an event no queue is bound for: with the shipped
/// policy the broker keeps it in the unrouted queue, and the row is sent
/// (not retried forever).
#[sqlx::test]
async fn the_relay_moves_on_from_an_event_nobody_subscribed_to(pool: sqlx::PgPool) {
    use holdclear::outbox::{Relay, RelaySettings};
    let store = holdclear::store::Store::from_pool(pool.clone());
    let prefix = unique("relay-unrouted");
    let topo = topology(&prefix);
    let _policy = Policy::alternate_exchange(&topo);
    let broker = Broker::new(SecretUrl::parse("amqp", &amqp_url()).unwrap(), prefix);
    let conn = broker.connect("test").await.unwrap();
    declare_topology(&broker, &conn, &topo, 20).await.unwrap();
    let case = outbox_row(&store, "7201").await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let relay = Relay::new(
        store.clone(),
        broker.clone(),
        topo.clone(),
        std::sync::Arc::new(tokio::sync::Notify::new()),
    )
    .with_settings(RelaySettings {
        idle_poll: Duration::from_millis(20),
        unrouted_check: Duration::from_millis(50),
        ..RelaySettings::default()
    });
    let task = tokio::spawn(relay.run(cancel.clone()));
    let row = wait_for(Duration::from_secs(20), "the row to be sent", || async {
        let rows = store.outbox_of_case(case).await.unwrap();
        rows[0].sent_at.is_some().then(|| rows[0].clone())
    })
    .await;
    assert_eq!(row.attempts, 0, "sent at the first try: {row:?}");
    let kept = holdclear::broker::ready_messages(&conn, &topo.unrouted_queue())
        .await
        .unwrap();
    assert_eq!(kept, Some(1));
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the relay stops")
        .unwrap();
    holdclear::broker::delete_topology(&conn, &topo)
        .await
        .unwrap();
    holdclear::broker::close(&conn).await;
}
