//! The block routes: writes return signed locators, reads need them.

use axum::body::Body;
use axum::http::{Method, StatusCode};

use crate::common::*;

pub const FOO_HASH: &str = "acbd18db4cc2f85cedef654fccc4a4d8";
pub const BAR_HASH: &str = "37b51d194a7513e45b56f6524f2d51f2";

/// Writes a block and returns the reply.
pub async fn put_block(api: &TestApi, token: Option<&str>, path: &str, data: &[u8]) -> Reply {
    let request = TestApi::request(Method::PUT, &format!("/{path}"), token)
        .body(Body::from(data.to_vec()))
        .unwrap();
    api.send(request).await
}

/// Writes a block and returns its signed locator.
pub async fn signed_locator(api: &TestApi, token: &str, data: &[u8]) -> String {
    let hash = berth_core::manifest::hex_md5(data);
    let reply = put_block(api, Some(token), &hash, data).await;
    reply.expect(StatusCode::OK);
    String::from_utf8(reply.body.to_vec()).unwrap()
}

pub async fn get_block(api: &TestApi, token: Option<&str>, locator: &str) -> Reply {
    api.call(Method::GET, &format!("/{locator}"), token, None)
        .await
}

#[tokio::test]
async fn put_returns_signed_locator() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    let reply = put_block(&api, Some(&token), FOO_HASH, b"foo").await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.header("x-keep-replicas-stored").as_deref(), Some("1"));
    let locator = String::from_utf8(reply.body.to_vec()).unwrap();
    assert!(locator.starts_with(&format!("{FOO_HASH}+3+A")), "{locator}");
    assert!(locator.contains('@'), "{locator}");

    let read = get_block(&api, Some(&token), &locator).await;
    read.expect(StatusCode::OK);
    assert_eq!(&read.body[..], b"foo");
    assert_eq!(
        read.header("content-type").as_deref(),
        Some("application/octet-stream")
    );
}

#[tokio::test]
async fn put_with_size_hint_checks_length() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    put_block(&api, Some(&token), &format!("{FOO_HASH}+3"), b"foo")
        .await
        .expect(StatusCode::OK);
    let reply = put_block(&api, Some(&token), &format!("{FOO_HASH}+4"), b"foo").await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains("says 4"), "{}", reply.errors());
}

#[tokio::test]
async fn put_needs_a_token() {
    let api = TestApi::new().await;
    put_block(&api, None, FOO_HASH, b"foo")
        .await
        .expect(StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn put_with_wrong_md5_is_rejected() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    let reply = put_block(&api, Some(&token), FOO_HASH, b"bar").await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    let errors = reply.errors();
    assert!(errors.contains(BAR_HASH), "{errors}");
    assert!(errors.contains(FOO_HASH), "{errors}");
    assert!(!api.blocks.path().join("blocks/acb").join(FOO_HASH).exists());
}

#[tokio::test]
async fn put_over_the_limit_is_rejected() {
    let api = TestApi::with_config(|config| config.blocks.max_block_bytes = 2).await;
    let token = api.user("alice", false).await;
    let reply = put_block(&api, Some(&token), FOO_HASH, b"foo").await;
    reply.expect(StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        reply.errors().contains("limit of 2 bytes"),
        "{}",
        reply.errors()
    );
}

#[tokio::test]
async fn get_needs_a_signature_for_the_caller() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let bob = api.user("bob", false).await;
    let locator = signed_locator(&api, &alice, b"foo").await;

    let unsigned = get_block(&api, Some(&alice), &format!("{FOO_HASH}+3")).await;
    unsigned.expect(StatusCode::FORBIDDEN);
    assert!(
        unsigned.errors().contains("no permission signature"),
        "{}",
        unsigned.errors()
    );

    let other = get_block(&api, Some(&bob), &locator).await;
    other.expect(StatusCode::FORBIDDEN);
    assert!(
        other.errors().contains("invalid for this token"),
        "{}",
        other.errors()
    );

    get_block(&api, None, &locator)
        .await
        .expect(StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn get_with_wrong_size_is_not_found() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    let locator = signed_locator(&api, &token, b"foo").await;
    let wrong_size = locator.replacen("+3+", "+4+", 1);
    let reply = get_block(&api, Some(&token), &wrong_size).await;
    reply.expect(StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn paths_that_are_not_blocks_are_not_found() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    get_block(&api, Some(&token), "favicon.ico")
        .await
        .expect(StatusCode::NOT_FOUND);
    let reply = get_block(&api, Some(&token), &format!("{FOO_HASH}+x")).await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn unknown_root_path_without_token_is_not_found() {
    let api = TestApi::new().await;
    let reply = api.call(Method::GET, "/favicon.ico", None, None).await;
    reply.expect(StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn head_returns_no_body() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    let locator = signed_locator(&api, &token, b"foo").await;
    let reply = api
        .call(Method::HEAD, &format!("/{locator}"), Some(&token), None)
        .await;
    reply.expect(StatusCode::OK);
    assert!(reply.body.is_empty());
    assert_eq!(reply.header("content-length").as_deref(), Some("3"));
}
