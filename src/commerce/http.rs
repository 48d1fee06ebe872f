//! [`HttpCommerce`]: the contract over HTTPS with reqwest and rustls.
//!
//! Every request goes through the same path: a token from the shared
//! [`TokenCache`], a slot from the shared [`Limiter`], the request with the
//! configured timeout, a body read with a size cap, one classification of
//! the answer, and a metric per request. A 401 refreshes the token and
//! repeats the request once; a few transient failures are retried within
//! the call by [`QuickRetry`].

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use url::Url;

use super::cache::ResolveCache;
use super::limiter::Limiter;
use super::quick_retry::QuickRetry;
use super::token::{Fresh, Lease, TokenCache};
use super::wire::{
    AssignmentAnswer, AssignmentBody, Envelope, OrderList, SearchAnswer, TokenAnswer,
    VirtualAccountsAnswer, WireAccount, WireOrder, WireVirtualAccount,
};
use super::{
    AccountStatus, Assignment, AssignmentReceipt, CommerceApi, CommerceError, ErrorCode, Order,
    SmartAccount, VirtualAccount,
};
use crate::config::{CommerceSettings, Secret};
use crate::domain::{AccountSelector, AccountType, Domain, OrderId, SalesOrderNumber, WebOrderId};

/// Largest answer body read; a longer one is refused.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Longest `Retry-After` taken as given.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Longest server message copied into an error detail.
const MAX_MESSAGE_CHARS: usize = 300;
/// Most candidates of an ambiguous match named in the error's detail.
const MAX_CANDIDATES_SHOWN: usize = 10;

/// The commerce API client. Cheap to clone: clones share the connection
/// pool, the token and the rate limit.
#[derive(Clone)]
pub struct HttpCommerce {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base_url: Url,
    token_url: Url,
    client_id: String,
    client_secret: Secret,
    rate_limit: f64,
    tokens: TokenCache,
    limiter: Limiter,
    retry: QuickRetry,
    /// Account searches and Virtual Account lists; `None` when off.
    cache: Option<ResolveCache>,
}

impl fmt::Debug for HttpCommerce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCommerce")
            .field("base_url", &self.inner.base_url.as_str())
            .field("token_url", &self.inner.token_url.as_str())
            .field("client_id", &self.inner.client_id)
            .field("client_secret", &self.inner.client_secret)
            .field("rate_limit", &self.inner.rate_limit)
            .finish_non_exhaustive()
    }
}

/// The remote endpoints, as named in metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Token,
    Search,
    VirtualAccounts,
    Order,
    OrdersByWebId,
    Assign,
}

impl Endpoint {
    fn as_str(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Search => "search",
            Self::VirtualAccounts => "virtual_accounts",
            Self::Order => "order",
            Self::OrdersByWebId => "orders_by_web_id",
            Self::Assign => "assign",
        }
    }

    /// The code of a 403/404/409 that came without an `errorCode`.
    fn default_code(self, status: StatusCode) -> ErrorCode {
        let about_orders = matches!(self, Self::Order | Self::OrdersByWebId | Self::Assign);
        match status {
            StatusCode::FORBIDDEN if about_orders => ErrorCode::OrderAccessDenied,
            StatusCode::NOT_FOUND if about_orders => ErrorCode::OrderNotFound,
            StatusCode::NOT_FOUND if self == Self::VirtualAccounts => {
                ErrorCode::SmartAccountNotFound
            }
            StatusCode::CONFLICT if about_orders => ErrorCode::AssignmentLocked,
            other => ErrorCode::Other(format!("HTTP_{}", other.as_u16())),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One HTTP answer, body read.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

fn setup_error(detail: impl Into<String>) -> CommerceError {
    CommerceError::Permanent {
        code: ErrorCode::Other("CLIENT_SETUP".into()),
        detail: detail.into(),
    }
}

impl HttpCommerce {
    /// A client for the API at `settings.base_url`. Nothing is sent yet: the
    /// token is fetched by the first call. `https://` servers must present
    /// a certificate for their host that chains to the platform's roots or
    /// to `settings.tls_ca`. Fails only on settings that cannot work (a
    /// rate limit that is not positive, a base URL that cannot have paths)
    /// or when the TLS stack cannot start.
    pub fn new(settings: &CommerceSettings) -> Result<Self, CommerceError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        if settings.base_url.cannot_be_a_base() {
            return Err(setup_error(
                "HOLDCLEAR_COMMERCE_BASE_URL cannot carry the API's paths",
            ));
        }
        let limiter = Limiter::new(settings.rate_limit).ok_or_else(|| {
            setup_error(
                "HOLDCLEAR_COMMERCE_RATE_LIMIT must be a positive number of calls per second",
            )
        })?;
        let mut builder = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout.min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("holdclear/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &settings.tls_ca {
            // Besides the platform's roots, as for RabbitMQ and PostgreSQL.
            let certs =
                reqwest::Certificate::from_pem_bundle(ca.pem().as_bytes()).map_err(|e| {
                    setup_error(format!(
                        "cannot use the CA file {}: {}",
                        ca.path().display(),
                        chain(&e)
                    ))
                })?;
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| setup_error(format!("cannot build the HTTP client: {}", chain(&e))))?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base_url: settings.base_url.clone(),
                token_url: settings.token_url.clone(),
                client_id: settings.client_id.clone(),
                client_secret: settings.client_secret.clone(),
                rate_limit: settings.rate_limit,
                tokens: TokenCache::default(),
                limiter,
                retry: QuickRetry::default(),
                cache: ResolveCache::new(settings.cache_ttl, settings.cache_entries),
            }),
        })
    }

    /// From now on, this client (and its clones) also spends the
    /// deployment's rate `budget`: `HOLDCLEAR_COMMERCE_RATE_LIMIT` then
    /// holds for all workers together (see `limiter.rs`).
    pub fn share_budget(&self, budget: Arc<dyn super::RateBudget>) {
        self.inner.limiter.share(budget);
    }

    /// See [`CommerceApi::find_account`]: from the resolve cache when it
    /// holds the answer (see `cache.rs`).
    pub async fn find_account(
        &self,
        selector: &AccountSelector,
        account_type: Option<AccountType>,
    ) -> Result<Option<SmartAccount>, CommerceError> {
        match &self.inner.cache {
            Some(cache) => {
                let search = || self.search_account(selector, account_type);
                cache.account(selector, account_type, search).await.0
            }
            None => self.search_account(selector, account_type).await,
        }
    }

    #[tracing::instrument(skip_all, fields(selector = %selector, account_type = ?account_type), err(level = "warn"))]
    async fn search_account(
        &self,
        selector: &AccountSelector,
        account_type: Option<AccountType>,
    ) -> Result<Option<SmartAccount>, CommerceError> {
        let (field, value) = match selector {
            AccountSelector::Domain(d) => ("domain", d.as_str()),
            AccountSelector::Name(n) => ("name", n.as_str()),
            AccountSelector::Email(e) => ("email", e.as_str()),
        };
        let mut query = vec![(field, value)];
        if let Some(t) = account_type {
            query.push(("type", t.as_str()));
        }
        let url = self.url(&["smart-accounts-and-licensing", "v1", "accounts", "search"]);
        let body = match self
            .call(Endpoint::Search, &|http| {
                http.get(url.clone()).query(&query)
            })
            .await
        {
            Err(CommerceError::Permanent {
                code: ErrorCode::SmartAccountNotFound,
                ..
            }) => return Ok(None),
            other => other?,
        };
        let answer: SearchAnswer = parse(Endpoint::Search, &body)?;
        check_envelope(Endpoint::Search, &answer.envelope)?;
        let accounts = answer
            .into_accounts()
            .map_err(|e| invalid(Endpoint::Search, e))?;
        select_exact(accounts, selector, account_type)
    }

    /// See [`CommerceApi::virtual_accounts`]: from the resolve cache when
    /// it holds the list.
    pub async fn virtual_accounts(
        &self,
        domain: &Domain,
    ) -> Result<Vec<VirtualAccount>, CommerceError> {
        self.virtual_accounts_of(domain, false).await
    }

    /// See [`CommerceApi::fresh_virtual_accounts`]: read from the API (and
    /// kept in the cache for the next cases).
    pub async fn fresh_virtual_accounts(
        &self,
        domain: &Domain,
    ) -> Result<Vec<VirtualAccount>, CommerceError> {
        self.virtual_accounts_of(domain, true).await
    }

    async fn virtual_accounts_of(
        &self,
        domain: &Domain,
        fresh: bool,
    ) -> Result<Vec<VirtualAccount>, CommerceError> {
        match &self.inner.cache {
            Some(cache) => {
                let list = || self.list_virtual_accounts(domain);
                cache.virtual_accounts(domain, fresh, list).await.0
            }
            None => self.list_virtual_accounts(domain).await,
        }
    }

    #[tracing::instrument(skip_all, fields(domain = %domain), err(level = "warn"))]
    async fn list_virtual_accounts(
        &self,
        domain: &Domain,
    ) -> Result<Vec<VirtualAccount>, CommerceError> {
        let url = self.url(&[
            "smart-accounts-and-licensing",
            "v1",
            "accounts",
            domain.as_str(),
            "customer",
            "virtual-accounts",
        ]);
        let body = self
            .call(Endpoint::VirtualAccounts, &|http| http.get(url.clone()))
            .await?;
        let answer: VirtualAccountsAnswer = parse(Endpoint::VirtualAccounts, &body)?;
        check_envelope(Endpoint::VirtualAccounts, &answer.envelope)?;
        answer
            .virtual_accounts
            .ok_or_else(|| {
                invalid(
                    Endpoint::VirtualAccounts,
                    "the answer has no virtualAccounts list",
                )
            })?
            .into_iter()
            .map(WireVirtualAccount::into_virtual_account)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(Endpoint::VirtualAccounts, e))
    }

    /// See [`CommerceApi::order`].
    #[tracing::instrument(skip_all, fields(order = %order), err(level = "warn"))]
    pub async fn order(&self, order: &OrderId) -> Result<Order, CommerceError> {
        if let Some(number) = &order.sales_order_number {
            let url = self.url(&["commerce", "v1", "orders", number.as_str()]);
            let body = self
                .call(Endpoint::Order, &|http| http.get(url.clone()))
                .await?;
            let envelope: Envelope = parse(Endpoint::Order, &body)?;
            check_envelope(Endpoint::Order, &envelope)?;
            let wire: WireOrder = parse(Endpoint::Order, &body)?;
            let read = wire.into_order().map_err(|e| invalid(Endpoint::Order, e))?;
            if read.sales_order_number != *number {
                return Err(invalid(
                    Endpoint::Order,
                    format!(
                        "asked for order {number}, the answer is order {}",
                        read.sales_order_number
                    ),
                ));
            }
            return Ok(read);
        }
        let Some(web) = &order.web_order_id else {
            return Err(CommerceError::Permanent {
                code: ErrorCode::OrderNotFound,
                detail: "the order has neither a sales order number nor a web order id".into(),
            });
        };
        let url = self.url(&["commerce", "v1", "orders"]);
        let query = [("webOrderId", web.as_str())];
        let body = self
            .call(Endpoint::OrdersByWebId, &|http| {
                http.get(url.clone()).query(&query)
            })
            .await?;
        let envelope: Envelope = parse(Endpoint::OrdersByWebId, &body)?;
        check_envelope(Endpoint::OrdersByWebId, &envelope)?;
        let list: OrderList = parse(Endpoint::OrdersByWebId, &body)?;
        let orders = list
            .orders
            .ok_or_else(|| invalid(Endpoint::OrdersByWebId, "the answer has no orders list"))?;
        select_order(orders, web)
    }

    /// See [`CommerceApi::assign`].
    #[tracing::instrument(
        skip_all,
        fields(order = %order, account = %assignment.smart_account_domain, idempotency_key = %idempotency_key),
        err(level = "warn")
    )]
    pub async fn assign(
        &self,
        order: &SalesOrderNumber,
        assignment: &Assignment,
        idempotency_key: &str,
    ) -> Result<AssignmentReceipt, CommerceError> {
        let url = self.url(&[
            "commerce",
            "v1",
            "orders",
            order.as_str(),
            "smart-account-assignment",
        ]);
        let body = AssignmentBody {
            smart_account_domain: &assignment.smart_account_domain,
            account_type: assignment.account_type.as_str(),
            virtual_account_name: &assignment.virtual_account_name,
            accept_terms: true,
        };
        let answer = self
            .call(Endpoint::Assign, &|http| {
                http.post(url.clone())
                    .header("Idempotency-Key", idempotency_key)
                    .json(&body)
            })
            .await
            .inspect_err(|e| self.forget_if_stale(assignment, e))?;
        let envelope: Envelope = parse(Endpoint::Assign, &answer)?;
        check_envelope(Endpoint::Assign, &envelope)?;
        let answer: AssignmentAnswer = parse(Endpoint::Assign, &answer)?;
        answer
            .into_receipt()
            .map_err(|e| invalid(Endpoint::Assign, e))
    }

    /// A refusal saying the account or its Virtual Account is not what the
    /// resolve saw drops the cached answers about it: the case resolves
    /// again from fresh reads (the assign call stays the check).
    fn forget_if_stale(&self, assignment: &Assignment, error: &CommerceError) {
        if let (Some(cache), CommerceError::Permanent { code, .. }) = (&self.inner.cache, error)
            && code.says_resolve_is_stale()
        {
            cache.forget_domain(&assignment.smart_account_domain);
        }
    }

    /// The base URL with `segments` appended (each percent-encoded).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.inner.base_url.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// One API call with quick retries; the successful answer's body.
    async fn call(
        &self,
        endpoint: Endpoint,
        request: &(dyn Fn(&reqwest::Client) -> RequestBuilder + Sync),
    ) -> Result<Vec<u8>, CommerceError> {
        self.inner
            .retry
            .run(endpoint.as_str(), || self.attempt(endpoint, request))
            .await
    }

    /// One try: token, request, and on a 401 a new token and the request once more.
    async fn attempt(
        &self,
        endpoint: Endpoint,
        request: &(dyn Fn(&reqwest::Client) -> RequestBuilder + Sync),
    ) -> Result<Vec<u8>, CommerceError> {
        let lease = self.token().await?;
        let answer = self
            .exchange(endpoint, bearer(request(&self.inner.http), &lease))
            .await?;
        if answer.status != StatusCode::UNAUTHORIZED {
            return classify(endpoint, answer);
        }
        tracing::debug!(endpoint = %endpoint, "The API refused the token; fetching a new one.");
        self.inner.tokens.invalidate(lease.generation).await;
        let lease = self.token().await?;
        let answer = self
            .exchange(endpoint, bearer(request(&self.inner.http), &lease))
            .await?;
        if answer.status == StatusCode::UNAUTHORIZED {
            self.inner.tokens.invalidate(lease.generation).await;
            return Err(CommerceError::Transient {
                retry_after: None,
                detail: format!("{endpoint}: HTTP 401 with a freshly issued token"),
            });
        }
        classify(endpoint, answer)
    }

    /// Gets a token (the cached one, or a new one): `Ok` when the token
    /// endpoint accepts the client credentials. A refusal is
    /// `Permanent { code: InvalidCredentials, .. }`; the worker asks once at
    /// start, so that wrong credentials stop it rather than every case.
    pub async fn check_credentials(&self) -> Result<(), CommerceError> {
        self.token().await.map(|_| ())
    }

    async fn token(&self) -> Result<Lease, CommerceError> {
        self.inner.tokens.get(|| self.fetch_token()).await
    }

    /// `POST {token_url}` with the client credentials.
    async fn fetch_token(&self) -> Result<Fresh, CommerceError> {
        let inner = &self.inner;
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", inner.client_id.as_str()),
            ("client_secret", inner.client_secret.expose()),
        ];
        let request = inner.http.post(inner.token_url.clone()).form(&form);
        let answer = self.exchange(Endpoint::Token, request).await?;
        let parsed: TokenAnswer = serde_json::from_slice(&answer.body).unwrap_or_default();
        let status = answer.status;
        if status.is_success() {
            let value = parsed
                .access_token
                .as_deref()
                .filter(|t| !t.is_empty())
                .map(Secret::new)
                .ok_or_else(|| invalid(Endpoint::Token, "the answer has no access_token"))?;
            let lifetime = parsed.lifetime().ok_or_else(|| {
                invalid(
                    Endpoint::Token,
                    "the answer's expires_in is not a number of seconds",
                )
            })?;
            if parsed.states_lifetime() {
                tracing::debug!(lifetime = ?lifetime, "Fetched an access token.");
            } else {
                tracing::warn!(
                    token_url = %inner.token_url,
                    lifetime = ?lifetime,
                    "The token answer has no expires_in; the token is used for the assumed lifetime (a 401 replaces it sooner)."
                );
            }
            return Ok(Fresh { value, lifetime });
        }
        let error = parsed.error.unwrap_or_default();
        if status == StatusCode::UNAUTHORIZED
            || (status == StatusCode::BAD_REQUEST && error == "invalid_client")
        {
            tracing::error!(
                client_id = %inner.client_id,
                token_url = %inner.token_url,
                http_status = status.as_u16(),
                "The token endpoint refused the client credentials; check HOLDCLEAR_COMMERCE_CLIENT_ID and HOLDCLEAR_COMMERCE_CLIENT_SECRET."
            );
            return Err(CommerceError::Permanent {
                code: ErrorCode::InvalidCredentials,
                detail: format!(
                    "the token endpoint refused client id {:?} (HTTP {}{})",
                    inner.client_id,
                    status.as_u16(),
                    if error.is_empty() {
                        String::new()
                    } else {
                        format!(", {}", bounded(&error))
                    }
                ),
            });
        }
        if status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
            || status.is_server_error()
        {
            return Err(CommerceError::Transient {
                retry_after: retry_after(&answer.headers),
                detail: format!("token: HTTP {}", status.as_u16()),
            });
        }
        let code = if error.is_empty() {
            format!("HTTP_{}", status.as_u16())
        } else {
            bounded(&error)
        };
        Err(CommerceError::Permanent {
            code: ErrorCode::Other(code),
            detail: format!("the token endpoint answered HTTP {}", status.as_u16()),
        })
    }

    /// Sends one request under the rate limit and reads its answer; records
    /// the outcome and latency. Transport failures come back classified.
    async fn exchange(
        &self,
        endpoint: Endpoint,
        request: RequestBuilder,
    ) -> Result<Answer, CommerceError> {
        let inner = &self.inner;
        if let Err(left) = inner.limiter.acquire(inner.retry.budget).await {
            return Err(CommerceError::Transient {
                retry_after: Some(left),
                detail: format!("{endpoint}: the server asked to wait (Retry-After)"),
            });
        }
        let started = Instant::now();
        let result = async {
            let response = request.send().await?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = read_body(response).await?;
            Ok::<_, reqwest::Error>((status, headers, body))
        }
        .await;
        metrics::histogram!("holdclear_commerce_call_seconds", "endpoint" => endpoint.as_str())
            .record(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok((status, _, Some(_))) if status.is_success() => "ok",
            Ok((StatusCode::UNAUTHORIZED, _, _)) => "unauthorized",
            Ok((StatusCode::TOO_MANY_REQUESTS, _, _)) => "rate_limited",
            Ok((status, _, Some(_))) if status.is_client_error() => "permanent",
            _ => "transient",
        };
        metrics::counter!("holdclear_commerce_calls_total", "endpoint" => endpoint.as_str(), "outcome" => outcome)
            .increment(1);
        match result {
            Ok((status, headers, Some(body))) => {
                if status == StatusCode::TOO_MANY_REQUESTS
                    && let Some(wait) = retry_after(&headers)
                {
                    inner.limiter.pause_for(wait);
                }
                Ok(Answer {
                    status,
                    headers,
                    body,
                })
            }
            Ok((status, _, None)) => Err(CommerceError::Transient {
                retry_after: None,
                detail: format!(
                    "{endpoint}: HTTP {} with a body larger than {MAX_BODY_BYTES} bytes",
                    status.as_u16()
                ),
            }),
            Err(e) => Err(transport_error(endpoint, &e)),
        }
    }
}

#[async_trait::async_trait]
impl CommerceApi for HttpCommerce {
    async fn find_account(
        &self,
        selector: &AccountSelector,
        account_type: Option<AccountType>,
    ) -> Result<Option<SmartAccount>, CommerceError> {
        HttpCommerce::find_account(self, selector, account_type).await
    }

    async fn virtual_accounts(
        &self,
        domain: &Domain,
    ) -> Result<Vec<VirtualAccount>, CommerceError> {
        HttpCommerce::virtual_accounts(self, domain).await
    }

    async fn fresh_virtual_accounts(
        &self,
        domain: &Domain,
    ) -> Result<Vec<VirtualAccount>, CommerceError> {
        HttpCommerce::fresh_virtual_accounts(self, domain).await
    }

    async fn order(&self, order: &OrderId) -> Result<Order, CommerceError> {
        HttpCommerce::order(self, order).await
    }

    async fn assign(
        &self,
        order: &SalesOrderNumber,
        assignment: &Assignment,
        idempotency_key: &str,
    ) -> Result<AssignmentReceipt, CommerceError> {
        HttpCommerce::assign(self, order, assignment, idempotency_key).await
    }
}

fn bearer(request: RequestBuilder, lease: &Lease) -> RequestBuilder {
    // reqwest marks the header sensitive, so it is never shown in its Debug.
    request.bearer_auth(lease.value.expose())
}

/// The body, or `None` when it is longer than [`MAX_BODY_BYTES`].
async fn read_body(mut response: reqwest::Response) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if response
        .content_length()
        .is_some_and(|n| n > MAX_BODY_BYTES as u64)
    {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// The contract's error table: one place decides transient or permanent.
fn classify(endpoint: Endpoint, answer: Answer) -> Result<Vec<u8>, CommerceError> {
    let status = answer.status;
    if status.is_success() {
        return Ok(answer.body);
    }
    let envelope: Envelope = serde_json::from_slice(&answer.body).unwrap_or_default();
    let code = envelope.error_code.as_deref().filter(|c| !c.is_empty());
    let mut detail = format!("{endpoint}: HTTP {}", status.as_u16());
    if let Some(code) = code {
        detail.push_str(&format!(" {}", bounded(code)));
    }
    match envelope.status_message.as_deref().filter(|m| !m.is_empty()) {
        Some(message) => detail.push_str(&format!(": {}", bounded(message))),
        None if code.is_none() => detail.push_str(" without an error body"),
        None => {}
    }
    if status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
    {
        return Err(CommerceError::Transient {
            retry_after: retry_after(&answer.headers),
            detail,
        });
    }
    let code = match code {
        Some(c) => ErrorCode::from_contract(&bounded(c)),
        None => endpoint.default_code(status),
    };
    Err(CommerceError::Permanent { code, detail })
}

/// A 200 whose envelope says `"status": "ERROR"` is classified by its code.
fn check_envelope(endpoint: Endpoint, envelope: &Envelope) -> Result<(), CommerceError> {
    if !envelope
        .status
        .as_deref()
        .is_some_and(|s| s.eq_ignore_ascii_case("ERROR"))
    {
        return Ok(());
    }
    let code = envelope.error_code.as_deref().unwrap_or("CISCO_ERROR");
    let detail = format!(
        "{endpoint}: status ERROR {}: {}",
        bounded(code),
        bounded(envelope.status_message.as_deref().unwrap_or_default())
    );
    if code == "CISCO_ERROR" {
        return Err(CommerceError::Transient {
            retry_after: None,
            detail,
        });
    }
    Err(CommerceError::Permanent {
        code: ErrorCode::from_contract(code),
        detail,
    })
}

fn parse<T: DeserializeOwned>(endpoint: Endpoint, body: &[u8]) -> Result<T, CommerceError> {
    serde_json::from_slice(body).map_err(|e| {
        invalid(
            endpoint,
            format!("the answer is not the contract's JSON ({e})"),
        )
    })
}

/// An answer that does not follow the contract: worth another try later
/// (a proxy's page, a half-deployed server), bounded by the engine's budget.
fn invalid(endpoint: Endpoint, why: impl fmt::Display) -> CommerceError {
    CommerceError::Transient {
        retry_after: None,
        detail: format!("{endpoint}: {why}"),
    }
}

fn transport_error(endpoint: Endpoint, e: &reqwest::Error) -> CommerceError {
    if e.is_builder() {
        return CommerceError::Permanent {
            code: ErrorCode::Other("INVALID_REQUEST".into()),
            detail: format!("{endpoint}: cannot build the request: {}", chain(e)),
        };
    }
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "transport failure"
    };
    CommerceError::Transient {
        retry_after: None,
        detail: format!("{endpoint}: {what}: {}", chain(e)),
    }
}

/// An error and its sources on one line, without the URL (it adds nothing
/// the endpoint name does not say).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut current = e.source();
    while let Some(source) = current {
        parts.push(source.to_string());
        current = source.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

/// `Retry-After` in seconds (or as an HTTP date), capped.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let raw = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match raw.parse::<f64>() {
        Ok(secs) => Duration::try_from_secs_f64(secs).ok()?,
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(raw).ok()?;
            (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
                .to_std()
                .unwrap_or_default()
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// A server-supplied string cut to a length fit for one history line.
fn bounded(s: &str) -> String {
    if s.chars().count() <= MAX_MESSAGE_CHARS {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(MAX_MESSAGE_CHARS).collect();
    cut.push('…');
    cut
}

/// The account whose selected field equals the query, case-insensitively
/// (the server matches substrings), of the wanted type if one is given.
/// A record listed twice counts once. Several exact matches: the one ACTIVE
/// among them; more than one ACTIVE is `AMBIGUOUS_MATCH` with the
/// candidates in the detail; none ACTIVE, the first (it cannot be assigned
/// either way). An exact match lacking what the choice rests on (its type
/// when one is wanted, its status, its domain) makes the answer unreadable.
fn select_exact(
    accounts: Vec<WireAccount>,
    selector: &AccountSelector,
    account_type: Option<AccountType>,
) -> Result<Option<SmartAccount>, CommerceError> {
    let equals = |have: Option<&str>, want: &str| {
        have.is_some_and(|h| h.trim().to_lowercase() == want.trim().to_lowercase())
    };
    let mut matches: Vec<SmartAccount> = Vec::new();
    for a in accounts {
        let exact = match selector {
            AccountSelector::Domain(d) => a.domain.as_deref().is_some_and(|h| {
                h.trim()
                    .trim_end_matches('.')
                    .eq_ignore_ascii_case(d.as_str())
            }),
            AccountSelector::Name(n) => equals(a.name.as_deref(), n),
            AccountSelector::Email(e) => equals(a.email.as_deref(), e.as_str()),
        };
        if !exact {
            continue;
        }
        if let Some(t) = account_type {
            match a.account_type.as_deref() {
                None => {
                    return Err(invalid(
                        Endpoint::Search,
                        format!("account {} has no type", a.label()),
                    ));
                }
                Some(have) if !equals(Some(have), t.as_str()) => continue,
                Some(_) => {}
            }
        }
        let account = a.into_account().map_err(|e| invalid(Endpoint::Search, e))?;
        if !matches.contains(&account) {
            matches.push(account);
        }
    }
    let active: Vec<&SmartAccount> = matches
        .iter()
        .filter(|a| a.status == AccountStatus::Active)
        .collect();
    match active.as_slice() {
        [] => Ok(matches.into_iter().next()),
        [one] => Ok(Some((*one).clone())),
        several => {
            let shown: Vec<String> = several
                .iter()
                .take(MAX_CANDIDATES_SHOWN)
                .map(|a| format!("{} {} ({})", a.id, a.domain, bounded(&a.name)))
                .collect();
            Err(CommerceError::Permanent {
                code: ErrorCode::AmbiguousMatch,
                detail: format!(
                    "{} ACTIVE accounts match {selector} exactly: {}{}",
                    several.len(),
                    shown.join(", "),
                    more(several.len())
                ),
            })
        }
    }
}

/// The one order of a web order id search whose `webOrderId` equals `web`
/// exactly (the server matches substrings): never another one. No exact
/// match is `ORDER_NOT_FOUND`; several orders (distinct sales order
/// numbers) are `AMBIGUOUS_MATCH` with the candidates in the detail.
fn select_order(orders: Vec<WireOrder>, web: &WebOrderId) -> Result<Order, CommerceError> {
    let answered = orders.len();
    let mut exact: Vec<WireOrder> = orders
        .into_iter()
        .filter(|o| o.web_order_id().as_deref() == Some(web.as_str()))
        .collect();
    let mut numbers = Vec::with_capacity(exact.len());
    for o in &exact {
        let Some(n) = o.number() else {
            return Err(invalid(
                Endpoint::OrdersByWebId,
                format!("an order with web order id {web} has no salesOrderNumber"),
            ));
        };
        if !numbers.contains(&n) {
            numbers.push(n);
        }
    }
    match numbers.len() {
        0 => Err(CommerceError::Permanent {
            code: ErrorCode::OrderNotFound,
            detail: if answered == 0 {
                format!("no order with web order id {web}")
            } else {
                format!(
                    "no order with web order id {web} exactly (the search answered {answered} order(s) whose web order id only contains it)"
                )
            },
        }),
        1 => exact
            .swap_remove(0)
            .into_order()
            .map_err(|e| invalid(Endpoint::OrdersByWebId, e)),
        n => {
            let shown: Vec<String> = numbers
                .iter()
                .take(MAX_CANDIDATES_SHOWN)
                .map(|n| bounded(n))
                .collect();
            Err(CommerceError::Permanent {
                code: ErrorCode::AmbiguousMatch,
                detail: format!(
                    "{n} orders have web order id {web}: sales orders {}{}",
                    shown.join(", "),
                    more(n)
                ),
            })
        }
    }
}

/// ", and N more" for a list cut at [`MAX_CANDIDATES_SHOWN`].
fn more(total: usize) -> String {
    match total.checked_sub(MAX_CANDIDATES_SHOWN) {
        Some(left) if left > 0 => format!(", and {left} more"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Email;

    fn account(
        domain: &str,
        name: &str,
        email: &str,
        account_type: &str,
        status: &str,
    ) -> WireAccount {
        WireAccount {
            id: Some(serde_json::Value::String(format!("SA-{domain}"))),
            domain: Some(domain.into()),
            name: Some(name.into()),
            email: Some(email.into()),
            account_type: Some(account_type.into()),
            status: Some(status.into()),
        }
    }

    fn accounts() -> Vec<WireAccount> {
        vec![
            account(
                "notacme.com",
                "Not Acme",
                "it@notacme.com",
                "CUSTOMER",
                "ACTIVE",
            ),
            account("acme.com", "Acme Corp", "it@acme.com", "CUSTOMER", "ACTIVE"),
            account(
                "acme.com.au",
                "Acme Corp Australia",
                "it@acme.com.au",
                "CUSTOMER",
                "ACTIVE",
            ),
            account(
                "globex-holding.com",
                "Globex Holding",
                "it@globex-holding.com",
                "HOLDING",
                "ACTIVE",
            ),
            account("twin.com", "Twin", "it@twin.com", "CUSTOMER", "PENDING"),
            account("twin.com", "Twin", "it@twin.com", "CUSTOMER", "ACTIVE"),
        ]
    }

    /// What a selection should come to: the chosen account's domain (or
    /// order's number) and status, not found, or an error's code (`None`:
    /// transient) and a needle of its detail.
    #[derive(Debug)]
    enum Want {
        Found(&'static str, &'static str),
        NotFound,
        Error(Option<ErrorCode>, &'static str),
    }

    /// Checks a selection's result against `want`; `show` names what was found.
    fn check<T>(
        what: &str,
        got: Result<Option<T>, CommerceError>,
        show: impl Fn(&T) -> (String, String),
        want: &Want,
    ) {
        let ok = match (&got, want) {
            (Ok(Some(found)), Want::Found(a, b)) => {
                show(found) == ((*a).to_owned(), (*b).to_owned())
            }
            (Ok(None), Want::NotFound) => true,
            (Err(CommerceError::Permanent { code, detail }), Want::Error(Some(c), needle)) => {
                code == c && detail.contains(needle)
            }
            (Err(CommerceError::Transient { detail, .. }), Want::Error(None, needle)) => {
                detail.contains(needle)
            }
            _ => false,
        };
        let got = got.map(|o| o.as_ref().map(&show));
        assert!(ok, "{what}: got {got:?}, wanted {want:?}");
    }

    #[test]
    fn exact_selection_table() {
        use Want::{Error, Found as Account, NotFound};
        let domain = |d: &str| AccountSelector::Domain(Domain::parse(d).unwrap());
        let name = |n: &str| AccountSelector::Name(n.into());
        let email = |e: &str| AccountSelector::Email(Email::parse(e).unwrap());
        let ambiguous = |needle| Error(Some(ErrorCode::AmbiguousMatch), needle);
        let unreadable = |needle| Error(None, needle);
        let mut no_status = account(
            "nostatus.com",
            "No Status",
            "it@nostatus.com",
            "CUSTOMER",
            "",
        );
        no_status.status = None;
        let mut no_type = account("notype.com", "No Type", "it@notype.com", "", "ACTIVE");
        no_type.account_type = None;
        let mut no_domain = account("", "No Domain", "it@nodomain.com", "CUSTOMER", "ACTIVE");
        no_domain.domain = None;
        let mut extra = vec![
            no_status,
            no_type,
            no_domain,
            account("dup.com", "Dup", "it@dup.com", "CUSTOMER", "ACTIVE"),
            account("dup.com", "Dup", "it@dup.com", "CUSTOMER", "ACTIVE"),
            account(
                "shared.com",
                "Shared",
                "it@shared.com",
                "CUSTOMER",
                "ACTIVE",
            ),
            account(
                "shared-eu.com",
                "Shared",
                "it@shared.com",
                "CUSTOMER",
                "ACTIVE",
            ),
            account(
                "shared-old.com",
                "Shared",
                "it@shared.com",
                "CUSTOMER",
                "INACTIVE",
            ),
            account(
                "pending-a.com",
                "Pending Twins",
                "x@p.com",
                "CUSTOMER",
                "PENDING",
            ),
            account(
                "pending-b.com",
                "Pending Twins",
                "x@p.com",
                "CUSTOMER",
                "INACTIVE",
            ),
            account(
                "holder.com",
                "Both Kinds",
                "x@holder.com",
                "CUSTOMER",
                "ACTIVE",
            ),
            account(
                "holder-h.com",
                "Both Kinds",
                "x@holder.com",
                "HOLDING",
                "ACTIVE",
            ),
            account(
                "Dotted.COM.",
                "Dotted",
                "it@dotted.com",
                "CUSTOMER",
                "ACTIVE",
            ),
            account(
                "dotted.com",
                "Dotted Again",
                "it@dotted.com",
                "CUSTOMER",
                "ACTIVE",
            ),
        ];
        let cases: Vec<(AccountSelector, Option<AccountType>, Want)> = vec![
            (domain("acme.com"), None, Account("acme.com", "ACTIVE")),
            (
                domain("ACME.com"),
                Some(AccountType::Customer),
                Account("acme.com", "ACTIVE"),
            ),
            (domain("acme.com"), Some(AccountType::Holding), NotFound),
            (domain("acme"), None, NotFound),
            (domain("cme.com"), None, NotFound),
            (name("acme corp"), None, Account("acme.com", "ACTIVE")),
            (name(" ACME CORP "), None, Account("acme.com", "ACTIVE")),
            (name("Acme"), None, NotFound),
            (email("IT@acme.com"), None, Account("acme.com", "ACTIVE")),
            (email("it@acme.co"), None, NotFound),
            (
                domain("globex-holding.com"),
                Some(AccountType::Holding),
                Account("globex-holding.com", "ACTIVE"),
            ),
            // One ACTIVE and one PENDING record: the ACTIVE one.
            (domain("twin.com"), None, Account("twin.com", "ACTIVE")),
            // Two ACTIVE exact matches: never the first of them.
            (
                name("shared"),
                None,
                ambiguous(
                    "2 ACTIVE accounts match name \"shared\" exactly: SA-shared.com shared.com (Shared), SA-shared-eu.com",
                ),
            ),
            (
                email("it@shared.com"),
                Some(AccountType::Customer),
                ambiguous("SA-shared-eu.com"),
            ),
            (domain("dotted.com"), None, ambiguous("SA-Dotted.COM.")),
            (name("both kinds"), None, ambiguous("holder-h.com")),
            (
                name("both kinds"),
                Some(AccountType::Holding),
                Account("holder-h.com", "ACTIVE"),
            ),
            // The same record twice is one account.
            (domain("dup.com"), None, Account("dup.com", "ACTIVE")),
            // None ACTIVE: one of them, which the engine will not assign.
            (
                name("pending twins"),
                None,
                Account("pending-a.com", "PENDING"),
            ),
            // An exact match that does not say what decides.
            (domain("nostatus.com"), None, unreadable("has no status")),
            (
                domain("notype.com"),
                Some(AccountType::Customer),
                unreadable("has no type"),
            ),
            (domain("notype.com"), None, Account("notype.com", "ACTIVE")),
            (name("no domain"), None, unreadable("has no domain")),
            // ... but a record that is not an exact match does not matter.
            (name("no"), None, NotFound),
        ];
        let mut all = accounts();
        all.append(&mut extra);
        for (selector, account_type, want) in cases {
            check(
                &format!("{selector} {account_type:?}"),
                select_exact(all.clone(), &selector, account_type),
                |a| (a.domain.clone(), a.status.as_str().to_owned()),
                &want,
            );
        }
    }

    #[test]
    fn web_order_selection_table() {
        use Want::{Error, Found};
        let order = |so: Option<&str>, web: Option<serde_json::Value>, holds: bool| {
            let mut v = serde_json::json!({"status": "BOOKED"});
            if let Some(so) = so {
                v["salesOrderNumber"] = so.into();
            }
            if let Some(web) = web {
                v["webOrderId"] = web;
            }
            if holds {
                v["holds"] =
                    serde_json::json!([{"code": "SMART_ACCOUNT_HOLD", "releasedAt": null}]);
            }
            serde_json::from_value::<WireOrder>(v).unwrap()
        };
        let w = |s: &str| Some(serde_json::Value::String(s.into()));
        let list = || {
            vec![
                order(Some("100"), w("98765432"), true),
                order(Some("101"), w("198765432"), true),
                order(Some("102"), Some(serde_json::json!(55501)), true),
                order(Some("103"), w("TWIN"), true),
                order(Some("104"), w("TWIN"), true),
                order(Some("105"), w("SAME"), true),
                order(Some("105"), w("SAME"), true),
                order(Some("106"), w("BARE"), false),
                order(None, w("NONUMBER"), true),
                order(Some("107"), None, true),
            ]
        };
        let not_found = |needle| Error(Some(ErrorCode::OrderNotFound), needle);
        let cases: Vec<(&str, Vec<WireOrder>, Want)> = vec![
            ("98765432", list(), Found("100", "BOOKED")),
            ("198765432", list(), Found("101", "BOOKED")),
            ("55501", list(), Found("102", "BOOKED")),
            // Only inside other orders' web order ids: never one of them.
            (
                "8765432",
                list(),
                not_found("answered 10 order(s) whose web order id only contains it"),
            ),
            (
                "9876543",
                vec![order(Some("100"), w("98765432"), true)],
                not_found("only contains it"),
            ),
            ("twin", list(), not_found("")),
            ("1", vec![], not_found("no order with web order id 1")),
            (
                "TWIN",
                list(),
                Error(
                    Some(ErrorCode::AmbiguousMatch),
                    "2 orders have web order id TWIN: sales orders 103, 104",
                ),
            ),
            ("SAME", list(), Found("105", "BOOKED")),
            ("BARE", list(), Error(None, "no holds")),
            ("NONUMBER", list(), Error(None, "has no salesOrderNumber")),
        ];
        for (web, orders, want) in cases {
            check(
                web,
                select_order(orders, &WebOrderId::parse(web).unwrap()).map(Some),
                |o| (o.sales_order_number.to_string(), o.status.clone()),
                &want,
            );
        }
    }

    fn answer(status: u16, body: &str, retry: Option<&str>) -> Answer {
        let mut headers = HeaderMap::new();
        if let Some(r) = retry {
            headers.insert(RETRY_AFTER, r.parse().unwrap());
        }
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn classification_table() {
        let err = |code: &str, msg: &str| {
            format!(r#"{{"status":"ERROR","errorCode":"{code}","statusMessage":"{msg}"}}"#)
        };
        let permanent = |code: ErrorCode| Some(code);
        /// Endpoint, status, body, Retry-After; wanted permanent code (or transient) and wait.
        type Case = (
            Endpoint,
            u16,
            String,
            Option<&'static str>,
            Option<ErrorCode>,
            Option<Duration>,
        );
        let cases: Vec<Case> = vec![
            (
                Endpoint::Assign,
                400,
                err("TNC_ERROR", "terms"),
                None,
                permanent(ErrorCode::TncError),
                None,
            ),
            (
                Endpoint::Assign,
                400,
                err("BIZ_RULE_FAIL_ERROR", "rule"),
                None,
                permanent(ErrorCode::BizRuleFail),
                None,
            ),
            (
                Endpoint::Order,
                403,
                err("ORDER_ACCESS_DENIED", "no"),
                None,
                permanent(ErrorCode::OrderAccessDenied),
                None,
            ),
            (
                Endpoint::Order,
                403,
                String::new(),
                None,
                permanent(ErrorCode::OrderAccessDenied),
                None,
            ),
            (
                Endpoint::Order,
                404,
                String::new(),
                None,
                permanent(ErrorCode::OrderNotFound),
                None,
            ),
            (
                Endpoint::VirtualAccounts,
                404,
                String::new(),
                None,
                permanent(ErrorCode::SmartAccountNotFound),
                None,
            ),
            (
                Endpoint::Search,
                404,
                String::new(),
                None,
                permanent(ErrorCode::Other("HTTP_404".into())),
                None,
            ),
            (
                Endpoint::Assign,
                409,
                err("ASSIGNMENT_LOCKED", "shipped"),
                None,
                permanent(ErrorCode::AssignmentLocked),
                None,
            ),
            (
                Endpoint::Assign,
                422,
                err("SMART_ACCOUNT_NOT_ACTIVE", "pending"),
                None,
                permanent(ErrorCode::SmartAccountNotActive),
                None,
            ),
            (
                Endpoint::Assign,
                422,
                err("VIRTUAL_ACCOUNT_NOT_FOUND", "va"),
                None,
                permanent(ErrorCode::VirtualAccountNotFound),
                None,
            ),
            (
                Endpoint::Search,
                418,
                String::new(),
                None,
                permanent(ErrorCode::Other("HTTP_418".into())),
                None,
            ),
            (
                Endpoint::Search,
                429,
                String::new(),
                Some("3"),
                None,
                Some(Duration::from_secs(3)),
            ),
            (
                Endpoint::Order,
                503,
                err("CISCO_ERROR", "down"),
                None,
                None,
                None,
            ),
            (
                Endpoint::Order,
                502,
                "<html>Bad Gateway</html>".into(),
                None,
                None,
                None,
            ),
            (
                Endpoint::Order,
                504,
                String::new(),
                Some("soon"),
                None,
                None,
            ),
        ];
        for (endpoint, status, body, retry, want_code, want_wait) in cases {
            let got = classify(endpoint, answer(status, &body, retry)).unwrap_err();
            match (got, want_code) {
                (CommerceError::Permanent { code, .. }, Some(want)) => {
                    assert_eq!(code, want, "{status} {body}")
                }
                (CommerceError::Transient { retry_after, .. }, None) => {
                    assert_eq!(retry_after, want_wait, "{status} {body}")
                }
                (got, want) => panic!("{status} {body}: got {got:?}, wanted {want:?}"),
            }
        }
        assert_eq!(
            classify(Endpoint::Order, answer(200, "{}", None)).unwrap(),
            b"{}"
        );
    }

    #[test]
    fn a_200_with_status_error_is_classified() {
        let env = |code: &str| Envelope {
            status: Some("ERROR".into()),
            error_code: Some(code.into()),
            status_message: Some("x".into()),
        };
        assert!(matches!(
            check_envelope(Endpoint::Search, &env("SMART_ACCOUNT_NOT_FOUND")),
            Err(CommerceError::Permanent {
                code: ErrorCode::SmartAccountNotFound,
                ..
            })
        ));
        assert!(matches!(
            check_envelope(Endpoint::Search, &env("CISCO_ERROR")),
            Err(CommerceError::Transient { .. })
        ));
        assert!(check_envelope(Endpoint::Search, &Envelope::default()).is_ok());
    }

    #[test]
    fn long_server_messages_are_cut() {
        let long = "x".repeat(1000);
        assert_eq!(bounded(&long).chars().count(), MAX_MESSAGE_CHARS + 1);
        assert_eq!(bounded("short"), "short");
    }
}
