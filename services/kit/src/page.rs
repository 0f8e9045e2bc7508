//! Paging per AIP-158: `page_size` (defaulted and capped) and opaque `page_token`s.
//!
//! A token is the base64 of a small JSON cursor (the last key of the page); clients must treat it as
//! opaque. A token that does not decode is an INVALID_ARGUMENT on `page_token`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Serialize, de::DeserializeOwned};

use crate::error::Violation;

/// Resolves a requested page size: 0 means `default`, negative is invalid, above `max` is capped.
pub fn size(requested: i32, default: u64, max: u64) -> Result<u64, Violation> {
    match requested {
        0 => Ok(default),
        n if n < 0 => Err(Violation::new("page_size", "must not be negative")),
        n => Ok((n as u64).min(max)),
    }
}

/// Encodes a cursor as an opaque token.
pub fn encode<T: Serialize>(cursor: &T) -> String {
    // Serializing plain data to JSON cannot fail.
    let json = serde_json::to_vec(cursor).unwrap_or_default();
    URL_SAFE_NO_PAD.encode(json)
}

/// Decodes a token made by [`encode`]; an empty token is the first page.
pub fn decode<T: DeserializeOwned>(token: &str) -> Result<Option<T>, Violation> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || Violation::new("page_token", "is not a token returned by this list");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|_| invalid())
}

/// Ends a page read with one row more than `size`: keeps `size` rows and, when the extra row shows
/// that more follow, returns the token of the cursor the last kept row gives.
pub fn finish<T, C: Serialize>(
    mut rows: Vec<T>,
    size: u64,
    cursor: impl Fn(&T) -> C,
) -> (Vec<T>, String) {
    let more = rows.len() as u64 > size;
    rows.truncate(size as usize);
    let token = match rows.last() {
        Some(last) if more => encode(&cursor(last)),
        _ => String::new(),
    };
    (rows, token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_default_cap_and_reject_negative() {
        assert_eq!(size(0, 50, 500), Ok(50));
        assert_eq!(size(7, 50, 500), Ok(7));
        assert_eq!(size(10_000, 50, 500), Ok(500));
        assert_eq!(
            size(-1, 50, 500).map_err(|v| v.field),
            Err("page_size".to_string())
        );
    }

    #[test]
    fn pages_end_with_a_token_only_when_more_follow() {
        let (rows, token) = finish(vec![1, 2, 3], 2, |r| *r);
        assert_eq!(rows, [1, 2]);
        assert_eq!(decode::<i32>(&token), Ok(Some(2)));
        let (rows, token) = finish(vec![1, 2], 2, |r| *r);
        assert_eq!((rows, token), (vec![1, 2], String::new()));
    }

    #[test]
    fn tokens_round_trip_and_garbage_is_rejected() {
        let token = encode(&("b".to_string(), 3_i64));
        assert_eq!(
            decode::<(String, i64)>(&token),
            Ok(Some(("b".to_string(), 3)))
        );
        assert_eq!(decode::<(String, i64)>(""), Ok(None));
        assert!(decode::<(String, i64)>("%%%").is_err());
        assert!(decode::<(String, i64)>(&encode(&"x")).is_err());
    }
}
