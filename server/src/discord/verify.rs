//! Discord's request signatures: every interaction is signed with the
//! application's Ed25519 key over `X-Signature-Timestamp` followed by the raw
//! body, the signature hex-encoded in `X-Signature-Ed25519`. A request that
//! fails here is answered 401 before its body is parsed.

use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};

/// Signed requests older (or further in the future) than this are refused:
/// a captured request cannot be replayed later.
pub const MAX_AGE_SECONDS: u64 = 5 * 60;

/// Why a request was refused; the message is safe to return to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("X-Signature-Timestamp is not a Unix time in seconds")]
    BadTimestamp,
    #[error(
        "X-Signature-Timestamp is {age_seconds} s away from now (at most {MAX_AGE_SECONDS} s)"
    )]
    Stale { age_seconds: u64 },
    #[error("X-Signature-Ed25519 is not 64 hex-encoded bytes")]
    MalformedSignature,
    #[error("the signature does not match the application's public key")]
    BadSignature,
}

/// The application's public key, as the Developer Portal shows it.
#[derive(Clone)]
pub struct Verifier {
    key: VerifyingKey,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier({})", hex(self.key.as_bytes()))
    }
}

impl Verifier {
    /// From the 64 hex digits of the Developer Portal's "Public Key".
    pub fn from_hex(text: &str) -> Result<Verifier, String> {
        let bytes: [u8; 32] = unhex(text.trim())
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                format!(
                    "the Discord public key must be 64 hex digits (the Developer Portal's \
                     \"Public Key\"), found {} characters",
                    text.trim().len()
                )
            })?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|e| format!("the Discord public key is not an Ed25519 point: {e}"))?;
        Ok(Verifier { key })
    }

    /// Checks one request: its two headers (absent: `None`), its raw body,
    /// and the time now in Unix seconds.
    pub fn verify(
        &self,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
        now: u64,
    ) -> Result<(), Rejection> {
        let timestamp = timestamp.ok_or(Rejection::MissingHeader("X-Signature-Timestamp"))?;
        let signature = signature.ok_or(Rejection::MissingHeader("X-Signature-Ed25519"))?;
        let sent: u64 = timestamp.parse().map_err(|_| Rejection::BadTimestamp)?;
        let age_seconds = now.abs_diff(sent);
        if age_seconds > MAX_AGE_SECONDS {
            return Err(Rejection::Stale { age_seconds });
        }
        let bytes: [u8; 64] = unhex(signature)
            .and_then(|b| b.try_into().ok())
            .ok_or(Rejection::MalformedSignature)?;
        let signature = Signature::from_bytes(&bytes);
        let mut message = Vec::with_capacity(timestamp.len() + body.len());
        message.extend_from_slice(timestamp.as_bytes());
        message.extend_from_slice(body);
        self.key
            .verify(&message, &signature)
            .map_err(|_| Rejection::BadSignature)
    }
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn keys() -> (SigningKey, Verifier) {
        let signing = SigningKey::from_bytes(&[7u8; 32]);
        let verifier = Verifier::from_hex(&hex(signing.verifying_key().as_bytes())).unwrap();
        (signing, verifier)
    }

    fn sign(key: &SigningKey, timestamp: &str, body: &[u8]) -> String {
        let mut message = timestamp.as_bytes().to_vec();
        message.extend_from_slice(body);
        hex(&key.sign(&message).to_bytes())
    }

    #[test]
    fn a_signed_request_passes_and_any_change_fails() {
        let (key, v) = keys();
        let body = br#"{"type":1}"#;
        let sig = sign(&key, "1700000000", body);
        assert_eq!(
            v.verify(Some("1700000000"), Some(&sig), body, 1700000010),
            Ok(())
        );
        // Another body, another timestamp, another key: refused.
        assert_eq!(
            v.verify(Some("1700000000"), Some(&sig), br#"{"type":2}"#, 1700000010),
            Err(Rejection::BadSignature)
        );
        assert_eq!(
            v.verify(Some("1700000001"), Some(&sig), body, 1700000010),
            Err(Rejection::BadSignature)
        );
        let other = SigningKey::from_bytes(&[8u8; 32]);
        let forged = sign(&other, "1700000000", body);
        assert_eq!(
            v.verify(Some("1700000000"), Some(&forged), body, 1700000010),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn missing_malformed_and_stale_requests_are_refused() {
        let (key, v) = keys();
        let body = b"{}";
        let sig = sign(&key, "1700000000", body);
        assert_eq!(
            v.verify(None, Some(&sig), body, 1700000000),
            Err(Rejection::MissingHeader("X-Signature-Timestamp"))
        );
        assert_eq!(
            v.verify(Some("1700000000"), None, body, 1700000000),
            Err(Rejection::MissingHeader("X-Signature-Ed25519"))
        );
        assert_eq!(
            v.verify(Some("yesterday"), Some(&sig), body, 1700000000),
            Err(Rejection::BadTimestamp)
        );
        assert_eq!(
            v.verify(Some("1700000000"), Some("zz"), body, 1700000000),
            Err(Rejection::MalformedSignature)
        );
        assert_eq!(
            v.verify(Some("1700000000"), Some(&sig[..100]), body, 1700000000),
            Err(Rejection::MalformedSignature)
        );
        // Properly signed but six minutes old (or ahead): refused.
        assert_eq!(
            v.verify(Some("1700000000"), Some(&sig), body, 1700000360),
            Err(Rejection::Stale { age_seconds: 360 })
        );
        assert_eq!(
            v.verify(Some("1700000000"), Some(&sig), body, 1699999640),
            Err(Rejection::Stale { age_seconds: 360 })
        );
    }

    #[test]
    fn public_keys_must_be_64_hex_digits_of_a_point() {
        assert!(Verifier::from_hex("abc")
            .unwrap_err()
            .contains("64 hex digits"));
        assert!(Verifier::from_hex(&"g".repeat(64))
            .unwrap_err()
            .contains("64 hex digits"));
        let (_, v) = keys();
        assert!(format!("{v:?}").starts_with("Verifier("));
    }
}
