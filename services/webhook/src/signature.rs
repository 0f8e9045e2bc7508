//! Standard Webhooks 1.0 signatures and `whsec_` secrets.
//!
//! A delivery carries `webhook-id`, `webhook-timestamp` (Unix seconds) and
//! `webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`. A `whsec_` secret's
//! key is the base64 after the prefix; the specification asks for 24 to 64 bytes of it.

use std::ops::RangeInclusive;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The prefix of a signing secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// Key sizes a registered secret may have, in bytes.
pub const SECRET_KEY_BYTES: RangeInclusive<usize> = 24..=64;
/// Key size of a generated secret, in bytes.
const GENERATED_KEY_BYTES: usize = 32;

/// A `whsec_` secret whose key is not base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a whsec_ secret must be base64 after its prefix")]
pub struct BadSecret;

/// A new secret: 32 bytes from the operating system's generator.
pub fn new_secret() -> Result<String, getrandom::Error> {
    let mut key = [0u8; GENERATED_KEY_BYTES];
    getrandom::fill(&mut key)?;
    Ok(format!("{SECRET_PREFIX}{}", B64.encode(key)))
}

/// Checks a secret given for a registered webhook; the error is a field violation's description.
pub fn check_secret(secret: &str) -> Result<(), String> {
    let Some(b64) = secret.strip_prefix(SECRET_PREFIX) else {
        return Err(format!("must start with `{SECRET_PREFIX}`"));
    };
    let key = B64
        .decode(b64)
        .map_err(|_| format!("must be base64 after `{SECRET_PREFIX}`"))?;
    if !SECRET_KEY_BYTES.contains(&key.len()) {
        return Err(format!(
            "its key is {} bytes; it must be {} to {}",
            key.len(),
            SECRET_KEY_BYTES.start(),
            SECRET_KEY_BYTES.end()
        ));
    }
    Ok(())
}

/// The `webhook-signature` value of a message. A `whsec_` secret signs with its decoded key; any
/// other secret (a step's own `secret`) signs with its bytes.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> Result<String, BadSecret> {
    let key = match secret.strip_prefix(SECRET_PREFIX) {
        Some(b64) => B64.decode(b64).map_err(|_| BadSecret)?,
        None => secret.as_bytes().to_vec(),
    };
    // HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|_| BadSecret)?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    Ok(format!("v1,{}", B64.encode(mac.finalize().into_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_test_vector() {
        // The example of the Standard Webhooks specification.
        let sig = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(
            sig.as_deref(),
            Ok("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
        assert_eq!(sign("whsec_!!", "m", 1, "{}"), Err(BadSecret));
    }

    #[test]
    fn generated_secrets_are_valid_and_distinct() {
        let a = new_secret().expect("random");
        let b = new_secret().expect("random");
        assert_ne!(a, b);
        assert_eq!(check_secret(&a), Ok(()));
        assert!(a.starts_with(SECRET_PREFIX));
    }

    #[test]
    fn secrets_need_the_prefix_base64_and_a_key_of_24_to_64_bytes() {
        assert_eq!(
            check_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Ok(())
        );
        assert!(check_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(check_secret("whsec_not base64").is_err());
        let short = format!("whsec_{}", B64.encode([7u8; 23]));
        assert!(
            check_secret(&short)
                .expect_err("short")
                .contains("23 bytes")
        );
        let long = format!("whsec_{}", B64.encode([7u8; 65]));
        assert!(check_secret(&long).is_err());
    }
}
