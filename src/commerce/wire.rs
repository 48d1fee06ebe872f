//! The contract's JSON, as the client reads and writes it.
//!
//! Reading is lenient where the contract leaves room (unknown fields are
//! ignored, `isDefault` as a string or a boolean, numbers where strings are
//! expected) and strict where an answer would otherwise decide by silence:
//! a missing or `null` field that the decision rests on (an order's
//! `holds` or `status`, an account's `status`, a Virtual Account's
//! `isDefault` or `commerceAccessLevel`, a receipt's `assignmentId` or
//! `status`) makes the answer unreadable (`Err` with the reason; the client
//! reports it as transient), never a default that means "yes" or "done".
//! The result is converted into the module's types once, here.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    AccountStatus, AssignmentReceipt, Hold, ORDER_STATUSES, Order, SMART_ACCOUNT_HOLD,
    SmartAccount, VirtualAccount,
};
use crate::domain::SalesOrderNumber;

/// `{"status": "ERROR", "errorCode": …, "statusMessage": …}`; also the
/// envelope fields of a successful answer.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct Envelope {
    pub(crate) status: Option<String>,
    pub(crate) error_code: Option<String>,
    pub(crate) status_message: Option<String>,
}

/// The token endpoint's answer (success or OAuth2 error).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct TokenAnswer {
    pub(crate) access_token: Option<String>,
    pub(crate) expires_in: Option<Value>,
    pub(crate) error: Option<String>,
}

/// The lifetime assumed for a token whose answer has no `expires_in`:
/// short, so that a token the server retires early is soon replaced
/// (a 401 replaces it at once anyway); never "forever", never zero.
pub(crate) const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// The shortest lifetime taken from `expires_in` (`0` would mean a token
/// fetch before every call).
const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(1);
/// The longest lifetime taken from `expires_in`.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

impl TokenAnswer {
    /// `expires_in` as a duration (a number or a numeric string), held
    /// between one second and a day; [`DEFAULT_TOKEN_LIFETIME`] when absent
    /// or `null`; `None` when it is not a number of seconds.
    pub(crate) fn lifetime(&self) -> Option<Duration> {
        let stated = match &self.expires_in {
            None | Some(Value::Null) => return Some(DEFAULT_TOKEN_LIFETIME),
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
            Some(_) => None,
        }?;
        // More seconds than a `Duration` holds (`u64::MAX` rounds up as a
        // JSON number) is "forever": a day, as any long lifetime.
        if !stated.is_finite() || stated < 0.0 {
            return None;
        }
        let stated = Duration::try_from_secs_f64(stated).unwrap_or(Duration::MAX);
        Some(stated.clamp(MIN_TOKEN_LIFETIME, MAX_TOKEN_LIFETIME))
    }

    /// Whether the answer said how long the token lives.
    pub(crate) fn states_lifetime(&self) -> bool {
        !matches!(self.expires_in, None | Some(Value::Null))
    }
}

/// Search answer.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct SearchAnswer {
    pub(crate) total_records: Option<Value>,
    pub(crate) accounts: Option<Vec<WireAccount>>,
    #[serde(flatten)]
    pub(crate) envelope: Envelope,
}

/// One account of a search answer.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct WireAccount {
    pub(crate) id: Option<Value>,
    pub(crate) domain: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) email: Option<String>,
    #[serde(rename = "type")]
    pub(crate) account_type: Option<String>,
    pub(crate) status: Option<String>,
}

impl SearchAnswer {
    /// The accounts; an answer without the list is unreadable unless it
    /// says it found nothing (`totalRecords: 0`).
    pub(crate) fn into_accounts(self) -> Result<Vec<WireAccount>, String> {
        match (self.accounts, self.total_records) {
            (Some(accounts), _) => Ok(accounts),
            (None, Some(total)) if text(total.clone()) == "0" => Ok(Vec::new()),
            (None, _) => Err("the answer has no accounts list".into()),
        }
    }
}

impl WireAccount {
    /// How the account is named in a message: its id, else its domain or name.
    pub(crate) fn label(&self) -> String {
        let id = self.id.clone().map(text).filter(|i| !i.is_empty());
        id.or_else(|| self.domain.clone())
            .or_else(|| self.name.clone())
            .unwrap_or_else(|| "(unnamed)".into())
    }

    /// The account, or why the answer cannot be one: the assignment names
    /// the account by its domain, and only its status says whether it can
    /// release the hold.
    pub(crate) fn into_account(self) -> Result<SmartAccount, String> {
        let label = self.label();
        let domain = self
            .domain
            .filter(|d| !d.trim().is_empty())
            .ok_or_else(|| format!("account {label} has no domain"))?;
        let status = self
            .status
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| format!("account {label} has no status"))?;
        Ok(SmartAccount {
            id: self.id.map(text).unwrap_or_default(),
            domain,
            name: self.name.unwrap_or_default(),
            account_type: self.account_type.unwrap_or_default(),
            status: AccountStatus::parse(status.trim()),
        })
    }
}

/// Virtual Accounts answer.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct VirtualAccountsAnswer {
    pub(crate) virtual_accounts: Option<Vec<WireVirtualAccount>>,
    #[serde(flatten)]
    pub(crate) envelope: Envelope,
}

/// One Virtual Account.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct WireVirtualAccount {
    pub(crate) name: Option<String>,
    pub(crate) is_default: Option<Value>,
    pub(crate) commerce_access_level: Option<String>,
}

impl WireVirtualAccount {
    /// The Virtual Account, or why the answer cannot be one: without
    /// `isDefault` or `commerceAccessLevel` nobody can tell whether it may
    /// be chosen.
    pub(crate) fn into_virtual_account(self) -> Result<VirtualAccount, String> {
        let name = self
            .name
            .filter(|n| !n.trim().is_empty())
            .ok_or_else(|| "a virtual account has no name".to_owned())?;
        let is_default = match &self.is_default {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) if s.trim().eq_ignore_ascii_case("true") => true,
            Some(Value::String(s)) if s.trim().eq_ignore_ascii_case("false") => false,
            None | Some(Value::Null) => {
                return Err(format!("virtual account {name:?} has no isDefault"));
            }
            Some(other) => {
                return Err(format!(
                    "virtual account {name:?} has isDefault {other}, neither true nor false"
                ));
            }
        };
        let level = self
            .commerce_access_level
            .filter(|l| !l.trim().is_empty())
            .ok_or_else(|| format!("virtual account {name:?} has no commerceAccessLevel"))?;
        Ok(VirtualAccount {
            name,
            is_default,
            public: level.trim().eq_ignore_ascii_case("PUBLIC"),
        })
    }
}

/// `{"orders": [...]}` of a read by web order id.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct OrderList {
    pub(crate) orders: Option<Vec<WireOrder>>,
}

/// An order as the answer's JSON has it, every field optional: what the
/// step needs is checked when it becomes an [`Order`](super::Order).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct WireOrder {
    pub(crate) sales_order_number: Option<Value>,
    pub(crate) web_order_id: Option<Value>,
    pub(crate) status: Option<String>,
    pub(crate) holds: Option<Vec<WireHold>>,
    pub(crate) smart_account: Option<WireOrderAccount>,
    pub(crate) virtual_account: Option<WireOrderVirtualAccount>,
}

/// One hold of an order.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct WireHold {
    pub(crate) code: Option<String>,
    pub(crate) applied_at: Option<String>,
    pub(crate) released_at: Option<String>,
}

/// `smartAccount` of an order.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct WireOrderAccount {
    pub(crate) domain: Option<String>,
    pub(crate) status: Option<String>,
}

/// `virtualAccount` of an order.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct WireOrderVirtualAccount {
    pub(crate) name: Option<String>,
}

impl WireOrder {
    /// `salesOrderNumber` as text, if present.
    pub(crate) fn number(&self) -> Option<String> {
        self.sales_order_number
            .clone()
            .map(text)
            .filter(|n| !n.is_empty())
    }

    /// `webOrderId` as text, if present.
    pub(crate) fn web_order_id(&self) -> Option<String> {
        self.web_order_id
            .clone()
            .map(text)
            .filter(|w| !w.is_empty())
    }

    /// The order, or why the answer cannot be one: it must say whether the
    /// Smart Account hold is on (`holds` present, each hold with a code, a
    /// Smart Account hold's `releasedAt` null or a time) and be in one of
    /// the contract's statuses.
    pub(crate) fn into_order(self) -> Result<Order, String> {
        let number = self
            .number()
            .ok_or_else(|| "the order has no salesOrderNumber".to_owned())?;
        let sales_order_number = SalesOrderNumber::parse(&number)
            .map_err(|e| format!("the order's salesOrderNumber is invalid: {e}"))?;
        let status = match self.status.as_deref().map(str::trim) {
            Some(s) if ORDER_STATUSES.iter().any(|k| k.eq_ignore_ascii_case(s)) => {
                s.to_ascii_uppercase()
            }
            Some(other) => {
                return Err(format!(
                    "order {number} has status {:?}, not one of {}",
                    bounded_text(other),
                    ORDER_STATUSES.join(", ")
                ));
            }
            None => return Err(format!("order {number} has no status")),
        };
        let Some(wire_holds) = self.holds else {
            return Err(format!(
                "order {number}: the answer has no holds (missing or null), so it does not say whether the Smart Account hold is on"
            ));
        };
        let mut holds = Vec::with_capacity(wire_holds.len());
        for h in wire_holds {
            let Some(code) = h.code.filter(|c| !c.trim().is_empty()) else {
                return Err(format!("order {number}: a hold has no code"));
            };
            let released_at = match h.released_at.as_deref() {
                None => None,
                Some(raw) => match timestamp(raw) {
                    Some(t) => Some(t),
                    None if code == SMART_ACCOUNT_HOLD => {
                        return Err(format!(
                            "order {number}: the Smart Account hold's releasedAt {:?} is not a time",
                            bounded_text(raw)
                        ));
                    }
                    // Another hold is only reported: present but unreadable counts as released.
                    None => Some(Utc::now()),
                },
            };
            holds.push(Hold {
                applied_at: h.applied_at.as_deref().and_then(timestamp),
                released_at,
                code,
            });
        }
        let (smart_account_domain, smart_account_status) = match self.smart_account {
            Some(sa) => (sa.domain, sa.status),
            None => (None, None),
        };
        Ok(Order {
            sales_order_number,
            web_order_id: self.web_order_id.map(text).filter(|w| !w.is_empty()),
            status,
            holds,
            smart_account_domain,
            smart_account_status,
            virtual_account_name: self.virtual_account.and_then(|va| va.name),
        })
    }
}

/// The body of an assignment.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AssignmentBody<'a> {
    pub(crate) smart_account_domain: &'a str,
    pub(crate) account_type: &'a str,
    pub(crate) virtual_account_name: &'a str,
    pub(crate) accept_terms: bool,
}

/// The answer to an accepted assignment.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct AssignmentAnswer {
    pub(crate) assignment_id: Option<Value>,
    pub(crate) status: Option<String>,
}

impl AssignmentAnswer {
    /// The receipt, or why the answer cannot be one.
    pub(crate) fn into_receipt(self) -> Result<AssignmentReceipt, String> {
        let assignment_id = match self.assignment_id {
            Some(Value::String(s)) if !s.trim().is_empty() => s,
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err("the answer has no assignmentId".into()),
        };
        let status = self
            .status
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| format!("the answer to assignment {assignment_id} has no status"))?;
        Ok(AssignmentReceipt {
            assignment_id,
            status,
        })
    }
}

/// A JSON string as is, any other value in its JSON spelling.
fn text(v: Value) -> String {
    match v {
        Value::String(s) => s,
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A server-supplied value cut short for a message.
fn bounded_text(s: &str) -> String {
    s.chars().take(64).collect()
}

fn timestamp(raw: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(raw.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_contract_example_order_and_ignores_unknown_fields() {
        let raw = r#"{"salesOrderNumber": "104233871", "webOrderId": 98765432,
          "purchaseOrderNumber": "PO-ACME-0042", "status": "BOOKED", "somethingNew": [1],
          "holds": [{"code": "SMART_ACCOUNT_HOLD", "description": "Smart Account hold",
                     "appliedAt": "2026-11-23T09:12:44Z", "releasedAt": null},
                    {"code": "CREDIT_HOLD", "appliedAt": "…", "releasedAt": "soon"}],
          "smartAccount": {"domain": "acme.com", "name": "Acme Corp", "status": "PENDING"},
          "virtualAccount": null}"#;
        let order = serde_json::from_str::<WireOrder>(raw)
            .unwrap()
            .into_order()
            .unwrap();
        assert_eq!(order.sales_order_number.as_str(), "104233871");
        assert_eq!(order.web_order_id.as_deref(), Some("98765432"));
        assert!(!order.smart_account_hold_released());
        assert_eq!(order.holds[1].applied_at, None);
        assert!(
            order.holds[1].released_at.is_some(),
            "present but unreadable counts as released"
        );
        assert_eq!(order.smart_account_domain.as_deref(), Some("acme.com"));
        assert_eq!(order.virtual_account_name, None);
    }

    #[test]
    fn order_answers_that_do_not_say_whether_the_hold_is_on_are_unreadable() {
        let order = |fields: &str| {
            let raw = format!(r#"{{"salesOrderNumber": "104233871", {fields}}}"#);
            serde_json::from_str::<WireOrder>(&raw)
                .unwrap()
                .into_order()
        };
        let on = r#"[{"code": "SMART_ACCOUNT_HOLD", "releasedAt": null}]"#;
        let off = r#"[{"code": "SMART_ACCOUNT_HOLD", "releasedAt": "2026-11-23T10:00:00Z"}]"#;
        // Fields after the sales order number; Ok(released) or the error's needle.
        let cases: Vec<(String, Result<bool, &str>)> = vec![
            (format!(r#""status": "BOOKED", "holds": {on}"#), Ok(false)),
            (format!(r#""status": "booked", "holds": {off}"#), Ok(true)),
            (r#""status": "BOOKED", "holds": []"#.into(), Ok(true)),
            (
                r#""status": "BOOKED", "holds": [{"code": "CREDIT_HOLD"}]"#.into(),
                Ok(true),
            ),
            (r#""status": "BOOKED""#.into(), Err("no holds")),
            (r#""status": "BOOKED", "holds": null"#.into(), Err("no holds")),
            (format!(r#""holds": {on}"#), Err("no status")),
            (format!(r#""status": null, "holds": {on}"#), Err("no status")),
            (format!(r#""status": "ON_HOLD", "holds": {on}"#), Err("ON_HOLD")),
            (
                r#""status": "BOOKED", "holds": [{"releasedAt": null}]"#.into(),
                Err("a hold has no code"),
            ),
            (
                r#""status": "BOOKED", "holds": [{"code": "SMART_ACCOUNT_HOLD", "releasedAt": "soon"}]"#
                    .into(),
                Err("is not a time"),
            ),
        ];
        for (fields, want) in cases {
            let got = order(&fields).map(|o| o.smart_account_hold_released());
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{fields}"),
                (Err(e), Err(needle)) => assert!(e.contains(needle), "{fields}: {e}"),
                (got, want) => panic!("{fields}: got {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn accounts_without_a_domain_or_status_are_unreadable() {
        let account = |raw: &str| {
            serde_json::from_str::<WireAccount>(raw)
                .unwrap()
                .into_account()
        };
        let ok = account(r#"{"id": 7, "domain": "a.com", "status": "PENDING", "x": 1}"#).unwrap();
        assert_eq!((ok.id.as_str(), ok.status), ("7", AccountStatus::Pending));
        for (raw, needle) in [
            (r#"{"id": "SA-1", "domain": "a.com"}"#, "SA-1 has no status"),
            (
                r#"{"id": "SA-1", "domain": "a.com", "status": null}"#,
                "no status",
            ),
            (
                r#"{"id": "SA-1", "status": "ACTIVE"}"#,
                "SA-1 has no domain",
            ),
        ] {
            let e = account(raw).unwrap_err();
            assert!(e.contains(needle), "{raw}: {e}");
        }
        let search = |raw: &str| {
            serde_json::from_str::<SearchAnswer>(raw)
                .unwrap()
                .into_accounts()
        };
        assert_eq!(search(r#"{"totalRecords": 0}"#).unwrap().len(), 0);
        assert_eq!(search(r#"{"accounts": []}"#).unwrap().len(), 0);
        assert!(search(r#"{"totalRecords": 2}"#).is_err());
        assert!(search(r#"{"status": "SUCCESS"}"#).is_err());
    }

    #[test]
    fn receipts_without_an_id_or_status_are_unreadable() {
        let receipt = |raw: &str| {
            serde_json::from_str::<AssignmentAnswer>(raw)
                .unwrap()
                .into_receipt()
        };
        assert_eq!(
            receipt(r#"{"assignmentId": 5521, "status": "SUBMITTED"}"#).unwrap(),
            AssignmentReceipt {
                assignment_id: "5521".into(),
                status: "SUBMITTED".into()
            }
        );
        for raw in [
            r#"{"status": "SUBMITTED"}"#,
            r#"{"assignmentId": "", "status": "SUBMITTED"}"#,
            r#"{"assignmentId": "ASG-1"}"#,
            r#"{"assignmentId": "ASG-1", "status": null}"#,
        ] {
            assert!(receipt(raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn virtual_accounts_table() {
        let va = |raw: &str| {
            serde_json::from_str::<WireVirtualAccount>(raw)
                .unwrap()
                .into_virtual_account()
                .map(|v| (v.name, v.is_default, v.public))
        };
        /// The answer; its name, `isDefault` and PUBLIC, or the error's needle.
        type Case = (
            &'static str,
            Result<(&'static str, bool, bool), &'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                r#"{"name": "A", "isDefault": "true", "commerceAccessLevel": "PUBLIC"}"#,
                Ok(("A", true, true)),
            ),
            (
                r#"{"name": "B", "isDefault": false, "commerceAccessLevel": "PRIVATE"}"#,
                Ok(("B", false, false)),
            ),
            (
                r#"{"name": "C", "isDefault": " TRUE ", "commerceAccessLevel": "public"}"#,
                Ok(("C", true, true)),
            ),
            (
                r#"{"name": "D", "isDefault": true}"#,
                Err("no commerceAccessLevel"),
            ),
            (
                r#"{"name": "E", "commerceAccessLevel": "PUBLIC"}"#,
                Err("no isDefault"),
            ),
            (
                r#"{"name": "F", "isDefault": null, "commerceAccessLevel": "PUBLIC"}"#,
                Err("no isDefault"),
            ),
            (
                r#"{"name": "G", "isDefault": "yes", "commerceAccessLevel": "PUBLIC"}"#,
                Err("neither true nor false"),
            ),
            (
                r#"{"isDefault": "true", "commerceAccessLevel": "PUBLIC"}"#,
                Err("no name"),
            ),
        ];
        for (raw, want) in cases {
            match (va(raw), want) {
                (Ok((name, d, p)), Ok(want)) => assert_eq!((name.as_str(), d, p), want, "{raw}"),
                (Err(e), Err(needle)) => assert!(e.contains(needle), "{raw}: {e}"),
                (got, want) => panic!("{raw}: got {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn token_lifetime_forms() {
        let parse = |raw: &str| serde_json::from_str::<TokenAnswer>(raw).unwrap();
        let lifetime = |raw: &str| parse(raw).lifetime();
        assert_eq!(
            lifetime(r#"{"access_token":"x","expires_in":5}"#),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            lifetime(r#"{"access_token":"x","expires_in":"7"}"#),
            Some(Duration::from_secs(7))
        );
        for missing in [
            r#"{"access_token":"x"}"#,
            r#"{"access_token":"x","expires_in":null}"#,
        ] {
            assert_eq!(lifetime(missing), Some(DEFAULT_TOKEN_LIFETIME), "{missing}");
            assert!(!parse(missing).states_lifetime(), "{missing}");
        }
        assert!(parse(r#"{"expires_in":5}"#).states_lifetime());
        assert_eq!(
            lifetime(r#"{"access_token":"x","expires_in":0}"#),
            Some(MIN_TOKEN_LIFETIME),
            "zero would mean a token per call"
        );
        assert_eq!(
            lifetime(r#"{"access_token":"x","expires_in":1e19}"#),
            Some(MAX_TOKEN_LIFETIME),
            "no forever"
        );
        assert_eq!(
            lifetime(r#"{"access_token":"x","expires_in":18446744073709551615}"#),
            Some(MAX_TOKEN_LIFETIME),
            "u64::MAX, past a Duration once read as a JSON number: a day, not an error"
        );
        assert_eq!(
            lifetime(r#"{"access_token":"x","expires_in":"1e400"}"#),
            None
        );
        assert_eq!(lifetime(r#"{"access_token":"x","expires_in":-1}"#), None);
        assert_eq!(
            lifetime(r#"{"access_token":"x","expires_in":"soon"}"#),
            None
        );
        assert_eq!(lifetime(r#"{"access_token":"x","expires_in":[1]}"#), None);
    }
}
