//! Dead letters grouped by code and signature → a list → one message
//! (headers, properties, the body pretty or in hex, the detail, every
//! sighting, the notes); claim, archive, note; replay from here.

use axum::Extension;
use axum::extract::{Form, Path, Query, State};
use axum::response::Redirect;
use maud::{Markup, html};
use serde::Deserialize;

use super::escalations::{Done, NoteForm};
use super::layout::{self, action_form, age, facts, notice, url_encode, when};
use super::{AppState, PageError, Viewer, may_act};
use crate::domain::dead_letter::body_text;
use crate::operations::actions;
use crate::store::{DeadLetterFilter, DeadLetterGroup};

fn group_actions(v: &Viewer, g: &DeadLetterGroup) -> Markup {
    let group = html! { input type="hidden" name="group" value=(g.group); };
    html! {
        div.inline {
            a.button href={ "/replay?group=" (url_encode(&g.group)) } { "Replay…" }
            (action_form(v, "/dead-letters/claim", "Claim", group.clone()))
            (action_form(v, "/dead-letters/archive", "Archive", group))
        }
    }
}

/// `GET /dead-letters`: the groups.
pub async fn groups(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
    Query(q): Query<Done>,
) -> Result<Markup, PageError> {
    let groups = s.store.dead_letter_groups().await?;
    let body = html! {
        (notice(q.done.as_deref()))
        div.live id="dead-letter-groups" data-live {
            @if groups.is_empty() { p.ok { "No dead letters." } }
            div.table {
                table {
                    thead { tr { th { "Code" } th { "Detail" } th { "Count" } th { "Last seen" } th { "Last hour" } th { "" } } }
                    tbody {
                        @for g in &groups {
                            tr {
                                td data-label="Code" { a href={ "/dead-letters/list?group=" (url_encode(&g.group)) } { (g.code) } }
                                td data-label="Detail" { (g.signature) }
                                td data-label="Count" { (g.count) }
                                td data-label="Last seen" { (age(g.last_seen)) " ago" }
                                td data-label="Last hour" { (g.last_hour) @if g.growing { " " span.badge.growing { "growing" } } }
                                td { (group_actions(&v, g)) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(&v, "/dead-letters", "Dead letters", body))
}

/// The list's query.
#[derive(Default, Deserialize)]
#[serde(default)]
pub struct ListQuery {
    group: Option<String>,
    code: Option<String>,
    order: Option<String>,
    text: Option<String>,
    archived: Option<String>,
}

/// `GET /dead-letters/list?group=…&code=…&order=…&text=…&archived=on`.
pub async fn list(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
    Query(q): Query<ListQuery>,
) -> Result<Markup, PageError> {
    let some = |o: &Option<String>| o.clone().filter(|s| !s.trim().is_empty());
    let filter = DeadLetterFilter {
        group: some(&q.group),
        code: some(&q.code),
        order: some(&q.order),
        text: some(&q.text),
        include_archived: q.archived.is_some(),
        ..DeadLetterFilter::default()
    };
    let rows = s.store.list_dead_letters(&filter, 500, 0).await?;
    let body = html! {
        form.filters method="get" action="/dead-letters/list" {
            input type="hidden" name="group" value=[filter.group.as_deref()];
            label { "Code" input type="text" name="code" value=[filter.code.as_deref()]; }
            label { "Order" input type="text" name="order" value=[filter.order.as_deref()]; }
            label { "Text" input type="text" name="text" value=[filter.text.as_deref()]; }
            label.check { input type="checkbox" name="archived" checked[filter.include_archived]; "archived too" }
            button type="submit" { "Filter" }
        }
        @let selected = replay_query(&filter);
        @if !rows.is_empty() && !selected.is_empty() {
            p { a.button href={ "/replay?" (selected) } { "Replay these…" } }
        }
        p { (rows.len()) " dead letter(s)" @if rows.len() == 500 { " (the newest 500)" } "." }
        div.table {
            table {
                thead { tr { th { "Id" } th { "Code" } th { "Detail" } th { "Order" } th { "Seen" } th { "Last seen" } th { "Claimed by" } } }
                tbody {
                    @for l in &rows {
                        tr {
                            td data-label="Id" { a href={ "/dead-letters/" (l.id) } { (l.id) } }
                            td data-label="Code" { (l.code) }
                            td data-label="Detail" { (l.detail) }
                            td data-label="Order" { (l.sales_order_number.as_deref().or(l.web_order_id.as_deref()).unwrap_or("-")) }
                            td data-label="Seen" { (l.seen_count) }
                            td data-label="Last seen" { (age(l.last_seen)) " ago" }
                            td data-label="Claimed by" { (l.claimed_by.as_deref().unwrap_or("-")) }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(&v, "/dead-letters", "Dead letters", body))
}

/// The list's filter as the replay form's query.
fn replay_query(f: &DeadLetterFilter) -> String {
    [
        ("group", &f.group),
        ("code", &f.code),
        ("order", &f.order),
        ("text", &f.text),
    ]
    .iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", url_encode(v))))
    .collect::<Vec<_>>()
    .join("&")
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// `GET /dead-letters/{id}`: one message whole.
pub async fn message(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
    Path(id): Path<i64>,
    Query(q): Query<Done>,
) -> Result<Markup, PageError> {
    let l = (s.store.dead_letter(id).await?)
        .ok_or_else(|| PageError::NotFound(format!("no dead letter {id}")))?;
    let sightings = s.store.dead_letter_sightings(id).await?;
    let notes = s.store.dead_letter_notes(id).await?;
    let m = &l.summary;
    let ids = html! { input type="hidden" name="ids" value=(id); };
    let body = html! {
        (notice(q.done.as_deref()))
        div.columns {
            section.card {
                h2 { "Message" }
                (facts(&[
                    ("Code", m.code.clone()),
                    ("Detail", m.detail.clone()),
                    ("Message id", m.message_id.clone().unwrap_or_else(|| "-".into())),
                    ("Order", m.sales_order_number.clone().or(m.web_order_id.clone()).unwrap_or_else(|| "-".into())),
                    ("Event id", m.event_id.clone().unwrap_or_else(|| "-".into())),
                    ("Origin", format!("{} / {}", m.origin_exchange.as_deref().unwrap_or("-"), m.origin_routing_key.as_deref().unwrap_or("-"))),
                    ("Seen", format!("{} time(s), first {}, last {}", m.seen_count, when(m.first_seen), when(m.last_seen))),
                    ("Claimed by", m.claimed_by.clone().unwrap_or_else(|| "-".into())),
                    ("Archived", m.archived_at.map_or("no".into(), when)),
                ]))
            }
            section.card.actions {
                h2 { "Act" }
                a.button href={ "/replay?ids=" (id) } { "Replay…" }
                (action_form(&v, "/dead-letters/claim", "Claim", ids.clone()))
                (action_form(&v, "/dead-letters/archive", "Archive", ids))
                (action_form(&v, &format!("/dead-letters/{id}/note"), "Add note", html! {
                    label { "Note" textarea name="text" required maxlength="4000" {} }
                    label { "Ticket" input type="text" name="ticket" maxlength="200"; }
                }))
            }
        }
        section.card { h2 { "Body (" (m.body_bytes) " bytes)" } pre.body { (body_text(&l.body)) } }
        section.card { h2 { "Headers" } pre { (pretty(&l.headers)) } }
        section.card { h2 { "Properties" } pre { (pretty(&l.properties)) } }
        section.card {
            h2 { "Sightings" }
            ol.timeline { @for s in &sightings { li { time { (when(s.seen_at)) } span.kind { (s.code) } span.text { (s.detail) } } } }
        }
        @if !notes.is_empty() {
            section.card {
                h2 { "Notes" }
                ol.timeline { @for n in &notes { li.note { time { (when(n.written_at)) } span.kind { (n.operator) } span.text { (n.text) @if let Some(t) = &n.ticket { " [ticket " (t) "]" } } } } }
            }
        }
    };
    Ok(layout::page(
        &v,
        "/dead-letters",
        &format!("Dead letter {id}"),
        body,
    ))
}

/// A claim or an archive: some ids, or a group.
#[derive(Default, Deserialize)]
#[serde(default)]
pub struct Selection {
    csrf: String,
    ids: Option<i64>,
    group: Option<String>,
}

impl Selection {
    async fn ids(&self, s: &AppState) -> Result<Vec<i64>, PageError> {
        let ids = self.ids.into_iter().collect();
        let group = self.group.clone().filter(|g| !g.is_empty());
        Ok(actions::chosen(&s.store, ids, group).await?)
    }

    fn back(&self, done: &str) -> Redirect {
        let done = url_encode(done);
        match self.ids {
            Some(id) => Redirect::to(&format!("/dead-letters/{id}?done={done}")),
            None => Redirect::to(&format!("/dead-letters?done={done}")),
        }
    }
}

/// `POST /dead-letters/claim`.
pub async fn claim(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
    Form(f): Form<Selection>,
) -> Result<Redirect, PageError> {
    may_act(&v, &s, &f.csrf)?;
    let done = actions::claim(&s.store, &v.user.name, &f.ids(&s).await?).await?;
    Ok(f.back(&format!(
        "{} dead letter(s) claimed by {}.",
        done.changed, v.user.name
    )))
}

/// `POST /dead-letters/archive`.
pub async fn archive(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
    Form(f): Form<Selection>,
) -> Result<Redirect, PageError> {
    may_act(&v, &s, &f.csrf)?;
    let done = actions::archive(&s.store, &v.user.name, &f.ids(&s).await?).await?;
    Ok(f.back(&format!("{} dead letter(s) archived.", done.changed)))
}

/// `POST /dead-letters/{id}/note`.
pub async fn note(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
    Path(id): Path<i64>,
    Form(f): Form<NoteForm>,
) -> Result<Redirect, PageError> {
    may_act(&v, &s, &f.csrf)?;
    actions::note(&s.store, &v.user.name, id, &f.text, f.ticket.as_deref()).await?;
    Ok(Redirect::to(&format!(
        "/dead-letters/{id}?done=Note%20added."
    )))
}
