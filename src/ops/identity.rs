//! Who this worker process is: an identity made once at start.
//!
//! Replicas in containers are all PID 1 on hosts of their own, and every
//! counter of a fresh process starts at 0, so neither the PID nor a counter
//! tells two workers apart. A random UUID made at start does: it is the
//! prefix of every lease this worker takes (`<uuid>#<claim>`), it names its
//! RabbitMQ connections, and it is shown on the start line, on `/readyz`
//! and in `holdclear cases show`. The host name and PID are shown beside it
//! for people, never used to fence anything.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

/// This process as a worker: unique across replicas and restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerIdentity {
    /// Random, made at start.
    id: Uuid,
    /// The host name (a pod's name in Kubernetes), for people.
    host: String,
    /// The process id (1 in a container), for people.
    pid: u32,
    /// When the identity was made.
    started_at: DateTime<Utc>,
}

impl WorkerIdentity {
    /// A new identity for this process: a fresh UUID, the host name and PID.
    pub fn new() -> Self {
        Self {
            id: Uuid::new_v4(),
            host: host_name(),
            pid: std::process::id(),
            started_at: Utc::now(),
        }
    }

    /// The unique part.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The host name it runs on.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// When it started.
    pub fn started_at(&self) -> DateTime<Utc> {
        self.started_at
    }

    /// The lease token of this worker's claim number `n`: `<uuid>#<n>`.
    /// Unique to this process and this claim, whatever else runs.
    pub fn lease_owner(&self, n: u64) -> String {
        format!("{}#{n}", self.id)
    }

    /// The identity part of a lease token written by [`Self::lease_owner`].
    pub fn of_lease_owner(owner: &str) -> &str {
        owner.rsplit_once('#').map_or(owner, |(id, _)| id)
    }
}

impl Default for WorkerIdentity {
    fn default() -> Self {
        Self::new()
    }
}

/// The UUID: what leases, logs and connection names carry.
impl fmt::Display for WorkerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.id)
    }
}

/// The kernel's host name (Linux), else `HOSTNAME`, else `-`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "-".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_of_one_process_differ_and_lease_owners_name_them() {
        let (a, b) = (WorkerIdentity::new(), WorkerIdentity::new());
        assert_eq!(a.pid(), b.pid());
        assert_ne!(a, b);
        assert_ne!(a.lease_owner(0), b.lease_owner(0));
        let owner = a.lease_owner(17);
        assert_eq!(owner, format!("{a}#17"));
        assert_eq!(WorkerIdentity::of_lease_owner(&owner), a.to_string());
        assert_eq!(WorkerIdentity::of_lease_owner("no-claim"), "no-claim");
    }
}
