//! The one integration-test binary: real RabbitMQ, real PostgreSQL, the
//! simulator over real HTTP. Names are unique per test; `#[sqlx::test]`
//! gives each test its own database.

mod cli;
mod rules;
mod support;
