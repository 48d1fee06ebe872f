//! The worker (`holdclear run`) assembled: the operations HTTP server
//! (`/healthz`, `/readyz`, `/metrics`), the store (database created and
//! migrated), the held-order consumer feeding intake, the case engine (its
//! claim loop and its committer), the outbox relay, the rules reload on
//! SIGHUP and the database probe — all stopped by one cancellation token.
//!
//! Every long-running task runs under the [`Supervisor`]: one that ends
//! before the worker was asked to stop, or panics, makes `/healthz` answer
//! 503 naming it and stops the worker, which then exits non-zero so that
//! its orchestrator restarts it (a worker that quietly lost its engine
//! would take held orders and never clear them).
//!
//! Shutdown, once the token fires (or a task failed): the consumer cancels
//! its subscription and forwards what the broker had already sent; intake
//! commits and acks those batches; the engine finishes its steps in flight;
//! the relay publishes what they committed; the connection is closed; the
//! HTTP server stops last. Work still waiting on a dependency when 80 % of
//! `shutdown_timeout` has passed is abandoned unacknowledged (the broker
//! delivers it again), so the worker is gone within `shutdown_timeout`.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::signal::unix::Signal;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, Consumer, ConsumerSettings};
use crate::commerce::{CommerceApi, CommerceError, ErrorCode, HttpCommerce};
use crate::config::Settings;
use crate::engine::{Engine, EngineTasks};
use crate::intake::{Intake, IntakeSettings};
use crate::ops::health::{Health, TaskFailure, panic_message, probe_database};
use crate::ops::http::{self, HttpError};
use crate::ops::identity::WorkerIdentity;
use crate::outbox::{Relay, RelaySettings};
use crate::retry::Reconnect;
use crate::rules::{RulesError, RulesHandle, listen_for_hangups};
use crate::store::{Store, StoreError};

/// How often the database probe runs.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long the tasks get to end once everything was told to stop.
const TASKS_EXIT: Duration = Duration::from_secs(2);
/// Unacknowledged dead letters the ingester may hold at once.
const DEAD_LETTER_PREFETCH: u16 = 32;

/// Why the worker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The HTTP server could not listen on `HOLDCLEAR_HTTP_ADDR`.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The database could not be prepared for a reason other than being
    /// unreachable (which is retried): a failed migration, refused credentials.
    #[error("cannot prepare the database: {0}")]
    Store(#[from] StoreError),
    /// The worker's main task could not be joined (it was cancelled or
    /// panicked outside every supervised task).
    #[error("the worker failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The rules file is missing or invalid: the worker does not start without rules.
    #[error(transparent)]
    Rules(#[from] RulesError),
    /// The commerce client could not be built from the settings.
    #[error("cannot set up the commerce API client: {0}")]
    Commerce(#[from] CommerceError),
    /// The commerce API's token endpoint refused the client credentials at
    /// start: every call would fail, so the worker does not start.
    #[error(
        "the commerce API refused the client credentials: {detail} at {token_url}; check HOLDCLEAR_COMMERCE_CLIENT_ID and HOLDCLEAR_COMMERCE_CLIENT_SECRET"
    )]
    Credentials {
        /// The token endpoint.
        token_url: String,
        /// What it said (the client id, the HTTP status; never the secret).
        detail: String,
    },
    /// The worker cannot listen for SIGHUP (which reloads the rules).
    #[error("cannot listen for SIGHUP: {0}")]
    Signals(#[source] std::io::Error),
    /// The metrics recorder could not be installed.
    #[error("cannot set up /metrics: {0}")]
    Metrics(String),
    /// A long-running task of the worker ended or panicked before the
    /// worker was asked to stop; the worker stopped so that it is restarted.
    #[error("the {} task stopped unexpectedly ({}); the worker stopped so that it is restarted", .0.task, .0.error)]
    TaskFailed(TaskFailure),
}

/// Watches the worker's long-running tasks: each runs on the worker's
/// [`TaskTracker`] with its panics caught; one that ends before `stop`
/// fired, or panics at any time, is recorded in [`Health`] (so `/healthz`
/// answers 503 naming it) and fires `stop`, which shuts the worker down.
#[derive(Clone, Debug)]
pub struct Supervisor {
    tracker: TaskTracker,
    stop: CancellationToken,
    health: Arc<Health>,
}

impl Supervisor {
    /// Tasks recorded in `health`; `stop` is the worker's shutdown: tasks
    /// that end after it fired were asked to.
    pub fn new(health: Arc<Health>, stop: CancellationToken) -> Self {
        Self {
            tracker: TaskTracker::new(),
            stop,
            health,
        }
    }

    /// Runs `task` as the worker's task called `name`; its output, or
    /// `None` when it panicked.
    pub fn spawn<F>(&self, name: &'static str, task: F) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let this = self.clone();
        self.tracker.spawn(async move {
            let ended = AssertUnwindSafe(task).catch_unwind().await;
            match &ended {
                Err(panic) => this.fail(name, format!("it panicked: {}", panic_message(&**panic))),
                Ok(_) if !this.stop.is_cancelled() => this.fail(name, "it returned".to_owned()),
                Ok(_) => {}
            }
            ended.ok()
        })
    }

    /// Records `name`'s failure and stops the worker.
    fn fail(&self, name: &'static str, error: String) {
        if self.health.task_failed(name, error.clone()) {
            tracing::error!(
                task = name,
                error = %error,
                "A worker task stopped unexpectedly; stopping the worker (it exits non-zero, to be restarted)."
            );
        }
        self.stop.cancel();
    }

    /// Waits (up to `within`) for every task to end; the tasks must have
    /// been told to stop.
    pub async fn wait(&self, within: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(within, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// The running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    /// The address the operations HTTP server bound (port 0 is resolved).
    pub http_addr: SocketAddr,
    /// The readiness the worker reports on `/readyz` (and the task that
    /// failed, on `/healthz`).
    pub health: Arc<Health>,
    /// Who this worker is (in its leases, logs and `/readyz`).
    pub identity: WorkerIdentity,
    cancel: CancellationToken,
    main: JoinHandle<Result<(), WorkerError>>,
}

impl WorkerHandle {
    /// Starts a graceful shutdown and waits for it (bounded by
    /// `shutdown_timeout`).
    pub async fn shutdown(self) -> Result<(), WorkerError> {
        self.cancel.cancel();
        self.wait().await
    }

    /// Waits until the worker stops (after its token was cancelled, or on a
    /// fatal error).
    pub async fn wait(self) -> Result<(), WorkerError> {
        self.main.await?
    }
}

/// Starts workers.
#[derive(Debug)]
pub struct Worker;

/// What the worker needs besides its settings, ready before anything runs.
struct Parts {
    identity: WorkerIdentity,
    rules: RulesHandle,
    commerce: Arc<dyn CommerceApi>,
    /// The settings' client, which spends the deployment's rate budget once
    /// the store is up (`None` with another commerce API).
    client: Option<HttpCommerce>,
    store_slot: Arc<std::sync::OnceLock<Store>>,
    supervisor: Supervisor,
    /// The worker's own shutdown: the caller's token, or a task's failure.
    stop: CancellationToken,
    /// Stops the tasks that run to the very end (probe, rules reload).
    background: CancellationToken,
    /// Stops the HTTP server, last.
    http_stop: CancellationToken,
}

impl Worker {
    /// Binds the HTTP server, checks the commerce credentials, then starts
    /// everything else on a task and returns; unreachable dependencies are
    /// retried in the background (`/readyz` says which). `cancel` stops the
    /// worker. Refused commerce credentials stop it at once
    /// ([`WorkerError::Credentials`]); an unreachable token endpoint does
    /// not (each call retries). SIGHUP reloads the rules from this call on.
    pub async fn start(
        settings: Settings,
        cancel: CancellationToken,
    ) -> Result<WorkerHandle, WorkerError> {
        let hangups = listen_for_hangups().map_err(WorkerError::Signals)?;
        Self::start_hearing(settings, cancel, hangups).await
    }

    /// [`Worker::start`] reloading the rules on the SIGHUPs of `hangups`,
    /// which listens since before this call (`holdclear run` listens from
    /// its first line): a SIGHUP that came in between is a reload too.
    pub async fn start_hearing(
        settings: Settings,
        cancel: CancellationToken,
        hangups: Signal,
    ) -> Result<WorkerHandle, WorkerError> {
        let client = HttpCommerce::new(&settings.commerce)?;
        Self::launch(
            settings,
            cancel,
            Arc::new(client.clone()),
            Some(client),
            hangups,
        )
        .await
    }

    /// [`Worker::start`] with another commerce API than the one the
    /// settings describe (a double at the trait's boundary, in tests);
    /// nothing is checked before it is used.
    pub async fn start_with(
        settings: Settings,
        cancel: CancellationToken,
        commerce: Arc<dyn CommerceApi>,
    ) -> Result<WorkerHandle, WorkerError> {
        let hangups = listen_for_hangups().map_err(WorkerError::Signals)?;
        Self::launch(settings, cancel, commerce, None, hangups).await
    }

    /// `hangups` listens since before the rules are read here, so that no
    /// SIGHUP falls between the read and the reload task's first wait.
    async fn launch(
        settings: Settings,
        cancel: CancellationToken,
        commerce: Arc<dyn CommerceApi>,
        check: Option<HttpCommerce>,
        hangups: Signal,
    ) -> Result<WorkerHandle, WorkerError> {
        let identity = WorkerIdentity::new();
        let rules = load_rules(&settings, &identity)?;
        let metrics =
            crate::ops::metrics::install().map_err(|e| WorkerError::Metrics(e.to_string()))?;
        let health = Health::new();
        let stop = cancel.child_token();
        let supervisor = Supervisor::new(Arc::clone(&health), stop.clone());
        let background = CancellationToken::new();
        let http_stop = CancellationToken::new();
        // Stops what was started when the worker cannot start after all.
        let abandon = |supervisor: Supervisor| {
            stop.cancel();
            background.cancel();
            http_stop.cancel();
            async move {
                supervisor.wait(TASKS_EXIT).await;
            }
        };

        // Every SIGHUP since `hangups` listened reloads the rules; a bad
        // file keeps the rules in force.
        supervisor.spawn(
            "rules reload",
            rules.clone().reload_on_sighup(
                settings.rules_path.clone(),
                hangups,
                background.clone(),
            ),
        );

        let store_slot = Arc::new(std::sync::OnceLock::new());
        let router = http::router(Arc::clone(&health), identity.clone()).merge(
            http::metrics_router(metrics, Arc::clone(&store_slot), Arc::clone(&health)),
        );
        let (http_addr, serving) =
            match http::serve(settings.http_addr, router, http_stop.clone()).await {
                Ok(served) => served,
                Err(e) => {
                    abandon(supervisor).await;
                    return Err(e.into());
                }
            };
        supervisor.spawn("health server", serving);

        if let Some(client) = &check
            && let Err(e) = check_credentials(client, &settings).await
        {
            abandon(supervisor).await;
            return Err(e);
        }

        let parts = Parts {
            identity: identity.clone(),
            rules,
            commerce,
            client: check,
            store_slot,
            supervisor,
            stop: stop.clone(),
            background,
            http_stop,
        };
        let main = tokio::spawn(supervise(settings, parts, Arc::clone(&health)));
        Ok(WorkerHandle {
            http_addr,
            health,
            identity,
            cancel,
            main,
        })
    }
}

/// The rules in force at start: the worker does not start without them.
fn load_rules(settings: &Settings, identity: &WorkerIdentity) -> Result<RulesHandle, WorkerError> {
    let rules = RulesHandle::load(&settings.rules_path, settings.rules_shadow_path.as_deref())?;
    tracing::info!(
        worker = %identity,
        file = %settings.rules_path.display(),
        rules = rules.current().len(),
        hash = %rules.current().hash(),
        shadow_hash = rules.shadow().map_or("-".into(), |s| s.hash().to_owned()),
        "Rules loaded."
    );
    Ok(rules)
}

/// Asks the token endpoint for a token once (bounded by the commerce
/// timeout): a refusal of the credentials is an error; anything else
/// (unreachable, slow, a 5xx) is logged and left to each call's retries.
async fn check_credentials(client: &HttpCommerce, settings: &Settings) -> Result<(), WorkerError> {
    let within = settings.commerce.request_timeout + Duration::from_secs(1);
    let token_url = settings.commerce.token_url.to_string();
    match tokio::time::timeout(within, client.check_credentials()).await {
        Ok(Ok(())) => {
            tracing::info!(token_url = %token_url, "Commerce API credentials accepted.");
            Ok(())
        }
        Ok(Err(CommerceError::Permanent {
            code: ErrorCode::InvalidCredentials,
            detail,
        })) => Err(WorkerError::Credentials { token_url, detail }),
        Ok(Err(e)) => {
            tracing::warn!(token_url = %token_url, error = %e, "Cannot check the commerce API credentials now; going on (each call retries).");
            Ok(())
        }
        Err(_) => {
            tracing::warn!(token_url = %token_url, timeout_ms = within.as_millis() as u64, "The commerce API's token endpoint did not answer in time; going on (each call retries).");
            Ok(())
        }
    }
}

/// Runs the worker until `cancel`, then shuts it down gracefully; the
/// SIGHUPs of `hangups` reload the rules (see [`Worker::start_hearing`]).
pub async fn run(
    settings: Settings,
    cancel: CancellationToken,
    hangups: Signal,
) -> Result<(), WorkerError> {
    Worker::start_hearing(settings, cancel, hangups)
        .await?
        .wait()
        .await
}

/// The name the worker's RabbitMQ connections carry (plus their role):
/// `holdclear <worker uuid> queue=<held queue>`.
fn connection_name(settings: &Settings, identity: &WorkerIdentity) -> String {
    format!(
        "holdclear {identity} queue={}",
        settings.amqp.topology.held_queue
    )
}

async fn supervise(
    settings: Settings,
    parts: Parts,
    health: Arc<Health>,
) -> Result<(), WorkerError> {
    let supervisor = parts.supervisor.clone();
    let (stop, background, http_stop) = (
        parts.stop.clone(),
        parts.background.clone(),
        parts.http_stop.clone(),
    );
    let result = work(&settings, parts, &health).await;
    // Whatever ends from here on was asked to.
    stop.cancel();
    background.cancel();
    http_stop.cancel();
    if !supervisor.wait(TASKS_EXIT).await {
        tracing::warn!("Some tasks were still running at exit.");
    }
    let result = match (result, health.failure()) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(failure)) => Err(WorkerError::TaskFailed(failure)),
        (Ok(()), None) => Ok(()),
    };
    match &result {
        Ok(()) => tracing::info!("Worker stopped."),
        Err(e) => tracing::error!(error = %e, "Worker stopped with an error."),
    }
    result
}

/// The worker's work once its store is ready: every task started, then,
/// once `stop` fires, the graceful shutdown ([`drain`]).
async fn work(settings: &Settings, parts: Parts, health: &Arc<Health>) -> Result<(), WorkerError> {
    let stop = &parts.stop;
    let Some(store) = prepare_store(settings, stop).await? else {
        return Ok(());
    };
    health.set_database(true);
    let _ = parts.store_slot.set(store.clone());
    if let Some(client) = &parts.client {
        client.share_budget(Arc::new(store.clone()));
    }
    tracing::info!(
        worker = %parts.identity,
        host = parts.identity.host(),
        pid = parts.identity.pid(),
        database = %settings.database_url,
        broker = %settings.amqp.url,
        queue = %settings.amqp.topology.held_queue,
        "Worker starting."
    );

    // The shutdown deadline: waits on dependencies end when it fires.
    let abort = CancellationToken::new();
    parts.supervisor.spawn(
        "database probe",
        probe_database(
            store.clone(),
            Arc::clone(health),
            PROBE_EVERY,
            settings.database_timeouts.statement + settings.database_timeouts.acquire,
            parts.background.clone(),
        ),
    );
    parts.supervisor.spawn(
        "heartbeat",
        crate::ops::heartbeat::beat(
            store.clone(),
            parts.identity.clone(),
            Arc::clone(health),
            parts.background.clone(),
        ),
    );
    let cases_opened = Arc::new(Notify::new());
    let (consuming, intaking) =
        spawn_intake(settings, &parts, health, &store, &abort, &cases_opened);
    let dead_letters = spawn_dead_letters(settings, &parts, &store);
    spawn_pruner(settings, &parts, &store);
    let relay_wake = Arc::new(Notify::new());
    spawn_escalated_watch(settings, &parts, &store, &relay_wake);
    let (engining, committer) =
        spawn_engine(settings, &parts, &store, &abort, cases_opened, &relay_wake);
    let (relay_stop, relaying) = spawn_relay(settings, &parts, &store, relay_wake);
    let started = Started {
        consuming,
        dead_letters,
        intaking,
        engining,
        committer,
        relay_stop,
        relaying,
    };

    // Run until asked to stop, or until a task failed (the supervisor
    // fires `stop` then).
    stop.cancelled().await;
    match health.failure() {
        Some(failure) => tracing::error!(
            task = failure.task,
            timeout_ms = settings.shutdown_timeout.as_millis() as u64,
            "Shutting down after a task failed: finishing in-flight batches."
        ),
        None => tracing::info!(
            timeout_ms = settings.shutdown_timeout.as_millis() as u64,
            "Shutting down: finishing in-flight batches."
        ),
    }
    drain(settings, &store, started, abort).await
}

/// The tasks [`work`] started that the shutdown waits for, in its order.
struct Started {
    consuming: JoinHandle<Option<Option<crate::broker::Closing>>>,
    dead_letters: Option<JoinHandle<Option<()>>>,
    intaking: JoinHandle<Option<()>>,
    engining: JoinHandle<Option<()>>,
    committer: JoinHandle<Option<()>>,
    relay_stop: CancellationToken,
    relaying: JoinHandle<Option<()>>,
}

/// Intake: held orders from RabbitMQ become cases (`cases_opened` wakes
/// the engine). The consumer and the intake tasks.
fn spawn_intake(
    settings: &Settings,
    parts: &Parts,
    health: &Arc<Health>,
    store: &Store,
    abort: &CancellationToken,
    cases_opened: &Arc<Notify>,
) -> (
    JoinHandle<Option<Option<crate::broker::Closing>>>,
    JoinHandle<Option<()>>,
) {
    let (deliveries, inbox) = mpsc::channel(usize::from(settings.amqp.prefetch).max(1));
    let consumer = Consumer::new(
        Broker::from_settings(&settings.amqp, connection_name(settings, &parts.identity)),
        ConsumerSettings {
            topology: settings.amqp.topology.clone(),
            prefetch: settings.amqp.prefetch,
            delivery_limit: settings.amqp.delivery_limit,
        },
        Arc::clone(health),
    );
    let consuming = parts.supervisor.spawn(
        "consumer",
        consumer.run(deliveries, parts.stop.clone(), abort.clone()),
    );
    let intake = Intake::new(
        store.clone(),
        IntakeSettings::from(&settings.amqp),
        Arc::clone(health),
        Arc::clone(cases_opened),
    );
    let intaking = parts
        .supervisor
        .spawn("intake", intake.run(inbox, abort.clone()));
    (consuming, intaking)
}

/// Dead letters: the dead-letter queue into the `dead_letters` table
/// (acked after commit), when the settings ask for it. The ingest task,
/// which the shutdown waits for.
fn spawn_dead_letters(
    settings: &Settings,
    parts: &Parts,
    store: &Store,
) -> Option<JoinHandle<Option<()>>> {
    settings.amqp.dead_letter_ingest.then(|| {
        let ingest = crate::broker::dlq_ingest::DeadLetterIngest::new(
            Broker::from_settings(&settings.amqp, connection_name(settings, &parts.identity)),
            settings.amqp.topology.clone(),
            settings.amqp.delivery_limit,
            DEAD_LETTER_PREFETCH,
        );
        parts.supervisor.spawn(
            "dead-letter ingest",
            crate::intake::dead_letters::ingest(store.clone(), ingest, parts.stop.clone()),
        )
    })
}

/// Retention: one worker of the deployment at a time prunes every table.
fn spawn_pruner(settings: &Settings, parts: &Parts, store: &Store) {
    parts.supervisor.spawn(
        "pruner",
        crate::prune::Pruner::new(
            store.clone(),
            settings.prune.clone(),
            parts.identity.to_string(),
        )
        .run(parts.stop.clone()),
    );
}

/// Starts the escalated watch (`HOLDCLEAR_ESCALATED_WATCH_INTERVAL`), if on:
/// it shares the engine's commerce client (and its rate limit) and wakes
/// the relay when a person's release wrote an event.
fn spawn_escalated_watch(
    settings: &Settings,
    parts: &Parts,
    store: &Store,
    relay_wake: &Arc<Notify>,
) {
    let Some(watch) = settings.escalated_watch.clone() else {
        return;
    };
    let watcher = crate::engine::HandWatcher::new(
        store.clone(),
        Arc::clone(&parts.commerce),
        watch,
        Arc::clone(relay_wake),
    );
    parts
        .supervisor
        .spawn("escalated watch", watcher.run(parts.stop.clone()));
}

/// The case engine: due cases are decided, resolved, assigned and watched;
/// its committer writes their steps (and wakes the relay). The stepping
/// and the committing tasks.
fn spawn_engine(
    settings: &Settings,
    parts: &Parts,
    store: &Store,
    abort: &CancellationToken,
    cases_opened: Arc<Notify>,
    relay_wake: &Arc<Notify>,
) -> (JoinHandle<Option<()>>, JoinHandle<Option<()>>) {
    let EngineTasks {
        stepping,
        committing,
    } = Engine::new(
        store.clone(),
        Arc::clone(&parts.commerce),
        Arc::new(parts.rules.clone()),
        settings.engine.clone(),
        parts.identity.clone(),
        cases_opened,
        Arc::clone(relay_wake),
    )
    .with_drain_timeout(settings.shutdown_timeout.mul_f64(0.8))
    .with_abort(abort.clone())
    .tasks(parts.stop.clone());
    let committer = parts.supervisor.spawn("committer", committing);
    let engining = parts.supervisor.spawn("engine", stepping);
    (engining, committer)
}

/// The outbox relay: committed events to the events exchange. It has a
/// stop of its own, fired once the engine has drained, so that the last
/// steps' events go out.
fn spawn_relay(
    settings: &Settings,
    parts: &Parts,
    store: &Store,
    relay_wake: Arc<Notify>,
) -> (CancellationToken, JoinHandle<Option<()>>) {
    let relay_stop = CancellationToken::new();
    let relay = Relay::new(
        store.clone(),
        Broker::from_settings(&settings.amqp, connection_name(settings, &parts.identity)),
        settings.amqp.topology.clone(),
        relay_wake,
    )
    .with_settings(RelaySettings {
        confirm_timeout: settings.amqp.confirm_timeout,
        ..RelaySettings::default()
    });
    let relaying = parts
        .supervisor
        .spawn("relay", relay.run(relay_stop.clone()));
    (relay_stop, relaying)
}

/// The graceful shutdown, once `stop` fired: the consumer, the dead-letter
/// ingest, intake, the engine and its committer end in that order; the
/// relay gets a moment to publish what they committed; `abort` fires at
/// 80 % of `shutdown_timeout` to end what still waits on a dependency.
async fn drain(
    settings: &Settings,
    store: &Store,
    started: Started,
    abort: CancellationToken,
) -> Result<(), WorkerError> {
    let deadline = settings.shutdown_timeout.mul_f64(0.8);
    let timer = tokio::spawn(async move {
        tokio::time::sleep(deadline).await;
        tracing::warn!("Shutdown deadline reached; abandoning unfinished work.");
        abort.cancel();
    });
    let consumed = started.consuming.await;
    if let Some(dead_letters) = started.dead_letters {
        let _ = dead_letters.await;
    }
    let taken = started.intaking.await;
    let engined = started.engining.await;
    let committed = started.committer.await;
    // Give the relay a moment to publish what the drain committed; what it
    // cannot is published on the next start.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while store.outbox_next_due().await.ok().flatten().is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    started.relay_stop.cancel();
    let relayed = started.relaying.await;
    timer.abort();
    taken?;
    engined?;
    committed?;
    relayed?;
    if let Some(Some(conn)) = consumed? {
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
    }
    Ok(())
}

/// Connects to the database (creating it if missing) and applies the
/// migrations, retrying while it is unreachable; `None` if `cancel` fired.
async fn prepare_store(
    settings: &Settings,
    cancel: &CancellationToken,
) -> Result<Option<Store>, StoreError> {
    let mut delays = Reconnect::default();
    loop {
        let attempt = async {
            let store = Store::connect_with(
                &settings.database_url,
                settings.database_tls_ca.as_ref(),
                settings.database_max_connections,
                &settings.database_timeouts,
            )
            .await?;
            store.migrate().await?;
            Ok::<_, StoreError>(store)
        };
        let error = tokio::select! {
            () = cancel.cancelled() => return Ok(None),
            result = attempt => match result {
                Ok(store) => return Ok(Some(store)),
                Err(e) if e.is_transient() => e,
                Err(e) => return Err(e),
            },
        };
        let delay = delays.next_delay();
        tracing::warn!(
            database = %settings.database_url,
            error = %error,
            retry_in_ms = delay.as_millis() as u64,
            "Cannot reach the database; retrying."
        );
        tokio::select! {
            () = cancel.cancelled() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
    }
}
