//! `holdclear dlq …`: the dead letters kept in PostgreSQL, for operators.
//!
//! `holdclear run` stores every message of the dead-letter queue in the
//! `dead_letters` table; these commands read and change that table, never
//! the queue: looking changes nothing. A replay is an operation with an id:
//! it can be resumed, and `dlq operation ID` says what became of each
//! message it sent.

use std::io::Write;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::{Value, json};
use uuid::Uuid;

use tokio_util::sync::CancellationToken;

use super::UsageError;
use crate::broker::Broker;
use crate::config::{Settings, parse_duration};
use crate::domain::dead_letter::body_text;
use crate::operations::replay::{self, Ending, Preview, ReplayOptions};
use crate::operations::{OperationError, actions, operator_name};
use crate::store::{
    DeadLetterFilter, DeadLetterRecord, DeadLetterSummary, Operation, OperationItem, Store,
};

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
}

fn operator(given: Option<String>) -> String {
    operator_name(given.or_else(|| std::env::var("USER").ok()).as_deref())
}

/// A library error as the command says it: the operator's mistakes exit 64.
pub(crate) fn refused(e: OperationError) -> anyhow::Error {
    match e {
        OperationError::Refused(m) | OperationError::NotFound(m) => UsageError(m).into(),
        e => e.into(),
    }
}

/// Runs `holdclear dlq …`.
pub async fn execute(settings: Settings, cmd: Command) -> anyhow::Result<ExitCode> {
    super::quiet_logs();
    if let Command::Queue = cmd {
        return queue(&settings).await;
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
            let rows = (store.list_dead_letters(&filter, limit.max(0), offset.max(0))).await?;
            list(&mut out, &rows, json)?;
        }
        Command::Show { id, json } => show_one(&mut out, &store, id, json).await?,
        Command::Groups { json } => {
            if json {
                print_json(&mut out, &store.dead_letter_groups().await?)?;
            } else {
                print_groups(&mut out, &store).await?;
            }
        }
        Command::Archive { ids, group } => {
            let ids = actions::chosen(&store, ids, group).await.map_err(refused)?;
            let who = operator(None);
            let done = actions::archive(&store, &who, &ids).await?;
            writeln!(out, "{} dead letter(s) archived.", done.changed)?;
        }
        Command::Purge {
            ids,
            archived_before,
            all,
            dry_run,
        } => purge(&mut out, &store, ids, archived_before, all, dry_run).await?,
        Command::Claim {
            ids,
            group,
            operator,
        } => {
            let ids = actions::chosen(&store, ids, group).await.map_err(refused)?;
            let done = actions::claim(&store, &operator, &ids).await?;
            writeln!(
                out,
                "{} dead letter(s) claimed by {operator}.",
                done.changed
            )?;
        }
        Command::Note {
            id,
            text,
            ticket,
            operator: who,
        } => {
            actions::note(&store, &operator(who), id, &text, ticket.as_deref())
                .await
                .map_err(refused)?;
            writeln!(out, "Note added to dead letter {id}.")?;
        }
        Command::Queue => unreachable!("answered above"),
        Command::Replay(args) => {
            drop(out);
            return replay(&settings, &store, args).await;
        }
        Command::Operations { limit, json } => {
            operations(&mut out, &store.operations(limit.max(0)).await?, json)?
        }
        Command::Operation { id, json } => {
            drop(out);
            report(&store, id, json).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_json(out: &mut impl Write, v: &impl serde::Serialize) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, v)?;
    writeln!(out)?;
    Ok(())
}

/// `dlq queue`: the depth of the dead-letter queue itself.
async fn queue(settings: &Settings) -> anyhow::Result<ExitCode> {
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
    Ok(ExitCode::SUCCESS)
}

fn list(out: &mut impl Write, rows: &[DeadLetterSummary], json: bool) -> anyhow::Result<()> {
    if json {
        print_json(out, &rows)?;
    } else if rows.is_empty() {
        writeln!(out, "No dead letters.")?;
    } else {
        writeln!(out, "{}", table(rows))?;
        writeln!(out, "{} dead letter(s).", rows.len())?;
    }
    Ok(())
}

/// `dlq show ID`.
async fn show_one(out: &mut impl Write, store: &Store, id: i64, json: bool) -> anyhow::Result<()> {
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
        return print_json(out, &v);
    }
    show(out, &letter)?;
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
            let ticket = n.ticket.as_ref().map(|t| format!(" [{t}]"));
            writeln!(
                out,
                "  {}  {}: {}{}",
                n.written_at.to_rfc3339(),
                n.operator,
                n.text,
                ticket.unwrap_or_default()
            )?;
        }
    }
    Ok(())
}

/// `dlq purge`.
async fn purge(
    out: &mut impl Write,
    store: &Store,
    ids: Vec<i64>,
    archived_before: Option<String>,
    all: bool,
    dry_run: bool,
) -> anyhow::Result<()> {
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
            return Err(UsageError("give one of IDs, --archived-before and --all".into()).into());
        }
    };
    if dry_run {
        writeln!(out, "{} dead letter(s) would be purged.", chosen.len())?;
    } else {
        let n = store.delete_dead_letters(&chosen).await?;
        writeln!(out, "{n} dead letter(s) purged.")?;
    }
    Ok(())
}

/// `dlq operations`.
fn operations(out: &mut impl Write, ops: &[Operation], json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(out, &ops);
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        "operation",
        "kind",
        "operator",
        "status",
        "started",
        "finished",
    ]);
    for o in ops {
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
    Ok(())
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

impl ReplayArgs {
    fn options(&self) -> Result<ReplayOptions, UsageError> {
        Ok(ReplayOptions {
            filter: self.filter.filter(self.ids.clone())?,
            rate: self.rate,
            batch: self.batch.max(1),
            force: self.force,
            to_exchange: self.to_exchange.clone(),
        })
    }
}

async fn replay(settings: &Settings, store: &Store, args: ReplayArgs) -> anyhow::Result<ExitCode> {
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        return Err(UsageError("--rate must be greater than 0".into()).into());
    }
    let mut out = std::io::stdout().lock();
    let (operation, options) = match args.resume {
        Some(id) => match replay::resume(store, id).await.map_err(refused)? {
            Some(options) => (id, options),
            None => {
                writeln!(out, "Operation {id} has ended; nothing to resume.")?;
                return Ok(ExitCode::SUCCESS);
            }
        },
        None => match begin(store, &args, &mut out).await? {
            Ok(started) => started,
            Err(code) => return Ok(code),
        },
    };
    writeln!(out, "Operation {operation}.")?;
    out.flush()?;
    let stop = CancellationToken::new();
    let on_ctrl_c = stop.clone();
    let watcher = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_ctrl_c.cancel();
        }
    });
    let run = replay::Run {
        store,
        amqp: &settings.amqp,
        operation,
        options: &options,
        stop,
    };
    let ending = run
        .execute(|n| {
            if !args.json {
                let _ = writeln!(out, "batch {n} sent.");
                let _ = out.flush();
            }
        })
        .await;
    watcher.abort();
    match ending.map_err(refused)? {
        Ending::Done => {}
        Ending::Cancelled => {
            writeln!(out, "Operation {operation} cancelled.")?;
            return Ok(ExitCode::FAILURE);
        }
        ending => {
            writeln!(
                out,
                "Operation {operation} interrupted; continue it with `holdclear dlq replay --resume {operation}`."
            )?;
            if let Ending::Broken(e) = ending {
                return Err(e.into());
            }
            return Ok(ExitCode::FAILURE);
        }
    }
    drop(out);
    let failed = report(store, operation, args.json).await?;
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// A new replay: the preview printed, then (not a dry run, something to
/// send) the operation started; else the exit code.
async fn begin(
    store: &Store,
    args: &ReplayArgs,
    out: &mut impl Write,
) -> anyhow::Result<Result<(Uuid, ReplayOptions), ExitCode>> {
    let options = args.options()?;
    options.check(args.all).map_err(refused)?;
    let preview = replay::preview(store, &options).await?;
    print_preview(out, &preview, args.dry_run)?;
    if args.dry_run {
        return Ok(Err(ExitCode::SUCCESS));
    }
    if preview.chosen.is_empty() {
        writeln!(out, "Nothing to replay.")?;
        return Ok(Err(if preview.refused.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }));
    }
    let who = operator(args.operator.clone());
    let id = replay::start(store, &who, &options, &preview).await?;
    Ok(Ok((id, options)))
}

fn print_preview(out: &mut impl Write, p: &Preview, dry_run: bool) -> std::io::Result<()> {
    for l in &p.refused {
        writeln!(
            out,
            "refused: dead letter {} ({}): its cause is the message itself and is unchanged; fix it upstream, or add --force",
            l.id, l.code
        )?;
    }
    if dry_run {
        writeln!(
            out,
            "{} dead letter(s) would be replayed; {} refused. Orders: {}",
            p.chosen.len(),
            p.refused.len(),
            if p.orders.is_empty() {
                "-".to_owned()
            } else {
                p.orders.join(", ")
            }
        )?;
    }
    Ok(())
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
    let r = replay::report(store, id).await.map_err(refused)?;
    let s = &r.summary;
    if json {
        let items: Vec<Value> = r.items.iter().map(item_json).collect();
        let v = json!({"operation": r.operation, "summary": s, "items": items});
        print_json(out, &v)?;
        return Ok(s.send_failed);
    }
    let op = &r.operation;
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
    for i in &r.items {
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
        s.sent, s.became_cases, s.failed_again, s.pending, s.send_failed
    )?;
    Ok(s.send_failed)
}

fn item_json(i: &OperationItem) -> Value {
    let mut v = serde_json::to_value(i).unwrap_or(Value::Null);
    v["outcome"] = json!(i.outcome());
    v
}
