//! Text with a NUL character (U+0000): PostgreSQL cannot store it in a text
//! column, so both stores answer 422 naming the field, and store nothing.

use axum::http::StatusCode;
use serde_json::json;

use crate::common::{runnable, TestApi, SYSTEM_TOKEN};

#[tokio::test]
async fn nul_in_a_name_is_rejected() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let mut attributes = runnable();
    attributes["name"] = json!("a\u{0}b");
    let reply = api.create_request(&alice, attributes).await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reply.errors().contains("name contains a NUL character"),
        "{}",
        reply.errors()
    );
    assert_eq!(api.request_count().await, 0);
    assert_eq!(api.container_count().await, 0);
}

#[tokio::test]
async fn nul_in_a_filter_is_rejected() {
    let api = TestApi::new().await;
    for filters in [
        r#"[["name","=","a\u0000b"]]"#,
        r#"[["name","in",["x","a\u0000b"]]]"#,
    ] {
        let reply = api
            .get(
                &format!("container_requests?filters={filters}"),
                SYSTEM_TOKEN,
            )
            .await;
        reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            reply.errors().contains("the filter on name"),
            "{}",
            reply.errors()
        );
    }
}
