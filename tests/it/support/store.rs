//! Cases with outbox rows, written as the engine writes them (a claim,
//! then a step commit), for the tests of what reads the outbox.
#![allow(dead_code)]

use std::time::Duration;

use holdclear::domain::{
    Case, Envelope, EscalationLevel, EscalationReason, HeldOrderEvent, OutboundEvent, Stage,
};
use holdclear::store::{Recorded, Store};
use uuid::Uuid;

/// `case` after a step that escalates it `NO_RULE_MATCHED`, with `n`
/// escalation events (distinct envelope ids: one per threshold when there
/// are several).
pub fn escalated_no_rule(case: &Case, n: u32) -> (Case, Vec<Envelope>) {
    let mut next = case.clone();
    next.stage = Stage::Escalated {
        reason: EscalationReason::NoRuleMatched,
        progress: case.stage.progress(),
        closed_at: chrono::Utc::now(),
    };
    next.next_action_at = None;
    let envelopes = (0..n)
        .map(|i| {
            OutboundEvent::HoldEscalated {
                reason: EscalationReason::NoRuleMatched,
                level: EscalationLevel::Critical,
                held_seconds: 1,
                detail: "no default rule matches the order".into(),
                threshold: (n > 1).then_some(i),
            }
            .envelope(case.id, 0, &case.order, chrono::Utc::now())
        })
        .collect();
    (next, envelopes)
}

/// Opens the case of `event` with intake's write, claims it and commits
/// its escalation with `n` events: the case id and the envelope ids.
pub async fn escalated_with_events(
    store: &Store,
    event: &HeldOrderEvent,
    n: u32,
) -> (Uuid, Vec<Uuid>) {
    let id = match store
        .record_held(std::slice::from_ref(event))
        .await
        .unwrap()
        .as_slice()
    {
        [Recorded::Opened { case_id }] => *case_id,
        other => panic!("no case opened: {other:?}"),
    };
    let case = store
        .claim_due("writer#1", Duration::from_secs(30), 1)
        .await
        .unwrap()
        .pop()
        .unwrap()
        .case
        .unwrap();
    let (next, envelopes) = escalated_no_rule(&case, n);
    assert!(
        store
            .commit_step("writer#1", &next, &[], &envelopes, None)
            .await
            .unwrap()
    );
    (id, envelopes.iter().map(|e| e.id).collect())
}
