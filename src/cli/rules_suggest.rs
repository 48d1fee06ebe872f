//! `holdclear rules suggest [--rules FILE] [--since 30d] [--min 2] [--json]`:
//! rules learned from the hand fixes of a window (escalated orders a person
//! released by assigning an account in Cisco's portal, recorded when
//! `HOLDCLEAR_ESCALATED_WATCH_INTERVAL` is set), each as TOML ready to
//! paste, with its evidence and what `rules diff` says it would change
//! placed first in the rules in force. Read-only.

use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;

use super::rules::{Window, in_force, print_changes};
use crate::rules::{Chosen, Learned, Learner, Rules, WhatIf, WhatIfReport};
use crate::store::Store;

/// A hand fix that could not be learned from.
struct Unlearnable {
    order: String,
    case_id: String,
    reason: String,
}

/// Runs `rules suggest`.
pub(super) async fn suggest(
    config: Option<&Path>,
    window: &Window,
    min: u64,
) -> anyhow::Result<()> {
    let (rules, store) = in_force(config, window).await?;
    let from = window.start()?;
    let (learner, unlearnable) = read_fixes(&store, from).await?;
    let learned = learner.finish(min, rules.names());
    let diffs = what_each_changes(&rules, &learned, &store, from).await?;
    if window.json {
        let suggestions: Vec<_> = (learned.suggestions.iter().zip(&diffs))
            .map(|(s, d)| serde_json::json!({"suggestion": s, "diff": d}))
            .collect();
        let unlearnable: Vec<_> = (unlearnable.iter())
            .map(
                |u| serde_json::json!({"order": u.order, "case_id": u.case_id, "reason": u.reason}),
            )
            .collect();
        let json = serde_json::json!({
            "since": window.label(), "from": from,
            "rules_file": rules.file(), "rules_hash": rules.hash(),
            "fixes": learned.fixes, "suggestions": suggestions,
            "too_few": learned.too_few, "disagreements": learned.disagreements,
            "unreadable": unlearnable,
        });
        let text =
            serde_json::to_string_pretty(&json).context("writing the suggestions as JSON")?;
        println!("{text}");
    } else {
        print(&rules, window, from, &learned, &diffs, &unlearnable);
    }
    Ok(())
}

/// The hand fixes of the window, learned from; those that cannot be.
async fn read_fixes(
    store: &Store,
    from: DateTime<Utc>,
) -> anyhow::Result<(Learner, Vec<Unlearnable>)> {
    let mut learner = Learner::default();
    let mut unlearnable = Vec::new();
    let mut fixes = std::pin::pin!(store.hand_fixes(from));
    while let Some(f) = fixes.try_next().await? {
        let cannot = |reason: &str| Unlearnable {
            order: f.order_key.clone(),
            case_id: f.case_id.to_string(),
            reason: reason.to_owned(),
        };
        match (&f.event, &f.fix.smart_account_domain) {
            (Ok(event), Some(domain)) => learner.add(
                &f.order_key,
                &event.data,
                Chosen {
                    smart_account_domain: domain.to_ascii_lowercase(),
                    virtual_account: f.fix.virtual_account_name.clone(),
                },
            ),
            (Err(reason), _) => unlearnable.push(cannot(reason)),
            (Ok(_), None) => unlearnable.push(cannot(
                "the order showed no Smart Account after the hold was released",
            )),
        }
    }
    Ok((learner, unlearnable))
}

/// For each suggestion, `rules diff` of the rules in force against the
/// same rules with the suggestion first, over the cases of the window.
async fn what_each_changes(
    rules: &Rules,
    learned: &Learned,
    store: &Store,
    from: DateTime<Utc>,
) -> anyhow::Result<Vec<WhatIfReport>> {
    if learned.suggestions.is_empty() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(rules.file())
        .with_context(|| format!("reading {}", rules.file().display()))?;
    let candidates = (learned.suggestions.iter())
        .map(|s| Rules::parse(&format!("{}\n{text}", s.toml), rules.file()))
        .collect::<Result<Vec<Rules>, _>>()
        .context("a suggested rule does not validate (a bug: please report it)")?;
    let mut what_ifs: Vec<WhatIf<'_>> = candidates.iter().map(|c| WhatIf::new(rules, c)).collect();
    let mut events = std::pin::pin!(store.stored_events(from));
    while let Some(stored) = events.try_next().await? {
        for w in &mut what_ifs {
            match &stored.event {
                Ok(event) => w.replay(&stored.order_key, &event.data),
                Err(reason) => w.unreadable(&stored.order_key, &stored.case_id.to_string(), reason),
            }
        }
    }
    Ok(what_ifs.into_iter().map(WhatIf::finish).collect())
}

fn print(
    rules: &Rules,
    window: &Window,
    from: DateTime<Utc>,
    learned: &Learned,
    diffs: &[WhatIfReport],
    unlearnable: &[Unlearnable],
) {
    let (from, label) = (from.format("%Y-%m-%d %H:%M UTC"), window.label());
    if learned.fixes == 0 && unlearnable.is_empty() {
        println!(
            "No escalated order was released by hand since {from} (--since {label}): nothing to learn from. \
             (Hand fixes are recorded while HOLDCLEAR_ESCALATED_WATCH_INTERVAL is set.)"
        );
        return;
    }
    println!(
        "{} hand fixes since {from} (--since {label}); {} suggested rule{}.",
        learned.fixes,
        learned.suggestions.len(),
        if learned.suggestions.len() == 1 {
            ""
        } else {
            "s"
        }
    );
    let count = learned.suggestions.len();
    for (i, (s, d)) in learned.suggestions.iter().zip(diffs).enumerate() {
        println!("\n── Suggestion {} of {count}: {:?}", i + 1, s.name);
        println!("{}.", s.evidence);
        println!(
            "Placed first in {}, over the {} orders opened since {from}:",
            rules.file().display(),
            d.replayed
        );
        print_changes(
            d,
            "Stored events the current decoder cannot read, not replayed",
        );
        println!("\n{}", s.toml);
    }
    if !learned.disagreements.is_empty() {
        println!(
            "\nNot suggested: the hand fixes chose different accounts (or the orders carry nothing a rule matches):"
        );
        for g in &learned.disagreements {
            let chosen: Vec<String> = (g.chosen.iter())
                .map(|c| format!("{} ×{}", c.chosen.smart_account_domain, c.fixes))
                .collect();
            println!("  {}: {}", g.when.describe(), chosen.join(", "));
        }
    }
    if !learned.too_few.is_empty() {
        println!("\nNot suggested yet: fewer hand fixes than --min:");
        for t in &learned.too_few {
            println!("  {}: {}", t.when.describe(), t.fixes);
        }
    }
    if !unlearnable.is_empty() {
        println!(
            "\nHand fixes that cannot be learned from ({}):",
            unlearnable.len()
        );
        for u in unlearnable {
            println!("  {} (case {}): {}", u.order, u.case_id, u.reason);
        }
    }
}
