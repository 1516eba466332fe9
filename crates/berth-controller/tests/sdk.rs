//! The real Arvados Python SDK against a controller on a real socket,
//! over HTTPS.
//!
//! Runs only with `BERTH_INTEGRATION=1` and `BERTH_TEST_PYTHON` naming a
//! Python that has `arvados-python-client` installed (scripts/test.sh
//! makes one in a virtual environment). The client script is
//! `tests/sdk/sdk_client.py`; it exits non-zero with a message on the
//! first mismatch.

#![allow(clippy::unwrap_used, clippy::expect_used)]

// The API tests' harness, for its database: SQLite in a temporary
// directory, or a fresh PostgreSQL schema when BERTH_TEST_DATABASE_URL is
// set.
#[allow(dead_code)]
#[path = "api/common.rs"]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use berth_controller::{bind, create_user, tls, ClusterSettings, Config};
use berth_core::Secret;
use tokio::sync::oneshot;

use common::TestDatabase;

const SYSTEM_TOKEN: &str = "system-token-for-sdk-tests-0123456789";

/// Time the script may take: it makes about 300 API calls.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

fn python() -> Option<String> {
    if std::env::var("BERTH_INTEGRATION").as_deref() != Ok("1") {
        eprintln!("skipped: set BERTH_INTEGRATION=1 and BERTH_TEST_PYTHON to run");
        return None;
    }
    match std::env::var("BERTH_TEST_PYTHON") {
        Ok(python) if !python.is_empty() => Some(python),
        _ => {
            eprintln!("skipped: BERTH_TEST_PYTHON is not set (scripts/test.sh sets it)");
            None
        }
    }
}

#[tokio::test]
async fn python_sdk_runs_its_calls() {
    let Some(python) = python() else { return };
    let home = tempfile::tempdir().unwrap();
    let database = TestDatabase::new().await;
    let cluster = ClusterSettings {
        cluster_id: "zzzzz".parse().unwrap(),
        system_token: Secret::new(SYSTEM_TOKEN),
    };
    // HTTPS with a self-signed certificate, which the client accepts
    // with insecure=True as with ARVADOS_API_HOST_INSECURE=1.
    let pair = tls::self_signed(&["127.0.0.1"], "berth sdk test").unwrap();
    let certificate = home.path().join("cert.pem");
    let key = home.path().join("key.pem");
    std::fs::write(&certificate, &pair.certificate_pem).unwrap();
    std::fs::write(&key, &pair.key_pem).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), database.url());
    config.tls_certificate = Some(certificate);
    config.tls_key = Some(key);
    config.blocks.directory = home.path().join("blocks");
    let user_token = create_user(&cluster, &config, "sdkuser", false)
        .await
        .unwrap();
    let bound = bind(cluster, config).await.unwrap();
    let address = bound.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(bound.run(async move {
        let _ = stopped.await;
    }));

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/sdk_client.py");
    let child = tokio::process::Command::new(&python)
        .arg(&script)
        .env("BERTH_SDK_HOST", address.to_string())
        .env("BERTH_SDK_USER_TOKEN", &user_token)
        .env("BERTH_SDK_SYSTEM_TOKEN", SYSTEM_TOKEN)
        .env("HOME", home.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| panic!("failed to start {python}: {err}"));
    let output = tokio::time::timeout(SCRIPT_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{} timed out after {SCRIPT_TIMEOUT:?}", script.display()))
        .unwrap();

    let _ = stop.send(());
    server.await.unwrap().unwrap();

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        script.display(),
        output.status
    );
    assert!(stdout.contains("all checks passed"), "stdout:\n{stdout}");
}
