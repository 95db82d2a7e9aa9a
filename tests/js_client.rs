//! The JavaScript client's and the inspector page's own tests (Node.js's test runner, in
//! `crates/syncmesh-server/sdk/test`), run against this build's `syncmesh` binary, so that
//! `cargo test --workspace` covers them.
//!
//! Needs Node.js 20+. The browser tests also need Chromium and `npm ci` in the sdk directory;
//! without them they are skipped, unless `SYNCMESH_REQUIRE_BROWSER=1` (CI sets it, and
//! `SYNCMESH_REQUIRE_NODE=1`, so nothing is skipped there).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the report

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_syncmesh");

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

#[test]
fn javascript_client_and_inspector() {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../syncmesh-server/sdk");
    let version = Command::new("node")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success());
    let Some(version) = version else {
        assert!(
            !required("SYNCMESH_REQUIRE_NODE"),
            "Node.js is required (SYNCMESH_REQUIRE_NODE=1) but `node` did not run"
        );
        println!("SKIPPED: no Node.js on this machine (the JavaScript client needs Node.js 20+)");
        return;
    };
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 20,
        "Node.js {version} is too old: the client needs 20+"
    );
    let out = Command::new("node")
        .args([
            "--test",
            "test/unit.test.mjs",
            "test/node.test.mjs",
            "test/browser.test.mjs",
        ])
        .current_dir(&sdk)
        .env("SYNCMESH_BIN", BIN)
        .env_remove("SYNCMESH_TOKEN")
        .env_remove("SYNCMESH_NODE")
        .output()
        .expect("run node --test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The summary always; every line on failure (cargo shows a passing test's output only on
    // request).
    println!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "the JavaScript tests failed (node {version}); output above"
    );
    // A run that found no test file would pass: make sure the suites actually ran.
    let passed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("# pass "))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or(0);
    assert!(passed >= 10, "only {passed} JavaScript tests passed");
}
