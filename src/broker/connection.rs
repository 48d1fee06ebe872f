//! Connections to RabbitMQ: one attempt, or a loop with backoff until connected.
//!
//! lapin's own auto-recovery is not used: a lost connection surfaces as an
//! error to the loop that owns it, which reconnects through [`Broker`] and
//! declares its channels again. That keeps recovery explicit and testable.

use std::sync::Arc;

use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use super::{BrokerError, Endpoint, ServerVersion};
use crate::config::{AmqpSettings, CaFile, SecretUrl};
use crate::retry::Reconnect;

/// Where and as whom to connect, and which CA to trust for `amqps://`.
#[derive(Clone, Debug)]
pub struct Broker {
    url: SecretUrl,
    name: String,
    tls_ca: Option<CaFile>,
    /// The broker's version once read, shared by the clones: read once per
    /// process (each read is a connection RabbitMQ logs as a WARNING).
    server: Arc<OnceCell<ServerVersion>>,
}

impl Broker {
    /// A broker at `url`, trusting the built-in roots for `amqps://`;
    /// connections show up as `name` (plus a role) in RabbitMQ's management
    /// tools and `rabbitmqctl list_connections`.
    pub fn new(url: SecretUrl, name: impl Into<String>) -> Self {
        Self {
            url,
            name: name.into(),
            tls_ca: None,
            server: Arc::default(),
        }
    }

    /// The broker of the settings: their URL and CA file
    /// (`HOLDCLEAR_AMQP_TLS_CA_FILE` or `HOLDCLEAR_TLS_CA_FILE`). Every
    /// command that connects to RabbitMQ goes through here.
    pub fn from_settings(settings: &AmqpSettings, name: impl Into<String>) -> Self {
        Self::new(settings.url.clone(), name).with_tls_ca(settings.tls_ca.clone())
    }

    /// Trusts `ca` for `amqps://` besides the built-in roots (`None`: the
    /// built-in roots only).
    pub fn with_tls_ca(mut self, ca: Option<CaFile>) -> Self {
        self.tls_ca = ca;
        self
    }

    /// Which broker this is (see [`super::server`]); read at the first
    /// call, then remembered. A failed read is tried again next time.
    pub async fn server_version(&self) -> Result<ServerVersion, BrokerError> {
        self.server
            .get_or_try_init(|| super::server::probe(&self.url, self.tls_ca.as_ref()))
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
    /// For `amqps://` the server's certificate must chain to the built-in
    /// roots or the CA file and name the URL's host.
    pub async fn connect(&self, role: &str) -> Result<Connection, BrokerError> {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("{} {role}", self.name).into());
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: self.tls_ca.as_ref().map(|ca| ca.pem().to_owned()),
        };
        let runtime = lapin::runtime::default_runtime()?;
        Connection::connect_with_config(self.url.expose(), props, tls, runtime)
            .await
            .map_err(|e| self.connect_error(e))
    }

    /// A failed attempt; a TLS failure says which CA was trusted.
    fn connect_error(&self, error: lapin::Error) -> BrokerError {
        if self.url.url().scheme() != "amqps" || !is_tls_failure(&error) {
            return BrokerError::Connect {
                endpoint: Box::new(Endpoint::of(&self.url)),
                error,
            };
        }
        BrokerError::Tls {
            trusted: match &self.tls_ca {
                Some(ca) => format!("the built-in roots and {}", ca.path().display()),
                None => "the built-in roots only (no HOLDCLEAR_AMQP_TLS_CA_FILE or \
                         HOLDCLEAR_TLS_CA_FILE)"
                    .to_owned(),
            },
            source: error,
        }
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

/// True when the error is rustls refusing the handshake (an untrusted or
/// misnamed certificate, a fatal alert from the server).
fn is_tls_failure(e: &lapin::Error) -> bool {
    let lapin::ErrorKind::IOError(io) = e.kind() else {
        return false;
    };
    let mut current: Option<&(dyn std::error::Error + 'static)> = io
        .get_ref()
        .map(|inner| inner as &(dyn std::error::Error + 'static));
    while let Some(err) = current {
        if err.is::<rustls::Error>() {
            return true;
        }
        current = err.source();
    }
    false
}
