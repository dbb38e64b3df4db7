//! Function mode's own scenarios (issue 15): how long a new function's first job waits behind
//! another function's backlog, and what thousands of function consumers cost, busy and idle.

use super::*;

/// The worker's default `max_inflight`, which these scenarios keep.
pub const DEFAULT_MAX_INFLIGHT: usize = 50;

/// A new function behind a backlog: one run of [`Bench::new_function`].
pub struct NewFunction {
    /// Stored (publish acknowledged) → invoke start of each new function's first job;
    /// `None` if it was not called within the cap.
    pub samples: Vec<Option<Duration>>,
    /// How long each call of the backlog's function took.
    pub delay: Duration,
    /// The backlog's jobs still in the stream (queued or running) when the last new
    /// function's job was stored: above zero, every sample was taken behind the backlog.
    pub backlog_left: u64,
}

/// What one phase of [`Bench::many_consumers`] cost, over its window.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    pub window: Duration,
    /// Worker and nats-server user+sys CPU ÷ wall time (1.0 = one core all the time).
    pub worker_cpu: f64,
    pub server_cpu: f64,
    /// Worker RSS at the end of the window, bytes.
    pub rss: u64,
    pub calls_per_sec: f64,
    /// Consumers on the stream at the end of the window (the function-mode marker included).
    pub consumers: usize,
    /// Functions with messages in the stream at the start and at the end of the window.
    pub functions_with_work: (usize, usize),
}

/// One worker in function mode through three phases: no work yet, `functions` functions
/// each with work queued, and the same functions drained with their consumers kept.
pub struct ManyConsumers {
    pub functions: usize,
    pub jobs: usize,
    pub delay: Duration,
    pub empty: Phase,
    pub busy: Phase,
    pub idle: Phase,
    /// From the first job published until every function's consumer existed.
    pub created_in: Duration,
    /// How long publishing the jobs took (JetStream acks awaited).
    pub published_in: Duration,
}

impl Bench {
    /// Publishes `backlog` jobs of function `a` (each call takes long enough that the backlog
    /// outlasts the measurement), starts a worker at the default `max_inflight`, and once `a`
    /// is being called publishes one job of a new function `n<i>` every `spacing`,
    /// `samples` times. Each sample is from the job's publish acknowledgement (stored) to
    /// its call's arrival at the fake function, waiting at most `cap`.
    pub async fn new_function(
        &self,
        mode: Mode,
        backlog: usize,
        samples: usize,
        spacing: Duration,
        cap: Duration,
    ) -> anyhow::Result<NewFunction> {
        let layout = self.queue(&format!("new-{}", mode.name())).await?;
        self.prefill_names(&layout, backlog, &["a".to_string()])
            .await?;
        // `a` must keep every slot busy for the whole run: its calls last long enough that
        // the backlog takes half as long again as the samples, plus a second, to drain.
        let span = spacing * samples as u32 * 3 / 2 + Duration::from_secs(1);
        let delay = (span * DEFAULT_MAX_INFLIGHT as u32 / backlog.max(1) as u32)
            .clamp(Duration::from_millis(1), Duration::from_millis(500));
        self.function.reset(u64::MAX);
        self.function.set_delay(delay);
        self.function.track("n");
        let mut worker = self.spawn_worker(&layout, mode, None)?;
        let flowing = async {
            while self.function.in_flight_now() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(30), flowing) => {
                r.context("the backlog's function was not called within 30 s")?
            }
            e = watch_alive(&mut worker) => return Err(e),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;

        let mut stored = Vec::with_capacity(samples);
        let mut tick = tokio::time::interval(spacing);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for i in 0..samples {
            tick.tick().await;
            let name = format!("n{i}");
            let subject = FunctionName::parse(&name, NAMESPACE)?.subject(&layout.queue);
            let (subject, headers, payload) = job(&name, &subject)?;
            self.js
                .publish_with_headers(subject, headers, payload)
                .await?
                .await
                .context("JetStream did not store a new function's job")?;
            stored.push((name, Instant::now()));
            worker.check_alive()?;
        }
        let a = FunctionName::parse("a", NAMESPACE)?.subject(&layout.queue);
        let backlog_left = read_subjects(&self.js, &layout.stream, &a)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .subjects
            .get(&a)
            .copied()
            .unwrap_or(0);
        let mut out = Vec::with_capacity(samples);
        for (name, at) in &stored {
            let arrived = self.function.arrival(name, *at + cap).await;
            out.push(arrived.map(|t| t.saturating_duration_since(*at)));
        }
        self.stop(worker).await;
        self.function.quiet(Duration::from_secs(10)).await;
        self.drop_queue(&layout).await;
        Ok(NewFunction {
            samples: out,
            delay,
            backlog_left,
        })
    }

    /// One function-mode worker (default `max_inflight`, `consumer_inactive_threshold` 10m
    /// so that no consumer is deleted while measured) through three windows of `window`:
    /// (1) started on an empty stream; (2) once `functions` functions with `per` jobs each
    /// all have their consumer, calls taking `delay` so that work stays queued; (3) after
    /// everything was called and acked, every consumer still there.
    pub async fn many_consumers(
        &self,
        functions: usize,
        per: usize,
        delay: Duration,
        window: Duration,
    ) -> anyhow::Result<ManyConsumers> {
        let layout = self.queue("consumers").await?;
        let names = function_names(functions.max(2));
        let jobs = names.len() * per;
        self.function.reset(jobs as u64);
        let mut worker = self.spawn_worker_with(
            &layout,
            Mode::Function,
            None,
            &[("consumer_inactive_threshold", "10m")],
        )?;
        worker
            .wait_for_log(Mode::Function.ready_log(), Duration::from_secs(30))
            .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let empty = self.phase(&layout, &mut worker, window).await?;

        self.function.set_delay(delay);
        let started = Instant::now();
        tokio::select! {
            r = self.prefill_names(&layout, jobs, &names) => r?,
            e = watch_alive(&mut worker) => return Err(e),
        }
        let published_in = started.elapsed();
        let wanted = names.len() + 1; // and the function-mode marker
        loop {
            worker.check_alive()?;
            if self.consumers(&layout).await? >= wanted {
                break;
            }
            if started.elapsed() > Duration::from_secs(300) {
                anyhow::bail!(
                    "only {} of {wanted} consumers after 300 s",
                    self.consumers(&layout).await?
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let created_in = started.elapsed();
        let busy = self.phase(&layout, &mut worker, window).await?;

        // Let the rest through at full speed, then wait for the stream to be empty and the
        // worker to have seen it (one discovery read, then its buckets go idle).
        self.function.set_delay(Duration::ZERO);
        tokio::select! {
            r = self.function.done(LIMIT) => { r?; }
            e = watch_alive(&mut worker) => return Err(e),
        }
        self.drained(&layout, Mode::Function).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = self.phase(&layout, &mut worker, window).await?;
        self.stop(worker).await;
        self.function.quiet(Duration::from_secs(10)).await;
        self.drop_queue(&layout).await;
        Ok(ManyConsumers {
            functions: names.len(),
            jobs,
            delay,
            empty,
            busy,
            idle,
            created_in,
            published_in,
        })
    }

    /// The stream's consumer count.
    async fn consumers(&self, layout: &Layout) -> anyhow::Result<usize> {
        let mut stream = self.js.get_stream(&layout.stream).await?;
        Ok(stream.info().await?.state.consumer_count)
    }

    /// Functions with messages in the stream.
    async fn functions_with_work(&self, layout: &Layout) -> anyhow::Result<usize> {
        Ok(read_subjects(&self.js, &layout.stream, ">")
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .subjects
            .values()
            .filter(|&&n| n > 0)
            .count())
    }

    /// The worker's and the server's CPU over `window`, and the worker's RSS at its end.
    /// The stream is read before and after, outside the window.
    async fn phase(
        &self,
        layout: &Layout,
        worker: &mut WorkerProc,
        window: Duration,
    ) -> anyhow::Result<Phase> {
        let with_work_before = self.functions_with_work(layout).await?;
        let (worker_before, server_before) = (worker.cpu()?, self.server.now()?);
        let calls_before = self.function.window().count;
        let at = Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(window) => {}
            e = watch_alive(worker) => return Err(e),
        }
        let wall = at.elapsed().as_secs_f64();
        let worker_cpu = (worker.cpu()? - worker_before).as_secs_f64() / wall;
        let server_cpu = (self.server.now()? - server_before).as_secs_f64() / wall;
        let calls = self.function.window().count - calls_before;
        let (rss, _) = worker.rss()?;
        Ok(Phase {
            window: Duration::from_secs_f64(wall),
            worker_cpu,
            server_cpu,
            rss,
            calls_per_sec: calls as f64 / wall,
            consumers: self.consumers(layout).await?,
            functions_with_work: (with_work_before, self.functions_with_work(layout).await?),
        })
    }
}
