//! Everything about SMS to the trusted contact: the Russian texts, the client
//! of the provider's HTTP API with its shared rate limit, and a stand-in
//! gateway that plays the provider in tests and in the Compose stack.

pub mod gateway;
pub mod provider;
pub mod rate;
pub mod request;
pub mod templates;

use std::fmt;

pub use provider::{HttpSmsProvider, OutgoingSms, ProviderAccepted, ProviderError, SmsProvider};
pub use rate::{RateLimitedProvider, SendRateLimiter};
pub use request::{SMS_FAILED, SMS_REQUESTED, SmsFailed, SmsRequested, request_sms};
pub use templates::{SmsTemplate, short_name};

/// Masks a phone for logs: `+79001234567` becomes `+7900***4567`.
///
/// Anything too short to keep both ends readable is masked entirely, so a
/// malformed number cannot leak whole into a log line.
pub fn mask_phone(phone: &str) -> String {
    let chars: Vec<char> = phone.trim().chars().collect();
    if chars.len() < 9 {
        return "***".to_owned();
    }
    let head: String = chars[..5].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}***{tail}")
}

/// A credential that must never reach a log line or a `Debug` dump.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The only way to read the value; a search for `expose` finds every place
    /// it leaves.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phone_keeps_its_prefix_and_last_four_digits_only() {
        assert_eq!(mask_phone("+79001234567"), "+7900***4567");
    }

    #[test]
    fn a_short_or_empty_phone_is_masked_entirely() {
        assert_eq!(mask_phone("12345"), "***");
        assert_eq!(mask_phone(""), "***");
    }

    #[test]
    fn a_secret_does_not_print_its_value() {
        let secret = Secret::new("top-secret-token");
        assert!(!format!("{secret:?}").contains("top-secret"));
        assert_eq!(secret.expose(), "top-secret-token");
    }
}
