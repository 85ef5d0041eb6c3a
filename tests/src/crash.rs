//! The contract between the crash test and its child writer.
//!
//! The child appends transactions and prints one line per acknowledged
//! append: `ack <first_position> <n_events>`. Every event's payload names
//! its transaction and its place in it, so the parent can check, after a
//! kill, that whatever is visible is whole transactions with the contents
//! the child wrote.

/// Encodes the payload of part `part` of `n` of the transaction that starts
/// at the stream/version pair `(stream, version)` of its first event.
pub fn payload(writer: u32, tx_seq: u64, part: u32, n: u32) -> Vec<u8> {
    let mut p = format!("w{writer} tx{tx_seq} part {part}/{n} ").into_bytes();
    // Some bulk so frames cross page boundaries and torn writes happen.
    let fill = (tx_seq % 200) as usize + 20;
    p.extend(std::iter::repeat_n(b'a' + (tx_seq % 26) as u8, fill));
    p
}

/// Parses a payload back into `(writer, tx_seq, part, n)`.
pub fn parse_payload(p: &[u8]) -> Option<(u32, u64, u32, u32)> {
    let s = std::str::from_utf8(p).ok()?;
    let mut it = s.split(' ');
    let w = it.next()?.strip_prefix('w')?.parse().ok()?;
    let tx = it.next()?.strip_prefix("tx")?.parse().ok()?;
    if it.next()? != "part" {
        return None;
    }
    let (part, n) = it.next()?.split_once('/')?;
    let (part, n): (u32, u32) = (part.parse().ok()?, n.parse().ok()?);
    let expect = payload(w, tx, part, n);
    (expect == p).then_some((w, tx, part, n))
}
