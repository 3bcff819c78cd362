//! Token-bucket rate limits per caller (API key), sans-IO: `now` is passed in.
//!
//! Each caller gets a bucket of `burst` tokens refilled at `per_second`; a request takes one
//! token or is refused with the time until the next token ([`RateLimited::retry_after`], sent
//! as HTTP `Retry-After`). Buckets of callers idle long enough to be full again are dropped
//! when the table grows, so the memory is bounded by the number of active callers.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Buckets kept before idle (full) ones are swept. Far above the number of API keys a
/// deployment has; only a flood of distinct keys reaches it.
const SWEEP_AT: usize = 10_000;

/// A rate: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    pub per_second: f64,
    pub burst: u32,
}

/// Refused: try again after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Buckets by caller.
#[derive(Debug)]
pub struct RateLimiter {
    config: RateConfig,
    buckets: HashMap<String, Bucket>,
}

impl RateLimiter {
    pub fn new(config: RateConfig) -> Self {
        Self {
            config,
            buckets: HashMap::new(),
        }
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.config.per_second).min(f64::from(self.config.burst));
        b.updated = now;
    }

    /// Takes one token for `caller`, or says how long to wait.
    pub fn handle_request(&mut self, caller: &str, now: Instant) -> Result<(), RateLimited> {
        if self.buckets.len() >= SWEEP_AT && !self.buckets.contains_key(caller) {
            self.sweep(now);
        }
        let burst = f64::from(self.config.burst);
        let mut bucket = self.buckets.get(caller).copied().unwrap_or(Bucket {
            tokens: burst,
            updated: now,
        });
        self.refill(&mut bucket, now);
        let result = if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else if self.config.per_second > 0.0 {
            let wait = (1.0 - bucket.tokens) / self.config.per_second;
            Err(RateLimited {
                retry_after: Duration::from_secs_f64(wait.max(0.001)),
            })
        } else {
            Err(RateLimited {
                retry_after: Duration::from_secs(3600),
            })
        };
        self.buckets.insert(caller.to_owned(), bucket);
        result
    }

    fn sweep(&mut self, now: Instant) {
        let config = self.config;
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            b.tokens + elapsed * config.per_second < f64::from(config.burst)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_per_caller() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(RateConfig {
            per_second: 2.0,
            burst: 3,
        });
        for _ in 0..3 {
            assert!(l.handle_request("a", t0).is_ok());
        }
        let e = l.handle_request("a", t0).unwrap_err();
        assert_eq!(e.retry_after, Duration::from_millis(500));
        // Another caller has its own bucket.
        assert!(l.handle_request("b", t0).is_ok());
        // Half a second later one token is back, not two.
        let t1 = t0 + Duration::from_millis(500);
        assert!(l.handle_request("a", t1).is_ok());
        assert!(l.handle_request("a", t1).is_err());
        // Long idle: refills to the burst, no more.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(l.handle_request("a", t2).is_ok());
        }
        assert!(l.handle_request("a", t2).is_err());
    }
}
