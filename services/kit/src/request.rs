//! Checks every resource service makes of its requests: idempotency keys, resource ids, etags and
//! update masks (AIP-155, AIP-154, AIP-134).

use std::collections::BTreeSet;

use meshflow_proto::pbjson_types::FieldMask;

use crate::error::{FieldPath, Violation, Violations};

/// Longest `request_id`.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The idempotency key of a Create or Start, `None` when not given; too long a key is recorded in `v`.
pub fn request_id(request_id: &str, v: &mut Violations) -> Option<String> {
    if request_id.is_empty() {
        return None;
    }
    if request_id.len() > MAX_REQUEST_ID_LEN {
        v.add(
            &FieldPath::root("request_id"),
            format!("is longer than {MAX_REQUEST_ID_LEN} bytes"),
        );
    }
    Some(request_id.to_string())
}

/// A required `<resource>_id`: present and a UUID.
pub fn resource_id(field: &str, id: &str) -> Result<(), Violation> {
    if id.is_empty() {
        Err(Violation::new(field, "is required"))
    } else if !crate::id::is_valid(id) {
        Err(Violation::new(
            field,
            format!("`{}` is not a valid id", crate::error::echo(id)),
        ))
    } else {
        Ok(())
    }
}

/// The etag of a revision: opaque to clients, and plain text, so a JSON or shell user types it as
/// it came (`r3`).
pub fn etag(revision: i64) -> String {
    format!("r{revision}")
}

/// The revision behind an etag made by [`etag`]; the quoted form of earlier releases (`"3"`) is
/// still understood.
pub fn parse_etag(etag: &str) -> Option<i64> {
    let digits = match etag.strip_prefix('r') {
        Some(digits) => digits,
        None => etag.strip_prefix('"')?.strip_suffix('"')?,
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The revision an update or delete expects: `None` when no etag was sent (unconditional).
pub fn expected_revision(field: &str, etag: &str) -> Result<Option<i64>, Violation> {
    if etag.is_empty() {
        return Ok(None);
    }
    parse_etag(etag)
        .map(Some)
        .ok_or_else(|| Violation::new(field, "is not an etag returned by this service"))
}

/// Fields of an update mask: its paths, or all of `all` when it is empty. Unknown and output-only
/// paths are violations of `update_mask.paths[i]`.
pub fn mask_fields(
    mask: Option<&FieldMask>,
    all: &[&'static str],
    output_only: &[&str],
) -> Result<BTreeSet<&'static str>, Vec<Violation>> {
    let paths = mask.map(|m| m.paths.as_slice()).unwrap_or_default();
    if paths.is_empty() {
        return Ok(all.iter().copied().collect());
    }
    let mut v = Violations::new();
    let mut out = BTreeSet::new();
    let base = FieldPath::root("update_mask").field("paths");
    for (i, p) in paths.iter().enumerate() {
        match all.iter().find(|a| **a == p.as_str()) {
            Some(f) => {
                out.insert(*f);
            }
            None if output_only.contains(&p.as_str()) => {
                v.add(&base.index(i), format!("`{p}` is output only"))
            }
            None => v.add(
                &base.index(i),
                format!("unknown field `{p}`; updatable: {}", all.join(", ")),
            ),
        }
    }
    v.into_result(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_round_trip_and_garbage_is_a_violation() {
        assert_eq!(parse_etag(&etag(7)), Some(7));
        assert_eq!(expected_revision("etag", ""), Ok(None));
        assert_eq!(etag(3), "r3");
        assert_eq!(expected_revision("etag", "r3"), Ok(Some(3)));
        assert_eq!(
            expected_revision("etag", "\"3\""),
            Ok(Some(3)),
            "the earlier form"
        );
        assert!(expected_revision("etag", "r").is_err());
        assert!(expected_revision("etag", "r+3").is_err());
        assert_eq!(
            expected_revision("webhook.etag", "3").map_err(|v| v.field),
            Err("webhook.etag".to_string())
        );
    }

    #[test]
    fn masks_name_known_fields_only() {
        let all = ["name", "url"];
        assert_eq!(mask_fields(None, &all, &[]), Ok(BTreeSet::from(all)));
        let mask = FieldMask {
            paths: vec!["url".into(), "etag".into(), "nope".into()],
        };
        let err = mask_fields(Some(&mask), &all, &["etag"]).expect_err("violations");
        let fields: Vec<&str> = err.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["update_mask.paths[1]", "update_mask.paths[2]"]);
    }

    #[test]
    fn request_and_resource_ids() {
        let mut v = Violations::new();
        assert_eq!(request_id("", &mut v), None);
        assert_eq!(request_id("r1", &mut v), Some("r1".into()));
        assert!(v.is_empty());
        request_id(&"x".repeat(MAX_REQUEST_ID_LEN + 1), &mut v);
        assert_eq!(v.len(), 1);
        assert!(resource_id("webhook_id", "").is_err());
        assert!(resource_id("webhook_id", "nope").is_err());
        assert!(resource_id("webhook_id", &crate::id::new_id()).is_ok());
    }
}
