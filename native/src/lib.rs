//! `tiered_limiter._native`: the Python bindings of the counter table in [`table`].
//!
//! Every argument is validated here, before the table sees it, and a bad one raises
//! `ValueError` or `TypeError` naming the argument and the value. Method bodies also run
//! under `catch_unwind`, so that a panic (which the table is written never to raise) reaches
//! Python as a `RuntimeError` rather than a `PanicException`, which `except Exception` misses.
//! No Python code runs while a shard lock is held: arguments are converted before the call
//! into the table and results after it.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod heap;
pub mod table;

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyOSError, PyOverflowError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple, PyType};
use smallvec::SmallVec;

use crate::table::{
    ConfigError, Decision, Outcome, Request, ScopeLimit, Table, Totals, MAX_SCOPES,
};

/// The five values `check` returns to Python.
type CheckResult = (i32, i64, i64, i64, f64);

/// A `Decision`'s fields: allowed, remaining, `retry_after`, remaining tokens, denying scope.
type DecisionFields<'py> = (
    bool,
    Option<i64>,
    f64,
    Option<i64>,
    Option<Bound<'py, PyAny>>,
);

/// The longest scope name, in bytes of UTF-8, as `tiered_limiter._validate` allows.
const MAX_SCOPE_BYTES: usize = 1024;

/// Runs a method body, turning a panic into a `RuntimeError`.
fn guarded<T>(method: &str, body: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        let detail = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(PyRuntimeError::new_err(format!(
            "internal error in Table.{method}: {detail}"
        )))
    })
}

/// An int argument within `[lo, hi]`; `what` completes "`name` must be ...".
fn int_arg(obj: &Bound<'_, PyAny>, name: &str, lo: i64, hi: i64, what: &str) -> PyResult<i64> {
    let bad = || {
        let shown = obj
            .repr()
            .map_or_else(|_| "?".to_owned(), |r| r.to_string());
        PyValueError::new_err(format!("{name} must be {what}, got {shown}"))
    };
    let exact_int = obj.is_exact_instance_of::<PyInt>();
    if !exact_int && (obj.is_instance_of::<PyFloat>() || obj.is_instance_of::<PyString>()) {
        return Err(type_error(obj, name, "an int"));
    }

    match obj.extract::<i64>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        Ok(_) => Err(bad()),
        Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => Err(bad()),
        Err(_) => Err(type_error(obj, name, "an int")),
    }
}

fn type_error(obj: &Bound<'_, PyAny>, name: &str, expected: &str) -> PyErr {
    let got = obj
        .get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string());
    PyTypeError::new_err(format!("{name} must be {expected}, got {got}"))
}

fn u32_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<u32> {
    let v = int_arg(
        obj,
        name,
        0,
        i64::from(u32::MAX),
        "a whole number between 0 and 4294967295",
    )?;
    Ok(u32::try_from(v).unwrap_or(u32::MAX))
}

fn i64_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<i64> {
    int_arg(
        obj,
        name,
        i64::MIN,
        i64::MAX,
        "a whole number that fits in a signed 64-bit integer",
    )
}

fn window_arg(obj: &Bound<'_, PyAny>) -> PyResult<u32> {
    let v = int_arg(
        obj,
        "window",
        1,
        i64::from(u32::MAX),
        "a positive whole number of seconds",
    )?;
    Ok(u32::try_from(v).unwrap_or(u32::MAX))
}

fn now_arg(obj: &Bound<'_, PyAny>) -> PyResult<f64> {
    if obj.is_instance_of::<PyString>() {
        return Err(type_error(obj, "now", "a number of seconds"));
    }

    let now: f64 = obj
        .extract()
        .map_err(|_| type_error(obj, "now", "a number of seconds"))?;
    if !(now.is_finite() && (0.0..=f64::from(u32::MAX)).contains(&now)) {
        return Err(PyValueError::new_err(format!(
            "now must be a finite number of seconds between 0 and 4294967295, got {now}"
        )));
    }
    Ok(now)
}

fn str_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<PyBackedStr> {
    if !obj.is_instance_of::<PyString>() {
        return Err(type_error(obj, name, "a str"));
    }

    obj.extract::<PyBackedStr>()
        .map_err(|e| PyValueError::new_err(format!("{name} must be valid text: {e}")))
}

/// Items of a list or tuple argument (any other sequence is copied into a list first).
fn seq_arg<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Bound<'py, PyList>> {
    if let Ok(list) = obj.cast::<PyList>() {
        return Ok(list.clone());
    }
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<pyo3::types::PyBytes>() {
        return Err(type_error(obj, name, "a sequence"));
    }
    if let Ok(tuple) = obj.cast::<PyTuple>() {
        return Ok(tuple.to_list());
    }

    let list = PyList::empty(obj.py());
    for item in obj
        .try_iter()
        .map_err(|_| type_error(obj, name, "a sequence"))?
    {
        list.append(item?)?;
    }
    Ok(list)
}

/// A scope name as the limiter accepts it: exactly a `str`, 1 to 1024 bytes of UTF-8.
fn scope_arg<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<&'a str> {
    if !obj.is_exact_instance_of::<PyString>() {
        return Err(type_error(obj, "scope", "a str"));
    }

    // A checked cast cannot fail after the exact type test above.
    let text = obj
        .cast::<PyString>()
        .map_err(|_| type_error(obj, "scope", "a str"))?
        .to_str()
        .map_err(|_| PyValueError::new_err("scope must be encodable as UTF-8"))?;
    if text.is_empty() || text.len() > MAX_SCOPE_BYTES {
        return Err(PyValueError::new_err(format!(
            "scope must be 1 to {MAX_SCOPE_BYTES} bytes in UTF-8, got {} bytes",
            text.len()
        )));
    }
    Ok(text)
}

/// A limit as the limiter accepts it: None (no limit, 0 here) or exactly an `int` from 1 to
/// `u32::MAX` (`bool` and other `int` subclasses are refused, as in Python).
fn limit_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<u32> {
    if obj.is_none() {
        return Ok(0);
    }
    if !obj.is_exact_instance_of::<PyInt>() {
        return Err(type_error(obj, name, "an int or None"));
    }

    match obj.extract::<u32>() {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(PyValueError::new_err(format!(
            "{name} must be between 1 and {}, got {}",
            u32::MAX,
            obj.repr()
                .map_or_else(|_| "?".to_owned(), |r| r.to_string())
        ))),
    }
}

/// The `decision` argument of `Table`: a subclass of `tuple`.
fn decision_arg<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyType>> {
    let cls = obj
        .cast::<PyType>()
        .map_err(|_| type_error(obj, "decision", "a subclass of tuple"))?;
    if !cls.is_subclass_of::<PyTuple>()? {
        let shown = cls
            .name()
            .map_or_else(|_| "?".to_owned(), |n| n.to_string());
        return Err(PyTypeError::new_err(format!(
            "decision must be a subclass of tuple, got {shown}"
        )));
    }
    Ok(cls.clone())
}

/// An instance of `cls`, a subclass of `tuple` (checked by `decision_arg`), holding `fields`.
///
/// It is built as `tuple.__new__` builds one, without calling `cls.__new__`: a `NamedTuple`'s
/// is a Python function, and calling it costs as much as the whole check.
fn new_decision<'py>(
    cls: &Bound<'py, PyType>,
    fields: DecisionFields<'py>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = cls.py();
    let (allowed, remaining, retry_after, remaining_tokens, scope) = fields;
    let items = [
        PyBool::new(py, allowed).to_owned().into_any(),
        remaining.into_pyobject(py)?.into_any(),
        PyFloat::new(py, retry_after).into_any(),
        remaining_tokens.into_pyobject(py)?.into_any(),
        scope.into_pyobject(py)?.into_any(),
    ];
    let tp = cls.as_type_ptr();
    // SAFETY: `tp` is a live type object, kept alive by `cls`. Its `tp_alloc` slot is the
    // allocator `tuple.__new__` uses for subclasses (never NULL: every type inherits one); an
    // allocator returns a new reference to a zero-filled instance with room for the items, or
    // NULL with an exception set, which `from_owned_ptr_or_err` turns into an error.
    let obj = unsafe {
        let slot = ffi::PyType_GetSlot(tp, ffi::Py_tp_alloc);
        let alloc = std::mem::transmute::<*mut std::ffi::c_void, Option<ffi::allocfunc>>(slot)
            .ok_or_else(|| PyRuntimeError::new_err("decision type has no allocator"))?;
        Bound::from_owned_ptr_or_err(py, alloc(tp, 5))?
    };
    for (i, item) in (0..).zip(items) {
        // SAFETY: `obj` is a tuple (a subclass's instance) that only this function holds
        // (reference count 1, as `PyTuple_SetItem` requires), `i` is below its length, and
        // `PyTuple_SetItem` takes over the item's reference, even when it fails.
        if unsafe { ffi::PyTuple_SetItem(obj.as_ptr(), i, item.into_ptr()) } != 0 {
            return Err(PyErr::fetch(py));
        }
    }
    Ok(obj)
}

fn decision_tuple(d: &Decision) -> CheckResult {
    let index = d.index.map_or(-1, |i| i64::try_from(i).unwrap_or(i64::MAX));
    (
        d.outcome as i32,
        index,
        d.remaining_requests,
        d.remaining_tokens,
        d.retry_after,
    )
}

fn config_error(e: &ConfigError) -> PyErr {
    match e {
        ConfigError::Random(_) => PyOSError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// Per-scope window start, fleet totals and local pending deltas (see the stub for docs).
#[pyclass(frozen, module = "tiered_limiter._native", name = "Table")]
struct PyTable {
    inner: Table,
    /// The tuple subclass `decide_one` returns its fields as, or None for plain tuples.
    decision: Option<Py<PyType>>,
    /// When `drain` last released freed heap (see [`heap`]).
    trimmer: heap::Trimmer,
}

#[pymethods]
impl PyTable {
    #[new]
    #[pyo3(
        signature = (max_scopes, shards = None, decision = None),
        text_signature = "(max_scopes, shards=64, decision=None)"
    )]
    fn new(
        max_scopes: &Bound<'_, PyAny>,
        shards: Option<&Bound<'_, PyAny>>,
        decision: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        guarded("__new__", || {
            let max_scopes = int_arg(
                max_scopes,
                "max_scopes",
                1,
                i64::try_from(MAX_SCOPES).unwrap_or(i64::MAX),
                "between 1 and 2147483648",
            )?;
            let shards = match shards {
                Some(obj) => int_arg(obj, "shards", 1, 1024, "a power of two between 1 and 1024")?,
                None => 64,
            };
            let inner = Table::new(
                u64::try_from(max_scopes).unwrap_or(0),
                usize::try_from(shards).unwrap_or(0),
            )
            .map_err(|e| config_error(&e))?;
            let decision = match decision {
                Some(obj) if !obj.is_none() => Some(decision_arg(obj)?.unbind()),
                _ => None,
            };
            Ok(Self {
                inner,
                decision,
                trimmer: heap::Trimmer::default(),
            })
        })
    }

    #[pyo3(signature = (scopes, rpm, tpm, tokens, now, window, proxies, *, offline = false, requests = 1))]
    #[allow(clippy::too_many_arguments)]
    fn check(
        &self,
        scopes: &Bound<'_, PyAny>,
        rpm: &Bound<'_, PyAny>,
        tpm: &Bound<'_, PyAny>,
        tokens: &Bound<'_, PyAny>,
        now: &Bound<'_, PyAny>,
        window: &Bound<'_, PyAny>,
        proxies: &Bound<'_, PyAny>,
        offline: bool,
        requests: u32,
    ) -> PyResult<CheckResult> {
        guarded("check", || {
            let names = seq_arg(scopes, "scopes")?;
            let rpm = seq_arg(rpm, "rpm")?;
            let tpm = seq_arg(tpm, "tpm")?;
            let n = names.len();
            for (arg, list) in [("rpm", &rpm), ("tpm", &tpm)] {
                if list.len() != n {
                    return Err(PyValueError::new_err(format!(
                        "{arg} must have as many limits as there are scopes ({n}), got {}",
                        list.len()
                    )));
                }
            }

            let req = request(requests, tokens, now, window, proxies, offline)?;
            let mut backed: SmallVec<[(PyBackedStr, u32, u32); 8]> = SmallVec::new();
            for i in 0..n {
                // Argument names for errors are only formatted when an item is bad.
                let name = names.get_item(i)?;
                let name = if name.is_instance_of::<PyString>() {
                    str_arg(&name, "scope")?
                } else {
                    str_arg(&name, &format!("scopes[{i}]"))?
                };
                let limit = |list: &Bound<'_, PyList>, arg: &str| -> PyResult<u32> {
                    let item = list.get_item(i)?;
                    u32_arg(&item, "").or_else(|_| u32_arg(&item, &format!("{arg}[{i}]")))
                };
                backed.push((name, limit(&rpm, "rpm")?, limit(&tpm, "tpm")?));
            }
            let limits: SmallVec<[ScopeLimit<'_>; 8]> = backed
                .iter()
                .map(|(name, rpm, tpm)| ScopeLimit {
                    name,
                    rpm: *rpm,
                    tpm: *tpm,
                })
                .collect();
            Ok(decision_tuple(&self.inner.check(&limits, &req)))
        })
    }

    #[pyo3(signature = (scope, rpm, tpm, tokens, now, window, proxies, *, offline = false, requests = 1))]
    #[allow(clippy::too_many_arguments)]
    fn check_one(
        &self,
        scope: &Bound<'_, PyAny>,
        rpm: &Bound<'_, PyAny>,
        tpm: &Bound<'_, PyAny>,
        tokens: &Bound<'_, PyAny>,
        now: &Bound<'_, PyAny>,
        window: &Bound<'_, PyAny>,
        proxies: &Bound<'_, PyAny>,
        offline: bool,
        requests: u32,
    ) -> PyResult<CheckResult> {
        guarded("check_one", || {
            let name = str_arg(scope, "scope")?;
            let limit = ScopeLimit {
                name: &name,
                rpm: u32_arg(rpm, "rpm")?,
                tpm: u32_arg(tpm, "tpm")?,
            };
            let req = request(requests, tokens, now, window, proxies, offline)?;
            Ok(decision_tuple(&self.inner.check(&[limit], &req)))
        })
    }

    /// `check_one` for `TieredLimiter.try_acquire`: positional arguments validated as the
    /// limiter validates them, None for no limit, and the result as a `Decision`'s fields.
    #[pyo3(signature = (scope, rpm, tpm, tokens, now, window, proxies, offline, requests = None, /))]
    #[allow(clippy::too_many_arguments)]
    fn decide_one<'py>(
        &self,
        scope: &Bound<'py, PyAny>,
        rpm: &Bound<'_, PyAny>,
        tpm: &Bound<'_, PyAny>,
        tokens: &Bound<'_, PyAny>,
        now: &Bound<'_, PyAny>,
        window: &Bound<'_, PyAny>,
        proxies: &Bound<'_, PyAny>,
        offline: bool,
        requests: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        guarded("decide_one", || {
            let name = scope_arg(scope)?;
            let limit = ScopeLimit {
                name,
                rpm: limit_arg(rpm, "rpm")?,
                tpm: limit_arg(tpm, "tpm")?,
            };
            if !tokens.is_exact_instance_of::<PyInt>() {
                return Err(type_error(tokens, "tokens", "an int"));
            }
            let requests = match requests {
                None => 1,
                Some(v) if v.is_exact_instance_of::<PyInt>() => u32_arg(v, "requests")?,
                Some(v) => return Err(type_error(v, "requests", "an int")),
            };
            let req = request(requests, tokens, now, window, proxies, offline)?;
            let d = self.inner.check(&[limit], &req);
            let known = |v: i64| (v >= 0).then_some(v);
            let fields: DecisionFields<'py> = match d.outcome {
                Outcome::Admitted => (
                    true,
                    known(d.remaining_requests),
                    d.retry_after,
                    known(d.remaining_tokens),
                    None,
                ),
                Outcome::Denied => (
                    false,
                    known(d.remaining_requests),
                    d.retry_after,
                    known(d.remaining_tokens),
                    Some(scope.clone()),
                ),
                Outcome::Load | Outcome::Exact => return Ok(None),
            };
            let py = scope.py();
            match &self.decision {
                Some(cls) => new_decision(cls.bind(py), fields).map(Some),
                None => Ok(Some(fields.into_pyobject(py)?.into_any())),
            }
        })
    }

    fn record(
        &self,
        scope: &Bound<'_, PyAny>,
        tokens: &Bound<'_, PyAny>,
        now: &Bound<'_, PyAny>,
        window: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        guarded("record", || {
            let name = str_arg(scope, "scope")?;
            let tokens = i64_arg(tokens, "tokens")?;
            let now = now_arg(now)?;
            let window = window_arg(window)?;
            Ok(self.inner.record(&name, tokens, now, window))
        })
    }

    #[pyo3(signature = (now, window, idle_drains, lease_drains = None))]
    fn drain<'py>(
        &self,
        py: Python<'py>,
        now: &Bound<'_, PyAny>,
        window: &Bound<'_, PyAny>,
        idle_drains: &Bound<'_, PyAny>,
        lease_drains: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Bound<'py, PyList>> {
        guarded("drain", || {
            let now = now_arg(now)?;
            let window = window_arg(window)?;
            let idle = u32_arg(idle_drains, "idle_drains")?;
            let lease = lease_drains.map_or(Ok(1), |v| u32_arg(v, "lease_drains"))?;
            if lease == 0 {
                return Err(PyValueError::new_err(
                    "lease_drains must be 1 or more, got 0",
                ));
            }
            let deltas = self.inner.drain(now, window, idle, lease);
            // The sync is where the table grows and shrinks in steps, and is off the request
            // path: release what that left in the heap, without holding the GIL.
            if self.trimmer.due(self.inner.memory_bytes()) {
                py.detach(heap::release);
            }
            PyList::new(
                py,
                deltas.iter().map(|d| {
                    (
                        &*d.scope,
                        d.window_start,
                        d.requests,
                        d.tokens,
                        d.want_requests,
                        d.want_tokens,
                        d.rpm,
                        d.tpm,
                    )
                }),
            )
        })
    }

    #[pyo3(signature = (scope, *, keep_request_lease = false, keep_token_lease = false))]
    fn take(
        &self,
        scope: &Bound<'_, PyAny>,
        keep_request_lease: bool,
        keep_token_lease: bool,
    ) -> PyResult<Option<(u32, i64, i64)>> {
        guarded("take", || {
            let name = str_arg(scope, "scope")?;
            Ok(self
                .inner
                .take_keeping(&name, (keep_request_lease, keep_token_lease)))
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn restore(
        &self,
        scope: &Bound<'_, PyAny>,
        window_start: &Bound<'_, PyAny>,
        requests: &Bound<'_, PyAny>,
        tokens: &Bound<'_, PyAny>,
        now: &Bound<'_, PyAny>,
        window: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        guarded("restore", || {
            let name = str_arg(scope, "scope")?;
            let window_start = u32_arg(window_start, "window_start")?;
            let requests = i64_arg(requests, "requests")?;
            let tokens = i64_arg(tokens, "tokens")?;
            let now = now_arg(now)?;
            let window = window_arg(window)?;
            Ok(self
                .inner
                .restore(&name, window_start, requests, tokens, now, window))
        })
    }

    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (scope, window_start, requests, tokens, now, window, lease_requests=None, lease_tokens=None))]
    fn apply(
        &self,
        scope: &Bound<'_, PyAny>,
        window_start: &Bound<'_, PyAny>,
        requests: &Bound<'_, PyAny>,
        tokens: &Bound<'_, PyAny>,
        now: &Bound<'_, PyAny>,
        window: &Bound<'_, PyAny>,
        lease_requests: Option<&Bound<'_, PyAny>>,
        lease_tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        guarded("apply", || {
            let name = str_arg(scope, "scope")?;
            let totals = Totals {
                window_start: u32_arg(window_start, "window_start")?,
                requests: u32_arg(requests, "requests")?,
                tokens: u32_arg(tokens, "tokens")?,
                lease_requests: lease_requests.map_or(Ok(0), |v| u32_arg(v, "lease_requests"))?,
                lease_tokens: lease_tokens.map_or(Ok(0), |v| u32_arg(v, "lease_tokens"))?,
            };
            let now = now_arg(now)?;
            let window = window_arg(window)?;
            Ok(self.inner.apply(&name, &totals, now, window))
        })
    }

    fn evict(
        &self,
        now: &Bound<'_, PyAny>,
        window: &Bound<'_, PyAny>,
        budget: &Bound<'_, PyAny>,
    ) -> PyResult<usize> {
        guarded("evict", || {
            let now = now_arg(now)?;
            let window = window_arg(window)?;
            let budget = int_arg(budget, "budget", 0, i64::MAX, "a whole number of 0 or more")?;
            Ok(self
                .inner
                .evict(now, window, usize::try_from(budget).unwrap_or(usize::MAX)))
        })
    }

    fn forget_leases(&self) -> PyResult<usize> {
        guarded("forget_leases", || Ok(self.inner.forget_leases()))
    }

    fn forget_lease(&self, scope: &Bound<'_, PyAny>) -> PyResult<bool> {
        guarded("forget_lease", || {
            let name = str_arg(scope, "scope")?;
            Ok(self.inner.forget_lease(&name))
        })
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        guarded("stats", || {
            let s = self.inner.stats();
            let dict = PyDict::new(py);
            dict.set_item("scopes", s.scopes)?;
            dict.set_item("active", s.active)?;
            dict.set_item("memory_bytes", s.memory_bytes)?;
            dict.set_item("evictions", s.evictions)?;
            dict.set_item("rejected", s.rejected)?;
            dict.set_item("pending", s.pending)?;
            Ok(dict)
        })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }
}

fn request(
    requests: u32,
    tokens: &Bound<'_, PyAny>,
    now: &Bound<'_, PyAny>,
    window: &Bound<'_, PyAny>,
    proxies: &Bound<'_, PyAny>,
    offline: bool,
) -> PyResult<Request> {
    let proxies = int_arg(
        proxies,
        "proxies",
        1,
        i64::from(u32::MAX),
        "a whole number of 1 or more",
    )?;
    if requests > 1 {
        return Err(PyValueError::new_err(format!(
            "requests must be 0 or 1, got {requests}"
        )));
    }
    Ok(Request {
        requests,
        tokens: u32_arg(tokens, "tokens")?,
        now: now_arg(now)?,
        window: window_arg(window)?,
        proxies: u32::try_from(proxies).unwrap_or(u32::MAX),
        offline,
    })
}

#[pymodule]
#[pyo3(name = "_native")]
fn native_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("ADMITTED", table::Outcome::Admitted as i32)?;
    m.add("DENIED", table::Outcome::Denied as i32)?;
    m.add("LOAD", table::Outcome::Load as i32)?;
    m.add("EXACT", table::Outcome::Exact as i32)?;
    m.add_class::<PyTable>()?;
    Ok(())
}
