//! TLS with a private CA, for real: a CA and a server certificate for
//! `localhost`/127.0.0.1 made in the test, served by a throwaway
//! PostgreSQL cluster (`ssl=on`), a private RabbitMQ node (TLS listeners
//! only) and a TLS-terminating proxy in front of the simulator. Each
//! dependency is reached through the settings as `holdclear` reads them
//! (`HOLDCLEAR_TLS_CA_FILE` or the per-dependency file) and must work with
//! the CA, and fail clearly without it, with an unrelated CA, and under a
//! host name the certificate does not carry (127.0.0.2).
//!
//! The servers start in seconds (RabbitMQ is the slow one); each test says
//! on stderr how long its servers took.

mod servers;

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use holdclear::broker::{Broker, BrokerError, Publisher, declare_topology};
use holdclear::commerce::{CommerceError, HttpCommerce};
use holdclear::config::{CaFile, SecretUrl, Settings};
use holdclear::domain::{AccountSelector, AccountType, CaseState, Domain};
use holdclear::sim::SimEndpoint;
use holdclear::store::{Store, StoreError};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use crate::support::broker::{DELIVERY_LIMIT, held_event, message};
use crate::support::{bin, repo_path, sim, wait_for};
use servers::{Pki, PrivatePostgres, PrivateRabbit, TlsProxy, UNNAMED_HOST};

/// Settings read from `vars` only, as `holdclear` reads its environment.
fn settings(vars: &[(&str, &str)]) -> Settings {
    let env: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Settings::from_sources(None, &env).expect("the settings are valid")
}

/// Runs the CLI with exactly `vars` (and `PATH`); stdout and stderr together.
fn cli(vars: &[(&str, &str)], args: &[&str]) -> (Output, String) {
    let mut cmd = bin();
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOLDCLEAR_LOG_FORMAT", "json");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the CLI runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// True when `text` tells a certificate problem (rustls's wording).
fn says_certificate(text: &str) -> bool {
    text.contains("certificate")
}

/// A way the client must refuse the server: settings, and the reason rustls
/// gives.
struct Refusal<'a> {
    what: &'static str,
    vars: Vec<(&'static str, &'a str)>,
    reason: &'static str,
}

/// The three refusals for the dependency whose URL setting is `url_setting`
/// and whose own CA setting is `ca_setting`: no CA at all, an unrelated CA
/// (its own setting), the right CA (the shared setting) for a host the
/// certificate does not carry.
fn refusals<'a>(
    url_setting: &'static str,
    ca_setting: &'static str,
    good: &'a str,
    wrong_host: &'a str,
    pki: &'a Pki,
) -> [Refusal<'a>; 3] {
    [
        Refusal {
            what: "no CA",
            vars: vec![(url_setting, good)],
            reason: "UnknownIssuer",
        },
        Refusal {
            what: "an unrelated CA",
            vars: vec![(url_setting, good), (ca_setting, path(&pki.other_ca))],
            reason: "UnknownIssuer",
        },
        Refusal {
            what: "a host the certificate does not name",
            vars: vec![
                (url_setting, wrong_host),
                ("HOLDCLEAR_TLS_CA_FILE", path(&pki.ca)),
            ],
            reason: "not valid for name",
        },
    ]
}

#[tokio::test]
async fn https_commerce_api_with_a_private_ca() {
    let pki = Pki::new();
    let sim = sim::start_demo().await;
    let proxy = TlsProxy::start(servers::server_config(&pki.cert, &pki.key), sim.addr()).await;
    let good = format!("https://localhost:{}", proxy.addr.port());
    let wrong_host = format!("https://{}", proxy.unnamed);
    let ca = path(&pki.ca);
    let acme = AccountSelector::Domain(Domain::parse("acme.com").unwrap());

    let s = settings(&[
        ("HOLDCLEAR_COMMERCE_BASE_URL", &good),
        ("HOLDCLEAR_TLS_CA_FILE", path(&pki.other_ca)),
        ("HOLDCLEAR_COMMERCE_TLS_CA_FILE", ca),
    ]);
    assert!(s.commerce.token_url.as_str().starts_with(&good));
    let api = HttpCommerce::new(&s.commerce).unwrap();
    let found = api
        .find_account(&acme, Some(AccountType::Customer))
        .await
        .expect("the API answers over HTTPS with the CA");
    assert!(found.is_some(), "acme.com is in the demo scenario");
    let tokens = sim.stats().responses(SimEndpoint::Token, 200);
    assert_eq!(tokens, 1, "one token, fetched over HTTPS");

    for r in refusals(
        "HOLDCLEAR_COMMERCE_BASE_URL",
        "HOLDCLEAR_COMMERCE_TLS_CA_FILE",
        &good,
        &wrong_host,
        &pki,
    ) {
        let (what, reason) = (r.what, r.reason);
        let mut s = settings(&r.vars);
        s.commerce.request_timeout = Duration::from_secs(5);
        let api = HttpCommerce::new(&s.commerce).unwrap();
        let err = api
            .find_account(&acme, Some(AccountType::Customer))
            .await
            .expect_err(what);
        let CommerceError::Transient { detail, .. } = &err else {
            panic!("{what}: {err:?}");
        };
        eprintln!("{what}: {detail}");
        assert!(
            says_certificate(detail) && detail.contains(reason),
            "{what}: {detail}"
        );
    }
    // No refused client got as far as sending the client secret.
    assert_eq!(sim.stats().responses(SimEndpoint::Token, 200), tokens);
}

/// One TLS connection to the private node, closed again: its readiness.
async fn connects(port: u16, ca: &CaFile) -> Result<(), String> {
    let url = SecretUrl::parse("amqp", &format!("amqps://guest:guest@localhost:{port}/%2f"))
        .map_err(|e| e.to_string())?;
    let conn = Broker::new(url, "holdclear tls test")
        .with_tls_ca(Some(ca.clone()))
        .connect("ready")
        .await
        .map_err(|e| e.to_string())?;
    holdclear::broker::close(&conn).await;
    Ok(())
}

/// Bad TLS settings stop every command before it connects: exit 64 and
/// the setting named.
#[test]
fn bad_tls_settings_exit_64_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.txt");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let cases = [
        ("HOLDCLEAR_TLS_CA_FILE", path(&missing)),
        ("HOLDCLEAR_AMQP_TLS_CA_FILE", path(&not_pem)),
        ("HOLDCLEAR_DATABASE_TLS_CA_FILE", path(&missing)),
        ("HOLDCLEAR_COMMERCE_TLS_CA_FILE", path(&not_pem)),
        ("HOLDCLEAR_COMMERCE_BASE_URL", "http://commerce.example.com"),
        (
            "HOLDCLEAR_COMMERCE_TOKEN_URL",
            "http://id.example.com/token",
        ),
    ];
    for (setting, value) in cases {
        for args in [&["migrate"][..], &["dlq", "queue"], &["cases", "list"]] {
            let (out, text) = cli(&[(setting, value)], args);
            assert_eq!(out.status.code(), Some(64), "{setting} {args:?}: {text}");
            assert!(text.contains(setting), "{setting} {args:?}: {text}");
        }
    }
    // The opt-in lets the settings through (the command then fails on the
    // database, which is not there: exit 1, not 64).
    let (out, text) = cli(
        &[
            ("HOLDCLEAR_COMMERCE_BASE_URL", "http://commerce.example.com"),
            ("HOLDCLEAR_COMMERCE_ALLOW_PLAINTEXT", "true"),
            (
                "HOLDCLEAR_DATABASE_URL",
                "postgres://postgres@127.0.0.1:1/x",
            ),
        ],
        &["migrate"],
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
}

/// The tests that start private PostgreSQL and RabbitMQ servers from the
/// binaries installed on this machine: they run in the `chaos` nextest
/// profile (a developer whose services run in containers has no such
/// binaries), or when `HOLDCLEAR_DISRUPTIVE_TESTS=1` asks for them.
mod own_servers {
    use super::*;
    use crate::support::disruptive_tests_allowed;

    #[tokio::test]
    async fn postgres_verify_full_with_a_private_ca() {
        if !disruptive_tests_allowed("tls::own_servers::postgres_verify_full_with_a_private_ca") {
            return;
        }
        let pki = Pki::new();
        let started = Instant::now();
        let pg = PrivatePostgres::start(&pki.cert, &pki.key).await;
        eprintln!("PostgreSQL with TLS ready in {:?}", started.elapsed());
        let good = pg.url("localhost", "holdclear_tls");
        let ca = path(&pki.ca);
        let other = path(&pki.other_ca);

        // The shared CA file: connects (creating the database), encrypted.
        let s = settings(&[
            ("HOLDCLEAR_DATABASE_URL", &good),
            ("HOLDCLEAR_TLS_CA_FILE", ca),
        ]);
        let store = Store::connect(&s.database_url, s.database_tls_ca.as_ref(), 2)
            .await
            .expect("verify-full with the CA connects");
        let ssl: bool =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert!(ssl, "the session is encrypted");
        store.pool().close().await;

        // The per-dependency file wins over a wrong shared one.
        let s = settings(&[
            ("HOLDCLEAR_DATABASE_URL", &good),
            ("HOLDCLEAR_TLS_CA_FILE", other),
            ("HOLDCLEAR_DATABASE_TLS_CA_FILE", ca),
        ]);
        let store = Store::connect(&s.database_url, s.database_tls_ca.as_ref(), 1)
            .await
            .expect("HOLDCLEAR_DATABASE_TLS_CA_FILE wins");
        store.pool().close().await;

        // Refused: no CA (built-in roots only), an unrelated CA, a host name
        // the certificate does not carry.
        let wrong_host = pg.url(&UNNAMED_HOST.to_string(), "holdclear_tls");
        for r in refusals(
            "HOLDCLEAR_DATABASE_URL",
            "HOLDCLEAR_DATABASE_TLS_CA_FILE",
            &good,
            &wrong_host,
            &pki,
        ) {
            let (what, reason) = (r.what, r.reason);
            let s = settings(&r.vars);
            let err = Store::connect(&s.database_url, s.database_tls_ca.as_ref(), 1)
                .await
                .expect_err(what);
            let text = err.to_string();
            eprintln!("{what}: {text}");
            assert!(matches!(err, StoreError::Tls { .. }), "{what}: {text}");
            assert!(err.is_connection(), "{what}: the worker retries it");
            assert!(
                says_certificate(&text) && text.contains(reason),
                "{what}: {text}"
            );
            assert!(text.contains("PostgreSQL"), "{what}: {text}");
        }

        // The CLI goes through the same settings: `migrate` with and without.
        let (out, text) = cli(
            &[
                ("HOLDCLEAR_DATABASE_URL", &good),
                ("HOLDCLEAR_TLS_CA_FILE", ca),
            ],
            &["migrate"],
        );
        assert!(out.status.success(), "migrate with the CA: {text}");
        let (out, text) = cli(&[("HOLDCLEAR_DATABASE_URL", &good)], &["migrate"]);
        assert_eq!(out.status.code(), Some(1), "migrate without the CA: {text}");
        assert!(
            text.contains("TLS to PostgreSQL") && says_certificate(&text),
            "{text}"
        );
        let (out, text) = cli(
            &[
                ("HOLDCLEAR_DATABASE_URL", &good),
                ("HOLDCLEAR_TLS_CA_FILE", ca),
            ],
            &["cases", "list"],
        );
        assert!(out.status.success(), "cases list with the CA: {text}");
    }

    /// `amqps://` to a private RabbitMQ node: the worker's connection code with
    /// the CA (a message goes round), failures without it, the CLI; then the
    /// whole worker over TLS everywhere (RabbitMQ, PostgreSQL with
    /// `verify-full`, the commerce API over HTTPS) clears a held order.
    #[tokio::test]
    async fn amqps_and_the_worker_over_tls_everywhere() {
        if !disruptive_tests_allowed("tls::own_servers::amqps_and_the_worker_over_tls_everywhere") {
            return;
        }
        let pki = Pki::new();
        let ca_file = CaFile::load("test", &pki.ca).unwrap();
        let started = Instant::now();
        let (rabbit, pg) = tokio::join!(
            PrivateRabbit::start(&pki, Duration::from_secs(120), |port| {
                let ca = ca_file.clone();
                async move { connects(port, &ca).await }
            }),
            PrivatePostgres::start(&pki.cert, &pki.key),
        );
        eprintln!(
            "RabbitMQ and PostgreSQL with TLS ready in {:?}",
            started.elapsed()
        );
        let amqps = rabbit.url("localhost");
        let ca = path(&pki.ca);

        // The worker's connection code, through the settings: a message goes round.
        let s = settings(&[
            ("HOLDCLEAR_AMQP_URL", &amqps),
            ("HOLDCLEAR_AMQP_TLS_CA_FILE", ca),
        ]);
        let conn = Broker::from_settings(&s.amqp, "holdclear tls test")
            .connect("round trip")
            .await
            .expect("amqps:// with the CA connects");
        let publisher = Publisher::open(&conn).await.unwrap();
        let queue = "holdclear-tls-round-trip";
        publisher
            .channel()
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut msg = message(&held_event("tls-round-trip", "1"));
        msg.routing_key = queue.to_owned();
        publisher.publish("", &msg).await.unwrap();
        let got = publisher
            .channel()
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("the message came back");
        assert_eq!(got.delivery.data, msg.body);
        holdclear::broker::close(&conn).await;

        let wrong_host = rabbit.url(&UNNAMED_HOST.to_string());
        for r in refusals(
            "HOLDCLEAR_AMQP_URL",
            "HOLDCLEAR_AMQP_TLS_CA_FILE",
            &amqps,
            &wrong_host,
            &pki,
        ) {
            let (what, reason) = (r.what, r.reason);
            let s = settings(&r.vars);
            let err = Broker::from_settings(&s.amqp, "holdclear tls test")
                .connect("refused")
                .await
                .expect_err(what);
            let text = err.to_string();
            eprintln!("{what}: {text}");
            assert!(matches!(err, BrokerError::Tls { .. }), "{what}: {text}");
            assert!(
                says_certificate(&text) && text.contains(reason),
                "{what}: {text}"
            );
            assert!(!text.contains("guest:guest"), "{what}: {text}");
        }

        // The CLI: `dlq queue` with the CA, and without. (The topology first,
        // and a queue that reads every event the worker will emit.)
        let topology = holdclear::config::Topology::default();
        let events = "holdclear-tls-events";
        let observer_broker = Broker::from_settings(&s.amqp, "holdclear tls test");
        let observer = observer_broker.connect("observer").await.unwrap();
        let observing = observer.create_channel().await.unwrap();
        declare_topology(&observer_broker, &observer, &topology, DELIVERY_LIMIT)
            .await
            .unwrap();
        observing
            .queue_declare(
                events.into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        observing
            .queue_bind(
                events.into(),
                topology.events_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let (out, text) = cli(
            &[
                ("HOLDCLEAR_AMQP_URL", &amqps),
                ("HOLDCLEAR_TLS_CA_FILE", ca),
            ],
            &["dlq", "queue"],
        );
        assert!(out.status.success(), "dlq queue with the CA: {text}");
        assert!(text.contains("is empty"), "{text}");
        let (out, text) = cli(&[("HOLDCLEAR_AMQP_URL", &amqps)], &["dlq", "queue"]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "dlq queue without the CA: {text}"
        );
        assert!(text.contains("TLS") && says_certificate(&text), "{text}");

        // The worker, over TLS to all three, clears a held order of the demo.
        let sim = sim::start_demo().await;
        let proxy = TlsProxy::start(servers::server_config(&pki.cert, &pki.key), sim.addr()).await;
        let database = pg.url("localhost", "holdclear_worker");
        let commerce = format!("https://localhost:{}", proxy.addr.port());
        let rules = repo_path("deploy/config/rules.toml");
        let s = settings(&[
            ("HOLDCLEAR_DATABASE_URL", &database),
            ("HOLDCLEAR_AMQP_URL", &amqps),
            ("HOLDCLEAR_COMMERCE_BASE_URL", &commerce),
            ("HOLDCLEAR_TLS_CA_FILE", ca),
            ("HOLDCLEAR_RULES", path(&rules)),
            ("HOLDCLEAR_HTTP_ADDR", "127.0.0.1:0"),
            ("HOLDCLEAR_POLL_INTERVAL", "200ms"),
            ("HOLDCLEAR_POLL_MAX_INTERVAL", "1s"),
            ("HOLDCLEAR_DATABASE_MAX_CONNECTIONS", "4"),
        ]);
        let worker = crate::support::worker::start(s.clone()).await;
        let event: serde_json::Value =
            serde_json::from_slice(&std::fs::read(repo_path("tests/data/held-acme.json")).unwrap())
                .unwrap();
        let order = event["data"]["salesOrderNumber"]
            .as_str()
            .unwrap()
            .to_owned();
        {
            let conn = Broker::from_settings(&s.amqp, "holdclear tls test")
                .connect("upstream")
                .await
                .unwrap();
            let publisher = Publisher::open(&conn).await.unwrap();
            publisher
                .publish(&topology.orders_exchange, &message(&event))
                .await
                .unwrap();
            holdclear::broker::close(&conn).await;
        }
        let store = Store::connect(&s.database_url, s.database_tls_ca.as_ref(), 1)
            .await
            .unwrap();
        wait_for(
            Duration::from_secs(60),
            "the held order released",
            || async {
                let case = store.latest_case(&order).await.ok()??;
                (case.case.state() == CaseState::Released).then_some(())
            },
        )
        .await;
        assert!(
            sim.stats().responses(SimEndpoint::Token, 200) >= 1,
            "the worker fetched its token over HTTPS"
        );
        // The released event left through the outbox relay's amqps:// connection.
        wait_for(
            Duration::from_secs(30),
            "order.hold_released on the events exchange",
            || async {
                while let Some(got) = observing
                    .basic_get(events.into(), BasicGetOptions { no_ack: true })
                    .await
                    .unwrap()
                {
                    if got.delivery.routing_key.as_str() == "order.hold_released" {
                        return Some(());
                    }
                }
                None
            },
        )
        .await;
        holdclear::broker::close(&observer).await;
        worker.shutdown().await.expect("the worker stops cleanly");
        store.pool().close().await;
        eprintln!("whole test in {:?}", started.elapsed());
    }

    /// `deploy/tls/dev-certs` (Compose's development TLS) makes a CA our
    /// settings accept, and server certificates for the compose names that
    /// PostgreSQL serves and our clients verify.
    #[tokio::test]
    async fn compose_dev_certs_work() {
        if !disruptive_tests_allowed("tls::own_servers::compose_dev_certs_work") {
            return;
        }
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tls");
        let script = std::process::Command::new(repo_path("deploy/tls/dev-certs"))
            .arg(&out)
            .output()
            .expect("deploy/tls/dev-certs runs");
        assert!(
            script.status.success(),
            "{}",
            String::from_utf8_lossy(&script.stderr)
        );
        let ca = out.join("ca.pem");
        assert_eq!(
            CaFile::load("HOLDCLEAR_TLS_CA_FILE", &ca)
                .unwrap()
                .certificates(),
            1
        );
        assert!(!out.join("ca.key").exists(), "the CA's key is not kept");

        // Each certificate names its compose service (and localhost).
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(
            CertificateDer::pem_file_iter(&ca)
                .unwrap()
                .map(Result::unwrap),
        );
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        for (service, other) in [("postgres", "rabbitmq"), ("rabbitmq", "postgres")] {
            let cert = CertificateDer::from_pem_file(out.join(format!("{service}.pem"))).unwrap();
            for (name, valid) in [(service, true), ("localhost", true), (other, false)] {
                let checked = verifier.verify_server_cert(
                    &cert,
                    &[],
                    &ServerName::try_from(name).unwrap(),
                    &[],
                    UnixTime::now(),
                );
                assert_eq!(
                    checked.is_ok(),
                    valid,
                    "{service}.pem for {name}: {checked:?}"
                );
            }
        }

        // PostgreSQL takes the key as written; verify-full with the CA connects.
        let pg = PrivatePostgres::start(&out.join("postgres.pem"), &out.join("postgres.key")).await;
        let s = settings(&[
            ("HOLDCLEAR_DATABASE_URL", &pg.url("localhost", "postgres")),
            ("HOLDCLEAR_TLS_CA_FILE", path(&ca)),
        ]);
        let store = Store::connect(&s.database_url, s.database_tls_ca.as_ref(), 1)
            .await
            .expect("verify-full with the development CA");
        store.pool().close().await;

        // Run again, it keeps what is there.
        let before = std::fs::read(&ca).unwrap();
        let again = std::process::Command::new(repo_path("deploy/tls/dev-certs"))
            .arg(&out)
            .output()
            .unwrap();
        assert!(again.status.success());
        assert_eq!(std::fs::read(&ca).unwrap(), before);
    }
}
