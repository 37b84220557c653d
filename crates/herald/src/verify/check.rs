//! The checker: a pure function from a recorded history ([`super::history`]) to a [`Report`].
//! No I/O, no clock: the same history always gives the same report, so a run can be re-checked
//! offline and the checker itself is tested with hand-made histories.
//!
//! # The checks (issue #4)
//! Per subscriber and channel, in the order the subscription delivered:
//! - **duplicates**: a serial (or message id) delivered twice. Must be 0 for every guarantee.
//! - **order**: a serial lower than one already accounted for.
//! - **silent gaps**: a jump to a serial after the next expected one that no `gap`, `skip` or
//!   `continuity_lost` notice accounts for, a notice that starts after the next expected serial,
//!   a message of another epoch without `continuity_lost`, or a break the SDK caught and withheld
//!   (`prev`, `hole`, `epoch`).
//! - **resume** (exactly-once): after a resume (any `subscribed` but the first), the first
//!   delivery is last + 1 unless a notice came first; a `continuity: held` resume whose `after`
//!   is not the last position accounted for also counts.
//! - **unexpected**: a delivered message id that was never published on that channel in this
//!   run, or a break of the chain the SDK caught (`chain`, `malformed`).
//! - **lost** (after the final drain): an acknowledged message after the subscriber's start that
//!   it neither received nor had accounted for by a notice. For at-most-once subscribers a
//!   `gap` or a re-subscription (`subscribed` with a later `after`: live from there) accounts
//!   for drops; for exactly-once only `continuity_lost` and `skip` do. Serials already counted
//!   as a silent gap or a bad resume are not counted again as lost.
//!
//! Across the run:
//! - **idempotency**: one id on one channel maps to one position, over every ack and every
//!   delivery.
//!
//! # Invariants
//! - Each violation is counted once, under one check, in the row of the subscriber (or of the
//!   publisher's surface for idempotency) it concerns.
//! - [`Report::violations`] lists at most [`VIOLATIONS_LISTED_MAX`] violations per check; the
//!   counts are always complete.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::history::{Line, Record};

/// Violations listed per check (all are counted).
pub const VIOLATIONS_LISTED_MAX: usize = 20;

/// One of the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    Lost,
    Duplicates,
    Order,
    SilentGaps,
    Unexpected,
    Idempotency,
    Resume,
}

impl Check {
    pub const ALL: [Check; 7] = [
        Check::Lost,
        Check::Duplicates,
        Check::Order,
        Check::SilentGaps,
        Check::Unexpected,
        Check::Idempotency,
        Check::Resume,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Check::Lost => "lost",
            Check::Duplicates => "duplicates",
            Check::Order => "order",
            Check::SilentGaps => "silent_gaps",
            Check::Unexpected => "unexpected",
            Check::Idempotency => "idempotency",
            Check::Resume => "resume",
        }
    }
}

/// Violation counts, one per check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub lost: u64,
    pub duplicates: u64,
    pub order: u64,
    pub silent_gaps: u64,
    pub unexpected: u64,
    pub idempotency: u64,
    pub resume: u64,
}

impl Counts {
    fn bump(&mut self, check: Check) {
        *self.get_mut(check) += 1;
    }

    fn get_mut(&mut self, check: Check) -> &mut u64 {
        match check {
            Check::Lost => &mut self.lost,
            Check::Duplicates => &mut self.duplicates,
            Check::Order => &mut self.order,
            Check::SilentGaps => &mut self.silent_gaps,
            Check::Unexpected => &mut self.unexpected,
            Check::Idempotency => &mut self.idempotency,
            Check::Resume => &mut self.resume,
        }
    }

    pub fn get(&self, check: Check) -> u64 {
        match check {
            Check::Lost => self.lost,
            Check::Duplicates => self.duplicates,
            Check::Order => self.order,
            Check::SilentGaps => self.silent_gaps,
            Check::Unexpected => self.unexpected,
            Check::Idempotency => self.idempotency,
            Check::Resume => self.resume,
        }
    }

    pub fn total(&self) -> u64 {
        Check::ALL.iter().map(|check| self.get(*check)).sum()
    }
}

/// One row of the table: a guarantee over a surface (or `publish` over a surface).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Row {
    /// `exactly-once`, `at-most-once` or `publish`.
    pub guarantee: String,
    /// `ws`, `sse` or `http`.
    pub surface: String,
    /// Subscribers (publishers, for a `publish` row).
    pub subscribers: u64,
    /// Deliveries checked (acks, for a `publish` row).
    pub messages_checked: u64,
    /// Serials explicitly reported missed (`continuity_lost`, `gap`, re-subscription): allowed.
    pub reported_missed: u64,
    #[serde(flatten)]
    pub violations: Counts,
}

/// One violation, with the history line (1-based) that shows it when there is one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub check: Check,
    pub subscriber: Option<String>,
    pub channel: String,
    pub line: Option<usize>,
    pub detail: String,
}

/// What the checker found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    pub totals: Counts,
    pub violations: Vec<Violation>,
    pub messages_checked: u64,
    pub acks: u64,
    pub faults: u64,
    pub kills: u64,
    pub reconnects: u64,
    pub subscription_errors: u64,
    /// `None` when the history has no `drain` line (a run cut short).
    pub drain_complete: Option<bool>,
}

impl Report {
    pub fn violation_count(&self) -> u64 {
        self.totals.total()
    }
}

/// A position as recorded: `EPOCH:SERIAL`.
fn parse_position(text: &str) -> Option<(String, u64)> {
    let (epoch, serial) = text.rsplit_once(':')?;
    Some((epoch.to_owned(), serial.parse().ok()?))
}

/// Inclusive serial ranges per epoch. The ranges of one stream are disjoint (each starts after
/// the last serial accounted for, which only grows within an epoch), so the one that may hold a
/// serial is the last starting at or before it.
#[derive(Default)]
struct Ranges {
    /// (epoch, from) -> to.
    starts: BTreeMap<(String, u64), u64>,
}

impl Ranges {
    fn insert(&mut self, epoch: &str, from: u64, to: u64) {
        if from <= to {
            let end = self.starts.entry((epoch.to_owned(), from)).or_insert(to);
            *end = (*end).max(to);
        }
    }

    fn contains(&self, epoch: &str, serial: u64) -> bool {
        self.starts
            .range(..=(epoch.to_owned(), serial))
            .next_back()
            .is_some_and(|((start_epoch, _), to)| start_epoch == epoch && serial <= *to)
    }
}

/// The checker's view of one subscriber on one channel.
#[derive(Default)]
struct Stream {
    subscribed: bool,
    /// Where the subscription started: nothing at or before it is owed.
    start: Option<(Option<String>, u64)>,
    epoch: Option<String>,
    /// The last serial accounted for (delivered or covered by a notice) in `epoch`.
    last: u64,
    resume_pending: bool,
    delivered: BTreeSet<(String, u64)>,
    delivered_ids: BTreeSet<String>,
    /// Ranges a notice (or an at-most-once re-subscription) accounted for.
    reported: Ranges,
    /// Ranges already counted as a silent gap or a bad resume.
    silent: Ranges,
}

struct Subscriber {
    guarantee: String,
    surface: String,
}

#[derive(Default)]
struct Checker {
    report: Report,
    rows: BTreeMap<(String, String), Row>,
    listed: BTreeMap<Check, usize>,
    subscribers: BTreeMap<String, Subscriber>,
    publishers: BTreeMap<(String, String), ()>,
    /// (channel, id) -> surface of the first publish.
    published: BTreeMap<(String, String), String>,
    /// (channel, id) -> first acknowledged position, and the line of that ack.
    acked: BTreeMap<(String, String), (String, u64, usize)>,
    /// (channel, id) -> every position seen for it, with the first line showing each.
    positions: BTreeMap<(String, String), BTreeMap<(String, u64), usize>>,
    streams: BTreeMap<(String, String), Stream>,
}

/// Checks a history. Pure: see the module docs for what is checked.
pub fn check(lines: &[Line]) -> Report {
    let mut checker = Checker::default();
    for (index, line) in lines.iter().enumerate() {
        checker.line(index + 1, &line.record);
    }
    checker.finish()
}

impl Checker {
    fn row(&mut self, guarantee: &str, surface: &str) -> &mut Row {
        self.rows
            .entry((guarantee.to_owned(), surface.to_owned()))
            .or_insert_with(|| Row {
                guarantee: guarantee.to_owned(),
                surface: surface.to_owned(),
                ..Row::default()
            })
    }

    fn subscriber_row(&mut self, subscriber: &str) -> &mut Row {
        let (guarantee, surface) = match self.subscribers.get(subscriber) {
            Some(known) => (known.guarantee.clone(), known.surface.clone()),
            None => ("undeclared".to_owned(), "?".to_owned()),
        };
        self.row(&guarantee, &surface)
    }

    fn guarantee(&self, subscriber: &str) -> &str {
        self.subscribers
            .get(subscriber)
            .map_or("undeclared", |known| known.guarantee.as_str())
    }

    fn violation(
        &mut self,
        check: Check,
        row: (String, String),
        subscriber: Option<&str>,
        channel: &str,
        line: Option<usize>,
        detail: String,
    ) {
        self.row(&row.0, &row.1).violations.bump(check);
        self.report.totals.bump(check);
        let listed = self.listed.entry(check).or_default();
        if *listed < VIOLATIONS_LISTED_MAX {
            *listed += 1;
            self.report.violations.push(Violation {
                check,
                subscriber: subscriber.map(str::to_owned),
                channel: channel.to_owned(),
                line,
                detail,
            });
        }
    }

    fn subscriber_violation(
        &mut self,
        check: Check,
        subscriber: &str,
        channel: &str,
        line: Option<usize>,
        detail: String,
    ) {
        let row = {
            let row = self.subscriber_row(subscriber);
            (row.guarantee.clone(), row.surface.clone())
        };
        self.violation(check, row, Some(subscriber), channel, line, detail);
    }

    fn stream(&mut self, subscriber: &str, channel: &str) -> &mut Stream {
        self.streams
            .entry((subscriber.to_owned(), channel.to_owned()))
            .or_default()
    }

    /// Notes that `id` on `channel` was seen at `epoch:serial`.
    fn position_seen(&mut self, channel: &str, id: &str, epoch: &str, serial: u64, line: usize) {
        let seen = self
            .positions
            .entry((channel.to_owned(), id.to_owned()))
            .or_default();
        seen.entry((epoch.to_owned(), serial)).or_insert(line);
    }

    fn line(&mut self, line: usize, record: &Record) {
        match record {
            Record::Run { .. } => {}
            Record::Subscriber {
                subscriber,
                guarantee,
                surface,
            } => {
                self.subscribers.insert(
                    subscriber.clone(),
                    Subscriber {
                        guarantee: guarantee.clone(),
                        surface: surface.clone(),
                    },
                );
                self.row(guarantee, surface).subscribers += 1;
            }
            Record::Publish {
                publisher,
                surface,
                channel,
                id,
                ..
            } => {
                self.published
                    .entry((channel.clone(), id.clone()))
                    .or_insert_with(|| surface.clone());
                if self
                    .publishers
                    .insert((publisher.clone(), surface.clone()), ())
                    .is_none()
                {
                    self.row("publish", surface).subscribers += 1;
                }
            }
            Record::Ack {
                channel,
                id,
                epoch,
                serial,
                ..
            } => {
                self.report.acks += 1;
                let surface = self
                    .published
                    .get(&(channel.clone(), id.clone()))
                    .cloned()
                    .unwrap_or_else(|| "?".to_owned());
                self.row("publish", &surface).messages_checked += 1;
                self.acked
                    .entry((channel.clone(), id.clone()))
                    .or_insert_with(|| (epoch.clone(), *serial, line));
                self.position_seen(channel, id, epoch, *serial, line);
            }
            Record::PublishFailed { .. } => {}
            Record::Subscribed {
                subscriber,
                channel,
                continuity,
                after,
                ..
            } => self.subscribed(line, subscriber, channel, continuity, after.as_deref()),
            Record::Delivery {
                subscriber,
                channel,
                id,
                epoch,
                serial,
            } => self.delivery(line, subscriber, channel, id, epoch, *serial),
            Record::Notice {
                subscriber,
                channel,
                notice,
                from,
                to,
                ..
            } => self.notice(line, subscriber, channel, notice, from, to.as_deref()),
            Record::Reconnect { .. } => self.report.reconnects += 1,
            Record::Broken {
                subscriber,
                channel,
                break_kind,
                detail,
            } => {
                let check = match break_kind.as_str() {
                    "prev" | "hole" | "epoch" => Check::SilentGaps,
                    _ => Check::Unexpected,
                };
                self.subscriber_violation(
                    check,
                    subscriber,
                    channel,
                    Some(line),
                    format!("the SDK caught a `{break_kind}` break: {detail}"),
                );
            }
            Record::SubscriptionError { .. } => self.report.subscription_errors += 1,
            Record::Fault { .. } => self.report.faults += 1,
            Record::Kill { .. } => self.report.kills += 1,
            Record::Restart { .. } => {}
            Record::Drain { complete, .. } => self.report.drain_complete = Some(*complete),
        }
    }

    fn subscribed(
        &mut self,
        line: usize,
        subscriber: &str,
        channel: &str,
        continuity: &str,
        after: Option<&str>,
    ) {
        let after = after.and_then(parse_position);
        let at_most_once = self.guarantee(subscriber) == "at-most-once";
        let stream = self.stream(subscriber, channel);
        if !stream.subscribed {
            stream.subscribed = true;
            match after {
                Some((epoch, serial)) => {
                    stream.start = Some((Some(epoch.clone()), serial));
                    stream.epoch = Some(epoch);
                    stream.last = serial;
                }
                None => stream.start = Some((None, 0)),
            }
            return;
        }
        if at_most_once {
            // Live only: a new subscription starts after `after`; what it skipped over is
            // explicitly not delivered (the SDK also reports it as a `gap`).
            if let Some((epoch, serial)) = after {
                if stream.epoch.as_deref() == Some(epoch.as_str()) {
                    if serial > stream.last {
                        stream.reported.insert(&epoch, stream.last + 1, serial);
                        stream.last = serial;
                    }
                } else {
                    stream.reported.insert(&epoch, 1, serial);
                    stream.epoch = Some(epoch);
                    stream.last = serial;
                }
            }
            return;
        }
        stream.resume_pending = true;
        if continuity == "held"
            && let Some((epoch, serial)) = after
        {
            let same = stream.epoch.as_deref() == Some(epoch.as_str()) && serial == stream.last;
            let last = format!("{}:{}", stream.epoch.as_deref().unwrap_or("-"), stream.last);
            if !same {
                self.subscriber_violation(
                    Check::Resume,
                    subscriber,
                    channel,
                    Some(line),
                    format!("resumed after {epoch}:{serial} but the last accounted was {last}"),
                );
            }
        }
    }

    fn delivery(
        &mut self,
        line: usize,
        subscriber: &str,
        channel: &str,
        id: &str,
        epoch: &str,
        serial: u64,
    ) {
        self.subscriber_row(subscriber).messages_checked += 1;
        self.report.messages_checked += 1;
        if !self
            .published
            .contains_key(&(channel.to_owned(), id.to_owned()))
        {
            self.subscriber_violation(
                Check::Unexpected,
                subscriber,
                channel,
                Some(line),
                format!("{id} at {epoch}:{serial} was never published on {channel}"),
            );
        }
        self.position_seen(channel, id, epoch, serial, line);
        let stream = self.stream(subscriber, channel);
        let key = (epoch.to_owned(), serial);
        if stream.delivered.contains(&key) || stream.delivered_ids.contains(id) {
            self.subscriber_violation(
                Check::Duplicates,
                subscriber,
                channel,
                Some(line),
                format!("{id} at {epoch}:{serial} delivered again"),
            );
            return;
        }
        stream.delivered.insert(key);
        stream.delivered_ids.insert(id.to_owned());
        let resume_pending = std::mem::take(&mut stream.resume_pending);
        match stream.epoch.clone() {
            None => {
                // Started on an empty channel: the first message must be serial 1.
                stream.epoch = Some(epoch.to_owned());
            }
            Some(held) if held != epoch => {
                let last = stream.last;
                stream.silent.insert(epoch, 1, serial - 1);
                stream.epoch = Some(epoch.to_owned());
                stream.last = serial;
                self.subscriber_violation(
                    Check::SilentGaps,
                    subscriber,
                    channel,
                    Some(line),
                    format!("{epoch}:{serial} arrived after {held}:{last} with no continuity_lost"),
                );
                return;
            }
            Some(_) => {}
        }
        let last = stream.last;
        if serial <= last {
            self.subscriber_violation(
                Check::Order,
                subscriber,
                channel,
                Some(line),
                format!("{epoch}:{serial} arrived after serial {last}"),
            );
            return;
        }
        stream.last = serial;
        if serial > last + 1 {
            stream.silent.insert(epoch, last + 1, serial - 1);
            let (check, what) = if resume_pending {
                (Check::Resume, "first delivery after a resume")
            } else {
                (Check::SilentGaps, "jump")
            };
            self.subscriber_violation(
                check,
                subscriber,
                channel,
                Some(line),
                format!(
                    "{what}: {epoch}:{serial} after serial {last}; serials {}..={} were never accounted for",
                    last + 1,
                    serial - 1
                ),
            );
        }
    }

    fn notice(
        &mut self,
        line: usize,
        subscriber: &str,
        channel: &str,
        notice: &str,
        from: &str,
        to: Option<&str>,
    ) {
        let from = parse_position(from);
        let to = to.and_then(parse_position);
        let stream = self.stream(subscriber, channel);
        stream.resume_pending = false;
        let (Some((from_epoch, from_serial)), Some((to_epoch, to_serial))) = (from, to) else {
            // `continuity_lost` without `to`: the channel has no message; nothing to account.
            return;
        };
        let same_epoch = stream.epoch.as_deref() == Some(to_epoch.as_str());
        if !same_epoch {
            // Only `continuity_lost` may change epochs; the rest of the old one is missed too.
            if let Some(old) = stream.epoch.clone() {
                stream.reported.insert(&old, stream.last + 1, u64::MAX);
            }
            stream.reported.insert(&to_epoch, 1, to_serial);
            let had_epoch = stream.epoch.is_some();
            stream.epoch = Some(to_epoch.clone());
            stream.last = to_serial;
            if notice != "continuity_lost" && had_epoch {
                self.subscriber_violation(
                    Check::SilentGaps,
                    subscriber,
                    channel,
                    Some(line),
                    format!("a `{notice}` moved to epoch {to_epoch} with no continuity_lost"),
                );
            }
            return;
        }
        let last = stream.last;
        if to_serial <= last {
            return; // overlaps what is accounted for already
        }
        let starts = if from_epoch == to_epoch {
            from_serial
        } else {
            1
        };
        stream
            .reported
            .insert(&to_epoch, starts.max(last + 1), to_serial);
        stream.last = to_serial;
        if starts > last + 1 {
            stream.silent.insert(&to_epoch, last + 1, starts - 1);
            self.subscriber_violation(
                Check::SilentGaps,
                subscriber,
                channel,
                Some(line),
                format!(
                    "a `{notice}` from serial {starts} after serial {last}: serials {}..={} were never accounted for",
                    last + 1,
                    starts - 1
                ),
            );
        }
    }

    fn finish(mut self) -> Report {
        // Idempotency: one position per id, over every ack and delivery.
        let positions = std::mem::take(&mut self.positions);
        for ((channel, id), seen) in &positions {
            if seen.len() > 1 {
                let surface = self
                    .published
                    .get(&(channel.clone(), id.clone()))
                    .cloned()
                    .unwrap_or_else(|| "?".to_owned());
                let listed: Vec<String> = seen
                    .iter()
                    .map(|((epoch, serial), line)| format!("{epoch}:{serial} (line {line})"))
                    .collect();
                let line = seen.values().copied().max();
                self.violation(
                    Check::Idempotency,
                    ("publish".to_owned(), surface),
                    None,
                    channel,
                    line,
                    format!("{id} is at {} positions: {}", seen.len(), listed.join(", ")),
                );
            }
        }
        // Lost: acknowledged, after the start, neither delivered nor accounted for.
        let acked = std::mem::take(&mut self.acked);
        let streams = std::mem::take(&mut self.streams);
        for ((subscriber, channel), stream) in &streams {
            let mut reported_missed = 0;
            let mut lost: Vec<(String, u64, String, usize)> = Vec::new();
            for ((acked_channel, id), (epoch, serial, line)) in
                acked.range((channel.clone(), String::new())..)
            {
                if acked_channel != channel {
                    break;
                }
                let before_start = match &stream.start {
                    Some((Some(start_epoch), start)) => start_epoch == epoch && serial <= start,
                    _ => false,
                };
                if before_start || stream.delivered.contains(&(epoch.clone(), *serial)) {
                    continue;
                }
                if stream.silent.contains(epoch, *serial) {
                    continue;
                }
                if stream.reported.contains(epoch, *serial) {
                    reported_missed += 1;
                    continue;
                }
                lost.push((epoch.clone(), *serial, id.clone(), *line));
            }
            self.subscriber_row(subscriber).reported_missed += reported_missed;
            let last = format!("{}:{}", stream.epoch.as_deref().unwrap_or("-"), stream.last);
            for (epoch, serial, id, line) in lost {
                self.subscriber_violation(
                    Check::Lost,
                    subscriber,
                    channel,
                    Some(line),
                    format!(
                        "{id} acknowledged at {epoch}:{serial}, never delivered (last accounted {last})"
                    ),
                );
            }
        }
        self.report.rows = self.rows.into_values().collect();
        self.report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: &str = "E1";

    /// A small history builder: one publisher, subscribers declared on demand.
    struct History {
        lines: Vec<Line>,
    }

    impl History {
        fn new() -> History {
            History { lines: Vec::new() }
        }

        fn push(&mut self, record: Record) -> &mut Self {
            let t_ms = self.lines.len() as u64;
            self.lines.push(Line { t_ms, record });
            self
        }

        fn subscriber(&mut self, name: &str, guarantee: &str, surface: &str) -> &mut Self {
            self.push(Record::Subscriber {
                subscriber: name.into(),
                guarantee: guarantee.into(),
                surface: surface.into(),
            })
        }

        fn subscribed(&mut self, name: &str, continuity: &str, after: Option<u64>) -> &mut Self {
            self.push(Record::Subscribed {
                subscriber: name.into(),
                channel: "c".into(),
                continuity: continuity.into(),
                after: after.map(|serial| format!("{E}:{serial}")),
                top: None,
            })
        }

        /// Publishes and acks ids m1..=mN at serials 1..=N.
        fn published(&mut self, count: u64) -> &mut Self {
            for serial in 1..=count {
                self.push(Record::Publish {
                    publisher: "p".into(),
                    surface: "ws".into(),
                    channel: "c".into(),
                    id: format!("m{serial}"),
                    attempt: 1,
                });
                self.ack(serial, serial);
            }
            self
        }

        fn ack(&mut self, id: u64, serial: u64) -> &mut Self {
            self.push(Record::Ack {
                publisher: "p".into(),
                channel: "c".into(),
                id: format!("m{id}"),
                epoch: E.into(),
                serial,
                duplicate: false,
            })
        }

        fn deliver(&mut self, name: &str, serials: impl IntoIterator<Item = u64>) -> &mut Self {
            for serial in serials {
                self.deliver_id(name, &format!("m{serial}"), serial);
            }
            self
        }

        fn deliver_id(&mut self, name: &str, id: &str, serial: u64) -> &mut Self {
            self.push(Record::Delivery {
                subscriber: name.into(),
                channel: "c".into(),
                id: id.into(),
                epoch: E.into(),
                serial,
            })
        }

        fn notice(&mut self, name: &str, notice: &str, from: u64, to: u64) -> &mut Self {
            self.push(Record::Notice {
                subscriber: name.into(),
                channel: "c".into(),
                notice: notice.into(),
                from: format!("{E}:{from}"),
                to: Some(format!("{E}:{to}")),
                reason: "test".into(),
            })
        }

        fn check(&self) -> Report {
            check(&self.lines)
        }
    }

    /// Asserts that the report has exactly `expected` violations of `check` and none other.
    fn only(report: &Report, check: Check, expected: u64) {
        for other in Check::ALL {
            let want = if other == check { expected } else { 0 };
            assert_eq!(
                report.totals.get(other),
                want,
                "{other:?}: {:#?}",
                report.violations
            );
        }
    }

    fn exactly_once() -> History {
        let mut history = History::new();
        history
            .subscriber("s", "exactly-once", "ws")
            .subscribed("s", "new", Some(0));
        history
    }

    #[test]
    fn a_clean_history_has_no_violation() {
        let mut history = exactly_once();
        history
            .subscriber("a", "at-most-once", "sse")
            .subscribed("a", "new", Some(0))
            .published(5)
            .deliver("s", 1..=2)
            .push(Record::Reconnect {
                subscriber: "s".into(),
            })
            .subscribed("s", "held", Some(2))
            .deliver("s", 3..=5)
            .deliver("a", 1..=1)
            .notice("a", "gap", 2, 3)
            .deliver("a", 4..=4)
            .subscribed("a", "new", Some(5));
        let report = history.check();
        assert_eq!(report.violation_count(), 0, "{:#?}", report.violations);
        assert_eq!(report.messages_checked, 7);
        let at_most_once = report
            .rows
            .iter()
            .find(|row| row.guarantee == "at-most-once")
            .unwrap();
        assert_eq!(
            at_most_once.reported_missed, 3,
            "2, 3 by the gap; 5 by the re-subscription"
        );
        assert_eq!(report.reconnects, 1);
    }

    #[test]
    fn an_acked_message_never_delivered_is_lost() {
        let mut history = exactly_once();
        history.published(4).deliver("s", 1..=3);
        let report = history.check();
        only(&report, Check::Lost, 1);
        assert!(
            report.violations[0].detail.contains("m4"),
            "{:?}",
            report.violations
        );
    }

    #[test]
    fn a_continuity_lost_range_is_reported_not_lost() {
        let mut history = exactly_once();
        history
            .published(5)
            .deliver("s", 1..=1)
            .notice("s", "continuity_lost", 2, 3)
            .deliver("s", 4..=5);
        let report = history.check();
        only(&report, Check::Lost, 0);
        assert_eq!(report.rows[0].reported_missed, 2);
    }

    #[test]
    fn a_serial_delivered_twice_is_a_duplicate() {
        let mut history = exactly_once();
        history.published(3).deliver("s", [1, 2, 2, 3]);
        only(&history.check(), Check::Duplicates, 1);
    }

    #[test]
    fn an_at_most_once_duplicate_is_a_violation_too() {
        let mut history = History::new();
        history
            .subscriber("a", "at-most-once", "ws")
            .subscribed("a", "new", Some(0))
            .published(2)
            .deliver("a", [1, 1, 2]);
        only(&history.check(), Check::Duplicates, 1);
    }

    #[test]
    fn a_lower_serial_after_a_higher_one_is_out_of_order() {
        let mut history = exactly_once();
        // m3 and m2 swapped on the wire, m2 after m3: order; the jump 1 -> 3 is a silent gap,
        // so only the order violation is asserted here with a notice covering serial 2.
        history
            .published(3)
            .deliver("s", [1])
            .notice("s", "skip", 2, 2)
            .deliver("s", [3, 2]);
        only(&history.check(), Check::Order, 1);
    }

    #[test]
    fn a_jump_without_a_notice_is_a_silent_gap_and_not_also_lost() {
        let mut history = exactly_once();
        history.published(5).deliver("s", [1, 2, 5]);
        let report = history.check();
        only(&report, Check::SilentGaps, 1);
        assert!(report.violations[0].detail.contains("3..=4"));
        assert_eq!(report.violations[0].line, Some(15));
    }

    #[test]
    fn a_notice_that_leaves_a_hole_is_a_silent_gap() {
        let mut history = History::new();
        history
            .subscriber("a", "at-most-once", "ws")
            .subscribed("a", "new", Some(0))
            .published(5)
            .deliver("a", [1])
            .notice("a", "gap", 3, 4)
            .deliver("a", [5]);
        only(&history.check(), Check::SilentGaps, 1);
    }

    #[test]
    fn an_at_most_once_loss_outside_a_reported_gap_is_lost() {
        let mut history = History::new();
        history
            .subscriber("a", "at-most-once", "ws")
            .subscribed("a", "new", Some(0))
            .published(4)
            .deliver("a", [1])
            .notice("a", "gap", 2, 3);
        only(&history.check(), Check::Lost, 1);
    }

    #[test]
    fn another_epoch_without_continuity_lost_is_a_silent_gap() {
        let mut history = exactly_once();
        history.published(2).deliver("s", [1]);
        history.push(Record::Publish {
            publisher: "p".into(),
            surface: "ws".into(),
            channel: "c".into(),
            id: "x".into(),
            attempt: 1,
        });
        history.push(Record::Delivery {
            subscriber: "s".into(),
            channel: "c".into(),
            id: "x".into(),
            epoch: "E2".into(),
            serial: 1,
        });
        // m2 (E1:2) is then missed too, but it is inside what the silent gap gave up on.
        let report = history.check();
        assert_eq!(report.totals.silent_gaps, 1, "{:#?}", report.violations);
        assert_eq!(
            report.totals.duplicates + report.totals.order + report.totals.resume,
            0
        );
    }

    #[test]
    fn a_message_nobody_published_is_unexpected() {
        let mut history = exactly_once();
        history
            .published(2)
            .deliver("s", [1])
            .deliver_id("s", "intruder", 2);
        // The intruder sits at m2's position: that is the violation, counted once (not also as
        // m2 lost, which is about positions).
        only(&history.check(), Check::Unexpected, 1);
    }

    #[test]
    fn an_id_at_two_serials_breaks_idempotency() {
        let mut history = exactly_once();
        history.published(2).ack(2, 3).deliver("s", [1, 2]);
        let report = history.check();
        only(&report, Check::Idempotency, 1);
        let row = report
            .rows
            .iter()
            .find(|row| row.guarantee == "publish")
            .unwrap();
        assert_eq!(row.violations.idempotency, 1);
    }

    #[test]
    fn a_resume_that_skips_is_a_resume_violation() {
        let mut history = exactly_once();
        history
            .published(4)
            .deliver("s", [1, 2])
            .subscribed("s", "held", Some(2))
            .deliver("s", [4]);
        only(&history.check(), Check::Resume, 1);
    }

    #[test]
    fn a_resume_from_the_wrong_position_is_a_resume_violation() {
        let mut history = exactly_once();
        history
            .published(3)
            .deliver("s", [1, 2])
            .subscribed("s", "held", Some(1))
            .deliver("s", [3]);
        only(&history.check(), Check::Resume, 1);
    }

    #[test]
    fn a_resume_with_continuity_lost_may_jump() {
        let mut history = exactly_once();
        history
            .published(5)
            .deliver("s", [1, 2])
            .subscribed("s", "lost", None)
            .notice("s", "continuity_lost", 3, 4)
            .deliver("s", [5]);
        let report = history.check();
        assert_eq!(report.violation_count(), 0, "{:#?}", report.violations);
    }

    #[test]
    fn a_break_caught_by_the_sdk_counts() {
        let mut history = exactly_once();
        history.published(1).deliver("s", [1]);
        history.push(Record::Broken {
            subscriber: "s".into(),
            channel: "c".into(),
            break_kind: "prev".into(),
            detail: "serial 3 prev 2".into(),
        });
        only(&history.check(), Check::SilentGaps, 1);
    }

    #[test]
    fn the_history_round_trips_through_jsonl() {
        let mut history = exactly_once();
        history.published(2).deliver("s", [1, 2]);
        let mut bytes = Vec::new();
        super::super::history::write(&history.lines, &mut bytes).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.starts_with("{\"t_ms\":0,\"kind\":\"subscriber\""),
            "{text}"
        );
        let read = super::super::history::read(std::io::Cursor::new(bytes)).unwrap();
        assert_eq!(read, history.lines);
    }
}
