//! Go-style durations (`30s`, `1m30s`, `500ms`, `2h`), the format every OpenFaaS duration
//! setting uses (`ack_wait=60s`, `max_retry_wait=120s`), so values copied from an OpenFaaS
//! values file mean the same thing here.

use std::time::Duration;

/// Parses a Go `time.ParseDuration` string. Like Go, a bare number is rejected (except `0`),
/// because `30` could mean seconds or milliseconds and guessing wrong is worse than an error.
/// Negative durations are rejected: no setting of ours has a use for them.
pub fn parse(input: &str) -> Option<Duration> {
    let s = input.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() || s.starts_with('-') {
        return None;
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let number: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    if !total.is_finite() || total > u32::MAX as f64 {
        return None;
    }
    Some(Duration::from_secs_f64(total))
}

/// Formats a duration the way Go prints it, for messages that echo configuration back.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return format!("{}ms", d.as_secs_f64() * 1e3);
    }
    if ms % 1000 != 0 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        let cases = [
            ("0", Some(0)),
            ("30s", Some(30_000)),
            ("1m", Some(60_000)),
            ("1m30s", Some(90_000)),
            ("500ms", Some(500)),
            ("1.5s", Some(1_500)),
            ("2h", Some(7_200_000)),
            (" 10s ", Some(10_000)),
            ("30", None),
            ("", None),
            ("-5s", None),
            ("5x", None),
            ("s", None),
            ("1..2s", None),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse(input).map(|d| d.as_millis() as u64),
                want,
                "input {input:?}"
            );
        }
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format(Duration::from_secs(90)), "1m30s");
        assert_eq!(format(Duration::from_millis(250)), "250ms");
        assert_eq!(format(Duration::from_secs(0)), "0ms");
        assert_eq!(format(Duration::from_secs(3600)), "1h");
    }
}
