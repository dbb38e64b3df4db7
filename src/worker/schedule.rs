//! Function mode's fair-slot scheduler: which function may ask NATS for how many messages.
//!
//! In function mode a replica has `max_inflight` slots shared by many functions, each with
//! its own consumer (a bucket). Left to "whoever asks first", a function with a deep backlog
//! takes every slot the moment it frees and a function with ten messages waits behind
//! thousands. This module decides, one slot at a time, who gets the next free slot, and
//! turns those decisions into pull requests (`no_wait`, batch n) for the engine to send.
//!
//! It is pure: no I/O, no tasks, no clock of its own. `now` is passed in and
//! [`Instant`] is only a value, so every rule is table-tested with paused time, and the
//! engine (which owns the consumers, the inbox and the timers) stays a thin loop of
//! "event → call the scheduler → send what it returns".
//!
//! # A slot's life
//!
//! `free` → `assigned` (given to f by [`Scheduler::assign`]) → `requested` (part of f's
//! pull request) → `running` (a message was [`delivered`](Scheduler::delivered) in it) →
//! `free` ([`Scheduler::release`], the job settled). A request that ends with a status
//! ([`Scheduler::request_ended`]) hands back its unfilled slots and f's assigned ones;
//! [`Scheduler::reset_requests`] hands back every requested and assigned slot. At all times
//! `free + Σ (assigned + requested + running) == slots`.
//!
//! # Rules
//!
//! - **Eligible** = ready (its consumer exists) && depth > 0 && not dry && below its cap
//!   (`held < cap`, or `held < 1` while the cap is unknown: one probe message tells the
//!   engine the function's annotations) && below its learned limit (`limiter.rs`, with
//!   `limiter_enabled`, fed by [`Scheduler::observe`]) && below its room (`held < depth`),
//!   where `held = running + requested + assigned`. A rejection at a learned limit of 1
//!   makes it dry too (a cool-down that new work does not end). The depth is the stream's count for the
//!   function's subject, queued and unacked on every replica, so no replica can ever get
//!   more than `depth − held`; a stale depth is corrected by the next discovery.
//! - **Fairness**: round-robin, one slot at a time, over a ring of eligible functions. A
//!   function that becomes eligible joins at the back; one that received a slot and is still
//!   eligible goes to the back. Fairness is per slot, not per request: a function whose
//!   request is still outstanding keeps receiving slots in its turns (as `assigned`) and
//!   they are requested when that request ends.
//! - **Batches**: a request asks for the slots assigned while no request was outstanding,
//!   at most `max_batch` (`consumer_pull_max_messages`); the rest stays assigned for the
//!   next request. One request per function at a time.
//! - **Dry**: a request that ends with a status (`no_wait`: nothing more deliverable now)
//!   makes its function dry, so it is not asked again at once. Empty: 200 ms, doubling per
//!   consecutive empty request up to 5 s (what an idle replica pays to probe functions whose work runs elsewhere: one empty pull per 5 s each). Partly filled: 200 ms, and the doubling starts
//!   over. Any delivery (even an unexpected one) or a depth increase means there is work
//!   and clears it. A request filled completely ends without a status and dries nothing.
//! - **Due**: a message handed back until its start time (`X-Not-Before`, `timing.rs`) is
//!   invisible to pulls until then, so its function's empty pulls back off towards 5 s. The
//!   hand-back tells [`Scheduler::due`] when it returns; at that time the function's dry
//!   time ends and its backoff starts over, so the message is pulled within moments of its
//!   start. At most [`MAX_DUES`] such times are kept per replica (16 bytes each; beyond,
//!   the backoff alone finds them, within 5 s); they are hints, lost with the replica.
//! - **Cost**: O(1) amortised per slot handed out and per event, never O(functions): the
//!   ring holds each function at most once (`in_ring`) and is pruned lazily (eligibility is
//!   checked when an entry is popped), dry timers sit in a min-heap whose outdated entries
//!   are skipped. The engine calls `assign` on every event, with thousands of functions.
//!   Only `reset_requests` (a reconnect) walks every function.
//! - **Not ready** (the consumer is gone): no new slots, and the assigned ones go back to
//!   the pool, as there is nothing to ask with them.
//! - **Misuse never panics**: unknown ids, a release without a running slot, a status with
//!   no outstanding request are ignored; the arithmetic saturates. A bookkeeping slip in the
//!   engine must not take the worker down with it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::worker::limiter::{Change, Limiter, Load, Signal};

/// A function's id: dense, chosen by the caller (a slab index), so state is a `Vec` lookup.
/// The scheduler grows its `Vec` to the largest id it is told about.
pub type FnId = usize;

/// How long a function stays dry after a request that delivered something but not all.
const DRY_BASE: Duration = Duration::from_millis(200);
/// The longest a function stays dry, however many empty requests in a row.
const DRY_MAX: Duration = Duration::from_secs(5);
/// Start times of handed-back messages kept at once (see "Due" in the module docs).
pub const MAX_DUES: usize = 10_000;

/// What happened to a delivered message, see [`Scheduler::delivered`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// It takes one of the function's requested slots; `request_done` when that was the
    /// request's last one (the server sends no status after a fully-filled request).
    Slot { request_done: bool },
    /// The function had no requested slot left (a late message): the caller hands it back.
    Unexpected,
}

/// One function's share of the slots and what decides whether it may get more.
#[derive(Debug, Clone, Default)]
struct Func {
    ready: bool,
    depth: u64,
    /// `set_cap` was called at least once; until then the function may hold one slot.
    cap_known: bool,
    cap: Option<usize>,
    assigned: usize,
    /// The unfilled part of the outstanding request; `> 0` exactly while one is outstanding.
    requested: usize,
    running: usize,
    /// The outstanding request delivered at least one message.
    delivered_in_request: bool,
    dry_until: Option<Instant>,
    /// Consecutive requests that ended empty: the dry backoff's exponent.
    empty_streak: u32,
    /// The function has an entry in the ring (kept across `forget`, as the entry is).
    in_ring: bool,
    /// Adaptive concurrency: its learned limit (created once its cap is known, when the
    /// scheduler has a limiter and the function is not exempt).
    limiter: Option<Limiter>,
    /// Never gets a learned limit (the legacy subject, which mixes functions).
    exempt: bool,
    /// `dry_until` is a cool-down after a rejection at a limit of 1: only its time ends it,
    /// not new work or a delivery.
    cooling: bool,
    /// Rejections at a limit of 1 since the last success: the cool-down's exponent.
    cool_streak: u32,
    /// Running calls already observed (answered) and not yet released: not out at the
    /// function any more, so not part of the height the limiter sees.
    answered: usize,
}

impl Func {
    fn held(&self) -> usize {
        self.assigned
            .saturating_add(self.requested)
            .saturating_add(self.running)
    }

    fn limit(&self) -> usize {
        let cap = match (self.cap_known, self.cap) {
            (false, _) => 1,
            (true, Some(cap)) => cap,
            (true, None) => usize::MAX,
        };
        match &self.limiter {
            Some(l) => cap.min(l.allowed()),
            None => cap,
        }
    }

    /// May take one more slot now. `dry_until` is cleared when it expires (`Scheduler::wake`),
    /// so any value means dry.
    fn eligible(&self) -> bool {
        let held = self.held();
        self.ready
            && self.depth > 0
            && self.dry_until.is_none()
            && held < self.limit()
            && u64::try_from(held).unwrap_or(u64::MAX) < self.depth
    }
}

/// The dry time after `streak` empty requests in a row before this one.
fn empty_backoff(streak: u32) -> Duration {
    DRY_BASE.saturating_mul(1u32 << streak.min(16)).min(DRY_MAX)
}

/// Shares a replica's `max_inflight` slots among its functions, one slot at a time in
/// round-robin, and says which pull requests to send. See the module documentation for
/// the rules. Holds no I/O handle: the engine calls it on every event.
#[derive(Debug)]
pub struct Scheduler {
    slots: usize,
    max_batch: usize,
    free: usize,
    fns: Vec<Func>,
    /// Functions that were eligible when pushed; rechecked when popped.
    ring: VecDeque<FnId>,
    /// `(dry_until, f)`; an entry is live while `f` is still dry until exactly then and has
    /// depth. Outdated entries are skipped; the top is always live (see `prune_wakes`).
    wakes: BinaryHeap<Reverse<(Instant, FnId)>>,
    /// `(at, f)`: a message of `f` handed back until `at` is deliverable again then
    /// ([`Scheduler::due`]); at most [`MAX_DUES`].
    dues: BinaryHeap<Reverse<(Instant, FnId)>>,
    /// Functions that may hold assigned slots and no outstanding request; drained by `assign`.
    to_request: Vec<FnId>,
    /// Adaptive concurrency is on (`limiter_enabled`).
    adaptive: bool,
    /// Seeds each new limiter's probe jitter differently.
    seeds: u64,
}

/// What [`Scheduler::observe`] learned, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// Calls the function may have at once now.
    pub allowed: usize,
    pub change: Change,
}

impl Scheduler {
    /// A scheduler for `slots` slots (`max_inflight`), all free, knowing no function yet.
    pub fn new(slots: usize) -> Scheduler {
        Scheduler {
            slots,
            max_batch: slots.max(1),
            free: slots,
            fns: Vec::new(),
            ring: VecDeque::new(),
            wakes: BinaryHeap::new(),
            dues: BinaryHeap::new(),
            to_request: Vec::new(),
            adaptive: false,
            seeds: 0,
        }
    }

    /// Adaptive concurrency: each function's slots are also bounded by a limit learned from
    /// its answers (`limiter.rs`), fed by [`Scheduler::observe`].
    pub fn with_limiter(mut self, on: bool) -> Scheduler {
        self.adaptive = on;
        self
    }

    /// `f` never gets a learned limit (the legacy subject, whose messages belong to many
    /// functions: one function's 429s must not hold back the others).
    pub fn exempt(&mut self, f: FnId) {
        let s = self.entry(f);
        s.exempt = true;
        s.limiter = None;
        self.touch(f);
    }

    /// One of `f`'s running calls ended with `signal` at `now` (its slot is still running:
    /// call this before the release). Feeds `f`'s limiter; `None` when `f` has none.
    ///
    /// A rejection with the limit already at 1 also cools `f` down: no new slot for 200 ms,
    /// doubling per such rejection up to 5 s, until a success. A rejected call returns at
    /// once, so without it a function that rejects everything (crashed, over quota) would be
    /// called at network speed, one message after another, even at a limit of 1.
    pub fn observe(&mut self, f: FnId, signal: Signal, now: Instant) -> Option<Observed> {
        let s = self.fns.get_mut(f)?;
        let held = s.held();
        let backlog = s
            .depth
            .saturating_sub(u64::try_from(held).unwrap_or(u64::MAX));
        let l = s.limiter.as_mut()?;
        // This call, and the others still out at the function.
        let running = s.running.saturating_sub(s.answered);
        s.answered = s.answered.saturating_add(1).min(s.running);
        let change = l.observe(
            signal,
            Load {
                held,
                running,
                backlog,
            },
        );
        let allowed = l.allowed();
        match signal {
            Signal::Success => s.cool_streak = 0,
            Signal::Rejected if allowed == 1 => {
                let until = now.checked_add(empty_backoff(s.cool_streak)).unwrap_or(now);
                s.cool_streak = s.cool_streak.saturating_add(1);
                if s.dry_until.is_none_or(|t| t < until) {
                    s.dry_until = Some(until);
                    s.cooling = true;
                    self.wakes.push(Reverse((until, f)));
                }
            }
            _ => {}
        }
        self.touch(f);
        self.prune_wakes();
        Some(Observed { allowed, change })
    }

    /// Upper bound on one request's batch (`consumer_pull_max_messages`); default = slots.
    /// At least 1, or assigned slots could never be requested.
    pub fn with_max_batch(mut self, max_batch: usize) -> Scheduler {
        self.max_batch = max_batch.max(1);
        self
    }

    /// Depth from discovery: the stream's count for the function's subject (queued + unacked
    /// on every replica). `depth > 0` makes it eligible (if ready etc.); an increase over the
    /// last depth clears "dry" (new work arrived). Depth 0: not eligible; slots it holds stay
    /// until released.
    pub fn set_depth(&mut self, f: FnId, depth: u64) {
        let s = self.entry(f);
        let mut rewake = None;
        if depth > s.depth {
            match (s.cooling, s.dry_until) {
                // Its wake-up may have been pruned while the depth was 0.
                (true, Some(t)) => rewake = Some(t),
                _ => s.dry_until = None,
            }
        }
        s.depth = depth;
        if let Some(t) = rewake {
            self.wakes.push(Reverse((t, f)));
        }
        self.touch(f);
        self.prune_wakes();
    }

    /// The function's consumer exists (`true`) or not (`false`). Not ready = not eligible.
    /// Default `false`. Becoming not ready hands its assigned (not yet requested) slots back
    /// to the pool: there is no consumer to ask with them. An outstanding request stays until
    /// the engine reports its end.
    pub fn set_ready(&mut self, f: FnId, ready: bool) {
        let s = self.entry(f);
        s.ready = ready;
        if !ready {
            let back = std::mem::take(&mut s.assigned);
            self.free = self.free.saturating_add(back);
        }
        self.touch(f);
    }

    /// Per-function cap (from an annotation). Until `set_cap` was called once for `f`, the cap
    /// is unknown and the function may hold at most 1 slot (a probe, so the first message can
    /// tell us its cap). `None` = no cap. Lowering a cap below what `f` holds takes nothing
    /// back: it gets no more until it is below again.
    pub fn set_cap(&mut self, f: FnId, cap: Option<usize>) {
        let (slots, adaptive) = (self.slots, self.adaptive);
        self.seeds = self.seeds.wrapping_add(1);
        let seed = self.seeds;
        let s = self.entry(f);
        s.cap_known = true;
        s.cap = cap;
        let max = cap.unwrap_or(slots).min(slots);
        match &mut s.limiter {
            Some(l) => l.set_max(max),
            None if adaptive && !s.exempt => s.limiter = Some(Limiter::new(max, seed)),
            None => {}
        }
        self.touch(f);
    }

    /// `f`'s cap as last set: `None` while unknown (no `set_cap` yet), `Some(None)` for no cap.
    pub fn cap(&self, f: FnId) -> Option<Option<usize>> {
        self.fns.get(f).filter(|s| s.cap_known).map(|s| s.cap)
    }

    /// Hand out free slots, then return the pull requests to send now: `(f, batch)` for every
    /// `f` that has assigned slots and no request outstanding; those slots become "requested"
    /// and `f`'s request outstanding. Dry functions whose time is up at `now` are eligible
    /// again first.
    pub fn assign(&mut self, now: Instant) -> Vec<(FnId, usize)> {
        self.wake(now);
        while self.free > 0 {
            let Some(f) = self.ring.pop_front() else {
                break;
            };
            let Some(s) = self.fns.get_mut(f) else {
                continue;
            };
            s.in_ring = false;
            if !s.eligible() {
                continue;
            }
            s.assigned = s.assigned.saturating_add(1);
            self.free -= 1;
            if s.requested == 0 {
                self.to_request.push(f);
            }
            self.touch(f);
        }
        let mut requests = Vec::new();
        for f in self.to_request.drain(..) {
            let Some(s) = self.fns.get_mut(f) else {
                continue;
            };
            if s.requested > 0 || s.assigned == 0 {
                continue; // a duplicate entry, or its slots went back to the pool
            }
            let batch = s.assigned.min(self.max_batch);
            s.assigned -= batch;
            s.requested = batch;
            s.delivered_in_request = false;
            requests.push((f, batch));
        }
        self.prune_wakes();
        requests
    }

    /// A message arrived for `f`. It takes one of `f`'s requested slots, or is
    /// [`Delivery::Unexpected`] when none is left. Either way it proves `f` has work: `f` is
    /// no longer dry and its backoff starts over.
    pub fn delivered(&mut self, f: FnId) -> Delivery {
        let Some(s) = self.fns.get_mut(f) else {
            return Delivery::Unexpected;
        };
        if !s.cooling {
            s.dry_until = None;
        }
        s.empty_streak = 0;
        let delivery = if s.requested == 0 {
            Delivery::Unexpected
        } else {
            s.requested -= 1;
            s.running = s.running.saturating_add(1);
            s.delivered_in_request = true;
            let request_done = s.requested == 0;
            if request_done && s.assigned > 0 {
                self.to_request.push(f);
            }
            Delivery::Slot { request_done }
        };
        self.touch(f);
        self.prune_wakes();
        delivery
    }

    /// `f`'s outstanding request ended with a status (`no_wait` answered 404/408: nothing
    /// more deliverable now). Its unfilled slots return to the free pool, and so do slots
    /// assigned to `f` but not yet requested. `f` becomes dry until `now` + backoff: 200 ms
    /// doubling per consecutive empty request up to 5 s; a partly filled request dries it for
    /// 200 ms and starts the doubling over. Without an outstanding request (a late or
    /// duplicate status) nothing happens.
    pub fn request_ended(&mut self, f: FnId, now: Instant) {
        let Some(s) = self.fns.get_mut(f) else {
            return;
        };
        if s.requested == 0 {
            return;
        }
        let back = s.requested.saturating_add(s.assigned);
        s.requested = 0;
        s.assigned = 0;
        self.free = self.free.saturating_add(back);
        let backoff = if s.delivered_in_request {
            s.empty_streak = 0;
            DRY_BASE
        } else {
            let d = empty_backoff(s.empty_streak);
            s.empty_streak = s.empty_streak.saturating_add(1);
            d
        };
        s.delivered_in_request = false;
        let until = now.checked_add(backoff).unwrap_or(now);
        match s.dry_until {
            // A longer cool-down stands.
            Some(t) if s.cooling && t >= until => self.wakes.push(Reverse((t, f))),
            _ => {
                s.dry_until = Some(until);
                s.cooling = false;
                self.wakes.push(Reverse((until, f)));
            }
        }
        self.prune_wakes();
    }

    /// Every outstanding request died (reconnect, inbox reset): requested and assigned slots
    /// return to the pool. Nobody is marked dry for it (the requests did not say "empty");
    /// functions already dry stay so until their time. O(functions), for a rare event.
    pub fn reset_requests(&mut self) {
        let mut running = 0usize;
        for s in &mut self.fns {
            s.requested = 0;
            s.assigned = 0;
            s.delivered_in_request = false;
            running = running.saturating_add(s.running);
        }
        // Counted afresh rather than added back: every slot that does not run is free now.
        self.free = self.slots.saturating_sub(running);
        self.to_request.clear();
        for f in 0..self.fns.len() {
            self.touch(f);
        }
    }

    /// A running message's slot was dropped (the job settled): one slot back to the pool.
    /// Ignored when `f` holds no running slot.
    pub fn release(&mut self, f: FnId) {
        let Some(s) = self.fns.get_mut(f) else {
            return;
        };
        if s.running == 0 {
            return;
        }
        s.running -= 1;
        s.answered = s.answered.saturating_sub(1).min(s.running);
        self.free = self.free.saturating_add(1);
        self.touch(f);
    }

    /// A message of `f` was handed back until `at` (its start time): at `at`, `f`'s dry time
    /// ends and its empty-pull backoff starts over, so it is pulled then (see "Due" in the
    /// module docs). A cool-down stands. Ignored past [`MAX_DUES`] start times kept; a
    /// stale one (the function was forgotten and its id reused) costs one pull at most.
    pub fn due(&mut self, f: FnId, at: Instant) {
        if self.dues.len() < MAX_DUES {
            self.dues.push(Reverse((at, f)));
        }
    }

    /// The earliest instant a dry function with depth > 0 becomes eligible again, or a
    /// handed-back message is due (the engine sleeps until then, then calls `assign`).
    /// `None`: no timer needed.
    pub fn next_wake(&self) -> Option<Instant> {
        let dry = self.wakes.peek().map(|Reverse((t, _))| *t);
        let due = self.dues.peek().map(|Reverse((t, _))| *t);
        match (dry, due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Slots neither assigned, requested nor running.
    pub fn free(&self) -> usize {
        self.free
    }

    /// `f`'s running messages (delivered, not yet released): for metrics and its cap.
    pub fn running(&self, f: FnId) -> usize {
        self.fns.get(f).map_or(0, |s| s.running)
    }

    /// Holds nothing (no running, requested or assigned slot) and has no request
    /// outstanding: safe to forget/reap. Unknown ids are idle.
    pub fn is_idle(&self, f: FnId) -> bool {
        self.fns.get(f).is_none_or(|s| s.held() == 0)
    }

    /// `f` has a pull request outstanding: its end (filled, status, reset) is still to come.
    pub fn has_request(&self, f: FnId) -> bool {
        self.fns.get(f).is_some_and(|s| s.requested > 0)
    }

    /// Drop `f`'s state (its consumer was deleted), so its id can be reused for another
    /// function. Only when `is_idle(f)`; otherwise do nothing and return `false`.
    pub fn forget(&mut self, f: FnId) -> bool {
        let Some(s) = self.fns.get_mut(f) else {
            return true;
        };
        if s.held() > 0 {
            return false;
        }
        // The ring entry stays until popped; keeping the flag stops a reused id from
        // getting a second one.
        *s = Func {
            in_ring: s.in_ring,
            exempt: false,
            ..Func::default()
        };
        self.prune_wakes();
        true
    }

    fn entry(&mut self, f: FnId) -> &mut Func {
        if f >= self.fns.len() {
            self.fns.resize_with(f.saturating_add(1), Func::default);
        }
        &mut self.fns[f]
    }

    /// Puts `f` at the back of the ring if it is eligible and not there yet. Called after
    /// every change that can make a function eligible, so the ring never misses one.
    fn touch(&mut self, f: FnId) {
        let Some(s) = self.fns.get_mut(f) else {
            return;
        };
        if !s.in_ring && s.eligible() {
            s.in_ring = true;
            self.ring.push_back(f);
        }
    }

    /// Ends every dry time that is up at `now`, and those of functions with a message due.
    fn wake(&mut self, now: Instant) {
        while let Some(&Reverse((t, f))) = self.dues.peek() {
            if t > now {
                break;
            }
            self.dues.pop();
            if let Some(s) = self.fns.get_mut(f) {
                if !s.cooling {
                    s.dry_until = None;
                    s.empty_streak = 0;
                }
            }
            self.touch(f);
        }
        while let Some(&Reverse((t, f))) = self.wakes.peek() {
            if t > now {
                break;
            }
            self.wakes.pop();
            if let Some(s) = self.fns.get_mut(f) {
                if s.dry_until == Some(t) {
                    s.dry_until = None;
                    s.cooling = false;
                }
            }
            self.touch(f);
        }
        self.prune_wakes();
    }

    /// Drops outdated entries from the top of the heap, so `next_wake` can peek. Entries of
    /// a function whose depth fell to 0 go too: only a depth increase makes it eligible
    /// again, and that clears dry anyway.
    fn prune_wakes(&mut self) {
        while let Some(&Reverse((t, f))) = self.wakes.peek() {
            let live = self
                .fns
                .get(f)
                .is_some_and(|s| s.dry_until == Some(t) && s.depth > 0);
            if live {
                break;
            }
            self.wakes.pop();
        }
    }

    /// The invariants, asserted after every step of the tests.
    #[cfg(test)]
    fn check(&self) {
        let held: usize = self.fns.iter().map(Func::held).sum();
        assert_eq!(self.free + held, self.slots, "free + held == slots");
        let mut seen = vec![false; self.fns.len()];
        for &f in &self.ring {
            assert!(!seen[f], "f{f} twice in the ring");
            seen[f] = true;
        }
        for (f, s) in self.fns.iter().enumerate() {
            assert_eq!(s.in_ring, seen[f], "f{f}: in_ring flag");
            assert!(
                !s.eligible() || s.in_ring,
                "f{f} eligible but not in the ring"
            );
            if s.assigned > 0 && s.requested == 0 {
                assert!(
                    self.to_request.contains(&f),
                    "f{f}: assigned, never requested"
                );
            }
            if let (Some(t), true) = (s.dry_until, s.depth > 0) {
                assert!(
                    self.wakes.iter().any(|&Reverse(e)| e == (t, f)),
                    "f{f}: dry with depth and no timer"
                );
            }
        }
        if let Some(&Reverse((t, f))) = self.wakes.peek() {
            assert!(self.fns[f].dry_until == Some(t) && self.fns[f].depth > 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    const A: FnId = 0;
    const B: FnId = 1;
    const C: FnId = 2;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A ready function with a known cap and this depth.
    fn add(s: &mut Scheduler, f: FnId, depth: u64, cap: Option<usize>) {
        s.set_ready(f, true);
        s.set_cap(f, cap);
        s.set_depth(f, depth);
        s.check();
    }

    /// Assigns and delivers every requested message; returns the functions started, in order.
    fn assign_and_fill(s: &mut Scheduler) -> Vec<FnId> {
        let mut started = Vec::new();
        for (f, n) in s.assign(Instant::now()) {
            s.check();
            for i in 0..n {
                let want = Delivery::Slot {
                    request_done: i + 1 == n,
                };
                assert_eq!(s.delivered(f), want, "f{f} message {i} of {n}");
                s.check();
                started.push(f);
            }
        }
        started
    }

    #[tokio::test(start_paused = true)]
    async fn with_the_limiter_a_function_at_its_limit_gets_no_slot_and_its_work_stays_queued() {
        let mut s = Scheduler::new(8).with_limiter(true);
        add(&mut s, A, 100, None);
        // The limiter starts at 1: one message pulled of a's 100, the rest stays queued.
        assert_eq!(assign_and_fill(&mut s), vec![A]);
        assert_eq!(assign_and_fill(&mut s), Vec::<FnId>::new());
        assert_eq!(s.free(), 7);
        // b, without a limit of its own learned yet, still gets its slot.
        add(&mut s, B, 5, None);
        assert_eq!(assign_and_fill(&mut s), vec![B]);
        // a's call succeeds at its limit with work queued (a large backlog): the limit grows
        // to 5 (slow start) and a gets five slots once its first is released; b keeps its.
        let seen = s.observe(A, Signal::Success, Instant::now()).unwrap();
        assert_eq!(seen.allowed, 5);
        assert!(seen.change.grew);
        s.release(A);
        s.check();
        assert_eq!(assign_and_fill(&mut s), vec![A; 5]);
        assert_eq!(s.running(A), 5);
        assert_eq!(s.running(B), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejection_at_a_limit_of_one_cools_the_function_down_until_its_time() {
        let mut s = Scheduler::new(4).with_limiter(true);
        add(&mut s, A, 100, None);
        assert_eq!(assign_and_fill(&mut s), vec![A]);
        let t0 = Instant::now();
        s.observe(A, Signal::Rejected, t0).unwrap();
        s.release(A);
        s.check();
        // No slot during the cool-down, not even when new work arrives.
        assert_eq!(assign_and_fill(&mut s), Vec::<FnId>::new());
        s.set_depth(A, 200);
        assert_eq!(assign_and_fill(&mut s), Vec::<FnId>::new());
        assert_eq!(s.next_wake(), Some(t0 + ms(200)));
        tokio::time::advance(ms(200)).await;
        assert_eq!(assign_and_fill(&mut s), vec![A]);
        // The next one in a row cools it for twice as long; a success ends the streak.
        let t1 = Instant::now();
        s.observe(A, Signal::Rejected, t1).unwrap();
        s.release(A);
        assert_eq!(s.next_wake(), Some(t1 + ms(400)));
        // Its depth falling to 0 and rising again keeps the wake-up.
        s.set_depth(A, 0);
        s.set_depth(A, 50);
        assert_eq!(s.next_wake(), Some(t1 + ms(400)));
        tokio::time::advance(ms(400)).await;
        assert_eq!(assign_and_fill(&mut s), vec![A]);
        s.observe(A, Signal::Success, Instant::now()).unwrap();
        s.release(A);
        s.check();
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_never_exceeds_the_cap_and_an_exempt_function_has_none() {
        let mut s = Scheduler::new(8).with_limiter(true);
        add(&mut s, A, 100, Some(2));
        let mut started = assign_and_fill(&mut s).len();
        for _ in 0..20 {
            s.observe(A, Signal::Success, Instant::now());
            s.release(A);
            started += assign_and_fill(&mut s).len();
            assert!(s.running(A) <= 2, "over the cap: {}", s.running(A));
        }
        assert!(started > 2);
        // The legacy subject: no learned limit, no cap: every slot at once.
        s.exempt(B);
        add(&mut s, B, 100, None);
        assert!(s.observe(B, Signal::Success, Instant::now()).is_none());
        let b = assign_and_fill(&mut s).iter().filter(|&&f| f == B).count();
        assert_eq!(b, 8 - s.running(A));
    }

    #[tokio::test(start_paused = true)]
    async fn a_newcomer_waits_for_slots_not_for_the_backlog() {
        let mut s = Scheduler::new(8);
        let (a_total, b_total) = (3000u64, 10u64);
        add(&mut s, A, a_total, None);
        let mut running: VecDeque<FnId> = assign_and_fill(&mut s).into();
        assert_eq!(running.len(), 8, "a alone takes every slot");

        add(&mut s, B, b_total, None);
        let (mut finished, mut started) = ([0u64; 2], [0u64; 2]);
        let mut a_before_b_done = 0;
        while started[B] < b_total {
            let f = running.pop_front().expect("something runs");
            s.release(f);
            finished[f] += 1;
            // Discovery: what is left of each subject (queued + unacked).
            s.set_depth(A, a_total - finished[A]);
            s.set_depth(B, b_total - finished[B]);
            s.check();
            for f in assign_and_fill(&mut s) {
                started[f] += 1;
                if f == A {
                    a_before_b_done += 1;
                }
                running.push_back(f);
            }
            assert!(started[A] < 1000, "b never finished starting");
        }
        assert!(
            a_before_b_done < 50,
            "a started {a_before_b_done} jobs while b's {b_total} waited"
        );
        println!("fairness: a started {a_before_b_done} jobs before b's {b_total} all started");
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_gives_equal_shares() {
        let mut s = Scheduler::new(5);
        for f in [A, B, C] {
            add(&mut s, f, 1_000_000, None);
        }
        let mut rng = fastrand::Rng::with_seed(7);
        let mut running = Vec::new();
        let mut starts = [0usize; 3];
        for step in 0..3000 {
            for f in assign_and_fill(&mut s) {
                starts[f] += 1;
                running.push(f);
            }
            let (max, min) = (starts.iter().max().unwrap(), starts.iter().min().unwrap());
            assert!(max - min <= 1, "step {step}: shares {starts:?}");
            let f = running.swap_remove(rng.usize(..running.len()));
            s.release(f);
            s.check();
        }
        assert!(starts.iter().sum::<usize>() >= 3000);
    }

    #[tokio::test(start_paused = true)]
    async fn caps_bound_what_a_function_holds() {
        // (cap: None = never set, Some(c) = set_cap(c)), most held at once over the run.
        let rows: &[(Option<Option<usize>>, usize)] = &[
            (None, 1),
            (Some(Some(0)), 0),
            (Some(Some(2)), 2),
            (Some(Some(20)), 8),
            (Some(None), 8),
        ];
        for (cap, want) in rows {
            let mut s = Scheduler::new(8);
            s.set_ready(A, true);
            s.set_depth(A, 100);
            if let Some(cap) = cap {
                s.set_cap(A, *cap);
            }
            let mut running = VecDeque::new();
            let mut most = 0;
            for _ in 0..50 {
                running.extend(assign_and_fill(&mut s));
                most = most.max(running.len());
                if let Some(f) = running.pop_front() {
                    s.release(f);
                    s.check();
                }
            }
            assert_eq!(most, *want, "cap {cap:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unknown_cap_probes_with_one_slot_until_set() {
        let mut s = Scheduler::new(8);
        s.set_ready(A, true);
        s.set_depth(A, 100);
        assert_eq!(s.assign(Instant::now()), vec![(A, 1)]);
        assert_eq!(s.delivered(A), Delivery::Slot { request_done: true });
        assert_eq!(s.assign(Instant::now()), vec![], "still one slot");
        s.set_cap(A, Some(3));
        s.check();
        assert_eq!(s.assign(Instant::now()), vec![(A, 2)]);
        s.check();
    }

    #[tokio::test(start_paused = true)]
    async fn room_is_the_depth_minus_what_is_held() {
        // (depth, requested by the first assign; then, with one running and the rest handed
        // back, the next depth and what the next assign requests)
        let rows: &[(u64, usize, u64, usize)] = &[
            (0, 0, 0, 0),
            (3, 3, 3, 2),
            (8, 8, 4, 3),
            (100, 8, 1, 0),
            (100, 8, 50, 7),
        ];
        for &(depth, first, next_depth, second) in rows {
            let mut s = Scheduler::new(8);
            add(&mut s, A, depth, None);
            let got: usize = s.assign(Instant::now()).iter().map(|r| r.1).sum();
            assert_eq!(got, first, "depth {depth}");
            if first == 0 {
                continue;
            }
            assert!(matches!(s.delivered(A), Delivery::Slot { .. }));
            s.reset_requests();
            s.set_depth(A, next_depth);
            s.check();
            let got: usize = s.assign(Instant::now()).iter().map(|r| r.1).sum();
            assert_eq!(got, second, "depth {depth} then {next_depth}");
            s.check();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn empty_requests_dry_a_function_for_longer_and_longer() {
        let mut s = Scheduler::new(4);
        add(&mut s, A, 100, None);
        for want in [200, 400, 800, 1600, 3200, 5000, 5000] {
            assert_eq!(s.assign(Instant::now()), vec![(A, 4)]);
            let ended = Instant::now();
            s.request_ended(A, ended);
            s.check();
            assert_eq!(s.free(), 4);
            assert_eq!(s.next_wake(), Some(ended + ms(want)), "dry {want} ms");
            tokio::time::advance(ms(want - 1)).await;
            assert_eq!(
                s.assign(Instant::now()),
                vec![],
                "still dry at {want} - 1 ms"
            );
            s.check();
            tokio::time::advance(ms(1)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_request_dries_for_the_base_time_and_resets_the_doubling() {
        let mut s = Scheduler::new(4);
        add(&mut s, A, 100, None);
        let empty = |s: &mut Scheduler| {
            assert_eq!(s.assign(Instant::now()), vec![(A, 4)]);
            s.request_ended(A, Instant::now());
            s.check();
            s.next_wake().unwrap() - Instant::now()
        };
        assert_eq!(empty(&mut s), ms(200));
        tokio::time::advance(ms(200)).await;
        assert_eq!(empty(&mut s), ms(400));
        tokio::time::advance(ms(400)).await;
        for _ in 0..3 {
            assert_eq!(s.assign(Instant::now()), vec![(A, 4)]);
            assert_eq!(
                s.delivered(A),
                Delivery::Slot {
                    request_done: false
                }
            );
            s.request_ended(A, Instant::now());
            s.check();
            assert_eq!(s.free(), 3, "the unfilled 3 are back");
            assert_eq!(s.next_wake(), Some(Instant::now() + ms(200)));
            tokio::time::advance(ms(200)).await;
            s.release(A);
        }
        assert_eq!(empty(&mut s), ms(200), "the doubling started over");
    }

    #[tokio::test(start_paused = true)]
    async fn a_handed_back_message_is_pulled_at_its_start_time_not_after_the_backoff() {
        let mut s = Scheduler::new(1);
        add(&mut s, A, 1, None);
        assert_eq!(assign_and_fill(&mut s), vec![A]);
        // Handed back until 1.5 s from now; its slot goes back.
        let start = Instant::now() + ms(1_500);
        s.due(A, start);
        s.release(A);
        s.check();
        // The stream still counts it, but pulls come back empty: the backoff grows.
        for _ in 0..3 {
            assert_eq!(s.assign(Instant::now()), vec![(A, 1)]);
            s.request_ended(A, Instant::now());
            s.check();
            let wake = s.next_wake().unwrap();
            tokio::time::advance(wake - Instant::now()).await;
        }
        // 200 + 400 + 800 ms: now 1.4 s, dry until 3.0 s; the start time wakes it at 1.5 s.
        assert_eq!(s.assign(Instant::now()), vec![(A, 1)]);
        s.request_ended(A, Instant::now());
        assert_eq!(
            s.next_wake(),
            Some(start),
            "woken at its start, not at 3.0 s"
        );
        tokio::time::advance(start - Instant::now()).await;
        assert_eq!(s.assign(Instant::now()), vec![(A, 1)]);
        s.check();
        // Too early after all (the server's timer): the backoff starts over at 200 ms.
        s.request_ended(A, Instant::now());
        assert_eq!(s.next_wake(), Some(Instant::now() + ms(200)));
        s.check();
        // Due times past the bound are not kept (the backoff finds those messages).
        let mut s = Scheduler::new(1);
        for i in 0..MAX_DUES + 5 {
            s.due(B, Instant::now() + ms(i as u64 + 1));
        }
        assert_eq!(s.dues.len(), MAX_DUES);
    }

    #[tokio::test(start_paused = true)]
    async fn new_work_clears_dry() {
        // What happens while A is dry after an empty request, and whether A is asked at once.
        type Step = fn(&mut Scheduler);
        let rows: &[(&str, Step, bool)] = &[
            ("nothing", |_| {}, false),
            ("same depth", |s| s.set_depth(A, 100), false),
            ("lower depth", |s| s.set_depth(A, 99), false),
            ("higher depth", |s| s.set_depth(A, 101), true),
            (
                "a late message",
                |s| assert_eq!(s.delivered(A), Delivery::Unexpected),
                true,
            ),
            ("a release", |s| s.release(A), false),
        ];
        for (what, step, asked) in rows {
            let mut s = Scheduler::new(4);
            add(&mut s, A, 100, None);
            assert_eq!(s.assign(Instant::now()), vec![(A, 4)]);
            s.request_ended(A, Instant::now());
            step(&mut s);
            s.check();
            assert_eq!(!s.assign(Instant::now()).is_empty(), *asked, "{what}");
            assert_eq!(s.next_wake().is_some(), !asked, "{what}: timer");
            s.check();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn next_wake_is_the_earliest_dry_function_with_depth() {
        let mut s = Scheduler::new(4);
        assert_eq!(s.next_wake(), None);
        add(&mut s, A, 100, None);
        add(&mut s, B, 100, None);
        let t0 = Instant::now();
        let reqs = s.assign(t0);
        assert_eq!(reqs, vec![(A, 2), (B, 2)]);
        s.request_ended(A, t0); // A: empty, 200 ms
        tokio::time::advance(ms(50)).await;
        s.request_ended(B, Instant::now()); // B: empty, 250 ms from t0
        s.check();
        assert_eq!(s.next_wake(), Some(t0 + ms(200)));
        s.set_depth(A, 0);
        s.check();
        assert_eq!(s.next_wake(), Some(t0 + ms(250)), "A has no work left");
        tokio::time::advance(ms(200)).await;
        assert_eq!(s.assign(Instant::now()), vec![(B, 4)]);
        assert_eq!(s.next_wake(), None);
        s.set_depth(A, 5);
        s.check();
        assert_eq!(s.next_wake(), None, "new work: A is not dry");
    }

    #[tokio::test(start_paused = true)]
    async fn deliveries_beyond_the_request_are_unexpected() {
        let mut s = Scheduler::new(8);
        add(&mut s, A, 100, Some(3));
        assert_eq!(s.delivered(A), Delivery::Unexpected, "nothing requested");
        assert_eq!(s.delivered(42), Delivery::Unexpected, "unknown id");
        assert_eq!(s.assign(Instant::now()), vec![(A, 3)]);
        assert!(s.has_request(A));
        let got: Vec<Delivery> = (0..5).map(|_| s.delivered(A)).collect();
        let slot = |request_done| Delivery::Slot { request_done };
        assert_eq!(
            got,
            vec![
                slot(false),
                slot(false),
                slot(true),
                Delivery::Unexpected,
                Delivery::Unexpected
            ]
        );
        assert!(!s.has_request(A), "a filled request is over");
        assert_eq!((s.running(A), s.free()), (3, 5));
        s.check();
        s.request_ended(A, Instant::now()); // a status after the fill: nothing to end
        s.check();
        assert_eq!((s.running(A), s.free(), s.next_wake()), (3, 5, None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_function_keeps_its_turns_and_batches_are_capped() {
        let mut s = Scheduler::new(8).with_max_batch(3);
        add(&mut s, A, 100, None);
        assert_eq!(s.assign(Instant::now()), vec![(A, 3)]);
        s.check();
        assert_eq!(s.free(), 0, "5 stay assigned to A");
        assert_eq!(s.assign(Instant::now()), vec![], "one request at a time");
        for _ in 0..3 {
            s.delivered(A);
        }
        assert_eq!(s.assign(Instant::now()), vec![(A, 3)]);
        for _ in 0..3 {
            s.delivered(A);
        }
        s.check();
        assert_eq!(s.assign(Instant::now()), vec![(A, 2)]);

        // B arrives while A's request is outstanding: freed slots alternate, and A's wait.
        add(&mut s, B, 100, None);
        for _ in 0..4 {
            s.release(A);
        }
        s.check();
        assert_eq!(
            s.assign(Instant::now()),
            vec![(B, 2)],
            "A's 2 stay assigned"
        );
        assert!(s.has_request(A));
        assert!(!s.is_idle(A));
        // A's request ends with a status: its unfilled and assigned slots go back.
        s.delivered(A);
        s.request_ended(A, Instant::now());
        s.check();
        assert_eq!(s.free(), 3);
        assert_eq!(
            s.assign(Instant::now()),
            vec![],
            "B holds a request, A is dry"
        );
        s.delivered(B);
        s.delivered(B);
        assert_eq!(s.assign(Instant::now()), vec![(B, 3)]);
        s.check();
    }

    #[tokio::test(start_paused = true)]
    async fn not_ready_functions_get_nothing_and_give_back_what_waits() {
        let mut s = Scheduler::new(4);
        s.set_cap(A, None);
        s.set_depth(A, 100);
        assert_eq!(s.assign(Instant::now()), vec![], "no consumer yet");
        s.set_ready(A, true);
        assert_eq!(s.assign(Instant::now()), vec![(A, 4)]);
        s.delivered(A);
        s.delivered(A);
        s.release(A);
        s.release(A);
        add(&mut s, B, 1, None);
        // One turn each: A's slot waits (assigned) for its outstanding request to end.
        assert_eq!(s.assign(Instant::now()), vec![(B, 1)]);
        s.check();
        assert_eq!(s.free(), 0);
        s.set_ready(A, false);
        s.check();
        assert_eq!(s.free(), 1, "the assigned slot is back");
        assert!(s.has_request(A), "the request stays until it ends");
    }

    #[tokio::test(start_paused = true)]
    async fn reset_requests_returns_everything_but_what_runs() {
        let mut s = Scheduler::new(8).with_max_batch(2);
        add(&mut s, A, 100, None);
        add(&mut s, B, 100, None);
        assert_eq!(s.assign(Instant::now()), vec![(A, 2), (B, 2)]);
        s.delivered(A);
        s.check();
        s.reset_requests();
        s.check();
        assert_eq!((s.free(), s.running(A)), (7, 1));
        assert!(!s.has_request(A) && !s.has_request(B));
        assert_eq!(s.next_wake(), None, "nobody dry");
        assert_eq!(s.assign(Instant::now()), vec![(A, 2), (B, 2)]);
        s.check();
    }

    #[tokio::test(start_paused = true)]
    async fn forget_refuses_a_function_that_holds_anything() {
        let mut s = Scheduler::new(4);
        add(&mut s, A, 100, Some(1));
        assert!(s.is_idle(A));
        assert_eq!(s.assign(Instant::now()), vec![(A, 1)]);
        assert!(!s.is_idle(A) && !s.forget(A), "requested");
        s.delivered(A);
        assert!(!s.is_idle(A) && !s.forget(A), "running");
        s.check();
        s.release(A);
        assert!(s.is_idle(A));
        assert!(s.forget(A), "its ring entry is still there");
        s.check();
        assert_eq!((s.running(A), s.has_request(A)), (0, false));
        // The id is reused at once for another function: still one ring entry (check).
        add(&mut s, B, 1, None);
        add(&mut s, A, 2, None);
        assert_eq!(s.assign(Instant::now()), vec![(A, 2), (B, 1)]);
        s.check();
        assert!(s.forget(7), "unknown ids are idle");
        s.check();
    }

    #[tokio::test(start_paused = true)]
    async fn misuse_is_ignored() {
        let mut s = Scheduler::new(2);
        s.release(A);
        s.release(1_000);
        s.request_ended(A, Instant::now());
        s.request_ended(1_000, Instant::now());
        s.reset_requests();
        assert_eq!(
            (s.free(), s.running(9), s.is_idle(9), s.has_request(9)),
            (2, 0, true, false)
        );
        add(&mut s, A, 5, None);
        s.release(A); // nothing running
        s.check();
        assert_eq!(s.assign(Instant::now()), vec![(A, 2)]);
        let _ = Scheduler::new(0).with_max_batch(0).assign(Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn random_operations_keep_the_books_and_leak_no_slot() {
        random_operations(false).await;
    }

    #[tokio::test(start_paused = true)]
    async fn random_operations_with_the_limiter_keep_the_books_and_leak_no_slot() {
        random_operations(true).await;
    }

    async fn random_operations(limiter: bool) {
        const SLOTS: usize = 6;
        const FNS: usize = 5;
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let mut s = Scheduler::new(SLOTS)
            .with_max_batch(4)
            .with_limiter(limiter);
        let mut running: Vec<FnId> = Vec::new();
        // What actually happened, so a quiet run (everything refused) cannot pass.
        #[derive(Debug, Default)]
        struct Seen {
            requests: usize,
            slots: usize,
            unexpected: usize,
            ended: usize,
            released: usize,
            forgotten: usize,
            refused: usize,
            resets: usize,
        }
        let mut seen = Seen::default();
        for step in 0..5000 {
            let f = rng.usize(..FNS);
            match rng.usize(..13) {
                0 => s.set_depth(f, rng.u64(0..12)),
                1 => s.set_ready(f, rng.u8(..4) > 0),
                2 => s.set_cap(f, [None, Some(0), Some(1), Some(3)][rng.usize(..4)]),
                3 | 4 => {
                    for (f, n) in s.assign(Instant::now()) {
                        assert!((1..=4).contains(&n), "step {step}: batch {n}");
                        assert!(s.has_request(f));
                        seen.requests += 1;
                    }
                }
                5 | 6 => match s.delivered(f) {
                    Delivery::Slot { .. } => {
                        running.push(f);
                        seen.slots += 1;
                    }
                    Delivery::Unexpected => seen.unexpected += 1,
                },
                7 => {
                    seen.ended += usize::from(s.has_request(f));
                    s.request_ended(f, Instant::now());
                }
                8 | 9 if !running.is_empty() => {
                    let f = running.swap_remove(rng.usize(..running.len()));
                    let signal =
                        [Signal::Success, Signal::Rejected, Signal::Neutral][rng.usize(..3)];
                    s.observe(f, signal, Instant::now());
                    s.check();
                    s.release(f);
                    seen.released += 1;
                }
                10 if s.running(f) == 0 => s.release(f), // misuse: nothing to release
                11 => {
                    let idle = s.is_idle(f);
                    assert_eq!(s.forget(f), idle, "step {step}");
                    if idle {
                        seen.forgotten += 1;
                    } else {
                        seen.refused += 1;
                    }
                }
                12 if rng.u8(..20) == 0 => {
                    s.reset_requests();
                    seen.resets += 1;
                }
                _ => tokio::time::advance(ms(rng.u64(1..300))).await,
            }
            s.check();
            for g in 0..FNS {
                let r = running.iter().filter(|&&x| x == g).count();
                assert_eq!(s.running(g), r, "step {step}: f{g} running");
            }
        }
        let Seen {
            requests,
            slots,
            unexpected,
            ended,
            released,
            forgotten,
            refused,
            resets,
        } = seen;
        assert!(
            [requests, slots, unexpected, ended, released, forgotten, refused]
                .iter()
                .all(|&n| n >= 50)
                && resets >= 5,
            "{seen:?}"
        );
        s.reset_requests();
        for f in running.drain(..) {
            s.release(f);
        }
        s.check();
        assert_eq!(s.free(), SLOTS, "every slot is back");
        assert!((0..FNS).all(|f| s.is_idle(f) && s.forget(f)));
    }

    #[tokio::test(start_paused = true)]
    async fn five_thousand_functions_share_fifty_slots() {
        const FNS: usize = 5_000;
        let mut s = Scheduler::new(50).with_max_batch(10);
        for f in 0..FNS {
            s.set_ready(f, true);
            s.set_cap(f, if f % 3 == 0 { None } else { Some(4) });
            s.set_depth(f, 1_000);
        }
        let mut running = VecDeque::new();
        let mut starts = vec![0u32; FNS];
        for cycle in 0..100_000 {
            for (f, n) in s.assign(Instant::now()) {
                for _ in 0..n {
                    assert!(matches!(s.delivered(f), Delivery::Slot { .. }));
                    running.push_back(f);
                    starts[f] += 1;
                }
            }
            if cycle % 1000 == 999 {
                // Discovery finds a few functions empty now and then.
                s.set_depth(cycle % FNS, 0);
                s.set_depth((cycle + 1) % FNS, 1_000);
            }
            if let Some(f) = running.pop_front() {
                s.release(f);
            }
        }
        s.check();
        assert!(starts.iter().sum::<u32>() >= 100_000);
    }
}
