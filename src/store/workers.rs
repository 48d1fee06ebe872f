//! Workers' heartbeats (the `workers` table): written by each worker,
//! read by the console.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use uuid::Uuid;

use super::{Store, StoreError};

/// One beat of a worker.
#[derive(Clone, Debug)]
pub struct Beat<'a> {
    /// The worker's identity.
    pub id: Uuid,
    /// Its host name.
    pub host: &'a str,
    /// Its process id.
    pub pid: u32,
    /// holdclear's version.
    pub version: &'a str,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its readiness now.
    pub ready: bool,
}

/// A worker as its heartbeats tell it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerRow {
    /// Its identity (the first part of its lease tokens).
    pub id: Uuid,
    /// Its host name (a pod's name).
    pub host: String,
    /// Its process id.
    pub pid: i32,
    /// holdclear's version.
    pub version: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last beat.
    pub last_beat: DateTime<Utc>,
    /// Its readiness at the last beat.
    pub ready: bool,
    /// When it stopped gracefully.
    pub stopped_at: Option<DateTime<Utc>>,
    /// Case leases it holds now.
    pub leases: i64,
}

/// How long the row of a worker gone (stopped or lost) is kept.
const GONE_KEPT: &str = "1 day";

impl Store {
    /// Writes a worker's beat (its row is made on the first), and deletes
    /// the rows of workers gone for a day.
    pub async fn beat(&self, beat: &Beat<'_>) -> Result<(), StoreError> {
        let pid = i32::try_from(beat.pid).unwrap_or(i32::MAX);
        sqlx::query(
            "INSERT INTO workers (id, host, pid, version, started_at, ready) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO UPDATE SET last_beat = now(), ready = EXCLUDED.ready, \
                 stopped_at = NULL",
        )
        .bind(beat.id)
        .bind(beat.host)
        .bind(pid)
        .bind(beat.version)
        .bind(beat.started_at)
        .bind(beat.ready)
        .execute(self.pool())
        .await?;
        sqlx::query("DELETE FROM workers WHERE last_beat < now() - $1::interval")
            .bind(GONE_KEPT)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Marks a worker stopped (its graceful exit).
    pub async fn worker_stopped(&self, id: Uuid) -> Result<(), StoreError> {
        sqlx::query("UPDATE workers SET stopped_at = now(), ready = false WHERE id = $1")
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// The workers of the last day, the latest beats first, with the case
    /// leases each holds now.
    pub async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT w.id, w.host, w.pid, w.version, w.started_at, w.last_beat, w.ready, \
                    w.stopped_at, coalesce(l.n, 0) AS leases \
             FROM workers w \
             LEFT JOIN (SELECT split_part(lease_owner, '#', 1) AS worker, count(*) AS n \
                        FROM case_schedule WHERE lease_expires_at > now() GROUP BY 1) l \
                    ON l.worker = w.id::text \
             ORDER BY w.stopped_at IS NOT NULL, w.last_beat DESC LIMIT 100",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(WorkerRow {
                    id: r.try_get("id")?,
                    host: r.try_get("host")?,
                    pid: r.try_get("pid")?,
                    version: r.try_get("version")?,
                    started_at: r.try_get("started_at")?,
                    last_beat: r.try_get("last_beat")?,
                    ready: r.try_get("ready")?,
                    stopped_at: r.try_get("stopped_at")?,
                    leases: r.try_get("leases")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }
}
