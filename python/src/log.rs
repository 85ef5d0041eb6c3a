//! Reading logs (`read_log`) and replaying them (`replay`).

use std::path::{Path, PathBuf};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use smartmsg_engine::RecordedEvent;
use smartmsg_simulator::portable;

use crate::errors::{chain, raise, Kind};

/// The events of `path`: an exported JSON Lines file, or a data directory
/// holding one embedded log (a log directory, a run's data directory, or
/// a simulation's with one run), as `smartmsg evaluate` and `replay` read
/// them.
pub(crate) fn read_events(path: &Path) -> PyResult<Vec<RecordedEvent>> {
    let fail = |e: &(dyn std::error::Error + 'static)| {
        raise(
            Kind::Replay,
            format!("reading {}: {}", path.display(), chain(e)),
        )
    };
    if path.is_file() {
        return portable::read_file(path, &smartmsg_engine::Limits::default())
            .map_err(|e| fail(&e));
    }
    let dir = portable::find_log(path).map_err(|e| fail(&e))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| fail(&e))?;
    rt.block_on(async {
        let log = smartmsg_embedded::EmbeddedLog::open(&dir).map_err(|e| fail(&e))?;
        portable::read_all(&log).await.map_err(|e| fail(&e))
    })
}

/// The events of a log as JSON Lines text, one envelope per event exactly
/// as `smartmsg export` writes them (binary `BatchPlanned` payloads shown
/// as JSON, other non-JSON payloads as base64).
#[pyfunction]
pub(crate) fn read_log(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    let events = read_events(&path)?;
    py.detach(move || {
        let mut out = Vec::with_capacity(events.len() * 256);
        for e in &events {
            portable::write_line(&mut out, e)
                .map_err(|err| raise(Kind::Replay, format!("event {}: {err}", e.position)))?;
        }
        String::from_utf8(out).map_err(|err| raise(Kind::Replay, err.to_string()))
    })
}

/// Replays every log under `path` (as `smartmsg replay`): per log, the
/// campaign summaries and the checks. Returns a list of dicts, one per
/// log: `source`, `events`, `payload_bytes`, `read_s`, `fold_s`, `rate`,
/// `text` (what the command prints), `violations`, and `campaigns` (a
/// list of dicts).
#[pyfunction]
pub(crate) fn replay<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let sources = if path.is_dir() {
        portable::find_logs(&path).map_err(|e| raise(Kind::Replay, chain(&e)))?
    } else {
        vec![path]
    };
    let mut out = Vec::new();
    for s in sources {
        let report = py
            .detach(|| smartmsg_simulator::replay::replay(&s))
            .map_err(|e| {
                raise(
                    Kind::Replay,
                    format!("replaying {}: {}", s.display(), chain(&e)),
                )
            })?;
        let d = PyDict::new(py);
        d.set_item("source", s.display().to_string())?;
        d.set_item("events", report.events)?;
        d.set_item("payload_bytes", report.payload_bytes)?;
        d.set_item("read_s", report.read_s)?;
        d.set_item("fold_s", report.fold_s)?;
        d.set_item("rate", report.rate())?;
        d.set_item("text", report.render())?;
        d.set_item("violations", report.violations())?;
        let mut campaigns = Vec::new();
        for c in &report.campaigns {
            let cd = PyDict::new(py);
            cd.set_item("stream", &c.stream)?;
            cd.set_item(
                "status",
                c.state
                    .status()
                    .map_or("not created".to_owned(), |s| s.to_string()),
            )?;
            cd.set_item("events", c.events)?;
            cd.set_item("batches_planned", c.batches_planned)?;
            cd.set_item("batches_sent", c.batches_sent)?;
            cd.set_item("messages_planned", c.messages_planned)?;
            cd.set_item("reactions", c.reactions)?;
            cd.set_item("remaining_budget", c.state.remaining_budget())?;
            cd.set_item("first_ms", c.time_span_ms.0)?;
            cd.set_item("last_ms", c.time_span_ms.1)?;
            cd.set_item("snapshot_checked", c.snapshot_checked)?;
            cd.set_item("pipeline_checked", c.path_checked.is_some())?;
            cd.set_item("violations", c.violations.clone())?;
            campaigns.push(cd);
        }
        d.set_item("campaigns", campaigns)?;
        out.push(d);
    }
    Ok(out)
}
