//! A dead letter as the store keeps it: the message taken whole from the
//! dead-letter queue, with what can be read from it (the reason, where it
//! came from, the order's ids), and the two keys derived from it: the
//! dedupe key (one row per message, however often it comes back) and the
//! group (its code and a detail with every id, number and quoted value
//! masked). Pure: no I/O.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Code of a message the broker dead-lettered by itself (delivery limit
/// reached, `x-death` present, no `x-holdclear-*` header).
pub const DELIVERY_LIMIT: &str = "DELIVERY_LIMIT";
/// Code of a message in the dead-letter queue that says nothing about why.
pub const UNKNOWN: &str = "UNKNOWN";

/// Codes whose cause is the message itself: replaying it unchanged fails
/// the same way, so a replay refuses them unless forced.
pub const UNCHANGED_CAUSE_CODES: [&str; 4] = [
    "MALFORMED_JSON",
    "INVALID_EVENT",
    "UNSUPPORTED_EVENT_TYPE",
    "PAYLOAD_TOO_LARGE",
];

/// The body for a reader: pretty JSON, else the text with control
/// characters escaped, else (not UTF-8) hex.
pub fn body_text(body: &[u8]) -> String {
    match std::str::from_utf8(body) {
        Ok(text) => match serde_json::from_str::<Value>(text) {
            Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_else(|_| text.to_owned()),
            Err(_) => text.escape_debug().to_string(),
        },
        Err(_) => format!(
            "(not UTF-8, {} bytes, hex) {}",
            body.len(),
            hex::encode(body)
        ),
    }
}

/// True when a dead letter with this code would fail again if replayed as is.
pub fn cause_is_in_message(code: &str) -> bool {
    UNCHANGED_CAUSE_CODES.contains(&code)
}

/// Headers the broker sets anew on every delivery of the same message.
const PER_DELIVERY_HEADERS: [&str; 2] = ["x-delivery-count", "x-acquired-count"];

/// One message taken from the dead-letter queue.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetterMessage {
    /// The body, byte for byte.
    pub body: Vec<u8>,
    /// AMQP `message_id`.
    pub message_id: Option<String>,
    /// The properties (without headers), readable JSON.
    pub properties: Value,
    /// The headers, readable JSON.
    pub headers: Value,
    /// The properties exactly as the broker library serialises them (for replay).
    pub raw_properties: Value,
    /// The reason code (`x-holdclear-error-code`, or [`DELIVERY_LIMIT`], or [`UNKNOWN`]).
    pub code: String,
    /// The one-line detail.
    pub detail: String,
    /// Exchange it was first published to.
    pub origin_exchange: Option<String>,
    /// Routing key it was first published with.
    pub origin_routing_key: Option<String>,
    /// When it was dead-lettered, if a header says so.
    pub failed_at: Option<DateTime<Utc>>,
}

/// The ids of the order a body names, read leniently.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrderIds {
    /// `data.salesOrderNumber`.
    pub sales_order_number: Option<String>,
    /// `data.webOrderId`.
    pub web_order_id: Option<String>,
    /// The envelope `id`.
    pub event_id: Option<String>,
}

impl DeadLetterMessage {
    /// sha256 of the message id and the body: the same message, however
    /// often it is dead-lettered again, has one key.
    pub fn dedupe_key(&self) -> Vec<u8> {
        let mut h = Sha256::new();
        h.update(self.message_id.as_deref().unwrap_or("").as_bytes());
        h.update([0]);
        h.update(&self.body);
        h.finalize().to_vec()
    }

    /// sha256 of the headers without the ones the broker adds on each
    /// redelivery (`x-delivery-count`; `x-acquired-count` on RabbitMQ 4.x):
    /// a message stored but not acked before a crash comes back as the same
    /// sighting, while a message dead-lettered again (new `x-death` counts,
    /// new failure headers) is a new one.
    pub fn sighting_key(&self) -> Vec<u8> {
        let mut headers = self.headers.clone();
        if let Some(map) = headers.as_object_mut() {
            for name in PER_DELIVERY_HEADERS {
                map.remove(name);
            }
        }
        Sha256::digest(headers.to_string().as_bytes()).to_vec()
    }

    /// The order's ids, when the body is JSON that carries them (strings
    /// or numbers); anything else gives `None`s.
    pub fn order_ids(&self) -> OrderIds {
        let Ok(value) = serde_json::from_slice::<Value>(&self.body) else {
            return OrderIds::default();
        };
        let text = |v: Option<&Value>| match v? {
            Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        let data = value.get("data");
        OrderIds {
            sales_order_number: text(data.and_then(|d| d.get("salesOrderNumber"))),
            web_order_id: text(data.and_then(|d| d.get("webOrderId"))),
            event_id: text(value.get("id")),
        }
    }

    /// The group this dead letter belongs to.
    pub fn group(&self) -> String {
        group_key(&self.code, &signature(&self.detail))
    }
}

/// The group of a code and a signature: 12 hex digits.
pub fn group_key(code: &str, signature: &str) -> String {
    let mut h = Sha256::new();
    h.update(code.as_bytes());
    h.update([0]);
    h.update(signature.as_bytes());
    hex::encode(&h.finalize()[..6])
}

/// The detail with what varies between messages masked: quoted values
/// become `"…"`, UUIDs `<uuid>`, runs of digits `N`.
pub fn signature(detail: &str) -> String {
    let mut out = String::with_capacity(detail.len());
    let chars: Vec<char> = detail.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if (c == '"' || c == '\'' || c == '`')
            && let Some(end) = chars[i + 1..].iter().position(|&d| d == c)
        {
            out.push(c);
            out.push('…');
            out.push(c);
            i += end + 2;
            continue;
        }
        if is_uuid_at(&chars[i..]) && (i == 0 || !chars[i - 1].is_ascii_alphanumeric()) {
            out.push_str("<uuid>");
            i += 36;
            continue;
        }
        if c.is_ascii_digit() {
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            out.push('N');
            continue;
        }
        out.push(c);
        i += 1;
    }
    out
}

fn is_uuid_at(s: &[char]) -> bool {
    if s.len() < 36 {
        return false;
    }
    s[..36].iter().enumerate().all(|(i, c)| match i {
        8 | 13 | 18 | 23 => *c == '-',
        _ => c.is_ascii_hexdigit(),
    }) && s.get(36).is_none_or(|c| !c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redelivery_is_the_same_sighting_a_new_death_is_not() {
        let message = |headers: Value| DeadLetterMessage {
            body: b"{}".to_vec(),
            message_id: Some("m-1".into()),
            properties: Value::Null,
            headers,
            raw_properties: Value::Null,
            code: UNKNOWN.into(),
            detail: String::new(),
            origin_exchange: None,
            origin_routing_key: None,
            failed_at: None,
        };
        let first = message(serde_json::json!({"x-death": [{"count": 1}]}));
        let redelivered = message(serde_json::json!({
            "x-death": [{"count": 1}], "x-delivery-count": 3, "x-acquired-count": 4
        }));
        let died_again = message(serde_json::json!({"x-death": [{"count": 2}]}));
        assert_eq!(first.sighting_key(), redelivered.sighting_key());
        assert_ne!(first.sighting_key(), died_again.sighting_key());
        assert_eq!(first.dedupe_key(), died_again.dedupe_key());
    }

    #[test]
    fn signatures_mask_what_varies() {
        let cases = [
            (
                "data.salesOrderNumber: \"12ab\" is not a sales order number",
                "data.salesOrderNumber: \"…\" is not a sales order number",
            ),
            (
                "event 0b6f3c1e-8a5e-4c07-9d1e-5d7b1f0f2a11 has no data",
                "event <uuid> has no data",
            ),
            (
                "data.lines[3].sku is required",
                "data.lines[N].sku is required",
            ),
            (
                "body of 300000 bytes exceeds 262144",
                "body of N bytes exceeds N",
            ),
            ("unterminated \"quote", "unterminated \"quote"),
        ];
        for (detail, want) in cases {
            assert_eq!(signature(detail), want, "{detail}");
        }
        assert_eq!(
            group_key("INVALID_EVENT", &signature("order 1 bad")),
            group_key("INVALID_EVENT", &signature("order 22 bad"))
        );
    }

    #[test]
    fn order_ids_are_read_leniently() {
        let msg = |body: &[u8]| DeadLetterMessage {
            body: body.to_vec(),
            message_id: None,
            properties: Value::Null,
            headers: Value::Null,
            raw_properties: Value::Null,
            code: UNKNOWN.into(),
            detail: String::new(),
            origin_exchange: None,
            origin_routing_key: None,
            failed_at: None,
        };
        let ids =
            msg(br#"{"id":"e1","data":{"salesOrderNumber":104,"webOrderId":" 9 "}}"#).order_ids();
        assert_eq!(ids.sales_order_number.as_deref(), Some("104"));
        assert_eq!(ids.web_order_id.as_deref(), Some("9"));
        assert_eq!(ids.event_id.as_deref(), Some("e1"));
        assert_eq!(msg(b"\xff\xfe").order_ids(), OrderIds::default());
        assert_eq!(msg(br#"{"data":7}"#).order_ids(), OrderIds::default());
        assert_ne!(msg(b"a").dedupe_key(), msg(b"b").dedupe_key());
    }
}
