//! Audience uploads: CSV or JSON Lines, streamed to a file, then read row
//! by row into the campaign's candidates; every bad row is reported with
//! its line and reason, and nothing is kept unless every row is good.
//!
//! CSV: a header with `user` (or `user_id`) and every feature of the
//! campaign's schema (other columns are ignored), one user per row.
//! JSON Lines: `{"user": 7, "features": [0.5, 1, -2]}` (in schema order),
//! or `{"user": 7, "age": 31, "visits": 4}` (by name).

use std::collections::HashSet;
use std::io::BufRead;
use std::path::Path;

use smartmsg_domain::Candidates;

use super::problem::RowError;

/// Row errors listed at most (the count covers them all).
pub const MAX_LISTED: usize = 100;

/// The upload's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Comma-separated values with a header.
    Csv,
    /// One JSON object per line.
    JsonLines,
}

/// What a bad upload looked like.
#[derive(Debug, Default)]
pub struct Bad {
    /// The first [`MAX_LISTED`] bad rows.
    pub rows: Vec<RowError>,
    /// All bad rows.
    pub count: u64,
    /// A problem with the file as a whole (header, size).
    pub file: Option<String>,
}

impl Bad {
    fn row(&mut self, line: u64, reason: impl Into<String>) {
        self.count += 1;
        if self.rows.len() < MAX_LISTED {
            self.rows.push(RowError {
                line,
                reason: reason.into(),
            });
        }
    }
}

fn parse_value(v: &str) -> Result<f32, String> {
    let x: f64 = v
        .trim()
        .parse()
        .map_err(|_| format!("{v:?} is not a number"))?;
    let x = x as f32;
    if x.is_finite() {
        Ok(x)
    } else {
        Err(format!("{v:?} is not a finite number"))
    }
}

/// Reads `path` into candidates with `features` (the schema, in order).
pub fn read(
    path: &Path,
    format: Format,
    features: &[String],
    max_rows: u64,
) -> Result<Candidates, Bad> {
    let mut bad = Bad::default();
    let dim = features.len();
    let mut out = match Candidates::new(dim) {
        Ok(c) => c,
        Err(e) => {
            bad.file = Some(e.to_string());
            return Err(bad);
        }
    };
    let mut seen = HashSet::new();
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            bad.file = Some(e.to_string());
            return Err(bad);
        }
    };
    let mut row = vec![0f32; dim];
    let mut push = |out: &mut Candidates, bad: &mut Bad, line: u64, user: u32, row: &[f32]| {
        if out.len() as u64 >= max_rows {
            if bad.file.is_none() {
                bad.file = Some(format!("more than {max_rows} users"));
            }
            return;
        }
        if !seen.insert(user) {
            bad.row(line, format!("user {user} appears twice"));
            return;
        }
        if let Err(e) = out.push(user, row) {
            bad.row(line, e.to_string());
        }
    };
    match format {
        Format::Csv => {
            let mut r = csv::ReaderBuilder::new()
                .has_headers(true)
                .flexible(true)
                .from_reader(std::io::BufReader::new(file));
            let headers = match r.headers() {
                Ok(h) => h.clone(),
                Err(e) => {
                    bad.file = Some(format!("header: {e}"));
                    return Err(bad);
                }
            };
            let col = |name: &str| headers.iter().position(|h| h.trim() == name);
            let Some(user_col) = col("user").or_else(|| col("user_id")) else {
                bad.file = Some("the header has no `user` (or `user_id`) column".into());
                return Err(bad);
            };
            let mut cols = Vec::with_capacity(dim);
            for f in features {
                match col(f) {
                    Some(i) => cols.push(i),
                    None => {
                        bad.file = Some(format!(
                            "the header has no column {f:?} (the campaign's features: {})",
                            features.join(", ")
                        ));
                        return Err(bad);
                    }
                }
            }
            let mut record = csv::StringRecord::new();
            loop {
                let line = r.position().line();
                match r.read_record(&mut record) {
                    Ok(false) => break,
                    Ok(true) => {}
                    Err(e) => {
                        bad.row(line, e.to_string());
                        continue;
                    }
                }
                let line = record.position().map_or(line, |p| p.line());
                let user = match record.get(user_col).map(|u| u.trim().parse::<u32>()) {
                    Some(Ok(u)) => u,
                    Some(Err(_)) => {
                        bad.row(
                            line,
                            format!(
                                "user {:?} is not an id (0 to 4294967295)",
                                record.get(user_col).unwrap_or("")
                            ),
                        );
                        continue;
                    }
                    None => {
                        bad.row(line, "no user value");
                        continue;
                    }
                };
                let mut ok = true;
                for (j, &c) in cols.iter().enumerate() {
                    match record.get(c).map(parse_value) {
                        Some(Ok(x)) => row[j] = x,
                        Some(Err(e)) => {
                            bad.row(line, format!("{}: {e}", features[j]));
                            ok = false;
                            break;
                        }
                        None => {
                            bad.row(line, format!("{}: missing", features[j]));
                            ok = false;
                            break;
                        }
                    }
                }
                if ok {
                    push(&mut out, &mut bad, line, user, &row);
                }
            }
        }
        Format::JsonLines => {
            let reader = std::io::BufReader::new(file);
            for (i, l) in reader.split(b'\n').enumerate() {
                let line = i as u64 + 1;
                let l = match l {
                    Ok(l) => l,
                    Err(e) => {
                        bad.file = Some(e.to_string());
                        break;
                    }
                };
                if l.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let v: serde_json::Value = match serde_json::from_slice(&l) {
                    Ok(serde_json::Value::Object(m)) => serde_json::Value::Object(m),
                    Ok(_) => {
                        bad.row(line, "not a JSON object");
                        continue;
                    }
                    Err(e) => {
                        bad.row(line, format!("not JSON: {e}"));
                        continue;
                    }
                };
                let user = match v.get("user").and_then(serde_json::Value::as_u64) {
                    Some(u) if u <= u64::from(u32::MAX) => u as u32,
                    _ => {
                        bad.row(line, "\"user\" must be an id (0 to 4294967295)");
                        continue;
                    }
                };
                let mut ok = true;
                if let Some(arr) = v.get("features").and_then(serde_json::Value::as_array) {
                    if arr.len() != dim {
                        bad.row(
                            line,
                            format!("{} features; the campaign has {dim}", arr.len()),
                        );
                        continue;
                    }
                    for (j, x) in arr.iter().enumerate() {
                        match x.as_f64().map(|x| x as f32).filter(|x| x.is_finite()) {
                            Some(x) => row[j] = x,
                            None => {
                                bad.row(line, format!("features[{j}]: {x} is not a finite number"));
                                ok = false;
                                break;
                            }
                        }
                    }
                } else {
                    for (j, f) in features.iter().enumerate() {
                        match v
                            .get(f)
                            .and_then(serde_json::Value::as_f64)
                            .map(|x| x as f32)
                            .filter(|x| x.is_finite())
                        {
                            Some(x) => row[j] = x,
                            None => {
                                bad.row(line, format!("{f}: missing or not a finite number"));
                                ok = false;
                                break;
                            }
                        }
                    }
                }
                if ok {
                    push(&mut out, &mut bad, line, user, &row);
                }
            }
        }
    }
    if out.is_empty() && bad.count == 0 && bad.file.is_none() {
        bad.file = Some("no users".into());
    }
    if bad.count > 0 || bad.file.is_some() {
        return Err(bad);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feats() -> Vec<String> {
        vec!["age".into(), "visits".into()]
    }

    #[test]
    fn csv_and_json_lines_read_and_every_bad_row_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.csv");
        std::fs::write(&f, "user_id,visits,age,extra\n1,2,30,x\n2,3,40,y\n").unwrap();
        let c = read(&f, Format::Csv, &feats(), 10).unwrap();
        assert_eq!(c.users(), &[1, 2]);
        assert_eq!(c.row(0), &[30.0, 2.0]);
        std::fs::write(&f, "user,age,visits\n1,30,2\nx,1,1\n1,2,2\n3,NaN,1\n4,5\n").unwrap();
        let b = read(&f, Format::Csv, &feats(), 10).unwrap_err();
        assert_eq!(b.count, 4, "{:?}", b.rows);
        let lines: Vec<u64> = b.rows.iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![3, 4, 5, 6]);
        assert!(b.rows[1].reason.contains("appears twice"), "{:?}", b.rows);
        std::fs::write(&f, "id,age,visits\n").unwrap();
        assert!(read(&f, Format::Csv, &feats(), 10)
            .unwrap_err()
            .file
            .unwrap()
            .contains("user"));
        let j = dir.path().join("a.jsonl");
        std::fs::write(
            &j,
            "{\"user\":5,\"features\":[1,2]}\n\n{\"user\":6,\"age\":3,\"visits\":4}\n",
        )
        .unwrap();
        let c = read(&j, Format::JsonLines, &feats(), 10).unwrap();
        assert_eq!(c.users(), &[5, 6]);
        std::fs::write(&j, "{\"user\":5,\"features\":[1]}\nnope\n{\"user\":-1}\n").unwrap();
        let b = read(&j, Format::JsonLines, &feats(), 10).unwrap_err();
        assert_eq!(b.count, 3);
        std::fs::write(
            &j,
            "{\"user\":5,\"features\":[1,2]}\n{\"user\":6,\"features\":[1,2]}\n",
        )
        .unwrap();
        assert!(read(&j, Format::JsonLines, &feats(), 1)
            .unwrap_err()
            .file
            .unwrap()
            .contains("more than 1"));
    }
}
