//! The events a case emits and their CloudEvents envelopes (see
//! `contracts/events.md`). The envelope id is fixed per transition of a case
//! generation, so a consumer can drop duplicates.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::account::AccountType;
use super::case::{EscalationLevel, EscalationReason};
use super::values::OrderId;

/// CloudEvents `source` of every emitted event.
pub const SOURCE: &str = "/holdclear";
/// AMQP `content_type` of every emitted event (structured mode).
pub const CONTENT_TYPE: &str = "application/cloudevents+json";
/// Namespace of envelope ids (UUID v5).
const ENVELOPE_NAMESPACE: Uuid = Uuid::from_u128(0x2f8e_51c0_7a4d_4b69_8c3e_0d1a_5b6f_e902);

/// An event the engine emits (the `data` fields besides the ids; see
/// `contracts/events.md`).
#[derive(Clone, Debug, PartialEq)]
pub enum OutboundEvent {
    /// `order.smart_account_assigned`: the assignment call was accepted.
    SmartAccountAssigned {
        /// The account's domain.
        smart_account_domain: String,
        /// Customer or holding account.
        account_type: AccountType,
        /// The Virtual Account.
        virtual_account_name: String,
        /// The rule that chose it.
        rule: String,
        /// The server's assignment id.
        assignment_id: String,
        /// Assignment calls made, the accepted one included.
        attempts: u32,
    },
    /// `order.hold_released`: the order shows the hold released.
    HoldReleased {
        /// When, as the order says.
        released_at: DateTime<Utc>,
        /// From `heldAt` to `releasedAt`.
        held_seconds: i64,
        /// The assigned (or activated) account's domain.
        smart_account_domain: Option<String>,
        /// The rule that decided the case.
        rule: Option<String>,
        /// Codes of other holds still on the order.
        other_holds: Vec<String>,
    },
    /// `order.hold_escalated`: a person must act.
    HoldEscalated {
        /// The contract's reason code.
        reason: EscalationReason,
        /// How urgent.
        level: EscalationLevel,
        /// From `heldAt` to now.
        held_seconds: i64,
        /// What exactly happened.
        detail: String,
        /// Which `HOLD_PERSISTS` threshold (index), `None` for a terminal escalation.
        threshold: Option<u32>,
    },
}

impl OutboundEvent {
    /// The routing key on the events exchange.
    pub fn routing_key(&self) -> &'static str {
        match self {
            Self::SmartAccountAssigned { .. } => "order.smart_account_assigned",
            Self::HoldReleased { .. } => "order.hold_released",
            Self::HoldEscalated { .. } => "order.hold_escalated",
        }
    }

    /// The transition this event marks, unique within one case generation:
    /// the input of the envelope id.
    pub fn transition(&self) -> String {
        match self {
            Self::SmartAccountAssigned { .. } => "assigned".into(),
            Self::HoldReleased { .. } => "released".into(),
            Self::HoldEscalated {
                threshold: Some(n), ..
            } => format!("hold_persists/{n}"),
            Self::HoldEscalated {
                threshold: None, ..
            } => "escalated".into(),
        }
    }

    fn fields(&self) -> Value {
        match self {
            Self::SmartAccountAssigned {
                smart_account_domain,
                account_type,
                virtual_account_name,
                rule,
                assignment_id,
                attempts,
            } => json!({
                "smartAccountDomain": smart_account_domain,
                "accountType": account_type.as_str(),
                "virtualAccountName": virtual_account_name,
                "rule": rule,
                "assignmentId": assignment_id,
                "attempts": attempts,
            }),
            Self::HoldReleased {
                released_at,
                held_seconds,
                smart_account_domain,
                rule,
                other_holds,
            } => json!({
                "releasedAt": rfc3339(*released_at),
                "heldSeconds": held_seconds,
                "smartAccountDomain": smart_account_domain,
                "rule": rule,
                "otherHolds": other_holds,
            }),
            Self::HoldEscalated {
                reason,
                level,
                held_seconds,
                detail,
                ..
            } => json!({
                "reason": reason.as_str(),
                "level": level.as_str(),
                "heldSeconds": held_seconds,
                "action": reason.action(),
                "detail": detail,
            }),
        }
    }

    /// The CloudEvents envelope of this event for one case.
    pub fn envelope(
        &self,
        case_id: Uuid,
        generation: u32,
        order: &OrderId,
        time: DateTime<Utc>,
    ) -> Envelope {
        let id = envelope_id(case_id, generation, &self.transition());
        let mut data = Map::new();
        data.insert(
            "salesOrderNumber".into(),
            order
                .sales_order_number
                .as_ref()
                .map_or(Value::Null, |s| Value::String(s.to_string())),
        );
        if let Some(web) = &order.web_order_id {
            data.insert("webOrderId".into(), Value::String(web.to_string()));
        }
        data.insert("caseId".into(), Value::String(case_id.to_string()));
        if let Value::Object(fields) = self.fields() {
            data.extend(fields);
        }
        let subject = match (&order.sales_order_number, &order.web_order_id) {
            (Some(so), _) => so.to_string(),
            (None, Some(web)) => web.to_string(),
            (None, None) => order.key(),
        };
        let routing_key = self.routing_key();
        Envelope {
            id,
            routing_key,
            body: json!({
                "specversion": "1.0",
                "type": format!("holdclear.{routing_key}.v1"),
                "source": SOURCE,
                "id": id.to_string(),
                "time": rfc3339(time),
                "datacontenttype": "application/json",
                "subject": subject,
                "data": data,
            }),
        }
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The envelope id of one transition of one case generation (UUID v5).
pub fn envelope_id(case_id: Uuid, generation: u32, transition: &str) -> Uuid {
    Uuid::new_v5(
        &ENVELOPE_NAMESPACE,
        format!("{case_id}/{generation}/{transition}").as_bytes(),
    )
}

/// One event ready for the outbox table.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    /// The CloudEvents id.
    pub id: Uuid,
    /// Routing key on the events exchange.
    pub routing_key: &'static str,
    /// The CloudEvents JSON envelope.
    pub body: Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(so: Option<&str>, web: Option<&str>) -> OrderId {
        OrderId::from_test(so, web)
    }

    fn time() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn envelopes_follow_the_contract() {
        let case_id = Uuid::from_u128(7);
        let ev = OutboundEvent::HoldEscalated {
            reason: EscalationReason::NoRuleMatched,
            level: EscalationLevel::Critical,
            held_seconds: 60,
            detail: "no default rule matches the order".into(),
            threshold: None,
        };
        let env = ev.envelope(
            case_id,
            0,
            &order(Some("104233871"), Some("98765432")),
            time(),
        );
        assert_eq!(env.routing_key, "order.hold_escalated");
        let b = &env.body;
        assert_eq!(b["specversion"], "1.0");
        assert_eq!(b["type"], "holdclear.order.hold_escalated.v1");
        assert_eq!(b["source"], "/holdclear");
        assert_eq!(b["id"], env.id.to_string());
        assert_eq!(b["time"], "2026-11-23T10:00:00.000Z");
        assert_eq!(b["datacontenttype"], "application/json");
        assert_eq!(b["subject"], "104233871");
        let d = &b["data"];
        assert_eq!(d["salesOrderNumber"], "104233871");
        assert_eq!(d["webOrderId"], "98765432");
        assert_eq!(d["caseId"], case_id.to_string());
        assert_eq!(d["reason"], "NO_RULE_MATCHED");
        assert_eq!(d["level"], "critical");
        assert_eq!(d["heldSeconds"], 60);
        assert_eq!(d["action"], EscalationReason::NoRuleMatched.action());
    }

    #[test]
    fn envelope_ids_are_stable_per_transition_and_generation() {
        let case_id = Uuid::from_u128(9);
        let released = OutboundEvent::HoldReleased {
            released_at: time(),
            held_seconds: 5,
            smart_account_domain: Some("acme.com".into()),
            rule: Some("r".into()),
            other_holds: vec![],
        };
        let o = order(None, Some("55"));
        let a = released.envelope(case_id, 0, &o, time());
        let b = released.envelope(case_id, 0, &o, time() + chrono::Duration::hours(1));
        let c = released.envelope(case_id, 1, &o, time());
        assert_eq!(a.id, b.id, "same transition, same id");
        assert_ne!(a.id, c.id, "a re-run gets new ids");
        assert_eq!(a.body["data"]["salesOrderNumber"], Value::Null);
        assert_eq!(a.body["subject"], "55");
        let persists = |n| OutboundEvent::HoldEscalated {
            reason: EscalationReason::HoldPersists,
            level: EscalationLevel::Warning,
            held_seconds: 1,
            detail: String::new(),
            threshold: Some(n),
        };
        assert_ne!(
            persists(0).envelope(case_id, 0, &o, time()).id,
            persists(1).envelope(case_id, 0, &o, time()).id
        );
    }
}
