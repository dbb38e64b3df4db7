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

use std::collections::HashMap;
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
        self.quiet.is_some_and(|q| q.stored != self.stale)
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

/// How long a subject's count must stand still before function mode asks its consumer
/// (stale messages do not move; a function's queue being worked on does).
pub const SUSPECT: Duration = CONFIRM;
/// How often a subject found stale is checked again (to see it rise; falling and clearing
/// follow the stream reads).
pub const RECHECK: Duration = Duration::from_secs(30);
/// The first and the longest wait before checking again a subject whose consumer was busy
/// (long calls, delayed retries): doubling in between, reset when the count moves.
pub const BUSY_BACKOFF: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(300));

/// The watches of every subject with messages, with when each is due for a consumer check.
#[derive(Debug, Default)]
pub struct Subjects {
    entries: HashMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    watch: Watch,
    /// The stream's count at the last read, and since when it has not moved.
    count: u64,
    still_since: Instant,
    next_check: Instant,
    backoff: Duration,
    /// When its consumer was last read: a check pairs only with a stream read made after.
    checked_at: Option<Instant>,
}

impl Subjects {
    /// A read of every subject's count (subjects with none absent). Returns what changed;
    /// subjects no longer listed are forgotten (cleared if they were stale).
    pub fn stored(&mut self, counts: &HashMap<String, u64>, now: Instant) -> Vec<(String, Change)> {
        let mut changes = Vec::new();
        self.entries.retain(|subject, e| {
            if counts.get(subject).is_some_and(|&n| n > 0) {
                return true;
            }
            if let Some(c) = e.watch.stored(0) {
                changes.push((subject.clone(), c));
            }
            false
        });
        for (subject, &n) in counts.iter().filter(|(_, &n)| n > 0) {
            let e = self.entries.entry(subject.clone()).or_insert(Entry {
                watch: Watch::default(),
                count: n,
                still_since: now,
                next_check: now,
                backoff: BUSY_BACKOFF.0,
                checked_at: None,
            });
            if e.count != n {
                e.count = n;
                e.still_since = now;
                e.backoff = BUSY_BACKOFF.0;
                e.next_check = e.next_check.min(now + SUSPECT);
            }
            if let Some(c) = e.watch.stored(n) {
                changes.push((subject.clone(), c));
            }
        }
        changes
    }

    /// A consumer read for `subject` at `now`, paired with `stored` (the subject's count
    /// from a stream read made after its previous consumer read); `None`: the consumer does
    /// not exist, nothing can be said.
    pub fn checked(
        &mut self,
        subject: &str,
        stored: u64,
        consumer: Option<Consumer>,
        now: Instant,
    ) -> Option<Change> {
        let e = self.entries.get_mut(subject)?;
        e.checked_at = Some(now);
        let Some(consumer) = consumer else {
            e.next_check = now + RECHECK;
            return None;
        };
        let change = e.watch.checked(stored, consumer, now);
        e.next_check = if e.watch.confirming() {
            now + CONFIRM
        } else if e.watch.stale() > 0 {
            now + RECHECK
        } else {
            let wait = e.backoff;
            e.backoff = (e.backoff * 2).min(BUSY_BACKOFF.1);
            now + wait
        };
        change
    }

    /// Static mode: one consumer serves every subject, so its read checks them all, each
    /// with its count from the last [`Subjects::stored`] (read after the previous consumer
    /// read, as the poller orders its reads).
    pub fn checked_all(&mut self, consumer: Consumer, now: Instant) -> Vec<(String, Change)> {
        let subjects: Vec<(String, u64)> = self
            .entries
            .iter()
            .map(|(s, e)| (s.clone(), e.count))
            .collect();
        subjects
            .into_iter()
            .filter_map(|(s, n)| {
                let c = self.checked(&s, n, Some(consumer), now)?;
                Some((s, c))
            })
            .collect()
    }

    /// Function mode: up to `max` subjects whose consumer is worth a read now, with their
    /// counts from the stream read started at `read_at`: a count that has stood still for
    /// [`SUSPECT`], due by its schedule, not checked since `read_at`. Longest waiting first.
    pub fn due(&self, read_at: Instant, now: Instant, max: usize) -> Vec<(String, u64)> {
        let mut due: Vec<(&String, &Entry)> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                now >= e.still_since + SUSPECT
                    && now >= e.next_check
                    && e.checked_at.is_none_or(|at| at < read_at)
            })
            .collect();
        due.sort_by_key(|(_, e)| e.next_check);
        due.into_iter()
            .take(max)
            .map(|(s, e)| (s.clone(), e.count))
            .collect()
    }

    /// Stale messages on `subject`.
    pub fn stale(&self, subject: &str) -> u64 {
        self.entries.get(subject).map_or(0, |e| e.watch.stale())
    }

    /// Every subject with stale messages, and how many.
    pub fn all_stale(&self) -> impl Iterator<Item = (&str, u64)> {
        self.entries
            .iter()
            .filter(|(_, e)| e.watch.stale() > 0)
            .map(|(s, e)| (s.as_str(), e.watch.stale()))
    }

    /// Stale messages over every subject.
    pub fn total(&self) -> u64 {
        self.all_stale().map(|(_, n)| n).sum()
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

    fn counts(pairs: &[(&str, u64)]) -> HashMap<String, u64> {
        pairs.iter().map(|(s, n)| (s.to_string(), *n)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn function_mode_asks_only_about_still_counts_and_backs_off_from_busy_ones() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut subjects = Subjects::default();
        subjects.stored(&counts(&[("q.a", 300), ("q.b", 7)]), at(0));
        assert!(
            subjects.due(at(0), at(0), 16).is_empty(),
            "counts not yet still"
        );
        subjects.stored(&counts(&[("q.a", 300), ("q.b", 8)]), at(4));
        subjects.stored(&counts(&[("q.a", 300), ("q.b", 9)]), at(5));
        assert_eq!(
            subjects.due(at(5), at(5), 16),
            [("q.a".to_string(), 300)],
            "only the count that stood still for SUSPECT"
        );
        assert_eq!(subjects.due(at(5), at(5), 0), [], "at most max");

        // a: quiet → asked again after CONFIRM, with a stream read made after this check.
        let quiet = Consumer {
            owed: 0,
            delivered: 300,
        };
        assert_eq!(subjects.checked("q.a", 300, Some(quiet), at(5)), None);
        let has_a = |due: Vec<(String, u64)>| due.iter().any(|(s, _)| s == "q.a");
        assert!(
            !has_a(subjects.due(at(5), at(10), 16)),
            "no read since the check"
        );
        assert!(!has_a(subjects.due(at(6), at(9), 16)), "not before CONFIRM");
        assert!(has_a(subjects.due(at(6), at(10), 16)));
        assert_eq!(
            subjects.checked("q.a", 300, Some(quiet), at(10)),
            Some(Change::Appeared(300))
        );
        assert_eq!((subjects.stale("q.a"), subjects.total()), (300, 300));
        assert!(
            !has_a(subjects.due(at(11), at(39), 16)),
            "rechecked after RECHECK"
        );

        // b stands still from 5 s, but its consumer is busy (long calls): 10 s, then 20 s.
        let busy = Consumer {
            owed: 9,
            delivered: 9,
        };
        assert_eq!(subjects.due(at(10), at(10), 16), [("q.b".to_string(), 9)]);
        subjects.checked("q.b", 9, Some(busy), at(10));
        assert!(subjects.due(at(19), at(19), 16).is_empty());
        assert_eq!(subjects.due(at(20), at(20), 16), [("q.b".to_string(), 9)]);
        subjects.checked("q.b", 9, Some(busy), at(20));
        assert!(subjects
            .due(at(39), at(39), 16)
            .iter()
            .all(|(s, _)| s != "q.b"));
        assert!(subjects
            .due(at(40), at(40), 16)
            .iter()
            .any(|(s, _)| s == "q.b"));

        // The stream no longer lists a: cleared and forgotten.
        let changes = subjects.stored(&counts(&[("q.b", 9)]), at(41));
        assert_eq!(changes, [("q.a".to_string(), Change::Cleared)]);
        assert_eq!(subjects.total(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn static_mode_checks_every_subject_with_the_one_consumer() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut subjects = Subjects::default();
        let quiet = Consumer {
            owed: 0,
            delivered: 500,
        };
        for s in [0, 5] {
            subjects.stored(&counts(&[("q.a", 3), ("q.b", 2)]), at(s));
            subjects.checked_all(quiet, at(s + 1));
        }
        assert_eq!(subjects.total(), 5);
        let mut stale: Vec<_> = subjects.all_stale().collect();
        stale.sort();
        assert_eq!(stale, [("q.a", 3), ("q.b", 2)]);
        // New work on b: the consumer owes it; the stale figures stay as they were.
        subjects.stored(&counts(&[("q.a", 3), ("q.b", 4)]), at(7));
        subjects.checked_all(
            Consumer {
                owed: 2,
                delivered: 502,
            },
            at(8),
        );
        assert_eq!((subjects.stale("q.a"), subjects.stale("q.b")), (3, 2));
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
