"""Reading and replaying logs: ``read_log`` and ``replay``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, List, Union

import pandas as pd

from . import _native

_ENVELOPE = [
    "position",
    "stream",
    "version",
    "kind",
    "schema",
    "timestamp",
    "timestamp_ms",
    "correlation_id",
    "causation_id",
    "payload",
    "payload_b64",
]


def read_log(path: Union[str, "os.PathLike[str]"]) -> pd.DataFrame:
    """The events of a log as a DataFrame, one row per event in position
    order.

    ``path`` is a data directory holding one embedded log (a simulation's
    data directory with one run, a run's, or the log directory itself) or
    a JSON Lines file written by ``smartmsg export``.

    Columns: ``position``, ``stream``, ``version``, ``kind``, ``schema``,
    ``timestamp`` (UTC), ``timestamp_ms``, ``correlation_id``,
    ``causation_id``, ``payload`` (the decoded JSON payload as a dict, or
    None when the payload is not JSON), ``payload_b64`` (base64 of a
    payload that is not JSON), then one column per top-level field of the
    JSON payloads of the known kinds (campaign, pipeline and simulator
    events; a binary ``BatchPlanned`` is shown in its JSON form), named as
    the field (prefixed ``payload.`` where it would clash with an envelope
    column), missing where an event has no such field (integer fields are
    pandas' nullable ``Int64``).

    Raises ``ReplayError`` when the log cannot be read (with the reason
    ``smartmsg export`` gives).
    """
    text = _native.read_log(os.fspath(path))
    records = []
    extra: dict = {}
    for line in text.splitlines():
        e = json.loads(line)
        meta = e.get("metadata") or {}
        payload = e.get("payload_json")
        rec = {
            "position": e["position"],
            "stream": e["stream"],
            "version": e["version"],
            "kind": e["kind"],
            "schema": e["schema"],
            "timestamp_ms": e["timestamp_ms"],
            "correlation_id": meta.get("correlation_id"),
            "causation_id": meta.get("causation_id"),
            "payload": payload,
            "payload_b64": e.get("payload_b64"),
        }
        if isinstance(payload, dict):
            for k, v in payload.items():
                col = f"payload.{k}" if k in _ENVELOPE else k
                extra.setdefault(col, None)
                rec[col] = v
        records.append(rec)
    columns = [c for c in _ENVELOPE if c != "timestamp"] + list(extra)
    df = pd.DataFrame.from_records(records, columns=columns)
    for col in extra:
        values = df[col].dropna()
        if len(values) and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            df[col] = df[col].astype("Int64")
    df.insert(
        5,
        "timestamp",
        pd.to_datetime(df["timestamp_ms"].astype("int64"), unit="ms", utc=True),
    )
    return df


@dataclass
class Replay:
    """What a replay found (``smartmsg replay``'s output, as data)."""

    #: One row per campaign rebuilt: ``source`` (the log), ``stream``,
    #: ``status``, ``events``, ``batches_planned``, ``batches_sent``,
    #: ``messages_planned``, ``reactions``, ``remaining_budget``,
    #: ``first_ms``, ``last_ms``, ``snapshot_checked`` (the version
    #: compared, or None), ``pipeline_checked``, ``violations``.
    campaigns: pd.DataFrame
    #: Every broken check, ``"stream: what"``; empty when all hold.
    violations: List[str] = field(default_factory=list)
    #: Events replayed (all logs).
    events: int = 0
    #: Events per second, end to end (read, fold, checks), of each log.
    rates: List[float] = field(default_factory=list)
    #: What ``smartmsg replay`` prints.
    text: str = ""

    @property
    def ok(self) -> bool:
        """Whether every check holds."""
        return not self.violations


def replay(path: Union[str, "os.PathLike[str]"]) -> Replay:
    """Rebuilds every campaign of a log (a data directory, possibly with
    several runs, or an exported JSON Lines file), runs each reaction
    pipeline again over its logged input and checks that replay reproduces
    what was recorded, as ``smartmsg replay`` does.

    A failed check is not an exception: see ``Replay.violations`` and
    ``Replay.ok``. A log that cannot be read raises ``ReplayError``.
    """
    logs = _native.replay(os.fspath(path))
    rows: List[dict[str, Any]] = []
    violations: List[str] = []
    for log in logs:
        for c in log["campaigns"]:
            rows.append({"source": log["source"], **c})
        violations.extend(log["violations"])
    columns = [
        "source",
        "stream",
        "status",
        "events",
        "batches_planned",
        "batches_sent",
        "messages_planned",
        "reactions",
        "remaining_budget",
        "first_ms",
        "last_ms",
        "snapshot_checked",
        "pipeline_checked",
        "violations",
    ]
    return Replay(
        campaigns=pd.DataFrame.from_records(rows, columns=columns),
        violations=violations,
        events=sum(int(log["events"]) for log in logs),
        rates=[float(log["rate"]) for log in logs],
        text="".join(log["text"] for log in logs),
    )
