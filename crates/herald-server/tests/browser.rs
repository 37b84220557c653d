//! A real browser subscribes with `EventSource`: headless Chromium loads a page from a tiny
//! HTTP server run by the test, the page opens Herald's SSE stream cross-origin (CORS) and
//! POSTs every event it sees back to the test's `/report`. What only a browser can prove:
//! its own reconnect (after the stream's `retry:`) sends `Last-Event-ID` and resumes
//! exactly-once across a server restart, and `continuity_lost` reaches a page as a named event.
//!
//! Chromium is `$HERALD_CHROMIUM`, else `chromium` or `chromium-browser` on `PATH`. Without it
//! the tests print a loud notice and pass, unless `HERALD_REQUIRE_BROWSER=1` (CI), which makes
//! a missing browser a failure. Every test has one overall deadline; a failure prints every
//! report the page sent so far and the tail of the browser's log. The browser's whole process
//! group is killed when a test ends, however it ends.

mod common;

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Html;
use axum::routing::{get, post};
use common::TestServer;
use herald_server::config::{Config, NamespaceConfig};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The whole of one browser test, Chromium start-up included.
const TEST_BUDGET: Duration = Duration::from_secs(60);
/// Reports waiting for the test to read them; the page's POSTs wait when it is full.
const REPORTS_QUEUED_MAX: usize = 256;
/// More reports than any scenario sends means a runaway page (a reconnect loop): fail.
const REPORTS_KEPT_MAX: usize = 1000;
/// `EventSource.readyState` once the browser has given up on a stream (an HTTP error, a
/// wrong content type or a CORS failure): it never reconnects by itself.
const EVENT_SOURCE_CLOSED: u64 = 2;
/// How often a wait checks that the browser is still running.
const POLL: Duration = Duration::from_millis(250);

/// The page: one `EventSource` per entry of `SOURCES`, every event reported with a sequence
/// number (the POSTs may arrive out of order; the test sorts by `seq`).
const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>Herald EventSource test</title>
<script>
"use strict";
const SOURCES = __SOURCES__;
let seq = 0;
function report(source, kind, detail) {
  seq += 1;
  const body = JSON.stringify(Object.assign({ seq, source, kind }, detail));
  fetch("/report", { method: "POST", body }).catch(() => {});
}
function parse(data) {
  try { return JSON.parse(data); } catch (_) { return { unparsed: data }; }
}
report("page", "loaded", {});
for (const { name, url } of SOURCES) {
  const events = new EventSource(url);
  events.onopen = () => report(name, "open", {});
  events.onmessage = (event) =>
    report(name, "message", { id: event.lastEventId, data: parse(event.data) });
  for (const kind of ["subscribed", "continuity_lost", "gap", "skip", "server_error"]) {
    events.addEventListener(kind, (event) =>
      report(name, kind, { id: event.lastEventId, data: parse(event.data) }));
  }
  // Herald names its error frames `server_error`, so `error` is only ever the connection.
  events.addEventListener("error", () =>
    report(name, "connection_error", { readyState: events.readyState }));
}
</script>
"#;

/// The Chromium binary, or `None` (after a loud notice) when the test should skip.
fn chromium() -> Option<PathBuf> {
    let found = find_chromium();
    if found.is_none() {
        let required = std::env::var("HERALD_REQUIRE_BROWSER").is_ok_and(|value| value == "1");
        assert!(
            !required,
            "HERALD_REQUIRE_BROWSER=1 but no Chromium: install the `chromium` package or set \
             HERALD_CHROMIUM to the browser binary"
        );
        eprintln!(
            "\n########################################################################\n\
             ## SKIPPED browser test: no `chromium` or `chromium-browser` on PATH and\n\
             ## HERALD_CHROMIUM unset. Install Chromium (Debian: apt-get install\n\
             ## chromium) or set HERALD_REQUIRE_BROWSER=1 to make this a failure.\n\
             ########################################################################\n"
        );
    }
    found
}

fn find_chromium() -> Option<PathBuf> {
    if let Some(binary) = std::env::var_os("HERALD_CHROMIUM").filter(|value| !value.is_empty()) {
        // An explicit choice is used as given: a wrong path fails at launch, never skips.
        return Some(PathBuf::from(binary));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// A headless Chromium showing one URL; killed with its whole process group on drop.
struct Browser {
    child: Child,
    log: PathBuf,
    // Dropped after `drop` has killed the browser, so the profile is no longer in use.
    _dir: tempfile::TempDir,
}

impl Browser {
    fn launch(binary: &Path, url: &str) -> Browser {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("chromium.log");
        let output = File::create(&log).unwrap();
        let child = Command::new(binary)
            .args([
                "--headless=new",
                // Root in a container: the setuid/namespace sandbox is unavailable.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-extensions",
                // Environment proxies must not see the test's loopback traffic.
                "--no-proxy-server",
                // The page's console (CORS and network errors) goes to the log shown on failure.
                "--enable-logging=stderr",
            ])
            .arg(format!(
                "--user-data-dir={}",
                dir.path().join("profile").display()
            ))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            // Its own process group, so renderer and utility processes die with it.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", binary.display()));
        Browser {
            child,
            log,
            _dir: dir,
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines of the browser's output, without the D-Bus noise of a headless box.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|line| !line.contains("dbus")).collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test's own web server: serves the page at `/`, takes reports at `/report`.
struct PageServer {
    origin: String,
    listener: Option<TcpListener>,
    task: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Clone)]
struct PageState {
    html: Arc<str>,
    reports: mpsc::Sender<Value>,
}

impl PageServer {
    /// Binds first: Herald must know the page's origin (CORS) before the page knows Herald.
    async fn bind() -> PageServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        PageServer {
            origin,
            listener: Some(listener),
            task: None,
        }
    }

    /// Serves a page that opens `sources` (`(name, url)`); returns the reports it will send.
    fn serve(&mut self, sources: &[(&str, String)]) -> Reports {
        let sources: Vec<Value> = sources
            .iter()
            .map(|(name, url)| serde_json::json!({"name": name, "url": url}))
            .collect();
        let html = PAGE.replace("__SOURCES__", &Value::from(sources).to_string());
        let (reports, incoming) = mpsc::channel(REPORTS_QUEUED_MAX);
        let state = PageState {
            html: html.into(),
            reports,
        };
        let app = Router::new()
            .route("/", get(page))
            .route("/report", post(report))
            .with_state(state);
        let listener = self.listener.take().expect("serve once");
        self.task = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
        Reports {
            incoming,
            seen: Vec::new(),
            deadline: Instant::now() + TEST_BUDGET,
        }
    }

    fn url(&self) -> String {
        format!("{}/", self.origin)
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn page(State(state): State<PageState>) -> Html<String> {
    Html(state.html.to_string())
}

async fn report(State(state): State<PageState>, body: String) -> StatusCode {
    let Ok(report) = serde_json::from_str::<Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    match state.reports.send(report).await {
        Ok(()) => StatusCode::NO_CONTENT,
        Err(_) => StatusCode::GONE,
    }
}

/// Everything the page reported, in the page's order.
struct Reports {
    incoming: mpsc::Receiver<Value>,
    seen: Vec<Value>,
    deadline: Instant,
}

impl Reports {
    /// Reads reports until `done` holds; fails with everything seen at the test's deadline or
    /// when the browser exits.
    async fn wait_for(
        &mut self,
        browser: &mut Browser,
        what: &str,
        done: impl Fn(&Reports) -> bool,
    ) {
        while !done(self) {
            if let Some(closed) = self.seen.iter().find(|report| {
                report["kind"] == "connection_error" && report["readyState"] == EVENT_SOURCE_CLOSED
            }) {
                // A closed EventSource never reconnects: nothing more will come.
                let source = closed["source"].to_string();
                self.fail(
                    browser,
                    &format!("EventSource {source} gave up (CLOSED) while waiting for {what}"),
                );
            }
            let now = Instant::now();
            if now >= self.deadline {
                self.fail(browser, &format!("timed out waiting for {what}"));
            }
            if let Some(status) = browser.exited() {
                self.fail(
                    browser,
                    &format!("chromium exited ({status}) while waiting for {what}"),
                );
            }
            let wait = (self.deadline - now).min(POLL);
            if let Ok(report) = tokio::time::timeout(wait, self.incoming.recv()).await {
                let report = report.expect("the page server runs until the test ends");
                let seq = report["seq"].as_u64().unwrap_or(0);
                let at = self
                    .seen
                    .partition_point(|seen| seen["seq"].as_u64().unwrap_or(0) < seq);
                self.seen.insert(at, report);
                if self.seen.len() > REPORTS_KEPT_MAX {
                    self.fail(
                        browser,
                        "the page sent more reports than any scenario needs",
                    );
                }
            }
        }
    }

    fn fail(&self, browser: &Browser, why: &str) -> ! {
        let reports: Vec<String> = self.seen.iter().map(Value::to_string).collect();
        panic!(
            "{why}\n--- reports from the page ({}):\n{}\n--- chromium log tail:\n{}",
            reports.len(),
            reports.join("\n"),
            browser.log_tail()
        );
    }

    /// The reports of one kind from one source, in order.
    fn of(&self, source: &str, kind: &str) -> Vec<&Value> {
        self.seen
            .iter()
            .filter(|report| report["source"] == source && report["kind"] == kind)
            .collect()
    }

    /// The serials of the deliveries one source got, in order.
    fn serials(&self, source: &str) -> Vec<u64> {
        self.of(source, "message")
            .iter()
            .map(|report| report["data"]["serial"].as_u64().unwrap_or(0))
            .collect()
    }
}

/// Herald settings for a page at `origin`: CORS for it, and a short `retry:` so the browser
/// reconnects quickly.
fn for_page(origin: &str) -> impl FnOnce(&mut Config) + '_ {
    move |config| {
        config.http.cors_origins = vec![origin.to_owned()];
        config.realtime.sse_retry = Duration::from_millis(300);
    }
}

#[tokio::test]
async fn event_source_resumes_with_last_event_id_across_a_server_restart() {
    let Some(chromium) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut page = PageServer::bind().await;
    let herald = TestServer::start(dir.path(), for_page(&page.origin)).await;
    let herald_addr: SocketAddr = herald.addr;
    let mut reports = page.serve(&[(
        "feed",
        format!("http://{herald_addr}/v1/sse?channels=browser:feed"),
    )]);
    let mut browser = Browser::launch(&chromium, &page.url());

    // Live: the stream is subscribed before anything is published.
    reports
        .wait_for(&mut browser, "the stream's `subscribed` event", |r| {
            !r.of("feed", "subscribed").is_empty()
        })
        .await;
    let acks = herald.publish_numbers("browser:feed", 1, 5).await;
    let epoch = acks[0]["epoch"].as_str().unwrap().to_owned();
    reports
        .wait_for(&mut browser, "messages 1..=5 live", |r| {
            r.serials("feed").len() >= 5
        })
        .await;

    // Herald goes away: the stream ends and the browser retries every `retry:`, refused.
    herald.stop().await;
    // Messages 6..=10 are published while the browser cannot reach Herald (which runs on
    // another port of the same data dir meanwhile): they reach the page only if its reconnect
    // sends `Last-Event-ID` and Herald replays from it.
    let elsewhere = TestServer::start(dir.path(), for_page(&page.origin)).await;
    assert_ne!(
        elsewhere.addr, herald_addr,
        "the kernel reused the freed port: rerun"
    );
    let acks = elsewhere.publish_numbers("browser:feed", 6, 5).await;
    assert_eq!(
        acks[0]["epoch"],
        epoch.as_str(),
        "a restart keeps the epoch"
    );
    elsewhere.stop().await;
    reports
        .wait_for(&mut browser, "a refused reconnect attempt", |r| {
            r.of("feed", "connection_error").len() >= 2
        })
        .await;

    let herald = TestServer::start_on(dir.path(), herald_addr, for_page(&page.origin)).await;
    reports
        .wait_for(&mut browser, "messages 6..=10 replayed", |r| {
            r.serials("feed").len() >= 10
        })
        .await;
    // And the resumed stream is live again.
    herald.publish_numbers("browser:feed", 11, 2).await;
    reports
        .wait_for(&mut browser, "messages 11..=12 live", |r| {
            r.serials("feed").len() >= 12
        })
        .await;

    let check = |ok: bool, what: &str| {
        if !ok {
            reports.fail(&browser, what);
        }
    };
    check(
        reports.serials("feed") == (1..=12).collect::<Vec<u64>>(),
        "serials 1..=12, each once, in order",
    );
    for message in reports.of("feed", "message") {
        let serial = message["data"]["serial"].as_u64().unwrap();
        check(
            message["id"] == format!("{epoch}:{serial}").as_str(),
            "lastEventId is EPOCH:SERIAL",
        );
        check(
            message["data"]["data"]["n"] == serial,
            "the data is the published one",
        );
    }
    let subscribed = reports.of("feed", "subscribed");
    check(
        subscribed.len() == 2,
        "one subscription per successful connect",
    );
    check(
        subscribed[0]["data"]["continuity"] == "new",
        "the first connect starts live",
    );
    check(
        subscribed[1]["data"]["continuity"] == "held"
            && subscribed[1]["data"]["after"] == format!("{epoch}:5").as_str(),
        "the reconnect resumed after Last-Event-ID EPOCH:5",
    );
    check(
        reports.of("feed", "open").len() == 2,
        "exactly two successful opens",
    );
    check(
        reports.of("feed", "continuity_lost").is_empty()
            && reports.of("feed", "server_error").is_empty(),
        "no continuity_lost and no error event",
    );
    drop(browser);
    herald.stop().await;
}

#[tokio::test]
async fn event_source_gets_continuity_lost_as_a_named_event() {
    let Some(chromium) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut page = PageServer::bind().await;
    let herald = TestServer::start(dir.path(), |config| {
        for_page(&page.origin)(config);
        config.namespaces.insert(
            "small".into(),
            NamespaceConfig {
                retention_messages_max: Some(3),
                ..NamespaceConfig::default()
            },
        );
    })
    .await;
    let acks = herald.publish_numbers("small:expired", 1, 10).await;
    let epoch = acks[0]["epoch"].as_str().unwrap().to_owned();
    let acks = herald.publish_numbers("browser:other", 1, 3).await;
    let other_epoch = acks[0]["epoch"].as_str().unwrap().to_owned();
    let base = format!("http://{}/v1/sse", herald.addr);
    let mut reports = page.serve(&[
        // Retention keeps 8..=10: 3..=7 are gone.
        (
            "expired",
            format!("{base}?channels=small:expired&from={epoch}:2"),
        ),
        // A position from an epoch this channel never had: the current epoch comes whole.
        (
            "foreign",
            format!("{base}?channels=browser:other&from=elsewhere:2"),
        ),
    ]);
    let mut browser = Browser::launch(&chromium, &page.url());

    reports
        .wait_for(&mut browser, "continuity_lost then 8..=10", |r| {
            !r.of("expired", "continuity_lost").is_empty() && r.serials("expired").len() >= 3
        })
        .await;
    reports
        .wait_for(
            &mut browser,
            "continuity_lost on another epoch, then 1..=3",
            |r| !r.of("foreign", "continuity_lost").is_empty() && r.serials("foreign").len() >= 3,
        )
        .await;
    herald.publish_numbers("browser:other", 4, 1).await;
    reports
        .wait_for(&mut browser, "the next live message after the loss", |r| {
            r.serials("foreign").len() >= 4
        })
        .await;

    let check = |ok: bool, what: &str| {
        if !ok {
            reports.fail(&browser, what);
        }
    };
    let lost = reports.of("expired", "continuity_lost")[0];
    check(
        lost["data"]["reason"] == "retention"
            && lost["data"]["from"] == format!("{epoch}:3").as_str()
            && lost["data"]["to"] == format!("{epoch}:7").as_str(),
        "continuity_lost names the missed range 3..=7",
    );
    check(
        lost["id"] == format!("{epoch}:7").as_str(),
        "continuity_lost moves lastEventId past the missed range",
    );
    check(
        lost["seq"].as_u64() < reports.of("expired", "message")[0]["seq"].as_u64(),
        "continuity_lost comes before any message",
    );
    check(
        reports.serials("expired") == vec![8, 9, 10],
        "what is kept follows the loss",
    );
    let lost = reports.of("foreign", "continuity_lost")[0];
    check(
        lost["data"]["reason"] == "epoch_changed"
            && lost["data"]["from"] == "elsewhere:3"
            && lost["data"]["to"] == format!("{other_epoch}:0").as_str()
            && lost["id"] == format!("{other_epoch}:0").as_str(),
        "continuity_lost names the unknown epoch and restarts at the current one's start",
    );
    check(
        reports.serials("foreign") == vec![1, 2, 3, 4],
        "the current epoch is replayed whole, then delivery continues live",
    );
    check(
        reports.of("expired", "open").len() == 1 && reports.of("foreign", "open").len() == 1,
        "no reconnects",
    );
    drop(browser);
    herald.stop().await;
}
