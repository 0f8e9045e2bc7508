//! Names: of resources, `[a-z0-9][a-z0-9-]*`, at most 63 characters (a DNS label), unique per
//! kind, for workflows, templates, transformation rules and webhooks; and of event types, dotted
//! lowercase words such as `lead.routed`.

/// Longest resource name.
pub const MAX_NAME_LEN: usize = 63;

/// Checks a resource name; the error says what is wrong, for a field violation.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is required".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "is {} characters; the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !first_ok
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(format!(
            "`{name}` must be lowercase letters, digits and dashes, starting with a letter or digit"
        ));
    }
    Ok(())
}

/// Longest event type.
pub const MAX_EVENT_TYPE_LEN: usize = 128;

/// Checks an event type: dotted words of lowercase letters, digits, `_` and `-`.
pub fn check_event_type(event_type: &str) -> Result<(), String> {
    if event_type.is_empty() {
        return Err("is required".into());
    }
    let ok = event_type.split('.').all(|part| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    });
    if ok && event_type.len() <= MAX_EVENT_TYPE_LEN {
        Ok(())
    } else {
        Err(format!(
            "`{event_type}` must be dotted lowercase words, e.g. `lead.routed`"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        assert!(check_name("route-new-lead").is_ok());
        assert!(check_name("9lives").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("-lead").is_err());
        assert!(check_name("Lead").is_err());
        assert!(check_name("a_b").is_err());
        assert!(check_name(&"a".repeat(MAX_NAME_LEN)).is_ok());
        assert!(check_name(&"a".repeat(MAX_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn event_types_are_dotted_lowercase_words() {
        assert!(check_event_type("lead.routed").is_ok());
        assert!(check_event_type("execution.step_failed-2").is_ok());
        assert!(check_event_type("").is_err());
        assert!(check_event_type("lead..routed").is_err());
        assert!(check_event_type("Lead.Routed").is_err());
        assert!(check_event_type(&"a".repeat(MAX_EVENT_TYPE_LEN + 1)).is_err());
    }
}
