//! Collections: create, get by UUID and portable data hash, list, update
//! and delete, with the permission signatures of their locators.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::blocks::{get_block, signed_locator, BAR_HASH, FOO_HASH};
use crate::common::*;

async fn create(api: &TestApi, token: &str, attributes: Value) -> Reply {
    api.call(
        Method::POST,
        "collections",
        Some(token),
        Some(json!({ "collection": attributes })),
    )
    .await
}

/// Returns the locators of a manifest text, in order.
fn locators(manifest: &str) -> Vec<String> {
    manifest
        .split_whitespace()
        .filter(|token| token.len() > 33 && token.as_bytes()[32] == b'+')
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn create_get_and_read_blocks() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    let foo = signed_locator(&api, &token, b"foo").await;
    let bar = signed_locator(&api, &token, b"bar").await;
    // Out of order, with a file spanning both blocks: stored normalised.
    let manifest = format!("./dir {foo} {bar} 0:6:both 3:3:b\n. {foo} 0:3:foo\n");
    let reply = create(
        &api,
        &token,
        json!({"name": "two files", "manifest_text": manifest}),
    )
    .await;
    reply.expect(StatusCode::OK);
    let created = reply.json();
    assert_eq!(created["kind"], "arvados#collection");
    let uuid = str_of(&created, "uuid").to_string();
    assert!(uuid.starts_with("zzzzz-4zz18-"), "{uuid}");
    // The Arvados Python SDK 3.2.1 normalises the manifest to
    // ". FOO 0:3:foo\n./dir BAR FOO 0:3:b 3:3:both 0:3:both\n" and gives
    // this hash.
    let expected_pdh = "1504386bba622220d2b3c97779c70af9+145";
    assert_eq!(created["portable_data_hash"], expected_pdh);
    assert_eq!(created["file_count"], 3);
    assert_eq!(created["file_size_total"], 12);

    let fetched = api.get(&format!("collections/{uuid}"), &token).await;
    fetched.expect(StatusCode::OK);
    let text = str_of(&fetched.json(), "manifest_text").to_string();
    let signed = locators(&text);
    assert_eq!(signed.len(), 3, "{text}");
    for locator in &signed {
        assert!(locator.contains("+A"), "{locator}");
        get_block(&api, Some(&token), locator)
            .await
            .expect(StatusCode::OK);
    }

    let by_pdh = api
        .get(
            &format!("collections/{}", expected_pdh.replace('+', "%2B")),
            &token,
        )
        .await;
    by_pdh.expect(StatusCode::OK);
    assert_eq!(by_pdh.json()["uuid"], uuid.as_str());
}

#[tokio::test]
async fn empty_collection_has_empty_pdh() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    let reply = create(&api, &token, json!({})).await;
    reply.expect(StatusCode::OK);
    let created = reply.json();
    assert_eq!(
        created["portable_data_hash"],
        "d41d8cd98f00b204e9800998ecf8427e+0"
    );
    assert_eq!(created["manifest_text"], "");
}

#[tokio::test]
async fn zero_length_file_needs_no_signature() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    let manifest = ". d41d8cd98f00b204e9800998ecf8427e+0 0:0:empty\n";
    let reply = create(&api, &token, json!({"manifest_text": manifest})).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["file_count"], 1);
}

#[tokio::test]
async fn unsigned_locator_is_rejected() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    signed_locator(&api, &token, b"foo").await;
    let manifest = format!(". {FOO_HASH}+3 0:3:foo\n");
    let reply = create(&api, &token, json!({"manifest_text": manifest})).await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    let errors = reply.errors();
    assert!(errors.contains("no permission signature"), "{errors}");
    assert!(errors.contains(FOO_HASH), "{errors}");
}

#[tokio::test]
async fn other_users_signature_is_rejected() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let bob = api.user("bob", false).await;
    let foo = signed_locator(&api, &alice, b"foo").await;
    let reply = create(
        &api,
        &bob,
        json!({"manifest_text": format!(". {foo} 0:3:foo\n")}),
    )
    .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reply.errors().contains("invalid for this token"),
        "{}",
        reply.errors()
    );
}

#[tokio::test]
async fn signed_missing_block_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    let key = "0123456789abcdef0123456789abcdef";
    std::fs::write(&key_file, key).unwrap();
    let api = TestApi::with_config(|config| config.blocks.signing_key_file = Some(key_file)).await;
    let token = api.user("alice", false).await;
    let token_uuid = token.split('/').nth(1).unwrap();
    // A valid signature for a block nobody wrote, made with the known key.
    let signer = berth_controller::blocks::signing::BlobSigner::new(key.as_bytes().to_vec(), 3600);
    let locator = berth_core::locator::Locator::new(BAR_HASH, 3).unwrap();
    let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap();
    let signed = signer.sign(&locator, token_uuid, now);
    let reply = create(
        &api,
        &token,
        json!({"manifest_text": format!(". {signed} 0:3:bar\n")}),
    )
    .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reply.errors().contains("is not stored"),
        "{}",
        reply.errors()
    );
}

#[tokio::test]
async fn invalid_manifest_names_line_and_token() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    let foo = signed_locator(&api, &token, b"foo").await;
    let manifest = format!(". {foo} 0:3:foo\n. {foo} 0:3:../escape\n");
    let reply = create(&api, &token, json!({"manifest_text": manifest})).await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    let errors = reply.errors();
    assert!(errors.contains("line 2"), "{errors}");
    assert!(errors.contains("0:3:../escape"), "{errors}");
}

#[tokio::test]
async fn mismatched_pdh_is_rejected() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    let reply = create(
        &api,
        &token,
        json!({"manifest_text": "", "portable_data_hash": "acbd18db4cc2f85cedef654fccc4a4d8+3"}),
    )
    .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reply.errors().contains("does not match"),
        "{}",
        reply.errors()
    );
}

#[tokio::test]
async fn owners_and_admins_see_collections() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let bob = api.user("bob", false).await;
    let admin = api.user("root", true).await;
    let foo = signed_locator(&api, &alice, b"foo").await;
    let created = create(
        &api,
        &alice,
        json!({"manifest_text": format!(". {foo} 0:3:foo\n")}),
    )
    .await;
    created.expect(StatusCode::OK);
    let created = created.json();
    let uuid = str_of(&created, "uuid");
    let pdh = str_of(&created, "portable_data_hash");

    api.get(&format!("collections/{uuid}"), &bob)
        .await
        .expect(StatusCode::NOT_FOUND);
    api.get(&format!("collections/{}", pdh.replace('+', "%2B")), &bob)
        .await
        .expect(StatusCode::NOT_FOUND);
    let bob_list = api.get("collections", &bob).await;
    bob_list.expect(StatusCode::OK);
    assert_eq!(bob_list.json()["items_available"], 0);

    let admin_view = api.get(&format!("collections/{uuid}"), &admin).await;
    admin_view.expect(StatusCode::OK);
    // The admin's copy is signed for the admin's token.
    let admin_locator = &locators(str_of(&admin_view.json(), "manifest_text"))[0];
    get_block(&api, Some(&admin), admin_locator)
        .await
        .expect(StatusCode::OK);
    get_block(&api, Some(&bob), admin_locator)
        .await
        .expect(StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn list_filters_by_pdh() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    let foo = signed_locator(&api, &token, b"foo").await;
    create(&api, &token, json!({"name": "empty"}))
        .await
        .expect(StatusCode::OK);
    let with_foo = create(
        &api,
        &token,
        json!({"name": "foo", "manifest_text": format!(". {foo} 0:3:foo\n")}),
    )
    .await;
    with_foo.expect(StatusCode::OK);
    let pdh = str_of(&with_foo.json(), "portable_data_hash").to_string();
    let filters = json!([["portable_data_hash", "=", pdh]])
        .to_string()
        .replace('+', "%2B");
    let list = api
        .get(&format!("collections?filters={filters}"), &token)
        .await;
    list.expect(StatusCode::OK);
    let body = list.json();
    assert_eq!(body["kind"], "arvados#collectionList");
    assert_eq!(body["items_available"], 1);
    assert_eq!(body["items"][0]["name"], "foo");
    let listed = str_of(&body["items"][0], "manifest_text");
    assert!(listed.contains("+A"), "{listed}");
    let uuid = str_of(&body["items"][0], "uuid");
    let fetched = api.get(&format!("collections/{uuid}"), &token).await.json();
    assert_eq!(body["items"][0]["etag"], fetched["etag"]);
}

#[tokio::test]
async fn update_changes_name_and_content() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    let foo = signed_locator(&api, &token, b"foo").await;
    let created = create(&api, &token, json!({"name": "before"})).await.json();
    let uuid = str_of(&created, "uuid");

    let update = api
        .call(
            Method::PUT,
            &format!("collections/{uuid}"),
            Some(&token),
            Some(json!({"collection": {"name": "after", "manifest_text": format!(". {foo} 0:3:foo\n")}})),
        )
        .await;
    update.expect(StatusCode::OK);
    let updated = update.json();
    assert_eq!(updated["name"], "after");
    assert_eq!(
        updated["portable_data_hash"],
        "1f4b0bc7583c2a7f9102c395f4ffc5e3+45"
    );

    let read_only = api
        .call(
            Method::PATCH,
            &format!("collections/{uuid}"),
            Some(&token),
            Some(json!({"collection": {"file_count": 9}})),
        )
        .await;
    read_only.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        read_only.errors().contains("file_count"),
        "{}",
        read_only.errors()
    );
}

#[tokio::test]
async fn delete_removes_the_record() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let bob = api.user("bob", false).await;
    let created = create(&api, &alice, json!({"name": "doomed"})).await.json();
    let uuid = str_of(&created, "uuid");
    api.call(
        Method::DELETE,
        &format!("collections/{uuid}"),
        Some(&bob),
        None,
    )
    .await
    .expect(StatusCode::NOT_FOUND);
    api.call(
        Method::DELETE,
        &format!("collections/{uuid}"),
        Some(&alice),
        None,
    )
    .await
    .expect(StatusCode::OK);
    api.get(&format!("collections/{uuid}"), &alice)
        .await
        .expect(StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn keep_services_name_the_controller() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    let request = TestApi::request(Method::GET, "keep_services/accessible", Some(&token))
        .header("host", "berth.example:8443")
        .body(axum::body::Body::empty())
        .unwrap();
    let reply = api.send(request).await;
    reply.expect(StatusCode::OK);
    let service = &reply.json()["items"][0];
    assert_eq!(service["service_host"], "berth.example");
    assert_eq!(service["service_port"], 8443);
    assert_eq!(service["service_type"], "proxy");
    assert_eq!(service["service_ssl_flag"], false);
}

#[tokio::test]
async fn etag_is_the_same_for_every_reader() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    let admin = api.user("root", true).await;
    let foo = signed_locator(&api, &token, b"foo").await;
    let created = create(
        &api,
        &token,
        json!({"manifest_text": format!(". {foo} 0:3:foo\n")}),
    )
    .await;
    created.expect(StatusCode::OK);
    let uuid = str_of(&created.json(), "uuid").to_string();
    let owner_view = api.get(&format!("collections/{uuid}"), &token).await.json();
    let admin_view = api.get(&format!("collections/{uuid}"), &admin).await.json();
    // Signed for different tokens, so the texts differ, but the record is
    // one and the same.
    assert_ne!(owner_view["manifest_text"], admin_view["manifest_text"]);
    assert_eq!(owner_view["etag"], admin_view["etag"]);
}

#[tokio::test]
async fn container_token_writes_for_its_user() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let bob = api.user("bob", false).await;
    let (_, container) = api.committed(&alice).await;
    let container_token = api.lock(str_of(&container, "uuid")).await;

    let foo = signed_locator(&api, &container_token, b"foo").await;
    let created = create(
        &api,
        &container_token,
        json!({"name": "output", "manifest_text": format!(". {foo} 0:3:foo\n")}),
    )
    .await;
    created.expect(StatusCode::OK);
    let created = created.json();
    let alice_uuid = str_of(&api.get("users/current", &alice).await.json(), "uuid").to_string();
    assert_eq!(created["owner_uuid"], alice_uuid.as_str());

    // The container's user reads it; other users do not.
    let uuid = str_of(&created, "uuid");
    api.get(&format!("collections/{uuid}"), &alice)
        .await
        .expect(StatusCode::OK);
    api.get(&format!("collections/{uuid}"), &bob)
        .await
        .expect(StatusCode::NOT_FOUND);
}

/// The store's collection calls, on whichever store the tests use.
#[tokio::test]
async fn store_detects_stale_versions() {
    use berth_controller::store::{StoreError, Visibility};

    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    let created = create(&api, &token, json!({"name": "v1"})).await.json();
    let uuid = str_of(&created, "uuid");
    let owner = str_of(&created, "owner_uuid").to_string();
    let store = api.state.store();
    let read = store.get_collection(uuid).await.unwrap().unwrap();
    assert_eq!(read.version, 1);

    let mut renamed = read.record.clone();
    renamed.name = Some("v2".into());
    let (first, second) = tokio::join!(
        store.update_collection(&renamed, read.version),
        store.update_collection(&renamed, read.version)
    );
    let conflicts = [&first, &second]
        .iter()
        .filter(|result| matches!(result, Err(StoreError::Conflict { .. })))
        .count();
    assert_eq!(conflicts, 1, "{first:?} {second:?}");
    let stale_delete = store.delete_collection(uuid, read.version).await;
    assert!(
        matches!(stale_delete, Err(StoreError::Conflict { .. })),
        "{stale_delete:?}"
    );

    let pdh = "d41d8cd98f00b204e9800998ecf8427e+0";
    let found = store
        .find_collection_by_pdh(pdh, &Visibility::User(owner))
        .await
        .unwrap();
    assert_eq!(
        found.map(|found| found.record.name),
        Some(Some("v2".to_string()))
    );
    let hidden = store
        .find_collection_by_pdh(pdh, &Visibility::User("zzzzz-tpzed-000000000000009".into()))
        .await
        .unwrap();
    assert!(hidden.is_none());
    store
        .delete_collection(uuid, read.version + 1)
        .await
        .unwrap();
    assert!(store.get_collection(uuid).await.unwrap().is_none());
}

#[tokio::test]
async fn container_output_needs_readable_collection() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let bob = api.user("bob", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid").to_string();
    let token = api.lock(&uuid).await;
    api.update_container(&uuid, &token, json!({"state": "Running"}))
        .await
        .expect(StatusCode::OK);

    let bobs = create(
        &api,
        &bob,
        json!({"manifest_text": ". d41d8cd98f00b204e9800998ecf8427e+0 0:0:bobs\n"}),
    )
    .await
    .json();
    let bobs_pdh = str_of(&bobs, "portable_data_hash").to_string();
    let missing_pdh = "0cc175b9c0f1b6a831c399e269772661+1";
    for (field, pdh) in [
        ("output", bobs_pdh.as_str()),
        ("output", missing_pdh),
        ("log", bobs_pdh.as_str()),
    ] {
        let reply = api
            .update_container(&uuid, &token, json!({ field: pdh }))
            .await;
        reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
        assert!(reply.errors().contains(field), "{}", reply.errors());
        assert!(reply.errors().contains(pdh), "{}", reply.errors());
    }

    let own = create(
        &api,
        &token,
        json!({"manifest_text": ". d41d8cd98f00b204e9800998ecf8427e+0 0:0:mine\n"}),
    )
    .await;
    own.expect(StatusCode::OK);
    let own_pdh = str_of(&own.json(), "portable_data_hash").to_string();
    let reply = api
        .update_container(&uuid, &token, json!({"output": own_pdh, "log": own_pdh}))
        .await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["output"], own_pdh.as_str());
}
