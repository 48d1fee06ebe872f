//! `holdclear sim`: the commerce-API simulator as a process.
//!
//! Reads a scenario (the file named by `--scenario`, else
//! `deploy/config/sim-scenario.toml` when present, else the built-in copy of
//! it), applies the knob flags on top, and serves until ctrl-c or SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::UsageError;
use crate::config::{LogFormat, parse_duration};
use crate::sim::{Behaviour, HoldsField, Scenario, SimEndpoint};

/// Where the default scenario lives, relative to the working directory.
const DEFAULT_SCENARIO: &str = "deploy/config/sim-scenario.toml";

/// Arguments of `holdclear sim`. Knob flags override the scenario file;
/// the fault flags apply to the four API endpoints (not the token endpoint).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "HOLDCLEAR_SIM_ADDR", default_value = "127.0.0.1:8089")]
    pub addr: SocketAddr,
    /// Scenario file (TOML) [default: deploy/config/sim-scenario.toml, or a built-in copy of it].
    #[arg(long, value_name = "FILE")]
    pub scenario: Option<PathBuf>,
    /// Knobs over the scenario (boxed: they are many).
    #[command(flatten)]
    pub knobs: Box<Knobs>,
}

/// Behaviour knobs of `holdclear sim`, over the scenario's.
#[derive(Debug, clap::Args)]
pub struct Knobs {
    /// Lifetime of issued tokens, e.g. 5s.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub token_ttl: Option<Duration>,
    /// Share of API calls answered 503 CISCO_ERROR (0 to 1).
    #[arg(long, value_name = "RATE", value_parser = rate)]
    pub error_rate: Option<f64>,
    /// Share of API calls that hang (see --hang), then answer 504.
    #[arg(long, value_name = "RATE", value_parser = rate)]
    pub timeout_rate: Option<f64>,
    /// How long a timed-out call hangs, e.g. 30s.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub hang: Option<Duration>,
    /// Share of API calls that take effect and then lose their answer (502).
    #[arg(long, value_name = "RATE", value_parser = rate)]
    pub lost_response_rate: Option<f64>,
    /// Share of API calls that start a 429 burst lasting --retry-after.
    #[arg(long, value_name = "RATE", value_parser = rate)]
    pub throttle_rate: Option<f64>,
    /// Retry-After of 429 answers, in seconds.
    #[arg(long, value_name = "SECS")]
    pub retry_after: Option<u64>,
    /// Latency added to every API call, e.g. 20ms.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub latency: Option<Duration>,
    /// Server-side limit of API calls per second (429 beyond it).
    #[arg(long, value_name = "CALLS")]
    pub rate_limit: Option<f64>,
    /// Reads after an accepted assignment until the hold shows released (0: at once).
    #[arg(long, value_name = "N")]
    pub release_after_reads: Option<u32>,
    /// Time after an accepted assignment before the hold can show released.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub release_after: Option<Duration>,
    /// Orders created on the fly never release their hold.
    #[arg(long)]
    pub never_release: bool,
    /// Answers about orders created on the fly leave out `holds`.
    #[arg(long)]
    pub without_holds: bool,
    /// Token answers leave out `expires_in`.
    #[arg(long)]
    pub omit_expires_in: bool,
    /// Every answer carries fields the contract does not name.
    #[arg(long)]
    pub extra_fields: bool,
}

/// Runs `holdclear sim` until ctrl-c or SIGTERM.
pub async fn execute(args: Args) -> anyhow::Result<ExitCode> {
    crate::ops::logs::init(log_format(), "info");
    let (mut scenario, origin) = load_scenario(args.scenario.as_deref())?;
    apply_flags(&mut scenario, &args.knobs);
    scenario
        .validate()
        .map_err(|reason| UsageError(format!("invalid simulator settings: {reason}")))?;

    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    tracing::info!(
        addr = %addr,
        base_url = %format!("http://{addr}"),
        scenario = %origin,
        accounts = scenario.accounts.len(),
        orders = scenario.orders.len(),
        "Commerce-API simulator listening."
    );

    let cancel = CancellationToken::new();
    tokio::spawn(stop_on_signal(cancel.clone()));
    crate::sim::serve(listener, scenario, cancel).await?;
    tracing::info!("Commerce-API simulator stopped.");
    Ok(ExitCode::SUCCESS)
}

fn load_scenario(path: Option<&Path>) -> anyhow::Result<(Scenario, String)> {
    let (scenario, origin) = match path {
        Some(p) => (Scenario::load(p), p.display().to_string()),
        None if Path::new(DEFAULT_SCENARIO).exists() => (
            Scenario::load(Path::new(DEFAULT_SCENARIO)),
            DEFAULT_SCENARIO.to_owned(),
        ),
        None => (Scenario::demo(), format!("built-in {DEFAULT_SCENARIO}")),
    };
    let scenario = scenario.map_err(|e| UsageError(e.to_string()))?;
    Ok((scenario, origin))
}

fn apply_flags(s: &mut Scenario, a: &Knobs) {
    if let Some(ttl) = a.token_ttl {
        s.token_ttl = ttl;
    }
    if let Some(rate) = a.rate_limit {
        s.rate_limit = Some(rate);
    }
    if let Some(n) = a.release_after_reads {
        s.defaults.release_after_reads = n;
    }
    if let Some(d) = a.release_after {
        s.defaults.release_after = d;
    }
    if a.never_release {
        s.defaults.behaviour = Behaviour::NeverReleases;
    }
    if a.without_holds {
        s.defaults.holds_field = HoldsField::Missing;
    }
    s.omit_expires_in |= a.omit_expires_in;
    s.extra_fields |= a.extra_fields;
    for endpoint in SimEndpoint::API {
        let f = s.faults.get_mut(endpoint);
        if let Some(v) = a.error_rate {
            f.error_rate = v;
        }
        if let Some(v) = a.timeout_rate {
            f.timeout_rate = v;
        }
        if let Some(v) = a.hang {
            f.hang = v;
        }
        if let Some(v) = a.lost_response_rate {
            f.lost_response_rate = v;
        }
        if let Some(v) = a.throttle_rate {
            f.throttle_rate = v;
        }
        if let Some(v) = a.retry_after {
            f.retry_after_secs = v;
        }
        if let Some(v) = a.latency {
            f.latency = v;
        }
    }
}

/// Cancels on ctrl-c or SIGTERM.
async fn stop_on_signal(cancel: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot watch SIGTERM; stopping on ctrl-c only.");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("Shutdown requested.");
    cancel.cancel();
}

fn log_format() -> LogFormat {
    use std::io::IsTerminal;
    match std::env::var("HOLDCLEAR_LOG_FORMAT")
        .ok()
        .as_deref()
        .map(str::trim)
    {
        Some("json") => LogFormat::Json,
        Some("pretty") => LogFormat::Pretty,
        _ if std::io::stderr().is_terminal() => LogFormat::Pretty,
        _ => LogFormat::Json,
    }
}

fn duration(raw: &str) -> Result<Duration, String> {
    parse_duration(raw)
}

fn rate(raw: &str) -> Result<f64, String> {
    let v: f64 = raw
        .trim()
        .parse()
        .map_err(|_| format!("{raw:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{raw} is not between 0 and 1"))
    }
}
