//! Replays and the audit trail: a replay's dry-run preview (how many,
//! which orders, which refused) and its start (a rate, a batch size); the
//! list of every operation, by whom; one operation's report, live while it
//! runs, with its cancel.

use axum::Extension;
use axum::extract::{Form, Path, Query, State};
use axum::response::Redirect;
use maud::{Markup, html};
use serde::Deserialize;
use uuid::Uuid;

use super::escalations::{CsrfOnly, Done};
use super::layout::{self, action_form, facts, notice, url_encode, when};
use super::{AppState, PageError, Shared, Viewer, may_act};
use crate::operations::replay::{self, Ending, ReplayOptions};
use crate::store::DeadLetterFilter;

/// What a replay takes: a group, one dead letter, or a selection (the
/// list's code, order and text filters); and its options.
#[derive(Clone, Default, Deserialize)]
#[serde(default)]
pub struct ReplayQuery {
    csrf: String,
    group: Option<String>,
    ids: Option<i64>,
    code: Option<String>,
    order: Option<String>,
    text: Option<String>,
    force: Option<String>,
    rate: Option<f64>,
    batch: Option<usize>,
}

impl ReplayQuery {
    fn options(&self) -> Result<ReplayOptions, PageError> {
        let some = |o: &Option<String>| o.clone().filter(|s| !s.trim().is_empty());
        let options = ReplayOptions {
            filter: DeadLetterFilter {
                ids: self.ids.into_iter().collect(),
                group: some(&self.group),
                code: some(&self.code),
                order: some(&self.order),
                text: some(&self.text),
                ..DeadLetterFilter::default()
            },
            rate: self.rate.unwrap_or(50.0),
            batch: self.batch.unwrap_or(100),
            force: self.force.is_some(),
            to_exchange: None,
        };
        options.check(false)?;
        Ok(options)
    }
}

/// `GET /replay?group=…|ids=…&force=on&rate=…&batch=…`: the dry run, and
/// the form that starts the replay.
pub async fn replay_form(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
    Query(q): Query<ReplayQuery>,
) -> Result<Markup, PageError> {
    let options = q.options()?;
    let p = replay::preview(&s.store, &options).await?;
    let what = match (&options.filter.group, q.ids) {
        (Some(g), _) => format!("group {g}"),
        (_, Some(id)) => format!("dead letter {id}"),
        _ => "the selection".to_owned(),
    };
    let body = html! {
        section.card {
            h2 { "Dry run: " (what) }
            p.preview { strong { (p.chosen.len()) } " message(s) would be replayed; " strong { (p.refused.len()) } " refused." }
            @if !p.orders.is_empty() { p { "Orders: " (p.orders.join(", ")) } }
            @if !p.refused.is_empty() {
                p.warn { "Refused: their cause is the message itself and is unchanged (fix it upstream, or force)." }
                ul.plain { @for l in p.refused.iter().take(50) { li { a href={ "/dead-letters/" (l.id) } { (l.id) } " " (l.code) ": " (l.detail) } } }
                p { a href={ "/replay?" (selection_query(&options, q.ids)) "&force=on" } { "Preview with force" } }
            }
        }
        section.card {
            h2 { "Replay" }
            @if p.chosen.is_empty() { p { "Nothing to replay." } } @else {
                (action_form(&v, "/replay", &format!("Replay {} message(s)", p.chosen.len()), html! {
                    @for (name, value) in selection(&options, q.ids) { input type="hidden" name=(name) value=(value); }
                    @if options.force { input type="hidden" name="force" value="on"; }
                    label { "Rate (messages per second)" input type="number" name="rate" min="0.1" step="any" value=(options.rate); }
                    label { "Batch size" input type="number" name="batch" min="1" max="10000" value=(options.batch); }
                }))
            }
        }
    };
    Ok(layout::page(
        &v,
        "/dead-letters",
        "Replay dead letters",
        body,
    ))
}

/// The fields that say which dead letters, as the forms carry them.
fn selection(options: &ReplayOptions, id: Option<i64>) -> Vec<(&'static str, String)> {
    let f = &options.filter;
    let mut out: Vec<(&str, String)> = id.map(|i| ("ids", i.to_string())).into_iter().collect();
    for (name, value) in [
        ("group", &f.group),
        ("code", &f.code),
        ("order", &f.order),
        ("text", &f.text),
    ] {
        if let Some(v) = value {
            out.push((name, v.clone()));
        }
    }
    out
}

fn selection_query(options: &ReplayOptions, id: Option<i64>) -> String {
    (selection(options, id).iter())
        .map(|(k, v)| format!("{k}={}", url_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// `POST /replay`: starts the operation, runs it in this process, and
/// shows its report.
pub async fn replay(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
    Form(q): Form<ReplayQuery>,
) -> Result<Redirect, PageError> {
    may_act(&v, &s, &q.csrf)?;
    let options = q.options()?;
    let p = replay::preview(&s.store, &options).await?;
    if p.chosen.is_empty() {
        return Err(PageError::Refused("nothing to replay".into()));
    }
    let operation = replay::start(&s.store, &v.user.name, &options, &p).await?;
    spawn_run(s.clone(), operation, options);
    Ok(Redirect::to(&format!("/operations/{operation}")))
}

fn spawn_run(s: std::sync::Arc<Shared>, operation: Uuid, options: ReplayOptions) {
    let tasks = s.tasks.clone();
    tasks.spawn(async move {
        let run = replay::Run {
            store: &s.store,
            amqp: &s.settings.amqp,
            operation,
            options: &options,
            stop: s.stop.child_token(),
        };
        match run.execute(|_| {}).await {
            Ok(Ending::Broken(e)) => {
                tracing::warn!(%operation, error = %e, "Replay interrupted: RabbitMQ failed.")
            }
            Ok(ending) => tracing::info!(%operation, ?ending, "Replay ended."),
            Err(e) => tracing::warn!(%operation, error = %e, "Replay failed."),
        }
    });
}

/// `GET /operations`: every operation, newest first.
pub async fn list(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
) -> Result<Markup, PageError> {
    let ops = s.store.operations(200).await?;
    let body = html! {
        div.live id="operations" data-live {
            div.table {
                table {
                    thead { tr { th { "Started" } th { "Kind" } th { "By" } th { "Status" } th { "On" } } }
                    tbody {
                        @for o in &ops {
                            tr {
                                td data-label="Started" { a href={ "/operations/" (o.id) } { (when(o.created_at)) } }
                                td data-label="Kind" { (o.kind) }
                                td data-label="By" { (o.operator) }
                                td data-label="Status" { span class={ "badge status-" (o.status) } { (o.status) } }
                                td data-label="On" {
                                    @if let Some(c) = o.case_id { a href={ "/cases/" (c) } { "case" } }
                                    @else if let Some(ids) = o.selection.get("ids").and_then(|i| i.as_array()) { (ids.len()) " dead letter(s)" }
                                    @else { "dead letters" }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(&v, "/operations", "Operations", body))
}

/// `GET /operations/{id}`: the report, live while it runs.
pub async fn report(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
    Path(id): Path<Uuid>,
    Query(q): Query<Done>,
) -> Result<Markup, PageError> {
    let r = replay::report(&s.store, id).await?;
    let (op, sum) = (&r.operation, &r.summary);
    let can_cancel = op.kind == "replay" && matches!(op.status.as_str(), "running" | "interrupted");
    let body = html! {
        (notice(q.done.as_deref()))
        div.live id="report" data-live {
            section.card {
                (facts(&[
                    ("Kind", op.kind.clone()),
                    ("By", op.operator.clone()),
                    ("Status", op.status.clone()),
                    ("Started", when(op.created_at)),
                    ("Finished", op.finished_at.map_or("-".into(), when)),
                ]))
                @if let Some(c) = op.case_id { p { a href={ "/cases/" (c) } { "The case" } } }
                @if op.kind == "replay" {
                    p.summary id="summary" {
                        "sent " strong { (sum.sent) } "; became cases " strong { (sum.became_cases) }
                        "; failed again " strong { (sum.failed_again) } "; still pending " strong { (sum.pending) }
                        "; could not be sent " strong { (sum.send_failed) } "; not sent yet " strong { (sum.not_sent) } "."
                    }
                }
                @if can_cancel && op.cancel_requested_at.is_none() {
                    (action_form(&v, &format!("/operations/{id}/cancel"), "Cancel the replay", html! {}))
                } @else if op.cancel_requested_at.is_some() && op.status == "running" {
                    p.warn { "Cancel requested: it stops before its next message." }
                }
            }
            @if op.kind != "replay" && !r.items.is_empty() {
                p { "Dead letters: "
                    @for i in &r.items { a href={ "/dead-letters/" (i.dead_letter_id) } { (i.dead_letter_id) } " " }
                }
            }
            @if op.kind == "replay" && !r.items.is_empty() {
                div.table {
                    table {
                        thead { tr { th { "Dead letter" } th { "Order" } th { "Sent" } th { "Outcome" } th { "Case / reason" } } }
                        tbody {
                            @for i in r.items.iter().take(1000) {
                                tr {
                                    td data-label="Dead letter" { a href={ "/dead-letters/" (i.dead_letter_id) } { (i.dead_letter_id) } }
                                    td data-label="Order" { (i.order.as_deref().unwrap_or("-")) }
                                    td data-label="Sent" { (i.sent_at.map_or("-".into(), when)) }
                                    td data-label="Outcome" { (i.outcome()) }
                                    td data-label="Case / reason" {
                                        @if let Some(c) = i.case_id { a href={ "/cases/" (c) } { "case" } }
                                        @else { (i.error.as_deref().unwrap_or("")) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            details { summary { "Selection" } pre { (serde_json::to_string_pretty(&op.selection).unwrap_or_default()) } }
        }
        p.meta { "Every action is recorded here with who took it." }
    };
    Ok(layout::page(
        &v,
        "/operations",
        &format!("Operation {id}"),
        body,
    ))
}

/// `POST /operations/{id}/cancel`.
pub async fn cancel(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
    Path(id): Path<Uuid>,
    Form(f): Form<CsrfOnly>,
) -> Result<Redirect, PageError> {
    may_act(&v, &s, &f.csrf)?;
    replay::cancel(&s.store, id).await?;
    s.store
        .record_operation(
            "cancel",
            &v.user.name,
            &serde_json::json!({"operation": id}),
            None,
        )
        .await?;
    Ok(Redirect::to(&format!(
        "/operations/{id}?done=Cancel%20requested."
    )))
}
