//! Recovery and damage: torn tails are cut, damage in durable data is a
//! typed error naming file and offset, foreign files are refused.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use smartmsg_embedded::frame::{parse_header, HEADER_LEN};
use smartmsg_embedded::segment::SEGMENT_HEADER;
use smartmsg_embedded::{EmbeddedConfig, EmbeddedError, EmbeddedLog};
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn small() -> EmbeddedConfig {
    {
        let mut built = EmbeddedConfig::default();
        built.segment_bytes = 64 << 10;
        built
    }
}

/// Appends `n` single-event transactions, one batch each, round-robin over
/// three streams.
fn fill(log: &EmbeddedLog, n: u64) {
    rt().block_on(async {
        for i in 0..n {
            let s = StreamId::new(format!("s-{}", i % 3)).unwrap();
            let payload = format!("event number {i} with some padding to make it longer");
            log.append(AppendTx::single(
                s,
                ExpectedVersion::Any,
                vec![NewEvent::new("E", 1, i, payload.into_bytes())],
            ))
            .await
            .unwrap();
        }
    });
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// Byte offsets of the frames in a segment.
fn frame_offsets(path: &Path) -> Vec<u64> {
    let data = std::fs::read(path).unwrap();
    let mut at = SEGMENT_HEADER as usize;
    let mut out = Vec::new();
    while let Ok(h) = parse_header(&data[at..]) {
        out.push(at as u64);
        at += HEADER_LEN + h.len as usize;
    }
    out
}

fn head(log: &EmbeddedLog) -> u64 {
    rt().block_on(log.head()).unwrap()
}

fn all_payloads(log: &EmbeddedLog) -> Vec<Vec<u8>> {
    rt().block_on(log.read_all(0, 100_000))
        .unwrap()
        .into_iter()
        .map(|e| e.payload.to_vec())
        .collect()
}

#[test]
fn missing_directory_is_created_and_reopens_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/b/c");
    let log = EmbeddedLog::open_with(&dir, small()).unwrap();
    assert_eq!(head(&log), 0);
    drop(log);
    let log = EmbeddedLog::open_with(&dir, small()).unwrap();
    assert_eq!(head(&log), 0);
    assert_eq!(log.torn_bytes_recovered(), 0);
}

#[test]
fn second_open_is_refused_while_the_first_lives() {
    let tmp = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open_with(tmp.path(), small()).unwrap();
    let err = EmbeddedLog::open_with(tmp.path(), small()).unwrap_err();
    assert!(matches!(err, EmbeddedError::Locked { .. }), "{err}");
    drop(log);
    EmbeddedLog::open_with(tmp.path(), small()).unwrap();
}

#[test]
fn flipped_byte_mid_segment_is_a_typed_error_naming_file_and_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open_with(tmp.path(), small()).unwrap();
    fill(&log, 40);
    drop(log);
    let seg = segments(tmp.path()).remove(0);
    let offsets = frame_offsets(&seg);
    assert!(offsets.len() >= 40);
    let target = offsets[10];
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, target + 30).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], target + 30).unwrap();
    drop(f);
    match EmbeddedLog::open_with(tmp.path(), small()).unwrap_err() {
        EmbeddedError::Corrupt {
            file,
            offset,
            reason,
        } => {
            assert_eq!(file, seg);
            assert_eq!(offset, target);
            assert!(reason.contains("CRC"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other}"),
    }
}

#[test]
fn zeroed_header_mid_segment_is_not_mistaken_for_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open_with(tmp.path(), small()).unwrap();
    fill(&log, 20);
    drop(log);
    let seg = segments(tmp.path()).remove(0);
    let target = frame_offsets(&seg)[5];
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&[0u8; HEADER_LEN], target).unwrap();
    drop(f);
    let err = EmbeddedLog::open_with(tmp.path(), small()).unwrap_err();
    assert!(
        matches!(err, EmbeddedError::Corrupt { offset, .. } if offset == target),
        "{err}"
    );
}

#[test]
fn garbage_tail_is_cut_and_the_log_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open_with(tmp.path(), small()).unwrap();
    fill(&log, 10);
    let before = all_payloads(&log);
    drop(log);
    let seg = segments(tmp.path()).remove(0);
    let offsets = frame_offsets(&seg);
    let data = std::fs::read(&seg).unwrap();
    let end = *offsets.last().unwrap() as usize
        + HEADER_LEN
        + parse_header(&data[*offsets.last().unwrap() as usize..])
            .unwrap()
            .len as usize;
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(
        b"\x53\x4d\x46\x31garbage that is not a frame at all",
        end as u64,
    )
    .unwrap();
    drop(f);
    let log = EmbeddedLog::open_with(tmp.path(), small()).unwrap();
    assert!(log.torn_bytes_recovered() > 0);
    assert_eq!(all_payloads(&log), before);
    fill(&log, 5);
    drop(log);
    let log = EmbeddedLog::open_with(tmp.path(), small()).unwrap();
    assert_eq!(log.torn_bytes_recovered(), 0);
    assert_eq!(head(&log), 15);
}

#[test]
fn truncated_last_frame_is_cut_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open_with(tmp.path(), small()).unwrap();
    fill(&log, 10);
    let before = all_payloads(&log);
    drop(log);
    let seg = segments(tmp.path()).remove(0);
    let last = *frame_offsets(&seg).last().unwrap();
    // Zero the second half of the last frame, as a torn write would leave it.
    let data = std::fs::read(&seg).unwrap();
    let len = HEADER_LEN + parse_header(&data[last as usize..]).unwrap().len as usize;
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&vec![0u8; len / 2], last + (len - len / 2) as u64)
        .unwrap();
    drop(f);
    let log = EmbeddedLog::open_with(tmp.path(), small()).unwrap();
    assert_eq!(head(&log), 9);
    assert_eq!(all_payloads(&log), before[..9].to_vec());
}

#[test]
fn a_file_that_is_not_a_segment_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("notes.txt"), b"hello").unwrap();
    let err = EmbeddedLog::open_with(tmp.path(), small()).unwrap_err();
    assert!(
        matches!(&err, EmbeddedError::NotASegment { path, .. } if path.ends_with("notes.txt")),
        "{err}"
    );

    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("00000000000000000000.seg"), vec![7u8; 4096]).unwrap();
    let err = EmbeddedLog::open_with(tmp.path(), small()).unwrap_err();
    assert!(matches!(err, EmbeddedError::NotASegment { .. }), "{err}");
}

#[test]
fn segments_roll_and_everything_reads_back_after_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open_with(tmp.path(), {
        let mut built = small();
        built.segment_bytes = 8 << 10;
        built
    })
    .unwrap();
    fill(&log, 300);
    assert!(
        log.segment_count() > 3,
        "only {} segments",
        log.segment_count()
    );
    let before = all_payloads(&log);
    let s1 = rt()
        .block_on(log.read_stream(&StreamId::new("s-1").unwrap(), 1, 1000))
        .unwrap();
    drop(log);
    let log = EmbeddedLog::open_with(tmp.path(), {
        let mut built = small();
        built.segment_bytes = 8 << 10;
        built
    })
    .unwrap();
    assert_eq!(all_payloads(&log), before);
    let s1b = rt()
        .block_on(log.read_stream(&StreamId::new("s-1").unwrap(), 1, 1000))
        .unwrap();
    assert_eq!(s1, s1b);
    assert_eq!(s1.len(), 100);
    assert!(s1
        .iter()
        .enumerate()
        .all(|(i, e)| e.version == i as u64 + 1));
}

#[test]
fn damage_in_an_earlier_segment_is_an_error_even_at_its_end() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = {
        let mut built = small();
        built.segment_bytes = 8 << 10;
        built
    };
    let log = EmbeddedLog::open_with(tmp.path(), cfg.clone()).unwrap();
    fill(&log, 300);
    drop(log);
    let seg = segments(tmp.path()).remove(0);
    let last = *frame_offsets(&seg).last().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(b"XXXX", last + 20).unwrap();
    drop(f);
    let err = EmbeddedLog::open_with(tmp.path(), cfg).unwrap_err();
    assert!(
        matches!(&err, EmbeddedError::Corrupt { file, offset, .. } if *file == seg && *offset == last),
        "{err}"
    );
}

#[test]
fn a_clean_shutdown_mark_spares_the_tail_check_and_is_gone_once_written_to() {
    let tmp = tempfile::tempdir().unwrap();
    let mark = tmp.path().join(smartmsg_embedded::clean::CLEAN_FILE);
    let log = EmbeddedLog::open_with(tmp.path(), small()).unwrap();
    assert!(!log.opened_clean());
    fill(&log, 10);
    drop(log);
    assert!(mark.is_file(), "a clean close leaves the mark");
    let log = EmbeddedLog::open_with(tmp.path(), small()).unwrap();
    assert!(log.opened_clean());
    assert_eq!(head(&log), 10);
    assert!(mark.is_file(), "reading alone keeps the mark");
    fill(&log, 1);
    assert!(
        !mark.exists(),
        "the mark must be gone before anything new is written"
    );
    let before = all_payloads(&log);
    drop(log);
    let log = EmbeddedLog::open_with(tmp.path(), small()).unwrap();
    assert!(log.opened_clean());
    assert_eq!(all_payloads(&log), before);
}

#[test]
fn a_stale_or_damaged_mark_falls_back_to_the_full_check() {
    let tmp = tempfile::tempdir().unwrap();
    let mark = tmp.path().join(smartmsg_embedded::clean::CLEAN_FILE);
    let log = EmbeddedLog::open_with(tmp.path(), small()).unwrap();
    fill(&log, 10);
    drop(log);
    let old_mark = std::fs::read(&mark).unwrap();
    let log = EmbeddedLog::open_with(tmp.path(), small()).unwrap();
    fill(&log, 5);
    let before = all_payloads(&log);
    drop(log);

    // A stale mark (as if its removal had been lost): the frames go on past
    // the end it names, so the whole log is checked and nothing is lost.
    std::fs::write(&mark, &old_mark).unwrap();
    let log = EmbeddedLog::open_with(tmp.path(), small()).unwrap();
    assert!(!log.opened_clean());
    assert_eq!(all_payloads(&log), before);
    drop(log);

    // A stale mark and the frame after its end torn: the full check cuts it.
    std::fs::write(&mark, &old_mark).unwrap();
    let seg = segments(tmp.path()).remove(0);
    let last = *frame_offsets(&seg).last().unwrap();
    let data = std::fs::read(&seg).unwrap();
    let len = HEADER_LEN + parse_header(&data[last as usize..]).unwrap().len as usize;
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&vec![0u8; len / 2], last + (len - len / 2) as u64)
        .unwrap();
    drop(f);
    let log = EmbeddedLog::open_with(tmp.path(), small()).unwrap();
    assert!(!log.opened_clean());
    assert!(log.torn_bytes_recovered() > 0);
    assert_eq!(all_payloads(&log), before[..14].to_vec());
    drop(log);

    // A damaged mark is ignored.
    let mut bad = std::fs::read(&mark).unwrap();
    bad[6] ^= 0x40;
    std::fs::write(&mark, &bad).unwrap();
    let log = EmbeddedLog::open_with(tmp.path(), small()).unwrap();
    assert!(!log.opened_clean());
    assert_eq!(head(&log), 14);
}

#[test]
fn idempotency_keys_expire_alike_live_and_after_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let config = {
        let mut built = small();
        built.limits = {
            let mut built = smartmsg_engine::Limits::default();
            built.idempotency_window = 10;
            built
        };
        built
    };
    let keyed = |key: &str| {
        AppendTx::single(
            StreamId::new("s").unwrap(),
            ExpectedVersion::Any,
            vec![NewEvent::new("E", 1, 0, &b"x"[..])],
        )
        .with_idempotency_key(key)
    };
    let log = EmbeddedLog::open_with(tmp.path(), config.clone()).unwrap();
    let first = rt().block_on(log.append(keyed("k0"))).unwrap();
    fill(&log, 5);
    // Within the window: a retry returns the first result.
    assert_eq!(rt().block_on(log.append(keyed("k0"))).unwrap(), first);
    drop(log);
    let log = EmbeddedLog::open_with(tmp.path(), config.clone()).unwrap();
    assert_eq!(rt().block_on(log.append(keyed("k0"))).unwrap(), first);
    fill(&log, 10);
    drop(log);
    // Position 0 is now more than 10 behind the head: forgotten, after a
    // reopen as it would be live, so the retry is written again.
    let log = EmbeddedLog::open_with(tmp.path(), config).unwrap();
    let again = rt().block_on(log.append(keyed("k0"))).unwrap();
    assert_eq!(again.first_position, 16);
}
