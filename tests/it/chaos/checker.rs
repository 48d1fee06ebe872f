//! The checker: what a run of held orders must end with, whatever broke
//! on the way.
//!
//! - every order has exactly one terminal event (`order.hold_released`, or
//!   an `order.hold_escalated` other than `HOLD_PERSISTS`), counted as
//!   distinct envelope ids, and it is the outcome the order's situation
//!   calls for;
//! - at most one accepted assignment per order (the simulator's count);
//! - at most one accepted assignment to an order nobody sent (none);
//! - at most one case per order that was not merged into another;
//! - every malformed input in the dead-letter queue exactly once, with its
//!   error code;
//! - no open case left behind its due time.
//!
//! The same envelope id twice is a *duplicated event* (allowed: at-least-
//! once publishing; counted). Two assignments or two different terminal
//! events for one order are *duplicated effects* (failures).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::{Order, Stage};

/// The outcome an order's situation calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// `order.hold_released` after one assignment.
    Released,
    /// `order.hold_escalated` with this reason, no assignment.
    Escalated(&'static str),
}

/// What one run came to.
#[derive(Debug)]
pub struct Report {
    /// The scenario.
    pub scenario: String,
    /// Valid held orders sent.
    pub orders: usize,
    /// Malformed inputs sent.
    pub malformed: usize,
    /// Orders without a terminal event, malformed inputs not dead-lettered.
    pub lost: usize,
    /// Two assignments, two different terminal events, two cases for one
    /// order; a malformed input dead-lettered twice.
    pub duplicated_effects: usize,
    /// The same envelope id received more than once (extra copies).
    pub duplicated_events: usize,
    /// An outcome other than the one expected; an event or dead letter
    /// nobody sent; a wrong error code.
    pub unexpected: usize,
    /// Open cases past their due time at the end.
    pub stuck: usize,
    /// From the end of the last disruption to the last terminal outcome.
    pub recovery: Duration,
    /// The first problems, for the failure message.
    pub problems: Vec<String>,
}

impl Report {
    fn problem(&mut self, text: String) {
        if self.problems.len() < 30 {
            self.problems.push(text);
        }
    }

    /// Nothing lost, nothing done twice, nothing unexpected, nothing stuck.
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.duplicated_effects == 0 && self.unexpected == 0 && self.stuck == 0
    }

    /// One row of the table in `docs/reliability.md`.
    pub fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} s |",
            self.scenario,
            self.orders,
            self.malformed,
            self.lost,
            self.duplicated_effects,
            self.duplicated_events,
            self.unexpected,
            self.stuck,
            self.recovery.as_secs_f64()
        )
    }

    /// Prints the row (and appends it to `$HOLDCLEAR_CHAOS_REPORT` when
    /// set), then fails the test unless the run is clean.
    pub fn assert_clean(&self) {
        eprintln!("{}", self.row());
        if let Ok(path) = std::env::var("HOLDCLEAR_CHAOS_REPORT") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{}", self.row());
            }
        }
        assert!(self.is_clean(), "{}: {self:#?}", self.scenario);
    }
}

/// Waits (up to `deadline`) until every order has a terminal event and
/// every malformed input is in the dead-letter queue, then checks the run.
/// `bad` lists the malformed inputs by `message_id` with their error code;
/// `disruption_over` is when the last disruption ended.
pub async fn check(
    stage: &Stage,
    scenario: &str,
    orders: &[Order],
    bad: &[(String, &'static str)],
    disruption_over: Instant,
    deadline: Duration,
) -> Report {
    let numbers: HashSet<&str> = orders.iter().map(|o| o.number.as_str()).collect();
    let dlq = stage.rabbit.topology.dead_letter_queue.clone();
    let start = Instant::now();
    loop {
        let terminal = {
            let seen = stage.events.seen.lock().unwrap();
            seen.iter()
                .filter(|s| s.is_terminal() && numbers.contains(s.order.as_str()))
                .map(|s| s.order.clone())
                .collect::<HashSet<_>>()
                .len()
        };
        let dead = stage.rabbit.depth(&dlq).await as usize;
        if (terminal == numbers.len() && dead >= bad.len()) || start.elapsed() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A short quiet window: a duplicate that is on its way shows up.
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut r = Report {
        scenario: scenario.to_owned(),
        orders: orders.len(),
        malformed: bad.len(),
        lost: 0,
        duplicated_effects: 0,
        duplicated_events: 0,
        unexpected: 0,
        stuck: 0,
        recovery: Duration::ZERO,
        problems: Vec::new(),
    };

    // Events.
    let seen = stage.events.snapshot();
    let distinct: HashSet<&str> = seen.iter().map(|s| s.envelope_id.as_str()).collect();
    r.duplicated_events = seen.len() - distinct.len();
    let mut by_order: HashMap<&str, Vec<&super::Seen>> = HashMap::new();
    for s in &seen {
        if !numbers.contains(s.order.as_str()) {
            r.unexpected += 1;
            r.problem(format!("an event for an order nobody sent: {}", s.body));
            continue;
        }
        by_order.entry(s.order.as_str()).or_default().push(s);
    }
    let mut last_terminal = None::<Instant>;
    let stats = stage.sim.stats();
    for o in orders {
        let evs = by_order.get(o.number.as_str()).cloned().unwrap_or_default();
        let mut terminal: BTreeMap<&str, &super::Seen> = BTreeMap::new();
        let mut assigned: HashSet<&str> = HashSet::new();
        for e in &evs {
            if e.is_terminal() {
                terminal.entry(e.envelope_id.as_str()).or_insert(e);
                last_terminal = Some(last_terminal.map_or(e.at, |t| t.max(e.at)));
            }
            if e.routing_key == "order.smart_account_assigned" {
                assigned.insert(e.envelope_id.as_str());
            }
        }
        match terminal.len() {
            0 => {
                r.lost += 1;
                r.problem(format!(
                    "order {} has no terminal event (saw {:?})",
                    o.number,
                    evs.iter().map(|e| &e.routing_key).collect::<Vec<_>>()
                ));
            }
            1 => {
                let e = terminal.values().next().unwrap();
                let got = match e.routing_key.as_str() {
                    "order.hold_released" => Expect::Released,
                    _ => match e.reason.as_deref() {
                        Some("SMART_ACCOUNT_NOT_ACTIVE") => {
                            Expect::Escalated("SMART_ACCOUNT_NOT_ACTIVE")
                        }
                        Some("NO_RULE_MATCHED") => Expect::Escalated("NO_RULE_MATCHED"),
                        Some("SMART_ACCOUNT_NOT_FOUND") => {
                            Expect::Escalated("SMART_ACCOUNT_NOT_FOUND")
                        }
                        Some("ASSIGNMENT_LOCKED") => Expect::Escalated("ASSIGNMENT_LOCKED"),
                        Some("RETRIES_EXHAUSTED") => Expect::Escalated("RETRIES_EXHAUSTED"),
                        _ => Expect::Escalated("other"),
                    },
                };
                if got != o.expect {
                    r.unexpected += 1;
                    r.problem(format!(
                        "order {}: expected {:?}, got {}",
                        o.number, o.expect, e.body
                    ));
                }
            }
            n => {
                r.duplicated_effects += 1;
                r.problem(format!("order {}: {n} different terminal events", o.number));
            }
        }
        if assigned.len() > 1 {
            r.duplicated_effects += 1;
            r.problem(format!(
                "order {}: {} different assigned events",
                o.number,
                assigned.len()
            ));
        }
        let assignments = stats.assignments_of(&o.number);
        if assignments > 1 {
            r.duplicated_effects += 1;
            r.problem(format!("order {}: {assignments} assignments", o.number));
        }
        let wanted = u64::from(o.expect == Expect::Released);
        if assignments != wanted && assignments <= 1 && !terminal.is_empty() {
            r.unexpected += 1;
            r.problem(format!(
                "order {}: {assignments} assignments for {:?}",
                o.number, o.expect
            ));
        }
    }
    // Assignments to an order nobody sent: a wrong order.
    let ours: u64 = orders.iter().map(|o| stats.assignments_of(&o.number)).sum();
    let wrong = stats.total_assignments().saturating_sub(ours);
    if wrong > 0 {
        r.unexpected += wrong as usize;
        r.problem(format!("{wrong} assignments to orders nobody sent"));
    }
    r.recovery = last_terminal
        .map(|t| t.saturating_duration_since(disruption_over))
        .unwrap_or(Duration::ZERO);

    // The store: one case per order (others merged into it), none stuck.
    let twice: Vec<(String, i64)> = sqlx::query_as(
        "SELECT order_key, count(*) FROM cases WHERE state <> 'merged' \
         GROUP BY order_key HAVING count(*) > 1",
    )
    .fetch_all(&stage.pool)
    .await
    .unwrap();
    for (order, n) in twice {
        r.duplicated_effects += 1;
        r.problem(format!("order {order}: {n} cases"));
    }
    let stuck: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.order_key, c.state FROM cases c LEFT JOIN case_schedule s ON s.case_id = c.id \
         WHERE c.state NOT IN ('released', 'escalated', 'merged') \
         AND (s.due_at IS NULL OR s.due_at < now() - interval '30 seconds')",
    )
    .fetch_all(&stage.pool)
    .await
    .unwrap();
    r.stuck = stuck.len();
    for (order, state) in stuck.iter().take(5) {
        r.problem(format!("order {order}: stuck in {state}"));
    }

    // Dead letters.
    let mut letters: HashMap<String, Vec<Option<String>>> = HashMap::new();
    for m in stage.rabbit.drain(&dlq).await {
        letters
            .entry(m.message_id().unwrap_or_default())
            .or_default()
            .push(m.header("x-holdclear-error-code"));
    }
    for (id, code) in bad {
        match letters.remove(id).as_deref() {
            None | Some([]) => {
                r.lost += 1;
                r.problem(format!("malformed {id} ({code}) not dead-lettered"));
            }
            Some([got]) => {
                if got.as_deref() != Some(*code) {
                    r.unexpected += 1;
                    r.problem(format!("malformed {id}: code {got:?}, expected {code}"));
                }
            }
            Some(more) => {
                r.duplicated_effects += 1;
                r.problem(format!("malformed {id} dead-lettered {} times", more.len()));
            }
        }
    }
    for (id, codes) in letters {
        r.unexpected += codes.len();
        r.problem(format!("dead letter nobody expected: {id} {codes:?}"));
    }
    r
}
