//! Operator commands (`queue status/purge`, `dead list/replay/purge`): each reads or changes
//! JetStream directly, prints for people by default and JSON for scripts, and ends with an
//! exit code a script can branch on.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | failed on the way (the message says what) |
//! | 2 | bad usage or configuration |
//! | 3 | NATS or JetStream unreachable |
//! | 4 | the stream does not exist |

pub mod args;
pub mod call;
pub mod commands;
pub mod dead;
pub mod queue;

/// `println!` for command output that may go to a pipe: when the reader has gone
/// (`queue status | head -3`), the command ends quietly with exit code 0 instead of
/// panicking the way `println!` does on a broken pipe.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::cli::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` counterpart of [`outln!`], flushed at once (progress lines).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))
    };
}

#[doc(hidden)]
pub fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let result = stdout.write_fmt(args).and_then(|()| stdout.flush());
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            crate::telemetry::logging::finish();
            std::process::exit(0)
        }
        Err(e) => {
            crate::telemetry::logging::finish();
            crate::telemetry::logging::last_words(format_args!(
                "queue-worker: cannot write output: {e}"
            ));
            std::process::exit(1)
        }
    }
}

use std::time::Duration;

use async_nats::jetstream;

use crate::nats::ConnectError;

/// How long one JetStream request of a command may take (purging a large stream is slow).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Why an operator command failed; [`CliError::exit_code`] is what the process exits with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("JetStream did not answer: {0} (is the server running with JetStream enabled?)")]
    NoJetStream(String),
    /// The full message: which stream, and what may explain it.
    #[error("{0}")]
    NoStream(String),
    #[error("{0}")]
    Failed(String),
    /// `call`: no call has that id.
    #[error("{0}")]
    UnknownCall(String),
    /// `call cancel`: the call already ended.
    #[error("{0}")]
    CallEnded(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Failed(_) => 1,
            CliError::Usage(_) | CliError::Connect(ConnectError::Config(_)) => 2,
            CliError::Connect(ConnectError::Unreachable { .. } | ConnectError::Refused { .. })
            | CliError::NoJetStream(_) => 3,
            CliError::NoStream(_) => 4,
            CliError::UnknownCall(_) => 5,
            CliError::CallEnded(_) => 6,
        }
    }
}

/// A JetStream context for commands, on a connection made once (no waiting for a server
/// that is not there).
pub async fn jetstream(nats: &crate::config::NatsConfig) -> Result<jetstream::Context, CliError> {
    let client = crate::nats::connect_once(nats).await?;
    let mut js = jetstream::new(client);
    js.set_timeout(REQUEST_TIMEOUT);
    Ok(js)
}

/// Opens a stream, telling a missing stream apart from a server that does not answer.
pub async fn stream(
    js: &jetstream::Context,
    name: &str,
) -> Result<jetstream::stream::Stream, CliError> {
    use jetstream::context::GetStreamErrorKind;
    match js.get_stream(name).await {
        Ok(s) => Ok(s),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Err(CliError::NoStream(format!(
                    "stream {name} does not exist: nothing was published to this queue yet, or it was deleted (check queue_name)"
                )))
            }
            GetStreamErrorKind::Request => Err(CliError::NoJetStream(e.to_string())),
            _ => Err(CliError::Failed(format!("cannot read stream {name}: {e}"))),
        },
    }
}

/// `1`, `1 entry` / `2 entries` style plurals for messages.
pub(crate) fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Bytes for people: `512 B`, `1.5 KiB`, `3.2 MiB`.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// Prints rows as a left-aligned table with two spaces between columns.
pub(crate) fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        crate::outln!("{}", line.join("  ").trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 20), "5.0 MiB");
    }

    #[test]
    fn exit_codes_tell_causes_apart() {
        assert_eq!(CliError::NoStream("s".into()).exit_code(), 4);
        assert_eq!(CliError::Usage("u".into()).exit_code(), 2);
        assert_eq!(CliError::NoJetStream("x".into()).exit_code(), 3);
        let e = CliError::Connect(ConnectError::Unreachable {
            servers: "nats://127.0.0.1:1".into(),
            reason: "refused".into(),
        });
        assert_eq!(e.exit_code(), 3);
        assert!(e.to_string().contains("nats://127.0.0.1:1"), "{e}");
        let e = CliError::Connect(ConnectError::Refused {
            servers: "nats://127.0.0.1:1".into(),
            auth: "nats_creds_file",
            reason: "authorization violation".into(),
        });
        assert_eq!(e.exit_code(), 3);
        assert!(e.to_string().contains("nats_creds_file"), "{e}");
    }
}
