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
}

impl ServerOptions {
    /// Options for a server bound to `http_addr`, without a token.
    pub fn new(http_addr: SocketAddr) -> Self {
        ServerOptions {
            token: None,
            http_addr,
            shutdown: CancellationToken::new(),
            cors_origins: Vec::new(),
        }
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
