//! The inbound `order.held` event: its validated form and the decoder that
//! turns a message body into it (or into a dead-letter reason).

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::values::{
    CountryCode, Domain, Email, EventId, OrderId, OrderType, SalesOrderNumber, WebOrderId,
};

/// The CloudEvents `type` of a held order.
pub const HELD_EVENT_TYPE: &str = "commerce.order.held.v1";

/// Why an order is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HoldReason {
    /// No Smart Account is assigned.
    NoSmartAccount,
    /// The assigned Smart Account is pending activation.
    PendingSmartAccount,
}

impl HoldReason {
    /// The contract's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoSmartAccount => "NO_SMART_ACCOUNT",
            Self::PendingSmartAccount => "PENDING_SMART_ACCOUNT",
        }
    }

    /// Parses the contract's spelling.
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "NO_SMART_ACCOUNT" => Some(Self::NoSmartAccount),
            "PENDING_SMART_ACCOUNT" => Some(Self::PendingSmartAccount),
            _ => None,
        }
    }
}

impl fmt::Display for HoldReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The reseller on the order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partner {
    /// Partner id, e.g. `P-100`.
    pub id: Option<String>,
    /// Partner name.
    pub name: Option<String>,
}

/// The end customer on the order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndCustomer {
    /// Company name.
    pub name: Option<String>,
    /// Contact e-mail; its domain drives most rules.
    pub email: Option<Email>,
    /// Country, ISO alpha-2.
    pub country: Option<CountryCode>,
}

/// The pending Smart Account of a `PENDING_SMART_ACCOUNT` hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSmartAccount {
    /// The account's domain.
    pub domain: Option<Domain>,
    /// Its status as upstream saw it (`PENDING`).
    pub status: Option<String>,
}

/// One order line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Line {
    /// Line number, e.g. `1.1`.
    pub line_number: Option<String>,
    /// Product SKU.
    pub sku: Option<String>,
    /// Product family, e.g. `C9300`.
    pub product_family: Option<String>,
}

/// The `data` of a held-order event, validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldOrder {
    /// Sales order number and/or web order id.
    #[serde(flatten)]
    pub order: OrderId,
    /// The buyer's purchase order number.
    pub purchase_order_number: Option<String>,
    /// Why the order is held.
    pub hold_reason: HoldReason,
    /// When the hold was applied.
    pub held_at: Option<DateTime<Utc>>,
    /// Order type (`STANDARD`, `STOCKING`, `EA`, …).
    pub order_type: Option<OrderType>,
    /// The partner who placed the order (rules match on its id).
    pub partner: Option<Partner>,
    /// The end customer.
    pub end_customer: Option<EndCustomer>,
    /// The pending Smart Account, for `PENDING_SMART_ACCOUNT` holds.
    pub smart_account: Option<PendingSmartAccount>,
    /// Order lines.
    #[serde(default)]
    pub lines: Vec<Line>,
}

impl HeldOrder {
    /// The domain of the end customer's e-mail, if there is one.
    pub fn end_customer_domain(&self) -> Option<Domain> {
        self.end_customer
            .as_ref()?
            .email
            .as_ref()
            .map(Email::domain)
    }
}

/// A validated `commerce.order.held.v1` event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldOrderEvent {
    /// Envelope id: the same id twice is one event.
    pub id: EventId,
    /// Envelope source.
    pub source: String,
    /// Envelope time.
    pub time: Option<DateTime<Utc>>,
    /// The held order.
    pub data: HeldOrder,
}

/// The dead-letter reason codes of the event contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeadLetterCode {
    /// Body larger than the configured limit.
    PayloadTooLarge,
    /// Not UTF-8, not JSON, or nested too deep.
    MalformedJson,
    /// `specversion` other than `1.0`, or a `type` this worker does not take.
    UnsupportedEventType,
    /// JSON, but a required field missing, of the wrong type or out of its set.
    InvalidEvent,
}

impl DeadLetterCode {
    /// The header value, e.g. `MALFORMED_JSON`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::MalformedJson => "MALFORMED_JSON",
            Self::UnsupportedEventType => "UNSUPPORTED_EVENT_TYPE",
            Self::InvalidEvent => "INVALID_EVENT",
        }
    }

    /// Every code, for metrics and tools.
    pub const ALL: [Self; 4] = [
        Self::PayloadTooLarge,
        Self::MalformedJson,
        Self::UnsupportedEventType,
        Self::InvalidEvent,
    ];
}

impl fmt::Display for DeadLetterCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a message body is not a held-order event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct DecodeError {
    /// The dead-letter code.
    pub code: DeadLetterCode,
    /// One line: which field, what was wrong.
    pub detail: String,
}

fn invalid(detail: impl Into<String>) -> DecodeError {
    DecodeError {
        code: DeadLetterCode::InvalidEvent,
        detail: detail.into(),
    }
}

/// Reads typed fields out of a JSON object, naming the path on error.
struct Fields<'a> {
    path: String,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn at(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// A present, non-null value.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>, DecodeError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(invalid(format!(
                "{} must be a string, not {}",
                self.at(key),
                kind(other)
            ))),
        }
    }

    fn req_str(&self, key: &str) -> Result<&'a str, DecodeError> {
        self.opt_str(key)?
            .ok_or_else(|| invalid(format!("{} is required", self.at(key))))
    }

    fn opt_parsed<T, E: fmt::Display>(
        &self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<Option<T>, DecodeError> {
        self.opt_str(key)?
            .map(|s| parse(s).map_err(|e| invalid(format!("{}: {e}", self.at(key)))))
            .transpose()
    }

    fn opt_text(&self, key: &str) -> Result<Option<String>, DecodeError> {
        Ok(self.opt_str(key)?.map(str::to_owned))
    }

    fn opt_time(&self, key: &str) -> Result<Option<DateTime<Utc>>, DecodeError> {
        self.opt_parsed(key, |s| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| format!("{s:?} is not an RFC 3339 time"))
        })
    }

    fn opt_object(&self, key: &str) -> Result<Option<Fields<'a>>, DecodeError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Fields {
                path: self.at(key),
                map,
            })),
            Some(other) => Err(invalid(format!(
                "{} must be an object, not {}",
                self.at(key),
                kind(other)
            ))),
        }
    }
}

/// The body as JSON: within `max_bytes`, UTF-8, JSON.
fn parse_json(body: &[u8], max_bytes: usize) -> Result<Value, DecodeError> {
    if body.len() > max_bytes {
        return Err(DecodeError {
            code: DeadLetterCode::PayloadTooLarge,
            detail: format!("body is {} bytes; the limit is {max_bytes}", body.len()),
        });
    }
    let text = std::str::from_utf8(body).map_err(|e| DecodeError {
        code: DeadLetterCode::MalformedJson,
        detail: format!(
            "body is not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ),
    })?;
    serde_json::from_str(text).map_err(|e| DecodeError {
        code: DeadLetterCode::MalformedJson,
        detail: format!("body is not JSON: {e}"),
    })
}

/// The envelope's `specversion` and `type` (this worker's), `id`, `source`
/// and `time`.
fn envelope<'a>(
    env: &Fields<'a>,
) -> Result<(EventId, &'a str, Option<DateTime<Utc>>), DecodeError> {
    let specversion = env.req_str("specversion")?;
    if specversion != "1.0" {
        return Err(DecodeError {
            code: DeadLetterCode::UnsupportedEventType,
            detail: format!("specversion {specversion:?} is not supported; expected \"1.0\""),
        });
    }
    let event_type = env.req_str("type")?;
    if event_type != HELD_EVENT_TYPE {
        return Err(DecodeError {
            code: DeadLetterCode::UnsupportedEventType,
            detail: format!(
                "type {event_type:?} is not taken by this worker; expected {HELD_EVENT_TYPE:?}"
            ),
        });
    }
    let id = EventId::parse(env.req_str("id")?).map_err(|e| invalid(format!("id: {e}")))?;
    let source = env.req_str("source")?;
    if source.is_empty() {
        return Err(invalid("source must not be empty"));
    }
    Ok((id, source, env.opt_time("time")?))
}

/// The event's `data`.
fn held_order(data: &Fields<'_>) -> Result<HeldOrder, DecodeError> {
    let sales = data.opt_parsed("salesOrderNumber", SalesOrderNumber::parse)?;
    let web = data.opt_parsed("webOrderId", WebOrderId::parse)?;
    let order = OrderId::new(sales, web)
        .ok_or_else(|| invalid("data.salesOrderNumber or data.webOrderId is required"))?;
    let reason_raw = data.req_str("holdReason")?;
    let hold_reason = HoldReason::parse(reason_raw).ok_or_else(|| {
        invalid(format!(
            "data.holdReason {reason_raw:?} is not NO_SMART_ACCOUNT or PENDING_SMART_ACCOUNT"
        ))
    })?;
    let partner = data
        .opt_object("partner")?
        .map(|p| -> Result<_, DecodeError> {
            Ok(Partner {
                id: p.opt_text("id")?,
                name: p.opt_text("name")?,
            })
        })
        .transpose()?;
    let end_customer = data
        .opt_object("endCustomer")?
        .map(|c| -> Result<_, DecodeError> {
            Ok(EndCustomer {
                name: c.opt_text("name")?,
                email: c.opt_parsed("email", Email::parse)?,
                country: c.opt_parsed("country", CountryCode::parse)?,
            })
        })
        .transpose()?;
    let smart_account = data
        .opt_object("smartAccount")?
        .map(|s| -> Result<_, DecodeError> {
            Ok(PendingSmartAccount {
                domain: s.opt_parsed("domain", Domain::parse)?,
                status: s.opt_text("status")?,
            })
        })
        .transpose()?;
    let lines = lines(data)?;
    Ok(HeldOrder {
        order,
        purchase_order_number: data.opt_text("purchaseOrderNumber")?,
        hold_reason,
        held_at: data.opt_time("heldAt")?,
        order_type: data.opt_parsed("orderType", OrderType::parse)?,
        partner,
        end_customer,
        smart_account,
        lines,
    })
}

/// `data.lines`: absent is none.
fn lines(data: &Fields<'_>) -> Result<Vec<Line>, DecodeError> {
    match data.get("lines") {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let Value::Object(map) = item else {
                    return Err(invalid(format!(
                        "data.lines[{i}] must be an object, not {}",
                        kind(item)
                    )));
                };
                let l = Fields {
                    path: format!("data.lines[{i}]"),
                    map,
                };
                Ok(Line {
                    line_number: l.opt_text("lineNumber")?,
                    sku: l.opt_text("sku")?,
                    product_family: l.opt_text("productFamily")?,
                })
            })
            .collect(),
        Some(other) => Err(invalid(format!(
            "data.lines must be an array, not {}",
            kind(other)
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl HeldOrderEvent {
    /// Turns a message body into a validated event, or says why it is not one.
    /// The fields are checked in the contract's order (the envelope, then
    /// `data`), and the first wrong one is the one named.
    ///
    /// `max_bytes` is the payload limit; the check comes before any parsing.
    pub fn decode(body: &[u8], max_bytes: usize) -> Result<Self, DecodeError> {
        let value = parse_json(body, max_bytes)?;
        let Value::Object(map) = &value else {
            return Err(invalid(format!(
                "the envelope must be a JSON object, not {}",
                kind(&value)
            )));
        };
        let env = Fields {
            path: String::new(),
            map,
        };
        let (id, source, time) = envelope(&env)?;
        let data = env
            .opt_object("data")?
            .ok_or_else(|| invalid("data is required"))?;
        Ok(Self {
            id,
            source: source.to_owned(),
            time,
            data: held_order(&data)?,
        })
    }

    /// The order number of a body that may not be a valid event, for
    /// operators' tools: the sales order number, else the web order id.
    pub fn peek_order_number(body: &[u8]) -> Option<String> {
        let value: Value = serde_json::from_slice(body).ok()?;
        let data = value.get("data")?;
        ["salesOrderNumber", "webOrderId"]
            .iter()
            .find_map(|k| data.get(*k).and_then(Value::as_str).map(str::to_owned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 256 * 1024;

    fn sample() -> Value {
        serde_json::json!({
            "specversion": "1.0", "type": "commerce.order.held.v1", "source": "/commerce/orders",
            "id": "0b6f3c1e-8a5e-4c07-9d1e-5d7b1f0f2a11", "time": "2026-11-23T09:12:44Z",
            "datacontenttype": "application/json",
            "data": {
                "salesOrderNumber": "104233871", "webOrderId": "98765432",
                "purchaseOrderNumber": "PO-ACME-0042", "holdReason": "NO_SMART_ACCOUNT",
                "heldAt": "2026-11-23T09:12:44Z", "orderType": "STANDARD",
                "partner": {"id": "P-100", "name": "Globex Networks"},
                "endCustomer": {"name": "Acme Corp", "email": "it-admin@acme.com", "country": "US"},
                "smartAccount": null,
                "lines": [{"lineNumber": "1.1", "sku": "C9300-48P-E", "productFamily": "C9300"}]}})
    }

    fn with(path: &[&str], value: Option<Value>) -> Vec<u8> {
        let mut v = sample();
        let mut cur = &mut v;
        for key in &path[..path.len() - 1] {
            cur = cur.get_mut(*key).unwrap();
        }
        let last = path[path.len() - 1];
        match value {
            Some(x) => {
                cur[last] = x;
            }
            None => {
                cur.as_object_mut().unwrap().remove(last);
            }
        }
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn the_contract_sample_decodes() {
        let e = HeldOrderEvent::decode(&serde_json::to_vec(&sample()).unwrap(), LIMIT).unwrap();
        assert_eq!(e.id.as_str(), "0b6f3c1e-8a5e-4c07-9d1e-5d7b1f0f2a11");
        assert_eq!(e.data.order.key(), "104233871");
        assert_eq!(e.data.hold_reason, HoldReason::NoSmartAccount);
        assert_eq!(e.data.end_customer_domain().unwrap().as_str(), "acme.com");
        assert_eq!(e.data.lines[0].product_family.as_deref(), Some("C9300"));
        // The stored form round-trips.
        let stored = serde_json::to_value(&e).unwrap();
        assert_eq!(serde_json::from_value::<HeldOrderEvent>(stored).unwrap(), e);
    }

    #[test]
    fn bad_bodies_get_the_contract_codes() {
        use DeadLetterCode::*;
        let deep = "[".repeat(10_000);
        let cases: Vec<(&str, Vec<u8>, DeadLetterCode, &str)> = vec![
            ("too large", vec![b' '; LIMIT + 1], PayloadTooLarge, "limit"),
            ("not utf-8", vec![b'{', 0xff, b'}'], MalformedJson, "UTF-8"),
            ("not json", b"{\"a\":".to_vec(), MalformedJson, "not JSON"),
            ("too deep", deep.into_bytes(), MalformedJson, "not JSON"),
            ("array", b"[]".to_vec(), InvalidEvent, "object"),
            (
                "specversion",
                with(&["specversion"], Some("0.3".into())),
                UnsupportedEventType,
                "specversion",
            ),
            (
                "type",
                with(&["type"], Some("commerce.order.shipped.v1".into())),
                UnsupportedEventType,
                "type",
            ),
            (
                "no specversion",
                with(&["specversion"], None),
                InvalidEvent,
                "specversion is required",
            ),
            ("no id", with(&["id"], None), InvalidEvent, "id is required"),
            (
                "id number",
                with(&["id"], Some(7.into())),
                InvalidEvent,
                "id must be a string",
            ),
            (
                "no source",
                with(&["source"], None),
                InvalidEvent,
                "source is required",
            ),
            (
                "no data",
                with(&["data"], None),
                InvalidEvent,
                "data is required",
            ),
            (
                "no reason",
                with(&["data", "holdReason"], None),
                InvalidEvent,
                "data.holdReason is required",
            ),
            (
                "bad reason",
                with(&["data", "holdReason"], Some("CREDIT".into())),
                InvalidEvent,
                "CREDIT",
            ),
            (
                "bad email",
                with(&["data", "endCustomer", "email"], Some("nobody".into())),
                InvalidEvent,
                "data.endCustomer.email",
            ),
            (
                "bad time",
                with(&["data", "heldAt"], Some("yesterday".into())),
                InvalidEvent,
                "data.heldAt",
            ),
            (
                "bad so",
                with(&["data", "salesOrderNumber"], Some("1/2".into())),
                InvalidEvent,
                "salesOrderNumber",
            ),
            (
                "lines",
                with(&["data", "lines"], Some("x".into())),
                InvalidEvent,
                "data.lines must be an array",
            ),
        ];
        for (name, body, code, needle) in cases {
            let err = HeldOrderEvent::decode(&body, LIMIT).expect_err(name);
            assert_eq!(err.code, code, "{name}: {err}");
            assert!(err.detail.contains(needle), "{name}: {err}");
        }
    }

    #[test]
    fn neither_order_number_is_invalid() {
        let mut v = sample();
        v["data"]
            .as_object_mut()
            .unwrap()
            .remove("salesOrderNumber");
        v["data"].as_object_mut().unwrap().remove("webOrderId");
        let err = HeldOrderEvent::decode(&serde_json::to_vec(&v).unwrap(), LIMIT).unwrap_err();
        assert_eq!(err.code, DeadLetterCode::InvalidEvent);
        assert!(err.detail.contains("salesOrderNumber or data.webOrderId"));
    }

    #[test]
    fn web_order_id_alone_is_enough_and_unknown_fields_are_ignored() {
        let mut v = sample();
        v["data"]
            .as_object_mut()
            .unwrap()
            .remove("salesOrderNumber");
        v["data"]["somethingNew"] = 1.into();
        v["extension"] = "x".into();
        let e = HeldOrderEvent::decode(&serde_json::to_vec(&v).unwrap(), LIMIT).unwrap();
        assert_eq!(e.data.order.key(), "web:98765432");
    }

    #[test]
    fn peek_reads_the_order_number_of_an_invalid_event() {
        let body = with(&["specversion"], Some("9".into()));
        assert_eq!(
            HeldOrderEvent::peek_order_number(&body).as_deref(),
            Some("104233871")
        );
        assert_eq!(HeldOrderEvent::peek_order_number(b"garbage"), None);
    }
}
