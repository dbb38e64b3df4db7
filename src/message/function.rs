//! What a function name is, decided once. Every entry point (the decoder, the front door,
//! `publish`, the operator commands) parses with [`FunctionName::parse`], so a name one of
//! them accepts is accepted, qualified and split the same way by all the others.
//!
//! The rules follow OpenFaaS's gateway: a name is `fn` or `fn.namespace` (its URL pattern
//! allows `-a-zA-Z_0-9.`, and it splits on the `.`), and a name without a namespace belongs to
//! `default_function_name`. Since a Kubernetes name cannot hold a `.`, `a.b.c` can name no
//! function: it is refused rather than split one way here and another way there. Case is
//! kept as written (the gateway does not fold it).

use std::fmt;
use std::hash::{Hash, Hasher};

/// Longest name accepted, as written (`fn` or `fn.ns`): a Kubernetes name and namespace (63
/// each) with room to spare. Names end up in subjects (which the server limits with its
/// control line) and in metric labels, so they must be bounded.
pub const MAX_LEN: usize = 253;

/// Why a text is not a function name. Every variant is the decoder's `bad_function` except
/// [`FunctionNameError::Empty`], which is `missing_function`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FunctionNameError {
    #[error("no function name")]
    Empty,
    #[error("{0} bytes, over the limit of {MAX_LEN}")]
    TooLong(usize),
    #[error("more than one '.': expected fn or fn.namespace")]
    TooManyDots,
    #[error("empty name or namespace: expected fn or fn.namespace")]
    EmptyPart,
    #[error("{0:?} is not allowed: use letters, digits, '-' and '_'")]
    BadChar(char),
    #[error("the default namespace {0:?} is not a valid namespace")]
    BadDefaultNamespace(String),
}

/// A function: its name and namespace. Equal (and hashed) by the pair, so `sleep` and
/// `sleep.openfaas-fn` under the default namespace `openfaas-fn` are one function; it also
/// remembers whether the namespace was written, for what is sent on as submitted.
///
/// Held as the one string `fn.ns`, so the metric label and the subject tail cost no
/// allocation and a clone costs one small one.
#[derive(Clone)]
pub struct FunctionName {
    /// `fn.ns`.
    qualified: String,
    /// Where the `.` is in `qualified`.
    dot: usize,
    /// The namespace was part of the text parsed.
    written_namespace: bool,
}

impl FunctionName {
    /// Parses `fn` or `fn.ns`; a bare `fn` gets `default_namespace`. The text must be exact
    /// (no surrounding spaces: callers that tolerate them trim first).
    pub fn parse(text: &str, default_namespace: &str) -> Result<FunctionName, FunctionNameError> {
        let dot = Self::check(text)?;
        match dot {
            Some(dot) => Ok(FunctionName {
                qualified: text.to_string(),
                dot,
                written_namespace: true,
            }),
            None => {
                check_token(default_namespace)
                    .ok()
                    .filter(|_| default_namespace.len() <= MAX_LEN)
                    .ok_or_else(|| {
                        FunctionNameError::BadDefaultNamespace(
                            default_namespace.chars().take(80).collect(),
                        )
                    })?;
                let mut qualified = String::with_capacity(text.len() + 1 + default_namespace.len());
                qualified.push_str(text);
                qualified.push('.');
                qualified.push_str(default_namespace);
                Ok(FunctionName {
                    qualified,
                    dot: text.len(),
                    written_namespace: false,
                })
            }
        }
    }

    /// Checks the form of `fn` or `fn.ns` without qualifying it (for command-line flags,
    /// read before the configuration names the default namespace). Accepts exactly what
    /// [`FunctionName::parse`] accepts with a valid default namespace.
    pub fn validate(text: &str) -> Result<(), FunctionNameError> {
        Self::check(text).map(|_| ())
    }

    /// The rules, in one place: where the `.` is, if any.
    fn check(text: &str) -> Result<Option<usize>, FunctionNameError> {
        if text.is_empty() {
            return Err(FunctionNameError::Empty);
        }
        if text.len() > MAX_LEN {
            return Err(FunctionNameError::TooLong(text.len()));
        }
        match text.split_once('.') {
            None => check_token(text).map(|()| None),
            Some((_, ns)) if ns.contains('.') => Err(FunctionNameError::TooManyDots),
            Some((name, ns)) => {
                check_token(name)?;
                check_token(ns)?;
                Ok(Some(name.len()))
            }
        }
    }

    /// Whether `namespace` may qualify names (`default_function_name`).
    pub fn is_namespace(namespace: &str) -> bool {
        namespace.len() <= MAX_LEN && check_token(namespace).is_ok()
    }

    /// The bare name, without the namespace.
    pub fn name(&self) -> &str {
        &self.qualified[..self.dot]
    }

    /// The namespace: as written, or the default one.
    pub fn namespace(&self) -> &str {
        &self.qualified[self.dot + 1..]
    }

    /// The namespace when it was written, `None` when it is the default one.
    pub fn written_namespace(&self) -> Option<&str> {
        self.written_namespace.then(|| self.namespace())
    }

    /// The name as submitted, `fn` or `fn.ns`: what goes after `/function/` in the gateway
    /// URL (the gateway qualifies a bare name itself) and in `X-Function-Name`.
    pub fn as_written(&self) -> &str {
        if self.written_namespace {
            &self.qualified
        } else {
            self.name()
        }
    }

    /// `fn.ns`: the `function_name` label OpenFaaS's autoscaler joins on.
    pub fn qualified(&self) -> &str {
        &self.qualified
    }

    /// The two subject tokens, name and namespace (never empty, never holding `.`, `*`, `>`
    /// or spaces), e.g. to name a per-function consumer.
    pub fn tokens(&self) -> (&str, &str) {
        (self.name(), self.namespace())
    }

    /// The function's subject under `prefix`: `<prefix>.<fn>.<ns>` (the work queue, or the
    /// dead-letter stream's `<queue>-dead`).
    pub fn subject(&self, prefix: &str) -> String {
        let mut s = String::with_capacity(prefix.len() + 1 + self.qualified.len());
        s.push_str(prefix);
        s.push('.');
        s.push_str(&self.qualified);
        s
    }
}

/// One part: letters, digits, `-` and `_`, at least one.
fn check_token(token: &str) -> Result<(), FunctionNameError> {
    if token.is_empty() {
        return Err(FunctionNameError::EmptyPart);
    }
    match token
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    {
        Some(c) => Err(FunctionNameError::BadChar(c)),
        None => Ok(()),
    }
}

impl PartialEq for FunctionName {
    fn eq(&self, other: &Self) -> bool {
        self.qualified == other.qualified
    }
}

impl Eq for FunctionName {}

impl Hash for FunctionName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.qualified.hash(state);
    }
}

impl PartialOrd for FunctionName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for FunctionName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.qualified.cmp(&other.qualified)
    }
}

/// `fn.ns`.
impl fmt::Display for FunctionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.qualified)
    }
}

impl fmt::Debug for FunctionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FunctionName({:?})", self.as_written())?;
        if !self.written_namespace {
            write!(f, " in {:?}", self.namespace())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FunctionNameError::*;

    const NS: &str = "openfaas-fn";

    #[test]
    fn names_parse_by_one_table() {
        let long = "f".repeat(MAX_LEN);
        let too_long = "f".repeat(MAX_LEN + 1);
        let long_ns = format!("{}.{}", "f".repeat(126), "n".repeat(MAX_LEN - 127));
        /// `Ok((name, namespace, namespace written))` or the error.
        type Want<'a> = Result<(&'a str, &'a str, bool), FunctionNameError>;
        let cases: Vec<(&str, Want)> = vec![
            ("sleep", Ok(("sleep", NS, false))),
            ("sleep.team-a", Ok(("sleep", "team-a", true))),
            ("sleep.openfaas-fn", Ok(("sleep", NS, true))),
            ("my_fn-2.ns_1", Ok(("my_fn-2", "ns_1", true))),
            ("-", Ok(("-", NS, false))),
            ("_._", Ok(("_", "_", true))),
            // The gateway's URL pattern allows upper case, and folding it would change the
            // function called: kept as written.
            ("Sleep.Team", Ok(("Sleep", "Team", true))),
            ("0", Ok(("0", NS, false))),
            (&long, Ok((&long, NS, false))),
            (&long_ns, Ok((&long_ns[..126], &long_ns[127..], true))),
            ("", Err(Empty)),
            (&too_long, Err(TooLong(MAX_LEN + 1))),
            ("a.b.c", Err(TooManyDots)),
            ("a..b", Err(TooManyDots)),
            ("..", Err(TooManyDots)),
            (".", Err(EmptyPart)),
            (".x", Err(EmptyPart)),
            ("x.", Err(EmptyPart)),
            ("a b", Err(BadChar(' '))),
            (" a", Err(BadChar(' '))),
            ("a*b", Err(BadChar('*'))),
            ("a.>", Err(BadChar('>'))),
            ("a/b", Err(BadChar('/'))),
            ("%2e%2e", Err(BadChar('%'))),
            ("f\u{0}", Err(BadChar('\u{0}'))),
            ("café", Err(BadChar('é'))),
            ("ｆｎ", Err(BadChar('ｆ'))),
            ("a.b\n", Err(BadChar('\n'))),
        ];
        for (text, want) in cases {
            let got = FunctionName::parse(text, NS);
            assert_eq!(got.as_ref().err(), want.as_ref().err(), "{text:?}");
            assert_eq!(FunctionName::validate(text).err(), want.clone().err());
            let (Ok(f), Ok((name, ns, written))) = (got, want) else {
                continue;
            };
            assert_eq!(f.tokens(), (name, ns), "{text:?}");
            assert_eq!(f.written_namespace(), written.then_some(ns));
            assert_eq!(f.as_written(), text);
            assert_eq!(f.qualified(), format!("{name}.{ns}"));
            assert_eq!(f.to_string(), f.qualified());
            assert_eq!(
                f.subject("faas-request"),
                format!("faas-request.{name}.{ns}")
            );
        }
    }

    #[test]
    fn the_default_namespace_must_be_valid_when_it_is_used() {
        assert_eq!(
            FunctionName::parse("sleep", "").unwrap_err(),
            BadDefaultNamespace(String::new())
        );
        assert!(FunctionName::parse("sleep", "a.b").is_err());
        assert!(FunctionName::parse("sleep.team", "a.b").is_ok());
        assert!(FunctionName::is_namespace("openfaas-fn"));
        for bad in ["", "a.b", "a b", "ns*"] {
            assert!(!FunctionName::is_namespace(bad), "{bad:?}");
        }
        assert!(!FunctionName::is_namespace(&"n".repeat(MAX_LEN + 1)));
    }

    #[test]
    fn one_function_whether_or_not_its_namespace_is_written() {
        use std::collections::HashSet;
        let bare = FunctionName::parse("sleep", NS).unwrap();
        let full = FunctionName::parse("sleep.openfaas-fn", NS).unwrap();
        let other = FunctionName::parse("sleep.team-a", NS).unwrap();
        assert_eq!(bare, full);
        assert_ne!(bare, other);
        let set: HashSet<FunctionName> = [bare.clone(), full.clone(), other].into();
        assert_eq!(set.len(), 2);
        // Still sent on as submitted.
        assert_eq!(bare.as_written(), "sleep");
        assert_eq!(full.as_written(), "sleep.openfaas-fn");
        assert_eq!(
            format!("{bare:?}"),
            r#"FunctionName("sleep") in "openfaas-fn""#
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever is accepted makes two clean subject tokens that read back as the
            /// same function.
            #[test]
            fn accepted_names_make_clean_subjects(text in "[a-zA-Z0-9_. *>é-]{0,12}") {
                match FunctionName::parse(&text, NS) {
                    Ok(f) => {
                        let subject = f.subject("q");
                        let tokens: Vec<&str> = subject.split('.').collect();
                        prop_assert_eq!(tokens.len(), 3);
                        prop_assert!(tokens.iter().all(|t| !t.is_empty()
                            && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')));
                        let back = FunctionName::parse(&subject[2..], "other").unwrap();
                        prop_assert_eq!(back, f);
                    }
                    Err(_) => prop_assert!(
                        text.is_empty()
                            || text.matches('.').count() > 1
                            || text.starts_with('.')
                            || text.ends_with('.')
                            || text.contains([' ', '*', '>', 'é'])
                    ),
                }
            }
        }
    }
}
