//! The scheduler: claims due cases, steps them concurrently, commits each step.
//!
//! - Claims take up to `batch_size` due cases (never more than free
//!   concurrency permits) with `FOR UPDATE SKIP LOCKED`, leasing each for
//!   `lease` under a token unique to the claim (`<worker uuid>#<n>`, see
//!   [`WorkerIdentity`]), so two claimers — processes, replicas that are
//!   all PID 1, or loops — never step one case at once, and a worker that
//!   wakes up after its lease ran out is fenced out whoever took it.
//! - A step holds one permit of a `Semaphore(concurrency)`; its lease is
//!   renewed every third of `lease` while it runs; if a renewal finds the
//!   lease lost, the step is abandoned (its outcome never written).
//! - Each step's outcome is committed in one transaction, fenced by the
//!   lease token: case columns + history (every call and its outcome, the
//!   decision, every event) + outbox rows. Steps that need no waiting run
//!   back-to-back within one claim (decide → resolve → assign).
//! - Wake-ups: `wake` (intake opened cases), a local notify when a step
//!   leaves its case due soon, the earliest `next_action_at`, and polling
//!   every `idle_poll` for work other workers created. No SQL `NOTIFY`.
//! - On cancel: no new claims; in-flight steps finish their current step,
//!   give their lease back and stop, within the drain timeout.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use serde_json::json;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::DecisionSource;
use super::machine::{self, Call, HoldSeen, Next, Outcome, Reply, Transition};
use crate::commerce::{CommerceApi, CommerceError, ErrorCode};
use crate::config::EngineSettings;
use crate::domain::{Case, CaseState, Envelope, HistoryEntry, OutboundEvent};
use crate::ops::health::panic_message;
use crate::ops::identity::WorkerIdentity;
use crate::retry::Reconnect;
use crate::store::{Claimed, Identity, StepCommit, Store, StoreError};

/// Steps one claim may run back-to-back before giving the case back.
const MAX_STEPS_PER_CLAIM: usize = 8;
/// Longest wait for one commerce call (the client has its own, shorter,
/// request timeout; this also bounds waiting in its rate limiter).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an unreadable or inconsistent case is set aside.
const SET_ASIDE: Duration = Duration::from_secs(3600);
/// Default bound of the shutdown drain.
const DEFAULT_DRAIN: Duration = Duration::from_secs(20);
/// Step commits written in one statement, at most.
const COMMIT_BATCH: usize = 128;
/// Commit statements in flight at once.
const COMMITS_IN_FLIGHT: usize = 4;
/// Longest wait for the last commits after the drain.
const COMMIT_DRAIN: Duration = Duration::from_secs(5);

/// The case engine of one worker.
pub struct Engine {
    inner: Arc<Inner>,
    commits: mpsc::Receiver<CommitRequest>,
    drain_timeout: Duration,
    abort: CancellationToken,
}

struct Inner {
    store: Store,
    commerce: Arc<dyn CommerceApi>,
    rules: Arc<dyn DecisionSource>,
    settings: EngineSettings,
    identity: WorkerIdentity,
    wake: Arc<Notify>,
    relay_wake: Arc<Notify>,
    local: Notify,
    claims: AtomicU64,
    commits: mpsc::Sender<CommitRequest>,
}

/// One step's commit, queued for the committer (see [`write_commits`]).
struct CommitRequest {
    lease_owner: String,
    case: Case,
    history: Vec<HistoryEntry>,
    outbox: Vec<Envelope>,
    hold: Option<Duration>,
    done: oneshot::Sender<Result<bool, Arc<StoreError>>>,
}

impl CommitRequest {
    fn step(&self) -> StepCommit<'_> {
        StepCommit {
            lease_owner: &self.lease_owner,
            case: &self.case,
            history: &self.history,
            outbox: &self.outbox,
            hold: self.hold,
        }
    }
}

impl Engine {
    /// An engine stepping the cases in `store`. `wake` is notified by intake
    /// when it opens cases; the engine notifies `relay_wake` after commits
    /// that wrote events. `identity` is this worker's: every lease it takes
    /// is `<identity>#<claim number>`; give each engine its own.
    pub fn new(
        store: Store,
        commerce: Arc<dyn CommerceApi>,
        rules: Arc<dyn DecisionSource>,
        settings: EngineSettings,
        identity: WorkerIdentity,
        wake: Arc<Notify>,
        relay_wake: Arc<Notify>,
    ) -> Self {
        // Each step task waits for its own commit: one request per task at most.
        let (commits_tx, commits) = mpsc::channel(settings.concurrency.max(1));
        Self {
            commits,
            inner: Arc::new(Inner {
                store,
                commerce,
                rules,
                settings,
                identity,
                wake,
                relay_wake,
                local: Notify::new(),
                claims: AtomicU64::new(0),
                commits: commits_tx,
            }),
            drain_timeout: DEFAULT_DRAIN,
            abort: CancellationToken::new(),
        }
    }

    /// How long `run` waits for in-flight steps after `cancel` (default 20 s);
    /// steps still running then are dropped and their cases resume when
    /// their leases run out.
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Ends the drain early when `abort` fires (the worker's shutdown
    /// deadline), like the drain timeout.
    pub fn with_abort(mut self, abort: CancellationToken) -> Self {
        self.abort = abort;
        self
    }

    /// Claims and steps due cases until `cancel` fires, then drains: the
    /// two tasks of [`Engine::tasks`], the committer on a task of its own.
    pub async fn run(self, cancel: CancellationToken) {
        let EngineTasks {
            stepping,
            committing,
        } = self.tasks(cancel);
        let committer = tokio::spawn(committing);
        stepping.await;
        let _ = committer.await;
    }

    /// The engine as the two long-running tasks a worker supervises:
    /// `stepping` claims and steps cases until `cancel` fires, drains, then
    /// stops `committing` and waits for it (bounded); `committing` writes
    /// the step commits (see [`write_commits`]). Run both.
    pub fn tasks(self, cancel: CancellationToken) -> EngineTasks {
        let stop_committing = CancellationToken::new();
        // Fires when the committer ends, however it ends (a panic included).
        let committer_done = CancellationToken::new();
        let committing = {
            let store = self.inner.store.clone();
            let stop = stop_committing.clone();
            let done = committer_done.clone().drop_guard();
            let requests = self.commits;
            async move {
                let _done = done;
                write_commits(store, requests, stop).await;
            }
            .boxed()
        };
        let stepping = step_cases(
            self.inner,
            cancel,
            self.drain_timeout,
            self.abort,
            stop_committing,
            committer_done,
        )
        .boxed();
        EngineTasks {
            stepping,
            committing,
        }
    }
}

/// The two long-running tasks of an [`Engine`] (see [`Engine::tasks`]).
pub struct EngineTasks {
    /// Claims and steps cases; after the cancel, drains, then stops the
    /// committer and waits for it.
    pub stepping: BoxFuture<'static, ()>,
    /// Writes the steps' commits until `stepping` stops it.
    pub committing: BoxFuture<'static, ()>,
}

/// The claim loop: claims due cases and steps each on a task of its own,
/// until `cancel` (or the committer's death), then drains within
/// `drain_timeout` (or until `abort`), then stops the committer.
async fn step_cases(
    inner: Arc<Inner>,
    cancel: CancellationToken,
    drain_timeout: Duration,
    abort: CancellationToken,
    stop_committing: CancellationToken,
    committer_done: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(inner.settings.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let mut db_delays = Reconnect::default();
    tracing::info!(
        worker = %inner.identity,
        concurrency = inner.settings.concurrency,
        batch = inner.settings.batch_size,
        "Case engine started."
    );
    loop {
        reap(&mut tasks);
        if cancel.is_cancelled() {
            break;
        }
        if committer_done.is_cancelled() {
            tracing::error!(
                task = "committer",
                "The step committer stopped; the engine stops (no step could be committed)."
            );
            break;
        }
        let free = permits
            .available_permits()
            .min(inner.settings.batch_size.max(1));
        if free == 0 {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = committer_done.cancelled() => continue,
                permit = permits.clone().acquire_owned() => drop(permit),
            }
            continue;
        }
        let n = inner.claims.fetch_add(1, Ordering::Relaxed);
        let owner = inner.identity.lease_owner(n);
        let claimed = match inner
            .store
            .claim_due(&owner, inner.settings.lease, free)
            .await
        {
            Ok(claimed) => {
                db_delays.reset();
                claimed
            }
            Err(e) => {
                let delay = db_delays.next_delay();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Cannot claim cases; retrying.");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        };
        let full = claimed.len() >= free;
        spawn_steps(&inner, &owner, claimed, &permits, &mut tasks, &cancel).await;
        if !full {
            inner.idle(&cancel).await;
        }
    }
    drain(
        &inner,
        tasks,
        drain_timeout,
        abort,
        stop_committing,
        committer_done,
    )
    .await;
}

/// Logs the step tasks that ended with a panic outside their step.
fn reap(tasks: &mut JoinSet<()>) {
    while let Some(done) = tasks.try_join_next() {
        if let Err(e) = done
            && e.is_panic()
        {
            tracing::error!(error = %e, "A case step task panicked outside its step; its case resumes when its lease runs out.");
        }
    }
}

/// Steps each claimed case on a task of its own, each holding a permit.
async fn spawn_steps(
    inner: &Arc<Inner>,
    owner: &str,
    claimed: Vec<Claimed>,
    permits: &Arc<Semaphore>,
    tasks: &mut JoinSet<()>,
    cancel: &CancellationToken,
) {
    for claim in claimed {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Cannot happen (only the claim loop acquires); give the case back.
            let _ = inner
                .store
                .release_case(claim.id, owner, Duration::ZERO)
                .await;
            continue;
        };
        let inner = inner.clone();
        let owner = owner.to_owned();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            drive(inner, owner, claim, cancel).await;
            drop(permit);
        });
    }
}

/// After the claim loop: waits for the steps in flight within
/// `drain_timeout` (or until `abort`), then stops the committer and waits
/// for it (bounded).
async fn drain(
    inner: &Inner,
    mut tasks: JoinSet<()>,
    drain_timeout: Duration,
    abort: CancellationToken,
    stop_committing: CancellationToken,
    committer_done: CancellationToken,
) {
    let drained = tokio::select! {
        () = async { while tasks.join_next().await.is_some() {} } => true,
        () = tokio::time::sleep(drain_timeout) => false,
        () = abort.cancelled() => false,
    };
    if !drained {
        tracing::warn!(
            in_flight = tasks.len(),
            "Steps still running at the end of the drain; their cases resume when their leases run out."
        );
        tasks.abort_all();
    }
    // Commits already being written finish (they are fenced); queued ones
    // of aborted steps are dropped.
    stop_committing.cancel();
    if tokio::time::timeout(COMMIT_DRAIN, committer_done.cancelled())
        .await
        .is_err()
    {
        tracing::warn!(
            "Step commits still being written at the end of the drain; their cases resume when their leases run out."
        );
    }
    tracing::info!(worker = %inner.identity, "Case engine stopped.");
}

impl Inner {
    /// Waits for a wake-up, the earliest due case, or the idle poll.
    async fn idle(&self, cancel: &CancellationToken) {
        let mut wait = self.settings.idle_poll;
        match self.store.next_due().await {
            Ok(Some(due)) => {
                let until = (due - Utc::now()).to_std().unwrap_or_default();
                wait = wait.min(until.max(Duration::from_millis(2)));
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "Cannot read the next due time."),
        }
        tokio::select! {
            () = cancel.cancelled() => {}
            () = self.wake.notified() => {}
            () = self.local.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }

    /// Makes one call of a step, bounded by [`CALL_TIMEOUT`].
    async fn call(&self, case: &Case, call: &Call) -> Reply {
        async fn timed<T>(
            fut: impl Future<Output = Result<T, CommerceError>>,
        ) -> Result<T, CommerceError> {
            tokio::time::timeout(CALL_TIMEOUT, fut)
                .await
                .unwrap_or_else(|_| {
                    Err(CommerceError::Transient {
                        retry_after: None,
                        detail: format!(
                            "no answer within {}",
                            humantime::format_duration(CALL_TIMEOUT)
                        ),
                    })
                })
        }
        let api = &self.commerce;
        match call {
            Call::Decide => Reply::Decision(self.rules.decide(&case.event.data)),
            Call::FindAccount {
                selector,
                account_type,
            } => Reply::Account(timed(api.find_account(selector, Some(*account_type))).await),
            Call::VirtualAccounts {
                domain,
                fresh: false,
            } => Reply::VirtualAccounts(timed(api.virtual_accounts(domain)).await),
            Call::VirtualAccounts {
                domain,
                fresh: true,
            } => Reply::VirtualAccounts(timed(api.fresh_virtual_accounts(domain)).await),
            Call::ReadOrder { order } => Reply::Order(timed(api.order(order)).await),
            Call::Assign {
                order,
                assignment,
                idempotency_key,
            } => Reply::Assigned(timed(api.assign(order, assignment, idempotency_key)).await),
        }
    }
}

/// Steps one claimed case while renewing its lease; a lost lease abandons
/// the step.
#[tracing::instrument(skip_all, fields(case = %claim.id, order = %claim.order_key))]
async fn drive(inner: Arc<Inner>, owner: String, claim: Claimed, cancel: CancellationToken) {
    let case = match claim.case {
        Ok(case) => case,
        Err(e) => {
            tracing::error!(
                error = %e,
                set_aside_s = SET_ASIDE.as_secs(),
                "Case cannot be read; it is set aside. Fix or close the row."
            );
            let _ = inner.store.release_case(claim.id, &owner, SET_ASIDE).await;
            return;
        }
    };
    // The renewal never ends the step by itself: a lost lease cancels
    // `lost`, which aborts a call in flight; a commit always completes (it
    // is fenced by the lease, so after a loss it writes nothing).
    let lost = CancellationToken::new();
    let renew = async {
        keep_lease(&inner, &owner, claim.id).await;
        lost.cancel();
        std::future::pending::<()>().await;
    };
    tokio::select! {
        biased;
        () = steps(&inner, &owner, case, &cancel, &lost) => {}
        () = renew => {}
    }
}

/// Renews the lease every third of its length; returns once it is lost.
async fn keep_lease(inner: &Inner, owner: &str, id: uuid::Uuid) {
    let lease = inner.settings.lease;
    let every = (lease / 3).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        match inner.store.renew_lease(id, owner, lease).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => tracing::warn!(error = %e, "Cannot renew a lease; trying again."),
        }
    }
}

/// Runs the case's steps back-to-back while they need no waiting.
///
/// A step that goes straight on to the next one, emits no event and made
/// no assignment is not committed by itself: its history is carried into
/// the next commit (one transaction fewer per step of thinking). Nothing is
/// carried across a side effect: whatever is uncommitted is committed
/// before an assignment call, so a crash after the call finds the decision
/// and the target the call was made with (and its idempotency key).
async fn steps(
    inner: &Inner,
    owner: &str,
    mut case: Case,
    cancel: &CancellationToken,
    lost: &CancellationToken,
) {
    // Steps applied to `case` but not committed yet.
    let mut carried: Vec<HistoryEntry> = Vec::new();
    let mut uncommitted: Vec<(CaseState, Outcome, Transition)> = Vec::new();
    for n in 1..=MAX_STEPS_PER_CLAIM {
        let before = case.state();
        let mut calls = Calls {
            replies: Vec::new(),
            history: Vec::new(),
            calling: "step",
        };
        // A panic anywhere in the step (the plan, a call, the decision
        // source) is the case's transient failure: retried with backoff and
        // counted against its budget like any other, never a dead step
        // task whose case comes back at every lease expiry.
        let planned = AssertUnwindSafe(plan_calls(
            inner,
            owner,
            &case,
            lost,
            &mut calls,
            &mut carried,
            &mut uncommitted,
        ))
        .catch_unwind()
        .await;
        let outcome = match planned {
            Ok(Some(outcome)) => outcome,
            Ok(None) => return,
            Err(panic) => panicked(&case, calls.calling, &*panic),
        };
        let now = Utc::now();
        let Some((outcome, transition)) = apply_outcome(inner, owner, &case, outcome, now).await
        else {
            return;
        };
        let envelopes = carry(&mut carried, calls.history, &transition, now);
        let go_on = !cancel.is_cancelled()
            && n < MAX_STEPS_PER_CLAIM
            && transition.case.next_action_at.is_some_and(|t| t <= now);
        case = transition.case.clone();
        uncommitted.push((before, outcome, transition));
        if go_on && envelopes.is_empty() {
            continue;
        }
        let hold = go_on.then_some(inner.settings.lease);
        if !commit(
            inner,
            owner,
            &case,
            &mut carried,
            &envelopes,
            hold,
            &mut uncommitted,
        )
        .await
        {
            return;
        }
        if !envelopes.is_empty() {
            inner.relay_wake.notify_one();
        }
        if !go_on {
            if case.next_action_at.is_some_and(|t| {
                (t - Utc::now()).to_std().unwrap_or_default() < inner.settings.idle_poll
            }) {
                inner.local.notify_one();
            }
            return;
        }
    }
}

/// The calls of one step so far: their replies, their history lines, and
/// the call in flight (for a panic's history line).
struct Calls {
    replies: Vec<Reply>,
    history: Vec<HistoryEntry>,
    calling: &'static str,
}

/// Plans and makes the calls of one step of `case` until the step's
/// outcome; `None` when the step is over without one (the case is
/// terminal, the lease was lost, or committing the carried steps before an
/// assignment failed).
async fn plan_calls(
    inner: &Inner,
    owner: &str,
    case: &Case,
    lost: &CancellationToken,
    calls: &mut Calls,
    carried: &mut Vec<HistoryEntry>,
    uncommitted: &mut Vec<(CaseState, Outcome, Transition)>,
) -> Option<Outcome> {
    loop {
        let call = match machine::plan(case, &calls.replies) {
            Next::Stop => {
                let _ = inner.store.release_case(case.id, owner, SET_ASIDE).await;
                return None;
            }
            Next::Done(outcome) => return Some(outcome),
            Next::Call(call) => call,
        };
        // Never an assignment call with earlier steps uncommitted.
        if matches!(call, Call::Assign { .. })
            && !uncommitted.is_empty()
            && !commit(
                inner,
                owner,
                case,
                carried,
                &[],
                Some(inner.settings.lease),
                uncommitted,
            )
            .await
        {
            return None;
        }
        calls.calling = call.name();
        let at = Utc::now();
        let started = Instant::now();
        let reply = tokio::select! {
            reply = inner.call(case, &call) => reply,
            () = lost.cancelled() => {
                tracing::warn!(lease_owner = %owner, call = call.name(), "Lease lost while stepping; the step is abandoned.");
                return None;
            }
        };
        let took = started.elapsed();
        tracing::debug!(
            call = call.name(),
            class = reply.class(),
            took_ms = took.as_millis() as u64,
            "Call answered."
        );
        let mut entry = machine::call_entry(case.state(), &call, &reply, at, took);
        entry.detail["worker"] = json!(owner);
        calls.history.push(entry);
        if let Reply::Decision(live) = &reply {
            calls
                .history
                .extend(shadow_entry(inner, case, live.as_ref(), at));
        }
        let reply = identify(inner, owner, case, reply).await?;
        calls.replies.push(reply);
        calls.calling = "step";
        // Past `MAX_CALLS_PER_STEP` calls, plan() ends the step on the next round.
    }
}

/// The `shadow` history line of a decision: what the shadow rules would
/// have decided beside what the rules in force did (`rules diff --shadow`
/// reads it); `None` without shadow rules.
fn shadow_entry(
    inner: &Inner,
    case: &Case,
    live: Option<&crate::domain::Decision>,
    at: DateTime<Utc>,
) -> Option<HistoryEntry> {
    let shadow = inner.rules.shadow(&case.event.data)?;
    Some(HistoryEntry {
        at,
        kind: "shadow",
        state: case.state(),
        detail: json!({
            "live": live,
            "shadow": shadow.decision,
            "shadowFile": shadow.file,
            "shadowHash": shadow.rules_hash,
        }),
    })
}

/// Applies `outcome` to `case`; a panic in `apply` is recorded as the
/// case's transient failure. `None` (the case set aside) when no
/// transition can be made.
async fn apply_outcome(
    inner: &Inner,
    owner: &str,
    case: &Case,
    outcome: Outcome,
    now: DateTime<Utc>,
) -> Option<(Outcome, Transition)> {
    let applied = |outcome: Outcome| {
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            machine::apply(case, outcome, now, &inner.settings)
        }))
    };
    match applied(outcome.clone()) {
        Ok(Ok(t)) => return Some((outcome, t)),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "The case's step has no valid transition; it is set aside.");
        }
        Err(panic) => {
            let transient = panicked(case, "apply", &*panic);
            if let Ok(Ok(t)) = applied(transient.clone()) {
                return Some((transient, t));
            }
            tracing::error!(
                set_aside_s = SET_ASIDE.as_secs(),
                "The case's step panicked and so did recording it; it is set aside."
            );
        }
    }
    let _ = inner.store.release_case(case.id, owner, SET_ASIDE).await;
    None
}

/// Adds one applied step to the history carried to the next commit (its
/// calls, its entries, a line per event) and returns its events' envelopes.
fn carry(
    carried: &mut Vec<HistoryEntry>,
    calls: Vec<HistoryEntry>,
    transition: &Transition,
    now: DateTime<Utc>,
) -> Vec<Envelope> {
    let case = &transition.case;
    let envelopes: Vec<Envelope> = (transition.events.iter())
        .map(|e| e.envelope(case.id, case.generation, &case.order, now))
        .collect();
    carried.extend(calls);
    carried.extend(transition.history.iter().cloned());
    carried.extend(envelopes.iter().map(|e| HistoryEntry {
        at: now,
        kind: "event",
        state: case.state(),
        detail: json!({"routingKey": e.routing_key, "envelopeId": e.id}),
    }));
    envelopes
}

/// The transient failure that a panic in `case`'s step (during `call`)
/// stands for, logged.
fn panicked(case: &Case, call: &'static str, panic: &(dyn std::any::Any + Send)) -> Outcome {
    let detail = format!("{call} panicked: {}", panic_message(panic));
    tracing::error!(
        order = %case.subject(),
        state = %case.state(),
        call,
        detail = %detail,
        "A step panicked; it counts as a transient failure of its case."
    );
    Outcome::Transient {
        call,
        retry_after: None,
        detail,
    }
}

/// An order read that names the sales order number of a case which did not
/// know it (the case was opened by a web order id) is recorded before the
/// step goes on, so that the order has one case whatever id named it: the
/// case either holds the number now, or it was merged into the order's case
/// and this step ends (`None`). Any other reply passes through.
async fn identify(inner: &Inner, owner: &str, case: &Case, reply: Reply) -> Option<Reply> {
    let Reply::Order(Ok(order)) = &reply else {
        return Some(reply);
    };
    if case.order.sales_order_number.is_some() {
        return Some(reply);
    }
    let so = order.sales_order_number.clone();
    match inner.store.identify_order(case.id, owner, &so).await {
        Ok(Identity::Recorded) => Some(reply),
        Ok(Identity::Merged { into }) => {
            tracing::info!(
                sales_order_number = %so,
                into = %into,
                "The order already has a case (it was first known by another id); this case joined it."
            );
            metrics::counter!("holdclear_cases_merged_total").increment(1);
            None
        }
        Ok(Identity::Conflicting { known }) => Some(Reply::Order(Err(CommerceError::Permanent {
            code: ErrorCode::AmbiguousMatch,
            detail: format!(
                "the order read by web order id is sales order {so}, but the case knows it as sales order {known}"
            ),
        }))),
        Ok(Identity::LeaseLost) => {
            tracing::warn!(lease_owner = %owner, "Lease lost before the order's identity was recorded; the step is abandoned.");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "Cannot record the order's sales order number; the case resumes when its lease runs out.");
            None
        }
    }
}

/// Commits `case` with the carried history and `envelopes`, fenced by the
/// lease (kept for `hold`, else given back); reports the committed steps.
/// `false` when nothing was written (lease lost, database error): the
/// step is abandoned and the case resumes from its last commit.
async fn commit(
    inner: &Inner,
    owner: &str,
    case: &Case,
    carried: &mut Vec<HistoryEntry>,
    envelopes: &[Envelope],
    hold: Option<Duration>,
    uncommitted: &mut Vec<(CaseState, Outcome, Transition)>,
) -> bool {
    let outcome = uncommitted.last().map_or("-", |(_, o, _)| o.name());
    // Every line says which claim wrote it: `cases show` names the worker
    // that last held the case from it.
    for entry in carried.iter_mut() {
        if let Some(detail) = entry.detail.as_object_mut() {
            detail.entry("worker").or_insert_with(|| json!(owner));
        }
    }
    let history = std::mem::take(carried);
    // A commit that timed out (a lock held elsewhere, a busy pool) or lost
    // its connection is tried again while the lease lasts; it is fenced,
    // so a retry after the lease went to another worker writes nothing.
    let started = Instant::now();
    let mut delays = Reconnect::default();
    let written = loop {
        let (done, written) = oneshot::channel();
        let request = CommitRequest {
            lease_owner: owner.to_owned(),
            case: case.clone(),
            history: history.clone(),
            outbox: envelopes.to_vec(),
            hold,
            done,
        };
        let written = match inner.commits.send(request).await {
            Ok(()) => written.await.ok(),
            Err(_) => None,
        };
        match written {
            Some(Err(e)) if e.is_transient() && started.elapsed() < inner.settings.lease => {
                let delay = delays.next_delay();
                tracing::warn!(
                    error = %e,
                    outcome,
                    retry_in_ms = delay.as_millis() as u64,
                    "Cannot commit the step now; trying again."
                );
                tokio::time::sleep(delay).await;
            }
            other => break other,
        }
    };
    match written {
        Some(Ok(true)) => {
            for (before, outcome, transition) in uncommitted.drain(..) {
                report(before, &outcome, &transition);
            }
            true
        }
        Some(Ok(false)) => {
            tracing::warn!(lease_owner = %owner, outcome, "Lease lost before the commit; the step's outcome is discarded.");
            false
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, outcome, "Cannot commit the step; the case resumes when its lease runs out.");
            false
        }
        None => {
            tracing::debug!(
                outcome,
                "The engine stopped before the step was committed; the case resumes when its lease runs out."
            );
            false
        }
    }
}

/// Writes the step commits of all step tasks: whatever is queued (up to
/// [`COMMIT_BATCH`]) in one statement, up to [`COMMITS_IN_FLIGHT`]
/// statements at once, so that under load many steps share one
/// transaction and its round trip, and alone a step is written at once.
/// Stops taking requests when `stop` fires; finishes the statements in
/// flight.
async fn write_commits(
    store: Store,
    mut requests: mpsc::Receiver<CommitRequest>,
    stop: CancellationToken,
) {
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        let mut batch = Vec::new();
        tokio::select! {
            Some(()) = in_flight.next() => {}
            n = requests.recv_many(&mut batch, COMMIT_BATCH), if open && in_flight.len() < COMMITS_IN_FLIGHT => {
                if n == 0 {
                    open = false;
                } else {
                    in_flight.push(write_batch(&store, batch));
                }
            }
            () = stop.cancelled(), if open => open = false,
            else => break,
        }
    }
}

/// Writes one batch of step commits and answers each step. A statement
/// that fails for one step's data must not fail the others: on an error
/// that is not the connection's or a timeout's (a deadlock, say), each
/// step is written again on its own; a timeout or a lost connection fails
/// the batch at once (each step tries its commit again).
async fn write_batch(store: &Store, batch: Vec<CommitRequest>) {
    metrics::histogram!("holdclear_engine_commit_batch_size").record(batch.len() as f64);
    let steps: Vec<StepCommit<'_>> = batch.iter().map(CommitRequest::step).collect();
    let result = store.commit_steps(&steps).await;
    drop(steps);
    match result {
        Ok(written) => {
            for (request, written) in batch.into_iter().zip(written) {
                let _ = request.done.send(Ok(written));
            }
        }
        Err(e) if batch.len() > 1 && !e.is_transient() => {
            tracing::debug!(error = %e, steps = batch.len(), "A batch of step commits failed; writing each alone.");
            for request in batch {
                let result = store
                    .commit_steps(&[request.step()])
                    .await
                    .map(|w| w.first().copied().unwrap_or(false))
                    .map_err(Arc::new);
                let _ = request.done.send(result);
            }
        }
        Err(e) => {
            let e = Arc::new(e);
            for request in batch {
                let _ = request.done.send(Err(e.clone()));
            }
        }
    }
}

/// Counts one committed step and its escalations.
fn count(before: CaseState, outcome: &Outcome, t: &Transition) {
    metrics::counter!(
        "holdclear_cases_stepped_total",
        "state" => before.as_str(),
        "outcome" => outcome.name()
    )
    .increment(1);
    for event in &t.events {
        if let OutboundEvent::HoldEscalated { reason, level, .. } = event {
            metrics::counter!(
                "holdclear_escalations_total",
                "reason" => reason.as_str(),
                "level" => level.as_str()
            )
            .increment(1);
        }
    }
}

/// Logs and counts one committed step.
fn report(before: CaseState, outcome: &Outcome, t: &Transition) {
    count(before, outcome, t);
    let case = &t.case;
    let order = case.subject();
    let rule = case.rule().unwrap_or("-");
    match outcome {
        Outcome::Identified {
            sales_order_number,
            seen,
        } => {
            tracing::info!(order = %order, sales_order_number = %sales_order_number, "Order identified by its web order id.");
            match seen {
                HoldSeen::On { .. } => {}
                HoldSeen::Released { .. } => {
                    tracing::info!(order = %order, "Hold released before anything was assigned.");
                }
                HoldSeen::Locked { .. } => escalated(&order, rule, t),
            }
        }
        Outcome::Decided(d) => {
            tracing::info!(order = %order, rule = %d.rule, "Rule decided.");
            metrics::counter!("holdclear_rule_decisions_total", "rule" => d.rule.clone())
                .increment(1);
        }
        Outcome::Resolved(_) => {
            let target = case.stage.progress().target;
            let account = target
                .as_ref()
                .map_or("-", |t| t.smart_account_domain.as_str());
            tracing::info!(order = %order, rule = %rule, account = %account, state = %case.state(), "Smart Account resolved.");
        }
        Outcome::Assigned(r) => {
            let target = case.stage.progress().target;
            let account = target
                .as_ref()
                .map_or("-", |t| t.smart_account_domain.as_str());
            tracing::info!(order = %order, rule = %rule, account = %account, assignment = %r.assignment_id, "Smart Account assigned.");
        }
        Outcome::StillHeld { .. } => {
            for event in &t.events {
                if let OutboundEvent::HoldEscalated { level, .. } = event {
                    tracing::warn!(order = %order, reason = "HOLD_PERSISTS", level = %level, "Hold persists; escalated, still watching.");
                }
            }
            tracing::debug!(order = %order, polls = case.polls, "Hold still on.");
        }
        Outcome::Released { .. } => {
            // Reads of the order while watched: the ones that found the
            // hold still on, and the one that found it released.
            metrics::histogram!("holdclear_watch_reads_per_release")
                .record(f64::from(case.polls) + 1.0);
            tracing::info!(order = %order, rule = %rule, polls = case.polls, "Hold released.");
        }
        Outcome::Escalate { .. } => escalated(&order, rule, t),
        Outcome::Transient { .. } if case.state() == CaseState::Escalated => {
            escalated(&order, rule, t);
        }
        Outcome::Transient { call, detail, .. } => {
            metrics::counter!("holdclear_retries_total", "state" => before.as_str()).increment(1);
            tracing::warn!(
                order = %order,
                call = %call,
                attempt = case.attempt,
                detail = %detail,
                "Transient failure; the step is retried later."
            );
        }
    }
}

/// Logs a terminal escalation (the event tells operators; the log tells
/// whoever reads the worker's logs).
fn escalated(order: &str, rule: &str, t: &Transition) {
    for event in &t.events {
        if let OutboundEvent::HoldEscalated {
            reason,
            level,
            detail,
            ..
        } = event
        {
            tracing::warn!(order = %order, rule = %rule, reason = %reason, level = %level, detail = %detail, "Case escalated.");
        }
    }
}
