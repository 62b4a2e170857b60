//! Python face of `ratelimit`: seconds <-> ns, argument checks, error mapping.
//! A decision is a few atomics (sub-microsecond): the GIL is kept.
use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::py::errors::{RateLimiterError, RateLimiterFull};
use crate::ratelimit::{self, Decision, Limit, RateLimitError};

fn err(e: RateLimitError) -> PyErr {
    match e {
        RateLimitError::Argument(m) => PyValueError::new_err(m),
        full @ RateLimitError::Full { .. } => RateLimiterFull::new_err(full.to_string()),
        other => RateLimiterError::new_err(other.to_string()),
    }
}

fn now_arg(now: Option<f64>) -> PyResult<u64> {
    match now {
        Some(s) => ratelimit::seconds_to_ns(s).map_err(err),
        None => Ok(ratelimit::now_ns()),
    }
}

fn cost_arg(cost: i64) -> PyResult<u64> {
    u64::try_from(cost).map_err(|_| PyValueError::new_err("cost must be >= 0"))
}

fn ns_to_s(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The outcome of one rate-limit check; enough for `x-ratelimit-*` headers.
#[pyclass(frozen, get_all, module = "cheapest_core._cheapest_core")]
pub struct RateDecision {
    allowed: bool,
    limit: u64,
    remaining: u64,
    /// Seconds until the limit is fully replenished.
    reset_after: f64,
    /// Seconds until this request would be allowed: 0.0 when allowed,
    /// `inf` when it never can be (cost above the limit, limit 0).
    retry_after: f64,
}

impl From<Decision> for RateDecision {
    fn from(d: Decision) -> Self {
        RateDecision {
            allowed: d.allowed,
            limit: d.limit,
            remaining: d.remaining,
            reset_after: ns_to_s(d.reset_after_ns),
            retry_after: d.retry_after_ns.map_or(f64::INFINITY, ns_to_s),
        }
    }
}

#[pymethods]
impl RateDecision {
    fn __repr__(&self) -> String {
        format!(
            "RateDecision(allowed={}, limit={}, remaining={}, reset_after={:?}, retry_after={:?})",
            if self.allowed { "True" } else { "False" },
            self.limit,
            self.remaining,
            self.reset_after,
            self.retry_after
        )
    }
}

/// GCRA limits shared by every process that opens the same file.
#[pyclass(frozen, module = "cheapest_core._cheapest_core")]
pub struct RateLimiter {
    inner: ratelimit::RateLimiter,
}

#[pymethods]
impl RateLimiter {
    #[new]
    // The literal (not DEFAULT_CAPACITY) so the text signature shows it.
    #[pyo3(signature = (path, capacity = 65536))]
    fn new(py: Python<'_>, path: PathBuf, capacity: u64) -> PyResult<Self> {
        let inner = py.detach(|| ratelimit::RateLimiter::open(&path, capacity)).map_err(err)?;
        Ok(RateLimiter { inner })
    }

    #[getter]
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }

    #[getter]
    fn path(&self) -> String {
        self.inner.path().to_string_lossy().into_owned()
    }

    #[pyo3(signature = (key, limit, period = 60.0, cost = 1, now = None))]
    fn acquire(&self, key: &str, limit: i64, period: f64, cost: i64, now: Option<f64>) -> PyResult<RateDecision> {
        let lim = Limit::new(limit, period).map_err(err)?;
        let d = self.inner.acquire(key, &lim, cost_arg(cost)?, now_arg(now)?).map_err(err)?;
        Ok(d.into())
    }

    #[pyo3(signature = (key, limit, period = 60.0, now = None))]
    fn peek(&self, key: &str, limit: i64, period: f64, now: Option<f64>) -> PyResult<RateDecision> {
        let lim = Limit::new(limit, period).map_err(err)?;
        Ok(self.inner.peek(key, &lim, now_arg(now)?).map_err(err)?.into())
    }

    #[pyo3(signature = (key, limit, period = 60.0, delta = 0, now = None))]
    fn adjust(&self, key: &str, limit: i64, period: f64, delta: i64, now: Option<f64>) -> PyResult<()> {
        let lim = Limit::new(limit, period).map_err(err)?;
        self.inner.adjust(key, &lim, delta, now_arg(now)?).map_err(err)
    }

    #[pyo3(signature = (requests, now = None))]
    fn acquire_all(&self, requests: Vec<(String, i64, f64, i64)>, now: Option<f64>) -> PyResult<Vec<RateDecision>> {
        let now = now_arg(now)?;
        let mut parsed = Vec::with_capacity(requests.len());
        for (key, limit, period, cost) in &requests {
            parsed.push((key.as_str(), Limit::new(*limit, *period).map_err(err)?, cost_arg(*cost)?));
        }
        let ds = self.inner.acquire_all(&parsed, now).map_err(err)?;
        Ok(ds.into_iter().map(RateDecision::from).collect())
    }

    fn forget(&self, key: &str) -> bool {
        self.inner.forget(key)
    }

    /// Seconds past its TAT after which a key's slot may serve another key.
    #[getter]
    fn reclaim_after(&self) -> f64 {
        ns_to_s(ratelimit::RECLAIM_AFTER_NS)
    }

    #[pyo3(signature = (now = None))]
    fn occupancy(&self, py: Python<'_>, now: Option<f64>) -> PyResult<(u64, u64)> {
        let now = now_arg(now)?;
        Ok(py.detach(|| self.inner.occupancy(now)))
    }

    fn __repr__(&self) -> String {
        format!("RateLimiter(path={:?}, capacity={})", self.inner.path(), self.inner.capacity())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<RateDecision>()?;
    m.add_class::<RateLimiter>()?;
    Ok(())
}
