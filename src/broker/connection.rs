//! Connections to RabbitMQ: one attempt, or a loop with backoff until connected.
//!
//! lapin's own auto-recovery is not used: a lost connection surfaces as an
//! error to the loop that owns it, which reconnects through [`Broker`] and
//! declares its channels again. That keeps recovery explicit and testable.

use std::sync::Arc;

use lapin::{Connection, ConnectionProperties};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use super::{BrokerError, Endpoint, ServerVersion};
use crate::config::SecretUrl;
use crate::retry::Reconnect;

/// Where and as whom to connect.
#[derive(Clone, Debug)]
pub struct Broker {
    url: SecretUrl,
    name: String,
    /// The broker's version once read, shared by the clones: read once per
    /// process (each read is a connection RabbitMQ logs as a WARNING).
    server: Arc<OnceCell<ServerVersion>>,
}

impl Broker {
    /// A broker at `url`; connections show up as `name` (plus a role) in
    /// RabbitMQ's management tools and `rabbitmqctl list_connections`.
    pub fn new(url: SecretUrl, name: impl Into<String>) -> Self {
        Self {
            url,
            name: name.into(),
            server: Arc::default(),
        }
    }

    /// Which broker this is (see [`super::server`]); read at the first
    /// call, then remembered. A failed read is tried again next time.
    pub async fn server_version(&self) -> Result<ServerVersion, BrokerError> {
        self.server
            .get_or_try_init(|| super::server::probe(&self.url))
            .await
            .cloned()
    }

    /// The connection name prefix.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL, password redacted.
    pub fn url(&self) -> &SecretUrl {
        &self.url
    }

    /// One connection attempt; `role` is appended to the connection name.
    pub async fn connect(&self, role: &str) -> Result<Connection, BrokerError> {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("{} {role}", self.name).into());
        Connection::connect(self.url.expose(), props)
            .await
            .map_err(|error| BrokerError::Connect {
                endpoint: Box::new(Endpoint::of(&self.url)),
                error,
            })
    }

    /// Connects, retrying with backoff (100 ms doubling to 10 s) until it
    /// works or `cancel` fires. Each failure is a WARN with the reason.
    pub async fn connect_until(
        &self,
        role: &str,
        cancel: &CancellationToken,
    ) -> Result<Connection, BrokerError> {
        let mut delays = Reconnect::default();
        loop {
            match self.connect(role).await {
                Ok(conn) => return Ok(conn),
                Err(e) => {
                    let delay = delays.next_delay();
                    tracing::warn!(
                        broker = %self.url,
                        role,
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "Cannot connect to RabbitMQ; retrying."
                    );
                    tokio::select! {
                        () = cancel.cancelled() => return Err(BrokerError::Cancelled),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}
