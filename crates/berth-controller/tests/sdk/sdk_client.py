"""Drive a Berth controller with the Arvados Python SDK (arvados-python-client).

Run by the Rust test in tests/sdk.rs, which starts the controller and sets:
  BERTH_SDK_HOST           the controller's host:port, served over HTTPS
                           with a self-signed certificate
  BERTH_SDK_USER_TOKEN     a new non-admin user's token (user "sdkuser")
  BERTH_SDK_SYSTEM_TOKEN   the system token, to lock the container
Tokens come from the environment, never from argv.

Exits 0 when every check holds; otherwise prints the failed check to stderr
and exits 1.
"""

import os
import sys

import arvados
import arvados.collection
import arvados.errors
import arvados.util

# Requests created to page through, more than two pages of PAGE_SIZE.
PAGED_REQUESTS = 260
PAGE_SIZE = 100


def fail(message):
    print(f"sdk_client: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


def client(token):
    # num_retries=0: a 5xx fails the test at once instead of after minutes
    # of retries. cache=False: nothing is written under ~/.cache.
    # insecure=True accepts the self-signed certificate.
    return arvados.api(
        "v1",
        host=os.environ["BERTH_SDK_HOST"],
        token=token,
        insecure=True,
        num_retries=0,
        cache=False,
    )


def runnable(name):
    return {
        "name": name,
        "state": "Committed",
        "priority": 500,
        "container_image": "localhost/busybox:latest",
        "command": ["echo", "hello"],
        "output_path": "/out",
        "cwd": "/out",
        "mounts": {"/out": {"kind": "tmp", "capacity": 1048576}},
        "runtime_constraints": {"ram": 67108864, "vcpus": 1},
    }


def check_current_user(api):
    me = api.users().current().execute()
    for field in (
        "uuid", "kind", "is_active", "is_admin", "owner_uuid", "username",
        "email", "full_name", "first_name", "last_name", "prefs",
    ):
        check(field in me, f"users.current lacks {field}: {me}")
    check(me["kind"] == "arvados#user", f"users.current kind: {me['kind']}")
    check(me["username"] == "sdkuser", f"users.current username: {me['username']}")
    check(me["is_admin"] is False, "users.current: sdkuser is an admin")
    check(isinstance(me["prefs"], dict), f"users.current prefs: {me['prefs']!r}")
    token = api.api_client_authorizations().current().execute()
    check(token["owner_uuid"] == me["uuid"], f"token owner {token['owner_uuid']} is not {me['uuid']}")
    return me


def create_and_get(api, me):
    created = api.container_requests().create(
        body={"container_request": runnable("sdk-main")}).execute()
    check(created["state"] == "Committed", f"created state: {created['state']}")
    check(created["owner_uuid"] == me["uuid"], f"created owner: {created['owner_uuid']}")
    check(created["container_uuid"], "the committed request has no container_uuid")
    check(created["priority"] == 500, f"created priority: {created['priority']}")

    fetched = api.container_requests().get(uuid=created["uuid"]).execute()
    for field in ("uuid", "state", "container_uuid", "command", "mounts", "priority"):
        check(fetched[field] == created[field],
              f"get {field}: {fetched[field]!r}, created {created[field]!r}")

    bare = api.container_requests().create(
        body={"name": "sdk-bare", "state": "Uncommitted"}).execute()
    check(bare["name"] == "sdk-bare" and bare["state"] == "Uncommitted",
          f"bare create: {bare['name']} {bare['state']}")
    return created


def list_with_filters_order_and_select(api, created):
    page = api.container_requests().list(
        filters=[["uuid", "=", created["uuid"]]],
        select=["uuid", "state", "container_uuid"],
        order=["created_at desc"],
        limit=10,
    ).execute()
    check(page["kind"] == "arvados#containerRequestList", f"list kind: {page['kind']}")
    check(page.get("items_available") == 1, f"items_available: {page.get('items_available')}")
    check(len(page["items"]) == 1, f"list by uuid gave {len(page['items'])} items")
    item = page["items"][0]
    check(item["uuid"] == created["uuid"], f"listed {item['uuid']}")
    unexpected = set(item) - {"uuid", "state", "container_uuid", "kind", "etag"}
    check(not unexpected, f"select kept other attributes: {sorted(unexpected)}")

    like = api.container_requests().list(
        filters=[["name", "like", "sdk-%"], ["uuid", "is_a", "arvados#containerRequest"]],
        order="name asc",
        count="none",
    ).execute()
    names = [i["name"] for i in like["items"]]
    check(names == ["sdk-bare", "sdk-main"], f"like + order by name: {names}")
    check("items_available" not in like, "count=none still sent items_available")

    where = api.container_requests().list(where={"state": "Committed"}).execute()
    check([i["uuid"] for i in where["items"]] == [created["uuid"]],
          f"where state=Committed: {[i['uuid'] for i in where['items']]}")


def page_with_keyset(api):
    expected = set()
    for n in range(PAGED_REQUESTS):
        request = api.container_requests().create(
            body={"container_request": {"name": f"page-{n:04d}"}}).execute()
        expected.add(request["uuid"])

    def small_pages(**kwargs):
        # keyset_list_all asks for 1000 items; fewer per page make it
        # follow its created_at >= / uuid != paging across pages.
        kwargs["limit"] = PAGE_SIZE
        return api.container_requests().list(**kwargs)

    seen = {}
    for item in arvados.util.keyset_list_all(
            small_pages, filters=[["name", "like", "page-%"]]):
        seen[item["uuid"]] = seen.get(item["uuid"], 0) + 1
    twice = [uuid for uuid, count in seen.items() if count > 1]
    check(not twice, f"keyset_list_all returned {len(twice)} requests more than once")
    missing = expected - set(seen)
    check(not missing, f"keyset_list_all missed {len(missing)} of {len(expected)} requests")
    extra = set(seen) - expected
    check(not extra, f"keyset_list_all returned {len(extra)} unexpected requests")
    return sorted(expected)


def list_with_long_url(api, uuids):
    # 260 uuids make a URL far past 2048 characters, so the SDK sends a
    # POST with X-Http-Method-Override: GET and a form body.
    call = api.container_requests().list(
        filters=[["uuid", "in", uuids]], select=["uuid"], limit=1000)
    page = call.execute()
    check(call.method == "POST" and call.headers.get("x-http-method-override") == "GET",
          f"the long list was sent as {call.method}, not as POST with the GET override")
    check(page.get("items_available") == len(uuids),
          f"long list: items_available {page.get('items_available')}, expected {len(uuids)}")
    listed = sorted(i["uuid"] for i in page["items"])
    check(listed == uuids, f"long list returned {len(listed)} of {len(uuids)} requests")


def container_and_cancel(api, created):
    container = api.containers().get(uuid=created["container_uuid"]).execute()
    check(container["state"] == "Queued", f"container state: {container['state']}")
    check(container["priority"] > 0, f"container priority: {container['priority']}")
    check(isinstance(container["runtime_status"], dict),
          f"runtime_status: {container['runtime_status']!r}")

    try:
        api.containers().current().execute()
        fail("containers.current answered a user's token")
    except arvados.errors.ApiError as err:
        check(err.resp.status == 404, f"containers.current for a user: status {err.resp.status}")

    system = client(os.environ["BERTH_SDK_SYSTEM_TOKEN"])
    locked = system.containers().lock(uuid=container["uuid"]).execute()
    check(locked["state"] == "Locked", f"lock: state {locked['state']}")
    own = client(locked["credentials"]["api_token"])
    current = own.containers().current().execute()
    check(current["uuid"] == container["uuid"], f"containers.current: {current['uuid']}")
    unlocked = system.containers().unlock(uuid=container["uuid"]).execute()
    check(unlocked["state"] == "Queued", f"unlock: state {unlocked['state']}")

    cancelled = api.container_requests().update(
        uuid=created["uuid"], body={"container_request": {"priority": 0}}).execute()
    check(cancelled["priority"] == 0, f"cancel: priority {cancelled['priority']}")
    held = api.containers().get(uuid=created["container_uuid"]).execute()
    check(held["priority"] == 0, f"cancelled request's container priority: {held['priority']}")


def secrets_reach_only_the_container(api):
    secret = "sdk-secret-value-0123"
    request = runnable("sdk-secrets")
    request["secret_mounts"] = {"/etc/secret.txt": {"kind": "text", "content": secret}}
    request["runtime_token"] = os.environ["BERTH_SDK_USER_TOKEN"]
    created = api.container_requests().create(body={"container_request": request}).execute()
    fetched = api.container_requests().get(uuid=created["uuid"]).execute()
    container = api.containers().get(uuid=created["container_uuid"]).execute()
    for name, record in (("create", created), ("get", fetched), ("container", container)):
        check("secret_mounts" not in record and "runtime_token" not in record,
              f"{name} returned a write-only attribute")
        check(secret not in repr(record), f"{name} returned the secret")

    system = client(os.environ["BERTH_SDK_SYSTEM_TOKEN"])
    locked = system.containers().lock(uuid=container["uuid"]).execute()
    own = client(locked["credentials"]["api_token"])
    mounts = own.containers().secret_mounts(uuid=container["uuid"]).execute()
    check(mounts == {"secret_mounts": request["secret_mounts"]}, "containers.secret_mounts: "
          f"{sorted(mounts.get('secret_mounts', {}))}")
    try:
        api.containers().secret_mounts(uuid=container["uuid"]).execute()
        fail("containers.secret_mounts answered the request's owner")
    except arvados.errors.ApiError as err:
        check(err.resp.status == 403, f"secret_mounts for the owner: status {err.resp.status}")
    system.containers().unlock(uuid=container["uuid"]).execute()
    api.container_requests().update(
        uuid=created["uuid"], body={"container_request": {"priority": 0}}).execute()


def collections_round_trip(api):
    """Write a collection through keep_services/accessible and the block
    routes, then read it back by UUID and by portable data hash."""
    # 3 MiB of varied bytes, one block, plus a small file and an empty one.
    big = bytes((i * 7 + i // 251) % 256 for i in range(3 * 1024 * 1024))
    written = arvados.collection.Collection(api_client=api, num_retries=0)
    with written.open("hello world.txt", "w") as f:
        f.write("hello\n")
    with written.open("dir/big.bin", "wb") as f:
        f.write(big)
    with written.open("dir/empty", "wb") as f:
        pass
    written.save_new(name="sdk collection")
    uuid = written.manifest_locator()
    pdh = written.portable_data_hash()
    record = api.collections().get(uuid=uuid).execute()
    check(record["portable_data_hash"] == pdh,
          f"collections.get: pdh {record['portable_data_hash']} != the SDK's {pdh}")
    check("+A" in record["manifest_text"], "collections.get: the manifest is not signed")
    check(record["file_count"] == 3, f"collections.get: file_count {record['file_count']}")

    for locator in (uuid, pdh):
        reader = arvados.collection.CollectionReader(locator, api_client=api, num_retries=0)
        with reader.open("hello world.txt", "r") as f:
            check(f.read() == "hello\n", f"read hello world.txt through {locator}")
        with reader.open("dir/big.bin", "rb") as f:
            check(f.read() == big, f"read dir/big.bin through {locator}")
        with reader.open("dir/empty", "rb") as f:
            check(f.read() == b"", f"read dir/empty through {locator}")

    listed = api.collections().list(
        filters=[["portable_data_hash", "=", pdh]], select=["uuid", "name"]).execute()
    check([item["uuid"] for item in listed["items"]] == [uuid],
          f"collections.list by pdh: {listed['items']}")
    api.collections().update(uuid=uuid, body={"collection": {"name": "renamed"}}).execute()
    check(api.collections().get(uuid=uuid).execute()["name"] == "renamed",
          "collections.update did not rename")
    api.collections().delete(uuid=uuid).execute()
    try:
        api.collections().get(uuid=uuid).execute()
        fail("get of a deleted collection succeeded")
    except arvados.errors.ApiError as err:
        check(err.resp.status == 404, f"deleted collection: status {err.resp.status}")


def missing_request_is_404(api):
    try:
        api.container_requests().get(uuid="zzzzz-xvhdp-000000000000000").execute()
        fail("get of a missing request succeeded")
    except arvados.errors.ApiError as err:
        check(err.resp.status == 404, f"missing request: status {err.resp.status}")


def main():
    api = client(os.environ["BERTH_SDK_USER_TOKEN"])
    me = check_current_user(api)
    created = create_and_get(api, me)
    list_with_filters_order_and_select(api, created)
    uuids = page_with_keyset(api)
    list_with_long_url(api, uuids)
    container_and_cancel(api, created)
    secrets_reach_only_the_container(api)
    missing_request_is_404(api)
    collections_round_trip(api)
    check_current_user(api)
    print("sdk_client: all checks passed")


if __name__ == "__main__":
    main()
