//! The slot: the right to run one message, held from delivery until the message is settled
//! (and its callback has a place in the callback budget). One type for both modes, so the
//! flow (`flow.rs`) never knows which mode pulled its message:
//!
//! - static mode: a permit of the replica's slot semaphore (`max_inflight`, plus the
//!   prefetch), which the static pull loop (`pull.rs`) hands out;
//! - function mode: one of the fair scheduler's slots (`schedule.rs`), which knows its
//!   function and gives itself back to the scheduler when dropped, waking the function-mode
//!   pull loop (`functions.rs`) so the freed slot goes to the next function in turn.
//!
//! Because the release is `Drop`, no path through the flow (a panic included) can leak a
//! slot.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit};

use crate::worker::limiter::Signal;
use crate::worker::schedule::{FnId, Observed, Scheduler};

/// The right to run one message.
pub struct Slot(Held);

enum Held {
    /// Held for its drop, which gives the permit back.
    Permit { _permit: OwnedSemaphorePermit },
    Function {
        function: FnId,
        pool: Arc<Pool>,
        /// Whether the function's messages may set its cap (not for the legacy subject,
        /// which every function of older gateways shares).
        caps: bool,
    },
}

impl Slot {
    /// A static-mode slot.
    pub fn permit(permit: OwnedSemaphorePermit) -> Slot {
        Slot(Held::Permit { _permit: permit })
    }

    /// A function-mode slot: the scheduler has already counted it as running for `function`
    /// ([`Scheduler::delivered`]).
    pub fn function(pool: Arc<Pool>, function: FnId, caps: bool) -> Slot {
        Slot(Held::Function {
            function,
            pool,
            caps,
        })
    }

    /// The function's own cap (`com.openfaas.queue.max_inflight`, read from its message):
    /// function mode hands the function at most that many slots from now on. Static mode
    /// has one queue for every function and ignores it.
    pub fn learn_cap(&self, cap: Option<usize>) {
        if let Held::Function {
            function,
            pool,
            caps: true,
        } = &self.0
        {
            let changed = {
                let mut sched = pool.lock();
                let before = sched.cap(*function);
                sched.set_cap(*function, cap);
                before != Some(cap)
            };
            if changed {
                pool.wake.notify_one();
            }
        }
    }

    /// The call this slot ran ended with `signal`: function mode's adaptive limit learns
    /// from it (while the slot still counts as running). `None` in static mode, for the
    /// legacy subject, or with the limiter off. A raised limit wakes the pull loop.
    pub fn report(&self, signal: Signal) -> Option<Observed> {
        let Held::Function { function, pool, .. } = &self.0 else {
            return None;
        };
        let observed = pool
            .lock()
            .observe(*function, signal, tokio::time::Instant::now())?;
        if observed.change.grew {
            pool.wake.notify_one();
        }
        Some(observed)
    }
}

/// How long after its start time a handed-back message is pulled in function mode: the
/// server's redelivery timer starts when the NAK reaches it and fires about a millisecond
/// late, so a pull at the very start time would often find nothing yet.
const DUE_SLACK: Duration = Duration::from_millis(20);

impl Slot {
    /// The message was handed back (NAK) to be redelivered `wait` from now, its start time;
    /// the slot goes back. Function mode pulls the function again then (plus
    /// [`DUE_SLACK`]) rather than after its empty-pull backoff, which may have grown to 5 s
    /// while the message was invisible ([`Scheduler::due`]). Static mode's pull requests
    /// wait on the server, which delivers the message to them when it is due.
    pub fn defer(self, wait: Duration) {
        if let Held::Function { function, pool, .. } = &self.0 {
            if let Some(at) = tokio::time::Instant::now().checked_add(wait + DUE_SLACK) {
                pool.lock().due(*function, at);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Held::Function { function, pool, .. } = &self.0 {
            pool.lock().release(*function);
            pool.wake.notify_one();
        }
    }
}

/// The function-mode scheduler, shared by the pull loop and the slots it hands out.
pub struct Pool {
    sched: Mutex<Scheduler>,
    /// Notified whenever a slot comes back or a cap changes: the pull loop may have
    /// something to ask for.
    pub wake: Notify,
}

impl Pool {
    pub fn new(sched: Scheduler) -> Arc<Pool> {
        Arc::new(Pool {
            sched: Mutex::new(sched),
            wake: Notify::new(),
        })
    }

    /// The scheduler. Held only for pure, short bookkeeping: never across an await.
    pub fn lock(&self) -> MutexGuard<'_, Scheduler> {
        // The scheduler's bookkeeping cannot be left half-done by a panic elsewhere.
        self.sched.lock().unwrap_or_else(|e| e.into_inner())
    }
}
