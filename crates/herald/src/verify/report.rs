//! What `herald verify` prints: a table per guarantee and surface (stdout), the violations
//! with the history lines that show them, or the whole report as JSON (`--json`).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::check::{self, Check, Report};
use super::{EXIT_VIOLATION, history};

/// The JSON document of `--json`.
#[derive(Serialize)]
pub struct Output<'a> {
    pub ok: bool,
    pub seed: Option<u64>,
    pub url: Option<&'a str>,
    pub history: Option<String>,
    pub history_lines: usize,
    pub violations_total: u64,
    #[serde(flatten)]
    pub report: &'a Report,
}

/// The human table.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let header = [
        "guarantee",
        "surface",
        "subs",
        "checked",
        "reported",
        "lost",
        "dup",
        "order",
        "silent_gap",
        "unexpected",
        "idempotency",
        "resume",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|cell| cell.to_string()).collect()];
    for row in &report.rows {
        let mut cells = vec![
            row.guarantee.clone(),
            row.surface.clone(),
            row.subscribers.to_string(),
            row.messages_checked.to_string(),
            row.reported_missed.to_string(),
        ];
        for check in [
            Check::Lost,
            Check::Duplicates,
            Check::Order,
            Check::SilentGaps,
            Check::Unexpected,
            Check::Idempotency,
            Check::Resume,
        ] {
            cells.push(row.violations.get(check).to_string());
        }
        rows.push(cells);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|column| rows.iter().map(|row| row[column].len()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(column, (cell, width))| {
                if column < 2 {
                    format!("{cell:<width$}")
                } else {
                    format!("{cell:>width$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    let _ = writeln!(
        out,
        "\n{} deliveries and {} acks checked; {} faults injected, {} server kills, {} reconnects, {} subscription errors; drain {}",
        report.messages_checked,
        report.acks,
        report.faults,
        report.kills,
        report.reconnects,
        report.subscription_errors,
        match report.drain_complete {
            Some(true) => "complete",
            Some(false) => "INCOMPLETE (timed out)",
            None => "not recorded",
        }
    );
    for violation in &report.violations {
        let _ = writeln!(
            out,
            "VIOLATION {} {}{} {}{}",
            violation.check.name(),
            violation.channel,
            violation
                .subscriber
                .as_deref()
                .map(|subscriber| format!(" [{subscriber}]"))
                .unwrap_or_default(),
            violation.detail,
            violation
                .line
                .map(|line| format!(" (history line {line})"))
                .unwrap_or_default(),
        );
    }
    let total = report.violation_count();
    if total == 0 {
        let _ = writeln!(out, "OK: no violation");
    } else {
        let _ = writeln!(
            out,
            "FAILED: {total} violation(s) (at most {} listed per check)",
            check::VIOLATIONS_LISTED_MAX
        );
    }
    out
}

/// Whether the report passes: no violation and something was actually checked.
pub fn passed(report: &Report) -> bool {
    report.violation_count() == 0 && report.messages_checked > 0
}

/// Prints the report (table or JSON) and returns the exit code.
pub fn print(output: &Output<'_>, json: bool) -> u8 {
    if json {
        match serde_json::to_string_pretty(output) {
            Ok(text) => println!("{text}"),
            Err(error) => eprintln!("herald verify: cannot encode the report: {error}"),
        }
    } else {
        print!("{}", table(output.report));
        if output.report.messages_checked == 0 {
            println!("FAILED: nothing was delivered, so nothing was checked");
        }
    }
    if output.ok { 0 } else { EXIT_VIOLATION }
}

/// `herald verify --check FILE`.
pub fn recheck(path: &Path, json: bool) -> u8 {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) => {
            eprintln!("herald verify: cannot open {}: {error}", path.display());
            return 2;
        }
    };
    let lines = match history::read(std::io::BufReader::new(file)) {
        Ok(lines) => lines,
        Err(error) => {
            eprintln!("herald verify: {}: {error}", path.display());
            return 2;
        }
    };
    let report = check::check(&lines);
    let (seed, url) = lines
        .iter()
        .find_map(|line| match &line.record {
            history::Record::Run { seed, url, .. } => Some((Some(*seed), Some(url.as_str()))),
            _ => None,
        })
        .unwrap_or((None, None));
    let output = Output {
        ok: passed(&report),
        seed,
        url,
        history: Some(path.display().to_string()),
        history_lines: lines.len(),
        violations_total: report.violation_count(),
        report: &report,
    };
    print(&output, json)
}
