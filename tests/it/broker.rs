//! The broker layer against the real RabbitMQ: topology and confirmed publishing.

use holdclear::broker::{Broker, OutgoingMessage, PublishError, Publisher, declare_topology};
use holdclear::config::SecretUrl;
use lapin::options::{
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;

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
    declare_topology(publisher.channel(), &topo, 20)
        .await
        .unwrap();
    // A second declaration with the same arguments is accepted.
    declare_topology(publisher.channel(), &topo, 20)
        .await
        .unwrap();

    // Nothing is bound to the events exchange yet: mandatory returns it.
    let err = publisher
        .publish(&topo.events_exchange, &message(0))
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

    for queue in [&topo.held_queue, &topo.dead_letter_queue] {
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
    for ex in [
        &topo.orders_exchange,
        &topo.dead_letter_exchange,
        &topo.events_exchange,
    ] {
        ch.exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .unwrap();
    }
}

// ---- the relay's channels ------------------------------------------------------

/// Writes one escalation event for a fresh case through a real step commit.
async fn outbox_row(store: &holdclear::store::Store, order: &str) -> uuid::Uuid {
    use holdclear::domain::{CaseState, EscalationLevel, EscalationReason, HeldOrderEvent};
    use holdclear::outbox::OutboundEvent;
    use holdclear::store::Recorded;
    let body = serde_json::json!({
        "specversion": "1.0", "type": "commerce.order.held.v1", "source": "/t",
        "id": uuid::Uuid::new_v4().to_string(),
        "data": {"salesOrderNumber": order, "holdReason": "NO_SMART_ACCOUNT"}
    });
    let event = HeldOrderEvent::decode(&serde_json::to_vec(&body).unwrap(), 256 * 1024)
        .expect("a valid held-order event");
    let id = match store
        .record_held(std::slice::from_ref(&event))
        .await
        .unwrap()
        .as_slice()
    {
        [Recorded::Opened { case_id }] => *case_id,
        other => panic!("no case opened: {other:?}"),
    };
    let case = store
        .claim_due("writer#1", Duration::from_secs(30), 1)
        .await
        .unwrap()
        .pop()
        .unwrap()
        .case
        .unwrap();
    let mut next = case.clone();
    next.state = CaseState::Escalated;
    next.escalation_reason = Some(EscalationReason::NoRuleMatched);
    next.next_action_at = None;
    let envelope = OutboundEvent::HoldEscalated {
        reason: EscalationReason::NoRuleMatched,
        level: EscalationLevel::Critical,
        held_seconds: 1,
        detail: "no rule".into(),
        threshold: None,
    }
    .envelope(id, 0, &case.order, chrono::Utc::now());
    assert!(
        store
            .commit_step(
                "writer#1",
                &next,
                &[],
                std::slice::from_ref(&envelope),
                None
            )
            .await
            .unwrap()
    );
    id
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
    let case = outbox_row(&store, "7001").await;

    // No confirm can arrive within zero seconds: every round loses its channel.
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
            (rows[0].attempts >= 4).then_some(())
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
