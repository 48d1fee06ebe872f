//! Escalations grouped by reason → a filtered list → the case page: the
//! order, the rule and why it matched (the rules' explanation of the
//! stored event), the target, the Idempotency-Key, and every call, answer,
//! event, note and operation as one timeline; and the case's actions.

use axum::Extension;
use axum::extract::{Form, Path, Query, State};
use axum::response::Redirect;
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use serde::Deserialize;
use uuid::Uuid;

use super::layout::{self, action_form, age, facts, notice, url_encode, when};
use super::overview::action;
use super::{AppState, PageError, Viewer, may_act};
use crate::operations::actions;
use crate::store::{CaseRecord, EscalationFilter};

/// `GET /escalations`: one line per reason and level, with what to do.
pub async fn groups(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
) -> Result<Markup, PageError> {
    let groups = s.store.escalation_groups().await?;
    let body = html! {
        div.live id="escalation-groups" data-live {
            @if groups.is_empty() { p.ok { "Nothing escalated." } }
            div.table {
                table {
                    thead { tr { th { "Reason" } th { "Level" } th { "Cases" } th { "Oldest hold" } th { "What to do" } } }
                    tbody {
                        @for g in &groups {
                            tr class={ "level-" (g.level) } {
                                td data-label="Reason" { a href={ "/escalations/list?reason=" (url_encode(&g.reason)) "&level=" (url_encode(&g.level)) } { (g.reason) } }
                                td data-label="Level" { span.badge { (g.level) } }
                                td data-label="Cases" { (g.count) }
                                td data-label="Oldest hold" { (age(g.oldest_hold)) }
                                td data-label="What to do" { (action(&g.reason)) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(&v, "/escalations", "Escalations", body))
}

fn filter_form(f: &EscalationFilter) -> Markup {
    let field = |name: &str, label: &str, value: &Option<String>| {
        html! {
            label { (label) input type="text" name=(name) value=[value.as_deref()]; }
        }
    };
    html! {
        form.filters method="get" action="/escalations/list" {
            (field("reason", "Reason", &f.reason))
            (field("level", "Level", &f.level))
            (field("partner", "Partner", &f.partner))
            (field("domain", "End-customer domain", &f.domain))
            (field("rule", "Rule", &f.rule))
            (field("owner", "Owner (- for nobody)", &f.owner))
            label { "Held at least (hours)" input type="number" min="0" name="min_age_hours" value=[f.min_age_hours]; }
            button type="submit" { "Filter" }
        }
    }
}

/// The list's query as a form sends it (empty fields included).
#[derive(Default, Deserialize)]
#[serde(default)]
pub struct ListQuery {
    reason: Option<String>,
    level: Option<String>,
    partner: Option<String>,
    domain: Option<String>,
    rule: Option<String>,
    owner: Option<String>,
    min_age_hours: Option<String>,
}

impl ListQuery {
    fn filter(self) -> EscalationFilter {
        let some = |o: Option<String>| o.filter(|s| !s.trim().is_empty());
        EscalationFilter {
            min_age_hours: (self.min_age_hours.as_deref()).and_then(|h| h.trim().parse().ok()),
            reason: some(self.reason),
            level: some(self.level),
            partner: some(self.partner),
            domain: some(self.domain),
            rule: some(self.rule),
            owner: some(self.owner),
        }
    }
}

/// `GET /escalations/list?reason=…&level=…&partner=…&domain=…&rule=…&owner=…&min_age_hours=…`.
pub async fn list(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
    Query(q): Query<ListQuery>,
) -> Result<Markup, PageError> {
    let f = q.filter();
    let rows = s.store.escalations(&f).await?;
    let body = html! {
        (filter_form(&f))
        @if let Some(r) = &f.reason { p.action { (action(r)) } }
        div.live id="escalation-list" data-live {
            p { (rows.len()) " case(s)" @if rows.len() as i64 >= crate::store::MAX_ESCALATIONS { " (the oldest only: narrow the filter)" } "." }
            div.table {
                table {
                    thead { tr { th { "Order" } th { "Reason" } th { "Level" } th { "Partner" } th { "Domain" } th { "Rule" } th { "Held for" } th { "Owner" } } }
                    tbody {
                        @for r in &rows {
                            tr {
                                td data-label="Order" { a href={ "/cases/" (r.id) } { (r.order) } }
                                td data-label="Reason" { (r.reason) }
                                td data-label="Level" { span.badge { (r.level) } }
                                td data-label="Partner" { (r.partner.as_deref().unwrap_or("-")) }
                                td data-label="Domain" { (r.domain.as_deref().unwrap_or("-")) }
                                td data-label="Rule" { (r.rule.as_deref().unwrap_or("-")) }
                                td data-label="Held for" { (age(r.held_at)) }
                                td data-label="Owner" { (r.claimed_by.as_deref().unwrap_or("-")) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(&v, "/escalations", "Escalated cases", body))
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub struct Done {
    pub done: Option<String>,
}

/// One line of the case's timeline.
struct Moment {
    at: DateTime<Utc>,
    kind: String,
    text: String,
    class: &'static str,
}

async fn timeline(s: &AppState, record: &CaseRecord) -> Result<Vec<Moment>, PageError> {
    let id = record.case.id;
    let mut out = Vec::new();
    for h in s.store.case_history(id, 2000).await? {
        let class = if h.kind == "call" { "call" } else { "step" };
        out.push(Moment {
            at: h.at,
            text: format!("{} → {}", h.summary(), h.state),
            kind: h.kind,
            class,
        });
    }
    for e in s.store.outbox_of_case(id).await? {
        let sent = e
            .sent_at
            .map_or("not sent yet".to_owned(), |t| format!("sent {}", when(t)));
        out.push(Moment {
            at: e.created_at,
            kind: "event".into(),
            text: format!("{} ({sent}; envelope {})", e.routing_key, e.envelope_id),
            class: "event",
        });
    }
    for n in s.store.case_notes(id).await? {
        let ticket = n
            .ticket
            .map(|t| format!(" [ticket {t}]"))
            .unwrap_or_default();
        out.push(Moment {
            at: n.written_at,
            kind: "note".into(),
            text: format!("{}: {}{ticket}", n.operator, n.text),
            class: "note",
        });
    }
    for o in s.store.case_operations(id).await? {
        out.push(Moment {
            at: o.created_at,
            kind: o.kind.clone(),
            text: format!("by {}", o.operator),
            class: "operation",
        });
    }
    out.sort_by_key(|m| m.at);
    Ok(out)
}

fn case_facts(record: &CaseRecord, marks: &crate::store::CaseMarks) -> Markup {
    let c = &record.case;
    let p = c.stage.progress();
    let data = &c.event.data;
    let mut rows = vec![
        ("Order", record.order_key.clone()),
        (
            "State",
            match c.stage.escalation_reason() {
                Some(r) => format!("{} ({r})", c.state()),
                None => c.state().to_string(),
            },
        ),
        (
            "Hold",
            format!("{} since {}", data.hold_reason, when(c.held_at)),
        ),
        (
            "Partner",
            (data.partner.as_ref().and_then(|p| p.id.clone())).unwrap_or_else(|| "-".into()),
        ),
        (
            "End customer",
            data.end_customer_domain()
                .map_or("-".into(), |d| d.to_string()),
        ),
    ];
    if let Some(w) = &c.order.web_order_id {
        rows.push(("Web order id", w.to_string()));
    }
    if let Some(d) = c.stage.decision() {
        rows.push(("Rule", format!("{} (rules file {})", d.rule, d.rules_hash)));
    }
    if let Some(t) = &p.target {
        let va = t.virtual_account_name.as_deref().unwrap_or("-");
        rows.push((
            "Target",
            format!(
                "{} ({}, virtual account {va})",
                t.smart_account_domain, t.account_type
            ),
        ));
    }
    if let Some(k) = &p.idempotency_key {
        rows.push(("Idempotency-Key", k.clone()));
    }
    if let Some(a) = &p.assignment {
        rows.push(("Assignment", format!("{} at {}", a.id, when(a.at))));
    }
    rows.push(("Generation", c.generation.to_string()));
    if let Some(by) = &marks.claimed_by {
        rows.push(("Claimed by", by.clone()));
    }
    if let (Some(by), Some(at)) = (&marks.handled_by, marks.handled_at) {
        rows.push(("Closed by hand", format!("{by} at {}", when(at))));
    }
    facts(&rows)
}

fn explanation(s: &AppState, record: &CaseRecord) -> Markup {
    html! {
        @match &s.rules {
            Ok(rules) => {
                @let e = rules.explain(&record.case.event.data);
                @if record.case.stage.decision().is_some_and(|d| d.rules_hash != rules.hash()) {
                    p.warn { "The rules file changed since this case was decided: this is what the rules in force say now." }
                }
                pre.explain { (e.to_string()) }
            }
            Err(e) => { p.warn { "The rules file could not be read: " (e.to_string()) } }
        }
    }
}

fn case_actions(v: &Viewer, record: &CaseRecord) -> Markup {
    let id = record.case.id;
    let escalated = record.case.state() == crate::domain::CaseState::Escalated;
    html! {
        section.card.actions {
            h2 { "Act" }
            @if escalated {
                (action_form(v, &format!("/cases/{id}/retry"), "Retry (the cause is fixed)", html! {}))
                (action_form(v, &format!("/cases/{id}/close"), "Close as handled by hand", html! {
                    label { "What was done" textarea name="note" required maxlength="4000" {} }
                    label { "Ticket" input type="text" name="ticket" maxlength="200"; }
                }))
            }
            (action_form(v, &format!("/cases/{id}/claim"), "Claim", html! {}))
            (action_form(v, &format!("/cases/{id}/note"), "Add note", html! {
                label { "Note" textarea name="text" required maxlength="4000" {} }
                label { "Ticket" input type="text" name="ticket" maxlength="200"; }
            }))
        }
    }
}

/// `GET /cases/{id}`.
pub async fn case_page(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
    Path(id): Path<Uuid>,
    Query(q): Query<Done>,
) -> Result<Markup, PageError> {
    let record = (s.store.case_by_id(id).await?)
        .ok_or_else(|| PageError::NotFound(format!("no case {id}")))?;
    let marks = s.store.case_marks(id).await?;
    let moments = timeline(&s, &record).await?;
    let reason = record.case.stage.escalation_reason();
    let body = html! {
        (notice(q.done.as_deref()))
        @if let Some(r) = reason { p.action.stuck { strong { (r.as_str()) } ": " (r.action()) } }
        div.columns {
            section.card { h2 { "Case" } (case_facts(&record, &marks)) }
            (case_actions(&v, &record))
        }
        section.card { h2 { "Why this rule" } (explanation(&s, &record)) }
        section.card.live id="timeline" data-live {
            h2 { "Timeline" }
            ol.timeline {
                @for m in &moments {
                    li class=(m.class) {
                        time datetime=(m.at.to_rfc3339()) { (m.at.format("%Y-%m-%d %H:%M:%S")) }
                        span.kind { (m.kind) }
                        span.text { (m.text) }
                    }
                }
            }
        }
    };
    let title = format!("Case of order {}", record.order_key);
    Ok(layout::page(&v, "/escalations", &title, body))
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub struct CsrfOnly {
    pub csrf: String,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub struct CloseForm {
    csrf: String,
    note: String,
    ticket: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub struct NoteForm {
    pub csrf: String,
    pub text: String,
    pub ticket: Option<String>,
}

fn back(id: Uuid, done: &str) -> Redirect {
    Redirect::to(&format!("/cases/{id}?done={}", url_encode(done)))
}

/// `POST /cases/{id}/retry`.
pub async fn retry(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
    Path(id): Path<Uuid>,
    Form(f): Form<CsrfOnly>,
) -> Result<Redirect, PageError> {
    may_act(&v, &s, &f.csrf)?;
    let (case, _) = actions::retry(&s.store, &v.user.name, &id.to_string()).await?;
    Ok(back(
        id,
        &format!("Re-opened: it resumes at {}.", case.state()),
    ))
}

/// `POST /cases/{id}/close`.
pub async fn close(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
    Path(id): Path<Uuid>,
    Form(f): Form<CloseForm>,
) -> Result<Redirect, PageError> {
    may_act(&v, &s, &f.csrf)?;
    actions::close(&s.store, &v.user.name, id, &f.note, f.ticket.as_deref()).await?;
    Ok(back(id, "Closed as handled by hand."))
}

/// `POST /cases/{id}/claim`.
pub async fn claim(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
    Path(id): Path<Uuid>,
    Form(f): Form<CsrfOnly>,
) -> Result<Redirect, PageError> {
    may_act(&v, &s, &f.csrf)?;
    actions::claim_case(&s.store, &v.user.name, id).await?;
    Ok(back(id, &format!("Claimed by {}.", v.user.name)))
}

/// `POST /cases/{id}/note`.
pub async fn note(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
    Path(id): Path<Uuid>,
    Form(f): Form<NoteForm>,
) -> Result<Redirect, PageError> {
    may_act(&v, &s, &f.csrf)?;
    actions::note_case(&s.store, &v.user.name, id, &f.text, f.ticket.as_deref()).await?;
    Ok(back(id, "Note added."))
}
