//! The hyper-parameters of a call, as one typed and validated Python object.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyFloat;
use rustadam::{AdamConfig, AdamError, Rounding, WeightDecay};

/// One parameter group's hyper-parameters, validated once by the core's rules.
///
/// `Config(lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, weight_decouple=True,
/// absolute=False, optimized_update=True, maximize=False, amsgrad=False, rounding="nearest")`;
/// the numbers may be any objects Python converts to float (a 1-element tensor); invalid values
/// raise ValueError with torch's messages, each value as given (`Invalid learning rate: -1`, …).
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

/// The values a config was given, as given: torch's messages show them so (`-1` for an int,
/// `tensor(-1.)` for a tensor).
struct Given<'a, 'py> {
    lr: &'a Bound<'py, PyAny>,
    betas: [&'a Bound<'py, PyAny>; 2],
    eps: &'a Bound<'py, PyAny>,
    weight_decay: &'a Bound<'py, PyAny>,
}

/// Validates a config by the core's rules; ValueError with torch's message otherwise, the
/// value written as the caller gave it.
fn validated(cfg: AdamConfig, given: &Given<'_, '_>) -> PyResult<AdamConfig> {
    let Err(e) = cfg.validate() else {
        return Ok(cfg);
    };
    let msg = match e {
        AdamError::InvalidLr(_) => format!("Invalid learning rate: {}", given.lr.str()?),
        AdamError::InvalidEps(_) => format!("Invalid epsilon value: {}", given.eps.str()?),
        AdamError::InvalidBeta { index, .. } => format!(
            "Invalid beta parameter at index {index}: {}",
            given.betas[index.min(1)].str()?
        ),
        AdamError::InvalidWeightDecay(_) => {
            format!("Invalid weight_decay value: {}", given.weight_decay.str()?)
        }
        other => other.to_string(),
    };
    Err(PyValueError::new_err(msg))
}

#[pymethods]
impl Config {
    #[new]
    #[pyo3(signature = (
        *, lr=None, betas=None, eps=None, weight_decay=None, weight_decouple=true,
        absolute=false, optimized_update=true, maximize=false, amsgrad=false, rounding="nearest"
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new<'py>(
        py: Python<'py>,
        lr: Option<Bound<'py, PyAny>>,
        betas: Option<(Bound<'py, PyAny>, Bound<'py, PyAny>)>,
        eps: Option<Bound<'py, PyAny>>,
        weight_decay: Option<Bound<'py, PyAny>>,
        weight_decouple: bool,
        absolute: bool,
        optimized_update: bool,
        maximize: bool,
        amsgrad: bool,
        rounding: &str,
    ) -> PyResult<Self> {
        let float = |x: f64| PyFloat::new(py, x).into_any();
        let lr = lr.unwrap_or_else(|| float(1e-3));
        let (beta1, beta2) = betas.unwrap_or_else(|| (float(0.9), float(0.999)));
        let eps = eps.unwrap_or_else(|| float(1e-16));
        let weight_decay = weight_decay.unwrap_or_else(|| float(0.0));
        let given = Given {
            lr: &lr,
            betas: [&beta1, &beta2],
            eps: &eps,
            weight_decay: &weight_decay,
        };
        let mut cfg = AdamConfig::default()
            .lr(lr.extract()?)
            .betas(beta1.extract()?, beta2.extract()?)
            .eps(eps.extract()?)
            .weight_decay(WeightDecay::from_flags(
                weight_decay.extract()?,
                weight_decouple,
                absolute,
            ))
            .optimized_update(optimized_update)
            .maximize(maximize)
            .amsgrad(amsgrad);
        cfg.rounding = rounding_from_name(rounding)?;
        Ok(Self {
            inner: validated(cfg, &given)?,
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
