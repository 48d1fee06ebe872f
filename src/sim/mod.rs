//! The commerce-API simulator (`holdclear sim`): a real HTTP server
//! honouring the commerce contract, seeded from a [`Scenario`], with fault
//! injection and counters for tests, the demo and the benchmark.
//!
//! - [`scenario`]: the TOML file: accounts, orders, defaults, fault knobs.
//! - `world`: the simulated system behind one lock (no I/O).
//! - `routes`: the contract's endpoints and `/_sim/*`.
//!
//! In-process use: [`SimServer::start`] binds an address and returns a
//! [`SimHandle`] (address, statistics, fault scripts, shutdown). The
//! command line uses [`serve`] with its own listener and cancellation.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod routes;
pub mod scenario;
mod world;

pub use scenario::{
    AccountSpec, Behaviour, EndpointFaults, Faults, Forced, HoldsField, OrderDefaults, OrderSpec,
    Scenario, SimEndpoint, VirtualAccountSpec,
};
pub use world::SimStats;

use world::World;

/// What can go wrong starting or running the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The scenario file cannot be read.
    #[error("cannot read scenario file {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The system's message.
        reason: String,
    },
    /// The scenario is not valid; the message names the entry.
    #[error("invalid scenario {origin}: {reason}")]
    Scenario {
        /// The file (or other source) it came from.
        origin: String,
        /// What is wrong, naming the entry and key.
        reason: String,
    },
    /// The listening address cannot be used.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: String,
        /// The system's message.
        reason: String,
    },
    /// The server stopped with an error.
    #[error("simulator server failed: {0}")]
    Serve(String),
}

/// State shared by every request of one server.
pub(crate) struct Shared {
    world: Mutex<World>,
    cancel: CancellationToken,
}

impl Shared {
    fn new(scenario: Scenario, cancel: CancellationToken) -> Result<Self, SimError> {
        scenario.validate().map_err(|reason| SimError::Scenario {
            origin: "the given scenario".into(),
            reason,
        })?;
        Ok(Self {
            world: Mutex::new(World::new(scenario)),
            cancel,
        })
    }

    /// The world; a panic elsewhere never makes it unusable.
    pub(crate) fn lock(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits `d`, or less when the server shuts down (then returns false).
    pub(crate) async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(d) => true,
            () = self.cancel.cancelled() => false,
        }
    }
}

/// Serves the simulator on `listener` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    scenario: Scenario,
    cancel: CancellationToken,
) -> Result<(), SimError> {
    let shared = Arc::new(Shared::new(scenario, cancel.clone())?);
    run(listener, shared, cancel).await
}

async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) -> Result<(), SimError> {
    axum::serve(listener, routes::router(shared))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
        .map_err(|e| SimError::Serve(e.to_string()))
}

/// Starts simulators in-process.
pub struct SimServer;

impl SimServer {
    /// Binds `addr` (port 0 picks a free one) and serves `scenario` on a
    /// background task until [`SimHandle::shutdown`] or the handle is dropped.
    pub async fn start(
        addr: std::net::SocketAddr,
        scenario: Scenario,
    ) -> Result<SimHandle, SimError> {
        let bind_error = |e: std::io::Error| SimError::Bind {
            addr: addr.to_string(),
            reason: e.to_string(),
        };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        let cancel = CancellationToken::new();
        let shared = Arc::new(Shared::new(scenario, cancel.clone())?);
        let task = tokio::spawn(run(listener, shared.clone(), cancel.clone()));
        Ok(SimHandle {
            addr,
            shared,
            cancel,
            task: Some(task),
        })
    }
}

/// A running in-process simulator. Dropping it stops the server.
pub struct SimHandle {
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    task: Option<JoinHandle<Result<(), SimError>>>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SimHandle {
    /// The address it listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`: the worker's `HOLDCLEAR_COMMERCE_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The token endpoint's URL.
    pub fn token_url(&self) -> String {
        format!("{}/oauth2/default/v1/token", self.base_url())
    }

    /// A snapshot of the counters (as `GET /_sim/stats`).
    pub fn stats(&self) -> SimStats {
        self.shared.lock().stats.clone()
    }

    /// The order as the API would show it, without counting a read; `None`
    /// when the simulator has not seen it.
    pub fn order(&self, sales_order_number: &str) -> Option<serde_json::Value> {
        self.shared.lock().peek_order(sales_order_number)
    }

    /// Plays the person: assigns the account `domain` and the Virtual
    /// Account `va` to the order by hand and releases its Smart Account
    /// hold (as `POST /_sim/orders/{n}/hand-assignment`). The order as it
    /// now reads, or the error answer (unknown order or account).
    pub fn assign_by_hand(
        &self,
        sales_order_number: &str,
        domain: &str,
        va: &str,
    ) -> Result<serde_json::Value, serde_json::Value> {
        let answer = (self.shared.lock()).assign_by_hand(sales_order_number, domain, va);
        match answer.status {
            200 => Ok(answer.body),
            _ => Err(answer.body),
        }
    }

    /// What a person does in Cisco's portal: the order's `status` becomes
    /// `status` (e.g. `CANCELLED`); `false` when the simulator has no such
    /// order.
    pub fn set_order_status(&self, sales_order_number: &str, status: &str) -> bool {
        self.shared.lock().set_status(sales_order_number, status)
    }

    /// What a person does in Cisco's portal: the order's Smart Account hold
    /// is released by hand; `false` when no such hold was on.
    pub fn release_hold(&self, sales_order_number: &str) -> bool {
        self.shared.lock().release_by_hand(sales_order_number)
    }

    /// Forces the outcomes of the next calls of `endpoint`, in order.
    pub fn script(&self, endpoint: SimEndpoint, steps: &[Forced]) {
        self.shared.lock().script(endpoint, steps);
    }

    /// Replaces the fault knobs of `endpoint`.
    pub fn set_faults(&self, endpoint: SimEndpoint, faults: EndpointFaults) {
        self.shared.lock().set_faults(endpoint, faults);
    }

    /// Sets the status (`ACTIVE`, `PENDING`, `INACTIVE`) of the account
    /// with `domain`; false when there is none.
    pub fn set_account_status(&self, domain: &str, status: &str) -> bool {
        self.shared.lock().set_account_status(domain, status)
    }

    /// Forgets every issued token: the next API call of any client gets 401.
    pub fn revoke_tokens(&self) {
        self.shared.lock().revoke_tokens();
    }

    /// Rebuilds the world from `scenario` (validated), clearing the counters.
    pub fn reset(&self, scenario: Scenario) -> Result<(), SimError> {
        scenario.validate().map_err(|reason| SimError::Scenario {
            origin: "the given scenario".into(),
            reason,
        })?;
        *self.shared.lock() = World::new(scenario);
        Ok(())
    }

    /// Stops the server and waits (at most five seconds) for it to finish.
    pub async fn shutdown(mut self) -> Result<(), SimError> {
        self.cancel.cancel();
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(SimError::Serve(e.to_string())),
            Err(_) => Err(SimError::Serve("did not stop within 5 s".into())),
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
