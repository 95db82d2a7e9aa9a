//! What every handler shares: the node, the token, the bound address, open map handles.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use syncmesh::{Map, Node};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// Map handles kept for reuse; past this many the cache starts over (a handle is only a sid).
const MAP_CACHE: usize = 4096;

/// How the server runs: its token, address and shutdown signal.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// When set, every request needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// The address the HTTP listener is bound to (reported by `GET /v1/Node`, used in URLs
    /// when a request has no usable `Host` header).
    pub http_addr: SocketAddr,
    /// Cancelled at shutdown: ends every live event stream so connections can drain.
    pub shutdown: CancellationToken,
    /// Web origins (`https://app.example:8443`, or `*`) whose pages may call the API (CORS);
    /// empty: only pages the node serves itself.
    pub cors_origins: Vec<String>,
    /// What one client, or all of them, may take of this node.
    pub limits: Limits,
    /// Host names a node without a token answers to besides loopback ones (`--allow-host`).
    pub allowed_hosts: Vec<String>,
}

/// Bounds on what clients may take of a node: connections, time, event subscriptions and
/// their buffers. The defaults keep a node's memory in the low hundreds of MB and its
/// descriptors under a 1,024 limit whatever clients do (see docs/http-api.md, "Limits").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// HTTP connections at once, WebSockets included. When full, the oldest connection that
    /// has not sent a whole request yet is closed to make room, else the new one gets 503.
    pub max_connections: usize,
    /// Time for a request's head to arrive; also how long a keep-alive connection may idle.
    pub header_timeout: std::time::Duration,
    /// Time for a whole request body to arrive (bodies are at most 64 KiB).
    pub body_timeout: std::time::Duration,
    /// Live event subscriptions (SSE and WebSocket) at once, on all maps.
    pub max_subscribers: usize,
    /// Live event subscriptions at once on one map.
    pub max_subscribers_per_map: usize,
    /// Largest WebSocket message a client may send (clients only answer pings).
    pub ws_max_message: usize,
    /// Time a write to a client may make no progress before the client is dropped: an event
    /// stream (SSE or WebSocket) or any answer to a client that stopped reading.
    pub send_timeout: std::time::Duration,
    /// The process's limit on open descriptors these were fitted to (reported only).
    pub open_files: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 768,
            header_timeout: std::time::Duration::from_secs(10),
            body_timeout: std::time::Duration::from_secs(20),
            max_subscribers: 512,
            max_subscribers_per_map: 256,
            ws_max_message: 64 * 1024,
            send_timeout: std::time::Duration::from_secs(20),
            open_files: None,
        }
    }
}

impl Limits {
    /// The defaults, with the connection limit fitted to `open_files`, the process's limit on
    /// open descriptors: a quarter of them (at least 64) stay for storage, the network and
    /// answers to refused connections.
    pub fn for_open_files(open_files: u64) -> Self {
        let spare = (open_files / 4).max(64);
        let fit = usize::try_from(open_files.saturating_sub(spare)).unwrap_or(usize::MAX);
        let max_connections = fit.clamp(16, 16_384);
        // Subscribers hold connections: a third stays for everything else.
        let max_subscribers = (max_connections * 2 / 3).max(1);
        Limits {
            max_connections,
            max_subscribers,
            max_subscribers_per_map: (max_subscribers / 2).max(1),
            open_files: Some(open_files),
            ..Limits::default()
        }
    }
}

impl ServerOptions {
    /// Options for a server bound to `http_addr`, without a token.
    pub fn new(http_addr: SocketAddr) -> Self {
        ServerOptions {
            token: None,
            http_addr,
            shutdown: CancellationToken::new(),
            cors_origins: Vec::new(),
            limits: Limits::default(),
            allowed_hosts: Vec::new(),
        }
    }

    /// Lets a node without a token answer to these host names too (it answers to loopback
    /// names only, so that DNS rebinding cannot reach it).
    pub fn with_allowed_hosts(mut self, hosts: Vec<String>) -> Self {
        self.allowed_hosts = hosts;
        self
    }

    /// Uses these limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Lets pages from these origins call the API (`*`: any origin). The token still guards
    /// every route; CORS only decides which pages a browser lets read the answers.
    pub fn with_cors_origins(mut self, origins: Vec<String>) -> Self {
        self.cors_origins = origins;
        self
    }

    /// Requires this bearer token (`None`: no token).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// Ends live event streams when `shutdown` is cancelled.
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }
}

/// The router's state. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    node: Node,
    /// SHA-256 of the token: compared in constant time, and equal length whatever was sent.
    token: Option<[u8; 32]>,
    /// The token itself, for the inspector page it admits (it passes it to the client).
    token_text: Option<String>,
    http_addr: SocketAddr,
    shutdown: CancellationToken,
    maps: Mutex<HashMap<String, Map>>,
    cors_origins: Vec<String>,
    allowed_hosts: Vec<String>,
    limits: Limits,
    subscribers: Mutex<Subscribers>,
    /// Inspector page sessions ([`AppState::new_page_session`]).
    pages: Mutex<PageSessions>,
}

/// Sessions of the inspector page: a random id in the page's cookie, and a key the page was
/// given (derived from the id and a secret of this process) that the API takes only together
/// with that cookie. The node token never reaches the page; a restart ends every session.
struct PageSessions {
    secret: [u8; 32],
    /// Session id → when it was last used.
    live: HashMap<[u8; 32], std::time::Instant>,
}

/// Most page sessions at once (the oldest ends first).
const MAX_PAGE_SESSIONS: usize = 256;
/// A page session unused this long ends.
const PAGE_SESSION_IDLE: std::time::Duration = std::time::Duration::from_secs(12 * 3600);
/// What a page's API key starts with (a node token never does, as far as this node cares:
/// such a bearer value is checked as a page key only).
pub const PAGE_KEY_PREFIX: &str = "page.";

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    if getrandom::fill(&mut b).is_err() {
        // No OS randomness: sessions cannot be made safely; this one then never matches.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b = Sha256::digest(t.to_le_bytes()).into();
    }
    b
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Live event subscriptions, counted to keep them within [`Limits`].
#[derive(Default)]
struct Subscribers {
    total: usize,
    per_map: HashMap<String, usize>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("node", &self.inner.node)
            .field("http_addr", &self.inner.http_addr)
            .finish_non_exhaustive()
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

impl AppState {
    /// State for a server of `node`.
    pub fn new(node: Node, opts: ServerOptions) -> Self {
        AppState {
            inner: Arc::new(Inner {
                node,
                token: opts.token.as_deref().map(digest),
                token_text: opts.token.clone(),
                http_addr: opts.http_addr,
                shutdown: opts.shutdown,
                maps: Mutex::new(HashMap::new()),
                cors_origins: opts
                    .cors_origins
                    .iter()
                    .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                    .collect(),
                allowed_hosts: opts.allowed_hosts,
                limits: opts.limits,
                subscribers: Mutex::new(Subscribers::default()),
                pages: Mutex::new(PageSessions {
                    secret: random32(),
                    live: HashMap::new(),
                }),
            }),
        }
    }

    /// The node.
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.inner.http_addr
    }

    /// Cancelled at shutdown.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// The limits clients are held to.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Host names answered besides loopback ones by a node without a token.
    pub fn allowed_hosts(&self) -> &[String] {
        &self.inner.allowed_hosts
    }

    /// Whether pages of `origin` were allowed to call the API (`--cors-origin`). `*` counts
    /// only on a node with a token: on one without, it would let any site write.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        let o = origin.trim_end_matches('/').to_ascii_lowercase();
        let any = self.token_required();
        self.inner
            .cors_origins
            .iter()
            .any(|a| (a == "*" && any) || *a == o)
    }

    /// Counts a new live event subscription on map `sid`, or refuses it (429) when a limit
    /// is reached. The subscription ends when the returned guard is dropped.
    pub fn subscribe_slot(&self, sid: &str) -> Result<SubscriberSlot, ApiError> {
        let lim = &self.inner.limits;
        let mut s = self
            .inner
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let on_map = s.per_map.get(sid).copied().unwrap_or(0);
        let full = if s.total >= lim.max_subscribers {
            Some(format!(
                "this node serves at most {} event subscriptions at once",
                lim.max_subscribers
            ))
        } else if on_map >= lim.max_subscribers_per_map {
            Some(format!(
                "this map has the most event subscriptions a node serves for one map ({})",
                lim.max_subscribers_per_map
            ))
        } else {
            None
        };
        if let Some(why) = full {
            return Err(ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                crate::error::codes::OVERLOADED,
                format!("{why}; retry later"),
            ));
        }
        s.total += 1;
        *s.per_map.entry(sid.to_string()).or_insert(0) += 1;
        Ok(SubscriberSlot {
            state: self.clone(),
            sid: sid.to_string(),
        })
    }

    /// Live event subscriptions now (all maps).
    pub fn subscribers(&self) -> usize {
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .total
    }

    /// Starts an inspector page session: returns the cookie value (the session id, hex).
    pub fn new_page_session(&self) -> String {
        let id = random32();
        let mut p = self.inner.pages.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        p.live
            .retain(|_, t| now.duration_since(*t) < PAGE_SESSION_IDLE);
        if p.live.len() >= MAX_PAGE_SESSIONS {
            if let Some(oldest) = p.live.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k) {
                p.live.remove(&oldest);
            }
        }
        p.live.insert(id, now);
        hex(&id)
    }

    /// The API key of the page session whose cookie value is `cookie`, if it is live.
    pub fn page_key(&self, cookie: &str) -> Option<String> {
        let id = unhex32(cookie)?;
        let mut p = self.inner.pages.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let t = p.live.get_mut(&id)?;
        if now.duration_since(*t) >= PAGE_SESSION_IDLE {
            p.live.remove(&id);
            return None;
        }
        *t = now;
        let key = Sha256::new()
            .chain_update(b"syncmesh page key\0")
            .chain_update(p.secret)
            .chain_update(id)
            .finalize();
        Some(format!("{PAGE_KEY_PREFIX}{}", hex(&key)))
    }

    /// Whether `given` is the page key of the session in `cookie` (compared in constant time).
    pub fn page_key_matches(&self, cookie: &str, given: &str) -> bool {
        self.page_key(cookie)
            .is_some_and(|k| bool::from(k.as_bytes().ct_eq(given.as_bytes())))
    }

    /// Whether requests need a token.
    pub fn token_required(&self) -> bool {
        self.inner.token.is_some()
    }

    /// The token, if the node has one.
    pub fn token(&self) -> Option<&str> {
        self.inner.token_text.as_deref()
    }

    /// Whether `given` is the token (always true without one).
    pub fn token_matches(&self, given: &str) -> bool {
        match &self.inner.token {
            None => true,
            Some(want) => digest(given).ct_eq(want).into(),
        }
    }

    /// An existing map by sid or unique name (404/54200 otherwise).
    ///
    /// Handles are cached: a handle only names the map's sid, and every operation through it
    /// checks that the map still exists, so a cached handle of a removed map answers 54200
    /// just as a fresh lookup would.
    pub async fn map(&self, id: &str) -> Result<Map, ApiError> {
        if let Some(m) = self.cache().get(id) {
            return Ok(m.clone());
        }
        let m = self.inner.node.open_existing(id).await?;
        let mut cache = self.cache();
        if cache.len() >= MAP_CACHE {
            cache.clear();
        }
        cache.insert(id.to_string(), m.clone());
        Ok(m)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Map>> {
        self.inner.maps.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One live event subscription, counted until dropped ([`AppState::subscribe_slot`]).
pub struct SubscriberSlot {
    state: AppState,
    sid: String,
}

impl Drop for SubscriberSlot {
    fn drop(&mut self) {
        let mut s = self
            .state
            .inner
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.per_map.get_mut(&self.sid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.per_map.remove(&self.sid);
            }
        }
    }
}
