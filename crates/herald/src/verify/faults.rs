//! Faults a verification run injects on its own connections (cuts, paused readers) and, with
//! `--spawn --kill-every`, the loop that SIGKILLs and restarts the server.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use herald_faults::FaultProxy;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;

use super::history::{Record, Recorder};
use super::spawn::SpawnedServer;

use super::run::*;

pub(super) enum Killer {
    Running(JoinHandle<(SpawnedServer, Option<anyhow::Error>)>),
    Idle(Option<Box<SpawnedServer>>),
}

/// Cuts and pauses verify's own connections at random until `stop`.
pub(super) async fn inject_faults(
    proxies: Vec<(String, Arc<FaultProxy>, bool)>,
    mode: super::FaultMode,
    seed: u64,
    recorder: Recorder,
    progress: Arc<Progress>,
    mut stop: Stop,
) {
    if !mode.drops() && !mode.pauses() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let subscribers: Vec<&(String, Arc<FaultProxy>, bool)> = proxies
        .iter()
        .filter(|(_, _, subscriber)| *subscriber)
        .collect();
    loop {
        let wait = Duration::from_millis(rng.random_range(200..1200));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.wait() => return,
        }
        let cut = mode.drops() && (!mode.pauses() || rng.random_bool(0.5));
        progress.faults.fetch_add(1, Ordering::Relaxed);
        if cut {
            let (name, proxy, _) = &proxies[rng.random_range(0..proxies.len())];
            proxy.cut();
            recorder.record(Record::Fault {
                target: name.clone(),
                fault: "cut".into(),
            });
        } else {
            let (name, proxy, _) = subscribers[rng.random_range(0..subscribers.len())];
            let pause = Duration::from_millis(rng.random_range(100..2000));
            proxy.pause(true);
            recorder.record(Record::Fault {
                target: name.clone(),
                fault: "pause".into(),
            });
            let (name, proxy, recorder) = (name.clone(), proxy.clone(), recorder.clone());
            tokio::spawn(async move {
                tokio::time::sleep(pause).await;
                proxy.pause(false);
                recorder.record(Record::Fault {
                    target: name,
                    fault: "resume".into(),
                });
            });
        }
    }
}

/// SIGKILLs and restarts the spawned server at random instants until `stop`. Returns the
/// server (running) and the error that stopped the loop early, if any.
pub(super) async fn kill_loop(
    mut server: SpawnedServer,
    (min, max): (Duration, Duration),
    seed: u64,
    recorder: Recorder,
    progress: Arc<Progress>,
    mut stop: Stop,
) -> (SpawnedServer, Option<anyhow::Error>) {
    let mut rng = StdRng::seed_from_u64(seed.rotate_left(17));
    loop {
        let wait = if max > min {
            rng.random_range(min..=max)
        } else {
            min
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.wait() => return (server, None),
        }
        let pid = server.pid;
        if let Err(error) = server.kill9().await {
            return (server, Some(error));
        }
        progress.kills.fetch_add(1, Ordering::Relaxed);
        recorder.record(Record::Kill { pid });
        if let Err(error) = server.restart().await {
            return (server, Some(error));
        }
        recorder.record(Record::Restart { pid: server.pid });
    }
}
