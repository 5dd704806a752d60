//! The provider's rate limit, kept on our side: a token bucket shared by every
//! concurrent sender in the process, so that a burst of work waits here instead
//! of earning 429s.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::provider::{OutgoingSms, ProviderAccepted, ProviderError, SmsProvider};

/// A token bucket refilled at `per_second`, holding at most `burst` permits.
///
/// Cloning shares the bucket. N.B. the bucket is per process: with several
/// replicas the provider sees the sum of their rates, so each replica's share
/// has to be set lower.
#[derive(Clone)]
pub struct SendRateLimiter {
    limiter: Arc<DefaultDirectRateLimiter>,
}

impl SendRateLimiter {
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Self { limiter: Arc::new(RateLimiter::direct(quota)) }
    }

    /// Waits until a permit is free and takes it.
    pub async fn until_ready(&self) {
        self.limiter.until_ready().await;
    }
}

impl fmt::Debug for SendRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendRateLimiter").finish_non_exhaustive()
    }
}

/// A provider that takes a permit from the shared bucket before every send.
#[derive(Debug, Clone)]
pub struct RateLimitedProvider<P> {
    inner: P,
    limiter: SendRateLimiter,
}

impl<P> RateLimitedProvider<P> {
    pub fn new(inner: P, limiter: SendRateLimiter) -> Self {
        Self { inner, limiter }
    }
}

impl<P: SmsProvider> SmsProvider for RateLimitedProvider<P> {
    async fn send(&self, request: &OutgoingSms) -> Result<ProviderAccepted, ProviderError> {
        self.limiter.until_ready().await;
        self.inner.send(request).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[tokio::test]
    async fn a_hundred_permits_at_fifty_per_second_with_burst_fifty_take_about_a_second() {
        let limiter = SendRateLimiter::new(nz(50), nz(50));
        let started = Instant::now();
        let mut senders = Vec::new();
        for _ in 0..4 {
            let limiter = limiter.clone();
            senders.push(tokio::spawn(async move {
                for _ in 0..25 {
                    limiter.until_ready().await;
                }
            }));
        }
        for sender in senders {
            sender.await.unwrap();
        }
        // The burst goes at once; the other 50 come one per 20 ms.
        assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn the_burst_is_available_at_once() {
        let limiter = SendRateLimiter::new(nz(1), nz(10));
        let started = Instant::now();
        for _ in 0..10 {
            limiter.until_ready().await;
        }
        assert!(started.elapsed() < Duration::from_millis(500));
    }
}
