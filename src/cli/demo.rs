//! `holdclear demo`: the whole loop on one machine, ending in a summary.
//!
//! It starts the commerce-API simulator and a worker in this process, on a
//! database and exchange/queue names of its own (so it never touches a real
//! setup), publishes a mix of held orders and one malformed message, follows
//! the events the worker emits, prints a table, and removes what it created.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use chrono::Utc;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Broker, OutgoingMessage, Publisher, Subscription, declare_topology};
use crate::config::{EscalationThreshold, Settings, Topology};
use crate::domain::EscalationLevel;
use crate::sim::{Scenario, SimServer};
use crate::worker::Worker;

/// The rules the demo runs with: the shipped example file, and
/// [`AMBIGUOUS_RULE`] after it.
const DEMO_RULES: &str = include_str!("../../deploy/config/rules.toml");

/// A rule of the demo's own: the account by name, and the simulator's
/// scenario has two ACTIVE accounts of that name. It comes after the
/// shipped rules, so it decides only orders they leave (no end-customer
/// e-mail).
const AMBIGUOUS_RULE: &str = r#"
# holdclear demo: partner P-300's orders go to the account named "Umbrella
# Corporation". The simulator has two ACTIVE accounts of that name, so the
# worker escalates AMBIGUOUS_MATCH instead of picking one.
[[rule]]
name = "umbrella-by-name"
[rule.when]
partner_id = ["P-300"]
[rule.assign]
smart_account = { name = "Umbrella Corporation" }
account_type = "CUSTOMER"
"#;

/// Arguments of `holdclear demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Give up waiting for the outcomes after this long.
    #[arg(long, default_value = "60s")]
    pub timeout: String,
    /// Then keep the worker and the simulator running and serve the
    /// operators' console on HOLDCLEAR_CONSOLE_ADDR: its address and a
    /// sign-in token are printed; ctrl-c ends the demo.
    #[arg(long)]
    pub console: bool,
}

/// One held order of the demo and what the reader should expect of it.
struct Order {
    number: &'static str,
    story: &'static str,
    data: Value,
}

fn orders() -> Vec<Order> {
    let held = |number: &str, email: Option<&str>, partner: Option<&str>| {
        let mut data = json!({
            "salesOrderNumber": number,
            "holdReason": "NO_SMART_ACCOUNT",
            "heldAt": Utc::now().to_rfc3339(),
            "orderType": "STANDARD",
            "endCustomer": {"name": "Customer", "country": "US"},
            "lines": [{"lineNumber": "1.1", "sku": "C9300-48P-E", "productFamily": "C9300"}],
        });
        if let Some(e) = email {
            data["endCustomer"]["email"] = e.into();
        }
        if let Some(p) = partner {
            data["partner"] = json!({"id": p, "name": "Globex Networks"});
        }
        data
    };
    let mut umbrella = held("104233883", None, Some("P-300"));
    umbrella["partner"]["name"] = "Umbrella Resellers".into();
    let mut pending = held("104233872", Some("it@initech.com"), Some("P-100"));
    pending["holdReason"] = "PENDING_SMART_ACCOUNT".into();
    pending["smartAccount"] = json!({"domain": "initech.com", "status": "PENDING"});
    vec![
        Order {
            number: "104233871",
            story: "customer account, released",
            data: held("104233871", Some("it-admin@acme.com"), None),
        },
        Order {
            number: "104233872",
            story: "pending account, holding fallback",
            data: pending,
        },
        Order {
            number: "104233873",
            story: "hold that persists",
            data: held("104233873", Some("buyer@acme.com"), None),
        },
        Order {
            number: "104233876",
            story: "order locked for assignment",
            data: held("104233876", Some("ops@eu.acme.com"), None),
        },
        Order {
            number: "104233880",
            story: "no rule covers it",
            data: held("104233880", None, None),
        },
        Order {
            number: "104233881",
            story: "account does not exist",
            data: held("104233881", Some("cto@unknown-co.example"), None),
        },
        Order {
            number: "104233882",
            story: "account deactivated",
            data: held("104233882", Some("admin@hooli.com"), None),
        },
        Order {
            number: "104233883",
            story: "account name matches two accounts",
            data: umbrella,
        },
    ]
}

fn envelope(number: &str, data: &Value) -> Value {
    json!({
        "specversion": "1.0",
        "type": "commerce.order.held.v1",
        "source": "/commerce/orders",
        "id": format!("demo-{number}-{}", uuid::Uuid::new_v4()),
        "time": Utc::now().to_rfc3339(),
        "datacontenttype": "application/json",
        "data": data,
    })
}

/// What the events said about one order.
#[derive(Default)]
struct Outcome {
    rule: Option<String>,
    account: Option<String>,
    result: Option<String>,
    held_seconds: Option<f64>,
}

/// Runs `holdclear demo`.
pub async fn execute(base: Settings, args: Args) -> anyhow::Result<ExitCode> {
    // The table tells the story; logs only for errors an operator must see
    // (RUST_LOG still wins). lapin reports the demo's own closing channels.
    crate::ops::logs::init(crate::config::LogFormat::Pretty, "off,holdclear=error");
    let timeout = crate::config::parse_duration(&args.timeout)
        .map_err(|e| super::UsageError(format!("--timeout: {e}")))?;
    // From here on ctrl-c and SIGTERM end the demo through its clean-up.
    let stop = super::interrupted();
    tokio::pin!(stop);
    let super::ScratchRun {
        run,
        database_url,
        topology,
    } = super::ScratchRun::new(&base, "demo")?;
    let rules_path = std::env::temp_dir().join(format!("holdclear-demo-{run}-rules.toml"));
    std::fs::write(&rules_path, format!("{DEMO_RULES}{AMBIGUOUS_RULE}"))?;

    let sim = SimServer::start(([127, 0, 0, 1], 0).into(), Scenario::demo()?).await?;
    let mut settings = base.clone();
    settings.database_url = database_url.clone();
    settings.database_max_connections = 8;
    settings.amqp.topology = topology.clone();
    settings.rules_path = rules_path.clone();
    settings.commerce.base_url = sim.base_url().parse()?;
    settings.commerce.token_url = sim.token_url().parse()?;
    settings.commerce.client_id = crate::config::DEMO_CLIENT_ID.into();
    settings.commerce.client_secret = crate::config::Secret::new(crate::config::DEMO_CLIENT_SECRET);
    settings.commerce.rate_limit = 200.0;
    settings.http_addr = ([127, 0, 0, 1], 0).into();
    settings.shutdown_timeout = Duration::from_secs(5);
    settings.engine.poll_interval = Duration::from_millis(300);
    settings.engine.poll_max_interval = Duration::from_secs(1);
    settings.engine.escalation = vec![EscalationThreshold {
        after: Duration::from_secs(3),
        level: EscalationLevel::Warning,
    }];
    settings.engine.retry.initial = Duration::from_millis(100);
    settings.engine.retry.max_interval = Duration::from_secs(1);
    settings.engine.retry.max_elapsed = Duration::from_secs(10);
    settings.engine.idle_poll = Duration::from_millis(200);
    settings.amqp.dead_letter_ingest = true;

    let mut err = std::io::stderr();
    writeln!(
        err,
        "holdclear demo: simulator on {}, database {}, exchanges and queues prefixed holdclear-demo-{run}.",
        sim.base_url(),
        database_url
    )?;

    let cancel = CancellationToken::new();
    let worker = Worker::start(settings.clone(), cancel.clone()).await?;
    // Stopped half-way (ctrl-c, SIGTERM), it still removes what it made.
    let mut result = tokio::select! {
        r = drive(&settings, &topology, timeout) => r,
        () = &mut stop => Err(anyhow::anyhow!("interrupted")),
    };
    let printed = args.console && result.is_ok();
    if printed {
        result = console_after(result, &settings, stop).await;
    }

    worker.shutdown().await.ok();
    // Its last words: `holdclear rules stats` of the run, read before the
    // database goes.
    let stats = super::rules::StatsReport::of_run(&settings).await;
    sim.shutdown().await.ok();
    let broker = Broker::from_settings(&settings.amqp, format!("holdclear demo {run} cleanup"));
    if let Ok(conn) = broker.connect("cleanup").await {
        broker::delete_topology(&conn, &topology).await.ok();
        broker::close(&conn).await;
    }
    crate::store::drop_database(&database_url, settings.database_tls_ca.as_ref())
        .await
        .ok();
    std::fs::remove_file(&rules_path).ok();

    let (table, dead_letters, complete) = result?;
    let mut out = std::io::stdout().lock();
    if !printed {
        writeln!(out, "{table}")?;
        writeln!(out, "{dead_letters}")?;
    }
    drop(out);
    match &stats {
        Ok((report, window)) => {
            println!("Rules (holdclear rules stats --since 24h)");
            report.print(window);
        }
        Err(e) => println!("Rules: cannot count the decisions: {e:#}"),
    }
    let mut out = std::io::stdout().lock();
    if complete {
        Ok(ExitCode::SUCCESS)
    } else {
        writeln!(out, "Timed out before every order had an outcome.")?;
        Ok(ExitCode::FAILURE)
    }
}

/// Prints the demo's outcome, then serves the console until ctrl-c (or
/// SIGTERM).
async fn console_after(
    result: anyhow::Result<(Table, String, bool)>,
    settings: &Settings,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<(Table, String, bool)> {
    let (table, dead_letters, complete) = result?;
    println!("{table}\n{dead_letters}");
    console_until_stopped(settings.clone(), stop).await?;
    Ok((table, dead_letters, complete))
}

/// Serves the console over the demo's database and broker until `stop`
/// (ctrl-c or SIGTERM);
/// without a configured credential, with a sign-in token made for this run
/// (printed: it opens only this demo's console, which ends with it).
async fn console_until_stopped(
    mut settings: Settings,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use crate::config::{ConsoleToken, Role, Secret};
    let c = &mut settings.console;
    let token = if c.tokens.is_empty() && c.trusted_header.is_none() {
        let token = uuid::Uuid::new_v4().simple().to_string();
        c.tokens.push(ConsoleToken {
            user: "demo".into(),
            role: Role::Operator,
            token: Secret::new(token.clone()),
        });
        Some(token)
    } else {
        None
    };
    let store =
        crate::store::Store::connect(&settings.database_url, settings.database_tls_ca.as_ref(), 4)
            .await?;
    let handle = crate::console::start(settings, store, CancellationToken::new()).await?;
    let sign_in = match token {
        Some(t) => format!("sign in with the demo token {t}"),
        None => "sign in with a token of HOLDCLEAR_CONSOLE_OPERATOR_TOKENS".to_owned(),
    };
    println!(
        "The console is on http://{}/ : {sign_in}. The worker and the simulator keep running; ctrl-c ends the demo.",
        handle.addr
    );
    std::io::stdout().flush()?;
    stop.await;
    handle.shutdown().await?;
    Ok(())
}

async fn drive(
    settings: &Settings,
    topology: &Topology,
    timeout: Duration,
) -> anyhow::Result<(Table, String, bool)> {
    let broker = Broker::from_settings(&settings.amqp, "holdclear demo");
    let conn = broker.connect("publisher").await?;
    let publisher = Publisher::open(&conn).await?;
    declare_topology(&broker, &conn, topology, settings.amqp.delivery_limit).await?;
    let mut events = Subscription::open(&conn, &topology.events_exchange, "#").await?;

    let orders = orders();
    let mut messages: Vec<OutgoingMessage> = orders
        .iter()
        .map(|o| {
            let env = envelope(o.number, &o.data);
            OutgoingMessage {
                routing_key: topology.held_routing_key.clone(),
                message_id: env["id"].as_str().unwrap_or_default().to_owned(),
                content_type: "application/cloudevents+json".into(),
                body: env.to_string().into_bytes(),
                timestamp: Some(Utc::now().timestamp() as u64),
                headers: vec![],
            }
        })
        .collect();
    messages.push(OutgoingMessage {
        routing_key: topology.held_routing_key.clone(),
        message_id: "demo-malformed".into(),
        content_type: "application/cloudevents+json".into(),
        body: br#"{"specversion": "1.0", "type": "commerce.order.held.v1", "id": "x", "data": {"#
            .to_vec(),
        timestamp: None,
        headers: vec![],
    });
    for r in publisher
        .publish_all(&topology.orders_exchange, &messages)
        .await
    {
        r?;
    }

    let bar = ProgressBar::new(orders.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {pos}/{len} held orders have an outcome {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let started = Instant::now();
    let mut outcomes: BTreeMap<String, Outcome> = BTreeMap::new();
    let done = |o: &BTreeMap<String, Outcome>| o.values().filter(|x| x.result.is_some()).count();
    while done(&outcomes) < orders.len() {
        let Some(left) = timeout.checked_sub(started.elapsed()) else {
            break;
        };
        let Ok(Some(msg)) = tokio::time::timeout(left, events.next()).await else {
            break;
        };
        let msg = msg?;
        let event: Value = serde_json::from_slice(&msg.body)?;
        let data = &event["data"];
        let Some(number) = data["salesOrderNumber"].as_str() else {
            continue;
        };
        let o = outcomes.entry(number.to_owned()).or_default();
        let text = |k: &str| data[k].as_str().map(str::to_owned);
        match msg.routing_key.as_str() {
            "order.smart_account_assigned" => {
                o.rule = text("rule");
                o.account = Some(format!(
                    "{} ({}, {})",
                    text("smartAccountDomain").unwrap_or_default(),
                    text("accountType").unwrap_or_default(),
                    text("virtualAccountName").unwrap_or_default()
                ));
            }
            "order.hold_released" => {
                o.rule = o.rule.take().or_else(|| text("rule"));
                o.held_seconds = data["heldSeconds"].as_f64();
                let others = data["otherHolds"]
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .map(|a| {
                        let codes: Vec<&str> = a.iter().filter_map(Value::as_str).collect();
                        format!(" (still on: {})", codes.join(", "))
                    })
                    .unwrap_or_default();
                o.result = Some(format!("released{others}"));
            }
            "order.hold_escalated" => {
                o.rule = o.rule.take().or_else(|| text("rule"));
                o.held_seconds = data["heldSeconds"].as_f64();
                let reason = text("reason").unwrap_or_default();
                let level = text("level").unwrap_or_default();
                o.result = Some(if reason == "HOLD_PERSISTS" {
                    format!("escalated {reason} ({level}), still watched")
                } else {
                    format!("escalated {reason} ({level})")
                });
            }
            _ => {}
        }
        bar.set_position(done(&outcomes) as u64);
    }
    bar.finish_and_clear();
    let complete = done(&outcomes) == orders.len();

    let dead_letters = dead_letters_story(settings).await?;
    broker::close(&conn).await;

    // Escalation events carry no rule; the case does.
    let store =
        crate::store::Store::connect(&settings.database_url, settings.database_tls_ca.as_ref(), 2)
            .await?;
    let cases = store
        .list_cases(&crate::store::CaseFilter {
            state: None,
            order: None,
            limit: 1000,
        })
        .await?;
    for case in cases {
        let o = outcomes.entry(case.order.clone()).or_default();
        if o.rule.is_none() {
            o.rule = case.rule;
        }
    }
    store.pool().close().await;

    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "order",
        "situation",
        "rule",
        "account assigned",
        "outcome",
        "time held",
    ]);
    for order in &orders {
        let o = outcomes.remove(order.number).unwrap_or_default();
        table.add_row([
            order.number.to_owned(),
            order.story.to_owned(),
            o.rule.unwrap_or_else(|| "-".into()),
            o.account.unwrap_or_else(|| "-".into()),
            o.result.unwrap_or_else(|| "(no outcome yet)".into()),
            o.held_seconds
                .map(|s| format!("{s:.1}s"))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    Ok((table, dead_letters, complete))
}

/// The dead letters as an operator meets them: the groups, then a replay
/// operation (forced: the malformed message is sent back as it is, and so
/// fails again) and its report.
async fn dead_letters_story(settings: &Settings) -> anyhow::Result<String> {
    let store =
        crate::store::Store::connect(&settings.database_url, settings.database_tls_ca.as_ref(), 2)
            .await?;
    let all = crate::store::DeadLetterFilter::default();
    let started = Instant::now();
    let mut ids = Vec::new();
    while ids.is_empty() && started.elapsed() < Duration::from_secs(10) {
        ids = store.dead_letter_ids(&all).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut text = Vec::new();
    writeln!(text, "Dead letters (holdclear dlq groups):")?;
    super::dlq::print_groups(&mut text, &store).await?;
    if ids.is_empty() {
        writeln!(text, "(the malformed message was not refused?)")?;
        store.pool().close().await;
        return Ok(String::from_utf8_lossy(&text).into_owned());
    }
    let options = crate::operations::replay::ReplayOptions {
        filter: crate::store::DeadLetterFilter {
            ids,
            ..crate::store::DeadLetterFilter::default()
        },
        rate: 1000.0,
        batch: 100,
        force: true,
        to_exchange: None,
    };
    let preview = crate::operations::replay::preview(&store, &options).await?;
    let operation =
        crate::operations::replay::start(&store, "holdclear demo", &options, &preview).await?;
    crate::operations::replay::Run {
        store: &store,
        amqp: &settings.amqp,
        operation,
        options: &options,
        stop: tokio_util::sync::CancellationToken::new(),
    }
    .execute(|_| {})
    .await?;
    // Wait (briefly) until every sent message has an outcome.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        let items = store.operation_items(operation).await?;
        if items.iter().all(|i| i.outcome() != "pending") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writeln!(
        text,
        "A replay (holdclear dlq replay --all --force; the body is unchanged, so it fails again):"
    )?;
    super::dlq::report_to(&mut text, &store, operation, false).await?;
    store.pool().close().await;
    Ok(String::from_utf8_lossy(&text).into_owned())
}
