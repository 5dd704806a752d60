//! The recovery worker's typed settings: the time windows and limits of the
//! rules, and the server secret that keys the code HMAC. Read once at start-up.

use std::time::Duration;

use anyhow::bail;

use crate::settings::{Environment, Secret, parse_var, secs_var};

/// Used only when `TC_ENVIRONMENT` is `development` and no secret is set, so a
/// developer's machine works out of the box; any other environment refuses
/// to start without `TC_CODE_SECRET`.
const DEVELOPMENT_CODE_SECRET: &str = "trusted-contact-development-code-secret";

/// A secret shorter than this is refused outside development: the HMAC is
/// only as strong as its key, and a six-digit code space is tiny.
const MIN_SECRET_LEN: usize = 32;

#[derive(Debug, Clone)]
pub struct RecoverySettings {
    /// How long a request waits for the contact (`TC_RECOVERY_WINDOW_SECS`).
    pub window: Duration,
    /// How long a code is accepted (`TC_CODE_TTL_SECS`).
    pub code_ttl: Duration,
    /// The least time between two codes of one request
    /// (`TC_CODE_MIN_INTERVAL_SECS`).
    pub code_min_interval: Duration,
    /// Codes one request may send (`TC_CODE_MAX_SENDS`).
    pub code_max_sends: u32,
    /// Wrong codes that lock a request (`TC_CODE_MAX_ATTEMPTS`).
    pub code_max_attempts: u32,
    /// Requests a truster may open within 24 hours (`TC_RECOVERY_DAILY_LIMIT`).
    pub daily_limit: u32,
    /// Keys the HMAC the ledger keeps instead of the code (`TC_CODE_SECRET`).
    pub code_secret: Secret,
}

impl RecoverySettings {
    pub fn from_env(environment: &Environment) -> anyhow::Result<Self> {
        let settings = RecoverySettings {
            window: secs_var("TC_RECOVERY_WINDOW_SECS", 3_600)?,
            code_ttl: secs_var("TC_CODE_TTL_SECS", 300)?,
            code_min_interval: secs_var("TC_CODE_MIN_INTERVAL_SECS", 60)?,
            code_max_sends: parse_var("TC_CODE_MAX_SENDS", 3)?,
            code_max_attempts: parse_var("TC_CODE_MAX_ATTEMPTS", 3)?,
            daily_limit: parse_var("TC_RECOVERY_DAILY_LIMIT", 3)?,
            code_secret: code_secret(environment)?,
        };
        if settings.code_max_sends == 0 || settings.code_max_attempts == 0 {
            bail!("TC_CODE_MAX_SENDS and TC_CODE_MAX_ATTEMPTS must be at least 1");
        }
        Ok(settings)
    }
}

pub fn code_secret(environment: &Environment) -> anyhow::Result<Secret> {
    match std::env::var("TC_CODE_SECRET") {
        Ok(secret) if !secret.trim().is_empty() => {
            if !environment.is_development() && secret.len() < MIN_SECRET_LEN {
                bail!("TC_CODE_SECRET must be at least {MIN_SECRET_LEN} bytes long");
            }
            Ok(Secret::new(secret))
        }
        _ if environment.is_development() => {
            tracing::warn!(
                "TC_CODE_SECRET is not set; using the fixed development secret, \
                 which no other environment accepts"
            );
            Ok(Secret::new(DEVELOPMENT_CODE_SECRET))
        }
        _ => bail!("TC_CODE_SECRET is required outside development (TC_ENVIRONMENT)"),
    }
}
