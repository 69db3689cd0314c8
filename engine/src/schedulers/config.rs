//! `scheduler_config.json`, kept as the raw key/value map diffusers writes.
//!
//! diffusers' `from_config` lets any scheduler class read another class's
//! config: each class takes the keys its constructor knows and its own
//! defaults for the rest (DDIM's `timestep_spacing` defaults to "leading",
//! Euler's to "linspace"). So defaults are not a property of the file but of
//! the class that reads it, and each scheduler asks for its keys with its
//! own defaults through the typed getters here.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::LoadError;
use crate::weights::config::read_json;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    path: PathBuf,
    values: Map<String, Value>,
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json`; non-finite numbers (`-Infinity` in
    /// DPM-Solver's `lambda_min_clipped`) are accepted.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        Self::from_json(read_json(path)?, path)
    }

    /// A config already parsed; `path` only names it in error messages.
    pub fn from_json(value: Value, path: &Path) -> Result<Self, LoadError> {
        match value {
            Value::Object(values) => Ok(Self {
                path: path.to_path_buf(),
                values,
            }),
            other => Err(LoadError::Config {
                path: path.to_path_buf(),
                message: format!("expected a JSON object, found {other}"),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The diffusers class that wrote the config (`_class_name`).
    pub fn class_name(&self) -> Option<&str> {
        self.values.get("_class_name").and_then(Value::as_str)
    }

    /// Whether the config is a flow-matching model's (Wan): a `FlowMatch…`
    /// class, flow sigmas, or flow prediction.
    pub fn is_flow_matching(&self) -> Result<bool, LoadError> {
        Ok(self
            .class_name()
            .is_some_and(|c| c.starts_with("FlowMatch"))
            || self.bool_or("use_flow_sigmas", false)?
            || self.opt_string("prediction_type")?.as_deref() == Some("flow_prediction"))
    }

    pub(crate) fn error(&self, message: impl Into<String>) -> LoadError {
        LoadError::Config {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    /// The value of `key`, or `None` where it is absent or `null` (diffusers
    /// then uses the class default).
    fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>, LoadError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let parsed = match v {
            Value::Number(n) => n.as_f64(),
            // `read_json` turns the bare tokens into these strings.
            Value::String(s) => match s.as_str() {
                "-Infinity" => Some(f64::NEG_INFINITY),
                "Infinity" => Some(f64::INFINITY),
                "NaN" => Some(f64::NAN),
                _ => None,
            },
            _ => None,
        };
        parsed
            .map(Some)
            .ok_or_else(|| self.error(format!("`{key}` must be a number, found {v}")))
    }

    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64, LoadError> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    pub(crate) fn i64_or(&self, key: &str, default: i64) -> Result<i64, LoadError> {
        let Some(v) = self.get(key) else {
            return Ok(default);
        };
        v.as_i64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 1e15)
                    .map(|f| f as i64)
            })
            .ok_or_else(|| self.error(format!("`{key}` must be an integer, found {v}")))
    }

    /// A positive count (`num_train_timesteps`, `original_inference_steps`).
    pub(crate) fn count_or(&self, key: &str, default: usize) -> Result<usize, LoadError> {
        let v = self.i64_or(key, default as i64)?;
        usize::try_from(v)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| self.error(format!("`{key}` must be a positive integer, found {v}")))
    }

    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool, LoadError> {
        let Some(v) = self.get(key) else {
            return Ok(default);
        };
        v.as_bool()
            .ok_or_else(|| self.error(format!("`{key}` must be true or false, found {v}")))
    }

    /// A string setting that must be one of `accepted`.
    pub(crate) fn choice(
        &self,
        key: &str,
        default: &str,
        accepted: &[&str],
    ) -> Result<String, LoadError> {
        let value = match self.get(key) {
            None => default,
            Some(Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err(self.error(format!("`{key}` must be a string, found {other}")));
            }
        };
        if accepted.contains(&value) {
            Ok(value.to_string())
        } else {
            Err(self.error(format!(
                "`{key}` is \"{value}\", which Motif does not support (accepted: {})",
                accepted.join(", ")
            )))
        }
    }

    /// A string setting that has no fixed list of values, or `None` where
    /// absent or `null`.
    pub(crate) fn opt_string(&self, key: &str) -> Result<Option<String>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.error(format!("`{key}` must be a string, found {other}"))),
        }
    }

    /// A list of numbers (`trained_betas`), or `None` where absent.
    pub(crate) fn opt_f64_list(&self, key: &str) -> Result<Option<Vec<f64>>, LoadError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let bad = || self.error(format!("`{key}` must be a list of numbers"));
        v.as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|x| x.as_f64().ok_or_else(bad))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Errors where a feature this implementation leaves out is switched on.
    pub(crate) fn require_false(&self, key: &str, why: &str) -> Result<(), LoadError> {
        if self.bool_or(key, false)? {
            return Err(self.error(format!(
                "`{key}` is true, which Motif does not support ({why})"
            )));
        }
        Ok(())
    }
}
