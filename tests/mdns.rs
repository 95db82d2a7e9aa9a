//! mDNS discovery between two `syncmesh node` processes on a real (virtual) local network: two
//! network namespaces joined by a veth pair. mDNS ignores loopback, so this is the only way to
//! show it on one machine. Needs root and `ip` (iproute2); prints SKIPPED otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the report

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_syncmesh");
const DEADLINE: Duration = Duration::from_secs(60);

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

#[test]
fn nodes_on_one_lan_find_each_other_with_mdns_and_replicate() {
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
    // No --peer anywhere: the nodes can only find each other by mDNS (on by default).
    let a = start(&lan, 0, dirs[0].path());
    let b = start(&lan, 1, dirs[1].path());
    for (i, d) in [(0, &a), (1, &b)] {
        let o = cli(&lan, i, d, &["map", "create", "users"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let o = cli(&lan, 0, &a, &["set", "users", "found", r#"{"by": "mdns"}"#]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
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
            "B never received A's item: mDNS did not connect them"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = cli(&lan, 1, &b, &["--json", "status"]);
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        status["connected_peers"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
}
