//! The HTTP client of the CLI: URLs with percent-encoded segments, the token, and failures
//! sorted into the exit codes scripts rely on.

use std::fmt;

use reqwest::{Method, RequestBuilder, StatusCode, Url};
use serde_json::Value;

/// Exit codes of client commands (documented in `--help`).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Any other failure.
    pub const FAILURE: u8 = 1;
    /// The map or item does not exist (HTTP 404).
    pub const NOT_FOUND: u8 = 3;
    /// Conflict: the item or map name exists (409) or `--if-match` did not match (412).
    pub const CONFLICT: u8 = 4;
    /// The node could not be reached.
    pub const UNREACHABLE: u8 = 5;
    /// The node requires a token, or refused the one given (401).
    pub const UNAUTHORIZED: u8 = 6;
}

/// Why a command failed, with the exit code it maps to.
#[derive(Debug)]
pub enum Failure {
    /// The node answered with an error body.
    Api {
        /// HTTP status.
        status: StatusCode,
        /// Sync Maps or server error code.
        code: u64,
        /// The node's message.
        message: String,
    },
    /// The node could not be reached.
    Unreachable(String),
    /// Anything else (bad input, bad answer, I/O).
    Other(anyhow::Error),
}

impl Failure {
    /// The same failure (and exit code), its message prefixed with where it happened.
    pub fn context(self, at: &str) -> Failure {
        match self {
            Failure::Api {
                status,
                code,
                message,
            } => Failure::Api {
                status,
                code,
                message: format!("{at}: {message}"),
            },
            Failure::Unreachable(m) => Failure::Unreachable(format!("{at}: {m}")),
            Failure::Other(e) => Failure::Other(e.context(at.to_string())),
        }
    }

    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Api { status, .. } => match *status {
                StatusCode::NOT_FOUND => exit::NOT_FOUND,
                StatusCode::CONFLICT | StatusCode::PRECONDITION_FAILED => exit::CONFLICT,
                StatusCode::UNAUTHORIZED => exit::UNAUTHORIZED,
                _ => exit::FAILURE,
            },
            Failure::Unreachable(_) => exit::UNREACHABLE,
            Failure::Other(_) => exit::FAILURE,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Api {
                status,
                code,
                message,
            } => write!(f, "{message} (HTTP {}, code {code})", status.as_u16()),
            Failure::Unreachable(m) => f.write_str(m),
            Failure::Other(e) => write!(f, "{e:#}"),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

/// A command's result.
pub type Outcome<T = ()> = Result<T, Failure>;

/// A client of one node.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
}

impl Client {
    /// A client of the node at `base` (e.g. `http://127.0.0.1:7700`).
    pub fn new(base: &str, token: Option<String>) -> Outcome<Client> {
        // `127.0.0.1:7700` or `localhost:7700`: plain HTTP is meant.
        let with_scheme;
        let base = if base.contains("://") {
            base
        } else {
            with_scheme = format!("http://{base}");
            &with_scheme
        };
        let base = Url::parse(base)
            .map_err(|e| Failure::Other(anyhow::anyhow!("--node {base:?} is not a URL: {e}")))?;
        // Nodes serve plain HTTP (loopback by default); this client is built without TLS.
        if base.cannot_be_a_base() || base.scheme() != "http" {
            return Err(Failure::Other(anyhow::anyhow!(
                "--node {base} must be an http:// URL (this build of the CLI does not speak TLS)"
            )));
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("syncmesh-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Failure::Other(e.into()))?;
        Ok(Client { http, base, token })
    }

    /// The node's base URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// The token, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// `base` + `/v1/...` segments, each percent-encoded (a key's `/` becomes `%2F`).
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut u = self.base.clone();
        if let Ok(mut p) = u.path_segments_mut() {
            p.pop_if_empty();
            p.extend(segments);
        }
        u
    }

    /// The URL of a path under `/v1/Services/default` (`Maps`, map, `Items`, key, ...). A map
    /// or key that is empty, `.` or `..` cannot travel in a URL (it would be dropped or resolved
    /// away, and the request would name another resource): it is refused here, with the code
    /// the node gives an invalid name (54302) or key (54209).
    pub fn api(&self, segments: &[&str]) -> Outcome<Url> {
        for (i, seg) in segments.iter().enumerate() {
            if matches!(*seg, "" | "." | "..") {
                let (code, what) = if i == 1 {
                    (54302, "map name or sid")
                } else {
                    (54209, "key")
                };
                return Err(Failure::Api {
                    status: StatusCode::BAD_REQUEST,
                    code,
                    message: format!(
                        "invalid {what} {seg:?}: it cannot be addressed in a URL (empty, `.` and `..` are not allowed)"
                    ),
                });
            }
        }
        let mut all = vec!["v1", "Services", "default"];
        all.extend_from_slice(segments);
        Ok(self.url(&all))
    }

    /// A request with the token set.
    pub fn request(&self, method: Method, url: Url) -> RequestBuilder {
        let r = self.http.request(method, url);
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Sends a request; a 2xx answer's JSON body (or `null` for 204), else a [`Failure`].
    pub async fn send(&self, req: RequestBuilder) -> Outcome<Value> {
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        if status.is_success() {
            return Ok(body);
        }
        Err(Failure::Api {
            status,
            code: body["code"].as_u64().unwrap_or(0),
            message: body["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("HTTP {status}: {body}")),
        })
    }

    /// A transport error, as [`Failure::Unreachable`] when the node could not be reached.
    pub fn transport(&self, e: reqwest::Error) -> Failure {
        if e.is_connect() || e.is_timeout() {
            Failure::Unreachable(format!(
                "cannot reach the node at {} ({e}); is `syncmesh node` running? (--node / SYNCMESH_NODE)",
                self.base
            ))
        } else {
            Failure::Other(anyhow::anyhow!("request to {} failed: {e}", self.base))
        }
    }

    /// GET a URL.
    pub async fn get(&self, url: Url) -> Outcome<Value> {
        self.send(self.request(Method::GET, url)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded_one_by_one() {
        let c = Client::new("http://127.0.0.1:7700", None).unwrap();
        assert_eq!(
            c.api(&["Maps", "users", "Items", "a/b c?é"])
                .unwrap()
                .as_str(),
            "http://127.0.0.1:7700/v1/Services/default/Maps/users/Items/a%2Fb%20c%3F%C3%A9"
        );
        for (segs, code) in [
            (&["Maps", ".", "Items"][..], 54302),
            (&["Maps", "..", "Items"][..], 54302),
            (&["Maps", "m", "Items", ".."][..], 54209),
            (&["Maps", "m", "Items", ""][..], 54209),
        ] {
            match c.api(segs) {
                Err(Failure::Api { code: got, .. }) => assert_eq!(got, code, "{segs:?}"),
                other => panic!("{segs:?}: {other:?}"),
            }
        }
        let c = Client::new("http://h:1/prefix/", None).unwrap();
        assert_eq!(c.url(&["v1", "Node"]).as_str(), "http://h:1/prefix/v1/Node");
        assert!(Client::new("not a url", None).is_err());
        for bare in ["127.0.0.1:7700", "localhost:7700"] {
            let c = Client::new(bare, None).unwrap();
            assert_eq!(c.base().as_str(), format!("http://{bare}/"));
        }
        assert!(Client::new("ftp://x", None).is_err());
        assert!(Client::new("https://x", None).is_err());
    }

    #[test]
    fn exit_codes() {
        let api = |s: u16| Failure::Api {
            status: StatusCode::from_u16(s).unwrap(),
            code: 0,
            message: String::new(),
        };
        assert_eq!(api(404).exit_code(), exit::NOT_FOUND);
        assert_eq!(api(409).exit_code(), exit::CONFLICT);
        assert_eq!(api(412).exit_code(), exit::CONFLICT);
        assert_eq!(api(401).exit_code(), exit::UNAUTHORIZED);
        assert_eq!(api(400).exit_code(), exit::FAILURE);
        assert_eq!(
            Failure::Unreachable(String::new()).exit_code(),
            exit::UNREACHABLE
        );
    }
}
