//! The rules in force and how they decided (`holdclear rules stats` over
//! the last 7 days): cases per rule and via its fallback, the rules that
//! never matched, and the orders no rule matched, grouped by what a rule
//! would have to match.

use axum::Extension;
use axum::extract::State;
use chrono::Utc;
use maud::{Markup, html};

use super::layout::{self, facts};
use super::{AppState, PageError, Viewer};

/// `GET /rules`.
pub async fn page(
    State(s): State<AppState>,
    Extension(v): Extension<Viewer>,
) -> Result<Markup, PageError> {
    let stats = s
        .store
        .decision_stats(Utc::now() - chrono::Duration::days(7))
        .await?;
    let body = html! {
        @match &s.rules {
            Err(e) => { p.warn { "The rules file could not be read: " (e.to_string()) } }
            Ok(rules) => {
                @let never: Vec<&str> = rules.names().filter(|n| !stats.hits.iter().any(|h| h.rule_name == *n)).collect();
                section.card {
                    (facts(&[
                        ("File", rules.file().display().to_string()),
                        ("SHA-256", rules.hash().to_owned()),
                        ("Rules", rules.len().to_string()),
                        ("Cases, last 7 days", stats.cases.to_string()),
                    ]))
                    @if !never.is_empty() { p.warn { "Never matched in 7 days: " (never.join(", ")) } }
                }
                section.card {
                    h2 { "Cases per rule" }
                    div.table { table {
                        thead { tr { th { "Rule" } th { "Decided" } th { "Via fallback" } th { "Rules file" } } }
                        tbody { @for h in &stats.hits { tr {
                            td data-label="Rule" { (h.rule_name) }
                            td data-label="Decided" { (h.decided) }
                            td data-label="Via fallback" { (h.via_fallback) }
                            td data-label="Rules file" { @if h.rules_hash == rules.hash() { "in force" } @else { "an earlier one" } }
                        } } }
                    } }
                }
            }
        }
        section.card.stuck {
            h2 { "No rule matched" }
            @if stats.unmatched.is_empty() { p.ok { "Every order matched a rule." } } @else {
                div.table { table {
                    thead { tr { th { "Partner" } th { "End-customer domain" } th { "Country" } th { "Orders" } } }
                    tbody { @for g in &stats.unmatched { tr {
                        td data-label="Partner" { (g.partner_id.as_deref().unwrap_or("-")) }
                        td data-label="Domain" { (g.end_customer_domain.as_deref().unwrap_or("-")) }
                        td data-label="Country" { (g.country.as_deref().unwrap_or("-")) }
                        td data-label="Orders" { (g.cases) }
                    } } }
                } }
            }
        }
    };
    Ok(layout::page(&v, "/rules", "Rules", body))
}
