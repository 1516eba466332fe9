//! The controller over HTTPS on a real socket (port 0), with a self-signed
//! certificate, reached by berth-client as clients with
//! `ARVADOS_API_HOST_INSECURE=1` reach it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_client::{Client, Settings, Token};
use berth_controller::{bind, create_user, tls, Config};
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use crate::common::{cluster, SYSTEM_TOKEN};

/// How long one step against the server may take before the test fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// Writes a self-signed pair for 127.0.0.1 and localhost; returns the
/// certificate's and the key's paths.
pub(crate) fn write_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let pair = tls::self_signed(&["127.0.0.1", "localhost"], "berth test").unwrap();
    let certificate = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&certificate, &pair.certificate_pem).unwrap();
    std::fs::write(&key, &pair.key_pem).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (certificate, key)
}

fn tls_config(dir: &Path) -> Config {
    let (certificate, key) = write_pair(dir);
    let url = format!("sqlite://{}/berth.db", dir.display());
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), url);
    config.tls_certificate = Some(certificate);
    config.tls_key = Some(key);
    config
}

fn client(base_url: &str, token: &str, insecure: bool) -> Client {
    Client::new(Settings {
        base_url: berth_client::parse_api_host(base_url).unwrap(),
        token: Token::new(token),
        insecure,
    })
    .unwrap()
}

#[tokio::test]
async fn https_serves_insecure_clients_and_refuses_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let config = tls_config(dir.path());
    let bound = bind(cluster(), config.clone()).await.unwrap();
    let address = bound.local_addr();
    assert_ne!(address.port(), 0);
    assert_eq!(bound.scheme(), "https");
    assert_eq!(bound.url(), format!("https://{address}"));
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(bound.run(async move {
        let _ = stopped.await;
    }));

    // A client that stalls its handshake does not delay the others.
    let mut stalled = tokio::net::TcpStream::connect(address).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap();

    let alice_token = create_user(&cluster(), &config, "alice", false)
        .await
        .unwrap();
    // host:port, as ARVADOS_API_HOST gives it, means HTTPS.
    let host = address.to_string();
    let alice = client(&host, &alice_token, true);
    let me = tokio::time::timeout(STEP_TIMEOUT, alice.current_user())
        .await
        .expect("the HTTPS request did not end")
        .unwrap();
    assert_eq!(me["username"], "alice");
    let system = client(&format!("https://{address}"), SYSTEM_TOKEN, true);
    let authorization = system.current_api_client_authorization().await.unwrap();
    assert_eq!(authorization["uuid"], "zzzzz-gj3su-000000000000000");

    // A client that verifies certificates refuses the self-signed one.
    let verifying = client(&host, &alice_token, false);
    let err = tokio::time::timeout(STEP_TIMEOUT, verifying.current_user())
        .await
        .expect("the verifying request did not end")
        .unwrap_err();
    assert_eq!(err.status(), None, "no answer expected: {err}");

    // Plain HTTP to the TLS port gets no HTTP response.
    let plain = tokio::time::timeout(
        STEP_TIMEOUT,
        reqwest::get(format!("http://{address}/_health/ping")),
    )
    .await
    .expect("the plain HTTP request did not end");
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");

    drop(stalled);
    stop.send(()).unwrap();
    tokio::time::timeout(STEP_TIMEOUT, server)
        .await
        .expect("the controller did not stop")
        .unwrap()
        .unwrap();
    let refused = tokio::net::TcpStream::connect(address).await;
    assert!(refused.is_err(), "the port is closed after shutdown");
}

#[tokio::test]
async fn missing_certificate_file_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tls_config(dir.path());
    let missing = dir.path().join("missing-cert.pem");
    config.tls_certificate = Some(missing.clone());
    let err = bind(cluster(), config).await.unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains(&missing.display().to_string()),
        "{message}"
    );
    assert!(message.contains("tls_certificate"), "{message}");
    assert!(
        !dir.path().join("berth.db").exists(),
        "no database is made before the TLS files are read"
    );
}

#[tokio::test]
async fn bad_key_file_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = tls_config(dir.path());
    let key = config.tls_key.clone().unwrap();
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = bind(cluster(), config).await.unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains(&key.display().to_string()), "{message}");
    assert!(message.contains("tls_key"), "{message}");
    assert!(message.contains("not valid base64"), "{message}");
}

#[tokio::test]
async fn certificate_without_key_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tls_config(dir.path());
    config.tls_key = None;
    let err = bind(cluster(), config).await.unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("tls_key"), "{message}");
    assert!(message.contains("tls_certificate is set"), "{message}");
}
