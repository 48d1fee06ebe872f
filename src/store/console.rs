//! What the console reads that no other command does: escalations grouped
//! and filtered, releases per hour, workers seen, a case's operator data
//! and the operations on it. Every list is bounded.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{QueryBuilder, Row};
use uuid::Uuid;

use super::dead_letters::Operation;
use super::{Store, StoreError};

/// Most rows an escalation list returns.
pub const MAX_ESCALATIONS: i64 = 500;

/// The cases a person must look at: escalated and not closed by hand since
/// (a later escalation is a new one), or still watched past a
/// `HOLD_PERSISTS` threshold. Columns: the list's.
const ESCALATIONS: &str = "WITH esc AS (
    SELECT c.id, c.order_key, c.state,
           coalesce(c.escalation_reason, 'HOLD_PERSISTS') AS reason,
           coalesce((SELECT h.detail->>'level' FROM case_history h
                     WHERE h.case_id = c.id AND h.kind = 'escalated'
                     ORDER BY h.id DESC LIMIT 1), 'critical') AS level,
           c.event->'data'->'partner'->>'id' AS partner,
           nullif(lower(split_part(c.event->'data'->'endCustomer'->>'email', '@', 2)), '') AS domain,
           c.rule_name, c.held_at, coalesce(c.closed_at, c.updated_at) AS escalated_at,
           c.claimed_by
    FROM cases c
    WHERE (c.state = 'escalated' AND (c.handled_at IS NULL OR c.handled_at < c.closed_at))
       OR (c.state = 'watching' AND c.escalation_level > 0))";

/// Escalations of one reason and level.
#[derive(Clone, Debug, Serialize)]
pub struct EscalationGroup {
    /// The reason's code.
    pub reason: String,
    /// `warning` or `critical`.
    pub level: String,
    /// How many cases.
    pub count: i64,
    /// The oldest hold among them.
    pub oldest_hold: DateTime<Utc>,
}

/// One escalated case, as lists show it.
#[derive(Clone, Debug, Serialize)]
pub struct EscalationRow {
    /// The case.
    pub id: Uuid,
    /// Its order.
    pub order: String,
    /// `escalated` or `watching`.
    pub state: String,
    /// Reason code.
    pub reason: String,
    /// Level.
    pub level: String,
    /// Partner id.
    pub partner: Option<String>,
    /// End customer's e-mail domain.
    pub domain: Option<String>,
    /// The rule that decided.
    pub rule: Option<String>,
    /// When the hold was applied.
    pub held_at: DateTime<Utc>,
    /// When it escalated.
    pub escalated_at: DateTime<Utc>,
    /// Who took it.
    pub claimed_by: Option<String>,
}

/// Which escalations a list shows (every field optional).
#[derive(Clone, Debug, Default)]
pub struct EscalationFilter {
    /// Reason code.
    pub reason: Option<String>,
    /// Level.
    pub level: Option<String>,
    /// Partner id.
    pub partner: Option<String>,
    /// End customer's e-mail domain.
    pub domain: Option<String>,
    /// Rule name.
    pub rule: Option<String>,
    /// Claimed by (`-`: nobody).
    pub owner: Option<String>,
    /// Held at least this many hours.
    pub min_age_hours: Option<i64>,
}

/// A worker seen at work.
#[derive(Clone, Debug, Serialize)]
pub struct WorkerSeen {
    /// Its identity (the lease token's first part).
    pub worker: String,
    /// Last seen working.
    pub last_seen: DateTime<Utc>,
    /// Leases it holds now.
    pub leases: i64,
}

/// What the operators changed on a case.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CaseMarks {
    /// Who took it.
    pub claimed_by: Option<String>,
    /// When.
    pub claimed_at: Option<DateTime<Utc>>,
    /// Who closed it by hand.
    pub handled_by: Option<String>,
    /// When.
    pub handled_at: Option<DateTime<Utc>>,
}

fn text(f: &Option<String>) -> Option<String> {
    f.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

impl Store {
    /// Escalations per reason and level, critical first, then the most.
    pub async fn escalation_groups(&self) -> Result<Vec<EscalationGroup>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{ESCALATIONS} SELECT reason, level, count(*) AS n, min(held_at) AS oldest
             FROM esc GROUP BY reason, level
             ORDER BY level = 'critical' DESC, count(*) DESC, reason LIMIT 100"
        )))
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                Ok::<_, sqlx::Error>(EscalationGroup {
                    reason: r.try_get("reason")?,
                    level: r.try_get("level")?,
                    count: r.try_get("n")?,
                    oldest_hold: r.try_get("oldest")?,
                })
            })
            .collect::<Result<_, _>>()?)
    }

    /// Escalated cases matching `f`, oldest hold first (at most [`MAX_ESCALATIONS`]).
    pub async fn escalations(
        &self,
        f: &EscalationFilter,
    ) -> Result<Vec<EscalationRow>, StoreError> {
        let mut q = QueryBuilder::new(ESCALATIONS);
        q.push(" SELECT * FROM esc WHERE true");
        let mut eq = |col: &str, v: Option<String>| {
            if let Some(v) = v {
                q.push(format!(" AND {col} = ")).push_bind(v);
            }
        };
        eq("reason", text(&f.reason));
        eq("level", text(&f.level));
        eq("partner", text(&f.partner));
        eq("domain", text(&f.domain).map(|d| d.to_lowercase()));
        eq("rule_name", text(&f.rule));
        match text(&f.owner).as_deref() {
            Some("-") => {
                q.push(" AND claimed_by IS NULL");
            }
            Some(o) => {
                q.push(" AND claimed_by = ").push_bind(o.to_owned());
            }
            None => {}
        }
        if let Some(h) = f.min_age_hours.filter(|h| *h > 0) {
            q.push(" AND held_at < now() - make_interval(hours => ")
                .push_bind(i32::try_from(h).unwrap_or(i32::MAX))
                .push(")");
        }
        q.push(" ORDER BY held_at, id LIMIT ")
            .push_bind(MAX_ESCALATIONS);
        let rows = q.build().fetch_all(self.pool()).await?;
        Ok(rows
            .iter()
            .map(|r| {
                Ok::<_, sqlx::Error>(EscalationRow {
                    id: r.try_get("id")?,
                    order: r.try_get("order_key")?,
                    state: r.try_get("state")?,
                    reason: r.try_get("reason")?,
                    level: r.try_get("level")?,
                    partner: r.try_get("partner")?,
                    domain: r.try_get("domain")?,
                    rule: r.try_get("rule_name")?,
                    held_at: r.try_get("held_at")?,
                    escalated_at: r.try_get("escalated_at")?,
                    claimed_by: r.try_get("claimed_by")?,
                })
            })
            .collect::<Result<_, _>>()?)
    }

    /// Holds released per hour over the last 24 hours, oldest hour first
    /// (24 values; the last is the hour in progress).
    pub async fn released_per_hour(&self) -> Result<Vec<(DateTime<Utc>, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT h.hour, count(c.id)
             FROM generate_series(date_trunc('hour', now()) - interval '23 hours',
                                  date_trunc('hour', now()), interval '1 hour') AS h(hour)
             LEFT JOIN cases c ON c.released_at >= h.hour
                              AND c.released_at < h.hour + interval '1 hour'
             GROUP BY h.hour ORDER BY h.hour",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// Workers seen in the last 10 minutes: those holding leases, and
    /// those that wrote one of the latest 1000 case history lines.
    pub async fn workers_seen(&self) -> Result<Vec<WorkerSeen>, StoreError> {
        let rows = sqlx::query(
            "WITH leases AS (
                 SELECT split_part(lease_owner, '#', 1) AS worker, count(*) AS n, now() AS at
                 FROM case_schedule WHERE lease_expires_at > now() GROUP BY 1),
             steps AS (
                 SELECT split_part(detail->>'worker', '#', 1) AS worker, max(at) AS at
                 FROM case_history
                 WHERE id > (SELECT coalesce(max(id), 0) - 1000 FROM case_history)
                   AND detail ? 'worker' AND at > now() - interval '10 minutes'
                 GROUP BY 1)
             SELECT coalesce(l.worker, s.worker) AS worker,
                    greatest(l.at, s.at) AS last_seen, coalesce(l.n, 0) AS leases
             FROM leases l FULL JOIN steps s ON s.worker = l.worker
             ORDER BY 1 LIMIT 100",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                Ok::<_, sqlx::Error>(WorkerSeen {
                    worker: r.try_get("worker")?,
                    last_seen: r.try_get("last_seen")?,
                    leases: r.try_get("leases")?,
                })
            })
            .collect::<Result<_, _>>()?)
    }

    /// Who claimed or closed the case by hand.
    pub async fn case_marks(&self, id: Uuid) -> Result<CaseMarks, StoreError> {
        let row = sqlx::query(
            "SELECT claimed_by, claimed_at, handled_by, handled_at FROM cases WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        let Some(r) = row else {
            return Ok(CaseMarks::default());
        };
        Ok(CaseMarks {
            claimed_by: r.try_get("claimed_by")?,
            claimed_at: r.try_get("claimed_at")?,
            handled_by: r.try_get("handled_by")?,
            handled_at: r.try_get("handled_at")?,
        })
    }

    /// The operations on a case, oldest first (at most 200).
    pub async fn case_operations(&self, id: Uuid) -> Result<Vec<Operation>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, kind, operator, selection, status, case_id, cancel_requested_at,
                    created_at, updated_at, finished_at
             FROM operations WHERE case_id = $1 ORDER BY created_at LIMIT 200",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(super::dead_letters::operation)
            .collect::<Result<_, _>>()?)
    }
}
