//! The limits of list parameters: each one at its maximum runs against
//! real SQLite, and one past it is 422 naming the limit.

use axum::body::Body;
use axum::http::{Method, StatusCode};
use berth_controller::api::params::{
    MAX_FILTERS, MAX_LIST_OPERANDS, MAX_ORDER_TERMS, MAX_PATTERN_BYTES, MAX_SELECT_ATTRIBUTES,
    MAX_TOTAL_OPERANDS,
};
use serde_json::{json, Value};

use crate::common::{Reply, TestApi, SYSTEM_TOKEN};

/// Lists container requests the way the Python SDK sends a long query: a
/// form-encoded `POST` with `X-Http-Method-Override: GET`.
async fn list_by_post(api: &TestApi, params: &[(&str, Value)]) -> Reply {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in params {
        form.append_pair(name, &value.to_string());
    }
    let post = TestApi::request(Method::POST, "container_requests", Some(SYSTEM_TOKEN))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-http-method-override", "GET")
        .body(Body::from(form.finish()))
        .unwrap();
    api.send(post).await
}

/// Asserts a 422 whose message names `limit`, and that the message stays
/// short however large the input was.
#[track_caller]
fn assert_limit(reply: &Reply, limit: usize) {
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    let errors = reply.errors();
    assert!(
        errors.contains(&format!("maximum is {limit}")),
        "no limit {limit} in {errors}"
    );
    assert!(errors.len() < 1000, "message of {} bytes", errors.len());
}

fn priority_filters(count: usize) -> Vec<Value> {
    (0..count).map(|i| json!(["priority", "!=", i])).collect()
}

fn uuid_list(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("zzzzz-xvhdp-{i:015}")).collect()
}

#[tokio::test]
async fn filter_count_is_capped() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    api.create_request(&alice, json!({"name": "one"}))
        .await
        .expect(StatusCode::OK);

    let reply = list_by_post(&api, &[("filters", json!(priority_filters(MAX_FILTERS)))]).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["items_available"], 0);

    let reply = list_by_post(
        &api,
        &[("filters", json!(priority_filters(MAX_FILTERS + 1)))],
    )
    .await;
    assert_limit(&reply, MAX_FILTERS);
    let reply = list_by_post(&api, &[("filters", json!(priority_filters(5000)))]).await;
    assert_limit(&reply, MAX_FILTERS);

    // `where` conditions count with the filters.
    let reply = list_by_post(
        &api,
        &[
            ("filters", json!(priority_filters(MAX_FILTERS - 1))),
            ("where", json!({"name": "one", "state": "Uncommitted"})),
        ],
    )
    .await;
    assert_limit(&reply, MAX_FILTERS);
}

#[tokio::test]
async fn in_list_operands_are_capped() {
    let api = TestApi::new().await;
    for op in ["in", "not in"] {
        let reply = list_by_post(
            &api,
            &[(
                "filters",
                json!([["uuid", op, uuid_list(MAX_LIST_OPERANDS)]]),
            )],
        )
        .await;
        reply.expect(StatusCode::OK);

        let reply = list_by_post(
            &api,
            &[(
                "filters",
                json!([["uuid", op, uuid_list(MAX_LIST_OPERANDS + 1)]]),
            )],
        )
        .await;
        assert_limit(&reply, MAX_LIST_OPERANDS);
    }
    let reply = list_by_post(
        &api,
        &[("filters", json!([["uuid", "in", uuid_list(40_000)]]))],
    )
    .await;
    assert_limit(&reply, MAX_LIST_OPERANDS);

    // A `where` list is an `in` list too.
    let reply = list_by_post(
        &api,
        &[("where", json!({"uuid": uuid_list(MAX_LIST_OPERANDS + 1)}))],
    )
    .await;
    assert_limit(&reply, MAX_LIST_OPERANDS);
}

#[tokio::test]
async fn total_operands_are_capped() {
    let api = TestApi::new().await;
    let lists = MAX_TOTAL_OPERANDS / MAX_LIST_OPERANDS;
    let full: Vec<Value> = (0..lists)
        .map(|_| json!(["uuid", "not in", uuid_list(MAX_LIST_OPERANDS)]))
        .collect();
    let reply = list_by_post(&api, &[("filters", json!(full))]).await;
    reply.expect(StatusCode::OK);

    let mut over = full.clone();
    over.push(json!(["priority", ">=", 0]));
    let reply = list_by_post(&api, &[("filters", json!(over))]).await;
    assert_limit(&reply, MAX_TOTAL_OPERANDS);
}

#[tokio::test]
async fn order_terms_are_capped() {
    let api = TestApi::new().await;
    let terms = |count: usize| -> Vec<String> {
        (0..count)
            .map(|i| {
                if i % 2 == 0 {
                    "created_at desc".to_string()
                } else {
                    "name asc".to_string()
                }
            })
            .collect()
    };
    let reply = list_by_post(&api, &[("order", json!(terms(MAX_ORDER_TERMS)))]).await;
    reply.expect(StatusCode::OK);

    let reply = list_by_post(&api, &[("order", json!(terms(MAX_ORDER_TERMS + 1)))]).await;
    assert_limit(&reply, MAX_ORDER_TERMS);
    let reply = list_by_post(&api, &[("order", json!(terms(5000)))]).await;
    assert_limit(&reply, MAX_ORDER_TERMS);

    // The comma-separated text form counts its terms the same way.
    let text = terms(MAX_ORDER_TERMS + 1).join(", ");
    let reply = api
        .get(&format!("container_requests?order={text}"), SYSTEM_TOKEN)
        .await;
    assert_limit(&reply, MAX_ORDER_TERMS);
}

#[tokio::test]
async fn like_pattern_length_is_capped() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    api.create_request(&alice, json!({"name": "a*[?]%_\\"}))
        .await
        .expect(StatusCode::OK);
    for op in ["like", "ilike"] {
        for fill in ["%", "_", "[", "*", "\\%"] {
            let pattern = fill.repeat(MAX_PATTERN_BYTES / fill.len());
            let reply = list_by_post(&api, &[("filters", json!([["name", op, pattern]]))]).await;
            reply.expect(StatusCode::OK);
        }
        // A pattern that ends in its escape character matches literally.
        let reply = list_by_post(&api, &[("filters", json!([["name", op, "a%\\"]]))]).await;
        reply.expect(StatusCode::OK);

        let pattern = "%".repeat(MAX_PATTERN_BYTES + 1);
        let reply = list_by_post(&api, &[("filters", json!([["name", op, pattern]]))]).await;
        assert_limit(&reply, MAX_PATTERN_BYTES);
        let pattern = "%".repeat(100_000);
        let reply = list_by_post(&api, &[("filters", json!([["name", op, pattern]]))]).await;
        assert_limit(&reply, MAX_PATTERN_BYTES);
    }
}

#[tokio::test]
async fn select_attributes_are_capped() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    api.create_request(&alice, json!({"name": "one"}))
        .await
        .expect(StatusCode::OK);
    let names = |count: usize| -> Vec<&str> { (0..count).map(|_| "uuid").collect() };

    let reply = list_by_post(&api, &[("select", json!(names(MAX_SELECT_ATTRIBUTES)))]).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["items"][0]["kind"], "arvados#containerRequest");

    let reply = list_by_post(&api, &[("select", json!(names(MAX_SELECT_ATTRIBUTES + 1)))]).await;
    assert_limit(&reply, MAX_SELECT_ATTRIBUTES);
}

/// Every limit reached in one call: SQLite still runs the query.
#[tokio::test]
async fn all_limits_at_once_run() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    api.create_request(&alice, json!({"name": "one"}))
        .await
        .expect(StatusCode::OK);
    let lists = MAX_TOTAL_OPERANDS / MAX_LIST_OPERANDS - 1;
    let mut filters: Vec<Value> = (0..lists)
        .map(|_| json!(["uuid", "not in", uuid_list(MAX_LIST_OPERANDS)]))
        .collect();
    let like = format!("{}ne", "%".repeat(MAX_PATTERN_BYTES - 2));
    let ilike = format!("{}ONE", "%".repeat(MAX_PATTERN_BYTES - 3));
    filters.push(json!(["name", "like", like]));
    filters.push(json!(["name", "ilike", ilike]));
    let rest = MAX_FILTERS - filters.len() - 1;
    filters.extend(priority_filters(rest).into_iter().map(|filter| {
        let mut filter = filter;
        filter[2] = json!(-1 - filter[2].as_i64().unwrap());
        filter
    }));
    let order: Vec<&str> = (0..MAX_ORDER_TERMS).map(|_| "modified_at desc").collect();
    let reply = list_by_post(
        &api,
        &[
            ("filters", json!(filters)),
            ("where", json!({"state": "Uncommitted"})),
            ("order", json!(order)),
        ],
    )
    .await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["items_available"], 1);
}
