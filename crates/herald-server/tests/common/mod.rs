//! Test kit for the realtime surfaces: a real server on 127.0.0.1 (embedded log in a temp
//! dir unless a test says otherwise) and a raw WebSocket client speaking the protocol.
#![allow(dead_code)]

pub mod mqtt;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use herald_server::config::Config;
use herald_server::{Server, ServerError};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single wait in these tests may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    /// A dev-mode server (anonymous access) on `addr` (port 0 for a fresh one).
    pub async fn start(dir: &std::path::Path, adjust: impl FnOnce(&mut Config)) -> TestServer {
        Self::start_on(dir, "127.0.0.1:0".parse().unwrap(), adjust).await
    }

    pub async fn start_on(
        dir: &std::path::Path,
        addr: SocketAddr,
        adjust: impl FnOnce(&mut Config),
    ) -> TestServer {
        let mut config = Config {
            data_dir: dir.to_owned(),
            http_addr: addr,
            dev: true,
            ..Config::default()
        };
        // Off unless a test turns it on: the default 127.0.0.1:1883 is shared by every test.
        config.mqtt.enabled = false;
        adjust(&mut config);
        let server = Server::bind(config).await.expect("server starts");
        let addr = server.local_addr();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("server stops in time")
            .unwrap()
            .unwrap();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// Publishes over HTTP; returns the ack body.
    pub async fn publish(&self, channel: &str, body: Value) -> Value {
        let response = self
            .http
            .post(self.url(&format!("/v1/channels/{channel}/messages")))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        assert!(status == 200 || status == 201, "publish: {status} {body}");
        body
    }

    /// Publishes `count` messages `{"n": i}` (i from `first`) in batches of up to 100.
    pub async fn publish_numbers(&self, channel: &str, first: u64, count: u64) -> Vec<Value> {
        let mut acks = Vec::new();
        let mut next = first;
        while next < first + count {
            let end = (next + 100).min(first + count);
            let batch: Vec<Value> = (next..end).map(|n| json!({"data": {"n": n}})).collect();
            let body = self.publish(channel, json!({"messages": batch})).await;
            acks.extend(body["results"].as_array().unwrap().iter().cloned());
            next = end;
        }
        acks
    }
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A raw protocol client: sends JSON frames, reads JSON frames with a deadline.
pub struct WsClient {
    pub socket: Socket,
    next_req: u64,
}

impl WsClient {
    /// Opens the socket without sending `connect`.
    pub async fn open(url: &str) -> WsClient {
        let (socket, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("websocket handshake");
        WsClient {
            socket,
            next_req: 1,
        }
    }

    /// Wraps a socket opened elsewhere (for example with custom upgrade headers).
    pub fn from_socket(socket: Socket) -> WsClient {
        WsClient {
            socket,
            next_req: 1,
        }
    }

    /// Opens the socket (without `connect`) over a TCP connection whose receive buffer is
    /// fixed at about `receive_buffer_bytes`. Loopback buffers otherwise grow to megabytes, so
    /// a client that stops reading would take a long time to push back on the server.
    pub async fn open_with_receive_buffer(url: &str, receive_buffer_bytes: u32) -> WsClient {
        let authority = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .expect("a ws://IP:PORT/... url");
        let addr: SocketAddr = authority.parse().expect("an IP:PORT authority");
        let tcp = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
        tcp.set_recv_buffer_size(receive_buffer_bytes)
            .expect("SO_RCVBUF is settable");
        let stream = tokio::time::timeout(WAIT, tcp.connect(addr))
            .await
            .expect("connect in time")
            .expect("TCP connect");
        let (socket, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)),
        )
        .await
        .expect("handshake in time")
        .expect("websocket handshake");
        WsClient {
            socket,
            next_req: 1,
        }
    }

    /// [`WsClient::open_with_receive_buffer`], then `connect` (anonymous).
    pub async fn connect_with_receive_buffer(url: &str, receive_buffer_bytes: u32) -> WsClient {
        let mut client = Self::open_with_receive_buffer(url, receive_buffer_bytes).await;
        client.send(json!({"type": "connect", "protocol": 1})).await;
        let connected = client.recv().await;
        assert_eq!(connected["type"], "connected", "{connected}");
        client
    }

    /// Opens and completes `connect` (anonymous).
    pub async fn connect(url: &str) -> WsClient {
        let mut client = Self::open(url).await;
        client.send(json!({"type": "connect", "protocol": 1})).await;
        let connected = client.recv().await;
        assert_eq!(connected["type"], "connected", "{connected}");
        client
    }

    pub async fn send(&mut self, frame: Value) {
        self.socket
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("send frame");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.socket
            .send(Message::Text(text.to_owned().into()))
            .await
            .expect("send frame");
    }

    pub fn req(&mut self) -> u64 {
        self.next_req += 1;
        self.next_req
    }

    /// The next JSON frame (heartbeats included). Panics on close or timeout.
    pub async fn recv(&mut self) -> Value {
        match self.recv_message().await {
            Ok(value) => value,
            Err(close) => panic!("connection closed: {close:?}"),
        }
    }

    /// The next frame that is not a heartbeat.
    pub async fn recv_skipping_heartbeats(&mut self) -> Value {
        loop {
            let frame = self.recv().await;
            if frame["type"] != "heartbeat" {
                return frame;
            }
        }
    }

    /// The next JSON frame, or the close frame's (code, reason).
    pub async fn recv_message(&mut self) -> Result<Value, Option<(u16, String)>> {
        loop {
            let message = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("a frame arrives in time");
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Ok(serde_json::from_str(text.as_str()).expect("frames are JSON"));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(
                        frame.map(|frame| (u16::from(frame.code), frame.reason.to_string()))
                    );
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(None),
            }
        }
    }

    /// Subscribes and returns the `subscribed` reply.
    pub async fn subscribe(&mut self, mut frame: Value) -> Value {
        let req = self.req();
        frame["type"] = json!("subscribe");
        frame["req"] = json!(req);
        self.send(frame).await;
        let reply = self.recv_skipping_heartbeats().await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        assert_eq!(reply["req"], req);
        reply
    }

    /// Reads deliveries until `count` messages arrived; returns every frame read (messages and
    /// notices, no heartbeats).
    pub async fn read_messages(&mut self, count: usize) -> Vec<Value> {
        let mut frames = Vec::new();
        let mut messages = 0;
        while messages < count {
            let frame = self.recv_skipping_heartbeats().await;
            if frame["type"] == "message" || frame["type"] == "hint" {
                messages += 1;
            }
            frames.push(frame);
        }
        frames
    }
}

/// The serials of the `message` frames, in order.
pub fn serials(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .filter(|frame| frame["type"] == "message")
        .map(|frame| frame["serial"].as_u64().unwrap())
        .collect()
}
