//! The client subcommands: each one request (or a few), printed as a table or as JSON.

use std::io::{IsTerminal, Write as _};
use std::time::Duration;

use anyhow::Context;
use comfy_table::{presets::UTF8_FULL_CONDENSED, ContentArrangement, Table};
use futures_util::{SinkExt, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{Method, StatusCode, Url};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Client, Failure, Outcome};

/// Writes in flight during `import`: enough to share the node's fsyncs.
const IMPORT_CONCURRENCY: usize = 32;
/// Longest wait between `watch` reconnection attempts.
const WATCH_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// `println!` for command output: a reader that went away (`| head -1`) ends the command
/// quietly, with success, as Unix tools do, instead of a panic on the closed pipe.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let mut o = std::io::stdout().lock();
        if let Err(e) = writeln!(o, $($t)*).and_then(|()| o.flush()) {
            crate::commands::output_failed(e);
        }
    }};
}

/// What [`outln!`] does when stdout cannot be written: exit at once (0 when the reader left,
/// 1 for any other error, said on stderr).
pub fn output_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: cannot write to stdout: {e}");
    std::process::exit(1);
}

/// How to print.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    /// JSON instead of tables.
    pub json: bool,
}

fn print_json(v: &Value) -> Outcome {
    let text = serde_json::to_string_pretty(v).map_err(|e| Failure::Other(e.into()))?;
    outln!("{text}");
    Ok(())
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    t
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn parse_object(text: &str) -> Outcome<Value> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| Failure::Other(anyhow::anyhow!("the data is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(Failure::Other(anyhow::anyhow!(
            "the data must be a JSON object, like '{{\"country\": \"UK\"}}'"
        )));
    }
    Ok(v)
}

/// `syncmesh maps`: every map, all pages.
pub async fn maps(c: &Client, out: Out) -> Outcome {
    let mut url = c.api(&["Maps"])?;
    url.set_query(Some("PageSize=100"));
    let mut all = Vec::new();
    loop {
        let page = c.get(url).await?;
        all.extend(page["maps"].as_array().cloned().unwrap_or_default());
        match next_url(c, &page)? {
            Some(u) => url = u,
            None => break,
        }
    }
    if out.json {
        return print_json(&Value::Array(all));
    }
    let mut t = table(&["SID", "UNIQUE NAME", "UPDATED", "EXPIRES"]);
    for m in &all {
        t.add_row([
            s(&m["sid"]),
            s(&m["unique_name"]),
            s(&m["date_updated"]),
            s(&m["date_expires"]),
        ]);
    }
    outln!("{t}");
    Ok(())
}

/// The next page's URL, rebased on `--node` (the node may have named itself differently).
fn next_url(c: &Client, page: &Value) -> Outcome<Option<Url>> {
    let Some(next) = page["meta"]["next_page_url"].as_str() else {
        return Ok(None);
    };
    let parsed = Url::parse(next)
        .map_err(|e| Failure::Other(anyhow::anyhow!("bad next_page_url {next:?}: {e}")))?;
    let mut u = c.base().clone();
    u.set_path(parsed.path());
    u.set_query(parsed.query());
    Ok(Some(u))
}

fn print_map(m: &Value, out: Out) -> Outcome {
    if out.json {
        return print_json(m);
    }
    let mut t = table(&["FIELD", "VALUE"]);
    for f in [
        "sid",
        "unique_name",
        "revision",
        "date_created",
        "date_updated",
        "date_expires",
        "created_by",
        "url",
    ] {
        t.add_row([f.to_string(), s(&m[f])]);
    }
    outln!("{t}");
    Ok(())
}

/// `syncmesh map create [NAME] [--ttl]`.
pub async fn map_create(c: &Client, out: Out, name: Option<String>, ttl: Option<i64>) -> Outcome {
    let mut body = serde_json::Map::new();
    if let Some(n) = name {
        body.insert("UniqueName".into(), json!(n));
    }
    if let Some(t) = ttl {
        body.insert("Ttl".into(), json!(t));
    }
    let req = c.request(Method::POST, c.api(&["Maps"])?).json(&body);
    print_map(&c.send(req).await?, out)
}

/// `syncmesh map get MAP`.
pub async fn map_get(c: &Client, out: Out, map: &str) -> Outcome {
    print_map(&c.get(c.api(&["Maps", map])?).await?, out)
}

/// `syncmesh map ttl MAP SECONDS`.
pub async fn map_ttl(c: &Client, out: Out, map: &str, secs: i64) -> Outcome {
    let req = c
        .request(Method::POST, c.api(&["Maps", map])?)
        .json(&json!({ "Ttl": secs }));
    print_map(&c.send(req).await?, out)
}

/// `syncmesh conflicts MAP KEY`.
pub async fn conflicts(c: &Client, out: Out, map: &str, key: &str) -> Outcome {
    let mut url = c.api(&["Maps", map, "Items", key])?;
    if let Ok(mut p) = url.path_segments_mut() {
        p.push("Conflicts");
    }
    let v = c.get(url).await?;
    if out.json {
        return print_json(&v);
    }
    let writers: Vec<&str> = v["writers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let fields = v["fields"].as_object().cloned().unwrap_or_default();
    let values: Vec<String> = v["values"]
        .as_array()
        .into_iter()
        .flatten()
        .map(Value::to_string)
        .collect();
    if fields.is_empty() && values.is_empty() {
        outln!(
            "no conflicts in {key}; current writes by: {}",
            writers.join(", ")
        );
        return Ok(());
    }
    if !values.is_empty() {
        outln!("concurrent values of {key} (visible first):");
        for v in &values {
            outln!("  {v}");
        }
    }
    if fields.is_empty() {
        outln!("concurrent writes by: {}", writers.join(", "));
        return Ok(());
    }
    let mut t = table(&["field", "values (visible first)"]);
    for (f, values) in &fields {
        let vals: Vec<String> = values
            .as_array()
            .into_iter()
            .flatten()
            .map(Value::to_string)
            .collect();
        t.add_row(vec![f.clone(), vals.join("  |  ")]);
    }
    outln!("{t}");
    outln!("concurrent writes by: {}", writers.join(", "));
    Ok(())
}

/// `syncmesh ttl MAP KEY SECONDS`: the item's expiry only (the item must exist).
pub async fn item_ttl(c: &Client, out: Out, map: &str, key: &str, secs: i64) -> Outcome {
    let req = c
        .request(Method::POST, c.api(&["Maps", map, "Items", key])?)
        .json(&json!({ "Ttl": secs }));
    print_item(&c.send(req).await?, out)
}

/// `syncmesh map delete MAP`.
pub async fn map_delete(c: &Client, out: Out, map: &str) -> Outcome {
    c.send(c.request(Method::DELETE, c.api(&["Maps", map])?))
        .await?;
    if out.json {
        return print_json(&json!({"deleted": map}));
    }
    outln!("deleted map {map}");
    Ok(())
}

/// Which write `syncmesh set` / `update` make.
#[derive(Debug, Clone, Copy)]
pub enum WriteKind {
    /// Replace the data (POST).
    Set,
    /// Merge into the data (PATCH).
    Update,
}

fn print_item(it: &Value, out: Out) -> Outcome {
    if out.json {
        return print_json(it);
    }
    let mut t = table(&["FIELD", "VALUE"]);
    for f in [
        "key",
        "revision",
        "date_created",
        "date_updated",
        "date_expires",
        "created_by",
    ] {
        t.add_row([f.to_string(), s(&it[f])]);
    }
    let data = serde_json::to_string_pretty(&it["data"]).unwrap_or_default();
    t.add_row(["data".to_string(), data]);
    outln!("{t}");
    Ok(())
}

/// `syncmesh set` / `syncmesh update`.
#[allow(clippy::too_many_arguments)] // one per command-line argument
pub async fn write(
    c: &Client,
    out: Out,
    how: WriteKind,
    map: &str,
    key: &str,
    data: &str,
    ttl: Option<i64>,
    if_match: Option<String>,
) -> Outcome {
    let data = parse_object(data)?;
    let mut body = json!({ "Data": data });
    if let Some(t) = ttl {
        body["Ttl"] = json!(t);
    }
    let method = match how {
        WriteKind::Set => Method::POST,
        WriteKind::Update => Method::PATCH,
    };
    let mut req = c
        .request(method, c.api(&["Maps", map, "Items", key])?)
        .json(&body);
    if let Some(rev) = if_match {
        req = req.header(reqwest::header::IF_MATCH, format!("\"{rev}\""));
    }
    let it = c.send(req).await?;
    if out.json {
        return print_json(&it);
    }
    outln!(
        "{} {map}/{key} revision {}",
        match how {
            WriteKind::Set => "set",
            WriteKind::Update => "updated",
        },
        s(&it["revision"])
    );
    Ok(())
}

/// `syncmesh get MAP KEY`.
pub async fn get(c: &Client, out: Out, map: &str, key: &str) -> Outcome {
    print_item(&c.get(c.api(&["Maps", map, "Items", key])?).await?, out)
}

/// `syncmesh remove MAP KEY`.
pub async fn remove(
    c: &Client,
    out: Out,
    map: &str,
    key: &str,
    if_match: Option<String>,
) -> Outcome {
    let mut req = c.request(Method::DELETE, c.api(&["Maps", map, "Items", key])?);
    if let Some(rev) = if_match {
        req = req.header(reqwest::header::IF_MATCH, format!("\"{rev}\""));
    }
    c.send(req).await?;
    if out.json {
        return print_json(&json!({"removed": key, "map": map}));
    }
    outln!("removed {map}/{key}");
    Ok(())
}

/// What `syncmesh items` lists.
#[derive(Debug, Default)]
pub struct ItemsQuery {
    /// Start key.
    pub from: Option<String>,
    /// Start after `from`.
    pub exclusive: bool,
    /// Descending order.
    pub desc: bool,
    /// Page size.
    pub page_size: Option<u32>,
    /// Every page.
    pub all: bool,
}

/// `syncmesh items MAP`.
pub async fn items(c: &Client, out: Out, map: &str, q: ItemsQuery) -> Outcome {
    let mut url = c.api(&["Maps", map, "Items"])?;
    {
        let mut qs = url.query_pairs_mut();
        if q.desc {
            qs.append_pair("Order", "desc");
        }
        if let Some(f) = &q.from {
            qs.append_pair("From", f);
            if q.exclusive {
                qs.append_pair("Bounds", "exclusive");
            }
        }
        let size = q.page_size.unwrap_or(if q.all { 100 } else { 50 });
        qs.append_pair("PageSize", &size.to_string());
    }
    let mut all = Vec::new();
    let mut more = false;
    loop {
        let page = c.get(url).await?;
        all.extend(page["items"].as_array().cloned().unwrap_or_default());
        match next_url(c, &page)? {
            Some(u) if q.all => url = u,
            Some(_) => {
                more = true;
                break;
            }
            None => break,
        }
    }
    let last = all.last().map(|i| s(&i["key"])).unwrap_or_default();
    if out.json {
        print_json(&Value::Array(all))?;
    } else {
        let mut t = table(&["KEY", "REVISION", "UPDATED", "DATA"]);
        for it in &all {
            let mut data = it["data"].to_string();
            if data.chars().count() > 80 {
                data = data.chars().take(77).collect::<String>() + "...";
            }
            t.add_row([
                s(&it["key"]),
                s(&it["revision"]),
                s(&it["date_updated"]),
                data,
            ]);
        }
        outln!("{t}");
    }
    if more {
        eprintln!("more items: use --all, or --from {last:?} --exclusive");
    }
    Ok(())
}

/// `syncmesh status`.
pub async fn status(c: &Client, out: Out) -> Outcome {
    let n = c.get(c.url(&["v1", "Node"])).await?;
    if out.json {
        return print_json(&n);
    }
    let list = |v: &Value| match v {
        Value::Array(a) if a.is_empty() => "-".to_string(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join("\n"),
        other => s(other),
    };
    let count = |v: &Value| v.as_array().map_or(0, Vec::len).to_string();
    let mut t = table(&["FIELD", "VALUE"]);
    for f in [
        "node_id",
        "version",
        "http_addr",
        "maps",
        "peer_id",
        "listen_addrs",
    ] {
        t.add_row([f.to_string(), list(&n[f])]);
    }
    let trust_all = if n["trust_all"] == true {
        "yes: every peer that connects is trusted"
    } else {
        "no: only trusted peers (see `syncmesh peers`)"
    };
    t.add_row(["trust_all".to_string(), trust_all.to_string()]);
    t.add_row(["trusted_peers".to_string(), count(&n["trusted_peers"])]);
    let connected = &n["connected_peers"];
    let shown = match connected.as_array() {
        Some(a) if !a.is_empty() => format!("{}\n{}", a.len(), list(connected)),
        _ => "0".to_string(),
    };
    t.add_row(["connected_peers".to_string(), shown]);
    t.add_row(["untrusted_peers".to_string(), count(&n["untrusted_peers"])]);
    t.add_row([
        "discovered_peers".to_string(),
        count(&n["discovered_peers"]),
    ]);
    t.add_row(["problems".to_string(), problem_lines(&n["problems"])]);
    t.add_row(["refused_changes".to_string(), s(&n["refused_changes"])]);
    t.add_row(["writes_stopped".to_string(), s(&n["writes_stopped"])]);
    outln!("{t}");
    Ok(())
}

/// One line per problem: `<peer or address>: <reason>`.
fn problem_lines(v: &Value) -> String {
    let lines: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let who = p["peer_id"]
                .as_str()
                .or_else(|| p["addr"].as_str())
                .unwrap_or("?");
            format!("{who}: {}", s(&p["reason"]))
        })
        .collect();
    if lines.is_empty() {
        "-".into()
    } else {
        lines.join("\n")
    }
}

/// Reads a duration: whole seconds, or a number with `s`, `m`, `h` or `d` (`90s`, `10m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = match t.char_indices().find(|(_, ch)| !ch.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, "s"),
    };
    let bad = || {
        format!("{text:?} is not a duration: seconds, or with s, m, h or d (e.g. 90s, 10m, 2h, 1d)")
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(scale)
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

/// What `syncmesh invite` asks for.
#[derive(Debug)]
pub struct InviteScope {
    /// Maps shared (names or sids); empty for every map.
    pub maps: Vec<String>,
    /// Whether the joining node may change them.
    pub write: bool,
    /// How long the ticket stays valid.
    pub ttl: Duration,
    /// How many nodes may join with it.
    pub uses: u32,
}

fn maps_text(v: &Value) -> String {
    match v.as_array() {
        None => "every map".into(),
        Some(a) => a.iter().map(s).collect::<Vec<_>>().join(", "),
    }
}

/// `syncmesh invite`: the ticket is the last line on stdout; what it allows goes to stderr.
pub async fn invite(c: &Client, out: Out, scope: InviteScope) -> Outcome {
    let mut body = json!({
        "Write": scope.write,
        "Ttl": scope.ttl.as_secs(),
        "Uses": scope.uses,
    });
    if !scope.maps.is_empty() {
        body["Maps"] = json!(scope.maps);
    }
    let req = c
        .request(Method::POST, c.url(&["v1", "Node", "Invites"]))
        .json(&body);
    let inv = c.send(req).await?;
    if out.json {
        return print_json(&inv);
    }
    let Some(ticket) = inv["ticket"].as_str() else {
        return Err(Failure::Other(anyhow::anyhow!(
            "the node's answer has no ticket: {inv}"
        )));
    };
    eprintln!(
        "invitation: {}, {}, {} use(s), valid until {}",
        maps_text(&inv["maps"]),
        if inv["write"] == true {
            "read and write"
        } else {
            "read only"
        },
        s(&inv["uses"]),
        s(&inv["expires"]),
    );
    eprintln!(
        "on the other node run:  syncmesh join <ticket>   (the ticket is a secret until used)"
    );
    outln!("{ticket}");
    Ok(())
}

/// `syncmesh join TICKET`.
pub async fn join(c: &Client, out: Out, ticket: &str) -> Outcome {
    let req = c
        .request(Method::POST, c.url(&["v1", "Node", "Join"]))
        .json(&json!({ "Ticket": ticket.trim() }));
    let p = c.send(req).await.map_err(|e| e.context("join failed"))?;
    if out.json {
        return print_json(&p);
    }
    outln!(
        "joined {}: the two nodes now trust each other; maps shared: {}",
        s(&p["peer_id"]),
        maps_text(&p["maps"]),
    );
    if p["takes_our_writes"] == false {
        outln!(
            "read-only: the invitation does not let this node change them; its writes stay here"
        );
    }
    Ok(())
}

/// `syncmesh peers`: trusted peers, then connected untrusted, discovered, and problems.
pub async fn peers(c: &Client, out: Out) -> Outcome {
    let p = c.get(c.url(&["v1", "Node", "Peers"])).await?;
    if out.json {
        return print_json(&p);
    }
    let yes_no = |v: &Value| if *v == true { "yes" } else { "no" }.to_string();
    if p["trusts_everyone"] == true {
        outln!("This node trusts every peer that connects (--trust-all or a swarm key).\n");
    }
    let trusted = p["trusted_peers"].as_array().cloned().unwrap_or_default();
    outln!("Trusted peers ({})", trusted.len());
    if trusted.is_empty() {
        outln!("  none: `syncmesh invite` here and `syncmesh join <ticket>` there, or `syncmesh peers trust <peer id>`");
    } else {
        let mut t = table(&[
            "PEER ID",
            "CONNECTED",
            "SOURCE",
            "MAPS",
            "WRITE",
            "REFUSED",
            "ADDRESSES",
        ]);
        for tp in &trusted {
            let maps = match tp["maps"].as_array() {
                None => "all".to_string(),
                Some(a) => a.iter().map(s).collect::<Vec<_>>().join("\n"),
            };
            t.add_row([
                s(&tp["peer_id"]),
                yes_no(&tp["connected"]),
                s(&tp["source"]),
                maps,
                yes_no(&tp["write"]),
                s(&tp["refused_changes"]),
                tp["addrs"]
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .map_or_else(
                        || "-".into(),
                        |a| a.iter().map(s).collect::<Vec<_>>().join("\n"),
                    ),
            ]);
        }
        outln!("{t}");
    }
    let untrusted = p["untrusted_peers"].as_array().cloned().unwrap_or_default();
    if !untrusted.is_empty() {
        outln!(
            "\nConnected but not trusted ({}): nothing is exchanged with them",
            untrusted.len()
        );
        for u in &untrusted {
            outln!("  {}", s(u));
        }
    }
    let discovered = p["discovered_peers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !discovered.is_empty() {
        outln!("\nDiscovered on the local network ({})", discovered.len());
        let mut t = table(&["PEER ID", "TRUSTED", "LAST SEEN", "ADDRESSES"]);
        for d in &discovered {
            t.add_row([
                s(&d["peer_id"]),
                yes_no(&d["trusted"]),
                s(&d["last_seen"]),
                d["addrs"].as_array().map_or_else(String::new, |a| {
                    a.iter().map(s).collect::<Vec<_>>().join("\n")
                }),
            ]);
        }
        outln!("{t}");
    }
    let problems = p["problems"].as_array().cloned().unwrap_or_default();
    if !problems.is_empty() {
        outln!("\nProblems ({}), newest first", problems.len());
        let mut t = table(&["PEER OR ADDRESS", "WHEN", "REASON"]);
        for pr in &problems {
            let who = pr["peer_id"]
                .as_str()
                .or_else(|| pr["addr"].as_str())
                .unwrap_or("-");
            t.add_row([who.to_string(), s(&pr["at"]), s(&pr["reason"])]);
        }
        outln!("{t}");
    }
    let refused = p["refused_changes"].as_u64().unwrap_or(0);
    if refused > 0 {
        outln!("\n{refused} change(s) refused from peers that may not write a map");
    }
    Ok(())
}

/// `syncmesh peers trust PEER_ID [--addr MULTIADDR]...`.
pub async fn peers_trust(c: &Client, out: Out, peer: &str, addrs: &[String]) -> Outcome {
    let mut body = json!({});
    if !addrs.is_empty() {
        body["Addr"] = json!(addrs);
    }
    let req = c
        .request(Method::POST, c.url(&["v1", "Node", "Peers", peer]))
        .json(&body);
    let p = c.send(req).await?;
    if out.json {
        return print_json(&p);
    }
    outln!(
        "trusted {} (every map, read and write); trust this node on it too for maps to flow",
        s(&p["peer_id"])
    );
    Ok(())
}

/// `syncmesh peers untrust PEER_ID`.
pub async fn peers_untrust(c: &Client, out: Out, peer: &str) -> Outcome {
    c.send(c.request(Method::DELETE, c.url(&["v1", "Node", "Peers", peer])))
        .await?;
    if out.json {
        return print_json(&json!({"untrusted": peer}));
    }
    outln!("no longer trusting {peer}: disconnected, and nothing more is exchanged with it");
    Ok(())
}

/// `syncmesh compact`.
pub async fn compact(c: &Client, out: Out) -> Outcome {
    let req = c.request(Method::POST, c.url(&["v1", "Node", "Compact"]));
    let r = c.send(req).await?;
    if out.json {
        return print_json(&r);
    }
    let mb = |f: &str| r[f].as_u64().unwrap_or(0) as f64 / 1e6;
    outln!(
        "file {:.1} MB -> {:.1} MB (live data {:.1} MB) in {:.1} s{}",
        mb("file_bytes_before"),
        mb("file_bytes_after"),
        mb("used_bytes"),
        r["seconds"].as_f64().unwrap_or(0.0),
        if r["file"] == "busy" {
            "; the file was left as it was: writes outpaced the rewrite or the disk lacks room for a copy (see the node's log; try again)"
        } else {
            ""
        }
    );
    Ok(())
}

/// `syncmesh watch MAP`: events as JSON lines over a WebSocket, reconnecting after any
/// disconnect and resuming after the last event printed, so none is missed or repeated.
pub async fn watch(c: &Client, map: &str, after: Option<u64>) -> Outcome {
    let mut url = c.api(&["Maps", map, "Events"])?;
    // http -> ws is always a valid scheme change, so this cannot fail.
    let _ = url.set_scheme("ws");
    let mut last = after;
    let mut backoff = Duration::from_millis(100);
    let mut stdout = std::io::stdout();
    // Reconnecting is for a stream that was established: a node unreachable from the start
    // is an error (exit code 5), not something to wait for forever.
    let mut connected_once = false;
    loop {
        let mut u = url.clone();
        if let Some(a) = last {
            u.query_pairs_mut().append_pair("after", &a.to_string());
        }
        let mut req = u
            .as_str()
            .into_client_request()
            .map_err(|e| Failure::Other(e.into()))?;
        if let Some(t) = c.token() {
            let v = format!("Bearer {t}").parse().map_err(|_| {
                Failure::Other(anyhow::anyhow!("the token is not a valid header value"))
            })?;
            req.headers_mut().insert("authorization", v);
        }
        let (mut ws, resp) = match tokio_tungstenite::connect_async(req).await {
            Ok(x) => x,
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                // The node refused the stream: that is final (map gone, token, pruned events).
                let status = resp.status();
                let body: Value = resp
                    .body()
                    .as_deref()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or(Value::Null);
                return Err(Failure::Api {
                    status: StatusCode::from_u16(status.as_u16())
                        .unwrap_or(StatusCode::BAD_GATEWAY),
                    code: body["code"].as_u64().unwrap_or(0),
                    message: body["message"].as_str().map_or_else(
                        || format!("the node refused the event stream: {status}"),
                        str::to_string,
                    ),
                });
            }
            Err(e) if !connected_once => {
                return Err(Failure::Unreachable(format!(
                    "cannot reach the node at {}: {e}",
                    c.base()
                )));
            }
            Err(e) => {
                eprintln!("watch: cannot connect ({e}); retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(WATCH_MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        connected_once = true;
        // Where this stream starts: resuming there after a disconnect misses nothing, even
        // when no event arrived before it.
        if last.is_none() {
            last = resp
                .headers()
                .get("syncmesh-resume-point")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
        }
        match last {
            Some(n) => eprintln!("watch: connected; events after {n}"),
            None => eprintln!("watch: connected"),
        }
        while let Some(msg) = ws.next().await {
            let text = match msg {
                Ok(Message::Text(t)) => t,
                Ok(Message::Ping(p)) => {
                    let _ = ws.send(Message::Pong(p)).await;
                    continue;
                }
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => continue,
            };
            let v: Value = serde_json::from_str(text.as_str())
                .map_err(|e| Failure::Other(anyhow::anyhow!("bad event from the node: {e}")))?;
            if v["type"] == "error" {
                return Err(Failure::Api {
                    status: StatusCode::from_u16(v["status"].as_u64().unwrap_or(500) as u16)
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    code: v["code"].as_u64().unwrap_or(0),
                    message: s(&v["message"]),
                });
            }
            if let Some(id) = v["id"].as_u64() {
                last = Some(id);
            }
            // A closed stdout (e.g. `| head`) ends the watch.
            if writeln!(stdout, "{text}")
                .and_then(|()| stdout.flush())
                .is_err()
            {
                return Ok(());
            }
        }
        match last {
            Some(l) => eprintln!("watch: disconnected; resuming after event {l}"),
            // Nothing seen yet, so no id to resume after: changes made while disconnected
            // before the first event are not replayed (start with --after 0 to get them all).
            None => eprintln!("watch: disconnected before any event; reconnecting live"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(WATCH_MAX_BACKOFF);
    }
}

fn progress(what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{{spinner}} {what} {{pos}} items ({{per_sec}}) {{elapsed}}"
    )) {
        pb.set_style(style);
    }
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// `syncmesh export MAP`: JSON lines `{"key", "data"}` (and `date_expires` when set).
pub async fn export(c: &Client, map: &str) -> Outcome {
    let mut url = c.api(&["Maps", map, "Items"])?;
    url.set_query(Some("PageSize=100"));
    let pb = progress("exported");
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    loop {
        let page = c.get(url).await?;
        for it in page["items"].as_array().into_iter().flatten() {
            let mut line = json!({"key": it["key"], "data": it["data"]});
            if !it["date_expires"].is_null() {
                line["date_expires"] = it["date_expires"].clone();
            }
            if let Err(e) = writeln!(stdout, "{line}") {
                output_failed(e);
            }
            pb.inc(1);
        }
        match next_url(c, &page)? {
            Some(u) => url = u,
            None => break,
        }
    }
    if let Err(e) = stdout.flush() {
        output_failed(e);
    }
    pb.finish_and_clear();
    eprintln!("exported {} items from {map}", pb.position());
    Ok(())
}

/// `syncmesh import MAP`: sets every `{"key", "data"}` line of stdin, many writes in flight.
pub async fn import(c: &Client, out: Out, map: &str) -> Outcome {
    // Every line is read and checked before anything is written: bad input writes nothing.
    let mut writes: Vec<(u64, String, Value)> = Vec::new();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut line_no: u64 = 0;
    while let Some(line) = lines.next_line().await.context("reading stdin")? {
        line_no += 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: String| {
            Failure::Other(anyhow::anyhow!(
                "line {line_no}: {why}; nothing was imported"
            ))
        };
        let v: Value = serde_json::from_str(&line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let (Some(key), Some(data)) = (v["key"].as_str(), v.get("data").filter(|d| d.is_object()))
        else {
            return Err(bad("expected {\"key\": \"...\", \"data\": {...}}".into()));
        };
        c.api(&["Maps", map, "Items", key])
            .map_err(|e| bad(e.to_string()))?;
        // An exported expiry comes back as a TTL from now; an item already expired is skipped.
        let ttl = match v.get("date_expires").and_then(Value::as_str) {
            None => None,
            Some(d) => {
                let t =
                    time::OffsetDateTime::parse(d, &time::format_description::well_known::Rfc3339)
                        .map_err(|e| {
                            bad(format!("date_expires {d:?} is not an RFC 3339 date: {e}"))
                        })?;
                let left = (t - time::OffsetDateTime::now_utc()).whole_milliseconds();
                if left <= 0 {
                    continue;
                }
                Some((left + 999) / 1000)
            }
        };
        let body = match ttl {
            Some(t) => json!({ "Data": data, "Ttl": t }),
            None => json!({ "Data": data }),
        };
        writes.push((line_no, key.to_string(), body));
    }
    // Create the map if it does not exist (an existing one is fine).
    let create = c
        .request(Method::POST, c.api(&["Maps"])?)
        .json(&json!({ "UniqueName": map }));
    match c.send(create).await {
        Ok(_) => {}
        Err(Failure::Api { status, .. })
            if status == StatusCode::CONFLICT || status == StatusCode::BAD_REQUEST => {}
        Err(e) => return Err(e),
    }
    let pb = progress("imported");
    let mut inflight = futures_util::stream::FuturesUnordered::new();
    let mut written: Vec<u64> = Vec::new();
    let mut failure: Option<Failure> = None;
    let mut pending = writes.into_iter();
    loop {
        while failure.is_none() && inflight.len() < IMPORT_CONCURRENCY {
            let Some((at, key, body)) = pending.next() else {
                break;
            };
            let req = c
                .request(Method::POST, c.api(&["Maps", map, "Items", &key])?)
                .json(&body);
            inflight.push(async move { (key, at, c.send(req).await) });
        }
        // Writes already sent are waited for, also after a failure: each is reported.
        let Some((key, at, r)) = inflight.next().await else {
            break;
        };
        match r {
            Ok(_) => {
                written.push(at);
                pb.inc(1);
            }
            Err(e) => {
                if failure.is_none() {
                    failure = Some(e.context(&format!("line {at} ({key:?})")));
                }
            }
        }
    }
    pb.finish_and_clear();
    written.sort_unstable();
    let n = written.len();
    let ranges = line_ranges(&written);
    if out.json {
        print_json(&json!({"map": map, "imported": n, "written_lines": ranges}))?;
    } else if failure.is_some() {
        let list: Vec<String> = ranges
            .iter()
            .map(|[a, b]| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        eprintln!(
            "imported {n} items into {map}; lines written: {}",
            if list.is_empty() {
                "none".to_string()
            } else {
                list.join(", ")
            }
        );
    } else {
        eprintln!("imported {n} items into {map}");
    }
    match failure {
        Some(f) => Err(f),
        None => Ok(()),
    }
}

/// Sorted line numbers as `[first, last]` runs.
fn line_ranges(lines: &[u64]) -> Vec<[u64; 2]> {
    let mut out: Vec<[u64; 2]> = Vec::new();
    for &l in lines {
        match out.last_mut() {
            Some(r) if r[1] + 1 == l => r[1] = l,
            _ => out.push([l, l]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_lines_as_runs() {
        assert_eq!(line_ranges(&[]), Vec::<[u64; 2]>::new());
        assert_eq!(
            line_ranges(&[1, 2, 3, 5, 7, 8]),
            vec![[1, 3], [5, 5], [7, 8]]
        );
    }

    #[test]
    fn durations() {
        for (text, secs) in [
            ("600", 600),
            ("90s", 90),
            ("10m", 600),
            ("2h", 7200),
            ("1d", 86_400),
            (" 5m ", 300),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
        for bad in [
            "",
            "m",
            "10x",
            "1.5h",
            "-1",
            "10 m",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
