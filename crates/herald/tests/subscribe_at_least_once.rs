//! `herald subscribe --guarantee at-least-once` against a real `herald serve`: JSON lines with
//! the delivery count, `--ack auto` acking what was printed, `--ack manual` acking what stdin
//! says (and only that), a takeover ending the first subscriber, and usage errors.
//!
//! A new subscriber starts at the channel's top, so each test waits for the `subscribed`
//! notice on stderr before publishing. Every wait is bounded.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn herald() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    for variable in [
        "HERALD_URL",
        "HERALD_KEY",
        "HERALD_DATA_DIR",
        "HERALD_HTTP_ADDR",
    ] {
        command.env_remove(variable);
    }
    command.stdin(Stdio::null());
    command
}

/// Lines of a child's stream, read on a thread.
fn lines_of(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// A `herald serve` child on a fresh port, killed on drop.
struct Served {
    child: Child,
    url: String,
    data: std::path::PathBuf,
}

impl Served {
    fn start(data: &Path) -> Served {
        let mut child = herald()
            .arg("serve")
            .arg("--data")
            .arg(data)
            .args(["--http", "127.0.0.1:0", "--no-mqtt"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn herald serve");
        let lines = lines_of(child.stdout.take().unwrap());
        let mut served = Served {
            child,
            url: String::new(),
            data: data.to_owned(),
        };
        let deadline = Instant::now() + WAIT;
        loop {
            let line = lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("herald serve prints its listening line");
            if let Some(url) = line.strip_prefix("herald: listening on ") {
                served.url = url.to_owned();
                return served;
            }
        }
    }

    /// `herald ARGS --url URL --data DIR`.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = herald();
        command
            .args(args)
            .args(["--url", &self.url, "--data"])
            .arg(&self.data);
        command
    }

    fn publish(&self, channel: &str, data: &str) {
        let output = self
            .command(&["publish", channel, data])
            .output()
            .expect("run herald publish");
        assert!(
            output.status.success(),
            "publish: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `herald subscribe`, its stdout and stderr read line by line.
struct Subscriber {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    stderr_seen: Vec<String>,
}

impl Subscriber {
    fn spawn(mut command: Command) -> Subscriber {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn herald subscribe");
        let stdin = child.stdin.take();
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        Subscriber {
            child,
            stdin,
            stdout,
            stderr,
            stderr_seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `text`.
    fn wait_stderr(&mut self, text: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let Ok(line) = self
                .stderr
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            else {
                panic!("no stderr line with {text:?}; saw {:?}", self.stderr_seen);
            };
            self.stderr_seen.push(line.clone());
            if line.contains(text) {
                return line;
            }
        }
    }

    /// The next stdout line, as JSON.
    fn next_line(&mut self) -> Value {
        let line = self
            .stdout
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("no delivery line; stderr {:?}", self.stderr_seen));
        serde_json::from_str(&line).unwrap_or_else(|error| panic!("{line:?}: {error}"))
    }

    fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the exit; returns its code and the rest of stderr.
    fn wait(mut self) -> (i32, Vec<String>) {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "herald subscribe did not exit; stderr {:?}",
                    self.stderr_seen
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = std::mem::take(&mut self.stderr_seen);
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(2)) {
            stderr.push(line);
        }
        (status.code().expect("exited normally"), stderr)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn at_least_once(server: &Served, channel: &str, id: &str, extra: &[&str]) -> Subscriber {
    let mut args = vec![
        "subscribe",
        channel,
        "--guarantee",
        "at-least-once",
        "--subscriber-id",
        id,
    ];
    args.extend_from_slice(extra);
    let mut subscriber = Subscriber::spawn(server.command(&args));
    subscriber.wait_stderr("subscribed (at-least-once");
    subscriber
}

/// `(serial, delivery)` of a printed line.
fn serial_and_delivery(line: &Value) -> (u64, u64) {
    (
        line["serial"].as_u64().expect("serial"),
        line["delivery"].as_u64().expect("delivery"),
    )
}

#[test]
fn auto_acks_what_was_printed_so_the_next_run_goes_on_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path());
    let mut first = at_least_once(&server, "jobs:cli", "auto", &["--count", "2"]);
    for n in 1..=3 {
        server.publish("jobs:cli", &format!(r#"{{"n":{n}}}"#));
    }
    let printed = [first.next_line(), first.next_line()];
    assert_eq!(serial_and_delivery(&printed[0]), (1, 1));
    assert_eq!(serial_and_delivery(&printed[1]), (2, 1));
    assert_eq!(printed[0]["data"], serde_json::json!({"n": 1}));
    assert_eq!(printed[0]["channel"], "jobs:cli");
    let (code, stderr) = first.wait();
    assert_eq!(code, 0, "{stderr:?}");
    assert!(
        stderr.iter().all(|line| !line.contains("may")),
        "the acks are confirmed before the exit: {stderr:?}"
    );

    // 1 and 2 were printed and acked: the next run starts with 3 (maybe delivered before,
    // unprinted, to the first run: then it comes with delivery 2).
    let mut second = at_least_once(&server, "jobs:cli", "auto", &["--count", "1"]);
    let line = second.next_line();
    assert_eq!(line["serial"], 3, "{line}");
    assert_eq!(line["data"], serde_json::json!({"n": 3}));
    let (code, stderr) = second.wait();
    assert_eq!(code, 0, "{stderr:?}");
}

#[test]
fn manual_acks_come_from_stdin_and_only_those_serials_are_acked() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path());
    let mut first = at_least_once(
        &server,
        "jobs:manual",
        "m",
        &["--ack", "manual", "--count", "3", "--ack-wait", "60000"],
    );
    for n in 1..=3 {
        server.publish("jobs:manual", &format!(r#"{{"n":{n}}}"#));
    }
    let lines = [first.next_line(), first.next_line(), first.next_line()];
    let serials: Vec<(u64, u64)> = lines.iter().map(serial_and_delivery).collect();
    assert_eq!(serials, vec![(1, 1), (2, 1), (3, 1)]);
    let second_position = lines[1]["position"].as_str().unwrap().to_owned();
    first.send_line("not a position");
    first.send_line(&second_position);
    first.wait_stderr(&format!("acked {second_position}"));
    first.close_stdin();
    let (code, stderr) = first.wait();
    assert_eq!(code, 0, "{stderr:?}");
    assert!(
        stderr
            .iter()
            .any(|line| line.contains("\"not a position\" skipped")),
        "a malformed ack line is reported: {stderr:?}"
    );

    // 1 and 3 were not acked: they come again, with their delivery count. `through 3` acks
    // both at once.
    let mut second = at_least_once(&server, "jobs:manual", "m", &["--ack", "manual"]);
    let again = [second.next_line(), second.next_line()];
    let serials: Vec<(u64, u64)> = again.iter().map(serial_and_delivery).collect();
    assert_eq!(serials, vec![(1, 2), (3, 2)]);
    let third_position = again[1]["position"].as_str().unwrap().to_owned();
    second.send_line(&format!("through {third_position}"));
    second.wait_stderr(&format!("acked through {third_position}"));
    second.close_stdin();
    let (code, stderr) = second.wait();
    assert_eq!(code, 0, "{stderr:?}");

    let mut third = at_least_once(&server, "jobs:manual", "m", &["--count", "1"]);
    server.publish("jobs:manual", r#"{"n":4}"#);
    assert_eq!(serial_and_delivery(&third.next_line()), (4, 1));
    let (code, stderr) = third.wait();
    assert_eq!(code, 0, "{stderr:?}");
}

#[test]
fn a_second_subscriber_with_the_same_id_takes_over_and_the_first_exits() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path());
    let first = at_least_once(&server, "jobs:take", "t", &[]);
    let mut second = at_least_once(&server, "jobs:take", "t", &["--count", "1"]);
    let (code, stderr) = first.wait();
    assert_eq!(code, 1, "{stderr:?}");
    assert!(
        stderr.iter().any(|line| line.contains("taken over")),
        "{stderr:?}"
    );
    server.publish("jobs:take", "1");
    assert_eq!(serial_and_delivery(&second.next_line()), (1, 1));
    let (code, stderr) = second.wait();
    assert_eq!(code, 0, "{stderr:?}");
}

#[test]
fn at_least_once_usage_errors_exit_2_before_connecting() {
    for args in [
        vec!["subscribe", "a", "--guarantee", "at-least-once"],
        vec![
            "subscribe",
            "a",
            "b",
            "--guarantee",
            "at-least-once",
            "--subscriber-id",
            "w",
        ],
        vec![
            "subscribe",
            "a",
            "--guarantee",
            "at-least-once",
            "--subscriber-id",
            "w",
            "--from",
            "E:1",
        ],
        vec![
            "subscribe",
            "a",
            "--guarantee",
            "at-least-once",
            "--subscriber-id",
            "has space",
        ],
        vec!["subscribe", "a", "--subscriber-id", "w"],
        vec!["subscribe", "a", "--ack", "manual"],
        vec![
            "subscribe",
            "a",
            "--guarantee",
            "at-least-once",
            "--subscriber-id",
            "w",
            "--ack",
            "sometimes",
        ],
    ] {
        // Port 9 (discard): nothing answers there, so a command that got past its usage
        // checks would fail with another code.
        let output = herald()
            .args(&args)
            .args(["--url", "http://127.0.0.1:9"])
            .output()
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
