//! The API client of the user commands (`run`, `ls`, `logs`, `cancel`), and
//! errors that tell the user what to fix.
//!
//! User commands read the controller's address and their token from
//! `BERTH_API_HOST` and `BERTH_API_TOKEN`, or from `ARVADOS_API_HOST` and
//! `ARVADOS_API_TOKEN` when those are unset. [`Api::explain`] turns the two
//! failures users meet most often, a rejected token and a controller that
//! cannot be reached, into messages that name the variable and the next
//! step.
//!
//! A *target* ([`Target`]) is what a user names on the command line: a
//! container request UUID (type code `xvhdp`) or a container UUID (`dz642`).

use anyhow::{anyhow, Context};
use berth_client::{Client, ClientError, Settings};
use berth_core::{ObjectType, Uuid};
use serde_json::Value;

/// A client of the controller named by the environment, and the names of
/// the variables its settings came from.
#[derive(Debug, Clone)]
pub struct Api {
    pub client: Client,
    host_variable: String,
    token_variable: String,
}

impl Api {
    /// Builds the client from `BERTH_API_*`, falling back to `ARVADOS_API_*`.
    pub fn from_env() -> anyhow::Result<Api> {
        Api::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds the client from a variable lookup (the environment, in
    /// [`Api::from_env`]).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Api> {
        let settings = Settings::from_lookup(&lookup).map_err(|err| {
            anyhow!("{err}; to start a controller on this host, run `berth dev` and then the export lines it prints")
        })?;
        let client = Client::new(settings).context("failed to build the API client")?;
        Ok(Api {
            client,
            host_variable: source_variable(&lookup, "API_HOST"),
            token_variable: source_variable(&lookup, "API_TOKEN"),
        })
    }

    /// Converts a client error into one that names the cause and the next
    /// step, for a rejected token and an unreachable controller.
    pub fn explain(&self, err: ClientError) -> anyhow::Error {
        let host = self
            .client
            .base_url()
            .as_str()
            .trim_end_matches('/')
            .to_string();
        match &err {
            ClientError::Api {
                status, message, ..
            } if status.as_u16() == 401 => anyhow!(
                "the controller at {host} rejected the token in {var} ({status}: {message}); \
                 set {var} to a valid API token (`berth dev` prints one for its user)",
                var = self.token_variable,
            ),
            ClientError::Transport { source, .. } if source.is_connect() => anyhow!(
                "failed to connect to the controller at {host} (from {var}): {cause}; \
                 check that {var} is right and the controller is running, \
                 or start one on this host with `berth dev`",
                var = self.host_variable,
                cause = root_cause(source),
            ),
            ClientError::Transport { source, .. } if source.is_timeout() => anyhow!(
                "timed out waiting for the controller at {host} (from {var})",
                var = self.host_variable,
            ),
            _ => anyhow::Error::new(err),
        }
    }

    /// Fetches the UUID of the user who owns the token.
    pub async fn current_user_uuid(&self) -> anyhow::Result<String> {
        let user = self
            .client
            .current_user()
            .await
            .map_err(|err| self.explain(err))
            .context("failed to look up the current user")?;
        user.get("uuid")
            .and_then(Value::as_str)
            .map(str::to_string)
            .context("the controller's response to users/current has no uuid")
    }
}

/// Returns the variable a setting came from: `BERTH_<suffix>` when it is set and
/// not empty, else `ARVADOS_<suffix>`, as in [`Settings::from_lookup`].
fn source_variable(lookup: &impl Fn(&str) -> Option<String>, suffix: &str) -> String {
    let berth = format!("BERTH_{suffix}");
    if lookup(&berth).is_some_and(|value| !value.is_empty()) {
        berth
    } else {
        format!("ARVADOS_{suffix}")
    }
}

/// Returns the innermost error of a chain. It names the real cause (such
/// as "Connection refused"), where the outer errors only report that a
/// request failed.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// A record a user names on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Request(Uuid),
    Container(Uuid),
}

impl Target {
    /// Parses a container request or container UUID; any other value is an
    /// error that names it.
    pub fn parse(value: &str) -> anyhow::Result<Target> {
        let expected = "expected a container request UUID (<cluster>-xvhdp-<15 characters>) \
                        or a container UUID (<cluster>-dz642-<15 characters>)";
        let uuid: Uuid = value
            .parse()
            .map_err(|_| anyhow!("invalid UUID {value:?}: {expected}"))?;
        match uuid.object_type() {
            Some(ObjectType::ContainerRequest) => Ok(Target::Request(uuid)),
            Some(ObjectType::Container) => Ok(Target::Container(uuid)),
            _ => Err(anyhow!(
                "UUID {value:?} has type code {:?}, which is neither a container request nor a container: {expected}",
                uuid.type_code()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    /// Serves one HTTP connection on a loopback port with a fixed 401
    /// response, and returns the server's base URL.
    async fn serve_one_unauthorized() -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let body = r#"{"errors":["invalid token"]}"#;
            let answer = format!(
                "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(answer.as_bytes()).await.unwrap();
        });
        format!("http://{address}")
    }

    #[test]
    fn request_and_container_uuids_are_told_apart() {
        assert_eq!(
            Target::parse("zzzzz-xvhdp-0123456789abcde").unwrap(),
            Target::Request("zzzzz-xvhdp-0123456789abcde".parse().unwrap())
        );
        assert_eq!(
            Target::parse("zzzzz-dz642-0123456789abcde").unwrap(),
            Target::Container("zzzzz-dz642-0123456789abcde".parse().unwrap())
        );
    }

    #[test]
    fn malformed_uuid_is_named_in_error() {
        let err = Target::parse("not-a-uuid").unwrap_err().to_string();
        assert!(err.contains("\"not-a-uuid\""), "{err}");
        assert!(err.contains("xvhdp"), "{err}");
    }

    #[test]
    fn uuid_of_other_type_is_named_in_error() {
        let err = Target::parse("zzzzz-tpzed-0123456789abcde")
            .unwrap_err()
            .to_string();
        assert!(err.contains("zzzzz-tpzed-0123456789abcde"), "{err}");
        assert!(err.contains("\"tpzed\""), "{err}");
    }

    #[test]
    fn missing_host_suggests_berth_dev() {
        let err = Api::from_lookup(lookup(&[("BERTH_API_TOKEN", "t")])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("BERTH_API_HOST"), "{text}");
        assert!(text.contains("berth dev"), "{text}");
    }

    #[tokio::test]
    async fn rejected_token_names_its_variable() {
        let host = serve_one_unauthorized().await;
        let api = Api::from_lookup(lookup(&[
            ("ARVADOS_API_HOST", &host),
            ("ARVADOS_API_TOKEN", "t"),
        ]))
        .unwrap();
        let err = api.client.current_user().await.unwrap_err();
        let text = api.explain(err).to_string();
        assert!(
            text.contains("rejected the token in ARVADOS_API_TOKEN"),
            "{text}"
        );
        assert!(text.contains(&host), "{text}");
        assert!(text.contains("invalid token"), "{text}");
    }

    #[tokio::test]
    async fn refused_connection_names_host_and_suggests_berth_dev() {
        // Bind a port, then free it, so that nothing listens there.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let host = format!("http://{address}");
        let api = Api::from_lookup(lookup(&[
            ("BERTH_API_HOST", &host),
            ("BERTH_API_TOKEN", "t"),
        ]))
        .unwrap();
        let err = api.client.current_user().await.unwrap_err();
        let text = api.explain(err).to_string();
        assert!(
            text.contains(&format!("failed to connect to the controller at {host}")),
            "{text}"
        );
        assert!(text.contains("from BERTH_API_HOST"), "{text}");
        assert!(text.contains("berth dev"), "{text}");
    }
}
