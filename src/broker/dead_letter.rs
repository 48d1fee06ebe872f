//! Dead-lettering a delivery the worker cannot take: the message goes to the
//! dead-letter exchange with its body, properties and headers unchanged,
//! plus the `x-holdclear-*` headers of the event contract saying why, when
//! and where from. The publish is confirmed before the caller acks.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::types::{AMQPValue, LongString, ShortString};

use super::PublishError;
use super::consumer::Delivery;
use super::dlq::{ERROR_CODE, ERROR_DETAIL, FAILED_AT, ORIGINAL_EXCHANGE, ORIGINAL_ROUTING_KEY};
use crate::domain::DeadLetterCode;

/// Longest detail header, in characters; longer ones are cut with `…`.
const MAX_DETAIL_CHARS: usize = 512;

/// Publishes `delivery` to the dead-letter exchange of the session it came
/// on and waits for the broker's confirm, at most `confirm_timeout`
/// ([`PublishError::TimedOut`] then: publish it again). An error that
/// [`PublishError::is_channel_lost`] means the delivery's own connection is
/// gone: the broker will deliver it again, so there is nothing to ack.
pub async fn dead_letter(
    delivery: &Delivery,
    code: DeadLetterCode,
    detail: &str,
    failed_at: DateTime<Utc>,
    confirm_timeout: Duration,
) -> Result<(), PublishError> {
    let session = &delivery.session;
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    for (key, value) in [
        (ERROR_CODE, code.as_str().to_owned()),
        (ERROR_DETAIL, one_line(detail)),
        (
            FAILED_AT,
            failed_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        ),
        (ORIGINAL_EXCHANGE, delivery.exchange().to_owned()),
        (ORIGINAL_ROUTING_KEY, delivery.routing_key().to_owned()),
    ] {
        headers.insert(
            ShortString::from(key),
            AMQPValue::LongString(LongString::from(value)),
        );
    }
    let properties = delivery.properties.clone().with_headers(headers);
    let published = session.publisher.publish_raw(
        &session.dead_letter_exchange,
        delivery.routing_key(),
        delivery.body(),
        properties,
    );
    tokio::time::timeout(confirm_timeout, published)
        .await
        .unwrap_or(Err(PublishError::TimedOut(confirm_timeout)))
}

/// The detail as one bounded line: control characters (line breaks
/// included) become spaces, runs of spaces collapse, and it is cut to
/// [`MAX_DETAIL_CHARS`].
fn one_line(detail: &str) -> String {
    let mut out = String::with_capacity(detail.len().min(MAX_DETAIL_CHARS + 3));
    let mut chars = 0;
    let mut last_space = true;
    for c in detail.chars() {
        let c = if c.is_control() || c.is_whitespace() {
            ' '
        } else {
            c
        };
        if c == ' ' && last_space {
            continue;
        }
        if chars == MAX_DETAIL_CHARS {
            out.push('…');
            return out;
        }
        last_space = c == ' ';
        out.push(c);
        chars += 1;
    }
    out.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn details_are_one_bounded_line() {
        let cases = [
            ("plain", "plain"),
            ("two\nlines\r\nhere", "two lines here"),
            ("  tabs\tand  spaces  ", "tabs and spaces"),
            ("nul\0byte", "nul byte"),
        ];
        for (input, want) in cases {
            assert_eq!(one_line(input), want, "{input:?}");
        }
        let long = one_line(&"x".repeat(2000));
        assert_eq!(long.chars().count(), super::MAX_DETAIL_CHARS + 1);
        assert!(long.ends_with('…'));
    }
}
