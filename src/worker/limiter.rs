//! Adaptive concurrency (`limiter_enabled`, function mode): how many of one function's calls
//! this replica runs at once, learned from what the function answers.
//!
//! A function with a hard `max_inflight` answers 429 to every call beyond it. Pushing as
//! fast as the worker can pull ("greedy") turns most calls into 429s, each a wasted call, a
//! retry delay and a misleading load signal for the autoscaler. The limiter keeps the excess
//! in the queue instead: the scheduler (`schedule.rs`) gives a function no slot beyond
//! [`Limiter::allowed`], so held-back messages are never pulled (no lease, no delivery).
//!
//! It is pure: no I/O, no clock and no randomness of its own (a seeded generator), so every
//! rule is table-tested. It counts events, not time: a "round" is `limit` outcomes, about
//! one run time of the function at its limit. That makes it independent of how long a
//! function runs (10 ms or 10 min) and of the time scale of a simulation.
//!
//! # Rules
//!
//! - **Signals.** A 429, and a 503 carrying `X-OpenFaaS-Internal` or `Retry-After`, is a
//!   *rejection*: the function (or its watchdog, or the platform) had no room. A 2xx is a
//!   *success*. Anything else (a 500, a timeout, a refused connection) says nothing about
//!   capacity and is *neutral*.
//! - **Start** at 1 and grow by 1 per success ("slow start": the limit doubles per round;
//!   by 1 more per [`BACKLOG_ROUNDS`] limits of backlog, up to 4 per success, so up to ×5
//!   per round), so a fresh function reaches its capacity in a few rounds: 1 → 50 in 2.4
//!   rounds behind a backlog of 1,000 instead of 5.6. A rejection during the start cuts the
//!   limit to what fit (the calls out besides the refused one, as TCP cuts to the flight
//!   size), and the start ends when the smoothed share of rejections passes
//!   [`START_EXIT`]: a rare early 429 is the random balancer's luck (one full replica among
//!   idle ones), not the function's limit.
//! - **Grow only while the limit is used**: a success counts only when the function held its
//!   whole limit and more work was queued for it. An idle function or an empty queue proves
//!   nothing about capacity, and the limit stays where it is (Netflix's AIMD and Gradient2
//!   skip growth below half the limit for the same reason; we require all of it).
//! - **After the start**, each used success adds [`GROWTH`] × `accel` (`+α·limit` per round,
//!   so the step is relative to the function's size). `accel` doubles per round without a
//!   rejection (up to [`MAX_ACCEL`]) and doubles again while the backlog exceeds
//!   [`BACKLOG_ROUNDS`] limits: a sustained clean run means capacity was added (the
//!   autoscaler added replicas), and the limit must follow faster than it learns at rest.
//! - **Cut** on each rejection by [`CUT`] × `k`, where `k` is the rejection's place in a run
//!   of rejections with no success between (at most [`MAX_RUN`]). Over a round with a share
//!   `q` of rejections that multiplies the limit by about `1 + α(1−q) − β·k·q`: an isolated
//!   429 barely moves it, a run of them (replicas removed, a function that fell over) takes
//!   it down in a few dozen instant answers. Never below 1.
//! - **Probe**: while the limit is used and work waits, every `2 × limit` successes
//!   (jittered ×0.5–1.5 so functions do not probe in step) the function may hold one slot
//!   above its limit. A success at that height raises the limit to it; a rejection of the
//!   probe ends it without a cut. Probing is what lets a capacity autoscaler see in-flight
//!   at its target, add a replica, and the limit follow.
//!
//! # Where it settles, and why there
//!
//! Behind a random balancer (kube-proxy) a call is rejected when *its* replica is full,
//! while others may be idle. With 10 replicas of 5 slots and a fixed number of calls out,
//! a model of that (see the tests) gives: 80% busy, 0.5 rejections per success; 86%, 0.8;
//! 90%, 1.1; 96%, 2.2. The limit settles where growth and cuts balance: isolated
//! rejections balance at a share `α / (α + β)` of calls, runs cut harder. On OpenFaaS's
//! blog load test in the simulator (10 replicas, 1,000 jobs; BENCHMARKS.md) it held them
//! 81–84% busy, the start included, at 1.7 429s per job; greedy dispatch sent 10.6 per job
//! and kept them 12% busy. With one replica there is no luck involved: 5 slots take 5
//! calls, the 6th is rejected at once, the edge rule holds the limit at 5, and only probes
//! (one per 3 limits of successes) meet a 429. Lower `CUT` buys utilisation with many more
//! 429s (0.05 → 0.03 moved a model of the blog case from 76–80% to 78–82% busy for 40% more
//! 429s); higher buys fewer 429s with idle slots.
//!
//! The constants are ours. Netflix's `AIMDLimit` cuts by ×0.9 per drop and adds 1 per
//! success; Envoy grows by √limit per interval and re-measures with 15% jitter; TCP halves
//! per loss window. Those treat every drop as overload; a 429 from a random balancer is
//! noisier, hence the small cut per rejection and the harder cut for runs of them.

/// What a used success adds to the limit after the start (per call, so `+α·limit` per round).
pub const GROWTH: f64 = 0.1;
/// What a rejection takes off the limit, times its place in a run of rejections (at most
/// [`MAX_RUN`]): per round, a share `q` of rejections multiplies the limit by about
/// `1 + α(1−q) − β·k·q`.
pub const CUT: f64 = 0.03;
/// Rejections in a row beyond this do not cut harder.
pub const MAX_RUN: usize = 16;
/// The start ends when the smoothed share of rejections among calls passes this.
pub const START_EXIT: f64 = 0.15;
/// Growth doubles per clean round (no rejection), up to this factor.
pub const MAX_ACCEL: f64 = 8.0;
/// A backlog above this many limits doubles the growth.
pub const BACKLOG_ROUNDS: f64 = 4.0;
/// Outcomes between probes, in limits (before jitter).
pub const PROBE_ROUNDS: f64 = 3.0;

/// What one call's answer says about the function's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A 2xx.
    Success,
    /// A 429, or a 503 from the platform (`X-OpenFaaS-Internal`) or with `Retry-After`.
    Rejected,
    /// Anything else: says nothing about capacity.
    Neutral,
}

impl Signal {
    /// Classifies a call's answer; `None` is no answer at all (refused, reset, timed out).
    pub fn of(status: Option<u16>, internal: bool, retry_after: bool) -> Signal {
        match status {
            Some(200..=299) => Signal::Success,
            Some(429) => Signal::Rejected,
            Some(503) if internal || retry_after => Signal::Rejected,
            _ => Signal::Neutral,
        }
    }
}

/// The function's load when a call ended, as the scheduler sees it on this replica. The
/// height (`running`) leaves out calls already answered whose slots are not released yet
/// (a refused call is settled before its slot goes back): they are not at the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Slots the function holds, the ending call included: running, and asked for.
    pub held: usize,
    /// Its calls out (delivered messages), the ending one included: the height at which
    /// this call was accepted or refused.
    pub running: usize,
    /// Messages queued for the function beyond what it holds (stream count − held).
    pub backlog: u64,
}

/// What an observation changed, for metrics and to wake the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Change {
    /// `allowed()` rose: the scheduler may have a slot to give.
    pub grew: bool,
    /// A probe slot was opened.
    pub probe: bool,
    /// The limit was cut.
    pub cut: bool,
}

/// One function's adaptive limit on one replica. See the module documentation.
#[derive(Debug, Clone)]
pub struct Limiter {
    limit: f64,
    max: f64,
    /// Slow start: +1 per used success.
    starting: bool,
    /// Smoothed share of rejections among calls (over about a round).
    rejected_share: f64,
    /// Used successes since the last rejection.
    clean: u64,
    /// Rejections since the last success.
    run: usize,
    /// The height (calls held) of the last rejection, while no success came at or above it:
    /// the discovered maximum plus one. Growth stops a slot below it; probes test it.
    edge: Option<usize>,
    /// Used outcomes until the next probe.
    until_probe: u64,
    probing: bool,
    rng: fastrand::Rng,
}

impl Limiter {
    /// A limiter at 1, under `max` (the function's cap, or the replica's `max_inflight`).
    /// `seed` makes the probe jitter reproducible; give each function its own.
    pub fn new(max: usize, seed: u64) -> Limiter {
        let mut l = Limiter {
            limit: 1.0,
            max: max.max(1) as f64,
            starting: true,
            rejected_share: 0.0,
            clean: 0,
            run: 0,
            edge: None,
            until_probe: 0,
            probing: false,
            rng: fastrand::Rng::with_seed(seed),
        };
        l.schedule_probe();
        l
    }

    /// Calls the function may have at once now: the limit, plus one while probing, never
    /// above `max`.
    pub fn allowed(&self) -> usize {
        let base = self.limit.floor() as usize;
        let with_probe = if self.probing { base + 1 } else { base };
        with_probe.clamp(1, self.max as usize)
    }

    /// The learned limit (fractional; `allowed` is its floor).
    pub fn limit(&self) -> f64 {
        self.limit
    }

    /// The ceiling changed (a cap annotation, or none: the replica's slots).
    pub fn set_max(&mut self, max: usize) {
        self.max = max.max(1) as f64;
        self.limit = self.limit.min(self.max);
    }

    /// A call of the function ended with `signal`, under `load`.
    pub fn observe(&mut self, signal: Signal, load: Load) -> Change {
        let before = self.allowed();
        let was_probing = self.probing;
        let mut change = Change::default();
        let floor = self.limit.floor() as usize;
        let used = load.held >= floor && load.backlog > 0;
        if signal != Signal::Neutral {
            let x = if signal == Signal::Rejected { 1.0 } else { 0.0 };
            self.rejected_share += (x - self.rejected_share) / self.limit.max(4.0);
        }
        match signal {
            Signal::Neutral => {}
            Signal::Success => {
                self.run = 0;
                if self.edge.is_some_and(|e| load.running >= e) {
                    // A call succeeded at that height: the rejection there was the
                    // balancer's luck (another replica was full), not the function's edge.
                    self.edge = None;
                }
                if self.probing && load.running > floor {
                    // The probe slot ran and succeeded: the function has room for it, and
                    // likely more (a replica was added): grow as after two clean rounds.
                    self.limit = self.limit.max((floor + 1) as f64);
                    self.clean = self.clean.max((2.0 * self.limit) as u64);
                    self.end_probe();
                } else if used {
                    self.clean += 1;
                    self.grow(load.backlog);
                }
            }
            Signal::Rejected => {
                self.reject_at(load.running.max(2));
                if self.probing && load.running > floor {
                    // The probe found the edge; the learned limit stands.
                    self.end_probe();
                } else {
                    self.cut(load.running);
                    change.cut = true;
                }
            }
        }
        // Probes are counted in used successes (a rejection is no time to look for more
        // room), and not during slow start, which grows by a slot per success anyway.
        if used && signal == Signal::Success && !self.starting && !was_probing && !self.probing {
            self.until_probe = self.until_probe.saturating_sub(1);
            if self.until_probe == 0 && self.allowed() < self.max as usize {
                self.probing = true;
                change.probe = true;
            }
        }
        self.limit = self.limit.clamp(1.0, self.max);
        change.grew = self.allowed() > before;
        change
    }

    fn grow(&mut self, backlog: u64) {
        let large = backlog as f64 >= BACKLOG_ROUNDS * self.limit;
        if self.starting {
            // Doubling per round, up to ×5 with a large backlog: 1 → 50 in 2.4 rounds
            // instead of 5.6, which for 10–25 s jobs is a minute of 50 slots.
            // No edge holds the start back: it has no probes, and an early 429 is more
            // likely luck than a limit (the start ends once they are frequent).
            self.limit += 1.0
                + (backlog as f64 / (BACKLOG_ROUNDS * self.limit))
                    .min(3.0)
                    .floor();
            return;
        }
        let rounds = (self.clean as f64 / self.limit).floor().min(8.0);
        let mut accel = 2f64.powf(rounds).min(MAX_ACCEL);
        if large {
            accel *= 2.0;
        }
        let grown = self.limit + GROWTH * accel;
        // A safety margin below the discovered maximum: only a probe goes past it.
        self.limit = match self.edge {
            Some(e) => grown.min((e - 1) as f64).max(self.limit),
            None => grown,
        };
    }

    /// A rejection at `height` calls out: the lowest since a success at or above it is the
    /// edge. One replica full at 5 rejects at 6 and never succeeds there; a balancer that
    /// picked a full replica among idle ones soon sees a success at that height.
    fn reject_at(&mut self, height: usize) {
        self.edge = Some(self.edge.map_or(height, |e| e.min(height)));
    }

    /// A rejection at `height` calls out (the rejected one included).
    fn cut(&mut self, height: usize) {
        self.run += 1;
        self.clean = 0;
        if self.starting {
            // Slow start overshoots by up to a round's growth; what fit is what was out
            // besides the refused call (TCP's cut to the flight size, not a fixed factor).
            self.limit = self.limit.min(height.saturating_sub(1) as f64).max(1.0);
            if self.rejected_share > START_EXIT {
                self.starting = false;
            }
        }
        let k = self.run.min(MAX_RUN) as f64;
        self.limit = (self.limit - CUT * k).max(1.0);
        if self.probing {
            self.end_probe();
        }
    }

    fn end_probe(&mut self) {
        self.probing = false;
        self.schedule_probe();
    }

    /// The next probe in `PROBE_ROUNDS` limits of successes, jittered ×0.5–1.5. (Probing
    /// three times as often while the backlog is large filled new replicas barely faster in
    /// the model, 80-82% busy instead of 77-80%, and doubled the 429s of a lone replica.)
    fn schedule_probe(&mut self) {
        let jitter = 0.5 + self.rng.f64();
        self.until_probe = ((PROBE_ROUNDS * self.limit * jitter).round() as u64).max(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: Signal = Signal::Success;
    const NO: Signal = Signal::Rejected;

    fn at(held: usize, backlog: u64) -> Load {
        Load {
            held,
            running: held,
            backlog,
        }
    }

    #[test]
    fn signals_are_classified_by_status_and_headers() {
        let table = [
            (Some(200), false, false, Signal::Success),
            (Some(202), false, false, Signal::Success),
            (Some(429), false, false, Signal::Rejected),
            (Some(429), true, false, Signal::Rejected),
            (Some(503), true, false, Signal::Rejected),
            (Some(503), false, true, Signal::Rejected),
            (Some(503), false, false, Signal::Neutral),
            (Some(500), true, false, Signal::Neutral),
            (Some(400), false, false, Signal::Neutral),
            (None, false, false, Signal::Neutral),
        ];
        for (status, internal, retry_after, want) in table {
            assert_eq!(
                Signal::of(status, internal, retry_after),
                want,
                "{status:?} internal={internal} retry_after={retry_after}"
            );
        }
    }

    #[test]
    fn slow_start_doubles_per_round_and_up_to_quintuples_with_a_large_backlog() {
        // With a backlog of 1,000 the step is 4 while the limit is at most 83, then 3.
        for (backlog, wants) in [(3, [2, 4, 8]), (1000, [5, 25, 115])] {
            let mut l = Limiter::new(1000, 1);
            assert_eq!(l.allowed(), 1);
            // A round at 1: one success → 2 (5); a round at 2: two successes → 4 (25); …
            for want in wants {
                let n = l.allowed();
                for _ in 0..n {
                    let held = l.allowed();
                    // "Small" is below four limits, whatever the limit.
                    let b = if backlog == 3 { held as u64 } else { backlog };
                    l.observe(OK, at(held, b));
                }
                assert_eq!(l.limit() as usize, want, "backlog {backlog}");
            }
        }
    }

    #[test]
    fn a_rejection_in_slow_start_cuts_to_what_fit() {
        let mut l = Limiter::new(1000, 1);
        l.limit = 9.0;
        // 9 out, the 5th refused: 4 fit.
        l.observe(NO, at(5, 1000));
        assert!(l.limit() <= 4.0 && l.limit() > 3.9, "{}", l.limit());
    }

    #[test]
    fn no_growth_while_unused_or_without_backlog() {
        let mut l = Limiter::new(100, 2);
        for _ in 0..3 {
            let held = l.allowed();
            l.observe(OK, at(held, 1000));
        }
        let limit = l.limit();
        assert!(limit >= 4.0);
        // Holding less than the limit: the function, not the limit, is the bottleneck.
        for _ in 0..1000 {
            l.observe(OK, at(1, 1000));
        }
        assert_eq!(l.limit(), limit, "grew while the limit was not used");
        // At the limit but nothing queued beyond it.
        for _ in 0..1000 {
            l.observe(OK, at(limit as usize, 0));
        }
        assert_eq!(l.limit(), limit, "grew with an empty queue");
        assert!(!l.probing, "probed without a backlog");
    }

    #[test]
    fn each_rejection_cuts_harder_within_a_run_and_never_below_one() {
        let mut l = Limiter::new(100, 3);
        l.limit = 20.0;
        l.starting = false;
        l.until_probe = u64::MAX;
        // A first rejection takes CUT off; the k-th in a row k × CUT.
        let c = l.observe(NO, at(20, 100));
        assert!(c.cut);
        assert!((l.limit() - (20.0 - CUT)).abs() < 1e-9, "{}", l.limit());
        l.observe(NO, at(20, 100));
        assert!(
            (l.limit() - (20.0 - 3.0 * CUT)).abs() < 1e-9,
            "{}",
            l.limit()
        );
        l.observe(NO, at(20, 100));
        assert!(
            (l.limit() - (20.0 - 6.0 * CUT)).abs() < 1e-9,
            "{}",
            l.limit()
        );
        // A success ends the run: the next rejection is a first one again.
        l.observe(OK, at(1, 100)); // not used: no growth
        let before = l.limit();
        l.observe(NO, at(20, 100));
        assert!((l.limit() - (before - CUT)).abs() < 1e-9, "{}", l.limit());
        // A long run takes the limit down fast (k capped at MAX_RUN), to 1 and no further.
        let mut steps = 0;
        while l.limit() > 1.0 {
            l.observe(NO, at(20, 100));
            steps += 1;
        }
        assert!(steps < 60, "{steps} rejections in a row to reach 1 from 20");
        for _ in 0..100 {
            l.observe(NO, at(1, 100));
        }
        assert_eq!(l.limit(), 1.0);
        assert_eq!(l.allowed(), 1);
    }

    #[test]
    fn a_round_with_a_share_q_of_rejections_settles_where_growth_meets_cuts() {
        // Per round, successes add GROWTH each and rejections take CUT × run: with isolated
        // rejections the limit is flat at q = GROWTH / (GROWTH + CUT).
        let flat = GROWTH / (GROWTH + CUT);
        for (q, grows) in [(flat - 0.1, true), (flat + 0.1, false)] {
            let mut l = Limiter::new(1000, 11);
            l.limit = 30.0;
            l.starting = false;
            l.probing = false;
            l.until_probe = u64::MAX;
            let start = l.limit();
            let mut acc = 0.0;
            for _ in 0..300 {
                acc += q;
                if acc >= 1.0 {
                    acc -= 1.0;
                    l.observe(NO, at(30, 100));
                } else {
                    l.clean = 0; // keep the clean-run acceleration out of this
                    l.observe(OK, at(l.allowed(), 100));
                }
            }
            assert_eq!(
                l.limit() > start,
                grows,
                "q = {q:.2}: {start} → {}",
                l.limit()
            );
        }
    }

    #[test]
    fn growth_accelerates_after_clean_rounds_and_with_a_large_backlog() {
        let grown = |backlog: u64| {
            let mut l = Limiter::new(1000, 6);
            l.limit = 10.0;
            l.starting = false;
            l.probing = false;
            l.until_probe = u64::MAX;
            let mut per_round = Vec::new();
            for _ in 0..6 {
                let start = l.limit();
                let n = l.limit().floor() as usize;
                for _ in 0..n {
                    l.observe(OK, at(l.limit().floor() as usize, backlog));
                }
                per_round.push(l.limit() - start);
            }
            per_round
        };
        let small = grown(5);
        // +1 per round at first, then faster: later rounds add more than earlier ones.
        assert!(small[0] < 1.1, "{small:?}");
        assert!(small[5] > 2.0 * small[0], "{small:?}");
        let large = grown(100_000);
        for (s, l) in small.iter().zip(&large) {
            assert!(
                l > s,
                "a large backlog must grow faster: {small:?} vs {large:?}"
            );
        }
    }

    #[test]
    fn probes_come_with_jitter_and_a_successful_probe_raises_the_limit() {
        let gaps = |seed| {
            let mut l = Limiter::new(1000, seed);
            l.limit = 10.0;
            l.starting = false;
            l.schedule_probe();
            let mut gaps = Vec::new();
            let mut since = 0;
            while gaps.len() < 20 {
                since += 1;
                // At the limit, with a backlog; rejections keep the limit flat at 10 here, so
                // probes are what we count.
                let c = l.observe(Signal::Success, at(10, 100));
                l.limit = 10.0;
                l.clean = 0;
                if c.probe {
                    gaps.push(since);
                    since = 0;
                    // The probe's call is rejected: no cut, the limit stands.
                    let c = l.observe(NO, at(11, 100));
                    assert!(!c.cut);
                    assert_eq!(l.limit(), 10.0);
                    assert!(!l.probing);
                }
            }
            gaps
        };
        let a = gaps(7);
        let b = gaps(8);
        assert_ne!(a, b, "two functions probe in step");
        for g in a.iter().chain(&b) {
            assert!(
                (15..=45).contains(g),
                "gap {g} outside 3 × limit × [0.5, 1.5]"
            );
        }
        // A probe that succeeds at the height above the limit makes it the limit.
        let mut l = Limiter::new(1000, 9);
        l.limit = 10.0;
        l.starting = false;
        l.probing = true;
        assert_eq!(l.allowed(), 11);
        l.observe(OK, at(11, 100));
        assert_eq!(l.limit(), 11.0);
        assert!(!l.probing);
    }

    #[test]
    fn a_hard_edge_holds_the_limit_a_slot_below_it_and_probes_test_it() {
        // One replica with 3 slots: every 4th call at once is refused, the 3rd never.
        let mut l = Limiter::new(100, 12);
        let (mut calls, mut rejections) = (0, 0);
        let mut out = 0usize;
        for _ in 0..600 {
            // Fill up to what is allowed; the 4th at once is refused at once.
            while out < l.allowed() {
                calls += 1;
                if out == 3 {
                    rejections += 1;
                    l.observe(NO, at(out + 1, 1000));
                } else {
                    out += 1;
                }
            }
            // One call ends.
            l.observe(OK, at(out, 1000));
            out -= 1;
        }
        assert_eq!(l.limit().floor() as usize, 3, "{}", l.limit());
        // Only probes (every 3 × limit successes, jittered) knock on the edge.
        assert!(
            rejections * 100 < 15 * calls,
            "{rejections} rejections in {calls} calls"
        );
        // A success above the old edge (a replica was added) lifts it.
        l.probing = true;
        l.observe(OK, at(4, 1000));
        assert_eq!(l.edge, None);
        assert!(l.limit() >= 4.0);
    }

    #[test]
    fn the_limit_stays_within_one_and_max() {
        let mut l = Limiter::new(5, 10);
        for _ in 0..100 {
            l.observe(OK, at(l.allowed(), 1000));
        }
        assert_eq!(l.allowed(), 5);
        assert!(l.limit() <= 5.0);
        l.set_max(3);
        assert_eq!(l.allowed(), 3);
        l.set_max(0);
        assert_eq!(l.allowed(), 1);
    }

    /// A discrete-event model of a function behind a random balancer: `replicas(t)` replicas
    /// of `per` slots, calls lasting `run` ticks, a 429 at once when the chosen replica is
    /// full. The limiter decides how many calls are out. Virtual time: the limiter has no
    /// clock, so none is needed.
    struct Model {
        l: Limiter,
        rng: fastrand::Rng,
        /// (end tick, replica)
        running: Vec<(u64, usize)>,
        rejections: u64,
        successes: u64,
    }

    impl Model {
        fn new(seed: u64) -> Model {
            Model {
                l: Limiter::new(1000, seed),
                rng: fastrand::Rng::with_seed(seed ^ 0xabcdef),
                running: Vec::new(),
                rejections: 0,
                successes: 0,
            }
        }

        /// One tick with `replicas` replicas; returns the calls running after it.
        fn tick(&mut self, now: u64, replicas: usize, per: usize, run: u64) -> usize {
            // Calls that end now succeed.
            let mut i = 0;
            while i < self.running.len() {
                if self.running[i].0 <= now {
                    self.running.swap_remove(i);
                    let held = self.running.len() + 1;
                    self.l.observe(OK, at(held, 1_000_000));
                    self.successes += 1;
                } else {
                    i += 1;
                }
            }
            // Fill up to the limit; a removed replica's calls finish where they are.
            while self.running.len() < self.l.allowed() {
                let r = self.rng.usize(0..replicas);
                let busy = self.running.iter().filter(|c| c.1 == r).count();
                if busy >= per {
                    self.rejections += 1;
                    let held = self.running.len() + 1;
                    self.l.observe(NO, at(held, 1_000_000));
                } else {
                    let d = run / 2 + self.rng.u64(0..=run);
                    self.running.push((now + d, r));
                }
            }
            self.running.len()
        }
    }

    #[test]
    fn follows_a_capacity_step_up_and_down() {
        for seed in 0..5 {
            let mut m = Model::new(seed);
            let (per, run) = (5, 20);
            let window = |m: &mut Model, from: u64, to: u64, replicas: usize| {
                let (mut sum, mut n) = (0usize, 0usize);
                for t in from..to {
                    let out = m.tick(t, replicas, per, run);
                    if t >= from + (to - from) / 2 {
                        sum += out;
                        n += 1;
                    }
                }
                sum as f64 / n as f64 / (replicas * per) as f64
            };
            // 2 replicas, then 10, then 3: the second half of each phase is measured.
            let low = window(&mut m, 0, 2000, 2);
            let r0 = m.rejections;
            let high = window(&mut m, 2000, 4000, 10);
            let down = window(&mut m, 4000, 6000, 3);
            // Behind a random balancer, 10 replicas at 85% busy cost about one 429 per
            // success (see the module documentation); fewer replicas are easier.
            assert!(
                low > 0.9 && low <= 1.0,
                "seed {seed}: 2 replicas used {low:.2}"
            );
            assert!(
                high > 0.8 && high <= 1.0,
                "seed {seed}: 10 replicas used {high:.2}"
            );
            assert!(
                down > 0.85 && down <= 1.0,
                "seed {seed}: 3 replicas used {down:.2}"
            );
            let calls = m.successes + m.rejections;
            assert!(
                (m.rejections as f64) < 0.55 * calls as f64,
                "seed {seed}: {} rejections of {calls} calls ({r0} in the first phase)",
                m.rejections
            );
        }
    }

    #[test]
    fn recovers_after_a_burst_of_rejections() {
        let mut m = Model::new(42);
        for t in 0..1500 {
            m.tick(t, 4, 5, 20);
        }
        let before = m.l.limit();
        // A burst: 30 rejections in a row (a replica restart, say).
        for _ in 0..30 {
            let held = m.running.len() + 1;
            m.l.observe(NO, at(held, 1_000_000));
        }
        let bottom = m.l.limit();
        assert!(
            bottom < before / 2.0,
            "{bottom} after the burst, {before} before"
        );
        let mut back_at = None;
        for t in 1500..4000 {
            m.tick(t, 4, 5, 20);
            if back_at.is_none() && m.l.limit() >= 0.8 * before {
                back_at = Some(t - 1500);
            }
        }
        let ticks = back_at.expect("never recovered");
        // A run lasts 10–30 ticks: back within about ten runs.
        assert!(ticks < 300, "took {ticks} ticks to recover to 80%");
    }
}
