//! A route's compiled retry policy: which outcomes are retried, and how long to wait.

use std::time::Duration;

use crate::config::{ConfigError, Retries, RetryOn};

/// How a try failed without a usable response, as far as retrying goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryFailure {
    /// The connection could not be made: the request was not sent.
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM: the request was not processed.
    RefusedStream,
    /// The connection failed before response headers.
    Reset,
    /// The try's own timeout (`per_try_timeout`) passed.
    PerTryTimeout,
    /// Anything that must not be retried (the client's fault, a breaker, the deadline).
    Final,
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts: u32,
    on: Vec<RetryOn>,
    /// `on` holds a gRPC status condition (the response's `grpc-status` is read only then).
    on_grpc_status: bool,
    status_codes: Vec<u16>,
    pub per_try_timeout: Option<Duration>,
    backoff_base: Duration,
    backoff_max: Duration,
    pub replay_buffer: usize,
}

impl RetryPolicy {
    pub fn compile(at: &str, r: &Retries, errors: &mut Vec<ConfigError>) -> RetryPolicy {
        if r.attempts > 10 {
            errors.push(ConfigError::new(
                format!("{at}.attempts"),
                format!("{} is too many (at most 10)", r.attempts),
            ));
        }
        for (i, s) in r.status_codes.iter().enumerate() {
            if !(100..=599).contains(s) {
                errors.push(ConfigError::new(
                    format!("{at}.status_codes[{i}]"),
                    format!("{s} is not an HTTP status"),
                ));
            }
        }
        if r.backoff.base.0.is_zero() {
            errors.push(ConfigError::new(
                format!("{at}.backoff.base"),
                "must be greater than 0",
            ));
        }
        if r.backoff.max.0 < r.backoff.base.0 {
            errors.push(ConfigError::new(
                format!("{at}.backoff.max"),
                "must be at least `backoff.base`",
            ));
        }
        if r.replay_buffer.0 > 64 * 1024 * 1024 {
            errors.push(ConfigError::new(
                format!("{at}.replay_buffer"),
                "must be at most 64MiB",
            ));
        }
        let mut on = r.on.clone();
        if !r.status_codes.is_empty() && !on.contains(&RetryOn::RetriableStatusCodes) {
            on.push(RetryOn::RetriableStatusCodes);
        }
        let on_grpc_status = on.iter().any(|c| {
            matches!(
                c,
                RetryOn::Cancelled
                    | RetryOn::DeadlineExceeded
                    | RetryOn::ResourceExhausted
                    | RetryOn::Internal
                    | RetryOn::Unavailable
            )
        });
        RetryPolicy {
            attempts: r.attempts,
            on,
            on_grpc_status,
            status_codes: r.status_codes.clone(),
            per_try_timeout: r.per_try_timeout.non_zero(),
            backoff_base: r.backoff.base.0,
            backoff_max: r.backoff.max.0,
            replay_buffer: r.replay_buffer.0 as usize,
        }
    }

    fn has(&self, c: RetryOn) -> bool {
        self.on.contains(&c)
    }

    /// Whether a response with `status` (and `grpc-status` in its headers) is retried.
    pub fn retries_response(&self, status: u16, grpc_status: impl FnOnce() -> Option<u32>) -> bool {
        if status >= 500 && self.has(RetryOn::FiveXx) {
            return true;
        }
        if matches!(status, 502..=504) && self.has(RetryOn::GatewayError) {
            return true;
        }
        if self.has(RetryOn::RetriableStatusCodes) && self.status_codes.contains(&status) {
            return true;
        }
        if !self.on_grpc_status {
            return false;
        }
        match grpc_status() {
            Some(1) => self.has(RetryOn::Cancelled),
            Some(4) => self.has(RetryOn::DeadlineExceeded),
            Some(8) => self.has(RetryOn::ResourceExhausted),
            Some(13) => self.has(RetryOn::Internal),
            Some(14) => self.has(RetryOn::Unavailable),
            _ => false,
        }
    }

    /// Whether the policy may retry a try that reached the upstream (and so needs a copy of the
    /// request): anything beyond connection failures, or refused streams over HTTP/2.
    pub fn retries_after_sending(&self, http2: bool) -> bool {
        self.on.iter().any(|c| match c {
            RetryOn::ConnectFailure => false,
            RetryOn::RefusedStream => http2,
            _ => true,
        })
    }

    /// Whether a failure without a response is retried.
    pub fn retries_failure(&self, f: TryFailure) -> bool {
        let broad = self.has(RetryOn::FiveXx) || self.has(RetryOn::GatewayError);
        match f {
            TryFailure::ConnectFailure => {
                broad || self.has(RetryOn::ConnectFailure) || self.has(RetryOn::Reset)
            }
            TryFailure::RefusedStream => {
                broad || self.has(RetryOn::RefusedStream) || self.has(RetryOn::Reset)
            }
            TryFailure::Reset | TryFailure::PerTryTimeout => broad || self.has(RetryOn::Reset),
            TryFailure::Final => false,
        }
    }

    /// The wait before retry number `n` (1, 2, …): full jitter over an exponential ceiling.
    pub fn backoff(&self, n: u32) -> Duration {
        let ceiling = self
            .backoff_base
            .saturating_mul(1u32 << (n.saturating_sub(1)).min(16))
            .min(self.backoff_max);
        Duration::from_nanos(fastrand::u64(..=ceiling.as_nanos() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn policy(on: Vec<RetryOn>, codes: Vec<u16>) -> RetryPolicy {
        let mut errors = Vec::new();
        let p = RetryPolicy::compile(
            "r",
            &Retries {
                on,
                status_codes: codes,
                ..Default::default()
            },
            &mut errors,
        );
        assert!(errors.is_empty());
        p
    }

    #[test]
    fn conditions() {
        let default = policy(Retries::default().on, vec![]);
        assert!(default.retries_failure(TryFailure::ConnectFailure));
        assert!(default.retries_failure(TryFailure::RefusedStream));
        assert!(!default.retries_failure(TryFailure::Reset));
        assert!(!default.retries_response(503, || None));

        let gw = policy(vec![RetryOn::GatewayError], vec![409]);
        assert!(gw.retries_response(503, || None));
        assert!(!gw.retries_response(500, || None));
        assert!(
            gw.retries_response(409, || None),
            "listed codes imply retriable-status-codes"
        );
        assert!(
            !gw.retries_response(200, || unreachable!("no gRPC condition: not read")),
            "a policy without a gRPC condition does not look for grpc-status"
        );
        assert!(gw.retries_failure(TryFailure::PerTryTimeout));
        assert!(!gw.retries_failure(TryFailure::Final));

        let grpc = policy(vec![RetryOn::Unavailable], vec![]);
        assert!(grpc.retries_response(200, || Some(14)));
        assert!(!grpc.retries_response(200, || Some(13)));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut p = policy(vec![], vec![]);
        p.backoff_base = Duration::from_millis(10);
        p.backoff_max = Duration::from_millis(40);
        for n in 1..10 {
            let ceiling = Duration::from_millis((10u64 << (n - 1)).min(40));
            assert!(p.backoff(n) <= ceiling);
        }
        let _ = Dur::default();
    }
}
