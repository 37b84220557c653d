//! `herald verify` against a deployment it did not start: a real `herald serve` (not dev mode,
//! API keys from the environment) that the test runs, checked over `--url` and `--key`, with
//! connection cuts and pauses. Also: a key without the needed capabilities is refused (exit 3),
//! bad usage exits 2, and an unreachable server exits 4.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const KEY: &str = "verify-test-key-0123456789abcdef";
const READ_ONLY_KEY: &str = "verify-test-readonly-0123456789ab";

fn herald() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command.stdin(Stdio::null());
    for variable in [
        "HERALD_URL",
        "HERALD_KEY",
        "HERALD_DATA_DIR",
        "HERALD_HTTP_ADDR",
    ] {
        command.env_remove(variable);
    }
    command
}

/// A `herald serve` with two API keys; killed on drop.
struct Served {
    child: Child,
    url: String,
}

impl Served {
    fn start(data_dir: &Path) -> Served {
        let keys = format!(
            r#"[{{ name = "verify", key = "{KEY}", capabilities = [{{ namespaces = ["verify"], operations = ["publish", "subscribe", "history"] }}] }}, {{ name = "reader", key = "{READ_ONLY_KEY}", capabilities = [{{ namespaces = ["verify"], operations = ["subscribe"] }}] }}]"#
        );
        let mut child = herald()
            .args(["serve", "--no-mqtt", "--http", "127.0.0.1:0", "--data"])
            .arg(data_dir)
            .env("HERALD_API_KEYS", keys)
            .env("HERALD_REALTIME__HEARTBEAT_INTERVAL", "1s")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start herald serve");
        let stdout = child.stdout.take().unwrap();
        // Owned (and killed on drop) from here on, whatever happens below.
        let mut served = Served {
            child,
            url: String::new(),
        };
        let (lines_sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = lines_sender.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(remaining)
                .expect("herald serve prints its listening line");
            if let Some(url) = line.strip_prefix("herald: listening on ") {
                served.url = url.trim().to_owned();
                return served;
            }
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json_report(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(&stdout).unwrap_or_else(|error| {
        panic!(
            "no JSON report ({error}); stdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

#[test]
fn verify_checks_a_deployment_it_did_not_start_through_its_own_faults() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(&dir.path().join("data"));
    let output = herald()
        .args(["verify", "--json", "--url", &served.url, "--key", KEY])
        .args(["--duration", "4s", "--faults", "all", "--seed", "42"])
        .args(["--publishers", "2", "--channels", "2"])
        .output()
        .unwrap();
    let report = json_report(&output);
    assert_eq!(output.status.code(), Some(0), "{report:#}");
    assert_eq!(report["violations_total"], 0);
    assert_eq!(report["seed"], 42);
    assert_eq!(report["kills"], 0, "nothing is killed without --spawn");
    assert!(report["faults"].as_u64().unwrap() > 0, "{report:#}");
    assert!(
        report["messages_checked"].as_u64().unwrap() > 100,
        "{report:#}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr
            .lines()
            .filter(|line| line.starts_with("verify: "))
            .count()
            >= 3,
        "a progress line per second: {stderr}"
    );

    // The table, for people.
    let output = herald()
        .args(["verify", "--url", &served.url, "--key", KEY])
        .args(["--duration", "1s", "--faults", "none"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{table}");
    for expected in [
        "exactly-once  sse",
        "exactly-once  ws",
        "at-most-once  ws",
        "OK: no violation",
    ] {
        assert!(table.contains(expected), "{expected:?} in:\n{table}");
    }
}

#[test]
fn a_key_without_publish_is_refused_with_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(&dir.path().join("data"));
    let output = herald()
        .args(["verify", "--url", &served.url, "--key", READ_ONLY_KEY])
        .args(["--duration", "1s"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("403"), "{stderr}");
}

#[test]
fn usage_errors_exit_2_and_an_unreachable_server_exits_4() {
    let output = herald()
        .args(["verify", "--kill-every", "2s"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "--kill-every needs --spawn");
    let output = herald()
        .args(["verify", "--spawn", "--kill-every", "5s..2s"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "MIN..MAX out of order");
    let output = herald()
        .args(["verify", "--url", "https://127.0.0.1:1", "--duration", "1s"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "https is refused");
    let output = herald()
        .args(["verify", "--url", "http://127.0.0.1:1", "--channels", "0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "--channels 0");
    let started = Instant::now();
    let output = herald()
        .args(["verify", "--url", "http://127.0.0.1:1", "--duration", "1s"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(4), "{output:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let output = herald()
        .args(["verify", "--check", "/nonexistent/history.jsonl"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "a missing history file");
}

/// Reads SSE events (the `data:` of each) from `response` until one whose data contains
/// `until`, at most `WAIT`.
/// Reads SSE events until one whose data contains `until`: every event's `data:`, and the
/// last `id:` seen (what an `EventSource` would send back as `Last-Event-ID`).
async fn sse_events_until(
    response: &mut reqwest::Response,
    until: &str,
) -> (Vec<String>, Option<String>) {
    const WAIT: Duration = Duration::from_secs(10);
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut text = String::new();
    loop {
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .expect("an SSE event in time")
            .expect("the stream reads")
            .expect("the stream stays open");
        text.push_str(&String::from_utf8_lossy(&chunk));
        let events: Vec<String> = text
            .split("\n\n")
            .filter_map(|event| {
                event
                    .lines()
                    .find_map(|line| line.strip_prefix("data: ").map(str::to_owned))
            })
            .collect();
        if events.iter().any(|data| data.contains(until)) {
            let last_id = text
                .lines()
                .rev()
                .find_map(|line| line.strip_prefix("id: "))
                .map(str::to_owned);
            return (events, last_id);
        }
    }
}

/// Found while building `herald verify`: an exactly-once SSE stream started on a channel with
/// no message had no position for it, so after a drop it resumed live and silently missed what
/// was published meanwhile. The `subscribed` event now carries the id (`-` for that channel)
/// and `-` in a resume id starts the channel from its first message.
#[tokio::test]
async fn sse_exactly_once_on_an_empty_channel_loses_nothing_across_a_drop() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(&dir.path().join("data"));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let stream_url = format!("{}/v1/sse?channels=verify:empty", served.url);
    let open = |last_event_id: Option<String>| {
        let mut request = http.get(&stream_url).bearer_auth(KEY);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        request.send()
    };
    let mut first = open(None).await.unwrap();
    let (events, last_id) = sse_events_until(&mut first, "\"subscribed\"").await;
    assert!(events[0].contains("\"continuity\":\"new\""), "{events:?}");
    assert_eq!(
        last_id.as_deref(),
        Some("-"),
        "subscribed carries the resume id"
    );
    drop(first); // the connection drops before the channel's first message
    for n in 1..=3 {
        let ack = http
            .post(format!("{}/v1/channels/verify:empty/messages", served.url))
            .bearer_auth(KEY)
            .json(&serde_json::json!({"id": format!("m{n}"), "data": n}))
            .send()
            .await
            .unwrap();
        assert!(ack.status().is_success());
    }
    // What an EventSource does: reconnect with the last id it saw.
    let mut again = open(last_id).await.unwrap();
    let (events, _) = sse_events_until(&mut again, "\"subscribed\"").await;
    let publish_more = http
        .post(format!("{}/v1/channels/verify:empty/messages", served.url))
        .bearer_auth(KEY)
        .json(&serde_json::json!({"id": "m4", "data": 4}))
        .send()
        .await
        .unwrap();
    assert!(publish_more.status().is_success());
    let mut events = events;
    events.extend(sse_events_until(&mut again, "\"serial\":4,").await.0);
    let serials: Vec<&String> = events
        .iter()
        .filter(|data| data.contains("\"type\":\"message\""))
        .collect();
    assert_eq!(serials.len(), 4, "serials 1..=4, each once: {events:#?}");
    for (index, data) in serials.iter().enumerate() {
        assert!(
            data.contains(&format!("\"serial\":{},", index + 1)),
            "{events:#?}"
        );
    }
}
