//! Two nodes on this machine, joined over libp2p on 127.0.0.1 by an invitation: a write on one
//! arrives on the other as a remote event, and a map that only the first node has is opened on
//! the second. Nodes exchange maps only with peers they trust: B joins A with A's ticket.
//!
//! `cargo run --example two_nodes`

use std::time::Duration;

use serde_json::json;
use syncmesh::trust::InviteOptions;
use syncmesh::{EventKind, Node};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Node A listens on a free port and invites B.
    let a = Node::builder()
        .listen("/ip4/127.0.0.1/tcp/0".parse()?)
        .mdns(false)
        .open()
        .await?;
    let a_addrs = a.listening().await?;
    println!("A is {}", a_addrs[0]);
    let users_a = a.map("users").await?;
    users_a
        .set("david", json!({"phone_number": 12345678, "country": "UK"}))
        .await?;

    // One use, ten minutes, every map: the ticket carries A's peer id, addresses and a secret.
    let invite = a.invite(InviteOptions::default()).await?;
    println!("A's ticket: {}", invite.ticket);

    let b = Node::builder()
        .listen("/ip4/127.0.0.1/tcp/0".parse()?)
        .mdns(false)
        .open()
        .await?;
    // Both now trust each other (stored: it survives restarts) and B keeps dialing A.
    let inviter = b.join(&invite.ticket).await?;
    println!("B joined {}", inviter.peer_id);
    // Wait (at most 30 s) until B exchanges maps with A.
    tokio::time::timeout(Duration::from_secs(30), b.peers_connected(1)).await??;
    // B has never seen `users`: opening it asks its peers and waits until it has arrived.
    let users_b = b.open_existing("users").await?;
    let david = users_b.get("david").await?;
    println!(
        "B opened users from A: david = {}",
        serde_json::Value::Object(david.data)
    );

    // A write on A reaches B's subscription, marked as not local.
    let mut events = users_b.subscribe().await?;
    users_a.update("david", json!({"country": "IRL"})).await?;
    while let Some(e) = events.next().await {
        let e = e?;
        if let EventKind::ItemUpdated { item, .. } = &e.kind {
            println!(
                "B saw {} updated to {} (is_local = {})",
                item.key,
                serde_json::Value::Object(item.data.clone()),
                e.is_local
            );
            break;
        }
    }
    a.close().await?;
    b.close().await?;
    Ok(())
}
