//! ⑥ The settle decision: a pure function of what the call returned, which attempt this was
//! and the policy. No I/O, no clock, no randomness of its own (the jitter is passed in), so
//! the whole table is unit-tested and every caller gets the same answer.

use std::time::Duration;

/// How retry delays grow. `d = min(max_wait, initial × 2^(attempt-1))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    /// Exactly `d`.
    Exponential,
    /// Random in `[0, d]` ("full jitter").
    Full,
    /// `d/2` plus random in `[0, d/2]` ("equal jitter").
    Equal,
}

/// Retry settings of the worker (and, later, per function).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most times a message is sent to its function; `3` means at most 3 calls.
    pub max_attempts: u32,
    pub initial_wait: Duration,
    pub max_wait: Duration,
    /// Sorted HTTP status codes that are retried.
    pub codes: Vec<u16>,
    pub backoff: Backoff,
}

/// What the call produced, reduced to what the decision needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallResult {
    /// The function answered with this status.
    Status {
        code: u16,
        /// The response carried `X-OpenFaaS-Internal`: the platform, not the function,
        /// produced it (proxy, watchdog timeout, concurrency limiter), so it is retried.
        internal: bool,
        /// A parsed `Retry-After` on a 429 or 503.
        retry_after: Option<Duration>,
    },
    /// No response: connection refused or reset, DNS failure, or the call timed out.
    NoResponse,
}

/// Why the worker stopped trying; also the `reason` of logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUpReason {
    AttemptsExhausted,
}

impl GiveUpReason {
    pub fn as_str(self) -> &'static str {
        match self {
            GiveUpReason::AttemptsExhausted => "attempts_exhausted",
        }
    }
}

/// The outcome for the message; maps 1:1 onto a JetStream ack kind in `job.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Done: success, or a final answer of the function (e.g. 400) that a retry cannot change.
    Ack,
    /// Hand the message back to JetStream, to be redelivered after `after`.
    Retry { after: Duration },
    /// Retryable, but no attempts are left.
    GiveUp { reason: GiveUpReason },
}

impl RetryPolicy {
    /// The backoff delay before attempt `attempt + 1`, before jitter.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(31);
        let d = self.initial_wait.saturating_mul(1u32 << exp);
        d.min(self.max_wait)
    }

    fn is_retryable(&self, result: &CallResult) -> bool {
        match *result {
            CallResult::NoResponse => true,
            CallResult::Status {
                internal: true,
                code,
                ..
            } => code >= 400,
            CallResult::Status { code, .. } => self.codes.binary_search(&code).is_ok(),
        }
    }
}

/// Decides what to do with a message after attempt number `attempt` (1-based, the JetStream
/// delivery count) produced `result`. `jitter` is a uniform random number in `[0, 1)`, used
/// only by the `full` and `equal` backoffs.
pub fn decide(result: &CallResult, attempt: u32, policy: &RetryPolicy, jitter: f64) -> Decision {
    if !policy.is_retryable(result) {
        return Decision::Ack;
    }
    if attempt >= policy.max_attempts {
        return Decision::GiveUp {
            reason: GiveUpReason::AttemptsExhausted,
        };
    }
    if let CallResult::Status {
        retry_after: Some(after),
        ..
    } = *result
    {
        return Decision::Retry {
            after: after.clamp(policy.initial_wait, policy.max_wait),
        };
    }
    let d = policy.base_delay(attempt);
    let jitter = jitter.clamp(0.0, 1.0);
    let after = match policy.backoff {
        Backoff::Exponential => d,
        Backoff::Full => d.mul_f64(jitter),
        Backoff::Equal => d / 2 + (d / 2).mul_f64(jitter),
    };
    Decision::Retry { after }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(backoff: Backoff) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial_wait: Duration::from_secs(10),
            max_wait: Duration::from_secs(120),
            codes: vec![408, 429, 500, 502, 503, 504],
            backoff,
        }
    }

    fn status(code: u16) -> CallResult {
        CallResult::Status {
            code,
            internal: false,
            retry_after: None,
        }
    }

    fn retry(secs: u64) -> Decision {
        Decision::Retry {
            after: Duration::from_secs(secs),
        }
    }

    const EXHAUSTED: Decision = Decision::GiveUp {
        reason: GiveUpReason::AttemptsExhausted,
    };

    #[test]
    fn decision_table() {
        let p = policy(Backoff::Exponential);
        let internal_500 = CallResult::Status {
            code: 500,
            internal: true,
            retry_after: None,
        };
        let internal_400 = CallResult::Status {
            code: 400,
            internal: true,
            retry_after: None,
        };
        let after = |code, secs| CallResult::Status {
            code,
            internal: false,
            retry_after: Some(Duration::from_secs(secs)),
        };
        let rows: &[(CallResult, u32, Decision)] = &[
            (status(200), 1, Decision::Ack),
            (status(202), 3, Decision::Ack),
            (status(400), 1, Decision::Ack),
            (status(404), 1, Decision::Ack),
            (status(501), 1, Decision::Ack),
            (status(503), 1, retry(10)),
            (status(503), 2, retry(20)),
            (status(429), 2, retry(20)),
            (status(503), 3, EXHAUSTED),
            (CallResult::NoResponse, 1, retry(10)),
            (CallResult::NoResponse, 3, EXHAUSTED),
            (internal_500, 1, retry(10)),
            (internal_400, 1, retry(10)),
            (after(429, 2), 1, retry(10)),
            (after(503, 30), 1, retry(30)),
            (after(503, 600), 1, retry(120)),
            (after(503, 600), 3, EXHAUSTED),
        ];
        for (i, (result, attempt, want)) in rows.iter().enumerate() {
            assert_eq!(
                decide(result, *attempt, &p, 0.5),
                *want,
                "row {i}: {result:?} attempt {attempt}"
            );
        }
    }

    #[test]
    fn delay_doubles_and_caps() {
        let mut p = policy(Backoff::Exponential);
        p.max_attempts = 100;
        let delays: Vec<u64> = (1..=6)
            .map(|a| match decide(&status(503), a, &p, 0.0) {
                Decision::Retry { after } => after.as_secs(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(delays, vec![10, 20, 40, 80, 120, 120]);
        assert_eq!(p.base_delay(1_000), Duration::from_secs(120));
    }

    #[test]
    fn jitter_modes_stay_in_range() {
        let full = policy(Backoff::Full);
        let equal = policy(Backoff::Equal);
        for (jitter, want_full, want_equal) in [
            (0.0, 0, 10_000),
            (0.5, 10_000, 15_000),
            (1.0, 20_000, 20_000),
        ] {
            let ms = |d| match d {
                Decision::Retry { after } => after.as_millis() as u64,
                other => panic!("{other:?}"),
            };
            assert_eq!(ms(decide(&status(503), 2, &full, jitter)), want_full);
            assert_eq!(ms(decide(&status(503), 2, &equal, jitter)), want_equal);
        }
    }

    #[test]
    fn one_attempt_means_no_retry() {
        let mut p = policy(Backoff::Exponential);
        p.max_attempts = 1;
        assert_eq!(decide(&status(503), 1, &p, 0.0), EXHAUSTED);
    }
}
