//! The one integration-test binary: real RabbitMQ, real PostgreSQL, the
//! simulator over real HTTP. Names are unique per test; `#[sqlx::test]`
//! gives each test its own database.

mod bench;
mod broker;
mod chaos;
mod cli;
mod commerce;
mod console;
mod demo;
mod deploy;
mod dlq;
mod engine;
mod hardening;
mod intake;
mod ops;
mod prune;
mod rules;
mod rules_live;
mod support;
mod tls;
