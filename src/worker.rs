//! The worker (`holdclear run`) assembled: the operations HTTP server
//! (`/healthz`, `/readyz`, `/metrics`), the store (database created and
//! migrated), the held-order consumer feeding intake, the case engine, the
//! outbox relay, the rules reload on SIGHUP and the database probe — all
//! stopped by one cancellation token.
//!
//! Shutdown, once the token fires: the consumer cancels its subscription
//! and forwards what the broker had already sent; intake commits and acks
//! those batches; the connection is closed; the HTTP server stops last.
//! Work still waiting on a dependency when 80 % of `shutdown_timeout` has
//! passed is abandoned unacknowledged (the broker delivers it again), so
//! the worker is gone within `shutdown_timeout`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, Consumer, ConsumerSettings};
use crate::commerce::{CommerceApi, CommerceError, HttpCommerce};
use crate::config::Settings;
use crate::engine::Engine;
use crate::intake::{Intake, IntakeSettings};
use crate::ops::health::{Health, probe_database};
use crate::ops::http::{self, HttpError};
use crate::outbox::Relay;
use crate::retry::Reconnect;
use crate::rules::{Rules, RulesError, RulesHandle};
use crate::store::{Store, StoreError};

/// How often the database probe runs.
const PROBE_EVERY: Duration = Duration::from_secs(1);

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
    /// A task of the worker panicked.
    #[error("a worker task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The rules file is missing or invalid: the worker does not start without rules.
    #[error(transparent)]
    Rules(#[from] RulesError),
    /// The commerce client could not be built from the settings.
    #[error("cannot set up the commerce API client: {0}")]
    Commerce(#[from] CommerceError),
    /// The metrics recorder could not be installed.
    #[error("cannot set up /metrics: {0}")]
    Metrics(String),
    /// A task of the worker ended before shutdown was requested.
    #[error("the {0} task stopped unexpectedly")]
    Stopped(&'static str),
}

/// What the worker needs besides its settings, ready before anything runs.
struct Parts {
    rules: RulesHandle,
    commerce: Arc<dyn CommerceApi>,
    store_slot: Arc<std::sync::OnceLock<Store>>,
}

/// The running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    /// The address the operations HTTP server bound (port 0 is resolved).
    pub http_addr: SocketAddr,
    /// The readiness the worker reports on `/readyz`.
    pub health: Arc<Health>,
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

impl Worker {
    /// Binds the HTTP server, then starts everything else on a task and
    /// returns at once; unreachable dependencies are retried in the
    /// background (`/readyz` says which). `cancel` stops the worker.
    pub async fn start(
        settings: Settings,
        cancel: CancellationToken,
    ) -> Result<WorkerHandle, WorkerError> {
        let rules = RulesHandle::new(Rules::load(&settings.rules_path)?);
        tracing::info!(
            file = %settings.rules_path.display(),
            rules = rules.current().len(),
            hash = %rules.current().hash(),
            "Rules loaded."
        );
        let commerce: Arc<dyn CommerceApi> = Arc::new(HttpCommerce::new(&settings.commerce)?);
        let metrics =
            crate::ops::metrics::install().map_err(|e| WorkerError::Metrics(e.to_string()))?;
        let store_slot = Arc::new(std::sync::OnceLock::new());
        let health = Health::new();
        let tracker = TaskTracker::new();
        let http_stop = CancellationToken::new();
        let router = http::router(Arc::clone(&health)).merge(http::metrics_router(
            metrics,
            Arc::clone(&store_slot),
            Arc::clone(&health),
        ));
        let http_addr =
            http::serve(settings.http_addr, router, http_stop.clone(), &tracker).await?;
        let parts = Parts {
            rules,
            commerce,
            store_slot,
        };
        let main = tokio::spawn(supervise(
            settings,
            parts,
            Arc::clone(&health),
            tracker,
            http_stop,
            cancel.clone(),
        ));
        Ok(WorkerHandle {
            http_addr,
            health,
            cancel,
            main,
        })
    }
}

/// Runs the worker until `cancel`, then shuts it down gracefully.
pub async fn run(settings: Settings, cancel: CancellationToken) -> Result<(), WorkerError> {
    Worker::start(settings, cancel).await?.wait().await
}

/// The name the worker's RabbitMQ connections carry (plus their role).
fn connection_name(settings: &Settings) -> String {
    format!(
        "holdclear pid={} queue={}",
        std::process::id(),
        settings.amqp.topology.held_queue
    )
}

async fn supervise(
    settings: Settings,
    parts: Parts,
    health: Arc<Health>,
    tracker: TaskTracker,
    http_stop: CancellationToken,
    cancel: CancellationToken,
) -> Result<(), WorkerError> {
    let result = work(&settings, parts, &health, &tracker, &cancel).await;
    http_stop.cancel();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(2), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("Some tasks were still running at exit.");
    }
    match &result {
        Ok(()) => tracing::info!("Worker stopped."),
        Err(e) => tracing::error!(error = %e, "Worker stopped with an error."),
    }
    result
}

async fn work(
    settings: &Settings,
    parts: Parts,
    health: &Arc<Health>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<(), WorkerError> {
    let Some(store) = prepare_store(settings, cancel).await? else {
        return Ok(());
    };
    health.set_database(true);
    let _ = parts.store_slot.set(store.clone());
    tracing::info!(
        database = %settings.database_url,
        broker = %settings.amqp.url,
        queue = %settings.amqp.topology.held_queue,
        "Worker starting."
    );

    // Background tasks that only stop at the very end.
    let background = CancellationToken::new();
    // The shutdown deadline: waits on dependencies end when it fires.
    let abort = CancellationToken::new();

    tracker.spawn(probe_database(
        store.clone(),
        Arc::clone(health),
        PROBE_EVERY,
        background.clone(),
    ));

    // Intake: held orders from RabbitMQ become cases.
    let cases_opened = Arc::new(Notify::new());
    let (deliveries, inbox) = mpsc::channel(usize::from(settings.amqp.prefetch).max(1));
    let consumer = Consumer::new(
        Broker::from_settings(&settings.amqp, connection_name(settings)),
        ConsumerSettings {
            topology: settings.amqp.topology.clone(),
            prefetch: settings.amqp.prefetch,
            delivery_limit: settings.amqp.delivery_limit,
        },
        Arc::clone(health),
    );
    let consuming = tracker.spawn(consumer.run(deliveries, cancel.clone(), abort.clone()));
    let intake = Intake::new(
        store.clone(),
        IntakeSettings::from(&settings.amqp),
        Arc::clone(health),
        Arc::clone(&cases_opened),
    );
    let intaking = tracker.spawn(intake.run(inbox, abort.clone()));

    // The case engine: due cases are decided, resolved, assigned and watched.
    let relay_wake = Arc::new(Notify::new());
    let engine = Engine::new(
        store.clone(),
        parts.commerce,
        Arc::new(parts.rules.clone()),
        settings.engine.clone(),
        connection_name(settings),
        Arc::clone(&cases_opened),
        Arc::clone(&relay_wake),
    )
    .with_drain_timeout(settings.shutdown_timeout.mul_f64(0.8))
    .with_abort(abort.clone());
    let engining = tracker.spawn(engine.run(cancel.clone()));

    // The outbox relay: committed events to the events exchange. It runs
    // until the engine has drained, so that the last steps' events go out.
    let relay_stop = CancellationToken::new();
    let relay = Relay::new(
        store.clone(),
        Broker::from_settings(&settings.amqp, connection_name(settings)),
        settings.amqp.topology.clone(),
        relay_wake,
    );
    let relaying = tracker.spawn(relay.run(relay_stop.clone()));

    // Rules: SIGHUP reloads the file; a bad file keeps the rules in force.
    tracker.spawn(
        parts
            .rules
            .reload_on_sighup(settings.rules_path.clone(), background.clone()),
    );

    // Run until cancelled. Intake or the consumer ending before that is a
    // bug (a panic): stop the worker so that it is restarted, rather than
    // leave a consumer that takes nothing.
    let mut consuming = consuming;
    let mut intaking = intaking;
    let early = tokio::select! {
        () = cancel.cancelled() => None,
        r = &mut intaking => Some(("intake", r.err())),
        r = &mut consuming => Some(("consumer", r.err())),
    };
    if let Some((task, panic)) = early {
        tracing::error!(
            task,
            "A worker task stopped unexpectedly; stopping the worker."
        );
        cancel.cancel();
        abort.cancel();
        background.cancel();
        relay_stop.cancel();
        return Err(match panic {
            Some(e) => WorkerError::Task(e),
            None => WorkerError::Stopped(task),
        });
    }
    tracing::info!(
        timeout_ms = settings.shutdown_timeout.as_millis() as u64,
        "Shutting down: finishing in-flight batches."
    );
    let deadline = settings.shutdown_timeout.mul_f64(0.8);
    let timer = {
        let abort = abort.clone();
        tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            tracing::warn!("Shutdown deadline reached; abandoning unfinished work.");
            abort.cancel();
        })
    };
    let consumed = consuming.await;
    let taken = intaking.await;
    let engined = engining.await;
    // Give the relay a moment to publish what the drain committed; what it
    // cannot is published on the next start.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while store.outbox_next_due().await.ok().flatten().is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    relay_stop.cancel();
    let relayed = relaying.await;
    timer.abort();
    background.cancel();
    taken?;
    engined?;
    relayed?;
    if let Some(conn) = consumed? {
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
            let store = Store::connect(
                &settings.database_url,
                settings.database_tls_ca.as_ref(),
                settings.database_max_connections,
            )
            .await?;
            store.migrate().await?;
            Ok::<_, StoreError>(store)
        };
        let error = tokio::select! {
            () = cancel.cancelled() => return Ok(None),
            result = attempt => match result {
                Ok(store) => return Ok(Some(store)),
                Err(e) if e.is_connection() => e,
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
