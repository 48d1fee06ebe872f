//! The commerce API's rate budget shared by every worker: one row of
//! `commerce_rate_budget`, a token bucket refilled by elapsed time on
//! PostgreSQL's clock. See `commerce/limiter.rs` for how a worker spends it.

use std::time::Duration;

use super::{Store, StoreError};
use crate::commerce::{Grant, RateBudget};

/// Refills the bucket for the time elapsed since the last take (at most
/// `$3` tokens), grants up to `$1` whole tokens and says how long until the
/// next one. `FOR UPDATE` reads the latest row version: concurrent takes
/// queue on the row and never grant the same tokens twice.
const TAKE: &str = "
WITH b AS (
    SELECT least($3::float8, tokens + $2::float8
               * greatest(0, extract(epoch FROM clock_timestamp() - refilled_at)::float8)) AS avail
    FROM commerce_rate_budget WHERE id = 1 FOR UPDATE
), g AS (
    SELECT avail, least(floor(avail), $1::float8) AS granted FROM b
)
UPDATE commerce_rate_budget r
SET tokens = g.avail - g.granted, refilled_at = clock_timestamp()
FROM g WHERE r.id = 1
RETURNING g.granted::int8, g.avail - g.granted";

impl Store {
    /// Takes up to `want` calls of the deployment's budget, refilled at
    /// `rate` calls per second and holding at most `burst`.
    pub async fn take_rate_budget(
        &self,
        want: u32,
        rate: f64,
        burst: f64,
    ) -> Result<Grant, StoreError> {
        let (granted, left): (i64, f64) = sqlx::query_as(TAKE)
            .bind(f64::from(want))
            .bind(rate)
            .bind(burst)
            .fetch_one(self.pool())
            .await?;
        let missing = (1.0 - left).max(0.0);
        Ok(Grant {
            granted: u32::try_from(granted.max(0)).unwrap_or(0),
            next_in: Duration::try_from_secs_f64(missing / rate).unwrap_or(Duration::from_secs(1)),
        })
    }
}

#[async_trait::async_trait]
impl RateBudget for Store {
    async fn take(&self, want: u32, rate: f64, burst: f64) -> Result<Grant, String> {
        self.take_rate_budget(want, rate, burst)
            .await
            .map_err(|e| e.to_string())
    }
}
