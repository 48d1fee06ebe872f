//! The contract's JSON, as the client reads and writes it.
//!
//! Reading is lenient where the contract leaves room (unknown fields are
//! ignored, `isDefault` as a string or a boolean, numbers where strings are
//! expected); the result is converted into the module's types once, here.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{AccountStatus, Hold, Order, SmartAccount, VirtualAccount};
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

impl TokenAnswer {
    /// `expires_in` as a duration (a number or a numeric string); one hour
    /// when absent, as the contract's example. More seconds than a
    /// `Duration` holds (e.g. `u64::MAX`, which a JSON number rounds up)
    /// is "never expires": `Duration::MAX` (the token cache clamps it).
    pub(crate) fn lifetime(&self) -> Option<Duration> {
        let seconds = |s: f64| {
            (s.is_finite() && s >= 0.0)
                .then(|| Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX))
        };
        match &self.expires_in {
            None | Some(Value::Null) => Some(Duration::from_secs(3600)),
            Some(Value::Number(n)) => n.as_f64().and_then(seconds),
            Some(Value::String(s)) => s.trim().parse::<f64>().ok().and_then(seconds),
            Some(_) => None,
        }
    }
}

/// Search answer.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct SearchAnswer {
    pub(crate) accounts: Option<Vec<WireAccount>>,
    #[serde(flatten)]
    pub(crate) envelope: Envelope,
}

/// One account of a search answer.
#[derive(Debug, Default, Deserialize)]
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

impl WireAccount {
    pub(crate) fn into_account(self) -> SmartAccount {
        SmartAccount {
            id: self.id.map(text).unwrap_or_default(),
            domain: self.domain.unwrap_or_default(),
            name: self.name.unwrap_or_default(),
            account_type: self.account_type.unwrap_or_default(),
            status: AccountStatus::parse(self.status.as_deref().unwrap_or_default()),
        }
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
    pub(crate) name: String,
    pub(crate) is_default: Option<Value>,
    pub(crate) commerce_access_level: Option<String>,
}

impl WireVirtualAccount {
    pub(crate) fn into_virtual_account(self) -> VirtualAccount {
        let is_default = match self.is_default {
            Some(Value::Bool(b)) => b,
            Some(Value::String(s)) => s.trim().eq_ignore_ascii_case("true"),
            _ => false,
        };
        let public = self
            .commerce_access_level
            .is_some_and(|l| l.trim().eq_ignore_ascii_case("PUBLIC"));
        VirtualAccount {
            name: self.name,
            is_default,
            public,
        }
    }
}

/// `{"orders": [...]}` of a read by web order id.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct OrderList {
    pub(crate) orders: Option<Vec<WireOrder>>,
}

/// An order.
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
    pub(crate) code: String,
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
    /// The order, or why the answer cannot be one.
    pub(crate) fn into_order(self) -> Result<Order, String> {
        let number = self
            .sales_order_number
            .map(text)
            .ok_or_else(|| "the order has no salesOrderNumber".to_owned())?;
        let sales_order_number = SalesOrderNumber::parse(&number)
            .map_err(|e| format!("the order's salesOrderNumber is invalid: {e}"))?;
        let holds = self
            .holds
            .unwrap_or_default()
            .into_iter()
            .map(|h| Hold {
                applied_at: h.applied_at.as_deref().and_then(timestamp),
                // A releasedAt that is present but unreadable still means released.
                released_at: h
                    .released_at
                    .as_deref()
                    .map(|raw| timestamp(raw).unwrap_or_else(Utc::now)),
                code: h.code,
            })
            .collect();
        let (smart_account_domain, smart_account_status) = match self.smart_account {
            Some(sa) => (sa.domain, sa.status),
            None => (None, None),
        };
        Ok(Order {
            sales_order_number,
            web_order_id: self.web_order_id.map(text).filter(|w| !w.is_empty()),
            status: self.status.unwrap_or_default(),
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

/// A JSON string as is, any other value in its JSON spelling.
fn text(v: Value) -> String {
    match v {
        Value::String(s) => s,
        Value::Null => String::new(),
        other => other.to_string(),
    }
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
    fn reads_is_default_as_string_or_bool() {
        let raw = r#"{"virtualAccounts": [
            {"name": "A", "isDefault": "true", "commerceAccessLevel": "PUBLIC"},
            {"name": "B", "isDefault": false, "commerceAccessLevel": "PRIVATE"},
            {"name": "C", "isDefault": true}],
            "status": "SUCCESS", "statusMessage": ""}"#;
        let answer: VirtualAccountsAnswer = serde_json::from_str(raw).unwrap();
        let vas: Vec<_> = answer
            .virtual_accounts
            .unwrap()
            .into_iter()
            .map(WireVirtualAccount::into_virtual_account)
            .collect();
        assert_eq!(
            vas.iter()
                .map(|v| (v.is_default, v.public))
                .collect::<Vec<_>>(),
            [(true, true), (false, false), (true, false)]
        );
    }

    #[test]
    fn token_lifetime_forms() {
        let parse = |raw: &str| serde_json::from_str::<TokenAnswer>(raw).unwrap().lifetime();
        assert_eq!(
            parse(r#"{"access_token":"x","expires_in":5}"#),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            parse(r#"{"access_token":"x","expires_in":"7"}"#),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse(r#"{"access_token":"x"}"#),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(parse(r#"{"access_token":"x","expires_in":-1}"#), None);
        assert_eq!(
            parse(r#"{"access_token":"x","expires_in":18446744073709551615}"#),
            Some(Duration::MAX)
        );
        assert_eq!(parse(r#"{"access_token":"x","expires_in":"1e400"}"#), None);
    }
}
