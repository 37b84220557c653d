//! `herald subscribe CHANNEL --guarantee at-least-once --subscriber-id ID`: a durable
//! subscriber through the SDK. The server keeps the subscriber's acked position, so a later
//! run with the same id continues where this one's acks stopped, and gets again what it did
//! not ack.
//!
//! Each delivery is printed as one JSON line on stdout (the `subscribe` fields plus
//! `delivery`, the delivery count); notices go to stderr as `herald: ...` lines.
//! - `--ack auto` (default): each delivery is acked right after its line is printed.
//! - `--ack manual`: stdin is the ack channel, one ack per line: `EPOCH:SERIAL` acks that
//!   serial, `through EPOCH:SERIAL` every serial up to it. Each ack is confirmed on stderr
//!   (`herald: CHANNEL: acked ...`) once durable; a malformed line, or a position this run did
//!   not print, gets an error on stderr and is skipped. The command ends at the end of stdin
//!   (after waiting for the acks made), or at Ctrl-C.
//!
//! Before exiting, the command waits (bounded) for the acks it made to be durable, so that a
//! printed and acked message is not delivered again to the next run.
//!
//! # Invariants
//! - Auto mode acks a delivery only after its line is written to stdout.
//! - Acks awaited at once are bounded by [`ACKS_AWAITED_MAX`]; the deliveries remembered for
//!   manual acks are bounded by the subscriber's window (unacked serials), keyed by position.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::anyhow;
use herald_client::{
    AckError, AckHandle, AckMode, AtLeastOnce, Delivery, Event, Position, SubscribeOptions,
};
use herald_core::{Epoch, Serial, SubscriberId};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use super::{Format, client_failure, connect, describe, print_message};
use crate::{EXIT_USAGE, Failure, SubscribeArgs};

/// Manual acks waiting for their confirmation at once; stdin is not read beyond it.
const ACKS_AWAITED_MAX: usize = 256;

/// How long the command waits at exit for its acks to be durable.
const EXIT_ACK_WAIT: Duration = Duration::from_secs(10);

/// `--ack`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AckArg {
    /// Ack each delivery right after printing it.
    Auto,
    /// Read acks from stdin: `EPOCH:SERIAL` (that serial) or `through EPOCH:SERIAL` (every
    /// serial up to it), one per line.
    Manual,
}

/// The at-least-once flags of `herald subscribe`.
#[derive(clap::Args, Debug)]
pub struct AtLeastOnceArgs {
    /// At-least-once: the durable subscriber's name (printable ASCII, no spaces, at most 128
    /// bytes), unique per channel. Another `subscribe` with the same id takes it over; this
    /// one then exits (close code 4004) without taking it back.
    #[arg(long, value_name = "ID")]
    subscriber_id: Option<String>,
    /// At-least-once: `auto` (default) acks each delivery after printing it; `manual` reads
    /// acks from stdin, one per line: `EPOCH:SERIAL` acks that serial, `through EPOCH:SERIAL`
    /// every serial up to it (each confirmed on stderr once durable; the end of stdin ends
    /// the command). Unacked deliveries come again after --ack-wait and after a reconnect or
    /// restart, with their delivery count.
    #[arg(long, value_enum, value_name = "MODE")]
    ack: Option<AckArg>,
    /// At-least-once: deliveries not yet acked, at most (server default 100). Taken when the
    /// subscriber is created; an existing subscriber keeps its options.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    inflight_max: Option<u32>,
    /// At-least-once: milliseconds before an unacked delivery is delivered again (server
    /// default 30000). Taken when the subscriber is created.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    ack_wait: Option<u64>,
    /// At-least-once: deliveries of one message before it goes to the dead-letter channel
    /// CHANNEL.dead (server default 5). Taken when the subscriber is created.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_deliveries: Option<u32>,
}

impl AtLeastOnceArgs {
    /// The first at-least-once flag given, for the error when the guarantee is another one.
    pub fn first_flag_given(&self) -> Option<&'static str> {
        [
            (self.subscriber_id.is_some(), "--subscriber-id"),
            (self.ack.is_some(), "--ack"),
            (self.inflight_max.is_some(), "--inflight-max"),
            (self.ack_wait.is_some(), "--ack-wait"),
            (self.max_deliveries.is_some(), "--max-deliveries"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }
}

/// One line of the manual ack channel.
#[derive(Clone, Debug, PartialEq, Eq)]
enum AckLine {
    One(Position),
    Through(Position),
}

fn parse_ack_line(line: &str) -> Result<AckLine, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let parse = |text: &str| Position::parse(text).map_err(|error| error.message);
    match words.as_slice() {
        [position] => parse(position).map(AckLine::One),
        ["through", position] => parse(position).map(AckLine::Through),
        _ => Err("expected EPOCH:SERIAL or through EPOCH:SERIAL".to_owned()),
    }
}

fn usage(message: String) -> Failure {
    Failure::other(EXIT_USAGE, anyhow!(message))
}

/// Checks the flags, then subscribes and prints until done.
pub async fn command(args: SubscribeArgs) -> Result<(), Failure> {
    let [channel] = args.channels.as_slice() else {
        return Err(usage(
            "--guarantee at-least-once takes exactly one channel".to_owned(),
        ));
    };
    let conflicts: Vec<&str> = [
        (!args.from.is_empty(), "--from"),
        (args.rewind.is_some(), "--rewind"),
        (args.hints, "--hints"),
        (args.filter.is_some(), "--filter"),
    ]
    .into_iter()
    .filter_map(|(given, flag)| given.then_some(flag))
    .collect();
    if !conflicts.is_empty() {
        return Err(usage(format!(
            "--guarantee at-least-once takes no {}: the server holds the subscriber's position",
            conflicts.join(", ")
        )));
    }
    let durable = &args.at_least_once;
    let Some(subscriber_id) = &durable.subscriber_id else {
        return Err(usage(
            "--guarantee at-least-once needs --subscriber-id ID".to_owned(),
        ));
    };
    SubscriberId::parse(subscriber_id)
        .map_err(|error| usage(format!("--subscriber-id: {}", error.message)))?;
    let mut options = AtLeastOnce::new(subscriber_id.clone()).ack_mode(AckMode::Manual);
    options.inflight_max = durable.inflight_max;
    options.ack_wait_ms = durable.ack_wait;
    options.max_deliveries = durable.max_deliveries;
    let ack = durable.ack.unwrap_or(AckArg::Auto);
    let client = connect(&args.client)?;
    let mut subscription = client
        .subscribe(channel, SubscribeOptions::from(options))
        .await
        .map_err(client_failure)?;
    let mut consumer = Consumer {
        channel: channel.clone(),
        subscriber_id: subscriber_id.clone(),
        ack,
        count: args.count,
        printed: 0,
        delivered: BTreeMap::new(),
        last_acked: None,
        awaited: 0,
    };
    let outcome = consumer.run(&mut subscription).await;
    if outcome.is_ok() && ack == AckArg::Auto {
        // The subscription stays open meanwhile: its acks are confirmed through it.
        consumer.settle().await;
    }
    drop(subscription);
    client.close().await;
    outcome
}

struct Consumer {
    channel: String,
    subscriber_id: String,
    ack: AckArg,
    count: Option<u64>,
    printed: u64,
    /// Manual acks: the handles of the deliveries printed and not yet acked.
    delivered: BTreeMap<(Epoch, Serial), AckHandle>,
    /// Auto acks: the handle of the last ack made, awaited at exit.
    last_acked: Option<AckHandle>,
    /// Manual acks awaited now.
    awaited: usize,
}

/// How an awaited manual ack ended.
struct AckOutcome {
    line: String,
    result: Result<(), AckError>,
}

impl Consumer {
    fn counted_out(&self) -> bool {
        self.count.is_some_and(|count| self.printed >= count)
    }

    async fn run(&mut self, subscription: &mut herald_client::Subscription) -> Result<(), Failure> {
        let manual = self.ack == AckArg::Manual;
        let mut stdin = BufReader::new(tokio::io::stdin()).lines();
        let mut stdin_open = manual;
        let (outcomes_tx, mut outcomes) = mpsc::channel::<AckOutcome>(ACKS_AWAITED_MAX);
        loop {
            // Manual: once the count is reached, deliveries are left unread (and unacked:
            // they come again later) while stdin still acks what was printed.
            let reading_events = !self.counted_out();
            if !reading_events && !stdin_open {
                return Ok(());
            }
            let reading_stdin = stdin_open && self.awaited < ACKS_AWAITED_MAX;
            tokio::select! {
                event = subscription.next(), if reading_events => {
                    let Some(event) = event else {
                        return Err(Failure::other(1, anyhow!("the subscription to {} ended", self.channel)));
                    };
                    self.on_event(event).await?;
                    if !manual && self.counted_out() {
                        return Ok(());
                    }
                }
                line = stdin.next_line(), if reading_stdin => {
                    match line {
                        Ok(Some(line)) => self.on_ack_line(line, &outcomes_tx),
                        Ok(None) => stdin_open = false,
                        Err(error) => {
                            eprintln!("herald: stdin: {error}; no more acks are read");
                            stdin_open = false;
                        }
                    }
                }
                Some(outcome) = outcomes.recv(), if self.awaited > 0 => {
                    self.awaited -= 1;
                    self.report(outcome);
                }
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
            if manual && !stdin_open {
                // The end of stdin ends the command once its acks are answered.
                while self.awaited > 0 {
                    let Some(outcome) = outcomes.recv().await else {
                        break;
                    };
                    self.awaited -= 1;
                    self.report(outcome);
                }
                return Ok(());
            }
        }
    }

    async fn on_event(&mut self, event: Event) -> Result<(), Failure> {
        match event {
            Event::Delivery(delivery) => self.on_delivery(*delivery),
            Event::TakenOver => {
                return Err(Failure::other(
                    1,
                    anyhow!(
                        "{}: subscriber {:?} was taken over by another connection (close code \
                         4004); not taking it back",
                        self.channel,
                        self.subscriber_id
                    ),
                ));
            }
            Event::Closed { reason } => {
                return Err(Failure::other(
                    1,
                    anyhow!("subscription to {} closed: {reason}", self.channel),
                ));
            }
            other => eprintln!("herald: {}: {}", self.channel, describe(&other)),
        }
        Ok(())
    }

    fn on_delivery(&mut self, delivery: Delivery) {
        print_message(
            &delivery.message,
            Some(delivery.delivery),
            Format::JsonLines,
        );
        self.printed += 1;
        match self.ack {
            AckArg::Auto => {
                // Printed (println! flushes the line) before acked.
                if let Err(error) = delivery.ack() {
                    eprintln!(
                        "herald: {}: ack {}: {error}",
                        self.channel, delivery.message.position
                    );
                }
                self.last_acked = Some(delivery.ack);
            }
            AckArg::Manual => {
                let position = &delivery.message.position;
                self.delivered
                    .insert((position.epoch.clone(), position.serial), delivery.ack);
            }
        }
    }

    fn on_ack_line(&mut self, line: String, outcomes: &mpsc::Sender<AckOutcome>) {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            return;
        }
        let parsed = match parse_ack_line(trimmed) {
            Ok(parsed) => parsed,
            Err(error) => {
                eprintln!("herald: ack {trimmed:?} skipped: {error}");
                return;
            }
        };
        let (position, through) = match &parsed {
            AckLine::One(position) => (position, false),
            AckLine::Through(position) => (position, true),
        };
        let key = (position.epoch.clone(), position.serial);
        let Some(handle) = self.delivered.get(&key).cloned() else {
            eprintln!(
                "herald: ack {trimmed:?} skipped: {position} was not printed by this run, or is acked already"
            );
            return;
        };
        if through {
            // Everything up to it in its epoch is acked by this one.
            let kept = self
                .delivered
                .split_off(&(position.epoch.clone(), position.serial.next()));
            let other_epochs = std::mem::replace(&mut self.delivered, kept);
            self.delivered.extend(
                other_epochs
                    .into_iter()
                    .filter(|((epoch, _), _)| *epoch != position.epoch),
            );
        } else {
            self.delivered.remove(&key);
        }
        self.awaited += 1;
        let outcomes = outcomes.clone();
        let line = trimmed.to_owned();
        tokio::spawn(async move {
            let result = if through {
                handle.ack_through_durable().await
            } else {
                handle.ack_durable().await
            };
            let _ = outcomes.send(AckOutcome { line, result }).await;
        });
    }

    fn report(&self, outcome: AckOutcome) {
        match outcome.result {
            Ok(()) => eprintln!("herald: {}: acked {}", self.channel, outcome.line),
            Err(error) => eprintln!(
                "herald: {}: ack {} failed: {error}",
                self.channel, outcome.line
            ),
        }
    }

    /// Waits (bounded) until the last ack is durable: the server applies acks in order, so
    /// every ack made before it is durable too.
    async fn settle(&mut self) {
        let Some(last) = self.last_acked.take() else {
            return;
        };
        match tokio::time::timeout(EXIT_ACK_WAIT, last.ack_durable()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!(
                "herald: {}: the last acks may not be recorded ({error}); those messages come again",
                self.channel
            ),
            Err(_) => eprintln!(
                "herald: {}: no ack confirmation within {EXIT_ACK_WAIT:?}; the last messages may come again",
                self.channel
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_lines_are_a_position_or_through_a_position() {
        let position = Position::parse("E1:12").unwrap();
        assert_eq!(parse_ack_line("E1:12"), Ok(AckLine::One(position.clone())));
        assert_eq!(
            parse_ack_line("through   E1:12"),
            Ok(AckLine::Through(position))
        );
        for bad in ["12", "through", "through E1:x", "E1:1 E1:2", "ack E1:1"] {
            assert!(parse_ack_line(bad).is_err(), "{bad:?}");
        }
    }
}
