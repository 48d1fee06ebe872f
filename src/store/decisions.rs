//! What `holdclear rules stats` and `rules diff` read of past decisions:
//! the cases of a window, through the columns the engine writes
//! (`rule_name`, `rules_hash`, `target`, `escalation_reason`) and the event
//! each case was opened with; and for `rules diff --shadow`, the `shadow`
//! lines of the cases' history. Read-only.

use chrono::{DateTime, Utc};
use futures_util::{Stream, StreamExt};

use super::{Store, StoreError};
use crate::domain::{Decision, HeldOrderEvent};

/// How many cases one rule of one rules file decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleHits {
    /// The rule's name.
    pub rule_name: String,
    /// SHA-256 of the rules file that decided.
    pub rules_hash: String,
    /// Cases it decided.
    pub decided: i64,
    /// Of those, the cases whose resolved target is the rule's fallback.
    pub via_fallback: i64,
}

/// Orders no rule matched (`NO_RULE_MATCHED`), grouped by what a rule would
/// have to match. `None` is a value the order did not carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnmatchedGroup {
    /// `partner.id`.
    pub partner_id: Option<String>,
    /// The domain of `endCustomer.email`, lower case.
    pub end_customer_domain: Option<String>,
    /// `endCustomer.country`.
    pub country: Option<String>,
    /// How many cases.
    pub cases: i64,
}

/// The decisions of a window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecisionStats {
    /// Cases opened in the window, decided or not.
    pub cases: i64,
    /// Per rule name and rules hash, most hits first.
    pub hits: Vec<RuleHits>,
    /// Orders that matched no rule, largest group first.
    pub unmatched: Vec<UnmatchedGroup>,
}

/// One case's stored event, as `rules diff` replays it.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    /// The case the event opened or joined.
    pub case_id: uuid::Uuid,
    /// The order's key (sales order number, else web order id).
    pub order_key: String,
    /// The event, or why the current decoder cannot read what was stored.
    pub event: Result<HeldOrderEvent, String>,
}

/// One decision made while shadow rules were loaded: what the rules in
/// force decided and what the shadow rules would have (`None`: no rule).
#[derive(Clone, Debug)]
pub struct ShadowRecord {
    /// The case.
    pub case_id: uuid::Uuid,
    /// The order's key (sales order number, else web order id).
    pub order_key: String,
    /// When the decision was made.
    pub at: DateTime<Utc>,
    /// `(live, shadow)`, or why the stored line cannot be read.
    pub decisions: Result<ShadowPair, String>,
}

/// Both sides of a [`ShadowRecord`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShadowPair {
    /// The rules in force decided (and acted on).
    pub live: Option<Decision>,
    /// The shadow rules would have decided.
    pub shadow: Option<Decision>,
    /// The shadow rules file.
    pub shadow_file: String,
    /// SHA-256 of its content at that moment.
    pub shadow_hash: String,
}

impl ShadowPair {
    fn read(detail: &str) -> Result<Self, String> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Line {
            live: Option<Decision>,
            shadow: Option<Decision>,
            shadow_file: String,
            shadow_hash: String,
        }
        let line: Line = serde_json::from_str(detail)
            .map_err(|e| format!("cannot read the stored shadow decision: {e}"))?;
        Ok(Self {
            live: line.live,
            shadow: line.shadow,
            shadow_file: line.shadow_file,
            shadow_hash: line.shadow_hash,
        })
    }
}

impl Store {
    /// The latest shadow line of each case decided since `since`, oldest
    /// first, streamed. A line the current version cannot read is an
    /// `Err` with the reason, never skipped.
    pub fn shadow_decisions(
        &self,
        since: DateTime<Utc>,
    ) -> impl Stream<Item = Result<ShadowRecord, StoreError>> + '_ {
        sqlx::query_as::<_, (uuid::Uuid, String, DateTime<Utc>, String)>(
            "SELECT case_id, order_key, at, detail FROM (
                 SELECT DISTINCT ON (h.case_id) h.case_id, c.order_key, h.at, h.detail::text AS detail
                 FROM case_history h JOIN cases c ON c.id = h.case_id
                 WHERE h.kind = 'shadow' AND h.at >= $1
                 ORDER BY h.case_id, h.id DESC
             ) latest ORDER BY at, case_id",
        )
        .bind(since)
        .fetch(self.pool())
        .map(|row| {
            let (case_id, order_key, at, detail) = row?;
            Ok(ShadowRecord {
                case_id,
                order_key,
                at,
                decisions: ShadowPair::read(&detail),
            })
        })
    }

    /// Rule hits and unmatched orders of the cases opened since `since`.
    pub async fn decision_stats(&self, since: DateTime<Utc>) -> Result<DecisionStats, StoreError> {
        let cases: i64 = sqlx::query_scalar("SELECT count(*) FROM cases WHERE created_at >= $1")
            .bind(since)
            .fetch_one(self.pool())
            .await?;
        let hits = sqlx::query_as::<_, (String, String, i64, i64)>(
            "SELECT rule_name, coalesce(rules_hash, ''), count(*),
                    count(*) FILTER (WHERE (target->>'via_fallback')::boolean)
             FROM cases WHERE created_at >= $1 AND rule_name IS NOT NULL
             GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2",
        )
        .bind(since)
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .map(|(rule_name, rules_hash, decided, via_fallback)| RuleHits {
            rule_name,
            rules_hash,
            decided,
            via_fallback,
        })
        .collect();
        let unmatched = sqlx::query_as::<_, (Option<String>, Option<String>, Option<String>, i64)>(
            "SELECT event->'data'->'partner'->>'id',
                    nullif(lower(split_part(event->'data'->'endCustomer'->>'email', '@', 2)), ''),
                    event->'data'->'endCustomer'->>'country',
                    count(*)
             FROM cases WHERE created_at >= $1 AND escalation_reason = 'NO_RULE_MATCHED'
             GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1, 2, 3",
        )
        .bind(since)
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .map(
            |(partner_id, end_customer_domain, country, cases)| UnmatchedGroup {
                partner_id,
                end_customer_domain,
                country,
                cases,
            },
        )
        .collect();
        Ok(DecisionStats {
            cases,
            hits,
            unmatched,
        })
    }

    /// The events of the cases opened since `since`, oldest first, streamed
    /// (never all in memory). A stored event the current decoder cannot read
    /// is an `Err` with the reason, never skipped.
    pub fn stored_events(
        &self,
        since: DateTime<Utc>,
    ) -> impl Stream<Item = Result<StoredEvent, StoreError>> + '_ {
        sqlx::query_as::<_, (uuid::Uuid, String, Option<String>)>(
            "SELECT id, order_key, event::text FROM cases
             WHERE created_at >= $1 ORDER BY created_at, id",
        )
        .bind(since)
        .fetch(self.pool())
        .map(|row| {
            let (case_id, order_key, event) = row?;
            let event = match event {
                Some(text) => serde_json::from_str::<HeldOrderEvent>(&text)
                    .map_err(|e| format!("cannot read the stored event: {e}")),
                None => Err("no stored event".to_owned()),
            };
            Ok(StoredEvent {
                case_id,
                order_key,
                event,
            })
        })
    }
}
