//! The HTTP listener, with what `axum::serve` lacks for a node on a shared machine: a bound on
//! connections (the oldest connection with no request in flight, one that has sent nothing
//! yet or idles between requests, makes room for a new one; with none, the new one gets `503`
//! and `Retry-After`), a deadline for each request head that also closes idle keep-alive
//! connections, `TCP_NODELAY`, and a graceful end.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::Router;
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::state::{Limits, ServerOptions};

/// Answers to connections over the limit that are being written at once (each holds a
/// descriptor for at most [`REFUSAL_DEADLINE`]); beyond, such connections are just closed.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;
const REFUSAL_DEADLINE: Duration = Duration::from_secs(1);

/// A connection's slot: held by the connection, and by a WebSocket it was upgraded to (so
/// upgraded sockets count too). Travels in each request's extensions.
#[derive(Clone)]
pub struct ConnSlot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

/// A request's view of its connection's activity (in its extensions): [`Self::waiting`] marks
/// the time spent waiting on the client (its body) as idle, so such a connection can be
/// closed to make room.
#[derive(Clone)]
pub struct ConnActivity(Arc<Conn>);

impl ConnActivity {
    /// Until the returned guard drops, the request counts as not in flight.
    pub fn waiting(&self) -> Waiting {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        Waiting(self.0.clone())
    }
}

/// See [`ConnActivity::waiting`]: in flight again when dropped.
pub struct Waiting(Arc<Conn>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.active.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the listener knows of one connection, to pick one to close when full.
struct Conn {
    /// Requests whose answer is still being sent (a live event stream stays in flight).
    active: AtomicUsize,
    close: CancellationToken,
}

/// Counts a request in flight on its connection until the answer's body is done with.
struct InFlight(Arc<Conn>);

impl InFlight {
    fn new(c: &Arc<Conn>) -> Self {
        c.active.fetch_add(1, Ordering::Relaxed);
        InFlight(c.clone())
    }
}

impl InFlight {
    /// Nothing: makes a closure own the guard (it ends with the closure).
    fn held(&self) {}
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connections in the order they came, for eviction.
#[derive(Default)]
struct Registry {
    conns: Mutex<VecDeque<Weak<Conn>>>,
}

impl Registry {
    fn add(&self, c: &Arc<Conn>, max: usize) {
        let mut q = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        // Ended connections are forgotten here too, so the list stays near the live count.
        if q.len() >= max.saturating_mul(2).max(64) {
            q.retain(|w| w.strong_count() > 0);
        }
        q.push_back(Arc::downgrade(c));
    }

    /// Closes the oldest live connection with no request in flight (it sent nothing yet, a
    /// part of a head, or idles between requests); whether one was found. Ended connections
    /// are forgotten on the way.
    fn evict_idle(&self) -> bool {
        let mut q = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        q.retain(|w| w.strong_count() > 0);
        let found = q.iter().position(|w| {
            w.upgrade()
                .is_some_and(|c| c.active.load(Ordering::Relaxed) == 0 && !c.close.is_cancelled())
        });
        match found.and_then(|i| q.remove(i)).and_then(|w| w.upgrade()) {
            Some(c) => {
                c.close.cancel();
                true
            }
            None => false,
        }
    }
}

/// Serves `app` on `listener` with `opts`' connection limits and timeouts until
/// [`ServerOptions::shutdown`] is cancelled; then stops accepting, lets requests in flight
/// finish (live event streams end on the same signal) and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    opts: &ServerOptions,
) -> std::io::Result<()> {
    let limits = opts.limits.clone();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    let registry = Arc::new(Registry::default());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 * 1024);
    let shutdown = opts.shutdown.clone();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was accepted: wait
                    // a little rather than spin; established connections are served meanwhile.
                    tracing::warn!("accepting an HTTP connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Full: an idle socket makes room (its slot comes back as its task ends).
                let made_room = registry.evict_idle();
                let waited = if made_room {
                    tokio::time::timeout(Duration::from_millis(200), slots.clone().acquire_owned())
                        .await
                        .ok()
                        .and_then(Result::ok)
                } else {
                    None
                };
                match waited {
                    Some(p) => p,
                    None => {
                        refuse(stream, &refusals, &limits);
                        continue;
                    }
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(Conn {
            active: AtomicUsize::new(0),
            close: shutdown.child_token(),
        });
        registry.add(&conn, limits.max_connections);
        let slot = ConnSlot(Arc::new(slot));
        let app = app.clone();
        let seen = conn.clone();
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let flight = InFlight::new(&seen);
                req.extensions_mut().insert(slot.clone());
                req.extensions_mut().insert(ConnActivity(seen.clone()));
                let app = app.clone();
                async move {
                    // RFC 9112 §3.2: an HTTP/1.1 request without exactly one Host is refused
                    // (the Host check of a tokenless node relies on it being there).
                    let hosts = req.headers().get_all(hyper::header::HOST).iter().count();
                    if req.version() == hyper::Version::HTTP_11 && hosts != 1 {
                        let e = crate::ApiError::invalid(
                            "an HTTP/1.1 request needs exactly one Host header",
                        );
                        return Ok(axum::response::IntoResponse::into_response(e));
                    }
                    let resp = app.oneshot(req).await?;
                    // In flight until hyper is done with the body (sent, or the client gone).
                    Ok::<_, std::convert::Infallible>(resp.map(|b| {
                        axum::body::Body::new(b.map_frame(move |f| {
                            flight.held();
                            f
                        }))
                    }))
                }
            });
        let io = DeadlineIo::new(stream, limits.send_timeout);
        let served = http.serve_connection(TokioIo::new(io), svc).with_upgrades();
        let close = conn.close.clone();
        let stopping = shutdown.clone();
        tokio::spawn(async move {
            let mut served = std::pin::pin!(served);
            tokio::select! {
                _ = served.as_mut() => {}
                _ = close.cancelled() => {
                    if stopping.is_cancelled() {
                        // Shutting down: answer what is in flight, then close.
                        served.as_mut().graceful_shutdown();
                        let _ = served.await;
                    }
                    // Else evicted: the socket is dropped.
                }
            }
            drop(conn);
        });
    }
    drop(listener);
    // Every slot back: every connection (and WebSocket) has ended. A client that stops
    // reading cannot hold this up for longer than the send deadline.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
    Ok(())
}

/// Tells a connection over the limit to come back later, then closes it.
fn refuse(mut stream: TcpStream, refusals: &Arc<Semaphore>, limits: &Limits) {
    let Ok(permit) = refusals.clone().try_acquire_owned() else {
        return; // dropping it closes it
    };
    let body = crate::ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        crate::error::codes::OVERLOADED,
        format!(
            "this node serves at most {} HTTP connections at once; retry shortly",
            limits.max_connections
        ),
    )
    .body();
    let body = serde_json::to_string(&body).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tokio::spawn(async move {
        let _ = stream.set_nodelay(true);
        let write = async {
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(body.as_bytes()).await?;
            stream.shutdown().await
        };
        let _ = tokio::time::timeout(REFUSAL_DEADLINE, write).await;
        drop(permit);
    });
}

/// A socket whose writes fail once they have made no progress for `deadline`: a client that
/// stops reading (an event stream, a large answer, a WebSocket) is dropped, and shutdown never
/// waits on it for longer.
struct DeadlineIo {
    inner: TcpStream,
    deadline: Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl DeadlineIo {
    fn new(inner: TcpStream, deadline: Duration) -> Self {
        DeadlineIo {
            inner,
            deadline,
            stalled: None,
        }
    }

    /// After the inner write said "not now": fails once that has lasted the deadline.
    fn pending<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<T>> {
        let deadline = self.deadline;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(deadline)));
        match std::future::Future::poll(sleep.as_mut(), cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client took nothing of what was sent for the send timeout",
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl tokio::io::AsyncRead for DeadlineIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for DeadlineIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match std::pin::Pin::new(&mut self.inner).poll_write(cx, buf) {
            std::task::Poll::Pending => self.pending(cx),
            done => {
                self.stalled = None;
                done
            }
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut self.inner).poll_flush(cx) {
            std::task::Poll::Pending => self.pending(cx),
            done => {
                self.stalled = None;
                done
            }
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            std::task::Poll::Pending => self.pending(cx),
            done => {
                self.stalled = None;
                done
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
