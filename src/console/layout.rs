//! The page shell (header, navigation, who is signed in) and the small
//! pieces every page uses: times, ages, action forms (disabled for
//! viewers), key–value lists.

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use super::Viewer;

/// A whole page: `title`, the navigation with `current` marked, `body`.
pub fn page(v: &Viewer, current: &str, title: &str, body: Markup) -> Markup {
    let nav = [
        ("/", "Overview"),
        ("/escalations", "Escalations"),
        ("/dead-letters", "Dead letters"),
        ("/operations", "Operations"),
        ("/rules", "Rules"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · holdclear console" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { "holdclear" }
                    nav {
                        @for (href, label) in nav {
                            a href=(href) aria-current=[(current == href).then_some("page")] { (label) }
                        }
                    }
                    div.who {
                        span.user { (v.user.name) " · " (v.user.role.as_str()) }
                        form method="post" action="/logout" {
                            (csrf(v))
                            button.link type="submit" { "Sign out" }
                        }
                    }
                }
                main id="main" { h1 { (title) } (body) }
            }
        }
    }
}

/// The hidden CSRF field of a form.
pub fn csrf(v: &Viewer) -> Markup {
    html! { input type="hidden" name="csrf" value=(v.csrf); }
}

/// An action form posting to `action`: its fields, and a button that is
/// disabled (with the reason) for viewers; the server refuses them anyway.
pub fn action_form(v: &Viewer, action: &str, label: &str, fields: Markup) -> Markup {
    let viewer = !v.user.may_act();
    html! {
        form.action method="post" action=(action) {
            (csrf(v))
            (fields)
            button type="submit" disabled[viewer] title=[viewer.then_some("viewers cannot act")] { (label) }
        }
    }
}

/// `2026-12-01 16:58 UTC`.
pub fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// `3 h 5 min` since `t`.
pub fn age(t: DateTime<Utc>) -> String {
    let s = (Utc::now() - t).num_seconds().max(0);
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

/// A definition list of label–value pairs.
pub fn facts(rows: &[(&str, String)]) -> Markup {
    html! {
        dl.facts {
            @for (k, val) in rows {
                dt { (k) } dd { (val) }
            }
        }
    }
}

/// Percent-encodes a query value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The sign-in page (`error`: why the last try failed).
pub fn login(csrf: &str, next: &str, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Sign in · holdclear console" }
                link rel="stylesheet" href="/assets/console.css";
            }
            body.login {
                main {
                    h1 { "holdclear console" }
                    @if let Some(e) = error { p.error role="alert" { (e) } }
                    form method="post" action="/login" {
                        input type="hidden" name="csrf" value=(csrf);
                        input type="hidden" name="next" value=(next);
                        label for="token" { "Access token" }
                        input id="token" type="password" name="token" autocomplete="current-password" required autofocus;
                        button type="submit" { "Sign in" }
                    }
                }
            }
        }
    }
}

/// A short page for an error.
pub fn error_page(status: StatusCode, text: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (status.as_u16()) " · holdclear console" }
                link rel="stylesheet" href="/assets/console.css";
            }
            body {
                main {
                    h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                    p.error role="alert" { (text) }
                    p { a href="/" { "Back to the overview" } }
                }
            }
        }
    }
}

/// A notice under the title (after an action: `?done=…`).
pub fn notice(done: Option<&str>) -> Markup {
    html! {
        @if let Some(d) = done.filter(|d| !d.is_empty()) {
            p.notice role="status" { (d) }
        }
    }
}
