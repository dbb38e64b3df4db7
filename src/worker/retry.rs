//! ④ The settle decision: a pure function of what the call returned, which attempt this was
//! and the policy. No I/O, no clock, no randomness of its own (the jitter is passed in), so
//! the whole table is unit-tested and every caller gets the same answer.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::duration;
use crate::worker::limiter::Signal;

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

/// Retry settings: the worker's, or a function's after its annotations were applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most times a message is sent to its function; `3` means at most 3 calls.
    pub max_attempts: u32,
    pub initial_wait: Duration,
    pub max_wait: Duration,
    /// Sorted HTTP status codes that are retried.
    pub codes: Vec<u16>,
    pub backoff: Backoff,
    /// Adaptive concurrency is on (function mode, `limiter_enabled`): a rejection (a 429, a
    /// 503 from the platform) is the limiter's signal, not the message's failure. It is
    /// retried whatever `codes` says, and held back only briefly ([`held_back`]).
    pub hold_rejections: bool,
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

impl CallResult {
    /// What it says about the function's room, for the adaptive limiter (and for holding a
    /// rejected message back only briefly).
    pub fn signal(&self) -> Signal {
        match *self {
            CallResult::Status {
                code,
                internal,
                retry_after,
            } => Signal::of(Some(code), internal, retry_after.is_some()),
            CallResult::NoResponse => Signal::of(None, false, false),
        }
    }
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
            CallResult::Status { code: 429, .. } if self.hold_rejections => true,
            CallResult::Status {
                internal: true,
                code,
                ..
            } => code >= 400,
            CallResult::Status { code, .. } => self.codes.binary_search(&code).is_ok(),
        }
    }
}

/// The per-function annotations (compat Part B §5): the gateway copies them into the message's
/// `Annotations`, so no API lookup is needed.
pub const ANNOTATION_ATTEMPTS: &str = "com.openfaas.retry.attempts";
pub const ANNOTATION_CODES: &str = "com.openfaas.retry.codes";
pub const ANNOTATION_MIN_WAIT: &str = "com.openfaas.retry.min_wait";
pub const ANNOTATION_MAX_WAIT: &str = "com.openfaas.retry.max_wait";

/// Most attempts a setting or annotation may ask for.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1_000_000;

/// Shortest retry wait a setting (`initial_retry_wait`, `max_retry_wait`) or annotation
/// (`com.openfaas.retry.min_wait`, `.max_wait`) may ask for. A wait of zero doubles to zero
/// forever: the message is NAKed and redelivered in a hot loop, calling a failing function
/// as fast as the server can hand it back. A tiny `max_retry_wait` does the same once the
/// doubling reaches it, for up to a million attempts. 100ms bounds a failing message to ten
/// calls a second, well below what a server or function notices, and is the shortest wait
/// any example or test uses.
pub const MIN_RETRY_WAIT: Duration = Duration::from_millis(100);

/// A retry annotation that could not be used; the worker's own value applies instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidAnnotation {
    pub key: &'static str,
    pub value: String,
    pub expected: &'static str,
}

/// Parses a comma-separated list of HTTP status codes (`429, 502,503`), sorted and without
/// duplicates. `None` when an item is not a code from 100 to 599 or the list is empty.
pub fn parse_codes(raw: &str) -> Option<Vec<u16>> {
    let mut codes = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<u16>() {
            Ok(c) if (100..=599).contains(&c) => codes.push(c),
            _ => return None,
        }
    }
    codes.sort_unstable();
    codes.dedup();
    (!codes.is_empty()).then_some(codes)
}

impl RetryPolicy {
    /// This policy with a function's `com.openfaas.retry.*` annotations applied. An empty
    /// annotation counts as unset; an invalid one is reported and the worker's value kept.
    /// Borrows `self` when the message carries none, which is the common case.
    ///
    /// When the waits end up crossed (`min_wait` above `max_wait`), the annotated one wins
    /// over the worker's: a function asking for a longer floor raises the cap with it, one
    /// asking for a shorter cap lowers the floor. Both annotated and crossed: `min_wait` is
    /// reported invalid.
    pub fn with_annotations(
        &self,
        annotations: &BTreeMap<String, String>,
    ) -> (Cow<'_, RetryPolicy>, Vec<InvalidAnnotation>) {
        let get = |key: &str| {
            annotations
                .get(key)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
        };
        let (attempts, codes, min_wait, max_wait) = (
            get(ANNOTATION_ATTEMPTS),
            get(ANNOTATION_CODES),
            get(ANNOTATION_MIN_WAIT),
            get(ANNOTATION_MAX_WAIT),
        );
        if attempts.is_none() && codes.is_none() && min_wait.is_none() && max_wait.is_none() {
            return (Cow::Borrowed(self), Vec::new());
        }
        let mut policy = self.clone();
        let mut invalid = Vec::new();
        let mut bad = |key, value: &str, expected| {
            invalid.push(InvalidAnnotation {
                key,
                value: value.to_string(),
                expected,
            })
        };
        if let Some(v) = attempts {
            match v.parse::<u32>() {
                Ok(n) if (1..=MAX_ATTEMPTS_LIMIT).contains(&n) => policy.max_attempts = n,
                _ => bad(
                    ANNOTATION_ATTEMPTS,
                    v,
                    "a whole number of attempts from 1 to 1000000",
                ),
            }
        }
        if let Some(v) = codes {
            match parse_codes(v) {
                Some(c) => policy.codes = c,
                None => bad(
                    ANNOTATION_CODES,
                    v,
                    "a comma-separated list of HTTP status codes (100-599), e.g. 429,503",
                ),
            }
        }
        let mut min_set = false;
        if let Some(v) = min_wait {
            match duration::parse(v) {
                Some(d) if d >= MIN_RETRY_WAIT => {
                    policy.initial_wait = d;
                    min_set = true;
                }
                _ => bad(
                    ANNOTATION_MIN_WAIT,
                    v,
                    "a duration of at least 100ms, like 5s or 1m30s",
                ),
            }
        }
        let mut max_set = false;
        if let Some(v) = max_wait {
            match duration::parse(v) {
                Some(d) if d >= MIN_RETRY_WAIT => {
                    policy.max_wait = d;
                    max_set = true;
                }
                _ => bad(
                    ANNOTATION_MAX_WAIT,
                    v,
                    "a duration of at least 100ms, like 5m or 1h",
                ),
            }
        }
        if policy.initial_wait > policy.max_wait {
            match (min_set, max_set) {
                (true, true) => {
                    bad(
                        ANNOTATION_MIN_WAIT,
                        min_wait.unwrap_or_default(),
                        "a duration not above com.openfaas.retry.max_wait",
                    );
                    policy.initial_wait = self.initial_wait.min(policy.max_wait);
                }
                (true, false) => policy.max_wait = policy.initial_wait,
                (false, _) => policy.initial_wait = policy.max_wait,
            }
        }
        (Cow::Owned(policy), invalid)
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
    if policy.hold_rejections && result.signal() == Signal::Rejected {
        return Decision::Retry {
            after: held_back(policy, jitter),
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

/// The wait of a message whose call was rejected while adaptive concurrency is on.
/// The rejection is not the message's failure: the limiter already paces its function (a
/// returning message waits for a slot like any other), and the message only must not come
/// straight back. So the wait is a tenth of `initial_wait` (1 s by default, at least
/// [`MIN_RETRY_WAIT`]) with equal jitter (so rejected messages do not return in step),
/// whatever the attempt, instead of doubling into minutes at the tail of a backlog. A
/// `Retry-After` is honoured by [`decide`] before this applies.
fn held_back(policy: &RetryPolicy, jitter: f64) -> Duration {
    let d = (policy.initial_wait / 10).max(MIN_RETRY_WAIT);
    d / 2 + (d / 2).mul_f64(jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_the_limiter_rejections_are_retried_and_held_back_briefly() {
        let mut p = policy(Backoff::Exponential);
        p.codes = vec![500];
        p.hold_rejections = true;
        let status = |code, internal, retry_after| CallResult::Status {
            code,
            internal,
            retry_after,
        };
        let short = |d: Decision| matches!(d, Decision::Retry { after } if after <= Duration::from_secs(1) && after >= Duration::from_millis(500));
        // A 429 the codes leave out, a watchdog's 429, a platform's 503: the short wait, at
        // any attempt below the last.
        for r in [
            status(429, false, None),
            status(429, true, None),
            status(503, true, None),
        ] {
            for attempt in [1, 2, 3 - 1] {
                assert!(short(decide(&r, attempt, &p, 0.5)), "{r:?} at {attempt}");
            }
            // Still bounded by the attempts allowed.
            assert_eq!(
                decide(&r, 3, &p, 0.5),
                Decision::GiveUp {
                    reason: GiveUpReason::AttemptsExhausted
                }
            );
        }
        // Retry-After still decides its own wait.
        assert_eq!(
            decide(
                &status(429, false, Some(Duration::from_secs(30))),
                1,
                &p,
                0.5
            ),
            Decision::Retry {
                after: Duration::from_secs(30)
            }
        );
        // Not a rejection: the normal backoff, doubling.
        assert_eq!(
            decide(&status(500, false, None), 2, &p, 0.5),
            Decision::Retry {
                after: Duration::from_secs(20)
            }
        );
        // Without the limiter a 429 the codes leave out is final.
        p.hold_rejections = false;
        assert_eq!(decide(&status(429, false, None), 1, &p, 0.5), Decision::Ack);
    }

    #[test]
    fn a_held_back_message_waits_a_tenth_of_the_first_wait_whatever_the_attempt() {
        let mut p = policy(Backoff::Exponential);
        assert_eq!(held_back(&p, 0.0), Duration::from_millis(500));
        assert_eq!(held_back(&p, 1.0), Duration::from_secs(1));
        assert_eq!(held_back(&p, 7.0), Duration::from_secs(1));
        p.initial_wait = Duration::from_millis(100);
        assert_eq!(held_back(&p, 1.0), MIN_RETRY_WAIT);
    }

    fn policy(backoff: Backoff) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial_wait: Duration::from_secs(10),
            max_wait: Duration::from_secs(120),
            codes: vec![408, 429, 500, 502, 503, 504],
            backoff,
            hold_rejections: false,
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

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn annotations_override_the_worker_policy() {
        let worker = policy(Backoff::Exponential);
        let (p, bad) = worker.with_annotations(&annotations(&[
            (ANNOTATION_ATTEMPTS, "7"),
            (ANNOTATION_CODES, " 418, 429 ,418"),
            (ANNOTATION_MIN_WAIT, "5s"),
            (ANNOTATION_MAX_WAIT, "5m"),
            ("com.openfaas.scale.max", "4"),
        ]));
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(p.max_attempts, 7);
        assert_eq!(p.codes, vec![418, 429]);
        assert_eq!(p.initial_wait, Duration::from_secs(5));
        assert_eq!(p.max_wait, Duration::from_secs(300));
        assert_eq!(p.backoff, Backoff::Exponential);
        assert_eq!(decide(&status(418), 1, &p, 0.0), retry(5));
        assert_eq!(decide(&status(503), 1, &p, 0.0), Decision::Ack);
        assert_eq!(decide(&status(418), 7, &p, 0.0), EXHAUSTED);
    }

    #[test]
    fn no_annotations_borrow_the_worker_policy() {
        let worker = policy(Backoff::Exponential);
        let (p, bad) = worker.with_annotations(&annotations(&[
            ("com.openfaas.scale.max", "4"),
            (ANNOTATION_ATTEMPTS, " "),
        ]));
        assert!(matches!(p, Cow::Borrowed(_)));
        assert!(bad.is_empty());
    }

    #[test]
    fn invalid_annotations_fall_back_one_by_one() {
        let worker = policy(Backoff::Exponential);
        let rows: &[(&str, &str)] = &[
            (ANNOTATION_ATTEMPTS, "many"),
            (ANNOTATION_ATTEMPTS, "0"),
            (ANNOTATION_ATTEMPTS, "-3"),
            (ANNOTATION_CODES, "429,abc"),
            (ANNOTATION_CODES, "700"),
            (ANNOTATION_CODES, ","),
            (ANNOTATION_MIN_WAIT, "5"),
            (ANNOTATION_MIN_WAIT, "0s"),
            (ANNOTATION_MIN_WAIT, "0"),
            (ANNOTATION_MIN_WAIT, "99ms"),
            (ANNOTATION_MAX_WAIT, "-1s"),
            (ANNOTATION_MAX_WAIT, "0s"),
            (ANNOTATION_MAX_WAIT, "50ms"),
        ];
        for (key, value) in rows {
            let (p, bad) =
                worker.with_annotations(&annotations(&[(key, value), (ANNOTATION_ATTEMPTS, "9")]));
            if *key == ANNOTATION_ATTEMPTS {
                assert_eq!(p.max_attempts, 9, "the later valid value of {key}");
                continue;
            }
            assert_eq!(bad.len(), 1, "{key}={value}: {bad:?}");
            assert_eq!(bad[0].key, *key);
            assert_eq!(bad[0].value, *value);
            assert_eq!(p.max_attempts, 9, "a bad {key} must not void the others");
            assert_eq!(p.codes, worker.codes);
            assert_eq!(p.initial_wait, worker.initial_wait);
            assert_eq!(p.max_wait, worker.max_wait);
        }
        for value in ["many", "0", "-3", "1000001"] {
            let (p, bad) = worker.with_annotations(&annotations(&[(ANNOTATION_ATTEMPTS, value)]));
            assert_eq!(bad.len(), 1, "{value}");
            assert_eq!(p.max_attempts, worker.max_attempts);
        }
    }

    #[test]
    fn crossed_waits_follow_the_annotated_one() {
        let worker = policy(Backoff::Exponential); // 10s .. 120s
        let (p, bad) = worker.with_annotations(&annotations(&[(ANNOTATION_MIN_WAIT, "5m")]));
        assert!(bad.is_empty());
        assert_eq!((p.initial_wait.as_secs(), p.max_wait.as_secs()), (300, 300));
        let (p, bad) = worker.with_annotations(&annotations(&[(ANNOTATION_MAX_WAIT, "2s")]));
        assert!(bad.is_empty());
        assert_eq!((p.initial_wait.as_secs(), p.max_wait.as_secs()), (2, 2));
        let (p, bad) = worker.with_annotations(&annotations(&[
            (ANNOTATION_MIN_WAIT, "1m"),
            (ANNOTATION_MAX_WAIT, "30s"),
        ]));
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].key, ANNOTATION_MIN_WAIT);
        assert_eq!((p.initial_wait.as_secs(), p.max_wait.as_secs()), (10, 30));
    }

    #[test]
    fn retry_after_uses_the_function_bounds() {
        let worker = policy(Backoff::Exponential);
        let (p, _) = worker.with_annotations(&annotations(&[
            (ANNOTATION_MIN_WAIT, "1s"),
            (ANNOTATION_MAX_WAIT, "3s"),
        ]));
        let after = |secs| CallResult::Status {
            code: 429,
            internal: false,
            retry_after: Some(Duration::from_secs(secs)),
        };
        assert_eq!(decide(&after(2), 1, &p, 0.0), retry(2));
        assert_eq!(decide(&after(0), 1, &p, 0.0), retry(1));
        assert_eq!(decide(&after(60), 1, &p, 0.0), retry(3));
    }

    #[test]
    fn codes_parse_sorted_and_deduplicated() {
        assert_eq!(parse_codes("503, 429,503"), Some(vec![429, 503]));
        assert_eq!(parse_codes(""), None);
        assert_eq!(parse_codes("99"), None);
        assert_eq!(parse_codes("429;503"), None);
    }

    #[test]
    fn one_attempt_means_no_retry() {
        let mut p = policy(Backoff::Exponential);
        p.max_attempts = 1;
        assert_eq!(decide(&status(503), 1, &p, 0.0), EXHAUSTED);
    }
}
