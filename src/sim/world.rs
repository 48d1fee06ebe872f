//! The simulated commerce system: accounts, orders, tokens, idempotency
//! records and statistics, behind one lock. Every method answers one call
//! with the contract's status and JSON; no I/O and no waiting here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::scenario::{
    AccountSpec, Behaviour, EndpointFaults, Forced, HoldsField, OrderSpec, Scenario, SimEndpoint,
};

/// Most live tokens kept; expired ones are dropped first.
const MAX_TOKENS: usize = 10_000;
/// Most idempotency records kept (oldest dropped first).
const MAX_IDEMPOTENCY_RECORDS: usize = 1_000_000;
/// Most accounts (or orders) one search answers with.
const MAX_SEARCH_RESULTS: usize = 100;

/// A status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: Value,
}

impl Reply {
    fn ok(status: u16, body: Value) -> Self {
        Self { status, body }
    }

    /// The contract's error shape.
    pub(crate) fn error(status: u16, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({"status": "ERROR", "errorCode": code, "statusMessage": message.into()}),
        }
    }
}

/// Counters a test or an operator can read at `GET /_sim/stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SimStats {
    /// Requests received, per endpoint (`token`, `search`, `virtual_accounts`, `order`, `assign`).
    pub calls: BTreeMap<String, u64>,
    /// Answers sent, per endpoint and HTTP status (`{"order": {"200": 3, "503": 1}}`).
    pub responses: BTreeMap<String, BTreeMap<String, u64>>,
    /// Requests to the token endpoint.
    pub token_requests: u64,
    /// Tokens issued.
    pub tokens_issued: u64,
    /// API calls refused with 401.
    pub unauthorized: u64,
    /// Accepted assignments per sales order number (replays not counted).
    pub assignments: BTreeMap<String, u64>,
    /// Assignments answered from the idempotency record.
    pub idempotent_replays: u64,
    /// Orders the simulator knows (seeded and created).
    pub orders: u64,
    /// Orders whose Smart Account hold was released.
    pub holds_released: u64,
}

impl SimStats {
    /// Requests received by `endpoint`.
    pub fn calls(&self, endpoint: SimEndpoint) -> u64 {
        self.calls.get(endpoint.as_str()).copied().unwrap_or(0)
    }

    /// Answers with `status` sent by `endpoint`.
    pub fn responses(&self, endpoint: SimEndpoint, status: u16) -> u64 {
        self.responses
            .get(endpoint.as_str())
            .and_then(|by| by.get(&status.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Accepted assignments of one order.
    pub fn assignments_of(&self, sales_order_number: &str) -> u64 {
        self.assignments
            .get(sales_order_number)
            .copied()
            .unwrap_or(0)
    }

    /// Accepted assignments of all orders.
    pub fn total_assignments(&self) -> u64 {
        self.assignments.values().sum()
    }
}

struct Hold {
    code: String,
    applied_at: DateTime<Utc>,
    released_at: Option<DateTime<Utc>>,
}

struct OrderAccount {
    domain: String,
    name: String,
    status: String,
}

struct PendingRelease {
    reads_left: u32,
    not_before: Instant,
}

struct SimOrder {
    sales_order_number: String,
    web_order_id: Option<String>,
    purchase_order_number: Option<String>,
    status: String,
    order_type: String,
    holds: Vec<Hold>,
    holds_field: HoldsField,
    smart_account: Option<OrderAccount>,
    virtual_account: Option<String>,
    behaviour: Behaviour,
    release_after_reads: u32,
    release_after: Duration,
    pending_release: Option<PendingRelease>,
}

struct Stored {
    fingerprint: Value,
    reply: Reply,
}

/// Fault state of one endpoint: its knobs, the rest of its script, and
/// the end of a running 429 burst.
struct FaultState {
    knobs: EndpointFaults,
    script: VecDeque<Forced>,
    throttled_until: Option<Instant>,
}

/// What the fault knobs decided for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Answer normally.
    Pass,
    /// 503 CISCO_ERROR.
    ServerError,
    /// 502 text.
    BareServerError,
    /// 503 without a body.
    EmptyServerError,
    /// Hang, then 504.
    Timeout(Duration),
    /// Take effect, then 502.
    LostResponse,
    /// 429 with this Retry-After in seconds.
    TooManyRequests(u64),
    /// 401.
    Unauthorized,
}

/// The whole simulated system.
pub(crate) struct World {
    scenario: Scenario,
    accounts: Vec<AccountSpec>,
    orders: HashMap<String, SimOrder>,
    /// Web order id → the sales order numbers carrying it, in creation order.
    by_web_id: BTreeMap<String, Vec<String>>,
    tokens: HashMap<String, Instant>,
    idempotency: HashMap<(String, String), Stored>,
    idempotency_order: VecDeque<(String, String)>,
    next_assignment: u64,
    faults: BTreeMap<SimEndpoint, FaultState>,
    rate_limit: Option<governor::DefaultDirectRateLimiter>,
    pub(crate) stats: SimStats,
}

impl World {
    /// A world as the scenario describes it (validated beforehand).
    pub(crate) fn new(scenario: Scenario) -> Self {
        let now = Utc::now();
        let mut accounts = scenario.accounts.clone();
        for (i, a) in accounts.iter_mut().enumerate() {
            if a.id.is_none() {
                a.id = Some(format!("SA-{}", 100_000 + i));
            }
        }
        let mut world = Self {
            accounts,
            orders: HashMap::new(),
            by_web_id: BTreeMap::new(),
            tokens: HashMap::new(),
            idempotency: HashMap::new(),
            idempotency_order: VecDeque::new(),
            next_assignment: 5521,
            faults: BTreeMap::new(),
            rate_limit: scenario.rate_limit.and_then(server_limit),
            stats: SimStats::default(),
            scenario,
        };
        for endpoint in SimEndpoint::ALL {
            world.set_faults(endpoint, world.scenario.faults.get(endpoint).clone());
        }
        for spec in world.scenario.orders.clone() {
            let order = world.order_from_spec(&spec, now);
            world.insert_order(order);
        }
        world
    }

    /// The scenario this world was built from.
    pub(crate) fn scenario(&self) -> &Scenario {
        &self.scenario
    }

    /// Replaces the knobs (and script) of one endpoint.
    pub(crate) fn set_faults(&mut self, endpoint: SimEndpoint, knobs: EndpointFaults) {
        let script = knobs.script.iter().copied().collect();
        self.faults.insert(
            endpoint,
            FaultState {
                knobs,
                script,
                throttled_until: None,
            },
        );
    }

    /// Appends forced outcomes to one endpoint's script.
    pub(crate) fn script(&mut self, endpoint: SimEndpoint, steps: &[Forced]) {
        if let Some(state) = self.faults.get_mut(&endpoint) {
            state.script.extend(steps.iter().copied());
        }
    }

    /// Sets the status of the account with `domain` (as a customer
    /// activating or an admin deactivating it would); false when there is
    /// no such account.
    pub(crate) fn set_account_status(&mut self, domain: &str, status: &str) -> bool {
        let found = (self.accounts.iter_mut()).find(|a| a.domain.eq_ignore_ascii_case(domain));
        found
            .map(|account| account.status = status.to_owned())
            .is_some()
    }

    /// False when the call exceeds the server-side rate limit.
    pub(crate) fn within_rate_limit(&self) -> bool {
        self.rate_limit.as_ref().is_none_or(|l| l.check().is_ok())
    }

    /// Latency to add to a call of `endpoint`.
    pub(crate) fn latency(&self, endpoint: SimEndpoint) -> Duration {
        self.faults
            .get(&endpoint)
            .map(|f| f.knobs.latency)
            .unwrap_or_default()
    }

    /// Counts a received call.
    pub(crate) fn count_call(&mut self, endpoint: SimEndpoint) {
        *self
            .stats
            .calls
            .entry(endpoint.as_str().to_owned())
            .or_default() += 1;
        if endpoint == SimEndpoint::Token {
            self.stats.token_requests += 1;
        }
    }

    /// Counts a sent answer.
    pub(crate) fn count_response(&mut self, endpoint: SimEndpoint, status: u16) {
        *self
            .stats
            .responses
            .entry(endpoint.as_str().to_owned())
            .or_default()
            .entry(status.to_string())
            .or_default() += 1;
        if status == 401 && endpoint != SimEndpoint::Token {
            self.stats.unauthorized += 1;
        }
    }

    /// The fault outcome of one call: the script first, then a running 429
    /// burst, then the rates.
    pub(crate) fn decide(&mut self, endpoint: SimEndpoint, roll: f64) -> Decision {
        let Some(state) = self.faults.get_mut(&endpoint) else {
            return Decision::Pass;
        };
        let k = &state.knobs;
        if let Some(step) = state.script.pop_front() {
            return match step {
                Forced::Pass => Decision::Pass,
                Forced::ServerError => Decision::ServerError,
                Forced::BareServerError => Decision::BareServerError,
                Forced::EmptyServerError => Decision::EmptyServerError,
                Forced::Timeout => Decision::Timeout(k.hang),
                Forced::LostResponse => Decision::LostResponse,
                Forced::TooManyRequests => Decision::TooManyRequests(k.retry_after_secs),
                Forced::Unauthorized => Decision::Unauthorized,
            };
        }
        let now = Instant::now();
        if let Some(until) = state.throttled_until {
            if let Some(left) = until.checked_duration_since(now).filter(|l| !l.is_zero()) {
                return Decision::TooManyRequests(ceil_secs(left));
            }
            state.throttled_until = None;
        }
        let mut edge = k.error_rate;
        if roll < edge {
            return Decision::ServerError;
        }
        edge += k.timeout_rate;
        if roll < edge {
            return Decision::Timeout(k.hang);
        }
        edge += k.lost_response_rate;
        if roll < edge {
            return Decision::LostResponse;
        }
        edge += k.throttle_rate;
        if roll < edge {
            state.throttled_until = Some(now + Duration::from_secs(k.retry_after_secs));
            return Decision::TooManyRequests(k.retry_after_secs);
        }
        Decision::Pass
    }

    // ------------------------------------------------------------ token

    /// `POST /oauth2/default/v1/token`.
    pub(crate) fn issue_token(&mut self, form: &HashMap<String, String>, token: String) -> Reply {
        let field = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
        if field("grant_type") != "client_credentials" {
            return Reply::ok(400, json!({"error": "unsupported_grant_type"}));
        }
        if field("client_id") != self.scenario.client_id
            || field("client_secret") != self.scenario.client_secret
        {
            return Reply::ok(401, json!({"error": "invalid_client"}));
        }
        let now = Instant::now();
        if self.tokens.len() >= MAX_TOKENS {
            self.tokens.retain(|_, expires| *expires > now);
            if self.tokens.len() >= MAX_TOKENS {
                self.tokens.clear();
            }
        }
        let ttl = self.scenario.token_ttl;
        self.tokens.insert(token.clone(), now + ttl);
        self.stats.tokens_issued += 1;
        let mut body = json!({"access_token": token, "token_type": "Bearer"});
        if !self.scenario.omit_expires_in {
            body["expires_in"] = ceil_secs(ttl).into();
        }
        Reply::ok(200, body)
    }

    /// Whether `Authorization: Bearer <token>` names a live token.
    pub(crate) fn authorised(&self, token: Option<&str>) -> bool {
        token
            .and_then(|t| self.tokens.get(t))
            .is_some_and(|expires| Instant::now() < *expires)
    }

    /// Forgets every token (the next API call answers 401).
    pub(crate) fn revoke_tokens(&mut self) {
        self.tokens.clear();
    }

    // ---------------------------------------------------------- accounts

    /// `GET …/accounts/search?domain=|name=|email=[&type=]`: substring match.
    pub(crate) fn search(&self, query: &HashMap<String, String>) -> Reply {
        let given: Vec<(&str, &str)> = ["domain", "name", "email"]
            .into_iter()
            .filter_map(|k| query.get(k).map(|v| (k, v.trim())))
            .filter(|(_, v)| !v.is_empty())
            .collect();
        let [(field, needle)] = given.as_slice() else {
            return Reply::error(
                400,
                "BIZ_RULE_FAIL_ERROR",
                "exactly one of domain, name or email is required",
            );
        };
        let wanted_type = match query.get("type").map(|t| t.trim().to_ascii_uppercase()) {
            None => None,
            Some(t) if t == "CUSTOMER" || t == "HOLDING" => Some(t),
            Some(t) => {
                return Reply::error(
                    400,
                    "BIZ_RULE_FAIL_ERROR",
                    format!("unknown account type {t:?}"),
                );
            }
        };
        let needle = needle.to_lowercase();
        let found: Vec<Value> = self
            .accounts
            .iter()
            .filter(|a| {
                let hay = match *field {
                    "domain" => Some(a.domain.as_str()),
                    "name" => Some(a.name.as_str()),
                    _ => a.email.as_deref(),
                };
                hay.is_some_and(|h| h.to_lowercase().contains(&needle))
            })
            .filter(|a| wanted_type.as_deref().is_none_or(|t| a.account_type == t))
            .take(MAX_SEARCH_RESULTS)
            .map(|a| self.extended(account_json(a)))
            .collect();
        Reply::ok(
            200,
            json!({"totalRecords": found.len(), "accounts": found, "status": "SUCCESS", "statusMessage": ""}),
        )
    }

    /// `GET …/accounts/{domain}/customer/virtual-accounts`.
    pub(crate) fn virtual_accounts(&self, domain: &str) -> Reply {
        let Some(account) = self.account(domain) else {
            return Reply::error(
                404,
                "SMART_ACCOUNT_NOT_FOUND",
                format!("no Smart Account with domain {domain}"),
            );
        };
        let vas: Vec<Value> = account
            .virtual_accounts
            .iter()
            .map(|va| {
                self.extended(json!({
                    "name": va.name,
                    "description": va.description,
                    "isDefault": if va.is_default { "true" } else { "false" },
                    "commerceAccessLevel": va.commerce_access_level,
                }))
            })
            .collect();
        Reply::ok(
            200,
            json!({"virtualAccounts": vas, "status": "SUCCESS", "statusMessage": ""}),
        )
    }

    fn account(&self, domain: &str) -> Option<&AccountSpec> {
        let domain = domain.trim().trim_end_matches('.');
        self.accounts
            .iter()
            .find(|a| a.domain.eq_ignore_ascii_case(domain))
    }

    // ------------------------------------------------------------ orders

    /// `GET /commerce/v1/orders/{n}`: counts a read, which may release the hold.
    pub(crate) fn read_order(&mut self, number: &str) -> Reply {
        if let Err(reply) = self.ensure_order(number) {
            return reply;
        }
        match self.gate(number) {
            Err(reply) => reply,
            Ok(()) => {
                self.count_read(number);
                Reply::ok(200, self.order_json(number))
            }
        }
    }

    /// `GET /commerce/v1/orders?webOrderId=`: `{"orders": [...]}`, every
    /// order whose web order id *contains* the value (case-insensitively),
    /// as Cisco's search does; empty when none. An unknown web order id is
    /// first created on the fly (as `SO-<id>`) when the defaults allow it.
    /// The reads of the exact matches count (they may release the hold).
    pub(crate) fn read_orders_by_web_id(&mut self, web_order_id: Option<&str>) -> Reply {
        let Some(web) = web_order_id.map(str::trim).filter(|w| !w.is_empty()) else {
            return Reply::error(400, "BIZ_RULE_FAIL_ERROR", "webOrderId is required");
        };
        if !self.by_web_id.contains_key(web) {
            let number = format!("SO-{web}");
            if self.order_creatable(&number) && crate::domain::WebOrderId::parse(web).is_ok() {
                let mut order = self.order_from_defaults(&number);
                order.web_order_id = Some(web.to_owned());
                self.insert_order(order);
            }
        }
        let exact = self.by_web_id.get(web).cloned().unwrap_or_default();
        if let Some(denied) = exact.iter().find(|n| {
            self.orders
                .get(n.as_str())
                .is_some_and(|o| o.behaviour == Behaviour::AccessDenied)
        }) {
            return access_denied(denied);
        }
        let needle = web.to_lowercase();
        let found: Vec<String> = self
            .by_web_id
            .iter()
            .filter(|(w, _)| w.to_lowercase().contains(&needle))
            .flat_map(|(_, numbers)| numbers.iter().cloned())
            .filter(|n| {
                self.orders.get(n).is_some_and(|o| {
                    !matches!(o.behaviour, Behaviour::NotFound | Behaviour::AccessDenied)
                })
            })
            .take(MAX_SEARCH_RESULTS)
            .collect();
        for number in exact.iter().filter(|n| found.contains(n)) {
            self.count_read(number);
        }
        let orders: Vec<Value> = found.iter().map(|n| self.order_json(n)).collect();
        Reply::ok(200, json!({"orders": orders}))
    }

    /// The order as JSON without counting a read (`GET /_sim/orders/{n}`).
    pub(crate) fn peek_order(&self, number: &str) -> Option<Value> {
        self.orders
            .contains_key(number)
            .then(|| self.order_json(number))
    }

    /// The simulator playing the person (`POST /_sim/orders/{n}/hand-assignment`):
    /// someone assigns `domain` (an account of the scenario, any status)
    /// and the Virtual Account `va` to the order in the portal, by hand,
    /// and the Smart Account hold is released. The order as it now reads,
    /// or 404 for an unknown order or account.
    pub(crate) fn assign_by_hand(&mut self, number: &str, domain: &str, va: &str) -> Reply {
        let Some(account) = self.account(domain).map(|a| OrderAccount {
            domain: a.domain.clone(),
            name: a.name.clone(),
            status: a.status.clone(),
        }) else {
            return Reply::error(
                404,
                "SMART_ACCOUNT_NOT_FOUND",
                format!("no account {domain}"),
            );
        };
        let Some(order) = self.orders.get_mut(number) else {
            return not_found(number);
        };
        order.smart_account = Some(account);
        order.virtual_account = Some(va.to_owned());
        order.pending_release = None;
        if release(order) {
            self.stats.holds_released += 1;
        }
        Reply::ok(200, self.order_json(number))
    }

    /// The order's status set by a person; `false` when there is no such order.
    pub(crate) fn set_status(&mut self, number: &str, status: &str) -> bool {
        let Some(order) = self.orders.get_mut(number) else {
            return false;
        };
        status.clone_into(&mut order.status);
        true
    }

    /// The order's Smart Account hold released by a person; `false` when
    /// none was on.
    pub(crate) fn release_by_hand(&mut self, number: &str) -> bool {
        let released = self.orders.get_mut(number).is_some_and(release);
        if released {
            self.stats.holds_released += 1;
        }
        released
    }

    /// `POST /commerce/v1/orders/{n}/smart-account-assignment`: the same
    /// key and body again is answered as the first time; otherwise the
    /// order, the terms, the account and the Virtual Account are checked in
    /// that order, and an accepted assignment may release the hold.
    pub(crate) fn assign(
        &mut self,
        number: &str,
        idempotency_key: Option<&str>,
        body: &[u8],
    ) -> Reply {
        let Some(key) = idempotency_key
            .map(str::trim)
            .filter(|k| !k.is_empty() && k.len() <= 255)
        else {
            return Reply::error(
                400,
                "IDEMPOTENCY_KEY_REQUIRED",
                "the Idempotency-Key header (1 to 255 characters) is required",
            );
        };
        let request: Value = match serde_json::from_slice(body) {
            Ok(v @ Value::Object(_)) => v,
            _ => return Reply::error(400, "BIZ_RULE_FAIL_ERROR", "the body is not a JSON object"),
        };
        let record = (number.to_owned(), key.to_owned());
        if let Some(stored) = self.idempotency.get(&record) {
            if stored.fingerprint != request {
                return Reply::error(
                    422,
                    "IDEMPOTENCY_KEY_REUSED",
                    "this Idempotency-Key was used with a different body",
                );
            }
            self.stats.idempotent_replays += 1;
            return stored.reply.clone();
        }
        let (assigned, va_name) = match self.assignable(number, &request) {
            Ok(accepted) => accepted,
            Err(refused) => return refused,
        };
        let reply = self.accept(number, assigned, va_name);
        self.remember(record, request, reply.clone());
        reply
    }

    /// The account and Virtual Account an assignment of `request` to order
    /// `number` sets, or the answer refusing it.
    fn assignable(
        &mut self,
        number: &str,
        request: &Value,
    ) -> Result<(OrderAccount, String), Reply> {
        self.ensure_order(number)?;
        self.gate(number)?;
        let Some(order) = self.orders.get(number) else {
            return Err(not_found(number));
        };
        if order.behaviour == Behaviour::Locked
            || matches!(order.order_type.as_str(), "STOCKING" | "EA")
            || !matches!(order.status.as_str(), "ENTERED" | "BOOKED")
        {
            return Err(Reply::error(
                409,
                "ASSIGNMENT_LOCKED",
                format!(
                    "order {number} ({} {}) no longer takes a Smart Account assignment",
                    order.status, order.order_type
                ),
            ));
        }
        let text = |k: &str| {
            request
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let (domain, account_type, va_name) = (
            text("smartAccountDomain"),
            text("accountType"),
            text("virtualAccountName"),
        );
        if request.get("acceptTerms").and_then(Value::as_bool) != Some(true) {
            return Err(Reply::error(
                400,
                "TNC_ERROR",
                "the terms must be accepted (acceptTerms: true)",
            ));
        }
        if domain.is_empty() || va_name.is_empty() {
            return Err(Reply::error(
                400,
                "BIZ_RULE_FAIL_ERROR",
                "smartAccountDomain and virtualAccountName are required",
            ));
        }
        self.usable_account(&domain, &account_type, &va_name)
    }

    /// The ACTIVE account of `domain` (of `account_type`, when given) and
    /// its PUBLIC Virtual Account `va_name`, or the answer refusing them.
    fn usable_account(
        &self,
        domain: &str,
        account_type: &str,
        va_name: &str,
    ) -> Result<(OrderAccount, String), Reply> {
        let Some(account) = self.account(domain) else {
            return Err(Reply::error(
                404,
                "SMART_ACCOUNT_NOT_FOUND",
                format!("no Smart Account with domain {domain}"),
            ));
        };
        if !account_type.is_empty() && !account.account_type.eq_ignore_ascii_case(account_type) {
            return Err(Reply::error(
                400,
                "BIZ_RULE_FAIL_ERROR",
                format!(
                    "{domain} is a {} account, not {account_type}",
                    account.account_type
                ),
            ));
        }
        if account.status != "ACTIVE" {
            return Err(Reply::error(
                422,
                "SMART_ACCOUNT_NOT_ACTIVE",
                format!("Smart Account {domain} is {}", account.status),
            ));
        }
        let Some(va) = account.virtual_accounts.iter().find(|va| {
            va.name.eq_ignore_ascii_case(va_name) && va.commerce_access_level == "PUBLIC"
        }) else {
            return Err(Reply::error(
                422,
                "VIRTUAL_ACCOUNT_NOT_FOUND",
                format!("{domain} has no PUBLIC Virtual Account {va_name:?}"),
            ));
        };
        let assigned = OrderAccount {
            domain: account.domain.clone(),
            name: account.name.clone(),
            status: account.status.clone(),
        };
        Ok((assigned, va.name.clone()))
    }

    /// Sets the accepted assignment on the order (202), which releases its
    /// hold at once or after the release knobs.
    fn accept(&mut self, number: &str, assigned: OrderAccount, va_name: String) -> Reply {
        self.next_assignment += 1;
        let reply = Reply::ok(
            202,
            json!({"assignmentId": format!("ASG-{}", self.next_assignment), "status": "SUBMITTED"}),
        );
        let now = Instant::now();
        let mut released = false;
        if let Some(order) = self.orders.get_mut(number) {
            order.smart_account = Some(assigned);
            order.virtual_account = Some(va_name);
            if order.behaviour != Behaviour::NeverReleases
                && order.pending_release.is_none()
                && has_open_hold(order)
            {
                if order.release_after_reads == 0 && order.release_after.is_zero() {
                    released = release(order);
                } else {
                    order.pending_release = Some(PendingRelease {
                        reads_left: order.release_after_reads,
                        not_before: now + order.release_after,
                    });
                }
            }
        }
        if released {
            self.stats.holds_released += 1;
        }
        *self.stats.assignments.entry(number.to_owned()).or_default() += 1;
        reply
    }

    /// Keeps the answer to `record` (order, key) for a repeat, forgetting
    /// the oldest beyond [`MAX_IDEMPOTENCY_RECORDS`].
    fn remember(&mut self, record: (String, String), request: Value, reply: Reply) {
        if self.idempotency_order.len() >= MAX_IDEMPOTENCY_RECORDS
            && let Some(oldest) = self.idempotency_order.pop_front()
        {
            self.idempotency.remove(&oldest);
        }
        self.idempotency_order.push_back(record.clone());
        self.idempotency.insert(
            record,
            Stored {
                fingerprint: request,
                reply,
            },
        );
    }

    /// Creates an unknown order from the defaults, or says why not.
    fn ensure_order(&mut self, number: &str) -> Result<(), Reply> {
        if self.orders.contains_key(number) {
            return Ok(());
        }
        if crate::domain::SalesOrderNumber::parse(number).is_err() || !self.order_creatable(number)
        {
            return Err(not_found(number));
        }
        let order = self.order_from_defaults(number);
        self.insert_order(order);
        Ok(())
    }

    fn order_creatable(&self, number: &str) -> bool {
        let d = &self.scenario.defaults;
        d.create_unknown && self.orders.len() < d.max_orders && !self.orders.contains_key(number)
    }

    /// The answer of an order that refuses every call (403, 404).
    fn gate(&self, number: &str) -> Result<(), Reply> {
        match self.orders.get(number).map(|o| o.behaviour) {
            None | Some(Behaviour::NotFound) => Err(not_found(number)),
            Some(Behaviour::AccessDenied) => Err(access_denied(number)),
            Some(_) => Ok(()),
        }
    }

    fn count_read(&mut self, number: &str) {
        let Some(order) = self.orders.get_mut(number) else {
            return;
        };
        let Some(pending) = &mut order.pending_release else {
            return;
        };
        pending.reads_left = pending.reads_left.saturating_sub(1);
        if pending.reads_left == 0 && Instant::now() >= pending.not_before {
            order.pending_release = None;
            if release(order) {
                self.stats.holds_released += 1;
            }
        }
    }

    fn insert_order(&mut self, order: SimOrder) {
        if let Some(web) = &order.web_order_id {
            self.by_web_id
                .entry(web.clone())
                .or_default()
                .push(order.sales_order_number.clone());
        }
        self.orders.insert(order.sales_order_number.clone(), order);
        self.stats.orders = self.orders.len() as u64;
    }

    fn order_from_defaults(&self, number: &str) -> SimOrder {
        self.order_from_spec(
            &OrderSpec {
                sales_order_number: number.to_owned(),
                ..OrderSpec::default()
            },
            Utc::now(),
        )
    }

    fn order_from_spec(&self, spec: &OrderSpec, now: DateTime<Utc>) -> SimOrder {
        let d = &self.scenario.defaults;
        let smart_account =
            spec.smart_account
                .as_deref()
                .map(|domain| match self.account(domain) {
                    Some(a) => OrderAccount {
                        domain: a.domain.clone(),
                        name: a.name.clone(),
                        status: a.status.clone(),
                    },
                    None => OrderAccount {
                        domain: domain.to_owned(),
                        name: String::new(),
                        status: "PENDING".into(),
                    },
                });
        SimOrder {
            sales_order_number: spec.sales_order_number.clone(),
            web_order_id: spec.web_order_id.clone(),
            purchase_order_number: spec.purchase_order_number.clone(),
            status: spec.status.clone().unwrap_or_else(|| d.status.clone()),
            order_type: spec
                .order_type
                .clone()
                .unwrap_or_else(|| d.order_type.clone()),
            holds: spec
                .holds
                .as_ref()
                .unwrap_or(&d.holds)
                .iter()
                .map(|code| Hold {
                    code: code.clone(),
                    applied_at: now,
                    released_at: None,
                })
                .collect(),
            holds_field: spec.holds_field.unwrap_or(d.holds_field),
            smart_account,
            virtual_account: spec.virtual_account.clone(),
            behaviour: spec.behaviour.unwrap_or(d.behaviour),
            release_after_reads: spec.release_after_reads.unwrap_or(d.release_after_reads),
            release_after: spec.release_after.unwrap_or(d.release_after),
            pending_release: None,
        }
    }

    fn order_json(&self, number: &str) -> Value {
        let Some(o) = self.orders.get(number) else {
            return Value::Null;
        };
        let holds: Vec<Value> = o
            .holds
            .iter()
            .map(|h| {
                self.extended(json!({
                    "code": h.code,
                    "description": hold_description(&h.code),
                    "appliedAt": timestamp(h.applied_at),
                    "releasedAt": h.released_at.map(timestamp),
                }))
            })
            .collect();
        let smart_account = o.smart_account.as_ref().map(|sa| {
            // The account's current status, as the real system would show it.
            let status = self
                .account(&sa.domain)
                .map_or(sa.status.as_str(), |a| a.status.as_str());
            self.extended(json!({"domain": sa.domain, "name": sa.name, "status": status}))
        });
        let mut order = json!({
            "salesOrderNumber": o.sales_order_number,
            "webOrderId": o.web_order_id,
            "purchaseOrderNumber": o.purchase_order_number,
            "status": o.status,
            "orderType": o.order_type,
            "smartAccount": smart_account,
            "virtualAccount": o.virtual_account.as_ref().map(|name| json!({"name": name})),
        });
        match o.holds_field {
            HoldsField::Listed => order["holds"] = holds.into(),
            HoldsField::Null => order["holds"] = Value::Null,
            HoldsField::Missing => {}
        }
        self.extended(order)
    }

    /// `object` with fields the contract does not name, when the scenario
    /// asks for them.
    pub(crate) fn extended(&self, mut object: Value) -> Value {
        if self.scenario.extra_fields
            && let Value::Object(fields) = &mut object
        {
            fields.insert("lastUpdatedBy".into(), "holdclear-sim".into());
            fields.insert(
                "extension".into(),
                json!({"region": "EMEA", "flags": [1, 2], "note": null}),
            );
        }
        object
    }
}

/// Calls per second with bursts up to one second's worth, like an API gateway.
fn server_limit(per_second: f64) -> Option<governor::DefaultDirectRateLimiter> {
    let period = Duration::try_from_secs_f64(1.0 / per_second).ok()?;
    let burst = std::num::NonZeroU32::new(per_second.ceil().clamp(1.0, 1e6) as u32)?;
    Some(governor::RateLimiter::direct(
        governor::Quota::with_period(period)?.allow_burst(burst),
    ))
}

fn has_open_hold(order: &SimOrder) -> bool {
    order
        .holds
        .iter()
        .any(|h| h.code == crate::commerce::SMART_ACCOUNT_HOLD && h.released_at.is_none())
}

/// Releases the order's Smart Account holds; true if one was on.
fn release(order: &mut SimOrder) -> bool {
    let now = Utc::now();
    let mut any = false;
    for h in &mut order.holds {
        if h.code == crate::commerce::SMART_ACCOUNT_HOLD && h.released_at.is_none() {
            h.released_at = Some(now);
            any = true;
        }
    }
    any
}

fn account_json(a: &AccountSpec) -> Value {
    json!({
        "id": a.id,
        "domain": a.domain,
        "name": a.name,
        "email": a.email,
        "type": a.account_type,
        "status": a.status,
    })
}

fn hold_description(code: &str) -> String {
    match code {
        "SMART_ACCOUNT_HOLD" => "Smart Account hold".into(),
        "CREDIT_HOLD" => "Credit hold".into(),
        "EXPORT_HOLD" => "Export compliance hold".into(),
        other => other.replace('_', " ").to_lowercase(),
    }
}

fn not_found(number: &str) -> Reply {
    Reply::error(404, "ORDER_NOT_FOUND", format!("no order {number}"))
}

fn access_denied(number: &str) -> Reply {
    Reply::error(
        403,
        "ORDER_ACCESS_DENIED",
        format!("the API user may not see order {number}"),
    )
}

fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Whole seconds, rounded up, at least 1.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world() -> World {
        World::new(Scenario::demo().unwrap())
    }

    fn body(domain: &str, va: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "smartAccountDomain": domain, "accountType": "CUSTOMER",
            "virtualAccountName": va, "acceptTerms": true
        }))
        .unwrap()
    }

    #[test]
    fn assignment_answers_table() {
        let cases = [
            ("104233871", "acme.com", "DEFAULT", 202, None),
            (
                "104233871",
                "acme.com",
                "Network",
                422,
                Some("VIRTUAL_ACCOUNT_NOT_FOUND"),
            ),
            (
                "104233871",
                "acme.com",
                "Nope",
                422,
                Some("VIRTUAL_ACCOUNT_NOT_FOUND"),
            ),
            (
                "104233871",
                "initech.com",
                "DEFAULT",
                422,
                Some("SMART_ACCOUNT_NOT_ACTIVE"),
            ),
            (
                "104233871",
                "hooli.com",
                "DEFAULT",
                422,
                Some("SMART_ACCOUNT_NOT_ACTIVE"),
            ),
            (
                "104233871",
                "acme.co",
                "DEFAULT",
                404,
                Some("SMART_ACCOUNT_NOT_FOUND"),
            ),
            (
                "104233874",
                "acme.com",
                "DEFAULT",
                403,
                Some("ORDER_ACCESS_DENIED"),
            ),
            (
                "104233875",
                "acme.com",
                "DEFAULT",
                404,
                Some("ORDER_NOT_FOUND"),
            ),
            (
                "104233876",
                "acme.com",
                "DEFAULT",
                409,
                Some("ASSIGNMENT_LOCKED"),
            ),
            (
                "104233877",
                "acme.com",
                "DEFAULT",
                409,
                Some("ASSIGNMENT_LOCKED"),
            ),
            (
                "104233878",
                "acme.com",
                "DEFAULT",
                409,
                Some("ASSIGNMENT_LOCKED"),
            ),
            ("555", "acme.com", "DEFAULT", 202, None),
        ];
        for (i, (order, domain, va, status, code)) in cases.into_iter().enumerate() {
            let mut w = world();
            let reply = w.assign(order, Some(&format!("k{i}")), &body(domain, va));
            assert_eq!(
                reply.status, status,
                "{order} {domain} {va}: {}",
                reply.body
            );
            assert_eq!(
                reply.body.get("errorCode").and_then(Value::as_str),
                code,
                "{order} {domain} {va}"
            );
        }
    }

    #[test]
    fn terms_and_key_are_required() {
        let mut w = world();
        let no_terms = serde_json::to_vec(
            &json!({"smartAccountDomain": "acme.com", "virtualAccountName": "DEFAULT"}),
        )
        .unwrap();
        assert_eq!(
            w.assign("1", Some("k"), &no_terms).body["errorCode"],
            "TNC_ERROR"
        );
        assert_eq!(
            w.assign("1", None, &body("acme.com", "DEFAULT")).status,
            400
        );
        assert_eq!(w.assign("1", Some("k"), b"not json").status, 400);
    }

    #[test]
    fn the_hold_lifts_after_the_configured_reads() {
        let mut w = world();
        let held =
            |w: &mut World| w.read_order("104233871").body["holds"][0]["releasedAt"].is_null();
        assert!(held(&mut w), "no assignment yet");
        assert!(held(&mut w));
        assert_eq!(
            w.assign("104233871", Some("k"), &body("acme.com", "DEFAULT"))
                .status,
            202
        );
        assert!(held(&mut w), "first read after the assignment");
        assert!(!held(&mut w), "second read: released");
        let order = w.read_order("104233871").body;
        assert_eq!(order["smartAccount"]["domain"], "acme.com");
        assert_eq!(order["virtualAccount"]["name"], "DEFAULT");
        assert!(
            order["holds"][1]["releasedAt"].is_null(),
            "the credit hold stays"
        );
        assert_eq!(w.stats.holds_released, 1);
    }

    #[test]
    fn a_never_releasing_order_keeps_its_hold() {
        let mut w = world();
        assert_eq!(
            w.assign("104233873", Some("k"), &body("acme.com", "DEFAULT"))
                .status,
            202
        );
        for _ in 0..5 {
            assert!(w.read_order("104233873").body["holds"][0]["releasedAt"].is_null());
        }
    }

    #[test]
    fn idempotency_key_replays_and_refuses_a_different_body() {
        let mut w = world();
        let first = w.assign("9001", Some("key-1"), &body("acme.com", "DEFAULT"));
        let again = w.assign("9001", Some("key-1"), &body("acme.com", "DEFAULT"));
        assert_eq!(first, again);
        assert_eq!(w.stats.assignments_of("9001"), 1);
        assert_eq!(w.stats.idempotent_replays, 1);
        assert_eq!(
            w.assign(
                "9001",
                Some("key-1"),
                &body("globex-holding.com", "Holding")
            )
            .status,
            422
        );
        assert_eq!(
            w.assign("9001", Some("key-2"), &body("acme.com", "DEFAULT"))
                .status,
            202
        );
        assert_eq!(w.stats.assignments_of("9001"), 2);
    }

    #[test]
    fn scripted_faults_come_first_then_rates() {
        let mut w = world();
        w.script(
            SimEndpoint::Order,
            &[Forced::ServerError, Forced::Pass, Forced::TooManyRequests],
        );
        assert_eq!(w.decide(SimEndpoint::Order, 0.99), Decision::ServerError);
        assert_eq!(w.decide(SimEndpoint::Order, 0.99), Decision::Pass);
        assert_eq!(
            w.decide(SimEndpoint::Order, 0.99),
            Decision::TooManyRequests(1)
        );
        assert_eq!(w.decide(SimEndpoint::Order, 0.99), Decision::Pass);
        w.set_faults(
            SimEndpoint::Order,
            EndpointFaults {
                error_rate: 0.1,
                throttle_rate: 0.1,
                retry_after_secs: 5,
                ..EndpointFaults::default()
            },
        );
        assert_eq!(w.decide(SimEndpoint::Order, 0.05), Decision::ServerError);
        assert_eq!(w.decide(SimEndpoint::Order, 0.5), Decision::Pass);
        assert_eq!(
            w.decide(SimEndpoint::Order, 0.15),
            Decision::TooManyRequests(5)
        );
        // The burst goes on whatever the roll.
        assert!(matches!(
            w.decide(SimEndpoint::Order, 0.9),
            Decision::TooManyRequests(4 | 5)
        ));
    }

    #[test]
    fn search_is_by_substring() {
        let w = world();
        let q = |k: &str, v: &str| HashMap::from([(k.to_owned(), v.to_owned())]);
        let domains = |r: Reply| -> Vec<String> {
            r.body["accounts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["domain"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(
            domains(w.search(&q("domain", "ACME.com"))),
            ["acme.com", "notacme.com"]
        );
        assert_eq!(
            domains(w.search(&q("name", "acme"))),
            ["acme.com", "notacme.com"]
        );
        assert_eq!(domains(w.search(&q("email", "@initech"))), ["initech.com"]);
        let mut typed = q("domain", "com");
        typed.insert("type".into(), "holding".into());
        assert_eq!(domains(w.search(&typed)), ["globex-holding.com"]);
        assert_eq!(w.search(&HashMap::new()).status, 400);
    }

    #[test]
    fn the_web_order_search_is_by_substring_and_creates_only_exact_ids() {
        let mut w = world();
        let numbers = |r: Reply| -> Vec<String> {
            r.body["orders"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["salesOrderNumber"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(
            numbers(w.read_orders_by_web_id(Some("98765432"))),
            ["104233871"]
        );
        // Created on the fly as SO-9876543, then every order containing it.
        assert_eq!(
            numbers(w.read_orders_by_web_id(Some("9876543"))),
            ["SO-9876543", "104233871", "104233872"]
        );
        // The not-found order (98765475) is never listed.
        assert_eq!(
            numbers(w.read_orders_by_web_id(Some("987654"))),
            ["SO-987654", "SO-9876543", "104233871", "104233872"]
        );
        let mut strict = Scenario::demo().unwrap();
        strict.defaults.create_unknown = false;
        strict.orders.push(OrderSpec {
            sales_order_number: "500001".into(),
            web_order_id: Some("98765432".into()),
            ..OrderSpec::default()
        });
        let mut w = World::new(strict);
        assert_eq!(
            numbers(w.read_orders_by_web_id(Some("8765432"))),
            ["104233871", "500001"],
            "no exact order: only the others"
        );
        assert_eq!(
            numbers(w.read_orders_by_web_id(Some("98765432"))),
            ["104233871", "500001"],
            "two orders share the web order id"
        );
        assert_eq!(w.stats.orders, 10, "nothing created");
    }

    #[test]
    fn answers_can_leave_out_holds_and_expires_in_and_carry_extra_fields() {
        let mut scenario = Scenario::demo().unwrap();
        scenario.omit_expires_in = true;
        scenario.extra_fields = true;
        scenario.defaults.holds_field = HoldsField::Missing;
        scenario.orders[0].holds_field = Some(HoldsField::Null);
        let mut w = World::new(scenario);
        let form = HashMap::from([
            ("grant_type".to_owned(), "client_credentials".to_owned()),
            ("client_id".to_owned(), w.scenario.client_id.clone()),
            ("client_secret".to_owned(), w.scenario.client_secret.clone()),
        ]);
        let token = w.issue_token(&form, "t".into());
        assert_eq!(token.status, 200);
        assert!(token.body.get("expires_in").is_none(), "{}", token.body);
        let seeded = w.read_order("104233871").body;
        assert_eq!(seeded.get("holds"), Some(&Value::Null));
        assert_eq!(seeded["lastUpdatedBy"], "holdclear-sim");
        let created = w.read_order("777").body;
        assert!(created.get("holds").is_none(), "{created}");
        let q = HashMap::from([("domain".to_owned(), "acme.com".to_owned())]);
        assert!(w.search(&q).body["accounts"][0].get("extension").is_some());
    }

    #[test]
    fn ceil_secs_rounds_up() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ceil_secs(Duration::from_secs(3600)), 3600);
    }
}
