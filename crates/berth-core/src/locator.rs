//! Block locators, as Arvados Keep writes them: `<md5 hex>+<size>`
//! followed by optional hints, each `+` and an uppercase letter and then
//! any characters but `+` and whitespace.
//!
//! The one hint Berth gives meaning to is the permission signature
//! `+A<signature hex>@<expiry hex>`: proof that the controller let a
//! caller's token read or write the block until the expiry (seconds since
//! the Unix epoch, in hex). Other hints are kept as they are and never
//! trusted.

use std::fmt;

/// The hash part of the locator of the empty block.
pub const EMPTY_BLOCK_HASH: &str = "d41d8cd98f00b204e9800998ecf8427e";

/// The locator of the empty block, which zero-length files point at.
pub const EMPTY_BLOCK_LOCATOR: &str = "d41d8cd98f00b204e9800998ecf8427e+0";

/// A parsed block locator.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Locator {
    /// 32 lowercase hex digits: the MD5 of the block's bytes.
    hash: String,
    /// The block's length in bytes.
    size: u64,
    /// The hints after the size, without their leading `+`.
    hints: Vec<String>,
}

/// A permission signature hint of a locator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature<'a> {
    /// The HMAC, in lowercase hex.
    pub hmac_hex: &'a str,
    /// Seconds since the Unix epoch after which the signature is invalid.
    pub expires_at: u64,
}

/// An invalid block locator, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid block locator {locator:?}: {reason}")]
pub struct LocatorError {
    pub locator: String,
    pub reason: &'static str,
}

/// True for 32 lowercase hex digits.
pub fn is_md5_hex(text: &str) -> bool {
    text.len() == 32
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Locator {
    /// Builds a locator without hints.
    pub fn new(hash: &str, size: u64) -> Result<Locator, LocatorError> {
        if !is_md5_hex(hash) {
            return Err(LocatorError {
                locator: hash.to_string(),
                reason: "the hash must be 32 lowercase hex digits",
            });
        }
        Ok(Locator {
            hash: hash.to_string(),
            size,
            hints: Vec::new(),
        })
    }

    /// Parses `<md5>+<size>[+<hint>...]`.
    pub fn parse(text: &str) -> Result<Locator, LocatorError> {
        let error = |reason| LocatorError {
            locator: text.to_string(),
            reason,
        };
        let mut parts = text.split('+');
        let hash = parts.next().unwrap_or("");
        if !is_md5_hex(hash) {
            return Err(error("it must start with 32 lowercase hex digits"));
        }
        let size_text = parts
            .next()
            .ok_or_else(|| error("the size is missing: expected <md5>+<size>"))?;
        if size_text.is_empty() || !size_text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(error("the size after the hash must be a decimal number"));
        }
        let size = size_text
            .parse::<u64>()
            .map_err(|_| error("the size is too large"))?;
        let mut hints = Vec::new();
        for hint in parts {
            let starts_upper = hint.bytes().next().is_some_and(|b| b.is_ascii_uppercase());
            if !starts_upper {
                return Err(error("each hint must start with an uppercase letter"));
            }
            if hint
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
            {
                return Err(error("a hint contains whitespace or a control character"));
            }
            hints.push(hint.to_string());
        }
        Ok(Locator {
            hash: hash.to_string(),
            size,
            hints,
        })
    }

    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn hints(&self) -> &[String] {
        &self.hints
    }

    /// Returns `<md5>+<size>`, without hints: the form the portable data
    /// hash is computed over.
    pub fn bare(&self) -> String {
        format!("{}+{}", self.hash, self.size)
    }

    /// Returns the locator without its permission signatures, keeping
    /// other hints.
    pub fn without_signature(&self) -> Locator {
        Locator {
            hash: self.hash.clone(),
            size: self.size,
            hints: self
                .hints
                .iter()
                .filter(|hint| !hint.starts_with('A'))
                .cloned()
                .collect(),
        }
    }

    /// Returns the locator with `A<hmac_hex>@<expiry hex>` as its only
    /// permission hint, placed right after the size as Keep does.
    pub fn with_signature(&self, hmac_hex: &str, expires_at: u64) -> Locator {
        let mut hints = vec![format!("A{hmac_hex}@{expires_at:x}")];
        hints.extend(
            self.hints
                .iter()
                .filter(|hint| !hint.starts_with('A'))
                .cloned(),
        );
        Locator {
            hash: self.hash.clone(),
            size: self.size,
            hints,
        }
    }

    /// Returns the first permission signature, or `None` when there is none
    /// or it is malformed.
    pub fn signature(&self) -> Option<Signature<'_>> {
        let hint = self.hints.iter().find(|hint| hint.starts_with('A'))?;
        let (hmac_hex, expiry_hex) = hint[1..].split_once('@')?;
        let is_hex = |text: &str| !text.is_empty() && text.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_hex(hmac_hex) || !is_hex(expiry_hex) || expiry_hex.len() > 16 {
            return None;
        }
        let expires_at = u64::from_str_radix(expiry_hex, 16).ok()?;
        Some(Signature {
            hmac_hex,
            expires_at,
        })
    }
}

impl fmt::Display for Locator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{}", self.hash, self.size)?;
        for hint in &self.hints {
            write!(f, "+{hint}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Locator {
    type Err = LocatorError;

    fn from_str(text: &str) -> Result<Locator, LocatorError> {
        Locator::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bare_locator() {
        let locator = Locator::parse("acbd18db4cc2f85cedef654fccc4a4d8+3").unwrap();
        assert_eq!(locator.hash(), "acbd18db4cc2f85cedef654fccc4a4d8");
        assert_eq!(locator.size(), 3);
        assert!(locator.hints().is_empty());
        assert_eq!(locator.to_string(), "acbd18db4cc2f85cedef654fccc4a4d8+3");
    }

    #[test]
    fn parses_signed_locator_with_hints() {
        let text = "acbd18db4cc2f85cedef654fccc4a4d8+3+A1f4b0bc7583c2a7f9102c395f4ffc5e3e3fdd6f7@565f7801+K@zzzzz";
        let locator = Locator::parse(text).unwrap();
        assert_eq!(locator.to_string(), text);
        let signature = locator.signature().unwrap();
        assert_eq!(
            signature.hmac_hex,
            "1f4b0bc7583c2a7f9102c395f4ffc5e3e3fdd6f7"
        );
        assert_eq!(signature.expires_at, 0x565f7801);
        assert_eq!(
            locator.without_signature().to_string(),
            "acbd18db4cc2f85cedef654fccc4a4d8+3+K@zzzzz"
        );
        assert_eq!(locator.bare(), "acbd18db4cc2f85cedef654fccc4a4d8+3");
    }

    #[test]
    fn signing_replaces_old_signature() {
        let locator = Locator::parse("acbd18db4cc2f85cedef654fccc4a4d8+3+Aabc@10+K@x").unwrap();
        let signed = locator.with_signature("def0", 0x20);
        assert_eq!(
            signed.to_string(),
            "acbd18db4cc2f85cedef654fccc4a4d8+3+Adef0@20+K@x"
        );
    }

    #[test]
    fn rejects_malformed_locators() {
        for (text, reason) in [
            ("acbd18db4cc2f85cedef654fccc4a4d", "32 lowercase hex"),
            ("ACBD18DB4CC2F85CEDEF654FCCC4A4D8+3", "32 lowercase hex"),
            ("acbd18db4cc2f85cedef654fccc4a4d8", "size is missing"),
            ("acbd18db4cc2f85cedef654fccc4a4d8+", "decimal number"),
            ("acbd18db4cc2f85cedef654fccc4a4d8+-3", "decimal number"),
            ("acbd18db4cc2f85cedef654fccc4a4d8+3+a", "uppercase letter"),
            (
                "acbd18db4cc2f85cedef654fccc4a4d8+99999999999999999999",
                "too large",
            ),
        ] {
            let err = Locator::parse(text).unwrap_err();
            assert!(err.to_string().contains(reason), "{text}: {err}");
        }
    }

    #[test]
    fn malformed_signature_is_none() {
        let locator = Locator::parse("acbd18db4cc2f85cedef654fccc4a4d8+3+Axyz@10").unwrap();
        assert!(locator.signature().is_none());
        let locator = Locator::parse("acbd18db4cc2f85cedef654fccc4a4d8+3+Aab").unwrap();
        assert!(locator.signature().is_none());
    }
}
