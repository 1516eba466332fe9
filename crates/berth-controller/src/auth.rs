//! Token authentication: who is calling ([`Caller`]).
//!
//! A request carries `Authorization: Bearer <token>` (or `OAuth2 <token>`).
//! Three kinds of token exist:
//!
//! - the *system token*, a bare string from the cluster configuration. It
//!   acts as the system user `<cluster>-tpzed-000000000000000`, an
//!   administrator, with the token uuid `<cluster>-gj3su-000000000000000`.
//! - a *user token*, `v2/<token uuid>/<secret>`, minted by
//!   `berth admin create-user`.
//! - a *container token*, `v2/<token uuid>/<secret>/<container uuid>`,
//!   minted when a container is locked and revoked when it leaves Locked and
//!   Running. It reaches only its own container.
//!
//! The store keeps only the SHA-256 of each secret. Every comparison of a
//! secret is made on SHA-256 digests in constant time, so neither the
//! content nor the length of a secret leaks through timing.
//!
//! A request's `runtime_token` is a user token that its container runs as;
//! [`check_runtime_token`] checks it like an `Authorization` token, with
//! errors that name the field and never show the token.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use berth_core::secret::constant_time_eq;
use berth_core::{ClusterId, ObjectType, Secret, Uuid};
use rand::Rng;
use sha2::{Digest, Sha256};

use crate::api::AppState;
use crate::error::ApiError;
use crate::store::ApiToken;

/// Length of a generated secret.
const SECRET_LEN: usize = 50;

/// Characters of a generated secret.
const SECRET_ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// The random part of the system user's and system token's uuids.
const SYSTEM_SUFFIX: &str = "000000000000000";

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user the token acts as.
    pub user_uuid: String,
    /// The token's own uuid: `locked_by_uuid` of what it locks.
    pub token_uuid: String,
    /// Administrators and the system token see and may change everything.
    pub is_admin: bool,
    /// For a container token, the one container it may reach.
    pub container_uuid: Option<String>,
    pub scopes: Vec<String>,
}

impl Caller {
    pub fn is_container_token(&self) -> bool {
        self.container_uuid.is_some()
    }
}

/// Returns the uuid of the system user of a cluster.
pub fn system_user_uuid(cluster: &ClusterId) -> String {
    format!("{cluster}-{}-{SYSTEM_SUFFIX}", ObjectType::User.code())
}

/// Returns the uuid of the system token of a cluster.
pub fn system_token_uuid(cluster: &ClusterId) -> String {
    format!(
        "{cluster}-{}-{SYSTEM_SUFFIX}",
        ObjectType::ApiClientAuthorization.code()
    )
}

/// Computes the SHA-256 digest of a secret.
pub fn secret_digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Computes the lowercase hex SHA-256 of a secret, as the store keeps it.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(secret_digest(secret))
}

/// Generates a random secret of 50 lowercase letters and digits (about
/// 258 bits).
pub fn generate_secret() -> String {
    let mut rng = rand::thread_rng();
    (0..SECRET_LEN)
        .map(|_| SECRET_ALPHABET[rng.gen_range(0..SECRET_ALPHABET.len())] as char)
        .collect()
}

/// Extracts the token from an `Authorization` header value.
fn bearer_token(header: &str) -> Result<&str, ApiError> {
    let (scheme, token) = header
        .trim()
        .split_once(char::is_whitespace)
        .ok_or_else(|| {
            ApiError::Unauthorized(
                "the Authorization header has no token: send \"Authorization: Bearer <token>\""
                    .into(),
            )
        })?;
    if !scheme.eq_ignore_ascii_case("bearer") && !scheme.eq_ignore_ascii_case("oauth2") {
        return Err(ApiError::Unauthorized(format!(
            "unsupported Authorization scheme {scheme:?}: send \"Authorization: Bearer <token>\""
        )));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(ApiError::Unauthorized(
            "the Authorization header has an empty token".into(),
        ));
    }
    Ok(token)
}

/// The parts of a `v2/<uuid>/<secret>[/<container uuid>]` token.
struct V2Token<'a> {
    uuid: &'a str,
    secret: &'a str,
    container_uuid: Option<&'a str>,
}

fn parse_v2(token: &str) -> Option<V2Token<'_>> {
    let rest = token.strip_prefix("v2/")?;
    let mut parts = rest.split('/');
    let uuid = parts.next()?;
    let secret = parts.next()?;
    let container_uuid = parts.next();
    if parts.next().is_some() || secret.is_empty() {
        return None;
    }
    Uuid::parse_as(uuid, ObjectType::ApiClientAuthorization).ok()?;
    Some(V2Token {
        uuid,
        secret,
        container_uuid,
    })
}

/// Looks up the stored token of a v2 token and checks its secret in
/// constant time. `None` when the store has no token with that uuid and
/// secret.
async fn find_token(state: &AppState, parsed: &V2Token<'_>) -> Result<Option<ApiToken>, ApiError> {
    let stored = state
        .store()
        .get_token(parsed.uuid)
        .await
        .map_err(ApiError::store("look up a token"))?;
    let presented = hex::encode(secret_digest(parsed.secret));
    Ok(stored
        .filter(|stored| constant_time_eq(presented.as_bytes(), stored.secret_sha256.as_bytes())))
}

fn invalid_token() -> ApiError {
    ApiError::Unauthorized("invalid or revoked API token".into())
}

/// Authenticates the token of a request's `Authorization` header.
pub async fn authenticate(state: &AppState, header: Option<&str>) -> Result<Caller, ApiError> {
    let header = header.ok_or_else(|| {
        ApiError::Unauthorized(
            "no Authorization header: send \"Authorization: Bearer <token>\"".into(),
        )
    })?;
    let token = bearer_token(header)?;
    let cluster = &state.cluster().cluster_id;

    if constant_time_eq(&secret_digest(token), state.system_token_digest()) {
        return Ok(Caller {
            user_uuid: system_user_uuid(cluster),
            token_uuid: system_token_uuid(cluster),
            is_admin: true,
            container_uuid: None,
            scopes: vec!["all".into()],
        });
    }

    let parsed = parse_v2(token).ok_or_else(invalid_token)?;
    let stored = find_token(state, &parsed)
        .await?
        .ok_or_else(invalid_token)?;
    if !stored.is_valid_at(&chrono::Utc::now()) {
        return Err(invalid_token());
    }
    // A container token names its container; it must be the one the token
    // was minted for, and a user token must not name one.
    if parsed.container_uuid.is_some() && parsed.container_uuid != stored.container_uuid.as_deref()
    {
        return Err(invalid_token());
    }

    let is_admin = if stored.owner_uuid == system_user_uuid(cluster) {
        true
    } else {
        let user = state
            .store()
            .get_user(&stored.owner_uuid)
            .await
            .map_err(ApiError::store("look up a user"))?
            .ok_or_else(invalid_token)?;
        if !user.is_active {
            return Err(ApiError::Unauthorized(format!(
                "user {} is not active",
                user.username
            )));
        }
        user.is_admin
    };
    Ok(Caller {
        user_uuid: stored.owner_uuid,
        token_uuid: stored.uuid,
        // A container token acts for its container only, even when an
        // administrator owns it.
        is_admin: is_admin && stored.container_uuid.is_none(),
        container_uuid: stored.container_uuid,
        scopes: stored.scopes,
    })
}

/// The user and scopes a container runs as, from a request's runtime
/// token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeIdentity {
    pub user_uuid: String,
    pub scopes: Vec<String>,
}

/// Maximum length of the secret part of a runtime token, far above the 50
/// characters of the tokens Berth mints.
const MAX_RUNTIME_SECRET_LEN: usize = 512;

fn invalid_runtime_token(reason: &str) -> ApiError {
    ApiError::invalid(format!("runtime_token: {reason}"))
}

/// Checks a request's runtime token for `caller`, who sets it or commits
/// the request: a user token (`v2/UUID/SECRET`, not a container token)
/// that the store has, with that secret, neither revoked nor expired, of
/// an active user. Only administrators may give another user's token.
/// Returns the user and scopes the container then runs as.
pub async fn check_runtime_token(
    state: &AppState,
    caller: &Caller,
    token: &Secret,
) -> Result<RuntimeIdentity, ApiError> {
    let parsed = parse_v2(token.expose()).ok_or_else(|| {
        invalid_runtime_token("is not a user token: give a token of the form v2/UUID/SECRET")
    })?;
    if parsed.container_uuid.is_some() {
        return Err(invalid_runtime_token(
            "is a container token: give a user token of the form v2/UUID/SECRET",
        ));
    }
    let secret_is_plain = parsed.secret.len() <= MAX_RUNTIME_SECRET_LEN
        && parsed.secret.bytes().all(|b| b.is_ascii_alphanumeric());
    if !secret_is_plain {
        return Err(invalid_runtime_token(
            "is not a user token: its secret part must be letters and digits",
        ));
    }
    let unknown = || {
        invalid_runtime_token(
            "is not a token of this cluster: check that you copied the whole token",
        )
    };
    let stored = find_token(state, &parsed).await?.ok_or_else(unknown)?;
    // Only a caller who has the secret gets past this point, so the
    // messages below tell nothing to anyone who guesses.
    if stored.container_uuid.is_some() {
        return Err(invalid_runtime_token(
            "is a container token: give a user token of the form v2/UUID/SECRET",
        ));
    }
    if stored.revoked_at.is_some() {
        return Err(invalid_runtime_token(
            "has been revoked: give a current token",
        ));
    }
    if !stored.is_valid_at(&chrono::Utc::now()) {
        return Err(invalid_runtime_token("has expired: give a current token"));
    }
    let user = state
        .store()
        .get_user(&stored.owner_uuid)
        .await
        .map_err(ApiError::store("look up a user"))?
        .ok_or_else(unknown)?;
    if !user.is_active {
        return Err(invalid_runtime_token(&format!(
            "belongs to user {}, who is not active",
            user.username
        )));
    }
    if user.uuid != caller.user_uuid && !caller.is_admin {
        return Err(invalid_runtime_token(
            "belongs to another user: give a token of your own, or ask an administrator to set it",
        ));
    }
    Ok(RuntimeIdentity {
        user_uuid: user.uuid,
        scopes: stored.scopes,
    })
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        let header = match parts.headers.get(AUTHORIZATION) {
            None => None,
            Some(value) => Some(value.to_str().map_err(|_| {
                ApiError::Unauthorized("the Authorization header is not valid text".into())
            })?),
        };
        authenticate(state, header).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_oauth2_schemes_are_accepted() {
        assert_eq!(bearer_token("Bearer abc").ok(), Some("abc"));
        assert_eq!(bearer_token("OAuth2 abc").ok(), Some("abc"));
        assert_eq!(bearer_token("bearer   abc ").ok(), Some("abc"));
        assert!(bearer_token("Basic abc").is_err());
        assert!(bearer_token("Bearer").is_err());
        assert!(bearer_token("Bearer  ").is_err());
    }

    #[test]
    fn v2_tokens_parse_with_and_without_container() {
        let user = parse_v2("v2/zzzzz-gj3su-0123456789abcde/secret").unwrap();
        assert_eq!(user.uuid, "zzzzz-gj3su-0123456789abcde");
        assert_eq!(user.secret, "secret");
        assert_eq!(user.container_uuid, None);
        let container =
            parse_v2("v2/zzzzz-gj3su-0123456789abcde/secret/zzzzz-dz642-0123456789abcde").unwrap();
        assert_eq!(
            container.container_uuid,
            Some("zzzzz-dz642-0123456789abcde")
        );
        for bad in [
            "v2/zzzzz-gj3su-0123456789abcde",
            "v2/zzzzz-gj3su-0123456789abcde/",
            "v2/zzzzz-tpzed-0123456789abcde/secret",
            "v2/a/b/c/d",
            "v3/zzzzz-gj3su-0123456789abcde/secret",
        ] {
            assert!(parse_v2(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn generated_secrets_differ_and_hash_to_hex() {
        let a = generate_secret();
        let b = generate_secret();
        assert_eq!(a.len(), SECRET_LEN);
        assert_ne!(a, b);
        assert_eq!(hash_secret("abc").len(), 64);
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn system_uuids_have_their_type_codes() {
        let cluster: ClusterId = "zzzzz".parse().unwrap();
        assert_eq!(system_user_uuid(&cluster), "zzzzz-tpzed-000000000000000");
        assert_eq!(system_token_uuid(&cluster), "zzzzz-gj3su-000000000000000");
    }
}
