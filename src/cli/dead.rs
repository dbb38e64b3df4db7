//! `queue-worker dead list|replay|purge`: the dead-letter stream `OF_<queue>-dead` for
//! operators. The work itself is in [`crate::worker::deadletter`]; this is opening it and printing.

use super::{plural, CliError};
use crate::config::Config;
use crate::message::function::FunctionName;
use crate::worker::deadletter::{DeadLetterError, DeadLetters, Filter, Reason};

impl From<DeadLetterError> for CliError {
    fn from(e: DeadLetterError) -> CliError {
        match e {
            DeadLetterError::NoStream(_) => CliError::NoStream(e.to_string()),
            DeadLetterError::Nats(m) => CliError::Failed(m),
        }
    }
}

/// The dead-letter stream of the configured queue, with its entry and byte totals.
pub async fn open(config: &Config) -> Result<(DeadLetters, u64, u64), CliError> {
    let js = super::jetstream(&config.nats).await?;
    // Tells "no JetStream" and "no stream" apart before the entries are read.
    match super::stream(&js, &config.stream_name()).await {
        Ok(_) | Err(CliError::NoStream(_)) => {}
        Err(e) => return Err(e),
    }
    let dl = DeadLetters::new(
        js,
        crate::nats::stream::DeadLetterLayout::of(config),
        &config.queue,
        &config.stream_name(),
        &config.default_namespace,
    );
    let (total, bytes) = dl.totals().await?;
    Ok((dl, total, bytes))
}

/// Prints the entries that pass `filter`, oldest first, as a table or JSON lines.
pub async fn list(dl: &DeadLetters, filter: &Filter, json: bool) -> Result<(), CliError> {
    // Rows are printed as they are read (the stream may hold a million entries), so the
    // columns have fixed widths; a longer cell pushes its row to the right.
    const WIDTHS: [usize; 7] = [6, 6, 24, 18, 8, 6, 0];
    let line = |cells: [&str; 7]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(WIDTHS)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        crate::outln!("{}", parts.join("  ").trim_end());
    };
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let mut first = true;
    dl.for_each(filter, async |r| {
        if json {
            crate::outln!("{}", serde_json::to_string(&r).unwrap_or_default());
            return Ok(());
        }
        if std::mem::take(&mut first) {
            line([
                "SEQ", "AGE", "FUNCTION", "REASON", "ATTEMPTS", "STATUS", "CALL ID",
            ]);
        }
        let age =
            crate::config::duration::format(std::time::Duration::from_secs(r.age().as_secs()));
        line([
            &r.sequence.to_string(),
            &age,
            &dash(&r.function),
            &r.reason,
            &r.attempts.to_string(),
            &dash(&r.last_status),
            &dash(&r.call_id),
        ]);
        Ok(())
    })
    .await?;
    Ok(())
}

/// Publishes the entries that pass `filter` back to the work queue and removes them.
pub async fn replay(dl: &DeadLetters, filter: &Filter, work_stream: &str) -> Result<(), CliError> {
    let report = dl.replay(filter).await;
    crate::outln!(
        "replayed {} from {} to {work_stream}",
        plural(report.replayed as u64, "message", "messages"),
        dl.stream(),
    );
    if !report.skipped.is_empty() {
        crate::outln!(
            "skipped {} stored without their payload (sequences {:?}); nothing to replay",
            plural(report.skipped.len() as u64, "entry", "entries"),
            report.skipped
        );
    }
    if let Some(e) = report.error {
        return Err(CliError::Failed(format!(
            "replay stopped after {}: {e}",
            plural(report.replayed as u64, "message", "messages")
        )));
    }
    if !report.not_removed.is_empty() {
        return Err(CliError::Failed(format!(
            "replayed but could not remove from {}: sequences {:?}",
            dl.stream(),
            report.not_removed
        )));
    }
    Ok(())
}

/// Removes the entries of `function`, or every entry when `yes` confirms it.
pub async fn purge(
    dl: &DeadLetters,
    total: u64,
    function: Option<&FunctionName>,
    yes: bool,
) -> Result<(), CliError> {
    if function.is_none() && !yes {
        return Err(CliError::Usage(format!(
            "this removes all {total} entries of {}; add --yes to confirm, or --function F",
            dl.stream()
        )));
    }
    let purged = dl.purge(function).await?;
    crate::outln!(
        "purged {} from {}",
        plural(purged, "message", "messages"),
        dl.stream()
    );
    Ok(())
}

/// The default of `dead replay`: give-ups only, as undecodable entries would come straight
/// back.
pub fn replay_reason(reason: Option<Reason>, any_reason: bool) -> Option<Reason> {
    match (reason, any_reason) {
        (Some(r), _) => Some(r),
        (None, true) => None,
        (None, false) => Some(Reason::AttemptsExhausted),
    }
}
