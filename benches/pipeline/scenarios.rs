//! The measurements. Each one uses its own queue (`OF_<queue>`) on the shared nats-server,
//! checks that nothing was lost, and deletes the stream afterwards.
//!
//! Every throughput figure is `calls ÷ window`, where the window runs from the start of the
//! first call to the end of the last as the fake function saw them (raw HTTP and end to end),
//! or from the first pull to the last ack flushed (raw JetStream).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use queue_worker::dev::natsd::NatsServer;
use queue_worker::message::function::FunctionName;
use queue_worker::message::publish::{new_call_id, Submission};
use queue_worker::nats::stream::{ensure_consumer, ensure_stream, read_subjects, Layout};

use crate::function::FakeFunction;
use crate::proc::{CpuMeter, MachineCpu, MachineUse, WorkerProc, WorkerSpec};

mod function_mode;
pub use function_mode::{ManyConsumers, Phase, DEFAULT_MAX_INFLIGHT};

/// The body of every job: small, as a no-op invocation's would be.
const BODY: &[u8] = b"hello";
pub(crate) const NAMESPACE: &str = "openfaas-fn";
/// The durable of static mode (the worker's default).
const DURABLE: &str = "faas-workers";
/// Longest any single measurement may take before the bench gives up on it.
const LIMIT: Duration = Duration::from_secs(600);

/// How the worker consumes: one shared consumer (`scaling_mode=static`), or a consumer per
/// function with work and fair slots (`scaling_mode=function`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Static,
    Function,
}

impl Mode {
    fn env(self) -> Vec<(&'static str, String)> {
        match self {
            Mode::Static => vec![("scaling_mode", "static".into())],
            Mode::Function => vec![("scaling_mode", "function".into())],
        }
    }

    /// What the worker logs once it is consuming.
    fn ready_log(self) -> &'static str {
        match self {
            Mode::Static => "Subscribed",
            Mode::Function => "Function mode: one consumer per function",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Static => "static",
            Mode::Function => "function",
        }
    }
}

/// What the harness runs against: one nats-server, one fake function, the worker binary.
pub struct Bench {
    pub nats: NatsServer,
    /// nats-server's CPU time, for its cost per message.
    server: CpuMeter,
    client: async_nats::Client,
    js: jetstream::Context,
    pub function: FakeFunction,
    worker_bin: PathBuf,
    /// The worker logs (about 28 MB per 100,000 jobs): each is removed after its scenario,
    /// and the directory at the end, unless `--keep-logs`.
    logs: PathBuf,
    keep_logs: bool,
    _logs_dir: Option<tempfile::TempDir>,
    seq: AtomicUsize,
    /// Settings given to every worker (`--worker-env key=value`), e.g. to compare a setting.
    pub worker_env: Vec<(String, String)>,
}

/// One end-to-end run.
pub struct EndToEnd {
    pub rate: f64,
    /// Worker user+sys CPU ÷ invocations.
    pub cpu_per_call: Duration,
    /// nats-server user+sys CPU ÷ jobs, from the worker's start until the queue is empty.
    pub server_per_call: Duration,
    /// Invocations beyond one per job (redeliveries); expected 0.
    pub extra_calls: u64,
    /// The whole machine, from the worker's start until the last call.
    pub machine: MachineUse,
}

/// One raw JetStream baseline run.
pub struct RawJetStream {
    pub rate: f64,
    /// nats-server user+sys CPU ÷ messages, pull to last ack.
    pub server_per_msg: Duration,
    /// The whole machine, first pull to last ack.
    pub machine: MachineUse,
}

/// Baseline (b).
pub struct RawHttp {
    pub rate: f64,
    /// The whole machine, first request to last answer.
    pub machine: MachineUse,
}

/// Enqueue → invoke-start latencies.
pub struct Latency {
    pub samples: Vec<u64>,
}

/// Resident memory of the worker.
pub struct Memory {
    pub rss: u64,
    pub hwm: u64,
}

impl Bench {
    pub async fn start(worker_bin: PathBuf, keep_logs: bool) -> anyhow::Result<Bench> {
        let nats = NatsServer::start()?;
        let server = CpuMeter::new(nats.pid().context("no nats-server pid")?);
        let client = async_nats::connect(nats.url()).await?;
        let js = jetstream::new(client.clone());
        let function = FakeFunction::start().await?;
        let dir = tempfile::Builder::new().prefix("qw-bench-").tempdir()?;
        let logs = dir.path().to_owned();
        let dir = if keep_logs {
            eprintln!("worker logs in {}", logs.display());
            let _ = dir.keep();
            None
        } else {
            Some(dir)
        };
        Ok(Bench {
            nats,
            server,
            client,
            js,
            function,
            worker_bin,
            logs,
            keep_logs,
            _logs_dir: dir,
            seq: AtomicUsize::new(0),
            worker_env: Vec::new(),
        })
    }

    /// A fresh queue and its stream.
    async fn queue(&self, tag: &str) -> anyhow::Result<Layout> {
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        let queue = format!("bench-{tag}-{n}");
        let layout = Layout {
            stream: format!("OF_{queue}"),
            queue,
            durable: DURABLE.into(),
            replicas: 1,
            ack_wait: Duration::from_secs(60),
        };
        ensure_stream(&self.js, &layout)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(layout)
    }

    /// Deletes a queue's streams (the work stream and the dead-letter stream a worker made).
    async fn drop_queue(&self, layout: &Layout) {
        let _ = self.js.delete_stream(&layout.stream).await;
        let _ = self
            .js
            .delete_stream(format!("{}-dead", layout.stream))
            .await;
    }

    /// Publishes `n` jobs the way the gateway does, round-robin over `functions` names, and
    /// waits until JetStream has stored them all.
    async fn prefill(&self, layout: &Layout, n: usize, functions: usize) -> anyhow::Result<()> {
        self.prefill_names(layout, n, &function_names(functions))
            .await
    }

    /// [`Bench::prefill`] over the given names.
    async fn prefill_names(
        &self,
        layout: &Layout,
        n: usize,
        names: &[String],
    ) -> anyhow::Result<()> {
        let subjects: Vec<String> = names
            .iter()
            .map(|f| Ok(FunctionName::parse(f, NAMESPACE)?.subject(&layout.queue)))
            .collect::<anyhow::Result<_>>()?;
        let mut pending = std::collections::VecDeque::new();
        for i in 0..n {
            let k = i % names.len();
            let (subject, headers, payload) = job(&names[k], &subjects[k])?;
            let ack = self
                .js
                .publish_with_headers(subject, headers, payload)
                .await?;
            pending.push_back(ack);
            if pending.len() >= 2048 {
                for ack in pending.drain(..1024) {
                    ack.await.context("JetStream did not store a job")?;
                }
            }
        }
        for ack in pending {
            ack.await.context("JetStream did not store a job")?;
        }
        Ok(())
    }

    /// Waits until the consumer has nothing pending or unacknowledged and the work stream is
    /// empty: every job was acked. Returns how many were redelivered (static mode; in
    /// function mode, where the consumers are the worker's, only that the stream is empty,
    /// which on a WorkQueue stream means every job was acked: duplicates show as extra calls).
    async fn drained(&self, layout: &Layout, mode: Mode) -> anyhow::Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut stream = self.js.get_stream(&layout.stream).await?;
        if mode == Mode::Function {
            loop {
                let messages = stream.info().await?.state.messages;
                if messages == 0 {
                    return Ok(0);
                }
                if Instant::now() > deadline {
                    anyhow::bail!("jobs left behind: {messages} in the stream");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        loop {
            let info = stream.consumer_info(&layout.durable).await?;
            let messages = stream.get_info().await?.state.messages;
            if info.num_pending == 0 && info.num_ack_pending == 0 && messages == 0 {
                return Ok(info.num_redelivered as u64);
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "jobs left behind: {} pending, {} unacknowledged, {messages} in the stream",
                    info.num_pending,
                    info.num_ack_pending
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills a worker and, unless `--keep-logs`, removes its log.
    async fn stop(&self, worker: WorkerProc) {
        let log = worker.log.clone();
        worker.kill().await;
        if !self.keep_logs {
            let _ = std::fs::remove_file(log);
        }
    }

    fn spawn_worker(
        &self,
        layout: &Layout,
        mode: Mode,
        max_inflight: Option<usize>,
    ) -> anyhow::Result<WorkerProc> {
        self.spawn_worker_with(layout, mode, max_inflight, &[])
    }

    /// [`Bench::spawn_worker`] with settings of the scenario's own (before `--worker-env`'s).
    fn spawn_worker_with(
        &self,
        layout: &Layout,
        mode: Mode,
        max_inflight: Option<usize>,
        settings: &[(&str, &str)],
    ) -> anyhow::Result<WorkerProc> {
        let url = self.nats.url();
        let gateway = self.function.url();
        let spec = WorkerSpec {
            nats_url: &url,
            queue: &layout.queue,
            gateway_url: &gateway,
            max_inflight,
            extra: mode
                .env()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .chain(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())))
                .chain(self.worker_env.iter().cloned())
                .collect(),
        };
        let log = self.logs.join(format!("{}.log", layout.queue));
        WorkerProc::spawn(&self.worker_bin, &spec, log)
    }

    /// Baseline (a): pull and ack `n` jobs spread over `functions` subjects with async-nats
    /// alone, no HTTP: pull requests on one inbox keep up to `window` messages asked for (what
    /// the worker asks for at `max_inflight` = `window`), asking again once half the window is
    /// free, and each message is acked as it arrives. Written against the core client rather
    /// than async-nats' `Consumer::messages()`, whose request task managed 281 messages/s at a
    /// batch of 1 here: the baseline is what the server and client can do, not a helper's
    /// scheduling.
    pub async fn raw_jetstream(
        &self,
        n: usize,
        window: usize,
        functions: usize,
    ) -> anyhow::Result<RawJetStream> {
        let layout = self.queue("js").await?;
        self.prefill(&layout, n, functions).await?;
        ensure_consumer(&self.js, &layout)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let subject = format!(
            "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
            layout.stream, layout.durable
        );
        let inbox = self.client.new_inbox();
        let mut sub = self.client.subscribe(inbox.clone()).await?;
        let server_before = self.server.now()?;
        let machine = MachineCpu::start()?;
        let started = Instant::now();
        let (mut asked, mut received) = (0usize, 0usize);
        while received < n {
            let free = window - (asked - received);
            if asked < n && (asked == received || free >= (window / 2).max(1)) {
                let batch = free.min(n - asked);
                let request = format!(r#"{{"batch":{batch},"expires":10000000000}}"#);
                self.client
                    .publish_with_reply(subject.clone(), inbox.clone(), request.into())
                    .await?;
                asked += batch;
                continue;
            }
            let msg = tokio::time::timeout(LIMIT, sub.next())
                .await
                .context("raw JetStream: no message")?
                .context("raw JetStream: inbox closed")?;
            if let Some(status) = msg.status {
                anyhow::bail!("raw JetStream: status {status} {:?}", msg.description);
            }
            let reply = msg
                .reply
                .context("raw JetStream: message without ack subject")?;
            self.client.publish(reply, bytes::Bytes::new()).await?;
            received += 1;
        }
        self.client.flush().await?;
        let elapsed = started.elapsed();
        let machine = machine.stop()?;
        drop(sub);
        self.drained(&layout, Mode::Static).await?;
        let server = self.server.now()? - server_before;
        self.drop_queue(&layout).await;
        Ok(RawJetStream {
            rate: n as f64 / elapsed.as_secs_f64(),
            server_per_msg: server / n as u32,
            machine,
        })
    }

    /// Baseline (b): `n` requests straight to the fake function with the worker's HTTP client
    /// settings, `concurrency` at a time, each with the headers a queued call carries.
    pub async fn raw_http(&self, n: usize, concurrency: usize) -> anyhow::Result<RawHttp> {
        let uri: hyper::Uri = format!("{}/function/noop", self.function.url()).parse()?;
        let client = queue_worker::worker::invoke::http_client(concurrency, &uri)?.client;
        let next = Arc::new(AtomicUsize::new(0));
        self.function.reset(n as u64);
        let machine = MachineCpu::start()?;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (client, uri, next) = (client.clone(), uri.clone(), next.clone());
            tasks.spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    // As the worker sends it: a timeout over the whole exchange, the body
                    // read to its end so the connection goes back to the pool.
                    let request = hyper::Request::post(uri.clone())
                        .header("accept", "*/*")
                        .header("x-call-id", new_call_id())
                        .header("x-start-time", unix_nanos().to_string())
                        .body(Full::new(Bytes::from_static(BODY)))?;
                    tokio::time::timeout(Duration::from_secs(60), async {
                        let resp = client.request(request).await?;
                        resp.into_body().collect().await?;
                        anyhow::Ok(())
                    })
                    .await??;
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r?.context("raw HTTP")?;
        }
        let machine = machine.stop()?;
        let window = self.function.done(LIMIT).await?;
        Ok(RawHttp {
            rate: window.count as f64 / window.elapsed.as_secs_f64(),
            machine,
        })
    }

    /// `n` pre-queued jobs spread over `functions` names, through a worker at `max_inflight`.
    pub async fn end_to_end(
        &self,
        mode: Mode,
        n: usize,
        max_inflight: usize,
        functions: usize,
    ) -> anyhow::Result<EndToEnd> {
        let layout = self.queue("e2e").await?;
        self.prefill(&layout, n, functions).await?;
        self.function.reset(n as u64);
        let server_before = self.server.now()?;
        let machine = MachineCpu::start()?;
        let mut worker = self.spawn_worker(&layout, mode, Some(max_inflight))?;
        let done = tokio::select! {
            w = self.function.done(LIMIT) => w,
            e = watch_alive(&mut worker) => Err(e),
        };
        let window = done?;
        let machine = machine.stop()?;
        let redelivered = self.drained(&layout, mode).await?;
        let cpu = worker.cpu()?;
        let server = self.server.now()? - server_before;
        let calls = self.function.window().count;
        self.stop(worker).await;
        self.drop_queue(&layout).await;
        if redelivered > 0 {
            eprintln!("  note: {redelivered} redeliveries at max_inflight {max_inflight}");
        }
        Ok(EndToEnd {
            rate: n as f64 / window.elapsed.as_secs_f64(),
            cpu_per_call: cpu / n as u32,
            server_per_call: server / n as u32,
            extra_calls: calls.saturating_sub(n as u64),
            machine,
        })
    }

    /// Enqueue → invoke-start at a steady `rate` jobs/s for `secs` seconds (after one second
    /// of warm-up), through a worker with default settings.
    pub async fn latency(&self, rate: u32, secs: u32) -> anyhow::Result<Latency> {
        let layout = self.queue("lat").await?;
        let mut worker = self.spawn_worker(&layout, Mode::Static, None)?;
        worker
            .wait_for_log("Subscribed", Duration::from_secs(30))
            .await?;
        let warmup = rate as usize;
        let total = warmup + (rate * secs) as usize;
        self.function.reset(total as u64);
        let subject = FunctionName::parse("noop", NAMESPACE)?.subject(&layout.queue);
        // Acks are awaited off the publishing task, so a slow ack never delays the next job.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let acks = tokio::spawn(async move {
            while let Some(ack) = rx.recv().await {
                let ack: jetstream::context::PublishAckFuture = ack;
                ack.await?;
            }
            Ok::<_, anyhow::Error>(())
        });
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
        // After a stall, carry on at the rate instead of catching up in a burst.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let publish = async {
            for i in 0..total {
                tick.tick().await;
                if i == warmup {
                    self.function.record_latency();
                }
                let (subject, headers, payload) = job("noop", &subject)?;
                tx.send(
                    self.js
                        .publish_with_headers(subject, headers, payload)
                        .await?,
                )?;
            }
            Ok::<_, anyhow::Error>(())
        };
        tokio::select! {
            r = publish => r?,
            e = watch_alive(&mut worker) => return Err(e),
        }
        drop(tx);
        acks.await??;
        self.function.done(LIMIT).await?;
        let samples = self.function.latencies();
        self.drained(&layout, Mode::Static).await?;
        self.stop(worker).await;
        self.drop_queue(&layout).await;
        Ok(Latency { samples })
    }

    /// Resident memory of a worker with default settings, started and idle for `settle`.
    pub async fn idle_memory(&self, settle: Duration) -> anyhow::Result<Memory> {
        let layout = self.queue("idle").await?;
        let mut worker = self.spawn_worker(&layout, Mode::Static, None)?;
        worker
            .wait_for_log("Subscribed", Duration::from_secs(30))
            .await?;
        tokio::time::sleep(settle).await;
        worker.check_alive()?;
        let (rss, hwm) = worker.rss()?;
        self.stop(worker).await;
        self.drop_queue(&layout).await;
        Ok(Memory { rss, hwm })
    }

    /// Resident memory of a worker at `max_inflight` = `n` while `n` calls are held open by
    /// a slow function, with as many jobs again queued behind them.
    pub async fn busy_memory(&self, n: usize) -> anyhow::Result<Memory> {
        let layout = self.queue("busy").await?;
        self.prefill(&layout, 2 * n, 1).await?;
        self.function.reset(2 * n as u64);
        self.function.hold(n as u64);
        let mut worker = self.spawn_worker(&layout, Mode::Static, Some(n))?;
        tokio::select! {
            r = self.function.in_flight(Duration::from_secs(60)) => r?,
            e = watch_alive(&mut worker) => return Err(e),
        }
        // A moment for every call's bookkeeping to settle before reading.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (rss, hwm) = worker.rss()?;
        self.function.release();
        self.function.done(LIMIT).await?;
        self.drained(&layout, Mode::Static).await?;
        self.stop(worker).await;
        self.drop_queue(&layout).await;
        Ok(Memory { rss, hwm })
    }
}

/// Returns (with an error) only when the worker has exited.
async fn watch_alive(worker: &mut WorkerProc) -> anyhow::Error {
    loop {
        if let Err(e) = worker.check_alive() {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn function_names(n: usize) -> Vec<String> {
    if n <= 1 {
        return vec!["noop".into()];
    }
    (0..n).map(|i| format!("fn-{i:04}")).collect()
}

/// One job as the gateway publishes it: a `QueueRequest` with `X-Call-Id` and `X-Start-Time`
/// (stamped now), and `Nats-Msg-Id` = call id.
pub(crate) fn job(
    function: &str,
    subject: &str,
) -> anyhow::Result<(String, async_nats::HeaderMap, bytes::Bytes)> {
    let id = new_call_id();
    let sub = Submission {
        function: function.into(),
        body: BODY.to_vec(),
        ..Submission::default()
    };
    let payload = serde_json::to_vec(&sub.to_request(&id))?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id.as_str());
    Ok((subject.to_string(), headers, payload.into()))
}

fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}
