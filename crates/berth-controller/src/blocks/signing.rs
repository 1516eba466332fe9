//! Permission signatures of block locators, in Arvados Keep's form
//! `+A<signature>@<expiry>`.
//!
//! The signature is the lowercase hex HMAC-SHA1, keyed by the blob signing
//! key, of `<md5 hash>@<token uuid>@<expiry hex>`, where the expiry is in
//! seconds since the Unix epoch. The controller signs each locator it
//! returns (in a block write's response and in a collection's manifest)
//! for the token of the caller. A block read and a collection write accept a locator
//! only with an unexpired signature made for the caller's own token, so a
//! caller reaches only blocks it wrote or read through a collection it may
//! see. Signatures are compared in constant time.
//!
//! Arvados signs over the token's secret; Berth signs over the token's
//! uuid, which names the token as well, because every call that checks a
//! signature has authenticated that token first.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use berth_core::locator::Locator;
use berth_core::secret::constant_time_eq;
use berth_core::Secret;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::config::BlockConfig;

/// Shortest signing key a key file may hold, in bytes.
const MIN_KEY_BYTES: usize = 32;

/// The context string of a signing key derived from the system token, so
/// that the key differs from any other value derived from that token.
const DERIVED_KEY_CONTEXT: &[u8] = b"berth blob signing key";

/// A signing key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("failed to read the blob signing key file {path} (blocks.signing_key_file): {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid blob signing key file {path} (blocks.signing_key_file): it holds {length} bytes, but a key needs at least 32: write a long random string into it")]
    TooShort { path: PathBuf, length: usize },
}

type HmacSha1 = Hmac<Sha1>;

/// Makes and checks permission signatures. `Debug` never shows the key.
#[derive(Clone)]
pub struct BlobSigner {
    key: Vec<u8>,
    ttl_seconds: u64,
}

impl std::fmt::Debug for BlobSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobSigner")
            .field("ttl_seconds", &self.ttl_seconds)
            .finish_non_exhaustive()
    }
}

/// A rejected permission signature, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("locator {locator} has no permission signature (+A<signature>@<expiry>): use the locator the block write or the collection returned")]
    Missing { locator: String },
    #[error("the permission signature of locator {locator} expired at {expires_at} (Unix time): read the collection again for a fresh one")]
    Expired { locator: String, expires_at: u64 },
    #[error("the permission signature of locator {locator} is invalid for this token: use a locator signed for the token you call with")]
    Invalid { locator: String },
}

impl BlobSigner {
    /// Uses `key` for the HMAC; signatures last `ttl_seconds`.
    pub fn new(key: Vec<u8>, ttl_seconds: u64) -> BlobSigner {
        BlobSigner { key, ttl_seconds }
    }

    /// Builds the signer of a configuration: the key from
    /// `signing_key_file`, or else derived from the system token (the
    /// SHA-256 of a fixed context string, a zero byte and the token). A key
    /// file that group or others can read is logged as a warning.
    pub fn from_config(
        config: &BlockConfig,
        system_token: &Secret,
    ) -> Result<BlobSigner, SigningKeyError> {
        let key = match &config.signing_key_file {
            Some(path) => {
                let content = std::fs::read(path).map_err(|source| SigningKeyError::Read {
                    path: path.clone(),
                    source,
                })?;
                let key = content.trim_ascii().to_vec();
                if key.len() < MIN_KEY_BYTES {
                    return Err(SigningKeyError::TooShort {
                        path: path.clone(),
                        length: key.len(),
                    });
                }
                let mode = std::fs::metadata(path).map(|meta| meta.permissions().mode());
                if mode.is_ok_and(|mode| mode & 0o077 != 0) {
                    tracing::warn!(
                        path = %path.display(),
                        "the blob signing key file is readable by group or others: chmod 600 it"
                    );
                }
                key
            }
            None => {
                let mut digest = Sha256::new();
                digest.update(DERIVED_KEY_CONTEXT);
                digest.update([0u8]);
                digest.update(system_token.expose().as_bytes());
                digest.finalize().to_vec()
            }
        };
        Ok(BlobSigner::new(key, config.signature_ttl_seconds))
    }

    pub fn ttl_seconds(&self) -> u64 {
        self.ttl_seconds
    }

    fn hmac_hex(&self, hash: &str, token_uuid: &str, expires_at: u64) -> String {
        // HMAC takes a key of any length, so `new_from_slice` cannot fail;
        // were it to, the empty signature would match no given one.
        let Ok(mut mac) = HmacSha1::new_from_slice(&self.key) else {
            return String::new();
        };
        mac.update(hash.as_bytes());
        mac.update(b"@");
        mac.update(token_uuid.as_bytes());
        mac.update(b"@");
        mac.update(format!("{expires_at:x}").as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Returns the locator signed for `token_uuid`, valid for the TTL from
    /// `now` (Unix seconds). Any earlier signature is replaced.
    pub fn sign(&self, locator: &Locator, token_uuid: &str, now: u64) -> Locator {
        let expires_at = now.saturating_add(self.ttl_seconds);
        let hmac = self.hmac_hex(locator.hash(), token_uuid, expires_at);
        locator.with_signature(&hmac, expires_at)
    }

    /// Checks that the locator carries an unexpired signature made for
    /// `token_uuid`.
    pub fn verify(
        &self,
        locator: &Locator,
        token_uuid: &str,
        now: u64,
    ) -> Result<(), SignatureError> {
        let text = || locator.without_signature().to_string();
        let signature = locator
            .signature()
            .ok_or_else(|| SignatureError::Missing { locator: text() })?;
        let expected = self.hmac_hex(locator.hash(), token_uuid, signature.expires_at);
        let given = signature.hmac_hex.to_ascii_lowercase();
        if !constant_time_eq(expected.as_bytes(), given.as_bytes()) {
            return Err(SignatureError::Invalid { locator: text() });
        }
        if signature.expires_at <= now {
            return Err(SignatureError::Expired {
                locator: text(),
                expires_at: signature.expires_at,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "zzzzz-gj3su-000000000000001";
    const OTHER_TOKEN: &str = "zzzzz-gj3su-000000000000002";
    const NOW: u64 = 1_700_000_000;

    fn foo() -> Locator {
        Locator::parse("acbd18db4cc2f85cedef654fccc4a4d8+3").unwrap()
    }

    #[test]
    fn signed_locator_verifies() {
        let signer = BlobSigner::new(b"key".to_vec(), 3600);
        let signed = signer.sign(&foo(), TOKEN, NOW);
        let signature = signed.signature().unwrap();
        assert_eq!(signature.expires_at, NOW + 3600);
        assert_eq!(signature.hmac_hex.len(), 40);
        assert_eq!(signer.verify(&signed, TOKEN, NOW), Ok(()));
    }

    #[test]
    fn other_token_is_rejected() {
        let signer = BlobSigner::new(b"key".to_vec(), 3600);
        let signed = signer.sign(&foo(), TOKEN, NOW);
        let err = signer.verify(&signed, OTHER_TOKEN, NOW).unwrap_err();
        assert!(matches!(err, SignatureError::Invalid { .. }), "{err}");
    }

    #[test]
    fn other_key_is_rejected() {
        let signed = BlobSigner::new(b"key".to_vec(), 3600).sign(&foo(), TOKEN, NOW);
        let err = BlobSigner::new(b"other".to_vec(), 3600)
            .verify(&signed, TOKEN, NOW)
            .unwrap_err();
        assert!(matches!(err, SignatureError::Invalid { .. }), "{err}");
    }

    #[test]
    fn expired_signature_is_rejected() {
        let signer = BlobSigner::new(b"key".to_vec(), 60);
        let signed = signer.sign(&foo(), TOKEN, NOW);
        let err = signer.verify(&signed, TOKEN, NOW + 60).unwrap_err();
        assert!(matches!(err, SignatureError::Expired { .. }), "{err}");
    }

    #[test]
    fn moved_expiry_is_rejected() {
        let signer = BlobSigner::new(b"key".to_vec(), 60);
        let signed = signer.sign(&foo(), TOKEN, NOW);
        let hmac = signed.signature().unwrap().hmac_hex.to_string();
        let extended = foo().with_signature(&hmac, NOW + 10_000);
        let err = signer.verify(&extended, TOKEN, NOW + 100).unwrap_err();
        assert!(matches!(err, SignatureError::Invalid { .. }), "{err}");
    }

    #[test]
    fn short_key_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "short\n").unwrap();
        let config = BlockConfig {
            signing_key_file: Some(path),
            ..BlockConfig::default()
        };
        let err = BlobSigner::from_config(&config, &Secret::new("token")).unwrap_err();
        assert!(err.to_string().contains("at least 32"), "{err}");
    }

    #[test]
    fn key_file_and_derived_key_differ() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").unwrap();
        let from_file = BlobSigner::from_config(
            &BlockConfig {
                signing_key_file: Some(path),
                ..BlockConfig::default()
            },
            &Secret::new("token"),
        )
        .unwrap();
        assert_eq!(from_file.key, b"0123456789abcdef0123456789abcdef");
        let derived =
            BlobSigner::from_config(&BlockConfig::default(), &Secret::new("token")).unwrap();
        assert_eq!(derived.key.len(), 32);
        assert_ne!(derived.key, b"token");
    }

    #[test]
    fn unsigned_locator_is_missing() {
        let signer = BlobSigner::new(b"key".to_vec(), 60);
        let err = signer.verify(&foo(), TOKEN, NOW).unwrap_err();
        assert!(matches!(err, SignatureError::Missing { .. }), "{err}");
    }
}
