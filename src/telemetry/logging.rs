//! Logging setup: `log_encoding` console or json, `debug` for debug level. `RUST_LOG`, when
//! set, overrides the level filter (for example `RUST_LOG=queue_worker=debug,async_nats=info`).
//!
//! Lines are written to stderr by a thread of their own, never by the runtime: when stderr
//! is a pipe whose reader stalls (a slow container log driver), a `write` there would block
//! the (single) runtime thread, leases would stop being renewed and messages would run twice.
//! The thread is `tracing-appender`'s non-blocking writer, fed through a queue bounded to
//! [`MAX_QUEUED`] bytes; what does not fit is dropped and counted in
//! `queue_worker_log_lines_dropped_total`.
//!
//! Lines are handed over in batches. Every invocation logs two info lines (`Invoke` and
//! `Invoked`, as OpenFaaS's worker does); written one by one, those two `write` calls were a
//! tenth of the worker's CPU per call, and handing them one by one to the thread would wake
//! it per line. Info and debug lines are appended to a buffer that [`flush_periodically`]
//! hands over `log_flush_interval` after its first line (or at once past 32 KiB). Warnings
//! and errors hand the buffer over at once, so they are never late and the order of lines is
//! kept. [`finish`] at exit writes everything still queued (giving up when stderr takes
//! nothing for a second). What is buffered when the process is killed (at most one interval
//! of info lines, and the queue) is lost; `log_flush_interval=0` hands over every line as it
//! comes.

use std::io::Write as _;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::LogEncoding;

/// Past this much buffered text, the writer hands the batch over at once.
const HIGH_WATER: usize = 32 << 10;
/// Bytes handed to the writer thread and not yet written, at most: the memory a stalled
/// stderr may cost (as Docker's non-blocking log mode buffers 1 MiB by default).
pub const MAX_QUEUED: usize = 1 << 20;
/// Batches in the writer thread's channel, at most (with `log_flush_interval=0`, lines);
/// [`MAX_QUEUED`] is usually the tighter bound.
const MAX_BATCHES: usize = 1024;
/// At exit, how long stderr may take no line before the rest is given up.
const EXIT_IDLE: Duration = Duration::from_secs(1);
/// In the panic hook, how long the panic message (queued like any line) may take to be
/// written before the panicking thread goes on.
const PANIC_WAIT: Duration = Duration::from_millis(100);

/// Lines not yet handed over, and where they go.
static STATE: Mutex<State> = Mutex::new(State {
    buffer: Vec::new(),
    out: None,
    stalled: false,
});
/// Wakes [`flush_periodically`] when the buffer gets its first line.
static PENDING: Notify = Notify::const_new();
/// What the writer thread has yet to write; [`WRITTEN`] tells waiters it wrote a batch.
static QUEUE: Mutex<Queue> = Mutex::new(Queue {
    bytes: 0,
    batches: 0,
    waiters: 0,
});
static WRITTEN: Condvar = Condvar::new();
/// Keeps the writer thread until [`finish`].
static GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);

struct State {
    buffer: Vec<u8>,
    /// The writer thread's queue; `None` before [`init`] and after [`finish`], when lines are
    /// written directly.
    out: Option<Out>,
    /// [`finish`] found stderr not taking lines: later ones are dropped, not written.
    stalled: bool,
}

struct Out {
    queue: NonBlocking,
    /// Batches the channel refused (full).
    refused: ErrorCounter,
}

struct Queue {
    /// Handed over, not yet written.
    bytes: usize,
    /// Written so far: a waiter sees progress.
    batches: u64,
    /// Threads waiting on [`WRITTEN`]; without any, the writer thread does not notify.
    waiters: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Installs the global subscriber and starts the writer thread; later calls do nothing.
/// `quiet` logs warnings only (the demo, whose own output is the show). `flush_interval` zero
/// hands each line over at once; otherwise [`flush_periodically`] must run for info lines to
/// appear before [`finish`].
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
    if installed.is_err() {
        return;
    }
    let (queue, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(MAX_BATCHES)
        .thread_name("log-writer")
        .finish(Output);
    let refused = queue.error_counter();
    lock(&STATE).out = Some(Out { queue, refused });
    *lock(&GUARD) = Some(guard);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // The message goes the way of every line, after the lines before it: written
        // directly, as the default hook does, it would block this thread (perhaps the
        // runtime's) for as long as a stalled stderr does. Never wait for the lock: the
        // panicking thread may hold it, and then the default hook is all there is.
        let Ok(mut state) = STATE.try_lock() else {
            previous(info);
            return;
        };
        let thread = std::thread::current();
        let mut text = format!("thread '{}' {info}\n", thread.name().unwrap_or("<unnamed>"));
        let trace = std::backtrace::Backtrace::capture();
        if trace.status() == std::backtrace::BacktraceStatus::Captured {
            text.push_str(&format!("stack backtrace:\n{trace}\n"));
        }
        state.buffer.extend_from_slice(text.as_bytes());
        state.hand_over();
        drop(state);
        // A panic may end the process (in `main`, or with panic=abort): give the writer a
        // moment, bounded, so the message is not lost.
        wait_written(PANIC_WAIT, PANIC_WAIT);
    }));
}

/// Hands buffered lines over `interval` after the first of them arrives, for as long as it
/// runs (spawn it on the runtime).
pub async fn flush_periodically(interval: Duration) {
    loop {
        PENDING.notified().await;
        tokio::time::sleep(interval).await;
        flush();
    }
}

/// Hands whatever is buffered to the writer thread, without waiting for it to be written.
pub fn flush() {
    lock(&STATE).hand_over();
}

/// At exit: hands over what is buffered, waits until the writer thread has written it all
/// (as long as stderr takes lines; after a second without progress the rest is given up,
/// since the process must still exit), and stops the thread. Returns whether stderr took
/// everything; when it did not, it is stalled, and lines logged afterwards are dropped
/// rather than written directly (which would hang the exit). Otherwise they are written
/// directly.
pub fn finish() -> bool {
    let out = {
        let mut state = lock(&STATE);
        state.hand_over();
        state.out.take()
    };
    let Some(out) = out else {
        return !lock(&STATE).stalled;
    };
    drop(out);
    let drained = wait_written(EXIT_IDLE, Duration::MAX);
    lock(&STATE).stalled = !drained;
    let Some(guard) = lock(&GUARD).take() else {
        return drained;
    };
    if drained {
        // Stops the thread, which has nothing left to write.
        drop(guard);
    } else {
        // The thread is stuck in a write: dropping the guard would wait for it, then print
        // a complaint. The thread ends with the process.
        std::mem::forget(guard);
    }
    drained
}

/// Waits until the writer thread has written everything handed to it; false when it wrote
/// nothing for `idle`, or `total` passed.
fn wait_written(idle: Duration, total: Duration) -> bool {
    let start = Instant::now();
    let mut queue = lock(&QUEUE);
    queue.waiters += 1;
    let drained = loop {
        if queue.bytes == 0 {
            break true;
        }
        let seen = queue.batches;
        let left = total.saturating_sub(start.elapsed());
        let (q, timeout) = WRITTEN
            .wait_timeout(queue, idle.min(left))
            .unwrap_or_else(|e| e.into_inner());
        queue = q;
        if queue.bytes == 0 {
            break true;
        }
        if (timeout.timed_out() && queue.batches == seen) || start.elapsed() >= total {
            break false;
        }
    };
    queue.waiters -= 1;
    drained
}

impl State {
    /// Hands the buffered lines to the writer thread as one batch, or drops and counts them
    /// when its queue is full; never waits. Without a writer thread, writes them directly.
    fn hand_over(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        match &mut self.out {
            Some(out) => {
                if !out.send(&self.buffer) {
                    let lines = self.buffer.iter().filter(|&&b| b == b'\n').count().max(1);
                    crate::telemetry::metrics::log_lines_dropped().inc_by(lines as u64);
                }
            }
            None if self.stalled => {
                let lines = self.buffer.iter().filter(|&&b| b == b'\n').count().max(1);
                crate::telemetry::metrics::log_lines_dropped().inc_by(lines as u64);
            }
            // Nowhere else to report a failed log write; the lines are dropped.
            None => {
                let _ = std::io::stderr().lock().write_all(&self.buffer);
            }
        }
        self.buffer.clear();
        if self.buffer.capacity() > 4 * HIGH_WATER {
            self.buffer.shrink_to(HIGH_WATER);
        }
    }
}

impl Out {
    /// Queues `batch`; false when it does not fit.
    fn send(&mut self, batch: &[u8]) -> bool {
        {
            let mut queue = lock(&QUEUE);
            // One batch bigger than the whole bound (a debug line with a large body) still
            // goes when nothing else is queued.
            if queue.bytes > 0 && queue.bytes + batch.len() > MAX_QUEUED {
                return false;
            }
            queue.bytes += batch.len();
        }
        let refused = self.refused.dropped_lines();
        // Lossy: a full channel refuses the batch instead of waiting, and counts it.
        let _ = self.queue.write_all(batch);
        if self.refused.dropped_lines() == refused {
            return true;
        }
        let mut queue = lock(&QUEUE);
        queue.bytes = queue.bytes.saturating_sub(batch.len());
        false
    }
}

/// stderr as the writer thread sees it: notes each batch written, for [`wait_written`].
struct Output;

impl std::io::Write for Output {
    fn write(&mut self, text: &[u8]) -> std::io::Result<usize> {
        self.write_all(text).map(|()| text.len())
    }

    /// One batch (the writer thread writes each with one `write_all`).
    fn write_all(&mut self, batch: &[u8]) -> std::io::Result<()> {
        // Nowhere else to report a failed log write; the lines are dropped.
        let _ = std::io::stderr().lock().write_all(batch);
        let mut queue = lock(&QUEUE);
        queue.bytes = queue.bytes.saturating_sub(batch.len());
        queue.batches += 1;
        if queue.waiters > 0 {
            WRITTEN.notify_all();
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The subscriber's writer: one per event.
#[derive(Clone, Copy)]
struct Stderr {
    batch: bool,
}

/// One event's text on its way to stderr.
struct Line {
    /// Hand over at once (and everything before it): warnings, errors, or batching off.
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
        let mut state = lock(&STATE);
        let first = state.buffer.is_empty();
        state.buffer.extend_from_slice(text);
        if self.now || state.buffer.len() >= HIGH_WATER {
            state.hand_over();
        } else if first {
            PENDING.notify_one();
        }
        Ok(text.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The process's last message, after [`finish`]: written straight to stderr like
/// `eprintln!`, unless [`finish`] found stderr stalled, where the write would hang the exit
/// (the same error was logged, and queued, before).
pub fn last_words(text: std::fmt::Arguments<'_>) {
    if lock(&STATE).stalled {
        return;
    }
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}
