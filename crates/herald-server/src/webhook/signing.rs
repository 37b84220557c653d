//! The `Herald-Signature` header: HMAC-SHA256 over the timestamp and the body.
//!
//! Format: `Herald-Signature: t=<unix ms>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
//! The timestamp is inside the MAC, so a receiver that checks it is recent (see
//! [`verify_signature`]) cannot be fed an old request again later; the body is covered byte
//! for byte, so a receiver must verify the raw body before parsing it. A header may carry
//! several `v1=` values (for a secret being rotated); any one matching is enough.

use std::fmt;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "Herald-Signature";

/// Why a signature was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureError {
    /// The header is not `t=<ms>,v1=<hex>[,v1=<hex>...]`.
    Malformed,
    /// The timestamp is further than the tolerance from now (a replay, or a skewed clock).
    Stale { timestamp_ms: u64, now_ms: u64 },
    /// No `v1` value is the MAC of this body with this secret.
    Mismatch,
}

impl fmt::Display for SignatureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignatureError::Malformed => f.write_str("malformed Herald-Signature header"),
            SignatureError::Stale {
                timestamp_ms,
                now_ms,
            } => write!(
                f,
                "signature timestamp {timestamp_ms} is too far from now ({now_ms})"
            ),
            SignatureError::Mismatch => f.write_str("signature does not match the body"),
        }
    }
}

impl std::error::Error for SignatureError {}

fn mac(secret: &str, timestamp_ms: u64, body: &[u8]) -> HmacSha256 {
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(timestamp_ms.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The header value for `body` sent at `timestamp_ms`.
pub fn sign(secret: &str, timestamp_ms: u64, body: &[u8]) -> String {
    let digest = mac(secret, timestamp_ms, body).finalize().into_bytes();
    format!("t={timestamp_ms},v1={}", to_hex(&digest))
}

/// Checks a `Herald-Signature` header against the raw request body: one `v1` value must be the
/// HMAC-SHA256 of `"<t>.<body>"` under `secret`, and `t` must be within `tolerance` of now.
pub fn verify_signature(
    secret: &str,
    header: &str,
    body: &[u8],
    tolerance: Duration,
) -> Result<(), SignatureError> {
    verify_signature_at(secret, header, body, tolerance, super::now_ms())
}

/// [`verify_signature`] against a given clock.
pub fn verify_signature_at(
    secret: &str,
    header: &str,
    body: &[u8],
    tolerance: Duration,
    now_ms: u64,
) -> Result<(), SignatureError> {
    let mut timestamp_ms = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) if timestamp_ms.is_none() => {
                timestamp_ms = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| SignatureError::Malformed)?,
                );
            }
            Some(("v1", value)) => {
                candidates.push(from_hex(value).ok_or(SignatureError::Malformed)?);
            }
            // Other schemes may be added later; they are skipped, not refused.
            Some((_, _)) => {}
            None => return Err(SignatureError::Malformed),
        }
    }
    let Some(timestamp_ms) = timestamp_ms else {
        return Err(SignatureError::Malformed);
    };
    if candidates.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let tolerance_ms = u64::try_from(tolerance.as_millis()).unwrap_or(u64::MAX);
    if timestamp_ms.abs_diff(now_ms) > tolerance_ms {
        return Err(SignatureError::Stale {
            timestamp_ms,
            now_ms,
        });
    }
    let expected = mac(secret, timestamp_ms, body);
    // `verify_slice` compares in constant time.
    if candidates
        .iter()
        .any(|candidate| expected.clone().verify_slice(candidate).is_ok())
    {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    text.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef";
    const TOLERANCE: Duration = Duration::from_secs(300);

    /// The primitive is HMAC-SHA256 (RFC 4231 test case 2), not something that merely
    /// round-trips, and the header is that MAC over exactly `"<t>.<body>"`.
    #[test]
    fn the_mac_is_hmac_sha256() {
        let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            to_hex(&mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let header = sign(SECRET, 1_700_000_000_000, b"{}");
        let mut mac = HmacSha256::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(b"1700000000000.{}");
        assert_eq!(
            header,
            format!(
                "t=1700000000000,v1={}",
                to_hex(&mac.finalize().into_bytes())
            )
        );
    }

    #[test]
    fn a_signature_verifies_only_for_its_body_secret_and_time() {
        let now = 1_700_000_000_000;
        let body = br#"{"event":"message"}"#;
        let header = sign(SECRET, now, body);
        verify_signature_at(SECRET, &header, body, TOLERANCE, now + 1000).unwrap();
        assert_eq!(
            verify_signature_at(SECRET, &header, b"{\"event\":\"other\"}", TOLERANCE, now),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature_at("another-secret-16", &header, body, TOLERANCE, now),
            Err(SignatureError::Mismatch)
        );
        assert!(matches!(
            verify_signature_at(SECRET, &header, body, TOLERANCE, now + 301_000),
            Err(SignatureError::Stale { .. })
        ));
        // A rotated secret: either value may match.
        let other = sign("old-secret-0123456", now, body);
        let v1 = other.split_once(",v1=").unwrap().1;
        let rotated = format!("{header},v1={v1}");
        verify_signature_at("old-secret-0123456", &rotated, body, TOLERANCE, now).unwrap();
        for bad in ["", "t=1", "v1=00", "t=x,v1=00", "t=1,v1=0", "garbage"] {
            assert_eq!(
                verify_signature_at(SECRET, bad, body, TOLERANCE, now),
                Err(SignatureError::Malformed),
                "{bad:?}"
            );
        }
    }
}
