//! Reading logged bandit feedback: a CSV with named columns, or the
//! decisions this engine's campaigns recorded; and target probabilities.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::Path;

use smartmsg_domain::CampaignEvent;
use smartmsg_engine::{EventCodec, RecordedEvent};

use super::{LoggedData, OpeError, TargetProbs};

/// Which columns hold what.
#[derive(Debug, Clone, Default)]
pub struct Columns {
    /// Timestamp column (kept as text).
    pub timestamp: Option<String>,
    /// Context feature columns: numeric when every value parses as a
    /// number, otherwise categorical (one-hot encoded, one column per
    /// value seen).
    pub features: Vec<String>,
    /// The action column.
    pub action: String,
    /// The slot (position) column.
    pub slot: Option<String>,
    /// The reward column (numeric).
    pub reward: String,
    /// The logging propensity column, in (0, 1].
    pub propensity: String,
    /// The known actions; when given, any other action is an error.
    /// Otherwise the actions are those seen, sorted.
    pub actions: Option<Vec<String>>,
}

/// Bad rows reported at most.
const MAX_ROWS: usize = 50;

/// Reads logged feedback from CSV text. `origin` names it in errors.
pub fn parse_csv(input: impl Read, origin: &Path, cols: &Columns) -> Result<LoggedData, OpeError> {
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(input);
    let header: Vec<String> = rdr
        .headers()
        .map_err(|e| OpeError::Read {
            path: origin.to_owned(),
            reason: e.to_string(),
        })?
        .iter()
        .map(str::to_owned)
        .collect();
    let find = |name: &str| -> Result<usize, OpeError> {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| OpeError::MissingColumn {
                path: origin.to_owned(),
                column: name.to_owned(),
                available: header.join(", "),
            })
    };
    let action_col = find(&cols.action)?;
    let reward_col = find(&cols.reward)?;
    let prop_col = find(&cols.propensity)?;
    let slot_col = cols.slot.as_deref().map(find).transpose()?;
    let ts_col = cols.timestamp.as_deref().map(find).transpose()?;
    let feat_cols: Vec<usize> = cols
        .features
        .iter()
        .map(|f| find(f))
        .collect::<Result<_, _>>()?;
    let known: Option<BTreeSet<&str>> = cols
        .actions
        .as_ref()
        .map(|a| a.iter().map(String::as_str).collect());

    let mut bad: Vec<(u64, String)> = Vec::new();
    let mut bad_count = 0usize;
    let mut note = |line: u64, reason: String, bad: &mut Vec<(u64, String)>| {
        bad_count += 1;
        if bad.len() < MAX_ROWS {
            bad.push((line, reason));
        }
    };
    // Raw values first; feature types are decided over all good rows.
    let mut raw_feats: Vec<Vec<String>> = Vec::new();
    let mut actions_raw: Vec<String> = Vec::new();
    let mut reward = Vec::new();
    let mut propensity = Vec::new();
    let mut slot = Vec::new();
    let mut timestamp = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let line = i as u64 + 2;
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                note(line, format!("unreadable: {e}"), &mut bad);
                continue;
            }
        };
        let get = |c: usize| rec.get(c).unwrap_or("");
        let mut why = Vec::new();
        let action = get(action_col);
        if action.is_empty() {
            why.push("missing action".to_owned());
        } else if let Some(k) = &known {
            if !k.contains(action) {
                why.push(format!("unknown action `{action}`"));
            }
        }
        let r = get(reward_col);
        let r = match r.parse::<f64>() {
            Ok(v) if v.is_finite() => Some(v),
            _ if r.is_empty() => {
                why.push("missing reward".into());
                None
            }
            _ => {
                why.push(format!("non-numeric reward `{r}`"));
                None
            }
        };
        let p = get(prop_col);
        let p = match p.parse::<f64>() {
            _ if p.is_empty() => {
                why.push("missing propensity".into());
                None
            }
            Ok(v) if v > 0.0 && v <= 1.0 => Some(v),
            Ok(v) if v.is_finite() && v <= 0.0 => {
                why.push(format!("non-positive propensity {v}"));
                None
            }
            Ok(v) => {
                why.push(format!("propensity {v} outside (0, 1]"));
                None
            }
            Err(_) => {
                why.push(format!("non-numeric propensity `{p}`"));
                None
            }
        };
        for (&c, name) in feat_cols.iter().zip(&cols.features) {
            if get(c).is_empty() {
                why.push(format!("missing feature `{name}`"));
            }
        }
        if !why.is_empty() {
            note(line, why.join("; "), &mut bad);
            continue;
        }
        let (Some(r), Some(p)) = (r, p) else { continue };
        actions_raw.push(action.to_owned());
        reward.push(r);
        propensity.push(p);
        raw_feats.push(feat_cols.iter().map(|&c| get(c).to_owned()).collect());
        if let Some(c) = slot_col {
            slot.push(get(c).to_owned());
        }
        if let Some(c) = ts_col {
            timestamp.push(get(c).to_owned());
        }
    }
    if bad_count > 0 {
        return Err(OpeError::BadRows {
            path: origin.to_owned(),
            count: bad_count,
            rows: bad,
        });
    }
    let actions: Vec<String> = match &cols.actions {
        Some(a) => a.clone(),
        None => actions_raw
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    let index: HashMap<&str, usize> = actions
        .iter()
        .enumerate()
        .map(|(i, a)| (a.as_str(), i))
        .collect();
    let action: Vec<usize> = actions_raw
        .iter()
        .map(|a| index.get(a.as_str()).copied().unwrap_or(0))
        .collect();
    // Encode the features.
    let n = action.len();
    let mut feature_names = Vec::new();
    let mut columns: Vec<Vec<f64>> = Vec::new();
    for (j, name) in cols.features.iter().enumerate() {
        let numeric: Option<Vec<f64>> = raw_feats
            .iter()
            .map(|r| r[j].parse::<f64>().ok().filter(|v| v.is_finite()))
            .collect();
        match numeric {
            Some(v) => {
                feature_names.push(name.clone());
                columns.push(v);
            }
            None => {
                let cats: BTreeSet<&str> = raw_feats.iter().map(|r| r[j].as_str()).collect();
                for c in cats {
                    feature_names.push(format!("{name}={c}"));
                    columns.push(
                        raw_feats
                            .iter()
                            .map(|r| if r[j] == c { 1.0 } else { 0.0 })
                            .collect(),
                    );
                }
            }
        }
    }
    let d = feature_names.len();
    let mut features = vec![0.0; n * d];
    for (j, col) in columns.iter().enumerate() {
        for (i, v) in col.iter().enumerate() {
            features[i * d + j] = *v;
        }
    }
    Ok(LoggedData {
        feature_names,
        features,
        actions,
        action,
        slot: slot_col.map(|_| slot),
        timestamp: ts_col.map(|_| timestamp),
        reward,
        propensity,
    })
}

/// Reads logged feedback from a CSV file.
pub fn read_csv(path: &Path, cols: &Columns) -> Result<LoggedData, OpeError> {
    let f = std::fs::File::open(path).map_err(|e| OpeError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    parse_csv(std::io::BufReader::new(f), path, cols)
}

/// Reads target probabilities: a CSV with one column per action (named as
/// the data's actions) and one row per logged row, in order.
pub fn read_target_probs(
    input: impl Read,
    origin: &Path,
    data: &LoggedData,
) -> Result<TargetProbs, OpeError> {
    let mut rdr = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(input);
    let header: Vec<String> = rdr
        .headers()
        .map_err(|e| OpeError::Read {
            path: origin.to_owned(),
            reason: e.to_string(),
        })?
        .iter()
        .map(str::to_owned)
        .collect();
    let cols: Vec<usize> = data
        .actions
        .iter()
        .map(|a| {
            header
                .iter()
                .position(|h| h == a)
                .ok_or_else(|| OpeError::MissingColumn {
                    path: origin.to_owned(),
                    column: a.clone(),
                    available: header.join(", "),
                })
        })
        .collect::<Result<_, _>>()?;
    let mut probs = Vec::with_capacity(data.len() * cols.len());
    let mut bad = Vec::new();
    let mut count = 0;
    for (i, rec) in rdr.records().enumerate() {
        let line = i as u64 + 2;
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                count += 1;
                if bad.len() < MAX_ROWS {
                    bad.push((line, format!("unreadable: {e}")));
                }
                continue;
            }
        };
        for &c in &cols {
            match rec.get(c).unwrap_or("").parse::<f64>() {
                Ok(v) if v.is_finite() && v >= 0.0 => probs.push(v),
                _ => {
                    count += 1;
                    if bad.len() < MAX_ROWS {
                        bad.push((
                            line,
                            format!("`{}` is not a probability", rec.get(c).unwrap_or("")),
                        ));
                    }
                    probs.push(0.0);
                }
            }
        }
    }
    if count > 0 {
        return Err(OpeError::BadRows {
            path: origin.to_owned(),
            count,
            rows: bad,
        });
    }
    let rows = probs.len() / cols.len().max(1);
    if rows != data.len() {
        return Err(OpeError::Target(format!(
            "{} has {rows} rows; the logged data has {}",
            origin.display(),
            data.len()
        )));
    }
    TargetProbs::new(rows, cols.len(), probs)
}

/// One logged decision of a campaign: the user (to join features), batch.
#[derive(Debug, Clone, PartialEq)]
pub struct CampaignRow {
    /// The user.
    pub user: u32,
    /// The batch.
    pub batch: u32,
    /// The recorded propensity: P(user in batch and creative), the joint
    /// probability the batch-level estimators weight by.
    pub joint: f64,
}

/// Logging policies that pick users uniformly at random, so that a
/// recorded propensity `P(user in batch, creative)` factors into
/// `k/n · P(creative | user)`.
pub const UNIFORM_SELECTION: [&str; 3] = ["random", "explore-then-commit", "creative-thompson"];

/// Extracts the logged decisions of the campaign streams of `events`:
/// one row per planned user (action = creative), reward 1 when the
/// reaction pipeline counted a reaction of that user to that batch, else 0.
/// `features(user)` joins context features (e.g. from the population);
/// `creatives` names the actions `c0..`.
///
/// The recorded propensity is the joint `P(user in batch, creative)`; the
/// row's propensity is the conditional `P(creative | user in batch)`, the
/// joint divided by `k / n` (`k` users planned of the `n = population −
/// already messaged` candidates). That is exact only when the logging
/// policy picks users uniformly ([`UNIFORM_SELECTION`]); a log of another
/// policy is refused with the reason.
pub fn from_events(
    events: &[RecordedEvent],
    population: usize,
    creatives: usize,
    dim: usize,
    features: impl Fn(u32) -> Option<Vec<f64>>,
) -> Result<(LoggedData, Vec<CampaignRow>), OpeError> {
    let bad = |e: &RecordedEvent, why: String| {
        OpeError::Unsupported(format!(
            "event at position {} ({}) does not decode: {why}",
            e.position, e.kind
        ))
    };
    let mut reacted: BTreeSet<(u32, u32)> = BTreeSet::new();
    let mut planned: BTreeMap<(String, u32), (String, smartmsg_domain::Decisions)> =
        BTreeMap::new();
    for e in events {
        if e.kind == "BatchPlanned" && e.stream.as_str().starts_with("campaign-") {
            match CampaignEvent::decode(&e.kind, e.schema, &e.payload) {
                Ok(CampaignEvent::BatchPlanned {
                    batch,
                    part,
                    decisions,
                    policy,
                    ..
                }) => {
                    let key = (e.stream.as_str().to_owned(), batch);
                    // A large batch comes in parts, in order: join them.
                    match planned.get_mut(&key) {
                        Some((_, d)) if !part.is_first() => d.append(&decisions),
                        _ => {
                            planned.insert(key, (policy, decisions));
                        }
                    }
                }
                Ok(_) => {}
                Err(err) => return Err(bad(e, err.to_string())),
            }
        } else if e.kind == smartmsg_domain::reactions::USER_OUTCOMES {
            let (user, r) =
                smartmsg_service::pipeline::decode_outcome(e).map_err(|err| bad(e, err))?;
            if r.reacted {
                reacted.insert((r.batch, user));
            }
        }
    }
    if planned.len() > 1 && planned.keys().map(|k| &k.0).collect::<BTreeSet<_>>().len() > 1 {
        return Err(OpeError::Unsupported(
            "the log holds several campaigns; export one run".into(),
        ));
    }
    let mut data = LoggedData {
        feature_names: (0..dim).map(|j| format!("x_{j}")).collect(),
        actions: (0..creatives).map(|c| format!("c{c}")).collect(),
        ..LoggedData::default()
    };
    let mut rows = Vec::new();
    let mut messaged = 0usize;
    for ((_, batch), (policy, d)) in &planned {
        if !UNIFORM_SELECTION.contains(&policy.as_str()) {
            return Err(OpeError::Unsupported(format!(
                "batch {batch} was planned by `{policy}`, which does not pick users uniformly: its recorded propensities are P(user in batch, creative) and do not give P(creative | user); log with one of {}",
                UNIFORM_SELECTION.join(", ")
            )));
        }
        let n = population.saturating_sub(messaged);
        if n == 0 || d.len() > n {
            return Err(OpeError::Unsupported(format!(
                "batch {batch} plans {} users but only {n} candidates remain (is the population the run's?)",
                d.len()
            )));
        }
        let select = d.len() as f64 / n as f64;
        messaged += d.len();
        for i in 0..d.len() {
            let (u, c, p) = (d.users[i], d.creatives[i], d.propensities[i]);
            if usize::from(c) >= creatives {
                return Err(OpeError::Unsupported(format!(
                    "batch {batch} uses creative {c}; only {creatives} were given"
                )));
            }
            let p = (f64::from(p) / select).min(1.0);
            if !(p > 0.0 && p <= 1.0) {
                return Err(OpeError::Unsupported(format!(
                    "batch {batch}, user {u}: recorded propensity {p} is outside (0, 1]"
                )));
            }
            let x = features(u).unwrap_or_default();
            if x.len() != dim {
                return Err(OpeError::Unsupported(format!(
                    "user {u}: {} features where {dim} were expected (is the population the run's?)",
                    x.len()
                )));
            }
            data.features.extend(x);
            data.action.push(usize::from(c));
            data.propensity.push(p);
            data.reward.push(if reacted.contains(&(*batch, u)) {
                1.0
            } else {
                0.0
            });
            rows.push(CampaignRow {
                user: u,
                batch: *batch,
                joint: f64::from(d.propensities[i]),
            });
        }
    }
    Ok((data, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols() -> Columns {
        Columns {
            timestamp: Some("ts".into()),
            features: vec!["age".into(), "city".into()],
            action: "action".into(),
            slot: None,
            reward: "reward".into(),
            propensity: "p".into(),
            actions: None,
        }
    }

    #[test]
    fn numeric_and_categorical_features() {
        let text = "ts,age,city,action,reward,p\n1,30,paris,a,1,0.5\n2,40,rome,b,0,0.25\n3,50,paris,a,0.5,1\n";
        let d = parse_csv(text.as_bytes(), Path::new("t.csv"), &cols()).unwrap();
        assert_eq!(d.feature_names, vec!["age", "city=paris", "city=rome"]);
        assert_eq!(d.x(1), &[40.0, 0.0, 1.0]);
        assert_eq!(d.actions, vec!["a", "b"]);
        assert_eq!(d.action, vec![0, 1, 0]);
        assert_eq!(d.reward, vec![1.0, 0.0, 0.5]);
        assert_eq!(d.timestamp.as_ref().unwrap()[2], "3");
    }

    #[test]
    fn bad_rows_are_reported_with_line_numbers() {
        let text = "ts,age,city,action,reward,p\n1,30,paris,a,1,0.5\n2,40,rome,z,yes,0\n3,50,paris,a,1,\n4,1,x,b,1,-0.5\n";
        let mut c = cols();
        c.actions = Some(vec!["a".into(), "b".into()]);
        let e = parse_csv(text.as_bytes(), Path::new("t.csv"), &c).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains(
                "line 3: unknown action `z`; non-numeric reward `yes`; non-positive propensity 0"
            ),
            "{s}"
        );
        assert!(s.contains("line 4: missing propensity"), "{s}");
        assert!(s.contains("line 5: non-positive propensity -0.5"), "{s}");
        let mut c = cols();
        c.reward = "nope".into();
        let e = parse_csv(text.as_bytes(), Path::new("t.csv"), &c).unwrap_err();
        assert!(e.to_string().contains("no column named `nope`"), "{e}");
    }
}
