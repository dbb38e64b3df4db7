//! The raw layers (flags, env, file, defaults) as strings. Knows which keys exist; parses
//! nothing but YAML.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::keys::{suggest, ALIASES, KEYS, LEGACY_KEYS};
use super::ConfigError;

/// Where a value came from, for error messages ("max_inflight=abc (from env)").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Default,
    File,
    Env,
    Flag,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Default => "default",
            Origin::File => "config file",
            Origin::Env => "env",
            Origin::Flag => "flag",
        })
    }
}

/// The raw layers, as strings. No parsing beyond YAML happens here.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    pub(super) file: BTreeMap<String, String>,
    pub(super) env: BTreeMap<String, String>,
    pub(super) flags: BTreeMap<String, String>,
    /// Legacy keys that were set, to warn about once logging is up.
    pub(super) legacy_seen: Vec<(String, Origin)>,
}

impl Sources {
    /// Reads the optional YAML file and the process environment; `flags` are `(key, value)`
    /// pairs from the command line and win over both.
    pub fn gather(
        file: Option<&Path>,
        flags: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut sources = Sources::default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                key: "--config".into(),
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            sources.add_yaml(&text, &path.display().to_string())?;
        }
        for key in KEYS {
            if let Ok(value) = std::env::var(key.name) {
                sources.env.insert(key.name.to_string(), value);
            }
        }
        for (alias, _) in ALIASES {
            if let Ok(value) = std::env::var(alias) {
                sources.env.insert(alias.to_string(), value);
            }
        }
        for (legacy, _) in LEGACY_KEYS {
            if let Ok(value) = std::env::var(legacy) {
                sources.env.insert(legacy.to_string(), value);
                sources.legacy_seen.push((legacy.to_string(), Origin::Env));
            }
        }
        for (key, value) in flags {
            sources.set(Origin::Flag, &key, value)?;
        }
        Ok(sources)
    }

    /// Sources made only of `(key, value)` pairs at flag precedence; no env, no file. Tests and
    /// embedders use this to get a fully deterministic configuration.
    pub fn from_pairs<K: AsRef<str>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, ConfigError> {
        let mut sources = Sources::default();
        for (k, v) in pairs {
            sources.set(Origin::Flag, k.as_ref(), v.into())?;
        }
        Ok(sources)
    }

    /// Adds a YAML document of `key: value` pairs at file precedence.
    pub fn add_yaml(&mut self, text: &str, name: &str) -> Result<(), ConfigError> {
        let bad = |reason: String| ConfigError::File {
            key: "--config".into(),
            path: PathBuf::from(name),
            reason,
        };
        let doc: serde_norway::Value =
            serde_norway::from_str(text).map_err(|e| bad(e.to_string()))?;
        let map = match doc {
            serde_norway::Value::Null => return Ok(()),
            serde_norway::Value::Mapping(map) => map,
            _ => return Err(bad("expected a mapping of key: value".into())),
        };
        for (k, v) in map {
            let key = match k {
                serde_norway::Value::String(s) => s,
                other => return Err(bad(format!("key {other:?} is not a string"))),
            };
            let value = match v {
                serde_norway::Value::Null => continue,
                serde_norway::Value::Bool(b) => b.to_string(),
                serde_norway::Value::Number(n) => n.to_string(),
                serde_norway::Value::String(s) => s,
                serde_norway::Value::Sequence(items) => items
                    .into_iter()
                    .map(|i| match i {
                        serde_norway::Value::String(s) => Ok(s),
                        serde_norway::Value::Number(n) => Ok(n.to_string()),
                        _ => Err(bad(format!("{key}: list items must be scalars"))),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(","),
                _ => return Err(bad(format!("{key}: expected a scalar value"))),
            };
            self.set(Origin::File, &key, value)?;
        }
        Ok(())
    }

    fn set(&mut self, origin: Origin, key: &str, value: String) -> Result<(), ConfigError> {
        let layer = match origin {
            Origin::File => &mut self.file,
            Origin::Env => &mut self.env,
            _ => &mut self.flags,
        };
        if KEYS.iter().any(|k| k.name == key) || ALIASES.iter().any(|(a, _)| *a == key) {
            layer.insert(key.to_string(), value);
            return Ok(());
        }
        if LEGACY_KEYS.iter().any(|(k, _)| *k == key) {
            layer.insert(key.to_string(), value);
            self.legacy_seen.push((key.to_string(), origin));
            return Ok(());
        }
        Err(ConfigError::UnknownKey {
            key: key.to_string(),
            origin: origin.to_string(),
            hint: suggest(key),
        })
    }

    /// The winning value of `key` and where it came from; `None` when only the default applies.
    /// An empty value counts as unset, as in OpenFaaS's worker: Helm templates often render
    /// `key: ""` for a value left out.
    pub fn get(&self, key: &str) -> Option<(&str, Origin)> {
        let layers = [
            (&self.flags, Origin::Flag),
            (&self.env, Origin::Env),
            (&self.file, Origin::File),
        ];
        let aliases = ALIASES.iter().filter(|(_, k)| *k == key).map(|(a, _)| *a);
        let names: Vec<&str> = std::iter::once(key).chain(aliases).collect();
        layers.into_iter().find_map(|(layer, origin)| {
            names.iter().find_map(|name| {
                layer
                    .get(*name)
                    .filter(|v| !v.trim().is_empty())
                    .map(|v| (v.as_str(), origin))
            })
        })
    }
}
