//! Connections to RabbitMQ: one attempt, or a loop with backoff until connected.
//!
//! lapin's own auto-recovery is not used: a lost connection surfaces as an
//! error to the loop that owns it, which reconnects through [`Broker`] and
//! declares its channels again. That keeps recovery explicit and testable.

use lapin::{Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

use super::{BrokerError, Endpoint};
use crate::config::SecretUrl;
use crate::retry::Reconnect;

/// Where and as whom to connect.
#[derive(Clone, Debug)]
pub struct Broker {
    url: SecretUrl,
    name: String,
}

impl Broker {
    /// A broker at `url`; connections show up as `name` (plus a role) in
    /// RabbitMQ's management tools and `rabbitmqctl list_connections`.
    pub fn new(url: SecretUrl, name: impl Into<String>) -> Self {
        Self {
            url,
            name: name.into(),
        }
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
                endpoint: Endpoint::of(&self.url),
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
