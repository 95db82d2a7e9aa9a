//! End-to-end: the built `syncmesh` binary as a daemon (port 0, temp dir), driven over HTTP,
//! WebSocket, Server-Sent Events and with the CLI; restarts and SIGTERM lose nothing.
//!
//! No test depends on timing: each waits for a condition with a generous deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the report

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Generous: the machines are shared and slow; this bounds a wait, it is never the criterion.
const DEADLINE: Duration = Duration::from_secs(90);
const BIN: &str = env!("CARGO_BIN_EXE_syncmesh");
const P: &str = "/v1/Services/default";

/// A running `syncmesh node`.
struct Daemon {
    child: Child,
    addr: String,
    dir: PathBuf,
}

fn base_command() -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("SYNCMESH_TOKEN")
        .env_remove("SYNCMESH_NODE")
        .env("RUST_LOG", "warn");
    c
}

impl Daemon {
    /// Starts a node on `dir` with `args`, and waits for its "listening on" line.
    fn start(dir: &Path, args: &[&str]) -> Daemon {
        Daemon::start_on(dir, "/ip4/127.0.0.1/tcp/0", args)
    }

    /// [`Daemon::start`], listening for peers on `listen` (e.g. a fixed port to restart on).
    fn start_on(dir: &Path, listen: &str, args: &[&str]) -> Daemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("node.log"))
            .unwrap();
        let mut child = base_command()
            .arg("node")
            .arg("--data-dir")
            .arg(dir.join("data"))
            // Tests must not find each other (or anything else) on the network.
            .args(["--no-mdns", "--listen", listen])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(DEADLINE).unwrap_or_else(|_| {
            let log = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
            panic!("the node did not report its address; its log:\n{log}")
        });
        let addr = line
            .rsplit("http://")
            .next()
            .expect("a `listening on http://ADDR` line")
            .trim()
            .to_string();
        Daemon {
            child,
            addr,
            dir: dir.to_path_buf(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends SIGTERM and waits for a clean exit.
    fn terminate(mut self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let status = wait_exit(&mut self.child);
        let log = std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default();
        assert!(
            status.success(),
            "the node exited with {status}; log:\n{log}"
        );
    }

    /// Runs the CLI against this node.
    fn cli(&self, args: &[&str]) -> Output {
        cli_at(&self.url(""), args, None)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the process did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cli_at(node: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = base_command();
    c.arg("--node").arg(node).args(args);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = if stdin.is_some() {
        c.stdin(Stdio::piped()).spawn().unwrap()
    } else {
        c.stdin(Stdio::null()).spawn().unwrap()
    };
    if let Some(input) = stdin {
        use std::io::Write;
        let mut w = child.stdin.take().unwrap();
        w.write_all(input.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stdout_json(o: &Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(DEADLINE)
        .build()
        .unwrap()
}

/// A node on a free port with one map created, and a client for it.
async fn daemon_with_map(dir: &std::path::Path, name: &str) -> (Daemon, reqwest::Client) {
    let d = Daemon::start(dir, &["--http", "127.0.0.1:0"]);
    let c = http();
    let (status, _) = post(
        &c,
        &d.url(&format!("{P}/Maps")),
        json!({"UniqueName": name}),
    )
    .await;
    assert_eq!(status, 201);
    (d, c)
}

async fn post(c: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r = c.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// `GET /v1/Node` of a daemon.
async fn node_json(c: &reqwest::Client, d: &Daemon) -> Value {
    c.get(d.url("/v1/Node"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits until `cond` holds for `GET /v1/Node` of `d`; returns that answer.
async fn wait_node(
    c: &reqwest::Client,
    d: &Daemon,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let start = std::time::Instant::now();
    loop {
        let n = node_json(c, d).await;
        if cond(&n) {
            return n;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for: {what}; last: {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until item `key` of map `users` is on `d`; returns its data.
async fn wait_item(c: &reqwest::Client, d: &Daemon, key: &str) -> Value {
    let start = std::time::Instant::now();
    loop {
        let r = c
            .get(d.url(&format!("{P}/Maps/users/Items/{key}")))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            return r.json::<Value>().await.unwrap()["data"].clone();
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for item {key} on {}",
            d.addr
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The status of item `key` of map `users` on `d` (200 or 404).
async fn item_status(c: &reqwest::Client, d: &Daemon, key: &str) -> u16 {
    c.get(d.url(&format!("{P}/Maps/users/Items/{key}")))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Peer ids listed in `field` of a node description (a list of ids, or of objects with one).
fn ids(n: &Value, field: &str) -> Vec<String> {
    n[field]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().or_else(|| v["peer_id"].as_str()))
        .map(str::to_string)
        .collect()
}

/// A TCP port free on 127.0.0.1 right now (for a node that must come back on the same one).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_and_cli_against_a_running_node() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &["--http", "127.0.0.1:0"]);
    let c = http();
    let node: Value = c
        .get(d.url("/v1/Node"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(node["http_addr"], d.addr.as_str());
    assert_eq!(node["maps"], 0);
    assert!(node["peer_id"].is_string(), "{node}");
    assert!(
        node["listen_addrs"][0].as_str().unwrap().contains("/p2p/"),
        "{node}"
    );

    // CLI writes, HTTP reads (and back)
    let o = d.cli(&["--json", "map", "create", "users"]);
    assert_eq!(stdout_json(&o)["unique_name"], "users");
    let o = d.cli(&["map", "create", "users"]);
    assert_eq!(code(&o), 4, "a taken name is a conflict");
    let key = "team/a: ünï";
    let o = d.cli(&[
        "set",
        "users",
        key,
        r#"{"phone_number": 12345678, "country": "UK"}"#,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = d.cli(&["update", "users", key, r#"{"country": "IRL"}"#]);
    assert!(o.status.success());
    let item = stdout_json(&d.cli(&["--json", "get", "users", key]));
    assert_eq!(
        item["data"],
        json!({"phone_number": 12345678, "country": "IRL"})
    );
    let via_http: Value = c
        .get(item["url"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(via_http, item);
    let (st, _) = post(
        &c,
        &d.url(&format!("{P}/Maps/users/Items")),
        json!({"Key": "eve", "Data": {"x": 1}}),
    )
    .await;
    assert_eq!(st, 201);
    let items = stdout_json(&d.cli(&["--json", "items", "users", "--all", "--page-size", "1"]));
    let keys: Vec<_> = items
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].clone())
        .collect();
    assert_eq!(keys, [json!("eve"), json!(key)]);
    let desc = stdout_json(&d.cli(&["--json", "items", "users", "--order", "desc"]));
    assert_eq!(desc[0]["key"], key);
    let table = d.cli(&["items", "users"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("eve"));
    let status = stdout_json(&d.cli(&["--json", "status"]));
    assert_eq!(status["maps"], 1);
    let compacted = stdout_json(&d.cli(&["--json", "compact"]));
    assert!(compacted["file_bytes_before"].as_u64().unwrap() > 0);
    assert!(compacted["file_bytes_after"].as_u64().unwrap() > 0);
    let o = d.cli(&["compact"]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("file "));
    assert_eq!(
        stdout_json(&d.cli(&["--json", "items", "users"]))[0]["key"],
        "eve"
    );

    // exit codes
    assert_eq!(code(&d.cli(&["get", "users", "nobody"])), 3);
    assert_eq!(code(&d.cli(&["get", "nomap", "k"])), 3);
    assert_eq!(
        code(&d.cli(&[
            "set",
            "users",
            "eve",
            "{}",
            "--if-match",
            "0000000000000000"
        ])),
        4
    );
    assert_eq!(code(&d.cli(&["set", "users", "eve", "[1]"])), 1);
    assert_eq!(
        code(&d.cli(&["set", "users", "eve", "{}", "--ttl", "-1"])),
        1
    );
    assert_eq!(code(&cli_at("http://127.0.0.1:1", &["maps"], None)), 5);
    assert_eq!(
        code(&d.cli(&["watch", "nomap"])),
        3,
        "watching a missing map is final"
    );
    let m = stdout_json(&d.cli(&["--json", "map", "ttl", "users", "3600"]));
    assert!(m["date_expires"].is_string());
    let m = stdout_json(&d.cli(&["--json", "map", "ttl", "users", "0"]));
    assert!(m["date_expires"].is_null());
    let rev = item["revision"].as_str().unwrap();
    assert_eq!(
        code(&d.cli(&["remove", "users", key, "--if-match", "nope"])),
        4
    );
    let o = d.cli(&["--json", "get", "users", key]);
    let rev_now = stdout_json(&o)["revision"].as_str().unwrap().to_string();
    assert_eq!(rev_now, rev);
    assert!(d
        .cli(&["remove", "users", key, "--if-match", rev])
        .status
        .success());
    assert_eq!(code(&d.cli(&["remove", "users", key])), 3);

    // export, import into another map, compare
    for i in 0..150 {
        let (st, _) = post(
            &c,
            &d.url(&format!("{P}/Maps/users/Items")),
            json!({"Key": format!("bulk/{i:03}"), "Data": {"i": i, "s": "x y"}}),
        )
        .await;
        assert_eq!(st, 201);
    }
    // One item with a TTL: its expiry survives the round trip.
    let (st, _) = post(
        &c,
        &d.url(&format!("{P}/Maps/users/Items")),
        json!({"Key": "expiring", "Data": {"t": 1}, "Ttl": 3600}),
    )
    .await;
    assert_eq!(st, 201);
    let exported = d.cli(&["export", "users"]);
    assert!(exported.status.success());
    let text = String::from_utf8(exported.stdout).unwrap();
    assert_eq!(text.lines().count(), 152);
    let o = cli_at(&d.url(""), &["import", "copy"], Some(&text));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = stdout_json(&d.cli(&["--json", "items", "users", "--all"]));
    let b = stdout_json(&d.cli(&["--json", "items", "copy", "--all"]));
    let strip = |v: &Value| -> Vec<(Value, Value)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| (i["key"].clone(), i["data"].clone()))
            .collect()
    };
    assert_eq!(strip(&a), strip(&b));
    let exp = stdout_json(&d.cli(&["--json", "get", "copy", "expiring"]));
    assert!(
        exp["date_expires"].is_string(),
        "the imported item keeps an expiry: {exp}"
    );
    let o = cli_at(&d.url(""), &["import", "copy"], Some("{\"key\": 1}\n"));
    assert_eq!(code(&o), 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 1"));

    assert!(d.cli(&["map", "delete", "copy"]).status.success());
    assert_eq!(code(&d.cli(&["map", "get", "copy"])), 3);
    d.terminate();
}

/// Reads WebSocket text messages until `n` events arrived.
async fn ws_events<S>(ws: &mut S, n: usize) -> Vec<Value>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while out.len() < n {
            match ws.next().await.expect("socket open").unwrap() {
                Message::Text(t) => out.push(serde_json::from_str(t.as_str()).unwrap()),
                Message::Close(f) => panic!("closed: {f:?}"),
                _ => {}
            }
        }
    })
    .await
    .expect("events within the deadline");
    out
}

/// Reads SSE frames from a response until `n` events arrived.
async fn sse_events(resp: &mut reqwest::Response, buf: &mut String, n: usize) -> Vec<(u64, Value)> {
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while out.len() < n {
            let chunk = resp.chunk().await.unwrap().expect("stream open");
            buf.push_str(std::str::from_utf8(&chunk).unwrap());
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                let id = frame.lines().find_map(|l| l.strip_prefix("id: "));
                let data = frame.lines().find_map(|l| l.strip_prefix("data: "));
                if let (Some(id), Some(data)) = (id, data) {
                    out.push((id.parse().unwrap(), serde_json::from_str(data).unwrap()));
                }
            }
        }
    })
    .await
    .expect("events within the deadline");
    out
}

async fn write_items(c: &reqwest::Client, d: &Daemon, keys: std::ops::Range<u32>) {
    for i in keys {
        let (st, body) = post(
            c,
            &d.url(&format!("{P}/Maps/ev/Items")),
            json!({"Key": format!("k{i}"), "Data": {"i": i}}),
        )
        .await;
        assert_eq!(st, 201, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_over_websocket_and_sse_resume_after_a_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let (d, c) = daemon_with_map(dir.path(), "ev").await;
    let ws_url = format!("ws://{}{P}/Maps/ev/Events", d.addr);

    write_items(&c, &d, 100..102).await;
    // WebSocket, live from now; the upgrade says where it starts (the newest event)
    let (mut ws, resp) = tokio_tungstenite::connect_async(ws_url.as_str())
        .await
        .unwrap();
    assert_eq!(resp.headers()["syncmesh-resume-point"], "2");
    write_items(&c, &d, 0..3).await;
    let first = ws_events(&mut ws, 3).await;
    let keys: Vec<_> = first.iter().map(|e| e["item_key"].clone()).collect();
    assert_eq!(keys, [json!("k0"), json!("k1"), json!("k2")]);
    assert_eq!(first[0]["id"], 3);
    for e in &first {
        assert_eq!(e["type"], "map_item_added");
        assert_eq!(e["is_local"], true);
        for f in [
            "id",
            "item_data",
            "previous_item_data",
            "item_revision",
            "date_created",
        ] {
            assert!(e.get(f).is_some(), "{f} missing in {e}");
        }
    }
    let last = first[2]["id"].as_u64().unwrap();
    ws.close(None).await.unwrap();
    drop(ws);
    // missed while disconnected
    write_items(&c, &d, 3..5).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{ws_url}?after={last}"))
        .await
        .unwrap();
    let resumed = ws_events(&mut ws, 2).await;
    assert_eq!(resumed[0]["id"].as_u64().unwrap(), last + 1);
    assert_eq!(resumed[0]["item_key"], "k3");
    assert_eq!(resumed[1]["item_key"], "k4");
    // and live again on the same socket
    write_items(&c, &d, 5..6).await;
    assert_eq!(ws_events(&mut ws, 1).await[0]["item_key"], "k5");
    drop(ws);

    // SSE from the start, then resume with Last-Event-ID as a browser would
    let mut resp = c
        .get(d.url(&format!("{P}/Maps/ev/Events?after=2")))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["syncmesh-resume-point"], "2");
    let mut buf = String::new();
    let got = sse_events(&mut resp, &mut buf, 4).await;
    let ids: Vec<u64> = got.iter().map(|(id, _)| *id).collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    assert!(got.iter().all(|(id, e)| e["id"] == *id));
    let seen = ids[3];
    drop(resp);
    write_items(&c, &d, 6..8).await;
    let mut resp = c
        .get(d.url(&format!("{P}/Maps/ev/Events")))
        .header("accept", "text/event-stream")
        .header("last-event-id", seen.to_string())
        .send()
        .await
        .unwrap();
    let mut buf = String::new();
    // events 5..=6 were written before (k4, k5), then k6 and k7: all after `seen`, in order
    let rest = sse_events(&mut resp, &mut buf, 4).await;
    let keys: Vec<_> = rest.iter().map(|(_, e)| e["item_key"].clone()).collect();
    assert_eq!(keys, [json!("k4"), json!("k5"), json!("k6"), json!("k7")]);
    assert_eq!(rest[0].0, seen + 1);
    drop(resp);
    d.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_watch_resumes_across_a_node_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (d, c) = daemon_with_map(dir.path(), "ev").await;
    let addr = d.addr.clone();
    let mut watch = base_command()
        .args(["--node", &d.url(""), "watch", "ev", "--after", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let next_line = || -> Value {
        serde_json::from_str(&rx.recv_timeout(DEADLINE).expect("a watch line")).unwrap()
    };
    write_items(&c, &d, 0..2).await;
    assert_eq!(next_line()["item_key"], "k0");
    assert_eq!(next_line()["item_key"], "k1");
    // restart the node on the same port; the watch reconnects and resumes
    d.terminate();
    let d = Daemon::start(dir.path(), &["--http", &addr]);
    write_items(&c, &d, 2..4).await;
    let a = next_line();
    let b = next_line();
    assert_eq!(
        (a["item_key"].clone(), b["item_key"].clone()),
        (json!("k2"), json!("k3"))
    );
    assert_eq!(a["id"], 3, "nothing repeated, nothing skipped");
    let _ = watch.kill();
    let _ = watch.wait();
    d.terminate();
}

/// A watch that saw no event before its node went away still misses nothing: it resumes from
/// the point its first stream started at (the `Syncmesh-Resume-Point` header).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_watch_without_events_yet_misses_nothing_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (d, c) = daemon_with_map(dir.path(), "ev").await;
    let addr = d.addr.clone();
    write_items(&c, &d, 100..101).await; // before the watch: not shown
    let mut watch = base_command()
        .args(["--node", &d.url(""), "watch", "ev"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    for (is_out, pipe) in [
        (
            true,
            Box::new(watch.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        ),
        (false, Box::new(watch.stderr.take().unwrap())),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send((is_out, line));
            }
        });
    }
    // Connected, and it has seen no event.
    let (is_out, line) = rx.recv_timeout(DEADLINE).expect("the watch connecting");
    assert!(
        !is_out && line.contains("connected; events after 1"),
        "{line}"
    );
    d.terminate();
    // While the watch waits to reconnect (its backoff has grown), the node comes back and
    // takes writes: they must reach the watch although it is not connected yet.
    loop {
        let (is_out, line) = rx.recv_timeout(DEADLINE).expect("the watch retrying");
        assert!(!is_out, "unexpected output: {line}");
        if line.contains("retrying in 1.6s") {
            break;
        }
    }
    let d = Daemon::start(dir.path(), &["--http", &addr]);
    write_items(&c, &d, 0..2).await;
    let mut keys = Vec::new();
    while keys.len() < 2 {
        let (is_out, line) = rx.recv_timeout(DEADLINE).expect("a watch line");
        if is_out {
            let v: Value = serde_json::from_str(&line).unwrap();
            keys.push(v["item_key"].clone());
        }
    }
    assert_eq!(keys, [json!("k0"), json!("k1")]);
    let _ = watch.kill();
    let _ = watch.wait();
    d.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &["--http", "127.0.0.1:0"]);
    let c = http();
    post(&c, &d.url(&format!("{P}/Maps")), json!({"UniqueName": "w"})).await;
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let url = d.url(&format!("{P}/Maps/w/Items"));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (c, url, ack) = (c.clone(), url.clone(), ack_tx.clone());
        writers.push(tokio::spawn(async move {
            // Writes until the node stops answering; bounded so the test always ends.
            for i in 0..100_000 {
                let key = format!("w{w}/{i}");
                let r = c
                    .post(url.as_str())
                    .json(&json!({"Key": key, "Data": {"w": w, "i": i}}))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 201 => {
                        let _ = ack.send(key);
                    }
                    _ => return,
                }
            }
        }));
    }
    drop(ack_tx);
    let mut acked = BTreeSet::new();
    while acked.len() < 300 {
        let k = tokio::time::timeout(DEADLINE, ack_rx.recv())
            .await
            .unwrap()
            .unwrap();
        acked.insert(k);
    }
    let dd = tokio::task::spawn_blocking(move || d.terminate());
    while let Some(k) = tokio::time::timeout(DEADLINE * 2, ack_rx.recv())
        .await
        .unwrap()
    {
        acked.insert(k);
    }
    dd.await.unwrap();
    for w in writers {
        w.await.unwrap();
    }

    let d = Daemon::start(dir.path(), &["--http", "127.0.0.1:0"]);
    let listed = stdout_json(&d.cli(&["--json", "items", "w", "--all"]));
    let present: BTreeSet<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap().to_string())
        .collect();
    let lost: Vec<_> = acked.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost: {lost:?}",
        lost.len()
    );
    d.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_config_files_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &["--http", "127.0.0.1:0", "--token", "s3cret"]);
    let c = http();
    let r = c.get(d.url("/v1/Node")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], 20003);
    let r = c
        .get(d.url("/v1/Node"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(code(&d.cli(&["maps"])), 6);
    assert!(d
        .cli(&["--token", "s3cret", "map", "create", "m"])
        .status
        .success());
    assert!(d.cli(&["--token", "s3cret", "maps"]).status.success());
    // a WebSocket without the token is refused, with it accepted
    let ws = format!("ws://{}{P}/Maps/m/Events", d.addr);
    assert!(tokio_tungstenite::connect_async(ws.as_str()).await.is_err());
    let (mut s, _) = tokio_tungstenite::connect_async(format!("{ws}?access_token=s3cret"))
        .await
        .unwrap();
    s.close(None).await.unwrap();
    d.terminate();

    // non-loopback without a token is refused
    let o = base_command()
        .args(["node", "--http", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("without a token"));
    // a peer address that is not a multiaddr is refused with the expected shape
    let o = base_command()
        .args([
            "node",
            "--http",
            "127.0.0.1:0",
            "--no-mdns",
            "--peer",
            "127.0.0.1:4001",
            "--data-dir",
        ])
        .arg(dir.path().join("y"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not a multiaddr"));
    // unknown config keys are an error
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "htpp = \"127.0.0.1:0\"\n").unwrap();
    let o = base_command()
        .args(["node", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown field"));
    // the shipped example config runs (flags override its address and directory)
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/syncmesh.toml");
    let d = Daemon::start(
        dir.path(),
        &[
            "--config",
            example.to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
        ],
    );
    assert!(d.cli(&["status"]).status.success());
    // and --ready-file reports the address
    d.terminate();
    let ready = dir.path().join("ready.json");
    let d = Daemon::start(
        dir.path(),
        &[
            "--http",
            "127.0.0.1:0",
            "--ready-file",
            ready.to_str().unwrap(),
        ],
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    assert_eq!(r["http_addr"], d.addr.as_str());
    d.terminate();
}

#[test]
fn help_shows_examples_and_exit_codes() {
    let o = base_command().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("Exit codes:") && text.contains("Examples:"));
    for cmd in [
        &["node"][..],
        &["maps"],
        &["map", "create"],
        &["set"],
        &["get"],
        &["update"],
        &["remove"],
        &["items"],
        &["watch"],
        &["status"],
        &["export"],
        &["import"],
        &["invite"],
        &["join"],
        &["peers"],
        &["peers", "trust"],
        &["peers", "untrust"],
    ] {
        let o = base_command().args(cmd).arg("--help").output().unwrap();
        assert!(o.status.success());
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Examples:"),
            "{cmd:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_joined_by_invitation_replicate_through_their_http_apis() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = Daemon::start(dir_a.path(), &["--http", "127.0.0.1:0"]);
    let b = Daemon::start(dir_b.path(), &["--http", "127.0.0.1:0"]);
    let c = http();
    let node_a = node_json(&c, &a).await;
    // An invitation from A's HTTP API, joined through B's: the two trust each other.
    let (s, inv) = post(&c, &a.url("/v1/Node/Invites"), json!({})).await;
    assert_eq!(s, 201, "{inv}");
    let (s, joined) = post(
        &c,
        &b.url("/v1/Node/Join"),
        json!({"Ticket": inv["ticket"]}),
    )
    .await;
    assert_eq!(s, 201, "{joined}");
    assert_eq!(joined["peer_id"], node_a["peer_id"]);
    // Both hold the map; an item written through A's HTTP API is read through B's.
    let (s, _) = post(
        &c,
        &a.url(&format!("{P}/Maps")),
        json!({"UniqueName": "users"}),
    )
    .await;
    assert_eq!(s, 201);
    let (s, _) = post(
        &c,
        &b.url(&format!("{P}/Maps")),
        json!({"UniqueName": "users"}),
    )
    .await;
    assert!(s == 201 || s == 409, "{s}");
    // B's event stream (from its first event) shows A's write as remote.
    let mut watch = base_command()
        .args(["--node", &b.url(""), "watch", "users", "--after", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (s, _) = post(
        &c,
        &a.url(&format!("{P}/Maps/users/Items")),
        json!({"Key": "david", "Data": {"phone_number": 12345678, "country": "UK"}}),
    )
    .await;
    assert_eq!(s, 201);
    let start = std::time::Instant::now();
    let item = loop {
        let r = c
            .get(b.url(&format!("{P}/Maps/users/Items/david")))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break r.json::<Value>().await.unwrap();
        }
        assert!(start.elapsed() < DEADLINE, "B never had A's item");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(item["data"]["country"], "UK");
    let node_b: Value = c
        .get(b.url("/v1/Node"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(node_b["connected_peers"][0], node_a["peer_id"], "{node_b}");
    let event = loop {
        let line = rx.recv_timeout(DEADLINE).expect("an event on B");
        let e: Value = serde_json::from_str(&line).unwrap();
        if e["item_key"] == "david" {
            break e;
        }
    };
    assert_eq!(event["type"], "map_item_added");
    assert_eq!(event["is_local"], false, "{event}");
    let _ = watch.kill();
    let _ = watch.wait();
    a.terminate();
    b.terminate();
}

#[test]
fn watching_an_unreachable_node_exits_5() {
    // Port 1 on loopback: nothing listens there.
    let o = cli_at("http://127.0.0.1:1", &["watch", "users"], None);
    assert_eq!(code(&o), 5, "{}", String::from_utf8_lossy(&o.stderr));
}

/// The whole sharing story through the CLI, with real processes: a node trusts no one until
/// told; `syncmesh invite` / `syncmesh join` make two nodes trust each other; a used ticket is
/// refused; a node that merely connects gets nothing; trust survives a restart; trusting by
/// id works; `syncmesh peers untrust` cuts a peer off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharing_with_the_cli_invite_join_refusals_restart_and_untrust() {
    let dirs = [(); 3].map(|()| tempfile::tempdir().unwrap());
    let c = http();
    // A listens on a fixed port, so that it can come back on it.
    let listen_a = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let a = Daemon::start_on(dirs[0].path(), &listen_a, &["--http", "127.0.0.1:0"]);
    let b = Daemon::start(dirs[1].path(), &["--http", "127.0.0.1:0"]);
    let node_a = node_json(&c, &a).await;
    let node_b = node_json(&c, &b).await;
    let id_a = node_a["peer_id"].as_str().unwrap().to_string();
    let id_b = node_b["peer_id"].as_str().unwrap().to_string();
    assert_eq!(node_a["trust_all"], false);
    assert_eq!(node_a["trusted_peers"], json!([]), "closed by default");
    for d in [&a, &b] {
        ok(&d.cli(&["map", "create", "users"]));
    }

    // Invite on A (the ticket is the last line on stdout), join on B.
    let out = ok(&a.cli(&["invite"]));
    let ticket = out.lines().last().unwrap().trim().to_string();
    assert!(ticket.starts_with("smt1"), "{out}");
    let out = ok(&b.cli(&["join", &ticket]));
    assert!(out.contains(&id_a), "{out}");
    let peers_a: Value = stdout_json(&a.cli(&["--json", "peers"]));
    assert_eq!(ids(&peers_a, "trusted_peers"), std::slice::from_ref(&id_b));
    assert_eq!(peers_a["trusted_peers"][0]["source"], "invited");
    // Writes go both ways.
    ok(&a.cli(&["set", "users", "from-a", r#"{"by": "a"}"#]));
    assert_eq!(wait_item(&c, &b, "from-a").await, json!({"by": "a"}));
    ok(&b.cli(&["set", "users", "from-b", r#"{"by": "b"}"#]));
    assert_eq!(wait_item(&c, &a, "from-b").await, json!({"by": "b"}));

    // C only connects to A (--peer, no ticket): A lists it as not trusted, and C gets nothing.
    let addr_a = node_a["listen_addrs"][0].as_str().unwrap().to_string();
    let cn = Daemon::start(
        dirs[2].path(),
        &["--http", "127.0.0.1:0", "--peer", &addr_a],
    );
    ok(&cn.cli(&["map", "create", "users"]));
    let node_c = node_json(&c, &cn).await;
    let id_c = node_c["peer_id"].as_str().unwrap().to_string();
    let seen = wait_node(&c, &a, "A lists C as untrusted or as a problem", |n| {
        ids(n, "untrusted_peers").contains(&id_c) || ids(n, "problems").contains(&id_c)
    })
    .await;
    assert!(!ids(&seen, "trusted_peers").contains(&id_c), "{seen}");
    assert!(!ids(&seen, "connected_peers").contains(&id_c), "{seen}");
    // A new write reaches B (trusted) — and by then C still has nothing.
    ok(&a.cli(&["set", "users", "second", r#"{"n": 2}"#]));
    wait_item(&c, &b, "second").await;
    let items: Value = stdout_json(&cn.cli(&["--json", "items", "users"]));
    assert_eq!(items, json!([]), "an untrusted node got A's items");
    // The ticket was for one node: C joining with it is refused, with the reason.
    let o = cn.cli(&["join", &ticket]);
    assert_eq!(code(&o), 1, "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("refused") && err.contains("unknown invitation"),
        "{err}"
    );
    assert!(!ids(&node_json(&c, &a).await, "trusted_peers").contains(&id_c));

    // Trust survives a restart of A (same data, same port): B reconnects, replication resumes.
    a.terminate();
    let a = Daemon::start_on(dirs[0].path(), &listen_a, &["--http", "127.0.0.1:0"]);
    let n = node_json(&c, &a).await;
    assert_eq!(n["peer_id"], id_a.as_str(), "the same identity");
    assert_eq!(ids(&n, "trusted_peers"), std::slice::from_ref(&id_b));
    wait_node(&c, &a, "B connected again", |n| {
        ids(n, "connected_peers").contains(&id_b)
    })
    .await;
    ok(&a.cli(&["set", "users", "after-restart", r#"{"n": 3}"#]));
    wait_item(&c, &b, "after-restart").await;
    ok(&b.cli(&["update", "users", "from-b", r#"{"again": true}"#]));
    let start = std::time::Instant::now();
    while wait_item(&c, &a, "from-b").await["again"] != true {
        assert!(start.elapsed() < DEADLINE, "B's update never reached A");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Trust by id, both ways: C now receives A's maps.
    ok(&cn.cli(&["peers", "trust", &id_a]));
    let addr_c = node_c["listen_addrs"][0].as_str().unwrap().to_string();
    ok(&a.cli(&["peers", "trust", &id_c, "--addr", &addr_c]));
    wait_item(&c, &cn, "second").await;
    let bad = a.cli(&["peers", "trust", "not-a-peer-id"]);
    assert_eq!(code(&bad), 1);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a peer id"));

    // Untrusting B on A: disconnected at once, and a new write of A reaches C but not B.
    ok(&a.cli(&["peers", "untrust", &id_b]));
    let n = node_json(&c, &a).await;
    assert!(!ids(&n, "trusted_peers").contains(&id_b), "{n}");
    assert!(!ids(&n, "connected_peers").contains(&id_b), "{n}");
    ok(&a.cli(&["set", "users", "after-untrust", r#"{"n": 4}"#]));
    wait_item(&c, &cn, "after-untrust").await;
    assert_eq!(item_status(&c, &b, "after-untrust").await, 404);
    assert_eq!(
        code(&a.cli(&["peers", "untrust", &id_b])),
        3,
        "no longer trusted"
    );
    let status = ok(&a.cli(&["status"]));
    assert!(
        status.contains("trusted_peers") && status.contains("problems"),
        "{status}"
    );
    a.terminate();
    b.terminate();
    cn.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_flags_and_config_keys() {
    let dir = tempfile::tempdir().unwrap();
    let c = http();
    // --trust-all: a clear warning at start, and GET /v1/Node says so.
    let d = Daemon::start(dir.path(), &["--http", "127.0.0.1:0", "--trust-all"]);
    assert_eq!(node_json(&c, &d).await["trust_all"], true);
    d.terminate();
    let log = std::fs::read_to_string(dir.path().join("node.log")).unwrap();
    assert!(log.contains("WARNING: --trust-all"), "{log}");
    // --trust ID: a configured peer, listed with its source, not stored.
    let peer = "12D3KooWKE37TxS1GdywN2zLCpd5vL7nizkSyqD2F3JBrkLVueGe";
    let d = Daemon::start(dir.path(), &["--http", "127.0.0.1:0", "--trust", peer]);
    let n = node_json(&c, &d).await;
    assert_eq!(n["trust_all"], false);
    assert_eq!(n["trusted_peers"][0]["peer_id"], peer, "{n}");
    assert_eq!(n["trusted_peers"][0]["source"], "config");
    d.terminate();
    let d = Daemon::start(dir.path(), &["--http", "127.0.0.1:0"]);
    assert_eq!(node_json(&c, &d).await["trusted_peers"], json!([]));
    d.terminate();
    // The config file's keys; a malformed id is refused at start.
    let cfg = dir.path().join("trust.toml");
    std::fs::write(&cfg, format!("trust = [\"{peer}\"]\ntrust_all = false\n")).unwrap();
    let d = Daemon::start(
        dir.path(),
        &["--http", "127.0.0.1:0", "--config", cfg.to_str().unwrap()],
    );
    assert_eq!(node_json(&c, &d).await["trusted_peers"][0]["peer_id"], peer);
    d.terminate();
    let o = base_command()
        .args([
            "node",
            "--http",
            "127.0.0.1:0",
            "--no-mdns",
            "--trust",
            "nope",
            "--data-dir",
        ])
        .arg(dir.path().join("z"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not a peer id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_never_names_another_resource_never_panics_and_imports_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _c) = daemon_with_map(dir.path(), "users").await;
    let node = d.url("");
    // `.`, `..` and empty names or keys would be resolved away by the URL: refused, nothing made.
    for (args, code_want) in [
        (vec!["map", "ttl", ".", "5"], "54302"),
        (vec!["get", "users", ".."], "54209"),
        (vec!["items", "."], "54302"),
        (vec!["set", "users", "", "{}"], "54209"),
    ] {
        let o = d.cli(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(code(&o), 1, "{args:?}: {err}");
        assert!(err.contains(code_want), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one error line: {err}");
    }
    let maps = stdout_json(&d.cli(&["--json", "maps"]));
    assert_eq!(maps.as_array().unwrap().len(), 1, "{maps}");
    // A node address without a scheme.
    let bare = d.addr.clone();
    let o = cli_at(&bare, &["map", "get", "users"], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A reader that stops early: no panic, success. (More output than a pipe holds.)
    let item = format!("{{\"i\": 1, \"pad\": \"{}\"}}", "x".repeat(1000));
    for i in 0..120 {
        assert!(d
            .cli(&["set", "users", &format!("k{i:03}"), &item])
            .status
            .success());
    }
    let mut child = base_command()
        .args(["--node", &node, "--json", "items", "users", "--all"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    use std::io::Read as _;
    out.read_exact(&mut first).unwrap();
    drop(out); // the pipe closes, as with `| head -c 1`
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        o.status.success() || o.status.code() == Some(0),
        "{:?} {err}",
        o.status
    );
    // An item's TTL alone.
    let o = d.cli(&["--json", "ttl", "users", "k000", "3600"]);
    let it = stdout_json(&o);
    assert!(it["date_expires"].is_string(), "{it}");
    assert_eq!(it["data"]["i"], 1);
    assert_eq!(code(&d.cli(&["ttl", "users", "missing", "60"])), 3);
    // --if-match on a missing item says so.
    let o = d.cli(&["remove", "users", "missing", "--if-match", "abc"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not exist") || code(&o) == 3, "{err}");
    // import: a bad line anywhere writes nothing; a good file writes every line.
    let input = "{\"key\": \"a\", \"data\": {}}\n{\"key\": \"b\", \"data\": {}}\nnot json\n";
    let o = cli_at(&node, &["import", "fresh"], Some(input));
    assert_eq!(code(&o), 1);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("line 3") && err.contains("nothing was imported"),
        "{err}"
    );
    assert_eq!(
        code(&d.cli(&["map", "get", "fresh"])),
        3,
        "not even the map"
    );
    let input = "{\"key\": \"a\", \"data\": {}}\n\n{\"key\": \"b\", \"data\": {}}\n";
    let o = cli_at(&node, &["--json", "import", "fresh"], Some(input));
    let r = stdout_json(&o);
    assert_eq!(r["imported"], 2);
    assert_eq!(r["written_lines"], json!([[1, 1], [3, 3]]));
    d.terminate();
}

#[test]
fn a_swarm_key_is_made_by_the_cli_and_found_beside_its_config_file() {
    let key = |()| {
        let o = base_command().arg("swarm-key").output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let (k1, k2) = (key(()), key(()));
    assert_ne!(k1, k2, "random");
    assert!(syncmesh::SwarmKey::parse(&k1).is_ok(), "{k1}");
    // A config file naming the key by a relative path: resolved beside the file, not in the
    // directory the node is started from.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("swarm.key"), &k1).unwrap();
    let cfg = dir.path().join("node.toml");
    std::fs::write(&cfg, "swarm_key = \"swarm.key\"\n").unwrap();
    let d = Daemon::start(
        dir.path(),
        &["--http", "127.0.0.1:0", "--config", cfg.to_str().unwrap()],
    );
    d.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_of_two_nodes_are_shown_by_the_http_api_and_the_cli() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = Daemon::start(dir_a.path(), &["--http", "127.0.0.1:0"]);
    let b = Daemon::start(dir_b.path(), &["--http", "127.0.0.1:0"]);
    let c = http();
    // Apart, both create the same item differently (a map by name is the same map).
    for (d, country) in [(&a, "UK"), (&b, "FR")] {
        let (s, _) = post(
            &c,
            &d.url(&format!("{P}/Maps")),
            json!({"UniqueName": "users"}),
        )
        .await;
        assert_eq!(s, 201);
        let (s, _) = post(
            &c,
            &d.url(&format!("{P}/Maps/users/Items")),
            json!({"Key": "david", "Data": {"country": country, "phone": 1}}),
        )
        .await;
        assert_eq!(s, 201);
    }
    // They meet.
    let (s, inv) = post(&c, &a.url("/v1/Node/Invites"), json!({})).await;
    assert_eq!(s, 201, "{inv}");
    let (s, joined) = post(
        &c,
        &b.url("/v1/Node/Join"),
        json!({"Ticket": inv["ticket"]}),
    )
    .await;
    assert_eq!(s, 201, "{joined}");
    let url = |d: &Daemon| d.url(&format!("{P}/Maps/users/Items/david/Conflicts"));
    let start = std::time::Instant::now();
    let (ca, cb) = loop {
        let ca: Value = c.get(url(&a)).send().await.unwrap().json().await.unwrap();
        let cb: Value = c.get(url(&b)).send().await.unwrap().json().await.unwrap();
        let same = ca["values"] == cb["values"] && ca["writers"] == cb["writers"];
        if ca["writers"].as_array().is_some_and(|w| w.len() == 2) && same {
            break (ca, cb);
        }
        assert!(start.elapsed() < DEADLINE, "no merged conflict: {ca} {cb}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Each creation stays whole: the item is one of them, the other is listed after it.
    let values = ca["values"].as_array().unwrap();
    assert_eq!(values.len(), 2, "{ca}");
    for country in ["UK", "FR"] {
        assert!(
            values.contains(&json!({"country": country, "phone": 1})),
            "{ca}"
        );
    }
    assert_eq!(ca["fields"], json!({}), "{ca}");
    let item: Value = c
        .get(a.url(&format!("{P}/Maps/users/Items/david")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(values[0], item["data"], "the visible value first");
    assert_eq!(cb["key"], "david");
    // The CLI shows the same.
    let o = a.cli(&["--json", "conflicts", "users", "david"]);
    assert_eq!(stdout_json(&o), ca);
    let text = ok(&b.cli(&["conflicts", "users", "david"]));
    assert!(
        text.contains("country") && text.contains("\"UK\"") && text.contains("\"FR\""),
        "{text}"
    );
    assert_eq!(code(&a.cli(&["conflicts", "users", "nobody"])), 3);
    a.terminate();
    b.terminate();
}
