//! OpenSSH public keys as the container record publishes them: the host
//! key of a container's gateway, and its fingerprint.
//!
//! A key is one line in the format of OpenSSH's `known_hosts` and
//! `*.pub` files: the algorithm name, a space, and the base64 of the key
//! blob. The blob itself starts with the algorithm name as an SSH string
//! (a 4-byte big-endian length, then the bytes), which must match. The
//! fingerprint is OpenSSH's default form (OpenSSH 6.8 and later):
//! `SHA256:` and the unpadded base64 of the blob's SHA-256.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine;
use sha2::{Digest, Sha256};

/// The host key algorithms a gateway may publish.
pub const HOST_KEY_ALGORITHMS: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512",
    "rsa-sha2-256",
    "ssh-rsa",
];

/// Largest key line accepted: an RSA key of 16384 bits is about 2.8 KB.
const MAX_KEY_LINE_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublicKeyError {
    #[error("is not an OpenSSH public key line: expected \"ALGORITHM BASE64\", such as the first two fields of a .pub file")]
    Format,
    #[error("has the algorithm {0:?}, which is not a host key algorithm; expected one of ssh-ed25519, ecdsa-sha2-nistp256/384/521, rsa-sha2-256/512 or ssh-rsa")]
    Algorithm(String),
    #[error("has a key that is not valid base64")]
    Base64,
    #[error("has a key blob that does not start with its algorithm name {0:?}")]
    Blob(String),
    #[error("is longer than {MAX_KEY_LINE_BYTES} bytes")]
    TooLong,
}

/// A checked OpenSSH public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    algorithm: String,
    blob: Vec<u8>,
}

impl PublicKey {
    /// Parses `ALGORITHM BASE64 [COMMENT]`; the comment is dropped.
    pub fn parse(line: &str) -> Result<PublicKey, PublicKeyError> {
        if line.len() > MAX_KEY_LINE_BYTES {
            return Err(PublicKeyError::TooLong);
        }
        let mut fields = line.split_ascii_whitespace();
        let (Some(algorithm), Some(encoded)) = (fields.next(), fields.next()) else {
            return Err(PublicKeyError::Format);
        };
        if !HOST_KEY_ALGORITHMS.contains(&algorithm) {
            return Err(PublicKeyError::Algorithm(algorithm.to_string()));
        }
        let blob = STANDARD
            .decode(encoded)
            .map_err(|_| PublicKeyError::Base64)?;
        // The blob names the key type: "ssh-rsa" for every RSA signature
        // algorithm.
        let key_type = if algorithm.starts_with("rsa-sha2-") {
            "ssh-rsa"
        } else {
            algorithm
        };
        if blob_key_type(&blob) != Some(key_type.as_bytes()) {
            return Err(PublicKeyError::Blob(key_type.to_string()));
        }
        Ok(PublicKey {
            algorithm: key_type.to_string(),
            blob,
        })
    }

    /// Returns the key as a line, `ALGORITHM BASE64`, without a comment.
    pub fn to_line(&self) -> String {
        format!("{} {}", self.algorithm, STANDARD.encode(&self.blob))
    }

    /// Returns the fingerprint as OpenSSH shows it: `SHA256:...`.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(&self.blob);
        format!("SHA256:{}", STANDARD_NO_PAD.encode(digest))
    }
}

/// Reads the SSH string at the start of a key blob.
fn blob_key_type(blob: &[u8]) -> Option<&[u8]> {
    let length = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?);
    let end = 4usize.checked_add(usize::try_from(length).ok()?)?;
    blob.get(4..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ed25519 host key made with `ssh-keygen -t ed25519`, and the
    /// fingerprint `ssh-keygen -lf` printed for it.
    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKf01Q1Af7I6Nsx4Es7W3tYPHCf0j12YKWsDt4C11+tA test@example";
    const ED25519_FINGERPRINT: &str = "SHA256:6nsgsSBSzQt6glxKj7U0Pvq02PmzQMvispZSECBQ5ng";

    fn ed25519_blob() -> Vec<u8> {
        let mut blob = Vec::new();
        blob.extend_from_slice(&11u32.to_be_bytes());
        blob.extend_from_slice(b"ssh-ed25519");
        blob.extend_from_slice(&32u32.to_be_bytes());
        blob.extend_from_slice(&[7u8; 32]);
        blob
    }

    #[test]
    fn parse_keeps_algorithm_and_blob() {
        let key = PublicKey::parse(ED25519).unwrap();
        assert_eq!(
            key.to_line(),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKf01Q1Af7I6Nsx4Es7W3tYPHCf0j12YKWsDt4C11+tA"
        );
    }

    #[test]
    fn fingerprint_matches_ssh_keygen() {
        let key = PublicKey::parse(ED25519).unwrap();
        assert_eq!(key.fingerprint(), ED25519_FINGERPRINT);
    }

    #[test]
    fn fingerprint_is_unpadded_sha256_of_the_blob() {
        let line = format!("ssh-ed25519 {}", STANDARD.encode(ed25519_blob()));
        let key = PublicKey::parse(&line).unwrap();
        let expected = format!(
            "SHA256:{}",
            STANDARD_NO_PAD.encode(Sha256::digest(ed25519_blob()))
        );
        assert_eq!(key.fingerprint(), expected);
        assert!(!key.fingerprint().ends_with('='));
    }

    #[test]
    fn parse_rejects_bad_lines() {
        let wrong_type = format!("ssh-ed25519 {}", STANDARD.encode(b"\0\0\0\x07ssh-rsa"));
        let cases = [
            ("", PublicKeyError::Format),
            ("ssh-ed25519", PublicKeyError::Format),
            (
                "ssh-dss AAAA",
                PublicKeyError::Algorithm("ssh-dss".to_string()),
            ),
            ("ssh-ed25519 not*base64", PublicKeyError::Base64),
            (
                wrong_type.as_str(),
                PublicKeyError::Blob("ssh-ed25519".to_string()),
            ),
            (
                "ssh-ed25519 AAAA",
                PublicKeyError::Blob("ssh-ed25519".to_string()),
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(PublicKey::parse(line).unwrap_err(), expected, "{line:?}");
        }
        let long = format!("ssh-ed25519 {}", "A".repeat(MAX_KEY_LINE_BYTES));
        assert_eq!(
            PublicKey::parse(&long).unwrap_err(),
            PublicKeyError::TooLong
        );
    }

    #[test]
    fn rsa_signature_names_read_an_ssh_rsa_blob() {
        let mut blob = Vec::new();
        blob.extend_from_slice(&7u32.to_be_bytes());
        blob.extend_from_slice(b"ssh-rsa");
        blob.extend_from_slice(&[1, 2, 3]);
        let line = format!("rsa-sha2-512 {}", STANDARD.encode(&blob));
        let key = PublicKey::parse(&line).unwrap();
        assert!(key.to_line().starts_with("ssh-rsa "));
    }
}
