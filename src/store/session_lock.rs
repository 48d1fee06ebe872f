//! PostgreSQL session-level advisory locks on a connection of their own
//! (outside the pool): held for as long as the lock lives, released when
//! it is released or dropped, and by PostgreSQL when the process holding it
//! dies and its connection closes. The pruner and the dead-letter replays
//! run under one.

use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use super::{Store, StoreError};

/// An advisory lock held on a connection of its own.
pub struct SessionLock {
    conn: PgConnection,
    key: i64,
}

impl SessionLock {
    /// Takes lock `key`, or `None` when another session holds it.
    pub(super) async fn try_acquire(pool: &PgPool, key: i64) -> Result<Option<Self>, StoreError> {
        // Detached: the lock must not stay behind in a pooled connection.
        let mut conn = pool.acquire().await?.detach();
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut conn)
            .await?;
        if locked {
            Ok(Some(Self { conn, key }))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    /// The connection holding the lock, for work that must run under it.
    pub(super) fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// Releases the lock and closes the connection.
    pub async fn release(mut self) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(self.key)
            .execute(&mut self.conn)
            .await?;
        self.conn.close().await?;
        Ok(())
    }
}

/// The advisory lock key of an operation's runs: the high half of its id
/// (random), so operations' keys do not meet each other's or the pruner's.
fn operation_key(id: Uuid) -> i64 {
    let (high, _) = id.as_u64_pair();
    i64::from_ne_bytes(high.to_ne_bytes())
}

impl Store {
    /// The lock of a dead-letter operation's run, or `None` while another
    /// process runs it: one run at a time sends each message once.
    pub async fn try_lock_operation(&self, id: Uuid) -> Result<Option<SessionLock>, StoreError> {
        SessionLock::try_acquire(self.pool(), operation_key(id)).await
    }
}
