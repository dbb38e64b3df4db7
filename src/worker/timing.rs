//! When a delivered call may run (issue 18): not before its start time (`X-Not-Before`),
//! and not once it has waited longer than its maximum age (`max_call_age`, or the
//! function's `com.openfaas.queue.max_age`). Also the attempt number's correction for the
//! delivery a deferral used up.
//!
//! Pure: no I/O, no clock of its own, no async. The caller passes `now`, the message's
//! published time and its settings as plain values, so every rule is a row of a table test
//! and the worker's flow (`flow.rs`) only maps the answer onto JetStream: [`Gate::Defer`] is a
//! NAK with that delay (the server holds the message; the worker keeps no slot, task or
//! timer for it), [`Gate::Expire`] a dead-letter entry with reason `expired`.
//!
//! Times are wall-clock (`SystemTime`): the start time is written by a producer, the
//! published time by the NATS server and `now` is the worker's. Clock skew between them
//! moves a start or an expiry by the skew; nothing else depends on it.

use std::time::{Duration, SystemTime};

/// What to do with a delivered call now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Run it.
    Run,
    /// Not before its start time: hand it back to JetStream to be redelivered after this
    /// long (the time left until the start).
    Defer(Duration),
    /// It waited longer than its maximum age since it became due: do not run it.
    Expire {
        /// How long it has waited since it became due.
        age: Duration,
    },
}

/// The decision for one delivery, first or a retry (a call waiting to be retried is still
/// queued, so it can expire too).
///
/// A call becomes due at `max(published, not_before)`; its age counts from then, so a call
/// delayed by a day is not expired by a one-hour maximum age the moment it starts. A zero
/// or absent `max_age` means no expiry. The age must exceed `max_age` to expire.
pub fn gate(
    now: SystemTime,
    published: SystemTime,
    not_before: Option<SystemTime>,
    max_age: Option<Duration>,
) -> Gate {
    if let Some(start) = not_before {
        if let Ok(left) = start.duration_since(now) {
            if !left.is_zero() {
                return Gate::Defer(left);
            }
        }
    }
    let due = not_before.map_or(published, |start| start.max(published));
    // A published time ahead of the worker's clock (skew) is an age of zero.
    let age = now.duration_since(due).unwrap_or_default();
    match max_age {
        Some(max) if !max.is_zero() && age > max => Gate::Expire { age },
        _ => Gate::Run,
    }
}

/// The attempt number of a delivery that runs (or expires), from JetStream's delivery count.
///
/// A deferral is a NAK, and a NAK uses up one delivery. When the message has a start time
/// later than its publication and this delivery is at or after it, the first delivery was
/// most likely the one deferred: one is taken off (never below 1). At most one deferral
/// normally happens, since the NAK's delay ends exactly at the start time.
///
/// The edge: when no worker saw the message before its start time (all were down, or busy
/// with a backlog), nothing was deferred, yet retries are still corrected by one, so such a
/// call gets at most one attempt more than allowed. The correction cannot tell the two
/// cases apart without state outside JetStream, and one extra attempt is the cheaper error
/// (the other is one attempt fewer for every delayed call).
pub fn attempt(
    delivered: u32,
    published: SystemTime,
    not_before: Option<SystemTime>,
    now: SystemTime,
) -> u32 {
    match not_before {
        Some(start) if start > published && now >= start && delivered > 1 => delivered - 1,
        _ => delivered.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    /// `T0 + ms` as a wall-clock time.
    fn at(ms: i64) -> SystemTime {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(T0);
        if ms >= 0 {
            base + Duration::from_millis(ms as u64)
        } else {
            base - Duration::from_millis(ms.unsigned_abs())
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn gate_table() {
        // (now, published, not_before, max_age, expected), times in ms after T0.
        type Row = (i64, i64, Option<i64>, Option<u64>, Gate);
        #[rustfmt::skip]
        let rows: &[Row] = &[
            // No start time, no maximum age: always run.
            (0,       0, None,         None,         Gate::Run),
            (86_400_000, 0, None,      None,         Gate::Run),
            // Before the start time: deferred for exactly the time left.
            (0,       0, Some(1_500),  None,         Gate::Defer(ms(1_500))),
            (1_499,   0, Some(1_500),  None,         Gate::Defer(ms(1))),
            // At or after it: run.
            (1_500,   0, Some(1_500),  None,         Gate::Run),
            (1_600,   0, Some(1_500),  None,         Gate::Run),
            // A start time in the past (or before publication) changes nothing.
            (10,      5, Some(-60_000), None,        Gate::Run),
            // Maximum age, counted from publication.
            (1_000,   0, None,         Some(1_000),  Gate::Run),
            (1_001,   0, None,         Some(1_000),  Gate::Expire { age: ms(1_001) }),
            // Zero means no expiry.
            (9_999_999, 0, None,       Some(0),      Gate::Run),
            // Counted from the start time when there is one: due at 10 s, so 10.5 s is 500 ms old.
            (10_500,  0, Some(10_000), Some(1_000),  Gate::Run),
            (11_001,  0, Some(10_000), Some(1_000),  Gate::Expire { age: ms(1_001) }),
            // A start time before publication: due at publication.
            (2_500,   1_000, Some(0),  Some(1_000),  Gate::Expire { age: ms(1_500) }),
            // Not yet due is never expired, however long it has been stored.
            (50_000,  0, Some(60_000), Some(1),      Gate::Defer(ms(10_000))),
            // A published time ahead of the worker's clock (skew): age zero.
            (0,       500, None,       Some(100),    Gate::Run),
            // A retry delivered after the maximum age (the case "retry wait pushes it past"):
            // expired, whatever the attempt.
            (3_000,   0, None,         Some(1_500),  Gate::Expire { age: ms(3_000) }),
        ];
        for &(now, published, not_before, max_age, want) in rows {
            let got = gate(at(now), at(published), not_before.map(at), max_age.map(ms));
            assert_eq!(
                got, want,
                "now {now}, published {published}, not_before {not_before:?}, max_age {max_age:?}"
            );
        }
    }

    #[test]
    fn attempt_table() {
        // (delivered, published, not_before, now, expected attempt), times in ms after T0.
        #[rustfmt::skip]
        let rows: &[(u32, i64, Option<i64>, i64, u32)] = &[
            // No start time: the delivery count.
            (1, 0, None,         0,     1),
            (3, 0, None,         9_000, 3),
            // Deferred once, then delivered at the start time: attempt 1, and its retries follow.
            (2, 0, Some(1_500),  1_500, 1),
            (3, 0, Some(1_500),  4_000, 2),
            // First seen after the start time (no deferral): the first delivery stays 1 ...
            (1, 0, Some(1_500),  9_000, 1),
            // ... and its retries are one lower (the documented edge: one extra attempt).
            (2, 0, Some(1_500),  9_000, 1),
            // A start time not after publication: nothing was deferred.
            (2, 1_000, Some(1_000), 2_000, 2),
            (2, 1_000, Some(0),  2_000, 2),
            // Before the start time (a deferral now): not corrected.
            (2, 0, Some(1_500),  1_000, 2),
            // Never 0.
            (0, 0, None,         0,     1),
            (0, 0, Some(1_500),  2_000, 1),
        ];
        for &(delivered, published, not_before, now, want) in rows {
            let got = attempt(delivered, at(published), not_before.map(at), at(now));
            assert_eq!(
                got, want,
                "delivered {delivered}, published {published}, not_before {not_before:?}, now {now}"
            );
        }
    }

    /// With the gate's own answer: the NAK's delay lands at the start time, so the delivery
    /// after a deferral always counts as attempt 1, and max attempts are honoured.
    #[test]
    fn a_deferral_then_the_allowed_attempts() {
        let (published, start) = (at(0), Some(at(1_500)));
        let Gate::Defer(wait) = gate(at(20), published, start, None) else {
            panic!("deferred first");
        };
        let back = at(20) + wait;
        assert_eq!(gate(back, published, start, None), Gate::Run);
        assert_eq!(attempt(2, published, start, back), 1);
        assert_eq!(attempt(3, published, start, back + ms(1_000)), 2);
    }
}
