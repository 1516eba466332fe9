//! Container priority, computed from the requests that want the container.
//!
//! For a top-level request the contribution is `priority * 2^50 -
//! created_at_ms`: a higher request priority wins, and among equal
//! priorities the older request wins. A container's priority is the maximum
//! over its committed requests with priority > 0, or 0 when there is none.

use crate::time::Timestamp;

/// Highest priority a user may give a request.
pub const MAX_REQUEST_PRIORITY: i64 = 1000;

/// The contribution of one top-level request to its container's priority.
pub fn request_contribution(request_priority: i64, created_at: &Timestamp) -> i64 {
    if request_priority <= 0 {
        return 0;
    }
    (request_priority << 50) - created_at.timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::parse;

    #[test]
    fn higher_priority_wins_then_older() {
        let old = parse("2020-01-01T00:00:00Z").unwrap();
        let new = parse("2024-01-01T00:00:00Z").unwrap();
        assert!(request_contribution(2, &new) > request_contribution(1, &old));
        assert!(request_contribution(1, &old) > request_contribution(1, &new));
        assert_eq!(request_contribution(0, &old), 0);
        assert!(request_contribution(MAX_REQUEST_PRIORITY, &new) > 0);
    }

    /// A container priority Arvados reports, 562948375092493200, is the
    /// contribution of a priority-500 request created at this instant.
    #[test]
    fn matches_an_arvados_container_priority() {
        let created = parse("2020-01-06T16:40:18.800Z").unwrap();
        assert_eq!(request_contribution(500, &created), 562_948_375_092_493_200);
        assert_eq!(
            request_contribution(1, &created),
            (1 << 50) - 1_578_328_818_800
        );
    }
}
