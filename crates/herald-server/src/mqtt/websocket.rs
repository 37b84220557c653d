//! MQTT over WebSocket: `GET /mqtt` with the `mqtt` subprotocol (what browser MQTT clients and
//! most MQTT libraries use). The binary messages of the WebSocket carry the MQTT byte stream
//! (a packet may span messages, a message may hold several packets), so the connection is the
//! same as over TCP: the WebSocket is bridged to an in-memory duplex stream and served by
//! `connection::run`. Available while the MQTT listener is enabled (`503 unavailable`
//! otherwise).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt as _, StreamExt as _};
use herald_core::ErrorCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

use super::{MqttContext, connection};
use crate::error::ApiError;
use crate::http::AppState;

/// The subprotocol MQTT over WebSocket uses (MQTT 5.0 section 6).
pub const SUBPROTOCOL: &str = "mqtt";
/// Bytes buffered between the WebSocket and the MQTT connection, each way.
const BRIDGE_BYTES: usize = 64 * 1024;

/// How long an upgrade waits for the MQTT listener to finish starting (it rebuilds the
/// retained index first).
const STARTING_WAIT: Duration = Duration::from_secs(10);

pub async fn upgrade(State(state): State<AppState>, upgrade: WebSocketUpgrade) -> Response {
    let mut ready = state.mqtt.clone();
    let context = match tokio::time::timeout(STARTING_WAIT, ready.wait_for(Option::is_some)).await {
        Ok(Ok(context)) => context.as_ref().and_then(std::sync::Weak::upgrade),
        // MQTT is off (the sender is gone), or still starting after the wait.
        Ok(Err(_)) | Err(_) => None,
    };
    let Some(context) = context else {
        return ApiError::new(
            ErrorCode::Unavailable,
            "MQTT is not enabled on this server (herald serve --mqtt ADDR)",
        )
        .into_response();
    };
    let frame_bytes = usize::try_from(context.config.max_packet_bytes).unwrap_or(usize::MAX);
    upgrade
        .protocols([SUBPROTOCOL])
        .max_message_size(frame_bytes)
        .max_frame_size(frame_bytes)
        .on_upgrade(move |socket| serve(socket, context))
}

async fn serve(socket: WebSocket, context: Arc<MqttContext>) {
    let (mqtt_side, bridge_side) = tokio::io::duplex(BRIDGE_BYTES);
    let bridge = tokio::spawn(bridge(socket, bridge_side));
    connection::run(mqtt_side, "websocket".to_owned(), context).await;
    // The connection closed its side: the bridge sees the end and closes the WebSocket.
    let _ = bridge.await;
}

/// Copies WebSocket binary messages into the stream and the stream's bytes out as binary
/// messages, until either side ends. Text messages are not MQTT: they end the connection.
async fn bridge(socket: WebSocket, stream: DuplexStream) {
    let (mut sink, mut messages) = socket.split();
    let (mut reader, mut writer) = tokio::io::split(stream);
    let inbound = async move {
        while let Some(Ok(message)) = messages.next().await {
            match message {
                Message::Binary(bytes) => {
                    if writer.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Message::Ping(_) | Message::Pong(_) => {}
                Message::Text(_) | Message::Close(_) => break,
            }
        }
        // The MQTT connection sees the end of its input.
        let _ = writer.shutdown().await;
    };
    let outbound = async move {
        let mut buffer = vec![0u8; BRIDGE_BYTES];
        loop {
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => {
                    let bytes = axum::body::Bytes::copy_from_slice(&buffer[..read]);
                    if sink.send(Message::Binary(bytes)).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink.close().await;
    };
    // Either direction ending ends the connection.
    tokio::select! {
        () = inbound => {}
        () = outbound => {}
    }
}
