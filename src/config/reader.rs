//! Reading settings from a map of variables, collecting every problem instead of stopping at
//! the first.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use super::Setting;

/// Every problem found in the configuration.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<(String, String)>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem(s)):",
            self.problems.len()
        )?;
        for (var, msg) in &self.problems {
            writeln!(f, "  {var}: {msg}")?;
        }
        Ok(())
    }
}

pub(super) struct Reader<'a> {
    vars: &'a HashMap<String, String>,
    pub(super) problems: Vec<(String, String)>,
    /// Every name looked up (tests compare it with [`SETTINGS`](super::SETTINGS)).
    pub(super) read: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl<'a> Reader<'a> {
    pub(super) fn new(vars: &'a HashMap<String, String>) -> Self {
        Reader {
            vars,
            problems: Vec::new(),
            read: Default::default(),
        }
    }

    /// A duration of at least `min` and at most `max` (`(value, as users write it)`).
    pub(super) fn duration_within(
        &mut self,
        s: Setting,
        min: Duration,
        max: (Duration, &str),
    ) -> Duration {
        let d = self.duration(s, min);
        if d > max.0 {
            self.fail(s.name, format!("must be at most {}", max.1));
        }
        d
    }

    /// A choice among named values (an enum's `FromStr`, case-insensitive); the default when
    /// unset or bad (reported).
    pub(super) fn choice<T: std::str::FromStr<Err = String>>(&mut self, s: Setting) -> T {
        match self.raw(s.name).map(str::to_ascii_lowercase) {
            None => Self::default_of(s),
            Some(v) => v.parse().unwrap_or_else(|e: String| {
                self.fail(s.name, e);
                Self::default_of(s)
            }),
        }
    }

    /// A comma-separated list, blanks dropped; `None` when unset.
    pub(super) fn list(&self, s: Setting) -> Option<Vec<String>> {
        self.string(s).map(|v| {
            v.split(',')
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect()
        })
    }

    pub(super) fn raw(&self, name: &str) -> Option<&str> {
        self.read.borrow_mut().insert(name.to_string());
        self.vars
            .get(name)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
    }

    pub(super) fn fail(&mut self, name: &str, msg: impl Into<String>) {
        self.problems.push((name.to_string(), msg.into()));
    }

    /// The setting's default, parsed from the text users see.
    pub(super) fn default_of<T: std::str::FromStr>(s: Setting) -> T {
        s.default
            .parse()
            .unwrap_or_else(|_| panic!("the default of {} parses", s.name))
    }

    pub(super) fn parse<T: std::str::FromStr>(&mut self, s: Setting, what: &str) -> T {
        match self.raw(s.name) {
            None => Self::default_of(s),
            Some(v) => match v.parse() {
                Ok(x) => x,
                Err(_) => {
                    self.fail(s.name, format!("expected {what}, got {v:?}"));
                    Self::default_of(s)
                }
            },
        }
    }

    /// A count whose default is computed (`default` stands for the setting's text).
    pub(super) fn count_or(&mut self, s: Setting, default: usize, min: usize, max: usize) -> usize {
        let Some(v) = self.raw(s.name) else {
            return default;
        };
        match v.parse::<usize>() {
            Ok(n) if (min..=max).contains(&n) => n,
            Ok(n) => {
                self.fail(s.name, format!("must be between {min} and {max}, got {n}"));
                default
            }
            Err(_) => {
                let msg = format!("expected a whole number, got {v:?}");
                self.fail(s.name, msg);
                default
            }
        }
    }

    pub(super) fn count(&mut self, s: Setting, min: usize, max: usize) -> usize {
        let v: usize = self.parse(s, "a whole number");
        if v < min || v > max {
            self.fail(s.name, format!("must be between {min} and {max}, got {v}"));
            return Self::default_of(s);
        }
        v
    }

    pub(super) fn duration(&mut self, s: Setting, min: Duration) -> Duration {
        let default = humantime::parse_duration(s.default)
            .unwrap_or_else(|_| panic!("the default of {} parses", s.name));
        let Some(v) = self.raw(s.name) else {
            return default;
        };
        match humantime::parse_duration(v) {
            Ok(d) if d >= min => d,
            Ok(_) => {
                self.fail(
                    s.name,
                    format!("must be at least {}", humantime::format_duration(min)),
                );
                default
            }
            Err(e) => {
                self.fail(
                    s.name,
                    format!(
                        "expected a duration with a unit such as 500ms, 5s or 1h, got {v:?} ({e})"
                    ),
                );
                default
            }
        }
    }

    /// The value, or the setting's default text.
    pub(super) fn string_or_default(&self, s: Setting) -> String {
        self.string(s).unwrap_or_else(|| s.default.to_string())
    }

    pub(super) fn string(&self, s: Setting) -> Option<String> {
        self.raw(s.name).map(str::to_string)
    }
}
