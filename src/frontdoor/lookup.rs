//! Does a function exist, and what are its annotations? Asked of the gateway's
//! `GET /system/function/<name>?namespace=<ns>` (the provider API the OpenFaaS gateway
//! proxies), with basic auth, and cached briefly so a burst of calls costs one lookup.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::config::Secret;
use crate::message::function::FunctionName;

/// How long an answer is reused. Short, so a newly deployed function or a changed
/// annotation takes effect quickly.
pub const FOUND_TTL: Duration = Duration::from_secs(5);
/// How long "no such function" is reused: long enough to absorb a flood of calls to a name
/// that does not exist, short enough that a deploy that just finished is seen.
pub const MISSING_TTL: Duration = Duration::from_secs(1);
/// How long a failed lookup is reused: the requests waiting for it fail together rather
/// than asking a gateway that is down one after another.
pub const FAILURE_TTL: Duration = Duration::from_secs(1);
/// Longest a lookup may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);

type Answer = Result<Found, LookupError>;

/// What the gateway said about a function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Exists {
        annotations: BTreeMap<String, String>,
    },
    Missing,
}

/// Why a lookup gave no answer. The front door answers 503: it cannot tell a function that
/// exists from one that does not.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error("the gateway refused the function lookup with {0} (check secret_mount_path's basic-auth-user and basic-auth-password)")]
    Unauthorized(u16),
    #[error("the gateway answered the function lookup with {0}")]
    Status(u16),
    #[error("the gateway did not answer the function lookup: {0}")]
    Unreachable(String),
}

#[derive(Deserialize)]
struct FunctionStatus {
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

/// Looks functions up, with a small cache.
pub struct Lookup {
    client: reqwest::Client,
    /// Gateway base URL without a trailing `/`.
    base: String,
    auth: Option<(String, Secret)>,
    cache: Mutex<HashMap<String, (Instant, Answer)>>,
    /// Per name: one lookup at a time, so a burst of calls to a function not yet cached
    /// waits for the first answer instead of asking the gateway once each.
    in_flight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Most names cached; past it the expired and then the oldest half are evicted.
const CACHE_LIMIT: usize = 10_000;

impl Lookup {
    pub fn new(base: String, auth: Option<(String, Secret)>) -> anyhow::Result<Lookup> {
        crate::tls::install_provider();
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Lookup {
            client,
            base,
            auth,
            cache: Mutex::default(),
            in_flight: Mutex::default(),
        })
    }

    /// Looks up `function`, asking by the name as written (a bare name in the gateway's own
    /// default namespace).
    pub async fn get(&self, name: &FunctionName) -> Result<Found, LookupError> {
        let function = name.as_written();
        if let Some(answer) = self.cached(function) {
            return answer;
        }
        let turn = Turn::new(&self.in_flight, function);
        let _one_at_a_time = turn.lock.lock().await;
        if let Some(answer) = self.cached(function) {
            return answer;
        }
        let answer = self.ask(name).await;
        if let Err(e) = &answer {
            tracing::warn!(function, error = %e, "function lookup failed; its calls get 503 for a second");
        }
        self.remember(function, answer.clone());
        answer
    }

    /// Asks the gateway.
    async fn ask(&self, function: &FunctionName) -> Answer {
        let mut url = format!("{}/system/function/{}", self.base, function.name());
        if let Some(ns) = function.written_namespace() {
            url.push_str("?namespace=");
            url.push_str(ns);
        }
        let mut request = self.client.get(&url);
        if let Some((user, password)) = &self.auth {
            request = request.basic_auth(user, Some(password.expose()));
        }
        let response = request
            .send()
            .await
            .map_err(|e| LookupError::Unreachable(e.to_string()))?;
        let found = match response.status().as_u16() {
            200 => {
                let parsed = response
                    .bytes()
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|b| {
                        serde_json::from_slice::<FunctionStatus>(&b).map_err(|e| e.to_string())
                    });
                let annotations = match parsed {
                    Ok(s) => s.annotations.unwrap_or_default(),
                    Err(e) => {
                        tracing::warn!(function = function.as_written(), error = %e, "function lookup: unreadable answer; queueing without its annotations");
                        BTreeMap::new()
                    }
                };
                Found::Exists { annotations }
            }
            404 => Found::Missing,
            code @ (401 | 403) => return Err(LookupError::Unauthorized(code)),
            code => return Err(LookupError::Status(code)),
        };
        Ok(found)
    }

    fn remember(&self, function: &str, answer: Answer) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        // Names come from requests: keep the cache bounded whatever they send, dropping
        // expired answers first and then the oldest, never the whole cache.
        if cache.len() >= CACHE_LIMIT {
            let now = Instant::now();
            cache.retain(|_, (at, a)| now.duration_since(*at) < ttl(a));
            if cache.len() >= CACHE_LIMIT {
                let mut ages: Vec<Instant> = cache.values().map(|(at, _)| *at).collect();
                ages.sort_unstable();
                let cutoff = ages[ages.len() / 2];
                cache.retain(|_, (at, _)| *at > cutoff);
            }
        }
        cache.insert(function.to_string(), (Instant::now(), answer));
    }

    fn cached(&self, function: &str) -> Option<Answer> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let (at, answer) = cache.get(function)?;
        (at.elapsed() < ttl(answer)).then(|| answer.clone())
    }
}

/// A place in the queue of lookups for one name. The map holds an entry only while someone
/// waits for that name; the last one out removes it, also when its request is dropped
/// mid-lookup (a client that hung up), so hostile names cannot grow it.
struct Turn<'a> {
    map: &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    name: String,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> Turn<'a> {
    fn new(map: &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>, name: &str) -> Self {
        let lock = map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone();
        Turn {
            map,
            name: name.to_string(),
            lock,
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        // Ours and the map's: nobody else is waiting.
        if Arc::strong_count(&self.lock) <= 2 {
            map.remove(&self.name);
        }
    }
}

fn ttl(answer: &Answer) -> Duration {
    match answer {
        Ok(Found::Exists { .. }) => FOUND_TTL,
        Ok(Found::Missing) => MISSING_TTL,
        Err(_) => FAILURE_TTL,
    }
}
