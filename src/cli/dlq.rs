//! `holdclear dlq …`: the dead letters kept in PostgreSQL, for operators.
//!
//! `holdclear run` stores every message of the dead-letter queue in the
//! `dead_letters` table; these commands read and change that table, never
//! the queue: looking changes nothing. A replay is an operation with an id:
//! it can be resumed, and `dlq operation ID` says what became of each
//! message it sent.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::{Value, json};
use uuid::Uuid;

use super::UsageError;
use crate::broker::Broker;
use crate::broker::replay::{Replayer, SendError};
use crate::config::{Settings, parse_duration};
use crate::domain::dead_letter::cause_is_in_message;
use crate::store::{DeadLetterFilter, DeadLetterRecord, DeadLetterSummary, OperationItem, Store};

/// Subcommands of `holdclear dlq`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Dead letters, most recently seen first (archived ones are hidden).
    List {
        /// Which dead letters.
        #[command(flatten)]
        filter: FilterArgs,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Skip this many.
        #[arg(long, default_value_t = 0)]
        offset: i64,
        /// Archived ones too.
        #[arg(long)]
        archived: bool,
        /// Machine-readable output, one JSON array.
        #[arg(long)]
        json: bool,
    },
    /// The dead-letter queue itself: how many messages wait there, not yet
    /// stored by a worker (needs only RabbitMQ).
    Queue,
    /// One dead letter: headers, properties, body, detail, sightings, notes.
    Show {
        /// Its id.
        id: i64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Dead letters grouped by code and detail (ids and values masked).
    Groups {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Hide dead letters from lists; they stay stored (and are pruned after the retention).
    Archive {
        /// Their ids.
        ids: Vec<i64>,
        /// Every dead letter of this group.
        #[arg(long)]
        group: Option<String>,
    },
    /// Delete dead letters for good.
    Purge {
        /// These dead letters.
        ids: Vec<i64>,
        /// Archived dead letters archived longer ago than this (e.g. 7d) or before this time.
        #[arg(long, value_name = "DURATION|TIME")]
        archived_before: Option<String>,
        /// Every dead letter (required when nothing else says which).
        #[arg(long)]
        all: bool,
        /// Say what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Mark dead letters as taken by an operator.
    Claim {
        /// Their ids.
        ids: Vec<i64>,
        /// Every dead letter of this group.
        #[arg(long)]
        group: Option<String>,
        /// Who takes them.
        #[arg(long)]
        operator: String,
    },
    /// Add a note to a dead letter.
    Note {
        /// Its id.
        id: i64,
        /// The note.
        #[arg(long)]
        text: String,
        /// A ticket reference.
        #[arg(long)]
        ticket: Option<String>,
        /// Who writes it (default: $USER).
        #[arg(long)]
        operator: Option<String>,
    },
    /// Put dead letters back on their original exchange and routing key, as an operation.
    Replay(ReplayArgs),
    /// Replay operations, newest first.
    Operations {
        /// Show at most this many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// One operation: what became of each message it sent.
    Operation {
        /// Its id.
        id: Uuid,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Which dead letters.
#[derive(Debug, Default, clap::Args)]
pub struct FilterArgs {
    /// Only this error code, e.g. INVALID_EVENT.
    #[arg(long)]
    code: Option<String>,
    /// Only this group (see `dlq groups`).
    #[arg(long)]
    group: Option<String>,
    /// Only dead letters of this order (sales order number, web order id or event id).
    #[arg(long)]
    order: Option<String>,
    /// Last seen at or after (RFC 3339, or a duration ago: 2h).
    #[arg(long)]
    since: Option<String>,
    /// Last seen before (RFC 3339, or a duration ago).
    #[arg(long)]
    until: Option<String>,
    /// Detail, message id or body contains this text.
    #[arg(long)]
    text: Option<String>,
}

/// `dlq replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// These dead letters.
    ids: Vec<i64>,
    #[command(flatten)]
    filter: FilterArgs,
    /// Every dead letter (required when nothing else says which).
    #[arg(long)]
    all: bool,
    /// Continue an interrupted operation.
    #[arg(long, value_name = "OPERATION")]
    resume: Option<Uuid>,
    /// Say how many and which orders; send nothing.
    #[arg(long)]
    dry_run: bool,
    /// Messages sent per second, at most.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Messages per batch (progress is reported after each).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Replay even dead letters whose cause is the message itself (malformed, invalid, …).
    #[arg(long)]
    force: bool,
    /// Also replay dead letters that came from this exchange (by default
    /// only those from the configured orders exchange are sent).
    #[arg(long, value_name = "EXCHANGE")]
    to_exchange: Option<String>,
    /// Who runs it (default: $USER).
    #[arg(long)]
    operator: Option<String>,
    /// Machine-readable report.
    #[arg(long)]
    json: bool,
}

fn when(flag: &str, raw: &str) -> Result<DateTime<Utc>, UsageError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Ok(t.with_timezone(&Utc));
    }
    let d = parse_duration(raw).map_err(|e| UsageError(format!("{flag}: {e}")))?;
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| Utc::now().checked_sub_signed(d))
        .ok_or_else(|| UsageError(format!("{flag}: {raw} is too long ago")))
}

impl FilterArgs {
    fn filter(&self, ids: Vec<i64>) -> Result<DeadLetterFilter, UsageError> {
        Ok(DeadLetterFilter {
            ids,
            code: self.code.clone(),
            group: self.group.clone(),
            order: self.order.clone(),
            since: self
                .since
                .as_deref()
                .map(|s| when("--since", s))
                .transpose()?,
            until: self
                .until
                .as_deref()
                .map(|s| when("--until", s))
                .transpose()?,
            text: self.text.clone(),
            include_archived: false,
        })
    }

    fn is_empty(&self) -> bool {
        self.code.is_none()
            && self.group.is_none()
            && self.order.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && self.text.is_none()
    }
}

fn operator(given: Option<String>) -> String {
    given
        .or_else(|| std::env::var("USER").ok())
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Runs `holdclear dlq …`.
pub async fn execute(settings: Settings, cmd: Command) -> anyhow::Result<ExitCode> {
    super::quiet_logs();
    if let Command::Queue = cmd {
        let queue = &settings.amqp.topology.dead_letter_queue;
        let broker = Broker::from_settings(&settings.amqp, "holdclear-dlq");
        let conn = broker.connect("dlq").await?;
        let depth = crate::broker::dlq::depth(&conn, queue).await;
        crate::broker::close(&conn).await;
        let mut out = std::io::stdout().lock();
        match depth? {
            0 => writeln!(out, "{queue} is empty.")?,
            n => writeln!(
                out,
                "{n} message(s) wait in {queue}; `holdclear run` stores them (HOLDCLEAR_DLQ_INGEST)."
            )?,
        }
        return Ok(ExitCode::SUCCESS);
    }
    let store = super::open_store(&settings).await?;
    let mut out = std::io::stdout().lock();
    match cmd {
        Command::List {
            filter,
            limit,
            offset,
            archived,
            json,
        } => {
            let mut filter = filter.filter(Vec::new())?;
            filter.include_archived = archived;
            let rows = store
                .list_dead_letters(&filter, limit.max(0), offset.max(0))
                .await?;
            if json {
                serde_json::to_writer_pretty(&mut out, &rows)?;
                writeln!(out)?;
            } else if rows.is_empty() {
                writeln!(out, "No dead letters.")?;
            } else {
                writeln!(out, "{}", table(&rows))?;
                writeln!(out, "{} dead letter(s).", rows.len())?;
            }
        }
        Command::Show { id, json } => {
            let Some(letter) = store.dead_letter(id).await? else {
                return Err(UsageError(format!("no dead letter {id}")).into());
            };
            let sightings = store.dead_letter_sightings(id).await?;
            let notes = store.dead_letter_notes(id).await?;
            if json {
                let mut v = serde_json::to_value(&letter)?;
                v["body"] = json!(body_text(&letter.body));
                v["sightings"] = serde_json::to_value(&sightings)?;
                v["notes"] = serde_json::to_value(&notes)?;
                serde_json::to_writer_pretty(&mut out, &v)?;
                writeln!(out)?;
            } else {
                show(&mut out, &letter)?;
                writeln!(out, "sightings:")?;
                for s in &sightings {
                    writeln!(
                        out,
                        "  {}  {}  {}",
                        s.seen_at.to_rfc3339(),
                        s.code,
                        s.detail
                    )?;
                }
                if !notes.is_empty() {
                    writeln!(out, "notes:")?;
                    for n in &notes {
                        writeln!(
                            out,
                            "  {}  {}: {}{}",
                            n.written_at.to_rfc3339(),
                            n.operator,
                            n.text,
                            n.ticket
                                .as_ref()
                                .map(|t| format!(" [{t}]"))
                                .unwrap_or_default()
                        )?;
                    }
                }
            }
        }
        Command::Groups { json } => {
            let groups = store.dead_letter_groups().await?;
            if json {
                serde_json::to_writer_pretty(&mut out, &groups)?;
                writeln!(out)?;
            } else {
                print_groups(&mut out, &store).await?;
            }
        }
        Command::Archive { ids, group } => {
            let ids = chosen(&store, ids, group).await?;
            let n = store.archive_dead_letters(&ids).await?;
            writeln!(out, "{n} dead letter(s) archived.")?;
        }
        Command::Purge {
            ids,
            archived_before,
            all,
            dry_run,
        } => {
            let chosen = match (ids.is_empty(), archived_before, all) {
                (false, None, false) => ids,
                (true, Some(before), false) => {
                    store
                        .archived_before(when("--archived-before", &before)?, i64::MAX)
                        .await?
                }
                (true, None, true) => {
                    store
                        .dead_letter_ids(&DeadLetterFilter {
                            include_archived: true,
                            ..DeadLetterFilter::default()
                        })
                        .await?
                }
                (true, None, false) => {
                    return Err(UsageError(
                        "say which dead letters to purge: IDs, --archived-before or --all".into(),
                    )
                    .into());
                }
                _ => {
                    return Err(
                        UsageError("give one of IDs, --archived-before and --all".into()).into(),
                    );
                }
            };
            if dry_run {
                writeln!(out, "{} dead letter(s) would be purged.", chosen.len())?;
            } else {
                let n = store.delete_dead_letters(&chosen).await?;
                writeln!(out, "{n} dead letter(s) purged.")?;
            }
        }
        Command::Claim {
            ids,
            group,
            operator,
        } => {
            let ids = chosen(&store, ids, group).await?;
            let n = store.claim_dead_letters(&ids, &operator).await?;
            writeln!(out, "{n} dead letter(s) claimed by {operator}.")?;
        }
        Command::Note {
            id,
            text,
            ticket,
            operator: who,
        } => {
            let who = operator(who);
            if !store
                .note_dead_letter(id, &who, &text, ticket.as_deref())
                .await?
            {
                return Err(UsageError(format!("no dead letter {id}")).into());
            }
            writeln!(out, "Note added to dead letter {id}.")?;
        }
        Command::Queue => unreachable!("answered above"),
        Command::Replay(args) => {
            drop(out);
            return replay(&settings, &store, args).await;
        }
        Command::Operations { limit, json } => {
            let ops = store.operations(limit.max(0)).await?;
            if json {
                serde_json::to_writer_pretty(&mut out, &ops)?;
                writeln!(out)?;
            } else {
                let mut t = Table::new();
                t.load_preset(UTF8_FULL_CONDENSED).set_header([
                    "operation",
                    "kind",
                    "operator",
                    "status",
                    "started",
                    "finished",
                ]);
                for o in &ops {
                    t.add_row([
                        o.id.to_string(),
                        o.kind.clone(),
                        o.operator.clone(),
                        o.status.clone(),
                        o.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                        o.finished_at
                            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                            .unwrap_or_default(),
                    ]);
                }
                writeln!(out, "{t}")?;
            }
        }
        Command::Operation { id, json } => {
            drop(out);
            report(&store, id, json).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The dead letters named by id, or every one of a group.
async fn chosen(store: &Store, ids: Vec<i64>, group: Option<String>) -> anyhow::Result<Vec<i64>> {
    match (ids.is_empty(), group) {
        (false, None) => Ok(ids),
        (true, Some(group)) => Ok(store
            .dead_letter_ids(&DeadLetterFilter {
                group: Some(group),
                ..DeadLetterFilter::default()
            })
            .await?),
        _ => Err(UsageError("give dead letter IDs or --group GROUP (not both)".into()).into()),
    }
}

/// Prints the groups as a table (also the end of `holdclear demo`).
pub async fn print_groups(out: &mut impl Write, store: &Store) -> anyhow::Result<()> {
    let groups = store.dead_letter_groups().await?;
    if groups.is_empty() {
        writeln!(out, "No dead letters.")?;
        return Ok(());
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        "group",
        "code",
        "detail",
        "count",
        "first seen",
        "last seen",
        "last hour",
        "trend",
    ]);
    for g in &groups {
        t.add_row([
            g.group.clone(),
            g.code.clone(),
            g.signature.clone(),
            g.count.to_string(),
            g.first_seen.format("%Y-%m-%d %H:%M:%S").to_string(),
            g.last_seen.format("%Y-%m-%d %H:%M:%S").to_string(),
            format!("{} (hour before: {})", g.last_hour, g.hour_before),
            if g.growing { "growing" } else { "" }.to_owned(),
        ]);
    }
    writeln!(out, "{t}")?;
    Ok(())
}

fn table(rows: &[DeadLetterSummary]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        "id",
        "code",
        "detail",
        "order",
        "message id",
        "group",
        "seen",
        "last seen",
        "claimed by",
    ]);
    for l in rows {
        t.add_row([
            l.id.to_string(),
            l.code.clone(),
            l.detail.clone(),
            l.sales_order_number
                .clone()
                .or_else(|| l.web_order_id.clone())
                .unwrap_or_default(),
            l.message_id.clone().unwrap_or_default(),
            l.group.clone(),
            l.seen_count.to_string(),
            l.last_seen.format("%Y-%m-%d %H:%M:%S").to_string(),
            l.claimed_by.clone().unwrap_or_default(),
        ]);
    }
    t
}

/// The body for a reader: pretty JSON, else the text with control
/// characters escaped, else (not UTF-8) hex.
pub fn body_text(body: &[u8]) -> String {
    match std::str::from_utf8(body) {
        Ok(text) => match serde_json::from_str::<Value>(text) {
            Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_else(|_| text.to_owned()),
            Err(_) => text.escape_debug().to_string(),
        },
        Err(_) => format!(
            "(not UTF-8, {} bytes, hex) {}",
            body.len(),
            hex::encode(body)
        ),
    }
}

fn show(out: &mut impl Write, l: &DeadLetterRecord) -> std::io::Result<()> {
    let s = &l.summary;
    writeln!(out, "dead letter {}", s.id)?;
    writeln!(out, "code:        {}", s.code)?;
    writeln!(out, "detail:      {}", s.detail)?;
    writeln!(out, "group:       {}", s.group)?;
    writeln!(
        out,
        "message id:  {}",
        s.message_id.as_deref().unwrap_or("(none)")
    )?;
    writeln!(
        out,
        "order:       sales order {} / web order {} / event {}",
        s.sales_order_number.as_deref().unwrap_or("-"),
        s.web_order_id.as_deref().unwrap_or("-"),
        s.event_id.as_deref().unwrap_or("-")
    )?;
    writeln!(
        out,
        "origin:      {} / {}",
        s.origin_exchange.as_deref().unwrap_or("-"),
        s.origin_routing_key.as_deref().unwrap_or("-")
    )?;
    writeln!(
        out,
        "seen:        {} time(s), first {}, last {}",
        s.seen_count,
        s.first_seen.to_rfc3339(),
        s.last_seen.to_rfc3339()
    )?;
    if let Some(by) = &s.claimed_by {
        writeln!(out, "claimed by:  {by}")?;
    }
    if let Some(at) = s.archived_at {
        writeln!(out, "archived:    {}", at.to_rfc3339())?;
    }
    writeln!(
        out,
        "properties:  {}",
        serde_json::to_string_pretty(&l.properties).unwrap_or_default()
    )?;
    writeln!(
        out,
        "headers:     {}",
        serde_json::to_string_pretty(&l.headers).unwrap_or_default()
    )?;
    writeln!(out, "body ({} bytes):", s.body_bytes)?;
    writeln!(out, "{}", body_text(&l.body))
}

/// The options of a replay, kept in the operation's selection for `--resume`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ReplayOptions {
    filter: DeadLetterFilter,
    rate: f64,
    batch: usize,
    force: bool,
    to_exchange: Option<String>,
}

async fn replay(settings: &Settings, store: &Store, args: ReplayArgs) -> anyhow::Result<ExitCode> {
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        return Err(UsageError("--rate must be greater than 0".into()).into());
    }
    let mut out = std::io::stdout().lock();
    let (operation, options) = match args.resume {
        Some(id) => {
            let Some(op) = store.operation(id).await? else {
                return Err(UsageError(format!("no operation {id}")).into());
            };
            if op.status == "done" {
                writeln!(out, "Operation {id} is done; nothing to resume.")?;
                return Ok(ExitCode::SUCCESS);
            }
            let options: ReplayOptions = serde_json::from_value(op.selection.clone())?;
            store.set_operation_status(id, "running").await?;
            (id, options)
        }
        None => {
            if args.ids.is_empty() && args.filter.is_empty() && !args.all {
                return Err(UsageError(
                    "say which dead letters to replay: IDs, --group, --code, --order, --text, --since/--until or --all"
                        .into(),
                )
                .into());
            }
            let filter = args.filter.filter(args.ids.clone())?;
            let ids = store.dead_letter_ids(&filter).await?;
            let mut chosen = Vec::new();
            let mut refused = Vec::new();
            let mut orders = Vec::new();
            for id in ids {
                let Some(l) = store.dead_letter(id).await? else {
                    continue;
                };
                if cause_is_in_message(&l.summary.code) && !args.force {
                    refused.push(l.summary);
                } else {
                    if let Some(o) = l
                        .summary
                        .sales_order_number
                        .clone()
                        .or(l.summary.web_order_id.clone())
                    {
                        orders.push(o);
                    }
                    chosen.push(id);
                }
            }
            for l in &refused {
                writeln!(
                    out,
                    "refused: dead letter {} ({}): its cause is the message itself and is unchanged; fix it upstream, or add --force",
                    l.id, l.code
                )?;
            }
            if args.dry_run {
                writeln!(
                    out,
                    "{} dead letter(s) would be replayed; {} refused. Orders: {}",
                    chosen.len(),
                    refused.len(),
                    if orders.is_empty() {
                        "-".to_owned()
                    } else {
                        orders.join(", ")
                    }
                )?;
                return Ok(ExitCode::SUCCESS);
            }
            if chosen.is_empty() {
                writeln!(out, "Nothing to replay.")?;
                return Ok(if refused.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            let options = ReplayOptions {
                filter,
                rate: args.rate,
                batch: args.batch.max(1),
                force: args.force,
                to_exchange: args.to_exchange.clone(),
            };
            let id = store
                .create_operation(
                    "replay",
                    &operator(args.operator.clone()),
                    &serde_json::to_value(&options)?,
                    &chosen,
                )
                .await?;
            (id, options)
        }
    };
    writeln!(out, "Operation {operation}.")?;
    out.flush()?;
    let todo = store.operation_todo(operation).await?;
    let broker = Broker::from_settings(&settings.amqp, "holdclear-dlq");
    let mut replayer = Replayer::open(&broker, settings.amqp.confirm_timeout).await?;
    let orders_exchange = &settings.amqp.topology.orders_exchange;
    let pause = Duration::from_secs_f64(1.0 / options.rate);
    let mut next_slot = tokio::time::Instant::now();
    let mut interrupted = false;
    let mut broken = None;
    'batches: for (n, batch) in todo.chunks(options.batch).enumerate() {
        for &id in batch {
            tokio::select! {
                () = tokio::time::sleep_until(next_slot) => {}
                _ = tokio::signal::ctrl_c() => { interrupted = true; break 'batches; }
            }
            next_slot = tokio::time::Instant::now() + pause;
            let Some(l) = store.dead_letter(id).await? else {
                store
                    .settle_operation_item(operation, id, Some("the dead letter was purged"))
                    .await?;
                continue;
            };
            // Only to the configured orders exchange, or to the one the
            // operator named with --to-exchange.
            let exchange = match &l.summary.origin_exchange {
                Some(origin)
                    if origin == orders_exchange
                        || options.to_exchange.as_deref() == Some(origin.as_str()) =>
                {
                    origin.clone()
                }
                origin => {
                    let origin = origin.as_deref().unwrap_or("");
                    let reason = format!(
                        "it came from exchange '{origin}', not the configured orders exchange '{orders_exchange}'; replay it with --to-exchange {origin}"
                    );
                    store
                        .settle_operation_item(operation, id, Some(&reason))
                        .await?;
                    continue;
                }
            };
            let routing_key = l
                .summary
                .origin_routing_key
                .clone()
                .unwrap_or_else(|| settings.amqp.topology.held_routing_key.clone());
            match replayer
                .send(&exchange, &routing_key, &l.body, &l.raw_properties)
                .await
            {
                Ok(()) => store.settle_operation_item(operation, id, None).await?,
                Err(SendError::Broker(e)) => {
                    broken = Some(e);
                    break 'batches;
                }
                Err(e) => {
                    store
                        .settle_operation_item(operation, id, Some(&e.to_string()))
                        .await?
                }
            }
        }
        if !args.json {
            writeln!(out, "batch {} sent.", n + 1)?;
            out.flush()?;
        }
    }
    replayer.close().await;
    if interrupted || broken.is_some() {
        store.set_operation_status(operation, "interrupted").await?;
        writeln!(
            out,
            "Operation {operation} interrupted; continue it with `holdclear dlq replay --resume {operation}`."
        )?;
        if let Some(e) = broken {
            return Err(e.into());
        }
        return Ok(ExitCode::FAILURE);
    }
    store.set_operation_status(operation, "done").await?;
    drop(out);
    let failed = report(store, operation, args.json).await?;
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Prints an operation's report; returns how many items could not be sent.
pub async fn report(store: &Store, id: Uuid, json: bool) -> anyhow::Result<usize> {
    report_to(&mut std::io::stdout().lock(), store, id, json).await
}

/// Writes an operation's report to `out`; returns how many items could not be sent.
pub async fn report_to(
    out: &mut impl Write,
    store: &Store,
    id: Uuid,
    json: bool,
) -> anyhow::Result<usize> {
    let Some(op) = store.operation(id).await? else {
        return Err(UsageError(format!("no operation {id}")).into());
    };
    let items = store.operation_items(id).await?;
    let count = |what: &str| items.iter().filter(|i| i.outcome() == what).count();
    let summary = json!({
        "sent": items.iter().filter(|i| i.sent_at.is_some()).count(),
        "became_cases": count("became a case"),
        "failed_again": count("failed again"),
        "pending": count("pending"),
        "send_failed": count("send failed"),
        "not_sent": count("not sent"),
    });
    if json {
        let v = json!({"operation": op, "summary": summary, "items": items.iter().map(item_json).collect::<Vec<_>>()});
        serde_json::to_writer_pretty(&mut *out, &v)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "operation {} ({}, by {}, {})",
            op.id, op.kind, op.operator, op.status
        )?;
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED).set_header([
            "dead letter",
            "order",
            "sent at",
            "outcome",
            "case / reason",
        ]);
        for i in &items {
            t.add_row([
                i.dead_letter_id.to_string(),
                i.order.clone().unwrap_or_default(),
                i.sent_at
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_default(),
                i.outcome().to_owned(),
                i.case_id
                    .map(|c| c.to_string())
                    .or(i.error.clone())
                    .unwrap_or_default(),
            ]);
        }
        writeln!(out, "{t}")?;
        writeln!(
            out,
            "sent {}; became cases {}; failed again {}; still pending {}; could not be sent {}.",
            summary["sent"],
            summary["became_cases"],
            summary["failed_again"],
            summary["pending"],
            summary["send_failed"]
        )?;
    }
    Ok(count("send failed"))
}

fn item_json(i: &OperationItem) -> Value {
    let mut v = serde_json::to_value(i).unwrap_or(Value::Null);
    v["outcome"] = json!(i.outcome());
    v
}
