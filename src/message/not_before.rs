//! `X-Not-Before`: the earliest time a queued call may start (issue 18, delayed start).
//!
//! It travels as an HTTP header inside the `QueueRequest`'s `Header` map, so a message the
//! OpenFaaS gateway published for a client that sent the header is honoured too. Producers
//! accept two forms from people ([`Spec::parse`]): an RFC 3339 time
//! (`2026-05-01T12:00:00Z`, any offset) or a delay in whole or decimal seconds (`30`,
//! `1.5`) counted from when the producer receives it. What our producers store is always
//! the absolute form, RFC 3339 in UTC ([`format`]): a delay means nothing once the message
//! has waited in the stream. The worker reads a stored value with [`parse_stored`], which
//! also takes the seconds form (counted from the message's publish time, as the gateway
//! stores what the client sent).
//!
//! Both sides refuse a start more than [`MAX_DELAY`] ahead: a typo in the year would
//! otherwise park a call for decades, and the front door says so (400) instead.

use std::time::{Duration, SystemTime};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The header, in Go's canonical form (as the front door stores header names).
pub const HEADER: &str = "X-Not-Before";

/// The furthest ahead a start time may be: 7 days.
pub const MAX_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);

/// What the forms allow, for error messages.
pub const ALLOWED: &str =
    "an RFC 3339 time (e.g. 2026-05-01T12:00:00Z) or a delay in seconds (e.g. 30 or 1.5), at most 7 days (604800 seconds) ahead";

/// Why a value is refused. The message names the header, the value and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotBeforeError {
    #[error("{HEADER} {0:?} is not {ALLOWED}")]
    Malformed(String),
    #[error("{HEADER} {0:?} is more than 7 days (604800 seconds) ahead; allowed: {ALLOWED}")]
    TooFar(String),
}

/// A start time as written, before it is anchored to a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spec {
    /// An absolute time (RFC 3339). It may be in the past: the call starts at once.
    At(SystemTime),
    /// A delay from when the value is received; at most [`MAX_DELAY`].
    In(Duration),
}

impl Spec {
    /// Reads either form. Seconds are digits with an optional fraction (`30`, `1.5`, `0.250`):
    /// no sign, exponent, `inf` or `NaN`, which Rust's float parser would take.
    pub fn parse(value: &str) -> Result<Spec, NotBeforeError> {
        let v = value.trim();
        let malformed = || NotBeforeError::Malformed(shown(value));
        if is_seconds(v) {
            let secs: f64 = v.parse().map_err(|_| malformed())?;
            if !secs.is_finite() || secs > MAX_DELAY.as_secs_f64() {
                return Err(NotBeforeError::TooFar(shown(value)));
            }
            return Ok(Spec::In(Duration::from_secs_f64(secs)));
        }
        let at = OffsetDateTime::parse(v, &Rfc3339).map_err(|_| malformed())?;
        Ok(Spec::At(SystemTime::from(at)))
    }

    /// The absolute start time, a delay counted from `now`; refused when more than
    /// [`MAX_DELAY`] after `now`. `value` is only for the error message.
    pub fn resolve(self, now: SystemTime, value: &str) -> Result<SystemTime, NotBeforeError> {
        let at = match self {
            Spec::At(t) => t,
            Spec::In(d) => now.checked_add(d).ok_or_else(|| too_far(value))?,
        };
        match at.duration_since(now) {
            Ok(ahead) if ahead > MAX_DELAY => Err(too_far(value)),
            _ => Ok(at),
        }
    }
}

fn too_far(value: &str) -> NotBeforeError {
    NotBeforeError::TooFar(shown(value))
}

/// Error messages quote at most 64 characters of what was sent.
fn shown(value: &str) -> String {
    value.chars().take(64).collect()
}

fn is_seconds(v: &str) -> bool {
    let (whole, frac) = v.split_once('.').unwrap_or((v, "0"));
    !whole.is_empty()
        && !frac.is_empty()
        && whole.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
}

/// A value as a producer receives it, anchored at `now` (when it was received).
pub fn parse(value: &str, now: SystemTime) -> Result<SystemTime, NotBeforeError> {
    Spec::parse(value)?.resolve(now, value)
}

/// A value as stored in a message, read by the worker: either form, a delay counted from
/// `published` (the stream's timestamp of the message).
pub fn parse_stored(value: &str, published: SystemTime) -> Result<SystemTime, NotBeforeError> {
    parse(value, published)
}

/// The stored form: RFC 3339 in UTC, with the fraction of a second when there is one.
pub fn format(at: SystemTime) -> String {
    OffsetDateTime::from(at)
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> SystemTime {
        SystemTime::from(OffsetDateTime::parse(s, &Rfc3339).unwrap())
    }

    #[test]
    fn both_forms_are_read_and_anchored() {
        let now = t("2026-05-01T12:00:00Z");
        let secs = Duration::from_secs;
        let cases: &[(&str, Result<SystemTime, ()>)] = &[
            ("0", Ok(now)),
            ("30", Ok(now + secs(30))),
            (" 1.5 ", Ok(now + Duration::from_millis(1500))),
            ("0.250", Ok(now + Duration::from_millis(250))),
            ("604800", Ok(now + MAX_DELAY)),
            ("2026-05-01T12:00:10Z", Ok(now + secs(10))),
            ("2026-05-01T14:00:10+02:00", Ok(now + secs(10))),
            (
                "2026-05-01T12:00:00.5Z",
                Ok(now + Duration::from_millis(500)),
            ),
            // The past is allowed: the call starts at once.
            ("2020-01-01T00:00:00Z", Ok(t("2020-01-01T00:00:00Z"))),
            ("2026-05-08T12:00:00Z", Ok(now + MAX_DELAY)),
            // Refused.
            ("604800.001", Err(())),
            ("2026-05-08T12:00:01Z", Err(())),
            ("99999999999999999999999", Err(())),
            ("-1", Err(())),
            ("+1", Err(())),
            ("1e3", Err(())),
            ("NaN", Err(())),
            ("inf", Err(())),
            ("1.", Err(())),
            (".5", Err(())),
            ("30s", Err(())),
            ("", Err(())),
            ("tomorrow", Err(())),
            ("2026-05-01 12:00:00", Err(())),
            ("Fri, 01 May 2026 12:00:00 GMT", Err(())),
        ];
        for (value, want) in cases {
            let got = parse(value, now).map_err(|_| ());
            assert_eq!(&got, want, "{value:?}");
        }
    }

    #[test]
    fn errors_name_the_header_the_value_and_what_is_allowed() {
        let now = SystemTime::now();
        for bad in ["abc", "-5", "700000"] {
            let e = parse(bad, now).unwrap_err().to_string();
            assert!(
                e.contains("X-Not-Before")
                    && e.contains(&format!("{bad:?}"))
                    && e.contains("RFC 3339")
                    && e.contains("7 days"),
                "{e}"
            );
        }
        let long = "x".repeat(1000);
        assert!(parse(&long, now).unwrap_err().to_string().len() < 300);
    }

    #[test]
    fn the_stored_form_is_rfc3339_utc_and_reads_back() {
        let at = t("2026-05-01T12:00:00.125Z");
        assert_eq!(format(at), "2026-05-01T12:00:00.125Z");
        assert_eq!(
            format(t("2026-05-01T14:00:00+02:00")),
            "2026-05-01T12:00:00Z"
        );
        let now = SystemTime::now();
        let later = now + Duration::from_millis(1500);
        assert_eq!(parse_stored(&format(later), now), Ok(later));
    }
}
