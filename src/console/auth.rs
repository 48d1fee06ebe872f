//! Who is asking: a signed session cookie (after signing in with a token),
//! or a trusted header set by an authenticating proxy. Every form carries a
//! CSRF token tied to the session; no request is served anonymously except
//! the sign-in page, the assets and `/healthz`.
//!
//! A session cookie is `base64url(user|role|expires|nonce).base64url(mac)`,
//! HMAC-SHA256 under the session key; nothing is kept server-side, so any
//! replica with the same key reads it. Before signing in a visitor holds
//! an anonymous session (no user) whose nonce keys the sign-in form's CSRF
//! token.

use axum::http::HeaderMap;
use axum::http::header::COOKIE;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::config::{ConsoleSettings, Role};

/// The session cookie's name.
pub const COOKIE_NAME: &str = "holdclear_session";

type HmacSha256 = Hmac<Sha256>;

/// Someone signed in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// Their name (the operator of what they do).
    pub name: String,
    /// What they may do.
    pub role: Role,
}

impl User {
    /// Operators act; viewers read.
    pub fn may_act(&self) -> bool {
        self.role == Role::Operator
    }
}

/// A session read from its cookie (or made for a proxy's user).
#[derive(Clone, Debug)]
pub struct Session {
    /// `None`: not signed in.
    pub user: Option<User>,
    /// Random, per session: keys its CSRF token.
    pub nonce: String,
    /// Unix seconds.
    pub expires: i64,
}

/// Sign-in tokens (as SHA-256 digests), the trusted header and the key.
pub struct Auth {
    tokens: Vec<([u8; 32], User)>,
    trusted_header: Option<String>,
    trusted_operators: Vec<String>,
    key: Vec<u8>,
    ttl_seconds: i64,
    secure: bool,
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_text(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(&mut buf[..]);
    B64.encode(buf)
}

impl Auth {
    /// From the settings (a random session key when none is set).
    pub fn new(settings: &ConsoleSettings) -> Self {
        let key = match &settings.session_key {
            Some(k) => k.expose().as_bytes().to_vec(),
            None => {
                let mut k = vec![0u8; 32];
                rand::fill(&mut k[..]);
                k
            }
        };
        Self {
            tokens: (settings.tokens.iter())
                .map(|t| {
                    (
                        digest(t.token.expose()),
                        User {
                            name: t.user.clone(),
                            role: t.role,
                        },
                    )
                })
                .collect(),
            trusted_header: settings.trusted_header.clone(),
            trusted_operators: settings.trusted_operators.clone(),
            key,
            ttl_seconds: i64::try_from(settings.session_ttl.as_secs()).unwrap_or(i64::MAX / 2),
            secure: settings.secure_cookie,
        }
    }

    fn mac(&self, data: &[u8]) -> Vec<u8> {
        let mut m = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        m.update(data);
        m.finalize().into_bytes().to_vec()
    }

    /// The user a sign-in token names.
    pub fn sign_in(&self, token: &str) -> Option<User> {
        let d = digest(token.trim());
        // Every token is compared, whichever matches.
        let mut found = None;
        for (t, user) in &self.tokens {
            if same(t, &d) {
                found = Some(user.clone());
            }
        }
        found
    }

    /// A new session for `user` (or an anonymous one).
    pub fn new_session(&self, user: Option<User>) -> Session {
        Session {
            user,
            nonce: random_text(16),
            expires: chrono::Utc::now().timestamp() + self.ttl_seconds,
        }
    }

    /// The `Set-Cookie` value of `session`.
    pub fn cookie(&self, session: &Session) -> String {
        let (name, role) = match &session.user {
            Some(u) => (u.name.as_str(), u.role.as_str()),
            None => ("", ""),
        };
        let payload = format!("{name}|{role}|{}|{}", session.expires, session.nonce);
        let value = format!(
            "{}.{}",
            B64.encode(payload.as_bytes()),
            B64.encode(self.mac(payload.as_bytes()))
        );
        format!(
            "{COOKIE_NAME}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            self.ttl_seconds,
            if self.secure { "; Secure" } else { "" }
        )
    }

    /// The `Set-Cookie` value that ends the session.
    pub fn cleared_cookie(&self) -> String {
        format!(
            "{COOKIE_NAME}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
            if self.secure { "; Secure" } else { "" }
        )
    }

    /// The session of a request: the trusted header's user, else a valid,
    /// unexpired cookie's.
    pub fn session(&self, headers: &HeaderMap) -> Option<Session> {
        let proxy_user = (self.trusted_header.as_deref())
            .and_then(|h| headers.get(h))
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|n| !n.is_empty() && n.len() <= 200);
        if let Some(name) = proxy_user {
            let role = if self.trusted_operators.iter().any(|o| o == name) {
                Role::Operator
            } else {
                Role::Viewer
            };
            return Some(Session {
                user: Some(User {
                    name: name.to_owned(),
                    role,
                }),
                // The proxy's user keys their CSRF token.
                nonce: format!("proxy:{name}"),
                expires: i64::MAX,
            });
        }
        let raw = cookie_value(headers, COOKIE_NAME)?;
        self.read_cookie(raw)
    }

    fn read_cookie(&self, raw: &str) -> Option<Session> {
        let (payload, mac) = raw.split_once('.')?;
        let payload = B64.decode(payload).ok()?;
        let mac = B64.decode(mac).ok()?;
        if !same(&self.mac(&payload), &mac) {
            return None;
        }
        let text = String::from_utf8(payload).ok()?;
        let mut parts = text.splitn(4, '|');
        let (name, role, expires, nonce) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let expires: i64 = expires.parse().ok()?;
        if expires < chrono::Utc::now().timestamp() {
            return None;
        }
        let user = match role {
            "operator" => Some(Role::Operator),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
        .map(|role| User {
            name: name.to_owned(),
            role,
        });
        Some(Session {
            user,
            nonce: nonce.to_owned(),
            expires,
        })
    }

    /// The CSRF token of `session`'s forms.
    pub fn csrf(&self, session: &Session) -> String {
        B64.encode(self.mac(format!("csrf|{}", session.nonce).as_bytes()))
    }

    /// Whether `token` is `session`'s CSRF token.
    pub fn csrf_ok(&self, session: &Session, token: &str) -> bool {
        same(self.csrf(session).as_bytes(), token.as_bytes())
    }
}

/// One cookie's value from the request's `Cookie` headers.
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConsoleToken, Secret};
    use axum::http::HeaderValue;
    use std::time::Duration;

    fn settings() -> ConsoleSettings {
        ConsoleSettings {
            addr: "127.0.0.1:0".parse().unwrap(),
            tokens: vec![ConsoleToken {
                user: "ann".into(),
                role: Role::Operator,
                token: Secret::new("a-token-of-enough-length"),
            }],
            trusted_header: None,
            trusted_operators: vec![],
            session_key: None,
            session_ttl: Duration::from_secs(60),
            secure_cookie: true,
        }
    }

    fn auth() -> Auth {
        Auth::new(&settings())
    }

    fn with_cookie(set_cookie: &str) -> HeaderMap {
        let pair = set_cookie.split(';').next().unwrap();
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_str(pair).unwrap());
        h
    }

    #[test]
    fn a_signed_cookie_reads_back_and_a_changed_one_does_not() {
        let a = auth();
        let user = a.sign_in("a-token-of-enough-length").unwrap();
        assert_eq!(user.name, "ann");
        assert!(a.sign_in("a-token-of-enough-lengtX").is_none());
        let s = a.new_session(Some(user.clone()));
        let cookie = a.cookie(&s);
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
        assert!(cookie.contains("; Secure"));
        let back = a.session(&with_cookie(&cookie)).unwrap();
        assert_eq!(back.user, Some(user));
        assert!(a.csrf_ok(&back, &a.csrf(&s)));
        // A viewer cannot make themselves an operator: the MAC breaks.
        let forged = cookie.replace(
            &cookie[COOKIE_NAME.len() + 1..COOKIE_NAME.len() + 5],
            "AAAA",
        );
        assert!(a.session(&with_cookie(&forged)).is_none());
        // Another process's key does not read it.
        assert!(auth().session(&with_cookie(&cookie)).is_none());
        // Another session's CSRF token is refused.
        assert!(!a.csrf_ok(&a.new_session(None), &a.csrf(&s)));
    }

    #[test]
    fn a_trusted_header_names_the_user_and_only_listed_users_act() {
        let a = Auth::new(&ConsoleSettings {
            tokens: vec![],
            trusted_header: Some("x-forwarded-user".into()),
            trusted_operators: vec!["ann".into()],
            ..settings()
        });
        let with = |user: &str| {
            let mut h = HeaderMap::new();
            h.insert("X-Forwarded-User", HeaderValue::from_str(user).unwrap());
            a.session(&h).and_then(|s| s.user)
        };
        assert_eq!(with("ann").map(|u| u.role), Some(Role::Operator));
        assert_eq!(with("bob").map(|u| u.role), Some(Role::Viewer));
        assert_eq!(with("  ").map(|u| u.role), None);
        // Without the header (and without a cookie): nobody.
        assert!(a.session(&HeaderMap::new()).is_none());
        // Another proxy user's CSRF token is not yours.
        let mut h = HeaderMap::new();
        h.insert("X-Forwarded-User", HeaderValue::from_static("ann"));
        let ann = a.session(&h).unwrap();
        h.insert("X-Forwarded-User", HeaderValue::from_static("bob"));
        let bob = a.session(&h).unwrap();
        assert!(!a.csrf_ok(&bob, &a.csrf(&ann)));
    }
}
