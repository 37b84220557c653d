//! `herald bench fanout` end to end with tiny settings: it starts its own server, runs every
//! phase, and reports figures that show messages really went through, so the command cannot
//! rot unnoticed.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The whole run: three guarantees x one group, two short phases each, ten idle connections.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn bench_fanout_measures_a_tiny_fan_out() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "bench",
            "fanout",
            "--subscribers",
            "2",
            "--durable-subscribers",
            "2",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--rate",
            "100",
            "--idle-connections",
            "10",
            "--drain-timeout",
            "10s",
            "--json",
        ])
        .env_remove("HERALD_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn herald bench fanout");
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("herald bench fanout did not finish within {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );

    let report: Value = serde_json::from_str(&stdout).expect("--json prints one JSON object");
    assert_eq!(report["server"]["started_by_bench"], true);
    let throughput = report["throughput"].as_array().unwrap();
    assert_eq!(throughput.len(), 3, "one row per guarantee: {report:#}");
    for row in throughput {
        assert_eq!(row["subscribers"], 2);
        assert!(row["published"].as_u64().unwrap() > 0, "{row:#}");
        assert!(
            row["delivered_per_second"].as_f64().unwrap() > 0.0,
            "{row:#}"
        );
        assert!(
            row["server_cpu_us_per_delivery"].as_f64().unwrap() > 0.0,
            "{row:#}"
        );
        let check = &row["check"];
        assert_eq!(
            check["expected_deliveries"],
            check["messages"].as_u64().unwrap() * 2
        );
        assert_eq!(check["out_of_order"], 0, "{row:#}");
    }
    let exactly_once = &throughput[1];
    assert_eq!(exactly_once["guarantee"], "exactly-once");
    assert_eq!(
        exactly_once["check"]["not_delivered"], 0,
        "{exactly_once:#}"
    );
    // At-least-once: everything delivered, acked, and the acks made durable in group commits.
    let durable = &throughput[2];
    assert_eq!(durable["guarantee"], "at-least-once");
    assert_eq!(durable["check"]["not_delivered"], 0, "{durable:#}");
    assert!(durable["ack_frames"].as_u64().unwrap() > 0, "{durable:#}");
    assert!(
        durable["serials_acked"].as_u64().unwrap() >= durable["ack_frames"].as_u64().unwrap(),
        "{durable:#}"
    );
    assert!(
        durable["acks_confirmed"].as_u64().unwrap() > 0,
        "{durable:#}"
    );
    assert!(
        durable["fsyncs_per_second"].as_f64().unwrap() > 0.0,
        "{durable:#}"
    );
    assert!(
        durable["server"]["subscriber_saves"].as_u64().unwrap() > 0,
        "{durable:#}"
    );
    for row in report["latency"].as_array().unwrap() {
        assert!(row["samples"].as_u64().unwrap() > 0, "{row:#}");
        let (p50, p99) = (
            row["p50_us"].as_u64().unwrap(),
            row["p99_us"].as_u64().unwrap(),
        );
        assert!(0 < p50 && p50 <= p99, "{row:#}");
    }
    assert_eq!(report["idle"]["connections"], 10);
    assert!(report["idle"]["rss_after_kib"].as_u64().unwrap() > 0);
    assert!(report["targets"]["idle_rss"]["met"].is_boolean());
    assert_eq!(report["problems"].as_array().unwrap().len(), 0);
}

#[test]
fn bench_fanout_prints_a_table_with_the_targets() {
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "bench",
            "fanout",
            "--subscribers",
            "100",
            "--guarantees",
            "at-most-once",
            "--duration",
            "500ms",
            "--warmup",
            "100ms",
            "--rate",
            "50",
            "--idle-connections",
            "0",
            "--drain-timeout",
            "10s",
        ])
        .env_remove("HERALD_KEY")
        .stdin(Stdio::null())
        .output()
        .expect("run herald bench fanout");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("delivered/s"), "{stdout}");
    assert!(
        stdout.contains("target fanout_100_at_most_once"),
        "{stdout}"
    );
    assert!(stdout.contains("idle: not measured"), "{stdout}");
}
