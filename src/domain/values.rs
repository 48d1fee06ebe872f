//! Newtypes for the strings that travel through the system, each parsed once.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid value of its type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(pub String);

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The value as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValueError;
            fn try_from(v: String) -> Result<Self, ValueError> {
                Self::parse(&v)
            }
        }

        impl std::str::FromStr for $name {
            type Err = ValueError;
            fn from_str(v: &str) -> Result<Self, ValueError> {
                Self::parse(v)
            }
        }
    };
}

/// Order numbers travel in URL paths: letters, digits, `-` and `_` only.
fn order_number(kind: &str, raw: &str) -> Result<String, ValueError> {
    let v = raw.trim();
    if v.is_empty() || v.len() > 64 {
        return Err(ValueError(format!("{kind} must be 1 to 64 characters")));
    }
    if !v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ValueError(format!(
            "{kind} may hold only letters, digits, '-' and '_'"
        )));
    }
    Ok(v.to_owned())
}

string_newtype!(
    /// Cisco's sales order number (`salesOrderNumber`).
    SalesOrderNumber
);
impl SalesOrderNumber {
    /// Parses a sales order number.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        order_number("salesOrderNumber", raw).map(Self)
    }
}

string_newtype!(
    /// The web order id of Cisco Commerce (`webOrderId`).
    WebOrderId
);
impl WebOrderId {
    /// Parses a web order id.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        order_number("webOrderId", raw).map(Self)
    }
}

string_newtype!(
    /// A CloudEvents envelope id (`id`): 1 to 256 printable characters.
    EventId
);
impl EventId {
    /// Parses an event id.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        if raw.is_empty() || raw.len() > 256 {
            return Err(ValueError("id must be 1 to 256 characters".into()));
        }
        if raw.chars().any(char::is_control) {
            return Err(ValueError("id must not contain control characters".into()));
        }
        Ok(Self(raw.to_owned()))
    }
}

string_newtype!(
    /// A DNS domain, lower-case, without a trailing dot (`acme.com`).
    Domain
);
impl Domain {
    /// Parses a domain; upper-case letters are folded to lower case.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let v = raw.trim().trim_end_matches('.').to_ascii_lowercase();
        if v.is_empty() || v.len() > 253 {
            return Err(ValueError(format!("{raw:?} is not a domain: length")));
        }
        for label in v.split('.') {
            let ok = !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
            if !ok {
                return Err(ValueError(format!("{raw:?} is not a domain")));
            }
        }
        Ok(Self(v))
    }
}

string_newtype!(
    /// An e-mail address with a valid domain part (`it-admin@acme.com`).
    Email
);
impl Email {
    /// Parses an address; its domain part is folded to lower case.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let v = raw.trim();
        let (local, domain) = v
            .rsplit_once('@')
            .ok_or_else(|| ValueError(format!("{v:?} is not an e-mail address: no '@'")))?;
        if local.is_empty()
            || local.len() > 64
            || local.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ValueError(format!("{v:?} is not an e-mail address")));
        }
        let domain = Domain::parse(domain)
            .map_err(|_| ValueError(format!("{v:?} is not an e-mail address: bad domain")))?;
        Ok(Self(format!("{local}@{domain}")))
    }

    /// The domain part.
    pub fn domain(&self) -> Domain {
        let (_, d) = self.0.rsplit_once('@').expect("parsed e-mail has an '@'");
        Domain(d.to_owned())
    }
}

string_newtype!(
    /// An ISO 3166-1 alpha-2 country code, upper-case (`US`).
    CountryCode
);
impl CountryCode {
    /// Parses a country code; lower case is accepted and folded.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let v = raw.trim().to_ascii_uppercase();
        if v.len() == 2 && v.chars().all(|c| c.is_ascii_uppercase()) {
            Ok(Self(v))
        } else {
            Err(ValueError(format!(
                "{raw:?} is not a two-letter country code"
            )))
        }
    }
}

string_newtype!(
    /// Cisco's order type, upper-case (`STANDARD`, `STOCKING`, `EA`, …).
    OrderType
);
impl OrderType {
    /// Parses an order type: 1 to 64 letters, digits, `_` or `-`.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let v = raw.trim().to_ascii_uppercase();
        if v.is_empty()
            || v.len() > 64
            || !v
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ValueError(format!("{raw:?} is not an order type")));
        }
        Ok(Self(v))
    }

    /// Stocking and EA orders take no Smart Account assignment.
    pub fn takes_no_assignment(&self) -> bool {
        matches!(self.0.as_str(), "STOCKING" | "EA")
    }
}

/// Which order: by sales order number, web order id, or both (at least one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderId {
    /// `salesOrderNumber`, when known.
    pub sales_order_number: Option<SalesOrderNumber>,
    /// `webOrderId`, when known.
    pub web_order_id: Option<WebOrderId>,
}

#[cfg(test)]
impl OrderId {
    /// An order from valid ids (tests only; panics on a bad one).
    pub(crate) fn from_test(so: Option<&str>, web: Option<&str>) -> Self {
        Self::new(
            so.map(|s| SalesOrderNumber::parse(s).unwrap()),
            web.map(|w| WebOrderId::parse(w).unwrap()),
        )
        .unwrap()
    }
}

impl OrderId {
    /// An order id from one or both numbers; `None` when both are missing.
    pub fn new(sales: Option<SalesOrderNumber>, web: Option<WebOrderId>) -> Option<Self> {
        (sales.is_some() || web.is_some()).then_some(Self {
            sales_order_number: sales,
            web_order_id: web,
        })
    }

    /// The key of the order's case: the sales order number, or `web:<id>`.
    pub fn key(&self) -> String {
        match (&self.sales_order_number, &self.web_order_id) {
            (Some(s), _) => s.to_string(),
            (None, Some(w)) => format!("web:{w}"),
            (None, None) => unreachable!("OrderId holds at least one number"),
        }
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.sales_order_number, &self.web_order_id) {
            (Some(s), _) => write!(f, "{s}"),
            (None, Some(w)) => write!(f, "web order {w}"),
            (None, None) => f.write_str("?"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_and_normalise() {
        assert_eq!(Domain::parse("Acme.COM.").unwrap().as_str(), "acme.com");
        assert!(Domain::parse("acme..com").is_err());
        assert!(Domain::parse("-acme.com").is_err());
        assert_eq!(
            Email::parse("IT@Acme.com").unwrap().domain().as_str(),
            "acme.com"
        );
        assert!(Email::parse("no-at-sign").is_err());
        assert!(Email::parse("a@b@").is_err());
        assert_eq!(CountryCode::parse("us").unwrap().as_str(), "US");
        assert!(CountryCode::parse("USA").is_err());
        assert!(SalesOrderNumber::parse("104233871").is_ok());
        assert!(SalesOrderNumber::parse("10/42").is_err());
        assert!(SalesOrderNumber::parse("").is_err());
        assert!(OrderType::parse("ea").unwrap().takes_no_assignment());
    }

    #[test]
    fn order_key_prefers_sales_order_number() {
        let so = SalesOrderNumber::parse("1").ok();
        let web = WebOrderId::parse("2").ok();
        assert_eq!(OrderId::new(so.clone(), web.clone()).unwrap().key(), "1");
        assert_eq!(OrderId::new(None, web).unwrap().key(), "web:2");
        assert!(OrderId::new(None, None).is_none());
    }
}
