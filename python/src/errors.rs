//! Rust errors as Python exceptions of `smartmsg.errors` (classes defined
//! in Python, so that they carry docstrings and can be caught by users).

use pyo3::prelude::*;

/// The exception classes of `smartmsg.errors`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// The input cannot be read (file, columns, bad rows).
    Data,
    /// The data cannot support an estimate, or the target does not fit.
    Refused,
    /// A scenario (or population) is invalid.
    Scenario,
    /// A simulation failed.
    Simulation,
    /// A log cannot be read or replayed.
    Replay,
    /// A policy refused to be built, to plan or to learn.
    Policy,
}

impl Kind {
    fn class(self) -> &'static str {
        match self {
            Kind::Data => "DataError",
            Kind::Refused => "RefusedError",
            Kind::Scenario => "ScenarioError",
            Kind::Simulation => "SimulationError",
            Kind::Replay => "ReplayError",
            Kind::Policy => "PolicyError",
        }
    }
}

/// An exception of class `kind` with `message`.
pub(crate) fn raise(kind: Kind, message: impl Into<String>) -> PyErr {
    let message = message.into();
    Python::attach(|py| {
        let made = py
            .import("smartmsg.errors")
            .and_then(|m| m.getattr(kind.class()))
            .and_then(|cls| cls.call1((message.clone(),)));
        match made {
            Ok(e) => PyErr::from_value(e),
            // The Python layer is missing (the native module imported on
            // its own): still an exception with the same message.
            Err(_) => pyo3::exceptions::PyValueError::new_err(message),
        }
    })
}

/// An off-policy evaluation error: unreadable input is a `DataError`, a
/// refusal (support, shape of the target) a `RefusedError`.
pub(crate) fn ope(e: smartmsg_simulator::ope::OpeError) -> PyErr {
    use smartmsg_simulator::ope::OpeError;
    let kind = match &e {
        OpeError::Read { .. } | OpeError::MissingColumn { .. } | OpeError::BadRows { .. } => {
            Kind::Data
        }
        _ => Kind::Refused,
    };
    raise(kind, e.to_string())
}

/// An error and its causes, each said once (as the `smartmsg` command
/// prints them: a cause whose text the message before it already contains
/// is left out).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !last.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        last = s;
        cause = c.source();
    }
    out
}
