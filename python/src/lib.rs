//! # smartmsg-python
//!
//! The native module (`smartmsg._native`) of the `smartmsg` Python
//! package: the engine's off-policy estimators, log reader, replay,
//! simulator and domain policies, called from Python. The Python layer
//! (`python/smartmsg/`) turns pandas frames and numpy arrays into the
//! plain arrays and lists these functions take, and their results back
//! into frames.
//!
//! Errors cross the boundary as exceptions of `smartmsg.errors`, each
//! with the message the `smartmsg` command prints for the same failure;
//! nothing here panics on bad input (every fallible step returns a typed
//! error, which the `errors` module maps to a Python exception class).

mod errors;
mod evaluate;
mod log;
mod policy;
mod simulate;

use pyo3::prelude::*;

/// mimalloc for the module's own allocations, as in the `smartmsg`
/// command (cli/src/main.rs): `simulate` from Python then runs at the
/// command's speed (README, "Python package", the benchmark).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The module `smartmsg._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "ESTIMATORS",
        smartmsg_simulator::ope::estimate::ESTIMATORS.to_vec(),
    )?;
    m.add(
        "POLICIES",
        smartmsg_simulator::PolicyName::ALL
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>(),
    )?;
    m.add_function(wrap_pyfunction!(evaluate::evaluate_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate::evaluate_csv, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate::evaluate_log, m)?)?;
    m.add_function(wrap_pyfunction!(log::read_log, m)?)?;
    m.add_function(wrap_pyfunction!(log::replay, m)?)?;
    m.add_function(wrap_pyfunction!(simulate::simulate, m)?)?;
    m.add_function(wrap_pyfunction!(simulate::scenario_json, m)?)?;
    m.add_class::<policy::Policy>()?;
    Ok(())
}
