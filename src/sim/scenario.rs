//! What the simulator starts with: credentials, accounts, orders, the
//! defaults of orders created on the fly, and fault knobs per endpoint.
//!
//! Read from TOML ([`Scenario::load`]) or built in code; validated once
//! ([`Scenario::validate`]) before a server uses it. Durations are written
//! like the settings' (`500ms`, `30s`, `1h`).

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::SimError;
use crate::config::{DEMO_CLIENT_ID, DEMO_CLIENT_SECRET};
use crate::domain::{Domain, SalesOrderNumber, WebOrderId};

/// The scenario shipped in `deploy/config/sim-scenario.toml`, built in so
/// that `holdclear sim` works from any directory.
const DEMO_SCENARIO: &str = include_str!("../../deploy/config/sim-scenario.toml");

/// Everything the simulator starts with.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// The one client id the token endpoint accepts.
    pub client_id: String,
    /// Its secret (a simulator credential; still never printed by `Debug`).
    pub client_secret: String,
    /// Lifetime of issued tokens (`expires_in`, rounded up to whole seconds).
    #[serde(with = "duration_text")]
    pub token_ttl: Duration,
    /// Token answers leave out `expires_in` (the token still expires after
    /// `token_ttl`).
    pub omit_expires_in: bool,
    /// Every answer carries fields the contract does not name (the client
    /// must ignore them).
    pub extra_fields: bool,
    /// Server-side limit of API calls per second (token requests excluded);
    /// beyond it, 429 with `Retry-After: 1`. `None`: no limit.
    pub rate_limit: Option<f64>,
    /// How orders not listed in `orders` are created when asked about.
    pub defaults: OrderDefaults,
    /// The Smart Accounts.
    pub accounts: Vec<AccountSpec>,
    /// Orders with a known number and state.
    pub orders: Vec<OrderSpec>,
    /// Fault injection per endpoint.
    pub faults: Faults,
}

impl Default for Scenario {
    /// No accounts, no seeded orders, the demo credentials, one-hour tokens,
    /// no faults; unknown orders are created BOOKED with one Smart Account
    /// hold that is released by the first read after an accepted assignment.
    fn default() -> Self {
        Self {
            client_id: DEMO_CLIENT_ID.to_owned(),
            client_secret: DEMO_CLIENT_SECRET.to_owned(),
            token_ttl: Duration::from_secs(3600),
            omit_expires_in: false,
            extra_fields: false,
            rate_limit: None,
            defaults: OrderDefaults::default(),
            accounts: Vec::new(),
            orders: Vec::new(),
            faults: Faults::default(),
        }
    }
}

impl fmt::Debug for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scenario")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("token_ttl", &self.token_ttl)
            .field("omit_expires_in", &self.omit_expires_in)
            .field("extra_fields", &self.extra_fields)
            .field("rate_limit", &self.rate_limit)
            .field("defaults", &self.defaults)
            .field("accounts", &self.accounts)
            .field("orders", &self.orders)
            .field("faults", &self.faults)
            .finish()
    }
}

/// How orders the scenario does not list are created on first mention.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrderDefaults {
    /// Create unknown orders (`false`: they answer 404 `ORDER_NOT_FOUND`).
    pub create_unknown: bool,
    /// `status` of a created order.
    pub status: String,
    /// Order type (`STANDARD`; `STOCKING` and `EA` refuse assignments).
    pub order_type: String,
    /// Hold codes applied to a created order.
    pub holds: Vec<String>,
    /// How a created order's answers show `holds`.
    pub holds_field: HoldsField,
    /// Behaviour of a created order.
    pub behaviour: Behaviour,
    /// Reads of the order after an accepted assignment until the Smart
    /// Account hold shows released (0: released at once).
    pub release_after_reads: u32,
    /// Time after an accepted assignment before the hold can show released.
    #[serde(with = "duration_text")]
    pub release_after: Duration,
    /// Most orders the simulator keeps; beyond it, unknown orders answer 404.
    pub max_orders: usize,
}

impl Default for OrderDefaults {
    fn default() -> Self {
        Self {
            create_unknown: true,
            status: "BOOKED".into(),
            order_type: "STANDARD".into(),
            holds: vec!["SMART_ACCOUNT_HOLD".into()],
            holds_field: HoldsField::Listed,
            behaviour: Behaviour::Normal,
            release_after_reads: 1,
            release_after: Duration::ZERO,
            max_orders: 1_000_000,
        }
    }
}

/// What an order does besides being read and assigned normally.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    /// Accepts an assignment of an ACTIVE account; the hold is then released
    /// per the release knobs.
    #[default]
    Normal,
    /// Accepts assignments, but the Smart Account hold never lifts.
    NeverReleases,
    /// Every call about it answers 403 `ORDER_ACCESS_DENIED`.
    #[serde(alias = "403")]
    AccessDenied,
    /// Every call about it answers 404 `ORDER_NOT_FOUND`.
    #[serde(alias = "404")]
    NotFound,
    /// Readable, but an assignment answers 409 `ASSIGNMENT_LOCKED`.
    #[serde(alias = "409")]
    Locked,
}

/// How an order's answers show its `holds`. Without the list an answer says
/// nothing about the hold: the client must not take it for a release.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldsField {
    /// `"holds": [...]`, as the contract shows it.
    #[default]
    Listed,
    /// No `holds` field at all.
    Missing,
    /// `"holds": null`.
    Null,
}

/// A Smart Account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountSpec {
    /// `SA-…`; generated when left out.
    #[serde(default)]
    pub id: Option<String>,
    /// The account's domain (unique in a scenario: the Virtual Account and
    /// assignment calls name an account by it).
    pub domain: String,
    /// The account's name; several accounts may share one (a search by
    /// that name then finds each of them exactly).
    pub name: String,
    /// The account's e-mail, searchable with `?email=`; may be shared too.
    #[serde(default)]
    pub email: Option<String>,
    /// `CUSTOMER` or `HOLDING`.
    #[serde(rename = "type", default = "customer")]
    pub account_type: String,
    /// `ACTIVE`, `PENDING` or `INACTIVE`.
    #[serde(default = "active")]
    pub status: String,
    /// Its Virtual Accounts.
    #[serde(default)]
    pub virtual_accounts: Vec<VirtualAccountSpec>,
}

fn customer() -> String {
    "CUSTOMER".into()
}

fn active() -> String {
    "ACTIVE".into()
}

fn public() -> String {
    "PUBLIC".into()
}

/// A Virtual Account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualAccountSpec {
    /// Its name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Shown as `isDefault: "true"`.
    #[serde(default)]
    pub is_default: bool,
    /// `PUBLIC` (assignable) or `PRIVATE`.
    #[serde(default = "public")]
    pub commerce_access_level: String,
}

/// An order with a known number and state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrderSpec {
    /// Sales order number (unique in a scenario).
    pub sales_order_number: String,
    /// Web order id, readable with `?webOrderId=` (which also answers every
    /// order whose web order id merely contains the value). Two orders may
    /// carry the same one: the lookup is then ambiguous.
    pub web_order_id: Option<String>,
    /// Purchase order number.
    pub purchase_order_number: Option<String>,
    /// `status`; the defaults' when left out.
    pub status: Option<String>,
    /// Order type; the defaults' when left out.
    pub order_type: Option<String>,
    /// Hold codes on the order; the defaults' when left out.
    pub holds: Option<Vec<String>>,
    /// How its answers show `holds`; the defaults' when left out.
    pub holds_field: Option<HoldsField>,
    /// Domain of a Smart Account already on the order (e.g. a PENDING one).
    pub smart_account: Option<String>,
    /// Virtual Account already on the order.
    pub virtual_account: Option<String>,
    /// Behaviour; the defaults' when left out.
    pub behaviour: Option<Behaviour>,
    /// Overrides the defaults' `release_after_reads`.
    pub release_after_reads: Option<u32>,
    /// Overrides the defaults' `release_after`.
    #[serde(with = "opt_duration_text")]
    pub release_after: Option<Duration>,
}

/// The simulated endpoints, as named in faults and statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimEndpoint {
    /// `POST /oauth2/default/v1/token`.
    Token,
    /// `GET …/accounts/search`.
    Search,
    /// `GET …/accounts/{domain}/customer/virtual-accounts`.
    VirtualAccounts,
    /// `GET /commerce/v1/orders/{n}` and `GET /commerce/v1/orders?webOrderId=`.
    Order,
    /// `POST /commerce/v1/orders/{n}/smart-account-assignment`.
    Assign,
}

impl SimEndpoint {
    /// All of them.
    pub const ALL: [SimEndpoint; 5] = [
        Self::Token,
        Self::Search,
        Self::VirtualAccounts,
        Self::Order,
        Self::Assign,
    ];
    /// The four API endpoints (all but the token endpoint).
    pub const API: [SimEndpoint; 4] = [
        Self::Search,
        Self::VirtualAccounts,
        Self::Order,
        Self::Assign,
    ];

    /// The name used in statistics and the scenario file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Search => "search",
            Self::VirtualAccounts => "virtual_accounts",
            Self::Order => "order",
            Self::Assign => "assign",
        }
    }
}

impl fmt::Display for SimEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Fault knobs of each endpoint (`[faults.search]` in the file).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// The token endpoint.
    pub token: EndpointFaults,
    /// Account search.
    pub search: EndpointFaults,
    /// Virtual Accounts.
    pub virtual_accounts: EndpointFaults,
    /// Order reads.
    pub order: EndpointFaults,
    /// Assignments.
    pub assign: EndpointFaults,
}

impl Faults {
    /// The knobs of one endpoint.
    pub fn get(&self, endpoint: SimEndpoint) -> &EndpointFaults {
        match endpoint {
            SimEndpoint::Token => &self.token,
            SimEndpoint::Search => &self.search,
            SimEndpoint::VirtualAccounts => &self.virtual_accounts,
            SimEndpoint::Order => &self.order,
            SimEndpoint::Assign => &self.assign,
        }
    }

    /// The knobs of one endpoint, to change.
    pub fn get_mut(&mut self, endpoint: SimEndpoint) -> &mut EndpointFaults {
        match endpoint {
            SimEndpoint::Token => &mut self.token,
            SimEndpoint::Search => &mut self.search,
            SimEndpoint::VirtualAccounts => &mut self.virtual_accounts,
            SimEndpoint::Order => &mut self.order,
            SimEndpoint::Assign => &mut self.assign,
        }
    }
}

/// Fault knobs of one endpoint. Rates are probabilities per call (0 to 1);
/// `script` forces the outcomes of the next calls, in order, before the
/// rates apply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointFaults {
    /// Added to every call.
    #[serde(with = "duration_text")]
    pub latency: Duration,
    /// 503 with `errorCode: CISCO_ERROR`.
    pub error_rate: f64,
    /// No answer for `hang` (longer than the client's timeout), then 504.
    pub timeout_rate: f64,
    /// The call takes effect, then the answer is lost (502 without a body).
    pub lost_response_rate: f64,
    /// Starts a 429 burst: every call answers 429 until `retry_after` has passed.
    pub throttle_rate: f64,
    /// `Retry-After` of 429 answers, whole seconds.
    pub retry_after_secs: u64,
    /// How long a timed-out call hangs.
    #[serde(with = "duration_text")]
    pub hang: Duration,
    /// Forced outcomes of the next calls.
    pub script: Vec<Forced>,
}

impl Default for EndpointFaults {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            error_rate: 0.0,
            timeout_rate: 0.0,
            lost_response_rate: 0.0,
            throttle_rate: 0.0,
            retry_after_secs: 1,
            hang: Duration::from_secs(30),
            script: Vec::new(),
        }
    }
}

/// A forced outcome of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Forced {
    /// Answer normally.
    Pass,
    /// 503 `{"status":"ERROR","errorCode":"CISCO_ERROR",…}`.
    ServerError,
    /// 502 with a plain-text body, as a proxy sends it.
    BareServerError,
    /// 503 without any body.
    EmptyServerError,
    /// Hang for `hang`, then 504.
    Timeout,
    /// Take effect, then answer 502 (the answer was lost).
    LostResponse,
    /// 429 with `Retry-After: retry_after_secs` (this call only).
    TooManyRequests,
    /// 401, as if the token had been revoked (this call only).
    Unauthorized,
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path).map_err(|e| SimError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates scenario TOML; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, SimError> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| SimError::Scenario {
            origin: origin.to_owned(),
            reason: e.to_string().trim().to_owned(),
        })?;
        scenario.validate().map_err(|reason| SimError::Scenario {
            origin: origin.to_owned(),
            reason,
        })?;
        Ok(scenario)
    }

    /// The shipped demo scenario (`deploy/config/sim-scenario.toml`, built in).
    pub fn demo() -> Result<Self, SimError> {
        Self::from_toml(DEMO_SCENARIO, "built-in deploy/config/sim-scenario.toml")
    }

    /// Checks what serde cannot: names, numbers, uniqueness; the message names the entry.
    pub fn validate(&self) -> Result<(), String> {
        if self.client_id.is_empty() || self.client_secret.is_empty() {
            return Err("client_id and client_secret must not be empty".into());
        }
        if self.token_ttl.is_zero() {
            return Err("token_ttl must be longer than 0s".into());
        }
        if let Some(rate) = self.rate_limit
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err("rate_limit must be a positive number of calls per second".into());
        }
        if self.defaults.max_orders == 0 {
            return Err("defaults.max_orders must be at least 1".into());
        }
        let mut domains = HashSet::new();
        for (i, a) in self.accounts.iter().enumerate() {
            let at = format!("accounts[{i}] ({})", a.domain);
            let domain = Domain::parse(&a.domain).map_err(|e| format!("{at}.domain: {e}"))?;
            if !domains.insert(domain) {
                return Err(format!("{at}.domain: listed twice"));
            }
            if a.name.trim().is_empty() {
                return Err(format!("{at}.name: empty"));
            }
            one_of(&at, "type", &a.account_type, &["CUSTOMER", "HOLDING"])?;
            one_of(&at, "status", &a.status, &["ACTIVE", "PENDING", "INACTIVE"])?;
            for (j, va) in a.virtual_accounts.iter().enumerate() {
                let at = format!("{at}.virtual_accounts[{j}]");
                if va.name.trim().is_empty() {
                    return Err(format!("{at}.name: empty"));
                }
                one_of(
                    &at,
                    "commerce_access_level",
                    &va.commerce_access_level,
                    &["PUBLIC", "PRIVATE"],
                )?;
            }
        }
        let mut numbers = HashSet::new();
        for (i, o) in self.orders.iter().enumerate() {
            let at = format!("orders[{i}] ({})", o.sales_order_number);
            SalesOrderNumber::parse(&o.sales_order_number)
                .map_err(|e| format!("{at}.sales_order_number: {e}"))?;
            if !numbers.insert(o.sales_order_number.clone()) {
                return Err(format!("{at}.sales_order_number: listed twice"));
            }
            if let Some(web) = &o.web_order_id {
                WebOrderId::parse(web).map_err(|e| format!("{at}.web_order_id: {e}"))?;
            }
            if let Some(d) = &o.smart_account {
                Domain::parse(d).map_err(|e| format!("{at}.smart_account: {e}"))?;
            }
        }
        for endpoint in SimEndpoint::ALL {
            let f = self.faults.get(endpoint);
            for (name, rate) in [
                ("error_rate", f.error_rate),
                ("timeout_rate", f.timeout_rate),
                ("lost_response_rate", f.lost_response_rate),
                ("throttle_rate", f.throttle_rate),
            ] {
                if !(0.0..=1.0).contains(&rate) {
                    return Err(format!("faults.{endpoint}.{name}: must be between 0 and 1"));
                }
            }
            let sum = f.error_rate + f.timeout_rate + f.lost_response_rate + f.throttle_rate;
            if sum > 1.0 + f64::EPSILON {
                return Err(format!(
                    "faults.{endpoint}: the rates add up to more than 1"
                ));
            }
        }
        Ok(())
    }
}

fn one_of(at: &str, key: &str, value: &str, allowed: &[&str]) -> Result<(), String> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(format!(
            "{at}.{key}: {value:?} is not one of {}",
            allowed.join(", ")
        ))
    }
}

/// Durations as `500ms`, `30s`, `1h`.
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let raw = String::deserialize(d)?;
        crate::config::parse_duration(&raw).map_err(D::Error::custom)
    }
}

/// Optional durations as `500ms`, `30s`, `1h`.
mod opt_duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(raw) => crate::config::parse_duration(&raw)
                .map(Some)
                .map_err(D::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_scenario_parses_and_names_the_agreed_accounts() {
        let s = Scenario::demo().unwrap();
        let find = |d: &str| s.accounts.iter().find(|a| a.domain == d).unwrap();
        let acme = find("acme.com");
        assert_eq!(
            (
                acme.name.as_str(),
                acme.account_type.as_str(),
                acme.status.as_str()
            ),
            ("Acme Corp", "CUSTOMER", "ACTIVE")
        );
        assert!(
            acme.virtual_accounts.iter().any(|v| v.name == "DEFAULT"
                && v.is_default
                && v.commerce_access_level == "PUBLIC")
        );
        assert!(
            acme.virtual_accounts
                .iter()
                .any(|v| v.name == "Network" && v.commerce_access_level == "PRIVATE")
        );
        assert_eq!(find("notacme.com").status, "ACTIVE");
        assert_eq!(find("initech.com").status, "PENDING");
        let globex = find("globex-holding.com");
        assert_eq!(
            (globex.account_type.as_str(), globex.status.as_str()),
            ("HOLDING", "ACTIVE")
        );
        assert!(
            globex
                .virtual_accounts
                .iter()
                .any(|v| v.name == "Holding" && v.is_default)
        );
        assert_eq!(find("hooli.com").status, "INACTIVE");
        for b in [
            Behaviour::NeverReleases,
            Behaviour::AccessDenied,
            Behaviour::NotFound,
            Behaviour::Locked,
        ] {
            assert!(
                s.orders.iter().any(|o| o.behaviour == Some(b)),
                "{b:?} is shown"
            );
        }
    }

    #[test]
    fn a_round_trip_through_toml_keeps_everything() {
        let mut s = Scenario::demo().unwrap();
        s.faults.order.script = vec![Forced::ServerError, Forced::Pass];
        s.defaults.release_after = Duration::from_millis(1500);
        let text = toml::to_string(&s).unwrap();
        assert_eq!(Scenario::from_toml(&text, "round trip").unwrap(), s);
    }

    #[test]
    fn invalid_scenarios_name_the_entry() {
        let cases = [
            (
                "[[accounts]]\ndomain = \"a.com\"\nname = \"A\"\nstatus = \"SLEEPING\"\n",
                "accounts[0] (a.com).status",
            ),
            (
                "[[accounts]]\ndomain = \"a.com\"\nname = \"A\"\n[[accounts]]\ndomain = \"A.com\"\nname = \"B\"\n",
                "listed twice",
            ),
            (
                "[[orders]]\nsales_order_number = \"1/2\"\n",
                "orders[0] (1/2).sales_order_number",
            ),
            (
                "[faults.order]\nerror_rate = 1.5\n",
                "faults.order.error_rate",
            ),
            ("token_ttl = \"soon\"\n", "token_ttl"),
            ("[defaults]\nbehavior = \"normal\"\n", "behavior"),
            (
                "[[orders]]\nsales_order_number = \"1\"\nbehaviour = \"409\"\n",
                "",
            ),
        ];
        for (text, needle) in cases {
            match Scenario::from_toml(text, "test.toml") {
                Ok(_) if needle.is_empty() => {}
                Ok(_) => panic!("accepted: {text}"),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(!needle.is_empty(), "{text}: {msg}");
                    assert!(msg.contains("test.toml") && msg.contains(needle), "{msg}");
                }
            }
        }
    }

    #[test]
    fn debug_hides_the_secret() {
        let s = Scenario {
            client_secret: "sim-secret-value".into(),
            ..Scenario::default()
        };
        assert!(!format!("{s:?}").contains("sim-secret-value"));
    }
}
