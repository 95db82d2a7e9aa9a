//! `syncmesh node`: the daemon. Configuration (TOML file, then flags), the node, the HTTP
//! server, and a graceful shutdown on SIGINT/SIGTERM that closes the node so nothing is lost.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;
use syncmesh::{Durability, Multiaddr, Node, NodeBuilder, PeerId, SwarmKey};
use syncmesh_server::{router, serve, ServerOptions};
use tokio_util::sync::CancellationToken;

/// Default HTTP address: loopback only.
pub const DEFAULT_HTTP: &str = "127.0.0.1:7700";
/// Where a node listens for peers when no `--listen` is given: every interface, a free port
/// (mDNS tells the local network which; `GET /v1/Node` tells you).
pub const DEFAULT_LISTEN: &str = "/ip4/0.0.0.0/tcp/0";
/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "syncmesh-data";
/// How long requests in flight get to finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

/// When writes are acknowledged (`--durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityArg {
    /// After fsync: an acknowledged write survives a crash (default).
    Fsync,
    /// Before fsync (an fsync follows within 100 ms): faster, a crash can lose that window.
    Relaxed,
}

/// The daemon's configuration: the TOML file's shape, and what flags resolve to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the node keeps its data.
    pub data_dir: Option<PathBuf>,
    /// HTTP API address, `ADDR:PORT` (port 0 picks a free one).
    pub http: Option<String>,
    /// Bearer token required on every HTTP request.
    pub token: Option<String>,
    /// When writes are acknowledged.
    pub durability: Option<DurabilityArg>,
    /// Multiaddrs to listen on for peers.
    #[serde(default)]
    pub listen: Vec<String>,
    /// Multiaddrs of peers to connect to.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Discover peers on the local network with mDNS (`None`: the build's default).
    pub mdns: Option<bool>,
    /// Pre-shared key file of a private network.
    pub swarm_key: Option<PathBuf>,
    /// Hold every map any peer has (a backup or cluster node).
    pub hold_all_maps: Option<bool>,
    /// Web origins whose pages may call the HTTP API (CORS); `*` for any.
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// Peer ids trusted while the node runs (every map, read and write; not stored).
    #[serde(default)]
    pub trust: Vec<String>,
    /// Trust every peer that connects (an isolated lab network only).
    pub trust_all: Option<bool>,
    /// Host names a node without a token answers to besides loopback ones.
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// Seconds an open of a map only peers hold waits for all of it.
    pub fetch_timeout: Option<u64>,
    /// Megabytes of memory for live Automerge documents (least recently used ones are parked).
    pub document_budget: Option<u64>,
    /// Operations of history a shard document keeps before it is cut (unset: never cut).
    pub history: Option<u64>,
    /// What clients may take of the node (`[limits]`).
    #[serde(default)]
    pub limits: LimitArgs,
}

/// Limits on what HTTP clients may take of the node: flags, and the config file's `[limits]`
/// table (same names, with `_`). Unset: defaults fitted to the open-file limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct LimitArgs {
    /// HTTP connections at once, WebSockets included [default: 3/4 of the open-file limit,
    /// at most 16384].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Live event subscriptions at once [default: 2/3 of --max-connections].
    #[arg(long, value_name = "N")]
    pub max_subscribers: Option<usize>,
    /// Live event subscriptions at once on one map [default: half of --max-subscribers].
    #[arg(long, value_name = "N")]
    pub max_subscribers_per_map: Option<usize>,
    /// Bytes of events held for one subscriber that does not read [default: 65536].
    #[arg(long, value_name = "BYTES")]
    pub subscriber_buffer: Option<usize>,
    /// Seconds for a request head to arrive, and for a keep-alive connection to idle
    /// [default: 10].
    #[arg(long, value_name = "SECONDS")]
    pub header_timeout: Option<u64>,
    /// Seconds for a request body to arrive [default: 20].
    #[arg(long, value_name = "SECONDS")]
    pub body_timeout: Option<u64>,
    /// Largest WebSocket message a client may send, in bytes [default: 65536].
    #[arg(long, value_name = "BYTES")]
    pub ws_max_message: Option<usize>,
    /// Seconds a write to a client that stopped reading may wait (event streams, WebSockets,
    /// any answer) before the client is dropped [default: 20].
    #[arg(long, value_name = "SECONDS")]
    pub send_timeout: Option<u64>,
}

impl LimitArgs {
    /// `self` with every value `flags` sets replacing the file's.
    fn overridden_by(self, f: LimitArgs) -> LimitArgs {
        LimitArgs {
            max_connections: f.max_connections.or(self.max_connections),
            max_subscribers: f.max_subscribers.or(self.max_subscribers),
            max_subscribers_per_map: f.max_subscribers_per_map.or(self.max_subscribers_per_map),
            subscriber_buffer: f.subscriber_buffer.or(self.subscriber_buffer),
            header_timeout: f.header_timeout.or(self.header_timeout),
            body_timeout: f.body_timeout.or(self.body_timeout),
            ws_max_message: f.ws_max_message.or(self.ws_max_message),
            send_timeout: f.send_timeout.or(self.send_timeout),
        }
    }

    /// The server's limits: the defaults for `open_files` descriptors, then these values.
    pub fn resolve(&self, open_files: Option<u64>) -> anyhow::Result<syncmesh_server::Limits> {
        let mut l = match open_files {
            Some(n) => syncmesh_server::Limits::for_open_files(n),
            None => syncmesh_server::Limits::default(),
        };
        let positive = |name: &str, v: usize| {
            if v == 0 {
                bail!("--{name} must be at least 1")
            }
            Ok(v)
        };
        let secs = |name: &str, v: u64| {
            if v == 0 {
                bail!("--{name} must be at least 1 second")
            }
            Ok(Duration::from_secs(v))
        };
        if let Some(v) = self.max_connections {
            l.max_connections = positive("max-connections", v)?;
            l.max_subscribers = (l.max_connections * 2 / 3).max(1);
            l.max_subscribers_per_map = (l.max_subscribers / 2).max(1);
        }
        if let Some(v) = self.max_subscribers {
            l.max_subscribers = positive("max-subscribers", v)?;
            l.max_subscribers_per_map = (l.max_subscribers / 2).max(1);
        }
        if let Some(v) = self.max_subscribers_per_map {
            l.max_subscribers_per_map = positive("max-subscribers-per-map", v)?;
        }
        if let Some(v) = self.header_timeout {
            l.header_timeout = secs("header-timeout", v)?;
        }
        if let Some(v) = self.body_timeout {
            l.body_timeout = secs("body-timeout", v)?;
        }
        if let Some(v) = self.ws_max_message {
            l.ws_max_message = positive("ws-max-message", v)?;
        }
        if let Some(v) = self.send_timeout {
            l.send_timeout = secs("send-timeout", v)?;
        }
        Ok(l)
    }
}

/// Raises the soft limit on open files to the hard limit (a node's connections need
/// descriptors) and returns the limit now in force, if it can be read.
fn raise_open_files() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!("cannot read or raise the open-file limit: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .ok()
                .map(|(soft, _)| soft)
        }
    }
}

impl Config {
    /// Reads a config file; unknown keys are an error.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        let mut cfg = Config::parse(&text)
            .with_context(|| format!("in the config file {}", path.display()))?;
        // A key file named in the config sits beside it, wherever the node is started from.
        if let (Some(key), Some(dir)) = (&cfg.swarm_key, path.parent()) {
            if key.is_relative() {
                cfg.swarm_key = Some(dir.join(key));
            }
        }
        Ok(cfg)
    }

    /// Parses config text.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        Ok(toml::from_str(text)?)
    }

    /// `self` with every value `flags` sets replacing the file's.
    pub fn overridden_by(self, flags: Config) -> Config {
        Config {
            data_dir: flags.data_dir.or(self.data_dir),
            http: flags.http.or(self.http),
            token: flags.token.or(self.token),
            durability: flags.durability.or(self.durability),
            listen: if flags.listen.is_empty() {
                self.listen
            } else {
                flags.listen
            },
            peers: if flags.peers.is_empty() {
                self.peers
            } else {
                flags.peers
            },
            mdns: flags.mdns.or(self.mdns),
            swarm_key: flags.swarm_key.or(self.swarm_key),
            hold_all_maps: flags.hold_all_maps.or(self.hold_all_maps),
            cors_origins: if flags.cors_origins.is_empty() {
                self.cors_origins
            } else {
                flags.cors_origins
            },
            trust: if flags.trust.is_empty() {
                self.trust
            } else {
                flags.trust
            },
            trust_all: flags.trust_all.or(self.trust_all),
            allow_hosts: if flags.allow_hosts.is_empty() {
                self.allow_hosts
            } else {
                flags.allow_hosts
            },
            limits: self.limits.overridden_by(flags.limits),
            fetch_timeout: flags.fetch_timeout.or(self.fetch_timeout),
            document_budget: flags.document_budget.or(self.document_budget),
            history: flags.history.or(self.history),
        }
    }
}

/// Applies the networking options to the node builder: the one place where `--listen`,
/// `--peer`, `--mdns`, `--swarm-key`, `--trust` and `--trust-all` reach the library. A daemon
/// is always on the network: it listens on [`DEFAULT_LISTEN`] unless told otherwise, and mDNS
/// is on unless `--no-mdns`.
pub fn network_options(cfg: &Config, mut builder: NodeBuilder) -> anyhow::Result<NodeBuilder> {
    let default = [DEFAULT_LISTEN.to_string()];
    let listen = if cfg.listen.is_empty() {
        &default[..]
    } else {
        &cfg.listen[..]
    };
    for l in listen {
        let addr: Multiaddr = l.parse().with_context(|| {
            format!("--listen {l:?} is not a multiaddr (e.g. /ip4/0.0.0.0/tcp/7701 or /ip4/0.0.0.0/udp/7701/quic-v1)")
        })?;
        builder = builder.listen(addr);
    }
    for p in &cfg.peers {
        let addr: Multiaddr = p.parse().with_context(|| {
            format!("--peer {p:?} is not a multiaddr (e.g. /ip4/192.0.2.7/tcp/7701)")
        })?;
        builder = builder.peer(addr);
    }
    builder = builder
        .mdns(cfg.mdns.unwrap_or(true))
        .hold_all_maps(cfg.hold_all_maps.unwrap_or(false));
    if let Some(path) = &cfg.swarm_key {
        builder = builder.swarm_key(SwarmKey::load(path)?);
    }
    for t in &cfg.trust {
        let peer: PeerId = t.trim().parse().map_err(|_| {
            anyhow::anyhow!(
                "--trust {t:?} is not a peer id (`peer_id` in `syncmesh status` on that node, e.g. 12D3KooW…)"
            )
        })?;
        builder = builder.trust(peer);
    }
    Ok(builder.trust_all(cfg.trust_all.unwrap_or(false)))
}

/// What `--trust-all` means, printed at start so nobody runs it by accident.
pub const TRUST_ALL_WARNING: &str = "WARNING: --trust-all: this node trusts every peer that \
connects. Anyone who can reach its peer port can read and change every map. Use it only on an \
isolated lab network; elsewhere invite peers (`syncmesh invite` / `syncmesh join`) or trust them \
by id (`--trust`).";

/// Resolves the HTTP address and refuses a non-loopback one without a token.
pub async fn http_addr(cfg: &Config) -> anyhow::Result<SocketAddr> {
    let text = cfg.http.as_deref().unwrap_or(DEFAULT_HTTP);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(text)
        .await
        .with_context(|| format!("--http {text:?} is not an ADDR:PORT"))?
        .collect();
    let Some(first) = addrs.first().copied() else {
        bail!("--http {text:?} resolves to no address");
    };
    if cfg.token.is_none() {
        if let Some(open) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            bail!(
                "refusing to serve the HTTP API on {open} without a token: anyone who can reach \
                 that address could read and change every map. Set --token (or SYNCMESH_TOKEN, \
                 or `token` in the config file), or bind to a loopback address such as 127.0.0.1"
            );
        }
    }
    Ok(first)
}

/// What the daemon tells its starter once it serves (stdout line and `--ready-file`).
#[derive(Debug, serde::Serialize)]
struct Ready<'a> {
    http_addr: String,
    node_id: String,
    data_dir: &'a Path,
}

/// Runs the node until SIGINT or SIGTERM, then drains requests and closes the node.
pub async fn run(cfg: Config, ready_file: Option<PathBuf>) -> anyhow::Result<()> {
    if cfg.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        bail!("the token must not be empty");
    }
    let addr = http_addr(&cfg).await?;
    let mut signals = Signals::new()?;
    let data_dir = cfg
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let durability = match cfg.durability.unwrap_or(DurabilityArg::Fsync) {
        DurabilityArg::Fsync => Durability::Fsync,
        DurabilityArg::Relaxed => Durability::Relaxed,
    };
    let open_files = raise_open_files();
    let limits = cfg.limits.resolve(open_files)?;
    let mut builder = Node::builder().data_dir(&data_dir).durability(durability);
    if let Some(s) = cfg.fetch_timeout {
        if s == 0 {
            bail!("--fetch-timeout must be at least 1 second");
        }
        builder = builder.fetch_timeout(Duration::from_secs(s));
    }
    if let Some(mb) = cfg.document_budget {
        if mb == 0 {
            bail!("--document-budget must be at least 1 (MB)");
        }
        builder = builder.document_budget(mb.saturating_mul(1024 * 1024));
    }
    if let Some(ops) = cfg.history {
        builder = builder.history(ops);
    }
    if let Some(b) = cfg.limits.subscriber_buffer {
        if b == 0 {
            bail!("--subscriber-buffer must be at least 1 byte");
        }
        builder = builder.subscriber_buffer(b);
    }
    let builder = network_options(&cfg, builder)?;
    if cfg.trust_all == Some(true) {
        eprintln!("{TRUST_ALL_WARNING}");
    }
    let node = builder
        .open()
        .await
        .with_context(|| format!("cannot open the node in {}", data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for HTTP on {addr}"))?;
    let local = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    for o in &cfg.cors_origins {
        if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
            bail!("--cors-origin {o:?} is not an origin: scheme://host[:port] (e.g. http://localhost:5173), or *");
        }
    }
    tracing::info!(
        open_files = ?open_files,
        max_connections = limits.max_connections,
        max_subscribers = limits.max_subscribers,
        "client limits"
    );
    let opts = ServerOptions::new(local)
        .with_token(cfg.token.clone())
        .with_cors_origins(cfg.cors_origins.clone())
        .with_allowed_hosts(cfg.allow_hosts.clone())
        .with_limits(limits)
        .with_shutdown(shutdown.clone());
    let app = router(node.clone(), opts.clone());
    let serve_opts = opts;

    let ready = Ready {
        http_addr: local.to_string(),
        node_id: node.id().to_string(),
        data_dir: &data_dir,
    };
    if let Some(path) = &ready_file {
        write_ready_file(path, &ready)?;
    }
    // One line on stdout that scripts can wait for; logs go to stderr.
    println!(
        "syncmesh node {} listening on http://{local}",
        ready.node_id
    );
    tracing::info!(http = %local, data_dir = %data_dir.display(), node = %ready.node_id, "serving");

    let mut server = tokio::spawn(async move { serve(listener, app, &serve_opts).await });
    let served_until_signal = tokio::select! {
        sig = signals.recv() => {
            tracing::info!("{sig}: shutting down");
            true
        }
        r = &mut server => {
            match r {
                Ok(Ok(())) => tracing::warn!("the HTTP server stopped"),
                Ok(Err(e)) => tracing::error!("the HTTP server failed: {e}"),
                Err(e) => tracing::error!("the HTTP server task failed: {e}"),
            }
            false
        }
    };
    shutdown.cancel();
    if served_until_signal {
        tokio::select! {
            r = tokio::time::timeout(DRAIN, &mut server) => {
                if r.is_err() {
                    tracing::warn!("requests still running after {DRAIN:?}; closing anyway");
                    server.abort();
                }
            }
            sig = signals.recv() => {
                tracing::warn!("{sig} again: closing without waiting for requests");
                server.abort();
            }
        }
    }
    node.close()
        .await
        .context("closing the node (committing what is queued)")?;
    tracing::info!("node closed");
    if !served_until_signal {
        bail!("the HTTP server stopped unexpectedly");
    }
    Ok(())
}

fn write_ready_file(path: &Path, ready: &Ready<'_>) -> anyhow::Result<()> {
    // Written whole then renamed, so a watcher never reads half a file.
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_string(ready)?;
    std::fs::write(&tmp, json).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// SIGINT and SIGTERM, listened for from creation on (so a signal sent right after the ready
/// line is never the default action, which would kill the node without closing it).
struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                int: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
                term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// Resolves on the first signal, with its name.
    async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.int.recv() => "SIGINT",
                _ = self.term.recv() => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "interrupt"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../../../examples/syncmesh.toml");
        let cfg = Config::parse(text).unwrap();
        assert_eq!(cfg.http.as_deref(), Some("127.0.0.1:7700"));
        assert_eq!(cfg.data_dir, Some(PathBuf::from("syncmesh-data")));
        assert_eq!(cfg.durability, Some(DurabilityArg::Fsync));
        // closed by default: the example trusts no one until told
        assert!(cfg.trust.is_empty());
        assert_eq!(cfg.trust_all, Some(false));
        assert!(network_options(&cfg, Node::builder()).is_ok());
        // its commented trust keys parse once uncommented
        let uncommented: String = text
            .lines()
            .map(|l| {
                l.strip_prefix("# trust")
                    .map_or_else(|| l.to_string(), |rest| format!("trust{rest}"))
            })
            .collect::<Vec<_>>()
            .join("\n");
        let cfg = Config::parse(&uncommented).unwrap();
        assert_eq!(cfg.trust.len(), 1);
        assert!(network_options(&cfg, Node::builder()).is_ok());
        // the limits table, every key uncommented, resolves; flags override it
        let limits: String = text
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|r| {
                        r.starts_with("max_")
                            || r.starts_with("subscriber_")
                            || r.starts_with("body_")
                            || r.starts_with("ws_")
                            || r.starts_with("send_")
                    })
                    .unwrap_or(l)
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join("\n");
        let cfg = Config::parse(&limits).unwrap();
        assert_eq!(cfg.limits.max_connections, Some(768));
        assert_eq!(cfg.limits.send_timeout, Some(20));
        let l = cfg.limits.resolve(Some(1024)).unwrap();
        assert_eq!(l.header_timeout, Duration::from_secs(10));
        assert_eq!(l.max_subscribers_per_map, 256);
        let flags = Config {
            limits: LimitArgs {
                max_connections: Some(100),
                ..LimitArgs::default()
            },
            ..Config::default()
        };
        let merged = cfg.overridden_by(flags);
        assert_eq!(merged.limits.max_connections, Some(100));
        assert_eq!(merged.limits.header_timeout, Some(10));
        let zero = LimitArgs {
            body_timeout: Some(0),
            ..LimitArgs::default()
        };
        assert!(zero.resolve(None).is_err());
    }

    #[test]
    fn default_limits_fit_the_open_file_limit() {
        let l = LimitArgs::default().resolve(Some(1024)).unwrap();
        assert_eq!(l.max_connections, 768);
        assert_eq!(l.max_subscribers, 512);
        assert_eq!(l.open_files, Some(1024));
        let l = LimitArgs::default().resolve(Some(1 << 20)).unwrap();
        assert_eq!(l.max_connections, 16_384);
        let l = LimitArgs::default().resolve(Some(40)).unwrap();
        assert!(l.max_connections >= 16);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let e = Config::parse("htp = \"127.0.0.1:1\"").unwrap_err();
        assert!(format!("{e:#}").contains("unknown field"), "{e:#}");
        assert!(Config::parse("mdns = \"yes\"").is_err());
        assert!(Config::parse("durability = \"sometimes\"").is_err());
        assert!(Config::parse("trust = \"12D3KooW\"").is_err(), "a list");
        assert!(Config::parse("trust_all = \"yes\"").is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let file = Config::parse(
            "http = \"127.0.0.1:1\"\ntoken = \"f\"\nlisten = [\"/ip4/0.0.0.0/tcp/0\"]\nmdns = true",
        )
        .unwrap();
        let flags = Config {
            http: Some("127.0.0.1:2".into()),
            mdns: Some(false),
            ..Config::default()
        };
        let c = file.overridden_by(flags);
        assert_eq!(c.http.as_deref(), Some("127.0.0.1:2"));
        assert_eq!(c.token.as_deref(), Some("f"));
        assert_eq!(c.listen, ["/ip4/0.0.0.0/tcp/0"]);
        assert_eq!(c.mdns, Some(false));
    }

    #[test]
    fn networking_options_are_checked() {
        let c = Config {
            peers: vec!["127.0.0.1:4001".into()],
            ..Config::default()
        };
        let e = network_options(&c, Node::builder()).unwrap_err();
        assert!(e.to_string().contains("is not a multiaddr"), "{e}");
        let c = Config {
            listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
            peers: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            mdns: Some(false),
            ..Config::default()
        };
        assert!(network_options(&c, Node::builder()).is_ok());
        let c = Config {
            hold_all_maps: Some(true),
            mdns: Some(false),
            ..Config::default()
        };
        assert!(network_options(&c, Node::builder()).is_ok());
        let c = Config {
            swarm_key: Some("/nonexistent/swarm.key".into()),
            ..Config::default()
        };
        let e = network_options(&c, Node::builder()).unwrap_err();
        assert!(e.to_string().contains("swarm key"), "{e}");
        let c = Config {
            trust: vec!["not-a-peer".into()],
            ..Config::default()
        };
        let e = network_options(&c, Node::builder()).unwrap_err();
        assert!(e.to_string().contains("is not a peer id"), "{e}");
        let c = Config {
            trust: vec!["12D3KooWKE37TxS1GdywN2zLCpd5vL7nizkSyqD2F3JBrkLVueGe".into()],
            trust_all: Some(true),
            ..Config::default()
        };
        assert!(network_options(&c, Node::builder()).is_ok());
    }

    #[test]
    fn trust_flags_override_the_file() {
        let file = Config::parse("trust = [\"a\"]\ntrust_all = true").unwrap();
        let c = file.clone().overridden_by(Config::default());
        assert_eq!((c.trust, c.trust_all), (vec!["a".to_string()], Some(true)));
        let c = file.overridden_by(Config {
            trust: vec!["b".into()],
            ..Config::default()
        });
        assert_eq!((c.trust, c.trust_all), (vec!["b".to_string()], Some(true)));
    }

    #[tokio::test]
    async fn non_loopback_http_needs_a_token() {
        let open = Config {
            http: Some("0.0.0.0:0".into()),
            ..Config::default()
        };
        let e = http_addr(&open).await.unwrap_err();
        assert!(e.to_string().contains("without a token"), "{e}");
        let with_token = Config {
            token: Some("t".into()),
            ..open
        };
        assert!(http_addr(&with_token).await.is_ok());
        assert!(http_addr(&Config::default())
            .await
            .unwrap()
            .ip()
            .is_loopback());
        let bad = Config {
            http: Some("not an address".into()),
            ..Config::default()
        };
        assert!(http_addr(&bad).await.is_err());
    }
}
