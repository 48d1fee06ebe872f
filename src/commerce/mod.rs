//! The commerce API: the only module that knows HTTP to the remote side.
//!
//! The engine depends on the [`CommerceApi`] trait; [`HttpCommerce`] is the
//! implementation against any server honouring the contract (Cisco's, or
//! `holdclear sim`). Every failure is classified here, once:
//! [`CommerceError::Transient`] (retry later) or [`CommerceError::Permanent`]
//! (escalate, never retry).

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{
    AccountSelector, AccountType, Domain, OrderId, SalesOrderNumber, VirtualAccountChoice,
};

pub use crate::domain::Assignment;

mod cache;
mod http;
mod limiter;
mod quick_retry;
mod token;
mod wire;

pub use http::HttpCommerce;
pub use limiter::{Grant, RateBudget};

/// The contract's permanent error codes, plus the client's own.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// 400 `TNC_ERROR`: terms not accepted.
    TncError,
    /// 400 `BIZ_RULE_FAIL_ERROR`: a business rule failed.
    BizRuleFail,
    /// 403 `ORDER_ACCESS_DENIED`.
    OrderAccessDenied,
    /// 404 `ORDER_NOT_FOUND`.
    OrderNotFound,
    /// 404 `SMART_ACCOUNT_NOT_FOUND`.
    SmartAccountNotFound,
    /// 409 `ASSIGNMENT_LOCKED`.
    AssignmentLocked,
    /// 422 `SMART_ACCOUNT_NOT_ACTIVE`.
    SmartAccountNotActive,
    /// 422 `VIRTUAL_ACCOUNT_NOT_FOUND`.
    VirtualAccountNotFound,
    /// The token endpoint refused the client credentials (`invalid_client`).
    InvalidCredentials,
    /// More than one ACTIVE account matches the query exactly, or more than
    /// one order carries the web order id exactly; the error's detail lists
    /// the candidates. The client never picks one of them.
    AmbiguousMatch,
    /// Any other permanent answer, with the code the server gave (or the HTTP status).
    Other(String),
}

impl ErrorCode {
    /// Reads the contract's `errorCode`.
    pub fn from_contract(code: &str) -> Self {
        match code {
            "TNC_ERROR" => Self::TncError,
            "BIZ_RULE_FAIL_ERROR" => Self::BizRuleFail,
            "ORDER_ACCESS_DENIED" => Self::OrderAccessDenied,
            "ORDER_NOT_FOUND" => Self::OrderNotFound,
            "SMART_ACCOUNT_NOT_FOUND" => Self::SmartAccountNotFound,
            "ASSIGNMENT_LOCKED" => Self::AssignmentLocked,
            "SMART_ACCOUNT_NOT_ACTIVE" => Self::SmartAccountNotActive,
            "VIRTUAL_ACCOUNT_NOT_FOUND" => Self::VirtualAccountNotFound,
            other => Self::Other(other.to_owned()),
        }
    }

    /// A refusal of an assignment that says the account or Virtual Account
    /// is not what the resolve saw: re-resolve from fresh reads.
    pub fn says_resolve_is_stale(&self) -> bool {
        matches!(
            self,
            Self::SmartAccountNotActive | Self::SmartAccountNotFound | Self::VirtualAccountNotFound
        )
    }

    /// The contract's spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::TncError => "TNC_ERROR",
            Self::BizRuleFail => "BIZ_RULE_FAIL_ERROR",
            Self::OrderAccessDenied => "ORDER_ACCESS_DENIED",
            Self::OrderNotFound => "ORDER_NOT_FOUND",
            Self::SmartAccountNotFound => "SMART_ACCOUNT_NOT_FOUND",
            Self::AssignmentLocked => "ASSIGNMENT_LOCKED",
            Self::SmartAccountNotActive => "SMART_ACCOUNT_NOT_ACTIVE",
            Self::VirtualAccountNotFound => "VIRTUAL_ACCOUNT_NOT_FOUND",
            Self::InvalidCredentials => "INVALID_CREDENTIALS",
            Self::AmbiguousMatch => "AMBIGUOUS_MATCH",
            Self::Other(code) => code,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed call, classified where it is known.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommerceError {
    /// Worth retrying later: 429, 5xx, timeout, connection refused or reset.
    #[error("transient commerce API failure: {detail}")]
    Transient {
        /// What the server asked for (`Retry-After`), if anything.
        retry_after: Option<Duration>,
        /// One line for the history; never a secret.
        detail: String,
    },
    /// Never worth retrying as it is (a refusal, or an answer that names no
    /// single order or account).
    #[error("commerce API refused: {code}: {detail}")]
    Permanent {
        /// The contract's code.
        code: ErrorCode,
        /// The server's `statusMessage` or a description; never a secret.
        detail: String,
    },
}

/// A Smart Account as the search returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmartAccount {
    /// `SA-100231`.
    pub id: String,
    /// The account's domain.
    pub domain: String,
    /// The account's name.
    pub name: String,
    /// `CUSTOMER` or `HOLDING` as the server spells it.
    pub account_type: String,
    /// Activation state (the client refuses an answer without one).
    pub status: AccountStatus,
}

/// Whether an account can release a hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountStatus {
    /// Can release a hold.
    Active,
    /// Not yet activated by the customer: what causes a hold.
    Pending,
    /// Deactivated.
    Inactive,
    /// Anything else the server says.
    Other(String),
}

impl AccountStatus {
    /// Reads the contract's spelling.
    pub fn parse(raw: &str) -> Self {
        match raw {
            "ACTIVE" => Self::Active,
            "PENDING" => Self::Pending,
            "INACTIVE" => Self::Inactive,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The contract's spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Active => "ACTIVE",
            Self::Pending => "PENDING",
            Self::Inactive => "INACTIVE",
            Self::Other(s) => s,
        }
    }
}

/// A Virtual Account of a Smart Account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualAccount {
    /// Its name.
    pub name: String,
    /// `isDefault == "true"`.
    pub is_default: bool,
    /// `commerceAccessLevel == "PUBLIC"`: only these can be chosen.
    pub public: bool,
}

/// Picks the Virtual Account for an order: the named one if PUBLIC,
/// otherwise the PUBLIC default one; `None` when there is none.
pub fn choose_virtual_account<'a>(
    accounts: &'a [VirtualAccount],
    wanted: &VirtualAccountChoice,
) -> Option<&'a VirtualAccount> {
    match wanted {
        VirtualAccountChoice::Named(name) => accounts
            .iter()
            .find(|va| va.public && va.name.eq_ignore_ascii_case(name)),
        VirtualAccountChoice::AccountDefault => {
            accounts.iter().find(|va| va.public && va.is_default)
        }
    }
}

/// One hold on an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// `SMART_ACCOUNT_HOLD`, `CREDIT_HOLD`, …
    pub code: String,
    /// When it was applied.
    pub applied_at: Option<DateTime<Utc>>,
    /// When it was released; `None` while on.
    pub released_at: Option<DateTime<Utc>>,
}

/// The code of the hold this service clears.
pub const SMART_ACCOUNT_HOLD: &str = "SMART_ACCOUNT_HOLD";

/// The order statuses of the contract; the client refuses any other.
pub const ORDER_STATUSES: [&str; 5] = ["ENTERED", "BOOKED", "SHIPPED", "CLOSED", "CANCELLED"];

/// An order as the commerce API shows it. The client builds one only from
/// an answer that says whether the Smart Account hold is on: `holds`
/// present (an answer without it, or with `holds: null`, is a transient
/// unreadable answer), a known `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Sales order number (needed to assign).
    pub sales_order_number: SalesOrderNumber,
    /// Web order id, if any.
    pub web_order_id: Option<String>,
    /// One of [`ORDER_STATUSES`].
    pub status: String,
    /// All holds, released or not, as the answer listed them.
    pub holds: Vec<Hold>,
    /// Domain of the assigned Smart Account, if any.
    pub smart_account_domain: Option<String>,
    /// Status of the assigned Smart Account, if any.
    pub smart_account_status: Option<String>,
    /// Name of the assigned Virtual Account, if any.
    pub virtual_account_name: Option<String>,
}

impl Order {
    /// True when no `SMART_ACCOUNT_HOLD` is still on (the answer listed the
    /// holds: see [`Order`]).
    pub fn smart_account_hold_released(&self) -> bool {
        !self
            .holds
            .iter()
            .any(|h| h.code == SMART_ACCOUNT_HOLD && h.released_at.is_none())
    }

    /// When the Smart Account hold was released (the latest release), if it was.
    pub fn smart_account_hold_released_at(&self) -> Option<DateTime<Utc>> {
        if !self.smart_account_hold_released() {
            return None;
        }
        self.holds
            .iter()
            .filter(|h| h.code == SMART_ACCOUNT_HOLD)
            .filter_map(|h| h.released_at)
            .max()
    }

    /// Codes of the other holds still on the order (reported, not waited for).
    pub fn other_holds(&self) -> Vec<String> {
        self.holds
            .iter()
            .filter(|h| h.code != SMART_ACCOUNT_HOLD && h.released_at.is_none())
            .map(|h| h.code.clone())
            .collect()
    }
}

/// The server's answer to an accepted assignment (202); the client
/// refuses one without `assignmentId` or `status` as unreadable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentReceipt {
    /// `ASG-5521`.
    pub assignment_id: String,
    /// `SUBMITTED`.
    pub status: String,
}

/// What the engine can ask of the commerce system.
#[async_trait::async_trait]
pub trait CommerceApi: Send + Sync {
    /// The account that matches `selector` exactly (case-insensitively),
    /// optionally of one type; `Ok(None)` when no account matches exactly.
    /// Several exact matches: the one ACTIVE among them, or
    /// [`ErrorCode::AmbiguousMatch`] when more than one is ACTIVE.
    async fn find_account(
        &self,
        selector: &AccountSelector,
        account_type: Option<AccountType>,
    ) -> Result<Option<SmartAccount>, CommerceError>;

    /// The Virtual Accounts of the account with this domain (a client may
    /// answer from a cache).
    async fn virtual_accounts(&self, domain: &Domain)
    -> Result<Vec<VirtualAccount>, CommerceError>;

    /// The Virtual Accounts read from the API, never from a cache: asked
    /// before escalating on a list that lacks the wanted account.
    async fn fresh_virtual_accounts(
        &self,
        domain: &Domain,
    ) -> Result<Vec<VirtualAccount>, CommerceError> {
        self.virtual_accounts(domain).await
    }

    /// Reads an order by sales order number, else by web order id: only
    /// an order whose web order id equals it exactly is the order (none:
    /// `ORDER_NOT_FOUND`; several: [`ErrorCode::AmbiguousMatch`]).
    async fn order(&self, order: &OrderId) -> Result<Order, CommerceError>;

    /// Assigns a Smart Account; the same `idempotency_key` must be sent for
    /// every retry of the same assignment.
    async fn assign(
        &self,
        order: &SalesOrderNumber,
        assignment: &Assignment,
        idempotency_key: &str,
    ) -> Result<AssignmentReceipt, CommerceError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn va(name: &str, is_default: bool, public: bool) -> VirtualAccount {
        VirtualAccount {
            name: name.into(),
            is_default,
            public,
        }
    }

    #[test]
    fn choose_virtual_account_table() {
        let accounts = [
            va("DEFAULT", true, true),
            va("Network", false, false),
            va("Lab", false, true),
        ];
        let private_default = [va("DEFAULT", true, false), va("Lab", false, true)];
        let named = |n: &str| VirtualAccountChoice::Named(n.into());
        let cases: Vec<(&[VirtualAccount], VirtualAccountChoice, Option<&str>)> = vec![
            (
                &accounts,
                VirtualAccountChoice::AccountDefault,
                Some("DEFAULT"),
            ),
            (&accounts, named("Lab"), Some("Lab")),
            (&accounts, named("lab"), Some("Lab")),
            (&accounts, named("Network"), None),
            (&accounts, named("Missing"), None),
            (&private_default, VirtualAccountChoice::AccountDefault, None),
            (&private_default, named("DEFAULT"), None),
            (&[], VirtualAccountChoice::AccountDefault, None),
        ];
        for (list, wanted, expected) in cases {
            let got = choose_virtual_account(list, &wanted).map(|v| v.name.as_str());
            assert_eq!(got, expected, "{wanted} in {list:?}");
        }
    }

    fn hold(code: &str, released: Option<&str>) -> Hold {
        Hold {
            code: code.into(),
            applied_at: None,
            released_at: released.map(|r| r.parse().unwrap()),
        }
    }

    fn order(holds: Vec<Hold>) -> Order {
        Order {
            sales_order_number: SalesOrderNumber::parse("104233871").unwrap(),
            web_order_id: None,
            status: "BOOKED".into(),
            holds,
            smart_account_domain: None,
            smart_account_status: None,
            virtual_account_name: None,
        }
    }

    #[test]
    fn smart_account_hold_released_table() {
        let t1 = "2026-11-23T09:12:44Z";
        let t2 = "2026-11-23T10:00:00Z";
        let cases: Vec<(Vec<Hold>, bool, Vec<&str>)> = vec![
            (vec![], true, vec![]),
            (vec![hold(SMART_ACCOUNT_HOLD, None)], false, vec![]),
            (vec![hold(SMART_ACCOUNT_HOLD, Some(t1))], true, vec![]),
            (
                vec![
                    hold(SMART_ACCOUNT_HOLD, Some(t1)),
                    hold("CREDIT_HOLD", None),
                ],
                true,
                vec!["CREDIT_HOLD"],
            ),
            (
                vec![
                    hold(SMART_ACCOUNT_HOLD, Some(t1)),
                    hold(SMART_ACCOUNT_HOLD, None),
                ],
                false,
                vec![],
            ),
            (vec![hold("CREDIT_HOLD", None)], true, vec!["CREDIT_HOLD"]),
            (vec![hold("CREDIT_HOLD", Some(t1))], true, vec![]),
        ];
        for (holds, released, others) in cases {
            let o = order(holds);
            assert_eq!(o.smart_account_hold_released(), released, "{:?}", o.holds);
            assert_eq!(o.other_holds(), others, "{:?}", o.holds);
        }
        let twice = order(vec![
            hold(SMART_ACCOUNT_HOLD, Some(t1)),
            hold(SMART_ACCOUNT_HOLD, Some(t2)),
        ]);
        assert_eq!(
            twice.smart_account_hold_released_at(),
            Some(t2.parse().unwrap())
        );
        assert_eq!(
            order(vec![hold(SMART_ACCOUNT_HOLD, None)]).smart_account_hold_released_at(),
            None
        );
    }
}
