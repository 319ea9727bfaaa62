//! Reading settings from the environment, with the default named in one place.

use std::fmt;
use std::str::FromStr;

/// A setting that is present but cannot be parsed.
#[derive(Debug)]
pub struct InvalidSetting {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for InvalidSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={:?} is invalid: {}",
            self.name, self.value, self.reason
        )
    }
}

impl std::error::Error for InvalidSetting {}

/// The variable's value, or `default` when it is unset or empty.
pub fn string(name: &'static str, default: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => default.to_owned(),
    }
}

/// The variable parsed as `T`, or `default` when it is unset or empty.
pub fn parse<T>(name: &'static str, default: T) -> Result<T, InvalidSetting>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().map_err(|e: T::Err| InvalidSetting {
            name,
            value: v,
            reason: e.to_string(),
        }),
        _ => Ok(default),
    }
}
