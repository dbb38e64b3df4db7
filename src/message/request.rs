//! ② The queued invocation, `QueueRequest`, exactly as the OpenFaaS gateway writes it with Go's
//! `encoding/json`: `Body` is standard base64, `Header` maps a name to a list of values, and
//! `CallbackUrl` is a serialised Go `url.URL` struct (or `null`, or, from other publishers, a
//! plain string). Unknown fields are ignored. What we publish round-trips through this type.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The JSON message on the queue.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueRequest {
    #[serde(
        rename = "Header",
        default,
        deserialize_with = "de_header",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub header: BTreeMap<String, Vec<String>>,
    #[serde(
        rename = "Host",
        default,
        deserialize_with = "de_null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub host: String,
    #[serde(
        rename = "Body",
        default,
        deserialize_with = "de_body",
        serialize_with = "ser_body",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub body: Vec<u8>,
    #[serde(rename = "Method", default, deserialize_with = "de_null_default")]
    pub method: String,
    #[serde(
        rename = "Path",
        default,
        deserialize_with = "de_null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub path: String,
    #[serde(
        rename = "QueryString",
        default,
        deserialize_with = "de_null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub query_string: String,
    #[serde(rename = "Function", default, deserialize_with = "de_null_default")]
    pub function: String,
    #[serde(
        rename = "QueueName",
        default,
        deserialize_with = "de_null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub queue_name: String,
    #[serde(
        rename = "Annotations",
        default,
        deserialize_with = "de_null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
    #[serde(
        rename = "Labels",
        default,
        deserialize_with = "de_null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
    #[serde(
        rename = "Environment",
        default,
        deserialize_with = "de_null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub environment: BTreeMap<String, String>,
    #[serde(
        rename = "CallbackUrl",
        default,
        deserialize_with = "de_callback",
        serialize_with = "ser_callback",
        skip_serializing_if = "Option::is_none"
    )]
    pub callback_url: Option<String>,
}

impl QueueRequest {
    /// The first value of a header, matched case-insensitively as HTTP requires (Go
    /// canonicalises names, other publishers may not).
    pub fn header_value(&self, name: &str) -> Option<&str> {
        self.header
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.first())
            .map(String::as_str)
    }

    /// What the gateway's call-id middleware does to every request: add `X-Call-Id` when
    /// the caller sent none, and append `X-Start-Time` (Unix nanoseconds, now).
    pub fn stamp(&mut self, call_id: &str) {
        if self.header_value("X-Call-Id").is_none() {
            self.append_header("X-Call-Id", call_id.to_string());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        self.append_header("X-Start-Time", now.to_string());
    }

    /// Appends a header value, keeping Go's canonical form for the names we add.
    pub fn append_header(&mut self, name: &str, value: String) {
        let key = self
            .header
            .keys()
            .find(|k| k.eq_ignore_ascii_case(name))
            .cloned()
            .unwrap_or_else(|| name.to_string());
        self.header.entry(key).or_default().push(value);
    }
}

fn de_null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Go's `http.Header` is `map[string][]string`; a single string value is accepted too.
/// `Header`: an object of name → list of values. A single string or `null` in place of the
/// list is accepted too (other publishers write those). Hand-written visitors, because this
/// runs for every message and serde's untagged enums buffer each value and try every variant.
fn de_header<'de, D>(d: D) -> Result<BTreeMap<String, Vec<String>>, D::Error>
where
    D: Deserializer<'de>,
{
    use serde::de::{MapAccess, SeqAccess, Visitor};
    use std::fmt;

    /// One header's values.
    struct Values(Vec<String>);

    impl<'de> Deserialize<'de> for Values {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Values, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Values;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a list of strings, a string or null")
                }
                fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Values, E> {
                    Ok(Values(vec![v.to_string()]))
                }
                fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Values, E> {
                    Ok(Values(vec![v]))
                }
                fn visit_unit<E: serde::de::Error>(self) -> Result<Values, E> {
                    Ok(Values(Vec::new()))
                }
                fn visit_none<E: serde::de::Error>(self) -> Result<Values, E> {
                    Ok(Values(Vec::new()))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Values, A::Error> {
                    let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(1).min(16));
                    while let Some(v) = seq.next_element::<String>()? {
                        out.push(v);
                    }
                    Ok(Values(out))
                }
            }
            d.deserialize_any(V)
        }
    }

    struct Map;

    impl<'de> Visitor<'de> for Map {
        type Value = BTreeMap<String, Vec<String>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object of header names to values, or null")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(Map)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((name, Values(values))) = map.next_entry::<String, Values>()? {
                out.insert(name, values);
            }
            Ok(out)
        }
    }

    d.deserialize_option(Map)
}

fn de_body<'de, D>(d: D) -> Result<Vec<u8>, D::Error>
where
    D: Deserializer<'de>,
{
    let Some(text) = Option::<String>::deserialize(d)? else {
        return Ok(Vec::new());
    };
    base64::engine::general_purpose::STANDARD
        .decode(text.as_bytes())
        .map_err(|e| serde::de::Error::custom(format!("Body is not standard base64: {e}")))
}

fn ser_body<S: Serializer>(body: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(body))
}

/// The subset of Go's `url.URL` JSON that can rebuild the URL. `User` is a pointer to a struct
/// with unexported fields, which Go serialises as `{}`, so credentials never survive the trip.
#[derive(Debug, Default, Deserialize, Serialize)]
struct GoUrl {
    #[serde(rename = "Scheme", default, deserialize_with = "de_null_default")]
    scheme: String,
    #[serde(rename = "Opaque", default, deserialize_with = "de_null_default")]
    opaque: String,
    #[serde(rename = "User", default, skip_serializing)]
    _user: Option<serde::de::IgnoredAny>,
    #[serde(rename = "Host", default, deserialize_with = "de_null_default")]
    host: String,
    #[serde(rename = "Path", default, deserialize_with = "de_null_default")]
    path: String,
    #[serde(rename = "RawPath", default, deserialize_with = "de_null_default")]
    raw_path: String,
    #[serde(rename = "OmitHost", default, deserialize_with = "de_null_default")]
    omit_host: bool,
    #[serde(rename = "ForceQuery", default, deserialize_with = "de_null_default")]
    force_query: bool,
    #[serde(rename = "RawQuery", default, deserialize_with = "de_null_default")]
    raw_query: String,
    #[serde(rename = "Fragment", default, deserialize_with = "de_null_default")]
    fragment: String,
    #[serde(rename = "RawFragment", default, deserialize_with = "de_null_default")]
    raw_fragment: String,
}

impl GoUrl {
    fn to_url_string(&self) -> String {
        let mut out = String::new();
        if !self.scheme.is_empty() {
            out.push_str(&self.scheme);
            out.push(':');
        }
        if !self.opaque.is_empty() {
            out.push_str(&self.opaque);
        } else {
            if !self.host.is_empty() || !self.scheme.is_empty() {
                out.push_str("//");
                out.push_str(&self.host);
            }
            // As Go's `EscapedPath`: `RawPath` when it is a valid encoding of `Path`, else
            // `Path` escaped (a decoded `/a?b` must not turn into a query).
            let decodes_to_path = percent_encoding::percent_decode_str(&self.raw_path)
                .decode_utf8()
                .is_ok_and(|d| d == self.path);
            let escaped;
            let path = if !self.raw_path.is_empty() && decodes_to_path {
                &self.raw_path
            } else {
                escaped = escape_path(&self.path);
                &escaped
            };
            if !path.is_empty() && !path.starts_with('/') && !self.host.is_empty() {
                out.push('/');
            }
            out.push_str(path);
        }
        if self.force_query || !self.raw_query.is_empty() {
            out.push('?');
            out.push_str(&self.raw_query);
        }
        let fragment = if self.raw_fragment.is_empty() {
            &self.fragment
        } else {
            &self.raw_fragment
        };
        if !fragment.is_empty() {
            out.push('#');
            out.push_str(fragment);
        }
        out
    }

    fn from_url(u: &url::Url) -> GoUrl {
        let host = match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => String::new(),
        };
        // Go keeps `Path` decoded and the encoded form in `RawPath` when they differ; a Go
        // reader rebuilding the URL from `Path` alone would encode `%20` again as `%2520`.
        let encoded = u.path();
        let decoded = percent_encoding::percent_decode_str(encoded)
            .decode_utf8_lossy()
            .into_owned();
        let raw_path = if decoded == encoded {
            String::new()
        } else {
            encoded.to_string()
        };
        GoUrl {
            scheme: u.scheme().to_string(),
            host,
            path: decoded,
            raw_path,
            raw_query: u.query().unwrap_or_default().to_string(),
            fragment: u.fragment().unwrap_or_default().to_string(),
            ..GoUrl::default()
        }
    }
}

/// Go's `url` path escaping: unreserved characters and `$&+,/:;=@` stay, the rest
/// (including `?`, `#`, `%` and spaces) become `%XX`.
fn escape_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~$&+,/:;=@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn de_callback<'de, D>(d: D) -> Result<Option<String>, D::Error>
where
    D: Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Callback {
        Plain(String),
        Go(GoUrl),
    }
    Ok(match Option::<Callback>::deserialize(d)? {
        None => None,
        Some(Callback::Plain(s)) if s.trim().is_empty() => None,
        Some(Callback::Plain(s)) => Some(s),
        Some(Callback::Go(g)) => {
            let s = g.to_url_string();
            (!s.is_empty()).then_some(s)
        }
    })
}

/// Written as a Go `url.URL` object, as the gateway does, so a Go worker can read our messages.
fn ser_callback<S: Serializer>(cb: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match cb.as_deref().map(url::Url::parse) {
        Some(Ok(u)) => GoUrl::from_url(&u).serialize(s),
        Some(Err(_)) => s.serialize_str(cb.as_deref().unwrap_or_default()),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message byte for byte as the Go gateway marshals it.
    const GATEWAY_JSON: &str = r#"{"Header":{"Accept-Encoding":["gzip"],"Content-Type":["text/plain"],"User-Agent":["curl/8.5.0"],"X-Call-Id":["7f1c2c2b-1e1a-4b8f-a2d6-4e0f1b0e9c11"],"X-Callback-Url":["http://receiver.example:8080/done?x=1"],"X-Start-Time":["1741610445838000000"]},"Host":"gateway.openfaas:8080","Body":"aGVsbG8gd29ybGQ=","Method":"POST","Path":"/sub/path","QueryString":"a=1&b=two","Function":"sleep","QueueName":"","Annotations":{"com.openfaas.retry.attempts":"5"},"CallbackUrl":{"Scheme":"http","Opaque":"","User":null,"Host":"receiver.example:8080","Path":"/done","RawPath":"","OmitHost":false,"ForceQuery":false,"RawQuery":"x=1","Fragment":"","RawFragment":""}}"#;

    #[test]
    fn go_paths_without_raw_path_are_escaped_as_go_does() {
        let read = |path: &str, raw: &str| {
            let json = format!(
                r#"{{"Function":"f","CallbackUrl":{{"Scheme":"http","Host":"cb","Path":"{path}","RawPath":"{raw}","RawQuery":"q=1"}}}}"#
            );
            serde_json::from_str::<QueueRequest>(&json)
                .unwrap()
                .callback_url
                .unwrap()
        };
        assert_eq!(read("/a?b", ""), "http://cb/a%3Fb?q=1");
        assert_eq!(read("/a#b", ""), "http://cb/a%23b?q=1");
        assert_eq!(read("/100%", ""), "http://cb/100%25?q=1");
        assert_eq!(read("/a b", ""), "http://cb/a%20b?q=1");
        assert_eq!(read("/plain/path", ""), "http://cb/plain/path?q=1");
        // A valid RawPath wins (an encoded slash stays encoded); an invalid one is ignored.
        assert_eq!(read("/a/b", "/a%2Fb"), "http://cb/a%2Fb?q=1");
        assert_eq!(read("/a/b", "/other"), "http://cb/a/b?q=1");
    }

    #[test]
    fn callback_paths_are_written_as_go_keeps_them() {
        let r = QueueRequest {
            callback_url: Some("http://cb:8080/a%20b/c?x=%20".into()),
            ..QueueRequest::default()
        };
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(json["CallbackUrl"]["Path"], "/a b/c");
        assert_eq!(json["CallbackUrl"]["RawPath"], "/a%20b/c");
        assert_eq!(json["CallbackUrl"]["RawQuery"], "x=%20");
        let back: QueueRequest = serde_json::from_value(json).unwrap();
        assert_eq!(
            back.callback_url.as_deref(),
            Some("http://cb:8080/a%20b/c?x=%20")
        );
        let plain = QueueRequest {
            callback_url: Some("http://cb/plain".into()),
            ..QueueRequest::default()
        };
        let json: serde_json::Value = serde_json::to_value(&plain).unwrap();
        assert_eq!(json["CallbackUrl"]["RawPath"], "");
    }

    #[test]
    fn decodes_the_gateway_format() {
        let r: QueueRequest = serde_json::from_str(GATEWAY_JSON).unwrap();
        assert_eq!(r.body, b"hello world");
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/sub/path");
        assert_eq!(r.query_string, "a=1&b=two");
        assert_eq!(r.function, "sleep");
        assert_eq!(
            r.header_value("x-call-id"),
            Some("7f1c2c2b-1e1a-4b8f-a2d6-4e0f1b0e9c11")
        );
        assert_eq!(
            r.callback_url.as_deref(),
            Some("http://receiver.example:8080/done?x=1")
        );
        assert_eq!(r.annotations["com.openfaas.retry.attempts"], "5");
    }

    #[test]
    fn accepts_null_and_string_forms() {
        let r: QueueRequest = serde_json::from_str(
            r#"{"Header":null,"Body":null,"Method":"POST","Function":"f","CallbackUrl":null,"Annotations":null,"Extra":42}"#,
        )
        .unwrap();
        assert!(r.header.is_empty() && r.body.is_empty() && r.callback_url.is_none());
        let r: QueueRequest = serde_json::from_str(
            r#"{"Function":"f","CallbackUrl":"https://cb.example/x","Header":{"X-One":"v"}}"#,
        )
        .unwrap();
        assert_eq!(r.callback_url.as_deref(), Some("https://cb.example/x"));
        assert_eq!(r.header["X-One"], vec!["v".to_string()]);
        let r: QueueRequest = serde_json::from_str(
            r#"{"Function":"f","Header":{"A":["x","y"],"B":null,"C":[],"D":"one"}}"#,
        )
        .unwrap();
        let h = |k: &str| r.header[k].clone();
        assert_eq!(h("A"), ["x", "y"]);
        assert!(h("B").is_empty() && h("C").is_empty());
        assert_eq!(h("D"), ["one"]);
        for bad in [
            r#"{"Header":{"A":5}}"#,
            r#"{"Header":{"A":[1]}}"#,
            r#"{"Header":[]}"#,
        ] {
            assert!(serde_json::from_str::<QueueRequest>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rejects_bad_base64() {
        let err = serde_json::from_str::<QueueRequest>(r#"{"Function":"f","Body":"not base64!"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("base64"), "{err}");
    }

    #[test]
    fn round_trips_through_our_own_encoding() {
        let r: QueueRequest = serde_json::from_str(GATEWAY_JSON).unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""CallbackUrl":{"Scheme":"http""#), "{json}");
        let back: QueueRequest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }
}
