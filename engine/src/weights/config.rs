//! Component configs (`config.json`, `scheduler_config.json`,
//! `model_index.json`), parsed leniently: real scheduler configs contain
//! `-Infinity`, `Infinity` or `NaN` (Python's json writes them), which strict
//! JSON parsers reject.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::LoadError;

/// Rewrites the bare tokens `NaN`, `Infinity` and `-Infinity` (outside
/// strings) as the strings "NaN", "Infinity", "-Infinity", which
/// [`lenient_f64`] turns back into floats.
pub fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        match token {
            Some(t) => {
                out.push('"');
                out.push_str(t);
                out.push('"');
                rest = &rest[t.len()..];
            }
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

/// Reads a JSON file, accepting non-finite number tokens.
pub fn read_json(path: &Path) -> Result<serde_json::Value, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&quote_non_finite(&text)).map_err(|e| LoadError::Config {
        path: path.to_path_buf(),
        message: format!("not valid JSON: {e}"),
    })
}

/// Reads a JSON file into a config struct; the error names the file and the
/// field that is missing or of the wrong type.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    config_from_value(path, read_json(path)?)
}

/// A config already parsed as JSON (say, inferred from a single file's
/// shapes); `path` names it in errors.
pub fn config_from_value<T: DeserializeOwned>(
    path: &Path,
    value: serde_json::Value,
) -> Result<T, LoadError> {
    serde_json::from_value(value).map_err(|e| LoadError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A serde `deserialize_with` for floats that may be written as
/// "-Infinity", "Infinity" or "NaN".
pub fn lenient_f64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    use serde::Deserialize;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        F(f64),
        S(String),
    }
    match Num::deserialize(d)? {
        Num::F(v) => Ok(v),
        Num::S(s) => match s.as_str() {
            "-Infinity" => Ok(f64::NEG_INFINITY),
            "Infinity" => Ok(f64::INFINITY),
            "NaN" => Ok(f64::NAN),
            other => other.parse().map_err(|_| {
                serde::de::Error::custom(format!("expected a number, found \"{other}\""))
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_tokens_become_strings_outside_strings_only() {
        let text =
            r#"{"a": -Infinity, "b": [NaN, Infinity], "c": "NaN -Infinity \" Infinity", "d": 1.5}"#;
        let v: serde_json::Value = serde_json::from_str(&quote_non_finite(text)).unwrap();
        assert_eq!(v["a"], "-Infinity");
        assert_eq!(v["b"][0], "NaN");
        assert_eq!(v["b"][1], "Infinity");
        assert_eq!(v["c"], "NaN -Infinity \" Infinity");
        assert_eq!(v["d"], 1.5);

        #[derive(serde::Deserialize)]
        struct S {
            #[serde(deserialize_with = "lenient_f64")]
            a: f64,
            #[serde(deserialize_with = "lenient_f64")]
            d: f64,
        }
        let s: S = serde_json::from_value(v).unwrap();
        assert_eq!(s.a, f64::NEG_INFINITY);
        assert_eq!(s.d, 1.5);
    }
}
