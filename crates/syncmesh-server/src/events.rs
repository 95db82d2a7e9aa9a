//! `/Maps/{map}/Events`: a map's live events as a WebSocket or as Server-Sent Events,
//! resumable after any event id.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use syncmesh::EventStream;
use tokio_util::sync::CancellationToken;

use crate::error::{codes, ApiError};
use crate::model::{EventBody, EventsQuery, StreamError};
use crate::params::{Path, Query};
use crate::state::AppState;

/// How often an idle SSE stream sends a comment, so proxies and clients see it is alive.
const SSE_KEEPALIVE: Duration = Duration::from_secs(15);
/// WebSocket close code when the stream cannot go on because events were pruned (4000 + 410).
pub const CLOSE_PRUNED: u16 = 4410;
/// WebSocket close code for any other error of the event stream (4000 + HTTP status).
const CLOSE_ERROR_BASE: u16 = 4000;

/// What one step of an event stream gives a client.
enum Next {
    Event(Box<EventBody>),
    /// The stream cannot go on; this is the last message.
    Error(ApiError),
}

fn stream_error(e: &ApiError) -> StreamError {
    StreamError {
        kind: "error".into(),
        code: e.code,
        message: e.message.clone(),
        status: e.status.as_u16(),
    }
}

/// The events of a map, as a WebSocket (on an upgrade request) or Server-Sent Events
/// (`Accept: text/event-stream`, or no `Accept`).
///
/// Without `after` or `Last-Event-ID` the stream starts with the next change; with one, it
/// replays every retained event after that id first, so a client that reconnects with the
/// last id it saw misses nothing and sees nothing twice. When the events after that id are no
/// longer retained the request fails with 410/20410 (or, for a stream already running, ends
/// with an `error` message): re-read the map, then subscribe from the newest id.
#[utoipa::path(
    get,
    path = "/v1/Services/default/Maps/{map}/Events",
    tag = "events",
    params(
        ("map" = String, Path, description = "Sid or unique name, percent-encoded"),
        EventsQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id (takes precedence over `after`)"),
    ),
    responses(
        (status = 101, description = "WebSocket: one text message per event (an `EventBody`), then an error message (a `StreamError`) if the stream fails"),
        (status = 200, description = "Server-Sent Events: `id:` is the event id, `data:` an `EventBody`; a failing stream ends with `event: error` and a `StreamError`",
            content_type = "text/event-stream", body = EventBody),
        (status = 400, description = "Invalid `after` or `Last-Event-ID` (20001)", body = crate::model::ErrorBody),
        (status = 404, description = "No such map (54200)", body = crate::model::ErrorBody),
        (status = 406, description = "Neither a WebSocket upgrade nor `text/event-stream` (20406)", body = crate::model::ErrorBody),
        (status = 410, description = "The events after that id are no longer retained (20410)", body = crate::model::ErrorBody),
    ),
)]
pub async fn events(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    req: Request,
) -> Result<Response, ApiError> {
    let (mut parts, _body) = req.into_parts();
    let after = resume_point(&parts.headers, q.after.as_deref())?;
    let is_ws = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let ws = if is_ws {
        Some(
            WebSocketUpgrade::from_request_parts(&mut parts, &st)
                .await
                .map_err(|e| {
                    ApiError::invalid(format!("bad WebSocket upgrade: {}", e.body_text()))
                })?,
        )
    } else {
        if !accepts_sse(&parts.headers) {
            return Err(ApiError::new(
                StatusCode::NOT_ACCEPTABLE,
                codes::NOT_ACCEPTABLE,
                "events are sent as a WebSocket (upgrade) or as Server-Sent Events (Accept: text/event-stream)",
            ));
        }
        None
    };
    let map = st.map(&id).await?;
    // Handles are cached by id: a map removed since must not get an idle stream.
    map.info().await?;
    let slot = st.subscribe_slot(map.sid().as_str())?;
    // A WebSocket keeps its connection's slot after the upgrade: it still holds a socket.
    let conn_slot = parts.extensions.get::<crate::serve::ConnSlot>().cloned();
    let limits = st.limits().clone();
    let stream = match after {
        Some(a) => map.subscribe_from(a).await?,
        None => map.subscribe().await?,
    };
    let shutdown = st.shutdown().clone();
    let resume = stream.resume_point();
    let mut resp = match ws {
        Some(ws) => ws
            .max_message_size(limits.ws_max_message)
            .max_frame_size(limits.ws_max_message)
            .on_upgrade(move |socket| async move {
                run_ws(socket, stream, shutdown, limits.send_timeout).await;
                drop((slot, conn_slot));
            })
            .into_response(),
        None => sse(stream, shutdown, slot).into_response(),
    };
    // Also a header: a WebSocket has no place for it in the stream without a message that
    // consumers of events would have to skip.
    if let Some(id) = resume {
        resp.headers_mut()
            .insert(RESUME_POINT_HEADER, axum::http::HeaderValue::from(id));
    }
    Ok(resp)
}

/// Response header of `/Events`: the stream's resume point (see [`EventStream::resume_point`]).
pub const RESUME_POINT_HEADER: &str = "syncmesh-resume-point";

/// `Last-Event-ID` (what browsers send when they reconnect), else `?after=`.
fn resume_point(headers: &HeaderMap, after: Option<&str>) -> Result<Option<u64>, ApiError> {
    let parse = |what: &str, s: &str| {
        s.trim().parse::<u64>().map(Some).map_err(|_| {
            ApiError::invalid(format!(
                "invalid {what} {s:?}: an event id (a whole number)"
            ))
        })
    };
    if let Some(v) = headers.get("last-event-id") {
        let s = v
            .to_str()
            .map_err(|_| ApiError::invalid("the Last-Event-ID header is not visible ASCII"))?;
        if !s.trim().is_empty() {
            return parse("Last-Event-ID", s);
        }
    }
    after.map_or(Ok(None), |a| parse("after", a))
}

fn accepts_sse(headers: &HeaderMap) -> bool {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    accept.split(',').any(|part| {
        let mime = part.split(';').next().unwrap_or("").trim();
        matches!(mime, "text/event-stream" | "*/*" | "text/*")
    })
}

/// Next item of `stream`, or `None` when it ended (node closed) or shutdown began.
async fn next(stream: &mut EventStream, shutdown: &CancellationToken) -> Option<Next> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        r = stream.next() => r.map(|r| match r {
            Ok(ev) => Next::Event(Box::new(EventBody::from(ev))),
            Err(e) => Next::Error(ApiError::from(e)),
        }),
    }
}

fn sse(
    stream: EventStream,
    shutdown: CancellationToken,
    slot: crate::state::SubscriberSlot,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    // First an event with only an id: the stream's resume point, so a client that reconnects
    // before any event arrives resumes (`Last-Event-ID`) without missing what happened meanwhile.
    let start = stream
        .resume_point()
        .map(|id| Ok(SseEvent::default().id(id.to_string())));
    // The slot lives as long as the stream (hyper drops it when the client goes).
    let s = futures_util::stream::unfold(
        (stream, shutdown, false, slot),
        |(mut stream, shutdown, done, slot)| async move {
            if done {
                return None;
            }
            let ev = match next(&mut stream, &shutdown).await? {
                Next::Event(body) => {
                    let data = serde_json::to_string(&body).unwrap_or_default();
                    (
                        SseEvent::default().id(body.id.to_string()).data(data),
                        false,
                    )
                }
                Next::Error(e) => {
                    let data = serde_json::to_string(&stream_error(&e)).unwrap_or_default();
                    (SseEvent::default().event("error").data(data), true)
                }
            };
            Some((Ok(ev.0), (stream, shutdown, ev.1, slot)))
        },
    );
    let s = futures_util::stream::iter(start).chain(s);
    Sse::new(s).keep_alive(KeepAlive::new().interval(SSE_KEEPALIVE))
}

/// Sends one message within `deadline`; false if the client is gone or did not take it.
async fn send(
    tx: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    deadline: Duration,
    m: Message,
) -> bool {
    use futures_util::SinkExt as _;
    matches!(tokio::time::timeout(deadline, tx.send(m)).await, Ok(Ok(())))
}

async fn run_ws(
    socket: WebSocket,
    mut stream: EventStream,
    shutdown: CancellationToken,
    send_timeout: Duration,
) {
    // Sending and receiving apart: a client that stops reading blocks sends, and must still
    // be found out (by the send deadline) while its pongs and close are read.
    let (mut tx, mut rx) = socket.split();
    // Pings find clients that vanished without closing (their host went away): one that has
    // not answered the previous ping by the next is dropped, with its subscription.
    let mut ping = tokio::time::interval(SSE_KEEPALIVE);
    ping.tick().await;
    let mut awaiting_pong = false;
    let close = loop {
        tokio::select! {
            n = next(&mut stream, &shutdown) => match n {
                Some(Next::Event(body)) => {
                    let text = serde_json::to_string(&body).unwrap_or_default();
                    if !send(&mut tx, send_timeout, Message::Text(text.into())).await {
                        return; // gone, or not reading within the deadline
                    }
                }
                Some(Next::Error(e)) => {
                    let text = serde_json::to_string(&stream_error(&e)).unwrap_or_default();
                    let _ = send(&mut tx, send_timeout, Message::Text(text.into())).await;
                    let code = if e.code == codes::EVENTS_PRUNED {
                        CLOSE_PRUNED
                    } else {
                        CLOSE_ERROR_BASE.saturating_add(e.status.as_u16())
                    };
                    break CloseFrame { code, reason: "event stream failed".into() };
                }
                // Node closed or server shutting down: "going away".
                None => break CloseFrame { code: 1001, reason: "node shutting down".into() },
            },
            _ = ping.tick() => {
                if awaiting_pong {
                    return; // no answer since the last ping: the client is gone
                }
                awaiting_pong = true;
                if !send(&mut tx, send_timeout, Message::Ping(Vec::new().into())).await {
                    return;
                }
            }
            incoming = rx.next() => match incoming {
                // A message over the size limit is an error here: that socket ends.
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                // Any message shows the client is there; pings are answered by axum.
                Some(Ok(_)) => awaiting_pong = false,
            },
        }
    };
    let _ = send(&mut tx, send_timeout, Message::Close(Some(close))).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn resume_point_prefers_last_event_id() {
        let mut h = HeaderMap::new();
        assert_eq!(resume_point(&h, None).unwrap(), None);
        assert_eq!(resume_point(&h, Some("7")).unwrap(), Some(7));
        h.insert("last-event-id", HeaderValue::from_static("9"));
        assert_eq!(resume_point(&h, Some("7")).unwrap(), Some(9));
        h.insert("last-event-id", HeaderValue::from_static("x"));
        assert_eq!(resume_point(&h, None).unwrap_err().code, 20001);
        assert_eq!(
            resume_point(&HeaderMap::new(), Some("-1"))
                .unwrap_err()
                .code,
            20001
        );
    }

    #[test]
    fn accept_negotiation() {
        let mut h = HeaderMap::new();
        assert!(accepts_sse(&h));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        assert!(!accepts_sse(&h));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        assert!(accepts_sse(&h));
    }
}
