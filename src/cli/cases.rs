//! `holdclear cases list | show ORDER | retry ORDER | close ORDER | claim
//! ORDER | note ORDER`: the state of held orders, one case's full history,
//! re-running an escalated case after a person fixed its cause, closing one
//! handled by hand; each action an audited operation.

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use serde_json::{Value, json};

use super::UsageError;
use super::dlq::refused;
use crate::config::Settings;
use crate::domain::CaseState;
use crate::operations::{actions, operator_name};
use crate::ops::identity::WorkerIdentity;
use crate::store::{CaseFilter, CaseRecord, HistoryRow, OutboxRow, Store};

/// Most rows `cases list` prints.
const MAX_LIST: u32 = 10_000;
/// Most history lines `cases show` prints.
const MAX_HISTORY: u32 = 10_000;

/// Subcommands of `holdclear cases`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List cases, newest first.
    List(ListArgs),
    /// Show the latest case of an order: rule, decision, every call and its
    /// outcome, every event emitted.
    Show {
        /// Sales order number or web order id.
        order: String,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Re-run the order's escalated case (e.g. after the customer activated
    /// the Smart Account).
    Retry {
        /// Sales order number or web order id (or the case id).
        order: String,
        /// Who runs it (default: $USER).
        #[arg(long)]
        operator: Option<String>,
    },
    /// Close the order's escalated case as handled by hand, with a note.
    Close {
        /// Sales order number or web order id (or the case id).
        order: String,
        /// What was done.
        #[arg(long)]
        note: String,
        /// A ticket reference.
        #[arg(long)]
        ticket: Option<String>,
        /// Who closes it (default: $USER).
        #[arg(long)]
        operator: Option<String>,
    },
    /// Take the order's case (the console and `cases show` name who has it).
    Claim {
        /// Sales order number or web order id (or the case id).
        order: String,
        /// Who takes it (default: $USER).
        #[arg(long)]
        operator: Option<String>,
    },
    /// Add a note (and a ticket reference) to the order's case.
    Note {
        /// Sales order number or web order id (or the case id).
        order: String,
        /// The note.
        #[arg(long)]
        text: String,
        /// A ticket reference.
        #[arg(long)]
        ticket: Option<String>,
        /// Who writes it (default: $USER).
        #[arg(long)]
        operator: Option<String>,
    },
}

/// Arguments of `holdclear cases list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only cases in this state (deciding, resolving, assigning, watching, released, escalated).
    #[arg(long, value_parser = parse_state)]
    pub state: Option<CaseState>,
    /// Only the cases of this order (sales order number or web order id).
    #[arg(long)]
    pub order: Option<String>,
    /// At most this many cases.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_LIST)))]
    pub limit: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_state(raw: &str) -> Result<CaseState, String> {
    CaseState::parse(raw).ok_or_else(|| {
        let known: Vec<&str> = CaseState::ALL.iter().map(|s| s.as_str()).collect();
        format!("{raw:?} is not a state; one of {}", known.join(", "))
    })
}

/// Runs `holdclear cases …`.
pub async fn execute(settings: Settings, cmd: Command) -> anyhow::Result<ExitCode> {
    super::quiet_logs();
    let store = super::open_store(&settings).await?;
    match cmd {
        Command::List(args) => list(&store, args).await?,
        Command::Show { order, json } => show(&store, &order, json).await?,
        Command::Retry { order, operator } => retry(&store, &who(operator), &order).await?,
        Command::Close {
            order,
            note,
            ticket,
            operator,
        } => {
            let case = actions::case_id(&store, &order).await.map_err(refused)?;
            actions::close(&store, &who(operator), case, &note, ticket.as_deref())
                .await
                .map_err(refused)?;
            println!("Case {case} of order {order} closed as handled by hand.");
        }
        Command::Claim { order, operator } => {
            let who = who(operator);
            let case = actions::case_id(&store, &order).await.map_err(refused)?;
            actions::claim_case(&store, &who, case)
                .await
                .map_err(refused)?;
            println!("Case {case} of order {order} claimed by {who}.");
        }
        Command::Note {
            order,
            text,
            ticket,
            operator,
        } => {
            let case = actions::case_id(&store, &order).await.map_err(refused)?;
            actions::note_case(&store, &who(operator), case, &text, ticket.as_deref())
                .await
                .map_err(refused)?;
            println!("Note added to case {case} of order {order}.");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn table(headers: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(headers.to_vec());
    t
}

async fn list(store: &Store, args: ListArgs) -> anyhow::Result<()> {
    let rows = store
        .list_cases(&CaseFilter {
            state: args.state,
            order: args.order,
            limit: args.limit,
        })
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("No cases.");
        return Ok(());
    }
    let mut t = table(&[
        "ORDER",
        "STATE",
        "RULE",
        "ACCOUNT",
        "UPDATED",
        "NEXT ACTION",
    ]);
    for r in &rows {
        let state = match &r.escalation_reason {
            Some(reason) => format!("{} ({reason})", r.state),
            None => r.state.clone(),
        };
        t.add_row(vec![
            r.order.clone(),
            state,
            r.rule.clone().unwrap_or_else(|| "-".into()),
            r.account.clone().unwrap_or_else(|| "-".into()),
            when(r.updated_at),
            r.next_action_at.map_or_else(|| "-".into(), when),
        ]);
    }
    println!("{t}");
    println!("{} case(s), times in UTC.", rows.len());
    Ok(())
}

fn case_json(r: &CaseRecord) -> Value {
    let c = &r.case;
    let p = c.stage.progress();
    json!({
        "id": c.id,
        "order": r.order_key,
        "salesOrderNumber": c.order.sales_order_number.as_ref().map(|s| s.as_str()),
        "webOrderId": c.order.web_order_id.as_ref().map(|s| s.as_str()),
        "state": c.state().as_str(),
        "heldAt": c.held_at,
        "holdReason": c.event.data.hold_reason.as_str(),
        "eventId": c.event.id.as_str(),
        "decision": c.stage.decision(),
        "target": p.target,
        "idempotencyKey": p.idempotency_key,
        "assignmentId": p.assignment.as_ref().map(|a| a.id.as_str()),
        "assignedAt": p.assignment.as_ref().map(|a| a.at),
        "watchingSince": p.watching_since,
        "attempt": c.attempt,
        "retrySince": c.retry_since,
        "polls": c.polls,
        "escalationReason": c.stage.escalation_reason().map(|e| e.as_str()),
        "escalationLevel": c.escalation_level,
        "releasedAt": c.stage.released_at(),
        "closedAt": c.stage.closed_at(),
        "generation": c.generation,
        "nextActionAt": c.next_action_at,
        "mergedInto": r.merged_into,
        "leaseOwner": r.lease_owner,
        "leaseExpiresAt": r.lease_expires_at,
        "createdAt": r.created_at,
        "updatedAt": r.updated_at,
    })
}

/// The lease token of the claim that wrote the case's latest history line
/// that names one, and when.
fn last_worker(history: &[HistoryRow]) -> Option<(&str, DateTime<Utc>)> {
    history
        .iter()
        .rev()
        .find_map(|h| h.detail.get("worker")?.as_str().map(|w| (w, h.at)))
}

async fn show(store: &Store, order: &str, as_json: bool) -> anyhow::Result<()> {
    let record = store
        .latest_case(order)
        .await?
        .ok_or_else(|| UsageError(format!("no case for order {order}")))?;
    let history = store.case_history(record.case.id, MAX_HISTORY).await?;
    let events = store.outbox_of_case(record.case.id).await?;
    let last = last_worker(&history);
    if as_json {
        let out = json!({
            "case": case_json(&record),
            "lastWorker": last.map(|(owner, at)| json!({
                "worker": WorkerIdentity::of_lease_owner(owner),
                "leaseOwner": owner,
                "at": at,
            })),
            "history": history,
            "events": events,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{}", case_table(&record, last));

    let mut h = table(&["AT", "KIND", "STATE", "DETAIL"]);
    for line in &history {
        h.add_row(vec![
            line.at.format("%H:%M:%S%.3f").to_string(),
            line.kind.clone(),
            line.state.clone(),
            line.summary(),
        ]);
    }
    println!("History ({} entries, times in UTC):\n{h}", history.len());
    if !events.is_empty() {
        println!("Events:\n{}", events_table(&events));
    }
    Ok(())
}

/// The table of `cases show`: the case, then its work.
fn case_table(record: &CaseRecord, last: Option<(&str, DateTime<Utc>)>) -> Table {
    let mut t = table(&["", ""]);
    let mut row = |k: &str, v: String| {
        t.add_row(vec![k.to_owned(), v]);
    };
    case_rows(record, &mut row);
    work_rows(record, last, &mut row);
    t
}

/// What the case is: its ids, state, hold and decision.
fn case_rows(record: &CaseRecord, row: &mut impl FnMut(&str, String)) {
    let c = &record.case;
    row("Case", c.id.to_string());
    row("Order", record.order_key.clone());
    if let Some(web) = &c.order.web_order_id {
        row("Web order id", web.to_string());
    }
    let state = match c.stage.escalation_reason() {
        Some(reason) => format!("{} ({reason})", c.state()),
        None => c.state().to_string(),
    };
    row("State", state);
    if let Some(into) = record.merged_into {
        row(
            "Merged into",
            format!("{into} (the order's case: `holdclear cases show {into}` shows its work)"),
        );
    }
    row(
        "Hold",
        format!("{} since {}", c.event.data.hold_reason, when(c.held_at)),
    );
    if let Some(d) = c.stage.decision() {
        row("Rule", format!("{} (rules file {})", d.rule, d.rules_hash));
        row("Decision", d.target.to_string());
        if let Some(f) = &d.fallback {
            row("Fallback", f.to_string());
        }
    }
}

/// What was done: target, key, assignment, release, retries, lease.
fn work_rows(
    record: &CaseRecord,
    last: Option<(&str, DateTime<Utc>)>,
    row: &mut impl FnMut(&str, String),
) {
    let c = &record.case;
    let p = c.stage.progress();
    if let Some(target) = &p.target {
        row(
            "Target",
            format!(
                "{} ({}, virtual account {}){}",
                target.smart_account_domain,
                target.account_type,
                target
                    .virtual_account_name
                    .as_deref()
                    .unwrap_or("- (nothing to assign)"),
                if target.via_fallback {
                    ", the rule's fallback"
                } else {
                    ""
                }
            ),
        );
    }
    if let Some(key) = &p.idempotency_key {
        row("Idempotency-Key", key.clone());
    }
    if let Some(a) = &p.assignment {
        row("Assignment", format!("{} at {}", a.id, when(a.at)));
    }
    if let Some(at) = c.stage.released_at() {
        row("Released", when(at));
    }
    if c.attempt > 0 {
        row(
            "Retrying",
            format!(
                "attempt {} since {}",
                c.attempt,
                c.retry_since.map_or_else(|| "?".into(), when)
            ),
        );
    }
    if let Some(next) = c.next_action_at {
        row("Next action", when(next));
    }
    if let Some(owner) = &record.lease_owner {
        row(
            "Lease",
            format!(
                "held by worker {} (claim {owner}) until {}",
                WorkerIdentity::of_lease_owner(owner),
                record.lease_expires_at.map_or_else(|| "?".into(), when)
            ),
        );
    }
    if let Some((owner, at)) = last {
        row(
            "Last worker",
            format!(
                "{} (claim {owner}) at {}",
                WorkerIdentity::of_lease_owner(owner),
                when(at)
            ),
        );
    }
    row("Generation", c.generation.to_string());
    row(
        "Opened / updated",
        format!("{} / {}", when(record.created_at), when(record.updated_at)),
    );
}

fn events_table(events: &[OutboxRow]) -> Table {
    let mut t = table(&["ROUTING KEY", "ENVELOPE ID", "WRITTEN", "SENT"]);
    for e in events {
        let sent = match (e.sent_at, &e.last_error) {
            (Some(at), _) => when(at),
            (None, Some(err)) => format!("not yet ({} failed: {err})", e.attempts),
            (None, None) => "not yet".into(),
        };
        t.add_row(vec![
            e.routing_key.clone(),
            e.envelope_id.to_string(),
            when(e.created_at),
            sent,
        ]);
    }
    t
}

fn who(given: Option<String>) -> String {
    operator_name(given.or_else(|| std::env::var("USER").ok()).as_deref())
}

async fn retry(store: &Store, operator: &str, order: &str) -> anyhow::Result<()> {
    let (case, _) = actions::retry(store, operator, order)
        .await
        .map_err(refused)?;
    println!(
        "Case {} of order {order} re-opened: it resumes at {} (generation {}).",
        case.id,
        case.state(),
        case.generation
    );
    Ok(())
}
