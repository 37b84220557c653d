//! The embedded log on real files (plus [`SimFs`] for injected sync failures): round trips,
//! restarts, segment rollover, reclaim, corruption and torn tails, poisoning.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use herald_core::{
    ChainHash, ChannelName, Data, Headers, Message, MessageId, NamespacePolicy, NewMessage,
    Policies, ReadFrom, Retention, Serial, Timestamp,
};
use herald_log::fs::FsFile;
use herald_log::{
    AppendError, Clock, EmbeddedLog, EmbeddedOptions, Filesystem, LogStore, ManualClock, ReadQuery,
    SimFs, StdFs, StoreError, StoreHealth,
};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

const START: Timestamp = Timestamp(1_700_000_000_000);
const YOUNG_AGE_MS: u64 = 10_000;

fn small_options() -> EmbeddedOptions {
    EmbeddedOptions {
        segment_bytes: 64 * 1024,
        group_bytes_max: 16 * 1024,
        queue_depth: 1024,
    }
}

fn policies() -> Policies {
    let mut namespaces = BTreeMap::new();
    namespaces.insert(
        "young".to_owned(),
        NamespacePolicy {
            retention: Retention {
                max_age_ms: YOUNG_AGE_MS,
                ..Retention::default()
            },
            ..NamespacePolicy::default()
        },
    );
    Policies {
        default: NamespacePolicy::default(),
        namespaces,
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
}

impl Fixture {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            clock: Arc::new(ManualClock::new(START)),
        }
    }

    fn open(&self) -> Result<EmbeddedLog, StoreError> {
        EmbeddedLog::open(
            self.dir.path(),
            small_options(),
            policies(),
            self.clock.clone() as Arc<dyn Clock>,
        )
    }

    fn segment_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path().join("segments"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|extension| extension == "seg"))
            .collect();
        files.sort();
        files
    }
}

fn channel(name: &str) -> ChannelName {
    ChannelName::parse(name).unwrap()
}

fn message(id: &str, data: &str) -> NewMessage {
    NewMessage {
        id: MessageId::parse(id).unwrap(),
        name: None,
        headers: Headers::new(),
        data: Data::Json(Bytes::from(format!("\"{data}\""))),
        ttl_ms: None,
    }
}

fn append(store: &EmbeddedLog, name: &str, batch: Vec<NewMessage>) -> Vec<herald_log::Appended> {
    store.append(channel(name), batch).wait().unwrap()
}

fn read_all(store: &EmbeddedLog, name: &str) -> Vec<Message> {
    let mut messages = Vec::new();
    let mut from = ReadFrom::Oldest;
    loop {
        let page = store
            .read(&channel(name), &ReadQuery::Forward { from, limit: 500 })
            .unwrap();
        messages.extend(page.messages);
        match page.next {
            Some(next) if page.more => from = ReadFrom::After(next),
            _ => return messages,
        }
    }
}

/// Checks serials are contiguous and each chain value follows from the previous one (from
/// genesis when the first message is serial 1).
fn assert_chain(messages: &[Message]) {
    let Some(first) = messages.first() else {
        return;
    };
    let mut chain = if first.serial == Serial(1) {
        ChainHash::genesis(&first.epoch)
    } else {
        first.chain
    };
    let skip = usize::from(first.serial != Serial(1));
    for pair in messages.windows(2) {
        assert_eq!(pair[1].serial, pair[0].serial.next(), "serials contiguous");
    }
    for message in &messages[skip..] {
        chain = chain.next(message.serial, &message.id, &message.data);
        assert_eq!(chain, message.chain, "chain breaks at {}", message.serial);
    }
}

/// Offset just past the last record of a segment file (where the zero fill starts).
fn log_end(path: &Path) -> usize {
    let bytes = std::fs::read(path).unwrap();
    let mut offset = 64;
    loop {
        let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
        if len == 0 {
            return offset;
        }
        offset += 8 + len;
    }
}

#[test]
fn append_and_read_round_trip() {
    let fixture = Fixture::new();
    let store = fixture.open().unwrap();
    let mut headers = Headers::new();
    headers.insert("kind".into(), "greeting".into());
    let rich = NewMessage {
        id: MessageId::parse("rich").unwrap(),
        name: Some("hello".into()),
        headers,
        data: Data::Binary(Bytes::from_static(b"\x00\xffbinary")),
        ttl_ms: Some(60_000),
    };
    let replies = append(&store, "chat:a", vec![message("m1", "one"), rich.clone()]);
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[0].position.serial, Serial(1));
    assert_eq!(replies[1].position.serial, Serial(2));
    assert!(!replies[0].duplicate);

    let messages = read_all(&store, "chat:a");
    assert_eq!(messages.len(), 2);
    let stored = &messages[1];
    assert_eq!(stored.name, rich.name);
    assert_eq!(stored.headers, rich.headers);
    assert_eq!(stored.data, rich.data);
    assert_eq!(stored.ttl_ms, Some(60_000));
    assert_eq!(stored.time, START);
    assert_eq!(stored.position(), replies[1].position);
    assert_chain(&messages);

    let by_id = store
        .message_by_id(&channel("chat:a"), &rich.id)
        .unwrap()
        .unwrap();
    assert_eq!(&by_id, stored);
    let status = store.channel_status(&channel("chat:a")).unwrap().unwrap();
    assert_eq!(status.top, replies[1].position);
    assert_eq!(status.messages, 2);
    assert!(
        store
            .channel_status(&channel("chat:none"))
            .unwrap()
            .is_none()
    );
    assert_eq!(store.health(), StoreHealth::Ok);
}

#[test]
fn reopen_rebuilds_indexes_serials_dedupe_and_chain() {
    let fixture = Fixture::new();
    let first = {
        let store = fixture.open().unwrap();
        append(
            &store,
            "chat:a",
            vec![message("a1", "1"), message("a2", "2")],
        );
        append(&store, "chat:b", vec![message("b1", "1")]);
        append(&store, "chat:a", vec![message("a3", "3")])
    };
    let store = fixture.open().unwrap();
    // A retry after the restart is recognised, with its original position.
    let retry = append(&store, "chat:a", vec![message("a3", "3")]);
    assert!(retry[0].duplicate);
    assert_eq!(retry[0].position, first[0].position);
    // Same id, different content: refused.
    let conflict = store
        .append(channel("chat:a"), vec![message("a1", "changed")])
        .wait();
    assert!(matches!(conflict, Err(AppendError::IdConflict { .. })));
    // Serials and the chain continue.
    let next = append(&store, "chat:a", vec![message("a4", "4")]);
    assert_eq!(next[0].position.serial, Serial(4));
    assert_eq!(next[0].position.epoch, first[0].position.epoch);
    let messages = read_all(&store, "chat:a");
    assert_eq!(messages.len(), 4);
    assert_chain(&messages);
    assert_eq!(read_all(&store, "chat:b").len(), 1);
}

#[test]
fn rollover_spreads_records_over_segments_and_survives_reopen() {
    let fixture = Fixture::new();
    let payload = "x".repeat(200);
    {
        let store = fixture.open().unwrap();
        for round in 0..100 {
            for name in ["chat:a", "chat:b", "chat:c"] {
                let batch = (0..5)
                    .map(|index| message(&format!("{name}-{round}-{index}"), &payload))
                    .collect();
                append(&store, name, batch);
            }
        }
        assert_eq!(read_all(&store, "chat:b").len(), 500);
        assert!(store.stats().rollovers >= 4);
    }
    let segments = fixture.segment_files();
    assert!(
        segments.len() >= 5,
        "expected several segments, got {segments:?}"
    );
    for path in &segments {
        assert_eq!(
            std::fs::metadata(path).unwrap().len(),
            64 * 1024,
            "preallocated"
        );
    }
    let store = fixture.open().unwrap();
    for name in ["chat:a", "chat:b", "chat:c"] {
        let messages = read_all(&store, name);
        assert_eq!(messages.len(), 500);
        assert_chain(&messages);
    }
}

#[test]
fn reclaim_deletes_dead_segments_and_keeps_tips_across_restart() {
    let fixture = Fixture::new();
    let payload = "y".repeat(300);
    let last_before = {
        let store = fixture.open().unwrap();
        for index in 0..600 {
            append(
                &store,
                "young:a",
                vec![message(&format!("old-{index}"), &payload)],
            );
        }
        let segments_before = fixture.segment_files().len();
        assert!(segments_before >= 3);
        // Nothing is reclaimable yet: retention and the dedupe window still hold them.
        assert_eq!(store.reclaim().unwrap(), 0);
        // Past retention (10 s) and the dedupe window (2 min).
        fixture.clock.advance_ms(3 * 60 * 1000);
        let dropped = store.reclaim().unwrap();
        assert!(dropped > 0);
        let segments_after = fixture.segment_files().len();
        assert!(segments_after < segments_before);
        read_all(&store, "young:a");
        let status = store.channel_status(&channel("young:a")).unwrap().unwrap();
        assert_eq!(status.top.serial, Serial(600));
        status.top
    };
    // A sealed segment that still holds the last messages may be kept; the rest is gone
    // from disk, and the tip makes the serial continue after a restart.
    let store = fixture.open().unwrap();
    let status = store.channel_status(&channel("young:a")).unwrap().unwrap();
    assert_eq!(status.top, last_before);
    let next = append(&store, "young:a", vec![message("new-1", "fresh")]);
    assert_eq!(next[0].position.serial, Serial(601));
    assert_eq!(next[0].position.epoch, last_before.epoch);
    drop(store);
    let store = fixture.open().unwrap();
    let messages = read_all(&store, "young:a");
    assert_eq!(messages.last().unwrap().serial, Serial(601));
}

#[test]
fn reclaim_of_every_message_in_dead_segments_leaves_tip_only() {
    let fixture = Fixture::new();
    let payload = "z".repeat(300);
    let (tip_chain, epoch) = {
        let store = fixture.open().unwrap();
        for index in 0..200 {
            append(
                &store,
                "young:gone",
                vec![message(&format!("g-{index}"), &payload)],
            );
        }
        let last = read_all(&store, "young:gone").pop().unwrap();
        fixture.clock.advance_ms(3 * 60 * 1000);
        // Another channel fills segments so that all of young:gone's are sealed; once it
        // too is past retention, only the active segment stays.
        for index in 0..400 {
            append(
                &store,
                "young:filler",
                vec![message(&format!("f-{index}"), &payload)],
            );
        }
        fixture.clock.advance_ms(3 * 60 * 1000);
        assert!(store.reclaim().unwrap() >= 200);
        assert!(read_all(&store, "young:gone").is_empty());
        (last.chain, last.epoch)
    };
    let store = fixture.open().unwrap();
    let next = append(&store, "young:gone", vec![message("after", "1")]);
    assert_eq!(next[0].position.serial, Serial(201));
    assert_eq!(next[0].position.epoch, epoch);
    let stored = read_all(&store, "young:gone");
    assert_eq!(stored.len(), 1);
    let expected = tip_chain.next(Serial(201), &stored[0].id, &stored[0].data);
    assert_eq!(stored[0].chain, expected, "chain continues from the tip");
}

#[test]
fn corruption_in_a_sealed_segment_refuses_to_open() {
    let fixture = Fixture::new();
    let payload = "c".repeat(300);
    {
        let store = fixture.open().unwrap();
        for index in 0..400 {
            append(
                &store,
                "chat:a",
                vec![message(&format!("m-{index}"), &payload)],
            );
        }
    }
    let segments = fixture.segment_files();
    assert!(segments.len() >= 3);
    let victim = &segments[1];
    let mut bytes = std::fs::read(victim).unwrap();
    bytes[64 + 40] ^= 0x01; // inside the first record's body
    std::fs::write(victim, &bytes).unwrap();
    match fixture.open() {
        Err(StoreError::Corrupt { path, offset, .. }) => {
            assert!(
                path.ends_with(victim.file_name().unwrap().to_str().unwrap()),
                "{path}"
            );
            assert_eq!(offset, 64);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn torn_tail_in_the_last_segment_is_truncated_but_far_garbage_is_not() {
    let fixture = Fixture::new();
    let kept = {
        let store = fixture.open().unwrap();
        for index in 0..10 {
            append(
                &store,
                "chat:a",
                vec![message(&format!("m-{index}"), "data")],
            );
        }
        read_all(&store, "chat:a")
    };
    let last = fixture.segment_files().pop().unwrap();
    let end = log_end(&last);
    // A torn record: a plausible frame header, then half a body.
    let mut bytes = std::fs::read(&last).unwrap();
    bytes[end..end + 4].copy_from_slice(&200u32.to_le_bytes());
    bytes[end + 4..end + 8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    bytes[end + 8..end + 100].fill(0x5a);
    std::fs::write(&last, &bytes).unwrap();
    {
        let store = fixture.open().unwrap();
        assert_eq!(read_all(&store, "chat:a"), kept);
        let next = append(&store, "chat:a", vec![message("after", "x")]);
        assert_eq!(next[0].position.serial, Serial(11));
    }
    let store = fixture.open().unwrap();
    assert_eq!(read_all(&store, "chat:a").len(), 11);
    drop(store);

    // Damage followed by data beyond one group's reach is not a torn write.
    let end = log_end(&last);
    let mut bytes = std::fs::read(&last).unwrap();
    bytes[end..end + 4].copy_from_slice(&200u32.to_le_bytes());
    let far = end + small_options().group_bytes_max + 10;
    bytes[far] = 1;
    std::fs::write(&last, &bytes).unwrap();
    match fixture.open() {
        Err(StoreError::Corrupt { offset, .. }) => assert_eq!(offset, end as u64),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn failed_sync_poisons_and_restart_recovers() {
    let fs = SimFs::new();
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(START));
    let dir = Path::new("/data");
    let open = |fs: &SimFs| {
        EmbeddedLog::open_with_fs(
            Arc::new(fs.clone()),
            dir,
            small_options(),
            policies(),
            clock.clone(),
        )
    };
    let store = open(&fs).unwrap();
    let acked = append(&store, "chat:a", vec![message("ok-1", "1")]);
    fs.fail_next_sync("injected EIO");
    let tickets: Vec<_> = (0..20)
        .map(|index| store.append(channel("chat:a"), vec![message(&format!("p-{index}"), "p")]))
        .collect();
    for ticket in tickets {
        assert!(matches!(ticket.wait(), Err(AppendError::Poisoned(_))));
    }
    assert!(matches!(store.health(), StoreHealth::Poisoned(_)));
    let later = store
        .append(channel("chat:a"), vec![message("later", "l")])
        .wait();
    assert!(matches!(later, Err(AppendError::Poisoned(_))));
    // Durable data stays readable.
    assert_eq!(read_all(&store, "chat:a").len(), 1);
    assert!(store.reclaim().is_err());
    drop(store);

    // After a power loss and restart, the acknowledged message is there and appends work.
    let fs = fs.crash(7);
    let store = open(&fs).unwrap();
    assert_eq!(store.health(), StoreHealth::Ok);
    let messages = read_all(&store, "chat:a");
    assert_eq!(messages[0].position(), acked[0].position);
    let next = append(&store, "chat:a", vec![message("after", "a")]);
    assert_eq!(next[0].position.serial.0, messages.len() as u64 + 1);
}

#[test]
fn close_answers_everything_queued() {
    let fixture = Fixture::new();
    let store = fixture.open().unwrap();
    let tickets: Vec<_> = (0..200)
        .map(|index| store.append(channel("chat:a"), vec![message(&format!("q-{index}"), "q")]))
        .collect();
    store.close();
    for ticket in tickets {
        assert!(ticket.wait().is_ok(), "queued before close: acknowledged");
    }
    let after = store
        .append(channel("chat:a"), vec![message("late", "l")])
        .wait();
    assert_eq!(after, Err(AppendError::Closed));
    assert_eq!(read_all(&store, "chat:a").len(), 200);
}

#[test]
fn options_are_validated_and_oversized_batches_refused() {
    let fixture = Fixture::new();
    let clock: Arc<dyn Clock> = fixture.clock.clone();
    let bad = EmbeddedOptions {
        segment_bytes: 8 * 1024,
        group_bytes_max: 16 * 1024,
        queue_depth: 10,
    };
    match EmbeddedLog::open(fixture.dir.path(), bad, policies(), clock.clone()) {
        Err(StoreError::Config(detail)) => assert!(detail.contains("segment_bytes"), "{detail}"),
        other => panic!("expected Config, got {other:?}"),
    }
    let zero_queue = EmbeddedOptions {
        queue_depth: 0,
        ..small_options()
    };
    assert!(matches!(
        EmbeddedLog::open(fixture.dir.path(), zero_queue, policies(), clock),
        Err(StoreError::Config(_))
    ));
    let store = fixture.open().unwrap();
    let huge = message("huge", &"h".repeat(20 * 1024));
    match store.append(channel("chat:a"), vec![huge]).wait() {
        Err(AppendError::Invalid(invalid)) => {
            assert_eq!(invalid.code, herald_core::ErrorCode::BatchTooLarge)
        }
        other => panic!("expected batch_too_large, got {other:?}"),
    }
}

/// Durable throughput on real files: 100k appends of 256-byte messages (one per batch) from
/// 256 concurrent publishers, as tokio tasks like the server's, over 64 channels.
/// Run: `cargo test -p herald-log --release --test embedded -- --ignored --nocapture throughput`
/// (set `HERALD_BENCH_DIR` to measure another disk than the target directory's).
#[test]
#[ignore = "benchmark; run explicitly in release mode"]
fn throughput() {
    const PUBLISHERS: usize = 256;
    const MESSAGES: usize = 100_000;
    let base =
        std::env::var("HERALD_BENCH_DIR").unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").into());
    let dir = tempfile::tempdir_in(base).unwrap();
    let clock: Arc<dyn Clock> = Arc::new(herald_log::SystemClock);
    let store = Arc::new(
        EmbeddedLog::open(dir.path(), EmbeddedOptions::default(), policies(), clock).unwrap(),
    );
    let payload = Arc::new("p".repeat(254)); // 256 bytes as a JSON string
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for publisher in 0..PUBLISHERS {
            let (store, payload) = (store.clone(), payload.clone());
            tasks.push(tokio::spawn(async move {
                let name = channel(&format!("bench:{}", publisher % 64));
                for index in 0..MESSAGES / PUBLISHERS {
                    let id = format!("p{publisher}-{index}");
                    store
                        .append(name.clone(), vec![message(&id, &payload)])
                        .await
                        .unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
    let elapsed = started.elapsed();
    let stats = store.stats();
    let appends = (MESSAGES / PUBLISHERS * PUBLISHERS) as f64;
    eprintln!(
        "embedded log: {appends} durable appends in {:.2} s = {:.0} appends/s; {} groups, mean group {:.1} appends, {} rollovers",
        elapsed.as_secs_f64(),
        appends / elapsed.as_secs_f64(),
        stats.groups,
        stats.appends as f64 / stats.groups as f64,
        stats.rollovers,
    );

    // The raw limit of the same disk: write + fdatasync of 256 records of 256 bytes into a
    // zero-filled file.
    use std::os::unix::fs::FileExt;
    let path = dir.path().join("raw");
    let file = std::fs::File::create(&path).unwrap();
    let batch = vec![7u8; 256 * 264];
    let rounds = 400;
    for round in 0..rounds {
        file.write_all_at(&vec![0u8; batch.len()], (round * batch.len()) as u64)
            .unwrap();
    }
    file.sync_all().unwrap();
    let started = std::time::Instant::now();
    for round in 0..rounds {
        file.write_all_at(&batch, (round * batch.len()) as u64)
            .unwrap();
        file.sync_data().unwrap();
    }
    let elapsed = started.elapsed();
    eprintln!(
        "raw write+fdatasync, batches of 256: {:.0} records/s ({:.3} ms per sync)",
        (rounds * 256) as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1000.0 / rounds as f64
    );
}

#[test]
fn a_record_of_unknown_kind_refuses_to_open_even_at_the_tail() {
    let fixture = Fixture::new();
    {
        let store = fixture.open().unwrap();
        append(&store, "chat:a", vec![message("m-1", "1")]);
    }
    let last = fixture.segment_files().pop().unwrap();
    let end = log_end(&last);
    // A well-formed record (right length and CRC) of a kind this version does not know.
    // kind 99, batch_following 0, synced_through 0, then a few bytes of payload.
    let body = [99u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3];
    let mut bytes = std::fs::read(&last).unwrap();
    bytes[end..end + 4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    bytes[end + 4..end + 8].copy_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    bytes[end + 8..end + 8 + body.len()].copy_from_slice(&body);
    std::fs::write(&last, &bytes).unwrap();
    match fixture.open() {
        Err(StoreError::Corrupt { offset, detail, .. }) => {
            assert_eq!(offset, end as u64);
            assert!(detail.contains("unknown record kind"), "{detail}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn a_crc_failure_on_read_is_an_error_not_a_skip() {
    let fixture = Fixture::new();
    let store = fixture.open().unwrap();
    append(
        &store,
        "chat:a",
        vec![message("m-1", "1"), message("m-2", "2")],
    );
    let segment = fixture.segment_files().pop().unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[64 + 30] ^= 0x40; // inside the first record's body
    std::fs::write(&segment, &bytes).unwrap();
    let result = store.read(
        &channel("chat:a"),
        &ReadQuery::Forward {
            from: ReadFrom::Oldest,
            limit: 10,
        },
    );
    match result {
        Err(herald_log::ReadError::Store(StoreError::Corrupt { offset, .. })) => {
            assert_eq!(offset, 64)
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let by_id = store.message_by_id(&channel("chat:a"), &MessageId::parse("m-1").unwrap());
    assert!(matches!(by_id, Err(StoreError::Corrupt { .. })));
}

#[test]
fn damage_to_acknowledged_data_near_the_tail_refuses_to_open() {
    let fixture = Fixture::new();
    {
        let store = fixture.open().unwrap();
        // Three publishes, three group writes: each later record proves the earlier ones synced.
        for index in 1..=3 {
            append(
                &store,
                "chat:a",
                vec![message(&format!("m-{index}"), &index.to_string())],
            );
        }
    }
    let last = fixture.segment_files().pop().unwrap();
    let mut bytes = std::fs::read(&last).unwrap();
    // Bit rot in the first record's body (its length field intact), well inside the window a
    // torn write could reach: the old rule would have cut all three acknowledged messages.
    let first_record = 64;
    bytes[first_record + 30] ^= 0x40;
    std::fs::write(&last, &bytes).unwrap();
    match fixture.open() {
        Err(StoreError::Corrupt { offset, detail, .. }) => {
            assert_eq!(offset, first_record as u64);
            assert!(detail.contains("acknowledged"), "{detail}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Nothing was truncated: the damaged bytes and everything after them are still on disk.
    assert_eq!(std::fs::read(&last).unwrap(), bytes);
}

#[test]
fn a_full_commit_queue_refuses_explicitly_and_stores_nothing_it_refused() {
    let fixture = Fixture::new();
    let store = fixture.open().unwrap();
    // The queue holds 8 groups' worth of bytes (8 x 16 KiB here). Enqueue far more than that
    // without waiting: the committer drains one group per fdatasync, far slower than this loop.
    let payload = "x".repeat(2000);
    let tickets: Vec<_> = (0..400)
        .map(|index| {
            let id = format!("q-{index}");
            (
                id.clone(),
                store.append(
                    channel("chat:q"),
                    vec![message(&id, &format!("\"{payload}\""))],
                ),
            )
        })
        .collect();
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for (id, ticket) in tickets {
        match ticket.wait() {
            Ok(replies) => accepted.push((id, replies[0].position.clone())),
            Err(AppendError::Overloaded) => refused.push(id),
            Err(other) => panic!("unexpected refusal of {id}: {other}"),
        }
    }
    assert!(
        !refused.is_empty(),
        "400 x 2 KB never filled a 128 KiB queue"
    );
    assert!(!accepted.is_empty());
    for (id, position) in &accepted {
        let found = store
            .message_by_id(&channel("chat:q"), &MessageId::parse(id).unwrap())
            .unwrap()
            .expect("accepted message is stored");
        assert_eq!(&found.position(), position);
    }
    for id in &refused {
        let found = store
            .message_by_id(&channel("chat:q"), &MessageId::parse(id).unwrap())
            .unwrap();
        assert!(found.is_none(), "refused {id} was stored");
    }
    // Once drained, the byte bound is free again: the refused ones go through on retry.
    for id in &refused {
        let replies = store
            .append(
                channel("chat:q"),
                vec![message(id, &format!("\"{payload}\""))],
            )
            .wait()
            .expect("queue drained, retry accepted");
        assert!(!replies[0].duplicate);
    }
}

// ----- durable subscribers -------------------------------------------------------------------

fn subscriber(channel_name: &str, id: &str, acked_through: u64) -> herald_core::SubscriberState {
    let mut state = herald_core::SubscriberState::new(
        channel(channel_name),
        herald_core::SubscriberId::parse(id).unwrap(),
        herald_core::Position::new(
            herald_core::Epoch::parse("E1").unwrap(),
            Serial(acked_through),
        ),
        herald_core::SubscriberOptions::default(),
        START,
    );
    state.ack_one(Serial(acked_through + 2));
    state.record_attempt(Serial(acked_through + 1));
    state
}

/// Real files whose next `fdatasync`, once armed, waits until the test releases it: holds the
/// committer inside one group's sync while the test queues the next group.
#[derive(Clone, Default)]
struct GatedFs {
    gate: Arc<(Mutex<GateState>, Condvar)>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum GateState {
    #[default]
    Open,
    Armed,
    Holding,
}

#[derive(Debug)]
struct GatedFile {
    file: Arc<dyn FsFile>,
    gate: Arc<(Mutex<GateState>, Condvar)>,
}

impl FsFile for GatedFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        let (state, changed) = &*self.gate;
        let mut state = state.lock().unwrap();
        if *state == GateState::Armed {
            *state = GateState::Holding;
            changed.notify_all();
            // Bounded: the test releases the gate, or this gives up after 10 s.
            let (released, _) = changed
                .wait_timeout_while(state, Duration::from_secs(10), |state| {
                    *state == GateState::Holding
                })
                .unwrap();
            drop(released);
        }
        self.file.sync_data()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
}

impl GatedFs {
    fn arm(&self) {
        *self.gate.0.lock().unwrap() = GateState::Armed;
    }
    fn wait_until_holding(&self) {
        let (state, changed) = &*self.gate;
        let state = state.lock().unwrap();
        let (state, timeout) = changed
            .wait_timeout_while(state, Duration::from_secs(10), |state| {
                *state != GateState::Holding
            })
            .unwrap();
        assert!(!timeout.timed_out(), "the committer never reached its sync");
        drop(state);
    }
    fn release(&self) {
        *self.gate.0.lock().unwrap() = GateState::Open;
        self.gate.1.notify_all();
    }
    fn wrap(&self, file: Arc<dyn FsFile>) -> Arc<dyn FsFile> {
        Arc::new(GatedFile {
            file,
            gate: self.gate.clone(),
        })
    }
}

impl Filesystem for GatedFs {
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        StdFs.create_dir_all(path)
    }
    fn open(&self, path: &Path) -> std::io::Result<Arc<dyn FsFile>> {
        StdFs.open(path).map(|file| self.wrap(file))
    }
    fn create_new(&self, path: &Path) -> std::io::Result<Arc<dyn FsFile>> {
        StdFs.create_new(path).map(|file| self.wrap(file))
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        StdFs.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        StdFs.remove_file(path)
    }
    fn list_dir(&self, path: &Path) -> std::io::Result<Vec<String>> {
        StdFs.list_dir(path)
    }
    fn sync_dir(&self, path: &Path) -> std::io::Result<()> {
        StdFs.sync_dir(path)
    }
}

/// Subscriber saves ride the group commit: N saves and M appends queued while the committer
/// is busy with one sync become one group, i.e. one more write and one more `fdatasync`.
#[test]
fn saves_and_appends_queued_together_share_one_group_commit() {
    const SAVES: u64 = 50;
    const APPENDS: u64 = 30;
    let fixture = Fixture::new();
    let fs = GatedFs::default();
    let store = EmbeddedLog::open_with_fs(
        Arc::new(fs.clone()),
        fixture.dir.path(),
        small_options(),
        policies(),
        fixture.clock.clone() as Arc<dyn Clock>,
    )
    .unwrap();
    // A first write holds the committer inside its sync.
    fs.arm();
    let plug = store.save_subscriber(subscriber("jobs:a", "plug", 1));
    fs.wait_until_holding();
    let before = store.stats();
    let saves: Vec<_> = (0..SAVES)
        .map(|n| store.save_subscriber(subscriber("jobs:a", &format!("s{n}"), n)))
        .collect();
    let appends: Vec<_> = (0..APPENDS)
        .map(|n| store.append(channel("jobs:a"), vec![message(&format!("m{n}"), "1")]))
        .collect();
    // Nothing queued behind the held sync is visible yet.
    assert_eq!(
        store.subscriber(
            &channel("jobs:a"),
            &herald_core::SubscriberId::parse("s0").unwrap()
        ),
        None
    );
    fs.release();
    plug.wait().unwrap();
    for ticket in saves {
        ticket.wait().unwrap();
    }
    for ticket in appends {
        ticket.wait().unwrap();
    }
    let after = store.stats();
    // The plug's group, then one group for all 80 writes queued behind it.
    assert_eq!(after.groups, before.groups + 2, "{before:?} -> {after:?}");
    assert_eq!(after.subscriber_saves, before.subscriber_saves + SAVES + 1);
    assert_eq!(after.appends, before.appends + APPENDS);
    assert_eq!(store.subscribers().len() as u64, SAVES + 1);
    drop(store);
    let store = fixture.open().unwrap();
    assert_eq!(store.subscribers().len() as u64, SAVES + 1);
    assert_eq!(read_all(&store, "jobs:a").len() as u64, APPENDS);
}

/// Saves share the appends' bounded queue: when it is full they are refused at once with
/// `Overloaded` and nothing refused is stored; what was accepted is durable.
#[test]
fn a_full_queue_refuses_saves_like_appends() {
    let fixture = Fixture::new();
    let fs = GatedFs::default();
    let store = EmbeddedLog::open_with_fs(
        Arc::new(fs.clone()),
        fixture.dir.path(),
        small_options(),
        policies(),
        fixture.clock.clone() as Arc<dyn Clock>,
    )
    .unwrap();
    fs.arm();
    let plug = store.append(channel("jobs:a"), vec![message("plug", "1")]);
    fs.wait_until_holding();
    // queue_depth is 1024: the committer is held, so most of these cannot even queue.
    let tickets: Vec<_> = (0..1_500)
        .map(|n| {
            (
                n,
                store.save_subscriber(subscriber("jobs:a", &format!("s{n}"), n)),
            )
        })
        .collect();
    fs.release();
    plug.wait().unwrap();
    let mut accepted = 0;
    let mut refused = Vec::new();
    for (n, ticket) in tickets {
        match ticket.wait() {
            Ok(()) => accepted += 1,
            Err(AppendError::Overloaded) => refused.push(n),
            Err(other) => panic!("unexpected refusal: {other}"),
        }
    }
    assert!(!refused.is_empty() && accepted > 0, "{accepted} accepted");
    assert_eq!(store.subscribers().len(), accepted);
    for n in refused {
        let id = herald_core::SubscriberId::parse(&format!("s{n}")).unwrap();
        assert_eq!(store.subscriber(&channel("jobs:a"), &id), None);
    }
}

/// A store that only ever saves snapshots of one subscriber (acks with no new messages) does
/// not grow without bound: reclaim deletes the segments of superseded snapshots, and the
/// newest one survives, also across a restart.
#[test]
fn snapshot_churn_is_reclaimed_and_the_newest_snapshot_kept() {
    let fixture = Fixture::new();
    let store = fixture.open().unwrap();
    for n in 1..=2_000 {
        store
            .save_subscriber(subscriber("jobs:a", "worker", n))
            .wait()
            .unwrap();
    }
    let before = fixture.segment_files().len();
    assert!(before >= 3, "the churn spans {before} segments");
    store.reclaim().unwrap();
    assert!(
        fixture.segment_files().len() <= 2,
        "{} segments left of {before}",
        fixture.segment_files().len()
    );
    assert_eq!(
        store.subscribers(),
        vec![subscriber("jobs:a", "worker", 2_000)]
    );
    drop(store);
    let store = fixture.open().unwrap();
    assert_eq!(
        store.subscribers(),
        vec![subscriber("jobs:a", "worker", 2_000)]
    );
}

/// A snapshot too large for one commit is refused up front with `batch_too_large`.
#[test]
fn an_oversized_snapshot_is_refused() {
    let fixture = Fixture::new();
    let store = fixture.open().unwrap();
    let mut state = subscriber("jobs:a", "huge", 0);
    // Gaps of 2^20 take three varint bytes each: far over a 16 KiB group.
    state.acked_above = (1..10_000u64).map(|n| Serial(n << 20)).collect();
    match store.save_subscriber(state).wait() {
        Err(AppendError::Invalid(invalid)) => {
            assert_eq!(invalid.code, herald_core::ErrorCode::BatchTooLarge)
        }
        other => panic!("expected batch_too_large, got {other:?}"),
    }
    assert!(store.subscribers().is_empty());
}

/// Subscriber snapshot saves riding the group commit: 100 subscribers saving (one save per
/// ack, as an at-least-once subscriber does) alone, then beside 64 publishers. Reports saves/s,
/// appends/s, fsyncs/s and the mean group size.
/// Run: `cargo test -p herald-log --release --test embedded -- --ignored --nocapture subscriber_save_throughput`
/// (set `HERALD_BENCH_DIR` to measure another disk than the target directory's).
#[test]
#[ignore = "benchmark; run explicitly in release mode"]
fn subscriber_save_throughput() {
    const SUBSCRIBERS: usize = 100;
    const SAVES_PER_SUBSCRIBER: u64 = 1_000;
    const PUBLISHERS: usize = 64;
    const APPENDS_PER_PUBLISHER: usize = 1_500;
    let base =
        std::env::var("HERALD_BENCH_DIR").unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").into());
    let dir = tempfile::tempdir_in(base).unwrap();
    let clock: Arc<dyn Clock> = Arc::new(herald_log::SystemClock);
    let store = Arc::new(
        EmbeddedLog::open(dir.path(), EmbeddedOptions::default(), policies(), clock).unwrap(),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let payload = Arc::new("p".repeat(254));
    for (phase, publishers) in [("saves alone", 0), ("saves + appends", PUBLISHERS)] {
        let before = store.stats();
        let started = std::time::Instant::now();
        runtime.block_on(async {
            let mut tasks = Vec::new();
            for subscriber_index in 0..SUBSCRIBERS {
                let store = store.clone();
                let phase = phase.to_owned();
                tasks.push(tokio::spawn(async move {
                    let name = format!("bench:{}", subscriber_index % 64);
                    let id = format!("{}-{subscriber_index}", phase.len());
                    let mut state = subscriber(&name, &id, 0);
                    state.acked_above.clear();
                    state.attempts.clear();
                    for serial in 1..=SAVES_PER_SUBSCRIBER {
                        state.ack_through(Serial(serial));
                        state.record_attempt(Serial(serial + 1));
                        store.save_subscriber(state.clone()).await.unwrap();
                    }
                }));
            }
            for publisher in 0..publishers {
                let (store, payload) = (store.clone(), payload.clone());
                let phase = phase.to_owned();
                tasks.push(tokio::spawn(async move {
                    let name = channel(&format!("bench:{}", publisher % 64));
                    for index in 0..APPENDS_PER_PUBLISHER {
                        let id = format!("{}-p{publisher}-{index}", phase.len());
                        store
                            .append(name.clone(), vec![message(&id, &payload)])
                            .await
                            .unwrap();
                    }
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
        });
        let seconds = started.elapsed().as_secs_f64();
        let after = store.stats();
        let saves = after.subscriber_saves - before.subscriber_saves;
        let appends = after.appends - before.appends;
        let groups = after.groups - before.groups;
        eprintln!(
            "{phase}: {saves} saves + {appends} appends in {seconds:.2} s = {:.0} saves/s, \
             {:.0} appends/s; {groups} groups = {:.0} fsyncs/s, mean group {:.1} saves + {:.1} \
             appends",
            saves as f64 / seconds,
            appends as f64 / seconds,
            groups as f64 / seconds,
            saves as f64 / groups as f64,
            appends as f64 / groups as f64,
        );
        assert_eq!(saves, SUBSCRIBERS as u64 * SAVES_PER_SUBSCRIBER);
    }
}

// ----- state records -------------------------------------------------------------------------

/// Start and end offsets of the last record of a segment file.
fn last_record(path: &Path) -> (usize, usize) {
    let bytes = std::fs::read(path).unwrap();
    let mut offset = 64;
    let mut last = None;
    loop {
        let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
        if len == 0 {
            return last.expect("the segment holds a record");
        }
        last = Some((offset, offset + 8 + len));
        offset += 8 + len;
    }
}

/// A torn last group (the record of the newest save only partly on disk, as after a power cut
/// during its write, before its sync) is truncated on open: the unsynced value is lost, the
/// earlier durable value of the key is what the store holds, and saves continue after it.
#[test]
fn a_torn_state_save_is_lost_and_the_earlier_value_kept() {
    let fixture = Fixture::new();
    let first = Bytes::from(vec![b'1'; 600]);
    {
        let store = fixture.open().unwrap();
        store.save_state("session/a", first.clone()).wait().unwrap();
        store
            .save_state("session/b", Bytes::from_static(b"b"))
            .wait()
            .unwrap();
        store
            .save_state("session/a", Bytes::from(vec![b'2'; 600]))
            .wait()
            .unwrap();
        assert_eq!(store.stats().state_saves, 3);
    }
    let last = fixture.segment_files().pop().unwrap();
    let (start, end) = last_record(&last);
    // The second half of the record never reached the disk.
    let mut bytes = std::fs::read(&last).unwrap();
    let middle = start + (end - start) / 2;
    bytes[middle..end].fill(0);
    std::fs::write(&last, &bytes).unwrap();
    {
        let store = fixture.open().unwrap();
        assert_eq!(store.state("session/a"), Some(first));
        assert_eq!(store.state("session/b"), Some(Bytes::from_static(b"b")));
        store
            .save_state("session/a", Bytes::from_static(b"third"))
            .wait()
            .unwrap();
    }
    let store = fixture.open().unwrap();
    assert_eq!(
        store.states("session/"),
        vec![
            ("session/a".to_string(), Bytes::from_static(b"third")),
            ("session/b".to_string(), Bytes::from_static(b"b")),
        ]
    );
}

/// The same with the simulated disk: a save whose sync failed is refused, and after power loss
/// the key holds either the earlier value or (when the whole write happened to land) the
/// refused one, never a broken one; with some tears, the earlier value.
#[test]
fn a_state_save_cut_by_power_loss_is_all_or_nothing() {
    let fs = SimFs::new();
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(START));
    let dir = Path::new("/data");
    let open = |fs: &SimFs| {
        EmbeddedLog::open_with_fs(
            Arc::new(fs.clone()),
            dir,
            small_options(),
            policies(),
            clock.clone(),
        )
    };
    // Several sectors, so that tears can keep some of them.
    let first = Bytes::from(vec![b'1'; 3 * herald_log::fs::SIM_SECTOR_BYTES]);
    let second = Bytes::from(vec![b'2'; 3 * herald_log::fs::SIM_SECTOR_BYTES]);
    let store = open(&fs).unwrap();
    store.save_state("session/a", first.clone()).wait().unwrap();
    fs.fail_next_sync("injected EIO");
    let refused = store.save_state("session/a", second.clone()).wait();
    assert!(
        matches!(refused, Err(AppendError::Poisoned(_))),
        "{refused:?}"
    );
    assert_eq!(store.state("session/a"), Some(first.clone()));
    drop(store);
    let mut kept_first = 0;
    for seed in 0..32 {
        let store = open(&fs.crash(seed)).unwrap();
        let recovered = store.state("session/a");
        if recovered == Some(first.clone()) {
            kept_first += 1;
        } else {
            assert_eq!(recovered, Some(second.clone()), "seed {seed}");
        }
    }
    assert!(kept_first > 0, "no seed lost the unsynced save");
}

/// Saves rewriting one key (a session updated on every packet) do not grow the log without
/// bound: reclaim deletes the segments of superseded values, including the first segment,
/// which held a key saved once and never again; that value is copied forward and survives,
/// also across a restart.
#[test]
fn state_churn_is_reclaimed_and_live_values_copied_forward() {
    let fixture = Fixture::new();
    let store = fixture.open().unwrap();
    let once = Bytes::from(vec![b'o'; 2_000]);
    store
        .save_state("session/once", once.clone())
        .wait()
        .unwrap();
    store
        .save_state("session/gone", Bytes::from_static(b"g"))
        .wait()
        .unwrap();
    let busy = |n: usize| Bytes::from(format!("{n:0>200}"));
    for n in 1..=1_000 {
        store.save_state("session/busy", busy(n)).wait().unwrap();
    }
    store.remove_state("session/gone").wait().unwrap();
    let first_segment = fixture.segment_files()[0].clone();
    let before = fixture.segment_files().len();
    assert!(before >= 3, "the churn spans {before} segments");
    store.reclaim().unwrap();
    assert!(
        !first_segment.exists(),
        "the first segment was not reclaimed"
    );
    assert!(
        fixture.segment_files().len() <= 2,
        "{} segments left of {before}",
        fixture.segment_files().len()
    );
    let expected = vec![
        ("session/busy".to_string(), busy(1_000)),
        ("session/once".to_string(), once.clone()),
    ];
    assert_eq!(store.states(""), expected);
    drop(store);
    let store = fixture.open().unwrap();
    assert_eq!(store.states(""), expected);
}

/// State saves ride the group commit: saves, subscriber saves and appends queued while the
/// committer is busy with one sync become one group (one write, one `fdatasync`).
#[test]
fn state_saves_share_the_group_commit_with_appends() {
    const SAVES: u64 = 40;
    let fixture = Fixture::new();
    let fs = GatedFs::default();
    let store = EmbeddedLog::open_with_fs(
        Arc::new(fs.clone()),
        fixture.dir.path(),
        small_options(),
        policies(),
        fixture.clock.clone() as Arc<dyn Clock>,
    )
    .unwrap();
    fs.arm();
    let plug = store.save_state("plug", Bytes::from_static(b"p"));
    fs.wait_until_holding();
    let before = store.stats();
    let mut tickets: Vec<_> = (0..SAVES)
        .map(|n| store.save_state(&format!("session/{n}"), Bytes::from(n.to_string())))
        .collect();
    tickets.push(store.save_subscriber(subscriber("jobs:a", "worker", 1)));
    tickets.push(store.remove_state("session/0"));
    let append = store.append(channel("jobs:a"), vec![message("m", "1")]);
    // Nothing queued behind the held sync is visible yet.
    assert_eq!(store.state("session/1"), None);
    fs.release();
    plug.wait().unwrap();
    for ticket in tickets {
        ticket.wait().unwrap();
    }
    append.wait().unwrap();
    let after = store.stats();
    assert_eq!(after.groups, before.groups + 2, "{before:?} -> {after:?}");
    assert_eq!(after.state_saves, before.state_saves + SAVES + 2);
    assert_eq!(after.subscriber_saves, before.subscriber_saves + 1);
    assert_eq!(store.states("session/").len() as u64, SAVES - 1);
}

/// A value within `STATE_VALUE_BYTES_MAX` but larger than one commit of this log
/// (`group_bytes_max` is 16 KiB here) is refused up front with `batch_too_large`.
#[test]
fn a_state_value_larger_than_a_group_is_refused() {
    let fixture = Fixture::new();
    let store = fixture.open().unwrap();
    let value = Bytes::from(vec![0u8; small_options().group_bytes_max]);
    assert!(value.len() <= herald_log::STATE_VALUE_BYTES_MAX);
    match store.save_state("session/big", value).wait() {
        Err(AppendError::Invalid(invalid)) => {
            assert_eq!(invalid.code, herald_core::ErrorCode::BatchTooLarge)
        }
        other => panic!("expected batch_too_large, got {other:?}"),
    }
    assert_eq!(store.state("session/big"), None);
    assert_eq!(store.stats().state_saves, 0);
}
