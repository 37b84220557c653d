//! The crash loop (issue #4, item 4): the real binary, `herald verify --spawn --kill-every`,
//! under steady load from several publishers (SDK over WebSocket with idempotent retries, and
//! HTTP with forced retries) and subscribers of each guarantee over WebSocket and SSE, with
//! connection cuts and pauses, while the server is SIGKILLed at random instants and restarted
//! on the same port and data directory. After the final drain the checker must find zero
//! violations, and the kills must really have happened.
//!
//! The CI variant runs 20 s of load with a kill every 1.5..3 s (about 6-10 kills).
//! `HERALD_CRASH_LOOP_SECONDS=600` makes it a longer soak (same kill rate). The seed is printed
//! on stderr; `HERALD_CRASH_LOOP_SEED=<n>` replays its fault and kill schedule.
//!
//! The negative test proves the pipeline can fail: a recorded history, tampered, is re-checked
//! with `verify --check` and must exit 1 naming the violation.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use serde_json::Value;

const SECONDS_DEFAULT: u64 = 20;

fn herald() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .stdin(Stdio::null())
        .env_remove("HERALD_URL")
        .env_remove("HERALD_KEY");
    command
}

/// Runs a command to completion (each run is bounded by its own --duration and drain timeout).
fn run(command: &mut Command) -> Output {
    command.output().expect("run herald")
}

fn json_report(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(&stdout).unwrap_or_else(|error| {
        panic!(
            "verify did not print a JSON report ({error}); stdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

#[test]
fn kill9_crash_loop_finds_zero_violations() {
    let seconds: u64 = std::env::var("HERALD_CRASH_LOOP_SECONDS")
        .ok()
        .map(|text| {
            text.parse()
                .expect("HERALD_CRASH_LOOP_SECONDS must be an integer")
        })
        .unwrap_or(SECONDS_DEFAULT);
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("history.jsonl");
    let mut command = herald();
    command
        .args(["verify", "--spawn", "--json", "--faults", "all"])
        .args(["--duration", &format!("{seconds}s")])
        .args(["--kill-every", "1500ms..3s"])
        .args([
            "--publishers",
            "3",
            "--subscribers-per-guarantee",
            "2",
            "--channels",
            "3",
        ])
        .args(["--drain-timeout", "30s"])
        .arg("--data")
        .arg(dir.path().join("data"))
        .arg("--history")
        .arg(&history);
    if let Ok(seed) = std::env::var("HERALD_CRASH_LOOP_SEED") {
        command.args(["--seed", &seed]);
    }
    let started = Instant::now();
    let output = run(&mut command);
    let report = json_report(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!(
        "crash loop: {:?}, seed {}, {} kills, {} deliveries and {} acks checked, {} faults, {} violations",
        started.elapsed(),
        report["seed"],
        report["kills"],
        report["messages_checked"],
        report["acks"],
        report["faults"],
        report["violations_total"]
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "verify failed; report:\n{report:#}\nstderr tail:\n{}",
        stderr.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(report["ok"], true);
    assert_eq!(report["violations_total"], 0, "{report:#}");
    assert_eq!(report["drain_complete"], true, "{report:#}");
    let kills = report["kills"].as_u64().unwrap();
    assert!(kills >= 2, "the server was killed {kills} times");
    assert!(
        report["messages_checked"].as_u64().unwrap() > 1000,
        "{report:#}"
    );
    // Every guarantee x surface was exercised and checked.
    let rows = report["rows"].as_array().unwrap();
    for (guarantee, surface) in [
        ("exactly-once", "ws"),
        ("exactly-once", "sse"),
        ("at-most-once", "ws"),
        ("at-most-once", "sse"),
        ("publish", "ws"),
        ("publish", "http"),
    ] {
        let row = rows
            .iter()
            .find(|row| row["guarantee"] == guarantee && row["surface"] == surface)
            .unwrap_or_else(|| panic!("no row for {guarantee} {surface}: {report:#}"));
        assert!(
            row["messages_checked"].as_u64().unwrap() > 0,
            "{guarantee} {surface} checked nothing"
        );
    }
    // The history really shows the kills, the restarts and resumes across them.
    let text = std::fs::read_to_string(&history).unwrap();
    let count = |kind: &str| {
        text.lines()
            .filter(|line| line.contains(&format!("\"kind\":\"{kind}\"")))
            .count() as u64
    };
    assert_eq!(count("kill"), kills);
    assert_eq!(count("restart"), kills);
    assert!(
        text.lines()
            .any(|line| line.contains("\"continuity\":\"held\"")),
        "exactly-once subscribers resumed"
    );
}

/// A short run without kills, recorded, then re-checked as is and tampered.
#[test]
fn verify_check_detects_a_tampered_history() {
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("history.jsonl");
    let output = run(herald()
        .args([
            "verify",
            "--spawn",
            "--json",
            "--faults",
            "drops",
            "--duration",
            "3s",
        ])
        .args(["--seed", "7", "--channels", "1"])
        .arg("--history")
        .arg(&history));
    assert_eq!(output.status.code(), Some(0), "{:#}", json_report(&output));
    let recorded = std::fs::read_to_string(&history).unwrap();
    let lines: Vec<&str> = recorded.lines().collect();

    // As recorded: clean.
    let clean = recheck(&history);
    assert_eq!(clean.status.code(), Some(0));
    assert_eq!(json_report(&clean)["violations_total"], 0);

    let is_delivery = |line: &&str, subscriber: &str| {
        line.contains("\"kind\":\"delivery\"")
            && line.contains(&format!("\"subscriber\":\"{subscriber}\""))
    };
    // 1. One delivery to an exactly-once WebSocket subscriber repeated: a duplicate.
    let index = lines
        .iter()
        .rposition(|line| is_delivery(line, "ws-eo-0"))
        .expect("a delivery to ws-eo-0");
    let mut tampered: Vec<&str> = lines.clone();
    tampered.insert(index + 1, lines[index]);
    assert_violation(dir.path(), &tampered, "duplicates", 1);

    // 2. One delivery in the middle of an SSE exactly-once stream removed: a silent gap.
    let deliveries: Vec<usize> = (0..lines.len())
        .filter(|index| is_delivery(&lines[*index], "sse-eo-0"))
        .collect();
    assert!(
        deliveries.len() > 10,
        "only {} deliveries",
        deliveries.len()
    );
    let mut tampered = lines.clone();
    tampered.remove(deliveries[deliveries.len() / 2]);
    assert_violation(dir.path(), &tampered, "silent_gaps", 1);

    // 3. The last delivery to an exactly-once subscriber removed: an acked message lost.
    let mut tampered = lines.clone();
    tampered.remove(*deliveries.last().unwrap());
    assert_violation(dir.path(), &tampered, "lost", 1);

    // 4. An ack moved to another serial: idempotency.
    let ack = lines
        .iter()
        .position(|line| line.contains("\"kind\":\"ack\"") && line.contains("\"serial\":2,"))
        .expect("an ack at serial 2");
    let moved = lines[ack].replace("\"serial\":2,", "\"serial\":999999,");
    let mut tampered = lines.clone();
    tampered.insert(ack + 1, &moved);
    assert_violation(dir.path(), &tampered, "idempotency", 1);
}

fn recheck(path: &Path) -> Output {
    run(herald().args(["verify", "--json", "--check"]).arg(path))
}

/// `verify --check` on `lines` exits 1 with exactly `count` violations of `check`, and lists
/// it.
fn assert_violation(dir: &Path, lines: &[&str], check: &str, count: u64) {
    let path = dir.join(format!("tampered-{check}.jsonl"));
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let output = recheck(&path);
    let report = json_report(&output);
    assert_eq!(output.status.code(), Some(1), "{check}: {report:#}");
    assert_eq!(report["violations_total"], count, "{check}: {report:#}");
    assert_eq!(report["totals"][check], count, "{check}: {report:#}");
    let listed = report["violations"].as_array().unwrap();
    assert!(
        listed.iter().any(|violation| violation["check"] == check),
        "{check}: {report:#}"
    );
    // The table names it too.
    let table = run(herald().args(["verify", "--check"]).arg(&path));
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains(&format!("VIOLATION {check}")), "{text}");
    assert_eq!(table.status.code(), Some(1));
}
