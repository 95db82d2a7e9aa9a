//! `syncmesh`: run a node (`syncmesh node`) or talk to a running one (every other command).

mod client;
mod commands;
mod daemon;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::client::{exit, Client};
use crate::daemon::{Config, DurabilityArg};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  failure (bad input, server error, ...)
  2  usage error
  3  not found: the map or item does not exist
  4  conflict: the item or map name exists, or --if-match did not match
  5  the node could not be reached
  6  the node requires a token, or refused the one given";

const MAIN_EXAMPLES: &str = "\
Examples:
  syncmesh node --data-dir ./data                 # run a node on 127.0.0.1:7700
  syncmesh invite                                 # on node A: prints a ticket
  syncmesh --node http://127.0.0.1:7701 join smt1…   # on node B: A and B now trust each other
  syncmesh map create users
  syncmesh set users david '{\"phone_number\": 12345678, \"country\": \"UK\"}'
  syncmesh update users david '{\"country\": \"IRL\"}'
  syncmesh get users david
  syncmesh items users --all --json
  syncmesh watch users                            # one JSON line per event
  syncmesh export users > users.jsonl && syncmesh import users-copy < users.jsonl";

/// syncmesh: local-first replicated JSON maps with the Sync Maps API.
#[derive(Debug, Parser)]
#[command(name = "syncmesh", version, after_help = format!("{MAIN_EXAMPLES}\n\n{EXIT_CODES}"))]
struct Cli {
    /// The node to talk to [default: http://127.0.0.1:7700] (also accepted after the command).
    #[arg(long, env = "SYNCMESH_NODE", value_name = "URL")]
    node: Option<String>,
    /// Bearer token: required by the node on every request (for `syncmesh node`: the token
    /// clients must send).
    #[arg(long, global = true, env = "SYNCMESH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON (the node's answers) instead of tables (also accepted after the command).
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// Options of every command that talks to a running node (not of `syncmesh node`).
#[derive(Debug, Clone, Default, Args)]
struct ClientOpts {
    /// The node to talk to [default: $SYNCMESH_NODE, else http://127.0.0.1:7700].
    #[arg(long, value_name = "URL")]
    node: Option<String>,
    /// Print JSON (the node's answers) instead of tables.
    #[arg(long)]
    json: bool,
}

/// Arguments of a command that names only a map.
#[derive(Debug, Args)]
struct MapOnly {
    /// Sid or unique name.
    map: String,
    #[command(flatten)]
    client: ClientOpts,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node in the foreground: the HTTP API over a data directory.
    #[command(after_help = "\
Examples:
  syncmesh node --data-dir ./data
  syncmesh node --http 127.0.0.1:0 --ready-file ready.json   # free port, written to ready.json
  SYNCMESH_TOKEN=s3cret syncmesh node --http 0.0.0.0:7700    # other hosts need a token
  syncmesh node --config examples/syncmesh.toml --durability relaxed
  syncmesh node --listen /ip4/0.0.0.0/tcp/7701 --trust 12D3KooW…   # sync with that peer

A node exchanges maps only with peers it trusts: ones that joined with a ticket from
`syncmesh invite`, ones trusted by id (`syncmesh peers trust`, `--trust`), or everyone with
`--trust-all` (only on an isolated lab network: anyone who can reach the node can read and
change every map) or everyone holding the `--swarm-key`.

Prints one line `syncmesh node <id> listening on http://ADDR` on stdout when it serves; logs go
to stderr (RUST_LOG=debug for more). SIGINT or SIGTERM stop it after committing every write.")]
    Node(Box<NodeArgs>),
    /// List maps.
    #[command(
        after_help = "Examples:\n  syncmesh maps\n  syncmesh maps --json | jq -r '.[].unique_name'"
    )]
    Maps(ClientOpts),
    /// Create, show, expire or delete a map.
    Map(MapArgs),
    /// Set an item's data (creating it), replacing what was there.
    #[command(after_help = "\
Examples:
  syncmesh set users david '{\"phone_number\": 12345678, \"country\": \"UK\"}'
  syncmesh set users session/42 '{}' --ttl 3600
  syncmesh set users david '{\"country\": \"USA\"}' --if-match 3f2a9c1d0b7e6a55")]
    Set(WriteArgs),
    /// Show an item.
    #[command(
        after_help = "Examples:\n  syncmesh get users david\n  syncmesh get users david --json | jq .data"
    )]
    Get(ItemArgs),
    /// Merge fields into an item's data (shallow; creating the item).
    #[command(after_help = "Examples:\n  syncmesh update users david '{\"country\": \"IRL\"}'")]
    Update(WriteArgs),
    /// Remove an item.
    #[command(
        after_help = "Examples:\n  syncmesh remove users david\n  syncmesh remove users david --if-match 3f2a9c1d0b7e6a55"
    )]
    Remove(RemoveArgs),
    /// Set only an item's time to live, from now (0 = never expires); its data stays.
    #[command(
        after_help = "Examples:\n  syncmesh ttl sessions s-41 3600\n  syncmesh ttl sessions s-41 0"
    )]
    Ttl {
        /// Sid or unique name of the map.
        map: String,
        /// The item's key.
        key: String,
        /// Seconds from now.
        #[arg(allow_negative_numbers = true)]
        seconds: i64,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Show an item's conflicts: every value concurrent writes on several nodes left in a field
    /// (the visible one first), and the nodes whose concurrent writes are current.
    #[command(
        after_help = "Examples:\n  syncmesh conflicts users david\n  syncmesh conflicts users david --json"
    )]
    Conflicts(ItemArgs),
    /// List a map's items in key order.
    #[command(after_help = "\
Examples:
  syncmesh items users
  syncmesh items users --from m --page-size 10
  syncmesh items users --order desc --all --json")]
    Items(ItemsArgs),
    /// Follow a map's events: one JSON line each; reconnects and resumes after a disconnect.
    #[command(after_help = "\
Examples:
  syncmesh watch users
  syncmesh watch users --after 0      # every retained event first, then live
  syncmesh watch users | jq -c 'select(.type == \"map_item_updated\")'")]
    Watch(WatchArgs),
    /// Show the node: id, addresses, trust, peers, number of maps.
    #[command(after_help = "Examples:\n  syncmesh status\n  syncmesh status --json")]
    Status(ClientOpts),
    /// Invite another node: prints a ticket (the last line on stdout) for `syncmesh join` there.
    #[command(after_help = "\
Examples:
  syncmesh invite                                   # every map, read and write, 10 min, one use
  syncmesh invite --map users --map orders --read-only --ttl 1h
  syncmesh invite --uses 3 --ttl 2d
  TICKET=$(syncmesh invite | tail -n 1)

The ticket is a secret until it is used or expires: pass it over a channel you trust. The
node that joins with it and this node then trust each other (stored; survives restarts);
--map and --read-only limit what the joining node receives and may change.")]
    Invite(InviteArgs),
    /// Join the node that issued a ticket (`syncmesh invite` there): both then trust each other.
    #[command(after_help = "\
Examples:
  syncmesh join smt1…
  syncmesh --node http://127.0.0.1:7701 join \"$TICKET\"

Fails (exit code 1) with the inviter's reason when the ticket is malformed, used up, expired
or forged, or when the inviter cannot be reached within 45 s.")]
    Join(JoinArgs),
    /// Trusted, connected, discovered peers and problems; trust or untrust a peer by id.
    #[command(after_help = "\
Examples:
  syncmesh peers
  syncmesh peers --json
  syncmesh peers trust 12D3KooW… --addr /ip4/192.0.2.7/tcp/7701
  syncmesh peers untrust 12D3KooW…")]
    Peers(PeersArgs),
    /// Compact the node's storage and give freed disk space back (the node's storage pauses
    /// while the file is rewritten).
    #[command(after_help = "Examples:\n  syncmesh compact\n  syncmesh compact --json")]
    Compact(ClientOpts),
    /// Print a new random swarm key (the usual `swarm.key` format) for `--swarm-key`: every
    /// node given the same key forms one private mesh. Needs no running node.
    #[command(
        name = "swarm-key",
        after_help = "Examples:\n  (umask 077; syncmesh swarm-key > swarm.key)\n  syncmesh node --swarm-key swarm.key"
    )]
    SwarmKey,
    /// Write every item of a map to stdout as JSON lines ({"key", "data"}).
    #[command(after_help = "Examples:\n  syncmesh export users > users.jsonl")]
    Export(MapOnly),
    /// Set items from JSON lines ({"key", "data"}) on stdin, creating the map if needed.
    #[command(after_help = "\
Examples:
  syncmesh import users < users.jsonl
  syncmesh export users | syncmesh --node http://127.0.0.1:7701 import users")]
    Import(MapOnly),
}

#[derive(Debug, Args)]
struct NodeArgs {
    /// TOML config file; flags override it (see examples/syncmesh.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory [default: ./syncmesh-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTP API address, ADDR:PORT (port 0: any free port) [default: 127.0.0.1:7700].
    #[arg(long)]
    http: Option<String>,
    /// Listen for peers on this multiaddr (repeatable).
    #[arg(long = "listen", value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// Connect to this peer (repeatable).
    #[arg(long = "peer", value_name = "MULTIADDR")]
    peers: Vec<String>,
    /// Discover peers on the local network.
    #[arg(long, overrides_with = "no_mdns")]
    mdns: bool,
    /// Do not discover peers on the local network.
    #[arg(long = "no-mdns", overrides_with = "mdns")]
    no_mdns: bool,
    /// Pre-shared key file of a private network.
    #[arg(long, value_name = "FILE")]
    swarm_key: Option<PathBuf>,
    /// Trust this peer (every map, read and write) while the node runs (repeatable; not
    /// stored: `syncmesh peers trust` stores it).
    #[arg(long = "trust", value_name = "PEER_ID")]
    trust: Vec<String>,
    /// Trust every peer that connects. Only for an isolated lab network: anyone who can reach
    /// the node can read and change every map.
    #[arg(long)]
    trust_all: bool,
    /// Hold every map any peer has, not only the maps opened here (a backup or cluster node).
    #[arg(long)]
    hold_all_maps: bool,
    /// When writes are acknowledged [default: fsync].
    #[arg(long, value_enum)]
    durability: Option<DurabilityArg>,
    /// Let web pages from this origin call the HTTP API (CORS; repeatable; `*`: any), e.g.
    /// http://localhost:5173 for an app's dev server. The token still guards every route.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
    /// A node without a token answers only to loopback host names (so that DNS rebinding
    /// cannot reach it): also answer to this one (repeatable).
    #[arg(long = "allow-host", value_name = "NAME")]
    allow_hosts: Vec<String>,
    #[command(flatten)]
    limits: daemon::LimitArgs,
    /// Seconds an open of a map that only peers hold (`GET /Maps/{name}`) waits for all of it
    /// before answering 503/20513 [default: 10].
    #[arg(long, value_name = "SECONDS")]
    fetch_timeout: Option<u64>,
    /// Megabytes of memory for live Automerge documents, all maps together; past it the least
    /// recently used are parked as their saved bytes and reloaded on use [default: 64].
    #[arg(long, value_name = "MB")]
    document_budget: Option<u64>,
    /// Cut a shard document's history once it holds this many Automerge operations beyond its
    /// live items (16 keeps memory and disk near the live data); not set: history is kept
    /// (for now: see "History" in docs/semantics.md).
    #[arg(long, value_name = "OPS")]
    history: Option<u64>,
    /// Write {"http_addr", "node_id", "data_dir"} as JSON to this file once serving.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<PathBuf>,
}

impl NodeArgs {
    fn config(&self, token: Option<String>) -> anyhow::Result<Config> {
        let file = match &self.config {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        let mdns = match (self.mdns, self.no_mdns) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        };
        Ok(file.overridden_by(Config {
            data_dir: self.data_dir.clone(),
            http: self.http.clone(),
            token,
            durability: self.durability,
            listen: self.listen.clone(),
            peers: self.peers.clone(),
            mdns,
            swarm_key: self.swarm_key.clone(),
            hold_all_maps: self.hold_all_maps.then_some(true),
            cors_origins: self.cors_origins.clone(),
            trust: self.trust.clone(),
            trust_all: self.trust_all.then_some(true),
            allow_hosts: self.allow_hosts.clone(),
            limits: self.limits.clone(),
            fetch_timeout: self.fetch_timeout,
            document_budget: self.document_budget,
            history: self.history,
        }))
    }
}

#[derive(Debug, Args)]
struct MapArgs {
    #[command(subcommand)]
    command: MapCommand,
    #[command(flatten)]
    client: ClientOpts,
}

#[derive(Debug, Subcommand)]
enum MapCommand {
    /// Create a map (fails with exit code 4 if the name is taken).
    #[command(
        after_help = "Examples:\n  syncmesh map create users\n  syncmesh map create sessions --ttl 86400\n  syncmesh map create            # unnamed: prints its sid"
    )]
    Create {
        /// Unique name (omit for an unnamed map).
        name: Option<String>,
        /// Seconds until the map expires (0 = never).
        #[arg(long, allow_negative_numbers = true)]
        ttl: Option<i64>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Show a map.
    #[command(after_help = "Examples:\n  syncmesh map get users")]
    Get(MapOnly),
    /// Set a map's time to live from now (0 = never expires).
    #[command(after_help = "Examples:\n  syncmesh map ttl sessions 3600")]
    Ttl {
        /// Sid or unique name.
        map: String,
        /// Seconds from now.
        #[arg(allow_negative_numbers = true)]
        seconds: i64,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Delete a map and all its items.
    #[command(after_help = "Examples:\n  syncmesh map delete users")]
    Delete(MapOnly),
}

#[derive(Debug, Args)]
struct ItemArgs {
    /// Sid or unique name of the map.
    map: String,
    /// The item's key (any characters).
    key: String,
    #[command(flatten)]
    client: ClientOpts,
}

#[derive(Debug, Args)]
struct WriteArgs {
    /// Sid or unique name of the map.
    map: String,
    /// The item's key (any characters).
    key: String,
    /// The data: a JSON object.
    #[arg(value_name = "JSON")]
    data: String,
    /// Seconds until the item expires (0 = never).
    #[arg(long, allow_negative_numbers = true)]
    ttl: Option<i64>,
    /// Write only if the item's revision is this one (exit code 4 otherwise).
    #[arg(long, value_name = "REVISION")]
    if_match: Option<String>,
    #[command(flatten)]
    client: ClientOpts,
}

#[derive(Debug, Args)]
struct RemoveArgs {
    /// Sid or unique name of the map.
    map: String,
    /// The item's key.
    key: String,
    /// Remove only if the item's revision is this one (exit code 4 otherwise).
    #[arg(long, value_name = "REVISION")]
    if_match: Option<String>,
    #[command(flatten)]
    client: ClientOpts,
}

#[derive(Debug, Args)]
struct ItemsArgs {
    /// Sid or unique name of the map.
    map: String,
    /// Start at this key.
    #[arg(long)]
    from: Option<String>,
    /// Start after --from instead of at it.
    #[arg(long, requires = "from")]
    exclusive: bool,
    /// Key order.
    #[arg(long, value_parser = ["asc", "desc"], default_value = "asc")]
    order: String,
    /// Items per page, 1 to 100.
    #[arg(long)]
    page_size: Option<u32>,
    /// Every page, not just the first.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    client: ClientOpts,
}

#[derive(Debug, Args)]
struct InviteArgs {
    /// Share only this map (name or sid; repeatable); default: every map.
    #[arg(long = "map", value_name = "MAP")]
    maps: Vec<String>,
    /// The joining node may read the maps but its changes are refused.
    #[arg(long)]
    read_only: bool,
    /// How long the ticket stays valid: seconds, or with s, m, h or d (e.g. 90s, 10m, 2h, 1d).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = commands::parse_duration)]
    ttl: std::time::Duration,
    /// How many nodes may join with the ticket.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    uses: u32,
    #[command(flatten)]
    client: ClientOpts,
}

#[derive(Debug, Args)]
struct JoinArgs {
    /// The ticket (`smt1…`) printed by `syncmesh invite` on the other node.
    ticket: String,
    #[command(flatten)]
    client: ClientOpts,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
struct PeersArgs {
    #[command(subcommand)]
    command: Option<PeersCommand>,
    #[command(flatten)]
    client: ClientOpts,
}

#[derive(Debug, Subcommand)]
enum PeersCommand {
    /// Trust a peer by id: every map, read and write (stored). Trust this node on the peer too.
    #[command(after_help = "\
Examples:
  syncmesh peers trust 12D3KooWJ5…
  syncmesh peers trust 12D3KooWJ5… --addr /ip4/192.0.2.7/tcp/7701

Check the id with the peer's owner (`syncmesh status` there): trusting an id lets that node
read and change every map. Without --addr the peer must dial this node, or be found by mDNS.")]
    Trust {
        /// The peer's id (`peer_id` in `syncmesh status` on that node).
        peer_id: String,
        /// Dial the peer at this multiaddr, and keep it dialed (repeatable).
        #[arg(long = "addr", value_name = "MULTIADDR")]
        addrs: Vec<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Stop trusting a peer: it is disconnected at once and gets nothing more.
    #[command(after_help = "Examples:\n  syncmesh peers untrust 12D3KooWJ5…")]
    Untrust {
        /// The peer's id.
        peer_id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Debug, Args)]
struct WatchArgs {
    /// Sid or unique name of the map.
    map: String,
    /// Start after this event id (0: every retained event); default: from the next change.
    #[arg(long)]
    after: Option<u64>,
    #[command(flatten)]
    client: ClientOpts,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let code = rt.block_on(run(cli));
    ExitCode::from(code)
}

async fn run(cli: Cli) -> u8 {
    if let Command::SwarmKey = &cli.command {
        return match syncmesh::SwarmKey::generate() {
            Ok(text) => {
                print!("{text}");
                exit::OK
            }
            Err(e) => {
                eprintln!("error: {e}");
                exit::FAILURE
            }
        };
    }
    if let Command::Node(args) = &cli.command {
        init_logging();
        let r = match args.config(cli.token.clone()) {
            Ok(cfg) => daemon::run(cfg, args.ready_file.clone()).await,
            Err(e) => Err(e),
        };
        return match r {
            Ok(()) => exit::OK,
            // One line: the log (also on stderr) does not repeat it.
            Err(e) => {
                eprintln!("error: {e:#}");
                exit::FAILURE
            }
        };
    }
    let opts = client_opts(&cli.command).unwrap_or_default();
    let node = opts
        .node
        .or(cli.node)
        .unwrap_or_else(|| DEFAULT_NODE.to_string());
    let client = match Client::new(&node, cli.token.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return e.exit_code();
        }
    };
    let out = commands::Out {
        json: cli.json || opts.json,
    };
    let r = match cli.command {
        Command::Node(_) => Ok(()),
        Command::Maps(_) => commands::maps(&client, out).await,
        Command::Map(MapArgs {
            command: MapCommand::Create { name, ttl, .. },
            ..
        }) => commands::map_create(&client, out, name, ttl).await,
        Command::Map(MapArgs {
            command: MapCommand::Get(a),
            ..
        }) => commands::map_get(&client, out, &a.map).await,
        Command::Map(MapArgs {
            command: MapCommand::Ttl { map, seconds, .. },
            ..
        }) => commands::map_ttl(&client, out, &map, seconds).await,
        Command::Map(MapArgs {
            command: MapCommand::Delete(a),
            ..
        }) => commands::map_delete(&client, out, &a.map).await,
        Command::Set(a) => {
            commands::write(
                &client,
                out,
                commands::WriteKind::Set,
                &a.map,
                &a.key,
                &a.data,
                a.ttl,
                a.if_match,
            )
            .await
        }
        Command::Update(a) => {
            commands::write(
                &client,
                out,
                commands::WriteKind::Update,
                &a.map,
                &a.key,
                &a.data,
                a.ttl,
                a.if_match,
            )
            .await
        }
        Command::Get(a) => commands::get(&client, out, &a.map, &a.key).await,
        Command::Conflicts(a) => commands::conflicts(&client, out, &a.map, &a.key).await,
        Command::Remove(a) => commands::remove(&client, out, &a.map, &a.key, a.if_match).await,
        Command::Ttl {
            map, key, seconds, ..
        } => commands::item_ttl(&client, out, &map, &key, seconds).await,
        Command::Items(a) => {
            let q = commands::ItemsQuery {
                from: a.from,
                exclusive: a.exclusive,
                desc: a.order == "desc",
                page_size: a.page_size,
                all: a.all,
            };
            commands::items(&client, out, &a.map, q).await
        }
        Command::Watch(a) => commands::watch(&client, &a.map, a.after).await,
        Command::Status(_) => commands::status(&client, out).await,
        Command::Invite(a) => {
            let scope = commands::InviteScope {
                maps: a.maps,
                write: !a.read_only,
                ttl: a.ttl,
                uses: a.uses,
            };
            commands::invite(&client, out, scope).await
        }
        Command::Join(a) => commands::join(&client, out, &a.ticket).await,
        Command::Peers(PeersArgs { command: None, .. }) => commands::peers(&client, out).await,
        Command::Peers(PeersArgs {
            command: Some(PeersCommand::Trust { peer_id, addrs, .. }),
            ..
        }) => commands::peers_trust(&client, out, &peer_id, &addrs).await,
        Command::Peers(PeersArgs {
            command: Some(PeersCommand::Untrust { peer_id, .. }),
            ..
        }) => commands::peers_untrust(&client, out, &peer_id).await,
        Command::Compact(_) => commands::compact(&client, out).await,
        Command::SwarmKey => Ok(()),
        Command::Export(a) => commands::export(&client, &a.map).await,
        Command::Import(a) => commands::import(&client, out, &a.map).await,
    };
    match r {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

const DEFAULT_NODE: &str = "http://127.0.0.1:7700";

/// The node and output options given after a command that talks to a node.
fn client_opts(cmd: &Command) -> Option<ClientOpts> {
    Some(
        match cmd {
            Command::Node(_) | Command::SwarmKey => return None,
            Command::Maps(c) | Command::Status(c) | Command::Compact(c) => c,
            Command::Map(m) => {
                let sub = match &m.command {
                    MapCommand::Create { client, .. } | MapCommand::Ttl { client, .. } => client,
                    MapCommand::Get(a) | MapCommand::Delete(a) => &a.client,
                };
                return Some(ClientOpts {
                    node: sub.node.clone().or_else(|| m.client.node.clone()),
                    json: sub.json || m.client.json,
                });
            }
            Command::Set(a) | Command::Update(a) => &a.client,
            Command::Get(a) | Command::Conflicts(a) => &a.client,
            Command::Remove(a) => &a.client,
            Command::Ttl { client, .. } => client,
            Command::Items(a) => &a.client,
            Command::Watch(a) => &a.client,
            Command::Invite(a) => &a.client,
            Command::Join(a) => &a.client,
            Command::Peers(p) => match &p.command {
                Some(PeersCommand::Trust { client, .. } | PeersCommand::Untrust { client, .. }) => {
                    return Some(ClientOpts {
                        node: client.node.clone().or_else(|| p.client.node.clone()),
                        json: client.json || p.client.json,
                    });
                }
                None => &p.client,
            },
            Command::Export(a) | Command::Import(a) => &a.client,
        }
        .clone(),
    )
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn node_options_belong_to_client_commands_only() {
        let mut cmd = Cli::command();
        cmd.build();
        let help = cmd
            .find_subcommand_mut("node")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(
            !help.contains("--node") && !help.contains("--json"),
            "{help}"
        );
        assert!(help.contains("--token"));
        assert!(Cli::try_parse_from(["syncmesh", "node", "--json"]).is_err());
        // After the command, or before it: the one after wins.
        let cli = Cli::try_parse_from([
            "syncmesh",
            "--node",
            "http://a:1",
            "get",
            "m",
            "k",
            "--node",
            "http://b:2",
            "--json",
        ])
        .unwrap();
        let o = client_opts(&cli.command).unwrap();
        assert_eq!((o.node.as_deref(), o.json), (Some("http://b:2"), true));
        assert_eq!(cli.node.as_deref(), Some("http://a:1"));
        let cli = Cli::try_parse_from(["syncmesh", "--json", "maps"]).unwrap();
        assert!(cli.json);
        let cli =
            Cli::try_parse_from(["syncmesh", "peers", "trust", "12D3KooWA", "--json"]).unwrap();
        assert!(client_opts(&cli.command).unwrap().json);
        let cli =
            Cli::try_parse_from(["syncmesh", "map", "ttl", "m", "5", "--node", "x:1"]).unwrap();
        assert_eq!(
            client_opts(&cli.command).unwrap().node.as_deref(),
            Some("x:1")
        );
        assert!(client_opts(
            &Cli::try_parse_from(["syncmesh", "swarm-key"])
                .unwrap()
                .command
        )
        .is_none());
        let cli = Cli::try_parse_from(["syncmesh", "map", "--json", "get", "users"]).unwrap();
        assert!(client_opts(&cli.command).unwrap().json);
    }

    #[test]
    fn the_cli_is_well_formed_and_every_command_has_examples() {
        Cli::command().debug_assert();
        fn walk(cmd: &clap::Command) {
            for sub in cmd.get_subcommands() {
                if sub.has_subcommands() {
                    walk(sub);
                    continue;
                }
                let help = sub
                    .get_after_help()
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                assert!(
                    help.contains("Examples:"),
                    "{} has no examples",
                    sub.get_name()
                );
            }
        }
        walk(&Cli::command());
        let top = Cli::command()
            .get_after_help()
            .map(|h| h.to_string())
            .unwrap_or_default();
        assert!(top.contains("Exit codes:"));
    }

    #[test]
    fn node_flags_resolve() {
        let cli = Cli::try_parse_from([
            "syncmesh",
            "node",
            "--http",
            "127.0.0.1:0",
            "--no-mdns",
            "--peer",
            "/ip4/1.2.3.4/tcp/1",
            "--peer",
            "/ip4/1.2.3.5/tcp/1",
            "--token",
            "t",
        ])
        .unwrap();
        let Command::Node(args) = &cli.command else {
            panic!()
        };
        let cfg = args.config(cli.token.clone()).unwrap();
        assert_eq!(cfg.mdns, Some(false));
        assert_eq!(cfg.peers.len(), 2);
        assert_eq!(cfg.token.as_deref(), Some("t"));
        assert_eq!(cfg.http.as_deref(), Some("127.0.0.1:0"));
        assert!(cfg.trust.is_empty());
        assert_eq!(cfg.trust_all, None);
    }

    #[test]
    fn trust_flags_and_trust_commands_parse() {
        let cli = Cli::try_parse_from([
            "syncmesh",
            "node",
            "--trust",
            "12D3KooWA",
            "--trust",
            "12D3KooWB",
            "--trust-all",
        ])
        .unwrap();
        let Command::Node(args) = &cli.command else {
            panic!()
        };
        let cfg = args.config(None).unwrap();
        assert_eq!(cfg.trust, ["12D3KooWA", "12D3KooWB"]);
        assert_eq!(cfg.trust_all, Some(true));
        let cli = Cli::try_parse_from([
            "syncmesh",
            "invite",
            "--map",
            "users",
            "--map",
            "orders",
            "--read-only",
            "--ttl",
            "2h",
            "--uses",
            "3",
        ])
        .unwrap();
        let Command::Invite(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.maps, ["users", "orders"]);
        assert!(a.read_only);
        assert_eq!(a.ttl, std::time::Duration::from_secs(7200));
        assert_eq!(a.uses, 3);
        let Command::Invite(a) = Cli::try_parse_from(["syncmesh", "invite"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!((a.ttl.as_secs(), a.uses, a.read_only), (600, 1, false));
        assert!(Cli::try_parse_from(["syncmesh", "invite", "--uses", "0"]).is_err());
        assert!(Cli::try_parse_from(["syncmesh", "invite", "--ttl", "10x"]).is_err());
        assert!(Cli::try_parse_from(["syncmesh", "join"]).is_err());
        let cli = Cli::try_parse_from(["syncmesh", "peers"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Peers(PeersArgs { command: None, .. })
        ));
        let cli = Cli::try_parse_from([
            "syncmesh",
            "peers",
            "trust",
            "12D3KooWA",
            "--addr",
            "/ip4/1.2.3.4/tcp/1",
        ])
        .unwrap();
        let Command::Peers(PeersArgs {
            command: Some(PeersCommand::Trust { peer_id, addrs, .. }),
            ..
        }) = cli.command
        else {
            panic!()
        };
        assert_eq!((peer_id.as_str(), addrs.len()), ("12D3KooWA", 1));
        let cli = Cli::try_parse_from(["syncmesh", "peers", "untrust", "12D3KooWA"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Peers(PeersArgs {
                command: Some(PeersCommand::Untrust { .. }),
                ..
            })
        ));
    }
}
