//! Resource identifiers: UUIDv7 strings, time-ordered so that indexes stay append-mostly.

/// A new UUIDv7 in its hyphenated lowercase form.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Whether `id` is a well-formed UUID (any version), as every `<resource>_id` must be.
pub fn is_valid(id: &str) -> bool {
    uuid::Uuid::try_parse(id).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_uuid_v7_and_ordered() {
        let a = new_id();
        let b = new_id();
        assert!(is_valid(&a));
        assert_eq!(
            uuid::Uuid::parse_str(&a).map(|u| u.get_version_num()).ok(),
            Some(7)
        );
        assert!(a < b, "{a} then {b}");
        assert!(!is_valid("nope"));
        assert!(!is_valid(""));
    }
}
