//! The SSE subscriber of `herald verify`: a small Server-Sent Events client over reqwest's
//! streaming body. It records every event as the server sent it (no dedupe: the checker sees
//! the wire) and reconnects after a drop, with `Last-Event-ID` for exactly-once streams, as a
//! browser's `EventSource` would.
//!
//! # Invariants
//! - The buffered, not yet dispatched event text is bounded by [`EVENT_BYTES_MAX`]; a longer
//!   event ends the connection.
//! - A connection that delivers nothing (not even a keep-alive) for `silence_max` is dropped.

use std::collections::BTreeSet;
use std::time::Duration;

use herald_protocol::ws::ServerFrame;

use super::history::Record;
use super::run::Stop;
use super::subscriber::SubscriberContext;

/// Largest event accepted (the server's messages are at most 64 KiB of data plus framing).
const EVENT_BYTES_MAX: usize = 1024 * 1024;

/// Runs one SSE subscriber until `stop`.
pub async fn run(context: SubscriberContext, mut stop: Stop) {
    let http = match reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .build()
    {
        Ok(http) => http,
        Err(error) => {
            eprintln!("herald verify: {}: {error}", context.name);
            return;
        }
    };
    let exactly_once = context.exactly_once();
    let mut last_event_id: Option<String> = None;
    let mut connections = 0u32;
    let mut started = BTreeSet::new();
    while !stop.stopped() {
        let mut url = context.base_url.clone();
        url.set_path("/v1/sse");
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("channels", &context.channels.join(","));
            query.append_pair("guarantee", &context.guarantee);
            if exactly_once && let Some(from) = &context.sse_from {
                query.append_pair("from", from);
            }
        }
        let mut request = http
            .get(url)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(key) = &context.key {
            request = request.bearer_auth(key);
        }
        if exactly_once && let Some(id) = &last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        if connections > 0 {
            context.record(Record::Reconnect {
                subscriber: context.name.clone(),
            });
        }
        connections += 1;
        // Bounded like the stream itself: a connection that never answers (a blackholed one)
        // is given up after `silence_max` and tried again, instead of waiting forever.
        let response = tokio::select! {
            response = tokio::time::timeout(context.silence_max, request.send()) => {
                response.ok().and_then(Result::ok)
            }
            () = stop.wait() => return,
        };
        match response {
            Some(response) if response.status().is_success() => {
                read_stream(
                    &context,
                    response,
                    &mut last_event_id,
                    &mut started,
                    &mut stop,
                )
                .await;
            }
            Some(response) => {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                context.record(Record::SubscriptionError {
                    subscriber: context.name.clone(),
                    channel: context.channels.join(","),
                    code: format!("http_{}", status.as_u16()),
                    message: body.chars().take(300).collect(),
                });
            }
            None => {} // the server or the proxy is down or silent: retry
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = stop.wait() => return,
        }
    }
}

/// One event being assembled.
#[derive(Default)]
struct Pending {
    id: Option<String>,
    data: String,
}

async fn read_stream(
    context: &SubscriberContext,
    mut response: reqwest::Response,
    last_event_id: &mut Option<String>,
    started: &mut BTreeSet<String>,
    stop: &mut Stop,
) {
    let mut buffer: Vec<u8> = Vec::new();
    let mut pending = Pending::default();
    loop {
        let chunk = tokio::select! {
            chunk = tokio::time::timeout(context.silence_max, response.chunk()) => chunk,
            () = stop.wait() => return,
        };
        let bytes = match chunk {
            Ok(Ok(Some(bytes))) => bytes,
            // End of stream, a broken connection, or silence: reconnect.
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return,
        };
        buffer.extend_from_slice(&bytes);
        while let Some(end) = buffer.iter().position(|byte| *byte == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                let event = std::mem::take(&mut pending);
                if let Some(id) = event.id {
                    *last_event_id = Some(id);
                }
                if !event.data.is_empty() {
                    dispatch(context, &event.data, started);
                }
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line, ""),
            };
            match field {
                "id" => pending.id = Some(value.to_owned()),
                "data" => {
                    if !pending.data.is_empty() {
                        pending.data.push('\n');
                    }
                    pending.data.push_str(value);
                }
                _ => {} // `event:` (the frame says its type), `retry:`, comments
            }
            if pending.data.len() > EVENT_BYTES_MAX {
                return;
            }
        }
        if buffer.len() > EVENT_BYTES_MAX {
            return;
        }
    }
}

/// Records one event's frame.
fn dispatch(context: &SubscriberContext, data: &str, started: &mut BTreeSet<String>) {
    let subscriber = context.name.clone();
    let frame = match ServerFrame::from_json(data) {
        Ok(frame) => frame,
        Err(error) => {
            context.record(Record::Broken {
                subscriber,
                channel: String::new(),
                break_kind: "malformed".into(),
                detail: format!("{error}: {}", data.chars().take(200).collect::<String>()),
            });
            return;
        }
    };
    match frame {
        ServerFrame::Subscribed(subscribed) => {
            if started.insert(subscribed.channel.clone()) {
                context.first_subscribed();
            }
            // Deliveries start after `after`: what is before it is accounted for (an
            // at-most-once re-subscription skips it, explicitly).
            context.accounted(&subscribed.channel, subscribed.after.as_deref());
            context.record(Record::Subscribed {
                subscriber,
                channel: subscribed.channel,
                continuity: continuity_name(subscribed.continuity),
                after: subscribed.after,
                top: subscribed.top,
            });
        }
        ServerFrame::Message(delivery) => {
            let message = delivery.message;
            context.delivered(&message.channel, message.serial);
            context.record(Record::Delivery {
                subscriber,
                channel: message.channel,
                id: message.id,
                epoch: message.epoch,
                serial: message.serial,
            });
        }
        ServerFrame::ContinuityLost(notice) => {
            context.accounted(&notice.channel, notice.to.as_deref());
            context.record(Record::Notice {
                subscriber,
                channel: notice.channel,
                notice: "continuity_lost".into(),
                from: notice.from,
                to: notice.to,
                reason: notice.reason,
            });
        }
        ServerFrame::Gap(notice) => {
            context.accounted(&notice.channel, Some(&notice.to));
            context.record(Record::Notice {
                subscriber,
                channel: notice.channel,
                notice: "gap".into(),
                from: notice.from,
                to: Some(notice.to),
                reason: notice.reason,
            });
        }
        ServerFrame::Skip(notice) => {
            context.accounted(&notice.channel, Some(&notice.to));
            context.record(Record::Notice {
                subscriber,
                channel: notice.channel,
                notice: "skip".into(),
                from: notice.from,
                to: Some(notice.to),
                reason: notice.reason,
            });
        }
        ServerFrame::Error(error) => context.record(Record::SubscriptionError {
            subscriber,
            channel: error.channel.unwrap_or_default(),
            code: error.code,
            message: error.message,
        }),
        _ => {} // heartbeats: the drain asks the server for the tops instead
    }
}

pub fn continuity_name(continuity: herald_protocol::ws::Continuity) -> String {
    serde_json::to_value(continuity)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{continuity:?}"))
}
