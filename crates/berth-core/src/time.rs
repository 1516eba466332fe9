//! Timestamps as the Arvados API writes them: UTC, RFC 3339, nine fractional
//! digits (`2016-10-28T19:20:09.320771000Z`).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serializer};

pub type Timestamp = DateTime<Utc>;

pub fn format(t: &Timestamp) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

pub fn parse(s: &str) -> Result<Timestamp, chrono::ParseError> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc))
}

/// Serde helpers for `Timestamp` fields.
pub mod serde_ts {
    use super::*;

    pub fn serialize<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(t))
    }

    /// The error for a text that is no timestamp.
    pub(super) fn not_a_timestamp<E: serde::de::Error>(text: &str) -> E {
        E::custom(format!(
            "{text:?} is not a timestamp: expected RFC 3339 such as \"2026-12-04T12:00:00Z\""
        ))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(|_| not_a_timestamp(&text))
    }
}

/// Serde helpers for `Option<Timestamp>` fields; `None` is `null`.
pub mod serde_opt_ts {
    use super::*;

    pub fn serialize<S: Serializer>(t: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&format(t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| parse(&t).map_err(|_| super::serde_ts::not_a_timestamp(&t)))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_has_nine_fractional_digits() {
        let t = parse("2016-10-28T19:20:09.320771Z").unwrap();
        assert_eq!(format(&t), "2016-10-28T19:20:09.320771000Z");
    }
}
