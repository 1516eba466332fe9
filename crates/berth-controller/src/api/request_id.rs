//! `X-Request-Id`: the identifier of one API call, as Arvados uses it.
//!
//! A client may send one (the Arvados SDKs send `req-` and 20 lowercase
//! letters and digits). The controller keeps a client's id of 1 to
//! [`MAX_REQUEST_ID_BYTES`] ASCII letters, digits, `-`, `_` or `.`, and
//! otherwise, or when there is none, generates one in the SDKs' form. The
//! response carries the id back, and the request's tracing span records
//! it, so a client's report can be matched with the controller's log.
//!
//! [`set_request_id`] is the outermost layer of the router: it writes the
//! id into the request's headers, where the trace layer reads it, and into
//! the response's, including error responses of the inner layers.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use rand::Rng;

/// The header that carries a call's id, in both directions.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Maximum length of a client's id; a longer one is replaced.
pub const MAX_REQUEST_ID_BYTES: usize = 255;

/// Characters after `req-` in a generated id.
const GENERATED_ID_CHARS: usize = 20;

const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Gives the request an id (the client's, or a new one) and returns it in
/// the response.
pub async fn set_request_id(mut request: Request, next: Next) -> Response {
    let id = match request.headers().get(&REQUEST_ID_HEADER) {
        Some(value) if is_usable(value.as_bytes()) => value.clone(),
        _ => generate_request_id(),
    };
    request.headers_mut().insert(REQUEST_ID_HEADER, id.clone());
    let mut response = next.run(request).await;
    response.headers_mut().insert(REQUEST_ID_HEADER, id);
    response
}

/// True for an id the controller echoes and logs as it is.
fn is_usable(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_BYTES
        && id
            .iter()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
}

/// Generates `req-` followed by 20 random lowercase letters and digits.
pub fn generate_request_id() -> HeaderValue {
    let mut rng = rand::thread_rng();
    let mut id = String::from("req-");
    for _ in 0..GENERATED_ID_CHARS {
        id.push(ALPHABET[rng.gen_range(0..ALPHABET.len())] as char);
    }
    // Letters, digits and '-' are valid in a header value, so the fallback
    // is never taken.
    HeaderValue::try_from(id).unwrap_or_else(|_| HeaderValue::from_static("req-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_id_has_the_sdk_form() {
        let id = generate_request_id();
        let id = id.to_str().unwrap();
        let suffix = id.strip_prefix("req-").unwrap();
        assert_eq!(suffix.len(), GENERATED_ID_CHARS);
        assert!(suffix
            .bytes()
            .all(|byte| byte.is_ascii_digit() || byte.is_ascii_lowercase()));
        assert_ne!(generate_request_id(), generate_request_id());
    }

    #[test]
    fn client_ids_are_checked() {
        for usable in ["req-0123456789abcdefghij", "A_b.c-9", &"x".repeat(255)] {
            assert!(is_usable(usable.as_bytes()), "{usable:?}");
        }
        for unusable in ["", "a b", "a\"b", "caf\u{e9}", &"x".repeat(256)] {
            assert!(!is_usable(unusable.as_bytes()), "{unusable:?}");
        }
    }
}
