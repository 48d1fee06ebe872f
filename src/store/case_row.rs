//! The one mapping between a [`Case`] and a row of `cases` with its
//! `case_schedule` row: the columns read ([`case_columns!`], [`CaseRow`]),
//! the columns a step writes ([`case_input!`], [`case_set!`],
//! [`schedule_set!`], [`CaseColumns`]), and the two functions
//! that cross between them ([`CaseRow::decode`], [`CaseColumns::push`]).
//! Every statement that reads or writes a whole case uses these.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Postgres;
use sqlx::postgres::PgArguments;
use sqlx::types::Json;
use uuid::Uuid;

use super::StoreError;
use super::cases::CaseRecord;
use crate::domain::{
    Accepted, Assignment, Case, CaseState, Decision, EscalationReason, HeldOrderEvent, OrderId,
    Progress, ResolvedTarget, SalesOrderNumber, Stage, WebOrderId,
};

/// The columns a [`CaseRow`] is read from, in every `SELECT`/`RETURNING`:
/// the case's from `cases c`, its schedule's (due time, lease) from
/// `case_schedule s`, which a closed case has none of ([`case_from!`]).
macro_rules! case_columns {
    () => {
        "c.id, c.order_key, c.sales_order_number, c.web_order_id, c.state, c.event, c.held_at, \
         c.decision, c.target, c.idempotency_key, c.assignment_id, c.assigned_at, \
         c.watching_since, c.attempt, c.retry_since, c.polls, c.escalation_reason, \
         c.escalation_level, c.released_at, c.closed_at, c.generation, \
         s.due_at AS next_action_at, s.lease_owner, s.lease_expires_at, c.created_at, \
         c.updated_at, c.merged_into"
    };
}

/// The relation [`case_columns!`] reads: a case and its schedule row, if any.
macro_rules! case_from {
    () => {
        "cases c LEFT JOIN case_schedule s ON s.case_id = c.id"
    };
}

/// The written columns of many cases as a relation `t`, from the arrays
/// [`CaseColumns::bind`] binds as `$1..$22` (one element per case).
macro_rules! case_input {
    () => {
        "unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
                $7::jsonb[], $8::jsonb[], $9::text[], $10::text[], $11::timestamptz[], \
                $12::timestamptz[], $13::int4[], $14::timestamptz[], $15::int4[], $16::text[], \
                $17::int2[], $18::timestamptz[], $19::timestamptz[], $20::int4[], \
                $21::timestamptz[], $22::float8[]) \
         AS t(id, lease_owner, state, sales_order_number, rule_name, rules_hash, decision, \
              target, idempotency_key, assignment_id, assigned_at, watching_since, attempt, \
              retry_since, polls, escalation_reason, escalation_level, released_at, closed_at, \
              generation, next_action_at, hold)"
    };
}

/// `UPDATE cases c SET` this `FROM` a [`case_input!`] relation `i`. An id,
/// once known, is never unlearned; a new one is learned through
/// `identify_order` first, so the `coalesce`s change nothing in practice.
/// The due time and the lease are the schedule's ([`schedule_set!`]).
macro_rules! case_set {
    () => {
        "state = i.state, \
         sales_order_number = coalesce(c.sales_order_number, i.sales_order_number), \
         order_key = coalesce(c.sales_order_number, i.sales_order_number, c.order_key), \
         rule_name = i.rule_name, rules_hash = i.rules_hash, decision = i.decision, \
         target = i.target, idempotency_key = i.idempotency_key, \
         assignment_id = i.assignment_id, assigned_at = i.assigned_at, \
         watching_since = i.watching_since, attempt = i.attempt, retry_since = i.retry_since, \
         polls = i.polls, escalation_reason = i.escalation_reason, \
         escalation_level = i.escalation_level, released_at = i.released_at, \
         closed_at = i.closed_at, generation = i.generation, updated_at = now() "
    };
}

/// `UPDATE case_schedule s SET` this `FROM` a [`case_input!`] relation `i`
/// (an open case's schedule after its step). With `hold` the lease is kept
/// and extended (the case stays out of the due set as long), else given back
/// and the case is due at its next action.
macro_rules! schedule_set {
    () => {
        "due_at = CASE WHEN i.hold IS NULL THEN coalesce(i.next_action_at, now()) \
                       ELSE now() + make_interval(secs => i.hold) END, \
         lease_owner = CASE WHEN i.hold IS NULL THEN NULL ELSE s.lease_owner END, \
         lease_expires_at = CASE WHEN i.hold IS NULL THEN NULL \
                                 ELSE now() + make_interval(secs => i.hold) END "
    };
}

pub(super) use {case_columns, case_from, case_input, case_set, schedule_set};

pub(super) fn corrupt(detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        table: "cases",
        detail: detail.into(),
    }
}

/// One row of `cases` with its schedule's columns, as stored ([`case_columns!`]).
#[derive(sqlx::FromRow)]
pub(super) struct CaseRow {
    id: Uuid,
    order_key: String,
    sales_order_number: Option<String>,
    web_order_id: Option<String>,
    state: String,
    event: Option<Json<HeldOrderEvent>>,
    held_at: DateTime<Utc>,
    decision: Option<Json<Decision>>,
    target: Option<Json<ResolvedTarget>>,
    idempotency_key: Option<String>,
    assignment_id: Option<String>,
    assigned_at: Option<DateTime<Utc>>,
    watching_since: Option<DateTime<Utc>>,
    attempt: i32,
    retry_since: Option<DateTime<Utc>>,
    polls: i32,
    escalation_reason: Option<String>,
    escalation_level: i16,
    released_at: Option<DateTime<Utc>>,
    closed_at: Option<DateTime<Utc>>,
    generation: i32,
    next_action_at: Option<DateTime<Utc>>,
    lease_owner: Option<String>,
    lease_expires_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    merged_into: Option<Uuid>,
}

impl CaseRow {
    /// Reads one row; a `jsonb` value that does not fit its type is a
    /// corrupt row, not a failed query.
    pub(super) fn read(row: &sqlx::postgres::PgRow) -> Result<Self, StoreError> {
        use sqlx::FromRow;
        Self::from_row(row).map_err(|e| match e {
            sqlx::Error::ColumnDecode { index, source } => corrupt(format!("{index}: {source}")),
            e => e.into(),
        })
    }

    /// The case and its bookkeeping: the one place a row becomes a [`Case`].
    pub(super) fn decode(self) -> Result<CaseRecord, StoreError> {
        let id = self.id;
        let bad = |what: String| corrupt(format!("case {id}: {what}"));
        let count =
            |n: i32, what: &str| u32::try_from(n).map_err(|_| bad(format!("{what} is negative")));
        let so = (self.sales_order_number.as_deref())
            .map(SalesOrderNumber::parse)
            .transpose()
            .map_err(|e| bad(e.to_string()))?;
        let web = (self.web_order_id.as_deref())
            .map(WebOrderId::parse)
            .transpose()
            .map_err(|e| bad(e.to_string()))?;
        let event = self.event.ok_or_else(|| bad("event is null".into()))?.0;
        // The columns are filled in as the engine learns; the event is the fallback.
        let order = OrderId::new(
            so.or_else(|| event.data.order.sales_order_number.clone()),
            web.or_else(|| event.data.order.web_order_id.clone()),
        )
        .ok_or_else(|| bad("no order number".into()))?;
        let state = CaseState::parse(&self.state)
            .ok_or_else(|| bad(format!("unknown state {:?}", self.state)))?;
        let escalation_reason = (self.escalation_reason.as_deref())
            .map(|r| {
                EscalationReason::parse(r)
                    .ok_or_else(|| bad(format!("unknown escalation reason {r:?}")))
            })
            .transpose()?;
        let assignment = match (self.assignment_id, self.assigned_at) {
            (Some(id), Some(at)) => Some(Accepted { id, at }),
            (None, None) => None,
            _ => return Err(bad("assignment_id and assigned_at disagree".into())),
        };
        let progress = Progress {
            decision: self.decision.map(|j| j.0),
            target: self.target.map(|j| j.0),
            idempotency_key: self.idempotency_key,
            assignment,
            watching_since: self.watching_since,
        };
        let stage = stage(
            state,
            progress,
            order.sales_order_number.clone(),
            escalation_reason,
            self.released_at,
            self.closed_at,
        )
        .map_err(|what| bad(format!("{state}: {what}")))?;
        let case = Case {
            id,
            order,
            held_at: self.held_at,
            stage,
            attempt: count(self.attempt, "attempt")?,
            retry_since: self.retry_since,
            polls: count(self.polls, "polls")?,
            escalation_level: count(self.escalation_level.into(), "escalation_level")?,
            generation: count(self.generation, "generation")?,
            // An open case's due time is its schedule row's; a closed one has none.
            next_action_at: self.next_action_at.filter(|_| !state.is_terminal()),
            event,
        };
        Ok(CaseRecord {
            case,
            order_key: self.order_key,
            merged_into: self.merged_into,
            lease_owner: self.lease_owner,
            lease_expires_at: self.lease_expires_at,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// The stage a row's columns describe; `Err` names what its state lacks.
fn stage(
    state: CaseState,
    p: Progress,
    sales_order_number: Option<SalesOrderNumber>,
    reason: Option<EscalationReason>,
    released_at: Option<DateTime<Utc>>,
    closed_at: Option<DateTime<Utc>>,
) -> Result<Stage, &'static str> {
    let closed = closed_at.ok_or("closed_at is null");
    Ok(match state {
        CaseState::Deciding => Stage::Deciding,
        CaseState::Resolving => Stage::Resolving {
            decision: p.decision.ok_or("decision is null")?,
        },
        CaseState::Assigning => {
            let target = p.target.ok_or("target is null")?;
            Stage::Assigning {
                decision: p.decision.ok_or("decision is null")?,
                order: sales_order_number.ok_or("sales_order_number is null")?,
                assignment: Assignment {
                    smart_account_domain: target.smart_account_domain,
                    account_type: target.account_type,
                    virtual_account_name: (target.virtual_account_name)
                        .ok_or("the target has no virtual account")?,
                },
                via_fallback: target.via_fallback,
                key: p.idempotency_key.ok_or("idempotency_key is null")?,
            }
        }
        CaseState::Watching => Stage::Watching {
            since: (p.watching_since)
                .or(p.assignment.as_ref().map(|a| a.at))
                .ok_or("watching_since is null")?,
            decision: p.decision,
            target: p.target.ok_or("target is null")?,
            key: p.idempotency_key,
            assignment: p.assignment,
        },
        CaseState::Released => Stage::Released {
            progress: p,
            released_at: released_at.ok_or("released_at is null")?,
            closed_at: closed?,
        },
        CaseState::Escalated => Stage::Escalated {
            reason: reason.ok_or("escalation_reason is null")?,
            progress: p,
            closed_at: closed?,
        },
        CaseState::Merged => Stage::Merged {
            progress: p,
            closed_at,
        },
    })
}

/// The written columns of several cases as arrays, one element per case,
/// in [`case_input!`]'s order.
#[derive(Default)]
pub(super) struct CaseColumns<'a> {
    id: Vec<Uuid>,
    lease_owner: Vec<Option<&'a str>>,
    state: Vec<&'static str>,
    sales_order_number: Vec<Option<String>>,
    rule_name: Vec<Option<&'a str>>,
    rules_hash: Vec<Option<&'a str>>,
    decision: Vec<Option<Value>>,
    target: Vec<Option<Value>>,
    idempotency_key: Vec<Option<String>>,
    assignment_id: Vec<Option<String>>,
    assigned_at: Vec<Option<DateTime<Utc>>>,
    watching_since: Vec<Option<DateTime<Utc>>>,
    attempt: Vec<i32>,
    retry_since: Vec<Option<DateTime<Utc>>>,
    polls: Vec<i32>,
    escalation_reason: Vec<Option<&'static str>>,
    escalation_level: Vec<i16>,
    released_at: Vec<Option<DateTime<Utc>>>,
    closed_at: Vec<Option<DateTime<Utc>>>,
    generation: Vec<i32>,
    next_action_at: Vec<Option<DateTime<Utc>>>,
    hold: Vec<Option<f64>>,
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value, StoreError> {
    serde_json::to_value(v).map_err(|e| corrupt(format!("cannot serialise: {e}")))
}

fn int<T: TryFrom<u32>>(n: u32, what: &str) -> Result<T, StoreError> {
    T::try_from(n).map_err(|_| corrupt(format!("{what} out of range: {n}")))
}

impl<'a> CaseColumns<'a> {
    /// The case ids, in order.
    pub(super) fn ids(&self) -> &[Uuid] {
        &self.id
    }

    /// Adds one case: the one place a [`Case`] becomes columns. `lease_owner`
    /// is the fence of a step commit; with `hold` the lease is kept.
    pub(super) fn push(
        &mut self,
        c: &'a Case,
        lease_owner: Option<&'a str>,
        hold: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.id.push(c.id);
        self.lease_owner.push(lease_owner);
        self.state.push(c.state().as_str());
        (self.sales_order_number).push(c.order.sales_order_number.as_ref().map(|s| s.to_string()));
        let p = c.stage.progress();
        let decision = c.stage.decision();
        self.rule_name.push(decision.map(|d| d.rule.as_str()));
        self.rules_hash
            .push(decision.map(|d| d.rules_hash.as_str()));
        self.decision.push(decision.map(to_json).transpose()?);
        self.target
            .push(p.target.as_ref().map(to_json).transpose()?);
        self.idempotency_key.push(p.idempotency_key);
        self.assignment_id
            .push(p.assignment.as_ref().map(|a| a.id.clone()));
        self.assigned_at.push(p.assignment.map(|a| a.at));
        self.watching_since.push(p.watching_since);
        self.attempt.push(int(c.attempt, "attempt")?);
        self.retry_since.push(c.retry_since);
        self.polls.push(int(c.polls, "polls")?);
        self.escalation_reason
            .push(c.stage.escalation_reason().map(|r| r.as_str()));
        self.escalation_level
            .push(int(c.escalation_level, "escalation_level")?);
        self.released_at.push(c.stage.released_at());
        self.closed_at.push(c.stage.closed_at());
        self.generation.push(int(c.generation, "generation")?);
        self.next_action_at.push(c.next_action_at);
        self.hold.push(hold.map(|d| d.as_secs_f64()));
        Ok(())
    }

    /// Binds the arrays as `$1..$22`.
    pub(super) fn bind<'q>(
        self,
        q: sqlx::query::Query<'q, Postgres, PgArguments>,
    ) -> sqlx::query::Query<'q, Postgres, PgArguments>
    where
        'a: 'q,
    {
        q.bind(self.id)
            .bind(self.lease_owner)
            .bind(self.state)
            .bind(self.sales_order_number)
            .bind(self.rule_name)
            .bind(self.rules_hash)
            .bind(self.decision)
            .bind(self.target)
            .bind(self.idempotency_key)
            .bind(self.assignment_id)
            .bind(self.assigned_at)
            .bind(self.watching_since)
            .bind(self.attempt)
            .bind(self.retry_since)
            .bind(self.polls)
            .bind(self.escalation_reason)
            .bind(self.escalation_level)
            .bind(self.released_at)
            .bind(self.closed_at)
            .bind(self.generation)
            .bind(self.next_action_at)
            .bind(self.hold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AccountSelector, AccountType, Target, VirtualAccountChoice};

    fn decision() -> Decision {
        Decision {
            rule: "r".into(),
            rules_hash: "h".into(),
            target: Target {
                account: AccountSelector::Domain(crate::domain::Domain::parse("acme.com").unwrap()),
                account_type: AccountType::Customer,
                virtual_account: VirtualAccountChoice::AccountDefault,
            },
            fallback: None,
        }
    }

    /// A state whose data is missing is a corrupt row (it used to be decided
    /// again at its next step).
    #[test]
    fn a_state_lacking_its_data_is_unreadable() {
        let so = SalesOrderNumber::parse("1").ok();
        let st = |state, p: Progress| stage(state, p, so.clone(), None, None, None);
        assert_eq!(
            st(CaseState::Resolving, Progress::default()),
            Err("decision is null")
        );
        let decided = Progress {
            decision: Some(decision()),
            ..Progress::default()
        };
        assert_eq!(
            st(CaseState::Resolving, decided.clone()),
            Ok(Stage::Resolving {
                decision: decision()
            })
        );
        assert_eq!(
            st(CaseState::Assigning, decided.clone()),
            Err("target is null")
        );
        let target = ResolvedTarget {
            smart_account_domain: "acme.com".into(),
            account_type: AccountType::Customer,
            virtual_account_name: None,
            via_fallback: false,
        };
        let resolved = Progress {
            target: Some(target),
            idempotency_key: Some("k".into()),
            ..decided
        };
        assert_eq!(
            st(CaseState::Assigning, resolved.clone()),
            Err("the target has no virtual account")
        );
        assert_eq!(
            st(CaseState::Watching, resolved.clone()),
            Err("watching_since is null")
        );
        assert_eq!(
            st(CaseState::Escalated, resolved.clone()),
            Err("escalation_reason is null")
        );
        assert_eq!(
            st(CaseState::Released, resolved),
            Err("released_at is null")
        );
        assert_eq!(
            st(CaseState::Deciding, Progress::default()),
            Ok(Stage::Deciding)
        );
    }
}
