//! Everything about SMS to the trusted contact: the Russian texts, the client
//! of the provider's HTTP API with its shared rate limit, the worker that sends
//! and records every SMS, and a stand-in gateway for tests and Compose.

pub mod gateway;
pub mod provider;
pub mod rate;
pub mod request;
pub mod templates;
pub mod worker;

pub use provider::{HttpSmsProvider, OutgoingSms, ProviderAccepted, ProviderError, SmsProvider};
pub use rate::{RateLimitedProvider, SendRateLimiter};
pub use request::{SMS_FAILED, SMS_REQUESTED, SmsFailed, SmsRequested, request_sms};
pub use templates::{SmsTemplate, short_name};
pub use worker::{SMS_WORKER, SmsSettings, SmsWorker};
