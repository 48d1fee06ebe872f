//! holdclear clears Cisco Smart Account holds without a person in the loop.
//!
//! One held order, in the order the folders are read:
//! - [`config`]: settings from file and environment, validated; secrets redacted.
//! - [`domain`]: validated values (event, order numbers, domains), case states, escalation reasons.
//! - [`broker`]: RabbitMQ (the only module that knows lapin): connection, topology, consumer, publisher, dead letters.
//! - [`intake`]: a delivery becomes a validated event and a case, or a dead letter; dead letters are kept in PostgreSQL.
//! - [`rules`]: the operator's default Smart Account rules: file, compile, match, explain.
//! - [`engine`]: the case state machine and the scheduler that steps due cases.
//! - [`commerce`]: the commerce API client (token, rate limit, error classes).
//! - [`store`]: PostgreSQL (the only module that writes SQL): inbox, cases, history, outbox, dead letters, operations.
//! - [`outbox`]: the relay that publishes committed events with confirms.
//! - [`prune`]: built-in retention: closed cases, published events, old event ids and handled dead letters deleted in small slices, one worker at a time.
//! - [`operations`]: what operators do (replay, archive, claim, note; case retry and close), audited, for the CLI and the console.
//! - [`retry`]: delay policies (the one module that uses `backoff`).
//! - [`ops`]: logs, health, readiness and metrics.
//! - [`sim`]: the commerce-API simulator (`holdclear sim`).
//! - [`worker`]: `holdclear run` assembled: HTTP server, store, consumer and intake, graceful shutdown.
//! - [`bench`]: `holdclear bench`: intake, end to end, watching at scale and memory, against the machine's limits.
//! - [`console`]: `holdclear console`: the operators' web console (pages, actions, sign-in, CSRF, CSP).
//! - [`cli`]: one file per subcommand.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bench;
pub mod broker;
pub mod cli;
pub mod commerce;
pub mod config;
pub mod console;
pub mod domain;
pub mod engine;
pub mod intake;
pub mod operations;
pub mod ops;
pub mod outbox;
pub mod prune;
pub mod retry;
pub mod rules;
pub mod sim;
pub mod store;
pub mod worker;
