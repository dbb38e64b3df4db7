//! Logging setup: `log_encoding` console or json, `debug` for debug level. `RUST_LOG`, when
//! set, overrides the level filter (for example `RUST_LOG=queue_worker=debug,async_nats=info`).
//!
//! Lines go to stderr in batches. Every invocation logs two info lines (`Invoke` and
//! `Invoked`, as OpenFaaS's worker does); written one by one, those two `write` calls were a
//! tenth of the worker's CPU per call. Info and debug lines are appended to a buffer that
//! [`flush_periodically`] writes out `log_flush_interval` after its first line (or at once past
//! 32 KiB). Warnings and errors write the buffer out at once, so they are never late and the
//! order of lines is kept. What is buffered when the process is killed (at most one interval
//! of info lines) is lost; `log_flush_interval=0` writes every line as it comes.

use std::io::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::LogEncoding;

/// Past this much buffered text, the writer flushes at once.
const HIGH_WATER: usize = 32 << 10;

/// Lines not yet written.
static BUFFER: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// Wakes [`flush_periodically`] when the buffer gets its first line.
static PENDING: Notify = Notify::const_new();

/// Installs the global subscriber; later calls do nothing. `quiet` logs warnings only (the
/// demo, whose own output is the show). `flush_interval` zero writes each line at once;
/// otherwise [`flush_periodically`] must run for info lines to appear before [`flush`].
pub fn init(encoding: LogEncoding, debug: bool, quiet: bool, flush_interval: Duration) {
    let default = if quiet {
        "warn"
    } else if debug {
        "debug,hyper=info,hyper_util=info,reqwest=info,h2=info,rustls=info"
    } else {
        "info,async_nats=warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Stderr {
            batch: !flush_interval.is_zero(),
        })
        // Colour only on a terminal: escape codes in a log collector are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let installed = match encoding {
        LogEncoding::Console => builder.try_init(),
        LogEncoding::Json => builder.json().flatten_event(true).try_init(),
    };
    if installed.is_ok() {
        // A panic message goes straight to stderr: write out the lines before it first.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(mut buffer) = BUFFER.try_lock() {
                write_out(&mut buffer);
            }
            previous(info);
        }));
    }
}

/// Writes buffered lines `interval` after the first of them arrives, for as long as it runs
/// (spawn it on the runtime).
pub async fn flush_periodically(interval: Duration) {
    loop {
        PENDING.notified().await;
        tokio::time::sleep(interval).await;
        flush();
    }
}

/// Writes out whatever is buffered (at exit, before printing an error).
pub fn flush() {
    let mut buffer = BUFFER.lock().unwrap_or_else(|e| e.into_inner());
    write_out(&mut buffer);
}

fn write_out(buffer: &mut Vec<u8>) {
    if buffer.is_empty() {
        return;
    }
    // Nowhere else to report a failed log write; the lines are dropped.
    let _ = std::io::stderr().lock().write_all(buffer);
    buffer.clear();
    if buffer.capacity() > 4 * HIGH_WATER {
        buffer.shrink_to(HIGH_WATER);
    }
}

/// The subscriber's writer: one per event.
#[derive(Clone, Copy)]
struct Stderr {
    batch: bool,
}

/// One event's text on its way to stderr.
struct Line {
    /// Write at once (and everything before it): warnings, errors, or batching off.
    now: bool,
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { now: !self.batch }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Line {
        Line {
            now: !self.batch || *meta.level() <= tracing::Level::WARN,
        }
    }
}

impl std::io::Write for Line {
    fn write(&mut self, text: &[u8]) -> std::io::Result<usize> {
        let mut buffer = BUFFER.lock().unwrap_or_else(|e| e.into_inner());
        let first = buffer.is_empty();
        buffer.extend_from_slice(text);
        if self.now || buffer.len() >= HIGH_WATER {
            write_out(&mut buffer);
        } else if first {
            PENDING.notify_one();
        }
        Ok(text.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
