//! The overview: what is stuck first (escalations with what to do, dead
//! letters), then the flow (open cases by state, the oldest open hold,
//! releases per hour) and the workers. Live: the script refreshes it.

use axum::Extension;
use axum::extract::State;
use chrono::{DateTime, Utc};
use maud::{Markup, html};

use super::layout::{self, age, url_encode, when};
use super::{AppState, PageError, Viewer};
use crate::domain::EscalationReason;
use crate::ops::heartbeat::LOST_AFTER;
use crate::store::{DeadLetterGroup, EscalationGroup, WorkerRow};

/// `GET /`.
pub async fn page(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
) -> Result<Markup, PageError> {
    let store = &s.store;
    let snapshot = store.ops_snapshot().await?;
    let escalations = store.escalation_groups().await?;
    let groups = store.dead_letter_groups().await?;
    let per_hour = store.released_per_hour().await?;
    let workers = store.workers().await?;
    let open: i64 = (snapshot.cases_by_state.iter())
        .filter(|(state, _)| !matches!(state.as_str(), "released" | "escalated" | "merged"))
        .map(|(_, n)| n)
        .sum();
    let body = html! {
        div.live id="overview" data-live {
            section.card.stuck {
                h2 { "Escalations" }
                (escalation_table(&escalations))
            }
            section.card.stuck {
                h2 { "Dead letters" }
                (dead_letter_table(&groups))
            }
            section.card {
                h2 { "Cases" }
                div.tiles {
                    div.tile { span.n { (open) } span { "open" } }
                    @for (state, n) in &snapshot.cases_by_state {
                        div.tile { span.n { (n) } span { (state) } }
                    }
                }
                p { "Oldest open hold: "
                    strong { @if snapshot.oldest_open_hold_seconds > 0.0 {
                        (age(Utc::now() - chrono::Duration::seconds(snapshot.oldest_open_hold_seconds as i64)))
                    } @else { "none" } }
                    @if snapshot.outbox_backlog > 0 {
                        " · events waiting to be published: " strong { (snapshot.outbox_backlog) }
                    }
                }
                h3 { "Orders cleared per hour, last 24 hours" }
                (chart(&per_hour))
            }
            section.card {
                h2 { "Workers" }
                (workers_list(&workers))
            }
        }
    };
    Ok(layout::page(&v, "/", "Overview", body))
}

fn escalation_table(groups: &[EscalationGroup]) -> Markup {
    html! {
        @if groups.is_empty() {
            p.ok { "Nothing escalated." }
        } @else {
            ul.groups {
                @for g in groups {
                    li class={ "group level-" (g.level) } {
                        a href={ "/escalations/list?reason=" (url_encode(&g.reason)) "&level=" (url_encode(&g.level)) } {
                            span.count { (g.count) }
                            span.reason { (g.reason) }
                            span.badge { (g.level) }
                        }
                        p.action { (action(&g.reason)) }
                        p.meta { "oldest hold " (age(g.oldest_hold)) " ago" }
                    }
                }
            }
        }
    }
}

/// The reason's sentence for the operator.
pub fn action(reason: &str) -> &'static str {
    EscalationReason::parse(reason).map_or("", EscalationReason::action)
}

fn dead_letter_table(groups: &[DeadLetterGroup]) -> Markup {
    html! {
        @if groups.is_empty() {
            p.ok { "No dead letters." }
        } @else {
            ul.groups {
                @for g in groups.iter().take(20) {
                    li.group {
                        a href={ "/dead-letters/list?group=" (url_encode(&g.group)) } {
                            span.count { (g.count) }
                            span.reason { (g.code) }
                            @if g.growing { span.badge.growing { "growing" } }
                        }
                        p.action { (g.signature) }
                        p.meta { "last seen " (age(g.last_seen)) " ago" }
                    }
                }
            }
        }
    }
}

/// What a worker's heartbeats say of it now.
fn worker_status(w: &WorkerRow) -> (&'static str, &'static str) {
    let silent = (Utc::now() - w.last_beat).to_std().unwrap_or_default();
    match (w.stopped_at, silent > LOST_AFTER, w.ready) {
        (Some(_), _, _) => ("stopped", "status-done"),
        (None, true, _) => ("lost", "status-lost"),
        (None, false, true) => ("up", "status-running"),
        (None, false, false) => ("up, not ready", "status-interrupted"),
    }
}

fn workers_list(workers: &[WorkerRow]) -> Markup {
    html! {
        @if workers.is_empty() {
            p.warn { "No worker has reported in the last day." }
        } @else {
            div.table {
                table.workers {
                    thead { tr { th { "Worker" } th { "Status" } th { "Last beat" } th { "Started" } th { "Leases" } th { "Version" } } }
                    tbody {
                        @for w in workers {
                            @let (status, class) = worker_status(w);
                            tr {
                                td data-label="Worker" { code { (w.id) } br; small { (w.host) " · pid " (w.pid) } }
                                td data-label="Status" {
                                    span class={ "badge " (class) } { (status) }
                                    @if let Some(at) = w.stopped_at { " " (age(at)) " ago" }
                                }
                                td data-label="Last beat" { (age(w.last_beat)) " ago" }
                                td data-label="Started" { (when(w.started_at)) }
                                td data-label="Leases" { (w.leases) }
                                td data-label="Version" { (w.version) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Bars, one per hour, drawn here: no script, no library.
fn chart(per_hour: &[(DateTime<Utc>, i64)]) -> Markup {
    let max = per_hour.iter().map(|(_, n)| *n).max().unwrap_or(0).max(1);
    let (w, h, bar) = (240.0, 60.0, 10.0);
    let total: i64 = per_hour.iter().map(|(_, n)| n).sum();
    html! {
        svg.chart viewBox={ "0 0 " (w) " " (h + 12.0) } role="img" aria-label={ (total) " orders cleared in 24 hours" } {
            @for (i, (hour, n)) in per_hour.iter().enumerate() {
                @let height = (*n as f64 / max as f64) * h;
                rect.bar x=(i as f64 * bar) y=(h - height) width=(bar - 2.0) height=(height) {
                    title { (when(*hour)) ": " (n) }
                }
            }
            line.axis x1="0" y1=(h) x2=(w) y2=(h) {}
            text.label x="0" y=(h + 11.0) { "-24 h" }
            text.label x=(w) y=(h + 11.0) text-anchor="end" { "now · " (total) " cleared" }
        }
    }
}
