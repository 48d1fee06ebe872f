//! The default Smart Account rules: file, compile, first-match, explain. No I/O
//! but reading the file.

use serde::{Deserialize, Serialize};

use crate::domain::Target;

/// What the rules decided for one held order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Name of the rule that matched.
    pub rule: String,
    /// SHA-256 (hex) of the rules file content the decision was made with.
    pub rules_hash: String,
    /// What to assign.
    pub target: Target,
    /// What to assign when the target's account is missing or not ACTIVE.
    pub fallback: Option<Target>,
}
