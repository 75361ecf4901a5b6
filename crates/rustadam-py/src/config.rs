//! The hyper-parameters of a call, as one typed and validated Python object.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyFloat;
use rustadam::{AdamConfig, AdamError, Rounding, WeightDecay};

/// One parameter group's hyper-parameters, validated once by the core's rules.
///
/// `Config(lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, weight_decouple=True,
/// absolute=False, optimized_update=True, maximize=False, amsgrad=False, rounding="nearest")`;
/// invalid values raise ValueError with torch's messages (`Invalid learning rate: -1.0`, …).
#[pyclass(frozen, module = "rustadam._core", name = "Config")]
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) inner: AdamConfig,
}

pub(crate) fn rounding_from_name(name: &str) -> PyResult<Rounding> {
    match name {
        "nearest" => Ok(Rounding::Nearest),
        "stochastic" => Ok(Rounding::Stochastic),
        "kahan" => Ok(Rounding::Kahan),
        other => Err(PyValueError::new_err(format!(
            "Invalid rounding: {other:?}; expected 'nearest', 'stochastic' or 'kahan'"
        ))),
    }
}

fn rounding_name(r: Rounding) -> &'static str {
    match r {
        Rounding::Nearest => "nearest",
        Rounding::Stochastic => "stochastic",
        Rounding::Kahan => "kahan",
    }
}

/// Validates a config by the core's rules; ValueError with torch's message otherwise (values
/// written as Python writes floats: `-1.0`, `1e-08`).
pub(crate) fn validated(py: Python<'_>, cfg: AdamConfig) -> PyResult<AdamConfig> {
    let Err(e) = cfg.validate() else {
        return Ok(cfg);
    };
    let repr = |v: f64| -> PyResult<String> { Ok(PyFloat::new(py, v).repr()?.to_string()) };
    let msg = match e {
        AdamError::InvalidLr(v) => format!("Invalid learning rate: {}", repr(v)?),
        AdamError::InvalidEps(v) => format!("Invalid epsilon value: {}", repr(v)?),
        AdamError::InvalidBeta { index, value } => {
            format!("Invalid beta parameter at index {index}: {}", repr(value)?)
        }
        AdamError::InvalidWeightDecay(v) => format!("Invalid weight_decay value: {}", repr(v)?),
        other => other.to_string(),
    };
    Err(PyValueError::new_err(msg))
}

#[pymethods]
impl Config {
    #[new]
    #[pyo3(signature = (
        *, lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, weight_decouple=true,
        absolute=false, optimized_update=true, maximize=false, amsgrad=false, rounding="nearest"
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        lr: f64,
        betas: (f64, f64),
        eps: f64,
        weight_decay: f64,
        weight_decouple: bool,
        absolute: bool,
        optimized_update: bool,
        maximize: bool,
        amsgrad: bool,
        rounding: &str,
    ) -> PyResult<Self> {
        let mut cfg = AdamConfig::default()
            .lr(lr)
            .betas(betas.0, betas.1)
            .eps(eps)
            .weight_decay(WeightDecay::from_flags(
                weight_decay,
                weight_decouple,
                absolute,
            ))
            .optimized_update(optimized_update)
            .maximize(maximize)
            .amsgrad(amsgrad);
        cfg.rounding = rounding_from_name(rounding)?;
        Ok(Self {
            inner: validated(py, cfg)?,
        })
    }

    #[getter]
    fn lr(&self) -> f64 {
        self.inner.lr
    }
    #[getter]
    fn beta1(&self) -> f64 {
        self.inner.beta1
    }
    #[getter]
    fn beta2(&self) -> f64 {
        self.inner.beta2
    }
    #[getter]
    fn eps(&self) -> f64 {
        self.inner.eps
    }
    #[getter]
    fn weight_decay(&self) -> f64 {
        self.inner.weight_decay.coefficient()
    }
    #[getter]
    fn weight_decouple(&self) -> bool {
        !matches!(
            self.inner.weight_decay,
            WeightDecay::L2(_) | WeightDecay::None
        )
    }
    #[getter]
    fn absolute(&self) -> bool {
        matches!(self.inner.weight_decay, WeightDecay::DecoupledAbsolute(_))
    }
    #[getter]
    fn optimized_update(&self) -> bool {
        self.inner.optimized_update
    }
    #[getter]
    fn maximize(&self) -> bool {
        self.inner.maximize
    }
    #[getter]
    fn amsgrad(&self) -> bool {
        self.inner.amsgrad
    }
    #[getter]
    fn rounding(&self) -> &'static str {
        rounding_name(self.inner.rounding)
    }

    fn __repr__(&self) -> String {
        let c = &self.inner;
        format!(
            "Config(lr={}, betas=({}, {}), eps={}, weight_decay={:?}, optimized_update={}, \
             maximize={}, amsgrad={}, rounding={:?})",
            c.lr,
            c.beta1,
            c.beta2,
            c.eps,
            c.weight_decay,
            c.optimized_update,
            c.maximize,
            c.amsgrad,
            rounding_name(c.rounding)
        )
    }
}
