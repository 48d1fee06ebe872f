//! The case state machine: pure functions, no I/O, no clock.
//!
//! A step of a case is two pure functions and the calls between them:
//! - [`plan`] looks at the case and the replies gathered so far in this step
//!   and names the next [`Call`] to make, or the step's [`Outcome`];
//! - [`apply`] turns the case and the outcome into a [`Transition`]: the
//!   case's new columns, the history entries and the events to emit, and
//!   when the case is next due.
//!
//! The scheduler makes the calls ([`Call`] → [`Reply`]) and commits each
//! transition in one transaction. Everything that decides lives here and is
//! tested without a database or a network.
//!
//! Choices worth knowing (the operator-facing consequences):
//! - Stocking and EA orders escalate `ASSIGNMENT_LOCKED` before the rules
//!   are consulted and without calling the commerce API.
//! - The fallback target is tried only when the rule's account is missing or
//!   not ACTIVE. When both fail, the escalation reason is the primary
//!   account's (`SMART_ACCOUNT_NOT_FOUND` or `SMART_ACCOUNT_NOT_ACTIVE`);
//!   the detail names what happened to the fallback.
//! - For a `PENDING_SMART_ACCOUNT` hold the pending account is never
//!   assigned again: still not ACTIVE, it is treated like any inactive
//!   account (fallback, else `SMART_ACCOUNT_NOT_ACTIVE`); ACTIVE now, nothing
//!   needs assigning and the case goes straight to watching.
//! - The Idempotency-Key is a UUID v5 of the case id, its generation and the
//!   resolved target: identical on every retry of the assignment and after a
//!   crash; a re-run after `holdclear cases retry` gets a new one.
//! - Transient failures (and `INVALID_CREDENTIALS`, which is not the order's
//!   fault) reschedule the step after [`retry::durable_delay`], at least the
//!   server's `Retry-After`; once `retry.max_elapsed` has passed since the
//!   first failure of the streak the case escalates `RETRIES_EXHAUSTED`. Any
//!   success ends the streak.
//! - Terminal escalations (every reason but `HOLD_PERSISTS`) have level
//!   `critical`. `HOLD_PERSISTS` uses the configured thresholds, each emitted
//!   once per case (per generation), measured from the start of the watch;
//!   the case keeps being watched, at the longest poll interval once a
//!   threshold has passed.
//! - Every read of the order is looked at the same way ([`HoldSeen`]): the
//!   first read of an order known by its web order id, and each look while
//!   watching. A hold released (by the assignment, or by a person before
//!   holdclear acted) ends the case `released`, with nothing assigned in
//!   the second case. A hold still on an order whose status takes no
//!   assignment any more (`SHIPPED`, `CLOSED`, `CANCELLED`) ends it
//!   `ASSIGNMENT_LOCKED`, the commerce API's own answer to an assignment
//!   there: no assignment call, no more watching.

use std::ops::ControlFlow;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::commerce::{
    AccountStatus, AssignmentReceipt, CommerceError, ErrorCode, Order, SmartAccount,
    VirtualAccount, choose_virtual_account,
};
use crate::config::EngineSettings;
use crate::domain::{
    Accepted, AccountSelector, AccountType, Assignment, Case, CaseState, Decision, Domain,
    EscalationLevel, EscalationReason, HistoryEntry, HoldReason, OrderId, OutboundEvent,
    ResolvedTarget, SalesOrderNumber, Stage, Target,
};
use crate::retry;

/// Namespace of the Idempotency-Keys (UUID v5).
const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x6c1f_2a4e_0b7d_4f3a_9e51_3d2c_8a77_b104);

/// Calls one step may make at most; a plan asking for more is a bug and
/// ends the step as a transient failure.
pub const MAX_CALLS_PER_STEP: usize = 8;

/// Why a transition cannot be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MachineError {
    /// The outcome does not belong to the case's state (e.g. an assignment
    /// receipt for a case that is deciding), or the case is terminal.
    #[error("outcome {outcome} does not apply to a case in state {state}")]
    Unexpected {
        /// The case's state.
        state: CaseState,
        /// The outcome's name.
        outcome: &'static str,
    },
}

/// A call a step asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// Apply the rules to the held order.
    Decide,
    /// Search the Smart Account.
    FindAccount {
        /// Which account.
        selector: AccountSelector,
        /// Of which type.
        account_type: AccountType,
    },
    /// List the Virtual Accounts of an account.
    VirtualAccounts {
        /// The account's domain.
        domain: Domain,
        /// Read from the API, never from the client's cache: asked before
        /// escalating on a list that lacks the wanted account.
        fresh: bool,
    },
    /// Read the order.
    ReadOrder {
        /// Which order.
        order: OrderId,
    },
    /// Assign the Smart Account.
    Assign {
        /// The order, by the number the assignment endpoint takes.
        order: SalesOrderNumber,
        /// What to assign.
        assignment: Assignment,
        /// The case's stable key.
        idempotency_key: String,
    },
}

impl Call {
    /// A short name for logs, history and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Decide => "rules.decide",
            Self::FindAccount { .. } => "find_account",
            Self::VirtualAccounts { .. } => "virtual_accounts",
            Self::ReadOrder { .. } => "read_order",
            Self::Assign { .. } => "assign",
        }
    }

    fn detail(&self) -> Value {
        match self {
            Self::Decide => json!({}),
            Self::FindAccount {
                selector,
                account_type,
            } => json!({"selector": selector.to_string(), "accountType": account_type.as_str()}),
            Self::VirtualAccounts { domain, fresh } => {
                json!({"domain": domain.as_str(), "fresh": fresh})
            }
            Self::ReadOrder { order } => json!({"order": order.to_string()}),
            Self::Assign {
                order,
                assignment,
                idempotency_key,
            } => json!({
                "salesOrderNumber": order.as_str(),
                "smartAccountDomain": assignment.smart_account_domain,
                "accountType": assignment.account_type.as_str(),
                "virtualAccountName": assignment.virtual_account_name,
                "idempotencyKey": idempotency_key,
            }),
        }
    }
}

/// The answer to a [`Call`].
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// The rules' decision, `None` when no rule matched.
    Decision(Option<Decision>),
    /// To [`Call::FindAccount`]: the exact match, `None` when there is none.
    Account(Result<Option<SmartAccount>, CommerceError>),
    /// To [`Call::VirtualAccounts`]: every Virtual Account of the account.
    VirtualAccounts(Result<Vec<VirtualAccount>, CommerceError>),
    /// To [`Call::ReadOrder`]: the order as the commerce API shows it.
    Order(Result<Order, CommerceError>),
    /// To [`Call::Assign`]: the receipt of an accepted assignment.
    Assigned(Result<AssignmentReceipt, CommerceError>),
}

impl Reply {
    fn result(&self) -> Value {
        fn err(e: &CommerceError) -> Value {
            match e {
                CommerceError::Transient {
                    retry_after,
                    detail,
                } => json!({
                    "outcome": "transient",
                    "detail": detail,
                    "retryAfterMs": retry_after.map(|d| d.as_millis() as u64),
                }),
                CommerceError::Permanent { code, detail } => {
                    json!({"outcome": "permanent", "code": code.as_str(), "detail": detail})
                }
            }
        }
        match self {
            Self::Decision(Some(d)) => json!({"outcome": "ok", "rule": d.rule}),
            Self::Decision(None) => json!({"outcome": "no_rule_matched"}),
            Self::Account(Ok(Some(a))) => json!({
                "outcome": "ok", "id": a.id, "domain": a.domain, "type": a.account_type,
                "status": a.status.as_str(),
            }),
            Self::Account(Ok(None)) => json!({"outcome": "not_found"}),
            Self::VirtualAccounts(Ok(vas)) => json!({
                "outcome": "ok",
                "virtualAccounts": vas.iter().map(|v| json!({
                    "name": v.name, "isDefault": v.is_default, "public": v.public,
                })).collect::<Vec<_>>(),
            }),
            Self::Order(Ok(o)) => json!({
                "outcome": "ok",
                "salesOrderNumber": o.sales_order_number.as_str(),
                "status": o.status,
                "smartAccountHoldReleased": o.smart_account_hold_released(),
                "otherHolds": o.other_holds(),
            }),
            Self::Assigned(Ok(r)) => {
                json!({"outcome": "ok", "assignmentId": r.assignment_id, "status": r.status})
            }
            Self::Account(Err(e))
            | Self::VirtualAccounts(Err(e))
            | Self::Order(Err(e))
            | Self::Assigned(Err(e)) => err(e),
        }
    }

    /// `ok`, `transient` or `permanent`, for metrics.
    pub fn class(&self) -> &'static str {
        let e = match self {
            Self::Decision(_) => return "ok",
            Self::Account(r) => r.as_ref().err(),
            Self::VirtualAccounts(r) => r.as_ref().err(),
            Self::Order(r) => r.as_ref().err(),
            Self::Assigned(r) => r.as_ref().err(),
        };
        match e {
            None => "ok",
            Some(CommerceError::Transient { .. }) => "transient",
            Some(CommerceError::Permanent { .. }) => "permanent",
        }
    }
}

/// How the resolve step ended well.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Assign this.
    Assign {
        /// The order's sales order number (read from the order if the event had none).
        sales_order_number: SalesOrderNumber,
        /// What to assign.
        assignment: Assignment,
        /// The rule's fallback is used.
        via_fallback: bool,
    },
    /// The hold's pending account is ACTIVE now: nothing to assign, watch.
    AlreadyActive {
        /// The account's domain.
        smart_account_domain: String,
        /// Its type.
        account_type: AccountType,
        /// It was the rule's fallback target.
        via_fallback: bool,
    },
}

/// The order statuses that still take a Smart Account assignment (the
/// commerce API answers `ASSIGNMENT_LOCKED` past them).
const ASSIGNABLE_STATUSES: [&str; 2] = ["ENTERED", "BOOKED"];

/// What one read of the order says of the Smart Account hold.
#[derive(Clone, Debug, PartialEq)]
pub enum HoldSeen {
    /// Still on: the work goes on.
    On {
        /// Other holds on the order.
        other_holds: Vec<String>,
    },
    /// Released, by the assignment or by a person.
    Released {
        /// When, as the order says (else the time of the look).
        released_at: Option<DateTime<Utc>>,
        /// Other holds still on the order.
        other_holds: Vec<String>,
        /// The Smart Account on the order, if it shows one.
        smart_account_domain: Option<String>,
    },
    /// Still on, but the order's status (`SHIPPED`, `CLOSED`, `CANCELLED`)
    /// takes no assignment: no assignment of holdclear's can clear it.
    Locked {
        /// The order's status.
        status: String,
    },
}

impl HoldSeen {
    /// What `order` shows.
    pub fn of(order: &Order) -> Self {
        if order.smart_account_hold_released() {
            Self::Released {
                released_at: order.smart_account_hold_released_at(),
                other_holds: order.other_holds(),
                smart_account_domain: order.smart_account_domain.clone(),
            }
        } else if ASSIGNABLE_STATUSES.contains(&order.status.as_str()) {
            Self::On {
                other_holds: order.other_holds(),
            }
        } else {
            Self::Locked {
                status: order.status.clone(),
            }
        }
    }
}

/// The escalation detail of an order whose status takes no assignment.
fn locked_detail(status: &str) -> String {
    format!(
        "the order is {status} with the Smart Account hold still on: it takes no Smart Account assignment any more, so holdclear stopped working it"
    )
}

/// How one step ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The order, known by its web order id only, was read: its sales order
    /// number is known (and recorded by the scheduler before this applies).
    Identified {
        /// The order's sales order number.
        sales_order_number: SalesOrderNumber,
        /// What the read showed: the work goes on only while the hold is on.
        seen: HoldSeen,
    },
    /// A rule matched.
    Decided(Decision),
    /// The account, type and Virtual Account are known.
    Resolved(Resolution),
    /// The assignment was accepted.
    Assigned(AssignmentReceipt),
    /// The order still has the Smart Account hold.
    StillHeld {
        /// Other holds on the order.
        other_holds: Vec<String>,
    },
    /// The Smart Account hold is released.
    Released {
        /// When, as the order says (else the time of the look).
        released_at: Option<DateTime<Utc>>,
        /// Other holds still on the order.
        other_holds: Vec<String>,
    },
    /// A person must act.
    Escalate {
        /// The contract's reason code.
        reason: EscalationReason,
        /// What exactly happened, one line.
        detail: String,
    },
    /// Try the step again later.
    Transient {
        /// The call that failed.
        call: &'static str,
        /// What the server asked for.
        retry_after: Option<Duration>,
        /// What happened, one line.
        detail: String,
    },
}

impl Outcome {
    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Identified { .. } => "identified",
            Self::Decided(_) => "decided",
            Self::Resolved(_) => "resolved",
            Self::Assigned(_) => "assigned",
            Self::StillHeld { .. } => "still_held",
            Self::Released { .. } => "released",
            Self::Escalate { .. } => "escalated",
            Self::Transient { .. } => "transient",
        }
    }
}

/// What [`plan`] says next.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// Make this call and plan again with its reply.
    Call(Call),
    /// The step is over.
    Done(Outcome),
    /// The case is terminal: nothing to do.
    Stop,
}

/// The history entry of one call and its reply.
pub fn call_entry(
    state: CaseState,
    call: &Call,
    reply: &Reply,
    at: DateTime<Utc>,
    took: Duration,
) -> HistoryEntry {
    HistoryEntry {
        at,
        kind: "call",
        state,
        detail: json!({
            "call": call.name(),
            "args": call.detail(),
            "result": reply.result(),
            "ms": took.as_millis() as u64,
        }),
    }
}

/// The result of [`apply`].
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    /// The case after the step.
    pub case: Case,
    /// What to add to its history (besides the calls).
    pub history: Vec<HistoryEntry>,
    /// Events to emit (one outbox row each).
    pub events: Vec<OutboundEvent>,
}

/// How a failed commerce call counts.
enum Failure {
    Transient {
        retry_after: Option<Duration>,
        detail: String,
    },
    Escalate {
        reason: EscalationReason,
        detail: String,
    },
}

/// Maps a commerce failure to what the engine does about it. Permanent
/// codes map to escalation reasons; `INVALID_CREDENTIALS` is not the order's
/// fault and counts as transient (against the retry budget).
fn classify(call: &'static str, err: &CommerceError) -> Failure {
    match err {
        CommerceError::Transient {
            retry_after,
            detail,
        } => Failure::Transient {
            retry_after: *retry_after,
            detail: format!("{call}: {detail}"),
        },
        CommerceError::Permanent { code, detail } => {
            let detail = format!("{call}: {code}: {detail}");
            let reason = match code {
                ErrorCode::InvalidCredentials => {
                    return Failure::Transient {
                        retry_after: None,
                        detail,
                    };
                }
                ErrorCode::AssignmentLocked => EscalationReason::AssignmentLocked,
                ErrorCode::OrderAccessDenied | ErrorCode::OrderNotFound => {
                    EscalationReason::OrderNotAccessible
                }
                ErrorCode::SmartAccountNotFound => EscalationReason::SmartAccountNotFound,
                ErrorCode::SmartAccountNotActive => EscalationReason::SmartAccountNotActive,
                ErrorCode::VirtualAccountNotFound => EscalationReason::VirtualAccountNotFound,
                ErrorCode::AmbiguousMatch => EscalationReason::AmbiguousMatch,
                ErrorCode::TncError | ErrorCode::BizRuleFail | ErrorCode::Other(_) => {
                    EscalationReason::AssignmentRejected
                }
            };
            Failure::Escalate { reason, detail }
        }
    }
}

fn failed(call: &'static str, err: &CommerceError) -> Next {
    Next::Done(match classify(call, err) {
        Failure::Transient {
            retry_after,
            detail,
        } => Outcome::Transient {
            call,
            retry_after,
            detail,
        },
        Failure::Escalate { reason, detail } => Outcome::Escalate { reason, detail },
    })
}

fn escalate(reason: EscalationReason, detail: impl Into<String>) -> Next {
    Next::Done(Outcome::Escalate {
        reason,
        detail: detail.into(),
    })
}

/// A reply of the wrong kind: the executor and the plan disagree (a bug).
/// The step ends as a transient failure, so the case retries within its
/// budget and escalates `RETRIES_EXHAUSTED` rather than spinning.
fn mismatch(expected: &'static str, got: &Reply) -> Next {
    Next::Done(Outcome::Transient {
        call: expected,
        retry_after: None,
        detail: format!("internal error: expected a {expected} reply, got {got:?}"),
    })
}

/// The next call of the case's current step, or the step's outcome.
pub fn plan(case: &Case, replies: &[Reply]) -> Next {
    if replies.len() > MAX_CALLS_PER_STEP {
        return Next::Done(Outcome::Transient {
            call: "step",
            retry_after: None,
            detail: format!("internal error: more than {MAX_CALLS_PER_STEP} calls in one step"),
        });
    }
    match &case.stage {
        Stage::Deciding => plan_decide(case, replies),
        Stage::Resolving { decision } => plan_resolve(case, decision, replies),
        Stage::Assigning {
            decision,
            order,
            assignment,
            key,
            ..
        } => plan_assign(case, decision, (order, assignment, key), replies),
        Stage::Watching { .. } => plan_watch(case, replies),
        Stage::Released { .. } | Stage::Escalated { .. } | Stage::Merged { .. } => Next::Stop,
    }
}

/// A case opened by a web order id reads its order first: every later step,
/// event and merge then knows the sales order number (see
/// `Store::identify_order`).
fn plan_identify(case: &Case, replies: &[Reply]) -> Next {
    match replies.first() {
        None => Next::Call(Call::ReadOrder {
            order: case.order.clone(),
        }),
        Some(Reply::Order(Ok(order))) => Next::Done(Outcome::Identified {
            sales_order_number: order.sales_order_number.clone(),
            seen: HoldSeen::of(order),
        }),
        Some(Reply::Order(Err(e))) => failed("read_order", e),
        Some(other) => mismatch("read_order", other),
    }
}

fn plan_decide(case: &Case, replies: &[Reply]) -> Next {
    if case.order.sales_order_number.is_none() {
        return plan_identify(case, replies);
    }
    let order = &case.event.data;
    if let Some(t) = order
        .order_type
        .as_ref()
        .filter(|t| t.takes_no_assignment())
    {
        return escalate(
            EscalationReason::AssignmentLocked,
            format!("order type {t} takes no Smart Account assignment"),
        );
    }
    match replies.first() {
        None => Next::Call(Call::Decide),
        Some(Reply::Decision(Some(d))) => Next::Done(Outcome::Decided(d.clone())),
        Some(Reply::Decision(None)) => escalate(
            EscalationReason::NoRuleMatched,
            "no default rule matches the order",
        ),
        Some(other) => mismatch("rules.decide", other),
    }
}

/// Why a candidate target could not be used.
enum Unusable {
    NotFound(String),
    NotActive(String),
}

impl Unusable {
    fn reason(&self) -> EscalationReason {
        match self {
            Self::NotFound(_) => EscalationReason::SmartAccountNotFound,
            Self::NotActive(_) => EscalationReason::SmartAccountNotActive,
        }
    }

    fn detail(&self) -> &str {
        match self {
            Self::NotFound(d) | Self::NotActive(d) => d,
        }
    }
}

/// Resolve: the first usable account of the rule's target and fallback,
/// its Virtual Account, and the sales order number if still unknown. Each
/// part `Break`s with the next call or the step's end.
fn plan_resolve(case: &Case, decision: &Decision, replies: &[Reply]) -> Next {
    let mut replies = replies.iter();
    match resolve(case, decision, &mut replies) {
        ControlFlow::Continue(next) | ControlFlow::Break(next) => next,
    }
}

type Replies<'r> = std::slice::Iter<'r, Reply>;

/// A part of a step: its result, or `Break` with the next call or the step's end.
type Part<T> = ControlFlow<Next, T>;

fn resolve(case: &Case, decision: &Decision, replies: &mut Replies<'_>) -> Part<Next> {
    let (target, account, via_fallback) = match choose_account(case, decision, replies)? {
        Chosen::Assign(target, account, via_fallback) => (target, account, via_fallback),
        Chosen::AlreadyActive(done) => return ControlFlow::Continue(done),
    };
    let va = virtual_account(target, &account, replies)?;
    let sales_order_number = sales_order_number(case, replies)?;
    ControlFlow::Continue(Next::Done(Outcome::Resolved(Resolution::Assign {
        sales_order_number,
        assignment: Assignment {
            smart_account_domain: account.domain,
            account_type: target.account_type,
            virtual_account_name: va,
        },
        via_fallback,
    })))
}

/// The pending account of a `PENDING_SMART_ACCOUNT` hold, if any.
fn pending_account(case: &Case) -> Option<&Domain> {
    match case.event.data.hold_reason {
        HoldReason::PendingSmartAccount => {
            (case.event.data.smart_account.as_ref()).and_then(|s| s.domain.as_ref())
        }
        HoldReason::NoSmartAccount => None,
    }
}

/// What [`choose_account`] found.
enum Chosen<'d> {
    /// Assign this target's account (the rule's fallback if `true`).
    Assign(&'d Target, SmartAccount, bool),
    /// The hold's pending account is ACTIVE now: the step is done.
    AlreadyActive(Next),
}

/// The rule's target, else its fallback: the first whose account exists and
/// is ACTIVE; when none is, the escalation naming what happened to each.
fn choose_account<'d>(
    case: &Case,
    decision: &'d Decision,
    replies: &mut Replies<'_>,
) -> Part<Chosen<'d>> {
    let pending = pending_account(case);
    let candidates = std::iter::once((&decision.target, false))
        .chain(decision.fallback.iter().map(|f| (f, true)));
    let mut unusable: Vec<Unusable> = Vec::new();
    for (target, via_fallback) in candidates {
        let which = if via_fallback { "fallback" } else { "rule's" };
        let Some(account) = find_account(target, replies)? else {
            unusable.push(Unusable::NotFound(format!(
                "the {which} Smart Account ({}, {}) does not exist",
                target.account, target.account_type
            )));
            continue;
        };
        let is_pending = pending.is_some_and(|p| account.domain.eq_ignore_ascii_case(p.as_str()));
        if account.status != AccountStatus::Active {
            unusable.push(Unusable::NotActive(format!(
                "the {which} Smart Account {} is {}{}",
                account.domain,
                account.status.as_str(),
                if is_pending {
                    " (the pending account of the hold)"
                } else {
                    ""
                }
            )));
            continue;
        }
        if is_pending {
            return ControlFlow::Continue(Chosen::AlreadyActive(Next::Done(Outcome::Resolved(
                Resolution::AlreadyActive {
                    smart_account_domain: account.domain,
                    account_type: target.account_type,
                    via_fallback,
                },
            ))));
        }
        return ControlFlow::Continue(Chosen::Assign(target, account, via_fallback));
    }
    // Every candidate (there is at least the rule's target) was unusable.
    let reason = unusable
        .first()
        .map_or(EscalationReason::SmartAccountNotFound, Unusable::reason);
    let detail = unusable
        .iter()
        .map(Unusable::detail)
        .collect::<Vec<_>>()
        .join("; ");
    ControlFlow::Break(escalate(reason, detail))
}

/// The account search for `target`: `None` when it does not exist.
fn find_account(target: &Target, replies: &mut Replies<'_>) -> Part<Option<SmartAccount>> {
    match replies.next() {
        None => ControlFlow::Break(Next::Call(Call::FindAccount {
            selector: target.account.clone(),
            account_type: target.account_type,
        })),
        Some(Reply::Account(Ok(found))) => ControlFlow::Continue(found.clone()),
        Some(Reply::Account(Err(CommerceError::Permanent {
            code: ErrorCode::SmartAccountNotFound,
            ..
        }))) => ControlFlow::Continue(None),
        Some(Reply::Account(Err(e))) => ControlFlow::Break(failed("find_account", e)),
        Some(other) => ControlFlow::Break(mismatch("find_account", other)),
    }
}

/// The PUBLIC Virtual Account of `account` the target names.
fn virtual_account(
    target: &Target,
    account: &SmartAccount,
    replies: &mut Replies<'_>,
) -> Part<String> {
    let domain = match Domain::parse(&account.domain) {
        Ok(d) => d,
        Err(e) => {
            return ControlFlow::Break(escalate(
                EscalationReason::SmartAccountNotFound,
                format!("the account search returned an unusable domain: {e}"),
            ));
        }
    };
    // A list (perhaps the client's cached one) that lacks the wanted
    // account is read once more from the API before the case escalates.
    for fresh in [false, true] {
        match replies.next() {
            None => {
                return ControlFlow::Break(Next::Call(Call::VirtualAccounts { domain, fresh }));
            }
            Some(Reply::VirtualAccounts(Ok(vas))) => {
                if let Some(va) = choose_virtual_account(vas, &target.virtual_account) {
                    return ControlFlow::Continue(va.name.clone());
                }
            }
            Some(Reply::VirtualAccounts(Err(e))) => {
                return ControlFlow::Break(failed("virtual_accounts", e));
            }
            Some(other) => return ControlFlow::Break(mismatch("virtual_accounts", other)),
        }
    }
    ControlFlow::Break(escalate(
        EscalationReason::VirtualAccountNotFound,
        format!(
            "Smart Account {} has no PUBLIC virtual account {}",
            account.domain, target.virtual_account
        ),
    ))
}

/// The case's sales order number, read from the order if still unknown.
fn sales_order_number(case: &Case, replies: &mut Replies<'_>) -> Part<SalesOrderNumber> {
    if let Some(so) = &case.order.sales_order_number {
        return ControlFlow::Continue(so.clone());
    }
    match replies.next() {
        None => ControlFlow::Break(Next::Call(Call::ReadOrder {
            order: case.order.clone(),
        })),
        Some(Reply::Order(Ok(order))) => ControlFlow::Continue(order.sales_order_number.clone()),
        Some(Reply::Order(Err(e))) => ControlFlow::Break(failed("read_order", e)),
        Some(other) => ControlFlow::Break(mismatch("read_order", other)),
    }
}

/// Assign; a refusal saying the account or its Virtual Account is not what
/// the resolve saw (perhaps from the client's cache) resolves again in the
/// same step, from fresh reads (the client dropped what it kept about the
/// account): the fallback, or the escalation the fresh answers call for.
/// Fresh reads that pick the refused target again leave the refusal
/// standing: nothing is assigned against the API's word.
fn plan_assign(
    case: &Case,
    decision: &Decision,
    (order, assignment, key): (&SalesOrderNumber, &Assignment, &str),
    replies: &[Reply],
) -> Next {
    match replies.first() {
        None => Next::Call(Call::Assign {
            order: order.clone(),
            assignment: assignment.clone(),
            idempotency_key: key.to_owned(),
        }),
        Some(Reply::Assigned(Ok(receipt))) => Next::Done(Outcome::Assigned(receipt.clone())),
        Some(Reply::Assigned(Err(e @ CommerceError::Permanent { code, .. })))
            if code.says_resolve_is_stale() =>
        {
            let mut rest = replies[1..].iter();
            let (ControlFlow::Continue(next) | ControlFlow::Break(next)) =
                resolve(case, decision, &mut rest);
            match next {
                Next::Done(Outcome::Resolved(Resolution::Assign {
                    assignment: again, ..
                })) if same_target(&again, assignment) => failed("assign", e),
                other => other,
            }
        }
        Some(Reply::Assigned(Err(e))) => failed("assign", e),
        Some(other) => mismatch("assign", other),
    }
}

fn same_target(a: &Assignment, b: &Assignment) -> bool {
    a.smart_account_domain
        .eq_ignore_ascii_case(&b.smart_account_domain)
        && a.account_type == b.account_type
        && a.virtual_account_name == b.virtual_account_name
}

fn plan_watch(case: &Case, replies: &[Reply]) -> Next {
    match replies.first() {
        None => Next::Call(Call::ReadOrder {
            order: case.order.clone(),
        }),
        Some(Reply::Order(Ok(order))) => Next::Done(match HoldSeen::of(order) {
            HoldSeen::On { other_holds } => Outcome::StillHeld { other_holds },
            HoldSeen::Released {
                released_at,
                other_holds,
                ..
            } => Outcome::Released {
                released_at,
                other_holds,
            },
            HoldSeen::Locked { status } => Outcome::Escalate {
                reason: EscalationReason::AssignmentLocked,
                detail: locked_detail(&status),
            },
        }),
        Some(Reply::Order(Err(e))) => failed("read_order", e),
        Some(other) => mismatch("read_order", other),
    }
}

/// The Idempotency-Key of one assignment of one case generation.
pub fn idempotency_key(case_id: Uuid, generation: u32, assignment: &Assignment) -> String {
    let name = format!(
        "{case_id}/{generation}/{}/{}/{}",
        assignment.smart_account_domain.to_ascii_lowercase(),
        assignment.account_type.as_str(),
        assignment.virtual_account_name
    );
    Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, name.as_bytes()).to_string()
}

fn after(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// The case after `outcome`, with its history entries and events: one
/// function per outcome, each checking the state it applies to.
pub fn apply(
    case: &Case,
    outcome: Outcome,
    now: DateTime<Utc>,
    settings: &EngineSettings,
) -> Result<Transition, MachineError> {
    let mut step = Step::new(case, &outcome, now);
    if case.state().is_terminal() {
        return Err(step.unexpected());
    }
    match outcome {
        Outcome::Identified {
            sales_order_number,
            seen,
        } => step.identified(sales_order_number, seen)?,
        Outcome::Decided(decision) => step.decided(decision)?,
        Outcome::Resolved(Resolution::Assign {
            sales_order_number,
            assignment,
            via_fallback,
        }) => step.resolved_assign(sales_order_number, assignment, via_fallback)?,
        Outcome::Resolved(Resolution::AlreadyActive {
            smart_account_domain,
            account_type,
            via_fallback,
        }) => step.resolved_active(smart_account_domain, account_type, via_fallback)?,
        Outcome::Assigned(receipt) => step.assigned(receipt, settings)?,
        Outcome::StillHeld { other_holds } => step.still_held(other_holds, settings)?,
        Outcome::Released {
            released_at,
            other_holds,
        } => step.released(released_at, other_holds)?,
        Outcome::Escalate { reason, detail } => step.escalate(reason, detail),
        Outcome::Transient {
            call,
            retry_after,
            detail,
        } => step.transient(call, retry_after, detail, settings),
    }
    Ok(step.done())
}

/// One [`apply`] in progress: the case before, the case after, and what the
/// step adds to the history and the outbox.
struct Step<'a> {
    case: &'a Case,
    outcome: &'static str,
    now: DateTime<Utc>,
    next: Case,
    history: Vec<HistoryEntry>,
    events: Vec<OutboundEvent>,
}

impl<'a> Step<'a> {
    fn new(case: &'a Case, outcome: &Outcome, now: DateTime<Utc>) -> Self {
        let mut next = case.clone();
        // Any outcome but a transient failure ends the streak of failures.
        if !matches!(outcome, Outcome::Transient { .. }) {
            next.attempt = 0;
            next.retry_since = None;
        }
        Self {
            case,
            outcome: outcome.name(),
            now,
            next,
            history: Vec::new(),
            events: Vec::new(),
        }
    }

    fn unexpected(&self) -> MachineError {
        MachineError::Unexpected {
            state: self.case.state(),
            outcome: self.outcome,
        }
    }

    /// `Ok` when the case is in `state`, else the outcome does not apply.
    fn expect(&self, state: CaseState) -> Result<(), MachineError> {
        if self.case.state() == state {
            Ok(())
        } else {
            Err(self.unexpected())
        }
    }

    /// A history line, in the state the case is in by now.
    fn entry(&mut self, kind: &'static str, detail: Value) {
        self.history.push(HistoryEntry {
            at: self.now,
            kind,
            state: self.next.state(),
            detail,
        });
    }

    fn done(self) -> Transition {
        Transition {
            case: self.next,
            history: self.history,
            events: self.events,
        }
    }

    /// The decision being resolved: a resolving case's, or an assigning
    /// one's whose assignment was refused and resolved again.
    fn resolving(&self) -> Result<&'a Decision, MachineError> {
        let case: &'a Case = self.case;
        match &case.stage {
            Stage::Resolving { decision } | Stage::Assigning { decision, .. } => Ok(decision),
            _ => Err(self.unexpected()),
        }
    }

    /// The order's sales order number learnt; the rules decide next while
    /// the hold is on, else the case ends as a watched one would.
    fn identified(
        &mut self,
        sales_order_number: SalesOrderNumber,
        seen: HoldSeen,
    ) -> Result<(), MachineError> {
        self.expect(CaseState::Deciding)?;
        if self.case.order.sales_order_number.is_some() {
            return Err(self.unexpected());
        }
        self.next.order.sales_order_number = Some(sales_order_number);
        match seen {
            HoldSeen::On { .. } => self.next.next_action_at = Some(self.now),
            HoldSeen::Released {
                released_at,
                other_holds,
                smart_account_domain,
            } => self.release(released_at, other_holds, smart_account_domain),
            HoldSeen::Locked { status } => {
                self.escalate(EscalationReason::AssignmentLocked, locked_detail(&status));
            }
        }
        Ok(())
    }

    fn decided(&mut self, decision: Decision) -> Result<(), MachineError> {
        self.expect(CaseState::Deciding)?;
        self.next.stage = Stage::Resolving {
            decision: decision.clone(),
        };
        self.next.next_action_at = Some(self.now);
        self.entry(
            "decided",
            json!({
                "rule": decision.rule,
                "rulesHash": decision.rules_hash,
                "target": decision.target.to_string(),
                "fallback": decision.fallback.as_ref().map(ToString::to_string),
            }),
        );
        Ok(())
    }

    fn resolved_assign(
        &mut self,
        sales_order_number: SalesOrderNumber,
        assignment: Assignment,
        via_fallback: bool,
    ) -> Result<(), MachineError> {
        let decision = self.resolving()?;
        let key = idempotency_key(self.case.id, self.case.generation, &assignment);
        self.next.order.sales_order_number = Some(sales_order_number.clone());
        self.entry(
            "resolved",
            json!({
                "smartAccountDomain": assignment.smart_account_domain,
                "accountType": assignment.account_type.as_str(),
                "virtualAccountName": assignment.virtual_account_name,
                "viaFallback": via_fallback,
                "idempotencyKey": key,
            }),
        );
        self.next.stage = Stage::Assigning {
            decision: decision.clone(),
            order: sales_order_number,
            assignment,
            via_fallback,
            key,
        };
        self.next.next_action_at = Some(self.now);
        Ok(())
    }

    fn resolved_active(
        &mut self,
        smart_account_domain: String,
        account_type: AccountType,
        via_fallback: bool,
    ) -> Result<(), MachineError> {
        let decision = self.resolving()?;
        let target = ResolvedTarget {
            smart_account_domain: smart_account_domain.clone(),
            account_type,
            virtual_account_name: None,
            via_fallback,
        };
        self.start_watch(Some(decision.clone()), target, None, None);
        self.entry(
            "resolved",
            json!({
                "smartAccountDomain": smart_account_domain,
                "accountType": account_type.as_str(),
                "viaFallback": via_fallback,
                "nothingToAssign": "the pending Smart Account of the hold is ACTIVE now",
            }),
        );
        // The hold may already be gone: look at once.
        self.next.next_action_at = Some(self.now);
        Ok(())
    }

    fn start_watch(
        &mut self,
        decision: Option<Decision>,
        target: ResolvedTarget,
        key: Option<String>,
        assignment: Option<Accepted>,
    ) {
        self.next.stage = Stage::Watching {
            decision,
            target,
            key,
            assignment,
            since: self.now,
        };
        self.next.polls = 0;
        self.next.escalation_level = 0;
    }

    fn assigned(
        &mut self,
        receipt: AssignmentReceipt,
        settings: &EngineSettings,
    ) -> Result<(), MachineError> {
        let case = self.case;
        let Stage::Assigning {
            decision,
            assignment,
            via_fallback,
            key,
            ..
        } = &case.stage
        else {
            return Err(self.unexpected());
        };
        let assignment = assignment.clone();
        let target = ResolvedTarget {
            smart_account_domain: assignment.smart_account_domain.clone(),
            account_type: assignment.account_type,
            virtual_account_name: Some(assignment.virtual_account_name.clone()),
            via_fallback: *via_fallback,
        };
        let accepted = Accepted {
            id: receipt.assignment_id.clone(),
            at: self.now,
        };
        self.start_watch(
            Some(decision.clone()),
            target,
            Some(key.clone()),
            Some(accepted),
        );
        self.next.next_action_at = Some(after(self.now, settings.poll_interval));
        self.entry(
            "assigned",
            json!({"assignmentId": receipt.assignment_id, "status": receipt.status}),
        );
        self.events.push(OutboundEvent::SmartAccountAssigned {
            smart_account_domain: assignment.smart_account_domain,
            account_type: assignment.account_type,
            virtual_account_name: assignment.virtual_account_name,
            rule: case.rule().unwrap_or_default().to_owned(),
            assignment_id: receipt.assignment_id,
            attempts: case.attempt + 1,
        });
        Ok(())
    }

    fn still_held(
        &mut self,
        other_holds: Vec<String>,
        settings: &EngineSettings,
    ) -> Result<(), MachineError> {
        let (case, now) = (self.case, self.now);
        let Stage::Watching {
            since, assignment, ..
        } = &case.stage
        else {
            return Err(self.unexpected());
        };
        let since = *since;
        let assignment_id = assignment.as_ref().map(|a| a.id.as_str());
        self.next.polls = case.polls.saturating_add(1);
        self.hold_persists(since, assignment_id, settings);
        let delay = if self.next.escalation_level > 0 {
            settings.poll_max_interval
        } else {
            retry::poll_delay(
                settings.poll_interval,
                settings.poll_max_interval,
                self.next.polls,
            )
        };
        let mut at = after(now, delay);
        if let Some(threshold) = settings.escalation.get(self.next.escalation_level as usize) {
            at = at.min(after(since, threshold.after)).max(now);
        }
        self.next.next_action_at = Some(at);
        let polls = self.next.polls;
        self.entry(
            "still_held",
            json!({"polls": polls, "otherHolds": other_holds, "nextLookAt": at}),
        );
        Ok(())
    }

    /// Every `HOLD_PERSISTS` threshold passed since the watch began and not
    /// yet emitted: a history line and an event each.
    fn hold_persists(
        &mut self,
        since: DateTime<Utc>,
        assignment_id: Option<&str>,
        settings: &EngineSettings,
    ) {
        let watched = (self.now - since).to_std().unwrap_or_default();
        while let Some(threshold) = settings.escalation.get(self.next.escalation_level as usize) {
            if watched < threshold.after {
                break;
            }
            let detail = format!(
                "the Smart Account hold is still on {} after the watch began{}",
                humantime::format_duration(Duration::from_secs(watched.as_secs())),
                match assignment_id {
                    Some(id) => format!(" (assignment {id})"),
                    None => String::new(),
                }
            );
            self.entry(
                "escalated",
                json!({
                    "reason": EscalationReason::HoldPersists.as_str(),
                    "level": threshold.level.as_str(),
                    "detail": detail,
                }),
            );
            self.events.push(OutboundEvent::HoldEscalated {
                reason: EscalationReason::HoldPersists,
                level: threshold.level,
                held_seconds: self.case.held_seconds(self.now),
                detail,
                threshold: Some(self.next.escalation_level),
            });
            self.next.escalation_level += 1;
        }
    }

    fn released(
        &mut self,
        released_at: Option<DateTime<Utc>>,
        other_holds: Vec<String>,
    ) -> Result<(), MachineError> {
        self.expect(CaseState::Watching)?;
        self.release(released_at, other_holds, None);
        Ok(())
    }

    /// The case ends `released`, with its history line and event; the
    /// event names the case's target, else `on_order` (the account the
    /// order shows when nothing was assigned here) and, with no rule
    /// decided, no rule.
    fn release(
        &mut self,
        released_at: Option<DateTime<Utc>>,
        other_holds: Vec<String>,
        on_order: Option<String>,
    ) {
        let case = self.case;
        let released_at = released_at.unwrap_or(self.now);
        let progress = case.stage.progress();
        let smart_account_domain = (progress.target.as_ref())
            .map(|t| t.smart_account_domain.clone())
            .or(on_order);
        self.next.stage = Stage::Released {
            progress,
            released_at,
            closed_at: self.now,
        };
        self.next.next_action_at = None;
        self.entry(
            "released",
            json!({"releasedAt": released_at, "otherHolds": other_holds}),
        );
        self.events.push(OutboundEvent::HoldReleased {
            released_at,
            held_seconds: case.held_seconds(released_at),
            smart_account_domain,
            rule: case.rule().map(str::to_owned),
            other_holds,
        });
    }

    /// A terminal escalation (level `critical`).
    fn escalate(&mut self, reason: EscalationReason, detail: String) {
        self.next.stage = Stage::Escalated {
            reason,
            progress: self.case.stage.progress(),
            closed_at: self.now,
        };
        self.next.next_action_at = None;
        self.entry(
            "escalated",
            json!({
                "reason": reason.as_str(),
                "level": EscalationLevel::Critical.as_str(),
                "detail": detail,
            }),
        );
        self.events.push(OutboundEvent::HoldEscalated {
            reason,
            level: EscalationLevel::Critical,
            held_seconds: self.case.held_seconds(self.now),
            detail,
            threshold: None,
        });
    }

    /// Retry later, or escalate `RETRIES_EXHAUSTED` once the streak has
    /// lasted `retry.max_elapsed`.
    fn transient(
        &mut self,
        call: &'static str,
        retry_after: Option<Duration>,
        detail: String,
        settings: &EngineSettings,
    ) {
        let now = self.now;
        let since = self.case.retry_since.unwrap_or(now);
        let attempt = self.case.attempt.saturating_add(1);
        let elapsed = (now - since).to_std().unwrap_or_default();
        if elapsed >= settings.retry.max_elapsed {
            let detail = format!(
                "{attempt} attempts over {}; last: {detail}",
                humantime::format_duration(Duration::from_secs(elapsed.as_secs()))
            );
            return self.escalate(EscalationReason::RetriesExhausted, detail);
        }
        let delay =
            retry::durable_delay(&settings.retry, attempt).max(retry_after.unwrap_or_default());
        self.next.attempt = attempt;
        self.next.retry_since = Some(since);
        self.next.next_action_at = Some(after(now, delay));
        self.entry(
            "retry_scheduled",
            json!({
                "call": call,
                "attempt": attempt,
                "detail": detail,
                "delayMs": delay.as_millis() as u64,
            }),
        );
    }
}

/// Re-opens an escalated case (`holdclear cases retry`), as a new
/// generation (new envelope ids, new Idempotency-Key):
/// - an accepted assignment exists → back to `watching` (never assign twice);
/// - the case ran out of retries while assigning → back to `assigning` with
///   the same key, since the lost call may have been accepted and the key is
///   what makes the repeat harmless;
/// - otherwise → `deciding`, from scratch (rules, account, status).
pub fn retry(case: &Case, now: DateTime<Utc>) -> Result<Transition, MachineError> {
    let Stage::Escalated {
        reason, progress, ..
    } = &case.stage
    else {
        return Err(MachineError::Unexpected {
            state: case.state(),
            outcome: "retry",
        });
    };
    let mut next = case.clone();
    next.stage = reopened(*reason, progress.clone(), &case.order, now);
    next.generation = case.generation.saturating_add(1);
    next.escalation_level = 0;
    next.attempt = 0;
    next.retry_since = None;
    next.polls = 0;
    next.next_action_at = Some(now);
    let history = vec![HistoryEntry {
        at: now,
        kind: "retry",
        state: next.state(),
        detail: json!({
            "from": reason.as_str(),
            "generation": next.generation,
            "resumesAt": next.state().as_str(),
        }),
    }];
    Ok(Transition {
        case: next,
        history,
        events: Vec::new(),
    })
}

/// Where [`retry`] resumes an escalated case from what it had reached.
fn reopened(
    reason: EscalationReason,
    p: crate::domain::Progress,
    order: &OrderId,
    now: DateTime<Utc>,
) -> Stage {
    let target = p.target;
    match (p.assignment, target) {
        (Some(accepted), Some(target)) => {
            return Stage::Watching {
                decision: p.decision,
                target,
                key: p.idempotency_key,
                assignment: Some(accepted),
                since: now,
            };
        }
        (None, Some(target)) if reason == EscalationReason::RetriesExhausted => {
            let assignment = target.assignment();
            if let (Some(decision), Some(order), Some(assignment), Some(key)) = (
                p.decision,
                order.sales_order_number.clone(),
                assignment,
                p.idempotency_key,
            ) {
                return Stage::Assigning {
                    decision,
                    order,
                    assignment,
                    via_fallback: target.via_fallback,
                    key,
                };
            }
        }
        _ => {}
    }
    Stage::Deciding
}

#[cfg(test)]
mod tests;
