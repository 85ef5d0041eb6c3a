//! `JsonLinesSource` through the `ReactionSource` trait: cursors, partial
//! lines, directories, oversized lines and bad input.

use std::io::Write;
use std::path::Path;

use smartmsg_domain::reactions::MAX_MESSAGE_BYTES;
use smartmsg_engine::StreamId;
use smartmsg_service::ingest::{Incoming, Routes};
use smartmsg_service::{JsonLinesSource, Polled, ReactionSource};

fn append(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
}

/// Polls from `cursor` in steps of `max` until a poll returns nothing and
/// keeps its cursor (an empty poll may move past blank lines); returns
/// every message and the final cursor. Fails if a poll returns more than
/// `max`.
async fn drain(
    src: &mut dyn ReactionSource,
    mut cursor: Option<Vec<u8>>,
    max: usize,
) -> (Vec<Incoming>, Option<Vec<u8>>) {
    let mut out = Vec::new();
    for _ in 0..10_000 {
        let Polled {
            messages,
            cursor: next,
        } = src.poll(cursor.as_deref(), max).await.unwrap();
        assert!(messages.len() <= max, "{} > max {max}", messages.len());
        let done = messages.is_empty() && cursor.as_deref() == Some(next.as_slice());
        out.extend(messages);
        cursor = Some(next);
        if done {
            return (out, cursor);
        }
    }
    panic!("the source never ran dry");
}

fn payloads(m: &[Incoming]) -> Vec<String> {
    m.iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect()
}

fn offsets(m: &[Incoming]) -> Vec<u64> {
    m.iter().map(|m| m.offset.expect("an offset")).collect()
}

/// A file's lines: `(offset of the line start, line without its end)`.
const LINES: &[&str] = &[
    "{\"n\":0}\n",
    "\n",
    "{\"n\":1}\r\n",
    "   \n",
    "{\"n\":2,\"text\":\"ä\"}\n",
    "\r\n",
    "{\"n\":3}\n",
];

fn want_lines() -> (Vec<String>, Vec<u64>) {
    let mut at = 0u64;
    let mut p = Vec::new();
    let mut o = Vec::new();
    for l in LINES {
        let t = l.trim_end_matches('\n').trim_end_matches('\r');
        if !t.trim().is_empty() {
            p.push(t.to_owned());
            o.push(at);
        }
        at += l.len() as u64;
    }
    (p, o)
}

#[tokio::test]
async fn every_line_once_in_order_whatever_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("r.jsonl");
    append(&path, LINES.concat().as_bytes());
    let (want_p, want_o) = want_lines();
    assert_eq!(want_p.len(), 4);
    for max in [1, 2, 3, 400] {
        let mut src = JsonLinesSource::new("file", &path);
        assert_eq!(src.name(), "file");
        let (got, cursor) = drain(&mut src, None, max).await;
        assert_eq!(payloads(&got), want_p, "max {max}");
        assert_eq!(offsets(&got), want_o, "max {max}");
        assert!(got.iter().all(|m| m.arrival_ms.is_none()));
        // At the end: polling again gives nothing, with the same cursor.
        let again = src.poll(cursor.as_deref(), max).await.unwrap();
        assert!(again.messages.is_empty());
        assert_eq!(Some(again.cursor), cursor);
    }
}

#[tokio::test]
async fn a_poll_of_zero_messages_skips_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("a.jsonl"), "{\"a\":1}\n").unwrap();
    std::fs::write(tmp.path().join("b.jsonl"), "{\"b\":1}\n").unwrap();
    let mut src = JsonLinesSource::new("dir", tmp.path());
    let p = src.poll(None, 0).await.unwrap();
    assert!(p.messages.is_empty());
    let (got, _) = drain(&mut src, Some(p.cursor), 10).await;
    assert_eq!(payloads(&got), ["{\"a\":1}", "{\"b\":1}"]);
}

#[tokio::test]
async fn a_partial_last_line_waits_for_its_end() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("r.jsonl");
    append(&path, b"{\"n\":0}\n{\"n\":1");
    let mut src = JsonLinesSource::new("file", &path);
    let (got, cursor) = drain(&mut src, None, 10).await;
    assert_eq!(payloads(&got), ["{\"n\":0}"]);

    // Still partial: still nothing, from the same cursor.
    append(&path, b",\"more\":true");
    let p = src.poll(cursor.as_deref(), 10).await.unwrap();
    assert!(p.messages.is_empty(), "{:?}", p.messages);

    // Completed: taken whole, once, at its start.
    append(&path, b"}\r\n{\"n\":2}\n");
    let (got, cursor) = drain(&mut src, Some(p.cursor), 10).await;
    assert_eq!(payloads(&got), ["{\"n\":1,\"more\":true}", "{\"n\":2}"]);
    assert_eq!(offsets(&got), [8, 29]);
    let (got, _) = drain(&mut src, cursor, 10).await;
    assert!(got.is_empty());
}

#[tokio::test]
async fn a_directory_is_read_file_by_file_in_name_order() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let a = dir.join("a.jsonl");
    let b = dir.join("b.jsonl");
    // Other files are ignored.
    std::fs::write(dir.join("notes.txt"), "{\"x\":1}\n").unwrap();
    std::fs::write(dir.join("c.jsonl.tmp"), "{\"x\":2}\n").unwrap();
    std::fs::create_dir(dir.join("d.jsonl")).unwrap();
    append(&a, b"{\"f\":\"a\",\"n\":0}\n{\"f\":\"a\",\"n\":1}\n");

    let mut src = JsonLinesSource::new("dir", dir);
    let (got, cursor) = drain(&mut src, None, 1).await;
    assert_eq!(
        payloads(&got),
        ["{\"f\":\"a\",\"n\":0}", "{\"f\":\"a\",\"n\":1}"]
    );

    // `a` grows, and `b` appears (written first, named later): `a` is read
    // to its end before anything of `b`.
    append(&b, b"{\"f\":\"b\",\"n\":0}\n");
    append(&a, b"{\"f\":\"a\",\"n\":2}\n");
    let (got, cursor) = drain(&mut src, cursor, 1).await;
    assert_eq!(
        payloads(&got),
        ["{\"f\":\"a\",\"n\":2}", "{\"f\":\"b\",\"n\":0}"]
    );
    assert_eq!(offsets(&got), [32, 0]);

    // The cursor names `b` now: what is added to `a` later is not read
    // again or at all (`a` was finished once `b` existed).
    append(&a, b"{\"f\":\"a\",\"n\":3}\n");
    append(&b, b"{\"f\":\"b\",\"n\":1}\n");
    let (got, _) = drain(&mut src, cursor.clone(), 5).await;
    assert_eq!(payloads(&got), ["{\"f\":\"b\",\"n\":1}"]);

    // From the start, in big steps: a, then b, in order.
    let (got, _) = drain(&mut src, None, 400).await;
    assert_eq!(
        payloads(&got),
        [
            "{\"f\":\"a\",\"n\":0}",
            "{\"f\":\"a\",\"n\":1}",
            "{\"f\":\"a\",\"n\":2}",
            "{\"f\":\"a\",\"n\":3}",
            "{\"f\":\"b\",\"n\":0}",
            "{\"f\":\"b\",\"n\":1}"
        ]
    );

    // Files already consumed may be removed: the cursor still works.
    std::fs::remove_file(&a).unwrap();
    let (got, _) = drain(&mut src, cursor, 5).await;
    assert_eq!(payloads(&got), ["{\"f\":\"b\",\"n\":1}"]);
}

#[tokio::test]
async fn a_finished_file_without_a_final_newline_does_not_block_the_next() {
    let tmp = tempfile::tempdir().unwrap();
    append(&tmp.path().join("a.jsonl"), b"{\"a\":0}\n{\"a\":1}");
    append(&tmp.path().join("b.jsonl"), b"{\"b\":0}\n");
    let mut src = JsonLinesSource::new("dir", tmp.path());
    for max in [1, 10] {
        let (got, _) = drain(&mut src, None, max).await;
        assert_eq!(
            payloads(&got),
            ["{\"a\":0}", "{\"a\":1}", "{\"b\":0}"],
            "max {max}"
        );
        assert_eq!(offsets(&got), [0, 8, 0]);
    }
}

fn routes() -> Routes {
    let r = Routes::default();
    r.insert("c1", StreamId::new("pipeline-c1").unwrap());
    r
}

/// A line of `n` bytes that would route to campaign `c1` if it were not too
/// large.
fn long_line(n: usize) -> Vec<u8> {
    let head = b"{\"campaign\":\"c1\",\"pad\":\"";
    let tail = b"\"}";
    let mut v = head.to_vec();
    v.resize(n - tail.len(), b'x');
    v.extend_from_slice(tail);
    assert_eq!(v.len(), n);
    v
}

#[tokio::test]
async fn an_oversized_line_is_handed_out_to_be_dead_lettered_and_passed() {
    for (size, max) in [
        (MAX_MESSAGE_BYTES + 2, 1),
        (MAX_MESSAGE_BYTES + 1_000, 1),
        (5 * MAX_MESSAGE_BYTES, 2),
        (3 * MAX_MESSAGE_BYTES, 400),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("r.jsonl");
        let mut text = b"{\"campaign\":\"c1\",\"n\":0}\n".to_vec();
        let big_at = text.len() as u64;
        text.extend(long_line(size));
        text.extend(b"\n{\"campaign\":\"c1\",\"n\":1}\n");
        let after = big_at + size as u64 + 1;
        append(&path, &text);

        let mut src = JsonLinesSource::new("file", &path);
        let (got, _) = drain(&mut src, None, max).await;
        let what = format!("size {size}, max {max}");
        assert_eq!(got.len(), 3, "{what}: {:?}", offsets(&got));
        assert_eq!(offsets(&got), [0, big_at, after], "{what}");
        assert_eq!(got[0].payload.as_ref(), b"{\"campaign\":\"c1\",\"n\":0}");
        assert_eq!(got[2].payload.as_ref(), b"{\"campaign\":\"c1\",\"n\":1}");
        // The oversized line comes out as a message the router refuses as
        // too large (a dead letter), never as a routable reaction.
        let big = &got[1].payload;
        assert!(big.len() > MAX_MESSAGE_BYTES, "{what}");
        assert!(big.starts_with(b"{\"campaign\":\"c1\""), "{what}");
        let err = routes().route(big).unwrap_err();
        assert!(err.contains("limit"), "{what}: {err}");
        // The normal lines route.
        assert_eq!(routes().route(&got[2].payload).unwrap().0, "c1");
    }
}

#[tokio::test]
async fn a_line_of_the_largest_accepted_size_is_taken_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("r.jsonl");
    let line = long_line(MAX_MESSAGE_BYTES);
    let mut text = line.clone();
    text.extend(b"\r\n");
    text.extend(&line);
    text.extend(b"\n");
    append(&path, &text);
    let mut src = JsonLinesSource::new("file", &path);
    let (got, _) = drain(&mut src, None, 1).await;
    assert_eq!(got.len(), 2);
    assert_eq!(offsets(&got), [0, MAX_MESSAGE_BYTES as u64 + 2]);
    for m in &got {
        assert_eq!(m.payload.as_ref(), line.as_slice());
        assert_eq!(routes().route(&m.payload).unwrap().0, "c1");
    }
}

#[tokio::test]
async fn an_oversized_line_still_being_written_waits_then_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("r.jsonl");
    let line = long_line(2 * MAX_MESSAGE_BYTES);
    append(&path, b"{\"n\":0}\n");
    append(&path, &line[..MAX_MESSAGE_BYTES + 100]);
    let mut src = JsonLinesSource::new("file", &path);
    let (got, cursor) = drain(&mut src, None, 1).await;
    assert_eq!(payloads(&got), ["{\"n\":0}"]);

    // The rest of the line, its end, and one more line.
    append(&path, &line[MAX_MESSAGE_BYTES + 100..]);
    append(&path, b"\n{\"n\":1}\n");
    let (got, cursor) = drain(&mut src, cursor, 1).await;
    assert_eq!(got.len(), 2);
    assert_eq!(offsets(&got), [8, 8 + line.len() as u64 + 1]);
    assert!(got[0].payload.len() > MAX_MESSAGE_BYTES);
    assert!(routes().route(&got[0].payload).is_err());
    assert_eq!(got[1].payload.as_ref(), b"{\"n\":1}");
    let (got, _) = drain(&mut src, cursor, 1).await;
    assert!(got.is_empty());
}

#[tokio::test]
async fn a_garbage_cursor_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("r.jsonl");
    append(&path, b"{\"n\":0}\n");
    let mut src = JsonLinesSource::new("file", &path);
    let bad_cursors: [&[u8]; 5] = [b"not json", b"", b"{\"file\":3}", b"[1,2]", &[0xff, 0xfe]];
    for bad in bad_cursors {
        let r = src.poll(Some(bad), 10).await;
        assert!(r.is_err(), "cursor {bad:?}: {r:?}");
    }
    // A good cursor still works afterwards.
    let p = src.poll(None, 10).await.unwrap();
    assert_eq!(p.messages.len(), 1);
}

#[tokio::test]
async fn a_missing_path_polls_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("nothing-here.jsonl");
    let mut src = JsonLinesSource::new("file", &path);
    let p = src.poll(None, 10).await.unwrap();
    assert!(p.messages.is_empty());
    let again = src.poll(Some(p.cursor.as_slice()), 10).await.unwrap();
    assert!(again.messages.is_empty());
    assert_eq!(again.cursor, p.cursor, "an empty poll keeps its cursor");

    // Once the file appears, the cursor of the empty polls reads it from
    // the start.
    append(&path, b"{\"n\":0}\n");
    let p = src.poll(Some(again.cursor.as_slice()), 10).await.unwrap();
    assert_eq!(payloads(&p.messages), ["{\"n\":0}"]);
    assert_eq!(offsets(&p.messages), [0]);

    // An empty directory too.
    let dir = tmp.path().join("empty");
    std::fs::create_dir(&dir).unwrap();
    let mut src = JsonLinesSource::new("dir", &dir);
    assert!(src.poll(None, 10).await.unwrap().messages.is_empty());
}

#[tokio::test]
async fn a_long_run_of_blank_lines_does_not_end_a_file_early() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = vec![b'\n'; 3 * MAX_MESSAGE_BYTES];
    a.extend(b"{\"a\":0}\n");
    append(&tmp.path().join("a.jsonl"), &a);
    append(&tmp.path().join("b.jsonl"), b"{\"b\":0}\n");
    let mut src = JsonLinesSource::new("dir", tmp.path());
    for max in [1, 2] {
        let (got, _) = drain(&mut src, None, max).await;
        assert_eq!(payloads(&got), ["{\"a\":0}", "{\"b\":0}"], "max {max}");
        assert_eq!(offsets(&got), [3 * MAX_MESSAGE_BYTES as u64, 0]);
    }
}

/// Through `ingest_once`: routable lines go to their campaign's pipeline
/// stream, the oversized line to the unrouted dead letters (with its
/// origin), and a second ingest finds nothing new.
#[tokio::test]
async fn ingested_an_oversized_line_becomes_an_unrouted_dead_letter() {
    use std::sync::Arc;

    use smartmsg_engine::memory::InMemoryLog;
    use smartmsg_engine::EventLog;
    use smartmsg_service::ingest::{ingest_once, MAX_POLL};
    use smartmsg_service::Unrouted;

    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("r.jsonl");
    let first = b"{\"campaign\":\"c1\",\"n\":0}\n";
    let big = long_line(4 * MAX_MESSAGE_BYTES);
    append(&path, first);
    append(&path, &big);
    append(&path, b"\n{\"campaign\":\"c1\",\"n\":1}\n");

    let log: Arc<dyn EventLog> = Arc::new(InMemoryLog::new());
    let routes = routes();
    let mut src = JsonLinesSource::new("file", &path);
    // One message per poll: the oversized line is longer than a poll reads.
    let mut taken = Vec::new();
    for now in 1..10 {
        let n = ingest_once(&log, &routes, &mut src, now, 1).await.unwrap();
        if n == 0 {
            break;
        }
        taken.push(n);
    }
    assert_eq!(taken, [1, 1, 1]);
    assert_eq!(
        ingest_once(&log, &routes, &mut src, 20, MAX_POLL)
            .await
            .unwrap(),
        0
    );

    let pipeline = log
        .read_stream(&StreamId::new("pipeline-c1").unwrap(), 1, 100)
        .await
        .unwrap();
    assert_eq!(pipeline.len(), 2, "the two routable lines, once each");
    let unrouted = log
        .read_stream(&StreamId::new("reactions-unrouted").unwrap(), 1, 100)
        .await
        .unwrap();
    assert_eq!(unrouted.len(), 1);
    let u: Unrouted = serde_json::from_slice(&unrouted[0].payload).unwrap();
    assert!(u.reason.contains("limit"), "{}", u.reason);
    assert_eq!(u.origin.as_deref(), Some(&*format!("file@{}", first.len())));
    assert!(u.excerpt.starts_with("{\"campaign\":\"c1\""));
}
