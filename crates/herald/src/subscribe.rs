//! `herald subscribe` and `herald history --follow`: live deliveries over the WebSocket
//! protocol through the SDK (`herald-client`), which reconnects and resumes by itself.
//!
//! `subscribe` prints each message as one JSON line on stdout (the same fields as the HTTP API's
//! message JSON) and every notice (continuity lost, gaps, skips, breaks, reconnects) as a
//! `herald: ...` line on stderr, so stdout stays machine-readable.
//!
//! `subscribe --guarantee at-least-once` (a durable subscriber, with acks) lives in
//! `subscribe/at_least_once.rs`.

use std::time::{Duration, UNIX_EPOCH};

use anyhow::anyhow;
use base64::Engine as _;
use herald_client::{
    Client, ClientError, ClientOptions, Data, Event, Guarantee, Message, Position, SubscribeOptions,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::{ClientArgs, EXIT_UNREACHABLE, EXIT_USAGE, Failure, SubscribeArgs, read_admin_key};

mod at_least_once;

pub use at_least_once::AtLeastOnceArgs;

/// `--guarantee`.
// The variants spell the guarantees' documented names (`exactly-once`, ...).
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GuaranteeArg {
    ExactlyOnce,
    AtMostOnce,
    AtLeastOnce,
}

/// `herald subscribe`: the at-least-once path, or the plan of the others.
pub async fn command(args: SubscribeArgs) -> Result<(), Failure> {
    let guarantee = match args.guarantee {
        GuaranteeArg::AtLeastOnce => return at_least_once::command(args).await,
        GuaranteeArg::ExactlyOnce => Guarantee::ExactlyOnce,
        GuaranteeArg::AtMostOnce => Guarantee::AtMostOnce,
    };
    if let Some(flag) = args.at_least_once.first_flag_given() {
        return Err(Failure::other(
            EXIT_USAGE,
            anyhow!("{flag} needs --guarantee at-least-once"),
        ));
    }
    let plan = Plan {
        from: parse_from(&args.channels, &args.from)?,
        channels: args.channels,
        guarantee,
        rewind: args.rewind,
        hints: args.hints,
        filter: args.filter,
        count: args.count,
        format: Format::JsonLines,
    };
    run(plan, &args.client).await
}

/// How a delivered message is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line (`subscribe`).
    JsonLines,
    /// `POSITION\tTIME\tID\tNAME\tDATA`, like `history` (`history --follow`).
    Table,
}

/// What to subscribe to.
pub struct Plan {
    pub channels: Vec<String>,
    /// Per channel (same order): resume after this position.
    pub from: Vec<Option<Position>>,
    pub guarantee: Guarantee,
    pub rewind: Option<u64>,
    pub hints: bool,
    pub filter: Option<String>,
    /// Stop after this many messages (all channels together).
    pub count: Option<u64>,
    pub format: Format,
}

/// Parses `--from` values: `POS` (one channel only) or `CHANNEL=POS`.
pub fn parse_from(
    channels: &[String],
    values: &[String],
) -> Result<Vec<Option<Position>>, Failure> {
    let usage = |message: String| Failure::other(EXIT_USAGE, anyhow!(message));
    let mut from = vec![None; channels.len()];
    for value in values {
        let (index, position) = match value.rsplit_once('=') {
            Some((channel, position)) => {
                let index = channels
                    .iter()
                    .position(|known| known == channel)
                    .ok_or_else(|| usage(format!("--from {value}: {channel} is not subscribed")))?;
                (index, position)
            }
            None if channels.len() == 1 => (0, value.as_str()),
            None => {
                return Err(usage(format!(
                    "--from {value}: with several channels, write CHANNEL=EPOCH:SERIAL"
                )));
            }
        };
        let position =
            Position::parse(position).map_err(|error| usage(format!("--from {value}: {error}")))?;
        from[index] = Some(position);
    }
    Ok(from)
}

/// The WebSocket URL for an HTTP base URL.
fn ws_url(base: &str) -> Result<String, Failure> {
    let url = reqwest::Url::parse(base)
        .map_err(|error| Failure::other(EXIT_USAGE, anyhow!("--url {base:?}: {error}")))?;
    let scheme = match url.scheme() {
        "http" => "ws",
        "https" => "wss",
        other => {
            return Err(Failure::other(
                EXIT_USAGE,
                anyhow!("--url {base:?}: scheme {other} is not http or https"),
            ));
        }
    };
    let host = url
        .host_str()
        .ok_or_else(|| Failure::other(EXIT_USAGE, anyhow!("--url {base:?} has no host")))?;
    let port = url.port_or_known_default().unwrap_or(80);
    Ok(format!("{scheme}://{host}:{port}/v1/ws"))
}

/// The SDK client for `--url`, `--key` (or the data dir's admin key).
fn connect(client_args: &ClientArgs) -> Result<Client, Failure> {
    let mut options = ClientOptions::new(ws_url(&client_args.url)?);
    options.key = client_args
        .key
        .clone()
        .or_else(|| read_admin_key(&client_args.data_dir));
    Client::connect(options).map_err(client_failure)
}

/// Subscribes and prints until interrupted (or `count` messages).
pub async fn run(plan: Plan, client_args: &ClientArgs) -> Result<(), Failure> {
    let client = connect(client_args)?;
    let (events, mut received) = mpsc::channel::<(String, Event)>(1024);
    let mut forwarders = Vec::new();
    for (channel, from) in plan.channels.iter().zip(&plan.from) {
        let subscribe_options = SubscribeOptions {
            guarantee: plan.guarantee,
            from: from.clone(),
            rewind: plan.rewind,
            hints: plan.hints,
            filter: plan.filter.clone(),
            at_least_once: None,
        };
        let mut subscription = client
            .subscribe(channel, subscribe_options)
            .await
            .map_err(client_failure)?;
        let events = events.clone();
        let channel = channel.clone();
        forwarders.push(tokio::spawn(async move {
            while let Some(event) = subscription.next().await {
                if events.send((channel.clone(), event)).await.is_err() {
                    return;
                }
            }
        }));
    }
    drop(events);
    let mut printed = 0u64;
    let outcome = loop {
        let next = tokio::select! {
            next = received.recv() => next,
            _ = tokio::signal::ctrl_c() => break Ok(()),
        };
        let Some((channel, event)) = next else {
            break Ok(());
        };
        match event {
            Event::Message(message) => {
                print_message(&message, None, plan.format);
                printed += 1;
                if plan.count.is_some_and(|count| printed >= count) {
                    break Ok(());
                }
            }
            Event::Hint { position } => {
                println!(
                    "{}",
                    json!({"channel": channel, "position": position.to_string()})
                );
                printed += 1;
                if plan.count.is_some_and(|count| printed >= count) {
                    break Ok(());
                }
            }
            Event::Closed { reason } => {
                break Err(Failure::other(
                    1,
                    anyhow!("subscription to {channel} closed: {reason}"),
                ));
            }
            other => eprintln!("herald: {channel}: {}", describe(&other)),
        }
    };
    for forwarder in forwarders {
        forwarder.abort();
    }
    client.close().await;
    outcome
}

fn client_failure(error: ClientError) -> Failure {
    let exit = match error {
        ClientError::InvalidUrl(_) | ClientError::InvalidInput(_) => EXIT_USAGE,
        ClientError::Rejected(_) => crate::EXIT_REJECTED,
        _ => EXIT_UNREACHABLE,
    };
    Failure::other(exit, error)
}

fn describe(event: &Event) -> String {
    match event {
        Event::Subscribed {
            guarantee,
            continuity,
            after,
            top,
        } => format!(
            "subscribed ({guarantee}, continuity {}) after {} (top {})",
            serde_json::to_value(continuity).map_or_else(|_| "?".into(), |v| v.to_string()),
            after.as_ref().map_or("-".into(), ToString::to_string),
            top.as_ref().map_or("-".into(), ToString::to_string),
        ),
        Event::Expired { from, to } => {
            format!("EXPIRED unacked: {from} ..= {to} (their TTL ran out; not delivered again)")
        }
        Event::ContinuityLost { from, to, reason } => format!(
            "CONTINUITY LOST ({reason}): missed {from} ..= {}",
            to.as_ref().map_or("-".into(), ToString::to_string)
        ),
        Event::Gap { from, to, reason } => format!("GAP ({reason}): dropped {from} ..= {to}"),
        Event::Skip { from, to, reason } => format!("skipped {from} ..= {to} ({reason})"),
        Event::Broken(broken) => format!("BROKEN stream, resubscribing: {broken:?}"),
        Event::Stalled { position, top } => format!(
            "behind: at {} while the server's top is {top}",
            position.as_ref().map_or("-".into(), ToString::to_string)
        ),
        Event::Error {
            code,
            message,
            retryable,
        } => format!(
            "error {code}: {message}{}",
            if *retryable { " (retryable)" } else { "" }
        ),
        other => format!("{other:?}"),
    }
}

/// Prints one message; `delivery` is the delivery count of an at-least-once delivery.
fn print_message(message: &Message, delivery: Option<u32>, format: Format) {
    let (data, encoding) = match &message.data {
        Data::Json(bytes) => (String::from_utf8_lossy(bytes).into_owned(), None),
        Data::Binary(bytes) => (
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)).to_string(),
            Some("base64"),
        ),
    };
    match format {
        Format::JsonLines => {
            let mut object = json!({
                "channel": message.channel,
                "position": message.position.to_string(),
                "serial": message.position.serial.0,
                "epoch": message.position.epoch.to_string(),
                "id": message.id,
                "time": message.time_ms,
                "chain": message.chain.to_hex(),
            });
            if let Some(name) = &message.name {
                object["name"] = json!(name);
            }
            if !message.headers.is_empty() {
                object["headers"] = json!(message.headers);
            }
            if let Some(encoding) = encoding {
                object["encoding"] = json!(encoding);
            }
            if let Some(delivery) = delivery {
                object["delivery"] = json!(delivery);
            }
            // `data` is the stored JSON text as is (no re-encoding of numbers or key order).
            let mut line = object.to_string();
            line.pop();
            println!("{line},\"data\":{data}}}");
        }
        Format::Table => {
            let time = humantime::format_rfc3339_millis(
                UNIX_EPOCH + Duration::from_millis(message.time_ms),
            );
            let data = match encoding {
                Some(_) => format!("base64:{}", data.trim_matches('"')),
                None => data,
            };
            let name = message.name.as_deref().unwrap_or("-");
            println!(
                "{}\t{time}\t{}\t{name}\t{data}",
                message.position, message.id
            );
        }
    }
}
