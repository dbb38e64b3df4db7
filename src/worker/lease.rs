//! Keeping a message's lease while something else runs (a call, a wait for a slot, a
//! dead-letter store): an in-progress ack (`+WPI`) every `progress_interval`.
//!
//! A renewal is a publish through the NATS client, which waits when the client's outgoing
//! queue is full. It must never be awaited in place of the work or of the caller's
//! cancellation (the drain deadline, a stop): [`with_lease`] polls the renewal alongside the
//! work instead, so a stalled renewal delays nothing but the next renewal.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use tokio::time::{interval_at, Instant, MissedTickBehavior};

/// Runs `work` to completion, calling `renew` every `every`: the first renewal one interval
/// from now, later ones an interval apart (ticks missed while the task was busy are not made
/// up in a burst). The renewal's future is polled in its own arm next to `work`, never
/// awaited instead of it, and at most one is in flight: a tick that comes while the last
/// renewal is still pending is skipped (that renewal, once sent, renews the lease anyway).
///
/// Callers `select!` the returned future against their cancellation; it is always ready to
/// be dropped.
pub async fn with_lease<T, R, F>(every: Duration, mut renew: R, work: impl Future<Output = T>) -> T
where
    R: FnMut() -> F,
    F: Future<Output = ()>,
{
    let mut work = pin!(work);
    let mut tick = interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut in_flight = pin!(None::<F>);
    loop {
        tokio::select! {
            biased;
            out = &mut work => return out,
            () = async { in_flight.as_mut().as_pin_mut().expect("guarded by is_some").await },
                if in_flight.is_some() => in_flight.set(None),
            _ = tick.tick() => {
                if in_flight.is_none() {
                    in_flight.set(Some(renew()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;

    const EVERY: Duration = Duration::from_secs(10);

    /// A renewal that records when it started (seconds since `start`) and then takes `takes`
    /// (`None`: never completes, as a publish into a NATS client whose queue stays full).
    fn recorder(
        start: Instant,
        takes: Option<Duration>,
    ) -> (
        Rc<RefCell<Vec<u64>>>,
        impl FnMut() -> futures_util::future::BoxFuture<'static, ()>,
    ) {
        let log = Rc::new(RefCell::new(Vec::new()));
        let seen = log.clone();
        let renew = move || {
            seen.borrow_mut().push(start.elapsed().as_secs());
            let fut: futures_util::future::BoxFuture<'static, ()> = match takes {
                Some(d) => Box::pin(tokio::time::sleep(d)),
                None => Box::pin(std::future::pending()),
            };
            fut
        };
        (log, renew)
    }

    /// Work that takes 35 s, under a 10 s interval.
    async fn work() -> &'static str {
        tokio::time::sleep(Duration::from_secs(35)).await;
        "done"
    }

    #[tokio::test(start_paused = true)]
    async fn renews_every_interval_starting_one_interval_from_now() {
        let start = Instant::now();
        let (log, renew) = recorder(start, Some(Duration::from_millis(5)));
        assert_eq!(with_lease(EVERY, renew, work()).await, "done");
        assert_eq!(start.elapsed(), Duration::from_secs(35));
        assert_eq!(*log.borrow(), vec![10, 20, 30]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_never_completes_holds_up_nothing() {
        let start = Instant::now();
        let (log, renew) = recorder(start, None);
        let out = tokio::time::timeout(Duration::from_secs(60), with_lease(EVERY, renew, work()))
            .await
            .expect("the work completes although its renewal never does");
        assert_eq!(out, "done");
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(35),
            "work finished late"
        );
        assert_eq!(
            *log.borrow(),
            vec![10],
            "a second renewal queued behind a stuck one"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_callers_deadline_fires_while_a_renewal_is_stuck() {
        let start = Instant::now();
        let (log, renew) = recorder(start, None);
        let forever = with_lease(EVERY, renew, std::future::pending::<()>());
        let deadline = tokio::time::sleep(Duration::from_secs(25));
        let fired = tokio::time::timeout(Duration::from_secs(60), async {
            tokio::select! {
                _ = forever => false,
                _ = deadline => true,
            }
        })
        .await;
        assert_eq!(fired, Ok(true), "the deadline did not fire");
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(25),
            "deadline fired late"
        );
        assert_eq!(*log.borrow(), vec![10]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_renewal_is_never_doubled_and_missed_ticks_are_not_made_up() {
        let start = Instant::now();
        // Each renewal takes 15 s: the tick at 20 s finds the one from 10 s still pending.
        let (log, renew) = recorder(start, Some(Duration::from_secs(15)));
        assert_eq!(with_lease(EVERY, renew, work()).await, "done");
        assert_eq!(start.elapsed(), Duration::from_secs(35));
        assert_eq!(*log.borrow(), vec![10, 30]);
    }
}
