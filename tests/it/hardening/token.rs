//! A token endpoint that says its token never expires: `expires_in` of
//! `u64::MAX` seconds (more than a `Duration` holds once read as a JSON
//! number), or of 9.3e18 seconds (a `Duration`, but past what an `Instant`
//! can be moved by).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use holdclear::commerce::HttpCommerce;
use holdclear::config::{CommerceSettings, Secret};
use holdclear::domain::{AccountSelector, Domain};

/// The token endpoint answers `expires_in: 18446744073709551615` (and
/// then `9300000000000000000`); the search finds nothing. The client
/// neither fails, nor panics, nor fetches a token per call: the lifetime is
/// clamped and the token kept.
#[tokio::test]
async fn a_token_that_never_expires_is_clamped_not_a_panic() {
    for expires_in in ["18446744073709551615", "9300000000000000000"] {
        never_expires(expires_in).await;
    }
}

async fn never_expires(expires_in: &'static str) {
    let tokens = Arc::new(AtomicU32::new(0));
    let app = Router::new()
        .route(
            "/oauth2/default/v1/token",
            post(move |State(n): State<Arc<AtomicU32>>| async move {
                n.fetch_add(1, Ordering::SeqCst);
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    format!(
                        r#"{{"access_token": "forever", "token_type": "Bearer", "expires_in": {expires_in}}}"#
                    ),
                )
            }),
        )
        .route(
            "/smart-accounts-and-licensing/v1/accounts/search",
            get(|| async { axum::Json(serde_json::json!({"accounts": []})) }),
        )
        .with_state(tokens.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let base = format!("http://{addr}");
    let api = HttpCommerce::new(&CommerceSettings {
        base_url: base.parse().unwrap(),
        token_url: format!("{base}/oauth2/default/v1/token").parse().unwrap(),
        client_id: "forever-client".into(),
        client_secret: Secret::new("forever-secret"),
        rate_limit: 1000.0,
        request_timeout: Duration::from_secs(5),
        cache_ttl: Duration::ZERO,
        cache_entries: 1,
        tls_ca: None,
    })
    .unwrap();
    let acme = AccountSelector::Domain(Domain::parse("acme.example").unwrap());
    for _ in 0..3 {
        // A separate task: a panic is a failed join, not a dead test thread.
        let api = api.clone();
        let acme = acme.clone();
        let found = tokio::spawn(async move { api.find_account(&acme, None).await })
            .await
            .expect("the client does not panic");
        assert_eq!(found.unwrap(), None, "expires_in {expires_in}");
    }
    assert_eq!(
        tokens.load(Ordering::SeqCst),
        1,
        "one token for every call (expires_in {expires_in})"
    );
    server.abort();
}
