//! The broker layer against the real RabbitMQ: topology and confirmed publishing.

use holdclear::broker::{Broker, OutgoingMessage, PublishError, Publisher, declare_topology};
use holdclear::config::SecretUrl;
use lapin::options::{
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;

use crate::support::{amqp_url, topology, unique};

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
