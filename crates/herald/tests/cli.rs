//! The real `herald` binary: `serve` as a child process, `publish` and `history` against it,
//! `config init` / `config check`, and the documented exit codes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

fn herald() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    // Client settings come only from the flags each test passes.
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

/// A `herald serve` child, killed on drop.
struct Served {
    child: Child,
    url: String,
    stdout_lines: Vec<String>,
    /// The rest of stdout, line by line, after the listening line.
    lines: mpsc::Receiver<String>,
}

impl Served {
    fn start(data_dir: &Path, extra: &[&str]) -> Served {
        let mut child = herald()
            .arg("serve")
            .arg("--data")
            .arg(data_dir)
            .args(["--http", "127.0.0.1:0"])
            // The default MQTT address 127.0.0.1:1883 is shared by every test: off unless asked.
            .args((!extra.contains(&"--mqtt")).then_some("--no-mqtt"))
            .args(extra)
            .env("HERALD_STORAGE__RECLAIM_INTERVAL", "1s")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn herald serve");
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        // Owned by `Served` from here on, so a failed start still kills the process.
        let mut served = Served {
            child,
            url: String::new(),
            stdout_lines: Vec::new(),
            lines,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let line = served
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("herald serve prints its listening line");
            served.stdout_lines.push(line.clone());
            if let Some(url) = line.strip_prefix("herald: listening on ") {
                served.url = url.to_owned();
                return served;
            }
        }
    }

    /// SIGTERM, then the exit status (graceful shutdown).
    fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "herald serve ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(command: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().expect("run herald");
    (
        status.code().expect("exited normally"),
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

#[test]
fn publish_and_history_against_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path(), &[]);
    // First start: the generated admin key is announced before the listening line.
    assert_eq!(server.stdout_lines.len(), 2, "{:?}", server.stdout_lines);
    let key_line = &server.stdout_lines[0];
    let key = std::fs::read_to_string(dir.path().join("admin.key")).unwrap();
    assert!(
        key_line.starts_with("herald: generated admin key "),
        "{key_line}"
    );
    assert!(key_line.contains(key.trim()));

    let client = |args: &[&str]| {
        let mut command = herald();
        command
            .args(args)
            .args(["--url", &server.url, "--data"])
            .arg(dir.path());
        run(&mut command)
    };

    // The CLI finds the admin key in the data dir by itself.
    let (code, stdout, stderr) = client(&[
        "publish",
        "chat:cli",
        r#"{"n": 1}"#,
        "--id",
        "first",
        "--name",
        "note",
        "--header",
        "lang=en",
        "--ttl",
        "1h",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.trim().ends_with(":1 id=first"), "{stdout}");
    let epoch = stdout.split(':').next().unwrap().to_owned();

    let (code, stdout, _) = client(&["publish", "chat:cli", "plain words"]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with(&format!("{epoch}:2 id=")), "{stdout}");

    let (code, stdout, _) = client(&[
        "publish",
        "chat:cli",
        r#"{"n": 1}"#,
        "--id",
        "first",
        "--name",
        "note",
        "--header",
        "lang=en",
        "--ttl",
        "1h",
        "--json",
    ]);
    assert_eq!(code, 0);
    let ack: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (ack["duplicate"].as_bool(), ack["serial"].as_u64()),
        (Some(true), Some(1))
    );

    let (code, _, stderr) = client(&["publish", "chat:cli", "2", "--id", "first"]);
    assert_eq!(code, 3, "a reused id is a rejection");
    assert!(stderr.contains("id_conflict"), "{stderr}");

    let (code, stdout, stderr) = client(&["history", "chat:cli"]);
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].starts_with(&format!("{epoch}:1\t")));
    assert!(
        lines[0].contains("\tfirst\tnote\t{\"n\":1}"),
        "{}",
        lines[0]
    );
    assert!(lines[1].ends_with("\"plain words\""), "{}", lines[1]);

    let (code, stdout, _) = client(&[
        "history",
        "chat:cli",
        "--after",
        &format!("{epoch}:1"),
        "--json",
    ]);
    assert_eq!(code, 0);
    let page: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(page["messages"].as_array().unwrap().len(), 1);
    assert_eq!(page["top"], format!("{epoch}:2"));

    let (code, stdout, _) = client(&[
        "history",
        "chat:cli",
        "--before",
        &format!("{epoch}:3"),
        "--limit",
        "1",
    ]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with(&format!("{epoch}:2\t")), "{stdout}");

    let (code, _, stderr) = client(&["history", "chat:cli", "--after", "nope"]);
    assert_eq!(code, 3);
    assert!(stderr.contains("invalid_position"), "{stderr}");

    let (code, _, stderr) = client(&["history", "chat:cli", "--after", "Other:1"]);
    assert_eq!(code, 3);
    assert!(
        stderr.contains("continuity_lost") && stderr.contains("reason=epoch_changed"),
        "{stderr}"
    );

    let (code, _, stderr) = client(&["publish", "chat:cli", "1", "--ttl", "100days"]);
    assert_eq!(code, 3);
    assert!(stderr.contains("invalid_ttl"), "{stderr}");

    // A wrong key is refused; the exit code says "rejected", not "unreachable".
    let (code, _, stderr) = client(&["history", "chat:cli", "--key", "wrong-key-wrong-key"]);
    assert_eq!(code, 3);
    assert!(stderr.contains("unauthorized"), "{stderr}");

    // Usage errors.
    let (code, _, _) = client(&["history", "chat:cli", "--after", "a:1", "--before", "a:2"]);
    assert_eq!(code, 2);
    let (code, _, _) = client(&["publish", "chat:cli", "1", "--header", "novalue"]);
    assert_eq!(code, 2);

    // A restart reuses the key (no new key line) and keeps the messages.
    let status = server.terminate();
    assert!(
        status.success(),
        "graceful shutdown exits 0, got {status:?}"
    );
    let server = Served::start(dir.path(), &[]);
    assert_eq!(server.stdout_lines.len(), 1, "{:?}", server.stdout_lines);
    let mut command = herald();
    command
        .args(["history", "chat:cli", "--url", &server.url, "--data"])
        .arg(dir.path());
    let (code, stdout, _) = run(&mut command);
    assert_eq!(code, 0);
    assert_eq!(stdout.lines().count(), 2);
}

#[test]
fn unreachable_server_exits_4() {
    // Bind and drop a listener to get a local port that nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run(herald()
        .args([
            "publish",
            "x",
            "1",
            "--url",
            &format!("http://127.0.0.1:{port}"),
            "--data",
        ])
        .arg(dir.path()));
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("cannot reach"), "{stderr}");
}

#[test]
fn config_init_output_checks_and_bad_configs_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, _) = run(herald().args(["config", "init"]));
    assert_eq!(code, 0);
    let file = dir.path().join("herald.toml");
    std::fs::write(&file, &stdout).unwrap();
    let (code, stdout, stderr) = run(herald().args(["config", "check"]).arg(&file));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok"));

    std::fs::write(&file, "[namespaces.chat]\ndedupe_window = \"10s\"\n").unwrap();
    let (code, _, stderr) = run(herald().args(["config", "check"]).arg(&file));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("namespaces.chat") && stderr.contains("2 minutes"),
        "{stderr}"
    );

    std::fs::write(&file, "[limits]\nmessage_bytes_maxx = 1\n").unwrap();
    let (code, _, stderr) = run(herald().args(["config", "check"]).arg(&file));
    assert_eq!(code, 1);
    assert!(stderr.contains("message_bytes_maxx"), "{stderr}");

    let (code, _, stderr) = run(herald()
        .args(["config", "check"])
        .arg(dir.path().join("missing.toml")));
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot read"), "{stderr}");
}

#[test]
fn serve_refuses_dev_on_a_non_loopback_address_and_bad_env() {
    let dir = tempfile::tempdir().unwrap();
    // TEST-NET-1 is never local, so nothing could be bound here even without the check.
    let (code, _, stderr) = run(herald()
        .args([
            "serve",
            "--dev",
            "--no-mqtt",
            "--http",
            "192.0.2.1:7600",
            "--data",
        ])
        .arg(dir.path()));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("--dev") && stderr.contains("loopback"),
        "{stderr}"
    );

    let (code, _, stderr) = run(herald()
        .args(["serve", "--no-mqtt", "--http", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .env("HERALD_LIMITS__MESSAGE_BYTES_MAX", "0"));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("limits") && stderr.contains("message_bytes_max"),
        "{stderr}"
    );
}

#[test]
fn serve_prints_the_mqtt_address_it_listens_on() {
    let dir = tempfile::tempdir().unwrap();
    // Port 0, not the default 1883: tests run in parallel, and 1883 may be a real broker's.
    let server = Served::start(dir.path(), &["--dev", "--mqtt", "127.0.0.1:0"]);
    let line = server
        .lines
        .recv_timeout(STARTUP_TIMEOUT)
        .expect("a second start-up line");
    let addr: std::net::SocketAddr = line
        .strip_prefix("herald: mqtt listening on mqtt://")
        .unwrap_or_else(|| panic!("expected the MQTT listening line, got {line:?}"))
        .parse()
        .expect("a socket address");
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    // Something accepts MQTT connections there.
    std::net::TcpStream::connect(addr).expect("the MQTT listener accepts connections");
    assert!(server.terminate().success());
}

#[test]
fn serve_with_the_mqtt_port_taken_exits_with_an_actionable_error() {
    let dir = tempfile::tempdir().unwrap();
    // The test holds the port, as another MQTT broker on 1883 would.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut child = herald()
        .args([
            "serve",
            "--dev",
            "--http",
            "127.0.0.1:0",
            "--mqtt",
            &addr,
            "--data",
        ])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn herald serve");
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("herald serve kept running without its MQTT listener");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    for expected in [
        format!("MQTT listener cannot bind {addr}"),
        "address already in use".to_owned(),
        "--mqtt ADDR".to_owned(),
        "--no-mqtt".to_owned(),
    ] {
        assert!(stderr.contains(&expected), "{expected:?} not in {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    drop(taken);
}

#[test]
fn a_second_server_on_the_same_data_dir_refuses_to_start() {
    let data = tempfile::tempdir().unwrap();
    let first = Served::start(data.path(), &["--dev"]);
    let mut second = herald()
        .arg("serve")
        .arg("--data")
        .arg(data.path())
        .args(["--http", "127.0.0.1:0", "--dev", "--no-mqtt"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn second herald serve");
    // Without the lock the second server would run; give it a bounded time to refuse.
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("a second server on the same data dir kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "second server must fail to start: {stderr}"
    );
    assert!(
        stderr.contains("in use by another herald process"),
        "{stderr}"
    );
    // The first server is unaffected and still accepts publishes.
    let (code, stdout, stderr) = run(herald().args([
        "publish",
        "--url",
        &first.url,
        "lock:check",
        "1",
        "--id",
        "after-refusal",
    ]));
    assert_eq!(code, 0, "{stdout}{stderr}");
    let status = first.terminate();
    assert!(status.success());
    // Once the first server is gone, the lock is free again.
    let again = Served::start(data.path(), &["--dev"]);
    drop(again);
}

/// `herald subscribe` and `herald history --follow` against the real binary: JSON lines with
/// the stored data, resume `--from`, live messages after history, and usage errors.
#[test]
fn subscribe_and_follow_print_history_then_live_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path(), &[]);
    let with_server = |command: &mut Command| {
        command
            .args(["--url", &server.url, "--data"])
            .arg(dir.path());
    };
    let publish = |data: &str| {
        let mut command = herald();
        command.args(["publish", "feed:cli", data, "--json"]);
        with_server(&mut command);
        let (code, stdout, stderr) = run(&mut command);
        assert_eq!(code, 0, "{stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()
    };
    let first = publish(r#"{"n":1,"price":1.50}"#);
    publish(r#"{"n":2}"#);
    let epoch = first["epoch"].as_str().unwrap().to_owned();

    // Resume after serial 1; a third message is published while the subscriber waits.
    let mut subscriber = herald();
    subscriber.args([
        "subscribe",
        "feed:cli",
        "--from",
        &format!("{epoch}:1"),
        "--count",
        "2",
    ]);
    with_server(&mut subscriber);
    let subscriber = subscriber
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    publish(r#"{"n":3}"#);
    let output = wait_with_deadline(subscriber, Duration::from_secs(20));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let serials: Vec<u64> = lines
        .iter()
        .map(|line| line["serial"].as_u64().unwrap())
        .collect();
    assert_eq!(serials, vec![2, 3]);
    assert_eq!(lines[1]["data"], serde_json::json!({"n": 3}));
    assert_eq!(lines[0]["channel"], "feed:cli");

    // `--follow` prints everything retained, then keeps going; it is stopped by the test.
    let mut follower = herald();
    follower.args(["history", "feed:cli", "--follow"]);
    with_server(&mut follower);
    let mut follower = follower
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    for expected in 1..=4u64 {
        if expected == 4 {
            publish(r#"{"n":4}"#);
        }
        let line = lines_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("history --follow prints the next message");
        assert!(
            line.starts_with(&format!("{epoch}:{expected}\t")),
            "line {expected}: {line}"
        );
        seen.push(line);
    }
    // The stored JSON text is printed as published (number spelling kept).
    assert!(seen[0].ends_with(r#"{"n":1,"price":1.50}"#), "{}", seen[0]);
    let _ = follower.kill();
    let _ = follower.wait();

    // Usage errors exit 2 before connecting.
    for args in [
        vec!["subscribe", "feed:cli", "--from", "nonsense"],
        vec!["subscribe", "a", "b", "--from", "E:1"],
        vec!["subscribe", "feed:cli", "--guarantee", "sometimes"],
    ] {
        let mut command = herald();
        command.args(&args);
        with_server(&mut command);
        let (code, _, stderr) = run(&mut command);
        assert_eq!(code, 2, "{args:?}: {stderr}");
    }
}

/// Waits for a child, killing it if it runs past `limit`.
fn wait_with_deadline(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the command did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}
