//! Which RabbitMQ the broker is, from the server properties it sends in
//! `connection.start`: what [`super::topology`] may declare depends on it.
//!
//! lapin reads `connection.start` but does not keep the server properties,
//! so [`probe`] opens a connection of its own (TCP, and TLS for `amqps://`,
//! exactly as lapin does), sends the AMQP 0-9-1 protocol header, reads the
//! one frame RabbitMQ answers with and closes the socket. No credentials are
//! sent. RabbitMQ logs such a connection as "client unexpectedly closed TCP
//! connection" (a WARNING), so [`super::Broker::server_version`] reads it
//! once per process: one such line when a worker starts.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use futures_util::io::{AsyncReadExt, AsyncWriteExt};
use lapin::protocol::{AMQPClass, connection::AMQPMethod};
use lapin::tcp::{AMQPUriTcpExt, TLSConfig};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;

use super::{BrokerError, Endpoint};
use crate::config::{CaFile, SecretUrl};

/// How long the probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest `connection.start` frame accepted (RabbitMQ's is about 500 bytes).
const MAX_START_FRAME: usize = 64 * 1024;

/// The product and version a broker announced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerVersion {
    /// `product`, e.g. `RabbitMQ`.
    pub product: String,
    /// `version`, e.g. `4.1.4` or `3.13.7`.
    pub version: String,
}

impl ServerVersion {
    /// A version as a broker would announce it.
    pub fn new(product: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            product: product.into(),
            version: version.into(),
        }
    }

    /// Neither product nor version known (the probe failed).
    pub fn unknown() -> Self {
        Self::new("", "")
    }

    /// `(major, minor)` of a RabbitMQ version.
    pub fn rabbitmq(&self) -> Option<(u32, u32)> {
        if self.product != "RabbitMQ" {
            return None;
        }
        let mut parts = self.version.split(['.', '-', '+']);
        let major = u32::from_str(parts.next()?).ok()?;
        let minor = u32::from_str(parts.next()?).ok()?;
        Some((major, minor))
    }

    /// True on RabbitMQ 4.0 and later, where a quorum queue declared without
    /// `x-delivery-limit` gets a limit of 20 (and drops, or dead-letters,
    /// a message returned more often), and `x-delivery-limit = -1` means no
    /// limit. Before 4.0 a quorum queue has no limit unless given one, and
    /// -1 would be a limit below every count: never declare it there.
    pub fn has_default_delivery_limit(&self) -> bool {
        self.rabbitmq().is_some_and(|(major, _)| major >= 4)
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.product.is_empty() && self.version.is_empty() {
            f.write_str("an unknown broker")
        } else {
            write!(f, "{} {}", self.product, self.version)
        }
    }
}

/// Reads the server properties of the broker at `url` (see the module doc).
pub async fn probe(url: &SecretUrl, tls_ca: Option<&CaFile>) -> Result<ServerVersion, BrokerError> {
    let failed = |error: std::io::Error| BrokerError::Connect {
        endpoint: Box::new(Endpoint::of(url)),
        error: error.into(),
    };
    let uri = AMQPUri::from_str(url.expose()).map_err(|e| {
        failed(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not an AMQP URL: {e}"),
        ))
    })?;
    let properties = tokio::time::timeout(PROBE_TIMEOUT, read_start(&uri, tls_ca))
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no connection.start from the broker in time",
            ))
        })
        .map_err(failed)?;
    let text = |key: &str| match properties.inner().get(key) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        Some(AMQPValue::ShortString(s)) => s.to_string(),
        _ => String::new(),
    };
    Ok(ServerVersion::new(text("product"), text("version")))
}

/// Connects, sends the protocol header and returns the server properties
/// of the `connection.start` that comes back.
async fn read_start(uri: &AMQPUri, tls_ca: Option<&CaFile>) -> std::io::Result<FieldTable> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let runtime = lapin::runtime::default_runtime().map_err(std::io::Error::other)?;
    let mut stream = uri
        .connect_with_config_async(
            TLSConfig {
                identity: None,
                cert_chain: tls_ca.map(CaFile::pem),
            },
            &runtime,
        )
        .await?;
    stream.write_all(b"AMQP\x00\x00\x09\x01").await?;
    stream.flush().await?;
    // Frame: type (1), channel (2), payload size (4), payload, 0xCE.
    let mut header = [0u8; 7];
    stream.read_exact(&mut header).await?;
    if header[0] != 1 {
        return Err(invalid(format!(
            "the broker answered with frame type {} (not AMQP 0-9-1?)",
            header[0]
        )));
    }
    let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
    if size > MAX_START_FRAME {
        return Err(invalid(format!("a connection.start of {size} bytes")));
    }
    let mut payload = vec![0u8; size + 1];
    stream.read_exact(&mut payload).await?;
    payload.pop();
    match lapin::protocol::parse_class(payload.as_slice()) {
        Ok((_, AMQPClass::Connection(AMQPMethod::Start(start)))) => Ok(start.server_properties),
        Ok((_, other)) => Err(invalid(format!(
            "expected connection.start, got {:?}",
            other.get_amqp_class_id()
        ))),
        Err(e) => Err(invalid(format!("unreadable connection.start: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::ServerVersion;

    #[test]
    fn rabbitmq_4_and_later_have_a_default_delivery_limit() {
        let cases = [
            ("RabbitMQ", "3.10.8", Some((3, 10)), false),
            ("RabbitMQ", "3.13.7", Some((3, 13)), false),
            ("RabbitMQ", "4.0.0-rc.2", Some((4, 0)), true),
            ("RabbitMQ", "4.1.4", Some((4, 1)), true),
            ("RabbitMQ", "4.3.0", Some((4, 3)), true),
            ("LavinMQ", "2.0.0", None, false),
            ("", "", None, false),
        ];
        for (product, version, parsed, limit) in cases {
            let v = ServerVersion::new(product, version);
            assert_eq!(v.rabbitmq(), parsed, "{v}");
            assert_eq!(v.has_default_delivery_limit(), limit, "{v}");
        }
    }
}
