use std::collections::HashSet;

use chrono::TimeZone;
use proptest::prelude::*;

use super::*;
use crate::commerce::Hold;
use crate::config::{EscalationThreshold, RetrySettings};
use crate::domain::{
    Email, EndCustomer, EventId, HeldOrder, HeldOrderEvent, OrderType, PendingSmartAccount,
    VirtualAccountChoice, WebOrderId,
};

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 9, 0, 0).unwrap()
}

fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

fn settings() -> EngineSettings {
    EngineSettings {
        poll_interval: Duration::from_secs(30),
        poll_max_interval: Duration::from_secs(900),
        escalation: vec![
            EscalationThreshold {
                after: Duration::from_secs(3600),
                level: EscalationLevel::Warning,
            },
            EscalationThreshold {
                after: Duration::from_secs(4 * 3600),
                level: EscalationLevel::Critical,
            },
        ],
        retry: RetrySettings {
            initial: Duration::from_secs(1),
            max_interval: Duration::from_secs(300),
            max_elapsed: Duration::from_secs(3600),
            multiplier: 2.0,
            randomization: 0.0,
        },
        concurrency: 4,
        batch_size: 4,
        lease: Duration::from_secs(30),
        idle_poll: Duration::from_secs(1),
    }
}

fn domain(d: &str) -> Domain {
    Domain::parse(d).unwrap()
}

fn target(d: &str, t: AccountType, va: Option<&str>) -> Target {
    Target {
        account: AccountSelector::Domain(domain(d)),
        account_type: t,
        virtual_account: va.map_or(VirtualAccountChoice::AccountDefault, |v| {
            VirtualAccountChoice::Named(v.into())
        }),
    }
}

fn decision(fallback: bool) -> Decision {
    Decision {
        rule: "acme-direct".into(),
        rules_hash: "abc123".into(),
        target: target("acme.com", AccountType::Customer, Some("DEFAULT")),
        fallback: fallback
            .then(|| target("globex-holding.com", AccountType::Holding, Some("Holding"))),
    }
}

struct Ev {
    so: Option<&'static str>,
    reason: HoldReason,
    order_type: Option<&'static str>,
    pending: Option<&'static str>,
}

const STANDARD: Ev = Ev {
    so: Some("104233871"),
    reason: HoldReason::NoSmartAccount,
    order_type: Some("STANDARD"),
    pending: None,
};

fn event(e: &Ev) -> HeldOrderEvent {
    HeldOrderEvent {
        id: EventId::parse("ev-1").unwrap(),
        source: "/commerce/orders".into(),
        time: Some(t0()),
        data: HeldOrder {
            order: OrderId::new(
                e.so.map(|s| SalesOrderNumber::parse(s).unwrap()),
                Some(WebOrderId::parse("98765432").unwrap()),
            )
            .unwrap(),
            purchase_order_number: None,
            hold_reason: e.reason,
            held_at: Some(t0()),
            order_type: e.order_type.map(|t| OrderType::parse(t).unwrap()),
            partner: None,
            end_customer: Some(EndCustomer {
                name: Some("Acme".into()),
                email: Some(Email::parse("it@acme.com").unwrap()),
                country: None,
            }),
            smart_account: e.pending.map(|d| PendingSmartAccount {
                domain: Some(domain(d)),
                status: Some("PENDING".into()),
            }),
            lines: vec![],
        },
    }
}

fn case_with(e: &Ev, stage: Stage) -> Case {
    let ev = event(e);
    Case {
        id: Uuid::from_u128(42),
        order: ev.data.order.clone(),
        event: ev,
        stage,
        held_at: t0(),
        attempt: 0,
        retry_since: None,
        polls: 0,
        escalation_level: 0,
        generation: 0,
        next_action_at: Some(t0()),
    }
}

fn deciding() -> Case {
    case_with(&STANDARD, Stage::Deciding)
}

fn resolving(e: &Ev, fallback: bool) -> Case {
    case_with(
        e,
        Stage::Resolving {
            decision: decision(fallback),
        },
    )
}

fn assigning() -> Case {
    let mut c = resolving(&STANDARD, false);
    c.stage = Stage::Assigning {
        decision: decision(false),
        order: c.order.sales_order_number.clone().unwrap(),
        assignment: Assignment {
            smart_account_domain: "acme.com".into(),
            account_type: AccountType::Customer,
            virtual_account_name: "DEFAULT".into(),
        },
        via_fallback: false,
        key: "key-1".into(),
    };
    c
}

fn assigning_with_fallback() -> Case {
    let mut c = assigning();
    if let Stage::Assigning { decision: d, .. } = &mut c.stage {
        *d = decision(true);
    }
    c
}

fn watching() -> Case {
    let mut c = assigning();
    c.stage = Stage::Watching {
        decision: Some(decision(false)),
        target: ResolvedTarget {
            smart_account_domain: "acme.com".into(),
            account_type: AccountType::Customer,
            virtual_account_name: Some("DEFAULT".into()),
            via_fallback: false,
        },
        key: Some("key-1".into()),
        assignment: Some(Accepted {
            id: "ASG-1".into(),
            at: t0(),
        }),
        since: t0(),
    };
    c
}

fn account(d: &str, status: AccountStatus) -> Reply {
    Reply::Account(Ok(Some(SmartAccount {
        id: "SA-1".into(),
        domain: d.into(),
        name: d.into(),
        account_type: "CUSTOMER".into(),
        status,
    })))
}

fn vas(names: &[(&str, bool, bool)]) -> Reply {
    Reply::VirtualAccounts(Ok(names
        .iter()
        .map(|(n, default, public)| VirtualAccount {
            name: (*n).into(),
            is_default: *default,
            public: *public,
        })
        .collect()))
}

fn order(released: bool, other: &[&str]) -> Order {
    let mut holds = vec![Hold {
        code: crate::commerce::SMART_ACCOUNT_HOLD.into(),
        applied_at: Some(t0()),
        released_at: released.then(|| t0() + secs(600)),
    }];
    holds.extend(other.iter().map(|c| Hold {
        code: (*c).into(),
        applied_at: Some(t0()),
        released_at: None,
    }));
    Order {
        sales_order_number: SalesOrderNumber::parse("104233871").unwrap(),
        web_order_id: Some("98765432".into()),
        status: "BOOKED".into(),
        holds,
        smart_account_domain: None,
        smart_account_status: None,
        virtual_account_name: None,
    }
}

/// [`order`] with another status.
fn order_in(status: &str, released: bool) -> Order {
    Order {
        status: status.into(),
        ..order(released, &[])
    }
}

fn transient() -> CommerceError {
    CommerceError::Transient {
        retry_after: None,
        detail: "503".into(),
    }
}

fn permanent(code: ErrorCode) -> CommerceError {
    CommerceError::Permanent {
        code,
        detail: "refused".into(),
    }
}

fn receipt() -> AssignmentReceipt {
    AssignmentReceipt {
        assignment_id: "ASG-5521".into(),
        status: "SUBMITTED".into(),
    }
}

/// Feeds `replies` to the plan of `case` in order; returns the calls asked
/// for and the step's outcome.
fn run_step(case: &Case, replies: &[Reply]) -> (Vec<&'static str>, Outcome) {
    let mut given = Vec::new();
    let mut calls = Vec::new();
    loop {
        match plan(case, &given) {
            Next::Call(call) => {
                calls.push(call.name());
                let reply = replies
                    .get(given.len())
                    .unwrap_or_else(|| panic!("no scripted reply for call {}", call.name()))
                    .clone();
                given.push(reply);
            }
            Next::Done(outcome) => {
                assert_eq!(given.len(), replies.len(), "unused scripted replies");
                return (calls, outcome);
            }
            Next::Stop => panic!("plan stopped"),
        }
    }
}

#[derive(Debug)]
enum Expect {
    /// The case moves to this state.
    State(CaseState),
    /// The case escalates (terminal) for this reason.
    Escalated(EscalationReason),
    /// The step is retried later in the same state.
    Retried,
}

#[test]
fn every_transition() {
    use AccountStatus::{Active, Inactive, Pending};
    use CaseState as S;
    use EscalationReason as R;
    let pending_ev = Ev {
        reason: HoldReason::PendingSmartAccount,
        pending: Some("acme.com"),
        ..STANDARD
    };
    let web_only = Ev {
        so: None,
        ..STANDARD
    };
    let public_default = vas(&[("DEFAULT", true, true), ("Holding", false, true)]);
    let dec = Reply::Decision(Some(decision(false)));
    type Row = (&'static str, Case, Vec<Reply>, Vec<&'static str>, Expect);
    let rows: Vec<Row> = vec![
        // decide
        (
            "a rule matches",
            deciding(),
            vec![dec.clone()],
            vec!["rules.decide"],
            Expect::State(S::Resolving),
        ),
        (
            "no rule matches",
            deciding(),
            vec![Reply::Decision(None)],
            vec!["rules.decide"],
            Expect::Escalated(R::NoRuleMatched),
        ),
        (
            "stocking order: locked, nothing called",
            case_with(
                &Ev {
                    order_type: Some("STOCKING"),
                    ..STANDARD
                },
                Stage::Deciding,
            ),
            vec![],
            vec![],
            Expect::Escalated(R::AssignmentLocked),
        ),
        (
            "EA order: locked, nothing called",
            case_with(
                &Ev {
                    order_type: Some("ea"),
                    ..STANDARD
                },
                Stage::Deciding,
            ),
            vec![],
            vec![],
            Expect::Escalated(R::AssignmentLocked),
        ),
        (
            "web order id only: the order is read first, then the rules decide",
            case_with(&web_only, Stage::Deciding),
            vec![Reply::Order(Ok(order(false, &[])))],
            vec!["read_order"],
            Expect::State(S::Deciding),
        ),
        (
            "web order id only, the hold released by hand already: released, nothing assigned",
            case_with(&web_only, Stage::Deciding),
            vec![Reply::Order(Ok(order(true, &[])))],
            vec!["read_order"],
            Expect::State(S::Released),
        ),
        (
            "web order id only, order CANCELLED with the hold on: locked, nothing assigned",
            case_with(&web_only, Stage::Deciding),
            vec![Reply::Order(Ok(order_in("CANCELLED", false)))],
            vec!["read_order"],
            Expect::Escalated(R::AssignmentLocked),
        ),
        // resolve
        (
            "account active, named VA public",
            resolving(&STANDARD, false),
            vec![account("acme.com", Active), public_default.clone()],
            vec!["find_account", "virtual_accounts"],
            Expect::State(S::Assigning),
        ),
        (
            "account missing, no fallback",
            resolving(&STANDARD, false),
            vec![Reply::Account(Ok(None))],
            vec!["find_account"],
            Expect::Escalated(R::SmartAccountNotFound),
        ),
        (
            "account search answers 404 SMART_ACCOUNT_NOT_FOUND: as missing",
            resolving(&STANDARD, false),
            vec![Reply::Account(Err(permanent(
                ErrorCode::SmartAccountNotFound,
            )))],
            vec!["find_account"],
            Expect::Escalated(R::SmartAccountNotFound),
        ),
        (
            "account missing, fallback active",
            resolving(&STANDARD, true),
            vec![
                Reply::Account(Ok(None)),
                account("globex-holding.com", Active),
                public_default.clone(),
            ],
            vec!["find_account", "find_account", "virtual_accounts"],
            Expect::State(S::Assigning),
        ),
        (
            "account inactive, no fallback",
            resolving(&STANDARD, false),
            vec![account("acme.com", Inactive)],
            vec!["find_account"],
            Expect::Escalated(R::SmartAccountNotActive),
        ),
        (
            "account pending, fallback missing: the primary's reason",
            resolving(&STANDARD, true),
            vec![account("acme.com", Pending), Reply::Account(Ok(None))],
            vec!["find_account", "find_account"],
            Expect::Escalated(R::SmartAccountNotActive),
        ),
        (
            "pending hold, pending account still pending, fallback active",
            resolving(&pending_ev, true),
            vec![
                account("acme.com", Pending),
                account("globex-holding.com", Active),
                public_default.clone(),
            ],
            vec!["find_account", "find_account", "virtual_accounts"],
            Expect::State(S::Assigning),
        ),
        (
            "pending hold, pending account still pending, no fallback",
            resolving(&pending_ev, false),
            vec![account("acme.com", Pending)],
            vec!["find_account"],
            Expect::Escalated(R::SmartAccountNotActive),
        ),
        (
            "pending hold, pending account ACTIVE now: nothing to assign",
            resolving(&pending_ev, true),
            vec![account("ACME.com", Active)],
            vec!["find_account"],
            Expect::State(S::Watching),
        ),
        (
            "named VA is private, in the fresh list too",
            resolving(&STANDARD, false),
            vec![
                account("acme.com", Active),
                vas(&[("DEFAULT", true, false)]),
                vas(&[("DEFAULT", true, false)]),
            ],
            vec!["find_account", "virtual_accounts", "virtual_accounts"],
            Expect::Escalated(R::VirtualAccountNotFound),
        ),
        (
            "named VA is missing, in the fresh list too",
            resolving(&STANDARD, false),
            vec![
                account("acme.com", Active),
                vas(&[("Other", true, true)]),
                vas(&[("Other", true, true)]),
            ],
            vec!["find_account", "virtual_accounts", "virtual_accounts"],
            Expect::Escalated(R::VirtualAccountNotFound),
        ),
        (
            "named VA missing from a (cached) list, in the fresh one",
            resolving(&STANDARD, false),
            vec![
                account("acme.com", Active),
                vas(&[("Other", true, true)]),
                public_default.clone(),
            ],
            vec!["find_account", "virtual_accounts", "virtual_accounts"],
            Expect::State(S::Assigning),
        ),
        (
            "web order id only: the order is read for its sales order number",
            resolving(&web_only, false),
            vec![
                account("acme.com", Active),
                public_default.clone(),
                Reply::Order(Ok(order(false, &[]))),
            ],
            vec!["find_account", "virtual_accounts", "read_order"],
            Expect::State(S::Assigning),
        ),
        (
            "web order id only, order not found",
            resolving(&web_only, false),
            vec![
                account("acme.com", Active),
                public_default.clone(),
                Reply::Order(Err(permanent(ErrorCode::OrderNotFound))),
            ],
            vec!["find_account", "virtual_accounts", "read_order"],
            Expect::Escalated(R::OrderNotAccessible),
        ),
        (
            "web order id only, several orders carry it",
            resolving(&web_only, false),
            vec![
                account("acme.com", Active),
                public_default.clone(),
                Reply::Order(Err(permanent(ErrorCode::AmbiguousMatch))),
            ],
            vec!["find_account", "virtual_accounts", "read_order"],
            Expect::Escalated(R::AmbiguousMatch),
        ),
        (
            "two ACTIVE accounts match exactly: no fallback, escalated",
            resolving(&STANDARD, true),
            vec![Reply::Account(Err(permanent(ErrorCode::AmbiguousMatch)))],
            vec!["find_account"],
            Expect::Escalated(R::AmbiguousMatch),
        ),
        (
            "account search fails transiently",
            resolving(&STANDARD, true),
            vec![Reply::Account(Err(transient()))],
            vec!["find_account"],
            Expect::Retried,
        ),
        (
            "virtual accounts fail transiently",
            resolving(&STANDARD, false),
            vec![
                account("acme.com", Active),
                Reply::VirtualAccounts(Err(transient())),
            ],
            vec!["find_account", "virtual_accounts"],
            Expect::Retried,
        ),
        (
            "invalid credentials count as transient",
            resolving(&STANDARD, false),
            vec![Reply::Account(Err(permanent(
                ErrorCode::InvalidCredentials,
            )))],
            vec!["find_account"],
            Expect::Retried,
        ),
        // assign
        (
            "assignment accepted",
            assigning(),
            vec![Reply::Assigned(Ok(receipt()))],
            vec!["assign"],
            Expect::State(S::Watching),
        ),
        (
            "409 locked",
            assigning(),
            vec![Reply::Assigned(Err(permanent(ErrorCode::AssignmentLocked)))],
            vec!["assign"],
            Expect::Escalated(R::AssignmentLocked),
        ),
        (
            "403 access denied",
            assigning(),
            vec![Reply::Assigned(Err(permanent(
                ErrorCode::OrderAccessDenied,
            )))],
            vec!["assign"],
            Expect::Escalated(R::OrderNotAccessible),
        ),
        (
            "404 order not found",
            assigning(),
            vec![Reply::Assigned(Err(permanent(ErrorCode::OrderNotFound)))],
            vec!["assign"],
            Expect::Escalated(R::OrderNotAccessible),
        ),
        (
            "404 account not found: resolved again, gone",
            assigning(),
            vec![
                Reply::Assigned(Err(permanent(ErrorCode::SmartAccountNotFound))),
                Reply::Account(Ok(None)),
            ],
            vec!["assign", "find_account"],
            Expect::Escalated(R::SmartAccountNotFound),
        ),
        (
            "422 account not active: resolved again, INACTIVE",
            assigning(),
            vec![
                Reply::Assigned(Err(permanent(ErrorCode::SmartAccountNotActive))),
                account("acme.com", Inactive),
            ],
            vec!["assign", "find_account"],
            Expect::Escalated(R::SmartAccountNotActive),
        ),
        (
            "422 account not active: resolved again, the fallback is assigned",
            assigning_with_fallback(),
            vec![
                Reply::Assigned(Err(permanent(ErrorCode::SmartAccountNotActive))),
                account("acme.com", Inactive),
                account("globex-holding.com", Active),
                public_default.clone(),
            ],
            vec!["assign", "find_account", "find_account", "virtual_accounts"],
            Expect::State(S::Assigning),
        ),
        (
            "422 account not active, fresh reads say ACTIVE: the refusal stands",
            assigning(),
            vec![
                Reply::Assigned(Err(permanent(ErrorCode::SmartAccountNotActive))),
                account("acme.com", Active),
                public_default.clone(),
            ],
            vec!["assign", "find_account", "virtual_accounts"],
            Expect::Escalated(R::SmartAccountNotActive),
        ),
        (
            "422 VA not found: resolved again, the fresh lists lack it",
            assigning(),
            vec![
                Reply::Assigned(Err(permanent(ErrorCode::VirtualAccountNotFound))),
                account("acme.com", Active),
                vas(&[("Other", true, true)]),
                vas(&[("Other", true, true)]),
            ],
            vec![
                "assign",
                "find_account",
                "virtual_accounts",
                "virtual_accounts",
            ],
            Expect::Escalated(R::VirtualAccountNotFound),
        ),
        (
            "422 VA not found: resolved again, fails transiently",
            assigning(),
            vec![
                Reply::Assigned(Err(permanent(ErrorCode::VirtualAccountNotFound))),
                Reply::Account(Err(transient())),
            ],
            vec!["assign", "find_account"],
            Expect::Retried,
        ),
        (
            "400 TNC",
            assigning(),
            vec![Reply::Assigned(Err(permanent(ErrorCode::TncError)))],
            vec!["assign"],
            Expect::Escalated(R::AssignmentRejected),
        ),
        (
            "400 BIZ_RULE",
            assigning(),
            vec![Reply::Assigned(Err(permanent(ErrorCode::BizRuleFail)))],
            vec!["assign"],
            Expect::Escalated(R::AssignmentRejected),
        ),
        (
            "unknown code",
            assigning(),
            vec![Reply::Assigned(Err(permanent(ErrorCode::Other(
                "HTTP 418".into(),
            ))))],
            vec!["assign"],
            Expect::Escalated(R::AssignmentRejected),
        ),
        (
            "assign 5xx",
            assigning(),
            vec![Reply::Assigned(Err(transient()))],
            vec!["assign"],
            Expect::Retried,
        ),
        // watch
        (
            "hold released",
            watching(),
            vec![Reply::Order(Ok(order(true, &["CREDIT_HOLD"])))],
            vec!["read_order"],
            Expect::State(S::Released),
        ),
        (
            "hold still on",
            watching(),
            vec![Reply::Order(Ok(order(false, &[])))],
            vec!["read_order"],
            Expect::State(S::Watching),
        ),
        (
            "order CANCELLED while watched, hold still on: locked, no more looks",
            watching(),
            vec![Reply::Order(Ok(order_in("CANCELLED", false)))],
            vec!["read_order"],
            Expect::Escalated(R::AssignmentLocked),
        ),
        (
            "order CLOSED while watched, hold still on: locked",
            watching(),
            vec![Reply::Order(Ok(order_in("CLOSED", false)))],
            vec!["read_order"],
            Expect::Escalated(R::AssignmentLocked),
        ),
        (
            "order CANCELLED and its hold released: released",
            watching(),
            vec![Reply::Order(Ok(order_in("CANCELLED", true)))],
            vec!["read_order"],
            Expect::State(S::Released),
        ),
        (
            "order ENTERED, hold still on: still watched",
            watching(),
            vec![Reply::Order(Ok(order_in("ENTERED", false)))],
            vec!["read_order"],
            Expect::State(S::Watching),
        ),
        (
            "order gone (404)",
            watching(),
            vec![Reply::Order(Err(permanent(ErrorCode::OrderNotFound)))],
            vec!["read_order"],
            Expect::Escalated(R::OrderNotAccessible),
        ),
        (
            "order hidden (403)",
            watching(),
            vec![Reply::Order(Err(permanent(ErrorCode::OrderAccessDenied)))],
            vec!["read_order"],
            Expect::Escalated(R::OrderNotAccessible),
        ),
        (
            "read fails transiently",
            watching(),
            vec![Reply::Order(Err(transient()))],
            vec!["read_order"],
            Expect::Retried,
        ),
    ];
    let now = t0() + secs(60);
    for (name, case, replies, calls, expect) in rows {
        let (made, outcome) = run_step(&case, &replies);
        assert_eq!(made, calls, "{name}: calls");
        let t = apply(&case, outcome, now, &settings()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let c = &t.case;
        match expect {
            Expect::State(state) => {
                assert_eq!(c.state(), state, "{name}");
                assert_eq!(c.attempt, 0, "{name}: a success ends the streak");
            }
            Expect::Escalated(reason) => {
                assert_eq!(c.state(), CaseState::Escalated, "{name}");
                assert_eq!(c.stage.escalation_reason(), Some(reason), "{name}");
                assert_eq!(c.next_action_at, None, "{name}");
                let [
                    OutboundEvent::HoldEscalated {
                        reason: r, level, ..
                    },
                ] = t.events.as_slice()
                else {
                    panic!("{name}: one escalation event, got {:?}", t.events);
                };
                assert_eq!((*r, *level), (reason, EscalationLevel::Critical), "{name}");
            }
            Expect::Retried => {
                assert_eq!(c.state(), case.state(), "{name}");
                assert_eq!(c.attempt, 1, "{name}");
                assert_eq!(c.retry_since, Some(now), "{name}");
                assert_eq!(c.next_action_at, Some(now + secs(1)), "{name}");
                assert!(t.events.is_empty(), "{name}");
            }
        }
        if !c.state().is_terminal() {
            assert!(
                c.next_action_at.is_some_and(|at| at >= now),
                "{name}: due again"
            );
        }
    }
}

#[test]
fn deciding_records_the_decision() {
    let (_, outcome) = run_step(&deciding(), &[Reply::Decision(Some(decision(true)))]);
    let t = apply(&deciding(), outcome, t0(), &settings()).unwrap();
    assert_eq!(t.case.stage.decision().cloned(), Some(decision(true)));
    assert_eq!(t.case.rule(), Some("acme-direct"));
    assert_eq!(t.case.next_action_at, Some(t0()), "resolve runs at once");
    assert_eq!(t.history[0].kind, "decided");
}

#[test]
fn resolving_stores_target_key_and_sales_order_number() {
    let web_only = Ev {
        so: None,
        ..STANDARD
    };
    let case = resolving(&web_only, true);
    let replies = [
        Reply::Account(Ok(None)),
        account("globex-holding.com", AccountStatus::Active),
        vas(&[("Holding", false, true)]),
        Reply::Order(Ok(order(false, &[]))),
    ];
    let (_, outcome) = run_step(&case, &replies);
    let t = apply(&case, outcome.clone(), t0(), &settings()).unwrap();
    let target = t.case.stage.progress().target.unwrap();
    assert_eq!(target.smart_account_domain, "globex-holding.com");
    assert_eq!(target.account_type, AccountType::Holding);
    assert_eq!(target.virtual_account_name.as_deref(), Some("Holding"));
    assert!(target.via_fallback);
    assert_eq!(
        t.case.order.sales_order_number.as_ref().map(|s| s.as_str()),
        Some("104233871")
    );
    // The same case and target give the same key, whenever and however often.
    let again = apply(&case, outcome, t0() + secs(3600), &settings()).unwrap();
    assert_eq!(
        t.case.stage.progress().idempotency_key,
        again.case.stage.progress().idempotency_key
    );
    let key = t.case.stage.progress().idempotency_key.unwrap();
    assert!(Uuid::parse_str(&key).is_ok(), "{key}");
    // Another generation (a re-run) gets another key.
    let mut rerun = case.clone();
    rerun.generation = 1;
    let (_, outcome) = run_step(&rerun, &replies);
    let other = apply(&rerun, outcome, t0(), &settings()).unwrap();
    assert_ne!(other.case.stage.progress().idempotency_key, Some(key));
}

#[test]
fn the_account_default_virtual_account_is_used_when_the_rule_names_none() {
    let mut d = decision(false);
    d.target.virtual_account = VirtualAccountChoice::AccountDefault;
    let mut case = resolving(&STANDARD, false);
    case.stage = Stage::Resolving { decision: d };
    let (_, outcome) = run_step(
        &case,
        &[
            account("acme.com", AccountStatus::Active),
            vas(&[("Private", true, false), ("Main", true, true)]),
        ],
    );
    let Outcome::Resolved(Resolution::Assign { assignment, .. }) = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(assignment.virtual_account_name, "Main");
}

#[test]
fn an_accepted_assignment_emits_its_event_and_waits_a_poll_interval() {
    let mut case = assigning();
    case.attempt = 2;
    case.retry_since = Some(t0());
    let now = t0() + secs(10);
    let t = apply(&case, Outcome::Assigned(receipt()), now, &settings()).unwrap();
    assert_eq!(
        t.case.stage.progress().assignment.map(|a| a.id).as_deref(),
        Some("ASG-5521")
    );
    assert_eq!(t.case.stage.progress().assignment.map(|a| a.at), Some(now));
    assert_eq!(t.case.next_action_at, Some(now + secs(30)));
    assert_eq!((t.case.attempt, t.case.retry_since), (0, None));
    assert_eq!(
        t.events,
        vec![OutboundEvent::SmartAccountAssigned {
            smart_account_domain: "acme.com".into(),
            account_type: AccountType::Customer,
            virtual_account_name: "DEFAULT".into(),
            rule: "acme-direct".into(),
            assignment_id: "ASG-5521".into(),
            attempts: 3,
        }]
    );
    // A second receipt for the same case is refused: never two assignments.
    let again = apply(&t.case, Outcome::Assigned(receipt()), now, &settings());
    assert!(again.is_err());
}

#[test]
fn watching_backs_off_and_escalates_each_level_once() {
    let s = settings();
    let mut case = watching();
    let mut now = t0();
    let mut waits = Vec::new();
    let mut levels = Vec::new();
    // Look until the critical threshold (4 h) has passed.
    for _ in 0..200 {
        now = case.next_action_at.unwrap();
        let t = apply(
            &case,
            Outcome::StillHeld {
                other_holds: vec![],
            },
            now,
            &s,
        )
        .unwrap();
        for e in &t.events {
            let OutboundEvent::HoldEscalated {
                reason,
                level,
                threshold,
                ..
            } = e
            else {
                panic!("{e:?}");
            };
            assert_eq!(*reason, EscalationReason::HoldPersists);
            levels.push((*level, *threshold, (now - t0()).num_seconds()));
        }
        waits.push((t.case.next_action_at.unwrap() - now).num_seconds());
        assert_eq!(
            t.case.state(),
            CaseState::Watching,
            "HOLD_PERSISTS keeps watching"
        );
        case = t.case;
        if case.escalation_level == 2 {
            break;
        }
    }
    assert_eq!(
        &waits[..6],
        &[60, 120, 240, 480, 900, 900],
        "poll_delay doubles to the maximum"
    );
    assert_eq!(
        levels,
        vec![
            (EscalationLevel::Warning, Some(0), 3600),
            (EscalationLevel::Critical, Some(1), 4 * 3600),
        ],
        "each level exactly at its threshold, once"
    );
    // After the last threshold: the longest interval, no more escalations.
    let t = apply(
        &case,
        Outcome::StillHeld {
            other_holds: vec![],
        },
        now,
        &s,
    )
    .unwrap();
    assert!(t.events.is_empty());
    assert_eq!(t.case.next_action_at, Some(now + secs(900)));
    // And a release still follows.
    let t = apply(
        &t.case,
        Outcome::Released {
            released_at: Some(now),
            other_holds: vec!["CREDIT_HOLD".into()],
        },
        now,
        &s,
    )
    .unwrap();
    assert_eq!(t.case.state(), CaseState::Released);
    let [
        OutboundEvent::HoldReleased {
            held_seconds,
            other_holds,
            smart_account_domain,
            rule,
            ..
        },
    ] = t.events.as_slice()
    else {
        panic!("{:?}", t.events);
    };
    assert_eq!(*held_seconds, (now - t0()).num_seconds());
    assert_eq!(other_holds, &["CREDIT_HOLD".to_owned()]);
    assert_eq!(smart_account_domain.as_deref(), Some("acme.com"));
    assert_eq!(rule.as_deref(), Some("acme-direct"));
}

#[test]
fn a_long_outage_emits_every_passed_level_once() {
    let case = watching();
    let t = apply(
        &case,
        Outcome::StillHeld {
            other_holds: vec![],
        },
        t0() + secs(5 * 3600),
        &settings(),
    )
    .unwrap();
    assert_eq!(t.events.len(), 2);
    assert_eq!(t.case.escalation_level, 2);
    let ids: HashSet<String> = t.events.iter().map(OutboundEvent::transition).collect();
    assert_eq!(ids.len(), 2, "distinct transitions, distinct envelope ids");
}

#[test]
fn transient_failures_back_off_until_the_budget_is_spent() {
    let s = settings();
    let mut case = assigning();
    let mut now = t0();
    let mut delays = Vec::new();
    let fail = |retry_after| Outcome::Transient {
        call: "assign",
        retry_after,
        detail: "503".into(),
    };
    loop {
        let t = apply(&case, fail(None), now, &s).unwrap();
        if t.case.state() == CaseState::Escalated {
            assert_eq!(
                t.case.stage.escalation_reason(),
                Some(EscalationReason::RetriesExhausted)
            );
            assert!(now - t0() >= secs(3600));
            let [OutboundEvent::HoldEscalated { level, detail, .. }] = t.events.as_slice() else {
                panic!("{:?}", t.events);
            };
            assert_eq!(*level, EscalationLevel::Critical);
            assert!(detail.contains("503"), "{detail}");
            break;
        }
        assert_eq!(
            t.case.retry_since,
            Some(t0()),
            "the streak starts at the first failure"
        );
        delays.push((t.case.next_action_at.unwrap() - now).num_seconds());
        now = t.case.next_action_at.unwrap();
        case = t.case;
        assert!(delays.len() < 100);
    }
    assert_eq!(&delays[..6], &[1, 2, 4, 8, 16, 32]);
    // Retry-After wins when it is longer.
    let t = apply(&assigning(), fail(Some(Duration::from_secs(7))), t0(), &s).unwrap();
    assert_eq!(t.case.next_action_at, Some(t0() + secs(7)));
    // A success ends the streak.
    let mut failing = assigning();
    failing.attempt = 5;
    failing.retry_since = Some(t0());
    let t = apply(&failing, Outcome::Assigned(receipt()), t0(), &s).unwrap();
    assert_eq!((t.case.attempt, t.case.retry_since), (0, None));
}

#[test]
fn terminal_cases_stay_terminal() {
    let progress = watching().stage.progress();
    for stage in [
        Stage::Released {
            progress: progress.clone(),
            released_at: t0(),
            closed_at: t0(),
        },
        Stage::Escalated {
            reason: EscalationReason::NoRuleMatched,
            progress: progress.clone(),
            closed_at: t0(),
        },
        Stage::Merged {
            progress: progress.clone(),
            closed_at: Some(t0()),
        },
    ] {
        let mut case = watching();
        case.stage = stage;
        case.next_action_at = None;
        assert_eq!(plan(&case, &[]), Next::Stop);
        for outcome in [
            Outcome::Assigned(receipt()),
            Outcome::StillHeld {
                other_holds: vec![],
            },
            Outcome::Escalate {
                reason: EscalationReason::NoRuleMatched,
                detail: String::new(),
            },
        ] {
            assert!(apply(&case, outcome, t0(), &settings()).is_err());
        }
    }
}

#[test]
fn retry_resumes_where_it_is_safe() {
    let escalate = |case: &Case, reason| {
        apply(
            case,
            Outcome::Escalate {
                reason,
                detail: String::new(),
            },
            t0(),
            &settings(),
        )
        .unwrap()
        .case
    };
    let cases = [
        (
            escalate(
                &resolving(&STANDARD, false),
                EscalationReason::SmartAccountNotActive,
            ),
            CaseState::Deciding,
        ),
        (
            escalate(&assigning(), EscalationReason::AssignmentRejected),
            CaseState::Deciding,
        ),
        (
            escalate(&assigning(), EscalationReason::RetriesExhausted),
            CaseState::Assigning,
        ),
        (
            escalate(&watching(), EscalationReason::OrderNotAccessible),
            CaseState::Watching,
        ),
    ];
    let later = t0() + secs(86_400);
    for (case, resumes) in cases {
        let t = retry(&case, later).unwrap();
        assert_eq!(
            t.case.state(),
            resumes,
            "{:?}",
            case.stage.escalation_reason()
        );
        assert_eq!(t.case.generation, 1);
        assert_eq!(t.case.stage.escalation_reason(), None);
        assert_eq!(t.case.stage.closed_at(), None);
        assert_eq!(t.case.next_action_at, Some(later));
        match resumes {
            CaseState::Deciding => assert_eq!(
                (
                    t.case.stage.decision().cloned(),
                    t.case.stage.progress().idempotency_key
                ),
                (None, None)
            ),
            CaseState::Assigning => {
                assert_eq!(
                    t.case.stage.progress().idempotency_key,
                    case.stage.progress().idempotency_key,
                    "the same key"
                )
            }
            _ => assert_eq!(t.case.stage.progress().watching_since, Some(later)),
        }
    }
    assert!(retry(&watching(), later).is_err(), "only escalated cases");
}

// ---- properties -----------------------------------------------------------

/// A reply for `call` chosen by `die`: successes of several shapes,
/// transient failures and every permanent code.
fn reply_for(case: &Case, call: &Call, die: u8) -> Reply {
    let codes = [
        ErrorCode::TncError,
        ErrorCode::BizRuleFail,
        ErrorCode::OrderAccessDenied,
        ErrorCode::OrderNotFound,
        ErrorCode::SmartAccountNotFound,
        ErrorCode::AssignmentLocked,
        ErrorCode::SmartAccountNotActive,
        ErrorCode::VirtualAccountNotFound,
        ErrorCode::InvalidCredentials,
        ErrorCode::AmbiguousMatch,
    ];
    let err = |die: u8| {
        if die.is_multiple_of(3) {
            transient()
        } else {
            permanent(codes[usize::from(die) % codes.len()].clone())
        }
    };
    let ok = !die.is_multiple_of(4);
    match call {
        Call::Decide => {
            Reply::Decision((!die.is_multiple_of(5)).then(|| decision(die.is_multiple_of(2))))
        }
        Call::FindAccount { selector, .. } => {
            let d = match selector {
                AccountSelector::Domain(d) => d.to_string(),
                _ => "x.com".into(),
            };
            match die % 6 {
                0 => Reply::Account(Err(err(die / 6))),
                1 => Reply::Account(Ok(None)),
                2 => account(&d, AccountStatus::Pending),
                _ => account(&d, AccountStatus::Active),
            }
        }
        Call::VirtualAccounts { .. } if ok => vas(&[
            ("DEFAULT", true, !die.is_multiple_of(7)),
            ("Holding", false, true),
        ]),
        Call::VirtualAccounts { .. } => Reply::VirtualAccounts(Err(err(die / 4))),
        Call::ReadOrder { .. } if ok => {
            let released = case.state() == CaseState::Watching && die.is_multiple_of(3);
            Reply::Order(Ok(order(released, &[])))
        }
        Call::ReadOrder { .. } => Reply::Order(Err(err(die / 4))),
        Call::Assign { .. } if ok => Reply::Assigned(Ok(receipt())),
        Call::Assign { .. } => Reply::Assigned(Err(err(die / 4))),
    }
}

fn check_invariants(before: &Case, t: &Transition, now: DateTime<Utc>) {
    let c = &t.case;
    if c.state().is_terminal() {
        assert_eq!(c.next_action_at, None);
    } else {
        assert!(c.next_action_at.is_some_and(|at| at >= now), "{c:?}");
    }
    if before.stage.progress().assignment.map(|a| a.id).is_some() {
        assert_eq!(
            c.stage.progress().assignment.map(|a| a.id),
            before.stage.progress().assignment.map(|a| a.id),
            "an accepted assignment stays"
        );
        assert_ne!(c.state(), CaseState::Assigning);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Steps driven by plan() with arbitrary replies.
    #[test]
    fn planned_steps_never_assign_twice(
        pending in any::<bool>(),
        web_only in any::<bool>(),
        dice in proptest::collection::vec((any::<u8>(), 0u32..20_000), 1..60),
    ) {
        let ev = Ev {
            so: if web_only { None } else { Some("104233871") },
            reason: if pending { HoldReason::PendingSmartAccount } else { HoldReason::NoSmartAccount },
            pending: pending.then_some("acme.com"),
            ..STANDARD
        };
        let s = settings();
        let mut case = case_with(&ev, Stage::Deciding);
        let mut now = t0();
        let mut accepted = 0;
        let mut transitions = HashSet::new();
        'steps: for (die, wait) in dice {
            now = case.next_action_at.map_or(now, |at| at.max(now)) + secs(i64::from(wait % 7));
            let mut replies = Vec::new();
            let mut die = die;
            let outcome = loop {
                match plan(&case, &replies) {
                    Next::Stop => {
                        prop_assert!(case.state().is_terminal());
                        break 'steps;
                    }
                    Next::Done(o) => break o,
                    Next::Call(call) => {
                        if let Call::Assign { .. } = call {
                            prop_assert_eq!(case.state(), CaseState::Assigning);
                            prop_assert!(case.stage.progress().assignment.map(|a| a.id).is_none());
                            prop_assert_eq!(accepted, 0);
                        }
                        let reply = reply_for(&case, &call, die);
                        if let Reply::Assigned(Ok(_)) = reply {
                            accepted += 1;
                        }
                        replies.push(reply);
                        die = die.rotate_left(3) ^ 0x5a;
                    }
                }
            };
            let t = apply(&case, outcome, now, &s).expect("planned outcomes apply");
            check_invariants(&case, &t, now);
            for e in &t.events {
                prop_assert!(transitions.insert(e.transition()), "one event per transition: {:?}", e);
            }
            case = t.case;
        }
        prop_assert!(accepted <= 1);
        if case.state().is_terminal() {
            prop_assert_eq!(plan(&case, &[]), Next::Stop);
        }
    }

    /// Arbitrary outcomes in arbitrary order: the machine refuses what does
    /// not fit and keeps its invariants.
    #[test]
    fn arbitrary_outcomes_keep_the_invariants(
        start in 0usize..4,
        steps in proptest::collection::vec((0u8..9, any::<u8>(), 0i64..30_000), 1..80),
    ) {
        let s = settings();
        let mut case = [deciding(), resolving(&STANDARD, true), assigning(), watching()][start].clone();
        let mut now = t0();
        let mut accepted = u32::from(case.stage.progress().assignment.map(|a| a.id).is_some());
        let mut terminal = false;
        for (kind, die, wait) in steps {
            now += secs(wait);
            let outcome = match kind {
                0 => Outcome::Decided(decision(die % 2 == 0)),
                1 => Outcome::Resolved(Resolution::Assign {
                    sales_order_number: SalesOrderNumber::parse("1").unwrap(),
                    assignment: Assignment {
                        smart_account_domain: "acme.com".into(),
                        account_type: AccountType::Customer,
                        virtual_account_name: "DEFAULT".into(),
                    },
                    via_fallback: false,
                }),
                2 => Outcome::Assigned(receipt()),
                3 => Outcome::StillHeld { other_holds: vec![] },
                4 => Outcome::Released { released_at: None, other_holds: vec![] },
                5 => Outcome::Escalate {
                    reason: EscalationReason::ALL[usize::from(die) % 8],
                    detail: String::new(),
                },
                6 => Outcome::Transient {
                    call: "x",
                    retry_after: (die % 2 == 0).then(|| Duration::from_secs(u64::from(die))),
                    detail: String::new(),
                },
                7 => Outcome::Identified {
                    sales_order_number: SalesOrderNumber::parse("1").unwrap(),
                    seen: match die % 3 {
                        0 => HoldSeen::On { other_holds: vec![] },
                        1 => HoldSeen::Released {
                            released_at: None,
                            other_holds: vec![],
                            smart_account_domain: None,
                        },
                        _ => HoldSeen::Locked { status: "CANCELLED".into() },
                    },
                },
                _ => Outcome::Resolved(Resolution::AlreadyActive {
                    smart_account_domain: "acme.com".into(),
                    account_type: AccountType::Customer,
                    via_fallback: false,
                }),
            };
            let was_assigning = case.state() == CaseState::Assigning;
            match apply(&case, outcome, now, &s) {
                Ok(t) => {
                    prop_assert!(!terminal, "a terminal case accepted a transition");
                    check_invariants(&case, &t, now);
                    if was_assigning && t.case.stage.progress().assignment.map(|a| a.id).is_some() {
                        accepted += 1;
                    }
                    case = t.case;
                    terminal = case.state().is_terminal();
                }
                Err(_) => prop_assert!(terminal || !case.state().is_terminal()),
            }
            prop_assert!(accepted <= 1, "two accepted assignments");
        }
    }
}

#[test]
fn call_entries_name_the_call_and_its_outcome() {
    let e = call_entry(
        CaseState::Assigning,
        &Call::Assign {
            order: SalesOrderNumber::parse("1").unwrap(),
            assignment: Assignment {
                smart_account_domain: "acme.com".into(),
                account_type: AccountType::Customer,
                virtual_account_name: "DEFAULT".into(),
            },
            idempotency_key: "k".into(),
        },
        &Reply::Assigned(Err(permanent(ErrorCode::TncError))),
        t0(),
        Duration::from_millis(12),
    );
    assert_eq!(e.kind, "call");
    assert_eq!(e.detail["call"], "assign");
    assert_eq!(e.detail["args"]["idempotencyKey"], "k");
    assert_eq!(e.detail["result"]["outcome"], "permanent");
    assert_eq!(e.detail["result"]["code"], "TNC_ERROR");
    assert_eq!(e.detail["ms"], 12);
}
