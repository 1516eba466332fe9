//! Record identifiers: `<cluster id>-<type code>-<15 characters>`.
//!
//! All three parts are lowercase ASCII letters and digits. The type code is
//! the one Arvados uses for the same kind of record, so that Arvados clients
//! recognise Berth's UUIDs.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Length of the random part of a UUID.
const RANDOM_LEN: usize = 15;

/// Characters of the random part.
const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UuidError {
    #[error("invalid UUID {value:?}: expected <cluster id>-<type code>-<15 characters>, all lowercase letters and digits")]
    Malformed { value: String },
    #[error("invalid UUID {value:?}: type code {code:?} is not a {expected}")]
    WrongType {
        value: String,
        code: String,
        expected: &'static str,
    },
    #[error("invalid cluster id {value:?}: expected 5 lowercase letters or digits, for example \"zzzzz\"")]
    ClusterId { value: String },
}

/// The kinds of record Berth stores, with Arvados's type codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectType {
    Container,
    ContainerRequest,
    Collection,
    Log,
    User,
    ApiClientAuthorization,
    Group,
    Link,
    KeepService,
    Workflow,
}

impl ObjectType {
    pub const ALL: [ObjectType; 10] = [
        ObjectType::Container,
        ObjectType::ContainerRequest,
        ObjectType::Collection,
        ObjectType::Log,
        ObjectType::User,
        ObjectType::ApiClientAuthorization,
        ObjectType::Group,
        ObjectType::Link,
        ObjectType::KeepService,
        ObjectType::Workflow,
    ];

    /// Returns the five-character type code in the middle of a UUID.
    pub fn code(self) -> &'static str {
        match self {
            ObjectType::Container => "dz642",
            ObjectType::ContainerRequest => "xvhdp",
            ObjectType::Collection => "4zz18",
            ObjectType::Log => "57u5n",
            ObjectType::User => "tpzed",
            ObjectType::ApiClientAuthorization => "gj3su",
            ObjectType::Group => "j7d0g",
            ObjectType::Link => "o0j2j",
            ObjectType::KeepService => "bi6l4",
            ObjectType::Workflow => "7fd4e",
        }
    }

    /// Returns the `kind` field of records of this type, as in
    /// `arvados#container`.
    pub fn kind(self) -> &'static str {
        match self {
            ObjectType::Container => "arvados#container",
            ObjectType::ContainerRequest => "arvados#containerRequest",
            ObjectType::Collection => "arvados#collection",
            ObjectType::Log => "arvados#log",
            ObjectType::User => "arvados#user",
            ObjectType::ApiClientAuthorization => "arvados#apiClientAuthorization",
            ObjectType::Group => "arvados#group",
            ObjectType::Link => "arvados#link",
            ObjectType::KeepService => "arvados#keepService",
            ObjectType::Workflow => "arvados#workflow",
        }
    }

    pub fn from_code(code: &str) -> Option<ObjectType> {
        ObjectType::ALL.into_iter().find(|t| t.code() == code)
    }
}

/// A cluster id: five lowercase letters or digits, the prefix of every UUID
/// the cluster makes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterId(String);

impl ClusterId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ClusterId {
    type Error = UuidError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        if value.len() == 5 && is_lower_alnum(&value) {
            Ok(ClusterId(value))
        } else {
            Err(UuidError::ClusterId { value })
        }
    }
}

impl FromStr for ClusterId {
    type Err = UuidError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ClusterId::try_from(s.to_string())
    }
}

impl From<ClusterId> for String {
    fn from(id: ClusterId) -> String {
        id.0
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated record UUID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Uuid(String);

impl Uuid {
    /// Makes a new random UUID of the given type in the given cluster.
    pub fn generate(cluster: &ClusterId, object_type: ObjectType) -> Uuid {
        let mut rng = rand::thread_rng();
        let random: String = (0..RANDOM_LEN)
            .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
            .collect();
        Uuid(format!("{}-{}-{}", cluster, object_type.code(), random))
    }

    /// Parses a UUID and checks that it names a record of `expected` type.
    pub fn parse_as(value: &str, expected: ObjectType) -> Result<Uuid, UuidError> {
        let uuid: Uuid = value.parse()?;
        if uuid.type_code() != expected.code() {
            return Err(UuidError::WrongType {
                value: value.to_string(),
                code: uuid.type_code().to_string(),
                expected: expected.kind(),
            });
        }
        Ok(uuid)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn cluster_id(&self) -> &str {
        &self.0[..5]
    }

    pub fn type_code(&self) -> &str {
        &self.0[6..11]
    }

    /// Returns the record type, when Berth has a type with this code.
    pub fn object_type(&self) -> Option<ObjectType> {
        ObjectType::from_code(self.type_code())
    }
}

/// Returns true if `value` has the shape of a UUID, whatever its type code.
pub fn is_uuid(value: &str) -> bool {
    let bytes = value.as_bytes();
    bytes.len() == 5 + 1 + 5 + 1 + RANDOM_LEN
        && bytes[5] == b'-'
        && bytes[11] == b'-'
        && is_lower_alnum(&value[..5])
        && is_lower_alnum(&value[6..11])
        && is_lower_alnum(&value[12..])
}

fn is_lower_alnum(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

impl FromStr for Uuid {
    type Err = UuidError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if is_uuid(s) {
            Ok(Uuid(s.to_string()))
        } else {
            Err(UuidError::Malformed {
                value: s.to_string(),
            })
        }
    }
}

impl TryFrom<String> for Uuid {
    type Error = UuidError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Uuid> for String {
    fn from(uuid: Uuid) -> String {
        uuid.0
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> ClusterId {
        "zzzzz".parse().unwrap()
    }

    #[test]
    fn generated_uuid_has_type_code_and_length() {
        let uuid = Uuid::generate(&cluster(), ObjectType::Container);
        assert_eq!(uuid.as_str().len(), 27);
        assert!(uuid.as_str().starts_with("zzzzz-dz642-"));
        assert_eq!(uuid.object_type(), Some(ObjectType::Container));
        assert!(is_uuid(uuid.as_str()));
    }

    #[test]
    fn generated_uuids_differ() {
        let a = Uuid::generate(&cluster(), ObjectType::ContainerRequest);
        let b = Uuid::generate(&cluster(), ObjectType::ContainerRequest);
        assert_ne!(a, b);
    }

    #[test]
    fn type_codes_match_arvados() {
        let expected = [
            (ObjectType::Container, "dz642"),
            (ObjectType::ContainerRequest, "xvhdp"),
            (ObjectType::Collection, "4zz18"),
            (ObjectType::Log, "57u5n"),
            (ObjectType::User, "tpzed"),
            (ObjectType::ApiClientAuthorization, "gj3su"),
            (ObjectType::Group, "j7d0g"),
            (ObjectType::Link, "o0j2j"),
            (ObjectType::KeepService, "bi6l4"),
            (ObjectType::Workflow, "7fd4e"),
        ];
        for (object_type, code) in expected {
            assert_eq!(object_type.code(), code);
            assert_eq!(ObjectType::from_code(code), Some(object_type));
        }
    }

    #[test]
    fn malformed_uuids_are_rejected() {
        for bad in [
            "",
            "zzzzz-dz642-",
            "zzzzz-dz642-0123456789abcd",
            "zzzzz-dz642-0123456789abcdef",
            "ZZZZZ-dz642-0123456789abcde",
            "zzzzz_dz642_0123456789abcde",
            "zzzzz-dz642-0123456789abcdé",
            "zzzz-dz6420-123456789abcdef",
        ] {
            assert!(bad.parse::<Uuid>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn parse_as_checks_type() {
        let ok = Uuid::parse_as("zzzzz-dz642-0123456789abcde", ObjectType::Container);
        assert!(ok.is_ok());
        let err = Uuid::parse_as("zzzzz-xvhdp-0123456789abcde", ObjectType::Container).unwrap_err();
        assert!(err.to_string().contains("arvados#container"), "{err}");
    }

    #[test]
    fn cluster_id_validation() {
        assert!("zzzzz".parse::<ClusterId>().is_ok());
        assert!("x1y2z".parse::<ClusterId>().is_ok());
        for bad in ["zzzz", "zzzzzz", "ZZZZZ", "zz-zz"] {
            assert!(bad.parse::<ClusterId>().is_err(), "{bad:?} accepted");
        }
    }
}
