//! What each subcommand does, once the command line is parsed and the configuration loaded.
//! Long-running commands (the worker, the front door, the sample gateway) stop on SIGTERM or
//! Ctrl-C.

use crate::cli::args::{function_name, CallCommand, Command, DeadCommand, QueueCommand};
use crate::cli::{self, CliError};
use crate::config::Config;

/// Runs `command` (the worker when there is none).
pub async fn run(command: Option<Command>, config: Option<Config>) -> anyhow::Result<()> {
    let config = config.expect("configuration is loaded for every command");
    match command.unwrap_or(Command::Run) {
        Command::Run => {
            let worker = crate::worker::start(config).await?;
            let shutdown = async {
                shutdown_signal().await;
                tracing::info!("Signal received, shutting down");
            };
            tokio::select! {
                _ = shutdown => worker.shutdown(),
                // A fatal start-up error ends the worker before any signal.
                _ = worker_finished(&worker) => {}
            }
            worker.wait().await
        }
        Command::Publish(args) => {
            let body = match (&args.data, &args.data_file) {
                (Some(d), _) => d.clone().into_bytes(),
                (None, Some(path)) => std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("--data-file {}: {e}", path.display()))?,
                (None, None) => Vec::new(),
            };
            let mut headers = Vec::new();
            for h in &args.headers {
                let (k, v) = h
                    .split_once(':')
                    .ok_or_else(|| anyhow::anyhow!("--header {h:?}: expected 'Name: value'"))?;
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
            // The start time, from --not-before or a -H X-Not-Before, stored as RFC 3339 (a
            // delay means nothing once the message waits in the stream).
            let header = crate::message::not_before::HEADER;
            let given: Vec<String> = headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(header))
                .map(|(_, v)| v.clone())
                .chain(args.not_before.clone())
                .collect();
            if given.len() > 1 {
                anyhow::bail!("give the start time once: --not-before or --header '{header}: ...'");
            }
            if let Some(raw) = given.first() {
                let at = crate::message::not_before::parse(raw, std::time::SystemTime::now())?;
                headers.retain(|(k, _)| !k.eq_ignore_ascii_case(header));
                headers.push((header.to_string(), crate::message::not_before::format(at)));
            }
            let mut annotations = Vec::new();
            for a in &args.annotations {
                let (k, v) = a
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--annotation {a:?}: expected KEY=VALUE"))?;
                annotations.push((k.trim().to_string(), v.to_string()));
            }
            let sub = crate::message::publish::Submission {
                function: args.function.clone(),
                body,
                headers,
                annotations,
                path: args.path,
                query: args.query,
                method: args.method,
                callback_url: args.callback_url,
            };
            let ids = crate::message::publish::publish(&config, &sub, args.count).await?;
            crate::outln!(
                "published {} message(s) for {} to {}{}",
                ids.len(),
                args.function,
                config.stream_name(),
                if ids.len() == 1 {
                    format!(" (call id {})", ids[0])
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        Command::SampleFunction(args) => {
            let stop = tokio_util::sync::CancellationToken::new();
            let (addr, _) = crate::dev::sample::serve(
                args.listen,
                crate::dev::sample::SampleOptions {
                    min_delay: std::time::Duration::from_millis(args.min_ms),
                    max_delay: std::time::Duration::from_millis(args.max_ms.max(args.min_ms)),
                    fail_every: args.fail_every,
                    max_inflight: args.function_inflight,
                    functions: Vec::new(),
                },
                stop.clone(),
            )
            .await?;
            crate::outln!("sample gateway on http://{addr} (functions at /function/<name>)");
            shutdown_signal().await;
            stop.cancel();
            Ok(())
        }
        Command::Demo(a) => {
            crate::dev::demo::run(crate::dev::demo::DemoOptions {
                jobs: a.jobs,
                max_inflight: a.inflight.max(1),
                function_inflight: a.function_inflight,
                replicas: a.replicas,
                greedy: a.greedy,
                listen: a.listen,
                stay: a.stay,
            })
            .await
        }
        Command::CheckConfig => {
            crate::outln!("{config:#?}");
            Ok(())
        }
        Command::Dead(cmd) => Ok(dead(cmd, &config).await?),
        Command::Queue(cmd) => Ok(queue(cmd, &config).await?),
        Command::Call(cmd) => Ok(call(cmd, &config).await?),
        Command::Frontdoor { listen } => {
            let mut config = config;
            if let Some(addr) = listen {
                config.frontdoor.listen = addr;
            }
            let door = crate::frontdoor::start(config).await?;
            tokio::select! {
                _ = shutdown_signal() => {
                    tracing::info!("Signal received, shutting down");
                    door.shutdown();
                }
                _ = door.stopped() => {}
            }
            door.wait().await
        }
    }
}

/// The `dead` subcommands.
async fn dead(cmd: DeadCommand, config: &Config) -> Result<(), CliError> {
    let (dl, total, bytes) = cli::dead::open(config).await?;
    match cmd {
        DeadCommand::List {
            filter,
            reason,
            json,
        } => {
            if !json {
                crate::outln!(
                    "{}: {} ({bytes} bytes)",
                    dl.stream(),
                    if total == 1 {
                        "1 entry".to_string()
                    } else {
                        format!("{total} entries")
                    }
                );
            }
            cli::dead::list(&dl, &filter.filter(reason, config)?, json).await
        }
        DeadCommand::Replay {
            filter,
            reason,
            any_reason,
        } => {
            let reason = cli::dead::replay_reason(reason, any_reason);
            cli::dead::replay(&dl, &filter.filter(reason, config)?, &config.stream_name()).await
        }
        DeadCommand::Purge { function, yes } => {
            let function = function_name(function.as_deref(), config)?;
            cli::dead::purge(&dl, total, function.as_ref(), yes).await
        }
    }
}

/// The `queue` subcommands.
async fn call(cmd: CallCommand, config: &Config) -> Result<(), CliError> {
    let js = cli::jetstream(&config.nats).await?;
    let book = crate::nats::calls::CallBook::new(js, config.clone());
    match cmd {
        CallCommand::Cancel { call_id, json } => cli::call::cancel(&book, &call_id, json).await,
        CallCommand::Status { call_id, json } => cli::call::status(&book, &call_id, json).await,
    }
}

async fn queue(cmd: QueueCommand, config: &Config) -> Result<(), CliError> {
    let js = cli::jetstream(&config.nats).await?;
    match cmd {
        QueueCommand::Status { json } => {
            let status = cli::queue::status(&js, config).await?;
            if json {
                crate::outln!(
                    "{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                );
            } else {
                cli::queue::print_status(&status);
            }
            Ok(())
        }
        QueueCommand::Purge {
            function,
            yes,
            json,
        } => {
            let function = function_name(function.as_deref(), config)?;
            let purged = cli::queue::purge(&js, config, function.as_ref(), yes).await?;
            if json {
                crate::outln!("{}", serde_json::to_string(&purged).unwrap_or_default());
            } else {
                cli::queue::print_purged(&purged);
            }
            Ok(())
        }
    }
}

async fn worker_finished(worker: &crate::worker::Running) {
    // Polls rather than awaiting the JoinHandle, which `wait` consumes later.
    while !worker.is_finished() {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
