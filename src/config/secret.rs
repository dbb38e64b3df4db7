//! Values that must never reach a log line, a metric or `check-config`'s output: [`Secret`]
//! (read from a file) and [`Redacted`] (a URL that may carry a password). Their `Debug`
//! hides what they hold, so a `#[derive(Debug)]` on a settings struct cannot forget one.

use std::fmt;

/// A secret read from a file. Its `Debug` never prints the value, so a config dump or a panic
/// message cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub(super) String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A URL fit for logs: a password in it is replaced by `***`, and so is a user without a
/// password (`nats://token@host` is how NATS URLs carry a token).
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(mut u) if !u.username().is_empty() => {
            let _ = u.set_username("***");
            u.to_string()
        }
        Ok(_) => raw.to_string(),
        Err(_) if raw.contains('@') => "(unparsable URL with credentials)".to_string(),
        Err(_) => raw.to_string(),
    }
}

/// A URL (or a comma-separated list element of one) that may carry credentials. `Debug` and
/// `Display` print it with the password replaced by `***`; [`Redacted::expose`] and `Deref`
/// give the real value to the code that connects with it.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted<T>(pub T);

impl<T: AsRef<str>> Redacted<T> {
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> std::ops::Deref for Redacted<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: AsRef<str>> fmt::Debug for Redacted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url(self.0.as_ref()))
    }
}

impl<T: AsRef<str>> fmt::Display for Redacted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(self.0.as_ref()))
    }
}

impl PartialEq<&str> for Redacted<String> {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}
