//! mDNS discovery between two `syncmesh node` processes on a real (virtual) local network: two
//! network namespaces joined by a veth pair. mDNS ignores loopback, so this is the only way to
//! show it on one machine. Discovery only lists a peer: maps flow once the nodes trust each
//! other. Needs root and `ip` (iproute2); prints SKIPPED otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the report

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_syncmesh");
const DEADLINE: Duration = Duration::from_secs(90);

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Two namespaces `a` and `b` joined by a veth pair, removed on drop.
struct Lan {
    ns: [String; 2],
    addr: [String; 2],
}

impl Lan {
    fn new() -> Option<Lan> {
        let id = std::process::id() % 50_000;
        let ns = [format!("smA{id}"), format!("smB{id}")];
        let dev = [format!("smva{id}"), format!("smvb{id}")];
        let net = 1 + id % 250;
        let addr = [format!("10.77.{net}.1"), format!("10.77.{net}.2")];
        if !ip(&["netns", "add", &ns[0]]) {
            return None;
        }
        let lan = Lan { ns, addr };
        let ok = ip(&["netns", "add", &lan.ns[1]])
            && ip(&[
                "link", "add", &dev[0], "type", "veth", "peer", "name", &dev[1],
            ])
            && (0..2).all(|i| {
                ip(&["link", "set", &dev[i], "netns", &lan.ns[i]])
                    && ip(&["-n", &lan.ns[i], "link", "set", "lo", "up"])
                    && ip(&[
                        "-n",
                        &lan.ns[i],
                        "addr",
                        "add",
                        &format!("{}/24", lan.addr[i]),
                        "dev",
                        &dev[i],
                    ])
                    && ip(&[
                        "-n",
                        &lan.ns[i],
                        "link",
                        "set",
                        &dev[i],
                        "up",
                        "multicast",
                        "on",
                    ])
            });
        ok.then_some(lan)
    }

    fn exec(&self, i: usize) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[i], BIN]);
        c.env_remove("SYNCMESH_TOKEN").env_remove("SYNCMESH_NODE");
        c
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for n in &self.ns {
            ip(&["netns", "del", n]);
        }
    }
}

struct Daemon {
    child: Child,
    url: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(lan: &Lan, i: usize, dir: &std::path::Path) -> Daemon {
    let mut child = lan
        .exec(i)
        .args(["node", "--token", "t", "--data-dir"])
        .arg(dir)
        .args(["--http", &format!("{}:0", lan.addr[i])])
        .args(["--listen", &format!("/ip4/{}/tcp/0", lan.addr[i])])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let line = rx.recv_timeout(DEADLINE).expect("the node's address line");
    let url = format!("http://{}", line.rsplit("http://").next().unwrap().trim());
    Daemon { child, url }
}

fn cli(lan: &Lan, i: usize, d: &Daemon, args: &[&str]) -> Output {
    lan.exec(i)
        .args(["--node", &d.url, "--token", "t"])
        .args(args)
        .output()
        .unwrap()
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

fn status(lan: &Lan, i: usize, d: &Daemon) -> serde_json::Value {
    serde_json::from_str(&ok(&cli(lan, i, d, &["--json", "status"]))).unwrap()
}

/// Waits until `cond` holds for node `i`'s status; returns that status.
fn wait_status(
    lan: &Lan,
    i: usize,
    d: &Daemon,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let s = status(lan, i, d);
        if cond(&s) {
            return s;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for: {what}; last: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn discovered(s: &serde_json::Value, peer: &str) -> Option<serde_json::Value> {
    s["discovered_peers"]
        .as_array()?
        .iter()
        .find(|d| d["peer_id"] == peer)
        .cloned()
}

#[test]
fn nodes_on_one_lan_discover_each_other_but_sync_only_once_trusted() {
    if !Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"))
    {
        eprintln!("SKIPPED: creating network namespaces needs root");
        return;
    }
    let Some(lan) = Lan::new() else {
        eprintln!("SKIPPED: `ip netns` / veth are not available here");
        return;
    };
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    // No --peer and no trust anywhere: the nodes can only find each other by mDNS (on by
    // default), and finding is not trusting.
    let a = start(&lan, 0, dirs[0].path());
    let b = start(&lan, 1, dirs[1].path());
    let ids = [&a, &b]
        .iter()
        .enumerate()
        .map(|(i, d)| status(&lan, i, d)["peer_id"].as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    for (i, d) in [(0, &a), (1, &b)] {
        ok(&cli(&lan, i, d, &["map", "create", "users"]));
    }
    ok(&cli(
        &lan,
        0,
        &a,
        &["set", "users", "found", r#"{"by": "mdns"}"#],
    ));
    // Each lists the other as discovered, not trusted, and neither is connected to the other.
    for (i, d) in [(0, &a), (1, &b)] {
        let other = &ids[1 - i];
        let s = wait_status(&lan, i, d, "the other node discovered", |s| {
            discovered(s, other).is_some()
        });
        let found = discovered(&s, other).unwrap();
        assert_eq!(found["trusted"], false, "{s}");
        assert!(found["last_seen"].is_string(), "{s}");
        assert!(!found["addrs"].as_array().unwrap().is_empty(), "{s}");
        assert_eq!(s["connected_peers"], serde_json::json!([]), "{s}");
        assert_eq!(s["trusted_peers"], serde_json::json!([]), "{s}");
    }
    // By now both have seen each other's announcements: B still has nothing of A's map.
    let o = cli(&lan, 1, &b, &["--json", "get", "users", "found"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let items: serde_json::Value =
        serde_json::from_str(&ok(&cli(&lan, 1, &b, &["--json", "items", "users"]))).unwrap();
    assert_eq!(
        items,
        serde_json::json!([]),
        "an untrusted peer's items arrived"
    );

    // Trust, the realistic way: an invitation from A, joined by B.
    let out = ok(&cli(&lan, 0, &a, &["invite"]));
    let ticket = out.lines().last().unwrap().trim().to_string();
    ok(&cli(&lan, 1, &b, &["join", &ticket]));
    let start = Instant::now();
    loop {
        let o = cli(&lan, 1, &b, &["--json", "get", "users", "found"]);
        if o.status.success() {
            let item: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(item["data"]["by"], "mdns");
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "B never received A's item after joining"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And back: B's write reaches A.
    ok(&cli(
        &lan,
        1,
        &b,
        &["set", "users", "back", r#"{"by": "b"}"#],
    ));
    let start = Instant::now();
    while !cli(&lan, 0, &a, &["get", "users", "back"]).status.success() {
        assert!(start.elapsed() < DEADLINE, "A never received B's item");
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = wait_status(&lan, 1, &b, "A discovered and trusted", |s| {
        discovered(s, &ids[0]).is_some_and(|d| d["trusted"] == true)
    });
    assert_eq!(s["connected_peers"], serde_json::json!([ids[0]]), "{s}");
}
