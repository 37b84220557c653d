//! The CI seeds of the simulation, and the proof that its checker catches a planted bug.

use std::time::Instant;

use herald_sim::{InjectedBug, SimOptions, run, seeds_from_env};

/// Seeds 0..64 by default (see the crate docs for replaying one seed and for a long soak).
#[test]
fn every_seed_keeps_the_delivery_contracts() {
    let started = Instant::now();
    let seeds = seeds_from_env(64);
    let options = SimOptions::default();
    let mut failures = Vec::new();
    let mut totals = herald_sim::Summary::default();
    for &seed in &seeds {
        match run(seed, &options) {
            Ok(summary) => {
                totals.acked += summary.acked;
                totals.messages_checked += summary.messages_checked;
                totals.notices_checked += summary.notices_checked;
                totals.cuts += summary.cuts;
                totals.pauses += summary.pauses;
                totals.resubscribes += summary.resubscribes;
                totals.steps += summary.steps;
                totals.server.restarts += summary.server.restarts;
                totals.server.wipes += summary.server.wipes;
                totals.server.append_failures += summary.server.append_failures;
                totals.server.gaps += summary.server.gaps;
                totals.server.continuity_lost += summary.server.continuity_lost;
                totals.server.skips += summary.server.skips;
                totals.server.catch_up_reads += summary.server.catch_up_reads;
            }
            Err(failure) => {
                eprintln!("{failure}");
                failures.push(failure.seed);
            }
        }
    }
    eprintln!(
        "herald-sim: {} seeds in {:.1?}: {} steps, {} publishes acked, {} messages and {} notices \
         checked; faults: {} connection cuts, {} pauses, {} resubscribes, {} restarts, {} wipes, {} failed appends; \
         server: {} catch-up reads, {} gaps, {} continuity_lost, {} skips",
        seeds.len(),
        started.elapsed(),
        totals.steps,
        totals.acked,
        totals.messages_checked,
        totals.notices_checked,
        totals.cuts,
        totals.pauses,
        totals.resubscribes,
        totals.server.restarts,
        totals.server.wipes,
        totals.server.append_failures,
        totals.server.catch_up_reads,
        totals.server.gaps,
        totals.server.continuity_lost,
        totals.server.skips,
    );
    assert!(failures.is_empty(), "failing seeds: {failures:?}");
}

/// A run is a function of its seed: the same seed gives the same history.
#[test]
fn a_seed_replays_exactly() {
    let options = SimOptions::default();
    let first = run(7, &options).expect("seed 7 passes");
    let second = run(7, &options).expect("seed 7 passes");
    assert_eq!(format!("{first:?}"), format!("{second:?}"));
}

/// The checker is not vacuous: a server that silently loses one exactly-once delivery is
/// caught on every seed tried, and the failure names the seed to replay.
#[test]
fn a_planted_lost_delivery_is_caught_with_its_seed() {
    let options = SimOptions {
        bug: Some(InjectedBug::DropDelivery { nth: 25 }),
        ..SimOptions::default()
    };
    for seed in 0..8 {
        let failure = run(seed, &options).expect_err("the lost delivery must be caught");
        let report = failure.to_string();
        eprintln!("{report}");
        assert_eq!(failure.seed, seed);
        assert!(
            report.contains(&format!("HERALD_SIM_SEED={seed} cargo test")),
            "{report}"
        );
        // The SDK sees the hole at once (C1); re-subscribing from its position then heals it.
        assert!(
            failure
                .violations
                .iter()
                .any(|violation| violation.contains("C1")),
            "{report}"
        );
    }
}

/// The same for an at-most-once server that drops messages without a `gap` notice.
#[test]
fn a_planted_silent_drop_is_caught() {
    let mut options = SimOptions {
        bug: Some(InjectedBug::DropGapNotice { nth: 1 }),
        ..SimOptions::default()
    };
    // Small buffers, so that at-most-once drops happen early in every run.
    options.server.outbound_frames = 1;
    options.link_window_frames = 1;
    options.pause_chance *= 4.0;
    let caught = (0..8)
        .filter(|&seed| {
            run(seed, &options)
                .map_err(|failure| eprintln!("{failure}"))
                .is_err()
        })
        .count();
    assert_eq!(caught, 8, "every seed with a dropped gap notice must fail");
}

/// The smallest buffers and more faults: every ring overflows, every queue is full.
#[test]
fn every_seed_keeps_the_contracts_with_tiny_buffers_and_many_faults() {
    let mut options = SimOptions::default();
    options.server.ring_messages = 1;
    options.server.outbound_frames = 1;
    options.server.page_messages = 1;
    options.server.append_delay_ms_max = 60;
    options.cut_chance *= 3.0;
    options.pause_chance *= 3.0;
    options.crash_chance *= 3.0;
    options.append_failure_chance *= 3.0;
    options.link_window_frames = 2;
    let seeds = seeds_from_env(16);
    let failures: Vec<u64> = seeds
        .iter()
        .filter_map(|&seed| {
            run(seed, &options)
                .map_err(|failure| eprintln!("tiny buffers: {failure}"))
                .err()
                .map(|()| seed)
        })
        .collect();
    assert!(failures.is_empty(), "failing seeds: {failures:?}");
}
