//! Stale messages: messages a WorkQueue stream still counts although the consumer that
//! serves them already ran and acknowledged them. Pure: no I/O, no NATS, no clock of its
//! own (the caller passes `now`).
//!
//! nats-server 2.9 sometimes keeps such messages after a stream leader restarts and is
//! re-elected; the same state follows a file store whose message blocks were restored from
//! an older copy (checked on 2.9.10 and 2.15.1: neither repairs it at start-up). The consumer
//! owes nothing (it will never deliver them again, since its delivered sequence is past them)
//! while the stream's count says hundreds are queued, so a pending gauge made from the
//! stream's count reports work that does not exist, and the autoscaler scales for it.
//!
//! **Detection.** A subject's messages are stale when its consumer owes nothing (no message
//! pending, none delivered and unacknowledged, which includes those waiting for a delayed
//! retry) while the stream counts messages on it. One look can be fooled by the two reads
//! not being atomic: a message acknowledged between the stream read and the consumer read is
//! counted by one and not owed by the other. So it takes two *quiet* checks (the consumer
//! owing nothing) at least [`CONFIRM`] apart, with the stream's count and the consumer's
//! delivered sequence unchanged between them, each stream read made after the previous
//! consumer read (the callers' order). Then nothing was delivered between the two consumer
//! reads, so nothing could be acknowledged either, and every message the stream counted in
//! between is one the consumer had finished before: stale. (Stale messages do not move;
//! real work does.)
//!
//! **While the function has work** (the consumer owes something) the stale messages cannot
//! be told from the real ones, so the figure is only kept within what the stream holds
//! (never more stale than stored); it is confirmed again, and may rise, once the function is
//! quiet. A stream count of zero clears it at once.

use std::time::Duration;

use tokio::time::Instant;

/// How long two quiet checks must be apart, with nothing moved, before messages are called
/// stale: longer than a consumer's ack reaches the stream on a cluster (milliseconds), short
/// enough that the autoscaler stops scaling for them within a few polls.
pub const CONFIRM: Duration = Duration::from_secs(5);

/// What a consumer read says, as the decision needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consumer {
    /// Not yet delivered plus delivered and unacknowledged (`num_pending + num_ack_pending`).
    pub owed: u64,
    /// The last stream sequence it delivered (`delivered.stream_seq`): moves with any delivery.
    pub delivered: u64,
}

/// What an observation changed in the figure, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Stale messages found where there were none: `n` of them.
    Appeared(u64),
    /// Still stale, now `n`.
    Changed(u64),
    /// None left.
    Cleared,
}

/// A quiet check waiting for its confirmation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Quiet {
    stored: u64,
    delivered: u64,
    since: Instant,
}

/// The stale-message figure of one consumer's subjects (a function's subject in function
/// mode, one subject of the shared consumer in static mode).
#[derive(Debug, Default, Clone)]
pub struct Watch {
    quiet: Option<Quiet>,
    stale: u64,
}

impl Watch {
    /// Messages the stream counts that the consumer does not owe, as far as confirmed.
    pub fn stale(&self) -> u64 {
        self.stale
    }

    /// Whether a quiet check waits for its confirmation (the caller checks again after
    /// [`CONFIRM`]).
    pub fn confirming(&self) -> bool {
        self.quiet.is_some()
    }

    /// A stream read alone: the stream counts `stored` messages. Stale messages are among
    /// them, so the figure falls to it; zero clears it.
    pub fn stored(&mut self, stored: u64) -> Option<Change> {
        if stored == 0 {
            self.quiet = None;
        }
        self.set(self.stale.min(stored))
    }

    /// A consumer read, with `stored` from a stream read made after the previous consumer
    /// read and before this one.
    pub fn checked(&mut self, stored: u64, consumer: Consumer, now: Instant) -> Option<Change> {
        if stored == 0 || consumer.owed > 0 {
            self.quiet = None;
            return self.stored(stored);
        }
        match self.quiet {
            Some(q) if q.stored == stored && q.delivered == consumer.delivered => {
                if now >= q.since + CONFIRM {
                    return self.set(stored);
                }
            }
            _ => {
                self.quiet = Some(Quiet {
                    stored,
                    delivered: consumer.delivered,
                    since: now,
                });
            }
        }
        self.stored(stored)
    }

    fn set(&mut self, n: u64) -> Option<Change> {
        let before = std::mem::replace(&mut self.stale, n);
        match (before, n) {
            (0, 0) => None,
            (0, n) => Some(Change::Appeared(n)),
            (_, 0) => Some(Change::Cleared),
            (b, n) if b != n => Some(Change::Changed(n)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one step feeds the watch.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// A stream read alone.
        Stored(u64),
        /// A check: stream count, consumer owes, consumer's delivered sequence.
        Checked(u64, u64, u64),
    }
    use Step::*;

    /// Runs `steps` one second apart; returns (stale, change) after each.
    fn run(steps: &[Step]) -> Vec<(u64, Option<Change>)> {
        let t0 = Instant::now();
        let mut w = Watch::default();
        steps
            .iter()
            .enumerate()
            .map(|(i, step)| {
                let now = t0 + Duration::from_secs(i as u64);
                let change = match *step {
                    Stored(n) => w.stored(n),
                    Checked(stored, owed, delivered) => {
                        w.checked(stored, Consumer { owed, delivered }, now)
                    }
                };
                (w.stale(), change)
            })
            .collect()
    }

    fn last(steps: &[Step]) -> (u64, Option<Change>) {
        *run(steps).last().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn stale_only_when_two_quiet_checks_agree_across_the_confirmation_time() {
        let quiet = |_| Checked(300, 0, 1000);
        // (steps, expected stale after the last one, the change it reported)
        let cases: Vec<(&str, Vec<Step>, u64, Option<Change>)> = vec![
            ("one quiet check proves nothing", vec![quiet(0)], 0, None),
            (
                "quiet for less than CONFIRM",
                (0..5).map(quiet).collect(),
                0,
                None,
            ),
            (
                "quiet and unchanged for CONFIRM: stale",
                (0..6).map(quiet).collect(),
                300,
                Some(Change::Appeared(300)),
            ),
            (
                "a delivery in between starts the confirmation again",
                vec![
                    Checked(300, 0, 1000),
                    Checked(300, 0, 1000),
                    Checked(300, 0, 1000),
                    Checked(300, 0, 1001),
                    Checked(300, 0, 1001),
                    Checked(300, 0, 1001),
                ],
                0,
                None,
            ),
            (
                "a count that moves is not stale (an ack between the reads, each time)",
                (0..10).map(|i| Checked(300 - i, 0, 1000)).collect(),
                0,
                None,
            ),
            (
                "the consumer owes something: busy, not stale",
                (0..10).map(|_| Checked(300, 300, 1000)).collect(),
                0,
                None,
            ),
            (
                "work in between restarts the confirmation",
                vec![
                    quiet(0),
                    quiet(0),
                    quiet(0),
                    quiet(0),
                    Checked(301, 1, 1000),
                    quiet(0),
                    quiet(0),
                ],
                0,
                None,
            ),
            (
                "an empty stream is never stale",
                (0..10).map(|_| Checked(0, 0, 1000)).collect(),
                0,
                None,
            ),
        ];
        for (what, steps, stale, change) in cases {
            assert_eq!(last(&steps), (stale, change), "{what}: {steps:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn once_stale_the_figure_falls_with_the_stream_and_rises_only_when_confirmed() {
        let stale: Vec<Step> = (0..6).map(|_| Checked(300, 0, 1000)).collect();
        let with = |more: Vec<Step>| stale.iter().copied().chain(more).collect::<Vec<_>>();
        let cases: Vec<(&str, Vec<Step>, u64, Option<Change>)> = vec![
            (
                "new work on top: still 300 stale while it runs",
                with(vec![Stored(310), Checked(310, 10, 1000), Stored(305)]),
                300,
                None,
            ),
            (
                "some deleted by hand: the figure follows the stream",
                with(vec![Stored(120)]),
                120,
                Some(Change::Changed(120)),
            ),
            (
                "all gone: cleared",
                with(vec![Stored(0)]),
                0,
                Some(Change::Cleared),
            ),
            (
                "cleared by a check too",
                with(vec![Checked(0, 0, 1000)]),
                0,
                Some(Change::Cleared),
            ),
            (
                "busy with fewer stored than the figure: at most what is stored",
                with(vec![Checked(50, 50, 1200)]),
                50,
                Some(Change::Changed(50)),
            ),
            (
                "quiet again with more stored: raised only after CONFIRM",
                with(vec![
                    Checked(400, 0, 1000),
                    Checked(400, 0, 1000),
                    Checked(400, 0, 1000),
                    Checked(400, 0, 1000),
                    Checked(400, 0, 1000),
                ]),
                300,
                None,
            ),
            (
                "... and then raised",
                with(vec![
                    Checked(400, 0, 1000),
                    Checked(400, 0, 1000),
                    Checked(400, 0, 1000),
                    Checked(400, 0, 1000),
                    Checked(400, 0, 1000),
                    Checked(400, 0, 1000),
                ]),
                400,
                Some(Change::Changed(400)),
            ),
        ];
        for (what, steps, stale, change) in cases {
            assert_eq!(last(&steps), (stale, change), "{what}: {steps:?}");
        }
        // One appearance, reported once: the steady state is quiet.
        let changes: Vec<_> = run(&with((0..20).map(|_| Checked(300, 0, 1000)).collect()))
            .into_iter()
            .filter_map(|(_, c)| c)
            .collect();
        assert_eq!(changes, [Change::Appeared(300)]);
    }

    #[test]
    fn the_decision_does_no_io() {
        let source = include_str!("stale.rs");
        let code = source.split("#[cfg(test)]").next().unwrap();
        for forbidden in [
            "async_nats",
            "hyper",
            "reqwest",
            "crate::nats",
            "tokio::net",
        ] {
            assert!(!code.contains(forbidden), "stale.rs uses {forbidden}");
        }
    }
}
