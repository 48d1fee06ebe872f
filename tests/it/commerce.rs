//! The commerce client against the simulator over real HTTP (every
//! endpoint, every error class, tokens, rate limit, idempotency), the
//! simulator against the contract's JSON, and `holdclear sim` as a process.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use holdclear::commerce::{
    AccountStatus, Assignment, CommerceApi, CommerceError, ErrorCode, HttpCommerce, VirtualAccount,
    choose_virtual_account,
};
use holdclear::config::{DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, Secret};
use holdclear::domain::{
    AccountSelector, AccountType, Domain, Email, OrderId, SalesOrderNumber, VirtualAccountChoice,
    WebOrderId,
};
use holdclear::sim::{
    EndpointFaults, Forced, HoldsField, OrderSpec, Scenario, SimEndpoint, SimHandle, SimStats,
};
use serde_json::{Value, json};

use crate::support::sim::{client, raw_http, settings, start, start_demo, stats_over_http};
use crate::support::{bin, wait_for};

fn so(n: &str) -> SalesOrderNumber {
    SalesOrderNumber::parse(n).unwrap()
}

fn by_number(n: &str) -> OrderId {
    OrderId::new(Some(so(n)), None).unwrap()
}

fn by_web(w: &str) -> OrderId {
    OrderId::new(None, Some(WebOrderId::parse(w).unwrap())).unwrap()
}

fn domain(d: &str) -> AccountSelector {
    AccountSelector::Domain(Domain::parse(d).unwrap())
}

fn assignment(domain: &str, account_type: AccountType, va: &str) -> Assignment {
    Assignment {
        smart_account_domain: domain.into(),
        account_type,
        virtual_account_name: va.into(),
    }
}

fn acme() -> Assignment {
    assignment("acme.com", AccountType::Customer, "DEFAULT")
}

/// The permanent code of an error, or `None` for a transient one.
fn permanent_code(e: &CommerceError) -> Option<ErrorCode> {
    match e {
        CommerceError::Permanent { code, .. } => Some(code.clone()),
        CommerceError::Transient { .. } => None,
    }
}

fn transient(e: &CommerceError) -> (Option<Duration>, &str) {
    match e {
        CommerceError::Transient {
            retry_after,
            detail,
        } => (*retry_after, detail.as_str()),
        other => panic!("expected a transient error, got {other:?}"),
    }
}

// ------------------------------------------------------------------ client

#[tokio::test]
async fn finds_the_exact_account_among_substring_matches() {
    let sim = start_demo().await;
    let api = client(&sim);

    let acme = api
        .find_account(&domain("acme.com"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            acme.id.as_str(),
            acme.name.as_str(),
            acme.account_type.as_str()
        ),
        ("SA-100231", "Acme Corp", "CUSTOMER")
    );
    assert_eq!(acme.status, AccountStatus::Active);

    let name = |n: &str| AccountSelector::Name(n.into());
    let email = |e: &str| AccountSelector::Email(Email::parse(e).unwrap());
    let cases = [
        (
            domain("ACME.com"),
            None,
            Some(("acme.com", AccountStatus::Active)),
        ),
        (
            domain("acme.com"),
            Some(AccountType::Customer),
            Some(("acme.com", AccountStatus::Active)),
        ),
        (domain("acme.com"), Some(AccountType::Holding), None),
        (domain("cme.com"), None, None),
        (
            name("acme corp"),
            None,
            Some(("acme.com", AccountStatus::Active)),
        ),
        (name("Acme"), None, None),
        (
            email("LICENSING@acme.com"),
            None,
            Some(("acme.com", AccountStatus::Active)),
        ),
        (email("licensing@acme.co"), None, None),
        (
            domain("globex-holding.com"),
            Some(AccountType::Holding),
            Some(("globex-holding.com", AccountStatus::Active)),
        ),
        (
            domain("initech.com"),
            None,
            Some(("initech.com", AccountStatus::Pending)),
        ),
        (
            domain("hooli.com"),
            None,
            Some(("hooli.com", AccountStatus::Inactive)),
        ),
        (domain("nobody.example"), None, None),
    ];
    for (selector, account_type, want) in cases {
        let got = api.find_account(&selector, account_type).await.unwrap();
        let got = got.map(|a| (a.domain, a.status));
        let want = want.map(|(d, s)| (d.to_owned(), s));
        assert_eq!(got, want, "{selector} {account_type:?}");
    }
    // The server did answer with the decoy: the client chose.
    assert!(sim.stats().calls(SimEndpoint::Search) >= 13);
}

#[tokio::test]
async fn reads_virtual_accounts_with_their_flags() {
    let sim = start_demo().await;
    let api = client(&sim);
    let vas = api
        .virtual_accounts(&Domain::parse("acme.com").unwrap())
        .await
        .unwrap();
    assert_eq!(
        vas,
        [
            VirtualAccount {
                name: "DEFAULT".into(),
                is_default: true,
                public: true
            },
            VirtualAccount {
                name: "Network".into(),
                is_default: false,
                public: false
            },
        ]
    );
    let pick = |c: VirtualAccountChoice| choose_virtual_account(&vas, &c).map(|v| v.name.clone());
    assert_eq!(
        pick(VirtualAccountChoice::AccountDefault).as_deref(),
        Some("DEFAULT")
    );
    assert_eq!(
        pick(VirtualAccountChoice::Named("Network".into())),
        None,
        "PRIVATE"
    );

    let err = api
        .virtual_accounts(&Domain::parse("nobody.example").unwrap())
        .await
        .unwrap_err();
    assert_eq!(
        permanent_code(&err),
        Some(ErrorCode::SmartAccountNotFound),
        "{err}"
    );
}

#[tokio::test]
async fn reads_orders_by_number_and_by_web_order_id() {
    let sim = start_demo().await;
    let api = client(&sim);

    let order = api.order(&by_number("104233871")).await.unwrap();
    assert_eq!(order.web_order_id.as_deref(), Some("98765432"));
    assert_eq!(order.status, "BOOKED");
    assert!(!order.smart_account_hold_released());
    assert_eq!(order.other_holds(), ["CREDIT_HOLD"]);
    assert!(order.holds.iter().all(|h| h.applied_at.is_some()));
    assert_eq!(order.smart_account_domain, None);

    let same = api.order(&by_web("98765432")).await.unwrap();
    assert_eq!(same.sales_order_number, so("104233871"));

    let pending = api.order(&by_number("104233872")).await.unwrap();
    assert_eq!(pending.smart_account_domain.as_deref(), Some("initech.com"));
    assert_eq!(pending.smart_account_status.as_deref(), Some("PENDING"));
    assert_eq!(pending.virtual_account_name.as_deref(), Some("DEFAULT"));

    // Any other number is created on the fly, held.
    let fresh = api.order(&by_number("777000111")).await.unwrap();
    assert!(!fresh.smart_account_hold_released());
    assert!(fresh.other_holds().is_empty());

    let cases = [
        (by_number("104233874"), ErrorCode::OrderAccessDenied),
        (by_number("104233875"), ErrorCode::OrderNotFound),
        (by_web("98765475"), ErrorCode::OrderNotFound),
    ];
    for (id, code) in cases {
        let err = api.order(&id).await.unwrap_err();
        assert_eq!(permanent_code(&err), Some(code), "{id}: {err}");
    }

    // Without creation on the fly, unknown orders are not found either way.
    let mut strict = Scenario::demo().unwrap();
    strict.defaults.create_unknown = false;
    sim.reset(strict).unwrap();
    for id in [by_number("777000112"), by_web("55555")] {
        let err = api.order(&id).await.unwrap_err();
        assert_eq!(
            permanent_code(&err),
            Some(ErrorCode::OrderNotFound),
            "{id}: {err}"
        );
    }
}

#[tokio::test]
async fn only_an_exact_web_order_id_is_the_order() {
    let mut scenario = Scenario::demo().unwrap();
    scenario.defaults.create_unknown = false;
    scenario.orders.push(OrderSpec {
        sales_order_number: "500070".into(),
        web_order_id: Some("98765433".into()),
        ..OrderSpec::default()
    });
    let sim = start(scenario).await;
    let api = client(&sim);
    // "9876543" is inside 98765432 and 98765433, and no order carries it exactly.
    let err = api.order(&by_web("9876543")).await.unwrap_err();
    assert_eq!(
        permanent_code(&err),
        Some(ErrorCode::OrderNotFound),
        "{err}"
    );
    // 98765432 is one order's exactly (and inside no other's).
    let order = api.order(&by_web("98765432")).await.unwrap();
    assert_eq!(order.sales_order_number, so("104233871"));
    // 98765433 is carried by two orders.
    let err = api.order(&by_web("98765433")).await.unwrap_err();
    let code = permanent_code(&err);
    assert_eq!(
        code.as_ref().map(ErrorCode::as_str),
        Some("AMBIGUOUS_MATCH"),
        "{err}"
    );
    let detail = err.to_string();
    assert!(
        detail.contains("104233872") && detail.contains("500070"),
        "{detail}"
    );
}

#[tokio::test]
async fn an_order_answer_without_holds_is_unreadable_not_released() {
    let mut scenario = Scenario::demo().unwrap();
    scenario.orders.push(OrderSpec {
        sales_order_number: "500071".into(),
        web_order_id: Some("W500071".into()),
        holds_field: Some(HoldsField::Missing),
        ..OrderSpec::default()
    });
    scenario.orders.push(OrderSpec {
        sales_order_number: "500072".into(),
        holds_field: Some(HoldsField::Null),
        ..OrderSpec::default()
    });
    let sim = start(scenario).await;
    let api = client(&sim);
    for id in [by_number("500071"), by_web("W500071"), by_number("500072")] {
        let err = api.order(&id).await.unwrap_err();
        let (_, detail) = transient(&err);
        assert!(detail.contains("holds"), "{id}: {detail}");
    }
}

#[tokio::test]
async fn two_active_accounts_matching_exactly_are_ambiguous() {
    let sim = start_demo().await;
    let api = client(&sim);
    let name = AccountSelector::Name("umbrella corporation".into());
    let email = AccountSelector::Email(Email::parse("Licensing@Umbrella.com").unwrap());
    for selector in [name, email] {
        let err = api
            .find_account(&selector, Some(AccountType::Customer))
            .await
            .unwrap_err();
        let code = permanent_code(&err);
        assert_eq!(
            code.as_ref().map(ErrorCode::as_str),
            Some("AMBIGUOUS_MATCH"),
            "{selector}: {err}"
        );
        let detail = err.to_string();
        assert!(
            detail.contains("SA-300001") && detail.contains("SA-300002"),
            "{detail}"
        );
    }
    // By domain, each is one account.
    let one = api
        .find_account(&domain("umbrella.com"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(one.id, "SA-300001");
}

#[tokio::test]
async fn the_harder_shapes_of_the_contract_are_read() {
    let mut scenario = Scenario::demo().unwrap();
    scenario.extra_fields = true;
    scenario.omit_expires_in = true;
    let sim = start(scenario).await;
    let api = client(&sim);
    let account = api
        .find_account(&domain("acme.com"), Some(AccountType::Customer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(account.id, "SA-100231");
    let vas = api
        .virtual_accounts(&Domain::parse("acme.com").unwrap())
        .await
        .unwrap();
    assert_eq!(vas.len(), 2);
    let order = api.order(&by_web("98765432")).await.unwrap();
    assert_eq!(order.smart_account_domain, None, "smartAccount: null");
    assert_eq!(order.virtual_account_name, None, "virtualAccount: null");
    let receipt = api
        .assign(&so("104233871"), &acme(), "extra-fields")
        .await
        .unwrap();
    assert_eq!(receipt.status, "SUBMITTED");
    // Without expires_in the token is reused, not fetched for every call.
    for _ in 0..5 {
        api.order(&by_number("104233871")).await.unwrap();
    }
    assert_eq!(sim.stats().tokens_issued, 1);

    // A 5xx without any body is transient, like any other.
    sim.script(SimEndpoint::Order, &[Forced::EmptyServerError; 3]);
    let err = api.order(&by_number("104233871")).await.unwrap_err();
    let (_, detail) = transient(&err);
    assert!(
        detail.contains("503") && detail.contains("without an error body"),
        "{detail}"
    );
}

#[tokio::test]
async fn a_token_without_expires_in_does_not_live_forever() {
    let mut scenario = Scenario::demo().unwrap();
    scenario.omit_expires_in = true;
    scenario.token_ttl = Duration::from_secs(1);
    let sim = start(scenario).await;
    let mut s = settings(&sim);
    s.rate_limit = 50.0;
    let api = HttpCommerce::new(&s).unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        api.order(&by_number("104233871"))
            .await
            .expect("a 401 after the real expiry fetches a new token and repeats the call");
    }
    let stats = sim.stats();
    assert!(
        (2..=4).contains(&stats.tokens_issued),
        "one token per real lifetime, not one per call: {stats:?}"
    );
}

#[tokio::test]
async fn an_accepted_assignment_releases_the_hold_and_shows_on_the_order() {
    let sim = start_demo().await;
    let api = client(&sim);
    let receipt = api
        .assign(&so("104233871"), &acme(), "case-1:acme.com:DEFAULT")
        .await
        .unwrap();
    assert!(receipt.assignment_id.starts_with("ASG-"), "{receipt:?}");
    assert_eq!(receipt.status, "SUBMITTED");

    // The seeded order releases on the second read after the assignment.
    let first = api.order(&by_number("104233871")).await.unwrap();
    assert!(!first.smart_account_hold_released());
    let second = api.order(&by_number("104233871")).await.unwrap();
    assert!(second.smart_account_hold_released());
    assert!(second.smart_account_hold_released_at().is_some());
    assert_eq!(second.other_holds(), ["CREDIT_HOLD"]);
    assert_eq!(second.smart_account_domain.as_deref(), Some("acme.com"));
    assert_eq!(second.smart_account_status.as_deref(), Some("ACTIVE"));
    assert_eq!(second.virtual_account_name.as_deref(), Some("DEFAULT"));

    let stats = sim.stats();
    assert_eq!(stats.assignments_of("104233871"), 1);
    assert_eq!(stats.holds_released, 1);

    // An order that never releases stays held however often it is read.
    api.assign(&so("104233873"), &acme(), "case-2")
        .await
        .unwrap();
    for _ in 0..5 {
        assert!(
            !api.order(&by_number("104233873"))
                .await
                .unwrap()
                .smart_account_hold_released()
        );
    }
}

#[tokio::test]
async fn every_refusal_is_permanent_with_its_code_and_not_retried() {
    let sim = start_demo().await;
    let api = client(&sim);
    let customer = AccountType::Customer;
    let cases = [
        (
            "104233874",
            assignment("acme.com", customer, "DEFAULT"),
            ErrorCode::OrderAccessDenied,
        ),
        (
            "104233875",
            assignment("acme.com", customer, "DEFAULT"),
            ErrorCode::OrderNotFound,
        ),
        (
            "104233876",
            assignment("acme.com", customer, "DEFAULT"),
            ErrorCode::AssignmentLocked,
        ),
        (
            "104233877",
            assignment("acme.com", customer, "DEFAULT"),
            ErrorCode::AssignmentLocked,
        ),
        (
            "104233878",
            assignment("acme.com", customer, "DEFAULT"),
            ErrorCode::AssignmentLocked,
        ),
        (
            "880000001",
            assignment("initech.com", customer, "DEFAULT"),
            ErrorCode::SmartAccountNotActive,
        ),
        (
            "880000002",
            assignment("hooli.com", customer, "DEFAULT"),
            ErrorCode::SmartAccountNotActive,
        ),
        (
            "880000003",
            assignment("acme.com", customer, "Network"),
            ErrorCode::VirtualAccountNotFound,
        ),
        (
            "880000004",
            assignment("acme.com", customer, "Missing"),
            ErrorCode::VirtualAccountNotFound,
        ),
        (
            "880000005",
            assignment("nobody.example", customer, "DEFAULT"),
            ErrorCode::SmartAccountNotFound,
        ),
        (
            "880000006",
            assignment("globex-holding.com", customer, "Holding"),
            ErrorCode::BizRuleFail,
        ),
    ];
    for (i, (order, what, code)) in cases.iter().enumerate() {
        let err = api
            .assign(&so(order), what, &format!("refusal-{i}"))
            .await
            .unwrap_err();
        assert_eq!(
            permanent_code(&err).as_ref(),
            Some(code),
            "{order} {what:?}: {err}"
        );
    }
    let stats = sim.stats();
    assert_eq!(
        stats.calls(SimEndpoint::Assign),
        cases.len() as u64,
        "one request each: no retries"
    );
    assert_eq!(stats.total_assignments(), 0);
}

#[tokio::test]
async fn unexpected_client_errors_are_permanent_other() {
    let sim = start_demo().await;
    let api = client(&sim);
    let err = api.assign(&so("880000010"), &acme(), "").await.unwrap_err();
    assert_eq!(
        permanent_code(&err),
        Some(ErrorCode::Other("IDEMPOTENCY_KEY_REQUIRED".into())),
        "{err}"
    );

    let mut elsewhere = settings(&sim);
    elsewhere.base_url = format!("{}/elsewhere/", sim.base_url()).parse().unwrap();
    let lost = HttpCommerce::new(&elsewhere).unwrap();
    let err = lost
        .find_account(&domain("acme.com"), None)
        .await
        .unwrap_err();
    assert_eq!(
        permanent_code(&err),
        Some(ErrorCode::Other("NOT_FOUND".into())),
        "{err}"
    );
    assert_eq!(sim.stats().calls(SimEndpoint::Search), 0);
}

#[tokio::test]
async fn server_errors_are_retried_quickly_then_reported_transient() {
    let sim = start_demo().await;
    let api = client(&sim);
    sim.script(
        SimEndpoint::Order,
        &[Forced::ServerError, Forced::BareServerError],
    );
    let order = api.order(&by_number("104233871")).await.unwrap();
    assert_eq!(order.sales_order_number, so("104233871"));
    let stats = sim.stats();
    assert_eq!(stats.calls(SimEndpoint::Order), 3);
    assert_eq!(
        [503, 502, 200].map(|s| stats.responses(SimEndpoint::Order, s)),
        [1, 1, 1]
    );

    sim.script(SimEndpoint::Order, &[Forced::BareServerError; 3]);
    let err = api.order(&by_number("104233871")).await.unwrap_err();
    let (retry_after, detail) = transient(&err);
    assert_eq!(retry_after, None);
    assert!(
        detail.contains("502") && detail.contains("without an error body"),
        "{detail}"
    );
    assert_eq!(
        sim.stats().calls(SimEndpoint::Order),
        6,
        "three attempts in all"
    );

    sim.script(SimEndpoint::Assign, &[Forced::ServerError; 3]);
    let err = api
        .assign(&so("880000020"), &acme(), "k")
        .await
        .unwrap_err();
    assert!(transient(&err).1.contains("CISCO_ERROR"), "{err}");
}

#[tokio::test]
async fn a_timeout_is_transient() {
    let sim = start_demo().await;
    sim.set_faults(
        SimEndpoint::Order,
        EndpointFaults {
            hang: Duration::from_secs(20),
            script: vec![
                Forced::Timeout,
                Forced::Timeout,
                Forced::Timeout,
                Forced::Timeout,
            ],
            ..EndpointFaults::default()
        },
    );
    let mut s = settings(&sim);
    s.request_timeout = Duration::from_millis(300);
    let api = HttpCommerce::new(&s).unwrap();
    let started = Instant::now();
    let err = api.order(&by_number("104233871")).await.unwrap_err();
    assert!(transient(&err).1.contains("timed out"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(sim.stats().calls(SimEndpoint::Order), 3);
    // One more hang, then the quick retry gets through.
    api.order(&by_number("104233871")).await.unwrap();
}

#[tokio::test]
async fn connection_refused_is_transient() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sim = start_demo().await;
    let mut s = settings(&sim);
    s.base_url = format!("http://127.0.0.1:{port}").parse().unwrap();
    s.token_url = format!("http://127.0.0.1:{port}/oauth2/default/v1/token")
        .parse()
        .unwrap();
    let api = HttpCommerce::new(&s).unwrap();
    let err = api.order(&by_number("104233871")).await.unwrap_err();
    assert!(transient(&err).1.contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn a_429_retry_after_is_waited_when_short_and_handed_back_when_long() {
    let sim = start_demo().await;
    let api = client(&sim);
    api.order(&by_number("104233871")).await.unwrap();

    sim.script(SimEndpoint::Search, &[Forced::TooManyRequests]);
    let started = Instant::now();
    assert!(
        api.find_account(&domain("acme.com"), None)
            .await
            .unwrap()
            .is_some()
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(950),
        "Retry-After: 1 was honoured: {waited:?}"
    );
    assert!(waited < Duration::from_millis(2500), "{waited:?}");
    assert_eq!(sim.stats().calls(SimEndpoint::Search), 2);

    sim.set_faults(
        SimEndpoint::Search,
        EndpointFaults {
            retry_after_secs: 5,
            script: vec![Forced::TooManyRequests],
            ..EndpointFaults::default()
        },
    );
    let started = Instant::now();
    let err = api
        .find_account(&domain("acme.com"), None)
        .await
        .unwrap_err();
    assert_eq!(transient(&err).0, Some(Duration::from_secs(5)), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "handed back, not slept"
    );
    assert_eq!(sim.stats().calls(SimEndpoint::Search), 3);

    // Every task of this client now holds back until the Retry-After has passed.
    let orders_before = sim.stats().calls(SimEndpoint::Order);
    let err = api.order(&by_number("104233871")).await.unwrap_err();
    let left = transient(&err).0.unwrap();
    assert!(
        left > Duration::from_secs(3) && left <= Duration::from_secs(5),
        "{left:?}"
    );
    assert_eq!(
        sim.stats().calls(SimEndpoint::Order),
        orders_before,
        "no request sent"
    );
}

#[tokio::test]
async fn tokens_expiring_mid_run_are_refreshed() {
    let mut scenario = Scenario::demo().unwrap();
    scenario.token_ttl = Duration::from_secs(1);
    let sim = start(scenario).await;
    let mut s = settings(&sim);
    s.rate_limit = 20.0;
    let api = HttpCommerce::new(&s).unwrap();
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_millis(3500) {
        api.order(&by_number("104233871")).await.unwrap();
        calls += 1;
    }
    let stats = sim.stats();
    assert_eq!(stats.calls(SimEndpoint::Order), calls + stats.unauthorized);
    assert!(
        stats.tokens_issued >= 3,
        "three lifetimes, a token each: {stats:?}"
    );
    // Refreshed ahead of expiry: without that, every lifetime would end in
    // a 401 (three or more); one is tolerated for a scheduling hiccup.
    assert!(stats.unauthorized <= 1, "{stats:?}");
}

#[tokio::test]
async fn a_401_fetches_one_new_token_and_repeats_the_call_once() {
    let sim = start_demo().await;
    let api = client(&sim);
    api.order(&by_number("104233871")).await.unwrap();
    assert_eq!(sim.stats().tokens_issued, 1);

    sim.revoke_tokens();
    api.order(&by_number("104233871")).await.unwrap();
    let stats = sim.stats();
    assert_eq!(
        (
            stats.tokens_issued,
            stats.unauthorized,
            stats.calls(SimEndpoint::Order)
        ),
        (2, 1, 3)
    );

    // Many tasks refused at once (through the engine's trait object) still
    // fetch one token between them.
    sim.revoke_tokens();
    let shared: std::sync::Arc<dyn CommerceApi> = std::sync::Arc::new(api.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let api = shared.clone();
        tasks.spawn(async move { api.order(&by_number("104233871")).await });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap().unwrap();
    }
    assert_eq!(sim.stats().tokens_issued, 3);
}

#[tokio::test]
async fn the_rate_limit_holds_for_all_clones_together() {
    let sim = start_demo().await;
    let mut s = settings(&sim);
    s.rate_limit = 20.0;
    let api = HttpCommerce::new(&s).unwrap();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let api = api.clone();
        tasks.spawn(async move {
            for _ in 0..10 {
                api.order(&by_number("104233871")).await.unwrap();
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let stats = sim.stats();
    let requests = stats.calls(SimEndpoint::Order) + stats.token_requests;
    assert_eq!(requests, 41, "40 reads and one token");
    // The first request is free; the other 40 are spaced 50 ms apart.
    let rate = (requests - 1) as f64 / elapsed;
    assert!(rate <= 22.0, "{rate:.1} calls/s over a limit of 20");
    assert!(rate >= 10.0, "{rate:.1} calls/s: far below the limit");
}

#[tokio::test]
async fn a_lost_answer_retried_with_the_same_key_assigns_once() {
    let sim = start_demo().await;
    let api = client(&sim);
    sim.script(SimEndpoint::Assign, &[Forced::LostResponse]);
    let key = "case-7:acme.com:DEFAULT";
    let receipt = api.assign(&so("880000100"), &acme(), key).await.unwrap();
    let stats = sim.stats();
    assert_eq!(stats.calls(SimEndpoint::Assign), 2, "lost, then retried");
    assert_eq!(stats.responses(SimEndpoint::Assign, 502), 1);
    assert_eq!(stats.assignments_of("880000100"), 1);
    assert_eq!(stats.idempotent_replays, 1);

    // The engine's later retry (same key) gets the same answer.
    let again = api.assign(&so("880000100"), &acme(), key).await.unwrap();
    assert_eq!(again, receipt);
    assert_eq!(sim.stats().assignments_of("880000100"), 1);
    assert_eq!(
        sim.order("880000100").unwrap()["smartAccount"]["domain"],
        "acme.com"
    );
}

#[tokio::test]
async fn bad_credentials_are_permanent_and_do_not_storm_the_token_endpoint() {
    let sim = start_demo().await;
    let mut s = settings(&sim);
    s.client_secret = Secret::new("wrong-secret-5f1c2e");
    let api = HttpCommerce::new(&s).unwrap();
    let check = |err: CommerceError| {
        assert_eq!(
            permanent_code(&err),
            Some(ErrorCode::InvalidCredentials),
            "{err}"
        );
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("wrong-secret-5f1c2e"), "{shown}");
        assert!(
            shown.contains(DEMO_CLIENT_ID),
            "names the client id: {shown}"
        );
    };
    for _ in 0..10 {
        check(api.order(&by_number("104233871")).await.unwrap_err());
    }
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let api = api.clone();
        tasks.spawn(async move { api.find_account(&domain("acme.com"), None).await });
    }
    while let Some(result) = tasks.join_next().await {
        check(result.unwrap().unwrap_err());
    }
    let stats = sim.stats();
    assert_eq!(stats.token_requests, 1, "remembered, not repeated");
    assert_eq!(
        stats.calls(SimEndpoint::Order) + stats.calls(SimEndpoint::Search),
        0
    );
}

#[tokio::test]
async fn the_secret_and_the_token_never_show_in_debug() {
    let sim = start_demo().await;
    let api = client(&sim);
    api.order(&by_number("104233871")).await.unwrap();
    let shown = format!("{api:?} {:?}", settings(&sim));
    assert!(!shown.contains(DEMO_CLIENT_SECRET), "{shown}");
    assert!(shown.contains("[redacted]"), "{shown}");
    // Tokens are 32 hex digits; none may appear.
    let longest_hex_run = shown
        .split(|c: char| !c.is_ascii_hexdigit())
        .map(str::len)
        .max()
        .unwrap_or(0);
    assert!(longest_hex_run < 32, "{shown}");
}

// ------------------------------------------------------ simulator contract

async fn token(sim: &SimHandle) -> String {
    let answer: Value = raw_http()
        .post(sim.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", DEMO_CLIENT_ID),
            ("client_secret", DEMO_CLIENT_SECRET),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["access_token"].as_str().unwrap().to_owned()
}

async fn get(sim: &SimHandle, path: &str, token: &str) -> (u16, Value) {
    let response = raw_http()
        .get(format!("{}{path}", sim.base_url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn post_assignment(
    sim: &SimHandle,
    order: &str,
    key: &str,
    body: &Value,
    token: &str,
) -> (u16, Value) {
    let response = raw_http()
        .post(format!(
            "{}/commerce/v1/orders/{order}/smart-account-assignment",
            sim.base_url()
        ))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn assert_error_shape(body: &Value, code: &str) {
    assert_eq!(body["status"], "ERROR", "{body}");
    assert_eq!(body["errorCode"], code, "{body}");
    assert!(body["statusMessage"].is_string(), "{body}");
}

#[tokio::test]
async fn the_token_endpoint_speaks_client_credentials() {
    let mut scenario = Scenario::demo().unwrap();
    scenario.token_ttl = Duration::from_secs(7);
    let sim = start(scenario).await;
    let http = raw_http();
    let send = |form: Vec<(&'static str, &'static str)>| {
        let request = http.post(sim.token_url()).form(&form);
        async move {
            let r = request.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (status, ok) = send(vec![
        ("grant_type", "client_credentials"),
        ("client_id", DEMO_CLIENT_ID),
        ("client_secret", DEMO_CLIENT_SECRET),
    ])
    .await;
    assert_eq!(status, 200);
    assert!(
        ok["access_token"].as_str().is_some_and(|t| !t.is_empty()),
        "{ok}"
    );
    assert_eq!(ok["token_type"], "Bearer");
    assert_eq!(ok["expires_in"], 7);

    let (status, refused) = send(vec![
        ("grant_type", "client_credentials"),
        ("client_id", DEMO_CLIENT_ID),
        ("client_secret", "nope"),
    ])
    .await;
    assert_eq!((status, refused), (401, json!({"error": "invalid_client"})));
    let (status, refused) = send(vec![("grant_type", "password")]).await;
    assert_eq!(
        (status, refused),
        (400, json!({"error": "unsupported_grant_type"}))
    );

    // Without a valid token the API answers 401 in the error shape.
    let (status, body) = get(&sim, "/commerce/v1/orders/104233871", "not-a-token").await;
    assert_eq!(status, 401);
    assert_error_shape(&body, "UNAUTHORIZED");
    let stats = sim.stats();
    assert_eq!(
        (
            stats.token_requests,
            stats.tokens_issued,
            stats.unauthorized
        ),
        (3, 1, 1)
    );
}

#[tokio::test]
async fn search_and_virtual_accounts_answer_in_the_contract_shape() {
    let sim = start_demo().await;
    let t = token(&sim).await;
    let (status, body) = get(
        &sim,
        "/smart-accounts-and-licensing/v1/accounts/search?domain=acme.com",
        &t,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["totalRecords"], 2,
        "substring match finds the decoy: {body}"
    );
    assert_eq!(body["status"], "SUCCESS");
    assert_eq!(body["statusMessage"], "");
    assert_eq!(
        body["accounts"][0],
        json!({"id": "SA-100231", "domain": "acme.com", "name": "Acme Corp",
               "email": "licensing@acme.com", "type": "CUSTOMER", "status": "ACTIVE"})
    );
    assert_eq!(body["accounts"][1]["domain"], "notacme.com");

    let (_, typed) = get(
        &sim,
        "/smart-accounts-and-licensing/v1/accounts/search?name=o&type=HOLDING",
        &t,
    )
    .await;
    assert_eq!(typed["totalRecords"], 1, "{typed}");
    assert_eq!(typed["accounts"][0]["type"], "HOLDING");
    let (_, by_email) = get(
        &sim,
        "/smart-accounts-and-licensing/v1/accounts/search?email=licensing%40initech",
        &t,
    )
    .await;
    assert_eq!(by_email["accounts"][0]["status"], "PENDING", "{by_email}");
    let (status, none) = get(&sim, "/smart-accounts-and-licensing/v1/accounts/search", &t).await;
    assert_eq!(status, 400);
    assert_error_shape(&none, "BIZ_RULE_FAIL_ERROR");

    let (status, vas) = get(
        &sim,
        "/smart-accounts-and-licensing/v1/accounts/acme.com/customer/virtual-accounts",
        &t,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        vas,
        json!({"virtualAccounts": [
            {"name": "DEFAULT", "description": "", "isDefault": "true", "commerceAccessLevel": "PUBLIC"},
            {"name": "Network", "description": "Network team only", "isDefault": "false", "commerceAccessLevel": "PRIVATE"}],
            "status": "SUCCESS", "statusMessage": ""})
    );
    let (status, missing) = get(
        &sim,
        "/smart-accounts-and-licensing/v1/accounts/nobody.example/customer/virtual-accounts",
        &t,
    )
    .await;
    assert_eq!(status, 404);
    assert_error_shape(&missing, "SMART_ACCOUNT_NOT_FOUND");
}

#[tokio::test]
async fn orders_answer_in_the_contract_shape() {
    let sim = start_demo().await;
    let t = token(&sim).await;
    let (status, order) = get(&sim, "/commerce/v1/orders/104233871", &t).await;
    assert_eq!(status, 200);
    assert_eq!(order["salesOrderNumber"], "104233871");
    assert_eq!(order["webOrderId"], "98765432");
    assert_eq!(order["purchaseOrderNumber"], "PO-ACME-0042");
    assert_eq!(order["status"], "BOOKED");
    assert_eq!(order["smartAccount"], Value::Null);
    assert_eq!(order["virtualAccount"], Value::Null);
    let holds = order["holds"].as_array().unwrap();
    assert_eq!(holds.len(), 2);
    assert_eq!(holds[0]["code"], "SMART_ACCOUNT_HOLD");
    assert_eq!(holds[0]["description"], "Smart Account hold");
    assert_eq!(holds[0]["releasedAt"], Value::Null);
    let applied = holds[0]["appliedAt"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(applied).is_ok() && applied.ends_with('Z'),
        "{applied}"
    );
    assert_eq!(holds[1]["code"], "CREDIT_HOLD");

    let (status, pending) = get(&sim, "/commerce/v1/orders/104233872", &t).await;
    assert_eq!(status, 200);
    assert_eq!(
        pending["smartAccount"],
        json!({"domain": "initech.com", "name": "Initech", "status": "PENDING"})
    );
    assert_eq!(pending["virtualAccount"], json!({"name": "DEFAULT"}));

    let (status, list) = get(&sim, "/commerce/v1/orders?webOrderId=98765432", &t).await;
    assert_eq!(status, 200);
    assert_eq!(list["orders"].as_array().unwrap().len(), 1);
    assert_eq!(list["orders"][0]["salesOrderNumber"], "104233871");
    let (status, empty) = get(&sim, "/commerce/v1/orders?webOrderId=98765475", &t).await;
    assert_eq!((status, empty), (200, json!({"orders": []})));

    for (path, status, code) in [
        ("/commerce/v1/orders/104233874", 403, "ORDER_ACCESS_DENIED"),
        ("/commerce/v1/orders/104233875", 404, "ORDER_NOT_FOUND"),
    ] {
        let (got, body) = get(&sim, path, &t).await;
        assert_eq!(got, status, "{path}");
        assert_error_shape(&body, code);
    }
}

#[tokio::test]
async fn assignments_answer_in_the_contract_shape_and_are_idempotent() {
    let sim = start_demo().await;
    let t = token(&sim).await;
    let body = json!({"smartAccountDomain": "acme.com", "accountType": "CUSTOMER",
                      "virtualAccountName": "DEFAULT", "acceptTerms": true});
    let (status, first) = post_assignment(&sim, "104233871", "k-1", &body, &t).await;
    assert_eq!(status, 202);
    assert!(
        first["assignmentId"].as_str().unwrap().starts_with("ASG-"),
        "{first}"
    );
    assert_eq!(first["status"], "SUBMITTED");
    let (status, again) = post_assignment(&sim, "104233871", "k-1", &body, &t).await;
    assert_eq!((status, &again), (202, &first));
    assert_eq!(sim.stats().assignments_of("104233871"), 1);

    // Reads after the assignment: the hold lifts and the account shows.
    get(&sim, "/commerce/v1/orders/104233871", &t).await;
    let (_, order) = get(&sim, "/commerce/v1/orders/104233871", &t).await;
    assert!(order["holds"][0]["releasedAt"].is_string(), "{order}");
    assert_eq!(order["holds"][1]["releasedAt"], Value::Null);
    assert_eq!(order["smartAccount"]["domain"], "acme.com");
    assert_eq!(order["virtualAccount"]["name"], "DEFAULT");

    let no_terms = json!({"smartAccountDomain": "acme.com", "accountType": "CUSTOMER",
                          "virtualAccountName": "DEFAULT", "acceptTerms": false});
    let pending = json!({"smartAccountDomain": "initech.com", "accountType": "CUSTOMER",
                         "virtualAccountName": "DEFAULT", "acceptTerms": true});
    let private = json!({"smartAccountDomain": "acme.com", "accountType": "CUSTOMER",
                         "virtualAccountName": "Network", "acceptTerms": true});
    for (order, b, status, code) in [
        ("104233879", &no_terms, 400, "TNC_ERROR"),
        ("104233879", &pending, 422, "SMART_ACCOUNT_NOT_ACTIVE"),
        ("104233879", &private, 422, "VIRTUAL_ACCOUNT_NOT_FOUND"),
        ("104233876", &body, 409, "ASSIGNMENT_LOCKED"),
        ("104233877", &body, 409, "ASSIGNMENT_LOCKED"),
        ("104233874", &body, 403, "ORDER_ACCESS_DENIED"),
    ] {
        let (got, answer) = post_assignment(&sim, order, &format!("{order}-{code}"), b, &t).await;
        assert_eq!(got, status, "{order} {code}: {answer}");
        assert_error_shape(&answer, code);
    }
}

#[tokio::test]
async fn faults_and_the_sim_endpoints_are_observable() {
    let sim = start_demo().await;
    let t = token(&sim).await;
    sim.script(
        SimEndpoint::Order,
        &[
            Forced::TooManyRequests,
            Forced::ServerError,
            Forced::BareServerError,
        ],
    );
    let http = raw_http();
    let url = format!("{}/commerce/v1/orders/104233871", sim.base_url());

    let r = http.get(&url).bearer_auth(&t).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let r = http.get(&url).bearer_auth(&t).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_error_shape(&r.json().await.unwrap(), "CISCO_ERROR");
    let r = http.get(&url).bearer_auth(&t).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 502);
    assert!(
        r.json::<Value>().await.is_err(),
        "a proxy's answer, not JSON"
    );

    let stats: SimStats = stats_over_http(&sim).await;
    assert_eq!(stats, sim.stats());
    assert_eq!(stats.calls(SimEndpoint::Order), 3);
    assert_eq!(stats.token_requests, 1);

    let reset = http
        .post(format!("{}/_sim/reset", sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status().as_u16(), 200);
    assert_eq!(sim.stats().calls(SimEndpoint::Order), 0);
    let refused = http
        .post(format!("{}/_sim/reset", sim.base_url()))
        .body("token_ttl = \"soon\"")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 400);
    let unknown = http
        .get(format!("{}/nowhere", sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 404);
}

// ------------------------------------------------------------ holdclear sim

#[tokio::test]
async fn holdclear_sim_serves_the_contract_until_sigterm() {
    let mut child = bin()
        .args(["sim", "--addr", "127.0.0.1:0", "--token-ttl", "5s"])
        .env("HOLDCLEAR_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let addr = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = rx.recv().await {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("listening"))
            {
                return v["addr"].as_str().map(str::to_owned);
            }
        }
        None
    })
    .await
    .expect("the simulator logs where it listens")
    .expect("with its address");

    let answer: Value = raw_http()
        .post(format!("http://{addr}/oauth2/default/v1/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", DEMO_CLIENT_ID),
            ("client_secret", DEMO_CLIENT_SECRET),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["expires_in"], 5, "the flag overrides the scenario");

    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_for(Duration::from_secs(10), "holdclear sim to exit", || {
        let exited = child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(status.success(), "{status:?}");
}

#[test]
fn holdclear_sim_refuses_a_bad_scenario_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scenario.toml");
    std::fs::write(
        &path,
        "[[accounts]]\ndomain = \"a.com\"\nname = \"A\"\nstatus = \"ASLEEP\"\n",
    )
    .unwrap();
    let out = bin()
        .args(["sim", "--addr", "127.0.0.1:0", "--scenario"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("scenario.toml") && stderr.contains("accounts[0] (a.com).status"),
        "{stderr}"
    );
}

#[tokio::test]
async fn calls_are_counted_and_timed_per_endpoint_and_outcome() {
    let Ok(metrics) = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()
    else {
        // Another test of this process installed the recorder first (plain
        // `cargo test`); nextest runs each test in its own process.
        return;
    };
    let sim = start_demo().await;
    let api = client(&sim);
    sim.script(SimEndpoint::Order, &[Forced::ServerError]);
    api.order(&by_number("104233871")).await.unwrap();
    api.order(&by_number("104233874")).await.unwrap_err();
    let text = metrics.render();
    for line in [
        r#"holdclear_commerce_calls_total{endpoint="token",outcome="ok"} 1"#,
        r#"holdclear_commerce_calls_total{endpoint="order",outcome="transient"} 1"#,
        r#"holdclear_commerce_calls_total{endpoint="order",outcome="ok"} 1"#,
        r#"holdclear_commerce_calls_total{endpoint="order",outcome="permanent"} 1"#,
        r#"holdclear_commerce_call_seconds_count{endpoint="order"} 3"#,
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
}
