//! Broker failures, explained for a person: what failed, why, what to do.
//!
//! [`BrokerError`]'s `Display` is that one line ([`BrokerError::user_message`]):
//! the CLI prints it as it is, and the worker logs it. It does not chain the
//! lapin error as a `source`: lapin's own text repeats the broker's reply
//! once per layer, which is what a person should not have to read.
//! RabbitMQ's reply text is parsed for the resource, the user and the vhost;
//! whatever it does not recognise is shown once, as RabbitMQ said it.

use std::fmt;

use crate::config::SecretUrl;

/// Where the permissions and the upgrade of the topology are explained.
const SEE_DOCS: &str = "see docs/deployment.md";

/// What went wrong talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Connecting (TCP, TLS, login, vhost) failed.
    #[error("{}", user_message(self))]
    Connect {
        /// Where to, without the password.
        endpoint: Box<Endpoint>,
        /// lapin's error.
        error: lapin::Error,
    },
    /// RabbitMQ refused or failed an operation on a named queue or exchange.
    #[error("{}", user_message(self))]
    Operation {
        /// What was being done.
        op: Box<Operation>,
        /// lapin's error.
        error: lapin::Error,
    },
    /// The connection or channel failed outside a named operation.
    #[error("{}", user_message(self))]
    Amqp(lapin::Error),
    /// Shutdown was requested while waiting for the broker.
    #[error("cancelled while connecting to RabbitMQ")]
    Cancelled,
    /// The TLS handshake of an `amqps://` connection failed: the server's
    /// certificate is not trusted or does not name the URL's host.
    #[error("RabbitMQ: TLS failed ({source}); trusted: {trusted}")]
    Tls {
        /// lapin's error, with rustls's reason.
        source: lapin::Error,
        /// Which roots were trusted.
        trusted: String,
    },
}

impl From<lapin::Error> for BrokerError {
    fn from(error: lapin::Error) -> Self {
        Self::Amqp(error)
    }
}

impl BrokerError {
    /// One line for a person: what failed, why, and what to do.
    pub fn user_message(&self) -> String {
        user_message(self)
    }

    /// The lapin error underneath, if there is one.
    pub fn lapin(&self) -> Option<&lapin::Error> {
        match self {
            Self::Connect { error, .. }
            | Self::Operation { error, .. }
            | Self::Amqp(error)
            | Self::Tls { source: error, .. } => Some(error),
            Self::Cancelled => None,
        }
    }

    /// The AMQP reply code when RabbitMQ refused something (403, 404, 406, …).
    pub fn reply_code(&self) -> Option<u16> {
        match self.lapin()?.kind() {
            lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
            _ => None,
        }
    }

    /// The same error with what was being done, unless it already says.
    pub(crate) fn during(self, op: Operation) -> Self {
        match self {
            Self::Amqp(error) => Self::Operation {
                op: Box::new(op),
                error,
            },
            other => other,
        }
    }
}

/// Adds what was being done to a lapin result.
pub(crate) trait During<T> {
    /// `Err(e)` becomes [`BrokerError::Operation`] with `op`.
    fn during(self, op: impl FnOnce() -> Operation) -> Result<T, BrokerError>;
}

impl<T> During<T> for Result<T, lapin::Error> {
    fn during(self, op: impl FnOnce() -> Operation) -> Result<T, BrokerError> {
        self.map_err(|error| BrokerError::Operation {
            op: Box::new(op()),
            error,
        })
    }
}

/// Where a connection goes, as a person names it (no password).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`.
    pub address: String,
    /// The virtual host (`/` for the default one).
    pub vhost: String,
    /// The user name.
    pub user: String,
}

impl Endpoint {
    /// The endpoint of an `amqp://` or `amqps://` URL (defaults as lapin applies them).
    pub fn of(url: &SecretUrl) -> Self {
        let u = url.url();
        let port = u
            .port()
            .unwrap_or(if u.scheme() == "amqps" { 5671 } else { 5672 });
        let host = u.host_str().unwrap_or("localhost");
        let path = u.path().strip_prefix('/').unwrap_or(u.path());
        let vhost = if path.is_empty() {
            "/".to_owned()
        } else {
            percent_decode(path)
        };
        let user = if u.username().is_empty() {
            "guest".to_owned()
        } else {
            percent_decode(u.username())
        };
        Self {
            address: format!("{host}:{port}"),
            vhost,
            user,
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What holdclear was doing with a queue or an exchange.
/// Each variant names the queue or the exchange it acted on.
#[allow(missing_docs)] // the fields are the names the variants say
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Taking messages from a queue (`basic.get`, `basic.consume`): read on it.
    Read { queue: String },
    /// Settling messages taken from a queue (ack): no permission.
    Settle { queue: String },
    /// Looking a queue up (passive declare): no permission.
    Inspect { queue: String },
    /// Publishing to an exchange: write on it.
    Publish { exchange: String },
    /// Declaring a queue or an exchange: configure on it.
    Declare {
        /// `queue` or `exchange`.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// Binding a queue to an exchange: write on the queue, read on the exchange.
    Bind { queue: String, exchange: String },
}

impl Operation {
    /// The permission this operation needs on a resource of `kind`, if any.
    fn permission_on(&self, kind: &str) -> Option<&'static str> {
        match (self, kind) {
            (Self::Read { .. }, "queue") => Some("read"),
            (Self::Publish { .. }, "exchange") => Some("write"),
            (Self::Declare { .. }, _) => Some("configure"),
            (Self::Bind { .. }, "queue") => Some("write"),
            (Self::Bind { .. }, "exchange") => Some("read"),
            _ => None,
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { queue } => write!(f, "Cannot read queue '{queue}'"),
            Self::Settle { queue } => write!(f, "Cannot acknowledge messages of queue '{queue}'"),
            Self::Inspect { queue } => write!(f, "Cannot find queue '{queue}'"),
            Self::Publish { exchange } => write!(f, "Cannot publish to exchange '{exchange}'"),
            Self::Declare { kind, name } => write!(f, "Cannot declare {kind} '{name}'"),
            Self::Bind { queue, exchange } => {
                write!(f, "Cannot bind queue '{queue}' to exchange '{exchange}'")
            }
        }
    }
}

fn user_message(e: &BrokerError) -> String {
    match e {
        BrokerError::Connect { endpoint, error } => {
            let what = format!(
                "Cannot connect to RabbitMQ at {} (vhost '{}')",
                endpoint.address, endpoint.vhost
            );
            format!("{what}: {}", explain_connect(endpoint, error))
        }
        BrokerError::Operation { op, error } => format!("{op}: {}", explain(Some(op), error)),
        BrokerError::Amqp(error) => format!("RabbitMQ failed: {}", explain(None, error)),
        BrokerError::Cancelled => "cancelled while connecting to RabbitMQ".to_owned(),
        BrokerError::Tls { source, trusted } => format!(
            "RabbitMQ: TLS failed ({source}); trusted: {trusted}: give the CA that signed \
             the broker's certificate in HOLDCLEAR_AMQP_TLS_CA_FILE or HOLDCLEAR_TLS_CA_FILE"
        ),
    }
}

/// Why a connection failed, and what to check.
fn explain_connect(endpoint: &Endpoint, error: &lapin::Error) -> String {
    const CHECK_URL: &str = "is it running there, and is HOLDCLEAR_AMQP_URL right?";
    match error.kind() {
        lapin::ErrorKind::IOError(io) => {
            let why = match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
                std::io::ErrorKind::TimedOut => "timed out".to_owned(),
                _ => io.to_string(),
            };
            format!("{why}; {CHECK_URL}")
        }
        lapin::ErrorKind::ProtocolError(amqp) => {
            let text = reply_text(amqp);
            if text.contains("Login was refused") {
                format!(
                    "RabbitMQ refused the login of user '{}'; check the user name and password in HOLDCLEAR_AMQP_URL",
                    endpoint.user
                )
            } else if text.contains("vhost") && text.contains("not found") {
                format!(
                    "RabbitMQ has no vhost '{}'; check the vhost in HOLDCLEAR_AMQP_URL (%2f is '/')",
                    endpoint.vhost
                )
            } else if text.contains("access to vhost") {
                format!(
                    "RabbitMQ refused user '{}' access to vhost '{}'; grant permissions there (rabbitmqctl set_permissions -p '{}' '{}' …), {SEE_DOCS}",
                    endpoint.user, endpoint.vhost, endpoint.vhost, endpoint.user
                )
            } else {
                explain(None, error)
            }
        }
        _ => format!("{error}; {CHECK_URL}"),
    }
}

/// Why an operation failed, and what to do.
fn explain(op: Option<&Operation>, error: &lapin::Error) -> String {
    let amqp = match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => amqp,
        lapin::ErrorKind::IOError(io) => {
            return format!("the connection to RabbitMQ failed ({io}); try again once it is back");
        }
        lapin::ErrorKind::MissingHeartbeatError => {
            return "RabbitMQ stopped answering (no heartbeat); try again once it is back".into();
        }
        lapin::ErrorKind::InvalidChannelState(..) | lapin::ErrorKind::InvalidConnectionState(_) => {
            return format!(
                "the channel or connection to RabbitMQ was already closed ({error}); try again"
            );
        }
        _ => return error.to_string(),
    };
    let text = reply_text(amqp);
    match amqp.get_id() {
        403 => match Refusal::parse(text) {
            Some(r) => {
                let permission = r
                    .permission
                    .or_else(|| op.and_then(|o| o.permission_on(r.kind)))
                    .map(|p| format!("{p} "))
                    .unwrap_or_default();
                format!(
                    "RabbitMQ refused user '{}' {permission}access to {} '{}' in vhost '{}'; grant it, {SEE_DOCS} (RabbitMQ users and permissions)",
                    r.user, r.kind, r.name, r.vhost
                )
            }
            None => {
                format!("RabbitMQ refused it: {text}; {SEE_DOCS} (RabbitMQ users and permissions)")
            }
        },
        404 => match Missing::parse(text) {
            Some(m) => {
                // "Cannot find queue 'x': it does not exist", not "queue 'x'" twice.
                let named = op.is_some_and(|o| o.to_string().ends_with(&format!("'{}'", m.name)));
                let subject = if named {
                    "it".to_owned()
                } else {
                    format!("{} '{}'", m.kind, m.name)
                };
                format!(
                    "{subject} does not exist in vhost '{}'; has `holdclear run` declared the topology? (the names come from the settings file)",
                    m.vhost
                )
            }
            None => format!("RabbitMQ: {text}"),
        },
        406 if text.contains("inequivalent arg") => format!(
            "it exists with other arguments ({text}); {SEE_DOCS} (RabbitMQ: existing queues and exchanges)"
        ),
        320 => format!("RabbitMQ closed the connection ({text}); try again once it is back"),
        _ => format!("RabbitMQ refused it: {text}"),
    }
}

/// RabbitMQ's reply text without the `CODE - ` prefix it repeats.
fn reply_text(amqp: &lapin::protocol::AMQPError) -> &str {
    let text = amqp.get_message().as_str();
    match text.split_once(" - ") {
        Some((code, rest)) if code.chars().all(|c| c.is_ascii_uppercase() || c == '_') => rest,
        _ => text,
    }
}

/// `[write ]access to exchange 'x' in vhost 'v' refused for user 'u'`
/// (the permission is named by RabbitMQ 3.13 and later).
#[derive(Debug, PartialEq, Eq)]
struct Refusal<'a> {
    permission: Option<&'a str>,
    kind: &'a str,
    name: &'a str,
    vhost: &'a str,
    user: &'a str,
}

impl<'a> Refusal<'a> {
    fn parse(text: &'a str) -> Option<Self> {
        let (before, rest) = text.split_once("access to ")?;
        let permission = match before.trim() {
            "" => None,
            p @ ("configure" | "write" | "read") => Some(p),
            _ => return None,
        };
        let (kind, rest) = rest.split_once(" '")?;
        let (name, rest) = rest.split_once("' in vhost '")?;
        let (vhost, rest) = rest.split_once("' refused for user '")?;
        let user = rest.strip_suffix('\'')?;
        Some(Self {
            permission,
            kind,
            name,
            vhost,
            user,
        })
    }
}

/// `no queue 'x' in vhost 'v'` / `no exchange 'x' in vhost 'v'`.
#[derive(Debug, PartialEq, Eq)]
struct Missing<'a> {
    kind: &'a str,
    name: &'a str,
    vhost: &'a str,
}

impl<'a> Missing<'a> {
    fn parse(text: &'a str) -> Option<Self> {
        let rest = text.strip_prefix("no ")?;
        let (kind, rest) = rest.split_once(" '")?;
        let (name, rest) = rest.split_once("' in vhost '")?;
        let vhost = rest.strip_suffix('\'')?;
        Some(Self { kind, name, vhost })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_of_3_10_and_3_13_and_later_are_read() {
        let cases = [
            (
                "access to exchange 'commerce.orders' in vhost '/' refused for user 'holdclear'",
                Some((None, "exchange", "commerce.orders", "/", "holdclear")),
            ),
            (
                "write access to exchange 'commerce.orders' in vhost 'prod' refused for user 'hc'",
                Some((Some("write"), "exchange", "commerce.orders", "prod", "hc")),
            ),
            (
                "read access to queue 'a.b' in vhost '/' refused for user 'u'",
                Some((Some("read"), "queue", "a.b", "/", "u")),
            ),
            ("access to vhost '/' refused for user 'u'", None),
            (
                "Login was refused using authentication mechanism PLAIN.",
                None,
            ),
        ];
        for (text, want) in cases {
            let got = Refusal::parse(text).map(|r| (r.permission, r.kind, r.name, r.vhost, r.user));
            assert_eq!(got, want, "{text}");
        }
    }

    #[test]
    fn missing_resources_are_read() {
        assert_eq!(
            Missing::parse("no queue 'x.dlq' in vhost '/'"),
            Some(Missing {
                kind: "queue",
                name: "x.dlq",
                vhost: "/"
            })
        );
        assert_eq!(Missing::parse("no such thing"), None);
    }

    #[test]
    fn endpoints_name_host_vhost_and_user_never_the_password() {
        let url = SecretUrl::parse("u", "amqp://ops:s3cret@rabbit:5673/prod%2Fa").unwrap();
        let e = Endpoint::of(&url);
        assert_eq!(e.address, "rabbit:5673");
        assert_eq!(e.vhost, "prod/a");
        assert_eq!(e.user, "ops");
        let url = SecretUrl::parse("u", "amqps://rabbit").unwrap();
        let e = Endpoint::of(&url);
        assert_eq!((e.address.as_str(), e.vhost.as_str()), ("rabbit:5671", "/"));
        let url = SecretUrl::parse("u", "amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(Endpoint::of(&url).vhost, "/");
    }
}
