//! The discovery document: served without a token, with a `rootUrl` built
//! from the request or taken from `external_url`.

use axum::body::Body;
use axum::http::{Method, StatusCode};

use crate::common::TestApi;

const PATH: &str = "/discovery/v1/apis/arvados/v1/rest";

#[tokio::test]
async fn discovery_needs_no_token_and_uses_host() {
    let api = TestApi::new().await;
    let request = TestApi::request(Method::GET, PATH, None)
        .header("host", "127.0.0.1:9999")
        .body(Body::empty())
        .unwrap();
    let reply = api.send(request).await;
    reply.expect(StatusCode::OK);
    let doc = reply.json();
    assert_eq!(doc["rootUrl"], "http://127.0.0.1:9999/");
    assert_eq!(doc["servicePath"], "arvados/v1/");
    assert_eq!(doc["baseUrl"], "http://127.0.0.1:9999/arvados/v1/");
    assert_eq!(doc["uuidPrefix"], "zzzzz");
    assert_eq!(doc["maxItemsPerResponse"], 1000);
    assert_eq!(
        doc["resources"]["containers"]["methods"]["current"]["path"],
        "containers/current"
    );
    assert!(doc["resources"].get("configs").is_none());
}

#[tokio::test]
async fn discovery_prefers_external_url() {
    let api = TestApi::with_config(|config| {
        config.external_url = Some("https://berth.example.org:8443".into());
    })
    .await;
    let request = TestApi::request(Method::GET, PATH, None)
        .header("host", "127.0.0.1:9999")
        .body(Body::empty())
        .unwrap();
    let doc = api.send(request).await.json();
    assert_eq!(doc["rootUrl"], "https://berth.example.org:8443/");
}

#[tokio::test]
async fn discovery_rejects_a_malformed_host() {
    let api = TestApi::new().await;
    let request = TestApi::request(Method::GET, PATH, None)
        .header("host", "evil.example/path?")
        .body(Body::empty())
        .unwrap();
    let reply = api.send(request).await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains("Host"), "{}", reply.errors());
}

#[tokio::test]
async fn discovery_names_https_when_serving_tls() {
    // The router never opens these files: only the listener loads them.
    let api = TestApi::with_config(|config| {
        config.tls_certificate = Some("/nonexistent/cert.pem".into());
        config.tls_key = Some("/nonexistent/key.pem".into());
    })
    .await;
    let request = TestApi::request(Method::GET, PATH, None)
        .header("host", "127.0.0.1:9999")
        .body(Body::empty())
        .unwrap();
    let doc = api.send(request).await.json();
    assert_eq!(doc["rootUrl"], "https://127.0.0.1:9999/");
}
