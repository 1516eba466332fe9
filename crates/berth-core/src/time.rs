//! Timestamps as the Arvados API writes them: UTC, RFC 3339, nine fractional
//! digits (`2016-10-28T19:20:09.320771000Z`).

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serializer};

pub type Timestamp = DateTime<Utc>;

pub fn format(t: &Timestamp) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

pub fn parse(s: &str) -> Result<Timestamp, chrono::ParseError> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc))
}

/// The maximum wait a `Retry-After` header may request; a longer one is
/// cut to this, so a wrong or hostile response cannot stall a client.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Reads an HTTP `Retry-After` value: delay-seconds (`120`) or an HTTP
/// date (`Wed, 21 Oct 2015 07:28:00 GMT`), measured from `now`. Returns
/// `None` for a value that is neither; a date in the past is no wait, and
/// a wait above [`MAX_RETRY_AFTER`] is cut to it.
pub fn retry_after(value: &str, now: Timestamp) -> Option<Duration> {
    let value = value.trim();
    let wait = if value.bytes().all(|b| b.is_ascii_digit()) && !value.is_empty() {
        // Digits only: more than u64 seconds is still "wait the longest".
        value
            .parse::<u64>()
            .map_or(MAX_RETRY_AFTER, Duration::from_secs)
    } else {
        let at = DateTime::parse_from_rfc2822(value)
            .ok()?
            .with_timezone(&Utc);
        (at - now).to_std().unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// [`retry_after`] measured from the current time.
pub fn retry_after_now(value: &str) -> Option<Duration> {
    retry_after(value, Utc::now())
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

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = parse("2015-10-21T07:27:00Z").unwrap();
        assert_eq!(retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        // A date in the past means no wait.
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn retry_after_caps_long_waits_and_rejects_garbage() {
        let now = parse("2015-10-21T07:27:00Z").unwrap();
        assert_eq!(retry_after("86400", now), Some(MAX_RETRY_AFTER));
        assert_eq!(
            retry_after("99999999999999999999999", now),
            Some(MAX_RETRY_AFTER)
        );
        for bad in ["", "-5", "1.5", "soon", "Wed, 99 Oct 2015"] {
            assert_eq!(retry_after(bad, now), None, "{bad:?}");
        }
    }
}
