//! One-time recovery codes: six digits from a cryptographic random source,
//! kept in the ledger only as an HMAC-SHA256 under the server secret, and
//! compared in constant time.

use std::fmt;

use anyhow::Context;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngExt;
use sha2::Sha256;
use uuid::Uuid;

use crate::settings::Secret;

type CodeMac = Hmac<Sha256>;

const CODE_SPACE: u32 = 1_000_000;

/// A code in clear. It lives only in the handler that draws it and in the
/// SMS request; `Debug` never shows it.
pub struct OneTimeCode(String);

impl OneTimeCode {
    /// Draws a code from the thread-local CSPRNG, which the operating
    /// system's entropy seeds and reseeds.
    pub fn generate() -> Self {
        let value = rand::rng().random_range(0..CODE_SPACE);
        OneTimeCode(format!("{value:06}"))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for OneTimeCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OneTimeCode(***)")
    }
}

/// The MAC binds the code to its request, so a hash copied from one request
/// says nothing about another.
fn mac(secret: &Secret, recovery_id: Uuid, code: &str) -> anyhow::Result<CodeMac> {
    let mut mac = <CodeMac as KeyInit>::new_from_slice(secret.expose().as_bytes())
        .context("the code secret cannot key an HMAC")?;
    mac.update(recovery_id.as_bytes());
    // People type codes with spaces ("123 456"); digits are what count.
    let digits: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    mac.update(digits.as_bytes());
    Ok(mac)
}

/// What the ledger keeps instead of the code.
pub fn code_hmac(
    secret: &Secret,
    recovery_id: Uuid,
    code: &OneTimeCode,
) -> anyhow::Result<Vec<u8>> {
    Ok(mac(secret, recovery_id, code.expose())?.finalize().into_bytes().to_vec())
}

/// Whether `submitted` is the code whose HMAC is `stored`; the comparison
/// takes the same time wherever the first difference is.
pub fn code_matches(
    secret: &Secret,
    recovery_id: Uuid,
    submitted: &str,
    stored: &[u8],
) -> anyhow::Result<bool> {
    Ok(mac(secret, recovery_id, submitted)?.verify_slice(stored).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new("a test secret that is long enough to key")
    }

    #[test]
    fn a_code_has_six_digits() {
        for _ in 0..1_000 {
            let code = OneTimeCode::generate();
            assert_eq!(code.expose().len(), 6);
            assert!(code.expose().chars().all(|c| c.is_ascii_digit()));
        }
    }

    #[test]
    fn the_right_code_matches_and_any_other_does_not() {
        let id = Uuid::now_v7();
        let code = OneTimeCode("042917".to_owned());
        let stored = code_hmac(&secret(), id, &code).unwrap();
        assert!(code_matches(&secret(), id, "042917", &stored).unwrap());
        assert!(code_matches(&secret(), id, " 042917 ", &stored).unwrap());
        assert!(!code_matches(&secret(), id, "042918", &stored).unwrap());
        assert!(!code_matches(&secret(), Uuid::now_v7(), "042917", &stored).unwrap());
        let other = Secret::new("another secret, just as long as the first");
        assert!(!code_matches(&other, id, "042917", &stored).unwrap());
    }

    #[test]
    fn the_stored_hmac_does_not_contain_the_code() {
        let code = OneTimeCode("123456".to_owned());
        let stored = code_hmac(&secret(), Uuid::nil(), &code).unwrap();
        assert_eq!(stored.len(), 32);
        assert!(!hex::encode(&stored).contains("123456"));
        assert_eq!(format!("{code:?}"), "OneTimeCode(***)");
    }
}
